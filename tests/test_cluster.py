"""Sweeps beyond one process: --jobs' live progress and GPU assignment, the submitit launcher, tracking."""

import argparse
import io
import json
import os
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest
import yaml

from experiments.cluster import (GpuPool, ProgressBoard, RunWatch, RunWorker, add_arguments, launch, make_executor,
                                 run_dir_for, visible_gpus)
from tests.conftest import ROOT, TINY
from tests.test_train import ENV


def write_run(run_dir: Path, steps: int, logged: list[tuple[int, float]]) -> None:
    """What core.train leaves in a run directory while it trains: config.yaml and stats.jsonl rows."""
    run_dir.mkdir(parents=True, exist_ok=True)
    (run_dir / "config.yaml").write_text(yaml.safe_dump({"train": {"steps": steps}}))
    with open(run_dir / "stats.jsonl", "a") as f:
        for step, step_time in logged:
            f.write(json.dumps({"step": step, "loss": 0.1, "lr": 1e-3, "step_time": step_time}) + "\n")


def test_visible_gpus_respect_an_existing_cuda_visible_devices_list():
    assert visible_gpus({}, device_count=3) == ["0", "1", "2"]
    assert visible_gpus({}, device_count=0) == []
    assert visible_gpus({"CUDA_VISIBLE_DEVICES": "3, 5"}, device_count=8) == ["3", "5"]
    assert visible_gpus({"CUDA_VISIBLE_DEVICES": "GPU-ab12,GPU-cd34"}) == ["GPU-ab12", "GPU-cd34"]
    assert visible_gpus({"CUDA_VISIBLE_DEVICES": "2,-1,4"}) == ["2"]  # CUDA stops at the first invalid entry
    assert visible_gpus({"CUDA_VISIBLE_DEVICES": ""}, device_count=8) == []


def test_gpu_pool_gives_the_least_used_gpu_round_robin():
    pool = GpuPool(["0", "1", "2"])
    assert [pool.acquire() for _ in range(4)] == ["0", "1", "2", "0"]
    pool.release("1")
    assert pool.acquire() == "1"  # the only GPU with no worker
    assert GpuPool([]).acquire() is None


def test_progress_line_reads_step_rate_and_time_left_from_the_run_files(tmp_path):
    run = tmp_path / "run"
    watch = RunWatch("mini-s0", run)
    watch.start(1000.0)
    assert watch.line(1001.0) == "mini-s0: starting (00:01)"  # no config.yaml yet
    write_run(run, 1000, [(400, 0.1)])
    line = watch.line(1030.0)  # one logged step seen: rate from its step_time
    assert "400/1000" in line and "10.00it/s" in line and "<01:00" in line, line
    write_run(run, 1000, [(500, 0.1)])
    watch.line(1040.0)  # the step moved: wall-clock rate from here on
    write_run(run, 1000, [(600, 0.1)])
    line = watch.line(1060.0)  # 100 steps in 20 s of wall clock -> 5 it/s, 400 left -> 80 s
    assert "600/1000" in line and "5.00it/s" in line and "<01:20" in line, line
    write_run(run, 1000, [(1000, 0.1)])
    assert "trained 1000/1000 steps, sampling and evaluating" in watch.line(1100.0)


def test_progress_board_prints_a_plain_line_only_when_a_run_moves(tmp_path):
    """Not a terminal: no carriage returns, one line per run per refresh at most, and none while it is stuck."""
    now = [0.0]
    watches = [RunWatch(f"r{i}", tmp_path / f"r{i}") for i in range(2)]
    out = io.StringIO()
    board = ProgressBoard(watches, every=3600, stream=out, tty=False, clock=lambda: now[0])
    watches[0].start(0.0)
    for t, step in ((1, None), (2, 10), (3, 10), (4, 20)):
        now[0] = t
        if step:
            write_run(watches[0].run_dir, 100, [(step, 0.5)])
        board.tick()
    lines = out.getvalue().splitlines()
    assert "\r" not in out.getvalue() and all(l.startswith("   r0: ") for l in lines), lines  # r1 is queued: silent
    assert len(lines) == 3 and "starting" in lines[0] and "10/100" in lines[1] and "20/100" in lines[2], lines


def fake_args(tmp_path, **kw):
    parser = argparse.ArgumentParser()
    add_arguments(parser)
    args = parser.parse_args([])
    args.__dict__.update(dict(scale="smoke", runs_dir=tmp_path, num_samples=None, overrides=[], jobs=2, report_to="none",
                              progress_every=0.05), **kw)
    return args


def test_jobs_give_each_running_worker_its_own_gpu_and_show_progress(tmp_path, monkeypatch, capsys):
    """--jobs 2 with CUDA_VISIBLE_DEVICES=3,5: every worker gets one of those GPUs, never the one a running worker
    holds; the board prints each run's steps while the (fake) workers write stats.jsonl."""
    from experiments import runner
    from experiments.unconditional import PRESETS

    seen, running, lock = [], set(), threading.Lock()

    def fake_worker(cmd, stdout, stderr, env):
        name, seed = cmd[cmd.index("--presets") + 1], int(cmd[cmd.index("--seeds") + 1])
        gpu = env["CUDA_VISIBLE_DEVICES"]
        with lock:
            assert gpu not in running, f"GPU {gpu} given to two running workers"
            running.add(gpu)
            seen.append((name, seed, gpu, env["OMP_NUM_THREADS"]))
        for step in (1, 2, 3, 4):
            write_run(run_dir_for(tmp_path, "smoke", name, seed), 4, [(step, 0.01)])
            time.sleep(0.12)
        with lock:
            running.discard(gpu)
        return subprocess.CompletedProcess(cmd, 0)

    monkeypatch.setattr(subprocess, "run", fake_worker)
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "3,5")
    tasks = [(p, s) for p in PRESETS[:2] for s in (0, 1)]
    runner.run_in_parallel("unconditional", tasks, fake_args(tmp_path), tmp_path / "records.jsonl")
    assert len(seen) == 4 and {g for *_, g, _ in seen} == {"3", "5"}
    out = capsys.readouterr().out
    assert out.count(": started on GPU ") == 4 and out.count(": done in") == 4
    for p, s in tasks:
        assert f"{p.name}-s{s} [GPU " in out and "/4 [" in out  # a live line with its step of total


def test_jobs_leave_the_environment_alone_without_gpus(tmp_path, monkeypatch):
    from experiments import runner
    from experiments.unconditional import PRESETS

    envs = []

    def fake_worker(cmd, stdout, stderr, env):
        envs.append(env)
        return subprocess.CompletedProcess(cmd, 0)

    monkeypatch.setattr(subprocess, "run", fake_worker)
    monkeypatch.delenv("CUDA_VISIBLE_DEVICES", raising=False)
    runner.run_in_parallel("unconditional", [(PRESETS[0], 0), (PRESETS[0], 1)], fake_args(tmp_path),
                           tmp_path / "records.jsonl", gpus=[])
    assert len(envs) == 2 and all("CUDA_VISIBLE_DEVICES" not in e for e in envs)


def test_slurm_executor_gets_each_runs_resources_from_the_flags(tmp_path, monkeypatch):
    submitit = pytest.importorskip("submitit")
    monkeypatch.setattr(submitit.SlurmExecutor, "affinity", classmethod(lambda cls: 1))  # no srun on this machine
    parser = argparse.ArgumentParser()
    add_arguments(parser)
    args = parser.parse_args(["--launcher", "slurm", "--slurm-partition", "gpu", "--gpus-per-run", "2",
                              "--cpus-per-run", "16", "--time-min", "90", "--mem-gb", "64", "--slurm-extra", "account=abc"])
    sbatch = make_executor(args, tmp_path)._executor._make_submission_file_text("python -m x", "uid")
    for line in ("--partition=gpu", "--gpus-per-node=2", "--cpus-per-task=16", "--time=90", "--mem=64GB",
                 "--account=abc", "--signal=USR2@", f"cd {ROOT}"):
        assert line in sbatch, (line, sbatch)
    worker = RunWorker("unconditional", ["--presets", "p", "--seeds", "0"], gpus=2, cpus=16)
    assert worker.command()[1:6] == ["-m", "accelerate.commands.launch", "--multi_gpu", "--num_processes", "2"]
    assert worker.command()[-6:] == ["-m", "experiments.unconditional", "--presets", "p", "--seeds", "0"]
    assert RunWorker("unconditional", [], gpus=1, cpus=1).command()[1:] == ["-m", "experiments.unconditional"]


class FakeExecutor:
    def __init__(self):
        self.submitted = []

    def update_parameters(self, **kw):
        pass

    def submit(self, fn):
        self.submitted.append(fn)
        return argparse.Namespace(job_id=str(1000 + len(self.submitted)), paths=argparse.Namespace(stdout="log"))


def test_local_launcher_runs_a_smoke_preset_and_resubmits_only_unfinished_runs(tmp_path):
    """One (preset, seed) as a job of submitit's local executor, end to end; then re-submission: the finished run is
    skipped, a job still running is left alone, and a run whose records are gone is submitted again."""
    pytest.importorskip("submitit")
    from experiments.unconditional import PRESETS

    preset = next(p for p in PRESETS if p.name == "mini-digits16-baseline")
    cmd = [sys.executable, "-m", "experiments.unconditional", "--scale", "smoke", "--presets", preset.name,
           "--seeds", "0", "--runs-dir", str(tmp_path), "--launcher", "local", "--cpus-per-run", "1"]
    proc = subprocess.run(cmd, cwd=ROOT, env=ENV, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    run = run_dir_for(tmp_path, "smoke", preset.name, 0)
    assert (run / "pipeline" / "unet" / "config.json").exists()
    records = tmp_path / "smoke-records.jsonl"
    assert {json.loads(l)["preset"] for l in records.read_text().splitlines()} == {preset.name}
    jobs = json.loads((tmp_path / "submitit" / "unconditional" / "jobs.json").read_text())
    job = jobs[f"{preset.name}-s0"]["job_id"]
    assert "submitted job" in proc.stdout and ": done in" in proc.stdout
    assert (tmp_path / "submitit" / "unconditional" / f"{job}_0_result.pkl").exists()

    args, fake = fake_args(tmp_path, launcher="slurm"), FakeExecutor()
    assert launch("unconditional", [(preset, 0)], args, records, [], executor=fake) == {
        f"{preset.name}-s0": "finished (records exist): skipped"} and not fake.submitted
    records.rename(tmp_path / "old-records.jsonl")  # records gone: the run is submitted again
    jobs[f"{preset.name}-s0"]["job_id"] = str(os.getpid())  # ... unless its job is still running
    (tmp_path / "submitit" / "unconditional" / "jobs.json").write_text(json.dumps(jobs))
    out = launch("unconditional", [(preset, 0)], fake_args(tmp_path, launcher="local"), records, [], executor=fake)
    assert "still queued or running" in out[f"{preset.name}-s0"] and not fake.submitted
    jobs[f"{preset.name}-s0"]["job_id"] = job
    (tmp_path / "submitit" / "unconditional" / "jobs.json").write_text(json.dumps(jobs))
    assert launch("unconditional", [(preset, 0)], args, records, ["--scale", "smoke"], executor=fake) == {
        f"{preset.name}-s0": "submitted"}
    assert fake.submitted[0].argv == ["--presets", preset.name, "--seeds", "0", "--scale", "smoke"]


def test_launcher_flags_are_checked_before_anything_runs(tmp_path, monkeypatch, capsys):
    from experiments.runner import main
    from experiments.unconditional import PRESETS

    monkeypatch.setenv("PATH", str(tmp_path))  # no sbatch/srun
    for argv, message in ((["--launcher", "slurm"], "needs SLURM's sbatch and srun"),
                          (["--launcher", "local", "--cpus-per-run", "0"], "--cpus-per-run must be >= 1"),
                          (["--launcher", "local", "--slurm-extra", "account"], "--slurm-extra takes KEY=VALUE"),
                          (["--jobs", "2", "--progress-every", "0"], "--progress-every must be > 0")):
        with pytest.raises(SystemExit) as e:
            main("unconditional", PRESETS, "", ["--scale", "smoke", "--runs-dir", str(tmp_path), *argv])
        assert e.value.code == 2 and message in capsys.readouterr().err, argv
    assert not (tmp_path / "smoke").exists()


# ------------------------------------------------------------------------------------------------------ tracking


def test_report_to_logs_every_stats_row_to_the_tracker(tmp_path):
    """A GeneralTracker given to train() receives the config and, at each log step, exactly stats.jsonl's row."""
    from accelerate.tracking import GeneralTracker

    from core.config import RunConfig, apply_overrides
    from core.train import train

    class Recorder(GeneralTracker):
        name, requires_logging_directory = "recorder", False

        def __init__(self):
            super().__init__()
            self.config, self.rows, self.finished = None, [], False

        @property
        def tracker(self):
            return self

        def store_init_configuration(self, values):
            self.config = values

        def log(self, values, step=None, **kwargs):
            self.rows.append({"step": step, **values})

        def finish(self):
            self.finished = True

    recorder = Recorder()
    cfg = RunConfig.from_dict(apply_overrides({}, TINY + ["train.steps=3", "train.log_every=2", "data.num_examples=16",
                                                          "train.checkpoint_every=3"]))
    train(cfg, tmp_path / "run", report_to=recorder)
    stats = [json.loads(l) for l in (tmp_path / "run" / "stats.jsonl").read_text().splitlines()]
    assert [r["step"] for r in stats] == [2, 3] and recorder.rows == stats
    assert {"loss", "lr"} <= set(recorder.rows[0]) and recorder.finished
    assert recorder.config["train.steps"] == 3 and recorder.config["model.block_out_channels"] == "[16, 32]"


def test_report_to_a_missing_tracker_names_its_pip_package(tmp_path, capsys):
    import importlib.util

    from core.tracking import check_tracker

    if importlib.util.find_spec("tensorboard") or importlib.util.find_spec("tensorboardX"):
        pytest.skip("tensorboard is installed here: the missing-package error cannot be shown")
    with pytest.raises(ImportError, match="pip install tensorboard"):
        check_tracker("tensorboard")
    from experiments.runner import main
    from experiments.unconditional import PRESETS

    with pytest.raises(SystemExit) as e:
        main("unconditional", PRESETS, "", ["--scale", "smoke", "--runs-dir", str(tmp_path), "--report-to", "tensorboard"])
    assert e.value.code == 2 and "pip install tensorboard" in capsys.readouterr().err
    assert not (tmp_path / "smoke").exists()


def test_superseded_records_do_not_count_as_measured(tmp_path):
    """A superseded measurement is to be redone: the runners' "already recorded" check and the launcher's "run
    finished" check both ignore it (before, both counted it and the run was never measured again)."""
    import json

    import yaml

    from eval.records import recorded
    from experiments.cluster import run_finished

    key = dict(experiment="backbones", preset="mini-digits16-discrete-baseline", seed=0, scale="mini", checkpoint=4)
    old = dict(key, metric="fd_digits", value=1.0, superseded="trained with another loss weighting")
    assert not recorded([old], metric="fd_digits", **key)
    assert recorded([{**old, "superseded": ""}], metric="fd_digits", **key)
    run = tmp_path / "run"
    (run / "pipeline").mkdir(parents=True)
    (run / "config.yaml").write_text(yaml.safe_dump({"train": {"steps": 4}}))
    (run / "pipeline" / "provenance.json").write_text(json.dumps({"checkpoint": 4}))
    done = [{k: v for k, v in old.items() if k != "superseded"}]
    assert not run_finished(**{k: key[k] for k in ("experiment", "preset", "seed", "scale")}, run_dir=run,
                            records=done)  # provenance without the weights it describes: no export, not finished
    (run / "pipeline" / "unet").mkdir()
    assert not run_finished(**{k: key[k] for k in ("experiment", "preset", "seed", "scale")}, run_dir=run,
                            records=[old])
    assert run_finished(**{k: key[k] for k in ("experiment", "preset", "seed", "scale")}, run_dir=run, records=done)
