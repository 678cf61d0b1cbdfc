from ..runner import main
from . import PRESETS, __doc__

main("stride_ablation", PRESETS, __doc__)
