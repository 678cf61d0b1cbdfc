"""Rehearse paper presets end to end before renting GPUs: the real runner, every stage, timed and sized.

    python -m experiments.rehearse --presets paper-celebahq256-conprediff --stand-ins
    python -m experiments.rehearse --experiment unconditional                  # every paper preset of Table 1
    python -m experiments.rehearse --presets 'paper-*' --stand-ins --launch 'accelerate launch --multi_gpu --num_processes 8'

For each chosen paper preset this runs the very command a user runs (``python -m experiments.<experiment> --scale
paper ...``, or ``--launch``'s launcher in front of it) three times, in fresh processes:

1. **first**: training at the preset's real architecture, precision and batch (``--batch`` overrides it, with LDM's
   lr rule) for ``--train-steps`` steps, stopped by SIGTERM to its process group once step 1 is logged, as a
   scheduler's preemption would: it must save a checkpoint at the end of its current step and exit;
2. **resume**: the same command: it must resume from that checkpoint, train to ``--train-steps``, export,
   draw ``--num-samples`` samples with the preset's sampler(s) at ``--sampling-steps`` steps (default: the preset's
   own count; inpainting: RePaint at that many steps), measure each paper metric whose inputs exist and record it;
3. **again**: the same command once more: it must train nothing and leave the export as it was.

Each stage (``check``, ``latent_cache`` (encoding the training images once), ``train``, ``checkpoint``, ``export``,
``sample``, ``metrics``) reports its wall time and peak
memory from inside the runner (:class:`core.runlog.Stage`: resident set sampled every 50 ms; CUDA's peak
allocation), and each process its peak resident set (``os.wait4``). The table goes to stdout and to
``<out>/rehearsal.md`` (``--markdown`` also elsewhere), the rows to ``<out>/rehearsal.json``; the records to
``<out>/records.jsonl``, never to ``results/``: the overridden keys label them pilots whatever the file.

``--stand-ins`` generates inputs the user has not provided yet, at the real shapes: an image folder of random
256 px images (train and test splits, with captions), the preset's autoencoder (VQ-f4 or KL-f8) and CLIP ViT-L/14
text tower with random weights and the released architectures, and a prompts file. Their outputs measure nothing;
the rehearsal measures time and memory. Metrics whose weights are missing (Inception, AlexNet; they cannot be
stood in for: their identity is checked) are skipped and named (the runner's ``--allow-missing-metrics``).
``--tiny`` also shrinks every architecture (the runner's smoke shrinking, 32 px): seconds on a CPU, for tests.

Exit status 1 if any preset failed a stage (its log is named); the other presets still run.
"""

from __future__ import annotations

import argparse
import fnmatch
import json
import os
import shlex
import subprocess
import sys
import time
from pathlib import Path

from core.runlog import read_provenance
from eval.records import ROOT

from .presets import Preset
from .smoke import SMOKE, make_fake_imagefolder, make_random_autoencoder

STAGES = ("check", "latent_cache", "train", "checkpoint", "export", "sample", "metrics")
PHASES = ("first", "resume", "again")

# The released text tower's architecture (its transformers config.json), for a stand-in with random weights (the
# autoencoders': experiments.smoke.VQ_F4 / KL_F8).
CLIP_L14_TEXT = dict(  # openai/clip-vit-large-patch14's text tower (CLIPTextModel)
    vocab_size=49408, hidden_size=768, intermediate_size=3072, num_hidden_layers=12, num_attention_heads=12,
    max_position_embeddings=77, hidden_act="quick_gelu", projection_dim=768)


def paper_presets(experiment: str | None = None) -> list[tuple[str, Preset]]:
    """``(experiment, preset)`` for every paper preset of the registry's experiments (or of ``experiment``); a preset
    that several experiments share (the backbones table reuses Table 1's rows) is rehearsed once, under the first."""
    from .registry import EXPERIMENTS

    out, seen = [], set()
    for name, exp in EXPERIMENTS.items():
        if experiment in (None, name):
            out += [(name, p) for p in exp.presets if p.scale == "paper" and p.name not in seen]
            seen |= {p.name for p in exp.presets}
    return out


def choose(patterns: str | None, experiment: str | None) -> list[tuple[str, Preset]]:
    """The presets whose names match one of the comma-separated fnmatch ``patterns``; ValueError if one matches none."""
    found = paper_presets(experiment)
    if not patterns:
        return found
    out = []
    for pattern in patterns.split(","):
        hits = [(e, p) for e, p in found if fnmatch.fnmatch(p.name, pattern)]
        if not hits:
            raise ValueError(f"no paper preset matches {pattern!r}; they are: {', '.join(p.name for _, p in found)}")
        out += [h for h in hits if h not in out]
    return out


# ---------------------------------------------------------------------------- stand-ins


def stand_in_text_encoder(folder: Path, tiny: bool) -> Path:
    """A random-weight CLIP text tower (:data:`CLIP_L14_TEXT`; ``tiny``: 2 layers of width 32) and a CLIP tokenizer
    over a letters-only BPE vocabulary (the real one is a download), saved with ``save_pretrained``."""
    import torch
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTokenizer

    if (folder / "config.json").exists():
        return folder
    vocab = {"<|startoftext|>": 0, "<|endoftext|>": 1}
    for c in "abcdefghijklmnopqrstuvwxyz0123456789":
        vocab[c], vocab[c + "</w>"] = len(vocab), len(vocab) + 1
    config = dict(CLIP_L14_TEXT, bos_token_id=0, eos_token_id=1, pad_token_id=1)
    if tiny:
        config.update(hidden_size=32, intermediate_size=37, num_hidden_layers=2, num_attention_heads=4, projection_dim=32)
    torch.manual_seed(0)
    CLIPTextModel(CLIPTextConfig(**config)).save_pretrained(folder)
    CLIPTokenizer(vocab=vocab, merges=[], model_max_length=77).save_pretrained(folder)
    return folder


def autoencoder_kind(cfg) -> str:
    """"vq-f4" or "kl-f8" from the preset's autoencoder (the two the paper presets use)."""
    vae = str(cfg.model.vae or "")
    if "celebahq" in vae or "ffhq" in vae:
        return "vq-f4"
    if "text2im" in vae:
        return "kl-f8"
    raise ValueError(f"no stand-in for the autoencoder {vae!r}: give it with --set model.vae=<folder>")


def stand_in_overrides(experiment: str, preset: Preset, out: Path, args: argparse.Namespace) -> tuple[list[str], list[str]]:
    """``(--set items, --eval items)`` pointing ``preset`` at generated stand-ins in ``out/stand-ins``."""
    cfg = preset.run_config(0)
    size = 32 if args.tiny else cfg.data.resolution
    folder = out / "stand-ins"
    n_test = max(args.num_samples, 1)
    data = make_fake_imagefolder(folder / f"images-{size}", cfg.data.channels, max(8, args.batch or 0), n_test, size)
    sets, evals = [f"data.source={data}", "data.num_workers=0"], []
    if args.tiny:
        sets += [s for s in SMOKE if not s.startswith(("train.steps", "train.batch_size", "diffusion.sampling_steps",
                                                        "data.num_workers", "train.checkpoint_every"))]
        sets += [f"data.resolution={size}", "data.latent_cache=false"]
    if cfg.backbone == "latent":
        kind = autoencoder_kind(cfg)
        vae = make_random_autoencoder(folder / (kind + ('-tiny' if args.tiny else '')), kind=kind, released=not args.tiny)
        sets += [f"model.vae={vae}",
                 "model.vae_revision=null", "model.vae_subfolder=null"]
    if cfg.model.text_encoder:
        sets += [f"model.text_encoder={stand_in_text_encoder(folder / ('clip-text' + ('-tiny' if args.tiny else '')), args.tiny)}",
                 "model.text_encoder_revision=null"]
        if args.tiny:
            sets += ["model.cross_attention_dim=32", "model.attention=[false,true]"]
    if preset.extra.get("prompts_file"):
        prompts = folder / "prompts.jsonl"
        if not prompts.exists():
            prompts.parent.mkdir(parents=True, exist_ok=True)
            prompts.write_text("".join(json.dumps({"caption": f"a photo of a thing number {i}"}) + "\n"
                                       for i in range(1000)))
        evals.append(f"prompts_file={prompts}")
    return sets, evals


# ---------------------------------------------------------------------------- running and reading


def runner_command(experiment: str, preset: Preset, out: Path, args: argparse.Namespace, sets: list[str],
                   evals: list[str], steps: int) -> list[str]:
    """The user's command for ``preset`` at ``steps`` training steps (``args.launch`` in front of it, or python)."""
    launch = shlex.split(args.launch) if args.launch else [sys.executable]
    sets = [*sets, f"train.steps={steps}", "train.log_every=1", "train.checkpoint_minutes=0"]
    if args.batch:
        sets.append(f"train.batch_size={args.batch}")
    if args.sampling_batch:
        sets.append(f"diffusion.sampling_batch={args.sampling_batch}")
    if experiment == "inpainting" and args.sampling_steps:  # RePaint: T steps, jumps of at most T/2
        jump = max(1, min(preset.extra.get("jump_length", 10), args.sampling_steps // 2))
        evals = [*evals, f"steps={args.sampling_steps}", f"jump_length={jump}",
                 f"jump_n_sample={min(preset.extra.get('jump_n_sample', 10), 2)}"]
    cmd = [*launch, "-m", f"experiments.{experiment}", "--scale", "paper", "--presets", preset.name, "--seeds", "0",
           "--runs-dir", str(out / "runs"), "--records", str(out / "records.jsonl"), "--no-tables",
           "--allow-missing-metrics", "--num-samples", str(args.num_samples)]
    if args.sampling_steps and experiment != "inpainting":
        cmd += ["--sampling-steps", str(args.sampling_steps)]
    for s in [*sets, *args.overrides]:
        cmd += ["--set", s]
    for e in evals:
        cmd += ["--eval", e]
    return cmd


def run_measured(cmd: list[str], log: Path, stages: Path, stop_after: tuple[Path, int] | None = None
                 ) -> tuple[int, float, float]:
    """Run ``cmd`` with ``$CONPREDIFF_STAGES=stages``, output to ``log``; ``(exit status, wall s, peak RSS GiB)``
    where the peak is the largest resident set of the process and its descendants (``os.wait4``).
    ``stop_after=(stats.jsonl, step)``: SIGTERM to the command's process group once that step is logged."""
    import signal
    import threading

    from core.runlog import STAGES_ENV, read_jsonl

    log.parent.mkdir(parents=True, exist_ok=True)
    stages.parent.mkdir(parents=True, exist_ok=True)
    stages.unlink(missing_ok=True)
    t0 = time.perf_counter()
    with open(log, "w") as fh:
        fh.write("$ " + shlex.join(cmd) + "\n")
        fh.flush()
        proc = subprocess.Popen(cmd, stdout=fh, stderr=subprocess.STDOUT, cwd=ROOT, start_new_session=True,
                                env=dict(os.environ, **{STAGES_ENV: str(stages)}))
        finished = threading.Event()

        def preempt() -> None:  # as SLURM does: the whole job's processes get SIGTERM
            stats, step = stop_after
            while not finished.wait(0.05):
                if stats.exists() and any(r.get("step", 0) >= step for r in read_jsonl(stats)):
                    os.killpg(proc.pid, signal.SIGTERM)
                    return

        if stop_after:
            threading.Thread(target=preempt, daemon=True).start()
        _, status, usage = os.wait4(proc.pid, 0)
        finished.set()
    proc.returncode = os.waitstatus_to_exitcode(status)
    return proc.returncode, time.perf_counter() - t0, usage.ru_maxrss / 2**20  # KiB on Linux


def stage_rows(stages: Path) -> dict[str, dict]:
    """Per stage: calls, total seconds, peak RSS and CUDA GiB over every process's lines of ``stages``."""
    from core.runlog import read_jsonl

    out: dict[str, dict] = {}
    for row in read_jsonl(stages) if stages.exists() else []:
        s = out.setdefault(row["stage"], {"calls": 0, "seconds": 0.0, "peak_rss_gb": 0.0})
        s["calls"] += 1 if row.get("rank", 0) == 0 else 0
        s["seconds"] += row["seconds"] if row.get("rank", 0) == 0 else 0.0
        s["peak_rss_gb"] = max(s["peak_rss_gb"], row["peak_rss_gb"])
        if "peak_cuda_gb" in row:
            s["peak_cuda_gb"] = max(s.get("peak_cuda_gb", 0.0), row["peak_cuda_gb"])
    return out


def run_dir(preset: Preset, out: Path) -> Path:
    from .cluster import run_dir_for

    return run_dir_for(out / "runs", "paper", preset.name, 0)


def verify_interrupted(preset: Preset, out: Path, code: int, steps: int) -> list[str]:
    """The first phase must have stopped on SIGTERM with a checkpoint before ``steps`` and no export."""
    from core.train import list_checkpoints

    run = run_dir(preset, out)
    saved = [s for s, _ in list_checkpoints(run)]
    problems = [] if code != 0 else [f"training finished all {steps} steps before SIGTERM arrived (raise --train-steps)"]
    if not saved or saved[-1] >= steps:
        problems.append(f"checkpoints after SIGTERM: {saved or 'none'} (expected one before step {steps})")
    if (run / "pipeline" / "unet").exists():
        problems.append("an export exists after an interrupted training")
    return problems


def verify(experiment: str, preset: Preset, out: Path, steps: int, n: int) -> list[str]:
    """What the phase that trained to ``steps`` must have left: problems found (empty: all there)."""
    from core.runlog import read_jsonl, read_provenance

    run = run_dir(preset, out)
    problems = []
    prov = read_provenance(run / "pipeline") or {}
    if prov.get("checkpoint") != steps:
        problems.append(f"the export holds checkpoint {prov.get('checkpoint')}, not {steps}")
    logged = [r["step"] for r in read_jsonl(run / "stats.jsonl")] if (run / "stats.jsonl").exists() else []
    if not logged or logged[-1] != steps:
        problems.append(f"stats.jsonl ends at step {logged[-1] if logged else None}, not {steps}")
    folders = run / ("inpainting" if experiment == "inpainting" else "samples")
    for marker in folders.rglob("*.provenance.json") if folders.exists() else []:
        pngs = list(marker.with_name(marker.name.removesuffix(".provenance.json")).glob("*.png"))
        if json.loads(marker.read_text()).get("pipeline", {}).get("checkpoint") != steps:
            problems.append(f"{marker}: samples of another checkpoint")
        if len(pngs) < n:
            problems.append(f"{marker.parent}: {len(pngs)} PNGs, not {n}")
    if not folders.exists():
        problems.append(f"no samples in {folders}")
    return problems


def markdown(rows: list[dict]) -> str:
    head = ("| preset | phase | stage | calls | seconds | peak RSS GiB | peak CUDA GiB |\n"
            "|---|---|---|---:|---:|---:|---:|")
    lines = [head]
    for r in rows:
        cuda = f"{r['peak_cuda_gb']:.2f}" if r.get("peak_cuda_gb") is not None else "–"
        lines.append(f"| {r['preset']} | {r['phase']} | {r['stage']} | {r.get('calls', '')} | {r['seconds']:.1f} | "
                     f"{r['peak_rss_gb']:.2f} | {cuda} |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m experiments.rehearse", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--presets", help="comma-separated paper preset names or fnmatch patterns (default: all)")
    from .registry import EXPERIMENTS

    parser.add_argument("--experiment", choices=[n for n, e in EXPERIMENTS.items() if "paper" in e.scales],
                        help="only this experiment's paper presets")
    parser.add_argument("--out", type=Path, default=ROOT / "runs" / "rehearsal",
                        help="runs, logs, records and the table (default runs/rehearsal; never results/)")
    parser.add_argument("--stand-ins", action="store_true",
                        help="generate the data, autoencoder, text encoder and prompts at their real shapes (random)")
    parser.add_argument("--tiny", action="store_true", help="also shrink every architecture (tests; implies --stand-ins)")
    parser.add_argument("--train-steps", type=int, default=3,
                        help="training steps (>= 3: the first phase is stopped by SIGTERM after step 1)")
    parser.add_argument("--batch", type=int, help="global training batch (default: the preset's; lr follows LDM's rule)")
    parser.add_argument("--num-samples", type=int, default=4,
                        help="images sampled (inpainting: test images); at least 4 (precision/recall k=3)")
    parser.add_argument("--sampling-steps", type=int,
                        help="sampling steps of every sampler (inpainting: RePaint's T; default: the preset's own)")
    parser.add_argument("--sampling-batch", type=int, help="images per sampling batch per process")
    parser.add_argument("--launch", help="launcher in front of `-m experiments.<x>`, e.g. 'accelerate launch "
                                         "--multi_gpu --num_processes 8' (default: this python)")
    parser.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                        help="further config overrides for every preset")
    parser.add_argument("--markdown", type=Path, help="also write the table here")
    args = parser.parse_args(argv)
    args.stand_ins = args.stand_ins or args.tiny
    if args.train_steps < 3:
        parser.error(f"--train-steps must be >= 3 (step 1 is logged, then SIGTERM stops training), got {args.train_steps}")
    for flag in ("num_samples", "sampling_steps", "batch", "sampling_batch"):
        value = getattr(args, flag)
        if value is not None and value < 1:
            parser.error(f"--{flag.replace('_', '-')} must be >= 1, got {value}")
    try:
        chosen = choose(args.presets, args.experiment)
    except ValueError as e:
        parser.error(str(e))
    if (args.out.resolve() / "records.jsonl") == (ROOT / "results" / "records.jsonl").resolve():
        parser.error("--out must not be results/: rehearsal records are kept apart")
    args.out.mkdir(parents=True, exist_ok=True)
    rows, failed = [], []
    for experiment, preset in chosen:
        sets, evals = stand_in_overrides(experiment, preset, args.out, args) if args.stand_ins else ([], [])
        cmd = runner_command(experiment, preset, args.out, args, sets, evals, args.train_steps)
        stats = run_dir(preset, args.out) / "stats.jsonl"
        if stats.exists():
            parser.error(f"{stats.parent} exists: a rehearsal starts from nothing (remove it, or choose another --out)")
        export = None
        for phase in PHASES:
            log = args.out / "logs" / f"{preset.name}-{phase}.log"
            stages = args.out / "stages" / f"{preset.name}-{phase}.jsonl"
            print(f"== {preset.name} / {phase} (log {log})", flush=True)
            code, seconds, peak = run_measured(cmd, log, stages, (stats, 1) if phase == "first" else None)
            for stage, s in sorted(stage_rows(stages).items(), key=lambda kv: STAGES.index(kv[0])
                                   if kv[0] in STAGES else len(STAGES)):
                rows.append(dict(preset=preset.name, phase=phase, stage=stage, **s))
            rows.append(dict(preset=preset.name, phase=phase, stage="process total", seconds=seconds, peak_rss_gb=peak))
            if phase == "first":
                problems = verify_interrupted(preset, args.out, code, args.train_steps)
            else:
                problems = [f"exit status {code}"] if code else verify(experiment, preset, args.out, args.train_steps,
                                                                        args.num_samples)
            if phase == "again" and not problems and read_provenance(run_dir(preset, args.out) / "pipeline") != export:
                problems.append("running the finished command again changed the export")
            if phase == "again" and "train" in stage_rows(stages):
                problems.append("running the finished command again trained")
            export = read_provenance(run_dir(preset, args.out) / "pipeline")
            if problems:
                tail = "\n".join(log.read_text().splitlines()[-15:])
                print(f"!! {preset.name} / {phase} failed: {'; '.join(problems)}\n{tail}", flush=True)
                failed.append(f"{preset.name} / {phase}: {'; '.join(problems)} (log {log})")
                break
    table = markdown(rows)
    print(table)
    (args.out / "rehearsal.md").write_text(table + "\n")
    (args.out / "rehearsal.json").write_text(json.dumps(rows, indent=1) + "\n")
    if args.markdown:
        args.markdown.write_text(table + "\n")
    if failed:
        print("rehearsal failed:\n- " + "\n- ".join(failed), flush=True)
        return 1
    print(f"rehearsal passed: {len(chosen)} preset(s), every stage of the three phases", flush=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
