from ..runner import main
from . import PRESETS, __doc__

main("scaling", PRESETS, __doc__)
