"""The context decoder's opt-in split weight gradient (core/context.py) against autograd."""

import pytest
import torch

from core.context import ContextDecoder, StrideLinear, weight_grad_split


@pytest.mark.parametrize("m,chunks", [(4096, 8), (1000, 7), (5, 8)])
def test_weight_grad_split_equals_the_product(m, chunks):
    g = torch.Generator().manual_seed(m)
    x = torch.randn(3, m, 16, generator=g, dtype=torch.float64)
    grad = torch.randn(3, m, 5, generator=g, dtype=torch.float64)
    got = weight_grad_split(x, grad, chunks)
    assert got.dtype == torch.float64 and got.shape == (3, 16, 5)
    torch.testing.assert_close(got, x.transpose(1, 2) @ grad, rtol=1e-6, atol=1e-6)


def decoder_grads(chunks: int, monkeypatch) -> list[torch.Tensor]:
    monkeypatch.setattr(StrideLinear, "weight_grad_chunks", chunks)
    torch.manual_seed(0)
    decoder = ContextDecoder(12, 3, num_strides=2, num_samples=4, latent_dim=8, hidden_dim=16, depth=2).double()
    feats = torch.randn(50, 12, dtype=torch.float64, requires_grad=True)
    eps = torch.randn(2, 50, 4, 8, dtype=torch.float64)
    out = decoder(feats, eps)
    (out * torch.linspace(-1, 1, out.numel(), dtype=torch.float64).view_as(out)).sum().backward()
    return [out.detach(), feats.grad] + [p.grad for p in decoder.parameters()]


def test_split_weight_gradient_matches_autograd(monkeypatch):
    ref = decoder_grads(0, monkeypatch)
    got = decoder_grads(8, monkeypatch)
    assert torch.equal(got[0], ref[0])  # the forward is the same product
    for a, b in zip(got[1:], ref[1:]):
        torch.testing.assert_close(a, b, rtol=1e-10, atol=1e-12)
    assert not all(torch.equal(a, b) for a, b in zip(got[2:], ref[2:]))  # the split path did run


def test_split_is_off_by_default():
    assert StrideLinear.weight_grad_chunks == 0
