"""Cost of context prediction: training step time ConPreDiff / baseline, and the exported model's cost.

    python benchmarks/overhead.py                 # CPU, both model sizes
    python benchmarks/overhead.py --device cuda   # on a GPU

Times one optimizer step (forward, backward, AdamW) with synthetic data, median over --steps after
--warmup, baseline and ConPreDiff variants alternated in one run so machine load affects both alike.
Models: the mini preset's UNet on 16x16x1 (0.65 M parameters, batch 64) and an LDM-4-width UNet
(channels 224 x (1,2,3,4), attention at the three lower levels) on 32x32x4 latents (batch 8).
Also prints the parameter count and DDIM sampling time of the baseline vs ConPreDiff UNet: the
exported ConPreDiff model *is* a stock UNet of the same config, so both are identical by construction.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from core.config import ContextConfig, DiffusionConfig, ModelConfig  # noqa: E402
from core.models import build_scheduler, build_unet  # noqa: E402
from core.objective import ContextPrediction, DiffusionTrainingModule, image_generators, randn_per_image  # noqa: E402

MODELS = {
    "mini-16x16x1": (ModelConfig(block_out_channels=(32, 64), layers_per_block=1), 16, 1, 64),
    "ldm4-width-32x32x4": (
        ModelConfig(block_out_channels=(224, 448, 672, 896), layers_per_block=2, attention=(False, True, True, True),
                    mid_attention=True, norm_num_groups=32), 32, 4, 8),
}
VARIANTS = {
    "baseline": None,
    "conprediff (default decoder, all points)": ContextConfig(),
    "conprediff (mini decoder: 16/32/depth 1, 1/4 of points)": ContextConfig(latent_dim=16, hidden_dim=32, depth=1,
                                                                               point_fraction=0.25),
}


def sync(device):
    if device == "cuda":
        torch.cuda.synchronize()


def step_times(model_cfg, size, channels, batch, ctx_cfg, device, steps, warmup) -> list[float]:
    torch.manual_seed(0)
    unet = build_unet(model_cfg, size, channels)
    ctx = ContextPrediction(ctx_cfg, model_cfg.block_out_channels[0], channels) if ctx_cfg else None
    module = DiffusionTrainingModule(unet, build_scheduler(DiffusionConfig()), ctx).to(device)
    opt = torch.optim.AdamW(module.parameters(), lr=1e-4)
    x0 = torch.randn(batch, channels, size, size, device=device)
    times = []
    for i in range(warmup + steps):
        sync(device)
        t0 = time.perf_counter()
        gens = image_generators(0, i, range(batch))
        t = torch.cat([torch.randint(0, 1000, (1,), generator=g) for g in gens]).to(device)
        noise = randn_per_image(gens, x0.shape[1:], device)
        losses = module(x0, noise, t, generators=gens if ctx else None)
        losses["loss"].backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        sync(device)
        if i >= warmup:
            times.append(time.perf_counter() - t0)
    return times


@torch.no_grad()
def sampling_time(model_cfg, size, channels, device, n=16, steps=10) -> tuple[int, float]:
    from diffusers import DDIMScheduler

    torch.manual_seed(0)
    unet = build_unet(model_cfg, size, channels).to(device).eval()
    sched = DDIMScheduler.from_config(build_scheduler(DiffusionConfig()).config)
    sched.set_timesteps(steps)
    x = torch.randn(n, channels, size, size, device=device)
    sync(device)
    t0 = time.perf_counter()
    for t in sched.timesteps:
        x = sched.step(unet(x, t).sample, t, x).prev_sample
    sync(device)
    return sum(p.numel() for p in unet.parameters()), time.perf_counter() - t0


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--steps", type=int, default=5)
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--models", default=",".join(MODELS), help="comma-separated subset of: " + ", ".join(MODELS))
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    print(f"torch {torch.__version__}, device {args.device}, threads {args.threads}, "
          f"median of {args.steps} steps after {args.warmup} warm-up\n")
    print("| model | variant | s / step | ratio to baseline |")
    print("|---|---|---|---|")
    for name in args.models.split(","):
        model_cfg, size, channels, batch = MODELS[name]
        medians = {}
        for variant, ctx_cfg in VARIANTS.items():
            medians[variant] = statistics.median(
                step_times(model_cfg, size, channels, batch, ctx_cfg, args.device, args.steps, args.warmup))
            print(f"| {name}, batch {batch} | {variant} | {medians[variant]:.3f} | "
                  f"{medians[variant] / medians['baseline']:.2f}x |", flush=True)
    print("\n| model | exported parameters (baseline = ConPreDiff) | DDIM 10 steps, 16 images (s) |")
    print("|---|---|---|")
    for name in args.models.split(","):
        model_cfg, size, channels, _ = MODELS[name]
        params, seconds = sampling_time(model_cfg, size, channels, args.device)
        print(f"| {name} | {params:,} | {seconds:.2f} |")


if __name__ == "__main__":
    main()
