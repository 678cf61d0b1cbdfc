"""The offline feature network for mini-scale proxy metrics: a small CNN trained on the embedded digits.

    python -m eval.digits_classifier --resolution 16     # trains (seeded), writes eval/weights/digits_r16.pt

Its 128-d penultimate features define ``fd_digits`` (Frechet distance), ``kid_digits`` and
k-NN precision/recall; its predictions define ``prompt_acc`` and the confidence check of
unconditional samples. These are proxies: never FID, never LPIPS. Trained on the train split
(4,500 images) only; accuracy is measured on the 500 held-out test images.
"""

from __future__ import annotations

import argparse
import functools
import hashlib
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

WEIGHTS_DIR = Path(__file__).resolve().parent / "weights"
FEATURE_DIM = 128


class DigitsClassifier(nn.Module):
    """``(B, 1, R, R)`` in [-1, 1] -> logits ``(B, 10)``; ``features`` gives the 128-d penultimate layer."""

    def __init__(self):
        super().__init__()
        self.body = nn.Sequential(
            nn.Conv2d(1, 32, 3, padding=1), nn.BatchNorm2d(32), nn.ReLU(),
            nn.Conv2d(32, 64, 3, stride=2, padding=1), nn.BatchNorm2d(64), nn.ReLU(),
            nn.Conv2d(64, 128, 3, stride=2, padding=1), nn.BatchNorm2d(128), nn.ReLU(),
            nn.AdaptiveAvgPool2d(1), nn.Flatten(),
            nn.Linear(128, FEATURE_DIM), nn.ReLU(),
        )
        self.head = nn.Linear(FEATURE_DIM, 10)

    def features(self, x: torch.Tensor) -> torch.Tensor:
        return self.body(x)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.body(x))


def weights_path(resolution: int) -> Path:
    return WEIGHTS_DIR / f"digits_r{resolution}.pt"


@functools.lru_cache(maxsize=4)
def load_classifier(resolution: int) -> DigitsClassifier:
    """The committed classifier for ``resolution``, loaded once per process (eval mode, not to be trained)."""
    path = weights_path(resolution)
    if not path.exists():
        raise FileNotFoundError(
            f"{path} is missing: train it with `python -m eval.digits_classifier --resolution {resolution}` (~1 min on 2 CPU cores)"
        )
    model = DigitsClassifier()
    model.load_state_dict(torch.load(path, map_location="cpu", weights_only=True))
    return model.eval()


def file_sha256(path: Path) -> str:
    return hashlib.sha256(Path(path).read_bytes()).hexdigest()


@torch.no_grad()
def evaluate(model: DigitsClassifier, x: torch.Tensor, y: torch.Tensor) -> float:
    return (model(x).argmax(1) == y).float().mean().item()


def train_classifier(resolution: int, epochs: int = 30, seed: int = 0) -> tuple[DigitsClassifier, float]:
    from core.config import DataConfig
    from core.data import ImageData

    torch.manual_seed(seed)
    # 28 px digits: resolutions above 28 (the 32x32 mini-gpu scale) are bicubic upscales, as in training.
    train = ImageData(DataConfig(resolution=resolution, split="train", allow_upscale=True))
    test = ImageData(DataConfig(resolution=resolution, split="test", allow_upscale=True))
    x, y = train.images(range(len(train))), torch.tensor(train.labels)
    xt, yt = test.images(range(len(test))), torch.tensor(test.labels)
    model = DigitsClassifier()
    opt = torch.optim.AdamW(model.parameters(), lr=3e-3, weight_decay=1e-4)
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=3e-3, total_steps=epochs * (len(x) // 128 + 1))
    g = torch.Generator().manual_seed(seed)
    pad = max(1, resolution // 8)
    for epoch in range(epochs):
        model.train()
        for idx in torch.randperm(len(x), generator=g).split(128):
            # Random translations by up to `pad` pixels.
            xb = F.pad(x[idx], (pad,) * 4, value=-1)
            dy, dx = torch.randint(0, 2 * pad + 1, (2,), generator=g).tolist()
            xb = xb[..., dy : dy + resolution, dx : dx + resolution]
            loss = F.cross_entropy(model(xb), y[idx])
            opt.zero_grad()
            loss.backward()
            opt.step()
            sched.step()
        model.eval()
        print(f"epoch {epoch + 1}: loss {loss.item():.4f}, test accuracy {evaluate(model, xt, yt):.4f}")
    return model, evaluate(model, xt, yt)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--resolution", type=int, default=16)
    parser.add_argument("--epochs", type=int, default=30)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    torch.set_num_threads(2)
    model, acc = train_classifier(args.resolution, args.epochs, args.seed)
    WEIGHTS_DIR.mkdir(exist_ok=True)
    path = weights_path(args.resolution)
    torch.save(model.state_dict(), path)
    print(f"test accuracy {acc:.4f} on the 500 held-out digits; wrote {path} (sha256 {file_sha256(path)[:16]})")


if __name__ == "__main__":
    main()
