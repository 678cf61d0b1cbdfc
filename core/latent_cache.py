"""Latent caching for latent presets: the frozen autoencoder runs over the dataset once, training reads its output.

As EDM2's ``dataset_tool.py encode`` (NVlabs/edm2) stores each image's posterior mean and std (``img-mean-std-*.npy``,
float32) and training samples ``mean + randn * std`` every step (``training/encoders.py``,
``StabilityVAEEncoder.encode_latents``), the cache holds :meth:`core.models.Autoencoder.encode_moments` (AutoencoderKL:
mean and std concatenated along channels; VQModel: the pre-quantisation latents), unscaled, and training turns them
into latents with :meth:`~core.models.Autoencoder.latents_from_moments`: the mean, or a posterior sample drawn from
:func:`posterior_generators` (``model.latent_sampling``). On-the-fly encoding goes through the same two calls, so a
cached run trains on the same latents (test: ``tests/test_paper_pipeline.py``).

Flips: this repository's data pipeline has no flip augmentation (no ``data`` key; CompVis's LDM-4 CelebA-HQ/FFHQ data
do not flip) and EDM2's ``encode`` stores unflipped images too, so one entry per image is stored. A flip option would
need the flipped image's moments as well (the latent of a flip is not the flip of a latent) and a new
:data:`CACHE_VERSION`.

Layout: ``<root>/<key>/moments.npy`` ``(N, C', h, w)`` float32 (read memory-mapped) and ``meta.json`` (what the key
hashes: autoencoder class, weights sha256 and dtype; dataset fingerprint; resolution, channels; shape). The key hashes
exactly what the encoding depends on, so a cache of another autoencoder, dtype or dataset is never found; a folder
whose ``meta.json`` disagrees with its key raises :class:`LatentCacheError`; a half-written one (no ``meta.json``)
is rebuilt.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
from collections.abc import Callable, Sequence
from pathlib import Path

import numpy as np
import torch

from .runlog import staged

CACHE_VERSION = 1
ENCODE_BATCH = 64  # images per encoder call while building


class LatentCacheError(RuntimeError):
    """A latent cache folder does not hold what its key promises."""


def weights_sha256(model: torch.nn.Module) -> str:
    """sha256 over the module's state dict (names, dtypes, shapes, bytes) as loaded, i.e. after any dtype cast."""
    h = hashlib.sha256()
    for name, t in sorted(model.state_dict().items()):
        t = t.detach().cpu().contiguous()
        h.update(f"{name}|{t.dtype}|{tuple(t.shape)}|".encode())
        h.update(t.reshape(-1).view(torch.uint8).numpy().tobytes())
    return h.hexdigest()


def dataset_fingerprint(data) -> str:
    """sha256 over a :class:`core.data.ImageData`'s ordered image column: each file's bytes when the dataset holds
    them, else its path, size and modification time (an imagefolder)."""
    h = hashlib.sha256()
    for chunk in data.ds.select_columns(["image"]).iter(batch_size=1024):
        for item in chunk["image"]:
            if item.get("bytes"):
                h.update(b"b" + hashlib.sha256(item["bytes"]).digest())
            else:
                st = os.stat(item["path"])
                h.update(f"p{item['path']}|{st.st_size}|{st.st_mtime_ns}".encode())
    return h.hexdigest()


def cache_identity(data, vae) -> dict:
    """Everything the cached moments depend on (``meta.json`` minus the array's shape)."""
    cfg = data.cfg
    return {"version": CACHE_VERSION, "autoencoder": type(vae.model).__name__,
            "weights_sha256": weights_sha256(vae.model), "dtype": str(vae.dtype).removeprefix("torch."), "dataset_sha256": dataset_fingerprint(data),
            "num_images": len(data), "resolution": cfg.resolution, "channels": cfg.channels}


def cache_key(identity: dict) -> str:
    return hashlib.sha256(json.dumps(identity, sort_keys=True).encode()).hexdigest()[:20]


class LatentCache:
    """The cached encoder output of every image, served like :class:`core.data.ImageData`: ``len(cache)`` and
    ``cache.images(indices)`` -> ``(len(indices), C', h, w)`` float32 moments, so :class:`core.data.MicroBatches` and
    DataLoader workers serve it unchanged (the array is opened memory-mapped in each process on first use)."""

    def __init__(self, folder: str | Path):
        self.folder = Path(folder)
        self.meta = json.loads((self.folder / "meta.json").read_text())
        self._moments = None

    def __len__(self) -> int:
        return int(self.meta["num_images"])

    def __getstate__(self) -> dict:
        return {**self.__dict__, "_moments": None}

    def images(self, indices: Sequence[int]) -> torch.Tensor:
        if self._moments is None:
            self._moments = np.load(self.folder / "moments.npy", mmap_mode="r")
        return torch.from_numpy(np.ascontiguousarray(self._moments[np.asarray(list(indices), dtype=np.int64)]))


@staged("latent_cache")
def build_latent_cache(data, vae, folder: Path, identity: dict, log: Callable[[str], None] = print) -> None:
    """Encode every image of ``data`` with ``vae`` (:data:`ENCODE_BATCH` at a time) into ``folder``, atomically."""
    from tqdm.auto import tqdm

    tmp = folder.with_name(folder.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    device = next(vae.model.parameters()).device
    first = vae.encode_moments(data.images([0]).to(device))
    out = np.lib.format.open_memmap(tmp / "moments.npy", mode="w+", dtype=np.float32,
                                    shape=(len(data), *first.shape[1:]))
    for i in tqdm(range(0, len(data), ENCODE_BATCH), desc="latent cache", mininterval=5):
        idx = range(i, min(i + ENCODE_BATCH, len(data)))
        out[i : idx.stop] = vae.encode_moments(data.images(idx).to(device)).cpu().numpy()
    out.flush()
    del out
    (tmp / "meta.json").write_text(json.dumps({**identity, "shape": [len(data), *first.shape[1:]]}, indent=2))
    shutil.rmtree(folder, ignore_errors=True)
    os.replace(tmp, folder)
    log(f"latent cache: encoded {len(data)} images into {folder}")


def open_latent_cache(data, vae, root: str | Path, is_main: bool = True, wait: Callable[[], None] = lambda: None,
                      log: Callable[[str], None] = print) -> LatentCache:
    """The cache of ``data`` encoded by ``vae`` under ``root/<key>/``, built first by the main process if missing.

    Raises :class:`LatentCacheError` when the folder's ``meta.json`` disagrees with what ``data`` and ``vae`` are.
    """
    identity = cache_identity(data, vae)
    folder = Path(root) / cache_key(identity)
    if is_main and not (folder / "meta.json").exists():
        build_latent_cache(data, vae, folder, identity, log)
    wait()
    cache = LatentCache(folder)
    stored = {k: v for k, v in cache.meta.items() if k != "shape"}
    if stored != identity:
        diff = ", ".join(f"{k}: {stored.get(k)!r} (cached) vs {identity.get(k)!r}"
                         for k in sorted(set(stored) | set(identity)) if stored.get(k) != identity.get(k))
        raise LatentCacheError(f"{folder} holds the latents of another autoencoder or dataset ({diff}); delete the "
                               "folder to rebuild it, or set data.latent_cache=false")
    if is_main:
        log(f"latent cache: {folder} ({len(cache)} images, {cache.meta['autoencoder']} {cache.meta['dtype']})")
    return cache


def posterior_generators(seed: int, step: int, indices: Sequence[int]) -> list[torch.Generator]:
    """One generator per image for its posterior sample at ``step`` (``model.latent_sampling='sample'``), seeded by
    (seed, step, global index) on a stream of its own: the timestep, noise and context draws of
    :func:`core.objective.image_generators` stay what they are with ``latent_sampling='mean'``."""
    gens = []
    for i in indices:
        state = np.random.SeedSequence([seed, step, int(i), 0x1A7E47]).generate_state(1, np.uint64)[0]
        gens.append(torch.Generator().manual_seed(int(state) & (2**63 - 1)))
    return gens
