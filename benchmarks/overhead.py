"""Cost of context prediction: training step time ConPreDiff / baseline, and the exported model's cost.

    python benchmarks/overhead.py                 # CPU, both model sizes
    python benchmarks/overhead.py --device cuda   # on a GPU
    python benchmarks/overhead.py --experiment decoding_ablation --steps 20   # an experiment's mini presets

Times one optimizer step (forward, backward, AdamW) with synthetic data, median over --steps after
--warmup, the variants alternated step by step in one run so machine load affects all alike.
Models: the mini preset's UNet on 16x16x1 (0.65 M parameters, batch 64) and an LDM-4-width UNet
(channels 224 x (1,2,3,4), attention at the three lower levels) on 32x32x4 latents (batch 8).
Also prints the parameter count and DDIM sampling time of the baseline vs ConPreDiff UNet: the
exported ConPreDiff model *is* a stock UNet of the same config, so both are identical by construction.
"""

from __future__ import annotations

import argparse
import contextlib
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


PRECISIONS = ("fp32", "tf32", "bf16")


def sync(device):
    if str(device).startswith("cuda"):
        torch.cuda.synchronize()


def precision_context(precision: str, device) -> contextlib.AbstractContextManager:
    """Set TF32 for ``precision`` and return the forward pass's autocast context.

    ``fp32``: TF32 off (matmul and cuDNN); ``tf32``: TF32 on; ``bf16``: TF32 on plus ``torch.autocast`` to
    bfloat16 around the forward pass, as accelerate's ``mixed_precision="bf16"`` does.
    """
    if precision not in PRECISIONS:
        raise ValueError(f"precision={precision!r}; allowed: {', '.join(PRECISIONS)}")
    torch.backends.cuda.matmul.allow_tf32 = precision != "fp32"
    torch.backends.cudnn.allow_tf32 = precision != "fp32"
    if precision == "bf16":
        return torch.autocast(torch.device(device).type, dtype=torch.bfloat16)
    return contextlib.nullcontext()


def state_bytes(module: torch.nn.Module, opt: torch.optim.Optimizer) -> int:
    """Bytes held between steps by a training run: parameters and optimizer state."""
    tensors = list(module.parameters()) + [v for s in opt.state.values() for v in s.values() if torch.is_tensor(v)]
    return sum(t.numel() * t.element_size() for t in tensors)


def step_times(model_cfg, size, channels, batch, variants: dict, device, steps, warmup,
               diffusion_cfg: DiffusionConfig | None = None, *, precision: str = "fp32", text_tokens: int = 0,
               peak_memory: dict | None = None, profile: dict | None = None,
               wrap: dict | None = None) -> dict[str, list[float]]:
    """Seconds per optimizer step for each variant (None = baseline), one step of each in turn per round,
    so a change in machine load during the run hits every variant alike.

    ``text_tokens``: conditional UNets (``model_cfg.cross_attention_dim``) get random text states
    ``(batch, text_tokens, cross_attention_dim)``. ``peak_memory``: on CUDA, filled with each variant's bytes
    as one training process would need them: its parameters and optimizer state plus the peak the step
    allocates on top of what was allocated before it (the other variants' models share the GPU here).
    ``profile``: filled with each variant's ``torch.profiler`` averages of one extra, untimed step run after
    the timed ones, with the ranges ``step: forward``, ``step: backward`` and ``step: optimizer``.
    ``wrap``: ``{variant: context manager factory}`` entered around each of that variant's steps (e.g. to switch
    an implementation, benchmarks/context_ab.py).
    """
    runs = {}
    for name, ctx_cfg in variants.items():
        torch.manual_seed(0)
        unet = build_unet(model_cfg, size, channels)
        ctx = ContextPrediction(ctx_cfg, model_cfg.block_out_channels[0], channels) if ctx_cfg else None
        module = DiffusionTrainingModule(unet, build_scheduler(diffusion_cfg or DiffusionConfig()), ctx).to(device)
        runs[name] = (module, torch.optim.AdamW(module.parameters(), lr=1e-4), ctx is not None)
    x0 = torch.randn(batch, channels, size, size, device=device)
    cond = None
    if model_cfg.cross_attention_dim is not None:
        cond = torch.randn(batch, max(1, text_tokens), model_cfg.cross_attention_dim, device=device)
    autocast = precision_context(precision, device)
    cuda = str(device).startswith("cuda")
    times = {name: [] for name in variants}
    for i in range(warmup + steps + (profile is not None)):
        for name, (module, opt, has_ctx) in runs.items():
            profiling = i == warmup + steps
            prof = contextlib.nullcontext()
            if profiling:
                activities = [torch.profiler.ProfilerActivity.CPU]
                activities += [torch.profiler.ProfilerActivity.CUDA] if cuda else []
                prof = torch.profiler.profile(activities=activities)
            sync(device)
            if cuda:
                before = torch.cuda.memory_allocated(device)
                torch.cuda.reset_peak_memory_stats(device)
            t0 = time.perf_counter()
            switch = (wrap or {}).get(name, contextlib.nullcontext)()
            switch.__enter__()
            gens = image_generators(0, i, range(batch))
            t = torch.cat([torch.randint(0, module.scheduler.config.num_train_timesteps, (1,), generator=g)
                           for g in gens]).to(device)
            noise = randn_per_image(gens, x0.shape[1:], device)
            with prof:
                with torch.profiler.record_function("step: forward"), autocast:
                    losses = module(x0, noise, t, cond, generators=gens if has_ctx else None)
                with torch.profiler.record_function("step: backward"):
                    losses["loss"].backward()
                with torch.profiler.record_function("step: optimizer"):
                    opt.step()
                    opt.zero_grad(set_to_none=True)
                sync(device)
            sync(device)
            switch.__exit__(None, None, None)
            if profiling:
                profile[name] = prof.key_averages()
            elif i >= warmup:
                times[name].append(time.perf_counter() - t0)
                if cuda and peak_memory is not None:
                    used = state_bytes(module, opt) + torch.cuda.max_memory_allocated(device) - before
                    peak_memory[name] = max(peak_memory.get(name, 0), used)
    return times


def experiment_variants(experiment: str):
    """The mini presets of ``experiments.<experiment>``: (model config, size, channels, batch, diffusion config,
    {method: context config or None})."""
    import importlib

    presets = [p for p in importlib.import_module(f"experiments.{experiment}").PRESETS if p.scale == "mini"]
    cfgs = {p.method: p.run_config(0) for p in presets}
    first = next(iter(cfgs.values()))
    if any(c.model != first.model or c.diffusion != first.diffusion for c in cfgs.values()):
        raise SystemExit(f"{experiment}: its mini presets differ in more than the context term; time them separately")
    return (first.model, first.data.resolution, first.data.channels, first.train.batch_size, first.diffusion,
            {m: (c.context if c.context.enabled else None) for m, c in cfgs.items()})


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
    parser.add_argument("--experiment", help="instead: time the mini presets of experiments.<EXPERIMENT> "
                        "(e.g. decoding_ablation, stride_ablation), each one step in turn")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    if args.experiment:
        model_cfg, size, channels, batch, diffusion_cfg, variants = experiment_variants(args.experiment)
        times = step_times(model_cfg, size, channels, batch, variants, args.device, args.steps, args.warmup, diffusion_cfg)
        base = statistics.median(times["baseline"]) if "baseline" in times else None
        print(f"torch {torch.__version__}, device {args.device}, threads {args.threads}, {args.experiment} mini presets, "
              f"{size}x{size}x{channels}, batch {batch}, median of {args.steps} rounds after {args.warmup} warm-up\n")
        print("| variant | s / step (median) | ratio to baseline |\n|---|---|---|")
        for name, ts in times.items():
            m = statistics.median(ts)
            print(f"| {name} | {m:.3f} | {m / base:.2f}x |" if base else f"| {name} | {m:.3f} | n/a |")
        return
    print(f"torch {torch.__version__}, device {args.device}, threads {args.threads}, "
          f"median of {args.steps} steps after {args.warmup} warm-up\n")
    print("| model | variant | s / step | ratio to baseline |")
    print("|---|---|---|---|")
    for name in args.models.split(","):
        model_cfg, size, channels, batch = MODELS[name]
        times = step_times(model_cfg, size, channels, batch, VARIANTS, args.device, args.steps, args.warmup)
        medians = {variant: statistics.median(ts) for variant, ts in times.items()}
        for variant in VARIANTS:
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
