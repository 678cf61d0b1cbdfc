"""Prepare the paper-scale datasets from files you downloaded, into ``imagefolder`` layouts under ``data/``.

    python -m experiments.data celebahq --src ~/downloads/CelebA-HQ-img          # -> data/celebahq256 (30,000)
    python -m experiments.data ffhq     --src ~/downloads/ffhq/images1024x1024   # -> data/ffhq256 (70,000)
    python -m experiments.data coco     --src ~/downloads/coco                   # train2014/, val2014/, annotations/
        # -> data/coco2014train256 (+ captions), data/coco2014val_30k.jsonl (30,000 seeded val captions),
        #    data/coco2014val256_30k (their images, the FID-30K reference)
    python -m experiments.data imagenet --src ~/downloads/ILSVRC2012_val        # -> data/imagenet256/test (first 100, sorted)

CelebA-HQ keeps ``--test 100`` images out of training (RePaint's protocol: 100 held-out test images per dataset):
they go to ``data/celebahq256/test/``, the other 29,900 to ``data/celebahq256/train/`` (HF ``imagefolder`` splits;
training reads ``train``, inpainting evaluates ``test``). Which images are held out is drawn with seed 0 from the
sorted file list [choice: RePaint's own 100 CelebA-HQ images come from LaMa's validation list, not shipped here];
``PREPARED.json`` lists each split's source files, so the two are disjoint by construction and checkable.

Images are center-cropped to a square and resized to 256 px (PIL bicubic), written as PNG with a
``metadata.jsonl`` (``file_name`` and, for COCO, ``caption``). The source images are every image file under
``--src`` as training lists them (linked folders followed, any format HF imagefolder reads). Counts are checked
against the expected sizes (``--allow-count-mismatch`` to override) and ``PREPARED.json`` records the source,
count and a SHA-256 of the file listing; each written folder must hold exactly the images counted (training checks
the count again). Re-running skips images already written.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import random
from pathlib import Path

from PIL import Image

from core.data import image_files

EXPECTED = {"celebahq": 30_000, "ffhq": 70_000, "coco-train": 82_783, "coco-val": 40_504}


def list_images(folder: Path) -> list[Path]:
    """The image files under ``folder`` as training lists them (:func:`core.data.image_files`: linked folders
    followed, every format HF imagefolder reads), in ``Path`` order (the order the held-out draw was made in)."""
    if not folder.is_dir():
        raise SystemExit(f"{folder}: no such directory")
    files = sorted(image_files(folder))
    if not files:
        raise SystemExit(f"{folder}: no images found")
    return files


def to_square(path: Path, size: int) -> Image.Image:
    img = Image.open(path).convert("RGB")
    w, h = img.size
    s = min(w, h)
    img = img.crop(((w - s) // 2, (h - s) // 2, (w - s) // 2 + s, (h - s) // 2 + s))
    return img.resize((size, size), Image.BICUBIC)


def write_imagefolder(items: list[tuple[Path, dict]], out: Path, size: int, source: str) -> Path:
    """``items``: (source image, extra metadata) pairs -> ``out/<k:06d>.png`` + metadata.jsonl + PREPARED.json."""
    out.mkdir(parents=True, exist_ok=True)
    lines = []
    for k, (src, meta) in enumerate(items):
        name = f"{k:06d}.png"
        if not (out / name).exists():
            tmp = out / f".{name}.tmp"
            to_square(src, size).save(tmp, format="PNG")
            tmp.rename(out / name)
        lines.append(json.dumps({"file_name": name, **meta}))
        if k % 5000 == 0:
            print(f"{out.name}: {k}/{len(items)}", flush=True)
    (out / "metadata.jsonl").write_text("\n".join(lines) + "\n")
    found = image_files(out)
    if len(found) != len(items):  # what training will read is what was prepared, or nothing is recorded
        extra = sorted(set(map(str, found)) - {str(out / f"{k:06d}.png") for k in range(len(items))})
        raise SystemExit(f"{out}: holds {len(found)} image files, {len(items)} prepared; remove the others "
                         f"(e.g. {extra[0] if extra else '?'}) and prepare again")
    listing = hashlib.sha256("\n".join(str(s) for s, _ in items).encode()).hexdigest()
    (out / "PREPARED.json").write_text(json.dumps({"source": source, "count": len(items), "size": size,
                                                   "source_listing_sha256": listing}, indent=2))
    return out


def check_count(kind: str, n: int, allow: bool) -> None:
    if kind in EXPECTED and n != EXPECTED[kind] and not allow:
        raise SystemExit(f"{kind}: found {n} images, expected {EXPECTED[kind]}; pass --allow-count-mismatch to go on")


def coco(src: Path, data: Path, size: int, allow: bool) -> None:
    if not src.is_dir():
        raise SystemExit(f"{src}: no such directory")
    for split in ("train", "val"):
        ann = src / "annotations" / f"captions_{split}2014.json"
        if not ann.exists():
            raise SystemExit(f"{ann} is missing (COCO 2014 caption annotations)")
        meta = json.loads(ann.read_text())
        files = {im["id"]: src / f"{split}2014" / im["file_name"] for im in meta["images"]}
        captions: dict[int, list[str]] = {}
        for a in meta["annotations"]:
            captions.setdefault(a["image_id"], []).append(a["caption"].strip())
        ids = sorted(files)
        check_count(f"coco-{split}", len(ids), allow)
        if split == "train":  # [choice] one caption per image: the first annotation
            write_imagefolder([(files[i], {"caption": captions[i][0], "image_id": i}) for i in ids],
                              data / "coco2014train256",
                              size, str(src))
        else:  # FID-30K protocol: 30,000 (image, caption) pairs drawn with seed 0
            pairs = [(i, c) for i in ids for c in captions[i]]
            chosen = random.Random(0).sample(pairs, min(30_000, len(pairs)))
            (data / "coco2014val_30k.jsonl").write_text(
                "\n".join(json.dumps({"image_id": i, "caption": c}) for i, c in chosen) + "\n")
            write_imagefolder([(files[i], {"caption": c, "image_id": i}) for i, c in chosen],
                              data / "coco2014val256_30k", size, str(src))


def write_splits(files: list[Path], out: Path, size: int, source: str, test: int) -> Path:
    """``test`` files drawn with seed 0 -> ``out/test/``, the rest -> ``out/train/`` (all to ``out`` when 0)."""
    if test <= 0:
        return write_imagefolder([(f, {}) for f in files], out, size, source)
    if test > len(files):
        raise SystemExit(f"--test {test}: only {len(files)} images")
    held = set(random.Random(0).sample(range(len(files)), test))
    splits = {"train": [f for i, f in enumerate(files) if i not in held], "test": [files[i] for i in sorted(held)]}
    for split, chosen in splits.items():
        if chosen:
            write_imagefolder([(f, {}) for f in chosen], out / split, size, source)
    (out / "PREPARED.json").write_text(json.dumps({
        "source": source, "count": len(files), "size": size, "test_seed": 0,
        "splits": {k: [str(f.relative_to(source)) if f.is_relative_to(source) else str(f) for f in v]
                   for k, v in splits.items()}}, indent=2))
    return out


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m experiments.data", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("dataset", choices=("celebahq", "ffhq", "coco", "imagenet"))
    parser.add_argument("--src", type=Path, required=True, help="the downloaded files")
    parser.add_argument("--data", type=Path, default=Path("data"), help="output root (default: data/)")
    parser.add_argument("--size", type=int, default=256)
    parser.add_argument("--allow-count-mismatch", action="store_true")
    parser.add_argument("--test", type=int, help="images held out as the test split (default: celebahq 100, "
                                                 "imagenet all 100, ffhq 0; never used for training)")
    args = parser.parse_args(argv)
    src = args.src.expanduser()
    if args.dataset == "coco":
        coco(src, args.data, args.size, args.allow_count_mismatch)
        return
    files = list_images(src)
    if args.dataset == "imagenet":
        files = files[:100]
    check_count(args.dataset, len(files), args.allow_count_mismatch)
    out = args.data / {"celebahq": "celebahq256", "ffhq": "ffhq256", "imagenet": "imagenet256"}[args.dataset]
    test = args.test if args.test is not None else {"celebahq": 100, "ffhq": 0, "imagenet": len(files)}[args.dataset]
    print(write_splits(files, out, args.size, str(src), test))


if __name__ == "__main__":
    main()
