import json
import subprocess
import sys

import numpy as np
from PIL import Image

from core.config import DataConfig
from core.data import ImageData
from tests.conftest import ROOT
from tests.test_train import ENV


def prepare(*args):
    return subprocess.run([sys.executable, "-m", "experiments.data", *map(str, args)], cwd=ROOT, env=ENV,
                          capture_output=True, text=True)


def test_celebahq_prepare_checks_counts_and_loads(tmp_path):
    src = tmp_path / "celeba"
    src.mkdir()
    for i in range(5):
        Image.fromarray(np.random.default_rng(i).integers(0, 255, (40, 30, 3), dtype=np.uint8)).save(src / f"{i}.jpg")
    bad = prepare("celebahq", "--src", src, "--data", tmp_path / "data", "--size", 16)
    assert bad.returncode != 0 and "expected 30000" in bad.stderr
    ok = prepare("celebahq", "--src", src, "--data", tmp_path / "data", "--size", 16, "--allow-count-mismatch", "--test", 2)
    assert ok.returncode == 0, ok.stderr
    out = tmp_path / "data" / "celebahq256"
    assert json.loads((out / "PREPARED.json").read_text())["count"] == 5
    assert ImageData(DataConfig(source=str(out), resolution=16, channels=3)).images([2]).shape == (1, 3, 16, 16)


def test_inpainting_test_split_is_held_out_from_training(tmp_path):
    """RePaint's protocol: the test images are never training images (a flat folder has no test split at all)."""
    src = tmp_path / "celeba"
    src.mkdir()
    for i in range(6):
        Image.fromarray(np.full((20, 20, 3), i * 40, np.uint8)).save(src / f"{i}.png")
    proc = prepare("celebahq", "--src", src, "--data", tmp_path / "data", "--size", 8, "--allow-count-mismatch", "--test", 2)
    assert proc.returncode == 0, proc.stderr
    out = tmp_path / "data" / "celebahq256"
    splits = json.loads((out / "PREPARED.json").read_text())["splits"]
    assert len(splits["test"]) == 2 and len(splits["train"]) == 4
    assert not set(splits["test"]) & set(splits["train"]) and set(splits["test"]) | set(splits["train"]) == {
        f"{i}.png" for i in range(6)}
    train = ImageData(DataConfig(source=str(out), resolution=8, channels=3, split="train"))
    test = ImageData(DataConfig(source=str(out), resolution=8, channels=3, split="test"))
    level = lambda data: {round(float(x.mean()), 3) for x in data.images(range(len(data)))}  # one grey level per source
    assert len(train) == 4 and len(test) == 2 and not level(train) & level(test)
    import pytest

    from core.data import DataError

    with pytest.raises(DataError, match="no test/ folder"):
        ImageData(DataConfig(source=str(out / "train"), resolution=8, channels=3, split="test"))


def test_coco_prepare_writes_captions_and_seeded_val_prompts(tmp_path):
    src = tmp_path / "coco"
    for split in ("train", "val"):
        (src / f"{split}2014").mkdir(parents=True)
        images, anns = [], []
        for i in range(4):
            name = f"COCO_{split}2014_{i:012d}.jpg"
            Image.new("RGB", (30, 20), (i * 40, 0, 0)).save(src / f"{split}2014" / name)
            images.append({"id": i, "file_name": name})
            anns += [{"image_id": i, "caption": f"{split} image {i} caption {c}"} for c in range(2)]
        (src / "annotations").mkdir(exist_ok=True)
        (src / "annotations" / f"captions_{split}2014.json").write_text(json.dumps({"images": images, "annotations": anns}))
    proc = prepare("coco", "--src", src, "--data", tmp_path / "data", "--size", 16, "--allow-count-mismatch")
    assert proc.returncode == 0, proc.stderr
    train = ImageData(DataConfig(source=str(tmp_path / "data" / "coco2014train256"), resolution=16, channels=3,
                                 caption_column="caption"))
    assert train.captions == [f"train image {i} caption 0" for i in range(4)]
    prompts = (tmp_path / "data" / "coco2014val_30k.jsonl").read_text().splitlines()
    assert len(prompts) == 8 and len(set(prompts)) == 8
