from ..runner import main
from . import PRESETS, __doc__

main("decoding_ablation", PRESETS, __doc__)
