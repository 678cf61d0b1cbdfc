"""The ConPreDiff training objective for continuous diffusion around a stock diffusers UNet.

    L = point_loss(eps or v)  +  lambda * sum_s mean_i W2^2(P_hat(N_i^s), P(N_i^s))

The UNet stays a stock ``UNet2DModel`` / ``UNet2DConditionModel``: the context decoder reads the
output of its last up-block (the feature map at output resolution, before the final
norm/conv) through a forward hook and lives in a separate module, :class:`ContextPrediction`,
that inference never needs.

Randomness that depends on the image (timestep, noise, decoder samples, point subset) is drawn
from one generator per image seeded by ``(seed, step, global image index)``, so a training step
gives the same loss for any number of processes.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import nn

from .config import ContextConfig
from .context import ContextDecoder, ExplicitNeighborDecoder
from .neighborhood import gather_neighbors, neighborhood_size
from .wasserstein import w2_sets


class FeatureTap:
    """Keeps the latest output of ``module`` (a forward hook); ``tap.features`` after a forward."""

    def __init__(self, module: nn.Module):
        self.features: torch.Tensor | None = None
        self.handle = module.register_forward_hook(self._hook)

    def _hook(self, module: nn.Module, inputs: tuple, output: torch.Tensor | tuple) -> None:
        self.features = output[0] if isinstance(output, tuple) else output

    def pop(self) -> torch.Tensor:
        if self.features is None:
            raise RuntimeError("no features captured: run the model's forward first")
        features, self.features = self.features, None
        return features

    def remove(self) -> None:
        self.handle.remove()


def last_block(unet: nn.Module) -> nn.Module:
    """The block whose output the context decoder reads (``context.decoder_input`` features): the last up-block."""
    if not hasattr(unet, "up_blocks"):
        raise TypeError(f"{type(unet).__name__} has no up_blocks; expected a diffusers UNet2D(Condition)Model")
    return unet.up_blocks[-1]


def image_generators(seed: int, step: int, indices: Sequence[int], device: torch.device | str = "cpu") -> list[torch.Generator]:
    """One generator per image, seeded by (seed, step, global index): independent of the process count."""
    gens = []
    for i in indices:
        g = torch.Generator(device=device)
        g.manual_seed((seed * 1_000_003 + step) * 1_000_033 + int(i))
        gens.append(g)
    return gens


def uniform_timesteps(gens: Sequence[torch.Generator], num_timesteps: int) -> torch.Tensor:
    """One training timestep per image, uniform on ``0 .. num_timesteps - 1``, image b's from ``gens[b]``:
    ``(len(gens),)`` long, on the CPU."""
    return torch.cat([torch.randint(0, num_timesteps, (1,), generator=g) for g in gens])


_DEVICE_GENERATORS: dict[torch.device, torch.Generator] = {}


def _device_generator(device: torch.device) -> torch.Generator:
    """One reusable generator per device: re-seeding it gives the draws of a new generator with that seed."""
    if device not in _DEVICE_GENERATORS:
        _DEVICE_GENERATORS[device] = torch.Generator(device=device)
    return _DEVICE_GENERATORS[device]


def randn_per_image(
    gens: Sequence[torch.Generator], shape: Sequence[int], device, dtype=torch.float32, dim: int = 0
) -> torch.Tensor:
    """Standard normals, image b's block drawn from ``gens[b]``, stacked along ``dim`` (``len(gens)`` there):
    ``(*shape[:dim], len(gens), *shape[dim:])`` contiguous, ``dtype`` (the fp32 draws rounded to it), on ``device``.

    CPU: image b's block is ``torch.randn(*shape, generator=gens[b])`` in fp32, cast to ``dtype`` if it differs
    (pinned in tests/test_objective.py: the draws of committed runs). For a CUDA ``device`` and CPU generators, each
    image's block is drawn on the GPU from a CUDA generator seeded by one draw of ``gens[b]``: still a function of
    ``gens[b]`` alone, without generating (for the context decoder at 32x32, 100 M numbers a step) on the CPU and
    copying. There one generator per device is re-seeded per image (not one new object per image), and the block is
    drawn in ``dtype`` directly: CUDA's normal kernel draws in fp32 and rounds to the output type
    (``normal_kernel`` in ATen/native/cuda/DistributionTemplates.h), so a bf16 draw is the fp32 draw cast, without
    the fp32 tensor.
    """
    device = torch.device(device)
    n = len(gens)
    if device.type == "cuda" and all(g.device.type == "cpu" for g in gens):
        seeds = [int(torch.randint(0, 2**62, (1,), generator=g)) for g in gens]
        if device.index is None:
            device = torch.device("cuda", torch.cuda.current_device())
        gen = _device_generator(device)
        out = torch.empty((n, *shape), dtype=dtype, device=device)
        for b, seed in enumerate(seeds):
            gen.manual_seed(seed)
            out[b].normal_(generator=gen)
    else:
        draw = dtype if all(g.device.type != "cpu" for g in gens) else torch.float32
        out = torch.empty((n, *shape), dtype=draw, device=gens[0].device if n else device)
        for b, g in enumerate(gens):
            torch.randn(*shape, generator=g, device=g.device, dtype=draw, out=out[b])
        out = out.to(device=device, dtype=dtype)
    return out if dim == 0 else out.movedim(0, dim).contiguous()


def posterior_mean_coefficients(scheduler, timesteps: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Coefficients (c0, ct) of the DDPM posterior mean  mu~(x_t, x_0) = c0 x_0 + ct x_t  (Ho et al. eq. 7)."""
    alphas_cumprod = scheduler.alphas_cumprod.to(timesteps.device)
    t = timesteps.long()
    a_bar = alphas_cumprod[t]
    a_bar_prev = torch.where(t > 0, alphas_cumprod[(t - 1).clamp(min=0)], torch.ones_like(a_bar))
    beta = 1 - a_bar / a_bar_prev
    c0 = a_bar_prev.sqrt() * beta / (1 - a_bar)
    ct = (1 - beta).sqrt() * (1 - a_bar_prev) / (1 - a_bar)
    return c0, ct


class ContextPrediction(nn.Module):
    """Context decoder plus its loss: features ``(B, F, H, W)`` and target map ``(B, D, H, W)`` -> loss.

    The target map is detached: the context term trains the backbone (through the features) and
    the decoder, never the targets.
    """

    def __init__(self, cfg: ContextConfig, feature_channels: int, target_channels: int):
        super().__init__()
        self.cfg = cfg
        self.strides = tuple(cfg.strides)
        self.k = neighborhood_size(self.strides, cfg.pattern)
        if cfg.decoder == "distribution":
            self.decoder = ContextDecoder(
                feature_channels, target_channels, len(self.strides), self.k, cfg.latent_dim, cfg.hidden_dim, cfg.depth
            )
        else:
            self.decoder = ExplicitNeighborDecoder(feature_channels, target_channels, len(self.strides), self.k, cfg.hidden_dim)

    def forward(
        self, features: torch.Tensor, target_map: torch.Tensor, generators: Sequence[torch.Generator] | None = None,
        image_weights: torch.Tensor | None = None,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Returns (context loss = sum over strides, per-stride losses ``(S,)``).

        ``image_weights`` ``(B,)`` multiplies each image's point distances (the mean over points keeps its
        denominator, so weight 1 everywhere is the unweighted loss, bit for bit; :func:`timestep_weights`)."""
        b, _, h, w = features.shape
        if target_map.shape[-2:] != (h, w):
            raise ValueError(f"feature map {tuple(features.shape)} and target map {tuple(target_map.shape)} differ in size")
        values, valid = gather_neighbors(target_map.detach(), self.strides, self.cfg.pattern)  # (B,H,W,S,K,D), (1,H,W,S,K)
        s, k, d = values.shape[-3:]
        feats = features.permute(0, 2, 3, 1).reshape(b, h * w, -1)
        values = values.reshape(b, h * w, s, k, d)
        valid = valid.expand(b, h, w, s, k).reshape(b, h * w, s, k)
        # Optionally predict the context of a random subset of points per image.
        n = max(1, round(self.cfg.point_fraction * h * w))
        if n < h * w:
            idx = torch.stack([torch.randperm(h * w, generator=g, device=g.device)[:n] for g in self._gens(generators, b)])
            idx = idx.to(features.device)
            feats = feats.gather(1, idx[..., None].expand(-1, -1, feats.shape[-1]))
            values = values.gather(1, idx[..., None, None, None].expand(-1, -1, s, k, d))
            valid = valid.gather(1, idx[..., None, None].expand(-1, -1, s, k))
        feats, values, valid = feats.reshape(b * n, -1), values.reshape(b * n, s, k, d), valid.reshape(b * n, s, k)
        if isinstance(self.decoder, ContextDecoder):
            eps = None
            if generators is not None:  # (S, B*n, Q, L), stride-major as the decoder computes
                eps = randn_per_image(generators, (s, n, k, self.decoder.latent_dim), features.device, features.dtype,
                                      dim=1).view(s, b * n, k, -1)
            pred = self.decoder(feats, eps=eps)
            dist = w2_sets(
                pred, values, valid, self.cfg.solver, sinkhorn_reg=self.cfg.sinkhorn_reg,
                sinkhorn_iters=self.cfg.sinkhorn_iters, sliced_projections=self.cfg.sliced_projections,
            )  # (N, S)
        else:
            sq = (self.decoder(feats) - values).pow(2).sum(-1)
            dist = (sq * valid).sum(-1) / valid.sum(-1).clamp(min=1)
        if image_weights is not None:  # (B,) -> one weight per decoded point
            dist = dist * image_weights.to(dist.device, dist.dtype).repeat_interleave(n)[:, None]
        has = valid.any(-1).to(dist.dtype)  # sets with at least one neighbor inside the image
        per_stride = (dist * has).sum(0) / has.sum(0).clamp(min=1)
        return per_stride.sum(), per_stride

    def terms(
        self, features: torch.Tensor, target_map: torch.Tensor, generators: Sequence[torch.Generator] | None = None,
        image_weights: torch.Tensor | None = None,
    ) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        """``(lambda * context loss, {"context_loss": ..., "context_loss_s<s>": ...})`` for a training module."""
        ctx, per_stride = self(features, target_map, generators, image_weights)
        logged = {"context_loss": ctx, **{f"context_loss_s{s}": v for s, v in zip(self.strides, per_stride)}}
        return self.cfg.weight * ctx, logged

    @staticmethod
    def _gens(generators, b):
        return generators if generators is not None else [None] * b


def target_coefficients(scheduler, timesteps: torch.Tensor, target: str = "posterior_mean"
                        ) -> tuple[torch.Tensor, torch.Tensor]:
    """``(a(t), b(t))`` with the context target = a(t) x0 + b(t) eps: for the posterior mean mu~(x_t, x0) =
    c0 x0 + ct x_t and x_t = sqrt(a_bar) x0 + sqrt(1 - a_bar) eps, a = c0 + ct sqrt(a_bar), b = ct sqrt(1 - a_bar);
    for x0 targets a = 1, b = 0. ``(B,)`` each."""
    if target == "x0":
        return torch.ones(timesteps.shape), torch.zeros(timesteps.shape)
    c0, ct = posterior_mean_coefficients(scheduler, timesteps)
    a_bar = scheduler.alphas_cumprod.to(timesteps.device)[timesteps.long()]
    return c0 + ct * a_bar.sqrt(), ct * (1 - a_bar).sqrt()


def timestep_weights(cfg: ContextConfig, scheduler, timesteps: torch.Tensor) -> torch.Tensor | None:
    """Per-image weights of the context term (``context.t_weighting``), ``(B,)`` float32, or None for ``none``:
    ``signal_share`` a(t)^2 / (a(t)^2 + b(t)^2) (:func:`target_coefficients`), ``below`` 1[t < t_cut]."""
    if cfg.t_weighting == "none":
        return None
    if cfg.t_weighting == "below":
        return (timesteps < cfg.t_cut).float()
    a, b = target_coefficients(scheduler, timesteps, cfg.target)
    return (a.pow(2) / (a.pow(2) + b.pow(2))).float()


class DiffusionTrainingModule(nn.Module):
    """UNet + (optional) context prediction; ``forward`` returns the loss terms of one batch.

    Wrapping both in one module lets ``accelerator.prepare`` (DDP) synchronise both.
    """

    def __init__(self, unet: nn.Module, scheduler, context: ContextPrediction | None = None):
        super().__init__()
        self.unet = unet
        self.context = context
        self.scheduler = scheduler
        self.tap = FeatureTap(last_block(unet)) if context is not None else None

    def forward(
        self,
        x0: torch.Tensor,
        noise: torch.Tensor,
        timesteps: torch.Tensor,
        encoder_hidden_states: torch.Tensor | None = None,
        generators: Sequence[torch.Generator] | None = None,
    ) -> dict[str, torch.Tensor]:
        x_t = self.scheduler.add_noise(x0, noise, timesteps)
        kwargs = {} if encoder_hidden_states is None else {"encoder_hidden_states": encoder_hidden_states}
        out = self.unet(x_t, timesteps, **kwargs).sample
        if self.scheduler.config.prediction_type == "v_prediction":
            target = self.scheduler.get_velocity(x0, noise, timesteps)
        else:
            target = noise
        point = F.mse_loss(out.float(), target.float())
        losses = {"point_loss": point}
        loss = point
        if self.context is not None:
            weighted, logged = context_terms(self.context, self.scheduler, self.tap.pop(), x0, x_t, timesteps, out,
                                             generators)
            loss = loss + weighted
            losses.update(logged)
        losses["loss"] = loss
        return losses

    def predicted_x0(self, x_t: torch.Tensor, out: torch.Tensor, timesteps: torch.Tensor) -> torch.Tensor:
        """:func:`predicted_x0` with this module's scheduler."""
        return predicted_x0(self.scheduler, x_t, out, timesteps)


def predicted_x0(scheduler, x_t: torch.Tensor, out: torch.Tensor, timesteps: torch.Tensor) -> torch.Tensor:
    """x0_hat from the UNet output ``out`` (epsilon or v prediction), shape of ``x_t``; no clipping.

    epsilon: x0 = (x_t - sqrt(1 - a_bar) eps) / sqrt(a_bar); v: x0 = sqrt(a_bar) x_t - sqrt(1 - a_bar) v
    (Salimans & Ho 2022), the formulas of diffusers' DDPMScheduler.step.
    """
    a_bar = scheduler.alphas_cumprod.to(x_t.device)[timesteps.long()].view((-1,) + (1,) * (x_t.dim() - 1))
    if scheduler.config.prediction_type == "v_prediction":
        return a_bar.sqrt() * x_t - (1 - a_bar).sqrt() * out
    return (x_t - (1 - a_bar).sqrt() * out) / a_bar.sqrt()


def context_terms(
    context: ContextPrediction, scheduler, features: torch.Tensor, x0: torch.Tensor, x_t: torch.Tensor,
    timesteps: torch.Tensor, model_output: torch.Tensor | None = None,
    generators: Sequence[torch.Generator] | None = None,
) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """The context term of one batch of a continuous diffusion model: ``(lambda * L_context, logged terms)``.

    ``features``: the UNet's last up-block output ``(B, F, H, W)`` (its forward hook); ``x0``, ``x_t``: clean and
    noised inputs ``(B, C, H, W)``; ``model_output``: the UNet's prediction, needed only when the decoder reads the
    denoised point (``context.decoder_input``). Targets: the neighbors of the posterior mean mu~(x_t, x0) (Ho et al.
    eq. 7) or of x0 (``context.target``), detached; each image weighted by :func:`timestep_weights`.
    """
    cfg = context.cfg
    c0, ct = posterior_mean_coefficients(scheduler, timesteps)
    view = (-1,) + (1,) * (x0.dim() - 1)
    c0, ct = c0.view(view), ct.view(view)
    with torch.no_grad():
        target_map = x0 if cfg.target == "x0" else c0 * x0 + ct * x_t
    if cfg.decoder_input != "features":  # the model's own x_{t-1} estimate, mu~(x_t, x0_hat), with its gradient
        if model_output is None:
            raise ValueError(f"context.decoder_input={cfg.decoder_input!r} reads the denoised point: pass the UNet's "
                             "output as model_output")
        x0_hat = predicted_x0(scheduler, x_t, model_output, timesteps)
        if cfg.denoised_clip:
            x0_hat = x0_hat.clamp(-cfg.denoised_clip, cfg.denoised_clip)
        denoised = (c0 * x0_hat + ct * x_t).to(features.dtype)
        features = denoised if cfg.decoder_input == "denoised" else torch.cat([features, denoised], 1)
    return context.terms(features, target_map.float(), generators, timestep_weights(cfg, scheduler, timesteps))


def decoder_input_channels(cfg: ContextConfig, unet: nn.Module) -> int:
    """Channels the context decoder reads at each point: the last up-block's (the UNet's first level), the image's
    (denoised point), or both."""
    features, image = unet.config.block_out_channels[0], unet.config.in_channels
    return {"features": features, "denoised": image, "features+denoised": features + image}[cfg.decoder_input]


class ContextTerm(nn.Module):
    """ConPreDiff's context term for any diffusers ``UNet2DModel`` / ``UNet2DConditionModel`` training loop.

    Holds the context decoder (train it with the UNet: pass ``term.parameters()`` to the optimizer) and a forward
    hook on the UNet's last up-block. After the UNet's forward on ``x_t = scheduler.add_noise(x0, noise, t)``,
    ``term(x0, noise, t)`` returns lambda * L_context, a scalar to add to the point loss; ``term.logged`` keeps the
    per-stride terms. The decoder is not needed to sample: save the UNet alone. Same loss as this repository's
    trainer (``DiffusionTrainingModule``) on the same batch and generators (tested).

    ``generators`` (one ``torch.Generator`` per image) make the decoder's draws reproducible per image; without
    them the global RNG is used.
    """

    def __init__(self, unet: nn.Module, scheduler, cfg: ContextConfig | None = None):
        super().__init__()
        cfg = cfg or ContextConfig()
        self.context = ContextPrediction(cfg, decoder_input_channels(cfg, unet), unet.config.in_channels)
        self.scheduler = scheduler
        self.tap = FeatureTap(last_block(unet))
        self.logged: dict[str, torch.Tensor] = {}

    def forward(self, x0: torch.Tensor, noise: torch.Tensor, timesteps: torch.Tensor,
                model_output: torch.Tensor | None = None, generators: Sequence[torch.Generator] | None = None
                ) -> torch.Tensor:
        x_t = self.scheduler.add_noise(x0, noise, timesteps)
        weighted, self.logged = context_terms(self.context, self.scheduler, self.tap.pop(), x0, x_t, timesteps,
                                              model_output, generators)
        return weighted

    def detach(self) -> None:
        """Remove the forward hook from the UNet (e.g. before sampling in the same process)."""
        self.tap.remove()


def attach_context(unet: nn.Module, scheduler, cfg: ContextConfig | None = None) -> ContextTerm:
    """Attach ConPreDiff's context term to ``unet`` (a diffusers UNet2D(Condition)Model) trained with ``scheduler``
    (a diffusers noise scheduler with ``alphas_cumprod``); returns the :class:`ContextTerm` to call in the loop."""
    return ContextTerm(unet, scheduler, cfg)
