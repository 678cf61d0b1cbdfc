"""What every experiment folder shares: presets, the three scales, and train -> sample -> evaluate -> record.

An experiment folder defines ``PRESETS`` (paper rows: name, scale, method, benchmark, config
overrides, and the number the paper reports) and calls :func:`main`. Scales:

* ``smoke``: every preset (mini and paper) with a tiny model, a few steps and samples; paper presets
  get a generated imagefolder and a random autoencoder in place of data and weights. Proves the
  code path runs; measures nothing (records go to ``<runs>/smoke-records.jsonl``).
* ``mini``: the mini presets on the embedded digits, 2-core CPU budgets, proxy metrics.
* ``mini-long`` / ``mini-gpu``: the same task trained longer (CPU) or larger (32x32, one GPU), where an
  experiment has such presets; proxy metrics, reported as scales of their own.
* ``paper``: the paper presets on the user's prepared data, GPUs and standard metric weights.

Every stage resumes: training from its last checkpoint, sampling skips existing PNGs, and a
record already present (same preset, seed, metric, checkpoint, sample count) is not measured again.
Nothing derived from another checkpoint is reused: records carry the checkpoint of the exported
pipeline they measured (``pipeline/provenance.json``), and sample folders drawn from another export
are drawn again (``core.sample``).
"""

from __future__ import annotations

import argparse
import copy
import dataclasses
import hashlib
import json
import os
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from importlib.metadata import version
from pathlib import Path

import numpy as np
import torch

from core.config import RunConfig, apply_overrides
from core.models import sampler_name
from core.data import ImageData
from core.runlog import RunLock, read_jsonl, run_name, write_atomic
from core.sample import load_pngs, sample_pipeline, save_grid
from core.train import recorded_shared, train, training_overrides
from eval.records import (RECORDS, ROOT, SCALES, RecordError, append_record, cpu_cores, load_records,
                          recorded)


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


SMOKE = [
    "model.block_out_channels=[16,32]", "model.norm_num_groups=8", "model.layers_per_block=1", "model.attention=[]", "model.mid_attention=false",
    "train.steps=3", "train.batch_size=4", "train.checkpoint_every=2", "train.log_every=1", "train.warmup_steps=1",
    "context.hidden_dim=8", "context.latent_dim=4", "diffusion.sampling_steps=2", "data.num_examples=16",
    # fp32 for every preset: smoke runs all presets in one process, and accelerate fixes the precision of a
    # process at its first Accelerator (the paper presets' bf16 path has its own test, tests/test_precision.py)
    "train.mixed_precision=no", "train.allow_tf32=false", "data.num_workers=0",
]


def smoke_config(preset: Preset, seed: int, workdir: Path, overrides: list[str] = ()) -> RunConfig:
    """The preset shrunk to seconds; paper presets get generated stand-ins for data and weights. ``overrides`` (the
    user's ``--set``) apply last, so they win over the shrinking."""
    d = preset.run_config(seed).to_dict()
    over = list(SMOKE)
    if preset.scale == "paper":
        over += [f"data.source={make_fake_imagefolder(workdir / 'fake-data', d['data']['channels'])}", "data.resolution=16"]
    if d["backbone"] == "latent":
        channels = d['data']['channels']
        over += [f"model.vae={make_random_autoencoder(workdir / f'random-vae-c{channels}', channels)}",
                 "model.vae_revision=null", "model.vae_subfolder=null"]
    if d["backbone"] == "discrete":
        over += ["diffusion.num_train_timesteps=4", "diffusion.sampling_steps=4"]
    if d["model"].get("cross_attention_dim"):
        over += ["model.attention=[false,true]", "model.text_encoder=minilm", "model.text_encoder_revision=null",
                 "model.cross_attention_dim=384"]
    return RunConfig.from_dict(apply_overrides(d, over + list(overrides)))


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


def continue_from(source: Path, run_dir: Path, steps: int) -> None:
    """Start ``run_dir`` from ``source``'s checkpoint at ``steps`` (hard links where the filesystem allows, else
    copies; into a temporary folder renamed into place), with its ``stats.jsonl`` rows up to that step and its
    ``env.json``. Does nothing once ``run_dir`` has a checkpoint. Raises FileNotFoundError if ``source`` holds no
    checkpoint at ``steps``."""
    import shutil

    from core.train import CHECKPOINTS, list_checkpoints

    if list_checkpoints(run_dir):
        return
    found = dict(list_checkpoints(source))
    if steps not in found:
        raise FileNotFoundError(f"{source} has no complete checkpoint at step {steps} to continue from "
                                f"(has: {sorted(found) or 'none'})")
    dst = run_dir / CHECKPOINTS / f"checkpoint-{steps}"
    tmp = dst.with_name(f"tmp-continue-{steps}")
    shutil.rmtree(tmp, ignore_errors=True)

    def link(src: str, dst: str) -> None:
        try:
            os.link(src, dst)
        except OSError:
            shutil.copy2(src, dst)

    shutil.copytree(found[steps], tmp, copy_function=link)
    rows = [r for r in read_jsonl(source / "stats.jsonl") if r["step"] <= steps]
    write_atomic(run_dir / "stats.jsonl", "".join(json.dumps(r, sort_keys=True) + "\n" for r in rows))
    if (source / "env.json").exists():
        shutil.copyfile(source / "env.json", run_dir / "env.json")
    os.replace(tmp, dst)


def make_fake_imagefolder(path: Path, channels: int, n: int = 16) -> Path:
    """A tiny imagefolder of random PNGs with captions, ``train/`` and a held-out ``test/`` split as the prepare
    step writes them (smoke tests only)."""
    from PIL import Image

    rng = np.random.default_rng(0)
    for split in ("train", "test"):
        if (path / split / "metadata.jsonl").exists():
            continue
        (path / split).mkdir(parents=True, exist_ok=True)
        lines = []
        for i in range(n):
            arr = rng.integers(0, 256, (24, 24, 3) if channels == 3 else (24, 24), dtype=np.uint8)
            Image.fromarray(arr).save(path / split / f"{i:03d}.png")
            lines.append(json.dumps({"file_name": f"{i:03d}.png", "caption": f"random {split} image {i}"}))
        (path / split / "metadata.jsonl").write_text("\n".join(lines) + "\n")
    return path


def make_random_autoencoder(path: Path, channels: int) -> Path:
    """A randomly initialised tiny AutoencoderKL (smoke tests only; measures nothing)."""
    from diffusers import AutoencoderKL

    if not (path / "config.json").exists():
        torch.manual_seed(0)
        AutoencoderKL(
            in_channels=channels, out_channels=channels, down_block_types=("DownEncoderBlock2D",) * 2,
            up_block_types=("UpDecoderBlock2D",) * 2, block_out_channels=(8, 16), latent_channels=4, norm_num_groups=4,
        ).save_pretrained(path)
    return path


def tensor_hash(x: torch.Tensor) -> str:
    return hashlib.sha256(x.float().numpy().tobytes()).hexdigest()[:16]


def exported_checkpoint(run_dir: Path) -> int:
    """The training step ``run_dir/pipeline`` was exported from (its ``provenance.json``); raises if unknown."""
    from core.runlog import read_provenance

    prov = read_provenance(run_dir / "pipeline")
    if prov is None or prov.get("checkpoint") is None:
        raise FileNotFoundError(f"{run_dir / 'pipeline'} does not say which checkpoint it was exported from (no "
                                f"provenance.json): re-run `python -m core.train --run-dir {run_dir}` to export it again")
    return int(prov["checkpoint"])


def trained_model(run_dir: Path, cfg: RunConfig, overrides: dict | None) -> dict:
    """The record fields naming the model ``run_dir/pipeline`` holds (:data:`eval.records.MODEL_FIELDS`): the
    training config's hash, the export's files hash (``provenance.json``), and the training keys overridden
    against the preset (None: not known, e.g. a caller outside :func:`main`; then the field is left out)."""
    from core.runlog import read_provenance
    from core.train import training_config_sha256

    prov = read_provenance(run_dir / "pipeline") or {}
    model = {"train_config_sha256": training_config_sha256(cfg), "weights_sha256": prov.get("sha256")}
    return model if overrides is None else {**model, "overrides": overrides}


def record_key(experiment: str, preset: Preset, cfg: RunConfig, run_dir: Path, scale: str, n_samples: int,
               sampler: str, overrides: dict | None = None) -> dict:
    """What a record of this run's evaluation is keyed on: the measurement (experiment, preset, seed, checkpoint,
    sample count, scale, sampler) and the trained model (:func:`trained_model`). Raises
    :class:`~eval.records.OtherModelError` from :func:`check_records` if records of another model stand there."""
    return dict(experiment=experiment, preset=preset.name, seed=cfg.train.seed, checkpoint=exported_checkpoint(run_dir),
                n_samples=n_samples, scale=scale, sampler=sampler, **trained_model(run_dir, cfg, overrides))


def check_records(records: list[dict], key: dict, path: Path) -> None:
    """Refuse to add this model's measurements beside current ones of another model of the same (experiment, preset,
    seed, scale, checkpoint) in ``path`` (:func:`eval.records.check_same_model`)."""
    from eval.records import MODEL_FIELDS, check_same_model

    check_same_model(records, {k: key[k] for k in MODEL_FIELDS if k in key}, path,
                     **{k: key[k] for k in ("experiment", "preset", "seed", "scale", "checkpoint")})


def evaluate_unconditional(
    experiment: str, preset: Preset, cfg: RunConfig, run_dir: Path, scale: str, num_samples: int, records_path: Path,
    prompts: list[str] | None = None, labels: list[int] | None = None, step_time: bool = True,
    overrides: dict | None = None,
) -> list[dict]:
    """Sample ``num_samples`` images (seeds 0..N-1) and record the proxy metrics (mini) or FID (paper).

    Text-to-image passes one prompt per seed (and, for digits, the label each prompt names -> ``prompt_acc``).
    ``step_time=False`` (runs that shared the machine) records no ``step_time_s``: it would measure the contention.
    ``overrides``: the training keys this run overrides against its preset (recorded; :func:`trained_model`).
    """
    from eval.metrics import check_num_samples, small_sample_note

    check_num_samples(num_samples)
    sampler = sampler_name(cfg.diffusion, cfg.backbone)
    from eval.context_stats import fd_context, metric_name as context_metric

    metric_names = ("fd_digits", "kid_digits", "precision_digits", "recall_digits", "confident_digits",
                    context_metric())
    metric_names += ("step_time_s",) if step_time else ()
    metric_names += ("prompt_acc",) if labels is not None else ()
    key = record_key(experiment, preset, cfg, run_dir, scale, num_samples, sampler, overrides)
    existing = load_records(records_path)
    check_records(existing, key, records_path)
    missing = [m for m in metric_names if not recorded(existing, metric=m, **key)]
    if not missing:
        return []
    paths = sample_pipeline(run_dir / "pipeline", run_dir / "samples" / sampler, range(num_samples),
                            cfg.diffusion.sampler, cfg.diffusion.sampling_steps, prompts=prompts,
                            guidance_scale=cfg.diffusion.guidance_scale, clip_sample=cfg.diffusion.clip_sample,
                            eta=cfg.diffusion.eta, dtype=cfg.diffusion.sampling_dtype,
                            batch_size=cfg.diffusion.sampling_batch or None,
                            timestep_spacing=cfg.diffusion.timestep_spacing, steps_offset=cfg.diffusion.steps_offset)
    from accelerate import PartialState

    if not PartialState().is_main_process:  # sampling is split over processes; measuring is not
        return []
    save_grid(paths[:64], run_dir / "grid.png")
    if scale == "paper":
        return record_fid(experiment, preset, key, run_dir / "samples" / sampler, records_path, cfg.data.source)
    if cfg.data.source != "digits" or cfg.data.channels != 1:
        return []  # smoke runs on stand-in data: nothing meaningful to measure
    from eval.metrics import digits_proxy_metrics

    ref_cfg = copy.deepcopy(cfg.data)
    ref_cfg.split, ref_cfg.num_examples = "train", None
    real_data = ImageData(ref_cfg)
    real = real_data.images(range(len(real_data)))
    fake = load_pngs(paths)
    values = digits_proxy_metrics(fake, real, None if labels is None else np.array(labels))
    values[context_metric()] = fd_context(fake, real)  # the mechanism metric: neighborhood statistics
    values["step_time_s"] = median_step_time(run_dir)
    backend = f"digits classifier r{cfg.data.resolution} + clean-fid {version('clean-fid')} " \
              f"+ torch-fidelity {version('torch-fidelity')}"
    out = []
    for metric in missing:
        rec = dict(key, benchmark=preset.benchmark, method=preset.method, metric=metric, value=values[metric], ema=True,
                   reference=f"digits train split r{cfg.data.resolution} ({len(real)} images, "
                   f"sha {tensor_hash(real)})", backend={
                       "step_time_s": "median of stats.jsonl step_time over the second half of training "
                                      "(wall clock, this machine)",
                       context_metric(): f"eval.context_stats (dilated rings, sorted sets) + clean-fid "
                                         f"{version('clean-fid')} frechet_distance"}.get(metric, backend))
        note = small_sample_note(num_samples, metric)
        if note:
            rec["note"] = note
        if append_record(rec, records_path):
            out.append(rec)
    return out


def median_step_time(run_dir: Path) -> float:
    """Median logged optimizer-step time over the second half of training (seconds)."""
    rows = read_jsonl(run_dir / "stats.jsonl")
    half = [r["step_time"] for r in rows[len(rows) // 2 :]]
    return float(np.median(half)) if half else float("nan")


def record_fid(experiment: str, preset: Preset, key: dict, samples: Path, records_path: Path,
               data_source: str | None = None) -> list[dict]:
    """The paper-scale protocol (:func:`eval.protocols.record_unconditional`): FID-N through clean-fid and through
    torch-fidelity, and precision/recall k=3; ``data_source`` (default the preset's) gives the reference images."""
    from eval.protocols import record_unconditional

    source = data_source or preset.config.get("data", {}).get("source", "")
    return record_unconditional(key, preset.benchmark, preset.method, samples, records_path, source)


def keep_artifacts(experiment: str, run_dir: Path, results: Path = ROOT / "results") -> None:
    """Copy the run's training curve and sample grid under ``results`` (committed; figures are drawn from them)."""
    import shutil

    from accelerate import PartialState

    if not PartialState().is_main_process:
        return
    for src, sub in ((run_dir / "stats.jsonl", "curves"), (run_dir / "grid.png", "grids")):
        if src.exists():
            dst = results / sub / experiment / f"{run_dir.name}{src.suffix}"
            dst.parent.mkdir(parents=True, exist_ok=True)
            shutil.copyfile(src, dst)


def check_trained_models(experiment: str, tasks: list[tuple[Preset, int]], configs: dict, overrides: dict, scale: str,
                         records: Path) -> None:
    """Before any compute: raise :class:`~eval.records.OtherModelError` if ``records`` holds current measurements of
    a (preset, seed) of this command made on a model trained with another config (another
    ``train_config_sha256``, or a legacy record while this run overrides training keys). Another model of the same
    config (a retrained draw) can only be told by its weights, after training (:func:`check_records`)."""
    from core.train import training_config_sha256
    from eval.records import check_same_model

    existing = load_records(records)
    for preset, seed in tasks:
        model = {"train_config_sha256": training_config_sha256(configs[preset.name, seed]),
                 "overrides": overrides[preset.name, seed]}
        check_same_model(existing, model, records, experiment=experiment, preset=preset.name, seed=seed, scale=scale)


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


def train_run(preset: Preset, seed: int, presets: list[Preset], args: argparse.Namespace,
              cfg: RunConfig | None = None) -> Path:
    """Train (or resume) the run of (preset, seed) in ``args.runs_dir``; a preset that ``continues`` another starts,
    when it has no checkpoint yet, from that preset's run of the same seed (trained first if needed, and so on down
    its chain: :func:`continue_from`). ``cfg``: the run's config when already resolved (else resolved here).
    Returns the run directory."""
    from .cluster import run_dir_for

    cfg, run_dir = cfg or run_config(preset, seed, args), run_dir_for(args.runs_dir, args.scale, preset.name, seed)
    main_rank = int(os.environ.get("RANK", "0")) == 0
    with RunLock(run_dir, enabled=main_rank):
        if preset.continues:
            from core.train import list_checkpoints

            if not list_checkpoints(run_dir):  # every process sees the same folder (main writes it after a barrier)
                source = next(p for p in presets if p.name == preset.continues)
                source_dir = train_run(source, seed, presets, args)
                if main_rank:
                    with RunLock(source_dir):
                        continue_from(source_dir, run_dir, run_config(source, seed, args).train.steps)
        train(cfg, run_dir, report_to=args.report_to, shared_device=args.shared_device)
    return run_dir


def worker_argv(args: argparse.Namespace, records: Path, shared_device: bool) -> list[str]:
    """The arguments every worker of a sweep gets besides ``--presets``/``--seeds`` (``--jobs`` and ``--launcher``)."""
    return ["--scale", args.scale, "--runs-dir", str(args.runs_dir.resolve()), "--records", str(records.resolve()),
            *(["--shared-device"] if shared_device else []), "--no-tables",
            *(["--num-samples", str(args.num_samples)] if args.num_samples else []),
            *(["--report-to", args.report_to] if args.report_to != "none" else []),
            *(x for o in args.overrides for x in ("--set", o)),
            *(x for o in getattr(args, "eval_options", []) for x in ("--eval", o)),
            *(["--allow-missing-metrics"] if getattr(args, "allow_missing_metrics", False) else []),
            *(["--sampling-steps", str(args.sampling_steps)] if getattr(args, "sampling_steps", None) else [])]


def run_in_parallel(
    experiment: str, tasks: list[tuple[Preset, int]], args: argparse.Namespace, records: Path,
    gpus: list[str] | None = None,
) -> None:
    """Run each (preset, seed) as ``python -m experiments.<experiment>`` in its own process, ``args.jobs`` at a time.

    Workers share the cores evenly (``OMP_NUM_THREADS``), record no step time (``--shared-device``) and
    append to the same records file; the longest presets start first. Each starting worker gets the GPU the
    fewest running workers hold (``CUDA_VISIBLE_DEVICES``; ``gpus`` defaults to the visible ones, see
    :func:`experiments.cluster.visible_gpus`). While they run, one line per run shows its step of total, it/s and
    time left, read from the run's ``stats.jsonl`` (:class:`experiments.cluster.ProgressBoard`; redrawn in place on
    a terminal, a line per moving run every ``args.progress_every`` seconds otherwise). A failed run is reported
    and the others go on; re-running the same command resumes the failed ones.
    """
    import os
    import subprocess
    import sys
    from concurrent.futures import ThreadPoolExecutor

    from .cluster import GpuPool, ProgressBoard, RunWatch, run_dir_for, visible_gpus

    env = dict(os.environ, OMP_NUM_THREADS=str(max(1, cpu_cores() // args.jobs)))
    logs = args.runs_dir / "logs"
    logs.mkdir(parents=True, exist_ok=True)
    common = worker_argv(args, records, shared_device=True)
    pool = GpuPool(visible_gpus() if gpus is None else gpus)
    if args.scale != "smoke":  # shared preparations (an autoencoder) once, before workers could race to make them
        for prepare in dict.fromkeys(p.prepare for p, _ in tasks if p.prepare is not None):
            prepare()
    # runs that continue another start after it (shorter chains first), then the longest presets first
    by_name = {p.name: p for p, _ in tasks}

    def depth(p: Preset) -> int:
        return 0 if p.continues is None or p.continues not in by_name else 1 + depth(by_name[p.continues])

    longest_first = sorted(tasks, key=lambda t: (depth(t[0]), -(t[0].expected_minutes or 0)))
    watches = {(p.name, s): RunWatch(run_name(p.name, s), run_dir_for(args.runs_dir, args.scale, p.name, s))
               for p, s in longest_first}
    board = ProgressBoard(list(watches.values()), args.progress_every)

    def run(task: tuple[Preset, int]) -> tuple[str, int]:
        preset, seed = task
        name, t0, watch = run_name(preset.name, seed), time.time(), watches[(preset.name, seed)]
        log = logs / f"{experiment}-{name}.log"
        gpu = pool.acquire()
        worker_env = env if gpu is None else dict(env, CUDA_VISIBLE_DEVICES=gpu)
        watch.start(t0, "" if gpu is None else f"GPU {gpu}")
        board.message(f"== {experiment} / {name}: started{'' if gpu is None else f' on GPU {gpu}'}, log {log}")
        try:
            with open(log, "a") as f:
                rc = subprocess.run([sys.executable, "-m", f"experiments.{experiment}", "--presets", preset.name,
                                     "--seeds", str(seed), *common], stdout=f, stderr=subprocess.STDOUT,
                                    env=worker_env).returncode
        finally:
            pool.release(gpu)
        watch.state = "done" if rc == 0 else "failed"
        board.message(f"== {experiment} / {name}: {'done' if rc == 0 else f'FAILED (exit {rc}, see {log})'} "
                      f"in {time.time() - t0:.0f} s")
        return name, rc

    with board, ThreadPoolExecutor(args.jobs) as workers:
        failed = [name for name, rc in workers.map(run, longest_first) if rc != 0]
    if failed:
        raise SystemExit(f"{len(failed)} run(s) failed: {', '.join(failed)}; their logs are in {logs}. "
                         "Re-running the same command resumes them.")


def main(
    experiment: str, presets: list[Preset], doc: str, argv: list[str] | None = None,
    evaluate: Callable = evaluate_unconditional,
) -> None:
    names = "\n".join(f"  {p.name:40s} {p.scale:9s} paper: {p.paper}"
                      + (f" (~{p.expected_minutes:g} min/seed on 2 CPU cores"
                         f"{', estimated' if p.minutes_estimated else ''})" if p.expected_minutes else "")
                      for p in presets)
    parser = argparse.ArgumentParser(
        prog=f"python -m experiments.{experiment}", description=doc + "\n\npresets:\n" + names,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("--scale", choices=SCALES, default="mini")
    parser.add_argument("--seeds", default="0", help="training seeds, e.g. 0,1,2")
    parser.add_argument("--presets", help="comma-separated subset of the scale's presets")
    parser.add_argument("--runs-dir", type=Path, default=ROOT / "runs")
    parser.add_argument("--records", type=Path, help=f"records file (default {RECORDS.relative_to(ROOT)}; smoke: in runs-dir)")
    parser.add_argument("--num-samples", type=int, help="override the preset's number of evaluation samples")
    parser.add_argument("--eval", dest="eval_options", action="append", default=[], metavar="KEY=VALUE",
                        help="override one of a preset's evaluation options (its `extra`, e.g. inpainting's RePaint "
                             "steps, jump_length, jump_n_sample, eta); unknown keys are refused. Sampling batch per "
                             "process: --set diffusion.sampling_batch=N")
    parser.add_argument("--shared-device", action="store_true",
                        help="other runs share this machine at the same time: record no step_time_s (it would time the contention); "
                             "kept in each run's env.json, so a later evaluation of a run trained this way records "
                             "none either")
    parser.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                        help="extra config override for every preset (recorded in the run's config.yaml)")
    parser.add_argument("--jobs", type=int, default=1,
                        help="run this many (preset, seed) runs at once, each in its own process with cores/jobs threads "
                             "and, where GPUs exist, the least used GPU (CUDA_VISIBLE_DEVICES, round robin); shows one "
                             "progress line per run (implies --shared-device; logs in <runs-dir>/logs/)")
    parser.add_argument("--progress-every", type=float, default=None, metavar="SECONDS",
                        help="--jobs/--launcher local: refresh the progress lines this often (default 1 on a terminal; "
                             "60 otherwise, a line per run whose step moved)")
    parser.add_argument("--report-to", "--report_to", choices=("none", "tensorboard", "wandb"), default="none",
                        help="also log every stats.jsonl row (loss terms, LR) to this accelerate tracker "
                             "(<run>/tracking/; needs the tracker's pip package)")
    parser.add_argument("--no-tables", action="store_true", help=argparse.SUPPRESS)  # set for --jobs' workers
    parser.add_argument("--print-config", action="store_true",
                        help="print each chosen (preset, seed) run's resolved config as YAML (--set applied, smoke "
                             "shrinking at --scale smoke), with its training-config hash and overridden keys, and exit")
    parser.add_argument("--sampling-steps", type=int, metavar="N",
                        help="sample with N steps, with every sampler of the chosen presets (their own and each extra "
                             "one, e.g. CelebA-HQ's 500 and 200 DDIM steps): a rehearsal or a pilot of evaluation; the "
                             "records name the sampler with N. Inpainting's RePaint steps: --eval steps=N")
    parser.add_argument("--allow-missing-metrics", action="store_true",
                        help="paper scale: train and sample even if a metric's inputs (Inception or AlexNet weights, FID "
                             "statistics or reference images) are missing; those metrics are not measured, and the "
                             "preflight and evaluation name them (used by `python -m experiments.rehearse`)")
    parser.add_argument("--check", action="store_true",
                        help="only check that every input of the chosen presets is present (data, weights, FID "
                             "statistics, prompts), list the missing ones with the command that provides each, and exit "
                             "(paper runs always check first)")
    from .cluster import add_arguments, check_arguments

    add_arguments(parser)
    args = parser.parse_args(argv)
    if args.jobs < 1:
        parser.error(f"--jobs must be >= 1, got {args.jobs}")
    check_arguments(parser, args)
    if args.progress_every is None:
        args.progress_every = 1.0 if sys.stdout.isatty() else 60.0
    if args.progress_every <= 0:
        parser.error(f"--progress-every must be > 0 seconds, got {args.progress_every}")
    if args.report_to != "none":
        from core.tracking import check_tracker

        try:
            check_tracker(args.report_to)
        except ImportError as e:
            parser.error(str(e))
    if args.sampling_steps is not None:
        if args.sampling_steps < 1:
            parser.error(f"--sampling-steps must be >= 1, got {args.sampling_steps}")
        args.overrides = [*args.overrides, f"diffusion.sampling_steps={args.sampling_steps}"]
    if args.allow_missing_metrics:  # read by eval (eval.metrics.missing_metrics_allowed), inherited by workers
        from eval.metrics import ALLOW_MISSING_METRICS_ENV

        os.environ[ALLOW_MISSING_METRICS_ENV] = "1"
    seeds = [int(s) for s in args.seeds.split(",")]
    chosen = [p for p in presets if args.scale == "smoke" or p.scale == args.scale]
    if not chosen:
        parser.error(f"no presets at --scale {args.scale} in this experiment; its scales: "
                     f"{', '.join(sorted({p.scale for p in presets}))} (and smoke)")
    if args.presets:
        wanted = args.presets.split(",")
        unknown = sorted(set(wanted) - {p.name for p in presets})
        if unknown:
            parser.error(f"unknown preset(s) {', '.join(unknown)}; choose from: {', '.join(p.name for p in presets)}")
        chosen = [p for p in chosen if p.name in wanted]
    if args.sampling_steps is not None:
        chosen = [dataclasses.replace(p, extra_samplers=tuple(dict(e, sampling_steps=args.sampling_steps)
                                                              for e in p.extra_samplers)) for p in chosen]
    if args.eval_options:
        try:
            chosen = [with_eval_options(p, args.eval_options) for p in chosen]
        except ValueError as e:
            parser.error(str(e))
    records = args.records or (args.runs_dir / "smoke-records.jsonl" if args.scale == "smoke" else RECORDS)
    # Only runs recorded in the committed records file update results/ and tables/; any other
    # --records file (a pilot, a sweep) gets its artifacts and tables next to it.
    home = ROOT if records.resolve() == RECORDS.resolve() else records.parent
    tasks = list({(p.name, s): (p, s) for p in chosen for s in seeds}.values())  # --seeds 0,0: one run, not two
    configs, overrides = {}, {}  # every run's config, resolved and validated before any compute: one line per bad --set
    for preset, seed in tasks:
        try:
            configs[preset.name, seed] = run_config(preset, seed, args)
        except ValueError as e:  # ConfigError too
            parser.error(f"{preset.name}: {e}")
        overrides[preset.name, seed] = training_overrides(run_config(preset, seed, args, []), configs[preset.name, seed])
        try:
            sampler_configs(preset, configs[preset.name, seed])
        except ValueError as e:
            parser.error(str(e))
        if preset.continues and preset.continues not in {p.name for p in presets}:
            parser.error(f"{preset.name} continues {preset.continues!r}, which is not a preset of this experiment")
    if args.print_config:
        import yaml

        from core.train import training_config_sha256

        for preset, seed in tasks:
            cfg = configs[preset.name, seed]
            print(f"# {preset.name} seed {seed}: train_config_sha256 {training_config_sha256(cfg)}; training keys "
                  f"overridden: {overrides[preset.name, seed] or 'none'}"
                  + (f"; continues {preset.continues}" if preset.continues else "")
                  + (f"; also sampled with {list(preset.extra_samplers)}" if preset.extra_samplers else ""))
            print(yaml.safe_dump(cfg.to_dict(), sort_keys=False), end="---\n")
        return
    try:  # records of another trained model of the same preset and seed: refused before any compute
        check_trained_models(experiment, tasks, configs, overrides, args.scale, records)
    except RecordError as e:
        parser.error(str(e))
    if args.scale != "smoke":  # sample counts every metric can use, before any training
        from eval.metrics import check_num_samples

        for preset in chosen:
            try:
                check_num_samples(args.num_samples or preset.num_samples)
            except ValueError as e:
                parser.error(f"{preset.name}: {e}")
    if args.check or args.scale == "paper":
        from .preflight import report

        checked = [(p, configs[p.name, seeds[0]]) for p in chosen] if args.scale != "smoke" else []
        ok, text = report(experiment, checked, paper=args.scale == "paper", check_only=args.check,
                          allow_missing_metrics=args.allow_missing_metrics)
        if int(os.environ.get("RANK", "0")) == 0:  # under `accelerate launch`, one report, not one per process
            print(text, flush=True)
        if not ok:
            raise SystemExit(1)
        if args.check:
            return
    from .cluster import run_dir_for

    if args.launcher:
        from .cluster import launch

        launch(experiment, tasks, args, records, worker_argv(args, records, shared_device=args.launcher == "local"
                                                             and args.jobs > 1))
        if args.launcher == "slurm":
            return
        tasks = []
    elif args.jobs > 1:
        run_in_parallel(experiment, tasks, args, records)
        tasks = []
    for preset, seed in tasks:
        t0 = time.time()
        cfg = configs[preset.name, seed]
        run_dir = run_dir_for(args.runs_dir, args.scale, preset.name, seed)  # shared by experiments using the preset
        # smoke: enough for k-NN precision/recall (k = 3)
        num_samples = 8 if args.scale == "smoke" else args.num_samples or preset.num_samples
        print(f"== {experiment} / {preset.name} / seed {seed} -> {run_dir}", flush=True)
        if preset.prepare is not None and args.scale != "smoke":
            preset.prepare()
        with RunLock(run_dir, enabled=int(os.environ.get("RANK", "0")) == 0):  # train, sample, evaluate: one owner
            train_run(preset, seed, presets, args, cfg)
            shared = recorded_shared(run_dir)  # step times are the training's: valid if it had the machine to itself
            for sampling in sampler_configs(preset, cfg):
                evaluate(experiment, preset, sampling, run_dir, args.scale, num_samples, records,
                         step_time=not (args.shared_device if shared is None else shared),
                         overrides=overrides[preset.name, seed])
        if args.scale != "smoke":
            keep_artifacts(experiment, run_dir, home / "results")
        print(f"== done in {time.time() - t0:.0f} s", flush=True)
    from core.train import end_distributed

    main_process = int(os.environ.get("RANK", "0")) == 0
    end_distributed()  # after every run's last barrier; tables are rank 0's alone
    if args.scale != "smoke" and not args.no_tables and main_process:
        from eval.tables import write_tables

        from .registry import table_specs

        write_tables(records, home / "tables", specs=table_specs())
        table = home / "tables" / f"{experiment}.md"
        if table.exists():
            print(table.read_text())
