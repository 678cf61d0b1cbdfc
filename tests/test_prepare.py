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


def test_a_missing_source_or_reference_input_is_one_line_not_a_traceback(tmp_path, monkeypatch, capsys):
    """Every dataset's --src that does not exist says so (coco said a caption file was missing), and eval.fid_ref's
    missing inputs (no images; offline clean-fid statistics, named with the file and its folder) end in one line."""
    import pytest

    import eval.fid_ref

    for kind in ("celebahq", "ffhq", "coco"):
        bad = prepare(kind, "--src", tmp_path / "nowhere", "--data", tmp_path / "data")
        assert bad.returncode != 0 and f"{tmp_path / 'nowhere'}: no such directory" in bad.stderr, (kind, bad.stderr)
        assert "Traceback" not in bad.stderr
    (tmp_path / "empty").mkdir()
    monkeypatch.setattr(eval.fid_ref, "REF_DIR", tmp_path / "fid_refs")
    with pytest.raises(SystemExit) as exit_:
        eval.fid_ref.main(["--data", str(tmp_path / "empty"), "--name", "x"])
    assert exit_.value.code == 1 and "no images" in capsys.readouterr().err

    def offline(*args, **kwargs):
        raise OSError("<urlopen error [Errno -3] Temporary failure in name resolution>")

    import cleanfid.fid

    monkeypatch.setattr(cleanfid.fid, "get_reference_statistics", offline)
    monkeypatch.setattr("core.hub.can_download", lambda url: False)
    with pytest.raises(SystemExit) as exit_:
        eval.fid_ref.main(["--cleanfid", "ffhq", "--name", "ffhq256"])
    err = capsys.readouterr().err
    assert exit_.value.code == 1 and "ffhq_clean_trainval70k_256.npz" in err and "cleanfid" in err and "offline" in err
    assert not (tmp_path / "fid_refs").exists()
