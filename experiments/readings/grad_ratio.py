"""How hard the context term pulls on the backbone: gradient norms of the two loss terms on the backbone's weights.

For a preset (any backbone) at initialisation (checkpoint 0: the weights ``core.train`` starts from, the same seed)
or at a checkpoint of one of its runs, over the first ``--batches`` training batches of that seed (the training
pipeline's images, timesteps, noise and generators), this computes on the backbone's parameters θ (the UNet, or
the token denoiser):

* ``grad_point`` = ‖∇θ L_point‖ and ``grad_context`` = ‖∇θ λ L_context‖ (λ = ``context.weight``), L2 over all of θ;
* ``ratio`` = grad_context / grad_point and ``cosine`` between the two gradients.

λ enters linearly, so ``ratio / λ`` is what a λ that matches another backbone's ratio divides.

    python -m experiments.readings.grad_ratio --presets mini-digits16-conprediff,mini-digits16-latent-conprediff \\
        --seed 0 --batches 16 --out results/readings/grad_ratio.jsonl
    python -m experiments.readings.grad_ratio --presets mini-digits16-conprediff --run-dir runs/mini-digits16-conprediff-s0 \\
        --checkpoints 1500,2000

Each measurement is one JSON line (preset, seed, checkpoint, per-batch values, their median).
"""

from __future__ import annotations

import argparse
import json
import statistics
from pathlib import Path

import torch

from core.config import ConfigError, RunConfig, apply_overrides
from core.data import ImageData, MicroBatches
from core.models import Autoencoder
from core.objective import image_generators, randn_per_image, uniform_timesteps
from core.train import build_module, ema_target, quantize


EXPERIMENTS = Path(__file__).resolve().parents[1]


def find_preset(name: str):
    """The preset called ``name`` in any experiment folder; ``ConfigError`` listing the close names otherwise."""
    import difflib
    import importlib

    found = {}
    for folder in sorted(p.parent.name for p in EXPERIMENTS.glob("*/__init__.py")):
        for preset in getattr(importlib.import_module(f"experiments.{folder}"), "PRESETS", []):
            found.setdefault(preset.name, preset)
    if name not in found:
        close = difflib.get_close_matches(name, found, n=5)
        raise ConfigError(f"no preset {name!r} in experiments/*; close: {', '.join(close) or 'none'}")
    return found[name]


def build(cfg: RunConfig):
    """``(module, vae)`` exactly as ``core.train`` builds them on the CPU, from ``train.seed``."""
    vae = None
    if cfg.backbone == "latent":
        vae = Autoencoder(cfg.model.vae, "cpu", cfg.model.vae_revision, cfg.model.vae_subfolder, cfg.model.latent_scale)
    torch.manual_seed(cfg.train.seed)
    return build_module(cfg, vae), vae


def load_checkpoint(module: torch.nn.Module, run_dir: Path, step: int) -> None:
    """The training module's weights (and buffers) saved by accelerate at ``checkpoint-<step>``."""
    from safetensors.torch import load_file

    path = Path(run_dir) / "checkpoints" / f"checkpoint-{step}" / "model.safetensors"
    if not path.exists():
        raise FileNotFoundError(f"{path} not found; list {path.parents[1]} for the saved steps")
    module.load_state_dict(load_file(path))


def batch_inputs(cfg: RunConfig, module, vae, data: ImageData, step: int) -> tuple:
    """The inputs ``core.train`` feeds the module at optimizer step ``step`` (one process, no accumulation)."""
    tc = cfg.train
    x0 = MicroBatches(data, tc.seed, tc.batch_size, 1, 0, tc.batch_size)[step]
    x0 = vae.encode(x0) if vae else x0
    gens = image_generators(tc.seed, step, range(step * tc.batch_size, (step + 1) * tc.batch_size))
    if cfg.backbone == "discrete":
        return quantize(x0, cfg.model.token_levels), module.sample_timesteps(gens), gens
    timesteps = uniform_timesteps(gens, cfg.diffusion.num_train_timesteps)
    noise = randn_per_image(gens, x0.shape[1:], "cpu")
    return x0, noise, timesteps, None, gens


def gradient_balance(module, inputs: tuple) -> dict:
    """Norms and cosine of ∇θ L_point and ∇θ λ L_context on the backbone θ for one batch."""
    params = [p for p in ema_target(module).parameters() if p.requires_grad]
    losses = module(*inputs)
    point, context = losses["point_loss"], losses["loss"] - losses["point_loss"]
    g_point = torch.autograd.grad(point, params, retain_graph=True, allow_unused=True)
    g_ctx = torch.autograd.grad(context, params, allow_unused=True)
    flat = [torch.cat([(g if g is not None else torch.zeros_like(p)).flatten() for g, p in zip(gs, params)])
            for gs in (g_point, g_ctx)]
    n_point, n_ctx = (float(f.norm()) for f in flat)
    cosine = float(flat[0] @ flat[1] / (n_point * n_ctx)) if n_point > 0 and n_ctx > 0 else float("nan")
    return {"grad_point": n_point, "grad_context": n_ctx, "ratio": n_ctx / n_point, "cosine": cosine,
            "point_loss": float(point.detach()), "context_loss": float(losses["context_loss"].detach())}


def measure(preset: str, seed: int, batches: int, run_dir: Path | None = None, checkpoint: int = 0,
            overrides: list[str] | None = None) -> dict:
    """Median ratio, norms and cosine over the first ``batches`` training batches; raises ``ConfigError`` for a
    preset without a context term."""
    cfg = RunConfig.from_dict(apply_overrides(find_preset(preset).run_config(seed).to_dict(), overrides or []))
    if not cfg.context.enabled:
        raise ConfigError(f"{preset} has no context term (context.enabled is false): nothing to compare")
    module, vae = build(cfg)
    if checkpoint:
        if run_dir is None:
            raise ConfigError("--checkpoints other than 0 need --run-dir (the run whose checkpoints to load)")
        load_checkpoint(module, run_dir, checkpoint)
    module.train()
    data = ImageData(cfg.data)
    rows = [gradient_balance(module, batch_inputs(cfg, module, vae, data, step)) for step in range(batches)]
    med = {k: statistics.median(r[k] for r in rows) for k in rows[0]}
    return {"preset": preset, "seed": seed, "checkpoint": checkpoint, "run_dir": str(run_dir) if run_dir else None,
            "backbone": cfg.backbone, "context_weight": cfg.context.weight,
            "discrete_loss": cfg.diffusion.discrete_loss if cfg.backbone == "discrete" else None,
            "batches": batches, "median": med, "per_batch": rows}


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--presets", required=True, help="comma-separated preset names (any experiment)")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--batches", type=int, default=16)
    ap.add_argument("--run-dir", type=Path, help="a run of the (single) preset whose checkpoints to load")
    ap.add_argument("--checkpoints", default="0", help="comma-separated steps; 0 = initialisation")
    ap.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="config override, as core.train")
    ap.add_argument("--out", type=Path, help="append one JSON line per measurement here")
    args = ap.parse_args(argv)
    presets = [p for p in args.presets.split(",") if p]
    if args.run_dir and len(presets) != 1:
        ap.error("--run-dir belongs to one preset; give exactly one in --presets")
    overrides = args.set
    for preset in presets:
        for step in (int(s) for s in args.checkpoints.split(",")):
            out = measure(preset, args.seed, args.batches, args.run_dir, step, overrides)
            if overrides:
                out["overrides"] = args.set
            m = out["median"]
            print(f"{preset} seed {args.seed} checkpoint {step}: ratio {m['ratio']:.3g} (‖∇ctx‖ {m['grad_context']:.3g}"
                  f" / ‖∇point‖ {m['grad_point']:.3g}), cosine {m['cosine']:.2f}, median of {args.batches}", flush=True)
            if args.out:
                args.out.parent.mkdir(parents=True, exist_ok=True)
                with args.out.open("a") as f:
                    f.write(json.dumps(out) + "\n")


if __name__ == "__main__":
    main()
