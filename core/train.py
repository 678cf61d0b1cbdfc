"""Train a diffusion model, baseline or ConPreDiff, on accelerate; re-running the same command resumes.

Example::

    python -m core.train --config experiments/unconditional/presets/mini-digits-conprediff.yaml \
        --run-dir runs/mini-conprediff-s0 --set train.seed=0
    # two CPU processes (gloo):
    ACCELERATE_USE_CPU=1 torchrun --nproc_per_node 2 -m core.train --config ... --run-dir ...
    # GPUs:
    accelerate launch --multi_gpu --num_processes 8 -m core.train --config ... --run-dir ...

The run directory holds ``config.yaml`` (resolved), ``env.json`` (versions, git commit; both as training last
wrote them: invoking a finished run again, e.g. to sample it differently, leaves them),
``log.txt``, ``stats.jsonl``, ``checkpoints/checkpoint-N/`` (rotating, written atomically and durably, finite weights
only; a resume skips one that does not load, moving it to ``checkpoints/damaged-checkpoint-N/``) and,
when training ends, ``pipeline/``: the EMA UNet and scheduler in diffusers layout, without the
context decoder, with ``provenance.json`` naming the checkpoint it was exported from (a run continued
to more steps is exported again). Batch size is global and duration is in optimizer steps, whatever the number of
processes; every random draw is a function of (seed, step, image index), so runs are identical
across process counts and resumes.
"""

from __future__ import annotations

import argparse
import contextlib
import copy
import json
import os
import shutil
import time
from collections.abc import Sequence
from pathlib import Path

import torch
import yaml
from accelerate import Accelerator
from diffusers.optimization import get_scheduler
from diffusers.training_utils import EMAModel

from .config import ConfigError, RunConfig, apply_overrides, config_diff, load_yaml
from .data import ImageData, MicroBatches, global_batch_indices, micro_batches
from .latent_cache import posterior_generators
from .models import Autoencoder, build_scheduler, build_unet, sampling_scheduler
from .objective import (ContextPrediction, DiffusionTrainingModule, decoder_input_channels, image_generators,
                        randn_per_image, uniform_timesteps)
from .runlog import (RunLock, RunLog, Stage, append_jsonl, check_owner, environment, read_jsonl, read_provenance, staged,
                     write_atomic, write_provenance)
from .tracking import accelerator_kwargs, start_tracking

CHECKPOINTS = "checkpoints"
DONE_MARKER = "state.json"


class NonFiniteLossError(FloatingPointError):
    """A loss term became NaN or infinite; training stopped before touching any checkpoint."""


class NonFiniteWeightsError(FloatingPointError):
    """The model's or the EMA's weights hold NaN or infinity: such a checkpoint or export is never written."""


class CheckpointError(RuntimeError):
    """No checkpoint of a run loads completely: resume stops rather than train from step 0 over them."""


def non_finite_weights(**groups) -> str:
    """``""`` if every tensor of every group (``name=iterable of tensors``) is finite, else which groups are not, e.g.
    ``"model: 3 of 57 tensors, EMA: 3 of 57 tensors"`` (one device sync)."""
    counts = {}
    for name, tensors in groups.items():
        tensors = list(tensors)
        flags = [~torch.isfinite(t.detach()).all() for t in tensors]
        counts[name] = (int(torch.stack(flags).sum()) if flags else 0, len(tensors))
    return ", ".join(f"{name}: {bad} of {n} tensors" for name, (bad, n) in counts.items() if bad)


def fsync_path(path: Path) -> None:
    """``fsync`` a file or a folder (a folder's entries: new names, renames)."""
    fd = os.open(path, os.O_RDONLY | (os.O_DIRECTORY if path.is_dir() else 0))
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def sync_tree(folder: Path) -> None:
    """Make every file of ``folder`` durable (``fsync`` the files, then the folders) and give them all one mode, that
    of a new file here (0o666 less the umask; safetensors writes its files 0600, torch.save 0644): what a rename of
    ``folder`` then publishes is complete even after a crash or power loss."""
    mask = os.umask(0)
    os.umask(mask)
    paths = sorted(folder.rglob("*"))
    for p in paths:
        if p.is_file():
            os.chmod(p, 0o666 & ~mask)
            fsync_path(p)
    for d in [*(p for p in paths if p.is_dir()), folder]:
        fsync_path(d)


def list_checkpoints(run_dir: Path) -> list[tuple[int, Path]]:
    """Complete checkpoints ``(step, path)`` in step order; half-written ones are ignored."""
    root = Path(run_dir) / CHECKPOINTS
    found = []
    for p in root.glob("checkpoint-*") if root.exists() else []:
        step = p.name.removeprefix("checkpoint-")
        if step.isdigit() and (p / DONE_MARKER).exists():
            found.append((int(step), p))
    return sorted(found)


# Keys that only say how a trained model is sampled: training never reads them, so a finished (or resumed) run may be
# evaluated again under another sampler without --allow-config-change (samples and records are named by the sampler).
SAMPLING_KEYS = tuple(f"diffusion.{k}" for k in ("sampler", "sampling_steps", "eta", "clip_sample", "guidance_scale",
                                                  "sampling_dtype", "sampling_batch", "timestep_spacing",
                                                  "steps_offset"))


# Keys that change neither a training step nor the trained weights: the run's name, how it is sampled, how often it
# logs and keeps checkpoints (resume is exact), how many DataLoader workers read (every draw is keyed by image index).
NON_TRAINING_KEYS = SAMPLING_KEYS + ("name", "train.log_every", "train.checkpoint_every", "train.checkpoint_minutes",
                                     "train.checkpoints_total_limit", "data.num_workers")


def training_config(cfg: RunConfig) -> dict:
    """``cfg`` as a flat ``{dotted key: value}`` of what decides the trained model (:data:`NON_TRAINING_KEYS` out)."""
    def flat(d: dict, prefix: str = "") -> dict:
        out = {}
        for k, v in d.items():
            out.update(flat(v, f"{prefix}{k}.") if isinstance(v, dict) else {f"{prefix}{k}": v})
        return out

    return {k: v for k, v in flat(cfg.to_dict()).items() if k not in NON_TRAINING_KEYS}


def training_config_sha256(cfg: RunConfig) -> str:
    """sha256 (16 hex digits) of :func:`training_config`, canonical JSON: the identity of what was trained, recorded
    with every measurement of the run (``eval.records``, field ``train_config_sha256``)."""
    import hashlib

    text = json.dumps(training_config(cfg), sort_keys=True, default=str)
    return hashlib.sha256(text.encode()).hexdigest()[:16]


def training_overrides(base: RunConfig, cfg: RunConfig) -> dict:
    """The training keys where ``cfg`` differs from ``base`` (a preset's own config), with ``cfg``'s values."""
    a, b = training_config(base), training_config(cfg)
    return {k: b.get(k) for k in sorted(set(a) | set(b)) if a.get(k) != b.get(k)}


SEGMENT_KEYS = ("git_commit", "packages", "python", "platform", "argv", "time", "num_processes", "device",
                "mixed_precision", "data")


def data_identity(data: ImageData, cfg: RunConfig) -> dict:
    """What a run trains on: ``data.source`` (a local path made absolute), the number of images, and
    :func:`core.latent_cache.dataset_fingerprint` (first 16 hex digits; None where the dataset cannot be listed,
    e.g. streamed shards)."""
    from .latent_cache import dataset_fingerprint

    path = Path(cfg.data.source).expanduser()
    try:
        fingerprint = dataset_fingerprint(data)[:16]
    except Exception:  # noqa: BLE001 - a streamed dataset has no listing to hash
        fingerprint = None
    return {"source": str(path.resolve()) if path.exists() else cfg.data.source, "num_images": len(data),
            "fingerprint": fingerprint}


def segments(run_dir: Path) -> list[dict]:
    """The training segments ``env.json`` records (a run written before segments existed: its one environment)."""
    path = Path(run_dir) / "env.json"
    if not path.exists():
        return []
    env = json.loads(path.read_text())
    return env.get("segments") or [{"from_step": None, **{k: env.get(k) for k in SEGMENT_KEYS}}]


def check_resume(run_dir: Path, data_id: dict, allow_data_change: bool) -> list[str]:
    """Before a resume: refuse (:class:`ConfigError`) if the training data differ from the last segment's (another
    fingerprint or image count), unless ``allow_data_change``; return notes (logged and kept in the new segment) for
    what may change the run without changing its config: another commit or a dirty tree, other package versions."""
    from .runlog import environment

    previous = segments(run_dir)
    if not previous:
        return []
    last, now, notes = previous[-1], environment(), []
    old_data = last.get("data") or {}
    if old_data.get("fingerprint") and data_id.get("fingerprint") and (
            old_data["fingerprint"], old_data.get("num_images")) != (data_id["fingerprint"], data_id["num_images"]):
        message = (f"the training data changed since the last segment: {old_data.get('source')} "
                   f"({old_data.get('num_images')} images, fingerprint {old_data['fingerprint']}) -> {data_id['source']} "
                   f"({data_id['num_images']} images, fingerprint {data_id['fingerprint']})")
        if not allow_data_change:
            raise ConfigError(f"{run_dir}: {message}. Use another --run-dir, or pass --allow-data-change to continue "
                              "on the new data anyway.")
        notes.append(message + " (allowed)")
    if last.get("git_commit") != now["git_commit"]:
        notes.append(f"code changed since the last segment: commit {last.get('git_commit')} -> {now['git_commit']}")
    changed = [f"{k} {v} -> {now['packages'].get(k)}" for k, v in (last.get("packages") or {}).items()
               if now["packages"].get(k) != v]
    if changed:
        notes.append("package versions changed since the last segment: " + ", ".join(changed))
    return notes


def check_config(run_dir: Path, cfg: RunConfig, allow_change: bool) -> None:
    """Refuse to resume a run whose saved config differs, listing the keys, unless allowed.

    Differences in :data:`SAMPLING_KEYS` alone are allowed: they change no training step."""
    saved = run_dir / "config.yaml"
    if saved.exists():
        old = load_yaml(saved.read_text())
        try:  # keys added to the schema since the run started take their defaults
            old = RunConfig.from_dict(old).to_dict()
        except ConfigError:
            pass
        diff = [d for d in config_diff(old, cfg.to_dict()) if d.split(":")[0] not in SAMPLING_KEYS]
        if diff and not allow_change:
            raise ConfigError(
                f"{run_dir} was started with a different config; differing keys:\n  " + "\n  ".join(diff)
                + "\nUse another --run-dir, or pass --allow-config-change to continue anyway."
            )


def process_shares(cfg: RunConfig, world: int) -> list[int]:
    """Images per process in each micro-batch (``batch_size / grad_accumulation``), split as evenly as possible.

    A global batch need not divide by the process count (LDM-4 FFHQ: 42 on 8 GPUs -> 6,6,5,5,5,5,5,5): each
    process weights its mean loss by ``share * world / micro`` so DDP's gradient average is the exact mean over
    the global batch, whatever the split.
    """
    micro = cfg.train.batch_size // cfg.train.grad_accumulation
    if micro < world:
        raise ConfigError(f"train.batch_size / grad_accumulation = {micro} images per micro-batch is fewer than the "
                          f"{world} processes; raise train.batch_size or lower grad_accumulation")
    return [micro // world + (r < micro % world) for r in range(world)]


def sticky_shared(before: bool | None, now: bool | None) -> bool | None:
    """Whether a run's training shared the machine, over its segments: True once any segment did, False while every
    segment is known not to have, None (unknown) otherwise. ``before``: the earlier segments' (False for none)."""
    if True in (before, now):
        return True
    return False if (before, now) == (False, False) else None


def recorded_shared(run_dir: Path) -> bool | None:
    """``env.json``'s ``shared_device``: whether the run's training shared the machine, None if unknown (no env.json,
    or a run trained before the flag existed)."""
    env = run_dir / "env.json"
    return json.loads(env.read_text()).get("shared_device") if env.exists() else None


def check_precision(cfg: RunConfig, device: str, native_amp: bool | None = None) -> None:
    """Refuse a ``train.mixed_precision`` that accelerate accepts but would not apply: fp16 on the CPU trains in
    fp32 (checked before the ``Accelerator`` exists), or any setting its ``native_amp`` says it does not apply."""
    mp = cfg.train.mixed_precision
    if mp != "no" and ((mp == "fp16" and device == "cpu") or native_amp is False):
        alt = "'bf16' or 'no'" if device == "cpu" else "'no'"
        raise ConfigError(f"train.mixed_precision={mp!r} is not applied on {device} (accelerate would silently "
                          f"train in fp32); use {alt} here, or a CUDA GPU for fp16")


def check_launcher_precision(cfg: RunConfig, env: dict | None = None) -> str | None:
    """The config's ``train.mixed_precision`` is what runs; a launcher asking for another mixed precision is refused.

    ``accelerate launch --mixed_precision X`` sets ``ACCELERATE_MIXED_PRECISION=X``. A mixed X (fp16, bf16) other
    than the config's raises :class:`ConfigError` before any compute, naming both and the fix. ``no`` is also what
    ``accelerate launch`` sets when no precision is asked for (indistinguishable from an explicit ``no``), so it
    never overrides the config. Returns the launcher's value (None when not launched that way), for env.json.
    """
    launcher = (os.environ if env is None else env).get("ACCELERATE_MIXED_PRECISION")
    mp = cfg.train.mixed_precision
    if launcher is not None and launcher.lower() not in ("no", mp):
        raise ConfigError(
            f"the launcher asks for mixed precision {launcher!r} (accelerate launch --mixed_precision, or accelerate's "
            f"default config) but train.mixed_precision={mp!r}; the config decides what runs and config.yaml records "
            f"it, so pass --set train.mixed_precision={launcher.lower()} to train in {launcher.lower()}, or launch "
            f"with --mixed_precision {mp}")
    return launcher


def check_latent_size(cfg: RunConfig, downsample: int) -> None:
    """The latent grid must exist and fit the UNet: ``data.resolution`` / the autoencoder's factor, then / 2^(levels-1)."""
    r, levels = cfg.data.resolution, len(cfg.model.block_out_channels)
    if r % downsample:
        raise ConfigError(f"data.resolution={r} must be divisible by the autoencoder's downsampling factor {downsample} "
                          f"(model.vae={cfg.model.vae!r})")
    factor = 2 ** (levels - 1)
    if (r // downsample) % factor:
        raise ConfigError(f"data.resolution={r} gives a {r // downsample}x{r // downsample} latent (model.vae factor "
                          f"{downsample}), which a {levels}-level UNet (model.block_out_channels) cannot halve "
                          f"{levels - 1} times; data.resolution must be a multiple of {downsample * factor}")


def build_training_module(cfg: RunConfig, in_channels: int, sample_size: int) -> DiffusionTrainingModule:
    unet = build_unet(cfg.model, sample_size, in_channels)
    context = None
    if cfg.context.enabled:
        context = ContextPrediction(cfg.context, decoder_input_channels(cfg.context, unet), in_channels)
    return DiffusionTrainingModule(unet, build_scheduler(cfg.diffusion), context)


def build_discrete_module(cfg: RunConfig, sample_size: int):
    """Token denoiser (a stock UNet on token embeddings) + mask-and-replace diffusion + optional context term."""
    from .discrete import DiscreteTrainingModule, MaskReplaceDiffusion, PixelQuantizer, TokenDenoiser

    levels = cfg.model.token_levels
    unet = build_unet(cfg.model, sample_size, cfg.model.token_embed_dim, out_channels=levels)
    diffusion = MaskReplaceDiffusion(levels, cfg.diffusion.num_train_timesteps, aux_weight=cfg.diffusion.aux_weight)
    context = ContextPrediction(cfg.context, cfg.model.block_out_channels[0], 1) if cfg.context.enabled else None
    return DiscreteTrainingModule(TokenDenoiser(unet, levels), diffusion, PixelQuantizer(levels).codebook, context,
                                  loss_weighting=cfg.diffusion.discrete_loss)


def build_module(cfg: RunConfig, vae: Autoencoder | None = None):
    """The training module of ``cfg``'s backbone, on the pixel grid or ``vae``'s latent grid (from the global RNG:
    :func:`train` seeds it with ``train.seed`` first)."""
    if cfg.backbone == "discrete":
        return build_discrete_module(cfg, cfg.data.resolution)
    if vae is None:
        return build_training_module(cfg, cfg.data.channels, cfg.data.resolution)
    return build_training_module(cfg, vae.latent_channels, cfg.data.resolution // vae.downsample)


@staged("export")
def export_pipeline(
    unet: torch.nn.Module, ema: EMAModel | None, train_scheduler, out_dir: Path, vae: Autoencoder | None = None,
    text_encoder: dict | None = None, step: int | None = None,
) -> Path:
    """Write the (EMA) UNet and a sampling scheduler in diffusers layout, atomically; no context decoder.

    What stock diffusers loads it as (``DiffusionPipeline.from_pretrained(out_dir)``): an unconditional pixel model
    as ``DDPMPipeline``; an unconditional latent model (LDM-4: VQ-f4 + UNet) as ``LDMPipeline``, with the frozen
    autoencoder in float32 as ``vqvae/`` (its ``scaling_factor`` set, which LDMPipeline divides by before decoding),
    so its images come out at the data resolution. A text-conditional UNet is saved as ``unet/``, ``scheduler/``
    and ``vae/`` with ``text_encoder.json`` naming its frozen encoder (no stock pipeline takes our text tower);
    ``core.sample`` loads every layout. ``provenance.json`` names the checkpoint ``step`` the weights come from. Non-finite weights are refused
    (:class:`NonFiniteWeightsError`), ``out_dir`` left as it was.
    """
    from diffusers import DDPMPipeline, LDMPipeline

    unet = copy.deepcopy(unet).to("cpu")
    if ema is not None:
        ema.copy_to(unet.parameters())
    check_export(unet, out_dir, step)
    with atomic_dir(out_dir) as tmp:
        if type(unet).__name__ == "UNet2DModel" and vae is not None:
            LDMPipeline(vqvae=vae.fp32_model(), unet=unet, scheduler=train_scheduler).save_pretrained(tmp)
        elif type(unet).__name__ == "UNet2DModel":
            DDPMPipeline(unet=unet, scheduler=train_scheduler).save_pretrained(tmp)
        else:
            unet.save_pretrained(tmp / "unet")
            train_scheduler.save_pretrained(tmp / "scheduler")
            if vae is not None:
                vae.fp32_model().save_pretrained(tmp / "vae")
        if text_encoder is not None:  # which frozen encoder the conditional UNet expects
            (tmp / "text_encoder.json").write_text(json.dumps(text_encoder))
        write_provenance(tmp, step)
    return out_dir


def check_export(model: torch.nn.Module, out_dir: Path, step: int | None) -> None:
    """Refuse to export (EMA) weights that are not finite: every sample drawn from them would be NaN."""
    problem = non_finite_weights(weights=model.parameters())
    if problem:
        raise NonFiniteWeightsError(f"refusing to export {out_dir}: the (EMA) weights of checkpoint {step} are not "
                                    f"finite ({problem}); {out_dir} left as it was")


@contextlib.contextmanager
def atomic_dir(out_dir: Path):
    """Yield a temporary sibling folder to fill; on success it is made durable (:func:`sync_tree`) and replaces
    ``out_dir`` in one rename."""
    tmp = out_dir.with_name(out_dir.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    yield tmp
    sync_tree(tmp)
    shutil.rmtree(out_dir, ignore_errors=True)
    os.replace(tmp, out_dir)
    fsync_path(out_dir.parent)


def model_inputs(cfg: RunConfig, inner: torch.nn.Module, x0: torch.Tensor, step: int, positions: range,
                 images: Sequence[int], data: ImageData, vae: Autoencoder | None, text=None) -> tuple:
    """The training module's arguments for one micro-batch, per backbone (the one place the step body branches).

    ``x0``: the micro-batch as read, ``(b, C, H, W)`` images in [-1, 1] on the module's device, or the cached encoder
    moments (``data.latent_cache``). ``positions``: the images' positions in the step's global batch (every random
    draw is keyed by (seed, step, position): :func:`core.objective.image_generators`); ``images``: their dataset
    indices (captions). Latent: ``x0`` becomes the autoencoder's latents (posterior mean, or a sample keyed by
    position when ``model.latent_sampling='sample'``). Discrete: ``(tokens (b, C, H, W) long, t (b,), generators)``
    with t uniform or VQ-Diffusion's importance sampling (``diffusion.discrete_loss``). Pixel and latent: ``(x0,
    noise, t (b,), text embeddings or None, generators or None)``; captions are dropped (replaced by "") with
    probability ``train.cond_dropout``, one draw per image, for classifier-free guidance. The draws are made in this
    order so that every backbone's inputs are those of earlier versions bit for bit.
    """
    tc, device = cfg.train, x0.device
    if vae:  # latents from the cached or just computed encoder output: the same calls either way
        moments = x0 if cfg.data.latent_cache else vae.encode_moments(x0)
        x0 = vae.latents_from_moments(moments, posterior_generators(tc.seed, step, positions)
                                      if cfg.model.latent_sampling == "sample" else None)
    gens = image_generators(tc.seed, step, positions)
    if cfg.backbone == "discrete":
        return quantize(x0, cfg.model.token_levels), inner.sample_timesteps(gens).to(device), gens
    timesteps = uniform_timesteps(gens, cfg.diffusion.num_train_timesteps)
    noise = randn_per_image(gens, x0.shape[1:], device)
    cond = None
    if text is not None:  # caption dropout for classifier-free guidance, drawn per image
        captions = ["" if torch.rand(1, generator=g).item() < tc.cond_dropout else data.caption(i, tc.seed, step)
                    for i, g in zip(images, gens)]
        cond = text.encode(captions)
    return x0, noise, timesteps.to(device), cond, gens if inner.context is not None else None


def write_environment(run_dir: Path, cfg: RunConfig, start: int, data: ImageData, data_id: dict, resume_notes: list[str],
                      *, shared_device: bool | None, num_processes: int, device: torch.device, mixed_precision: str,
                      launcher_precision: str | None, frozen_dtype: torch.dtype) -> dict:
    """Write ``run_dir/env.json`` for the training segment starting at step ``start`` and return it.

    Fields: ``shared_device`` (sticky across segments: :func:`sticky_shared`), the package versions and git commit
    (:func:`core.runlog.environment`), ``num_images``, ``images_skipped``, ``num_processes``, ``device``,
    ``mixed_precision`` (what trains), ``launcher_mixed_precision``, ``frozen_encoders_dtype``, ``tf32_matmul`` and
    ``tf32_cudnn`` (as set on a CUDA device; False elsewhere), ``loaded_weights``, ``data`` (:func:`data_identity`)
    and ``segments``: every segment's ``SEGMENT_KEYS`` with its ``from_step`` and resume ``notes`` (a resume appends,
    never erases an earlier segment).
    """
    cuda = device.type == "cuda"
    before = recorded_shared(run_dir) if start else False  # resuming: what the earlier segments recorded
    env = {"shared_device": sticky_shared(before, shared_device),
           **environment(), "num_images": len(data), "images_skipped": len(data.skipped), "num_processes": num_processes,
           "device": str(device), "mixed_precision": mixed_precision, "launcher_mixed_precision": launcher_precision,
           "frozen_encoders_dtype": str(frozen_dtype).removeprefix("torch."),
           "tf32_matmul": cuda and torch.backends.cuda.matmul.allow_tf32,
           "tf32_cudnn": cuda and torch.backends.cudnn.allow_tf32, "loaded_weights": loaded_weights(cfg),
           "data": data_id}
    earlier = segments(run_dir) if start else []
    env["segments"] = earlier + [{"from_step": start, **{k: env[k] for k in SEGMENT_KEYS}, "notes": resume_notes}]
    write_atomic(run_dir / "env.json", json.dumps(env, indent=2))
    return env


def train(
    cfg: RunConfig, run_dir: str | Path, allow_config_change: bool = False, stop_after: int | None = None,
    report_to: str = "none", shared_device: bool | None = None, allow_data_change: bool = False,
) -> Path:
    """Train (or resume) the run in ``run_dir``; returns the exported pipeline folder.

    ``stop_after`` ends this invocation after that many optimizer steps without finishing the run
    (as an interruption would); the next call resumes. ``report_to`` (``none | tensorboard | wandb``, or an
    accelerate ``GeneralTracker``) also sends each ``stats.jsonl`` row to that tracker (:mod:`core.tracking`).
    ``shared_device``: whether other jobs share the machine while this invocation trains (None: not known); kept in
    ``env.json`` and sticky across resumes (any shared segment makes it True), so that a later evaluation knows
    whether ``stats.jsonl``'s step times timed the contention (:func:`recorded_shared`).

    ``env.json`` keeps every training segment (the first run and each resume): its commit, package versions, process
    count, device and data identity (:func:`data_identity`). A resume on other data is refused unless
    ``allow_data_change``; one under another commit or other package versions is noted in ``log.txt`` and in its
    segment (:func:`check_resume`).
    """
    run_dir = Path(run_dir)
    # Settings refused before anything is created, the run directory included.
    launcher_precision = check_launcher_precision(cfg)
    check_precision(cfg, "cuda" if torch.cuda.is_available() else "cpu")
    with RunLock(run_dir, enabled=int(os.environ.get("RANK", "0")) == 0):  # one owner per run directory
        return _train(cfg, run_dir, allow_config_change, stop_after, report_to, shared_device, allow_data_change,
                      launcher_precision)


def _train(cfg: RunConfig, run_dir: Path, allow_config_change: bool, stop_after: int | None, report_to: str,
           shared_device: bool | None, allow_data_change: bool, launcher_precision: str | None) -> Path:
    # Accelerator and the run directory's config check.
    accelerator = Accelerator(cpu=not torch.cuda.is_available(), mixed_precision=cfg.train.mixed_precision,
                              **accelerator_kwargs(report_to, run_dir))
    check_precision(cfg, accelerator.device.type, accelerator.native_amp)
    main = accelerator.is_main_process
    if main:
        run_dir.mkdir(parents=True, exist_ok=True)
        check_config(run_dir, cfg, allow_config_change)
    accelerator.wait_for_everyone()
    log = RunLog(run_dir, main)
    world, rank, device = accelerator.num_processes, accelerator.process_index, accelerator.device
    shares = process_shares(cfg, world)
    local_batch, offset = shares[rank], sum(shares[:rank])
    share_weight = local_batch * world / (cfg.train.batch_size // cfg.train.grad_accumulation)
    tc = cfg.train
    cuda = device.type == "cuda"
    if cuda:  # process-wide: set from this run's config either way (cuDNN's own default is already TF32)
        torch.backends.cuda.matmul.allow_tf32 = tc.allow_tf32
        torch.backends.cudnn.allow_tf32 = tc.allow_tf32 or torch.backends.cudnn.allow_tf32
    # Frozen encoders compute in bf16 when the run trains in bf16 on a GPU (their outputs come back in float32).
    frozen_dtype = torch.bfloat16 if cuda and accelerator.mixed_precision == "bf16" else torch.float32

    # A finished run whose export holds its final checkpoint has nothing to do: return before loading data, encoders
    # or the checkpoint (a re-run to sample or evaluate again would otherwise load model, EMA and optimizer state:
    # 20 GB and about a minute for the 860 M text-to-image UNet, benchmarks/rehearsal_cpu.md).
    saved = list_checkpoints(run_dir)
    pipeline_dir = run_dir / "pipeline"
    if saved and saved[-1][0] >= cfg.train.steps and exported_checkpoint(pipeline_dir) == saved[-1][0]:
        accelerator.wait_for_everyone()
        return pipeline_dir

    # Data (checked against the last segment's when resuming) and the frozen encoders.
    data = ImageData(cfg.data)
    resume_notes, data_id = [], None
    if main and saved and saved[-1][0] < cfg.train.steps:  # a resume
        data_id = data_identity(data, cfg)
        resume_notes = check_resume(run_dir, data_id, allow_data_change)
    vae = Autoencoder(cfg.model.vae, device, cfg.model.vae_revision, cfg.model.vae_subfolder,
                      cfg.model.latent_scale, dtype=frozen_dtype) if cfg.backbone == "latent" else None
    if vae:
        check_latent_size(cfg, vae.downsample)
        if vae.is_vq and cfg.model.latent_sampling == "sample":
            raise ConfigError(f"model.latent_sampling='sample': model.vae={cfg.model.vae!r} is a VQModel, which has no "
                              "posterior to sample; use 'mean'")
    source = data  # what the micro-batches read: images, or the cached encoder output of every image
    if cfg.data.latent_cache:
        from .latent_cache import open_latent_cache

        source = open_latent_cache(data, vae, run_dir.parent / "latent-cache", main, accelerator.wait_for_everyone, log)
    text = None
    if cfg.model.text_encoder:
        from .text import TextEncoder

        text = TextEncoder(cfg.model.text_encoder, device, revision=cfg.model.text_encoder_revision, dtype=frozen_dtype)
        if text.dim != cfg.model.cross_attention_dim:
            raise ConfigError(f"model.cross_attention_dim={cfg.model.cross_attention_dim} must equal the text "
                              f"encoder's hidden size {text.dim}")
    # Model, EMA, optimizer, LR schedule.
    torch.manual_seed(tc.seed)  # identical initial weights on every process
    discrete = cfg.backbone == "discrete"
    module = build_module(cfg, vae)
    ema = EMAModel(ema_target(module).parameters(), decay=tc.ema_decay)
    optimizer = torch.optim.AdamW(module.parameters(), lr=tc.lr, weight_decay=tc.weight_decay)
    schedule = "constant_with_warmup" if tc.lr_schedule == "constant" else tc.lr_schedule
    lr_schedule = get_scheduler(schedule, optimizer, num_warmup_steps=tc.warmup_steps, num_training_steps=tc.steps)
    module, optimizer = accelerator.prepare(module, optimizer)
    ema.to(device)
    # The LR schedule is stepped by us once per optimizer step (never once per process).
    accelerator.register_for_checkpointing(lr_schedule, ema)
    inner = accelerator.unwrap_model(module)

    # Resume: the newest checkpoint that loads completely with finite weights; damaged newer ones are moved aside.
    start, intact = resume_newest_intact(accelerator, run_dir, module, ema, log)
    # This segment's config and environment (a finished run keeps the ones it was trained with).
    if main and start < tc.steps:
        write_atomic(run_dir / "config.yaml", yaml.safe_dump(cfg.to_dict(), sort_keys=False))
        write_environment(run_dir, cfg, start, data, data_id or data_identity(data, cfg), resume_notes,
                          shared_device=shared_device, num_processes=world, device=device,
                          mixed_precision=accelerator.mixed_precision, launcher_precision=launcher_precision,
                          frozen_dtype=frozen_dtype)
        for note in resume_notes:
            log(f"resume: {note}")
        stats = [r for r in read_jsonl(run_dir / "stats.jsonl") if r["step"] <= start]
        write_atomic(run_dir / "stats.jsonl", "".join(json.dumps(r, sort_keys=True) + "\n" for r in stats))
        n_unet = sum(p.numel() for p in ema_target(inner).parameters())
        n_ctx = sum(p.numel() for p in inner.context.parameters()) if inner.context is not None else 0
        log(f"{cfg.name}: {world} process(es), global batch {tc.batch_size} = {'+'.join(map(str, shares))} x "
            f"{tc.grad_accumulation} accumulation, {tc.steps} steps, unet {n_unet:,} params, context decoder "
            f"{n_ctx:,}, {len(data):,} training images" + (f" ({len(data.skipped)} skipped)" if data.skipped else ""))
        start_tracking(accelerator, cfg.to_dict(), cfg.name, run_dir)
        if launcher_precision is not None and launcher_precision.lower() != accelerator.mixed_precision:
            log(f"training in {accelerator.mixed_precision} (train.mixed_precision), not the launcher's "
                f"{launcher_precision!r}: the config decides")

    # Train.
    micro = tc.batch_size // tc.grad_accumulation
    end = tc.steps if stop_after is None else min(tc.steps, start + stop_after)
    batches = micro_batches(MicroBatches(source, tc.seed, tc.batch_size, tc.grad_accumulation, offset, local_batch),
                            start, end, cfg.data.num_workers, pin_memory=cuda)
    progress = None
    if main and start < end:
        from tqdm.auto import tqdm

        progress = tqdm(total=tc.steps, initial=start, desc=cfg.name, dynamic_ncols=True, mininterval=2)
    last_save, stop = time.monotonic(), StopOnSignal()  # SIGTERM: checkpoint at the end of this step, then stop
    training = Stage("train")  # time and peak memory for the rehearsal (experiments/rehearse.py; no-op otherwise)
    if start < end:
        training.start()
    try:
        for step in range(start, end):
            t0 = time.perf_counter()
            batch = global_batch_indices(len(data), tc.seed, step, tc.batch_size)
            totals: dict[str, torch.Tensor] = {}
            for m in range(tc.grad_accumulation):
                first = m * micro + offset
                positions = range(step * tc.batch_size + first, step * tc.batch_size + first + local_batch)
                x0 = next(batches).to(device, non_blocking=cuda)
                inputs = model_inputs(cfg, inner, x0, step, positions, batch[first : first + local_batch], data, vae,
                                      text)
                with accelerator.no_sync(module) if m < tc.grad_accumulation - 1 else contextlib.nullcontext():
                    losses = module(*inputs)
                    accelerator.backward(losses["loss"] * share_weight / tc.grad_accumulation)
                for k, v in losses.items():
                    totals[k] = totals.get(k, 0) + v.detach().float() * share_weight / tc.grad_accumulation
            names = sorted(totals)
            # Every process agrees on a stop or a wall-clock checkpoint: their flags travel with the losses' reduction.
            due = tc.checkpoint_minutes > 0 and main and time.monotonic() - last_save >= 60 * tc.checkpoint_minutes
            flags = torch.tensor([float(stop.requested), float(due)], device=device)
            reduced = accelerator.reduce(torch.cat([torch.stack([totals[k] for k in names]).float(), flags]), "mean")
            reduced, (stopping, timed) = reduced[: len(names)], (reduced[len(names):] > 0).tolist()
            if not torch.isfinite(reduced).all():
                terms = ", ".join(f"{k}={v:.4g}" for k, v in zip(names, reduced.tolist()))
                raise NonFiniteLossError(f"non-finite loss at step {step} ({terms}); {intact_note(intact)}")
            grad_norms = clip_gradients(accelerator, inner, tc)
            optimizer.step()
            lr_schedule.step()
            optimizer.zero_grad(set_to_none=True)
            ema.step(ema_target(inner).parameters())
            done = step + 1
            if main:
                check_owner(run_dir)  # the folder deleted or replaced under this process: stop before writing
            if main and (done % tc.log_every == 0 or done == tc.steps):
                record = {"step": done, "lr": lr_schedule.get_last_lr()[0], "step_time": time.perf_counter() - t0}
                record.update({k: v for k, v in zip(names, reduced.tolist())}, **grad_norms)
                append_jsonl(run_dir / "stats.jsonl", record)
                accelerator.log({k: v for k, v in record.items() if k != "step"}, step=done)
            if progress is not None:
                progress.update(1)
                progress.set_postfix(loss=f"{reduced[names.index('loss')].item():.4f}", refresh=False)
            if done % tc.checkpoint_every == 0 or done == tc.steps or stopping or timed:
                problem = non_finite_weights(model=module.parameters(), EMA=ema.shadow_params)
                if problem:  # the same on every process (replicated weights): all stop here
                    raise NonFiniteWeightsError(f"non-finite weights after step {done} ({problem}; loss finite); "
                                                f"checkpoint-{done} was not written; {intact_note(intact)}")
                intact, last_save = save_checkpoint(accelerator, run_dir, done, tc.checkpoints_total_limit), time.monotonic()
            if stopping and done < tc.steps:
                log(f"stopped by SIGTERM after step {done}; checkpoint saved, re-running resumes")
                raise SystemExit(f"{run_dir}: stopped by SIGTERM after step {done} (checkpoint saved; re-run to resume)")
    finally:
        training.stop()
        stop.restore()
    if progress is not None:
        progress.close()

    # Export: the final checkpoint's EMA unless pipeline/ says it holds exactly that checkpoint (a run
    # continued to more steps, or an export from before provenance existed, is exported again).
    last = list_checkpoints(run_dir)[-1][0] if list_checkpoints(run_dir) else None
    finished = last is not None and last >= tc.steps
    current = exported_checkpoint(pipeline_dir)
    if finished and main and current != last:
        if discrete:
            export_discrete(inner, ema, cfg, pipeline_dir, last)
        else:
            export_pipeline(inner.unet, ema, sampling_scheduler(inner.scheduler, "ddpm"), pipeline_dir, vae,
                            text_encoder_identity(cfg), last)
        log(f"exported {pipeline_dir} (checkpoint {last})"
            + (f", replacing the export of checkpoint {current}" if current is not None else ""))
    accelerator.wait_for_everyone()
    end_trackers(accelerator)
    return pipeline_dir


def exported_checkpoint(pipeline_dir: Path) -> int | None:
    """The checkpoint step ``pipeline_dir`` was exported from (its ``provenance.json``); None when there is no export
    (no ``unet/``, continuous or discrete) or it predates provenance."""
    if not (pipeline_dir / "unet").exists():
        return None
    return (read_provenance(pipeline_dir) or {}).get("checkpoint")


def end_trackers(accelerator: Accelerator) -> None:
    """Finish the run's trackers but keep the process group: ``Accelerator.end_training()`` also destroys it
    (accelerate 1.15, SPEC section 6), and a runner samples and evaluates in the same processes after training,
    behind barriers. The group ends with the command (:func:`end_distributed`)."""
    for tracker in accelerator.trackers:
        tracker.finish()
    accelerator.trackers = []


def end_distributed() -> None:
    """Destroy the default process group, if one was started: the last call of a command, after its last
    collective (a group left to the interpreter's exit makes torch warn, and a NCCL group can hang it)."""
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()


def loaded_weights(cfg: RunConfig) -> dict:
    """The frozen pretrained weights a run loads (``model.vae``, ``model.text_encoder``), each as
    :func:`core.hub.weights_identity` gives it; a text encoder also under ``text_encoder``/``revision``, the keys
    ``core.sample`` reads from an export's ``text_encoder.json`` (an absolute path for a local folder, so the export
    resolves from any working directory)."""
    from .hub import weights_identity

    m = cfg.model
    out = {"model.vae": weights_identity(m.vae, m.vae_revision, m.vae_subfolder)} if cfg.backbone == "latent" and m.vae else {}
    if m.text_encoder:
        out["model.text_encoder"] = text_encoder_identity(cfg)
    return out


def text_encoder_identity(cfg: RunConfig) -> dict | None:
    """:func:`loaded_weights`'s ``model.text_encoder`` entry alone (what an export's ``text_encoder.json`` holds),
    without hashing the autoencoder's folder too; None without a text encoder."""
    from .hub import weights_identity

    m = cfg.model
    if not m.text_encoder:
        return None
    ident = weights_identity(m.text_encoder, m.text_encoder_revision) if m.text_encoder != "minilm" else {}
    return {"text_encoder": ident.get("path", m.text_encoder), "revision": m.text_encoder_revision, **ident}


class StopOnSignal:
    """While training: SIGTERM (SLURM preemption or timeout through submitit, torchrun stopping its workers) sets
    :attr:`requested` instead of killing the process, so the loop saves a checkpoint at the end of the step and stops
    (the run then resumes minutes, not ``checkpoint_every`` steps, behind). Installed only in the main thread;
    :meth:`restore` puts the previous handler back."""

    def __init__(self):
        import signal
        import threading

        self.requested, self.previous = False, None
        if threading.current_thread() is threading.main_thread():
            self.previous = signal.signal(signal.SIGTERM, self._handle)

    def _handle(self, signum, frame) -> None:
        self.requested = True

    def restore(self) -> None:
        import signal

        if self.previous is not None:
            signal.signal(signal.SIGTERM, self.previous)
            self.previous = None


def clip_gradients(accelerator: Accelerator, module: torch.nn.Module, tc) -> dict[str, float]:
    """Clip gradients as ``train.grad_clip`` says; returns the pre-clip norms (logged in stats.jsonl).

    ``joint``: one norm over every parameter (backbone and context decoder). ``per_module``: the backbone's own
    norm at ``max_grad_norm`` (the baseline's clipping, whatever the decoder's gradient), the decoder's at
    ``context_max_grad_norm`` (0: not clipped).
    """
    if tc.max_grad_norm <= 0:
        return {}
    context = getattr(module, "context", None)
    if context is None or tc.grad_clip == "joint":
        norm = accelerator.clip_grad_norm_(module.parameters(), tc.max_grad_norm)
        return {"grad_norm": float(norm)}
    accelerator.unscale_gradients()  # once: clip_grad_norm_ twice would unscale fp16 gradients twice
    decoder = {id(p) for p in context.parameters()}
    backbone = [p for p in module.parameters() if id(p) not in decoder]
    norms = {"grad_norm_backbone": float(torch.nn.utils.clip_grad_norm_(backbone, tc.max_grad_norm))}
    limit = tc.context_max_grad_norm if tc.context_max_grad_norm > 0 else float("inf")
    norms["grad_norm_context"] = float(torch.nn.utils.clip_grad_norm_(list(context.parameters()), limit))
    return norms


def ema_target(module: torch.nn.Module) -> torch.nn.Module:
    """What EMA tracks and export keeps: the UNet (continuous) or the token denoiser (discrete)."""
    return module.denoiser if hasattr(module, "denoiser") else module.unet


def quantize(x0: torch.Tensor, levels: int) -> torch.Tensor:
    from .discrete import PixelQuantizer

    return PixelQuantizer(levels).encode(x0)


@staged("export")
def export_discrete(module, ema: EMAModel, cfg: RunConfig, out_dir: Path, step: int | None = None) -> Path:
    """EMA token denoiser: ``unet/`` (stock diffusers), ``token_embedding.pt`` and ``discrete.json``; no context decoder."""
    denoiser = copy.deepcopy(module.denoiser).to("cpu")
    ema.copy_to(denoiser.parameters())
    check_export(denoiser, out_dir, step)
    with atomic_dir(out_dir) as tmp:
        denoiser.unet.save_pretrained(tmp / "unet")
        torch.save(denoiser.embed.state_dict(), tmp / "token_embedding.pt")
        (tmp / "discrete.json").write_text(json.dumps({
            "levels": cfg.model.token_levels, "num_timesteps": cfg.diffusion.num_train_timesteps,
            "aux_weight": cfg.diffusion.aux_weight}))
        write_provenance(tmp, step)
    return out_dir


def intact_note(path: Path | None) -> str:
    """What a training error says about the checkpoint a rerun resumes from: the one this process last wrote or
    loaded, complete and with finite weights (it is never rotated away), or none."""
    if path is None:
        return "no checkpoint was written or loaded by this run"
    return f"the last checkpoint, {path}, is intact (written or loaded completely by this run, finite weights)"


@staged("checkpoint")
def save_checkpoint(accelerator: Accelerator, run_dir: Path, step: int, keep: int) -> Path:
    """``accelerator.save_state`` into a temporary folder, made durable (:func:`sync_tree`: every file fsynced, one
    mode), then the done marker (fsynced) and an atomic rename; a crash at any point leaves no complete-looking
    checkpoint half written. Then keep the newest ``keep``, never deleting the one just written."""
    root = run_dir / CHECKPOINTS
    final, tmp = root / f"checkpoint-{step}", root / f"tmp-checkpoint-{step}"
    if accelerator.is_main_process:
        root.mkdir(parents=True, exist_ok=True)
        shutil.rmtree(tmp, ignore_errors=True)
    accelerator.wait_for_everyone()
    accelerator.save_state(str(tmp))
    accelerator.wait_for_everyone()
    if accelerator.is_main_process:
        sync_tree(tmp)  # every process's files, before the marker that says they are complete
        (tmp / DONE_MARKER).write_text(json.dumps({"step": step}))
        sync_tree(tmp)
        shutil.rmtree(final, ignore_errors=True)
        os.replace(tmp, final)
        fsync_path(root)
        others = [p for _, p in list_checkpoints(run_dir) if p != final]
        for old in others[: max(0, len(others) - (keep - 1))]:
            shutil.rmtree(old)
    accelerator.wait_for_everyone()
    return final


def resume_newest_intact(accelerator: Accelerator, run_dir: Path, module: torch.nn.Module, ema: EMAModel,
                         log) -> tuple[int, Path | None]:
    """Load the newest checkpoint of ``run_dir`` that loads completely on every process with finite model and EMA
    weights; returns ``(step, path)``, ``(0, None)`` when there is none. Newer ones that fail (truncated or
    unreadable files, non-finite weights) are logged with the reason and moved to ``damaged-checkpoint-N`` (so that
    rotation never counts them). Raises :class:`CheckpointError` naming every checkpoint and why when none loads:
    training from step 0 would bury them."""
    skipped: list[tuple[Path, str]] = []
    for step, path in reversed(list_checkpoints(run_dir)):
        try:
            accelerator.load_state(str(path))
            ema.to(accelerator.device)  # load_state leaves the EMA weights where torch.load put them (CPU)
            problem = non_finite_weights(model=module.parameters(), EMA=ema.shadow_params)
            why = f"non-finite weights ({problem})" if problem else ""
        except torch.OutOfMemoryError:
            raise
        except Exception as e:  # noqa: BLE001 (whatever the files' damage, the next checkpoint is tried)
            why = f"{type(e).__name__}: {str(e).strip().splitlines()[0] if str(e).strip() else 'no message'}"
        failed = accelerator.reduce(torch.tensor([float(bool(why))], device=accelerator.device), "sum")
        if not failed.item():
            for bad, reason in skipped:
                aside = bad.with_name(f"damaged-{bad.name}")
                if accelerator.is_main_process:
                    shutil.rmtree(aside, ignore_errors=True)
                    os.replace(bad, aside)
                log(f"skipped {bad} ({reason}); moved it to {aside.name}")
            accelerator.wait_for_everyone()
            log(f"resumed from {path} (step {step})")
            return step, path
        skipped.append((path, why or "failed to load on another process"))
    if skipped:
        raise CheckpointError(f"{run_dir}: no checkpoint loads: " + "; ".join(f"{p.name} ({why})" for p, why in skipped)
                              + "; restore one, or move them out of checkpoints/ to train from step 0")
    return 0, None


def load_config(config: str | None, overrides: list[str]) -> RunConfig:
    if config and not Path(config).exists():
        raise ConfigError(f"config file not found: {config}")
    d = load_yaml(Path(config).read_text()) if config else {}
    return RunConfig.from_dict(apply_overrides(d or {}, overrides))


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config", help="YAML config (default: the run directory's config.yaml when resuming)")
    parser.add_argument("--run-dir", required=True, help="run directory; re-running with the same one resumes")
    parser.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                        help="override a config key, e.g. --set train.steps=100 (repeatable)")
    parser.add_argument("--allow-config-change", action="store_true", help="resume even if the config differs")
    parser.add_argument("--allow-data-change", action="store_true",
                        help="resume even if the training data differ from the last segment's (files, count)")
    parser.add_argument("--stop-after", type=int, help="stop this invocation after N steps (resume later)")
    parser.add_argument("--report-to", "--report_to", choices=("none", "tensorboard", "wandb"), default="none",
                        help="also log every stats.jsonl row (loss terms, LR) to this accelerate tracker, in "
                             "<run-dir>/tracking/ (off by default; needs the tracker's pip package)")
    args = parser.parse_args(argv)
    saved = Path(args.run_dir) / "config.yaml"
    cfg = load_config(args.config or (str(saved) if saved.exists() else None), args.overrides)
    train(cfg, args.run_dir, allow_config_change=args.allow_config_change, stop_after=args.stop_after,
          report_to=args.report_to, allow_data_change=args.allow_data_change)
    end_distributed()


if __name__ == "__main__":
    main()
