"""The fused exact-W2 assignment kernel (core/w2_kernel.py) against the torch subset DP and SciPy.

On a machine without CUDA the kernel runs in Triton's interpreter, which must be switched on before triton is
imported: ``test_under_the_interpreter`` runs this file again in a subprocess with ``TRITON_INTERPRET=1``. Every
kernel call is batched (the interpreter's cost is per operation, not per set).
"""

import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from scipy.optimize import linear_sum_assignment

from core.w2_kernel import (FUSED_AUTO_MAX_K, FUSED_MAX_K, assignment_fused, assignment_fused_cost, fused_supported,
                            triton_available)
from core.wasserstein import _masked_cost, assignment_subset_dp, pairwise_sq_dists, w2_exact

INTERPRETING = os.environ.get("TRITON_INTERPRET", "0") not in ("", "0")
DEVICE = "cpu" if INTERPRETING else "cuda"
kernel = pytest.mark.skipif(not (INTERPRETING or torch.cuda.is_available()) or not triton_available(),
                            reason="needs CUDA, or TRITON_INTERPRET=1 (test_under_the_interpreter sets it)")


def test_under_the_interpreter():
    if INTERPRETING or not triton_available():
        pytest.skip("already interpreting" if INTERPRETING else "triton does not import")
    env = {**os.environ, "TRITON_INTERPRET": "1", "OMP_NUM_THREADS": "1"}
    proc = subprocess.run([sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", __file__],
                          cwd=Path(__file__).resolve().parents[1], env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout[-4000:] + proc.stderr[-2000:]
    summary = proc.stdout.strip().splitlines()[-1]
    assert re.search(r"\b1 skipped", summary) and int(re.search(r"(\d+) passed", summary)[1]) >= 9, summary


def dp_perm(pred, target, valid=None):
    return assignment_subset_dp(_masked_cost(pairwise_sq_dists(pred, target), valid))


def matched_cost64(pred, target, valid, perm):
    """Total cost of the matching ``perm`` in float64 (invalid points left out)."""
    cost = _masked_cost(pairwise_sq_dists(pred.double(), target.double()), valid)
    return cost.gather(2, perm.unsqueeze(-1)).squeeze(-1).sum(-1)


def scipy_optimum64(pred, target, valid):
    cost = _masked_cost(pairwise_sq_dists(pred.double(), target.double()), valid).numpy()
    return torch.tensor([c[linear_sum_assignment(c)].sum() for c in cost], dtype=torch.float64)


def sets(seed, n, k, d, kind="normal"):
    g = torch.Generator().manual_seed(seed)
    if kind == "integer":  # many exact ties
        return tuple(torch.randint(0, 3, (n, k, d), generator=g).float() for _ in range(2))
    return torch.randn(n, k, d, generator=g), torch.randn(n, k, d, generator=g)


@kernel
@pytest.mark.parametrize("k,d", [(2, 3), (3, 1), (5, 4), (8, 3)])
def test_fused_equals_dp_bit_for_bit_and_scipy_optimum(k, d):
    pred, target = sets(k * 10 + d, 48, k, d)
    ipred, itarget = sets(k * 10 + d + 1, 48, k, d, "integer")
    valid = torch.rand(96, k, generator=torch.Generator().manual_seed(k)) > 0.3
    valid[:4] = True
    valid[4:8] = False  # sets with no valid point
    pred, target = torch.cat([pred, ipred]), torch.cat([target, itarget])
    target[:4] = pred[:4].flip(1)  # duplicate points (all valid): optimum 0
    for v in (None, valid):
        got = assignment_fused(pred.to(DEVICE), target.to(DEVICE), None if v is None else v.to(DEVICE)).cpu()
        assert torch.equal(got, dp_perm(pred, target, v))
        assert torch.equal(got.sort(1).values, torch.arange(k).expand(len(got), k))
        opt = scipy_optimum64(pred, target, v)
        torch.testing.assert_close(matched_cost64(pred, target, v, got), opt, rtol=1e-5, atol=1e-9)
        assert torch.equal(matched_cost64(pred[48:], target[48:], None if v is None else v[48:], got[48:]), opt[48:])
        assert (matched_cost64(pred, target, v, got)[:4] == 0).all()


@kernel
def test_fused_non_finite_points_match_the_dp():
    pred, target = sets(7, 32, 6, 3)
    pred[0, 2, 1] = float("nan")
    target[1, 0, 0] = float("nan")
    pred[2, 1] = float("inf")
    target[3, :, 2] = float("inf")
    pred[4, 3, 0], target[4, 3, 0] = float("inf"), float("inf")  # inf - inf = NaN
    target[5, 4, 1] = -float("inf")
    valid = torch.ones(32, 6, dtype=torch.bool)
    valid[6, 2] = valid[7, :3] = False
    pred[6, 2] = float("nan")  # an invalid NaN point changes nothing (a both-invalid pair costs 0)
    for v in (None, valid):
        got = assignment_fused(pred.to(DEVICE), target.to(DEVICE), None if v is None else v.to(DEVICE)).cpu()
        assert torch.equal(got, dp_perm(pred, target, v))
    got, ref = w2_exact(pred, target, valid, method="fused"), w2_exact(pred, target, valid, method="dp")
    torch.testing.assert_close(got, ref, equal_nan=True, rtol=0, atol=0)
    assert torch.isfinite(got[8:]).all() and torch.isfinite(got[6])


@kernel
def test_fused_cost_input_is_the_dp_for_any_cost():
    g = torch.Generator().manual_seed(3)
    cost = torch.cat([torch.rand(20, 7, 7, generator=g), torch.randint(0, 2, (20, 7, 7), generator=g).float()])
    cost[0, 1, 2], cost[1, 3] = float("nan"), float("inf")
    assert torch.equal(assignment_fused_cost(cost.to(DEVICE)).cpu(), assignment_subset_dp(cost))
    big = torch.rand(2, FUSED_MAX_K, FUSED_MAX_K, generator=g)
    assert torch.equal(assignment_fused_cost(big.to(DEVICE)).cpu(), assignment_subset_dp(big))


@kernel
def test_fused_w2_values_and_gradients_equal_the_dp():
    """Strided (non-contiguous) bf16 predictions against fp32 targets, as the context term passes them: same W2^2
    and the same gradients as the torch DP (the matching is discrete; the gradient flows through the matched pairs)."""
    g = torch.Generator().manual_seed(5)
    base = torch.randn(3, 16, 8, 3, generator=g).to(torch.bfloat16)
    target = torch.randn(16, 3, 8, 3, generator=g)
    valid = torch.rand(16, 3, 8, generator=g) > 0.25
    out = {}
    for method in ("dp", "fused"):
        pred = base.clone().to(DEVICE).requires_grad_()
        tgt = target.clone().to(DEVICE).requires_grad_()
        w = w2_exact(pred.transpose(0, 1), tgt, valid.to(DEVICE), method=method)
        (w * torch.arange(48, device=DEVICE).view(16, 3)).sum().backward()
        out[method] = (w.detach().cpu(), pred.grad.cpu(), tgt.grad.cpu())
    for a, b in zip(out["dp"], out["fused"]):
        assert torch.equal(a, b)


@kernel
def test_fused_rejects_what_it_cannot_do():
    with pytest.raises(ValueError, match="K <= 12"):
        assignment_fused(torch.zeros(1, 13, 2, device=DEVICE), torch.zeros(1, 13, 2, device=DEVICE))
    assert assignment_fused(torch.zeros(0, 4, 2, device=DEVICE), torch.zeros(0, 4, 2, device=DEVICE)).shape == (0, 4)


def test_dispatch_only_on_cuda_with_fp32_costs(monkeypatch):
    import core.wasserstein as w

    x = torch.zeros(4, 8, 3)
    assert not fused_supported(x, x) or INTERPRETING  # a CPU tensor needs the interpreter
    assert not fused_supported(x.double(), x) and not fused_supported(x.half(), x.half())
    assert not fused_supported(torch.zeros(4, FUSED_AUTO_MAX_K + 1, 3), torch.zeros(4, FUSED_AUTO_MAX_K + 1, 3))
    called = []
    monkeypatch.setattr(w, "assignment_fused", lambda *a: called.append(1) or w.assignment_subset_dp(
        _masked_cost(pairwise_sq_dists(a[0], a[1]), a[2])))
    w.w2_exact(torch.randn(4, 8, 3), torch.randn(4, 8, 3))  # CPU: SciPy, never the kernel
    assert called == []
    if not INTERPRETING:
        with pytest.raises(RuntimeError, match="TRITON_INTERPRET"):
            assignment_fused(x, x)
