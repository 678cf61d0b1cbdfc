import pytest
import torch

from core.neighborhood import gather_neighbors, neighbor_offsets


def naive(x, strides, pattern):
    b, c, h, w = x.shape
    offsets, real = neighbor_offsets(strides, pattern)
    s, k = real.shape
    vals = torch.zeros(b, h, w, s, k, c)
    valid = torch.zeros(1, h, w, s, k, dtype=torch.bool)
    for i in range(h):
        for j in range(w):
            for si in range(s):
                for ki in range(k):
                    dy, dx = offsets[si, ki].tolist()
                    y, xx = i + dy, j + dx
                    if real[si, ki] and 0 <= y < h and 0 <= xx < w:
                        vals[:, i, j, si, ki] = x[:, :, y, xx]
                        valid[0, i, j, si, ki] = True
    return vals, valid


@pytest.mark.parametrize("pattern", ["dilated", "ring"])
@pytest.mark.parametrize("strides", [(1,), (1, 2, 3), (2, 4)])
def test_matches_naive_loop_with_borders(pattern, strides):
    x = torch.randn(2, 3, 7, 9)
    vals, valid = gather_neighbors(x, strides, pattern)
    ref_vals, ref_valid = naive(x, strides, pattern)
    assert torch.equal(valid, ref_valid)
    assert torch.equal(vals * valid[..., None], ref_vals)


def test_sizes():
    vals, valid = gather_neighbors(torch.randn(1, 1, 8, 8), (1, 2, 3), "ring")
    assert vals.shape == (1, 8, 8, 3, 24, 1)
    assert valid[0, 4, 4].sum(-1).tolist() == [8, 16, 24]
    # An interior point of a dilated pattern sees all 8 neighbors; a corner sees 3 per stride.
    _, valid = gather_neighbors(torch.randn(1, 1, 16, 16), (1, 2, 3))
    assert valid[0, 8, 8].all() and valid[0, 0, 0].sum(-1).tolist() == [3, 3, 3]


def test_bad_arguments():
    with pytest.raises(ValueError, match="pattern"):
        gather_neighbors(torch.randn(1, 1, 4, 4), (1,), "square")
    with pytest.raises(ValueError, match="stride"):
        gather_neighbors(torch.randn(1, 1, 4, 4), (0,))


def test_the_gather_plan_is_built_and_copied_once_per_device():
    """Issue 30: the plan was copied to the device every step (the step's only host-device syncs on a GPU)."""
    import torch

    from core.neighborhood import device_plan, gather_neighbors

    device_plan.cache_clear()
    x = torch.randn(2, 3, 9, 7)
    first = gather_neighbors(x, (1, 2))
    second = gather_neighbors(x * 2, (1, 2))
    assert device_plan.cache_info().misses == 1 and device_plan.cache_info().hits == 1
    assert first[1] is second[1]  # the same validity tensor, not a fresh copy
    torch.testing.assert_close(second[0], first[0] * 2)
    if torch.cuda.is_available():  # no synchronising call in a step once the plan is on the device
        y = x.cuda()
        gather_neighbors(y, (1, 2))
        torch.cuda.set_sync_debug_mode("error")
        try:
            gather_neighbors(y, (1, 2))
        finally:
            torch.cuda.set_sync_debug_mode("default")
