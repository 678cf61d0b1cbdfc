"""Many (preset, seed) runs at once: live progress, one GPU per worker, and SLURM jobs through submitit.

* ``--jobs N`` (:func:`experiments.runner.run_in_parallel`) runs workers on this machine; :class:`ProgressBoard`
  shows one line per run (step of total, it/s, time left) read from each run's own ``config.yaml`` and
  ``stats.jsonl``, and :class:`GpuPool` gives each worker the GPU fewest running workers hold
  (``CUDA_VISIBLE_DEVICES``, round robin over the visible devices).
* ``--launcher slurm|local`` (:func:`launch`) sends each (preset, seed) run as one submitit job with its own
  resources. Re-running the same command resumes the sweep: a finished run (its export holds the final step
  and its records exist) is skipped, a job still queued or running is left alone, and any other run is
  submitted again and resumes from its last checkpoint (``core.train`` resumes on its own).

Example::

    python -m experiments.unconditional --scale paper --seeds 0,1,2 --launcher slurm \\
        --slurm-partition gpu --gpus-per-run 8 --cpus-per-run 32 --time-min 2880
    python -m experiments.unconditional --scale smoke --presets mini-digits16-baseline --launcher local
"""

from __future__ import annotations

import argparse
import json
import os
import shlex
import shutil
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import IO

ROOT = Path(__file__).resolve().parents[1]
ALIVE = {"PENDING", "RUNNING", "REQUEUED", "CONFIGURING", "COMPLETING", "SUSPENDED", "RESIZING", "STAGE_OUT"}


def run_dir_for(runs_dir: Path, scale: str, preset: str, seed: int) -> Path:
    """Where ``experiments.runner.main`` trains (preset, seed): ``<runs>/smoke/<name>`` at smoke scale, else
    ``<runs>/<name>`` (shared by the experiments that use the preset)."""
    from core.runlog import run_name

    name = run_name(preset, seed)
    return runs_dir / "smoke" / name if scale == "smoke" else runs_dir / name


# ---------------------------------------------------------------------------------------------- GPUs per worker


def visible_gpus(env: Mapping[str, str] | None = None, device_count: int | None = None) -> list[str]:
    """The GPUs workers may be given: ``$CUDA_VISIBLE_DEVICES``'s entries when it is set (indices or UUIDs, up to
    the first invalid one, as CUDA reads the list; empty: none), else ``0 .. device_count - 1``
    (``torch.cuda.device_count()`` when not given)."""
    env = os.environ if env is None else env
    if "CUDA_VISIBLE_DEVICES" in env:
        out = []
        for item in env["CUDA_VISIBLE_DEVICES"].split(","):
            item = item.strip()
            if not item or item.startswith("-"):
                break
            out.append(item)
        return out
    if device_count is None:
        import torch

        device_count = torch.cuda.device_count()
    return [str(i) for i in range(device_count)]


class GpuPool:
    """Hands each starting worker the GPU the fewest running workers hold (ties: round robin); thread-safe.

    With at least as many GPUs as ``--jobs``, every running worker has a GPU of its own; with fewer, workers share
    them evenly. No GPUs: :meth:`acquire` returns None and the worker's environment is left as it is.
    """

    def __init__(self, gpus: list[str]):
        self.gpus, self.load, self.next = list(gpus), [0] * len(gpus), 0
        self.lock = threading.Lock()

    def acquire(self) -> str | None:
        if not self.gpus:
            return None
        with self.lock:
            order = [(self.next + i) % len(self.gpus) for i in range(len(self.gpus))]
            pick = min(order, key=lambda i: self.load[i])  # first of the least loaded, after the last one handed out
            self.load[pick] += 1
            self.next = pick + 1
            return self.gpus[pick]

    def release(self, gpu: str | None) -> None:
        if gpu is not None:
            with self.lock:
                self.load[self.gpus.index(gpu)] -= 1


# --------------------------------------------------------------------------------------------------- live progress


def last_logged_step(stats: Path) -> dict | None:
    """The last complete row of a run's ``stats.jsonl`` (read from the file's tail), or None."""
    try:
        with open(stats, "rb") as f:
            f.seek(0, os.SEEK_END)
            cut = f.tell() > 8192
            f.seek(max(0, f.tell() - 8192))
            lines = f.read().split(b"\n")[int(cut):]  # the tail's first line may be cut
    except FileNotFoundError:
        return None
    for line in reversed(lines):
        try:
            row = json.loads(line)
        except ValueError:
            continue  # a line being written, or the cut first line of the tail
        if isinstance(row, dict) and "step" in row:
            return row
    return None


def configured_steps(run_dir: Path) -> int | None:
    """``train.steps`` of the run's resolved ``config.yaml`` (written when training starts), or None."""
    import yaml

    try:
        return int(yaml.safe_load((run_dir / "config.yaml").read_text())["train"]["steps"])
    except (FileNotFoundError, KeyError, TypeError, ValueError, yaml.YAMLError):
        return None


@dataclass
class RunWatch:
    """What the board knows of one run: its state and its training speed as seen from its files."""

    name: str
    run_dir: Path
    state: str = "queued"  # queued | running | done | failed
    started: float | None = None
    first: tuple[float, int] | None = None  # (time, step) when the logged step first moved while watched
    last_step: int | None = None
    phase: str = ""  # of the last line: starting | training | evaluating
    note: str = ""

    def start(self, now: float, note: str = "") -> None:
        self.state, self.started, self.first, self.last_step, self.note = "running", now, None, None, note

    def progress(self, now: float) -> tuple[int | None, int | None, float | None]:
        """``(step, total, steps per second)``; the rate is wall clock between logged steps seen while watched
        (checkpoints and logging included), else the last logged ``step_time``."""
        row, total = last_logged_step(self.run_dir / "stats.jsonl"), configured_steps(self.run_dir)
        step = int(row["step"]) if row else None
        if step is not None and self.last_step is not None and step != self.last_step and self.first is None:
            self.first = (now, step)
        self.last_step = step
        rate = None
        if self.first is not None and step is not None and step > self.first[1] and now > self.first[0]:
            rate = (step - self.first[1]) / (now - self.first[0])
        elif row and row.get("step_time"):
            rate = 1.0 / float(row["step_time"])
        return step, total, rate

    def line(self, now: float) -> str:
        from tqdm import tqdm

        head = f"{self.name}{f' [{self.note}]' if self.note else ''}"
        if self.state != "running":
            return f"{head}: {self.state}"
        step, total, rate = self.progress(now)
        elapsed = now - (self.started or now)
        self.phase = "starting" if total is None else "evaluating" if step is not None and step >= total else "training"
        if total is None:
            return f"{head}: starting ({tqdm.format_interval(elapsed)})"
        if step is not None and step >= total:
            return f"{head}: trained {step}/{total} steps, sampling and evaluating ({tqdm.format_interval(elapsed)})"
        return tqdm.format_meter(step or 0, total, elapsed, prefix=f"{head}: ", rate=rate, unit="it",
                                 bar_format="{l_bar}{bar:20}| {n_fmt}/{total_fmt} [{elapsed}<{remaining}, {rate_fmt}]")


class ProgressBoard:
    """One status line per run, refreshed from the runs' own files while their workers run.

    On a terminal the lines are redrawn in place every ``every`` seconds (tqdm, one line per run; messages print
    above them). Anywhere else (a log file, a pipe) each running run whose logged step moved prints one plain
    line every ``every`` seconds, so a log gets a few lines a minute, never a stream of carriage returns.
    """

    def __init__(self, watches: list[RunWatch], every: float, stream: IO[str] | None = None, tty: bool | None = None,
                 clock: Callable[[], float] = time.time):
        self.watches, self.every, self.clock = watches, every, clock
        self.stream = stream or sys.stdout
        self.tty = self.stream.isatty() if tty is None else tty
        self.printed: dict[str, tuple[str, int | None]] = {}
        self.bars: list = []
        self.lock = threading.RLock()
        self.stop = threading.Event()
        self.thread = threading.Thread(target=self._loop, daemon=True)

    def __enter__(self) -> ProgressBoard:
        if self.tty:
            from tqdm import tqdm

            self.bars = [tqdm(total=0, position=i, bar_format="{desc}", file=self.stream, leave=False,
                              dynamic_ncols=True) for i in range(len(self.watches))]
        self.thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self.stop.set()
        self.thread.join()
        with self.lock:
            for bar in self.bars:
                bar.close()
            self.bars = []

    def message(self, text: str) -> None:
        """A one-off line (a run started or ended), printed above the live lines."""
        with self.lock:
            if self.bars:
                from tqdm import tqdm

                tqdm.write(text, file=self.stream)
            else:
                print(text, file=self.stream, flush=True)

    def tick(self) -> None:
        """Refresh the lines once (called every ``every`` seconds by the board's thread)."""
        now = self.clock()
        with self.lock:
            for i, w in enumerate(self.watches):
                if self.bars:
                    self.bars[i].set_description_str(w.line(now))
                elif w.state == "running":
                    text = w.line(now)
                    key = (w.phase, w.last_step)
                    if self.printed.get(w.name) != key:
                        self.printed[w.name] = key
                        print(f"   {text}", file=self.stream, flush=True)

    def _loop(self) -> None:
        while not self.stop.wait(self.every):
            self.tick()


# ------------------------------------------------------------------------------------------------ submitit launcher


class RunWorker:
    """One (preset, seed) run as a submitit job: ``python -m experiments.<experiment> --presets P --seeds S ...``
    (under ``accelerate launch`` when the job has several GPUs). Raises on a non-zero exit, so submitit reports the
    job as failed. On a SLURM timeout or preemption submitit calls :meth:`checkpoint` and requeues the same job,
    which resumes from the run's last checkpoint."""

    def __init__(self, experiment: str, argv: list[str], gpus: int, cpus: int):
        self.experiment, self.argv, self.gpus, self.cpus = experiment, list(argv), gpus, cpus
        self.process: subprocess.Popen | None = None

    def threads(self) -> int:
        """``OMP_NUM_THREADS`` per process: the job's cores shared by the processes ``accelerate launch`` starts
        (one per GPU), not each of them given all the cores (8 x 32 threads on 32 cores)."""
        return max(1, self.cpus // max(1, self.gpus))

    def __getstate__(self) -> dict:  # submitit pickles the worker to requeue it; a live process does not travel
        return {**self.__dict__, "process": None}

    def command(self) -> list[str]:
        if self.gpus > 1:
            return [sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu", "--num_processes",
                    str(self.gpus), "-m", f"experiments.{self.experiment}", *self.argv]
        return [sys.executable, "-m", f"experiments.{self.experiment}", *self.argv]

    def __call__(self) -> int:
        env = dict(os.environ, OMP_NUM_THREADS=str(self.threads()), PYTHONPATH=os.pathsep.join(
            p for p in (str(ROOT), os.environ.get("PYTHONPATH")) if p))
        self.process = subprocess.Popen(self.command(), cwd=ROOT, env=env)
        rc = self.process.wait()
        if rc != 0:
            raise subprocess.CalledProcessError(rc, self.command())
        return 0

    def checkpoint(self, *args, **kwargs):
        """submitit calls this on a SLURM timeout or preemption signal, before it requeues the job: the run is asked
        to stop (SIGTERM: core.train saves a checkpoint at the end of its current step) and given up to
        :data:`STOP_GRACE_S` seconds to do so, so the requeued job resumes minutes behind, not hours."""
        import signal

        import submitit

        if self.process is not None and self.process.poll() is None:
            self.process.send_signal(signal.SIGTERM)
            try:
                self.process.wait(timeout=STOP_GRACE_S)
            except subprocess.TimeoutExpired:
                pass
        return submitit.helpers.DelayedSubmission(self, *args, **kwargs)


# submitit's SLURM signal comes 90 s before the kill (its default --signal=USR2@90): most of that for the checkpoint.
STOP_GRACE_S = 75


def run_finished(experiment: str, preset: str, seed: int, scale: str, run_dir: Path, records: list[dict]) -> bool:
    """The run is complete: its export holds the configured final step and a current record of (experiment, preset,
    seed, scale) measured that export (its weights hash; a record older than weights hashes counts too). An export
    without its weights (``unet/``) is no export (:func:`core.train.exported_checkpoint`)."""
    from core.runlog import read_provenance
    from core.train import exported_checkpoint
    from eval.records import current_match

    steps, exported = configured_steps(run_dir), exported_checkpoint(run_dir / "pipeline")
    if steps is None or exported is None or exported < steps:
        return False
    prov = read_provenance(run_dir / "pipeline") or {}
    key = dict(experiment=experiment, preset=preset, seed=seed, scale=scale, checkpoint=exported)
    # a record of this export's weights, or one older than weights hashes (it stands for the preset's own config)
    return any(current_match(r, **key) and r.get("weights_sha256") in (None, prov.get("sha256")) for r in records)


def job_alive(launcher: str, folder: Path, job_id: str) -> bool:
    """A job submitted earlier is still queued or running (SLURM: ``sacct`` through submitit; local: its process)."""
    import submitit

    if (folder / f"{job_id}_0_result.pkl").exists():
        return False
    if launcher == "local":
        try:
            os.kill(int(job_id), 0)
            return True
        except (OSError, ValueError):
            return False
    return submitit.SlurmJob(folder, job_id).state.split()[0].upper() in ALIVE


def make_executor(args: argparse.Namespace, folder: Path):
    """A submitit executor with the per-run resources from the flags (``AutoExecutor`` maps them to SLURM or local)."""
    import submitit

    params = dict(timeout_min=args.time_min, cpus_per_task=args.cpus_per_run, gpus_per_node=args.gpus_per_run,
                  tasks_per_node=1, nodes=1)
    if args.mem_gb:
        params["mem_gb"] = args.mem_gb
    setup = [f"cd {shlex.quote(str(ROOT))}"]  # the job unpickles experiments.cluster.RunWorker
    if args.launcher == "slurm":
        if args.slurm_partition:
            params["slurm_partition"] = args.slurm_partition
        extra = dict(kv.split("=", 1) for kv in args.slurm_extra)
        if extra:
            params["slurm_additional_parameters"] = extra
        params["slurm_setup"] = setup
    else:
        params["local_setup"] = setup
    executor = submitit.AutoExecutor(folder=folder, cluster=args.launcher)
    executor.update_parameters(**params)
    return executor


def launch(experiment: str, tasks: list, args: argparse.Namespace, records: Path, worker_argv: list[str],
           executor=None) -> dict[str, str]:
    """Submit each unfinished (preset, seed) run as one job; returns ``{run: what happened}``.

    ``worker_argv``: the arguments every worker gets besides ``--presets``/``--seeds``. SLURM: returns after
    submitting (job ids and logs are printed; ``python -m eval.tables`` once they finish). Local: at most
    ``--jobs`` jobs run at a time and the call waits for all of them, showing their progress. Job states are kept in
    ``<runs>/submitit/<experiment>/jobs.json``; its logs beside it (``<job id>_0_log.out``).
    """
    from eval.records import load_records

    folder = (args.runs_dir / "submitit" / experiment).resolve()
    folder.mkdir(parents=True, exist_ok=True)
    state_path = folder / "jobs.json"
    state = json.loads(state_path.read_text()) if state_path.exists() else {}
    from core.runlog import run_name

    executor = executor or make_executor(args, folder)
    done = load_records(records) if records.exists() else []
    outcome, pending = {}, []
    for preset, seed in tasks:
        name = run_name(preset.name, seed)
        argv = ["--presets", preset.name, "--seeds", str(seed), *worker_argv]
        prev = state.get(name)
        if run_finished(experiment, preset.name, seed, args.scale, run_dir_for(args.runs_dir, args.scale, preset.name, seed), done):
            outcome[name] = "finished (records exist): skipped"
        elif prev and job_alive(args.launcher, folder, prev["job_id"]):
            outcome[name] = f"job {prev['job_id']} still queued or running: not submitted again"
        else:
            pending.append((name, preset, seed, argv))
    for name, text in outcome.items():
        print(f"== {experiment} / {name}: {text}", flush=True)

    def submit(name: str, argv: list[str]):
        executor.update_parameters(name=f"{experiment}-{name}")
        job = executor.submit(RunWorker(experiment, argv, args.gpus_per_run, args.cpus_per_run))
        state[name] = {"job_id": str(job.job_id), "launcher": args.launcher, "argv": argv, "time": time.time()}
        state_path.write_text(json.dumps(state, indent=1, sort_keys=True))
        print(f"== {experiment} / {name}: submitted job {job.job_id}, log {job.paths.stdout}", flush=True)
        return job

    if args.launcher == "slurm":
        for name, _, _, argv in pending:
            submit(name, argv)
            outcome[name] = "submitted"
        if pending:
            print(f"{len(pending)} job(s) submitted; watch them with `squeue --me`; re-running this command resubmits "
                  f"the unfinished ones; when all are done, `python -m eval.tables` rewrites the tables", flush=True)
        return outcome
    gpus = visible_gpus()  # local jobs take --gpus-per-run of them, each job starting one further (round robin)
    if not gpus or not all(g.isdigit() for g in gpus):  # none, or UUIDs the local executor cannot take: env as it is
        gpus = []
        executor.update_parameters(gpus_per_node=0)
    watches = {name: RunWatch(name, run_dir_for(args.runs_dir, args.scale, p.name, s)) for name, p, s, _ in pending}
    with ProgressBoard(list(watches.values()), args.progress_every) as board:
        queue, running = list(pending), {}
        while queue or running:
            while queue and len(running) < args.jobs:
                name, _, _, argv = queue.pop(0)
                if gpus:
                    k = (len(pending) - len(queue) - 1) * max(1, args.gpus_per_run) % len(gpus)
                    executor.update_parameters(gpus_per_node=min(args.gpus_per_run, len(gpus)),
                                               local_visible_gpus=tuple(int(g) for g in gpus[k:] + gpus[:k]))
                running[name] = (submit(name, argv), time.time())
                watches[name].start(time.time(), f"job {running[name][0].job_id}")
            for name, (job, t0) in list(running.items()):
                if job.done():
                    del running[name]
                    try:
                        job.result()
                        watches[name].state, outcome[name] = "done", "done"
                    except Exception as e:  # noqa: BLE001 - submitit re-raises the job's error; report and go on
                        watches[name].state, outcome[name] = "failed", f"FAILED ({type(e).__name__})"
                    board.message(f"== {experiment} / {name}: {outcome[name]} in {time.time() - t0:.0f} s"
                                  + ("" if outcome[name] == "done" else f", see {job.paths.stdout} and {job.paths.stderr}"))
            time.sleep(0.5)
    failed = [n for n, o in outcome.items() if o.startswith("FAILED")]
    if failed:
        raise SystemExit(f"{len(failed)} job(s) failed: {', '.join(failed)}; their logs are in {folder}. "
                         "Re-running the same command resubmits them (training resumes from its last checkpoint).")
    return outcome


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """The launcher's flags (``experiments.runner.main``)."""
    g = parser.add_argument_group("cluster (submitit)")
    g.add_argument("--launcher", choices=("slurm", "local"),
                   help="send each (preset, seed) run as one submitit job: slurm (sbatch; returns after submitting) or "
                        "local (submitit's local executor, --jobs at a time, waits); re-running resubmits only the "
                        "unfinished runs. Jobs' logs: <runs-dir>/submitit/<experiment>/")
    g.add_argument("--gpus-per-run", type=int, default=1, help="GPUs per job (>1: accelerate launch --multi_gpu)")
    g.add_argument("--cpus-per-run", type=int, default=8, help="CPU cores per job (its OMP_NUM_THREADS)")
    g.add_argument("--time-min", type=int, default=24 * 60,
                   help="wall-clock limit per job in minutes (SLURM requeues a job that reaches it; it resumes)")
    g.add_argument("--mem-gb", type=float, help="memory per job")
    g.add_argument("--slurm-partition", help="SLURM partition")
    g.add_argument("--slurm-extra", action="append", default=[], metavar="KEY=VALUE",
                   help="extra sbatch option, e.g. --slurm-extra account=abc --slurm-extra qos=high (repeatable)")


def check_arguments(parser: argparse.ArgumentParser, args: argparse.Namespace) -> None:
    """Bad launcher flags fail before anything is submitted."""
    for key in ("gpus_per_run", "cpus_per_run", "time_min"):
        value = getattr(args, key)
        if value < (0 if key == "gpus_per_run" else 1):
            parser.error(f"--{key.replace('_', '-')} must be >= {0 if key == 'gpus_per_run' else 1}, got {value}")
    bad = [kv for kv in args.slurm_extra if "=" not in kv]
    if bad:
        parser.error(f"--slurm-extra takes KEY=VALUE (an sbatch option without its dashes), got {', '.join(bad)}")
    if args.launcher:
        try:
            import submitit  # noqa: F401
        except ImportError:
            parser.error(f"--launcher {args.launcher} needs submitit: pip install submitit==1.5.4")
    if args.launcher == "slurm" and not (shutil.which("sbatch") and shutil.which("srun")):
        parser.error("--launcher slurm needs SLURM's sbatch and srun on PATH (run it on the cluster's login node); "
                     "--launcher local runs the same jobs on this machine")
