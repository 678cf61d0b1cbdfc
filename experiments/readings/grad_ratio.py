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



def find_preset(name: str):
    """The preset called ``name`` in any experiment folder; ``ConfigError`` listing the close names otherwise."""
    import difflib

    from experiments.registry import EXPERIMENTS

    found = {}
    for experiment in EXPERIMENTS.values():
        for preset in experiment.presets:
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


def batch_inputs(cfg: RunConfig, module, vae, data: ImageData, step: int, timestep: int | None = None) -> tuple:
    """The inputs ``core.train`` feeds the module at optimizer step ``step`` (one process, no accumulation);
    with ``timestep`` every image of the batch is noised to that t instead of its drawn one (continuous backbones)."""
    tc = cfg.train
    x0 = MicroBatches(data, tc.seed, tc.batch_size, 1, 0, tc.batch_size)[step]
    x0 = vae.encode(x0) if vae else x0
    gens = image_generators(tc.seed, step, range(step * tc.batch_size, (step + 1) * tc.batch_size))
    if cfg.backbone == "discrete":
        return quantize(x0, cfg.model.token_levels), module.sample_timesteps(gens), gens
    timesteps = uniform_timesteps(gens, cfg.diffusion.num_train_timesteps)  # drawn either way: the same noise follows
    if timestep is not None:
        timesteps = torch.full_like(timesteps, timestep)
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
            overrides: list[str] | None = None, timestep: int | None = None) -> dict:
    """Median ratio, norms and cosine over the first ``batches`` training batches (every image at ``timestep``
    when given); raises ``ConfigError`` for a preset without a context term, a timestep outside
    [0, num_train_timesteps) or on the discrete backbone."""
    cfg = RunConfig.from_dict(apply_overrides(find_preset(preset).run_config(seed).to_dict(), overrides or []))
    if not cfg.context.enabled:
        raise ConfigError(f"{preset} has no context term (context.enabled is false): nothing to compare")
    if timestep is not None:
        if cfg.backbone == "discrete":
            raise ConfigError("--timesteps applies to the continuous backbones (the discrete one draws its own t)")
        if not 0 <= timestep < cfg.diffusion.num_train_timesteps:
            raise ConfigError(f"timestep {timestep} outside [0, {cfg.diffusion.num_train_timesteps})")
    module, vae = build(cfg)
    if checkpoint:
        if run_dir is None:
            raise ConfigError("--checkpoints other than 0 need --run-dir (the run whose checkpoints to load)")
        load_checkpoint(module, run_dir, checkpoint)
    module.train()
    data = ImageData(cfg.data)
    rows = [gradient_balance(module, batch_inputs(cfg, module, vae, data, step, timestep)) for step in range(batches)]
    med = {k: statistics.median(r[k] for r in rows) for k in rows[0]}
    return {"preset": preset, "seed": seed, "checkpoint": checkpoint, "run_dir": str(run_dir) if run_dir else None,
            "backbone": cfg.backbone, "context_weight": cfg.context.weight,
            "discrete_loss": cfg.diffusion.discrete_loss if cfg.backbone == "discrete" else None,
            "batches": batches, "timestep": timestep, "median": med, "per_batch": rows}


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--presets", required=True, help="comma-separated preset names (any experiment)")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--batches", type=int, default=16)
    ap.add_argument("--run-dir", type=Path, help="a run of the (single) preset whose checkpoints to load")
    ap.add_argument("--checkpoints", default="0", help="comma-separated steps; 0 = initialisation")
    ap.add_argument("--timesteps", default="", help="comma-separated t: one measurement per t with every image at "
                    "that t (default: the training draws, one measurement)")
    ap.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="config override, as core.train")
    ap.add_argument("--out", type=Path, help="append one JSON line per measurement here")
    args = ap.parse_args(argv)
    presets = [p for p in args.presets.split(",") if p]
    if args.run_dir and len(presets) != 1:
        ap.error("--run-dir belongs to one preset; give exactly one in --presets")
    overrides = args.set
    timesteps = [int(t) for t in args.timesteps.split(",") if t] or [None]
    for preset, step, t in ((p, int(s), t) for p in presets for s in args.checkpoints.split(",") for t in timesteps):
        out = measure(preset, args.seed, args.batches, args.run_dir, step, overrides, t)
        if overrides:
            out["overrides"] = args.set
        m = out["median"]
        at = "" if t is None else f" t={t}"
        print(f"{preset} seed {args.seed} checkpoint {step}{at}: ratio {m['ratio']:.3g} (‖∇ctx‖ {m['grad_context']:.3g}"
              f" / ‖∇point‖ {m['grad_point']:.3g}), cosine {m['cosine']:.2f}, median of {args.batches}", flush=True)
        if args.out:
            args.out.parent.mkdir(parents=True, exist_ok=True)
            with args.out.open("a") as f:
                f.write(json.dumps(out) + "\n")


if __name__ == "__main__":
    main()
