"""Pretrained weights the way diffusers users pass them: a hub id with a pinned revision (and subfolder), or a folder.

``model.vae: CompVis/ldm-celebahq-256`` + ``vae_revision: <commit>`` + ``vae_subfolder: vqvae`` downloads once into
the Hugging Face cache (``~/.cache/huggingface``, or ``$HF_HOME``) through ``from_pretrained``; a local folder
(``data/weights/ldm-vq-f4``) is used as is. When the hub cannot be used (``HF_HUB_OFFLINE=1``, or huggingface.co
unreachable within a few seconds) and the files are not cached, :func:`weights_problem` says so at once, naming
the hub id, revision and subfolder and the command that makes a local copy, instead of a long retry loop or
a bare ``OSError``.
"""

from __future__ import annotations

import functools
import os
import socket
from pathlib import Path
from urllib.parse import urlparse


class WeightsUnavailableError(FileNotFoundError):
    """Pretrained weights are neither on disk nor downloadable now; the message says which and how to get them."""


def is_hub_id(name: str) -> bool:
    """``owner/name`` that is not an existing path (``data/weights/x`` has two slashes: a folder)."""
    if name.startswith(("/", ".", "~")) or Path(name).expanduser().exists():
        return False
    return name.count("/") == 1 and all(name.split("/"))


def hub_offline() -> bool:
    return os.environ.get("HF_HUB_OFFLINE", "").strip().lower() in {"1", "true", "yes", "on"}


@functools.lru_cache(maxsize=16)
def host_reachable(url: str, timeout: float = 3.0) -> bool:
    """Whether a TCP connection to ``url``'s host opens within ``timeout`` seconds (no request is sent)."""
    parsed = urlparse(url)
    port = parsed.port or (443 if parsed.scheme == "https" else 80)
    try:
        socket.create_connection((parsed.hostname, port), timeout=timeout).close()
        return True
    except OSError:
        return False


def hub_reachable() -> bool:
    """Whether the hub endpoint (``$HF_ENDPOINT``, default https://huggingface.co) accepts a connection."""
    return host_reachable(os.environ.get("HF_ENDPOINT", "https://huggingface.co"))


def can_download(url: str) -> bool:
    """Downloads are allowed (``HF_HUB_OFFLINE`` unset, which this project also honours for metric weights) and
    ``url``'s host answers."""
    return not hub_offline() and host_reachable(url)


def hub_cached(repo_id: str, filename: str, revision: str | None = None, subfolder: str | None = None) -> bool:
    """Whether ``filename`` of ``repo_id`` at ``revision`` is in the local Hugging Face cache."""
    from huggingface_hub import try_to_load_from_cache

    path = f"{subfolder}/{filename}" if subfolder else filename
    found = try_to_load_from_cache(repo_id, path, revision=revision)
    return isinstance(found, str)


def describe(name: str, revision: str | None, subfolder: str | None) -> str:
    extra = ", ".join(f"{k} {v}" for k, v in (("revision", revision), ("subfolder", subfolder)) if v)
    return f"{name}" + (f" ({extra})" if extra else "")


def download_command(name: str, revision: str | None, subfolder: str | None, local_dir: str) -> str:
    """The ``hf download`` command (huggingface_hub's CLI) that makes a local copy of a hub model."""
    rev = f" --revision {revision}" if revision else ""
    include = f" --include '{subfolder}/*'" if subfolder else ""
    return f"hf download {name}{rev}{include} --local-dir {local_dir}"


def weights_problem(key: str, name: str, revision: str | None = None, subfolder: str | None = None,
                    config_file: str = "config.json") -> str | None:
    """``None`` when ``name`` can be loaded now (a folder holding ``config_file``, or a hub id that is cached or
    downloadable); otherwise one line naming the setting, the hub id or folder, and how to provide it."""
    if not is_hub_id(name):
        folder = Path(name).expanduser() / (subfolder or "")
        if (folder / config_file).exists():
            return None
        return (f"{key}={name!r}: no {config_file} in {folder}; put the pretrained folder there (save_pretrained "
                f"layout), or set {key} to a hub id with its revision")
    if hub_cached(name, config_file, revision, subfolder):
        return None
    if not hub_offline() and hub_reachable():
        return None
    why = "HF_HUB_OFFLINE=1" if hub_offline() else "huggingface.co is unreachable"
    local = f"data/weights/{name.split('/')[1]}"
    return (f"{key}={describe(name, revision, subfolder)} is not in the Hugging Face cache and {why}. Run once with "
            f"a network (it is downloaded and cached), or copy it on another machine with "
            f"`{download_command(name, revision, subfolder, local)}` and set {key}={local}"
            + (f" (keeping the subfolder {subfolder})" if subfolder else ""))


def from_pretrained(loader, key: str, name: str, revision: str | None = None, subfolder: str | None = None, **kwargs):
    """``loader.from_pretrained`` for a folder or hub id, with one clear :class:`WeightsUnavailableError` when the
    weights cannot be had (checked first, so an offline machine fails in seconds)."""
    problem = weights_problem(key, name, revision, subfolder)
    if problem:
        raise WeightsUnavailableError(problem)
    where = name if is_hub_id(name) else Path(name).expanduser()
    hub = {"revision": revision} if is_hub_id(name) and revision else {}
    sub = {"subfolder": subfolder} if subfolder else {}
    try:
        return loader.from_pretrained(where, **hub, **sub, **kwargs)
    except OSError as e:  # e.g. a hub file missing at that revision, or the network dropping mid-download
        raise WeightsUnavailableError(f"{key}={describe(name, revision, subfolder)}: {e}") from e


def weights_identity(name: str, revision: str | None = None, subfolder: str | None = None) -> dict:
    """What a weights setting actually loaded, for ``env.json``: a hub id with its pinned revision (the hub keeps
    that commit's files), or a local folder by its absolute path and the sha256 of its files
    (:func:`core.runlog.pipeline_files_hash`), so that a folder replaced in place is told apart."""
    if is_hub_id(name):
        return {"hub": name, "revision": revision, "subfolder": subfolder}
    from .runlog import pipeline_files_hash

    folder = Path(name).expanduser().resolve() / (subfolder or "")
    return {"path": str(folder), "sha256": pipeline_files_hash(folder) if folder.is_dir() else None}
