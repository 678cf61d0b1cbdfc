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

VQ_F4 = dict(  # CompVis/ldm-celebahq-256, subfolder vqvae: 256 px -> 64 x 64 x 3
    in_channels=3, out_channels=3, down_block_types=("DownEncoderBlock2D",) * 3,
    up_block_types=("UpDecoderBlock2D",) * 3, block_out_channels=(128, 256, 512), layers_per_block=2,
    latent_channels=3, num_vq_embeddings=8192, sample_size=256)
KL_F8 = dict(  # CompVis/ldm-text2im-large-256, subfolder vqvae: 256 px -> 32 x 32 x 4
    in_channels=3, out_channels=3, down_block_types=("DownEncoderBlock2D",) * 4,
    up_block_types=("UpDecoderBlock2D",) * 4, block_out_channels=(128, 256, 512, 512), layers_per_block=2,
    latent_channels=4, sample_size=256)
TINY_AUTOENCODER = dict(down_block_types=("DownEncoderBlock2D",) * 2, up_block_types=("UpDecoderBlock2D",) * 2,
                        block_out_channels=(8, 16), layers_per_block=1, norm_num_groups=4)


def make_fake_imagefolder(path: Path, channels: int, n: int = 16, n_test: int | None = None, size: int = 24) -> Path:
    """``path/{train,test}/``: ``n`` (``n_test``, default ``n``) random ``size`` px PNGs per split with
    ``metadata.jsonl`` captions, as the prepare step writes them (smoke runs, the rehearsal's stand-ins; measures
    nothing). A split that already holds its metadata and enough images is kept."""
    from PIL import Image

    rng = np.random.default_rng(0)
    for split, count in (("train", n), ("test", n if n_test is None else n_test)):
        if (path / split / "metadata.jsonl").exists() and len(list((path / split).glob("*.png"))) >= count:
            continue
        (path / split).mkdir(parents=True, exist_ok=True)
        lines = []
        for i in range(count):
            arr = rng.integers(0, 256, (size, size, 3) if channels == 3 else (size, size), dtype=np.uint8)
            Image.fromarray(arr).save(path / split / f"{i:05d}.png")
            lines.append(json.dumps({"file_name": f"{i:05d}.png", "caption": f"random {split} image {i}"}))
        (path / split / "metadata.jsonl").write_text("\n".join(lines) + "\n")
    return path


def make_random_autoencoder(path: Path, channels: int = 3, kind: str = "kl-f8", released: bool = False) -> Path:
    """A randomly initialised autoencoder saved with ``save_pretrained`` (measures nothing): ``kind`` "kl-f8"
    (``AutoencoderKL``) or "vq-f4" (``VQModel``); ``released``: the released architecture (:data:`KL_F8`,
    :data:`VQ_F4`, 3 channels), else two small blocks (:data:`TINY_AUTOENCODER`) with the same latent channels and
    ``channels`` image channels. Kept when ``path`` already holds one."""
    from diffusers import AutoencoderKL, VQModel

    if kind not in ("kl-f8", "vq-f4"):
        raise ValueError(f"kind={kind!r}: 'kl-f8' or 'vq-f4'")
    if not (path / "config.json").exists():
        config = dict(VQ_F4 if kind == "vq-f4" else KL_F8)
        if not released:
            config.update(TINY_AUTOENCODER, in_channels=channels, out_channels=channels, sample_size=32)
            if kind == "vq-f4":
                config["num_vq_embeddings"] = 16
        torch.manual_seed(0)
        (VQModel if kind == "vq-f4" else AutoencoderKL)(**config).save_pretrained(path)
    return path
