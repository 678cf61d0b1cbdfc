"""Sample images from an exported pipeline: one seed per image, PNGs, resumable, any process count.

Example::

    python -m core.sample --pipeline runs/mini-conprediff-s0/pipeline --out runs/mini-conprediff-s0/samples/ddim-50-noclip \
        --seeds 0-999 --sampler ddim --steps 50 --no-clip-sample
    ACCELERATE_USE_CPU=1 torchrun --nproc_per_node 2 -m core.sample ...   # seeds split over processes

Image ``k`` is ``<out>/<seed:06d>.png`` and depends only on its seed (its initial noise and, for
DDPM, every step's noise come from a generator seeded with it), so re-running skips finished
images and any number of processes produces the same files.
"""

from __future__ import annotations

import argparse
import json
import os
from collections.abc import Callable, Sequence
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from .models import sampling_scheduler


def parse_seeds(text: str) -> list[int]:
    """``"0-3,10"`` -> ``[0, 1, 2, 3, 10]``."""
    seeds = []
    for part in text.split(","):
        lo, _, hi = part.partition("-")
        seeds += list(range(int(lo), int(hi) + 1)) if hi else [int(lo)]
    return seeds


def to_uint8(x: torch.Tensor) -> np.ndarray:
    """``(B, C, H, W)`` in [-1, 1] -> ``(B, H, W, C)`` uint8."""
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


def write_missing_pngs(
    out_dir: Path, keys: Sequence[int], batch_size: int, render: Callable[[list[int]], np.ndarray], state
) -> list[Path]:
    """Write ``<out_dir>/<key:06d>.png`` for the keys that lack one, this process's share, ``batch_size`` at a time.

    ``render(batch_keys)`` returns ``(B, H, W, C)`` uint8 images; every image depends on its key only,
    so any process count and any interruption give the same files. Returns the paths of all ``keys``.
    """
    from tqdm.auto import tqdm

    out_dir.mkdir(parents=True, exist_ok=True)
    todo = [k for k in keys if not (out_dir / f"{k:06d}.png").exists()]
    mine = todo[state.process_index :: state.num_processes]
    for i in tqdm(range(0, len(mine), batch_size), disable=not state.is_main_process, desc=f"writing {out_dir.name}"):
        batch = mine[i : i + batch_size]
        for key, img in zip(batch, render(batch)):
            save_png(img, out_dir / f"{key:06d}.png")
    state.wait_for_everyone()
    return [out_dir / f"{k:06d}.png" for k in keys]


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
) -> torch.Tensor:
    """Run the reverse process for one batch; returns ``(B, C, H, W)`` in [-1, 1].

    ``cond``/``uncond``: encoder hidden states for classifier-free guidance (conditional UNets).
    """
    c, s = unet.config.in_channels, unet.config.sample_size
    gens = [torch.Generator().manual_seed(int(seed)) for seed in seeds]
    x = torch.stack([torch.randn(c, s, s, generator=g) for g in gens]).to(device)
    scheduler.set_timesteps(steps)
    x = x * scheduler.init_noise_sigma
    for t in scheduler.timesteps:
        if cond is None:
            eps = unet(x, t).sample
        elif guidance_scale == 1.0:
            eps = unet(x, t, encoder_hidden_states=cond).sample
        else:
            both = unet(torch.cat([x, x]), t, encoder_hidden_states=torch.cat([uncond, cond])).sample
            eps_u, eps_c = both.chunk(2)
            eps = eps_u + guidance_scale * (eps_c - eps_u)
        x = scheduler.step(eps, t, x, generator=gens).prev_sample  # per-image noise (DDPM), none for DDIM
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
) -> list[Path]:
    """Sample the missing ``<seed>.png`` files of ``seeds`` into ``out_dir``; returns all their paths.

    ``batch_size`` defaults to 256 images per batch on a GPU and 64 on the CPU; every image depends on its
    seed alone, so the batch size changes speed, not samples.

    A text-conditional pipeline needs ``prompts`` (one per seed); ``guidance_scale`` > 1 applies
    classifier-free guidance against the empty prompt. ``clip_sample`` clamps each step's x0
    prediction to [-1, 1]; ``None`` uses the pipeline's exported scheduler config. Samples made with
    different settings must go to different ``out_dir`` (existing PNGs are never redrawn).
    """
    from accelerate import PartialState

    state = PartialState(cpu=not torch.cuda.is_available())
    out_dir, seeds = Path(out_dir), list(seeds)
    batch_size = batch_size or (256 if state.device.type == "cuda" else 64)
    if (Path(pipeline_dir) / "discrete.json").exists():
        return sample_discrete(Path(pipeline_dir), out_dir, seeds, batch_size, state)
    unet = load_unet(Path(pipeline_dir)).to(state.device).eval()
    from diffusers import DDPMScheduler

    scheduler = sampling_scheduler(DDPMScheduler.from_pretrained(Path(pipeline_dir) / "scheduler"), sampler, clip_sample)
    text = None
    if (Path(pipeline_dir) / "text_encoder.json").exists():
        from .text import TextEncoder

        if prompts is None or len(prompts) != len(seeds):
            raise ValueError("a text-conditional pipeline needs one prompt per seed")
        name = json.loads((Path(pipeline_dir) / "text_encoder.json").read_text())["text_encoder"]
        text = TextEncoder(name, state.device)
    prompt_of = dict(zip(seeds, prompts)) if prompts is not None else {}
    vae = None
    if (Path(pipeline_dir) / "vae").exists():
        from .models import Autoencoder

        vae = Autoencoder(str(Path(pipeline_dir) / "vae"), state.device)

    def render(batch: list[int]) -> np.ndarray:
        cond = uncond = None
        if text is not None:
            cond = text.encode([prompt_of[s] for s in batch])
            uncond = text.encode([""] * len(batch))
        x = denoise(unet, scheduler, batch, steps, state.device, cond, uncond, guidance_scale)
        return to_uint8(vae.decode(x) if vae else x)

    return write_missing_pngs(out_dir, seeds, batch_size, render, state)


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

    return write_missing_pngs(out_dir, seeds, batch_size, render, state)


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
    parser.add_argument("--clip-sample", action=argparse.BooleanOptionalAction, default=None,
                        help="clamp each step's x0 prediction to [-1, 1] (default: as the pipeline's scheduler config)")
    args = parser.parse_args(argv)
    seeds = parse_seeds(args.seeds)
    prompts = [args.prompt[i % len(args.prompt)] for i in range(len(seeds))] if args.prompt else None
    paths = sample_pipeline(args.pipeline, args.out, seeds, args.sampler, args.steps, args.batch_size, prompts,
                            args.guidance_scale, args.clip_sample)
    if args.grid:
        save_grid(paths[:64], args.grid)


if __name__ == "__main__":
    main()
