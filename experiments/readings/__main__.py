from ..runner import main
from . import PRESETS, __doc__

main("readings", PRESETS, __doc__)
