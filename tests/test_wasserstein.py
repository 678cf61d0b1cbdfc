import numpy as np
import ot
import pytest
import torch
from scipy.optimize import linear_sum_assignment

from core.wasserstein import EXACT_DP_MAX_K, assignment_jv, w2_exact, w2_sets


def reference(pred, target, valid):
    out = []
    for p, t, v in zip(pred.numpy(), target.numpy(), valid.numpy()):
        p, t = p[v], t[v]
        if len(p) == 0:
            out.append(0.0)
            continue
        cost = ((p[:, None] - t[None]) ** 2).sum(-1)
        r, c = linear_sum_assignment(cost)
        lsa = cost[r, c].mean()
        emd = ot.emd2(np.full(len(p), 1 / len(p)), np.full(len(t), 1 / len(t)), cost)
        assert abs(lsa - emd) <= 1e-9 * max(1.0, lsa)
        out.append(lsa)
    return torch.tensor(out, dtype=torch.float64)


@pytest.mark.parametrize("k", range(1, 11))
@pytest.mark.parametrize("d", [1, 3, 64])
@pytest.mark.parametrize("masked", [False, True])
def test_exact_equals_scipy_and_pot(k, d, masked):
    g = torch.Generator().manual_seed(k * 100 + d)
    pred = torch.randn(40, k, d, generator=g, dtype=torch.float64)
    target = torch.randn(40, k, d, generator=g, dtype=torch.float64)
    valid = torch.rand(40, k, generator=g) > 0.3 if masked else torch.ones(40, k, dtype=torch.bool)
    ref = reference(pred, target, valid)
    for method in ("dp", "jv", "hungarian", "auto"):
        got = w2_exact(pred, target, valid if masked else None, method=method)
        torch.testing.assert_close(got, ref, rtol=1e-5, atol=1e-12)


def test_exact_float32_and_batch_shape():
    pred, target = torch.randn(3, 5, 8, 4), torch.randn(3, 5, 8, 4)
    got = w2_exact(pred, target, method="dp")
    assert got.shape == (3, 5)
    ref = reference(pred.reshape(-1, 8, 4).double(), target.reshape(-1, 8, 4).double(), torch.ones(15, 8, dtype=torch.bool))
    torch.testing.assert_close(got.reshape(-1).double(), ref, rtol=1e-5, atol=1e-6)


def test_exact_large_k_uses_hungarian():
    k = EXACT_DP_MAX_K + 4
    pred, target = torch.randn(6, k, 3, dtype=torch.float64), torch.randn(6, k, 3, dtype=torch.float64)
    valid = torch.rand(6, k) > 0.2
    torch.testing.assert_close(w2_sets(pred, target, valid), reference(pred, target, valid), rtol=1e-5, atol=1e-12)
    with pytest.raises(ValueError, match="K <= "):
        w2_exact(pred, target, valid, method="dp")


def test_permutation_invariance():
    pred, target = torch.randn(10, 8, 3), torch.randn(10, 8, 3)
    perm = torch.randperm(8)
    torch.testing.assert_close(w2_sets(pred, target), w2_sets(pred[:, perm], target))
    torch.testing.assert_close(w2_sets(pred, target), w2_sets(pred, target[:, torch.randperm(8)]))
    assert torch.allclose(w2_sets(target[:, perm], target), torch.zeros(10), atol=1e-6)


def test_gradcheck_exact():
    torch.manual_seed(0)
    pred = torch.randn(4, 5, 2, dtype=torch.float64, requires_grad=True)
    target = torch.randn(4, 5, 2, dtype=torch.float64, requires_grad=True)
    valid = torch.tensor([[1, 1, 1, 0, 1]] * 4, dtype=torch.bool)
    for method in ("dp", "jv", "hungarian"):
        assert torch.autograd.gradcheck(lambda p, t: w2_exact(p, t, valid, method), (pred, target))


def test_sinkhorn_approaches_exact_and_sliced_exact_in_1d():
    pred, target = torch.randn(200, 8, 3, dtype=torch.float64), torch.randn(200, 8, 3, dtype=torch.float64)
    exact = w2_sets(pred, target)
    sk = w2_sets(pred, target, solver="sinkhorn", sinkhorn_reg=0.005, sinkhorn_iters=500)
    assert ((sk - exact).abs() / exact).mean() < 0.02
    valid = torch.rand(200, 8) > 0.3
    p1, t1 = pred[..., :1], target[..., :1]
    torch.testing.assert_close(w2_sets(p1, t1, valid, solver="sliced"), w2_sets(p1, t1, valid), rtol=1e-9, atol=1e-12)
    sk_masked = w2_sets(pred, target, valid, solver="sinkhorn", sinkhorn_reg=0.005, sinkhorn_iters=500)
    assert ((sk_masked - w2_sets(pred, target, valid)).abs()).mean() < 0.05


def test_sinkhorn_gradient_approaches_exact_gradient():
    """The plan is held fixed in the backward pass, so at small reg the gradient is the optimal matching's."""
    torch.manual_seed(0)
    pred = torch.randn(50, 6, 3, dtype=torch.float64, requires_grad=True)
    target = torch.randn(50, 6, 3, dtype=torch.float64)
    valid = torch.rand(50, 6) > 0.2
    (g_exact,) = torch.autograd.grad(w2_sets(pred, target, valid).sum(), pred)
    sk = w2_sets(pred, target, valid, solver="sinkhorn", sinkhorn_reg=0.0005, sinkhorn_iters=5000)
    (g_sk,) = torch.autograd.grad(sk.sum(), pred)
    assert (g_sk - g_exact).abs().max() < 0.05 * g_exact.abs().max()
    assert g_sk[~valid].abs().max() == 0


def test_bad_solver():
    with pytest.raises(ValueError, match="allowed"):
        w2_sets(torch.randn(2, 8, 1), torch.randn(2, 8, 1), solver="hungarian")


@pytest.mark.parametrize("solver", ["exact", "sinkhorn", "sliced"])
@pytest.mark.parametrize("d", [1, 3])
def test_masked_gradients_are_finite(solver, d):
    pred = torch.randn(64, 8, d, requires_grad=True)
    valid = torch.rand(64, 8) > 0.5
    valid[0] = False  # a set with no valid point
    w = w2_sets(pred, torch.randn(64, 8, d), valid, solver=solver)
    w.sum().backward()
    assert torch.isfinite(w).all() and torch.isfinite(pred.grad).all()
    assert w[0] == 0 and (pred.grad[0] == 0).all()


def _point_sets(kind, n, k, d, g, dtype):
    """Random sets; ``ties``: integer points on a small grid (many equal costs); ``duplicates``: repeated points."""
    if kind == "ties":
        return (torch.randint(0, 3, (n, k, d), generator=g).to(dtype) for _ in range(2))
    pred, target = torch.randn(n, k, d, generator=g, dtype=dtype), torch.randn(n, k, d, generator=g, dtype=dtype)
    if kind == "duplicates":
        pred = pred[:, torch.randint(0, max(1, k // 3), (k,), generator=g)]
        target = torch.cat([pred[: n // 2, torch.randperm(k, generator=g)], target[n // 2 :]])
    return pred, target


@pytest.mark.parametrize("k", [1, 2, 8, 13, 24, 32, 48])
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
def test_jv_equals_scipy(k, dtype):
    """The batched shortest augmenting path solver is optimal to 1e-5 of SciPy's optimum, ties and masks included."""
    g = torch.Generator().manual_seed(k)
    n = 16
    for d in (1, 3, 4):
        # One batch of random sets, sets with ties and sets with duplicate points.
        pred, target = (torch.cat(x) for x in zip(*(_point_sets(kind, n, k, d, g, dtype)
                                                     for kind in ("random", "ties", "duplicates"))))
        valid = torch.rand(3 * n, k, generator=g) > 0.3
        valid[0], valid[1] = False, True  # a set with no valid point, one with all valid
        for v in (None, valid):
            ref = reference(pred.double(), target.double(), torch.ones(3 * n, k, dtype=torch.bool) if v is None else v)
            got = w2_sets(pred, target, v, exact_method="jv")
            torch.testing.assert_close(got.double(), ref, rtol=1e-5, atol=1e-6 if dtype == torch.float32 else 1e-12)


def test_jv_returns_permutations_and_solves_integer_costs_exactly():
    g = torch.Generator().manual_seed(0)
    cost = torch.randint(0, 4, (200, 13, 13), generator=g).double()
    cost[:50] = cost[:50, :, :1]  # constant columns: every assignment is optimal
    perm = assignment_jv(cost)
    assert (perm.sort(1).values == torch.arange(13)).all()
    got = cost.gather(2, perm.unsqueeze(-1)).sum((1, 2))
    ref = torch.tensor([c[linear_sum_assignment(c)].sum() for c in cost.numpy()], dtype=torch.float64)
    assert torch.equal(got, ref)


def test_jv_non_finite_sets_do_not_affect_others():
    g = torch.Generator().manual_seed(1)
    pred, target = torch.randn(8, 24, 3, generator=g), torch.randn(8, 24, 3, generator=g)
    pred[2, 5, 0] = float("nan")
    pred[5, 1, 1] = float("inf")
    got = w2_sets(pred, target, exact_method="jv")
    assert got[2].isnan() and not got[5].isfinite()
    ok = torch.tensor([0, 1, 3, 4, 6, 7])
    torch.testing.assert_close(got[ok], w2_sets(pred[ok], target[ok], exact_method="hungarian"))


def test_jv_gradient_equals_hungarian_at_k24():
    """The plan is held fixed in backward, so both exact solvers give the same gradient (unique optimum)."""
    g = torch.Generator().manual_seed(2)
    pred = torch.randn(16, 24, 3, generator=g, dtype=torch.float64, requires_grad=True)
    target = torch.randn(16, 24, 3, generator=g, dtype=torch.float64, requires_grad=True)
    valid = torch.rand(16, 24, generator=g) > 0.25
    grads = {}
    for method in ("jv", "hungarian"):
        w = w2_sets(pred, target, valid, exact_method=method)
        grads[method] = torch.autograd.grad(w.sum(), (pred, target))
    for a, b in zip(grads["jv"], grads["hungarian"]):
        torch.testing.assert_close(a, b)


def test_auto_exact_method_by_device_and_k():
    from core.wasserstein import exact_method_for

    assert exact_method_for(k=8, cuda=True) == "dp" and exact_method_for(k=EXACT_DP_MAX_K + 1, cuda=True) == "jv"
    assert exact_method_for(k=48, cuda=False) == "hungarian" and exact_method_for(k=8, cuda=False) == "hungarian"
