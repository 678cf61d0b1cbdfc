"""End-to-end runs through the real entry points (subprocesses), on 2 CPU cores in well under a minute each."""

import json
import os
import subprocess
import sys

import pytest
import torch
from safetensors.torch import load_file

from core.config import RunConfig
from core.models import build_unet
from tests.conftest import ROOT, TINY

ENV = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1"}


def run_train(run_dir, overrides, *extra, launcher=(sys.executable,), check=True):
    cmd = [*launcher, "-m", "core.train", "--run-dir", str(run_dir), *extra]
    for o in overrides:
        cmd += ["--set", o]
    proc = subprocess.run(cmd, cwd=ROOT, env=ENV, capture_output=True, text=True, timeout=300)
    if check and proc.returncode != 0:
        raise AssertionError(f"{' '.join(cmd)} failed:\n{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}")
    return proc


def stats(run_dir):
    return [json.loads(l) for l in (run_dir / "stats.jsonl").read_text().splitlines()]


@pytest.fixture(scope="module")
def straight(tmp_path_factory):
    overrides = TINY + ["train.steps=6", "train.checkpoint_every=2"]
    run_dir = tmp_path_factory.mktemp("straight")
    run_train(run_dir, overrides)
    return run_dir, overrides


def test_run_directory_artifacts(straight):
    run_dir, _ = straight
    assert {p.name for p in run_dir.iterdir()} >= {"config.yaml", "env.json", "log.txt", "stats.jsonl", "pipeline", "checkpoints"}
    # Rotation keeps the newest checkpoints_total_limit (2) complete checkpoints.
    assert sorted(p.name for p in (run_dir / "checkpoints").iterdir()) == ["checkpoint-4", "checkpoint-6"]
    records = stats(run_dir)
    assert [r["step"] for r in records] == [1, 2, 3, 4, 5, 6]
    assert all({"loss", "point_loss", "context_loss", "lr", "step_time"} <= r.keys() for r in records)
    assert records[0]["lr"] < records[-1]["lr"]  # warm-up
    env = json.loads((run_dir / "env.json").read_text())
    assert env["packages"]["diffusers"] and env["git_commit"]


def test_a_finished_run_invoked_again_keeps_what_it_was_trained_with(straight, tmp_path):
    """Re-running a finished run (as the runners do before sampling it with another sampler) trains nothing and leaves
    its config.yaml, env.json and stats.jsonl as training wrote them (they were rewritten by the no-op resume)."""
    import shutil

    run_dir, overrides = straight
    copy = tmp_path / "again"
    shutil.copytree(run_dir, copy)
    before = {f: (copy / f).read_bytes() for f in ("config.yaml", "env.json", "stats.jsonl")}
    run_train(copy, overrides + ["diffusion.sampler=ddpm", "diffusion.sampling_steps=7"])
    assert {f: (copy / f).read_bytes() for f in before} == before
    assert sorted(p.name for p in (copy / "checkpoints").iterdir()) == ["checkpoint-4", "checkpoint-6"]


def test_a_finished_exported_run_loads_nothing_and_a_missing_export_is_written_again(straight, tmp_path, monkeypatch):
    """A re-run of a finished run whose export holds its final checkpoint returns before reading data, encoders or the
    checkpoint (the rehearsal's 'again' phase loaded model, EMA and optimizer state: 20 GB for the 860 M UNet). Without
    the export, or with one from another checkpoint, it loads the checkpoint and exports again."""
    import shutil

    import core.train as train_module
    from core.config import load_yaml
    from core.runlog import read_provenance

    run_dir, overrides = straight
    copy = tmp_path / "again"
    shutil.copytree(run_dir, copy)
    cfg = RunConfig.from_dict(load_yaml((copy / "config.yaml").read_text()))
    export = {f.relative_to(copy): f.read_bytes() for f in (copy / "pipeline").rglob("*") if f.is_file()}

    def refuse(*args, **kwargs):
        raise AssertionError("a finished, exported run must not load its data or checkpoint")

    with monkeypatch.context() as m:
        m.setattr(train_module, "ImageData", refuse)
        m.setattr(train_module, "resume_newest_intact", refuse)
        assert train_module.train(cfg, copy) == copy / "pipeline"
    assert {f.relative_to(copy): f.read_bytes() for f in (copy / "pipeline").rglob("*") if f.is_file()} == export

    provenance = read_provenance(copy / "pipeline")
    (copy / "pipeline" / "provenance.json").write_text(json.dumps({**provenance, "checkpoint": 4}))
    train_module.train(cfg, copy)  # an export of checkpoint 4: replaced by checkpoint 6's
    assert read_provenance(copy / "pipeline")["checkpoint"] == 6
    shutil.rmtree(copy / "pipeline")
    train_module.train(cfg, copy)
    assert read_provenance(copy / "pipeline")["checkpoint"] == 6
    assert load_file(copy / "pipeline" / "unet" / "diffusion_pytorch_model.safetensors").keys() == load_file(
        run_dir / "pipeline" / "unet" / "diffusion_pytorch_model.safetensors").keys()


def test_export_is_a_stock_pipeline_with_baseline_parameter_count(straight):
    from diffusers import DDPMPipeline

    run_dir, overrides = straight
    pipe = DDPMPipeline.from_pretrained(run_dir / "pipeline")
    images = pipe(batch_size=2, num_inference_steps=2, output_type="np").images
    assert images.shape == (2, 16, 16, 1)
    cfg = RunConfig.from_dict({"model": {"block_out_channels": [16, 32]}})
    baseline = build_unet(cfg.model, 16, 1)
    assert sum(p.numel() for p in pipe.unet.parameters()) == sum(p.numel() for p in baseline.parameters())


def test_interrupted_run_resumes_bit_identically(straight, tmp_path):
    run_dir, overrides = straight
    resumed = tmp_path / "resumed"
    run_train(resumed, overrides, "--stop-after", "3")  # checkpoint at 2, interrupted after step 3
    assert sorted(p.name for p in (resumed / "checkpoints").iterdir()) == ["checkpoint-2"]
    out = run_train(resumed, overrides)  # the same command again
    assert "resumed from" in out.stdout + out.stderr
    assert [r["step"] for r in stats(resumed)] == [1, 2, 3, 4, 5, 6]
    assert [r["lr"] for r in stats(resumed)] == [r["lr"] for r in stats(run_dir)]
    assert [r["loss"] for r in stats(resumed)] == [r["loss"] for r in stats(run_dir)]
    a = load_file(run_dir / "checkpoints/checkpoint-6/model.safetensors")
    b = load_file(resumed / "checkpoints/checkpoint-6/model.safetensors")
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    ema_a = torch.load(run_dir / "checkpoints/checkpoint-6/custom_checkpoint_1.pkl", weights_only=False)
    ema_b = torch.load(resumed / "checkpoints/checkpoint-6/custom_checkpoint_1.pkl", weights_only=False)
    assert all(torch.equal(x, y) for x, y in zip(ema_a["shadow_params"], ema_b["shadow_params"]))


def test_resume_with_changed_config_is_refused(straight):
    run_dir, overrides = straight
    proc = run_train(run_dir, overrides + ["context.weight=0.5"], check=False)
    assert proc.returncode != 0
    assert "context.weight: 1.0 -> 0.5" in proc.stderr and "--allow-config-change" in proc.stderr


def test_two_processes_match_one(straight, tmp_path):
    run_dir, overrides = straight
    launcher = ("torchrun", "--nproc_per_node", "2", "--master_port", "29533")
    two = tmp_path / "two"
    ENV["ACCELERATE_USE_CPU"] = "1"
    try:
        run_train(two, overrides, launcher=launcher)
    finally:
        ENV.pop("ACCELERATE_USE_CPU")
    assert json.loads((two / "env.json").read_text())["num_processes"] == 2
    for r1, r2 in zip(stats(run_dir), stats(two), strict=True):
        assert r1["step"] == r2["step"] and r1["lr"] == r2["lr"]
        assert r2["loss"] == pytest.approx(r1["loss"], rel=1e-4)
        assert r2["context_loss"] == pytest.approx(r1["context_loss"], rel=1e-4)
