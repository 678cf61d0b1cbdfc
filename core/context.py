"""Context decoders: predict a point's multi-stride neighborhood from its feature.

``ContextDecoder`` (the ConPreDiff decoder, NWR-GAE lineage) decodes a *distribution*: per
stride s, two linear heads give mu_s and log sigma_s of a Gaussian over a latent space,
``Q`` reparameterised samples are drawn and pushed through a small MLP phi_s to give ``Q``
predicted neighbors. Its cost does not depend on the neighborhood's ordering, and its loss
(a Wasserstein distance between sets) is permutation invariant.

``ExplicitNeighborDecoder`` is the naive alternative the paper argues against: one regression
head per neighbor position, trained with an order-sensitive L2 loss.

All strides run in one batched matmul per layer (weights ``(S, in, out)``), so adding strides
adds no Python-level work.
"""

from __future__ import annotations

import math

import torch
from torch import nn


def weight_grad_split(x: torch.Tensor, grad: torch.Tensor, chunks: int) -> torch.Tensor:
    """``x (S, M, a)``, ``grad (S, M, b)`` -> ``x^T grad (S, a, b)``, the weight gradient of ``x @ W``, as ``chunks``
    partial products over blocks of rows (``M`` padded with zero rows to a multiple), summed in fp32 (or wider).

    A split-K by hand: the autograd product reduces all ``M`` rows (1.57 M at the LDM-4 config) into a tiny
    ``a x b`` output, few blocks for a GPU; ``S * chunks`` products give it more. Same value up to summation order
    (tests/test_context_decoder.py); returned in ``x``'s dtype (autograd casts it to the parameter's).
    """
    s, m, a = x.shape
    b = grad.shape[-1]
    pad = (-m) % chunks
    if pad:
        x = torch.cat([x, x.new_zeros(s, pad, a)], 1)
        grad = torch.cat([grad, grad.new_zeros(s, pad, b)], 1)
    rows = (m + pad) // chunks
    part = torch.bmm(x.reshape(s * chunks, rows, a).transpose(1, 2), grad.reshape(s * chunks, rows, b))
    return part.view(s, chunks, a, b).sum(1, dtype=torch.promote_types(part.dtype, torch.float32)).to(part.dtype)


class _StrideLinearSplitGrad(torch.autograd.Function):
    """``baddbmm(bias, x, weight)`` whose weight gradient is :func:`weight_grad_split`; autocast as in the forward."""

    @staticmethod
    @torch.amp.custom_fwd(device_type="cuda")
    def forward(ctx, x, weight, bias, chunks):
        ctx.save_for_backward(x, weight)
        ctx.chunks = chunks
        return torch.baddbmm(bias.unsqueeze(1), x, weight)

    @staticmethod
    @torch.amp.custom_bwd(device_type="cuda")
    def backward(ctx, grad):
        x, weight = ctx.saved_tensors
        gx = torch.bmm(grad, weight.transpose(1, 2).to(grad.dtype)) if ctx.needs_input_grad[0] else None
        gw = weight_grad_split(x.to(grad.dtype), grad, ctx.chunks) if ctx.needs_input_grad[1] else None
        gb = grad.sum(1) if ctx.needs_input_grad[2] else None
        return gx, gw, gb, None


class StrideLinear(nn.Module):
    """S independent linear maps in one batched product: ``(S, M, in) -> (S, M, out)``.

    ``weight_grad_chunks`` (class attribute, 0: off) > 0 computes the weight gradient as that many partial products
    (:func:`weight_grad_split`) instead of autograd's one; an opt-in for GPUs, timed by benchmarks/decoder_bmm.py and
    benchmarks/gpu_session.sh, never on by default (it changes the gradient's summation order).
    """

    weight_grad_chunks: int = 0

    def __init__(self, num_strides: int, in_features: int, out_features: int):
        super().__init__()
        self.weight = nn.Parameter(torch.empty(num_strides, in_features, out_features))
        self.bias = nn.Parameter(torch.zeros(num_strides, out_features))
        nn.init.uniform_(self.weight, -1 / math.sqrt(in_features), 1 / math.sqrt(in_features))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.weight_grad_chunks > 0 and torch.is_grad_enabled():
            return _StrideLinearSplitGrad.apply(x, self.weight, self.bias, self.weight_grad_chunks)
        return torch.baddbmm(self.bias.unsqueeze(1), x, self.weight)


class ContextDecoder(nn.Module):
    """Distribution decoder: point features ``(N, F)`` -> predicted neighbor sets ``(N, S, Q, D)``.

    Args:
        in_channels: F, the channels of the tapped feature map.
        out_channels: D, the dimension of a neighbor (pixel/latent channels or token embedding).
        num_strides: S.
        num_samples: Q, predicted neighbors per stride (the neighborhood size K for exact W2).
        latent_dim: dimension of the Gaussian (mu, log sigma heads).
        hidden_dim, depth: width and number of hidden layers of each stride's MLP phi_s.
    """

    def __init__(
        self,
        in_channels: int,
        out_channels: int,
        num_strides: int,
        num_samples: int = 8,
        latent_dim: int = 32,
        hidden_dim: int = 64,
        depth: int = 2,
    ):
        super().__init__()
        self.num_strides, self.num_samples, self.latent_dim = num_strides, num_samples, latent_dim
        self.heads = nn.Linear(in_channels, num_strides * 2 * latent_dim)
        dims = [latent_dim] + [hidden_dim] * depth + [out_channels]
        self.layers = nn.ModuleList(StrideLinear(num_strides, a, b) for a, b in zip(dims[:-1], dims[1:]))

    def forward(self, features: torch.Tensor, eps: torch.Tensor | None = None) -> torch.Tensor:
        """``features (N, F)`` [, ``eps (S, N, Q, latent)`` the Gaussian draws] -> ``(N, S, Q, D)``.

        Computed stride-major, ``(S, N*Q, .)``, so each layer is one contiguous batched matmul.
        """
        n, s, q, l = features.shape[0], self.num_strides, self.num_samples, self.latent_dim
        mu, log_sigma = self.heads(features).view(n, s, 2, l).permute(2, 1, 0, 3).contiguous().unsqueeze(3)  # (S,N,1,L)
        if eps is None:
            eps = features.new_empty(s, n, q, l).normal_()
        h = (mu + log_sigma.clamp(-10, 5).exp() * eps).view(s, n * q, l)
        for i, layer in enumerate(self.layers):
            h = layer(h)
            if i < len(self.layers) - 1:
                h = torch.nn.functional.silu(h)
        return h.view(s, n, q, -1).transpose(0, 1)


class ExplicitNeighborDecoder(nn.Module):
    """One regression head per neighbor position: ``(N, F) -> (N, S, K, D)``; cost grows with S*K."""

    def __init__(self, in_channels: int, out_channels: int, num_strides: int, num_neighbors: int = 8, hidden_dim: int = 64):
        super().__init__()
        self.shape = (num_strides, num_neighbors, out_channels)
        self.net = nn.Sequential(
            nn.Linear(in_channels, hidden_dim), nn.SiLU(), nn.Linear(hidden_dim, num_strides * num_neighbors * out_channels)
        )

    def forward(self, features: torch.Tensor) -> torch.Tensor:
        return self.net(features).view(features.shape[0], *self.shape)
