from ..runner import main
from . import PRESETS, __doc__

main("backbones", PRESETS, __doc__)
