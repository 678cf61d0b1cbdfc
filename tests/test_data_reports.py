"""Field reports 6-8 on data loading, each as the repro that failed before its fix (tiny images, CPU)."""

import io
import json
import os
import re
import tarfile

import pytest
from PIL import Image

from core.config import DataConfig, RunConfig, apply_overrides
from core.data import DataError, ImageData, load_image_dataset
from tests.test_prepare import prepare

# Every character a user's path may hold that a glob or a URL reads otherwise.
ODD_NAMES = ["faces [v2]", "a*b", "what?", "{x,y}", "100%", "#1", "two words", "ñandú 日本"]
GLOB_MATCHES = {"faces [v2]": "faces v", "a*b": "aXb", "what?": "whatX"}  # other names each one matches as a glob
MISSING = object()  # a metadata record without the caption key


def grey_pngs(folder, levels, prefix=""):
    folder.mkdir(parents=True, exist_ok=True)
    for v in levels:
        Image.new("L", (12, 12), int(v)).save(folder / f"{prefix}{v:03d}.png")
    return folder


def levels_of(data: ImageData) -> list[int]:
    return [round((float(x.mean()) + 1) * 127.5) for x in data.images(range(len(data)))]


def write_shard(path, samples):
    """``samples``: (key, {extension: bytes}) pairs -> a webdataset ``.tar`` shard at ``path``."""
    path.parent.mkdir(parents=True, exist_ok=True)
    with tarfile.open(path, "w") as tar:
        for key, entries in samples:
            for ext, data in entries.items():
                info = tarfile.TarInfo(f"{key}.{ext}")
                info.size = len(data)
                tar.addfile(info, io.BytesIO(data))
    return path


def png_bytes(level: int) -> bytes:
    buf = io.BytesIO()
    Image.new("RGB", (8, 8), (level,) * 3).save(buf, format="PNG")
    return buf.getvalue()


# ---------------------------------------------------------------- 6. the dataset holds every image of the folder


def test_linked_subfolder_images_are_trained_on_and_counted(tmp_path):
    """Report 6: an imagefolder with a real subfolder of 10 PNGs and a symlinked one of 10 more loaded 10 images
    with no message (imagefolder and Path.rglob skip linked folders). Now all 20 load, the prepare step counts 20
    in PREPARED.json, a folder that no longer holds what PREPARED.json counts stops with both counts, a dangling link
    stops naming it (or is skipped and counted), a link back to an enclosing folder is not entered twice, and
    torch-fidelity (which does not follow links) is not handed such a folder as its reference."""
    from eval.protocols import torchfidelity_problem
    from experiments.preflight import has_images

    src = tmp_path / "src"
    grey_pngs(src / "real", range(0, 100, 10))
    os.symlink(grey_pngs(tmp_path / "elsewhere" / "more", range(5, 105, 10)), src / "linked")
    os.symlink(src, src / "real" / "loop")  # a link back up: followed once, never in circles
    data = ImageData(DataConfig(source=str(src), resolution=8))
    assert len(data) == 20 and sorted(levels_of(data)) == sorted([*range(0, 100, 10), *range(5, 105, 10)])
    # torch-fidelity's own listing does not follow links: a reference folder like this one is refused, with the count.
    assert "holds 10 .png/.jpg images in linked folders" in torchfidelity_problem(src, feature_extractor="other")
    only_linked = tmp_path / "only_linked"
    only_linked.mkdir()
    os.symlink(tmp_path / "elsewhere" / "more", only_linked / "more")
    assert has_images(only_linked)

    # The prepare step counts the linked images too, and writes what it counted.
    proc = prepare("ffhq", "--src", src, "--data", tmp_path / "data", "--size", 8, "--allow-count-mismatch")
    assert proc.returncode == 0, proc.stderr
    out = tmp_path / "data" / "ffhq256"
    assert json.loads((out / "PREPARED.json").read_text())["count"] == 20
    assert len(ImageData(DataConfig(source=str(out), resolution=8))) == 20
    (out / "000007.png").unlink()  # a copy that lost an image
    with pytest.raises(DataError, match=r"19 image files, but .*PREPARED.json counts 20"):
        ImageData(DataConfig(source=str(out), resolution=8))

    # A link to nothing is an image that cannot be read, never one that is not there.
    os.symlink(tmp_path / "nowhere.png", src / "real" / "gone.png")
    with pytest.raises(DataError, match="gone.png"):
        ImageData(DataConfig(source=str(src), resolution=8))
    tolerant = ImageData(DataConfig(source=str(src), resolution=8, skip_corrupt=True))
    assert len(tolerant) == 20 and len(tolerant.skipped) == 1 and tolerant.skipped[0].endswith("gone.png")


# ---------------------------------------------------------------- 7. a user's path is read literally


def test_paths_with_glob_characters_are_read_literally(tmp_path):
    """Report 7: an imagefolder at ``faces [v2]/`` failed with EmptyDatasetError (datasets read the path as a glob).
    Folders, image files, metadata file_names and webdataset shards whose names hold ``[ ]``, ``*``, ``?``, ``{ }``,
    ``%``, ``#``, spaces or non-ASCII letters load exactly their own images and captions, beside folders, files and
    shards whose names the name matches as a glob; the prepare step reads such a source folder too."""
    for name in ODD_NAMES:
        decoy = GLOB_MATCHES.get(name, "decoy")
        folder = grey_pngs(tmp_path / name, (10, 20, 30), prefix=f"{name} ")
        grey_pngs(tmp_path / name, (99,), prefix=f"{decoy} ")  # "aXb 099.png" beside "a*b 010.png", ...
        grey_pngs(tmp_path / "siblings" / decoy, (77,))
        (folder / "metadata.jsonl").write_text("".join(
            json.dumps({"file_name": f"{p} {v:03d}.png", "caption": f"grey {v}"}) + "\n"
            for p, v in ((name, 10), (name, 20), (name, 30), (decoy, 99))))
        data = ImageData(DataConfig(source=str(folder), resolution=8, caption_column="caption"))
        assert sorted(zip(levels_of(data), data.captions)) == [(v, f"grey {v}") for v in (10, 20, 30, 99)], name

        shards = tmp_path / "shards" / name
        write_shard(shards / f"{name}.tar", [(f"{i:03d}", {"png": png_bytes(40 + i), "txt": b"x"}) for i in range(3)])
        write_shard(shards / f"{decoy}.tar", [("000", {"png": png_bytes(7), "txt": b"y"})])
        literal = ImageData(DataConfig(source=str(shards / f"{name}.tar"), resolution=8, channels=3))
        assert levels_of(literal) == [40, 41, 42], name
        assert len(ImageData(DataConfig(source=str(shards), resolution=8, channels=3))) == 4, name  # both shards
        assert len(load_image_dataset(DataConfig(source=str(shards / "*.tar"), resolution=8, channels=3))) == 4, name

    # The prepare step: a source folder named like that, its images named by every odd character.
    src = tmp_path / "faces [v2]"
    proc = prepare("ffhq", "--src", src, "--data", tmp_path / "data", "--size", 8, "--allow-count-mismatch")
    assert proc.returncode == 0, proc.stderr
    out = tmp_path / "data" / "ffhq256"
    assert json.loads((out / "PREPARED.json").read_text())["count"] == 4
    assert len(ImageData(DataConfig(source=str(out), resolution=8))) == 4


# ---------------------------------------------------------------- 8. every record checked before any compute


def captioned_folder(folder, captions: list) -> str:
    """One grey PNG per entry of ``captions`` (:data:`MISSING`: no caption key) with a metadata.jsonl line each."""
    grey_pngs(folder, range(len(captions)))
    lines = [{"file_name": f"{i:03d}.png", **({} if c is MISSING else {"caption": c})} for i, c in enumerate(captions)]
    (folder / "metadata.jsonl").write_text("".join(json.dumps(r) + "\n" for r in lines))
    return str(folder)


def test_caption_lists_are_drawn_per_step_and_bad_records_stop_naming_file_and_line(tmp_path):
    """Report 8: a metadata.jsonl caption given as a list (as diffusers' train_text_to_image accepts) stopped the
    first training step with ``TypeError: unhashable type: 'list'``. Now a non-empty list of strings is a caption
    set: each step trains with one of them, drawn by (seed, step, image) alone. A caption that is a number, null, an
    empty list or a list holding a non-string, a record without file_name, with a file_name naming no image, or an
    image without a record stops at load, naming the metadata file and line (or the count)."""
    good = captioned_folder(tmp_path / "good", ["one", ["a", "b", "c"], ["only"], "four"])
    data = ImageData(DataConfig(source=good, resolution=8, caption_column="caption"))
    assert data.captions == [["one"], ["a", "b", "c"], ["only"], ["four"]]
    draws = [data.caption(1, seed=0, step=s) for s in range(40)]
    assert set(draws) == {"a", "b", "c"} and draws == [data.caption(1, seed=0, step=s) for s in range(40)]
    assert draws != [data.caption(1, seed=1, step=s) for s in range(40)]
    assert {data.caption(i, 0, s) for i in (0, 2, 3) for s in range(5)} == {"one", "only", "four"}

    meta = re.escape(str(tmp_path / "bad" / "metadata.jsonl"))
    for bad, message in [(7, r"caption is 7 \(int\)"), (None, "caption is null"), ([], "caption is an empty list"),
                         (["a", 1], r"caption is \['a', 1\]"), (MISSING, "no 'caption'")]:
        captioned_folder(tmp_path / "bad", ["x", "y", bad, "z"])
        with pytest.raises(DataError, match=rf"{meta}:3: {message}"):
            ImageData(DataConfig(source=str(tmp_path / "bad"), resolution=8, caption_column="caption"))
    lines = (tmp_path / "bad" / "metadata.jsonl").read_text().splitlines()
    for line, message in [(json.dumps({"caption": "no file"}), "no file_name"),
                          (json.dumps({"file_name": "404.png", "caption": "x"}), "file_name '404.png' names no image"),
                          (json.dumps({"file_name": "000.png", "caption": "x"}), r"'000.png' already has a record"),
                          ("{not json", "not JSON")]:
        (tmp_path / "bad" / "metadata.jsonl").write_text("\n".join([*lines[:2], line, lines[3]]) + "\n")
        with pytest.raises(DataError, match=rf"{meta}:3: {message}"):
            ImageData(DataConfig(source=str(tmp_path / "bad"), resolution=8, caption_column="caption"))
    (tmp_path / "bad" / "metadata.jsonl").write_text("\n".join([*lines[:2], lines[3]]) + "\n")
    with pytest.raises(DataError, match=r"1 image file\(s\) have no metadata record, so no caption .*002.png"):
        ImageData(DataConfig(source=str(tmp_path / "bad"), resolution=8, caption_column="caption"))


def test_text_to_image_run_trains_on_caption_lists_and_records_its_image_count(tmp_path, monkeypatch):
    """Report 8 through the real training loop: two steps of a text-to-image run on caption lists train (they
    stopped at step 0), every caption encoded is one of its image's, and env.json records the number of training
    images (report 6)."""
    from core.text import TextEncoder
    from core.train import train
    from tests.test_field_reports import ISSUE

    source = captioned_folder(tmp_path / "t2i", [[f"image {i} caption {k}" for k in range(3)] for i in range(8)])
    seen, encode = [], TextEncoder.encode

    def recording(self, captions):
        seen.extend(captions)
        return encode(self, captions)

    monkeypatch.setattr(TextEncoder, "encode", recording)
    cfg = RunConfig.from_dict(apply_overrides({"name": "t2i-caption-lists"}, ISSUE + [
        "train.steps=2", f"data.source={json.dumps(source)}", "data.caption_column=caption", "data.channels=3",
        "data.resolution=8", "model.cross_attention_dim=384", "model.text_encoder=minilm",
        "model.attention=[false,true]", "train.cond_dropout=0.0"]))
    train(cfg, tmp_path / "run")
    assert len(seen) == 2 * 8 and all(c.split(" caption ")[1] in "012" for c in seen)
    assert len(set(seen)) > 8  # not always the first of each list
    assert json.loads((tmp_path / "run" / "env.json").read_text())["num_images"] == 8


def test_bad_shard_records_stop_naming_shard_and_key_or_are_skipped_with_a_count(tmp_path):
    """Report 8, webdataset shards: a sample without its caption or image, or with an undecodable image, stops
    naming the shard and the sample's key; with data.skip_corrupt it is dropped and counted. A bad sample among the
    first ones, from which datasets infers the columns, stops naming its shard and key too."""
    samples = [(f"{i:03d}", {"png": png_bytes(10 * i), "txt": f"caption {i}".encode()}) for i in range(9)]
    samples[6] = ("006", {"png": png_bytes(60)})  # no caption
    samples[7] = ("007", {"txt": b"no image"})
    samples[8] = ("008", {"png": b"not a png", "txt": b"caption 8"})
    shard = write_shard(tmp_path / "wds [1]" / "shard-000.tar", samples)
    at = re.escape(str(shard))
    cfg = DataConfig(source=str(shard), resolution=8, channels=3, caption_column="caption")
    with pytest.raises(DataError, match=rf"shard {at} key 006: no caption \(and 1 more bad record"):
        ImageData(cfg)
    no_captions = ImageData(DataConfig(source=str(shard), resolution=8, channels=3, skip_corrupt=True))
    assert len(no_captions) == 7 and no_captions.skipped == [f"shard {shard} key 007: no image", f"{shard} key 008"]
    tolerant = ImageData(DataConfig(source=str(shard), resolution=8, channels=3, caption_column="caption",
                                    skip_corrupt=True))
    assert len(tolerant) == 6 and tolerant.captions == [f"caption {i}" for i in range(6)]
    assert tolerant.skipped == [f"shard {shard} key 006: no caption", f"shard {shard} key 007: no image",
                                f"{shard} key 008"]
    undecodable = write_shard(tmp_path / "undecodable" / "shard.tar", [*samples[:6], samples[8]])
    with pytest.raises(DataError, match=rf"cannot decode image {re.escape(str(undecodable))} key 008"):
        ImageData(DataConfig(source=str(undecodable), resolution=8, channels=3))

    early = write_shard(tmp_path / "early" / "shard.tar", [samples[0], ("001", {"png": png_bytes(1)}), *samples[2:5]])
    at = re.escape(str(early))
    with pytest.raises(DataError, match=rf"shard {at} key 001: entries png, where the others have png, txt"):
        ImageData(DataConfig(source=str(early), resolution=8, channels=3, caption_column="caption"))
