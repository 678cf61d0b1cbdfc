"""Squared 2-Wasserstein distance between many small point sets at once.

``w2_sets(pred, target, valid)`` treats each ``(K, D)`` pair of sets as two uniform empirical
measures over their valid points and returns W2^2 per set pair: the mean squared Euclidean
cost of the optimal one-to-one matching. ``valid`` masks the same positions in both sets
(ConPreDiff's predicted neighbors are i.i.d. samples, so dropping those at invalid positions
leaves i.i.d. samples), so every pair has equal sizes and the problem is an assignment.

Solvers:

* ``exact``: for ``D = 1`` the sorted matching (optimal in one dimension); otherwise the
  optimal matching from SciPy's Hungarian solver (C, one call per set) on CPU; on CUDA, for
  ``K <= EXACT_DP_MAX_K``, a dynamic programme over subsets of matched targets batched over all
  sets (``O(K 2^K)`` per set), and for larger K (the ring pattern's K = 8s) a batched shortest
  augmenting path solver (Jonker-Volgenant, :func:`assignment_jv`), both on the device with no
  host round-trip. On CUDA with triton importable and fp32 costs, the DP runs as one fused kernel
  (:mod:`core.w2_kernel`, ``K <= 8``: the costs, the DP and the walk-back in one launch, the DP's
  matching bit for bit where the costs round alike). Measured on CPU (benchmarks/RESULTS.md) the
  SciPy loop is ~3x faster than the DP and 3-4x faster than the batched solver, hence this split;
  ``exact_method`` forces any of them. The matching is found without gradients and the cost of
  the optimal matching is then evaluated differentiably, which is the gradient of W2^2 wherever
  the optimum is unique (envelope theorem).
* ``sinkhorn``: entropic OT in the log domain, batched; returns the transport cost of the
  entropic plan (approaches W2^2 as ``reg -> 0``), differentiated like ``exact``: through the
  cost with the plan held fixed.
* ``sliced``: sliced W2^2 over random unit directions (exact for ``D = 1``).
"""

from __future__ import annotations

import functools
import math

import numpy as np
import torch
from scipy.optimize import linear_sum_assignment

from .w2_kernel import FUSED_MAX_K, assignment_fused, fused_supported

SOLVERS = ("exact", "sinkhorn", "sliced")
MASKED_LOG = -1e4
EXACT_DP_MAX_K = 12
FUSED_AUTO = True  # w2_exact(method="auto") runs the DP as the fused kernel where it applies (benchmarks turn it off)


def pairwise_sq_dists(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """``(..., K, D), (..., K, D) -> (..., K, K)`` squared Euclidean costs."""
    return (a.unsqueeze(-2) - b.unsqueeze(-3)).pow(2).sum(-1)


@functools.lru_cache(maxsize=16)
def _subset_dp_tables(k: int) -> list[tuple[torch.Tensor, torch.Tensor, torch.Tensor]]:
    """Per popcount p = 1..K: (masks with p bits, their predecessors (n, p), removed bit (n, p))."""
    masks = np.arange(1 << k)
    popcount = np.array([bin(m).count("1") for m in masks])
    layers = []
    for p in range(1, k + 1):
        layer = masks[popcount == p]
        bits = np.array([[j for j in range(k) if m >> j & 1] for m in layer])  # (n, p)
        prev = layer[:, None] ^ (1 << bits)
        layers.append((torch.from_numpy(layer), torch.from_numpy(prev), torch.from_numpy(bits)))
    return layers


@functools.lru_cache(maxsize=32)
def _subset_dp_tables_on(k: int, device: str) -> list[tuple[torch.Tensor, torch.Tensor, torch.Tensor]]:
    """:func:`_subset_dp_tables` on ``device``, copied once: a host-to-device copy every call would stall
    the CUDA stream (and the CPU's launches ahead of it) in the middle of every training step."""
    return [tuple(t.to(device) for t in layer) for layer in _subset_dp_tables(k)]


@torch.no_grad()
def assignment_subset_dp(cost: torch.Tensor) -> torch.Tensor:
    """Optimal assignment of every batched ``(N, K, K)`` cost matrix: ``perm (N, K)``, row i -> column perm[i].

    Row i (i = 0..K-1) is matched in order; ``dp[m]`` is the least cost of matching rows
    ``0..popcount(m)-1`` to the column set ``m``.
    """
    n, k, _ = cost.shape
    cost_t = cost.permute(1, 2, 0).contiguous()  # (K, K, N): every gather below copies whole rows of N
    dp = cost.new_full((1 << k, n), math.inf)
    dp[0] = 0
    choice = torch.zeros(1 << k, n, dtype=torch.int8, device=cost.device)  # the column (< K <= 12) row p-1 took
    for p, (layer, prev, bits) in enumerate(_subset_dp_tables_on(k, str(cost.device)), start=1):
        candidates = dp[prev] + cost_t[p - 1][bits]  # (n_layer, p, N)
        best, arg = candidates.min(1)
        dp[layer] = best
        choice[layer] = bits.gather(1, arg).to(torch.int8)
    # Walk back from the full set: row K-1 took choice[full], and so on.
    perm = torch.empty(n, k, dtype=torch.long, device=cost.device)
    mask = torch.full((1, n), (1 << k) - 1, dtype=torch.long, device=cost.device)
    for row in range(k - 1, -1, -1):
        col = choice.gather(0, mask).squeeze(0).long()
        perm[:, row] = col
        mask = mask ^ (1 << col)
    return perm


@torch.no_grad()
def assignment_scipy(cost: torch.Tensor) -> torch.Tensor:
    """Same as :func:`assignment_subset_dp` through SciPy's Hungarian solver, one set at a time."""
    c = cost.detach().double().cpu().numpy()
    perm = np.stack([linear_sum_assignment(ci)[1] for ci in c]) if len(c) else np.zeros((0, cost.shape[-1]), int)
    return torch.from_numpy(perm).to(cost.device)


@torch.no_grad()
def assignment_jv(cost: torch.Tensor) -> torch.Tensor:
    """Optimal assignment of every batched ``(N, K, K)`` cost matrix: ``perm (N, K)``, row i -> column perm[i].

    The shortest augmenting path method (Jonker & Volgenant 1987, in the form of Crouse 2016,
    "On implementing 2D rectangular assignment algorithms", IEEE TAES 52(4), the algorithm behind
    ``scipy.optimize.linear_sum_assignment``), vectorised over the batch in plain torch, so the same
    code runs on CPU and CUDA. Rows are added one at a time (phase ``r`` matches row ``r``); in each
    phase a Dijkstra search over reduced costs ``c[i, j] - u[i] - v[j]`` runs in every set at once,
    then the dual potentials ``u, v`` are updated and the matching is flipped along the path.
    Exact by construction (up to the rounding of ``cost.dtype``): the final potentials certify
    optimality. Phase ``r`` visits at most ``r + 1`` columns per set, so at most ``K (K + 1) / 2``
    batched steps run in all; sets that reached a free column leave the working batch (whenever a
    quarter of it has), so the work per step follows the sets still searching. Measured against
    SciPy's loop in ``benchmarks/w2_solvers.py --exact``; tested against SciPy in tests/test_wasserstein.py.

    Entries may be ``+inf`` (forbidden pairs) as long as every set keeps a finite perfect matching;
    a set without one, or with a NaN cost, gets the identity permutation (its W2 is then inf/NaN).
    """
    if cost.dtype not in (torch.float32, torch.float64):
        cost = cost.float()
    n, k, _ = cost.shape
    dev = cost.device
    u = cost.new_zeros(n, k)
    v = cost.new_zeros(n, k)
    col4row = torch.full((n, k), -1, dtype=torch.long, device=dev)
    row4col = torch.full((n, k), -1, dtype=torch.long, device=dev)
    bad = torch.isnan(cost).flatten(1).any(1)
    cost_rows, u_flat = cost.reshape(n * k, k), u.view(-1)
    inf = torch.tensor(math.inf, dtype=cost.dtype, device=dev)
    for cur in range(k):
        # Each set's search tree, written out as sets finish: the distance at which each column was
        # reached (inf: not reached), the row it was reached from, the last distance and the free column found.
        final_all = cost.new_full((n, k), math.inf)
        path_all = torch.full((n, k), cur, dtype=torch.long, device=dev)
        min_val_all = cost.new_zeros(n)
        sink_all = torch.zeros(n, dtype=torch.long, device=dev)
        reached_all = torch.zeros(n, dtype=torch.bool, device=dev)
        # Working batch: the sets still searching. Reached columns get v = -inf, so relaxing them gives +inf;
        # finished sets get an infinite base, so nothing of theirs changes until they are written out.
        ids = torch.arange(n, device=dev)
        idsk = ids * k
        free, r4c, v_w = row4col < 0, row4col.clone(), v.clone()
        taken = ~free
        dist, final, path = final_all.clone(), final_all.clone(), path_all.clone()
        row = torch.full((n,), cur, dtype=torch.long, device=dev)
        min_val, sink, reached = min_val_all.clone(), sink_all.clone(), reached_all.clone()
        active = torch.ones(n, dtype=torch.bool, device=dev)
        for step in range(cur + 1):
            # Relax every column through the row just reached (Dijkstra on reduced costs c - u - v).
            flat = idsk + row
            base = torch.where(active, min_val - u_flat.index_select(0, flat), inf)
            reduced = cost_rows.index_select(0, flat) - v_w + base.unsqueeze(1)
            better = reduced < dist
            dist = torch.where(better, reduced, dist)
            path = torch.where(better, row.unsqueeze(1), path)
            # Reach the closest column, a free one among ties (ends the search sooner).
            lowest, col = dist.min(1)
            lowest_free, col_free = dist.masked_fill(taken, math.inf).min(1)
            col = torch.where(active, torch.where(lowest_free <= lowest, col_free, col), sink)
            min_val = torch.where(active, lowest, min_val)
            c1 = col.unsqueeze(1)
            dist.scatter_(1, c1, math.inf)
            final.scatter_(1, c1, min_val.unsqueeze(1))
            v_w.scatter_(1, c1, -math.inf)
            reached = free.gather(1, c1).squeeze(1)
            row = torch.where(reached, row, r4c.gather(1, c1).squeeze(1))
            sink = col
            active = active & ~reached
            m = active.numel()
            left = 0 if step == cur else int(active.sum())
            if 4 * (m - left) < m:
                continue
            # Write out the finished sets (all of them at the phase's last step) and shrink the batch.
            done = ~active if step < cur else torch.ones_like(active)
            d = done.nonzero().squeeze(1)
            g = ids.index_select(0, d)
            for full, part in ((final_all, final), (path_all, path), (min_val_all, min_val), (sink_all, sink),
                               (reached_all, reached)):
                full.index_copy_(0, g, part.index_select(0, d))
            keep = active.nonzero().squeeze(1) if step < cur else d[:0]
            if keep.numel() == 0:
                break
            ids, idsk, row, min_val, free, taken, r4c, v_w, dist, final, path, sink, active = (
                x.index_select(0, keep)
                for x in (ids, idsk, row, min_val, free, taken, r4c, v_w, dist, final, path, sink, active))
        # Dual update (Crouse 2016, Algorithm 4): v_j += d_j - minVal on reached columns, u_i += minVal - d_j on
        # the rows matched to them and u_cur += minVal; then flip the matching along each path.
        bad |= ~reached_all | ~torch.isfinite(min_val_all)
        mv = min_val_all.unsqueeze(1)
        reached_col = final_all < math.inf
        v = torch.where(reached_col, v - mv + final_all, v)
        shift = torch.where(reached_col & (row4col >= 0), mv - final_all, torch.zeros_like(final_all))
        u.scatter_add_(1, row4col.clamp(min=0), shift)
        u[:, cur] += min_val_all
        j = sink_all
        going = torch.ones(n, dtype=torch.bool, device=dev)
        for _ in range(cur + 1):
            i = path_all.gather(1, j.unsqueeze(1))
            prev = col4row.gather(1, i).squeeze(1)
            row4col.scatter_(1, j.unsqueeze(1), torch.where(going.unsqueeze(1), i, row4col.gather(1, j.unsqueeze(1))))
            col4row.scatter_(1, i, torch.where(going, j, prev).unsqueeze(1))
            going = going & (i.squeeze(1) != cur)
            if not bool(going.any()):
                break
            j = torch.where(going, prev, j).clamp(min=0)
    identity = torch.arange(k, device=dev).expand(n, k)
    return torch.where(bad.unsqueeze(1) | (col4row < 0), identity, col4row)


def _masked_cost(cost: torch.Tensor, valid: torch.Tensor | None) -> torch.Tensor:
    """Forbid matching a valid point to an invalid one; invalid-invalid pairs cost nothing."""
    if valid is None:
        return cost
    both = valid.unsqueeze(-1) & valid.unsqueeze(-2)
    mixed = valid.unsqueeze(-1) ^ valid.unsqueeze(-2)
    return torch.where(both, cost, torch.zeros((), dtype=cost.dtype, device=cost.device)).masked_fill(mixed, math.inf)


EXACT_METHODS = ("auto", "dp", "fused", "jv", "hungarian")


def exact_method_for(k: int, cuda: bool) -> str:
    """The assignment solver ``w2_exact(method="auto")`` uses for sets of ``K = k`` points (``D > 1``).

    CUDA: the subset DP up to ``EXACT_DP_MAX_K`` (2 ms for 16,384 sets of 8 on an H100), the batched
    shortest augmenting path above. CPU: SciPy's loop, 3-4x faster than either batched solver on
    2 cores (benchmarks/RESULTS.md). ``w2_exact`` runs ``dp`` as ``fused`` (the same DP in one Triton
    kernel) where :func:`core.w2_kernel.fused_supported` says it applies and ``FUSED_AUTO`` is on.
    """
    if cuda:
        return "dp" if k <= EXACT_DP_MAX_K else "jv"
    return "hungarian"


def w2_exact(
    pred: torch.Tensor, target: torch.Tensor, valid: torch.Tensor | None = None, method: str = "auto"
) -> torch.Tensor:
    """Exact W2^2 per set: ``(..., K, D) x2 [, (..., K)] -> (...)``.

    ``method``: ``dp`` (batched subset DP, K <= EXACT_DP_MAX_K), ``fused`` (the same DP as one Triton
    kernel, costs computed inside, K <= FUSED_MAX_K; CUDA, or CPU under ``TRITON_INTERPRET=1``), ``jv``
    (batched shortest augmenting path, any K), ``hungarian`` (SciPy per set), or ``auto``: sorting for
    ``D = 1`` (exact in one dimension); on CUDA the DP when ``K <= EXACT_DP_MAX_K`` (as ``fused`` where
    :func:`core.w2_kernel.fused_supported`), else ``jv``; SciPy on CPU.
    Sets whose costs are not finite (NaN or inf points) get an arbitrary matching from ``dp``/``fused``/``jv``
    (their W2^2 is NaN/inf whatever the matching); SciPy raises on NaN.
    The matching is found without gradients; the returned cost is evaluated differentiably on the matched pairs.
    """
    if method not in EXACT_METHODS:
        raise ValueError(f"method={method!r}; allowed: {', '.join(EXACT_METHODS)}")
    batch, (k, d) = pred.shape[:-2], pred.shape[-2:]
    if d == 1 and method == "auto":
        return w2_sorted_1d(pred, target, valid)
    p, t = pred.reshape(-1, k, d), target.reshape(-1, k, d)
    v = None if valid is None else valid.expand(*batch, k).reshape(-1, k)
    with torch.no_grad():
        if method == "auto":
            method = exact_method_for(k, pred.is_cuda)
            if method == "dp" and FUSED_AUTO and pred.is_cuda and fused_supported(p, t):
                method = "fused"
        if method in ("dp", "fused") and k > min(EXACT_DP_MAX_K, FUSED_MAX_K):
            raise ValueError(f"the subset DP handles K <= {EXACT_DP_MAX_K} points per set, got K={k}; "
                             "use exact_method='jv' or 'hungarian'")
        if method == "fused":
            perm = assignment_fused(p, t, v)
        else:
            solve = {"dp": assignment_subset_dp, "jv": assignment_jv, "hungarian": assignment_scipy}[method]
            perm = solve(_masked_cost(pairwise_sq_dists(p, t), v))
    matched = t.gather(1, perm.unsqueeze(-1).expand(-1, k, d))
    sq = (p - matched).pow(2).sum(-1)  # (N, K)
    if v is None:
        return sq.mean(-1).reshape(batch)
    count = v.sum(-1)
    total = torch.where(v, sq, torch.zeros_like(sq)).sum(-1)
    return (total / count.clamp(min=1)).reshape(batch)


def w2_sorted_1d(pred: torch.Tensor, target: torch.Tensor, valid: torch.Tensor | None = None) -> torch.Tensor:
    """Exact W2^2 of 1-D sets (``D = 1``): the optimal matching pairs the sorted values."""
    p, t = pred[..., 0], target[..., 0]
    if valid is None:
        return (p.sort(-1).values - t.sort(-1).values).pow(2).mean(-1)
    big = torch.finfo(p.dtype).max
    sp = torch.where(valid, p, torch.full_like(p, big)).sort(-1).values
    st = torch.where(valid, t, torch.full_like(t, big)).sort(-1).values
    count = valid.sum(-1)
    first = torch.arange(p.shape[-1], device=p.device) < count.unsqueeze(-1)  # valid values sort first
    sq = torch.where(first, sp - st, torch.zeros_like(sp)).pow(2)
    return sq.sum(-1) / count.clamp(min=1)


def w2_sinkhorn(
    pred: torch.Tensor, target: torch.Tensor, valid: torch.Tensor | None = None, reg: float = 0.05, iters: int = 50
) -> torch.Tensor:
    """Transport cost of the entropic plan per set, log-domain Sinkhorn, batched.

    ``reg`` is relative to the mean cost. As for ``exact``, the plan is found without gradients and
    its cost is evaluated differentiably: the gradient is the plan's (envelope theorem for the
    entropic objective), instead of back-propagating through every iteration, which stored
    ``2 * iters`` ``(..., K, K)`` tensors and made a mini training step ~3x slower
    (benchmarks/RESULTS.md).
    """
    cost = pairwise_sq_dists(pred, target)  # (..., K, K)
    if valid is None:
        valid = torch.ones(cost.shape[:-1], dtype=torch.bool, device=cost.device)
    valid = valid.expand(cost.shape[:-1])
    both = valid.unsqueeze(-1) & valid.unsqueeze(-2)
    masked_cost = torch.where(both, cost, torch.zeros_like(cost))
    with torch.no_grad():
        count = valid.sum(-1, keepdim=True).clamp(min=1)
        # Masked entries get a large finite negative log-weight: exp underflows to 0 without inf - inf.
        log_w = torch.where(valid, -count.to(cost.dtype).log(), torch.full_like(cost[..., 0], MASKED_LOG))
        scale = (reg * masked_cost.sum((-1, -2), keepdim=True) / count.unsqueeze(-1) ** 2).clamp(min=1e-12)
        log_k = torch.where(both, -cost / scale, torch.full_like(cost, MASKED_LOG))
        f = torch.zeros_like(log_w)
        g = torch.zeros_like(log_w)
        for _ in range(iters):
            f = torch.where(valid, log_w - torch.logsumexp(log_k + g.unsqueeze(-2), -1), 0.0)
            g = torch.where(valid, log_w - torch.logsumexp(log_k + f.unsqueeze(-1), -2), 0.0)
        plan = torch.exp(log_k + f.unsqueeze(-1) + g.unsqueeze(-2))
    return (plan * masked_cost).sum((-1, -2))


def w2_sliced(
    pred: torch.Tensor,
    target: torch.Tensor,
    valid: torch.Tensor | None = None,
    projections: int = 64,
    generator: torch.Generator | None = None,
) -> torch.Tensor:
    """Sliced W2^2 per set, times D: mean over random unit directions of the 1-D W2^2 (sorted matching).

    The factor D puts it on the scale of W2^2 (for a unit direction u, E <u, x>^2 = |x|^2 / D).
    """
    d = pred.shape[-1]
    if d == 1:
        dirs = torch.ones(1, 1, dtype=pred.dtype, device=pred.device)
    else:
        dirs = torch.randn(d, projections, generator=generator, device=pred.device if generator is None else None)
        dirs = (dirs / dirs.norm(dim=0, keepdim=True)).to(device=pred.device, dtype=pred.dtype)
    pp, pt = pred @ dirs, target @ dirs  # (..., K, P)
    if valid is None:
        return (pp.sort(-2).values - pt.sort(-2).values).pow(2).mean((-1, -2)) * (1 if d == 1 else d)
    v = valid.expand(pp.shape[:-1]).unsqueeze(-1)
    big = torch.finfo(pp.dtype).max
    sp = torch.where(v, pp, torch.full_like(pp, big)).sort(-2).values
    st = torch.where(v, pt, torch.full_like(pt, big)).sort(-2).values
    count = valid.expand(pp.shape[:-1]).sum(-1)  # (...)
    rank_valid = torch.arange(pp.shape[-2], device=pp.device).view(-1, 1) < count[..., None, None]
    sq = torch.where(rank_valid, sp - st, torch.zeros_like(sp)).pow(2)
    return sq.sum(-2).mean(-1) / count.clamp(min=1) * (1 if d == 1 else d)


def w2_sets(
    pred: torch.Tensor,
    target: torch.Tensor,
    valid: torch.Tensor | None = None,
    solver: str = "exact",
    *,
    sinkhorn_reg: float = 0.05,
    sinkhorn_iters: int = 50,
    sliced_projections: int = 64,
    exact_method: str = "auto",
) -> torch.Tensor:
    """W2^2 between uniform measures on the valid points of each set pair.

    Args:
        pred, target: ``(..., K, D)``.
        valid: ``(..., K)`` boolean, broadcastable; masks the same positions of both sets.
            Sets with no valid point give 0.
        solver: one of ``exact``, ``sinkhorn``, ``sliced``.
        exact_method: how ``exact`` finds the matching, one of ``EXACT_METHODS`` (see :func:`w2_exact`).

    Returns:
        ``(...)`` W2^2 per set pair, differentiable in ``pred`` and ``target``.
    """
    if pred.shape != target.shape:
        raise ValueError(f"pred {tuple(pred.shape)} and target {tuple(target.shape)} must have equal shapes (..., K, D)")
    if valid is not None:
        valid = valid.expand(pred.shape[:-1])
    if solver == "exact":
        return w2_exact(pred, target, valid, exact_method)
    if solver == "sinkhorn":
        return w2_sinkhorn(pred, target, valid, reg=sinkhorn_reg, iters=sinkhorn_iters)
    if solver == "sliced":
        return w2_sliced(pred, target, valid, projections=sliced_projections)
    raise ValueError(f"solver={solver!r}; allowed: {', '.join(SOLVERS)}")
