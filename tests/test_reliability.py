"""Bad inputs fail clearly; interrupted runs lose nothing."""

import os
import signal
import subprocess
import sys
import time

import pytest
import torch
from safetensors.torch import load_file

from core.config import DataConfig
from core.data import DataError, ImageData
from tests.conftest import ROOT, TINY
from tests.test_train import ENV, run_train, stats


def test_kill_9_then_same_command_resumes_bit_identically(tmp_path):
    overrides = TINY + ["train.steps=6", "train.checkpoint_every=2"]
    straight = tmp_path / "straight"
    run_train(straight, overrides)
    killed = tmp_path / "killed"
    cmd = [sys.executable, "-m", "core.train", "--run-dir", str(killed)] + sum((["--set", o] for o in overrides), [])
    proc = subprocess.Popen(cmd, cwd=ROOT, env=ENV, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.time() + 120
    while not (killed / "checkpoints" / "checkpoint-2" / "state.json").exists():
        assert time.time() < deadline and proc.poll() is None, "no checkpoint appeared"
        time.sleep(0.02)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    if (killed / "pipeline").exists():
        pytest.skip("the run finished before the kill landed")
    run_train(killed, overrides)
    assert [r["step"] for r in stats(killed)] == [1, 2, 3, 4, 5, 6]
    a = load_file(straight / "checkpoints/checkpoint-6/model.safetensors")
    b = load_file(killed / "checkpoints/checkpoint-6/model.safetensors")
    assert all(torch.equal(a[k], b[k]) for k in a)


def test_half_written_checkpoint_is_never_latest(tmp_path):
    from core.train import list_checkpoints

    (tmp_path / "checkpoints" / "checkpoint-4").mkdir(parents=True)
    (tmp_path / "checkpoints" / "checkpoint-4" / "state.json").write_text('{"step": 4}')
    (tmp_path / "checkpoints" / "tmp-checkpoint-6").mkdir()  # interrupted save_state
    (tmp_path / "checkpoints" / "checkpoint-8").mkdir()  # no completion marker
    assert [s for s, _ in list_checkpoints(tmp_path)] == [4]


def test_non_finite_loss_stops_and_names_the_step(tmp_path):
    proc = run_train(tmp_path, TINY + ["train.steps=20", "train.lr=1e30", "train.max_grad_norm=0",
                                       "train.warmup_steps=0", "train.checkpoint_every=1"], check=False)
    assert proc.returncode != 0
    assert "NonFiniteLossError: non-finite loss at step" in proc.stderr and "point_loss=" in proc.stderr
    assert not (tmp_path / "pipeline").exists()


def test_corrupt_empty_and_missing_data(tmp_path):
    from PIL import Image

    good = tmp_path / "good"
    good.mkdir()
    for i in range(3):
        Image.new("L", (20, 20), color=i * 50).save(good / f"{i}.png")
    assert ImageData(DataConfig(source=str(good), resolution=8)).images([0, 1]).shape == (2, 1, 8, 8)
    with pytest.raises(DataError, match="smaller than data.resolution=32.*allow_upscale"):
        ImageData(DataConfig(source=str(good), resolution=32))
    assert ImageData(DataConfig(source=str(good), resolution=32, allow_upscale=True)).images([0]).shape == (1, 1, 32, 32)
    (good / "3.png").write_bytes((good / "0.png").read_bytes()[:40])  # truncated file
    with pytest.raises(DataError, match="3.png"):
        ImageData(DataConfig(source=str(good), resolution=8))
    tolerant = ImageData(DataConfig(source=str(good), resolution=8, skip_corrupt=True))
    assert len(tolerant) == 3 and len(tolerant.skipped) == 1 and tolerant.skipped[0].endswith("3.png")
    (tmp_path / "empty").mkdir()
    with pytest.raises(DataError, match="no image files"):
        ImageData(DataConfig(source=str(tmp_path / "empty")))
    with pytest.raises(DataError, match="no such directory"):
        ImageData(DataConfig(source=str(tmp_path / "missing")))
    with pytest.raises(DataError, match="caption_column"):
        ImageData(DataConfig(source=str(good), caption_column="text"))


def test_sampling_resumes_without_duplicates(tmp_path):
    from core.sample import sample_pipeline

    overrides = TINY + ["train.steps=2", "train.checkpoint_every=2"]
    run_train(tmp_path / "run", overrides)
    out = tmp_path / "samples"
    first = sample_pipeline(tmp_path / "run" / "pipeline", out, range(4), steps=2)
    stamp = {p: p.stat().st_mtime_ns for p in first}
    os.remove(first[2])
    second = sample_pipeline(tmp_path / "run" / "pipeline", out, range(6), steps=2)
    assert sorted(p.name for p in out.iterdir()) == [f"{i:06d}.png" for i in range(6)]
    assert all(stamp[p] == p.stat().st_mtime_ns for p in first if p != first[2])
    # Regenerated image equals the original (seeded per image, independent of batch composition).
    fresh = sample_pipeline(tmp_path / "run" / "pipeline", tmp_path / "fresh", [2], steps=2)
    assert fresh[0].read_bytes() == second[2].read_bytes()


def test_keys_added_to_the_schema_later_do_not_block_resume(tmp_path):
    import yaml

    from core.config import ConfigError, RunConfig
    from core.train import check_config

    d = RunConfig().to_dict()
    del d["train"]["cond_dropout"]  # a run started before this key existed
    (tmp_path / "config.yaml").write_text(yaml.safe_dump(d))
    check_config(tmp_path, RunConfig(), allow_change=False)
    with pytest.raises(ConfigError, match="train.steps: 3000 -> 5"):
        check_config(tmp_path, RunConfig.from_dict({"train": {"steps": 5}}), allow_change=False)


def test_a_finished_run_may_be_sampled_again_with_another_sampler_but_not_trained_differently(tmp_path):
    """Sampling keys change no training step: re-evaluating a run under DDPM-250 needs no --allow-config-change, while
    any training key beside them is still refused (and named)."""
    import yaml

    from core.config import ConfigError, RunConfig
    from core.train import SAMPLING_KEYS, check_config

    (tmp_path / "config.yaml").write_text(yaml.safe_dump(RunConfig().to_dict()))
    changes = [{"sampler": "ddpm", "sampling_steps": 250, "clip_sample": True, "guidance_scale": 2.0},
               {"eta": 1.0, "sampling_dtype": "bf16"}, {"timestep_spacing": "leading", "steps_offset": 1},
               {"timestep_spacing": "trailing"}, {"sampling_batch": 7}]
    assert {f"diffusion.{k}" for c in changes for k in c} == set(SAMPLING_KEYS)
    for change in changes:
        d = RunConfig().to_dict()
        d["diffusion"].update(change)
        check_config(tmp_path, RunConfig.from_dict(d), allow_change=False)
    d["diffusion"]["beta_schedule"] = "squaredcos_cap_v2"
    with pytest.raises(ConfigError, match="diffusion.beta_schedule") as err:
        check_config(tmp_path, RunConfig.from_dict(d), allow_change=False)
    assert "sampler" not in str(err.value)
