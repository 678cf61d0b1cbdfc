"""confident_digits of the real digits themselves: the ceiling for the mini baseline's quality bar.

    PYTHONPATH=. python results/tuning/real_confidence.py > results/tuning/real_confidence.jsonl
"""

import json

from core.config import DataConfig
from core.data import ImageData
from eval.metrics import classifier_outputs

for split in ("train", "test"):
    data = ImageData(DataConfig(split=split))
    _, probs = classifier_outputs(data.images(range(len(data))), 16)
    print(json.dumps({"split": split, "images": len(data), "resolution": 16,
                      "confident_digits": float((probs.max(1) >= 0.9).mean())}))
