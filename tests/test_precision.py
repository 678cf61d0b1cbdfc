"""Issue 19, paper-scale speed: precision (bf16, TF32, the launcher's flag), DataLoader workers, gradient checkpointing."""

import importlib
import json

import numpy as np
import pytest
import torch
import yaml
from PIL import Image

from core.config import ConfigError, RunConfig, apply_overrides

TINY = ["model.block_out_channels=[8,8]", "model.norm_num_groups=4", "train.batch_size=4", "train.steps=2",
        "train.warmup_steps=1", "train.log_every=1", "train.checkpoint_every=2", "data.num_examples=16",
        "context.hidden_dim=8", "context.latent_dim=4", "context.point_fraction=0.25"]


def tiny(*extra: str) -> RunConfig:
    return RunConfig.from_dict(apply_overrides({"name": "tiny"}, TINY + list(extra)))


def all_presets():
    from experiments.registry import EXPERIMENTS

    for experiment in EXPERIMENTS:
        yield from importlib.import_module(f"experiments.{experiment}").PRESETS


def test_paper_presets_train_bf16_with_tf32_and_mini_presets_fp32():
    presets = list(all_presets())
    paper = [p for p in presets if p.scale == "paper"]
    assert len(paper) >= 10
    for p in presets:
        tc = RunConfig.from_dict(p.config).train
        want = ("bf16", True) if p.scale == "paper" else ("no", False)
        assert (tc.mixed_precision, tc.allow_tf32) == want, p.name


def test_bf16_training_on_cpu_records_what_ran(tmp_path, monkeypatch):
    from core.train import train

    from accelerate.state import AcceleratorState

    monkeypatch.delenv("ACCELERATE_MIXED_PRECISION", raising=False)
    run = tmp_path / "run"
    AcceleratorState._reset_state(True)  # earlier tests in this process fixed accelerate's precision at fp32
    try:
        train(tiny("train.mixed_precision=bf16", "train.allow_tf32=true"), run)
    finally:  # accelerate keeps one precision per process: later tests train in fp32
        AcceleratorState._reset_state(True)
    saved = yaml.safe_load((run / "config.yaml").read_text())["train"]
    env = json.loads((run / "env.json").read_text())
    assert saved["mixed_precision"] == "bf16" and env["mixed_precision"] == "bf16"
    # TF32 and bf16 frozen encoders are CUDA-only: on the CPU nothing else changes.
    assert env["tf32_matmul"] is False and env["frozen_encoders_dtype"] == "float32"
    rows = [json.loads(line) for line in (run / "stats.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows] == [1, 2] and all(np.isfinite(r["loss"]) for r in rows)


def test_launcher_precision_never_silently_contradicts_the_config(tmp_path, monkeypatch):
    from core.train import check_launcher_precision, train

    cfg = tiny("train.mixed_precision=bf16")
    assert check_launcher_precision(cfg, {}) is None
    assert check_launcher_precision(cfg, {"ACCELERATE_MIXED_PRECISION": "bf16"}) == "bf16"
    assert check_launcher_precision(cfg, {"ACCELERATE_MIXED_PRECISION": "no"}) == "no"  # accelerate launch's default
    with pytest.raises(ConfigError, match=r"'fp16'.*train.mixed_precision='bf16'.*--set train.mixed_precision=fp16"):
        check_launcher_precision(cfg, {"ACCELERATE_MIXED_PRECISION": "fp16"})
    # Through the entry point: refused before anything is written.
    monkeypatch.setenv("ACCELERATE_MIXED_PRECISION", "bf16")
    with pytest.raises(ConfigError, match="launch with --mixed_precision no"):
        train(tiny(), tmp_path / "run")
    assert not (tmp_path / "run").exists()


def make_imagefolder(root, n=12, size=8):
    root.mkdir()
    for i in range(n):
        Image.fromarray(np.random.default_rng(i).integers(0, 255, (size, size, 3), dtype=np.uint8)).save(root / f"{i}.png")
    return root


def test_dataloader_workers_give_the_same_batches_and_losses(tmp_path, monkeypatch):
    from core.data import ImageData, MicroBatches, micro_batches
    from core.train import train

    monkeypatch.delenv("ACCELERATE_MIXED_PRECISION", raising=False)
    monkeypatch.setattr(ImageData, "PRELOAD_MAX_PIXELS", 0)  # decode per batch, in the workers
    folder = make_imagefolder(tmp_path / "images")
    data_args = [f"data.source={folder}", "data.resolution=8", "data.channels=3", "data.num_examples=null",
                 "train.batch_size=6", "train.grad_accumulation=2", "train.steps=3", "context.enabled=false"]
    cfg = tiny(*data_args)
    micro = MicroBatches(ImageData(cfg.data), 0, 6, 2, 1, 2)
    inline = list(micro_batches(micro, 1, 3))
    workers = list(micro_batches(micro, 1, 3, num_workers=2))
    assert len(inline) == len(workers) == 4
    assert all(torch.equal(a, b) for a, b in zip(inline, workers))

    losses = {}
    for n in (0, 2):
        train(tiny(*data_args, f"data.num_workers={n}"), tmp_path / f"run{n}")
        losses[n] = [json.loads(line)["loss"] for line in (tmp_path / f"run{n}" / "stats.jsonl").read_text().splitlines()]
    assert len(losses[0]) == 3 and losses[0] == losses[2]


def test_num_workers_must_not_be_negative():
    with pytest.raises(ConfigError, match="data.num_workers"):
        tiny("data.num_workers=-1")


def test_gradient_checkpointing_keeps_loss_and_gradients():
    from core.objective import image_generators, randn_per_image
    from core.train import build_training_module

    def loss_and_grads(checkpointing: bool):
        torch.manual_seed(0)
        cfg = tiny("model.attention=[false,true]", f"model.gradient_checkpointing={str(checkpointing).lower()}")
        module = build_training_module(cfg, 1, 16).train()
        assert module.unet.is_gradient_checkpointing == checkpointing
        x0 = torch.rand(2, 1, 16, 16, generator=torch.Generator().manual_seed(1)) * 2 - 1
        gens = image_generators(0, 0, range(2))
        noise = randn_per_image(gens, x0.shape[1:], "cpu")
        losses = module(x0, noise, torch.tensor([10, 500]), None, gens)
        losses["loss"].backward()
        return losses["loss"].detach(), [p.grad.clone() for p in module.parameters() if p.grad is not None]

    (loss0, grads0), (loss1, grads1) = loss_and_grads(False), loss_and_grads(True)
    assert torch.equal(loss0, loss1) and len(grads0) == len(grads1) > 10
    for a, b in zip(grads0, grads1):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)


def test_frozen_autoencoder_in_bf16_returns_float32_latents(tmp_path):
    from diffusers import AutoencoderKL

    from core.models import Autoencoder

    torch.manual_seed(0)
    AutoencoderKL(in_channels=3, out_channels=3, block_out_channels=(8, 8), norm_num_groups=4, latent_channels=2,
                  down_block_types=("DownEncoderBlock2D",) * 2, up_block_types=("UpDecoderBlock2D",) * 2,
                  ).save_pretrained(tmp_path / "vae")
    x = torch.rand(2, 3, 8, 8, generator=torch.Generator().manual_seed(0)) * 2 - 1
    fp32 = Autoencoder(str(tmp_path / "vae"))
    bf16 = Autoencoder(str(tmp_path / "vae"), dtype=torch.bfloat16)
    assert next(bf16.model.parameters()).dtype == torch.bfloat16
    z32, z16 = fp32.encode(x), bf16.encode(x)
    assert z16.dtype == torch.float32 and z16.shape == z32.shape == (2, 2, 4, 4)
    torch.testing.assert_close(z16, z32, rtol=0.05, atol=0.05)
    assert not torch.equal(z16, z32)  # it did compute in bf16
    assert bf16.decode(z16).dtype == torch.float32
