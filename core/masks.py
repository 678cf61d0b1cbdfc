"""Inpainting masks of the paper-scale protocol: RePaint's released mask files, and LaMa's thick/thin generator.

Masks are ``(1, R, R)`` float tensors with **1 = known pixel, 0 = to inpaint**, as in :mod:`core.inpaint`.

**RePaint's files** (Lugmayr et al. 2022; andreas128/RePaint at 8e2a0552a0cc306e623da807d353915f1af17726,
``download.sh`` unpacks them to ``data/datasets/gt_keep_masks/<name>/``). Read as RePaint reads them
(``guided_diffusion/image_datasets.py``: ``ImageDatasetInpa``, ``center_crop_arr``): the folder's images listed
recursively in sorted order, each opened as RGB, centre-cropped and resized to the resolution (a no-op at 256),
divided by 255; **white (255) = keep**, black = generate (RePaint's README: "The masks have the value 255 for known
regions and 0 for unknown areas"). RePaint pairs the i-th mask with the i-th sorted test image and reads the first
100 (``max_len: 100``, no flip). The six folders of its configs (``confs/test_{c256,inet256}_*.yml``, shared by both
datasets) map onto the paper's columns as :data:`REPAINT_DIRS`: ``thick``/``thin`` are LaMa's ``random_thick_256`` /
``random_thin_256`` (the configs' ``ds_conf`` names them), ``ev2li`` is "every second line", ``nn2`` the
super-resolution mask, ``genhalf`` half, ``ex64`` expand. (The issue's ``sr64`` has no config in RePaint; it is not
used.) :func:`mask_geometry` reports each loaded set's known fraction beside the one :func:`core.inpaint.make_mask`
gives, so a file set whose geometry differs from our reading of a column is visible.

**LaMa's generator** (Suvorov et al. 2022; advimman/lama at 786f5936b27fb3dacd2b1ad799e4de968ea697e7), as
``bin/gen_mask_dataset.py`` makes its evaluation masks for a 256 px square image with
``configs/data_gen/random_{thick,thin}_256.yaml`` (:data:`LAMA_THICK_256`, :data:`LAMA_THIN_256`):
``MakeManyMasksWrapper`` draws ``variants_n = 5`` masks from ``MixedMaskGenerator`` (thick: irregular strokes with
probability 1/1.3, boxes 0.3/1.3; thin: strokes only), each through ``propose_random_square_crop`` (the whole
image for a square one), drops those with hole fraction > ``max_tamper_area = 0.5``, and keeps one at random. The
strokes are ``make_random_irregular_mask`` with ``RandomIrregularMaskGenerator``'s arguments at ramp coefficient 1
(note its ``max_times + 1``: thick draws 1..6 strokes, thin 4..51), boxes ``make_random_rectangle_mask`` with
``RandomRectangleMaskGenerator``'s (sizes 30..150, 1..3 boxes). Every random number is drawn in LaMa's order from
one ``numpy.random.RandomState(seed)`` (LaMa uses numpy's global state, unseeded), so a seed gives what LaMa's code
gives after ``np.random.seed(seed)`` (``tests/test_protocols.py`` runs LaMa's functions against this). Two
differences: OpenCV's ``cv2.line`` is drawn with PIL (:func:`_line`), so OpenCV is not a dependency; edge pixels
differ. Measured against ``cv2.line`` (opencv-python-headless 5.0.0.93) on seeds 0-99: mean hole fraction thick 0.2695
(OpenCV 0.2704), thin 0.2589 (0.2626); per-mask IoU with OpenCV's mask mean 0.981 (thick) and 0.908 (thin; lower
where a different variant passes the 0.5 filter). And where all five variants exceed 0.5 (LaMa then writes no mask
for that image) five more are drawn from the same state.
"""

from __future__ import annotations

import hashlib
import warnings
from pathlib import Path

import numpy as np
import torch
from PIL import Image, ImageDraw

# Our mask kinds (core.inpaint.MASK_KINDS) -> RePaint's released mask folder for that column.
REPAINT_DIRS = {"wide": "thick", "narrow": "thin", "super_resolve_2x": "nn2", "alternating_lines": "ev2li",
                "half": "genhalf", "expand": "ex64"}
# Where paper-scale inpainting looks for RePaint's gt_keep_masks/ folders (copied from its data/datasets/).
DEFAULT_MASKS_DIR = "data/gt_keep_masks"
REPAINT_EXT = ("jpg", "jpeg", "png", "gif")  # RePaint's _list_image_files_recursively

# configs/data_gen/random_thick_256.yaml and random_thin_256.yaml (LaMa, commit above).
LAMA_THICK_256 = {
    "irregular_proba": 1, "irregular_kwargs": {"min_times": 1, "max_times": 5, "max_width": 100, "max_angle": 4,
                                               "max_len": 200},
    "box_proba": 0.3, "box_kwargs": {"margin": 10, "bbox_min_size": 30, "bbox_max_size": 150, "max_times": 3,
                                     "min_times": 1},
    "variants_n": 5, "max_tamper_area": 0.5,
}
LAMA_THIN_256 = {
    "irregular_proba": 1, "irregular_kwargs": {"min_times": 4, "max_times": 50, "max_width": 10, "max_angle": 4,
                                               "max_len": 40},
    "box_proba": 0, "box_kwargs": None,
    "variants_n": 5, "max_tamper_area": 0.5,
}
LAMA_CONFIGS = {"thick": LAMA_THICK_256, "thin": LAMA_THIN_256}
LAMA_KIND = {"wide": "thick", "narrow": "thin"}


class MaskError(ValueError):
    """Mask files that cannot be read as RePaint's; the message names the folder or file."""


# ---------------------------------------------------------------------------- RePaint's files


def list_repaint_masks(folder: str | Path) -> list[Path]:
    """Image files under ``folder`` in RePaint's order (sorted entries, recursing into subfolders in place)."""
    out = []
    for entry in sorted(Path(folder).iterdir(), key=lambda p: p.name):
        if "." in entry.name and entry.name.split(".")[-1].lower() in REPAINT_EXT:
            out.append(entry)
        elif entry.is_dir():
            out.extend(list_repaint_masks(entry))
    return out


def center_crop_arr(img: Image.Image, size: int) -> np.ndarray:
    """RePaint's (guided-diffusion's) ``center_crop_arr``: BOX halving while >= 2x, bicubic to ``size``, centre crop."""
    while min(*img.size) >= 2 * size:
        img = img.resize(tuple(x // 2 for x in img.size), resample=Image.BOX)
    scale = size / min(*img.size)
    img = img.resize(tuple(round(x * scale) for x in img.size), resample=Image.BICUBIC)
    arr = np.array(img)
    top, left = (arr.shape[0] - size) // 2, (arr.shape[1] - size) // 2
    return arr[top : top + size, left : left + size]


def load_repaint_mask(path: str | Path, resolution: int = 256) -> torch.Tensor:
    """One RePaint ``gt_keep_mask`` file -> ``(1, R, R)`` float keep mask in [0, 1] (255 = keep). Its three RGB
    channels must agree (RePaint blends per channel; ours uses one), else :class:`MaskError` names the file."""
    with Image.open(path) as img:
        arr = center_crop_arr(img.convert("RGB"), resolution).astype(np.float32) / 255.0
    if not (np.array_equal(arr[..., 0], arr[..., 1]) and np.array_equal(arr[..., 0], arr[..., 2])):
        raise MaskError(f"mask {path}: its RGB channels differ; RePaint's masks are grey (255 = keep, 0 = generate)")
    return torch.from_numpy(np.ascontiguousarray(arr[..., 0]))[None]


def repaint_mask_folder(kind: str, masks_dir: str | Path = DEFAULT_MASKS_DIR) -> Path:
    if kind not in REPAINT_DIRS:
        raise MaskError(f"mask kind {kind!r}; allowed: {', '.join(REPAINT_DIRS)}")
    return Path(masks_dir).expanduser() / REPAINT_DIRS[kind]


def load_repaint_masks(kind: str, n: int, resolution: int = 256, masks_dir: str | Path = DEFAULT_MASKS_DIR
                       ) -> torch.Tensor:
    """The first ``n`` of RePaint's released masks for column ``kind`` -> ``(n, 1, R, R)``; mask i goes with the
    i-th test image. Raises :class:`MaskError` naming the folder when it is missing or holds fewer than ``n``."""
    folder = repaint_mask_folder(kind, masks_dir)
    files = list_repaint_masks(folder) if folder.is_dir() else []
    if len(files) < n:
        raise MaskError(f"RePaint's {REPAINT_DIRS[kind]!r} masks ({kind}): {len(files)} image(s) in {folder}, {n} "
                        "needed. Copy data/datasets/gt_keep_masks/ from RePaint's download.sh data there")
    return torch.stack([load_repaint_mask(f, resolution) for f in files[:n]])


def mask_geometry(kind: str, masks: torch.Tensor) -> dict[str, float]:
    """Known fraction of a loaded set ``(N, 1, R, R)`` (mean, min, max) beside :func:`core.inpaint.make_mask`'s for
    ``kind`` (seed 0), to check that a file set matches the paper column it is mapped to."""
    from .inpaint import make_mask

    known = masks.flatten(1).mean(1)
    ours = float(make_mask(kind, masks.shape[-1], seed=0).mean())
    return {"known_mean": float(known.mean()), "known_min": float(known.min()), "known_max": float(known.max()),
            "ours_known": ours}


# ---------------------------------------------------------------------------- LaMa's generator


def _line(draw: ImageDraw.ImageDraw, start: tuple[int, int], end: tuple[int, int], width: int) -> None:
    """``cv2.line(mask, start, end, 1.0, width)`` with PIL: round caps as OpenCV draws thick lines, ``width + 1`` px
    wide (OpenCV's polygon fill covers about a pixel more than its thickness; see the module docstring)."""
    w = width + 1
    draw.line([start, end], fill=255, width=w)
    for x, y in (start, end):
        draw.ellipse([x - w / 2, y - w / 2, x + w / 2, y + w / 2], fill=255)


def lama_irregular(rs: np.random.RandomState, shape: tuple[int, int], max_angle: int = 4, max_len: int = 60,
                   max_width: int = 20, min_times: int = 0, max_times: int = 10) -> np.ndarray:
    """LaMa's ``make_random_irregular_mask`` (``DrawMethod.LINE``): ``(H, W)`` float32 hole map, 1 = hole."""
    height, width = shape
    img = Image.new("L", (width, height), 0)
    draw = ImageDraw.Draw(img)
    times = rs.randint(min_times, max_times + 1)
    for i in range(times):
        start_x, start_y = rs.randint(width), rs.randint(height)
        for _ in range(1 + rs.randint(5)):
            angle = 0.01 + rs.randint(max_angle)
            if i % 2 == 0:
                angle = 2 * 3.1415926 - angle
            length = 10 + rs.randint(max_len)
            brush_w = 5 + rs.randint(max_width)
            end_x = np.clip((start_x + length * np.sin(angle)).astype(np.int32), 0, width)
            end_y = np.clip((start_y + length * np.cos(angle)).astype(np.int32), 0, height)
            _line(draw, (int(start_x), int(start_y)), (int(end_x), int(end_y)), int(brush_w))
            start_x, start_y = end_x, end_y
    return (np.asarray(img) > 0).astype(np.float32)


def lama_boxes(rs: np.random.RandomState, shape: tuple[int, int], margin: int = 10, bbox_min_size: int = 30,
               bbox_max_size: int = 100, min_times: int = 0, max_times: int = 3) -> np.ndarray:
    """LaMa's ``make_random_rectangle_mask``: ``(H, W)`` float32 hole map, 1 = hole."""
    height, width = shape
    mask = np.zeros((height, width), np.float32)
    bbox_max_size = min(bbox_max_size, height - margin * 2, width - margin * 2)
    for _ in range(rs.randint(min_times, max_times + 1)):
        box_width = rs.randint(bbox_min_size, bbox_max_size)
        box_height = rs.randint(bbox_min_size, bbox_max_size)
        start_x = rs.randint(margin, width - margin - box_width + 1)
        start_y = rs.randint(margin, height - margin - box_height + 1)
        mask[start_y : start_y + box_height, start_x : start_x + box_width] = 1
    return mask


def lama_mixed(rs: np.random.RandomState, shape: tuple[int, int], cfg: dict) -> np.ndarray:
    """LaMa's ``MixedMaskGenerator.__call__`` for ``cfg`` (irregular and box generators at ramp coefficient 1)."""
    gens, probas = [], []
    if cfg["irregular_proba"] > 0:
        k = dict(cfg["irregular_kwargs"])
        # RandomIrregularMaskGenerator.__call__ with coef = 1
        k["max_times"] = int(k["min_times"] + 1 + (k["max_times"] - k["min_times"]))
        probas.append(cfg["irregular_proba"])
        gens.append(lambda: lama_irregular(rs, shape, **k))
    if cfg["box_proba"] > 0:
        b = dict(cfg["box_kwargs"])
        # RandomRectangleMaskGenerator.__call__ with coef = 1
        b["bbox_max_size"] = int(b["bbox_min_size"] + 1 + (b["bbox_max_size"] - b["bbox_min_size"]))
        b["max_times"] = int(b["min_times"] + (b["max_times"] - b["min_times"]))
        probas.append(cfg["box_proba"])
        gens.append(lambda: lama_boxes(rs, shape, **b))
    p = np.array(probas, dtype="float32")
    p /= p.sum()
    return gens[rs.choice(len(p), p=p)]()


def lama_hole_map(kind: str, seed: int, size: int = 256) -> np.ndarray:
    """One evaluation hole map ``(size, size)`` (1 = hole) as LaMa's ``gen_mask_dataset.py`` makes for a square
    ``size`` image with ``random_{kind}_256.yaml``; ``kind`` is ``thick`` or ``thin``."""
    if kind not in LAMA_CONFIGS:
        raise MaskError(f"LaMa mask kind {kind!r}; allowed: {', '.join(LAMA_CONFIGS)}")
    cfg = LAMA_CONFIGS[kind]
    rs = np.random.RandomState(seed)
    while True:
        variants = [lama_mixed(rs, (size, size), cfg) for _ in range(cfg["variants_n"])]
        kept = []
        for m in variants:
            rs.randint(0, 1)  # propose_random_square_crop of a square image: the whole image (start 0)
            if m.mean() <= cfg["max_tamper_area"]:
                kept.append(m)
        if kept:
            return kept[int(rs.choice(len(kept), size=1, replace=False)[0])]


def lama_mask(kind: str, resolution: int, seed: int = 0) -> torch.Tensor:
    """``(1, R, R)`` keep mask (1 = known) of LaMa's thick (``wide``) or thin (``narrow``) protocol, drawn at 256 px;
    at another ``R`` scaled with nearest neighbours."""
    holes = lama_hole_map(LAMA_KIND.get(kind, kind), seed)
    if resolution != holes.shape[0]:
        holes = np.asarray(Image.fromarray(holes.astype(np.uint8) * 255).resize((resolution, resolution),
                                                                                 Image.NEAREST)) > 0
    return torch.from_numpy(1 - holes.astype(np.float32))[None]


def paper_masks(kind: str, n: int, resolution: int, masks_dir: str | Path = DEFAULT_MASKS_DIR
                ) -> tuple[torch.Tensor, str]:
    """The paper-scale masks of column ``kind`` for ``n`` test images -> ``((n, 1, R, R), description)``.

    RePaint's released files when their folder (``masks_dir/<REPAINT_DIRS[kind]>``) exists (fewer than ``n`` there
    raises :class:`MaskError`); otherwise LaMa's thick/thin generator for ``wide``/``narrow`` (image i: seed i) and
    :func:`core.inpaint.make_mask` for the four fixed kinds. The description goes into records' reference set.
    """
    from .inpaint import MASK_VERSION, make_mask

    folder = repaint_mask_folder(kind, masks_dir)
    if folder.is_dir():
        masks = load_repaint_masks(kind, n, resolution, masks_dir)
        digest = hashlib.sha256(masks.numpy().tobytes()).hexdigest()[:16]
        geometry = mask_geometry(kind, masks)
        # the fixed columns: a file set far from our reading of the column is reported, not silently used
        if kind not in LAMA_KIND and abs(geometry["known_mean"] - geometry["ours_known"]) > 0.05:
            warnings.warn(f"RePaint's {folder}: known fraction {geometry['known_mean']:.3f}, while our {kind!r} mask "
                          f"keeps {geometry['ours_known']:.3f} (core.inpaint.make_mask); check the mapping "
                          "core.masks.REPAINT_DIRS against the paper's column", stacklevel=2)
        return masks, (f"masks: RePaint gt_keep_masks/{REPAINT_DIRS[kind]}, first {n} (sha {digest}, "
                       f"known {geometry['known_mean']:.3f})")
    if kind in LAMA_KIND:
        masks = torch.stack([lama_mask(kind, resolution, seed=i) for i in range(n)])
        return masks, f"masks: LaMa random_{LAMA_KIND[kind]}_256 (core.masks, seeds 0-{n - 1})"
    return torch.stack([make_mask(kind, resolution, seed=i) for i in range(n)]), f"masks v{MASK_VERSION}"
