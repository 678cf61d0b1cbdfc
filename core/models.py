"""Build stock diffusers models and schedulers from a :class:`RunConfig`."""

from __future__ import annotations

from pathlib import Path

import torch
from diffusers import DDIMScheduler, DDPMScheduler, UNet2DConditionModel, UNet2DModel

from .config import DiffusionConfig, ModelConfig


def build_unet(cfg: ModelConfig, sample_size: int, in_channels: int, out_channels: int | None = None):
    """A ``UNet2DModel`` (or ``UNet2DConditionModel`` when ``cross_attention_dim`` is set)."""
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
        return UNet2DConditionModel(
            down_block_types=down, up_block_types=up, cross_attention_dim=cfg.cross_attention_dim,
            attention_head_dim=8, **common,
        )
    down = tuple("AttnDownBlock2D" if a else "DownBlock2D" for a in attention)
    up = tuple("AttnUpBlock2D" if a else "UpBlock2D" for a in reversed(attention))
    return UNet2DModel(down_block_types=down, up_block_types=up, **common)


def build_scheduler(cfg: DiffusionConfig) -> DDPMScheduler:
    """The training scheduler (DDPM); sampling schedulers are made from its config."""
    return DDPMScheduler(
        num_train_timesteps=cfg.num_train_timesteps, beta_schedule=cfg.beta_schedule, prediction_type=cfg.prediction_type,
        clip_sample=cfg.clip_sample,
    )


def sampling_scheduler(train_scheduler: DDPMScheduler, sampler: str, clip_sample: bool | None = None):
    """DDIM or DDPM scheduler sharing the training scheduler's betas.

    ``clip_sample`` (clamp every step's x0 prediction to [-1, 1]) overrides the exported config's value;
    ``None`` keeps it. Pipelines exported before ``diffusion.clip_sample`` existed say ``True``.
    """
    cls = {"ddim": DDIMScheduler, "ddpm": DDPMScheduler}[sampler]
    over = {} if clip_sample is None else {"clip_sample": clip_sample}
    return cls.from_config(train_scheduler.config, **over)


def sampler_name(cfg: DiffusionConfig, backbone: str = "pixel") -> str:
    """How samples were drawn, as records and sample folders name it: ``ddim-50-noclip``, ``ddim-50-clip-cfg2``."""
    if backbone == "discrete":
        return f"mask-replace-ancestral-{cfg.num_train_timesteps}"
    name = f"{cfg.sampler}-{cfg.sampling_steps}-{'clip' if cfg.clip_sample else 'noclip'}"
    return name + (f"-cfg{cfg.guidance_scale:g}" if cfg.guidance_scale != 1.0 else "")


class Autoencoder:
    """A frozen diffusers ``AutoencoderKL`` or ``VQModel`` mapping images <-> scaled latents."""

    def __init__(self, path: str, device: torch.device | str = "cpu"):
        from diffusers import AutoencoderKL, VQModel

        folder = Path(path).expanduser()
        config = folder / "config.json"
        if not config.exists():
            raise FileNotFoundError(
                f"model.vae={path!r}: no diffusers autoencoder there (expected {config}). Put a diffusers "
                "AutoencoderKL or VQModel folder there (save_pretrained layout), e.g. the `vqvae` of "
                "CompVis/ldm-celebahq-256 for the LDM-4 presets, or train the mini one with "
                "`python -m experiments.backbones.autoencoder`."
            )
        cls = VQModel if '"VQModel"' in config.read_text() else AutoencoderKL
        self.model = cls.from_pretrained(folder).to(device).eval().requires_grad_(False)
        self.is_vq = cls is VQModel
        self.scale = float(getattr(self.model.config, "scaling_factor", 1.0) or 1.0)

    @torch.no_grad()
    def encode(self, images: torch.Tensor) -> torch.Tensor:
        if self.is_vq:
            return self.model.encode(images).latents * self.scale
        return self.model.encode(images).latent_dist.mean * self.scale

    @torch.no_grad()
    def decode(self, latents: torch.Tensor) -> torch.Tensor:
        return self.model.decode(latents / self.scale).sample.clamp(-1, 1)

    @property
    def latent_channels(self) -> int:
        return int(self.model.config.latent_channels)

    @property
    def downsample(self) -> int:
        return 2 ** (len(self.model.config.block_out_channels) - 1)
