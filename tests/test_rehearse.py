"""The rehearsal (experiments/rehearse.py) and the runner options it relies on: stage timing, metrics allowed to be
missing, sampling steps for every sampler, options forwarded to parallel workers."""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys

import numpy as np
import pytest

from core.runlog import STAGES_ENV, Stage, read_jsonl, staged
from eval.records import ROOT
from experiments.presets import sampler_configs
from experiments.runner import worker_argv


def test_stage_rows_time_and_peak_memory(tmp_path, monkeypatch):
    """A stage that holds 400 MB more than its start shows it in its peak; nothing is written without the env var."""
    path = tmp_path / "stages.jsonl"
    with Stage("quiet"):
        pass
    assert not path.exists()
    monkeypatch.setenv(STAGES_ENV, str(path))

    @staged("big")
    def big():
        x = np.ones(400 * 2**20 // 8)  # 400 MiB, touched
        import time
        time.sleep(0.2)  # the sampling thread sees it
        return float(x.sum())

    with Stage("small"):
        pass
    big()
    rows = {r["stage"]: r for r in read_jsonl(path)}
    assert set(rows) == {"small", "big"}
    assert rows["big"]["seconds"] >= 0.2
    assert rows["big"]["peak_rss_gb"] - rows["small"]["peak_rss_gb"] > 0.3
    assert rows["big"]["rank"] == 0 and "peak_cuda_gb" not in rows["big"]


def test_preflight_lets_missing_metric_inputs_pass_only_when_allowed(tmp_path):
    """--allow-missing-metrics: metric weights and FID statistics missing are named, not fatal; data still is."""
    from experiments.preflight import report
    from experiments.unconditional import PRESETS

    preset = next(p for p in PRESETS if p.name == "paper-celebahq256-conprediff")
    cfg = preset.run_config(0)
    ok, text = report("unconditional", [(preset, cfg)])
    assert not ok
    data = tmp_path / "images"
    (data / "train").mkdir(parents=True)
    from PIL import Image

    Image.fromarray(np.zeros((8, 8, 3), np.uint8)).save(data / "train" / "0.png")
    vae = tmp_path / "vae"
    from experiments.smoke import make_random_autoencoder

    make_random_autoencoder(vae, kind="vq-f4")
    d = cfg.to_dict()
    d["data"]["source"], d["model"]["vae"], d["model"]["vae_revision"], d["model"]["vae_subfolder"] = \
        str(data), str(vae), None, None
    from core.config import RunConfig

    cfg = RunConfig.from_dict(d)
    ok, text = report("unconditional", [(preset, cfg)])
    assert not ok and "FID" in text  # here the metric weights and statistics are missing
    ok, text = report("unconditional", [(preset, cfg)], allow_missing_metrics=True)
    assert ok and "not measured" in text and "FID reference statistics" in text
    d["data"]["source"] = str(tmp_path / "nowhere")
    ok, text = report("unconditional", [(preset, RunConfig.from_dict(d))], allow_missing_metrics=True)
    assert not ok and "nowhere" in text


def test_sampling_steps_reach_every_sampler_and_equal_ones_run_once():
    """CelebA-HQ samples with 500 and 200 DDIM steps; --sampling-steps 3 makes both 3: sampled once, not twice."""
    import dataclasses

    from experiments.unconditional import PRESETS

    preset = next(p for p in PRESETS if p.name == "paper-celebahq256-conprediff")
    cfg = preset.run_config(0)
    assert [c.diffusion.sampling_steps for c in sampler_configs(preset, cfg)] == [500, 200]
    d = cfg.to_dict()
    d["diffusion"]["sampling_steps"] = 3
    from core.config import RunConfig

    rehearsed = dataclasses.replace(preset, extra_samplers=tuple(dict(e, sampling_steps=3) for e in preset.extra_samplers))
    assert [c.diffusion.sampling_steps for c in sampler_configs(rehearsed, RunConfig.from_dict(d))] == [3]


def test_parallel_workers_get_every_evaluation_option(tmp_path):
    """--jobs / --launcher workers got --set but not --eval (RePaint's steps were silently the preset's)."""
    args = argparse.Namespace(scale="paper", runs_dir=tmp_path, num_samples=4, report_to="none",
                              overrides=["train.steps=3"], eval_options=["steps=20", "jump_length=5"],
                              allow_missing_metrics=True, sampling_steps=7)
    argv = worker_argv(args, tmp_path / "r.jsonl", shared_device=False)
    assert argv[argv.index("--set") + 1] == "train.steps=3"
    assert [argv[i + 1] for i, a in enumerate(argv) if a == "--eval"] == ["steps=20", "jump_length=5"]
    assert "--allow-missing-metrics" in argv and argv[argv.index("--sampling-steps") + 1] == "7"


def test_rehearsal_of_a_latent_preset_runs_every_stage(tmp_path):
    """The whole rehearsal at --tiny: SIGTERM after step 1 leaves a checkpoint and no export, the same command resumes
    to the end (export, samples, records kept apart), and once more trains nothing; the table names every stage."""
    out = tmp_path / "rehearsal"
    env = dict(os.environ, OMP_NUM_THREADS="1")
    proc = subprocess.run([sys.executable, "-m", "experiments.rehearse", "--presets", "paper-celebahq256-conprediff",
                           "--tiny", "--sampling-steps", "2", "--train-steps", "4", "--out", str(out)],
                          cwd=ROOT, env=env, capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    rows = json.loads((out / "rehearsal.json").read_text())
    by_phase = {}
    for r in rows:
        by_phase.setdefault(r["phase"], set()).add(r["stage"])
    assert {"check", "train", "checkpoint", "process total"} <= by_phase["first"]
    assert "export" not in by_phase["first"]
    assert {"train", "checkpoint", "export", "sample", "metrics"} <= by_phase["resume"]
    assert "train" not in by_phase["again"] and "export" not in by_phase["again"]
    run = out / "runs" / "paper-celebahq256-conprediff-s0"
    steps = [r["step"] for r in read_jsonl(run / "stats.jsonl")]
    assert steps[-1] == 4 and len(steps) == len(set(steps))  # resumed, not restarted
    env_json = json.loads((run / "env.json").read_text())
    assert len(env_json["segments"]) == 2
    assert len(list((run / "samples" / "ddim-2-offset1-noclip").glob("*.png"))) == 4
    assert "| paper-celebahq256-conprediff | resume | sample |" in (out / "rehearsal.md").read_text()


def test_a_run_directory_replaced_under_its_owner_stops_the_owner(tmp_path):
    """A run folder deleted and made again while its first process still trained got that process's stats rows and
    checkpoints beside the new run's (the lock it held was on the deleted file). The owner now notices and stops."""
    import shutil

    from core.runlog import RunLock, RunReplacedError, check_owner

    run = tmp_path / "run"
    with RunLock(run):
        check_owner(run)  # still its own
        shutil.rmtree(run)
        with pytest.raises(RunReplacedError, match="removed or replaced"):
            check_owner(run)
        run.mkdir()
        (run / ".lock").write_text("")  # a new run's lock file where the old one was
        with pytest.raises(RunReplacedError):
            check_owner(run)
    check_owner(run)  # not held: nothing to check
