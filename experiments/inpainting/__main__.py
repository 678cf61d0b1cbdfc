from ..runner import main
from . import PRESETS, __doc__
from .evaluate import evaluate_inpainting

main("inpainting", PRESETS, __doc__, evaluate=evaluate_inpainting)
