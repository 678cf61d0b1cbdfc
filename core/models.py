"""Build stock diffusers models and schedulers from a :class:`RunConfig`; load the frozen autoencoder."""

from __future__ import annotations

import copy

from pathlib import Path

import torch
from diffusers import DDIMScheduler, DDPMScheduler, UNet2DConditionModel, UNet2DModel

from .config import DiffusionConfig, ModelConfig

COMPILE_BACKEND = "inductor"  # torch.compile backend for model.compile (tests use "aot_eager": no C++ build)


def attention_head_dim(cfg: ModelConfig) -> int | tuple[int, ...]:
    """What diffusers' ``attention_head_dim`` must be for ``cfg``'s heads, per UNet class.

    ``UNet2DModel`` reads it as the width of one head (CompVis ``num_head_channels``). ``UNet2DConditionModel``
    reads it as the number of heads per layer (a historical misnomer, diffusers issue #2011), per level.
    """
    if cfg.cross_attention_dim is None:
        return cfg.head_channels
    if cfg.num_heads is not None:
        return cfg.num_heads
    return tuple(max(1, c // cfg.head_channels) for c in cfg.block_out_channels)


def build_unet(cfg: ModelConfig, sample_size: int, in_channels: int, out_channels: int | None = None):
    """A ``UNet2DModel`` (or ``UNet2DConditionModel`` when ``cross_attention_dim`` is set).

    Heads: ``model.head_channels`` channels per head, or ``model.num_heads`` heads (conditional UNet only).
    ``model.gradient_checkpointing`` recomputes activations in the backward pass (training only). ``model.compile``
    compiles the UNet in place (``nn.Module.compile``, :data:`COMPILE_BACKEND`): its parameters, state dict, EMA and
    ``save_pretrained`` export stay those of the plain module.
    """
    levels = len(cfg.block_out_channels)
    attention = cfg.attention or (False,) * levels
    common = dict(
        sample_size=sample_size,
        in_channels=in_channels,
        out_channels=out_channels or in_channels,
        block_out_channels=tuple(cfg.block_out_channels),
        layers_per_block=cfg.layers_per_block,
        norm_num_groups=cfg.norm_num_groups,
    )
    if not cfg.mid_attention:
        common["mid_block_type" if cfg.cross_attention_dim is not None else "add_attention"] = (
            "UNetMidBlock2D" if cfg.cross_attention_dim is not None else False
        )
    if cfg.cross_attention_dim is not None:
        down = tuple("CrossAttnDownBlock2D" if a else "DownBlock2D" for a in attention)
        up = tuple("CrossAttnUpBlock2D" if a else "UpBlock2D" for a in reversed(attention))
        unet = UNet2DConditionModel(
            down_block_types=down, up_block_types=up, cross_attention_dim=cfg.cross_attention_dim,
            attention_head_dim=attention_head_dim(cfg), **common,
        )
    else:
        down = tuple("AttnDownBlock2D" if a else "DownBlock2D" for a in attention)
        up = tuple("AttnUpBlock2D" if a else "UpBlock2D" for a in reversed(attention))
        unet = UNet2DModel(down_block_types=down, up_block_types=up, attention_head_dim=attention_head_dim(cfg), **common)
    if cfg.gradient_checkpointing:
        unet.enable_gradient_checkpointing()
    if cfg.compile:
        unet.compile(backend=COMPILE_BACKEND)
    return unet


def build_scheduler(cfg: DiffusionConfig) -> DDPMScheduler:
    """The training scheduler (DDPM); sampling schedulers are made from its config.

    ``scaled_linear`` is CompVis's ``linear`` schedule: ``linspace(beta_start**0.5, beta_end**0.5, T)**2``.
    """
    return DDPMScheduler(
        num_train_timesteps=cfg.num_train_timesteps, beta_schedule=cfg.beta_schedule, beta_start=cfg.beta_start,
        beta_end=cfg.beta_end, prediction_type=cfg.prediction_type, clip_sample=cfg.clip_sample,
    )


def sampling_scheduler(train_scheduler: DDPMScheduler, sampler: str, clip_sample: bool | None = None,
                       timestep_spacing: str | None = None, steps_offset: int | None = None):
    """DDIM or DDPM scheduler sharing the training scheduler's betas.

    ``clip_sample`` (clamp every step's x0 prediction to [-1, 1]), ``timestep_spacing`` and ``steps_offset`` (which
    timesteps ``set_timesteps`` picks: ``diffusion.timestep_spacing`` / ``steps_offset``) override the exported
    config's values; ``None`` keeps them. Pipelines exported before ``diffusion.clip_sample`` existed say ``True``;
    every export says ``leading`` and 0 (diffusers' defaults).
    """
    cls = {"ddim": DDIMScheduler, "ddpm": DDPMScheduler}[sampler]
    over = {k: v for k, v in (("clip_sample", clip_sample), ("timestep_spacing", timestep_spacing),
                              ("steps_offset", steps_offset)) if v is not None}
    return cls.from_config(train_scheduler.config, **over)


def check_sampling_timesteps(scheduler, steps: int) -> list[int]:
    """Set ``steps`` timesteps on ``scheduler`` and return them, or raise ``ValueError`` when they would not sample
    what ``steps`` says: a ``steps_offset`` that diffusers ignores (it adds it with ``leading`` spacing only), a
    timestep outside [0, T-1] (diffusers would index past its table: DDPM-1000 with ``steps_offset=1`` visits 1000),
    fewer than ``steps`` distinct decreasing timesteps, or a first timestep in the
    lower half of the schedule (t < T/2): the reverse process starts from pure noise, which only the upper half
    describes, and a 1-step ``leading`` (or ``linspace``) sampler visits t = 0 only and returns its initial noise.
    """
    T, spacing, offset = (scheduler.config.num_train_timesteps, scheduler.config.timestep_spacing,
                          scheduler.config.steps_offset)
    if offset and spacing != "leading":
        raise ValueError(f"steps_offset={offset} is applied with timestep_spacing='leading' only; diffusers ignores it "
                         f"with {spacing!r}")
    scheduler.set_timesteps(steps)
    ts = [int(t) for t in scheduler.timesteps]
    shown = ("timestep " if len(ts) == 1 else "timesteps ") + ", ".join(map(str, ts[:3])) + (
        f", ..., {ts[-1]}" if len(ts) > 3 else "")
    if min(ts) < 0 or max(ts) > T - 1:
        raise ValueError(f"the sampler would visit {shown}, outside the schedule's 0..{T - 1}; lower steps_offset or "
                         f"the number of steps")
    if len(ts) != steps or any(a <= b for a, b in zip(ts, ts[1:])):
        raise ValueError(f"the sampler would visit {shown}, not {steps} distinct decreasing timesteps")
    if ts[0] < T // 2:
        raise ValueError(f"the sampler would visit {shown}, starting in the lower half of the {T}-step schedule: it "
                         f"would return its initial noise nearly unchanged; use timestep_spacing='trailing' (starts at "
                         f"{T - 1}) or more steps")
    return ts


def sampler_name(cfg: DiffusionConfig, backbone: str = "pixel") -> str:
    """How samples were drawn, as records and sample folders name it: ``ddim-50-noclip``, ``ddim-50-clip-cfg2``,
    ``ddim-200-eta1-noclip`` (DDIM's eta is named only when it is not 0), ``ddim-200-offset1-noclip`` (timesteps
    other than diffusers' default ``leading`` spacing with offset 0 are named: ``-offset1``, ``-trailing``),
    ``ddim-50-noclip-bf16`` (a UNet sampling in bf16, ``diffusion.sampling_dtype``: never one table cell with fp32
    samples)."""
    if backbone == "discrete":
        return f"mask-replace-ancestral-{cfg.num_train_timesteps}"
    eta = f"-eta{cfg.eta:g}" if cfg.eta else ""
    spacing = f"-{cfg.timestep_spacing}" if cfg.timestep_spacing != "leading" else ""
    spacing += f"-offset{cfg.steps_offset}" if cfg.steps_offset else ""
    name = f"{cfg.sampler}-{cfg.sampling_steps}{eta}{spacing}-{'clip' if cfg.clip_sample else 'noclip'}"
    name += f"-cfg{cfg.guidance_scale:g}" if cfg.guidance_scale != 1.0 else ""
    return name + ("-bf16" if cfg.sampling_dtype == "bf16" else "")


class Autoencoder:
    """A frozen diffusers ``AutoencoderKL`` or ``VQModel`` mapping images <-> scaled latents.

    ``path``: a local folder or a hub id (``revision`` pins the commit, ``subfolder`` e.g. ``vqvae``), loaded
    through :func:`core.hub.from_pretrained` (downloaded and cached when online; a clear error offline).
    ``scale`` multiplies the latents (``None``: the config's ``scaling_factor``). LDM-4's VQ-f4 uses 1.0
    (CompVis ``scale_factor`` default); diffusers fills a missing ``scaling_factor`` with 0.18215, so the
    LDM-4 presets set it. The chosen scale is written into the model's config, so an exported ``vae/`` keeps it.
    ``dtype``: the weights' and computation's dtype (training passes bf16 when it trains in bf16 on CUDA); latents
    and decoded images come back in float32.
    """

    def __init__(self, path: str, device: torch.device | str = "cpu", revision: str | None = None,
                 subfolder: str | None = None, scale: float | None = None, dtype: torch.dtype = torch.float32):
        from diffusers import AutoencoderKL, VQModel

        from .hub import from_pretrained, is_hub_id, weights_problem

        problem = weights_problem("model.vae", path, revision, subfolder)
        if problem:
            from .hub import WeightsUnavailableError

            raise WeightsUnavailableError(
                problem + ". For the LDM-4 presets that is the `vqvae` of CompVis/ldm-celebahq-256; the mini one "
                "is trained by `python -m experiments.backbones.autoencoder`.")
        config = VQModel.load_config(path if is_hub_id(path) else Path(path).expanduser(),
                                     **({"revision": revision} if revision and is_hub_id(path) else {}),
                                     **({"subfolder": subfolder} if subfolder else {}))
        cls = VQModel if config.get("_class_name") == "VQModel" else AutoencoderKL
        self.model = (from_pretrained(cls, "model.vae", path, revision, subfolder).to(device, dtype).eval()
                      .requires_grad_(False))
        self.dtype = dtype
        self.is_vq = cls is VQModel
        self.source = (path, revision, subfolder, scale)  # for fp32_model(): the weights as stored
        if scale is not None:
            self.model.register_to_config(scaling_factor=float(scale))
        self.scale = float(getattr(self.model.config, "scaling_factor", 1.0) or 1.0)

    @torch.no_grad()
    def encode(self, images: torch.Tensor) -> torch.Tensor:
        """``(B, C, R, R)`` in [-1, 1] -> float32 latents ``(B, latent_channels, R/f, R/f)``, computed in ``dtype``:
        the posterior mean (AutoencoderKL) or the pre-quantisation latents (VQModel), times ``scale``."""
        return self.latents_from_moments(self.encode_moments(images))

    @torch.no_grad()
    def encode_moments(self, images: torch.Tensor) -> torch.Tensor:
        """``(B, C, R, R)`` in [-1, 1] -> the encoder's unscaled float32 output, what a latent cache stores:
        ``(B, 2 * latent_channels, R/f, R/f)`` posterior mean and std concatenated (AutoencoderKL, as EDM2's
        ``dataset_tool.py encode`` stores them), or ``(B, latent_channels, R/f, R/f)`` pre-quantisation latents
        (VQModel)."""
        out = self.model.encode(images.to(self.dtype))
        if self.is_vq:
            return out.latents.float()
        return torch.cat([out.latent_dist.mean, out.latent_dist.std], dim=1).float()

    def latents_from_moments(self, moments: torch.Tensor, gens: list[torch.Generator] | None = None) -> torch.Tensor:
        """:meth:`encode_moments`'s output -> scaled float32 latents: the posterior mean, or with ``gens`` (one
        generator per image, AutoencoderKL only) a posterior sample ``mean + std * eps`` (CompVis
        ``DiagonalGaussianDistribution.sample``; EDM2 ``StabilityVAEEncoder.encode_latents``)."""
        from .objective import randn_per_image

        if self.is_vq:
            if gens is not None:
                raise ValueError("a VQModel has no posterior to sample "
                                 "(model.latent_sampling='sample' needs an AutoencoderKL)")
            return moments.float() * self.scale
        mean, std = moments.float().chunk(2, dim=1)
        if gens is not None:
            mean = mean + std * randn_per_image(gens, mean.shape[1:], mean.device)
        return mean * self.scale

    @torch.no_grad()
    def decode(self, latents: torch.Tensor) -> torch.Tensor:
        return self.model.decode((latents / self.scale).to(self.dtype)).sample.float().clamp(-1, 1)

    def fp32_model(self):
        """The autoencoder in float32 on the CPU, as stored (reloaded from its source when this one computes in
        another dtype: casting bf16 weights back would not restore them), its ``scaling_factor`` set: what an
        export saves."""
        if self.dtype == torch.float32:
            return copy.deepcopy(self.model).to("cpu")
        path, revision, subfolder, scale = self.source
        return Autoencoder(path, "cpu", revision, subfolder, scale).model

    @property
    def latent_channels(self) -> int:
        return int(self.model.config.latent_channels)

    @property
    def downsample(self) -> int:
        return 2 ** (len(self.model.config.block_out_channels) - 1)
