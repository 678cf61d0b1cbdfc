"""Inpaint held-out images under the six masks and record the metrics (resumable per image).

Fills are kept per (sampler, mask) with the pipeline's checkpoint as provenance (fills of another
export are drawn again), and a metric already recorded for this checkpoint is neither measured nor
appended again.
"""

from __future__ import annotations

import copy
from pathlib import Path

import numpy as np
import torch

from core.config import RunConfig
from core.data import ImageData
from core.inpaint import MASK_KINDS, MASK_VERSION, make_mask, repaint, repaint_sampler_name
from core.masks import DEFAULT_MASKS_DIR, paper_masks
from core.runlog import staged
from core.sample import (default_batch, load_png, load_unet, pipeline_provenance, save_grid, to_uint8,
                         write_missing_pngs)
from eval.records import append_record, load_records, recorded

from ..evaluate import check_records, record_key, tensor_hash
from ..presets import Preset

METRICS = ("percep_digits", "mse_hole", "psnr_hole")


def metric_names(scale: str, cfg: RunConfig, channels: int) -> tuple[str, ...]:
    """The metrics :func:`inpainting_metrics` measures and :func:`evaluate_inpainting` records at ``scale``."""
    if scale == "paper":
        return ("mse_hole", "psnr_hole", "lpips_alex")
    if channels == 1 and (scale != "smoke" or cfg.data.source == "digits"):
        return METRICS
    return ("mse_hole", "psnr_hole")


def evaluate_inpainting(
    experiment: str, preset: Preset, cfg: RunConfig, run_dir: Path, scale: str, num_samples: int, records_path: Path,
    step_time: bool = True,  # accepted for the common signature; inpainting trains nothing, so it times nothing
    overrides: dict | None = None,
) -> list[dict]:
    from accelerate import PartialState
    from diffusers import DDPMScheduler

    state = PartialState(cpu=not torch.cuda.is_available())
    opts = preset.extra
    if not 0 <= opts.get("eta", 1.0) <= 1:
        raise ValueError(f"preset {preset.name}: extra['eta']={opts['eta']}; "
                         "allowed: 0 <= eta <= 1 (1 = ancestral, as RePaint)")
    n = num_samples if scale != "smoke" else 4  # test images: the preset's num_samples, or --num-samples
    steps, jump, resample = (opts["steps"], opts["jump_length"], opts["jump_n_sample"]) if scale != "smoke" else (4, 2, 2)
    test_cfg = copy.deepcopy(cfg.data)
    test_cfg.split, test_cfg.num_examples = "test", n
    images = ImageData(test_cfg).images(range(n))
    unet = load_unet(run_dir / "pipeline").to(state.device).eval()
    sched_config = DDPMScheduler.from_pretrained(run_dir / "pipeline" / "scheduler").config
    clip, eta = cfg.diffusion.clip_sample, opts.get("eta", 1.0)
    sampler = repaint_sampler_name(steps, jump, resample, eta, clip)
    # The masks are part of the reference: records of another mask generator are never averaged with these.
    reference = f"{test_cfg.source} test split, first {n} (sha {tensor_hash(images)}); masks v{MASK_VERSION}"
    wanted = metric_names(scale, cfg, images.shape[1])
    pipeline = pipeline_provenance(run_dir / "pipeline")
    existing = load_records(records_path)
    run_key = record_key(experiment, preset, cfg, run_dir, scale, n, sampler, overrides)
    check_records(existing, run_key, records_path)
    out = []
    for kind in MASK_KINDS:
        masks, kind_reference = None, reference
        if scale == "paper":  # RePaint's released mask files when present, else LaMa's thick/thin generator
            masks, mask_ref = paper_masks(kind, n, images.shape[-1], opts.get("masks_dir", DEFAULT_MASKS_DIR))
            kind_reference = reference.replace(f"masks v{MASK_VERSION}", mask_ref)
        key = dict(run_key, benchmark=f"{preset.benchmark}/{kind}", reference=kind_reference)
        if all(recorded(existing, metric=m, **key) for m in wanted):
            continue
        if masks is None:
            masks = torch.stack([make_mask(kind, images.shape[-1], seed=i) for i in range(n)])

        def render(chunk: list[int]) -> np.ndarray:
            return to_uint8(repaint(unet, sched_config, images[chunk], masks[chunk], chunk, steps, jump, resample,
                                    state.device, clip, eta))

        provenance = {"pipeline": pipeline, "sampler": sampler, "mask": kind, "masks": tensor_hash(masks),
                      "images": tensor_hash(images)}
        batch = cfg.diffusion.sampling_batch or default_batch(state.device)
        paths = write_missing_pngs(run_dir / "inpainting" / sampler / kind, range(n), batch, render, state, provenance,
                                   run_dir / "pipeline")
        if not state.is_main_process:
            continue
        save_grid(paths[:16], run_dir / "inpainting" / f"{kind}.png", columns=8)
        done = torch.stack([load_png(p) for p in paths])
        values = inpainting_metrics(done, images, masks, scale)
        for metric, value in values.items():
            rec = dict(key, method=preset.method, metric=metric, value=value, ema=True, backend=metric_backend(metric))
            if metric in wanted and not recorded(existing, metric=metric, **key) and append_record(rec, records_path):
                out.append(rec)
    return out


def metric_backend(metric: str) -> str:
    """What measured ``metric`` (recorded with it): LPIPS names its package and AlexNet file (sha256 prefix)."""
    if metric == "lpips_alex":
        from importlib.metadata import version

        from eval.metrics import ALEXNET_FILE, weights_identity

        alexnet = Path(torch.hub.get_dir()) / "checkpoints" / ALEXNET_FILE
        return f"lpips {version('lpips')} AlexNet v0.1 ({weights_identity(alexnet)}), whole image"
    from eval.metric_specs import backend

    return backend(metric)  # percep_digits, mse_hole, psnr_hole


@staged("metrics")
def inpainting_metrics(done: torch.Tensor, truth: torch.Tensor, known: torch.Tensor, scale: str) -> dict[str, float]:
    from eval.metrics import masked_mse, perceptual_distance_digits, psnr

    hole = 1 - known
    mse = masked_mse(done, truth, hole)
    values = {"mse_hole": float(mse.mean()), "psnr_hole": float(psnr(mse).mean())}
    if scale == "paper":
        from eval.metrics import alexnet_problem, lpips_alex, missing_metrics_allowed

        problem = alexnet_problem() if missing_metrics_allowed() else None
        if problem:  # --allow-missing-metrics (a rehearsal): LPIPS is not measured, and the run says so
            print(f"warning: lpips_alex not measured: {problem}", flush=True)
            return values

        device = "cuda" if torch.cuda.is_available() else "cpu"
        metric = lpips_alex(device)
        with torch.no_grad():
            values["lpips_alex"] = float(metric(done.to(device), truth.to(device)).mean())
    elif done.shape[1] == 1:
        values["percep_digits"] = float(np.mean(perceptual_distance_digits(done, truth)))
    return values
