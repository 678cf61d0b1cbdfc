"""Evaluation: sample a run's export, measure it, and append one record per metric (one record key per model).

:func:`record_key` names what a record measures (experiment, preset, seed, checkpoint, samples, scale, sampler) and
the model it measured (:func:`trained_model`); :func:`evaluate_unconditional` samples and records the proxy metrics
(mini) or the paper protocol (paper); :func:`check_trained_models` refuses, before any compute, to mix two models'
measurements of one (preset, seed).
"""

from __future__ import annotations

import copy
import hashlib
from pathlib import Path

import numpy as np
import torch

from core.config import RunConfig
from core.data import ImageData
from core.models import sampler_name
from core.runlog import read_jsonl
from core.sample import load_pngs, sample_pipeline, save_grid
from eval.metric_specs import backend as metric_backend
from eval.records import append_record, load_records, recorded

from .presets import Preset


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
    out = []
    for metric in missing:
        rec = dict(key, benchmark=preset.benchmark, method=preset.method, metric=metric, value=values[metric], ema=True,
                   reference=f"digits train split r{cfg.data.resolution} ({len(real)} images, "
                   f"sha {tensor_hash(real)})", backend=metric_backend(metric, resolution=cfg.data.resolution))
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

def measured_models_gone(experiment: str, tasks: list[tuple[Preset, int]], configs: dict, scale: str, records: Path,
                         runs_dir: Path, source_steps: dict[str, int] | None = None) -> tuple[dict, list[str]]:
    """Before any compute, the runs of this command whose model is measured by current records of ``records`` at
    its final step while its run folder holds neither an export nor a checkpoint of that step (deleted, moved, or a
    fresh machine). Training such a run again draws another model (bit-identical only on a deterministic CPU run),
    which those records would refuse after the whole training (:func:`check_records`).

    Returns ``({(preset, seed): why}, notes)``: the runs to skip, one line each saying what to do (restore the folder,
    or supersede the records to draw it again); and a line for each run that ``continues`` a shorter run so measured
    and gone, which is trained again first (``source_steps``: the final step of each continued preset), so that the
    longer run continues a retrain of the measured one (:func:`experiments.scaling.report.continuations` says how
    close)."""
    from core.train import exported_checkpoint, list_checkpoints

    from .cluster import run_dir_for

    existing = load_records(records)

    def gone(preset: str, seed: int, steps: int) -> tuple[list[str], Path] | None:
        key = dict(experiment=experiment, preset=preset, seed=seed, scale=scale, checkpoint=steps)
        samplers = sorted({r["sampler"] for r in existing if recorded([r], **key)})
        run_dir = run_dir_for(runs_dir, scale, preset, seed)
        if not samplers or exported_checkpoint(run_dir / "pipeline") == steps or steps in dict(list_checkpoints(run_dir)):
            return None
        return samplers, run_dir

    skip, notes = {}, []
    for preset, seed in tasks:
        steps = configs[preset.name, seed].train.steps
        if found := gone(preset.name, seed, steps):
            samplers, run_dir = found
            skip[preset.name, seed] = (
                f"{preset.name} seed {seed}: skipped, its step {steps:,} is measured in {records} "
                f"({', '.join(samplers)}) but {run_dir} holds no export or checkpoint of that step: training again "
                f"would draw another model, which those records refuse. Restore the run folder, or to draw it again: "
                f"python -m eval.records supersede --records {records} --where experiment={experiment} --where "
                f"preset={preset.name} --where seed={seed} --where scale={scale} --note 'why, and what replaced them'")
        elif preset.continues and (source := gone(preset.continues, seed, (source_steps or {})[preset.continues])):
            notes.append(f"{preset.name} seed {seed}: continues {preset.continues} seed {seed}, measured in {records} "
                         f"but gone from {source[1]}: trained again first (the same seed and draws; bit-identical "
                         f"only on a deterministic CPU run, so this run may continue another draw of it)")
    return skip, notes
