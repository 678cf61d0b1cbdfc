"""Every preset of every experiment folder runs end to end at smoke scale (measures nothing)."""

import json
import subprocess
import sys

import pytest

from tests.conftest import ROOT, TINY
from tests.test_train import ENV, run_train

from experiments.registry import EXPERIMENTS as REGISTRY

EXPERIMENTS = [name for name, e in REGISTRY.items() if e.smoke_in_ci]  # scaling says why not (its SMOKE_IN_CI)


@pytest.mark.parametrize("experiment", EXPERIMENTS)
def test_help_lists_presets_with_paper_numbers(experiment, capsys, monkeypatch):
    """``python -m experiments.<x> --help``, in this process (a subprocess per experiment cost 10 s of imports each)."""
    import runpy

    monkeypatch.setattr(sys, "argv", [f"experiments.{experiment}", "--help"])
    with pytest.raises(SystemExit) as exit_:
        runpy.run_module(f"experiments.{experiment}", run_name="__main__", alter_sys=False)
    out = capsys.readouterr().out
    assert exit_.value.code == 0 and "presets:" in out and "paper:" in out and "--scale" in out


@pytest.fixture(scope="module")
def runs_dir(tmp_path_factory):
    """Shared by all experiments, so presets they share (e.g. the mini baseline) train once."""
    return tmp_path_factory.mktemp("smoke-runs")


@pytest.mark.parametrize("experiment", EXPERIMENTS)
def test_every_preset_runs_at_smoke_scale(experiment, runs_dir):
    tmp_path = runs_dir
    proc = subprocess.run([sys.executable, "-m", f"experiments.{experiment}", "--scale", "smoke", "--runs-dir", str(tmp_path)],
                          cwd=ROOT, env=ENV, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    from importlib import import_module

    presets = import_module(f"experiments.{experiment}").PRESETS
    for preset in presets:
        run = tmp_path / "smoke" / f"{preset.name}-s0"
        assert (run / "pipeline" / "unet" / "config.json").exists(), preset.name
        outputs = list((run / "samples").glob("*/*.png")) + list((run / "inpainting").glob("*/*/*.png"))
        assert outputs, preset.name
    records = [json.loads(l) for l in (tmp_path / "smoke-records.jsonl").read_text().splitlines()]
    mini = {p.name for p in presets if p.scale == "mini"}
    mine = [r for r in records if r["experiment"] == experiment]
    assert {r["preset"] for r in mine} >= mini and all(r["scale"] == "smoke" for r in records)
    assert not (ROOT / "results" / "records.jsonl").exists() or all(
        json.loads(l)["scale"] != "smoke" for l in (ROOT / "results" / "records.jsonl").read_text().splitlines())


def test_preset_names_start_with_their_scale():
    """eval.records.scale_of reads a run's scale off its name (figures group curves by it)."""
    from importlib import import_module

    from eval.records import scale_of

    for experiment in REGISTRY:
        for preset in import_module(f"experiments.{experiment}").PRESETS:
            assert scale_of(preset.name) == preset.scale, (experiment, preset.name)


def test_jobs_runs_presets_in_parallel_workers(tmp_path):
    """--jobs 2: each (preset, seed) in its own worker, logs per run, one records file, no step time."""
    proc = subprocess.run([sys.executable, "-m", "experiments.stride_ablation", "--scale", "smoke", "--runs-dir", str(tmp_path),
                           "--presets", "mini-digits16-baseline,mini-digits16-strides-1", "--seeds", "0", "--jobs", "2"],
                          cwd=ROOT, env=ENV, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    runs = {f"{p}-s{s}" for p in ("mini-digits16-baseline", "mini-digits16-strides-1") for s in (0,)}
    assert {f.name for f in (tmp_path / "logs").iterdir()} == {f"stride_ablation-{r}.log" for r in runs}
    assert all((tmp_path / "smoke" / r / "pipeline" / "unet" / "config.json").exists() for r in runs)
    assert proc.stdout.count(": started") == 2 and proc.stdout.count(": done in") == 2
    records = [json.loads(l) for l in (tmp_path / "smoke-records.jsonl").read_text().splitlines()]
    assert {r["preset"] for r in records if r["metric"] == "fd_digits"} == {"mini-digits16-baseline", "mini-digits16-strides-1"}
    assert not any(r["metric"] == "step_time_s" for r in records)  # shared cores: no step time
    bad = subprocess.run([sys.executable, "-m", "experiments.stride_ablation", "--scale", "smoke", "--jobs", "0"],
                         cwd=ROOT, env=ENV, capture_output=True, text=True)
    assert bad.returncode == 2 and "--jobs must be >= 1" in bad.stderr


def test_set_applies_at_every_scale_and_a_bad_one_is_one_line_before_any_compute(tmp_path, capsys):
    """--set reaches smoke runs too (it was silently dropped there), and an unknown key, an impossible value or a
    malformed override stops the command with one argparse line naming the preset, before any run directory exists."""
    from experiments.runner import main
    from experiments.unconditional import PRESETS

    base = ["--runs-dir", str(tmp_path / "runs")]
    for scale, preset in (("smoke", "mini-digits16-baseline"), ("mini", "mini-digits16-conprediff"),
                          ("paper", "paper-celebahq256-ldm4-baseline")):
        for override, message in (("train.lrr=1", "unknown key(s) train.lrr"), ("train.lr=-1", "train.lr: must be > 0"),
                                  ("train.lr", "key.sub=value")):
            with pytest.raises(SystemExit) as exit_:
                main("unconditional", PRESETS, "", base + ["--scale", scale, "--presets", preset, "--set", override])
            err = capsys.readouterr().err
            assert exit_.value.code == 2 and f"error: {preset}: " in err and message in err, (scale, override, err)
    assert not (tmp_path / "runs").exists()
    ok = subprocess.run([sys.executable, "-m", "experiments.unconditional", *base, "--scale", "smoke", "--presets",
                         "mini-digits16-baseline", "--set", "train.steps=2"], cwd=ROOT, env=ENV, capture_output=True,
                        text=True, timeout=600)
    assert ok.returncode == 0, ok.stderr[-3000:]
    import yaml

    saved = yaml.safe_load((tmp_path / "runs" / "smoke" / "mini-digits16-baseline-s0" / "config.yaml").read_text())
    assert saved["train"]["steps"] == 2  # the smoke shrinking says 3: the user's --set wins


def test_step_time_is_recorded_only_for_runs_that_trained_with_the_machine_to_themselves(tmp_path):
    """step_time_s is the training's: a run trained beside others (--shared-device, as every --jobs worker) records
    none, and neither does a later evaluation of it under another sampler without the flag (it did: the median of
    the contended steps, under the new sampler's key). A run trained alone keeps it when re-sampled while shared."""
    import yaml

    from core.train import sticky_shared

    assert [sticky_shared(b, n) for b, n in ((False, False), (False, True), (True, False), (None, False),
                                             (False, None))] == [False, True, True, None, None]

    def run(preset, *extra):
        proc = subprocess.run([sys.executable, "-m", "experiments.unconditional", "--scale", "smoke", "--presets", preset,
                               "--runs-dir", str(tmp_path), *extra], cwd=ROOT, env=ENV, capture_output=True, text=True,
                              timeout=600)
        assert proc.returncode == 0, proc.stderr[-3000:]

    run("mini-digits16-baseline", "--shared-device")
    run("mini-digits16-conprediff")
    for preset in ("mini-digits16-baseline", "mini-digits16-conprediff"):  # re-sampled: DDIM-3 instead of the smoke's 2
        run(preset, "--set", "diffusion.sampling_steps=3", *(["--shared-device"] if "conprediff" in preset else []))
    records = [json.loads(l) for l in (tmp_path / "smoke-records.jsonl").read_text().splitlines()]
    timed = {(r["preset"], r["sampler"]) for r in records if r["metric"] == "step_time_s"}
    assert timed == {("mini-digits16-conprediff", "ddim-2-noclip"), ("mini-digits16-conprediff", "ddim-3-noclip")}
    assert {(r["preset"], r["sampler"]) for r in records if r["metric"] == "fd_digits"} == {
        (p, s) for p in ("mini-digits16-baseline", "mini-digits16-conprediff") for s in ("ddim-2-noclip", "ddim-3-noclip")}
    env = json.loads((tmp_path / "smoke" / "mini-digits16-baseline-s0" / "env.json").read_text())
    assert env["shared_device"] is True
    cfg = yaml.safe_load((tmp_path / "smoke" / "mini-digits16-baseline-s0" / "config.yaml").read_text())
    assert cfg["diffusion"]["sampling_steps"] == 2  # as trained: re-sampling rewrote nothing


def test_checkpoint_confidence_probes_the_chosen_checkpoints_with_the_chosen_sampler(tmp_path):
    run_train(tmp_path, TINY + ["train.steps=4", "train.checkpoint_every=2"])
    probe = [sys.executable, "-m", "experiments.unconditional.checkpoint_confidence", str(tmp_path), "--samples", "4",
             "--steps", "3"]
    out = subprocess.run(probe + ["--checkpoints", "2", "--sampler", "ddpm"], cwd=ROOT, env=ENV, capture_output=True,
                         text=True, check=True).stdout
    lines = [json.loads(line) for line in out.splitlines()]
    assert [(r["step"], r["sampler"], r["samples"]) for r in lines] == [(2, "ddpm-3-noclip", 4)]
    assert lines[0]["confident_digits"] * 4 in {0, 1, 2, 3, 4}  # a fraction of the 4 samples
    missing = subprocess.run(probe + ["--checkpoints", "2,3"], cwd=ROOT, env=ENV, capture_output=True, text=True)
    assert missing.returncode != 0 and "no checkpoint at step(s) [3]" in missing.stderr and "[2, 4]" in missing.stderr
