"""Sample images from an exported pipeline: one seed per image, PNGs, resumable, any process count.

Example::

    python -m core.sample --pipeline runs/mini-conprediff-s0/pipeline --out runs/mini-conprediff-s0/samples/ddim-50-noclip \
        --seeds 0-999 --sampler ddim --steps 50 --no-clip-sample
    ACCELERATE_USE_CPU=1 torchrun --nproc_per_node 2 -m core.sample ...   # seeds split over processes

Image ``k`` is ``<out>/<seed:06d>.png`` and depends only on its seed (its initial noise and, for
DDPM, every step's noise come from a generator seeded with it), so re-running skips finished
images and any number of processes produces the same files.

``<out>.provenance.json`` (beside the folder) names what the PNGs were drawn from: the pipeline's
checkpoint and files hash (``pipeline/provenance.json``) and the sampler settings. PNGs drawn from
anything else (an older export of a continued run, other settings, or unknown: a folder from before
provenance existed) are never reused: they are deleted, with a warning, and drawn again.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import re
import warnings
from collections.abc import Callable, Sequence
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from .config import SAMPLING_DTYPES, TIMESTEP_SPACINGS
from .models import check_sampling_timesteps, sampling_scheduler
from .runlog import pipeline_files_hash, read_provenance, staged, write_atomic

PNG_NAME = re.compile(r"^\d{6,}\.png$")


def parse_seeds(text: str) -> list[int]:
    """``"0-3,10"`` -> ``[0, 1, 2, 3, 10]``."""
    seeds = []
    for part in text.split(","):
        lo, _, hi = part.partition("-")
        seeds += list(range(int(lo), int(hi) + 1)) if hi else [int(lo)]
    return seeds


class NonFiniteSampleError(FloatingPointError):
    """A sampler produced NaN or infinite values (diverged weights): written as PNGs they would be black or saturated
    images that the metrics would score as samples. ``rows``: the images of the batch (0-based) that are not finite;
    :func:`write_missing_pngs` names their keys (seeds) and the folders."""

    def __init__(self, message: str, rows: list[int]):
        super().__init__(message)
        self.rows = rows


def check_finite(x: torch.Tensor, what: str) -> torch.Tensor:
    """``x`` (one row per image) unchanged if every value is finite, else :class:`NonFiniteSampleError` naming
    ``what`` (e.g. the sampler and step) and the rows. Every sampler calls it after each step, so sampling stops at
    the first non-finite output."""
    bad = ~torch.isfinite(x.reshape(len(x), -1)).all(1)
    if bool(bad.any()):
        rows = bad.nonzero().flatten().tolist()
        raise NonFiniteSampleError(f"non-finite values in {what} for {len(rows)} of {len(x)} images", rows)
    return x


def to_uint8(x: torch.Tensor) -> np.ndarray:
    """``(B, C, H, W)`` in [-1, 1] -> ``(B, H, W, C)`` uint8; :class:`NonFiniteSampleError` if any value is NaN or
    infinite (clamped, NaN would become black and infinity white: images the sampler never drew)."""
    check_finite(x, "the images to write")
    return ((x.clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8).permute(0, 2, 3, 1).cpu().numpy()


def save_png(array: np.ndarray, path: Path) -> None:
    """Write losslessly and atomically (a killed process never leaves a partial PNG)."""
    tmp = path.with_name(f".{path.name}.tmp")
    Image.fromarray(array[..., 0] if array.shape[-1] == 1 else array).save(tmp, format="PNG")
    os.replace(tmp, path)


def load_png(path: Path) -> torch.Tensor:
    """PNG -> ``(C, H, W)`` float in [-1, 1]."""
    arr = np.asarray(Image.open(path))
    arr = arr[..., None] if arr.ndim == 2 else arr
    return torch.from_numpy(arr.astype(np.float32)).permute(2, 0, 1) / 127.5 - 1


def load_pngs(paths: Sequence[Path]) -> torch.Tensor:
    """PNG files -> ``(N, C, H, W)`` float32 in [-1, 1] (:func:`load_png` each)."""
    return torch.stack([load_png(p) for p in paths])


def provenance_path(out_dir: Path) -> Path:
    """``<out_dir>.provenance.json``: what the PNGs in ``out_dir`` were drawn from."""
    return Path(out_dir).with_name(Path(out_dir).name + ".provenance.json")


def pipeline_provenance(pipeline_dir: str | Path) -> dict:
    """``pipeline/provenance.json`` (checkpoint step, files hash); for an export without one, its files hash."""
    return read_provenance(pipeline_dir) or {"checkpoint": None, "sha256": pipeline_files_hash(Path(pipeline_dir))}


def clear_stale_pngs(out_dir: Path, provenance: dict) -> int:
    """Delete the key PNGs of ``out_dir`` unless its provenance file equals ``provenance``; then record it.

    Returns how many PNGs were deleted (they came from another checkpoint or settings, or from unknown ones).
    """
    out_dir, marker = Path(out_dir), provenance_path(out_dir)
    old = json.loads(marker.read_text()) if marker.exists() else None
    stale = [p for p in out_dir.iterdir() if PNG_NAME.match(p.name)] if out_dir.exists() and old != provenance else []
    if stale:
        warnings.warn(f"{out_dir}: {len(stale)} PNG(s) were drawn from {old or 'unknown provenance'}, not from "
                      f"{provenance}; deleting them and drawing again", stacklevel=3)
        for p in stale:
            p.unlink()
    if old != provenance:
        out_dir.parent.mkdir(parents=True, exist_ok=True)
        write_atomic(marker, json.dumps(provenance, sort_keys=True))
    return len(stale)


@staged("sample")
def write_missing_pngs(
    out_dir: Path, keys: Sequence[int], batch_size: int, render: Callable[[list[int]], np.ndarray], state,
    provenance: dict | None = None, source: str | Path | None = None,
) -> list[Path]:
    """Write ``<out_dir>/<key:06d>.png`` for the keys that lack one, this process's share, ``batch_size`` at a time.

    ``render(batch_keys)`` returns ``(B, H, W, C)`` uint8 images; every image depends on its key only,
    so any process count and any interruption give the same files. ``provenance`` (JSON-able: the
    pipeline's checkpoint and the settings the images depend on) is kept beside the folder; PNGs of any
    other provenance are deleted and drawn again (:func:`clear_stale_pngs`). Returns the paths of all
    ``keys``; raises ``RuntimeError`` naming the folder if any is still missing. A batch that ``render`` finds
    non-finite (:class:`NonFiniteSampleError`) writes no PNG and stops sampling with one line naming its keys,
    ``source`` (the exported pipeline drawn from) and ``out_dir``.
    """
    from tqdm.auto import tqdm

    # Every process lists the folder after the main one cleared it and before any process writes to it,
    # so all agree on what is missing and split it the same way.
    if state.is_main_process:
        out_dir.mkdir(parents=True, exist_ok=True)
        if provenance is not None:
            clear_stale_pngs(out_dir, provenance)
    state.wait_for_everyone()
    todo = [k for k in keys if not (out_dir / f"{k:06d}.png").exists()]
    state.wait_for_everyone()
    mine = todo[state.process_index :: state.num_processes]
    for i in tqdm(range(0, len(mine), batch_size), disable=not state.is_main_process, desc=f"writing {out_dir.name}"):
        batch = mine[i : i + batch_size]
        try:
            images = render_fitting(render, batch)
        except NonFiniteSampleError as e:
            bad = [batch[r] for r in e.rows]
            raise NonFiniteSampleError(
                f"sampling {source or 'the model'} into {out_dir} stopped: {e} (seed(s) {', '.join(map(str, bad[:8]))}"
                f"{', ...' if len(bad) > 8 else ''}); no PNG written for its batch of {len(batch)}: the exported "
                f"weights give NaN or infinite samples (diverged training? see the run's stats.jsonl)", bad) from None
        for key, img in zip(batch, images):
            save_png(img, out_dir / f"{key:06d}.png")
    state.wait_for_everyone()
    paths = [out_dir / f"{k:06d}.png" for k in keys]
    missing = [p.name for p in paths if not p.exists()]
    if missing:
        raise RuntimeError(f"{out_dir}: {len(missing)} PNG(s) missing after sampling, e.g. {', '.join(missing[:3])}")
    return paths


def default_batch(device: torch.device | str) -> int:
    """Images per sampling batch per process when ``diffusion.sampling_batch`` is 0: 256 on a GPU, 64 on the CPU."""
    return 256 if torch.device(device).type == "cuda" else 64


def render_fitting(render: Callable[[list[int]], np.ndarray], batch: list[int]) -> np.ndarray:
    """``render(batch)``, split in halves (recursively) when a batch runs out of GPU memory: each image depends on
    its key alone, so the halves give the same images. A single image that does not fit raises the error."""
    try:
        return render(batch)
    except torch.OutOfMemoryError:
        if len(batch) == 1:
            raise
        torch.cuda.empty_cache()
        half = len(batch) // 2
        warnings.warn(f"a sampling batch of {len(batch)} ran out of GPU memory; rendering it as {half} + "
                      f"{len(batch) - half} (set diffusion.sampling_batch to choose the batch)", stacklevel=2)
        return np.concatenate([render_fitting(render, batch[:half]), render_fitting(render, batch[half:])])


def load_unet(pipeline_dir: Path):
    from diffusers import UNet2DConditionModel, UNet2DModel

    config = (Path(pipeline_dir) / "unet" / "config.json").read_text()
    cls = UNet2DConditionModel if '"UNet2DConditionModel"' in config else UNet2DModel
    return cls.from_pretrained(Path(pipeline_dir) / "unet")


@torch.no_grad()
def denoise(
    unet,
    scheduler,
    seeds: Sequence[int],
    steps: int,
    device: torch.device | str = "cpu",
    cond: torch.Tensor | None = None,
    uncond: torch.Tensor | None = None,
    guidance_scale: float = 1.0,
    eta: float = 0.0,
    dtype: str = "fp32",
) -> torch.Tensor:
    """Run the reverse process for one batch; returns ``(B, C, H, W)`` in [-1, 1].

    ``cond``/``uncond``: encoder hidden states for classifier-free guidance (conditional UNets).
    ``eta``: DDIM's noise scale (0 deterministic, 1 as LDM-4 FFHQ samples); DDIM schedulers only.
    ``dtype``: ``fp32``, or ``bf16``: the UNet runs under ``torch.autocast`` in bfloat16 (its output is cast back to
    float32; the scheduler's update stays in float32).
    The scheduler's timesteps are checked before the first UNet call (:func:`~core.models.check_sampling_timesteps`:
    ``ValueError`` for a setting that would not sample, e.g. 1 ``leading`` step); every step's output is checked
    finite (:class:`NonFiniteSampleError` at the first NaN or infinity, naming the step).
    """
    from diffusers import DDIMScheduler

    if eta and not isinstance(scheduler, DDIMScheduler):
        raise ValueError(f"eta={eta} needs the DDIM sampler, got {type(scheduler).__name__}")
    if dtype not in SAMPLING_DTYPES:
        raise ValueError(f"dtype={dtype!r}: choose one of {', '.join(SAMPLING_DTYPES)}")
    autocast = (torch.autocast(torch.device(device).type, dtype=torch.bfloat16) if dtype == "bf16"
                else contextlib.nullcontext())
    step_kwargs = {"eta": eta} if isinstance(scheduler, DDIMScheduler) else {}
    c, s = unet.config.in_channels, unet.config.sample_size
    gens = [torch.Generator().manual_seed(int(seed)) for seed in seeds]
    x = torch.stack([torch.randn(c, s, s, generator=g) for g in gens]).to(device)
    timesteps = check_sampling_timesteps(scheduler, steps)
    x = x * scheduler.init_noise_sigma
    for i, t in enumerate(scheduler.timesteps):
        with autocast:
            if cond is None:
                eps = unet(x, t).sample.float()
            elif guidance_scale == 1.0:
                eps = unet(x, t, encoder_hidden_states=cond).sample.float()
            else:
                both = unet(torch.cat([x, x]), t, encoder_hidden_states=torch.cat([uncond, cond])).sample.float()
                eps_u, eps_c = both.chunk(2)
                eps = eps_u + guidance_scale * (eps_c - eps_u)
        x = scheduler.step(eps, t, x, generator=gens, **step_kwargs).prev_sample  # per-image noise (DDPM, DDIM eta > 0)
        check_finite(x, f"the {type(scheduler).__name__} step at t={timesteps[i]} (step {i + 1} of {steps})")
    return x


def sample_pipeline(
    pipeline_dir: str | Path,
    out_dir: str | Path,
    seeds: Sequence[int],
    sampler: str = "ddim",
    steps: int = 50,
    batch_size: int | None = None,
    prompts: Sequence[str] | None = None,
    guidance_scale: float = 1.0,
    clip_sample: bool | None = None,
    eta: float = 0.0,
    dtype: str = "fp32",
    timestep_spacing: str | None = None,
    steps_offset: int | None = None,
) -> list[Path]:
    """Sample the missing ``<seed>.png`` files of ``seeds`` into ``out_dir``; returns all their paths.

    ``batch_size`` defaults to 256 images per batch on a GPU and 64 on the CPU; every image depends on its
    seed alone, so the batch size changes speed, not the samples -- up to floating-point rounding: batched
    convolutions sum in a batch-dependent order, which can move a pixel across a uint8 boundary. Measured with
    :func:`compare_batch_sizes` (64 seeds x 256 pixels, DDIM-20, 2 CPU cores, the mini-digits16-baseline preset
    trained 150 steps): against batch 1, batch 7 / 64 changed 0 / 1 pixel with clipping and 2 / 2 pixels
    without, each by one uint8 level (1/255), each in a different image.

    A text-conditional pipeline needs ``prompts`` (one per seed); ``guidance_scale`` > 1 applies
    classifier-free guidance against the empty prompt. ``clip_sample`` clamps each step's x0
    prediction to [-1, 1]; ``None`` uses the pipeline's exported scheduler config. Samples made with
    different settings should go to different ``out_dir``: ``<out_dir>.provenance.json`` records the
    pipeline (checkpoint, files hash) and settings, and PNGs of any other provenance are deleted and drawn again.
    ``dtype="bf16"`` runs the UNet in bfloat16 (:func:`denoise`; the autoencoder decodes in float32) and is recorded
    in the provenance (``"dtype": "bf16"``; fp32 provenance is unchanged from before the option existed).
    ``timestep_spacing`` / ``steps_offset`` choose the timesteps (:func:`~core.models.sampling_scheduler`; ``None``:
    the export's, diffusers' ``leading`` and 0); other values than those are recorded in the provenance.
    Non-finite samples stop sampling before their PNGs are written (:class:`NonFiniteSampleError`).
    """
    from accelerate import PartialState

    state = PartialState(cpu=not torch.cuda.is_available())
    out_dir, seeds = Path(out_dir), list(seeds)
    batch_size = batch_size or default_batch(state.device)
    if (Path(pipeline_dir) / "discrete.json").exists():
        return sample_discrete(Path(pipeline_dir), out_dir, seeds, batch_size, state)
    unet = load_unet(Path(pipeline_dir)).to(state.device).eval()
    from diffusers import DDPMScheduler

    scheduler = sampling_scheduler(DDPMScheduler.from_pretrained(Path(pipeline_dir) / "scheduler"), sampler, clip_sample,
                                   timestep_spacing, steps_offset)
    check_sampling_timesteps(scheduler, steps)  # before any weights or PNGs are touched
    spacing, offset = scheduler.config.timestep_spacing, scheduler.config.steps_offset
    provenance = {"pipeline": pipeline_provenance(pipeline_dir), "sampler": sampler, "steps": steps,
                  "clip_sample": bool(scheduler.config.get("clip_sample", False)), "guidance_scale": guidance_scale,
                  "eta": eta, **({"dtype": dtype} if dtype != "fp32" else {}),
                  **({"timestep_spacing": spacing} if spacing != "leading" else {}),
                  **({"steps_offset": offset} if offset else {})}
    text = None
    if (Path(pipeline_dir) / "text_encoder.json").exists():
        from .text import TextEncoder

        if prompts is None or len(prompts) != len(seeds):
            raise ValueError("a text-conditional pipeline needs one prompt per seed")
        meta = json.loads((Path(pipeline_dir) / "text_encoder.json").read_text())
        text = TextEncoder(meta["text_encoder"], state.device, revision=meta.get("revision"))
    prompt_of = dict(zip(seeds, prompts)) if prompts is not None else {}
    vae = None
    folder = next((Path(pipeline_dir) / f for f in ("vqvae", "vae") if (Path(pipeline_dir) / f).exists()), None)
    if folder is not None:  # vqvae/: LDMPipeline's layout; vae/: text-conditional exports and older ones
        from .models import Autoencoder

        vae = Autoencoder(str(folder), state.device)

    def render(batch: list[int]) -> np.ndarray:
        cond = uncond = None
        if text is not None:
            cond = text.encode([prompt_of[s] for s in batch])
            uncond = text.encode([""] * len(batch))
        x = denoise(unet, scheduler, batch, steps, state.device, cond, uncond, guidance_scale, eta, dtype)
        return to_uint8(check_finite(vae.decode(x), "the autoencoder's decoding") if vae else x)

    return write_missing_pngs(out_dir, seeds, batch_size, render, state, provenance, pipeline_dir)


def sample_discrete(pipeline_dir: Path, out_dir: Path, seeds: list[int], batch_size: int, state) -> list[Path]:
    """Ancestral mask-and-replace sampling of an exported discrete pipeline; tokens decoded to grey levels."""
    from .discrete import MaskReplaceDiffusion, PixelQuantizer, TokenDenoiser

    meta = json.loads((pipeline_dir / "discrete.json").read_text())
    denoiser = TokenDenoiser(load_unet(pipeline_dir), meta["levels"])
    denoiser.embed.load_state_dict(torch.load(pipeline_dir / "token_embedding.pt", weights_only=True))
    denoiser = denoiser.to(state.device).eval()
    diffusion = MaskReplaceDiffusion(meta["levels"], meta["num_timesteps"], aux_weight=meta["aux_weight"])
    quant = PixelQuantizer(meta["levels"])
    size = denoiser.unet.config.sample_size

    def render(batch: list[int]) -> np.ndarray:
        gens = [torch.Generator().manual_seed(int(s)) for s in batch]
        return to_uint8(quant.decode(diffusion.sample(denoiser, (len(batch), size, size), gens, state.device)))

    provenance = {"pipeline": pipeline_provenance(pipeline_dir), "sampler": "mask-replace-ancestral"}
    return write_missing_pngs(out_dir, seeds, batch_size, render, state, provenance, pipeline_dir)


def compare_batch_sizes(
    pipeline_dir: str | Path, seeds: Sequence[int] = range(64), batch_sizes: Sequence[int] = (1, 7, 64),
    sampler: str = "ddim", steps: int = 20, clip_sample: bool | None = True,
) -> dict:
    """Draw ``seeds`` at each batch size and count uint8 pixels that differ from the first batch size's images.

    Returns ``{batch_size: {"images": differing images, "pixels": differing pixels, "max": largest difference
    in uint8 levels}}`` (the first batch size is the reference), measuring how far "the batch size changes
    speed, not samples" holds on this machine. The numbers in :func:`sample_pipeline`'s docstring came from::

        python -c "from experiments.unconditional import PRESETS; from core.config import *; from core.train import train
        cfg = RunConfig.from_dict(apply_overrides(PRESETS[0].run_config(0).to_dict(), ['train.steps=150']))
        train(cfg, '/tmp/bs-run')
        from core.sample import compare_batch_sizes as c
        print(c('/tmp/bs-run/pipeline', clip_sample=True), c('/tmp/bs-run/pipeline', clip_sample=False))"
    """
    import tempfile

    out = {}
    with tempfile.TemporaryDirectory() as tmp:
        ref = None
        for b in batch_sizes:
            paths = sample_pipeline(pipeline_dir, Path(tmp) / f"b{b}", seeds, sampler, steps, b, clip_sample=clip_sample)
            imgs = np.stack([np.asarray(Image.open(p), dtype=np.int16) for p in paths])
            if ref is None:
                ref = imgs
            diff = np.abs(imgs - ref)
            out[b] = {"images": int((diff.reshape(len(imgs), -1).max(1) > 0).sum()), "pixels": int((diff > 0).sum()),
                      "max": int(diff.max())}
    return out


def save_grid(paths: Sequence[Path], out: str | Path, columns: int = 8, scale: int = 2) -> Path:
    """Tile PNGs into one grid PNG (nearest-neighbor upscaled by ``scale``)."""
    images = [np.asarray(Image.open(p).convert("RGB")) for p in paths]
    h, w, _ = images[0].shape
    rows = -(-len(images) // columns)
    grid = np.full((rows * (h + 1) + 1, columns * (w + 1) + 1, 3), 255, np.uint8)
    for k, img in enumerate(images):
        r, c = divmod(k, columns)
        grid[1 + r * (h + 1) : 1 + r * (h + 1) + h, 1 + c * (w + 1) : 1 + c * (w + 1) + w] = img
    Image.fromarray(grid).resize((grid.shape[1] * scale, grid.shape[0] * scale), Image.NEAREST).save(out)
    return Path(out)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--pipeline", required=True, help="exported pipeline folder (run_dir/pipeline)")
    parser.add_argument("--out", required=True, help="folder for <seed>.png files")
    parser.add_argument("--seeds", default="0-63", help="e.g. 0-999 or 0,5,7")
    parser.add_argument("--sampler", default="ddim", choices=("ddim", "ddpm"))
    parser.add_argument("--steps", type=int, default=50)
    parser.add_argument("--batch-size", type=int, help="images per batch (default: 256 on a GPU, 64 on the CPU)")
    parser.add_argument("--grid", help="also write a grid PNG of the first 64 seeds here")
    parser.add_argument("--prompt", action="append", help="text-conditional pipelines: prompt(s), cycled over the seeds")
    parser.add_argument("--guidance-scale", type=float, default=1.0)
    parser.add_argument("--eta", type=float, default=0.0, help="DDIM noise scale (0: deterministic; LDM-4 FFHQ: 1)")
    parser.add_argument("--clip-sample", action=argparse.BooleanOptionalAction, default=None,
                        help="clamp each step's x0 prediction to [-1, 1] (default: as the pipeline's scheduler config)")
    parser.add_argument("--timestep-spacing", choices=TIMESTEP_SPACINGS,
                        help="which timesteps the sampler visits (default: the pipeline's scheduler config, 'leading')")
    parser.add_argument("--steps-offset", type=int,
                        help="added to every timestep (LDM's DDIM: 1 with leading spacing; default: the pipeline's, 0)")
    parser.add_argument("--dtype", choices=SAMPLING_DTYPES, default="fp32",
                        help="what the UNet computes in (bf16: autocast; name the --out folder with -bf16)")
    args = parser.parse_args(argv)
    seeds = parse_seeds(args.seeds)
    prompts = [args.prompt[i % len(args.prompt)] for i in range(len(seeds))] if args.prompt else None
    paths = sample_pipeline(args.pipeline, args.out, seeds, args.sampler, args.steps, args.batch_size, prompts,
                            args.guidance_scale, args.clip_sample, args.eta, args.dtype, args.timestep_spacing,
                            args.steps_offset)
    if args.grid:
        save_grid(paths[:64], args.grid)


if __name__ == "__main__":
    main()
