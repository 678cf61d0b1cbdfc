"""Training cost of every paper preset: s/step baseline vs ConPreDiff, images/s, peak memory, GPU-hours.

    python benchmarks/paper_scale.py --device cuda --precision bf16                    # every paper preset
    python benchmarks/paper_scale.py --device cuda --precision bf16 --presets 'paper-coco256-*' --batch 32
    python benchmarks/paper_scale.py --tiny --steps 1 --warmup 0                       # seconds on a CPU (tests)
    python benchmarks/paper_scale.py --device cpu --context-only --presets 'paper-celebahq256-conprediff' --batch 8

``--profile PATH`` adds torch.profiler tables of one extra step per variant and of the context term alone
(neighbor gather, noise draw, decoder, W2 solve, backward); ``--context-only`` prints only the latter.

For every preset with ``scale == "paper"`` in ``experiments/*/__init__.py``: the real architecture from the
preset's config (``core.models.build_unet`` + ``core.objective.ContextPrediction``, random weights), synthetic
inputs of the shapes training sees (latents of the preset's autoencoder for latent presets, CLIP-sized text
states for text-to-image), one optimizer step (forward, backward, AdamW) timed as ``benchmarks/overhead.py``
does: median of ``--steps`` after ``--warmup``, the baseline and every context variant of the same backbone
alternated step by step in one process. A preset's baseline is its own config with the context term off.

Columns: s/step of the baseline and of the preset; their ratio; images/s of the preset; peak memory of the
preset's step (CUDA only: parameters + optimizer state + the step's peak allocation); GPU-hours to the
preset's ``train.steps`` at its global ``train.batch_size`` (time per image at the measured batch x images
in the budget; with ``--batch`` below the global batch that assumes data-parallel scaling).
``--tiny`` shrinks widths, spatial size and batch so every preset runs on a CPU in seconds: it checks the
code path, its numbers mean nothing. Writes a Markdown table (stdout, ``--markdown``) and JSON (``--json``).
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import functools
import fnmatch
import importlib
import json
import statistics
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "benchmarks"))
from core.config import ContextConfig, RunConfig  # noqa: E402
from core.objective import ContextPrediction, image_generators  # noqa: E402
from overhead import PRECISIONS, precision_context, step_times, sync  # noqa: E402

# Latent grids of the presets' frozen autoencoders (their weights are not needed to time the UNet):
# (downsampling factor, latent channels). VQ-f4 of CompVis/ldm-celebahq-256: 64x64x3 at 256 px;
# the KL-f8 `vqvae` of CompVis/ldm-text2im-large-256: 32x32x4 (as experiments/*/__init__.py document them).
KNOWN_AUTOENCODERS = {"CompVis/ldm-celebahq-256": (4, 3), "CompVis/ldm-text2im-large-256": (8, 4)}
# Tokens per caption of the text encoders (CLIP's context length; core.text's MiniLM cap).
KNOWN_TEXT_TOKENS = {"openai/clip-vit-large-patch14": 77, "minilm": 16}


def paper_presets(patterns: list[str] | None = None) -> list[tuple[str, object]]:
    """``(experiment, preset)`` for every paper preset whose name matches one of ``patterns`` (fnmatch)."""
    out = []
    for init in sorted((ROOT / "experiments").glob("*/__init__.py")):
        module = importlib.import_module(f"experiments.{init.parent.name}")
        for preset in getattr(module, "PRESETS", []):
            if preset.scale == "paper" and (not patterns or any(fnmatch.fnmatch(preset.name, p) for p in patterns)):
                out.append((init.parent.name, preset))
    if not out:
        raise SystemExit(f"no paper preset matches --presets {','.join(patterns or [])!r}")
    return out


def autoencoder_grid(cfg: RunConfig) -> tuple[int, int]:
    """(downsampling factor, latent channels) of ``cfg.model.vae`` from the table above or a local config.json."""
    vae = cfg.model.vae
    if vae in KNOWN_AUTOENCODERS:
        return KNOWN_AUTOENCODERS[vae]
    config = Path(str(vae)).expanduser() / (cfg.model.vae_subfolder or "") / "config.json"
    if config.exists():
        c = json.loads(config.read_text())
        return 2 ** (len(c["block_out_channels"]) - 1), int(c["latent_channels"])
    raise SystemExit(f"model.vae={vae!r}: unknown latent grid; add it to KNOWN_AUTOENCODERS in {Path(__file__).name} "
                     "or point model.vae at a local folder with its config.json")


def input_shape(cfg: RunConfig) -> dict:
    """What the UNet trains on: ``{"channels", "size", "text_tokens", "kind"}``."""
    if cfg.backbone == "discrete":
        raise SystemExit(f"{cfg.name}: discrete backbones are not timed by this benchmark")
    size, channels, kind = cfg.data.resolution, cfg.data.channels, "pixels"
    if cfg.backbone == "latent":
        factor, channels = autoencoder_grid(cfg)
        size, kind = size // factor, "latents"
    tokens = 0
    if cfg.model.cross_attention_dim is not None:
        tokens = KNOWN_TEXT_TOKENS.get(cfg.model.text_encoder, 77)
        kind += f" + text {tokens}x{cfg.model.cross_attention_dim}"
    return {"channels": channels, "size": size, "text_tokens": tokens, "kind": kind}


def shrink(cfg: RunConfig) -> RunConfig:
    """``--tiny``: the same architecture family at widths 8 x level, one layer per block, the smallest grid."""
    levels = len(cfg.model.block_out_channels)
    model = dataclasses.replace(
        cfg.model, block_out_channels=tuple(8 * (i + 1) for i in range(levels)), layers_per_block=1,
        norm_num_groups=8, head_channels=8 if cfg.model.head_channels else None,
        num_heads=2 if cfg.model.num_heads else None,
        cross_attention_dim=32 if cfg.model.cross_attention_dim is not None else None)
    context = dataclasses.replace(cfg.context, latent_dim=4, hidden_dim=8, depth=1)
    return dataclasses.replace(cfg, model=model, context=context)


@dataclasses.dataclass
class Group:
    """Presets sharing one backbone and input: timed together, one baseline, one variant per context config."""

    cfg: RunConfig
    shape: dict
    batch: int
    variants: dict[str, ContextConfig | None]
    rows: list[dict]


def batch_for(name: str, batch: str | None) -> int | None:
    """``--batch``: ``B`` for every preset and/or ``PATTERN=B`` items (fnmatch on the name; the last match wins)."""
    chosen = None
    for item in (batch.split(",") if batch else []):
        pattern, _, value = item.rpartition("=")
        if not value.isdigit() or int(value) < 1:
            raise SystemExit(f"--batch {batch!r}: each item must be B or PATTERN=B with B a positive integer")
        if not pattern or fnmatch.fnmatch(name, pattern):
            chosen = int(value)
    return chosen


def group_presets(entries, batch: str | None, tiny: bool, size: int | None = None) -> list[Group]:
    groups: list[Group] = []
    for experiment, preset in entries:
        cfg = preset.run_config(0)
        shape = input_shape(cfg)
        if tiny:
            cfg = shrink(cfg)
            tokens = min(shape["text_tokens"], 4)
            text = f" + text {tokens}x{cfg.model.cross_attention_dim}" if tokens else ""
            kind = shape["kind"].split(" + ")[0] + text
            shape = {**shape, "size": 2 ** (len(cfg.model.block_out_channels) - 1), "text_tokens": tokens, "kind": kind}
        if size:
            shape = {**shape, "size": size}
        b = batch_for(preset.name, batch) or (2 if tiny else cfg.train.batch_size)
        key = (cfg.model, cfg.diffusion, tuple(shape.items()), b)
        group = next((g for g in groups
                      if (g.cfg.model, g.cfg.diffusion, tuple(g.shape.items()), g.batch) == key), None)
        if group is None:
            group = Group(cfg, shape, b, {"baseline": None}, [])
            groups.append(group)
        variant = "baseline"
        if cfg.context.enabled:
            same = [n for n, c in group.variants.items() if c == cfg.context]
            variant = same[0] if same else preset.method
            if not same:
                while variant in group.variants:
                    variant += "'"
                group.variants[variant] = cfg.context
        group.rows.append({"experiment": experiment, "preset": preset.name, "method": preset.method,
                           "variant": variant, "paper": preset.paper, "train_steps": cfg.train.steps,
                           "global_batch": cfg.train.batch_size})
    return groups


def measure(group: Group, device: str, precision: str, steps: int, warmup: int) -> dict[str, dict]:
    """Per variant: median s/step, images/s and peak bytes (None off CUDA)."""
    peak: dict[str, int] = {}
    times = step_times(group.cfg.model, group.shape["size"], group.shape["channels"], group.batch, group.variants,
                       device, steps, warmup, group.cfg.diffusion, precision=precision,
                       text_tokens=group.shape["text_tokens"], peak_memory=peak)
    out = {}
    for name, ts in times.items():
        median = statistics.median(ts)
        out[name] = {"s_per_step": median, "images_per_s": group.batch / median, "peak_bytes": peak.get(name),
                     "times": ts}
    return out


def results(groups: list[Group], measured: list[dict]) -> list[dict]:
    rows = []
    for group, m in zip(groups, measured):
        base, size = m["baseline"]["s_per_step"], group.shape["size"]
        for r in group.rows:
            mine = m[r["variant"]]
            per_image = {k: v["s_per_step"] / group.batch for k, v in (("baseline", m["baseline"]), ("preset", mine))}
            images = r["train_steps"] * r["global_batch"]
            rows.append({
                **r, "input": f"{size}x{size}x{group.shape['channels']} {group.shape['kind']}",
                "batch": group.batch, "baseline_s_per_step": base, "s_per_step": mine["s_per_step"],
                "ratio": mine["s_per_step"] / base, "images_per_s": mine["images_per_s"],
                "peak_gib": None if mine["peak_bytes"] is None else mine["peak_bytes"] / 2**30,
                "gpu_hours_baseline": per_image["baseline"] * images / 3600,
                "gpu_hours": per_image["preset"] * images / 3600,
            })
    return rows


# Context-term internals labelled for --profile (module globals of core.objective, wrapped only while profiling).
CONTEXT_RANGES = {"gather_neighbors": "context: neighbor gather", "randn_per_image": "context: noise draw",
                  "w2_sets": "context: W2 solve"}
STEP_RANGES = ("step: forward", "step: backward", "step: optimizer")


@contextlib.contextmanager
def labelled_context_ops():
    """Wrap the context term's parts in ``torch.profiler.record_function`` ranges; the loss is unchanged."""
    import core.objective as objective
    from core.context import ContextDecoder, ExplicitNeighborDecoder

    def labelled(fn, label):
        @functools.wraps(fn)
        def wrapper(*args, **kwargs):
            with torch.profiler.record_function(label):
                return fn(*args, **kwargs)
        return wrapper

    saved = {name: getattr(objective, name) for name in CONTEXT_RANGES}
    forwards = {cls: cls.forward for cls in (ContextDecoder, ExplicitNeighborDecoder)}
    try:
        for name, label in CONTEXT_RANGES.items():
            setattr(objective, name, labelled(saved[name], label))
        for cls, fwd in forwards.items():
            cls.forward = labelled(fwd, "context: decoder")
        yield
    finally:
        for name, fn in saved.items():
            setattr(objective, name, fn)
        for cls, fwd in forwards.items():
            cls.forward = fwd


def profile_report(group: Group, device: str, precision: str) -> str:
    """One profiled step per variant (after one warm-up step): time in each labelled range, then the top ops."""
    averages: dict = {}
    with labelled_context_ops():
        step_times(group.cfg.model, group.shape["size"], group.shape["channels"], group.batch, group.variants, device,
                   0, 1, group.cfg.diffusion, precision=precision, text_tokens=group.shape["text_tokens"],
                   profile=averages)
    cuda = device.startswith("cuda")
    lines = [f"## {', '.join(sorted({r['preset'] for r in group.rows}))}: {group.shape['size']}x{group.shape['size']}x"
             f"{group.shape['channels']} {group.shape['kind']}, batch {group.batch}, {precision}, {device}", "",
             "| range | " + " | ".join(f"{v} CPU ms | {v} device ms" for v in averages) + " |",
             "|---|" + "---|---|" * len(averages)]
    for label in STEP_RANGES + tuple(CONTEXT_RANGES.values()) + ("context: decoder",):
        cells = []
        for avg in averages.values():
            events = [e for e in avg if e.key == label]
            cpu = sum(e.cpu_time_total for e in events) / 1e3
            dev = sum(getattr(e, "device_time_total", 0) for e in events) / 1e3
            cells.append(f"{cpu:.1f} | {dev:.1f}" if events else "- | -")
        lines.append(f"| {label} | " + " | ".join(cells) + " |")
    lines += ["", *context_breakdown(group, device, precision)]
    sort = "self_cuda_time_total" if cuda else "self_cpu_time_total"
    for name, avg in averages.items():
        lines += ["", f"### {name}: top operators by self {'device' if cuda else 'CPU'} time", "",
                  avg.table(sort_by=sort, row_limit=25)]
    return "\n".join(lines) + "\n"


def context_breakdown(group: Group, device: str, precision: str) -> list[str]:
    """The context term alone, forward and backward, on random features of the tapped map's shape ``(B, F, H, W)``
    and random targets ``(B, D, H, W)``: one profiled call per context variant after one warm-up call."""
    b, c, size = group.batch, group.shape["channels"], group.shape["size"]
    features = group.cfg.model.block_out_channels[0]
    labels = ("context: forward", *CONTEXT_RANGES.values(), "context: decoder", "context: backward")
    variants = {n: v for n, v in group.variants.items() if v is not None}
    lines = [f"### the context term alone: features ({b}, {features}, {size}, {size}), targets ({b}, {c}, {size}, "
             f"{size}), {precision}, {device}", "",
             "| range | " + " | ".join(f"{v} CPU ms | {v} device ms" for v in variants) + " |",
             "|---|" + "---|---|" * len(variants)]
    cells: dict[str, list[str]] = {label: [] for label in labels}
    for ctx_cfg in variants.values():
        torch.manual_seed(0)
        module = ContextPrediction(ctx_cfg, features, c).to(device)
        feats = torch.randn(b, features, size, size, device=device, requires_grad=True)
        target = torch.randn(b, c, size, size, device=device)
        autocast = precision_context(precision, device)
        activities = [torch.profiler.ProfilerActivity.CPU]
        if device.startswith("cuda"):
            activities.append(torch.profiler.ProfilerActivity.CUDA)
        for i in range(2):
            prof = torch.profiler.profile(activities=activities) if i else contextlib.nullcontext()
            with labelled_context_ops(), prof:
                with torch.profiler.record_function("context: forward"), autocast:
                    loss, _ = module(feats, target, image_generators(0, i, range(b)))
                with torch.profiler.record_function("context: backward"):
                    loss.backward()
                sync(device)
        averages = prof.key_averages()
        for label in labels:
            events = [e for e in averages if e.key == label]
            cpu = sum(e.cpu_time_total for e in events) / 1e3
            dev = sum(getattr(e, "device_time_total", 0) for e in events) / 1e3
            cells[label].append(f"{cpu:.1f} | {dev:.1f}" if events else "- | -")
    return lines + [f"| {label} | " + " | ".join(cells[label]) + " |" for label in labels]


def markdown(rows: list[dict], header: str, unit: str = "GPU") -> str:
    lines = [header, "", "| experiment | preset | input | batch | baseline s/step | preset s/step | ratio | images/s | "
             f"peak GiB | {unit}-hours to train.steps (baseline / preset) |", "|---" * 10 + "|"]
    for r in rows:
        peak = "n/a" if r["peak_gib"] is None else f"{r['peak_gib']:.1f}"
        lines.append(
            f"| {r['experiment']} | {r['preset']} | {r['input']} | {r['batch']} | {r['baseline_s_per_step']:.3f} | "
            f"{r['s_per_step']:.3f} | {r['ratio']:.2f}x | {r['images_per_s']:.1f} | {peak} | "
            f"{r['gpu_hours_baseline']:.1f} / {r['gpu_hours']:.1f} "
            f"({r['train_steps']:,} steps x {r['global_batch']}) |")
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> list[dict]:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--precision", default="fp32", choices=PRECISIONS)
    parser.add_argument("--steps", type=int, default=8, help="timed steps per variant (the median is reported)")
    parser.add_argument("--warmup", type=int, default=3)
    parser.add_argument("--batch", help="per-step batch instead of the preset's global train.batch_size: B, or "
                        "comma-separated PATTERN=B items (e.g. 'paper-coco256-*=32')")
    parser.add_argument("--presets", help="comma-separated fnmatch patterns of preset names "
                        "(default: all paper presets)")
    parser.add_argument("--size", type=int, help="spatial size of the UNet's input instead of the preset's "
                        "(e.g. a small latent grid to profile an LDM-4-width model on a CPU)")
    parser.add_argument("--context-only", action="store_true", help="only time the context term alone (forward "
                        "and backward, profiled by part) at each preset's shape; print its tables, no step timing")
    parser.add_argument("--tiny", action="store_true", help="shrink every model to run on a CPU in seconds (tests)")
    parser.add_argument("--threads", type=int, help="torch CPU threads")
    parser.add_argument("--markdown", type=Path, help="also write the table here")
    parser.add_argument("--json", type=Path, help="write every number (and each step's time) here")
    parser.add_argument("--profile", type=Path, help="also profile one step of each variant (torch.profiler, in "
                        "separate untimed runs) and write where the time goes here")
    args = parser.parse_args(argv)
    if args.steps < 1 or args.warmup < 0:
        parser.error("--steps must be >= 1 and --warmup >= 0")
    if args.device.startswith("cuda") and not torch.cuda.is_available():
        parser.error("--device cuda: no CUDA device is visible")
    if args.threads:
        torch.set_num_threads(args.threads)
    groups = group_presets(paper_presets(args.presets.split(",") if args.presets else None), args.batch, args.tiny,
                           args.size)
    if args.context_only:
        report = "\n".join("\n".join(context_breakdown(g, args.device, args.precision)) + "\n" for g in groups)
        print(report)
        if args.profile:
            args.profile.parent.mkdir(parents=True, exist_ok=True)
            args.profile.write_text(report)
        return []
    measured = []
    for group in groups:
        t0 = time.perf_counter()
        measured.append(measure(group, args.device, args.precision, args.steps, args.warmup))
        print(f"# timed {', '.join(r['preset'] for r in group.rows)} in {time.perf_counter() - t0:.0f} s",
              file=sys.stderr, flush=True)
    rows = results(groups, measured)
    if args.profile:
        report = "".join(profile_report(g, args.device, args.precision) + "\n" for g in groups)
        args.profile.parent.mkdir(parents=True, exist_ok=True)
        args.profile.write_text(report)
    device = (torch.cuda.get_device_name(args.device) if args.device.startswith("cuda")
              else f"cpu ({torch.get_num_threads()} threads)")
    header = (f"torch {torch.__version__}, {device}, {args.precision}, median of {args.steps} steps after "
              f"{args.warmup} "
              f"warm-up, variants alternated{', TINY widths (code path only, not a measurement)' if args.tiny else ''}")
    table = markdown(rows, header, "GPU" if args.device.startswith("cuda") else "CPU")
    print(table)
    if args.markdown:
        args.markdown.parent.mkdir(parents=True, exist_ok=True)
        args.markdown.write_text(table)
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        meta = {"torch": torch.__version__, "device": device, "precision": args.precision, "steps": args.steps,
                "warmup": args.warmup, "batch_override": args.batch, "size_override": args.size, "tiny": args.tiny}
        args.json.write_text(json.dumps({"meta": meta, "rows": rows}, indent=1) + "\n")
    return rows


if __name__ == "__main__":
    main()
