"""Build FID reference statistics (Inception pool3 mean and covariance) of a prepared image folder.

    python -m eval.fid_ref --data data/celebahq256 --name celebahq256
    # -> data/fid_refs/celebahq256.npz  (mu, sigma, n, and the hash of the sorted file list)

Uses clean-fid (``mode="clean"``) with ``inception-2015-12-05.pt`` from ``$CONPREDIFF_WEIGHTS`` (default
``~/.cache/conprediff``); stops with the file's name and URL when it is missing.
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

    files = sorted(p for p in Path(data).rglob("*") if p.suffix.lower() in {".png", ".jpg", ".jpeg"})
    if not files:
        raise FileNotFoundError(f"{data}: no images; prepare the dataset first (see the README's data section)")
    extractor = clean_fid_feature_extractor(device)
    feats = fid.get_files_features([str(f) for f in files], extractor, num_workers=0, batch_size=batch_size,
                                   device=torch.device(device), mode="clean", description=f"{name} ")
    listing = hashlib.sha256("\n".join(str(f.relative_to(data)) for f in files).encode()).hexdigest()
    out = reference_path(name)
    out.parent.mkdir(parents=True, exist_ok=True)
    np.savez(out, mu=feats.mean(0), sigma=np.cov(feats, rowvar=False), n=len(files), files_sha256=listing)
    return out


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--data", type=Path, required=True, help="prepared image folder")
    parser.add_argument("--name", required=True, help="benchmark name, e.g. celebahq256")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    args = parser.parse_args(argv)
    print(build_reference(args.data, args.name, args.device))


if __name__ == "__main__":
    main()
