"""Discrete diffusion with context prediction: VQ-Diffusion's mask-and-replace process on a token grid.

Tokens take values ``0..K-1``; ``K`` is the [MASK] token. One forward step keeps a token with
probability alpha_t, replaces it by a uniformly drawn token with K*beta_t, masks it with gamma_t;
a masked token stays masked. Cumulative probabilities (bars) follow VQ-Diffusion's linear schedule
(abar from 0.99999 to 0.000009, gammabar from 0.000009 to 0.99999). Index ``t = 0..T-1`` is the
state after ``t + 1`` steps; ``x_{-1} = x_0``.

Loss: L_vlb (KL between the true posterior q(x_{t-1}|x_t,x_0) and p_theta(x_{t-1}|x_t) =
sum_x0 q(x_{t-1}|x_t,x0) p_theta(x0|x_t), or -log p_theta(x_0|x_1) at t = 0) plus an auxiliary
x0 cross-entropy, both per token. ConPreDiff's context term adds W2 between the decoder's
predicted neighbor sets and the codebook embeddings of the true tokens at neighbor positions.
Tokens come from quantised pixels (mini scale, :class:`PixelQuantizer`) or a VQ model.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import nn

from .objective import ContextPrediction, FeatureTap, last_block

EPS = 1e-30


class MaskReplaceDiffusion:
    """Transition schedule, forward sampling, posteriors and losses of mask-and-replace diffusion."""

    def __init__(
        self, num_classes: int, num_timesteps: int = 100, abar_1: float = 0.99999, abar_T: float = 0.000009,
        gbar_1: float = 0.000009, gbar_T: float = 0.99999, aux_weight: float = 5e-4,
    ):
        self.k, self.t_max, self.aux_weight = num_classes, num_timesteps, aux_weight
        lin = torch.linspace(0, 1, num_timesteps, dtype=torch.float64)
        abar = abar_1 + lin * (abar_T - abar_1)
        gbar = gbar_1 + lin * (gbar_T - gbar_1)
        one, zero = torch.ones(1, dtype=torch.float64), torch.zeros(1, dtype=torch.float64)
        # Cumulative tables indexed by t + 1, so that t = -1 (x_0 itself) is the identity.
        self.abar = torch.cat([one, abar])
        self.gbar = torch.cat([zero, gbar])
        self.bbar = (1 - self.abar - self.gbar) / num_classes
        self.alpha = abar / self.abar[:-1]
        self.gamma = 1 - (1 - gbar) / (1 - self.gbar[:-1])
        self.beta = (1 - self.alpha - self.gamma) / num_classes

    @staticmethod
    def _at(table: torch.Tensor, index: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
        """``table[index]`` shaped ``(B, 1, 1, ...)`` to broadcast against ``like (B, C, ...)``."""
        return table.to(like.device)[index.long().to(like.device)].to(like.dtype).view(-1, *([1] * (like.dim() - 1)))

    def q_given_x0(self, x0_probs: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        """q(x_t | x_0) for x_0 distributions ``(B, K, ...)`` -> ``(B, K+1, ...)``; ``t = -1`` gives x_0.

        Linear in its input, so unnormalised weights work too.
        """
        total = x0_probs.sum(1, keepdim=True)
        abar, bbar, gbar = (self._at(v, t + 1, x0_probs) for v in (self.abar, self.bbar, self.gbar))
        return torch.cat([abar * x0_probs + bbar * total, gbar * total], 1)

    def step_column(self, x_t: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        """``Q_t(j -> x_t)`` for every previous state j: tokens ``(B, ...)`` -> ``(B, K+1, ...)``."""
        onehot = F.one_hot(x_t, self.k + 1).movedim(-1, 1).double()
        a, b, g = (self._at(v, t, onehot) for v in (self.alpha, self.beta, self.gamma))
        is_mask = onehot[:, self.k :]
        # x_t a token i: from token j with beta + alpha [j == i], never from [MASK];
        # x_t = [MASK]: from any token with gamma, from [MASK] with 1.
        from_token = torch.where(is_mask.bool(), g, a * onehot[:, : self.k] + b)
        return torch.cat([from_token, is_mask], 1)

    def q_sample(self, x0: torch.Tensor, t: torch.Tensor, generators: Sequence[torch.Generator] | None = None) -> torch.Tensor:
        """Draw x_t ~ q(x_t | x_0) for tokens ``x0 (B, H, W)``; image b from ``generators[b]``."""
        probs = self.q_given_x0(F.one_hot(x0, self.k).movedim(-1, 1).double(), t)  # (B, K+1, H, W)
        return self._draw(probs, generators)

    @staticmethod
    def _draw(probs: torch.Tensor, generators: Sequence[torch.Generator] | None) -> torch.Tensor:
        """One categorical draw per position of ``probs (B, C, H, W)`` -> ``(B, H, W)``."""
        b, c = probs.shape[:2]
        flat = probs.movedim(1, -1).reshape(b, -1, c).float().cpu()
        if generators is None:
            out = torch.multinomial(flat.reshape(-1, c), 1)
        else:
            out = torch.stack([torch.multinomial(f, 1, generator=g).squeeze(-1) for f, g in zip(flat, generators)])
        return out.view(b, *probs.shape[2:]).to(probs.device)

    def posterior(self, x_t: torch.Tensor, x0_probs: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        """q(x_{t-1} | x_t, x_0) averaged over ``x0_probs (B, K, ...)``: ``(B, K+1, ...)``, sums to 1.

        At ``t = 0`` it is the x_0 distribution itself (mask probability 0).
        """
        x0_probs = x0_probs.double()
        # p~(x0) = p(x0) / q(x_t | x0): the posterior then is Q_t(. -> x_t) * q_{t-1}(. | p~), normalised.
        onehot_t = F.one_hot(x_t, self.k + 1).movedim(-1, 1).double()
        ab, bb, gb = (self._at(v, t + 1, x0_probs) for v in (self.abar, self.bbar, self.gbar))
        lik = torch.where((x_t == self.k).unsqueeze(1), gb.expand_as(x0_probs), ab * onehot_t[:, : self.k] + bb)
        prior = self.q_given_x0(x0_probs / lik.clamp(min=EPS), t - 1)
        post = self.step_column(x_t, t) * prior
        post = post / post.sum(1, keepdim=True).clamp(min=EPS)
        at_zero = (t == 0).view(-1, *[1] * (x0_probs.dim() - 1))
        x0_padded = torch.cat([x0_probs, torch.zeros_like(x0_probs[:, :1])], 1)
        return torch.where(at_zero, x0_padded, post)

    def loss(self, logits: torch.Tensor, x0: torch.Tensor, x_t: torch.Tensor, t: torch.Tensor) -> dict[str, torch.Tensor]:
        """L_vlb + aux_weight * CE(x0) per token. ``logits (B, K, H, W)`` predict x_0."""
        log_p0 = F.log_softmax(logits.double(), 1)
        p0 = log_p0.exp()
        x0_onehot = F.one_hot(x0, self.k).movedim(-1, 1).double()
        q = self.posterior(x_t, x0_onehot, t)
        p = self.posterior(x_t, p0, t)
        kl = (q * (q.clamp(min=EPS).log() - p.clamp(min=EPS).log())).sum(1)  # (B, H, W)
        nll = -(x0_onehot * log_p0).sum(1)
        vlb = torch.where((t == 0).view(-1, 1, 1), nll, kl).mean()
        aux = nll.mean()
        return {"vlb_loss": vlb.float(), "aux_loss": aux.float(), "point_loss": (vlb + self.aux_weight * aux).float()}

    @torch.no_grad()
    def sample(self, denoiser: nn.Module, shape: tuple[int, int, int], generators: Sequence[torch.Generator], device="cpu"):
        """Ancestral sampling from all-[MASK] tokens ``(B, H, W)``; one generator per image."""
        x = torch.full(shape, self.k, dtype=torch.long, device=device)
        for step in range(self.t_max - 1, -1, -1):
            t = torch.full((shape[0],), step, dtype=torch.long, device=device)
            x = self._draw(self.posterior(x, F.softmax(denoiser(x, t).double(), 1), t), generators)
        return x


class TokenDenoiser(nn.Module):
    """Token grid ``(B, H, W)`` + timestep -> x_0 logits ``(B, K, H, W)`` through a stock diffusers UNet.

    Tokens (K classes + [MASK]) are embedded to ``embed_dim`` channels; the UNet's last up-block
    output is the per-token hidden state read by the context decoder.
    """

    def __init__(self, unet: nn.Module, num_classes: int):
        super().__init__()
        self.unet = unet
        self.embed = nn.Embedding(num_classes + 1, unet.config.in_channels)

    def forward(self, tokens: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        return self.unet(self.embed(tokens).permute(0, 3, 1, 2), t).sample


class DiscreteTrainingModule(nn.Module):
    """Denoiser + (optional) context prediction on codebook embeddings of the true tokens."""

    def __init__(
        self, denoiser: TokenDenoiser, diffusion: MaskReplaceDiffusion, codebook: torch.Tensor,
        context: ContextPrediction | None = None,
    ):
        super().__init__()
        self.denoiser, self.diffusion, self.context = denoiser, diffusion, context
        self.register_buffer("codebook", codebook.float())  # (K, D), fixed
        self.tap = FeatureTap(last_block(denoiser.unet)) if context is not None else None

    def forward(
        self, x0: torch.Tensor, timesteps: torch.Tensor, generators: Sequence[torch.Generator] | None = None
    ) -> dict[str, torch.Tensor]:
        x_t = self.diffusion.q_sample(x0, timesteps.cpu(), generators)
        logits = self.denoiser(x_t, timesteps)
        losses = self.diffusion.loss(logits, x0, x_t, timesteps)
        loss = losses["point_loss"]
        if self.context is not None:
            target_map = self.codebook[x0].permute(0, 3, 1, 2)  # (B, D, H, W)
            weighted, logged = self.context.terms(self.tap.pop(), target_map, generators)
            loss = loss + weighted
            losses.update(logged)
        losses["loss"] = loss
        return losses


class PixelQuantizer:
    """Quantise pixels in [-1, 1] to ``levels`` tokens per channel (mini-scale "VQ"); codebook = level centers."""

    def __init__(self, levels: int = 8):
        self.levels = levels
        self.codebook = torch.linspace(-1, 1, levels).view(levels, 1)

    def encode(self, x: torch.Tensor) -> torch.Tensor:
        """``(B, 1, H, W)`` -> tokens ``(B, H, W)``."""
        return ((x[:, 0] + 1) / 2 * (self.levels - 1)).round().long().clamp(0, self.levels - 1)

    def decode(self, tokens: torch.Tensor) -> torch.Tensor:
        return self.codebook.to(tokens.device)[tokens].permute(0, 3, 1, 2)
