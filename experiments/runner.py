"""The runner every experiment's ``__main__`` calls: the three scales, and train -> sample -> evaluate -> record.

An experiment folder defines ``PRESETS`` (paper rows: name, scale, method, benchmark, config
overrides, and the number the paper reports) and calls :func:`main`. Scales:

* ``smoke``: every preset (mini and paper) with a tiny model, a few steps and samples; paper presets
  get a generated imagefolder and a random autoencoder in place of data and weights. Proves the
  code path runs; measures nothing (records go to ``<runs>/smoke-records.jsonl``).
* ``mini``: the mini presets on the embedded digits, 2-core CPU budgets, proxy metrics.
* ``mini-long`` / ``mini-gpu``: the same task trained longer (CPU) or larger (32x32, one GPU), where an
  experiment has such presets; proxy metrics, reported as scales of their own.
* ``paper``: the paper presets on the user's prepared data, GPUs and standard metric weights.

Every stage resumes: training from its last checkpoint, sampling skips existing PNGs, and a
record already present (same preset, seed, metric, checkpoint, sample count) is not measured again.
Nothing derived from another checkpoint is reused: records carry the checkpoint of the exported
pipeline they measured (``pipeline/provenance.json``), and sample folders drawn from another export
are drawn again (``core.sample``).

Jobs live in modules of their own: presets (:mod:`experiments.presets`), smoke shrinking and stand-ins
(:mod:`experiments.smoke`), evaluation and records (:mod:`experiments.evaluate`), a run's directory
(:mod:`experiments.runs`), launchers (:mod:`experiments.cluster`); this module parses the command line and runs
the chosen (preset, seed) runs here, in parallel workers (``--jobs``) or through a launcher.
"""

from __future__ import annotations

import argparse
import dataclasses
import os
import sys
import time
from collections.abc import Callable
from pathlib import Path

from core.runlog import RunLock, run_name
from core.train import recorded_shared, training_overrides
from eval.records import RECORDS, ROOT, SCALES, RecordError, check_not_smoke_into_committed, cpu_cores, records_home

from .evaluate import check_trained_models, evaluate_unconditional, measured_models_gone
from .presets import Preset, run_config, sampler_configs, with_eval_options
from .runs import keep_artifacts, train_run


def worker_argv(args: argparse.Namespace, records: Path, shared_device: bool) -> list[str]:
    """The arguments every worker of a sweep gets besides ``--presets``/``--seeds`` (``--jobs`` and ``--launcher``)."""
    return ["--scale", args.scale, "--runs-dir", str(args.runs_dir.resolve()), "--records", str(records.resolve()),
            *(["--shared-device"] if shared_device else []), "--no-tables",
            *(["--num-samples", str(args.num_samples)] if args.num_samples else []),
            *(["--report-to", args.report_to] if args.report_to != "none" else []),
            *(x for o in args.overrides for x in ("--set", o)),
            *(x for o in getattr(args, "eval_options", []) for x in ("--eval", o)),
            *(["--allow-missing-metrics"] if getattr(args, "allow_missing_metrics", False) else []),
            *(["--sampling-steps", str(args.sampling_steps)] if getattr(args, "sampling_steps", None) else [])]

def run_in_parallel(
    experiment: str, tasks: list[tuple[Preset, int]], args: argparse.Namespace, records: Path,
    gpus: list[str] | None = None,
) -> None:
    """Run each (preset, seed) as ``python -m experiments.<experiment>`` in its own process, ``args.jobs`` at a time.

    Workers share the cores evenly (``OMP_NUM_THREADS``), record no step time (``--shared-device``) and
    append to the same records file; the longest presets start first. Each starting worker gets the GPU the
    fewest running workers hold (``CUDA_VISIBLE_DEVICES``; ``gpus`` defaults to the visible ones, see
    :func:`experiments.cluster.visible_gpus`). While they run, one line per run shows its step of total, it/s and
    time left, read from the run's ``stats.jsonl`` (:class:`experiments.cluster.ProgressBoard`; redrawn in place on
    a terminal, a line per moving run every ``args.progress_every`` seconds otherwise). A failed run is reported
    and the others go on; re-running the same command resumes the failed ones.
    """
    import os
    import subprocess
    import sys
    from concurrent.futures import ThreadPoolExecutor

    from .cluster import GpuPool, ProgressBoard, RunWatch, run_dir_for, visible_gpus

    env = dict(os.environ, OMP_NUM_THREADS=str(max(1, cpu_cores() // args.jobs)))
    logs = args.runs_dir / "logs"
    logs.mkdir(parents=True, exist_ok=True)
    common = worker_argv(args, records, shared_device=True)
    pool = GpuPool(visible_gpus() if gpus is None else gpus)
    if args.scale != "smoke":  # shared preparations (an autoencoder) once, before workers could race to make them
        for prepare in dict.fromkeys(p.prepare for p, _ in tasks if p.prepare is not None):
            prepare()
    # runs that continue another start after it (shorter chains first), then the longest presets first
    by_name = {p.name: p for p, _ in tasks}

    def depth(p: Preset) -> int:
        return 0 if p.continues is None or p.continues not in by_name else 1 + depth(by_name[p.continues])

    longest_first = sorted(tasks, key=lambda t: (depth(t[0]), -(t[0].expected_minutes or 0)))
    watches = {(p.name, s): RunWatch(run_name(p.name, s), run_dir_for(args.runs_dir, args.scale, p.name, s))
               for p, s in longest_first}
    board = ProgressBoard(list(watches.values()), args.progress_every)

    def run(task: tuple[Preset, int]) -> tuple[str, int]:
        preset, seed = task
        name, t0, watch = run_name(preset.name, seed), time.time(), watches[(preset.name, seed)]
        log = logs / f"{experiment}-{name}.log"
        gpu = pool.acquire()
        worker_env = env if gpu is None else dict(env, CUDA_VISIBLE_DEVICES=gpu)
        watch.start(t0, "" if gpu is None else f"GPU {gpu}")
        board.message(f"== {experiment} / {name}: started{'' if gpu is None else f' on GPU {gpu}'}, log {log}")
        try:
            with open(log, "a") as f:
                rc = subprocess.run([sys.executable, "-m", f"experiments.{experiment}", "--presets", preset.name,
                                     "--seeds", str(seed), *common], stdout=f, stderr=subprocess.STDOUT,
                                    env=worker_env).returncode
        finally:
            pool.release(gpu)
        watch.state = "done" if rc == 0 else "failed"
        board.message(f"== {experiment} / {name}: {'done' if rc == 0 else f'FAILED (exit {rc}, see {log})'} "
                      f"in {time.time() - t0:.0f} s")
        return name, rc

    with board, ThreadPoolExecutor(args.jobs) as workers:
        failed = [name for name, rc in workers.map(run, longest_first) if rc != 0]
    if failed:
        raise SystemExit(f"{len(failed)} run(s) failed: {', '.join(failed)}; their logs are in {logs}. "
                         "Re-running the same command resumes them.")

def main(
    experiment: str, presets: list[Preset], doc: str, argv: list[str] | None = None,
    evaluate: Callable = evaluate_unconditional,
) -> None:
    names = "\n".join(f"  {p.name:40s} {p.scale:9s} paper: {p.paper}"
                      + (f" (~{p.expected_minutes:g} min/seed on 2 CPU cores"
                         f"{', estimated' if p.minutes_estimated else ''})" if p.expected_minutes else "")
                      for p in presets)
    parser = argparse.ArgumentParser(
        prog=f"python -m experiments.{experiment}", description=doc + "\n\npresets:\n" + names,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("--scale", choices=SCALES, default="mini")
    parser.add_argument("--seeds", default="0", help="training seeds, e.g. 0,1,2")
    parser.add_argument("--presets", help="comma-separated subset of the scale's presets")
    parser.add_argument("--runs-dir", type=Path, default=ROOT / "runs")
    parser.add_argument("--records", type=Path, help=f"records file (default {RECORDS.relative_to(ROOT)}; smoke: in runs-dir)")
    parser.add_argument("--num-samples", type=int, help="override the preset's number of evaluation samples")
    parser.add_argument("--eval", dest="eval_options", action="append", default=[], metavar="KEY=VALUE",
                        help="override one of a preset's evaluation options (its `extra`, e.g. inpainting's RePaint "
                             "steps, jump_length, jump_n_sample, eta); unknown keys are refused. Sampling batch per "
                             "process: --set diffusion.sampling_batch=N")
    parser.add_argument("--shared-device", action="store_true",
                        help="other runs share this machine at the same time: record no step_time_s (it would time the contention); "
                             "kept in each run's env.json, so a later evaluation of a run trained this way records "
                             "none either")
    parser.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                        help="extra config override for every preset (recorded in the run's config.yaml)")
    parser.add_argument("--jobs", type=int, default=1,
                        help="run this many (preset, seed) runs at once, each in its own process with cores/jobs threads "
                             "and, where GPUs exist, the least used GPU (CUDA_VISIBLE_DEVICES, round robin); shows one "
                             "progress line per run (implies --shared-device; logs in <runs-dir>/logs/)")
    parser.add_argument("--progress-every", type=float, default=None, metavar="SECONDS",
                        help="--jobs/--launcher local: refresh the progress lines this often (default 1 on a terminal; "
                             "60 otherwise, a line per run whose step moved)")
    parser.add_argument("--report-to", "--report_to", choices=("none", "tensorboard", "wandb"), default="none",
                        help="also log every stats.jsonl row (loss terms, LR) to this accelerate tracker "
                             "(<run>/tracking/; needs the tracker's pip package)")
    parser.add_argument("--no-tables", action="store_true", help=argparse.SUPPRESS)  # set for --jobs' workers
    parser.add_argument("--print-config", action="store_true",
                        help="print each chosen (preset, seed) run's resolved config as YAML (--set applied, smoke "
                             "shrinking at --scale smoke), with its training-config hash and overridden keys, and exit")
    parser.add_argument("--sampling-steps", type=int, metavar="N",
                        help="sample with N steps, with every sampler of the chosen presets (their own and each extra "
                             "one, e.g. CelebA-HQ's 500 and 200 DDIM steps): a rehearsal or a pilot of evaluation; the "
                             "records name the sampler with N. Inpainting's RePaint steps: --eval steps=N")
    parser.add_argument("--allow-missing-metrics", action="store_true",
                        help="paper scale: train and sample even if a metric's inputs (Inception or AlexNet weights, FID "
                             "statistics or reference images) are missing; those metrics are not measured, and the "
                             "preflight and evaluation name them (used by `python -m experiments.rehearse`)")
    parser.add_argument("--check", action="store_true",
                        help="only check that every input of the chosen presets is present (data, weights, FID "
                             "statistics, prompts), list the missing ones with the command that provides each, and exit "
                             "(paper runs always check first)")
    from .cluster import add_arguments, check_arguments

    add_arguments(parser)
    args = parser.parse_args(argv)
    if args.jobs < 1:
        parser.error(f"--jobs must be >= 1, got {args.jobs}")
    check_arguments(parser, args)
    if args.progress_every is None:
        args.progress_every = 1.0 if sys.stdout.isatty() else 60.0
    if args.progress_every <= 0:
        parser.error(f"--progress-every must be > 0 seconds, got {args.progress_every}")
    if args.report_to != "none":
        from core.tracking import check_tracker

        try:
            check_tracker(args.report_to)
        except ImportError as e:
            parser.error(str(e))
    if args.sampling_steps is not None:
        if args.sampling_steps < 1:
            parser.error(f"--sampling-steps must be >= 1, got {args.sampling_steps}")
        args.overrides = [*args.overrides, f"diffusion.sampling_steps={args.sampling_steps}"]
    if args.allow_missing_metrics:  # read by eval (eval.metrics.missing_metrics_allowed), inherited by workers
        from eval.metrics import ALLOW_MISSING_METRICS_ENV

        os.environ[ALLOW_MISSING_METRICS_ENV] = "1"
    seeds = [int(s) for s in args.seeds.split(",")]
    chosen = [p for p in presets if args.scale == "smoke" or p.scale == args.scale]
    if not chosen:
        parser.error(f"no presets at --scale {args.scale} in this experiment; its scales: "
                     f"{', '.join(sorted({p.scale for p in presets}))} (and smoke)")
    if args.presets:
        wanted = args.presets.split(",")
        unknown = sorted(set(wanted) - {p.name for p in presets})
        if unknown:
            parser.error(f"unknown preset(s) {', '.join(unknown)}; choose from: {', '.join(p.name for p in presets)}")
        chosen = [p for p in chosen if p.name in wanted]
    if args.sampling_steps is not None:
        chosen = [dataclasses.replace(p, extra_samplers=tuple(dict(e, sampling_steps=args.sampling_steps)
                                                              for e in p.extra_samplers)) for p in chosen]
    if args.eval_options:
        try:
            chosen = [with_eval_options(p, args.eval_options) for p in chosen]
        except ValueError as e:
            parser.error(str(e))
    records = args.records or (args.runs_dir / "smoke-records.jsonl" if args.scale == "smoke" else RECORDS)
    try:  # before any compute: smoke runs measure nothing, so their records stay out of results/
        check_not_smoke_into_committed([args.scale], records, f"--scale {args.scale} --records {records}")
    except RecordError as e:
        parser.error(str(e))
    # Only runs recorded in the committed records file update results/ and tables/; any other
    # --records file (a pilot, a sweep) gets its artifacts and tables next to it.
    home = records_home(records)
    tasks = list({(p.name, s): (p, s) for p in chosen for s in seeds}.values())  # --seeds 0,0: one run, not two
    configs, overrides = {}, {}  # every run's config, resolved and validated before any compute: one line per bad --set
    for preset, seed in tasks:
        try:
            configs[preset.name, seed] = run_config(preset, seed, args)
        except ValueError as e:  # ConfigError too
            parser.error(f"{preset.name}: {e}")
        overrides[preset.name, seed] = training_overrides(run_config(preset, seed, args, []), configs[preset.name, seed])
        try:
            sampler_configs(preset, configs[preset.name, seed])
        except ValueError as e:
            parser.error(str(e))
        if preset.continues and preset.continues not in {p.name for p in presets}:
            parser.error(f"{preset.name} continues {preset.continues!r}, which is not a preset of this experiment")
    if args.print_config:
        import yaml

        from core.train import training_config_sha256

        for preset, seed in tasks:
            cfg = configs[preset.name, seed]
            print(f"# {preset.name} seed {seed}: train_config_sha256 {training_config_sha256(cfg)}; training keys "
                  f"overridden: {overrides[preset.name, seed] or 'none'}"
                  + (f"; continues {preset.continues}" if preset.continues else "")
                  + (f"; also sampled with {list(preset.extra_samplers)}" if preset.extra_samplers else ""))
            print(yaml.safe_dump(cfg.to_dict(), sort_keys=False), end="---\n")
        return
    try:  # records of another trained model of the same preset and seed: refused before any compute
        check_trained_models(experiment, tasks, configs, overrides, args.scale, records)
    except RecordError as e:
        parser.error(str(e))
    # measured runs whose model is gone: skipped before any compute, not retrained to be refused after training
    everyone = {p.name: p for p in presets}
    gone, notes = measured_models_gone(experiment, tasks, configs, args.scale, records, args.runs_dir, {
        p.continues: run_config(everyone[p.continues], s, args).train.steps for p, s in tasks if p.continues})
    for why in [*gone.values(), *notes] if int(os.environ.get("RANK", "0")) == 0 else ():
        print(f"== {experiment} / {why}", flush=True)
    tasks = [(p, s) for p, s in tasks if (p.name, s) not in gone]
    if args.scale != "smoke":  # sample counts every metric can use, before any training
        from eval.metrics import check_num_samples

        for preset in chosen:
            try:
                check_num_samples(args.num_samples or preset.num_samples)
            except ValueError as e:
                parser.error(f"{preset.name}: {e}")
    if args.check or args.scale == "paper":
        from .preflight import report

        checked = [(p, configs[p.name, seeds[0]]) for p in chosen] if args.scale != "smoke" else []
        ok, text = report(experiment, checked, paper=args.scale == "paper", check_only=args.check,
                          allow_missing_metrics=args.allow_missing_metrics)
        if int(os.environ.get("RANK", "0")) == 0:  # under `accelerate launch`, one report, not one per process
            print(text, flush=True)
        if not ok:
            raise SystemExit(1)
        if args.check:
            return
    from .cluster import run_dir_for

    if args.launcher:
        from .cluster import launch

        launch(experiment, tasks, args, records, worker_argv(args, records, shared_device=args.launcher == "local"
                                                             and args.jobs > 1))
        if args.launcher == "slurm":
            return
        tasks = []
    elif args.jobs > 1:
        run_in_parallel(experiment, tasks, args, records)
        tasks = []
    for preset, seed in tasks:
        t0 = time.time()
        cfg = configs[preset.name, seed]
        run_dir = run_dir_for(args.runs_dir, args.scale, preset.name, seed)  # shared by experiments using the preset
        # smoke: enough for k-NN precision/recall (k = 3)
        num_samples = 8 if args.scale == "smoke" else args.num_samples or preset.num_samples
        print(f"== {experiment} / {preset.name} / seed {seed} -> {run_dir}", flush=True)
        if preset.prepare is not None and args.scale != "smoke":
            preset.prepare()
        with RunLock(run_dir, enabled=int(os.environ.get("RANK", "0")) == 0):  # train, sample, evaluate: one owner
            train_run(preset, seed, presets, args, cfg)
            shared = recorded_shared(run_dir)  # step times are the training's: valid if it had the machine to itself
            for sampling in sampler_configs(preset, cfg):
                evaluate(experiment, preset, sampling, run_dir, args.scale, num_samples, records,
                         step_time=not (args.shared_device if shared is None else shared),
                         overrides=overrides[preset.name, seed])
        if args.scale != "smoke":
            keep_artifacts(experiment, run_dir, home / "results")
        print(f"== done in {time.time() - t0:.0f} s", flush=True)
    from core.train import end_distributed

    main_process = int(os.environ.get("RANK", "0")) == 0
    end_distributed()  # after every run's last barrier; tables are rank 0's alone
    if args.scale != "smoke" and not args.no_tables and main_process:
        from eval.tables import write_tables

        from .registry import table_specs

        write_tables(records, home / "tables", specs=table_specs())
        table = home / "tables" / f"{experiment}.md"
        if table.exists():
            print(table.read_text())
