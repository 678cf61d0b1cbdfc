"""Experiment tracking through accelerate's trackers (TensorBoard, Weights & Biases), beside ``stats.jsonl``.

Off unless asked (``python -m core.train --report-to tensorboard``; the experiment runners pass the same flag on).
Tracking is not part of what a run computes, so it is a flag, not a config key: switching it on for a resumed run
does not change the run's ``config.yaml``. Each logged row of ``stats.jsonl`` (every loss term, the LR, step time
and gradient norms) goes to the tracker at the same step; the resolved config is stored as the run's
hyper-parameters. Logs live in ``<run>/tracking/`` (TensorBoard: ``tensorboard --logdir <run>/tracking``).
"""

from __future__ import annotations

import importlib.util
from pathlib import Path

from accelerate.tracking import GeneralTracker

TRACKERS = {"tensorboard": ("tensorboard", "tensorboardX"), "wandb": ("wandb",)}  # name -> importable modules
PROJECT = "conprediff"


def check_tracker(report_to: str | GeneralTracker) -> None:
    """Raise before any compute when the tracker is unknown or its library is not installed (accelerate itself
    would skip a missing one silently)."""
    if isinstance(report_to, GeneralTracker) or report_to == "none":
        return
    if report_to not in TRACKERS:
        raise ValueError(f"report_to={report_to!r} is not a tracker; choose one of none, {', '.join(TRACKERS)}")
    if not any(importlib.util.find_spec(m) for m in TRACKERS[report_to]):
        raise ImportError(f"--report-to {report_to} needs the {TRACKERS[report_to][0]} package, which is not "
                          f"installed: pip install {TRACKERS[report_to][0]}")


def accelerator_kwargs(report_to: str | GeneralTracker, run_dir: Path) -> dict:
    """``Accelerator(**...)`` arguments: nothing when tracking is off."""
    check_tracker(report_to)
    if isinstance(report_to, str) and report_to == "none":
        return {}
    from accelerate.utils import ProjectConfiguration

    return {"log_with": report_to,
            "project_config": ProjectConfiguration(project_dir=str(run_dir), logging_dir=str(Path(run_dir) / "tracking"))}


def flat_config(d: dict, prefix: str = "") -> dict:
    """Nested config -> ``{"train.lr": 1e-4, ...}`` with scalar values (trackers' hyper-parameters take scalars)."""
    out = {}
    for k, v in d.items():
        if isinstance(v, dict):
            out.update(flat_config(v, f"{prefix}{k}."))
        else:
            out[f"{prefix}{k}"] = v if isinstance(v, (int, float, str, bool)) or v is None else str(v)
    return out


def start_tracking(accelerator, config: dict, run_name: str, run_dir: Path) -> None:
    """``accelerator.init_trackers`` on the main process, when tracking is on."""
    if accelerator.log_with:
        accelerator.init_trackers(PROJECT, config=flat_config(config),
                                  init_kwargs={"wandb": {"name": run_name, "dir": str(run_dir)}})
