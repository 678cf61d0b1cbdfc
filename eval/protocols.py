"""Paper-scale evaluation protocols: which metrics a table's row records, from which inputs, with which library.

Unconditional generation (paper Table 1; also the FID of text-to-image samples), for a folder of N generated PNGs:

================================  ==============================================================================
metric                            protocol
================================  ==============================================================================
``fid{N}_cleanfid``               clean-fid ``mode="clean"`` (PIL bicubic resize, NVIDIA's Inception torchscript
                                  ``inception-2015-12-05.pt``) against the benchmark's reference statistics
                                  ``data/fid_refs/<benchmark>.npz`` (``python -m eval.fid_ref``).
``fid{N}_torchfidelity``          torch-fidelity's ``inception-v3-compat`` extractor (the TF FID graph's weights
                                  ``weights-inception-2015-12-05-6726825d.pth`` and its resize): the legacy path
                                  of LDM-era numbers (LDM, Rombach et al. 2022, App. E.3.1: "For calculating FID
                                  scores we use the torch-fidelity package"), against the reference image folder.
``precision_k3_torchfidelity``    improved precision / recall (Kynkaanniemi et al. 2019) with k = 3 nearest
``recall_k3_torchfidelity``       neighbours, torch-fidelity's ``prc`` on the same 2048-d Inception pool features
                                  and images as its FID. LDM reports these beside FID (0.72/0.49, 0.73/0.50);
                                  Inception pool3 with k = 3 is the setting of ADM's evaluation suite, which LDM
                                  also ran. torch-fidelity's own default for ``prc`` is VGG-16 (the original
                                  paper's); it is not used here.
================================  ==============================================================================

``{N}`` is the sample count as the field writes it: ``50k`` for 50,000 (``fid50k_cleanfid``), else the exact
count (``fid2500_cleanfid``). The reference image folder of a benchmark is the folder its clean-fid statistics
are built from (:data:`REFERENCE_DATA`, else the training data folder, e.g. ``data/celebahq256``: LDM computes
its statistics on the whole training set). ``eval/paper_numbers.csv``'s ``our_metric`` column names which of
these metrics shares a line with each paper number (the LDM-4 rows: the torch-fidelity ones).

Each metric is recorded only when its inputs are present. A missing input (weights, statistics, reference
images) is named with the command or download that provides it: as a warning when other metrics were recorded,
as :class:`MissingInputsError` when none could be; nothing is substituted. A metric already recorded for the same
run, checkpoint, sampler and sample count is never measured again.
"""

from __future__ import annotations

import hashlib
import warnings
from importlib.metadata import version
from pathlib import Path

import torch

from core.runlog import staged

from . import metrics
from .records import ROOT, append_record, load_records, recorded

CLEANFID, TORCHFIDELITY = "cleanfid", "torchfidelity"
PR_NEIGHBORHOOD = 3
# torch-fidelity's legacy (TF FID graph) Inception; a test swaps in a stub extractor registered under another name.
TF_FEATURE_EXTRACTOR = "inception-v3-compat"
# The images torch-fidelity reads (its default ``samples_find_ext``), found recursively.
TF_IMAGE_EXT = (".png", ".jpg", ".jpeg")
# FID reference image folder of each benchmark whose reference is not its training data.
REFERENCE_DATA = {"coco256-zeroshot": "data/coco2014val256_30k", "coco256-cocotrain": "data/coco2014val256_30k"}


class MissingInputsError(FileNotFoundError):
    """No metric of a protocol could be measured; the message lists each missing input and its fix."""


def count_tag(n: int) -> str:
    """``50000`` -> ``"50k"``, ``2500`` -> ``"2500"``: the sample count in a metric's name."""
    return f"{n // 1000}k" if n >= 1000 and n % 1000 == 0 else str(n)


def fid_metric(n: int, backend: str) -> str:
    """``fid50k_cleanfid``, ``fid30k_torchfidelity``, ...: FID of ``n`` samples through ``backend``."""
    return f"fid{count_tag(n)}_{backend}"


def pr_metrics(backend: str = TORCHFIDELITY, k: int = PR_NEIGHBORHOOD) -> tuple[str, str]:
    """``("precision_k3_torchfidelity", "recall_k3_torchfidelity")``."""
    return f"precision_k{k}_{backend}", f"recall_k{k}_{backend}"


def unconditional_metrics(n: int) -> dict[str, tuple[str, ...]]:
    """Every metric the unconditional protocol records for ``n`` samples, by backend."""
    return {CLEANFID: (fid_metric(n, CLEANFID),), TORCHFIDELITY: (fid_metric(n, TORCHFIDELITY), *pr_metrics())}


def reference_images(benchmark: str, data_source: str) -> Path:
    """The image folder a benchmark's samples are compared with (:data:`REFERENCE_DATA`, else its training data)."""
    return Path(REFERENCE_DATA.get(benchmark, data_source)).expanduser()


def image_listing(folder: Path) -> list[Path]:
    """The images torch-fidelity reads from ``folder`` (recursively, linked folders not followed, as its os.walk;
    sorted)."""
    return sorted(p for p in folder.rglob("*") if p.suffix.lower() in TF_IMAGE_EXT) if folder.is_dir() else []


def listing_hash(folder: Path, files: list[Path]) -> str:
    """SHA-256 of the sorted relative paths and byte sizes of ``files``: names a reference set (and its feature
    cache) without reading every image; adding, removing, renaming or rewriting one at another size changes it."""
    h = hashlib.sha256()
    for f in files:
        h.update(f"{f.relative_to(folder)}\t{f.stat().st_size}\n".encode())
    return h.hexdigest()


# ---------------------------------------------------------------------------- what is missing


def cleanfid_problem(benchmark: str, ref_images: Path | str = "<the benchmark's image folder>") -> str | None:
    """Why ``fid*_cleanfid`` cannot be measured now (Inception file, reference statistics), or ``None``."""
    from .fid_ref import reference_path

    out = []
    problem = metrics.inception_problem()
    if problem:
        out.append(problem)
    ref = reference_path(benchmark)
    if not ref.exists():
        out.append(f"FID reference statistics {ref} are missing: build them with "
                   f"`python -m eval.fid_ref --data {ref_images} --name {benchmark}`")
    return "; ".join(out) or None


def torchfidelity_problem(ref: Path, feature_extractor: str = TF_FEATURE_EXTRACTOR) -> str | None:
    """Why the torch-fidelity metrics cannot be measured now (Inception weights, reference images, some of them out of
    its reach), or ``None``."""
    from core.data import image_files

    out = []
    if feature_extractor == TF_FEATURE_EXTRACTOR:
        problem = metrics.torchfidelity_inception_problem()
        if problem:
            out.append(problem)
    listed = image_listing(ref)
    if not listed:
        out.append(f"torch-fidelity FID and precision/recall read the reference images themselves (not statistics), "
                   f"and {ref} holds no .png/.jpg images: prepare it (`python -m experiments.data --help`; "
                   "`python -m experiments.<experiment> --scale paper --check` names the command)")
    elif unread := len(set(image_files(ref, TF_IMAGE_EXT)) - set(listed)):  # training reads them, the metric would not
        out.append(f"{ref} holds {unread} .png/.jpg images in linked folders, which torch-fidelity does not follow "
                   "(os.walk): copy them into the folder so that the reference is the whole set")
    return "; ".join(out) or None


# ---------------------------------------------------------------------------- measuring


def cleanfid_fid(samples: Path, benchmark: str, device: str) -> tuple[float, str, str]:
    """``(FID, reference, backend)`` of a folder of PNGs through clean-fid against ``benchmark``'s statistics."""
    from .fid_ref import reference_path

    ref = reference_path(benchmark)
    value = metrics.fid_folders(samples, ref, device)
    return (value, f"{ref.name} (sha {hashlib.sha256(ref.read_bytes()).hexdigest()[:16]})",
            f"clean-fid {version('clean-fid')} mode=clean, "
            f"{metrics.weights_identity(metrics.weights_dir() / metrics.INCEPTION_FILE)}")


def torchfidelity_fid_pr(samples: Path, ref: Path, device: str, k: int = PR_NEIGHBORHOOD,
                         feature_extractor: str = TF_FEATURE_EXTRACTOR, batch_size: int = 64,
                         cache_name: str | None = None) -> dict[str, float]:
    """FID and improved precision/recall (k nearest neighbours) of a folder of PNGs against a reference image
    folder, in one torch-fidelity pass (both metrics from the same features).

    Returns ``{"fid", "precision", "recall"}``. ``cache_name`` caches the reference's features in torch-fidelity's
    cache (``$TORCH_HOME/fidelity_cache``); precision/recall run in torch-fidelity's batched mode
    (``save_cpu_ram``: 50k x 50k distances never held at once; same values as the full matrix).
    """
    import torch_fidelity

    cache = {"input2_cache_name": cache_name} if cache_name else {}
    out = torch_fidelity.calculate_metrics(
        input1=str(samples), input2=str(ref), fid=True, prc=True, prc_neighborhood=k,
        feature_extractor=feature_extractor, cuda=str(device).startswith("cuda"), batch_size=batch_size,
        samples_find_deep=True, save_cpu_ram=True, verbose=False, **cache)
    return {"fid": float(out["frechet_inception_distance"]), "precision": float(out["precision"]),
            "recall": float(out["recall"])}


@staged("metrics")
def record_unconditional(key: dict, benchmark: str, method: str, samples: Path, records_path: Path,
                         data_source: str, device: str | None = None,
                         feature_extractor: str = TF_FEATURE_EXTRACTOR) -> list[dict]:
    """Measure and append every metric of the unconditional protocol (module docstring) not yet recorded.

    ``key``: the run's record identity (experiment, preset, seed, checkpoint, n_samples, scale, sampler);
    ``samples``: the folder of its PNGs; ``data_source``: the run's ``data.source`` (the reference images unless
    :data:`REFERENCE_DATA` names others). Returns the records written. A backend whose inputs are missing is
    skipped with a warning naming them and their fix; if no metric could be recorded, raises
    :class:`MissingInputsError` (the samples stay; re-running after providing the inputs measures them).
    """
    device = device or ("cuda" if torch.cuda.is_available() else "cpu")
    n = key["n_samples"]
    existing = load_records(records_path) if Path(records_path).exists() else []
    todo = {backend: [m for m in names if not recorded(existing, metric=m, **key)]
            for backend, names in unconditional_metrics(n).items()}
    values, notes = [], []  # values: (metric, value, reference, backend)
    # clean-fid against the benchmark's statistics
    ref = reference_images(benchmark, data_source)
    if todo[CLEANFID]:
        problem = cleanfid_problem(benchmark, ref)
        if problem:
            notes.append(f"{', '.join(todo[CLEANFID])} not measured: {problem}")
        else:
            value, reference, backend = cleanfid_fid(samples, benchmark, device)
            values.append((todo[CLEANFID][0], value, reference, backend))
    # torch-fidelity FID and precision/recall against the reference images
    if todo[TORCHFIDELITY]:
        problem = torchfidelity_problem(ref, feature_extractor)
        if problem:
            notes.append(f"{', '.join(todo[TORCHFIDELITY])} not measured: {problem}")
        else:
            files = image_listing(ref)
            digest = listing_hash(ref, files)
            out = torchfidelity_fid_pr(samples, ref, device, feature_extractor=feature_extractor,
                                       cache_name=f"conprediff-{benchmark.replace('/', '_')}-{digest[:16]}")
            shown = ref.resolve().relative_to(ROOT) if ref.resolve().is_relative_to(ROOT) else ref
            reference = f"{shown} ({len(files)} images, listing sha {digest[:16]})"
            inception = feature_extractor == TF_FEATURE_EXTRACTOR
            tf_file = Path(torch.hub.get_dir()) / "checkpoints" / metrics.TF_INCEPTION_FILE
            weights = f" ({metrics.weights_identity(tf_file)}, 2048-d pool)" if inception else ""
            backend = f"torch-fidelity {version('torch-fidelity')} {feature_extractor}{weights}"
            fid_name, precision_name, recall_name = unconditional_metrics(n)[TORCHFIDELITY]
            for metric, value, extra in ((fid_name, out["fid"], ""),
                                         (precision_name, out["precision"], f", prc k={PR_NEIGHBORHOOD}"),
                                         (recall_name, out["recall"], f", prc k={PR_NEIGHBORHOOD}")):
                if metric in todo[TORCHFIDELITY]:
                    values.append((metric, value, reference, backend + extra))
    if notes and not values and not metrics.missing_metrics_allowed():
        raise MissingInputsError("no paper-scale metric could be measured for "
                                 f"{samples}:\n- " + "\n- ".join(notes))
    for note in notes:
        warnings.warn(note, stacklevel=2)
        print(f"warning: {note}", flush=True)
    written = []
    for metric, value, reference, backend in values:
        rec = dict(key, benchmark=benchmark, method=method, metric=metric, value=float(value), ema=True,
                   reference=reference, backend=backend)
        if append_record(rec, records_path):
            written.append(rec)
    return written

