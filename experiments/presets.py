"""Presets: one row of a paper table at one scale (:class:`Preset`) and the config one (preset, seed) run trains.

Vocabulary: :meth:`Preset.run_config` (the preset's own config for a seed), :func:`run_config` (this command's:
``--set`` applied, shrunk at smoke scale by :mod:`experiments.smoke`), :func:`sampler_configs` (the config once per
sampler it is evaluated with), :func:`with_eval_options` (``--eval KEY=VALUE`` on a preset's evaluation options).
"""

from __future__ import annotations

import argparse
import copy
import dataclasses
from collections.abc import Callable
from dataclasses import dataclass, field

from core.config import RunConfig, apply_overrides
from core.runlog import run_name

from .smoke import smoke_config


@dataclass
class Preset:
    """One row of a paper table, at one scale."""

    name: str
    scale: str  # one of SCALES but smoke
    method: str  # baseline | conprediff | a variant label
    benchmark: str
    config: dict
    paper: str = "n/a"  # what the paper reports for this row
    expected_minutes: float | None = None  # mini: on 2 CPU cores, measured unless minutes_estimated
    minutes_estimated: bool = False  # expected_minutes is an estimate (the preset says from what), not a measured run
    num_samples: int = 1000
    extra: dict = field(default_factory=dict)
    prepare: Callable[[], None] | None = None  # run before training at mini/paper scale (e.g. train an autoencoder)
    # The run starts from the final checkpoint of this preset's run of the same seed (trained first if it is not):
    # a longer budget of the same training (constant LR after warm-up, every draw keyed by step; tested equal to a
    # straight run). Its records are its own (its config, its weights).
    continues: str | None = None
    # LDM's learning-rate rule (main.py's scale_lr: lr = base_learning_rate x batch): when --set changes
    # train.batch_size and not train.lr, the lr follows the batch (run_config), as the paper presets derive it.
    lr_per_image: float | None = None
    # Further samplers each run is evaluated with after the config's own, as diffusion overrides of sampling keys only
    # (core.train.SAMPLING_KEYS), e.g. {"sampler": "ddim", "sampling_steps": 50}: another block of the same models.
    extra_samplers: tuple[dict, ...] = ()

    def run_config(self, seed: int) -> RunConfig:
        cfg = copy.deepcopy(self.config)
        cfg.setdefault("train", {})["seed"] = seed
        cfg["name"] = run_name(self.name, seed)
        return RunConfig.from_dict(cfg)

def run_config(preset: Preset, seed: int, args: argparse.Namespace, overrides: list[str] | None = None) -> RunConfig:
    """The config one (preset, seed) run of this command trains: the preset's, shrunk at smoke scale, with
    ``overrides`` (default ``--set``) applied last; ``overrides=[]`` gives the preset's own config at this scale.
    Raises :class:`~core.config.ConfigError` (or ``ValueError`` for a malformed override)."""
    overrides = list(args.overrides if overrides is None else overrides)
    keys = {o.partition("=")[0].strip() for o in overrides}
    if preset.lr_per_image and "train.batch_size" in keys and "train.lr" not in keys:
        batch = RunConfig.from_dict(apply_overrides(preset.run_config(seed).to_dict(), overrides)).train.batch_size
        overrides.append(f"train.lr={round(preset.lr_per_image * batch, 12)}")  # the preset's rule, not its lr
    if args.scale == "smoke":
        return smoke_config(preset, seed, args.runs_dir / "smoke-stand-ins", overrides)
    return RunConfig.from_dict(apply_overrides(preset.run_config(seed).to_dict(), overrides))

def sampler_configs(preset: Preset, cfg: RunConfig) -> list[RunConfig]:
    """``cfg`` and one copy per ``preset.extra_samplers`` entry (only sampling keys may differ; ValueError otherwise)."""
    from core.train import SAMPLING_KEYS

    out = [cfg]
    for extra in preset.extra_samplers:
        if all(getattr(cfg.diffusion, k, None) == v for k, v in extra.items()):
            continue  # the config's own sampler already (e.g. --sampling-steps made them equal): sampled once
        bad = sorted(f"diffusion.{k}" for k in extra if f"diffusion.{k}" not in SAMPLING_KEYS)
        if bad:
            raise ValueError(f"preset {preset.name}: extra_samplers may set sampling keys only, not {', '.join(bad)}")
        d = cfg.to_dict()
        d["diffusion"].update(extra)
        out.append(RunConfig.from_dict(d))
    return out

def with_eval_options(preset: Preset, options: list[str]) -> Preset:
    """A copy of ``preset`` whose ``extra`` (evaluation options) has ``KEY=VALUE`` overrides applied (values read as
    YAML scalars). Raises ValueError for a malformed option or a key the preset does not have."""
    import yaml

    extra = dict(preset.extra)
    for option in options:
        key, sep, value = option.partition("=")
        if not sep:
            raise ValueError(f"--eval {option!r}: expected KEY=VALUE")
        if key not in preset.extra:
            raise ValueError(f"--eval {key}: {preset.name} has no such evaluation option; it has: "
                             f"{', '.join(sorted(preset.extra)) or 'none'}")
        extra[key] = yaml.safe_load(value)
        if type(extra[key]) is not type(preset.extra[key]) and not (
                isinstance(preset.extra[key], float) and isinstance(extra[key], int)):
            raise ValueError(f"--eval {option}: expected a {type(preset.extra[key]).__name__}")
    return dataclasses.replace(preset, extra=extra)


# ---------------------------------------------------------------------------- the presets' vocabulary
# The configs the experiments' presets are built from (the mini base, LDM-4 at paper scale) and how to vary them.

# Shared by every mini row: a 1.05 M-parameter UNet (16, 8 and 4 px levels), 16x16 digits, 2-core CPU budget.
# [choice, tuned 2026-11-22 on seed 0 of the baseline, 500 samples] The third (4x4) level and the cosine
# schedule raised confident_digits from 0.52 (two levels, linear, 1,500 steps) to 0.60; at 2,000 steps the
# cosine three-level baseline reached 0.66; more steps gained little (0.71 at 2,500 and 3,000; results/tuning/).
# The step budget keeps one table (6 runs) near an hour on 2 cores.
MINI = {
    "backbone": "pixel",
    "model": {"block_out_channels": [32, 64, 64], "layers_per_block": 1},
    "data": {"source": "digits", "resolution": 16, "channels": 1},
    "diffusion": {"num_train_timesteps": 1000, "beta_schedule": "squaredcos_cap_v2", "sampler": "ddim",
                  "sampling_steps": 50},
    "train": {"batch_size": 64, "steps": 2000, "lr": 1e-3, "warmup_steps": 100, "ema_decay": 0.999,
              "checkpoint_every": 500, "log_every": 50},
    # [choice] mini decoder: small MLP, context predicted for a random quarter of the points per image
    # (an unbiased estimate of the mean over points) to keep the step at ~1.4x the baseline on CPU.
    "context": {"enabled": False, "strides": [1, 2, 3], "latent_dim": 16, "hidden_dim": 32, "depth": 1,
                "point_fraction": 0.25},
}


def merge(base: dict, **sections) -> dict:
    """A copy of the config dict ``base`` with each section's keys updated (``merge(MINI, train={"steps": 5000})``);
    a non-dict value replaces the section."""
    import copy

    out = copy.deepcopy(base)
    for key, value in sections.items():
        out[key] = {**out.get(key, {}), **value} if isinstance(value, dict) else value
    return out


# LDM's VQ-f4 first stage (CompVis configs/first_stage_models/vq-f4: 64x64x3 latents, 8192 codes) in diffusers
# layout: the `vqvae` of CompVis/ldm-celebahq-256 at the main-branch commit that holds its diffusers-format weights
# ("upload new weights", 2022-07-28). Its config has no scaling_factor, which diffusers would fill with 0.18215;
# LDM-4 does not scale VQ latents (LatentDiffusion's scale_factor defaults to 1.0), so latent_scale is 1.0.
LDM_VQ_F4 = {"vae": "CompVis/ldm-celebahq-256", "vae_revision": "03978f22272a3c2502da709c3940e227c9714bdd",
             "vae_subfolder": "vqvae", "latent_scale": 1.0}


# Paper-scale runs train in bf16 autocast with TF32 for what stays fp32 [choice: CompVis trained LDM-4 in fp32; 3x
# faster on an H200, issue 19]; the frozen autoencoder and text encoder then run in bf16 too (core.train). Mini
# presets stay fp32: their committed results were trained so.
PAPER_PRECISION = {"mixed_precision": "bf16", "allow_tf32": True}


# LDM-4 exactly as CompVis ships it (configs/latent-diffusion/{celebahq,ffhq}-ldm-vq-4.yaml, README; SPEC section 5):
# betas linear_start 0.0015 -> linear_end 0.0195 on a square-root-linear grid (diffusers' scaled_linear), UNet
# 224 x (1,2,3,4) with 2 res blocks, attention at latent resolutions 32/16/8 and in the middle, 32 channels per
# head, lr = base_learning_rate 2e-6 x batch (main.py's scale_lr), constant (no scheduler_config, so no warm-up),
# torch AdamW defaults (weight decay 0.01), no gradient clipping (Lightning's default), EMA 0.9999 with the same
# (1 + n) / (10 + n) warm-up as LitEma. Sampling: 200 DDIM steps, eta 0 (CelebA-HQ) or 1 (FFHQ), at LDM's DDIM
# timesteps 996, 991, ..., 1: CompVis ldm/modules/diffusionmodules/util.py make_ddim_timesteps ("uniform":
# range(0, 1000, c) + 1, "add one to get the final alpha values right"), i.e. diffusers' leading spacing with
# steps_offset 1 (SPEC section 6; the mini presets keep diffusers' default, 995, ..., 0, as their results were drawn).
# Steps: 410k (CelebA-HQ, batch 48) and 635k (FFHQ, batch 42), LDM's Table 18.
LDM_LR_PER_IMAGE = 2e-6  # CompVis base_learning_rate; main.py scales it by the batch


# Cluster settings [choice]: 8 DataLoader workers decode the PNGs beside the GPU step; the VQ-f4 encoder's output is
# cached once (core.latent_cache: 1.5 GB for CelebA-HQ's 30,000 images at 3 x 64 x 64 fp32, 3.4 GB for FFHQ; tested
# equal to encoding on the fly) instead of encoding every batch again; a checkpoint every 30 minutes of wall time
# besides every 5,000 steps (LDM-4's checkpoint is 4.1 GB), so a preempted job loses minutes.
def ldm4_config(dataset: str, steps: int, batch: int, eta: float = 0.0) -> dict:
    """LDM-4's config (above) on ``data/<dataset>`` for ``steps`` at global ``batch`` (lr by LDM's rule), DDIM eta."""
    return {
        "backbone": "latent",
        "model": {"block_out_channels": [224, 448, 672, 896], "layers_per_block": 2,
                  "attention": [False, True, True, True], "mid_attention": True, "norm_num_groups": 32,
                  "head_channels": 32, **LDM_VQ_F4},
        "data": {"source": f"data/{dataset}", "resolution": 256, "channels": 3, "num_workers": 8, "latent_cache": True},
        "diffusion": {"num_train_timesteps": 1000, "beta_schedule": "scaled_linear", "beta_start": 0.0015,
                      "beta_end": 0.0195, "sampler": "ddim", "sampling_steps": 200, "eta": eta,
                      "timestep_spacing": "leading", "steps_offset": 1},
        "train": {"batch_size": batch, "steps": steps, "lr": round(LDM_LR_PER_IMAGE * batch, 12), "warmup_steps": 0,
                  "weight_decay": 0.01, "max_grad_norm": 0.0, "ema_decay": 0.9999, "checkpoint_every": 5000,
                  "checkpoint_minutes": 30, "log_every": 100, **PAPER_PRECISION},
        "context": {"enabled": False, "strides": [1, 2, 3]},
    }


# LDM's Table 1 gives CelebA-HQ's 5.11 / 0.72 / 0.49 with 500 DDIM steps ("500-s") and FFHQ's 4.98 with 200 ("200-s");
# CompVis's README samples both with 200 (SPEC section 6). CelebA-HQ samples with 500 as its paper number says, and is
# evaluated with 200 as a second block (Preset.extra_samplers); FFHQ with 200.
CELEBAHQ = merge(ldm4_config("celebahq256", 410_000, 48, eta=0.0), diffusion={"sampling_steps": 500})
CELEBAHQ_SECOND_SAMPLER = ({"sampling_steps": 200},)
FFHQ = ldm4_config("ffhq256", 635_000, 42, eta=1.0)


# [choice] mini-gpu (issue 6's "larger mini setting" for a lent GPU): 32x32 digits (the 28 px MNIST upscaled),
# a 3-level UNet of 64/128/128 channels with 2 layers per block (6.07 M params), batch 128; the mini's context
# decoder and its quarter of the points. Budget: the 10 runs (5 seeds x 2) train at once on one H100 (MPS) inside
# one 10-minute device call, sampling and metrics included. Measured there with 10 concurrent runs: baseline
# 4.7 it/s, ConPreDiff with *every* point's context 2.2 it/s (so, a quarter of the points: the mini's setting).
# Sampling as at mini (DDIM-50, no clipping, 1,000 samples against the 4,500 training digits).
GPU32 = merge(
    MINI,
    model={"block_out_channels": [64, 128, 128], "layers_per_block": 2},
    data={"resolution": 32, "allow_upscale": True},
    train={"batch_size": 128, "steps": 1500, "lr": 5e-4, "warmup_steps": 200, "checkpoint_every": 500,
           "log_every": 50},
)


def estimated_minutes(step_time_ratio: float, steps: int = 2000) -> float:
    """Minutes per seed on 2 idle CPU cores for a MINI variant not timed alone there: the baseline's
    training (2,000 steps x 0.252 s = 8.4 min) scaled by the variant's step-time ratio (e.g. from
    ``benchmarks/overhead.py --experiment ...``, benchmarks/RESULTS.md) and by ``steps / 2000``, plus the
    1.5 min of sampling and metrics (9.9 - 8.4). An estimate, not a measured run."""
    return round(8.4 * step_time_ratio * steps / 2000 + 1.5, 1)
