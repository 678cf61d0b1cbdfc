"""A run's directory: train it (or continue another preset's run), and keep its curve and sample grid.

:func:`train_run` trains (preset, seed) in ``<runs>/<preset>-s<seed>`` (:func:`experiments.cluster.run_dir_for`),
starting a preset that ``continues`` another from that run's checkpoint (:func:`continue_from`);
:func:`keep_artifacts` copies the committed artifacts under ``results/``.
"""

from __future__ import annotations

import argparse
import json
import os
from pathlib import Path

from core.config import RunConfig
from core.runlog import RunLock, read_jsonl, write_atomic
from core.train import train
from eval.records import ROOT

from .presets import Preset, run_config


def continue_from(source: Path, run_dir: Path, steps: int) -> None:
    """Start ``run_dir`` from ``source``'s checkpoint at ``steps`` (hard links where the filesystem allows, else
    copies; into a temporary folder renamed into place), with its ``stats.jsonl`` rows up to that step and its
    ``env.json``. Does nothing once ``run_dir`` has a checkpoint. Raises FileNotFoundError if ``source`` holds no
    checkpoint at ``steps``."""
    import shutil

    from core.train import CHECKPOINTS, list_checkpoints

    if list_checkpoints(run_dir):
        return
    found = dict(list_checkpoints(source))
    if steps not in found:
        raise FileNotFoundError(f"{source} has no complete checkpoint at step {steps} to continue from "
                                f"(has: {sorted(found) or 'none'})")
    dst = run_dir / CHECKPOINTS / f"checkpoint-{steps}"
    tmp = dst.with_name(f"tmp-continue-{steps}")
    shutil.rmtree(tmp, ignore_errors=True)

    def link(src: str, dst: str) -> None:
        try:
            os.link(src, dst)
        except OSError:
            shutil.copy2(src, dst)

    shutil.copytree(found[steps], tmp, copy_function=link)
    rows = [r for r in read_jsonl(source / "stats.jsonl") if r["step"] <= steps]
    write_atomic(run_dir / "stats.jsonl", "".join(json.dumps(r, sort_keys=True) + "\n" for r in rows))
    if (source / "env.json").exists():
        shutil.copyfile(source / "env.json", run_dir / "env.json")
    os.replace(tmp, dst)

def keep_artifacts(experiment: str, run_dir: Path, results: Path = ROOT / "results") -> None:
    """Copy the run's training curve and sample grid under ``results`` (committed; figures are drawn from them)."""
    import shutil

    from accelerate import PartialState

    if not PartialState().is_main_process:
        return
    for src, sub in ((run_dir / "stats.jsonl", "curves"), (run_dir / "grid.png", "grids")):
        if src.exists():
            dst = results / sub / experiment / f"{run_dir.name}{src.suffix}"
            dst.parent.mkdir(parents=True, exist_ok=True)
            shutil.copyfile(src, dst)

def train_run(preset: Preset, seed: int, presets: list[Preset], args: argparse.Namespace,
              cfg: RunConfig | None = None) -> Path:
    """Train (or resume) the run of (preset, seed) in ``args.runs_dir``; a preset that ``continues`` another starts,
    when it has no checkpoint yet, from that preset's run of the same seed (trained first if needed, and so on down
    its chain: :func:`continue_from`). ``cfg``: the run's config when already resolved (else resolved here).
    Returns the run directory."""
    from .cluster import run_dir_for

    cfg, run_dir = cfg or run_config(preset, seed, args), run_dir_for(args.runs_dir, args.scale, preset.name, seed)
    main_rank = int(os.environ.get("RANK", "0")) == 0
    with RunLock(run_dir, enabled=main_rank):
        if preset.continues:
            from core.train import list_checkpoints

            if not list_checkpoints(run_dir):  # every process sees the same folder (main writes it after a barrier)
                source = next(p for p in presets if p.name == preset.continues)
                source_dir = train_run(source, seed, presets, args)
                if main_rank:
                    with RunLock(source_dir):
                        continue_from(source_dir, run_dir, run_config(source, seed, args).train.steps)
        train(cfg, run_dir, report_to=args.report_to, shared_device=args.shared_device)
    return run_dir
