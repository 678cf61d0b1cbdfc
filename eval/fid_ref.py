"""Build FID reference statistics (Inception pool3 mean and covariance) of a prepared image folder.

    python -m eval.fid_ref --data data/celebahq256 --name celebahq256
    # -> data/fid_refs/celebahq256.npz  (mu, sigma, n, and the hash of the sorted file list)

Uses clean-fid (``mode="clean"``) with ``inception-2015-12-05.pt`` from ``$CONPREDIFF_WEIGHTS`` (default
``~/.cache/conprediff``, downloaded there when missing and the network allows); offline it stops with the
file's name and URL.

clean-fid's precomputed statistics can stand in for a folder (same protocol, computed by clean-fid's authors),
e.g. FFHQ 256 over all 70,000 images:

    python -m eval.fid_ref --cleanfid ffhq --cleanfid-split trainval70k --name ffhq256
"""

from __future__ import annotations

import argparse
import hashlib
from pathlib import Path

import numpy as np
import torch

from .metrics import clean_fid_feature_extractor
from .records import ROOT

REF_DIR = ROOT / "data" / "fid_refs"


def reference_path(name: str) -> Path:
    return REF_DIR / f"{name.replace('/', '_')}.npz"


def build_reference(data: Path, name: str, device: str, batch_size: int = 64) -> Path:
    from cleanfid import fid

    from core.data import image_files

    files = sorted(image_files(Path(data), (".png", ".jpg", ".jpeg"))) if Path(data).is_dir() else []
    if not files:
        raise FileNotFoundError(f"{data}: no images; prepare the dataset first (the README's \"Paper scale\" section, "
                                "step 1: python -m experiments.data)")
    extractor = clean_fid_feature_extractor(device)
    feats = fid.get_files_features([str(f) for f in files], extractor, num_workers=0, batch_size=batch_size,
                                   device=torch.device(device), mode="clean", description=f"{name} ")
    listing = hashlib.sha256("\n".join(str(f.relative_to(data)) for f in files).encode()).hexdigest()
    out = reference_path(name)
    out.parent.mkdir(parents=True, exist_ok=True)
    np.savez(out, mu=feats.mean(0), sigma=np.cov(feats, rowvar=False), n=len(files), files_sha256=listing)
    return out


def fetch_cleanfid_reference(dataset: str, resolution: int, split: str, name: str) -> Path:
    """clean-fid's precomputed ``mode="clean"`` statistics of ``dataset`` at ``resolution`` (``split`` as clean-fid
    names it, e.g. ffhq ``trainval70k``), saved as this benchmark's reference; needs a network the first time."""
    import cleanfid
    from cleanfid.fid import get_reference_statistics

    from core.hub import can_download

    url = "https://www.cs.cmu.edu/~clean-fid/stats/"
    file = f"{dataset}_clean_{split}_{resolution}.npz".lower()  # clean-fid's own name for the file and its folder
    folder = Path(cleanfid.__file__).parent / "stats"
    try:
        mu, sigma = get_reference_statistics(dataset, resolution, mode="clean", split=split)
    except Exception as e:  # urllib errors, a missing file on the server
        hint = "" if can_download(url) else (f" (offline: run this once on a machine with a network, or copy {file} "
                                             f"from {url} into {folder}/ by hand)")
        raise FileNotFoundError(f"clean-fid statistics {dataset}/{split}/{resolution} ({url}{file}): {e}{hint}") from e
    out = reference_path(name)
    out.parent.mkdir(parents=True, exist_ok=True)
    np.savez(out, mu=mu, sigma=sigma, n=-1, files_sha256=f"clean-fid precomputed {dataset}_clean_{split}_{resolution}")
    return out


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--data", type=Path, help="prepared image folder")
    parser.add_argument("--name", required=True, help="benchmark name, e.g. celebahq256")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--cleanfid", metavar="DATASET", help="use clean-fid's precomputed statistics instead (e.g. ffhq)")
    parser.add_argument("--cleanfid-split", default="trainval70k", help="clean-fid's split name (default trainval70k)")
    parser.add_argument("--resolution", type=int, default=256, help="with --cleanfid: the statistics' resolution")
    args = parser.parse_args(argv)
    if (args.data is None) == (args.cleanfid is None):
        parser.error("give exactly one of --data (a prepared image folder) and --cleanfid (precomputed statistics)")
    try:  # a missing input is one line naming it, not a traceback
        if args.cleanfid:
            print(fetch_cleanfid_reference(args.cleanfid, args.resolution, args.cleanfid_split, args.name))
        else:
            print(build_reference(args.data, args.name, args.device))
    except FileNotFoundError as e:
        parser.exit(1, f"{parser.prog}: error: {e}\n")


if __name__ == "__main__":
    main()
