"""Metrics with named protocols.

Paper scale (standard weights, never downloaded at run time; a missing file stops with its name):
  * FID / KID through clean-fid (``mode="clean"``) with NVIDIA's Inception-v3 torchscript file
    ``inception-2015-12-05.pt``;
  * LPIPS through the ``lpips`` package (AlexNet, v0.1), which needs torchvision's
    ``alexnet-owt-7be5be79.pth``;
  * CLIP score (ViT-L/14, a local transformers folder ``clip-vit-large-patch14``).
Mini scale (offline proxies from :mod:`eval.digits_classifier`, never called FID or LPIPS):
  * ``fd_digits``, ``kid_digits``, ``precision_digits``/``recall_digits`` (k=3), ``confident_digits``
    (share of samples the classifier gives >= 0.9 probability), ``prompt_acc``;
  * ``percep_digits``: LPIPS-style distance in the classifier's three conv feature maps.
  * masked-region ``mse``/``psnr``.
"""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

WEIGHTS_ENV = "CONPREDIFF_WEIGHTS"
INCEPTION_FILE = "inception-2015-12-05.pt"
INCEPTION_URL = "https://nvlabs-fi-cdn.nvidia.com/stylegan2-ada-pytorch/pretrained/metrics/inception-2015-12-05.pt"
ALEXNET_FILE = "alexnet-owt-7be5be79.pth"
ALEXNET_URL = "https://download.pytorch.org/models/alexnet-owt-7be5be79.pth"


class MissingWeightsError(FileNotFoundError):
    """A metric's standard weights are not on this machine; the message says which file and where."""


def weights_dir() -> Path:
    """Where paper-scale metric weights are looked up: ``$CONPREDIFF_WEIGHTS`` or ``~/.cache/conprediff``."""
    return Path(os.environ.get(WEIGHTS_ENV, Path.home() / ".cache" / "conprediff")).expanduser()


def require_file(name: str, url: str, where: Path, what: str) -> Path:
    path = where / name
    if not path.exists():
        raise MissingWeightsError(
            f"{what} needs {name}, not found at {path}. Download it from {url} on a machine with a network "
            f"and put it there (or set ${WEIGHTS_ENV} to the folder holding it). Nothing is substituted."
        )
    return path


# ---------------------------------------------------------------------------- Frechet / KID / PR


def frechet_distance(feats_a: np.ndarray, feats_b: np.ndarray) -> float:
    """Frechet distance between Gaussians fitted to two ``(N, D)`` feature arrays (clean-fid's formula)."""
    from cleanfid.fid import frechet_distance as _fd

    a, b = np.asarray(feats_a, np.float64), np.asarray(feats_b, np.float64)
    return float(_fd(a.mean(0), np.cov(a, rowvar=False), b.mean(0), np.cov(b, rowvar=False)))


def kernel_inception_distance(feats_a: np.ndarray, feats_b: np.ndarray, seed: int = 0, subsets: int = 100,
                              subset_size: int = 1000) -> float:
    """Unbiased KID (cubic polynomial kernel, clean-fid's estimator) with a fixed subset seed."""
    from cleanfid.fid import kernel_distance

    state = np.random.get_state()
    np.random.seed(seed)
    try:
        return float(kernel_distance(np.asarray(feats_a, np.float64), np.asarray(feats_b, np.float64), subsets, subset_size))
    finally:
        np.random.set_state(state)


def precision_recall(fake: np.ndarray, real: np.ndarray, k: int = 3) -> tuple[float, float]:
    """Improved precision/recall (Kynkaanniemi et al. 2019) through torch-fidelity; ``(precision, recall)``."""
    from torch_fidelity.metric_prc import calculate_precision_recall_full

    return calculate_precision_recall_full(torch.as_tensor(fake).double(), torch.as_tensor(real).double(), neighborhood=k)


# ---------------------------------------------------------------------------- digits proxies


@torch.no_grad()
def classifier_outputs(images: torch.Tensor, resolution: int, batch_size: int = 500) -> tuple[np.ndarray, np.ndarray]:
    """``(features (N, 128), probabilities (N, 10))`` of images ``(N, 1, R, R)`` in [-1, 1]."""
    from .digits_classifier import load_classifier

    model = load_classifier(resolution)
    feats, probs = [], []
    for chunk in images.split(batch_size):
        f = model.features(chunk.float())
        feats.append(f.double())
        probs.append(F.softmax(model.head(f), 1).double())
    return torch.cat(feats).numpy(), torch.cat(probs).numpy()


def digits_proxy_metrics(fake: torch.Tensor, real: torch.Tensor, labels: np.ndarray | None = None) -> dict[str, float]:
    """Proxy metrics of generated digits against real ones (same resolution); ``labels`` -> ``prompt_acc``."""
    resolution = fake.shape[-1]
    f_fake, p_fake = classifier_outputs(fake, resolution)
    f_real, _ = classifier_outputs(real, resolution)
    precision, recall = precision_recall(f_fake, f_real)
    out = {
        "fd_digits": frechet_distance(f_fake, f_real),
        "kid_digits": kernel_inception_distance(f_fake, f_real),
        "precision_digits": precision,
        "recall_digits": recall,
        "confident_digits": float((p_fake.max(1) >= 0.9).mean()),
    }
    if labels is not None:
        out["prompt_acc"] = float((p_fake.argmax(1) == np.asarray(labels)).mean())
    return out


@torch.no_grad()
def perceptual_distance_digits(a: torch.Tensor, b: torch.Tensor) -> np.ndarray:
    """LPIPS-style distance in the digits classifier's conv maps (unit-normalised channels, equal layer weights).

    A proxy for LPIPS at mini scale; ``(N,)`` per image pair.
    """
    from .digits_classifier import load_classifier

    model = load_classifier(a.shape[-1])
    convs = [i for i, m in enumerate(model.body) if isinstance(m, torch.nn.ReLU)][:3]
    total = torch.zeros(a.shape[0], dtype=torch.float64)
    xa, xb = a.float(), b.float()
    for i, layer in enumerate(model.body[: convs[-1] + 1]):
        xa, xb = layer(xa), layer(xb)
        if i in convs:
            na = xa / (xa.pow(2).sum(1, keepdim=True).sqrt() + 1e-10)
            nb = xb / (xb.pow(2).sum(1, keepdim=True).sqrt() + 1e-10)
            total += (na - nb).pow(2).sum(1).mean((1, 2)).double()
    return total.numpy()


def masked_mse(pred: torch.Tensor, target: torch.Tensor, region: torch.Tensor) -> np.ndarray:
    """Mean squared error (images in [-1, 1]) over ``region`` (1 = evaluated pixel), ``(N,)``."""
    region = region.expand_as(pred).double()
    return ((pred.double() - target.double()).pow(2) * region).sum((1, 2, 3)).div(region.sum((1, 2, 3)).clamp(min=1)).numpy()


def psnr(mse: np.ndarray, peak_to_peak: float = 2.0) -> np.ndarray:
    return 10 * np.log10(peak_to_peak**2 / np.maximum(mse, 1e-12))


# ---------------------------------------------------------------------------- paper scale


def clean_fid_feature_extractor(device: str = "cuda"):
    """clean-fid's Inception feature function, loaded from the local weights file (no download)."""
    from cleanfid.inception_torchscript import InceptionV3W

    path = require_file(INCEPTION_FILE, INCEPTION_URL, weights_dir(), "FID (clean-fid)")
    model = InceptionV3W(str(path.parent), download=False).to(device).eval()
    return lambda x: model(x)


def fid_folders(fake_dir: str | Path, ref_stats: str | Path, device: str = "cuda", batch_size: int = 64) -> float:
    """FID of a folder of PNGs against reference statistics (``.npz`` with mu, sigma) built by ``eval.fid_ref``."""
    from cleanfid import fid

    extractor = clean_fid_feature_extractor(device)
    feats = fid.get_folder_features(str(fake_dir), extractor, num_workers=0, batch_size=batch_size,
                                    device=torch.device(device), mode="clean", description="FID features ")
    ref = np.load(ref_stats)
    from cleanfid.fid import frechet_distance as _fd

    return float(_fd(feats.mean(0), np.cov(feats, rowvar=False), ref["mu"], ref["sigma"]))


def lpips_alex(device: str = "cpu"):
    """The ``lpips`` package's AlexNet v0.1 metric; stops if torchvision's AlexNet weights are absent."""
    hub = Path(torch.hub.get_dir()) / "checkpoints"
    require_file(ALEXNET_FILE, ALEXNET_URL, hub, "LPIPS (AlexNet, v0.1)")
    import lpips

    return lpips.LPIPS(net="alex", version="0.1", verbose=False).to(device).eval()


CLIP_DIR = "clip-vit-large-patch14"
CLIP_URL = "https://huggingface.co/openai/clip-vit-large-patch14"


@torch.no_grad()
def clip_score(images: torch.Tensor, prompts: list[str], device: str = "cpu", batch_size: int = 64) -> float:
    """Mean CLIP score, 100 * max(cos(image, text), 0) (torchmetrics' definition), with ViT-L/14.

    ``images (N, 3, H, W)`` in [-1, 1]. The transformers folder ``clip-vit-large-patch14`` must be in
    :func:`weights_dir` (its ``config.json`` is checked); nothing is downloaded.
    """
    folder = weights_dir() / CLIP_DIR
    require_file("config.json", CLIP_URL, folder, f"CLIP score (the transformers folder {CLIP_DIR})")
    from transformers import CLIPModel, CLIPProcessor

    model = CLIPModel.from_pretrained(folder).to(device).eval()
    processor = CLIPProcessor.from_pretrained(folder)
    scores = []
    for i in range(0, len(images), batch_size):
        pixels = ((images[i : i + batch_size].clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8)
        inputs = processor(text=prompts[i : i + batch_size], images=list(pixels), return_tensors="pt", padding=True,
                           truncation=True).to(device)
        img = F.normalize(model.get_image_features(pixel_values=inputs["pixel_values"]), dim=-1)
        txt = F.normalize(model.get_text_features(input_ids=inputs["input_ids"], attention_mask=inputs["attention_mask"]), dim=-1)
        scores.append((100 * (img * txt).sum(-1)).clamp(min=0))
    return float(torch.cat(scores).mean())
