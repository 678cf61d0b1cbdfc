"""Benchmark the W2 solvers on many small point sets (not a test; prints a Markdown table).

    python benchmarks/w2_solvers.py                      # N=16384, K=8 and 24, D=3, 4, 64, CPU
    python benchmarks/w2_solvers.py --device cuda --n 65536

Rows: ``w2_sets`` with its default exact solver (SciPy's Hungarian on CPU, our batched subset
DP on CUDA), the subset DP forced, SciPy's Hungarian per set on the cost matrices alone, POT's ot.emd2 per set (both exact), our log-domain Sinkhorn, POT's batched
entropic solver (ot.batch.solve_batch), sliced W2. Relative error is |w - exact| / exact,
averaged over sets; time is the best of --repeats runs (the POT loop runs once, on a subset
of --loop-n sets, scaled to N).
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import numpy as np
import ot
import torch
from scipy.optimize import linear_sum_assignment

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from core.wasserstein import EXACT_DP_MAX_K, pairwise_sq_dists, w2_exact, w2_sets  # noqa: E402


def timed(fn, repeats: int, device: str):
    best, out = float("inf"), None
    for _ in range(repeats):
        if device == "cuda":
            torch.cuda.synchronize()
        t0 = time.perf_counter()
        out = fn()
        if device == "cuda":
            torch.cuda.synchronize()
        best = min(best, time.perf_counter() - t0)
    return best, out


def scipy_loop(cost: np.ndarray) -> np.ndarray:
    return np.array([c[linear_sum_assignment(c)].mean() for c in cost])


def pot_loop(cost: np.ndarray) -> np.ndarray:
    k = cost.shape[-1]
    w = np.full(k, 1 / k)
    return np.array([ot.emd2(w, w, c) for c in cost])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--n", type=int, default=16384)
    parser.add_argument("--k", default="8,24")
    parser.add_argument("--d", default="3,4,64")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--loop-n", type=int, default=2048, help="sets timed for the per-set Python loops")
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    print(f"torch {torch.__version__}, POT {ot.__version__}, device {args.device}, threads {args.threads}, N={args.n}\n")
    print("| K | D | solver | seconds (N sets) | mean rel. error vs exact |")
    print("|---|---|---|---|---|")
    for k in map(int, args.k.split(",")):
        for d in map(int, args.d.split(",")):
            g = torch.Generator().manual_seed(0)
            pred = torch.randn(args.n, k, d, generator=g).to(args.device)
            target = torch.randn(args.n, k, d, generator=g).to(args.device)
            t_exact, exact = timed(lambda: w2_sets(pred, target), args.repeats, args.device)
            exact = exact.double().cpu()
            rows = [("w2_sets exact (default: " + ("DP" if args.device == "cuda" and k <= EXACT_DP_MAX_K else "Hungarian") + ")", t_exact, 0.0)]
            if k <= EXACT_DP_MAX_K:
                t, w = timed(lambda: w2_exact(pred, target, method="dp"), args.repeats, args.device)
                rows.append(("exact, batched subset DP (ours)", t, ((w.double().cpu() - exact).abs() / exact).mean().item()))
            cost = pairwise_sq_dists(pred, target).double().cpu().numpy()
            m = min(args.loop_n, args.n)
            for label, fn in (("scipy linear_sum_assignment loop", scipy_loop), ("POT ot.emd2 loop", pot_loop)):
                t, w = timed(lambda: fn(cost[:m]), 1, "cpu")
                rows.append((label, t * args.n / m, float(np.mean(np.abs(w - exact[:m].numpy()) / exact[:m].numpy()))))
            for reg in (0.05, 0.01):
                t, w = timed(lambda: w2_sets(pred, target, solver="sinkhorn", sinkhorn_reg=reg, sinkhorn_iters=100),
                             args.repeats, args.device)
                rows.append((f"sinkhorn (ours, log-domain, reg={reg}, 100 it)", t, ((w.double().cpu() - exact).abs() / exact).mean().item()))
            cost_t = pairwise_sq_dists(pred, target)
            scale = cost_t.mean((-1, -2), keepdim=True)
            t, res = timed(lambda: ot.batch.solve_batch(cost_t / scale, reg=0.05, max_iter=100), args.repeats, args.device)
            w = (res.value_linear * scale.squeeze()).double().cpu()
            rows.append(("POT ot.batch.solve_batch (entropic, reg=0.05)", t, ((w - exact).abs() / exact).mean().item()))
            t, w = timed(lambda: w2_sets(pred, target, solver="sliced", sliced_projections=64), args.repeats, args.device)
            rows.append(("sliced (64 projections, x D)", t, ((w.double().cpu() - exact).abs() / exact).mean().item()))
            for label, t, err in rows:
                print(f"| {k} | {d} | {label} | {t:.3f} | {err:.2e} |")


if __name__ == "__main__":
    main()
