"""Smoke scale: every preset shrunk to seconds, with generated stand-ins for the paper presets' data and weights.

Proves the code path runs; measures nothing (:func:`smoke_config`; records go to ``<runs>/smoke-records.jsonl``).
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
import torch

from core.config import RunConfig, apply_overrides

if TYPE_CHECKING:
    from .presets import Preset


SMOKE = [
    "model.block_out_channels=[16,32]", "model.norm_num_groups=8", "model.layers_per_block=1", "model.attention=[]", "model.mid_attention=false",
    "train.steps=3", "train.batch_size=4", "train.checkpoint_every=2", "train.log_every=1", "train.warmup_steps=1",
    "context.hidden_dim=8", "context.latent_dim=4", "diffusion.sampling_steps=2", "data.num_examples=16",
    # fp32 for every preset: smoke runs all presets in one process, and accelerate fixes the precision of a
    # process at its first Accelerator (the paper presets' bf16 path has its own test, tests/test_precision.py)
    "train.mixed_precision=no", "train.allow_tf32=false", "data.num_workers=0",
]

def smoke_config(preset: Preset, seed: int, workdir: Path, overrides: list[str] = ()) -> RunConfig:
    """The preset shrunk to seconds; paper presets get generated stand-ins for data and weights. ``overrides`` (the
    user's ``--set``) apply last, so they win over the shrinking."""
    d = preset.run_config(seed).to_dict()
    over = list(SMOKE)
    if preset.scale == "paper":
        over += [f"data.source={make_fake_imagefolder(workdir / 'fake-data', d['data']['channels'])}", "data.resolution=16"]
    if d["backbone"] == "latent":
        channels = d['data']['channels']
        over += [f"model.vae={make_random_autoencoder(workdir / f'random-vae-c{channels}', channels)}",
                 "model.vae_revision=null", "model.vae_subfolder=null"]
    if d["backbone"] == "discrete":
        over += ["diffusion.num_train_timesteps=4", "diffusion.sampling_steps=4"]
    if d["model"].get("cross_attention_dim"):
        over += ["model.attention=[false,true]", "model.text_encoder=minilm", "model.text_encoder_revision=null",
                 "model.cross_attention_dim=384"]
    return RunConfig.from_dict(apply_overrides(d, over + list(overrides)))

def make_fake_imagefolder(path: Path, channels: int, n: int = 16) -> Path:
    """A tiny imagefolder of random PNGs with captions, ``train/`` and a held-out ``test/`` split as the prepare
    step writes them (smoke tests only)."""
    from PIL import Image

    rng = np.random.default_rng(0)
    for split in ("train", "test"):
        if (path / split / "metadata.jsonl").exists():
            continue
        (path / split).mkdir(parents=True, exist_ok=True)
        lines = []
        for i in range(n):
            arr = rng.integers(0, 256, (24, 24, 3) if channels == 3 else (24, 24), dtype=np.uint8)
            Image.fromarray(arr).save(path / split / f"{i:03d}.png")
            lines.append(json.dumps({"file_name": f"{i:03d}.png", "caption": f"random {split} image {i}"}))
        (path / split / "metadata.jsonl").write_text("\n".join(lines) + "\n")
    return path

def make_random_autoencoder(path: Path, channels: int) -> Path:
    """A randomly initialised tiny AutoencoderKL (smoke tests only; measures nothing)."""
    from diffusers import AutoencoderKL

    if not (path / "config.json").exists():
        torch.manual_seed(0)
        AutoencoderKL(
            in_channels=channels, out_channels=channels, down_block_types=("DownEncoderBlock2D",) * 2,
            up_block_types=("UpDecoderBlock2D",) * 2, block_out_channels=(8, 16), latent_channels=4, norm_num_groups=4,
        ).save_pretrained(path)
    return path
