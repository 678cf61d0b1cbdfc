"""A mechanism metric: how well generated images reproduce the real images' multi-stride neighborhood statistics.

ConPreDiff trains every point to predict the distribution of its s-stride neighborhood. This module measures,
on samples, whether that statistic moved: for each stride s, every interior point gives one vector
``[x_i, sort(x_{N_i^s})]`` (its value and its 8 dilated-ring neighbors as a sorted, hence unordered, set; per
channel), and ``fd_context_s<strides>`` is the Fréchet distance between the Gaussian fits of those vectors in
generated and real images (clean-fid's ``frechet_distance``), averaged over strides. Identical sets give 0; it is
invariant to permuting a point's neighbors. It is a statistic of pixels, not of a feature network, so its value
compares across methods at one resolution and data set only.

    python -m eval.context_stats --samples runs/<run>/samples/<sampler> [--strides 1,2,3]
    python -m eval.context_stats --samples runs/<run>/samples/<sampler> --record-beside results/records.jsonl

``--record-beside`` appends the value as a record of the same run, sampler and checkpoint as that run's recorded
``fd_digits`` (a run measured before this metric existed), and refuses when there is none or the value exists.
"""

from __future__ import annotations

import argparse
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import torch

from core.neighborhood import gather_neighbors

STRIDES = (1, 2, 3)


def metric_name(strides: Sequence[int] = STRIDES) -> str:
    return "fd_context_s" + "".join(map(str, strides))


def neighborhood_vectors(images: torch.Tensor, stride: int, max_points: int = 200_000, seed: int = 0) -> np.ndarray:
    """``(P, C * 9)`` float64: per interior point (all 8 dilated neighbors inside), per channel, the point's value
    followed by its neighbors' values sorted ascending. ``images``: ``(N, C, H, W)``. At most ``max_points`` rows,
    drawn without replacement with ``seed`` (same draw for the same input)."""
    if images.dim() != 4 or min(images.shape[-2:]) <= 2 * stride:
        raise ValueError(f"images {tuple(images.shape)} must be (N, C, H, W) with H, W > 2 x stride ({stride})")
    values, valid = gather_neighbors(images.float(), (stride,), "dilated")  # (N,H,W,1,8,C), (1,H,W,1,8)
    inside = valid[0, :, :, 0].all(-1)  # (H, W)
    centre = images.float().permute(0, 2, 3, 1)[:, inside]  # (N, P0, C)
    ring = values[:, inside, 0].sort(dim=2).values  # (N, P0, 8, C): sorted per channel
    vec = torch.cat([centre[:, :, None], ring], 2).transpose(2, 3).reshape(-1, 9 * images.shape[1])
    if len(vec) > max_points:
        vec = vec[torch.randperm(len(vec), generator=torch.Generator().manual_seed(seed))[:max_points]]
    return vec.double().numpy()


def fd_context(fake: torch.Tensor, real: torch.Tensor, strides: Sequence[int] = STRIDES) -> float:
    """Mean over ``strides`` of the Fréchet distance between real and generated neighborhood vectors.

    ``fake``, ``real``: ``(N, C, H, W)`` on the same value scale (e.g. [-1, 1]). Unitless; 0 for identical sets.
    """
    from .metrics import frechet_distance

    if fake.shape[1:] != real.shape[1:]:
        raise ValueError(f"fake {tuple(fake.shape)} and real {tuple(real.shape)} differ in (C, H, W)")
    return float(np.mean([frechet_distance(neighborhood_vectors(fake, s), neighborhood_vectors(real, s))
                          for s in strides]))


def fd_context_vs_digits(paths: Sequence[Path], resolution: int, strides: Sequence[int] = STRIDES) -> float:
    """:func:`fd_context` of the PNGs at ``paths`` against the digits training split at ``resolution`` (the
    reference the runs' other digits metrics use)."""
    from core.config import DataConfig
    from core.data import ImageData
    from core.sample import load_pngs

    real = ImageData(DataConfig(source="digits", resolution=resolution))
    return fd_context(load_pngs(list(paths)), real.images(range(len(real))), strides)


def record_beside(samples: Path, records_path: Path, strides: Sequence[int] = STRIDES) -> dict:
    """Measure ``samples`` (``<run>/samples/<sampler>``) and append the record beside the run's ``fd_digits`` record
    (same experiment(s), preset, seed, checkpoint, sampler, sample count). Returns the first record written."""
    from core.runlog import run_name

    from .metric_specs import backend
    from .records import append_record, load_records

    run, sampler = samples.parent.parent.name, samples.name
    records = load_records(records_path)
    same = [r for r in records if run_name(r["preset"], r["seed"]) == run and r["sampler"] == sampler]
    anchors = [r for r in same if r["metric"] == "fd_digits"]
    if not anchors:
        raise SystemExit(f"{records_path} has no fd_digits record of run {run} sampled with {sampler}")
    paths = sorted(samples.glob("*.png"))
    name = metric_name(strides)
    written = []
    for anchor in anchors:
        if len(paths) != anchor["n_samples"]:
            raise SystemExit(f"{samples} holds {len(paths)} PNGs; the run's records used {anchor['n_samples']}")
        if any(r["metric"] == name and r["experiment"] == anchor["experiment"] for r in same):
            continue
        resolution = int(anchor["benchmark"].removeprefix("digits").split("-")[0])
        value = fd_context_vs_digits(paths, resolution, strides)
        rec = {k: v for k, v in anchor.items() if k not in ("git_commit", "time", "device", "value", "metric", "backend")}
        rec.update(metric=name, value=value, device=anchor.get("device", ""), backend=backend(name, after_run=True))
        append_record(rec, records_path)
        written.append(rec)
    if not written:
        raise SystemExit(f"{name} of run {run} ({sampler}) is already recorded in {records_path}")
    return written[0]


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--samples", type=Path, required=True, help="a folder of generated PNGs (digits)")
    parser.add_argument("--strides", default="1,2,3")
    parser.add_argument("--resolution", type=int, default=16)
    parser.add_argument("--record-beside", type=Path, metavar="RECORDS",
                        help="append a record beside the run's fd_digits record in this records file")
    args = parser.parse_args(argv)
    strides = tuple(int(s) for s in args.strides.split(","))
    if args.record_beside:
        rec = record_beside(args.samples, args.record_beside, strides)
        print(f"{rec['metric']} = {rec['value']:.6g} recorded for {rec['preset']} seed {rec['seed']}")
        return
    paths = sorted(args.samples.glob("*.png"))
    if not paths:
        raise SystemExit(f"no PNGs in {args.samples}")
    value = fd_context_vs_digits(paths, args.resolution, strides)
    print(f"{metric_name(strides)} = {value:.6g} ({len(paths)} samples vs the digits training split)")


if __name__ == "__main__":
    main()
