"""Build stock diffusers models and schedulers from a :class:`RunConfig`."""

from __future__ import annotations

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
        clip_sample=True,
    )


def sampling_scheduler(train_scheduler: DDPMScheduler, sampler: str):
    """DDIM or DDPM scheduler sharing the training scheduler's betas."""
    cls = {"ddim": DDIMScheduler, "ddpm": DDPMScheduler}[sampler]
    return cls.from_config(train_scheduler.config)
