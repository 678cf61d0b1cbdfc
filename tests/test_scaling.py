"""The scaling experiment: continued runs equal straight ones; the trend test against a hand computation."""

import math

import numpy as np
import pytest
import torch
from safetensors.torch import load_file

from core.config import RunConfig, apply_overrides
from tests.conftest import TINY


def cfg(steps: int) -> RunConfig:
    return RunConfig.from_dict(apply_overrides({"name": "run"}, TINY + [
        f"train.steps={steps}", "train.checkpoint_every=2", "context.enabled=true", "diffusion.sampling_steps=2"]))


def weights(run_dir):
    return load_file(run_dir / "pipeline" / "unet" / "diffusion_pytorch_model.safetensors")


def test_a_continued_run_is_the_run_trained_straight(tmp_path):
    """The 5,000- and 12,500-step cells continue shorter runs: the same weights as training straight there."""
    from core.runlog import read_jsonl
    from core.train import train
    from experiments.common import continue_from

    straight, short, longer = tmp_path / "straight", tmp_path / "short", tmp_path / "longer"
    train(cfg(6), straight)
    train(cfg(4), short)
    continue_from(short, longer, 4)
    train(cfg(6), longer)
    a, b = weights(straight), weights(longer)
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    assert [r["step"] for r in read_jsonl(longer / "stats.jsonl")] == list(range(1, 7))
    assert [r["loss"] for r in read_jsonl(longer / "stats.jsonl")] == [r["loss"] for r in read_jsonl(straight / "stats.jsonl")]
    with pytest.raises(FileNotFoundError, match="no complete checkpoint at step 3"):
        continue_from(short, tmp_path / "other", 3)


def test_scaling_presets_differ_only_where_named():
    from core.train import training_config
    from experiments.scaling import PRESETS, preset_name
    from experiments.unconditional import PRESETS as UNCONDITIONAL

    mini = {p.name: p for p in UNCONDITIONAL}["mini-digits16-conprediff"].run_config(0)
    by_name = {p.name: p for p in PRESETS}
    grid = by_name[preset_name(32, 2000, "conprediff")].run_config(0)
    diff = {k for k, v in training_config(grid).items() if training_config(mini).get(k) != v}
    assert diff == set(), diff  # the mini-width 2,000-step cell trains the unconditional mini row's model
    assert grid.diffusion.sampler == "ddpm" and grid.diffusion.sampling_steps == 250 and not grid.diffusion.clip_sample
    assert by_name[preset_name(32, 12500, "baseline")].continues == preset_name(32, 5000, "baseline")
    assert by_name[preset_name(64, 2000, "baseline")].run_config(0).model.block_out_channels == (64, 128, 128)
    assert len(PRESETS) == 10
