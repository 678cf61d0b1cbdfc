"""Multi-stride neighborhoods of every point of a feature map.

A point's *s-stride neighborhood* is the set of points at offset ``s`` around it:

* ``dilated``: the 3x3 ring dilated by ``s`` -- 8 neighbors per stride (paper default);
* ``ring``: every point at Chebyshev distance exactly ``s`` -- ``8 s`` neighbors per stride.

Neighbor sets of different strides are padded to the largest size ``K`` and the padding is
marked invalid, as are neighbors that fall outside the image (never zero-padded values).

Example::

    values, valid = gather_neighbors(x, strides=(1, 2, 3))   # x: (B, C, H, W)
    values.shape  # (B, H, W, 3, 8, C)
    valid.shape   # (1, H, W, 3, 8)
"""

from __future__ import annotations

import functools
from collections.abc import Sequence

import torch

PATTERNS = ("dilated", "ring")


def neighbor_offsets(strides: Sequence[int], pattern: str = "dilated") -> tuple[torch.Tensor, torch.Tensor]:
    """Offsets ``(S, K, 2)`` as ``(dy, dx)`` and a mask ``(S, K)`` of the real (unpadded) ones."""
    if pattern not in PATTERNS:
        raise ValueError(f"pattern={pattern!r}; allowed: {', '.join(PATTERNS)}")
    if not strides or any(int(s) < 1 for s in strides):
        raise ValueError(f"strides={tuple(strides)}; every stride must be an integer >= 1")
    rings = []
    for s in strides:
        if pattern == "dilated":
            ring = [(dy * s, dx * s) for dy in (-1, 0, 1) for dx in (-1, 0, 1) if (dy, dx) != (0, 0)]
        else:
            ring = [(dy, dx) for dy in range(-s, s + 1) for dx in range(-s, s + 1) if max(abs(dy), abs(dx)) == s]
        rings.append(ring)
    k = max(len(r) for r in rings)
    offsets = torch.zeros(len(rings), k, 2, dtype=torch.long)
    real = torch.zeros(len(rings), k, dtype=torch.bool)
    for i, ring in enumerate(rings):
        offsets[i, : len(ring)] = torch.tensor(ring)
        real[i, : len(ring)] = True
    return offsets, real


def neighborhood_size(strides: Sequence[int], pattern: str = "dilated") -> int:
    """K, the (padded) number of neighbors per stride."""
    return 8 * max(strides) if pattern == "ring" else 8


@functools.lru_cache(maxsize=64)
def _gather_plan(height: int, width: int, strides: tuple[int, ...], pattern: str) -> tuple[torch.Tensor, torch.Tensor]:
    """Flat indices ``(H*W*S*K,)`` into the map and the validity mask ``(1, H, W, S, K)``."""
    offsets, real = neighbor_offsets(strides, pattern)
    ys = torch.arange(height).view(height, 1, 1, 1) + offsets[:, :, 0]  # (H, 1, S, K)
    xs = torch.arange(width).view(1, width, 1, 1) + offsets[:, :, 1]  # (1, W, S, K)
    ys, xs = torch.broadcast_tensors(ys, xs)  # (H, W, S, K)
    valid = (ys >= 0) & (ys < height) & (xs >= 0) & (xs < width) & real
    index = torch.where(valid, ys * width + xs, 0)
    return index.reshape(-1), valid.unsqueeze(0)


@functools.lru_cache(maxsize=64)
def device_plan(height: int, width: int, strides: tuple[int, ...], pattern: str, device: str
                ) -> tuple[torch.Tensor, torch.Tensor]:
    """:func:`_gather_plan` on ``device``, built and copied there once: a training step then makes no host-to-device
    copy for it (it made two a step, the step's only syncs on a GPU; issue 30)."""
    index, valid = _gather_plan(height, width, strides, pattern)
    return index.to(device), valid.to(device)


def gather_neighbors(
    x: torch.Tensor, strides: Sequence[int] = (1, 2, 3), pattern: str = "dilated"
) -> tuple[torch.Tensor, torch.Tensor]:
    """Neighbor values ``(B, H, W, S, K, C)`` and validity ``(1, H, W, S, K)`` of ``x: (B, C, H, W)``.

    Invalid entries (outside the image, or padding of a smaller ring) hold an arbitrary value of
    the map and must be ignored through the mask. The mask is shared between calls (:func:`device_plan`'s cache):
    read it, never modify it in place.
    """
    if x.dim() != 4:
        raise ValueError(f"expected a (B, C, H, W) map, got shape {tuple(x.shape)}")
    b, c, h, w = x.shape
    strides = tuple(int(s) for s in strides)
    index, valid = device_plan(h, w, strides, pattern, str(x.device))
    s, k = valid.shape[-2:]
    flat = x.permute(0, 2, 3, 1).reshape(b, h * w, c)  # (B, HW, C)
    values = flat[:, index].view(b, h, w, s, k, c)
    return values, valid
