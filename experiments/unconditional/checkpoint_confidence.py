"""confident_digits of a run's EMA weights at each checkpoint still on disk: the tuning probe for mini budgets.

    python -m experiments.unconditional.checkpoint_confidence runs/mini-digits16-baseline-s0 [--samples 512 --steps 25]
    python -m experiments.unconditional.checkpoint_confidence RUN --checkpoints 2000 --sampler ddpm --steps 1000

Samples ``--samples`` images (seeds 0..N-1; ``--sampler`` DDIM or ancestral DDPM with ``--steps``,
x0 clipping as the run's config says) from the EMA weights saved with each checkpoint (or only those
at ``--checkpoints``) and prints one JSON line per checkpoint. Cheaper than a full evaluation (no FD,
fewer samples), so it is a probe for choosing a step budget or a sampler, not a result for the tables.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import torch


def checkpoint_confidence(
    run_dir: Path, checkpoint: Path, samples: int, steps: int, sampler: str = "ddim", batch: int = 128
) -> float:
    from diffusers import DDPMScheduler

    from core.config import RunConfig
    from core.models import build_unet
    from core.sample import denoise, sampling_scheduler
    from eval.metrics import classifier_outputs

    import yaml

    cfg = RunConfig.from_dict(yaml.safe_load((run_dir / "config.yaml").read_text()))
    unet = build_unet(cfg.model, cfg.data.resolution, cfg.data.channels).eval()
    ema = torch.load(checkpoint / "custom_checkpoint_1.pkl", map_location="cpu", weights_only=False)
    for p, s in zip(unet.parameters(), ema["shadow_params"], strict=True):
        p.data.copy_(s)
    base = DDPMScheduler.from_pretrained(run_dir / "pipeline" / "scheduler")
    d = cfg.diffusion  # the timesteps its sampler name says (core.models.sampler_name)
    scheduler = sampling_scheduler(base, sampler, d.clip_sample, d.timestep_spacing, d.steps_offset)
    x = torch.cat([denoise(unet, scheduler, range(i, min(samples, i + batch)), steps) for i in range(0, samples, batch)])
    _, probs = classifier_outputs(x, cfg.data.resolution)
    return float((probs.max(1) >= 0.9).mean())


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("run_dir", type=Path)
    parser.add_argument("--samples", type=int, default=512)
    parser.add_argument("--steps", type=int, default=25)
    parser.add_argument("--sampler", choices=["ddim", "ddpm"], default="ddim")
    parser.add_argument("--checkpoints", help="comma-separated training steps to probe (default: every checkpoint on disk)")
    args = parser.parse_args()
    import yaml

    from core.config import RunConfig
    from core.models import sampler_name
    from core.train import list_checkpoints

    diffusion = RunConfig.from_dict(yaml.safe_load((args.run_dir / "config.yaml").read_text())).diffusion
    diffusion.sampler, diffusion.sampling_steps, diffusion.guidance_scale = args.sampler, args.steps, 1.0
    sampler = sampler_name(diffusion)
    on_disk = dict(list_checkpoints(args.run_dir))
    wanted = sorted(on_disk) if args.checkpoints is None else sorted({int(s) for s in args.checkpoints.split(",")})
    if missing := [s for s in wanted if s not in on_disk]:
        raise SystemExit(f"{args.run_dir}: no checkpoint at step(s) {missing}; on disk: {sorted(on_disk)}")
    for step, path in ((s, on_disk[s]) for s in wanted):
        value = checkpoint_confidence(args.run_dir, path, args.samples, args.steps, args.sampler)
        print(json.dumps({"run": args.run_dir.name, "step": step, "confident_digits": value, "samples": args.samples,
                          "sampler": sampler}), flush=True)


if __name__ == "__main__":
    main()
