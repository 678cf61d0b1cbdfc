"""The mini latent backbone's autoencoder: a small diffusers AutoencoderKL trained on the digits by this repo.

    python -m experiments.backbones.autoencoder          # -> runs/mini-digits16-autoencoder/ (~3 min, 2 CPU cores)

16x16x1 digits -> 8x8x2 latents (f = 2), reconstruction MSE + 1e-6 KL, seeded. The latent scaling
factor (1 / std of the training latents) is written into its config, as diffusers' LDMs do.
The held-out reconstruction MSE is written to ``metrics.json`` beside the weights.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import torch
import torch.nn.functional as F

from core.config import DataConfig
from core.data import ImageData
from eval.records import ROOT

AUTOENCODER = ROOT / "runs" / "mini-digits16-autoencoder"


def build(latent_channels: int = 2):
    from diffusers import AutoencoderKL

    return AutoencoderKL(
        in_channels=1, out_channels=1, down_block_types=("DownEncoderBlock2D",) * 2,
        up_block_types=("UpDecoderBlock2D",) * 2, block_out_channels=(32, 64), layers_per_block=1,
        latent_channels=latent_channels, norm_num_groups=8, sample_size=16,
    )


def train_autoencoder(out: Path = AUTOENCODER, steps: int = 1500, seed: int = 0, batch: int = 64) -> Path:
    if (out / "config.json").exists():
        return out
    torch.manual_seed(seed)
    train, test = ImageData(DataConfig(split="train")), ImageData(DataConfig(split="test"))
    x, xt = train.images(range(len(train))), test.images(range(len(test)))
    model = build()
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
    g = torch.Generator().manual_seed(seed)
    for step in range(steps):
        xb = x[torch.randint(0, len(x), (batch,), generator=g)]
        post = model.encode(xb).latent_dist
        loss = F.mse_loss(model.decode(post.sample(generator=g)).sample, xb) + 1e-6 * post.kl().mean()
        opt.zero_grad()
        loss.backward()
        opt.step()
        if step % 250 == 0:
            print(f"step {step}: loss {loss.item():.4f}", flush=True)
    model.eval()
    with torch.no_grad():
        latents = model.encode(x).latent_dist.mean
        scale = float(1 / latents.std())
        mse = F.mse_loss(model.decode(model.encode(xt).latent_dist.mean).sample.clamp(-1, 1), xt).item()
    model.register_to_config(scaling_factor=scale)
    tmp = out.with_name(out.name + ".tmp")
    model.save_pretrained(tmp)
    (tmp / "metrics.json").write_text(json.dumps({"test_reconstruction_mse": mse, "scaling_factor": scale, "steps": steps}))
    tmp.rename(out)
    print(f"held-out reconstruction MSE {mse:.4f} (pixels in [-1, 1]); wrote {out}")
    return out


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", type=Path, default=AUTOENCODER)
    parser.add_argument("--steps", type=int, default=1500)
    args = parser.parse_args(argv)
    torch.set_num_threads(2)
    train_autoencoder(args.out, args.steps)


if __name__ == "__main__":
    main()
