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
