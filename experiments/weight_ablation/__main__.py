from ..runner import main
from . import PRESETS, __doc__

main("weight_ablation", PRESETS, __doc__)
