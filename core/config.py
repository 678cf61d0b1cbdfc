"""Run configuration: plain dataclasses, loaded from YAML/dicts and validated before any compute.

Unknown keys, wrong types and impossible values raise :class:`ConfigError` naming the key and
what is allowed. ``RunConfig.from_dict(d)`` builds a config; ``cfg.to_dict()`` round-trips it;
``apply_overrides(d, ["train.steps=10"])`` edits a dict with dotted keys (values parsed as YAML).

YAML is read with YAML 1.2 booleans (only ``true``/``false``): YAML 1.1 would turn a config's own
spelling ``mixed_precision: no`` into ``False``. An override of a string-typed key keeps its text
as written (``--set train.mixed_precision=no``, ``--set name=007``); ``null`` sets an optional one to None.
"""

from __future__ import annotations

import dataclasses
import math
import re
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml


class ConfigError(ValueError):
    """A configuration key is unknown, mistyped or impossible."""


class ConfigLoader(yaml.SafeLoader):
    """``yaml.SafeLoader`` with YAML 1.2 booleans: ``no``/``yes``/``on``/``off`` stay strings."""


_BOOL = "tag:yaml.org,2002:bool"
ConfigLoader.yaml_implicit_resolvers = {
    first: [(tag, rx) for tag, rx in resolvers if tag != _BOOL]
    for first, resolvers in yaml.SafeLoader.yaml_implicit_resolvers.items()
}
ConfigLoader.add_implicit_resolver(_BOOL, re.compile(r"^(?:true|True|TRUE|false|False|FALSE)$"), list("tTfF"))


def load_yaml(text: str) -> Any:
    """Parse config YAML (see :class:`ConfigLoader`)."""
    return yaml.load(text, Loader=ConfigLoader)


def _choice(key: str, value: Any, allowed: tuple) -> None:
    if value not in allowed:
        raise ConfigError(f"{key}={value!r} is not allowed; choose one of: {', '.join(map(repr, allowed))}")


def _check(key: str, ok: bool, what: str) -> None:
    if not ok:
        raise ConfigError(f"{key}: {what}")


@dataclass
class ContextConfig:
    """ConPreDiff's context-prediction term (SPEC section 1; every [choice] is here)."""

    enabled: bool = True
    strides: tuple[int, ...] = (1, 2, 3)
    pattern: str = "dilated"  # dilated: 3x3 ring at dilation s (K=8) | ring: Chebyshev ring (K=8s)
    weight: float = 1.0  # lambda
    decoder: str = "distribution"  # distribution (ConPreDiff) | explicit (one head per neighbor)
    solver: str = "exact"  # exact | sinkhorn | sliced
    target: str = "posterior_mean"  # posterior_mean (x_{t-1} mean) | x0
    # What the decoder reads at each point [choice]: features (the last up-block's output) | denoised (the model's
    # own x_{t-1} estimate at that point, the "denoised point" of the paper's Figure 1) | features+denoised (both,
    # concatenated). The denoised inputs carry the context gradient to the UNet's output (continuous backbones).
    decoder_input: str = "features"
    # Clamp x0_hat to [-c, c] before forming the denoised input (0: no clamp) [choice]. Unclamped, the input
    # mu~(x_t, x0_hat) has |d mu~ / d epsilon| = 31.6 at t = 999 of the cosine schedule (alpha-bar 2.4e-9), 1.5 at
    # t = 998 and 0.003-0.005 at t <= 500; DDPM and guided-diffusion clip x0_hat to [-1, 1] when they form this mean
    # for sampling (clip_denoised).
    denoised_clip: float = 0.0
    # Per-image weight of the context term by timestep [reading, issue 28]: none (1 everywhere) | signal_share
    # (a(t)^2 / (a(t)^2 + b(t)^2) where the target mu~(x_t, x0) = a(t) x0 + b(t) eps: how much of the target is the
    # image rather than the input's own noise) | below (1 for t < t_cut, else 0).
    t_weighting: str = "none"
    t_cut: int = 500
    latent_dim: int = 32
    hidden_dim: int = 64
    depth: int = 2
    point_fraction: float = 1.0  # fraction of points per image whose neighborhood is predicted
    sinkhorn_reg: float = 0.05
    sinkhorn_iters: int = 50
    sliced_projections: int = 64

    def validate(self, p: str = "context") -> None:
        _check(f"{p}.strides", len(self.strides) > 0 and all(s >= 1 for s in self.strides), "a non-empty list of integers >= 1")
        _check(f"{p}.strides", len(set(self.strides)) == len(self.strides), "strides must be distinct")
        _choice(f"{p}.pattern", self.pattern, ("dilated", "ring"))
        _choice(f"{p}.decoder", self.decoder, ("distribution", "explicit"))
        _choice(f"{p}.solver", self.solver, ("exact", "sinkhorn", "sliced"))
        _choice(f"{p}.target", self.target, ("posterior_mean", "x0"))
        _choice(f"{p}.decoder_input", self.decoder_input, ("features", "denoised", "features+denoised"))
        _check(f"{p}.weight", self.weight >= 0, "must be >= 0")
        _check(f"{p}.denoised_clip", math.isfinite(self.denoised_clip) and self.denoised_clip >= 0,
               "must be a finite number >= 0 (0: no clamp)")
        _check(f"{p}.denoised_clip", self.denoised_clip == 0 or self.decoder_input != "features",
               "clamps the denoised input, which context.decoder_input=features does not read")
        _check(f"{p}.point_fraction", 0 < self.point_fraction <= 1, "must be in (0, 1]")
        _choice(f"{p}.t_weighting", self.t_weighting, ("none", "signal_share", "below"))
        _check(f"{p}.t_cut", self.t_cut >= 1, "must be >= 1")
        for k in ("latent_dim", "hidden_dim", "sinkhorn_iters", "sliced_projections"):
            _check(f"{p}.{k}", getattr(self, k) >= 1, "must be >= 1")
        _check(f"{p}.depth", self.depth >= 0, "must be >= 0")
        _check(f"{p}.sinkhorn_reg", self.sinkhorn_reg > 0, "must be > 0")


@dataclass
class ModelConfig:
    """The denoiser: a stock diffusers UNet2DModel (or UNet2DConditionModel with cross-attention)."""

    block_out_channels: tuple[int, ...] = (32, 64)
    layers_per_block: int = 1
    attention: tuple[bool, ...] = ()  # per level; empty = no attention
    mid_attention: bool = False  # attention in the UNet's middle block
    norm_num_groups: int = 8
    cross_attention_dim: int | None = None  # set for text-to-image (UNet2DConditionModel)
    vae: str | None = None  # backbone=latent: diffusers AutoencoderKL/VQModel (frozen): a local folder or a hub id
    vae_revision: str | None = None  # hub id only: the pinned commit (or branch/tag) to download
    vae_subfolder: str | None = None  # hub id or folder: where the autoencoder sits inside it (e.g. "vqvae")
    latent_scale: float | None = None  # latents = encoder output x this; None: the autoencoder config's scaling_factor
    text_encoder: str | None = None  # text-to-image: "minilm" (offline PyPI package), a transformers folder or hub id
    text_encoder_revision: str | None = None  # hub id only: the pinned commit (or branch/tag)
    head_channels: int | None = 8  # channels per attention head (CompVis num_head_channels)
    num_heads: int | None = None  # heads per attention layer instead (CompVis num_heads); conditional UNet only
    token_levels: int = 8  # backbone=discrete: grey levels per pixel (tokens), codebook = level centres
    token_embed_dim: int = 32  # backbone=discrete: token embedding width fed to the UNet
    # Recompute the UNet's activations in the backward pass (diffusers enable_gradient_checkpointing): less memory,
    # ~30% more compute, the same loss and gradients.
    gradient_checkpointing: bool = False
    # backbone=latent: what the frozen AutoencoderKL's posterior gives the UNet [choice]: mean (as before) | sample
    # (mean + std * eps, eps drawn per image and step: CompVis's get_first_stage_encoding, EDM2's encode_latents).
    latent_sampling: str = "mean"
    # torch.compile the UNet for training (default mode, dynamic=False): same loss, faster steps after a compile.
    compile: bool = False

    def validate(self, p: str = "model") -> None:
        _choice(f"{p}.latent_sampling", self.latent_sampling, ("mean", "sample"))
        _check(f"{p}.block_out_channels", len(self.block_out_channels) > 0, "at least one level")
        _check(f"{p}.block_out_channels", all(c % self.norm_num_groups == 0 for c in self.block_out_channels),
               f"every channel count must be divisible by norm_num_groups={self.norm_num_groups}")
        _check(f"{p}.attention", len(self.attention) in (0, len(self.block_out_channels)),
               f"empty or one flag per level ({len(self.block_out_channels)})")
        _check(f"{p}.layers_per_block", self.layers_per_block >= 1, "must be >= 1")
        _check(f"{p}.text_encoder", (self.text_encoder is None) == (self.cross_attention_dim is None),
               "text_encoder and cross_attention_dim are set together (text-to-image) or not at all")
        _check(f"{p}.num_heads", (self.head_channels is None) != (self.num_heads is None),
               "set exactly one of head_channels (channels per head) and num_heads (heads per layer)")
        _check(f"{p}.num_heads", self.num_heads is None or self.cross_attention_dim is not None,
               "only for the cross-attention UNet (UNet2DModel takes a head width: use head_channels)")
        attn = [c for c, a in zip(self.block_out_channels, self.attention or ()) if a]
        attn += [self.block_out_channels[-1]] if self.mid_attention else []
        per = self.head_channels or self.num_heads
        _check(f"{p}.{'head_channels' if self.head_channels else 'num_heads'}", per >= 1 and all(c % per == 0 for c in attn),
               f"must be >= 1 and divide every attention level's channels {sorted(set(attn))}")
        _check(f"{p}.latent_scale", self.latent_scale is None or self.latent_scale > 0, "must be > 0 or null")


SAMPLING_DTYPES = ("fp32", "bf16")  # diffusion.sampling_dtype, core.sample's --dtype
TIMESTEP_SPACINGS = ("leading", "trailing", "linspace")  # diffusion.timestep_spacing (diffusers' names)


@dataclass
class DiffusionConfig:
    num_train_timesteps: int = 1000
    beta_schedule: str = "linear"
    beta_start: float = 0.0001  # diffusers' defaults; LDM-4: 0.0015 -> 0.0195 on scaled_linear (CompVis linear_start/end)
    beta_end: float = 0.02
    prediction_type: str = "epsilon"
    sampler: str = "ddim"
    sampling_steps: int = 50
    # Which timesteps a DDIM/DDPM sampler of sampling_steps steps visits (diffusers' timestep_spacing and
    # steps_offset; RePaint has its own schedule). leading + 0 (diffusers' default, what every mini result was drawn
    # with): DDIM-50 visits 980, 960, ..., 0. leading + 1 is LDM's DDIM (996, 991, ..., 1 at 200 steps; SPEC section
    # 6); trailing starts at the end of the schedule (999, ...). A setting that would leave the schedule, repeat a
    # timestep or start in its lower half (1 step with leading: t = 0 only, the initial noise returned) is refused.
    timestep_spacing: str = "leading"
    steps_offset: int = 0
    guidance_scale: float = 1.0  # classifier-free guidance at sampling (text-to-image)
    eta: float = 0.0  # DDIM: 0 deterministic, 1 DDPM-like noise (Song et al. 2021); LDM-4 FFHQ samples with 1
    # Clamp each step's x0 prediction to [-1, 1] (DDIM, DDPM and RePaint). Off by default [choice]: at mini
    # scale it costs the baseline 21 -> 6 fd_digits (results/tuning/ddim-clip); on for the pixel RePaint preset.
    clip_sample: bool = False
    # What the UNet computes in while sampling: fp32 | bf16 (autocast; the sampler name and sample folder say -bf16).
    sampling_dtype: str = "fp32"
    # Images per sampling (and decoding, and RePaint) batch per process; 0: 256 on a GPU, 64 on the CPU. Either way a
    # batch that runs out of GPU memory is split in halves and retried (core.sample.write_missing_pngs): every image
    # depends on its seed alone, so this changes speed and memory, not the samples (up to float rounding).
    sampling_batch: int = 0
    aux_weight: float = 5e-4  # backbone=discrete: weight of the auxiliary x0 cross-entropy (VQ-Diffusion)
    # backbone=discrete: how the per-step loss is weighted. vq_diffusion (every discrete preset): VQ-Diffusion's
    # _train_loss (L_t / p(t) with t importance-sampled once every t was seen > 10 times, aux weighted 2 - t/T),
    # T times token_mean under uniform t. token_mean: L_t and the aux cross-entropy averaged over tokens, t uniform
    # (our first choice; the schema default so that saved configs keep meaning what they ran).
    discrete_loss: str = "token_mean"

    def validate(self, p: str = "diffusion") -> None:
        _check(f"{p}.num_train_timesteps", self.num_train_timesteps >= 2, "must be >= 2")
        _choice(f"{p}.beta_schedule", self.beta_schedule, ("linear", "scaled_linear", "squaredcos_cap_v2"))
        _choice(f"{p}.prediction_type", self.prediction_type, ("epsilon", "v_prediction"))
        _choice(f"{p}.sampler", self.sampler, ("ddim", "ddpm"))
        _check(f"{p}.beta_start", 0 < self.beta_start < self.beta_end < 1, "need 0 < beta_start < beta_end < 1")
        _check(f"{p}.eta", 0 <= self.eta <= 1, "must be in [0, 1]")
        _choice(f"{p}.sampling_dtype", self.sampling_dtype, SAMPLING_DTYPES)
        _check(f"{p}.sampling_batch", self.sampling_batch >= 0, "must be >= 0 (0: 256 on a GPU, 64 on the CPU)")
        _choice(f"{p}.discrete_loss", self.discrete_loss, ("token_mean", "vq_diffusion"))
        _check(f"{p}.eta", self.eta == 0 or self.sampler == "ddim", "only the ddim sampler takes eta")
        _check(f"{p}.sampling_steps", 1 <= self.sampling_steps <= self.num_train_timesteps,
               f"must be in [1, num_train_timesteps={self.num_train_timesteps}]")
        _choice(f"{p}.timestep_spacing", self.timestep_spacing, TIMESTEP_SPACINGS)
        _check(f"{p}.steps_offset", self.steps_offset >= 0, "must be >= 0")
        from .models import build_scheduler, check_sampling_timesteps, sampling_scheduler

        try:  # the timesteps the sampler would visit, from diffusers itself (no model involved)
            check_sampling_timesteps(sampling_scheduler(build_scheduler(self), self.sampler, None,
                                                        self.timestep_spacing, self.steps_offset), self.sampling_steps)
        except ValueError as e:
            raise ConfigError(f"{p}.sampling_steps={self.sampling_steps} with {p}.sampler={self.sampler!r}, "
                              f"timestep_spacing={self.timestep_spacing!r}, steps_offset={self.steps_offset}: {e}") from None


@dataclass
class DataConfig:
    source: str = "digits"  # digits (embedded MNIST, offline) | a local imagefolder path | a hub dataset name
    resolution: int = 16
    channels: int = 1
    split: str = "train"
    # text-to-image: each record's caption, a string or a non-empty list of strings (one drawn per step; core.data)
    caption_column: str | None = None
    num_examples: int | None = None  # use the first N examples only
    # drop undecodable images and webdataset/hub records without an image or caption (reported with a count)
    # instead of stopping; an imagefolder's bad metadata records always stop, naming file and line
    skip_corrupt: bool = False
    allow_upscale: bool = False  # accept images smaller than resolution (e.g. 28 px digits at 32 px)
    # DataLoader worker processes decoding the next micro-batches (0: decoded in the training process, as before);
    # the images of a step stay a function of (seed, step). Pinned memory on CUDA.
    num_workers: int = 0
    # backbone=latent: encode the dataset once with the frozen autoencoder into <run-dir>/../latent-cache/<key>/
    # (core.latent_cache; key: autoencoder weights, encoder dtype, dataset fingerprint, resolution) and train from it.
    latent_cache: bool = False

    def validate(self, p: str = "data") -> None:
        _check(f"{p}.resolution", self.resolution >= 4, "must be >= 4")
        _choice(f"{p}.channels", self.channels, (1, 3))
        _choice(f"{p}.split", self.split, ("train", "test"))
        _check(f"{p}.num_examples", self.num_examples is None or self.num_examples >= 1, "must be >= 1 or null")
        _check(f"{p}.num_workers", self.num_workers >= 0, "must be >= 0 (0: no worker processes)")


@dataclass
class TrainConfig:
    batch_size: int = 64  # global, over all processes and accumulation steps
    steps: int = 3000  # optimizer steps
    lr: float = 1e-3
    lr_schedule: str = "constant"  # constant | cosine (diffusers.optimization names)
    warmup_steps: int = 100
    weight_decay: float = 0.0
    max_grad_norm: float = 1.0
    # How max_grad_norm applies when a context decoder trains too [choice]: joint (one norm over backbone and
    # decoder together) | per_module (the backbone's gradient, point and context terms, clipped on its own at
    # max_grad_norm, as the baseline's is; the decoder's at context_max_grad_norm, 0 = not clipped).
    grad_clip: str = "joint"
    context_max_grad_norm: float = 0.0
    grad_accumulation: int = 1
    # diffusers' EMAModel with its default warm-up, as LDM's LitEma: the decay at optimizer step n is
    # min(ema_decay, (1 + n) / (10 + n)). With 0.999 that is 0.9955 at 2,000 steps (mean lag about 200 steps), 0.9982 at
    # 5,000, and 0.999 itself only from about 9,000 steps on (SPEC section 6).
    ema_decay: float = 0.999
    # no | fp16 | bf16, the single source of the run's precision: an `accelerate launch --mixed_precision` that asks
    # for another one is refused (core.train.check_launcher_precision). Paper presets: bf16.
    mixed_precision: str = "no"
    allow_tf32: bool = False  # CUDA only: TF32 for fp32 matmuls and convolutions (paper presets: true)
    cond_dropout: float = 0.1  # text-to-image: probability of training with the empty caption
    checkpoint_every: int = 500
    checkpoints_total_limit: int = 2
    # Also save a checkpoint once this many minutes have passed since the last one (0: by steps only), so that a
    # preempted or timed-out job loses minutes, not checkpoint_every steps; SIGTERM (SLURM preemption, torchrun
    # forwarding a stop) saves one at the end of the current step and stops the run (core.train).
    checkpoint_minutes: float = 0.0
    log_every: int = 10
    seed: int = 0

    def validate(self, p: str = "train") -> None:
        for k in ("batch_size", "steps", "grad_accumulation", "checkpoint_every", "checkpoints_total_limit", "log_every"):
            _check(f"{p}.{k}", getattr(self, k) >= 1, "must be >= 1")
        _check(f"{p}.lr", self.lr > 0, "must be > 0")
        _check(f"{p}.warmup_steps", self.warmup_steps >= 0, "must be >= 0")
        _check(f"{p}.ema_decay", 0 <= self.ema_decay < 1, "must be in [0, 1)")
        _check(f"{p}.cond_dropout", 0 <= self.cond_dropout <= 1, "must be in [0, 1]")
        _choice(f"{p}.lr_schedule", self.lr_schedule, ("constant", "cosine", "linear"))
        _choice(f"{p}.mixed_precision", self.mixed_precision, ("no", "fp16", "bf16"))
        _choice(f"{p}.grad_clip", self.grad_clip, ("joint", "per_module"))
        _check(f"{p}.context_max_grad_norm", self.context_max_grad_norm >= 0, "must be >= 0 (0 = not clipped)")
        _check(f"{p}.batch_size", self.batch_size % self.grad_accumulation == 0,
               f"must be divisible by grad_accumulation={self.grad_accumulation}")


@dataclass
class RunConfig:
    name: str = "run"
    backbone: str = "pixel"  # pixel | latent | discrete
    model: ModelConfig = field(default_factory=ModelConfig)
    diffusion: DiffusionConfig = field(default_factory=DiffusionConfig)
    context: ContextConfig = field(default_factory=ContextConfig)
    data: DataConfig = field(default_factory=DataConfig)
    train: TrainConfig = field(default_factory=TrainConfig)

    def validate(self) -> RunConfig:
        _choice("backbone", self.backbone, ("pixel", "latent", "discrete"))
        _check("model.vae", (self.model.vae is not None) == (self.backbone == "latent"),
               "set it (a diffusers AutoencoderKL/VQModel folder) exactly when backbone is 'latent'")
        _check("data.latent_cache", not self.data.latent_cache or self.backbone == "latent",
               f"caches the frozen autoencoder's latents: only with backbone='latent' (got {self.backbone!r})")
        _check("model.latent_sampling", self.model.latent_sampling == "mean" or self.backbone == "latent",
               f"'sample' draws from the frozen autoencoder's posterior: only with backbone='latent' "
               f"(got {self.backbone!r})")
        if self.backbone == "discrete":
            _check("data.channels", self.data.channels == 1, "the discrete (quantised pixel) backbone takes 1 channel")
            _check("model.token_levels", self.model.token_levels >= 2, "must be >= 2")
            _check("model.text_encoder", self.model.text_encoder is None, "not supported with backbone='discrete'")
            _check("context.decoder_input", self.context.decoder_input == "features",
                   "must be 'features' with backbone='discrete' (no x_{t-1} estimate in pixel space)")
            _check("diffusion.sampling_dtype", self.diffusion.sampling_dtype == "fp32",
                   "the discrete backbone samples in fp32 only (its posterior is computed in float64)")
            _check("context.t_weighting", self.context.t_weighting == "none",
                   "weights by the continuous schedule's target coefficients: not with backbone='discrete'")
        else:
            _check("diffusion.discrete_loss", self.diffusion.discrete_loss == "token_mean",
                   f"applies to backbone='discrete' only (this run's backbone is {self.backbone!r}); leave it 'token_mean'")
        _check("data.caption_column", (self.data.caption_column is not None) == (self.model.text_encoder is not None),
               "set it (e.g. 'caption') exactly when model.text_encoder is set")
        for f in ("model", "diffusion", "context", "data", "train"):
            getattr(self, f).validate(f)
        # The UNet halves its grid once per level but the last; a latent grid is checked once the autoencoder's
        # factor is known (core.train.check_latent_size), before training starts.
        levels = len(self.model.block_out_channels)
        if self.backbone != "latent":
            _check("data.resolution", self.data.resolution % 2 ** (levels - 1) == 0,
                   f"{self.data.resolution} is not a multiple of 2^(levels-1) = {2 ** (levels - 1)}, which a {levels}-level "
                   f"UNet (model.block_out_channels) needs; choose a multiple of {2 ** (levels - 1)} or fewer levels")
        return self

    @classmethod
    def from_dict(cls, d: dict) -> RunConfig:
        return _build(cls, d, "").validate()

    @classmethod
    def from_yaml(cls, path: str | Path) -> RunConfig:
        try:
            d = load_yaml(Path(path).read_text()) or {}
        except FileNotFoundError:
            raise ConfigError(f"config file not found: {path}") from None
        return cls.from_dict(d)

    def to_dict(self) -> dict:
        return _plain(dataclasses.asdict(self))


def _plain(x: Any) -> Any:
    if isinstance(x, dict):
        return {k: _plain(v) for k, v in x.items()}
    if isinstance(x, (list, tuple)):
        return [_plain(v) for v in x]
    return x


def _coerce(key: str, tp: Any, value: Any) -> Any:
    origin, args = typing.get_origin(tp), typing.get_args(tp)
    if origin in (typing.Union, types.UnionType):
        if value is None and type(None) in args:
            return None
        inner = [a for a in args if a is not type(None)]
        return _coerce(key, inner[0], value)
    if origin is tuple:
        if not isinstance(value, (list, tuple)):
            raise ConfigError(f"{key}: expected a list, got {value!r}")
        return tuple(_coerce(f"{key}[{i}]", args[0], v) for i, v in enumerate(value))
    if dataclasses.is_dataclass(tp):
        if not isinstance(value, dict):
            raise ConfigError(f"{key}: expected a mapping, got {value!r}")
        return _build(tp, value, key + ".")
    if tp is float and isinstance(value, int) and not isinstance(value, bool):
        return float(value)
    if tp is float and isinstance(value, str):  # YAML 1.1 reads "1e-4" as a string
        try:
            return float(value)
        except ValueError:
            pass
    if tp in (int, float, str, bool) and not (isinstance(value, tp) and not (tp is int and isinstance(value, bool))):
        hint = " (true or false)" if tp is bool else " (quote it in a YAML file: '...')" if tp is str else ""
        raise ConfigError(f"{key}: expected {tp.__name__}{hint}, got {value!r}")
    return value


def _build(cls: type, d: dict, prefix: str) -> Any:
    hints = typing.get_type_hints(cls)
    names = [f.name for f in dataclasses.fields(cls)]
    unknown = sorted(set(d) - set(names))
    if unknown:
        raise ConfigError(f"unknown key(s) {', '.join(prefix + k for k in unknown)}; allowed under "
                          f"'{prefix.rstrip('.') or 'top level'}': {', '.join(names)}")
    return cls(**{k: _coerce(prefix + k, hints[k], v) for k, v in d.items()})


def _field_type(schema: type, key: str) -> Any:
    """The annotated type of dotted ``key`` in dataclass ``schema``, or None if there is no such field."""
    tp: Any = schema
    for part in key.split("."):
        if not dataclasses.is_dataclass(tp) or part not in {f.name for f in dataclasses.fields(tp)}:
            return None
        tp = typing.get_type_hints(tp)[part]
    return tp


def _is_str_field(tp: Any) -> bool:
    return tp is str or (typing.get_origin(tp) in (typing.Union, types.UnionType) and str in typing.get_args(tp))


def apply_overrides(d: dict, overrides: list[str], schema: type | None = None) -> dict:
    """Set dotted keys in a (nested) dict: ``["train.steps=10", "context.strides=[1,2]"]``.

    Values are parsed as YAML (:func:`load_yaml`), except that a key typed ``str`` in ``schema`` (default
    :class:`RunConfig`) keeps the text as written unless YAML reads it as a string anyway (quotes are
    removed) or as ``null`` for an optional key.
    """
    schema = schema or RunConfig
    for item in overrides:
        if "=" not in item:
            raise ConfigError(f"override {item!r} must look like key.sub=value")
        key, raw = item.split("=", 1)
        node = d
        *parents, leaf = key.split(".")
        for part in parents:
            node = node.setdefault(part, {})
            if not isinstance(node, dict):
                raise ConfigError(f"override {item!r}: {part} is not a section")
        value = load_yaml(raw)
        tp = _field_type(schema, key)
        if tp is not None and _is_str_field(tp) and not isinstance(value, str):
            optional = type(None) in typing.get_args(tp)
            value = None if (value is None and optional) else raw.strip()
        node[leaf] = value
    return d


def config_diff(a: dict, b: dict, prefix: str = "") -> list[str]:
    """Dotted keys whose values differ between two nested dicts."""
    keys = []
    for k in sorted(set(a) | set(b)):
        va, vb = a.get(k), b.get(k)
        if isinstance(va, dict) and isinstance(vb, dict):
            keys += config_diff(va, vb, f"{prefix}{k}.")
        elif va != vb:
            keys.append(f"{prefix}{k}: {va!r} -> {vb!r}")
    return keys
