"""Run-directory bookkeeping: environment record, log file, append-only JSONL with atomic lines."""

from __future__ import annotations

import json
import os
import platform
import subprocess
import sys
import time
from importlib import metadata
from pathlib import Path

PACKAGES = ("torch", "diffusers", "accelerate", "datasets", "transformers", "numpy", "pot", "clean-fid", "torch-fidelity")


def git_commit(cwd: str | Path | None = None) -> str:
    """``<sha>`` or ``<sha>-dirty``, else ``unknown``. ``$CONPREDIFF_GIT_COMMIT`` overrides both: a copy of
    the tree shipped to another machine sets it to the commit it was copied from (the copy's own .git,
    if any, may be stale)."""
    if os.environ.get("CONPREDIFF_GIT_COMMIT"):
        return os.environ["CONPREDIFF_GIT_COMMIT"]
    cwd = cwd or Path(__file__).resolve().parent
    try:
        sha = subprocess.run(["git", "rev-parse", "HEAD"], cwd=cwd, capture_output=True, text=True, check=True).stdout.strip()
        dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], cwd=cwd, capture_output=True,
                               text=True, check=True).stdout.strip()
        return sha + ("-dirty" if dirty else "")
    except (subprocess.CalledProcessError, FileNotFoundError):
        return "unknown"


def environment() -> dict:
    versions = {}
    for p in PACKAGES:
        try:
            versions[p] = metadata.version(p)
        except metadata.PackageNotFoundError:
            versions[p] = None
    return {
        "python": sys.version.split()[0], "platform": platform.platform(), "packages": versions,
        "git_commit": git_commit(), "argv": sys.argv, "time": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
    }


def append_jsonl(path: str | Path, record: dict) -> None:
    """Append one JSON line in a single ``write`` on an ``O_APPEND`` descriptor (never a half line)."""
    line = (json.dumps(record, sort_keys=True) + "\n").encode()
    fd = os.open(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
    try:
        os.write(fd, line)
        os.fsync(fd)
    finally:
        os.close(fd)


def read_jsonl(path: str | Path) -> list[dict]:
    path = Path(path)
    if not path.exists():
        return []
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def write_atomic(path: str | Path, text: str) -> None:
    path = Path(path)
    tmp = path.with_name(f".{path.name}.tmp{os.getpid()}")
    tmp.write_text(text)
    os.replace(tmp, path)


class RunLog:
    """``log.txt`` (text) on the main process; prints too."""

    def __init__(self, run_dir: Path, enabled: bool):
        self.path, self.enabled = Path(run_dir) / "log.txt", enabled

    def __call__(self, msg: str) -> None:
        if not self.enabled:
            return
        line = f"[{time.strftime('%H:%M:%S')}] {msg}"
        print(line, flush=True)
        with open(self.path, "a") as f:
            f.write(line + "\n")
