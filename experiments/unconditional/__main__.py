from ..runner import main
from . import PRESETS, __doc__

main("unconditional", PRESETS, __doc__)
