"""Discrete diffusion with context prediction: VQ-Diffusion's mask-and-replace process on a token grid.

Tokens take values ``0..K-1``; ``K`` is the [MASK] token. One forward step keeps a token with
probability alpha_t, replaces it by a uniformly drawn token with K*beta_t, masks it with gamma_t;
a masked token stays masked. Cumulative probabilities (bars) follow VQ-Diffusion's linear schedule
(abar from 0.99999 to 0.000009, gammabar from 0.000009 to 0.99999). Index ``t = 0..T-1`` is the
state after ``t + 1`` steps; ``x_{-1} = x_0``.

Loss: L_vlb (KL between the true posterior q(x_{t-1}|x_t,x_0) and p_theta(x_{t-1}|x_t) =
sum_x0 q(x_{t-1}|x_t,x0) p_theta(x0|x_t), or -log p_theta(x_0|x_1) at t = 0) plus an auxiliary
x0 cross-entropy, both per token. Two weightings (``diffusion.discrete_loss``): ``token_mean`` averages
both over tokens with t uniform; ``vq_diffusion`` is VQ-Diffusion's ``_train_loss``
(microsoft/VQ-Diffusion, ``image_synthesis/modeling/transformers/diffusion_transformer.py``): each
image's L_t divided by p(t), t importance-sampled with p(t) ∝ sqrt(E[L_t^2]) + 1e-4 (an EMA with
decay 0.9 of L_t^2 per t, p(0) := p(1)) once every t has been drawn more than 10 times and uniform
before, and the aux term weighted (2 - t/T) / p(t). Under uniform t that is T times ``token_mean``.
ConPreDiff's context term adds W2 between the decoder's
predicted neighbor sets and the codebook embeddings of the true tokens at neighbor positions.
Tokens come from quantised pixels (mini scale, :class:`PixelQuantizer`) or a VQ model.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import nn

from .objective import ContextPrediction, FeatureTap, last_block, uniform_timesteps
from .sample import check_finite

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

    def loss_terms(self, logits: torch.Tensor, x0: torch.Tensor, x_t: torch.Tensor, t: torch.Tensor):
        """Per image, averaged over its tokens: L_t (the KL, or -log p(x_0|x_1) at t = 0) and the x0 cross-entropy.

        ``logits (B, K, H, W)`` predict x_0; returns two float64 tensors ``(B,)``.
        """
        log_p0 = F.log_softmax(logits.double(), 1)
        p0 = log_p0.exp()
        x0_onehot = F.one_hot(x0, self.k).movedim(-1, 1).double()
        q = self.posterior(x_t, x0_onehot, t)
        p = self.posterior(x_t, p0, t)
        kl = (q * (q.clamp(min=EPS).log() - p.clamp(min=EPS).log())).sum(1)  # (B, H, W)
        nll = -(x0_onehot * log_p0).sum(1)
        return torch.where((t == 0).view(-1, 1, 1), nll, kl).flatten(1).mean(1), nll.flatten(1).mean(1)

    def loss(self, logits: torch.Tensor, x0: torch.Tensor, x_t: torch.Tensor, t: torch.Tensor,
             pt: torch.Tensor | None = None) -> dict[str, torch.Tensor]:
        """L_vlb + aux_weight * CE(x0) per token; with ``pt (B,)``, the probability each image's t was drawn with,
        VQ-Diffusion's weighting: mean over images of (L_t + (2 - t/T) aux_weight CE) / p(t).

        ``vlb_loss`` and ``aux_loss`` are logged unweighted (token means) under both weightings.
        """
        return self.weighted(*self.loss_terms(logits, x0, x_t, t), t, pt)

    def weighted(self, vlb: torch.Tensor, aux: torch.Tensor, t: torch.Tensor, pt: torch.Tensor | None = None):
        """:meth:`loss` from the per-image terms of :meth:`loss_terms`."""
        if pt is None:
            point = vlb.mean() + self.aux_weight * aux.mean()
        else:
            adaptive = 2 - t.to(vlb.device).double() / self.t_max
            point = ((vlb + adaptive * self.aux_weight * aux) / pt.to(vlb.device).double()).mean()
        return {"vlb_loss": vlb.mean().float(), "aux_loss": aux.mean().float(), "point_loss": point.float()}

    @torch.no_grad()
    def sample(self, denoiser: nn.Module, shape: tuple[int, int, int], generators: Sequence[torch.Generator], device="cpu"):
        """Ancestral sampling from all-[MASK] tokens ``(B, H, W)``; one generator per image. Non-finite logits stop it
        (:class:`~core.sample.NonFiniteSampleError`, naming the step) before they are drawn from."""
        x = torch.full(shape, self.k, dtype=torch.long, device=device)
        for step in range(self.t_max - 1, -1, -1):
            t = torch.full((shape[0],), step, dtype=torch.long, device=device)
            logits = check_finite(denoiser(x, t), f"the token denoiser's logits at t={step}")
            x = self._draw(self.posterior(x, F.softmax(logits.double(), 1), t), generators)
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
        context: ContextPrediction | None = None, loss_weighting: str = "token_mean",
    ):
        super().__init__()
        if loss_weighting not in ("token_mean", "vq_diffusion"):
            raise ValueError(f"loss_weighting must be 'token_mean' or 'vq_diffusion', got {loss_weighting!r}")
        self.denoiser, self.diffusion, self.context = denoiser, diffusion, context
        self.loss_weighting = loss_weighting
        self.register_buffer("codebook", codebook.float())  # (K, D), fixed
        if loss_weighting == "vq_diffusion":  # VQ-Diffusion's Lt_history / Lt_count, saved with checkpoints
            self.register_buffer("lt_history", torch.zeros(diffusion.t_max, dtype=torch.float64))
            self.register_buffer("lt_count", torch.zeros(diffusion.t_max, dtype=torch.float64))
        self.tap = FeatureTap(last_block(denoiser.unet)) if context is not None else None

    def timestep_probs(self) -> torch.Tensor | None:
        """VQ-Diffusion's importance distribution over t ``(T,)`` float64, or None while t is drawn uniformly
        (``token_mean``, or until every t has been drawn more than 10 times)."""
        if self.loss_weighting != "vq_diffusion" or not bool((self.lt_count > 10).all()):
            return None
        root = torch.sqrt(self.lt_history + 1e-10) + 1e-4
        root[0] = root[1]  # the decoder term (t = 0) takes L_1's weight, as VQ-Diffusion does
        return root / root.sum()

    def sample_timesteps(self, generators: Sequence[torch.Generator]) -> torch.Tensor:
        """One t per image ``(B,)`` (CPU, long), image b from ``generators[b]``: uniform, or importance-sampled."""
        probs = self.timestep_probs()
        if probs is None:
            return uniform_timesteps(generators, self.diffusion.t_max)
        probs = probs.float().cpu()
        return torch.cat([torch.multinomial(probs, 1, generator=g) for g in generators])

    @torch.no_grad()
    def _update_history(self, vlb: torch.Tensor, t: torch.Tensor) -> None:
        """Lt_history[t] <- 0.1 L_t^2 + 0.9 Lt_history[t] from the batch's values (the last image wins among
        equal t, as scatter_ on the CPU), Lt_count[t] += 1 per image."""
        t = t.to(self.lt_history.device)
        new = 0.1 * vlb.detach().double().to(t.device) ** 2 + 0.9 * self.lt_history[t]
        for b in range(len(t)):
            self.lt_history[t[b]] = new[b]
        self.lt_count.index_add_(0, t, torch.ones_like(new))

    def forward(
        self, x0: torch.Tensor, timesteps: torch.Tensor, generators: Sequence[torch.Generator] | None = None
    ) -> dict[str, torch.Tensor]:
        x_t = self.diffusion.q_sample(x0, timesteps.cpu(), generators)
        logits = self.denoiser(x_t, timesteps)
        if self.loss_weighting == "vq_diffusion":
            probs = self.timestep_probs()  # the distribution t was drawn from (before this batch updates it)
            pt = (torch.full(timesteps.shape, 1 / self.diffusion.t_max, dtype=torch.float64) if probs is None
                  else probs.cpu()[timesteps.cpu()])
            vlb, aux = self.diffusion.loss_terms(logits, x0, x_t, timesteps)
            losses = self.diffusion.weighted(vlb, aux, timesteps, pt)
            if self.training:
                self._update_history(vlb, timesteps)
        else:
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
