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


class StrideLinear(nn.Module):
    """S independent linear maps in one batched product: ``(S, M, in) -> (S, M, out)``."""

    def __init__(self, num_strides: int, in_features: int, out_features: int):
        super().__init__()
        self.weight = nn.Parameter(torch.empty(num_strides, in_features, out_features))
        self.bias = nn.Parameter(torch.zeros(num_strides, out_features))
        nn.init.uniform_(self.weight, -1 / math.sqrt(in_features), 1 / math.sqrt(in_features))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
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
