"""The exact W2 assignment of many small point sets in one fused Triton kernel (CUDA; CPU through Triton's interpreter).

``assignment_fused(pred, target, valid)`` returns, for every pair of ``(K, D)`` sets, the same optimal matching as
:func:`core.wasserstein.assignment_subset_dp` on ``_masked_cost(pairwise_sq_dists(pred, target), valid)``, in one
launch instead of ~110 torch kernels: each program takes ``BLOCK`` sets, computes their costs from the points (and
the validity mask) as it needs them, runs the subset DP over the ``2^K`` column sets in registers, and walks back.

The recurrence (Held & Karp's DP over subsets, applied to assignment): rows are matched in order 0..K-1, ``dp[m]``
is the least cost of matching rows ``0..|m|-1`` to the column set ``m``,

    dp[0] = 0,    dp[m] = min_{j in m} dp[m ^ 2^j] + C[|m| - 1, j],

and the walk-back from the full set reads the argmin ``choice[m]``: row ``K-1`` takes ``choice[full]``, and so on.
Pass ``p`` updates the masks with ``p`` bits, all ``2^K`` lanes at once (``K^2 2^K`` adds per set).

Identity with the torch DP (tested through the interpreter in tests/test_w2_kernel.py):

* Each candidate is the same single fp32 add ``dp[m ^ 2^j] + C[p-1, j]``; the costs are fp32
  ``sum_d (p_d - t_d)^2`` summed in order ``d = 0..D-1``, the products rounded before the adds (launched with
  ``enable_fp_fusion=False``: no FMA contraction). That is ``pairwise_sq_dists`` bit for bit wherever torch sums the
  last dimension in the same order (on CPU for D = 1..4 and 8: tested; D = 5 and 16 are summed otherwise). Where the
  sums round differently, the costs differ by rounding only: the optimal cost is the same up to rounding and the
  matchings can differ only between matchings within rounding of each other.
  ``assignment_fused_cost(cost)`` takes the cost matrix instead and is then the DP's twin bit for bit for every D.
* Ties: the lowest column ``j`` wins (candidates scanned in increasing ``j`` with a strict ``<``), which is what
  ``torch.min(dim)`` returns (its first minimum). NaN propagates as in ``torch.min``: a NaN candidate wins over
  any number and the first NaN is kept. Sets that are all ``inf`` (no finite matching) take the lowest columns
  first, as the DP does. So the matching equals the DP's for every input, finite or not.

Masking as :func:`core.wasserstein._masked_cost`: valid-valid pairs cost their distance, invalid-invalid pairs 0,
mixed pairs ``inf``.

Sizes: ``K <= FUSED_MAX_K`` (12). Registers per program hold ``BLOCK * 2^K`` fp32 DP values and int8 choices;
``BLOCK`` is chosen so that is 2,048 lanes (K = 8: 8 sets per program), one set per program from K = 11.
Compiled ahead of time for sm_90 without a GPU (``triton.compile`` with a ``GPUTarget``, then ``ptxas -v``), the
K = 8 kernel uses 220 registers per thread at 4 warps, no spills, and its PTX has no ``fma`` (contraction off); its
first launch compiles it (about 80 s on one loaded CPU core here, cached by Triton afterwards). The unrolled code
grows as ``K^2``: K = 12 did not compile within 15 minutes here, so ``w2_exact`` picks the kernel up to K = 8 only.
"""

from __future__ import annotations

import functools
import math
import os

import torch

FUSED_MAX_K = 12
FUSED_AUTO_MAX_K = 8  # w2_exact's automatic choice stops here: K = 12's unrolled kernel did not compile in 15 min
LANES = 2048


@functools.lru_cache(maxsize=1)
def triton_available() -> bool:
    """Whether triton imports (it comes with the CUDA torch wheels)."""
    try:
        import triton  # noqa: F401
        import triton.language  # noqa: F401
    except Exception:
        return False
    return True


def interpreting() -> bool:
    """Triton's CPU interpreter is on (``TRITON_INTERPRET=1``, to be set before triton is imported)."""
    return os.environ.get("TRITON_INTERPRET", "0") not in ("", "0")


def fused_supported(pred: torch.Tensor, target: torch.Tensor) -> bool:
    """Whether :func:`assignment_fused` applies to these ``(N, K, D)`` sets and replaces the DP in ``w2_exact``:
    CUDA tensors (or the interpreter on CPU), triton importable, ``2 <= K <= FUSED_MAX_K``, and costs that torch
    computes in fp32 (``pred`` and ``target`` promote to float32: fp32, or bf16/fp16 with fp32). Above
    ``FUSED_AUTO_MAX_K`` the kernel still runs when asked for (``method="fused"``) but is not chosen: its compile
    time there is unmeasured (K = 12 did not compile for sm_90 within 15 minutes on one loaded CPU core)."""
    k = pred.shape[-2]
    if not (2 <= k <= FUSED_AUTO_MAX_K) or torch.promote_types(pred.dtype, target.dtype) != torch.float32:
        return False
    if not (pred.is_cuda or interpreting()):
        return False
    return triton_available()


def _block(k: int, n: int) -> int:
    """Sets per program: ``LANES / 2^K`` on a GPU; on the interpreter, whose cost is per operation, all sets in one
    program up to 2^16 lanes."""
    if interpreting():
        return min(max(1, (1 << 16) >> k), 1 << max(0, n - 1).bit_length())
    return max(1, LANES >> k)


@functools.lru_cache(maxsize=1)
def _kernel():
    from ._w2_triton import w2_assignment_kernel

    return w2_assignment_kernel


def _launch(n: int, k: int, d: int, perm: torch.Tensor, **tensors) -> torch.Tensor:
    if n == 0:
        return perm
    dummy = perm
    pred, target, valid, cost = (tensors.get(name) for name in ("pred", "target", "valid", "cost"))
    sp = pred.stride() if pred is not None else (0, 0, 0)
    st = target.stride() if target is not None else (0, 0, 0)
    sv = valid.stride() if valid is not None else (0, 0)
    sc = cost.stride() if cost is not None else (0, 0, 0)
    block = _block(k, n)
    options = {} if interpreting() else {"enable_fp_fusion": False, "num_warps": 4}
    _kernel()[(math.ceil(n / block),)](
        pred if pred is not None else dummy, target if target is not None else dummy,
        valid if valid is not None else dummy, cost if cost is not None else dummy, perm, n,
        *sp, *st, *sv, *sc, K=k, D=d, FROM_COST=cost is not None, HAS_VALID=valid is not None, BLOCK=block, **options,
    )
    return perm


def _check(k: int, device: torch.device) -> None:
    if device.type != "cuda" and not interpreting():
        raise RuntimeError(f"the fused assignment kernel runs on CUDA tensors (got {device}), or on the CPU under "
                           "TRITON_INTERPRET=1 set before triton is imported")
    if not 1 <= k <= FUSED_MAX_K:
        raise ValueError(f"the fused assignment kernel handles 1 <= K <= {FUSED_MAX_K} points per set, got K={k}")


@torch.no_grad()
def assignment_fused(pred: torch.Tensor, target: torch.Tensor, valid: torch.Tensor | None = None) -> torch.Tensor:
    """Optimal matching of every pair of sets ``pred, target (N, K, D)`` [``valid (N, K)`` bool]: ``perm (N, K)``
    long, row (point of ``pred``) i -> column (point of ``target``) ``perm[:, i]``, computed in one kernel launch.

    Equals ``assignment_subset_dp(_masked_cost(pairwise_sq_dists(pred, target), valid))`` (see the module's
    docstring for when bit for bit). Any float dtypes (read and subtracted in fp32); any strides. Raises
    ``ValueError`` for ``K > FUSED_MAX_K`` or mismatched shapes, ``RuntimeError`` for CPU tensors without
    ``TRITON_INTERPRET=1``.
    """
    if pred.shape != target.shape or pred.dim() != 3:
        raise ValueError(f"pred {tuple(pred.shape)} and target {tuple(target.shape)} must be equal (N, K, D)")
    n, k, d = pred.shape
    _check(k, pred.device)
    v = None if valid is None else valid.expand(n, k).to(torch.uint8)
    perm = torch.empty(n, k, dtype=torch.long, device=pred.device)
    return _launch(n, k, d, perm, pred=pred.detach(), target=target.detach(), valid=v)


@torch.no_grad()
def assignment_fused_cost(cost: torch.Tensor) -> torch.Tensor:
    """:func:`core.wasserstein.assignment_subset_dp` of ``cost (N, K, K)`` (fp32, or cast to it) in one launch,
    bit for bit: ``perm (N, K)`` long, row i -> column ``perm[:, i]``."""
    n, k, _ = cost.shape
    _check(k, cost.device)
    perm = torch.empty(n, k, dtype=torch.long, device=cost.device)
    return _launch(n, k, 1, perm, cost=cost.detach().float())
