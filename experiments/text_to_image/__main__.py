import json
from pathlib import Path

from core.data import digit_caption

from ..evaluate import evaluate_unconditional
from ..runner import main
from . import PRESETS, __doc__


def evaluate_text_to_image(experiment, preset, cfg, run_dir, scale, num_samples, records_path, step_time=True,
                           overrides=None):
    """Digits: sample k is prompted with digit k mod 10 (-> prompt_acc). Paper: the first N COCO prompts."""
    if scale == "paper":
        path = Path(preset.extra["prompts_file"])
        if not path.exists():
            raise FileNotFoundError(f"{path} is missing: write the 30,000 seeded COCO 2014 val captions there "
                                    "(one JSON object with a 'caption' per line)")
        prompts = [json.loads(line)["caption"] for line in path.read_text().splitlines()[:num_samples]]
        return evaluate_unconditional(experiment, preset, cfg, run_dir, scale, num_samples, records_path, prompts,
                                      step_time=step_time, overrides=overrides)
    labels = [k % 10 for k in range(num_samples)]
    return evaluate_unconditional(experiment, preset, cfg, run_dir, scale, num_samples, records_path,
                                  [digit_caption(label) for label in labels], labels, step_time=step_time,
                                  overrides=overrides)


main("text_to_image", PRESETS, __doc__, evaluate=evaluate_text_to_image)
