"""Run-directory bookkeeping: environment record, log file, append-only JSONL with atomic lines."""

from __future__ import annotations

import hashlib
import json
import os
import platform
import re
import subprocess
import sys
import time
import warnings
from collections.abc import Callable
from importlib import metadata
from pathlib import Path

PROVENANCE = "provenance.json"  # in an export folder: the checkpoint step it came from and its files' hash
PACKAGES = ("torch", "diffusers", "accelerate", "datasets", "transformers", "numpy", "pot", "clean-fid", "torch-fidelity")


def run_name(preset: str, seed: int) -> str:
    """A run's name, and its directory's under ``--runs-dir``: ``<preset>-s<seed>`` (the one place it is spelled)."""
    return f"{preset}-s{seed}"


def split_run_name(name: str) -> tuple[str, int]:
    """``run_name``'s inverse: ``(preset, seed)``. ValueError when ``name`` does not end in ``-s<seed>``."""
    match = re.fullmatch(r"(.+)-s(\d+)", name)
    if not match:
        raise ValueError(f"{name!r} is not a run name (<preset>-s<seed>)")
    return match[1], int(match[2])


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


class JsonlError(ValueError):
    """A JSON-lines file is damaged before its last line (a partial last line is only warned about)."""


def append_jsonl(path: str | Path, record: dict, unless: Callable[[list[dict]], bool] | None = None) -> bool:
    """Append one JSON line on an ``O_APPEND`` descriptor under an exclusive ``flock``, then ``fsync``.

    A partial last line left by a crash is cut off first (with a warning naming the file), so the new
    line never glues onto it. A short write is completed; a write that fails (e.g. a full disk) is
    rolled back to the old length and raises ``OSError`` naming the file. ``unless(records)``, called
    under the lock with the file's records, can veto the append (append-once); returns whether it wrote.
    """
    line = (json.dumps(record, sort_keys=True) + "\n").encode()
    fd = _open_locked(path, os.O_RDWR | os.O_APPEND | os.O_CREAT)
    try:
        size = _drop_partial_tail(fd, path)
        if unless is not None and unless(read_jsonl(path)):
            return False
        written = 0
        try:
            while written < len(line):
                n = os.write(fd, line[written:])
                if n <= 0:
                    raise OSError(f"write returned {n}")
                written += n
            os.fsync(fd)
        except OSError as e:
            os.ftruncate(fd, size)
            raise OSError(f"{path}: appending a record failed after {written} of {len(line)} bytes ({e}); "
                          "the file was restored to its previous length") from e
    finally:
        os.close(fd)
    return True


def _open_locked(path: str | Path, flags: int) -> int:
    """A descriptor of ``path`` under an exclusive ``flock``. If :func:`rewrite_jsonl` replaced the file while this
    waited for the lock, the descriptor is of the old, unlinked file: open the new one and lock again."""
    import fcntl

    while True:
        fd = os.open(path, flags, 0o644)
        fcntl.flock(fd, fcntl.LOCK_EX)
        try:
            if os.fstat(fd).st_ino == os.stat(path).st_ino:
                return fd
        except FileNotFoundError:
            pass
        os.close(fd)


def rewrite_jsonl(path: str | Path, change: Callable[[dict], dict | None]) -> int:
    """Apply ``change`` to every record of ``path`` under the append lock; a record it returns (not None) replaces
    the line, others keep their bytes. The new file is written beside the old and renamed over it (atomic: a crash
    leaves the old file or the new one), and :func:`append_jsonl` calls waiting for the lock append to the new
    file. Returns how many lines changed."""
    path = Path(path)
    fd = _open_locked(path, os.O_RDONLY)
    try:
        lines = path.read_bytes().splitlines(keepends=True)
        out, changed = [], 0
        for raw in lines:
            new = change(json.loads(raw)) if raw.strip() else None
            if new is not None:
                raw, changed = (json.dumps(new, sort_keys=True) + "\n").encode(), changed + 1
            out.append(raw)
        if changed:
            tmp = path.with_name(path.name + ".rewrite")
            with open(tmp, "wb") as f:
                f.write(b"".join(out))
                f.flush()
                os.fsync(f.fileno())
            os.replace(tmp, path)
        return changed
    finally:
        os.close(fd)


def _drop_partial_tail(fd: int, path: str | Path) -> int:
    """Cut a last line that lacks its newline (an interrupted append); returns the file's new length."""
    size = os.fstat(fd).st_size
    if size == 0 or os.pread(fd, 1, size - 1) == b"\n":
        return size
    tail = os.pread(fd, min(size, 1 << 20), max(0, size - (1 << 20)))
    keep = size - len(tail) + tail.rfind(b"\n") + 1 if b"\n" in tail else 0
    warnings.warn(f"{path}: dropped a partial last line ({size - keep} bytes, an interrupted write) before appending",
                  stacklevel=3)
    os.ftruncate(fd, keep)
    return keep


def iter_jsonl(path: str | Path) -> list[tuple[int, dict]]:
    """``(line number, record)`` of a JSON-lines file; ``[]`` if it does not exist.

    A last line without its newline that does not parse is what a crash or a full disk leaves behind:
    it is dropped with a warning naming the file. Any other line that does not parse raises
    :class:`JsonlError` naming the file and line.
    """
    path = Path(path)
    if not path.exists():
        return []
    text = path.read_text()
    lines = text.split("\n")
    out = []
    for n, line in enumerate(lines, 1):
        if not line.strip():
            continue
        try:
            rec = json.loads(line)
        except json.JSONDecodeError as e:
            if n == len(lines):  # the text after the last newline: an interrupted append
                warnings.warn(f"{path}:{n}: dropped a partial last line ({len(line.encode())} bytes, an interrupted "
                              "write)", stacklevel=2)
                continue
            raise JsonlError(f"{path}:{n}: not a JSON line ({e}); the file is damaged before its last line, "
                             "repair or remove that line") from None
        if not isinstance(rec, dict):
            raise JsonlError(f"{path}:{n}: expected a JSON object, got {type(rec).__name__}")
        out.append((n, rec))
    return out


def read_jsonl(path: str | Path) -> list[dict]:
    """The records of a JSON-lines file (see :func:`iter_jsonl` for how damage is handled)."""
    return [rec for _, rec in iter_jsonl(path)]


def write_atomic(path: str | Path, text: str) -> None:
    path = Path(path)
    tmp = path.with_name(f".{path.name}.tmp{os.getpid()}")
    tmp.write_text(text)
    os.replace(tmp, path)


def pipeline_files_hash(folder: Path) -> str:
    """sha256 over every file of an exported pipeline (relative path and bytes), ``provenance.json`` excluded."""
    h = hashlib.sha256()
    for f in sorted(p for p in Path(folder).rglob("*") if p.is_file() and p.name != PROVENANCE):
        h.update(str(f.relative_to(folder)).encode() + b"\0")
        with open(f, "rb") as fh:
            for block in iter(lambda: fh.read(1 << 22), b""):
                h.update(block)
    return h.hexdigest()[:16]


def write_provenance(folder: Path, step: int | None) -> dict:
    """Write ``provenance.json`` (``{"checkpoint": step, "sha256": files hash}``) into an export folder."""
    prov = {"checkpoint": step, "sha256": pipeline_files_hash(folder)}
    (Path(folder) / PROVENANCE).write_text(json.dumps(prov, sort_keys=True))
    return prov


def read_provenance(pipeline_dir: str | Path) -> dict | None:
    """The export's ``provenance.json``, or None for a pipeline exported before provenance existed."""
    path = Path(pipeline_dir) / PROVENANCE
    return json.loads(path.read_text()) if path.exists() else None


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


LOCK_FILE = ".lock"
_held: dict[str, list] = {}  # run directories this process holds: path -> [descriptor, depth]


class RunLock:
    """One owner per run directory: an exclusive ``flock`` on ``<run_dir>/.lock``, held while a run trains, samples
    or evaluates, and re-entrant within a process (the runner holds it around ``core.train.train``, which takes it
    too). The OS releases it when the holder exits, however it exits, so a crashed run never blocks a later one.

    A second process that wants the directory waits, saying once who holds it (the holder writes its host, pid,
    command and start time into the file), or with ``wait=False`` raises :class:`RunLockedError` naming the holder.
    ``enabled=False`` (the non-main processes of a multi-process launch: they follow the main one through barriers)
    makes it a no-op.
    """

    def __init__(self, run_dir: str | Path, enabled: bool = True, wait: bool = True,
                 say: Callable[[str], None] = lambda m: print(m, file=sys.stderr, flush=True)):
        self.path, self.enabled, self.wait, self.say = Path(run_dir) / LOCK_FILE, enabled, wait, say

    def __enter__(self) -> RunLock:
        import fcntl
        import socket

        if not self.enabled:
            return self
        key = str(self.path.resolve())
        if key in _held:
            _held[key][1] += 1
            return self
        self.path.parent.mkdir(parents=True, exist_ok=True)
        fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = self.holder()
            if not self.wait:
                os.close(fd)
                raise RunLockedError(f"{self.path.parent} is in use by {holder}; wait for it to finish, or stop it "
                                     "(a re-run resumes where it stopped)") from None
            self.say(f"waiting for {self.path.parent}: in use by {holder}")
            fcntl.flock(fd, fcntl.LOCK_EX)
        os.ftruncate(fd, 0)
        os.pwrite(fd, json.dumps({"host": socket.gethostname(), "pid": os.getpid(), "argv": sys.argv,
                                  "since": time.strftime("%Y-%m-%dT%H:%M:%S%z")}).encode(), 0)
        _held[key] = [fd, 1]
        return self

    def __exit__(self, *exc) -> None:
        if not self.enabled:
            return
        key = str(self.path.resolve())
        _held[key][1] -= 1
        if _held[key][1] == 0:
            fd = _held.pop(key)[0]
            os.close(fd)  # closing the descriptor releases the flock

    def holder(self) -> str:
        """Who holds the lock, as its holder wrote it (``unknown`` if unreadable)."""
        try:
            h = json.loads(self.path.read_text())
            return f"pid {h['pid']} on {h['host']} since {h['since']} ({' '.join(h['argv'])})"
        except (OSError, ValueError, KeyError):
            return "another process (unknown)"


class RunLockedError(RuntimeError):
    """The run directory is held by another process (:class:`RunLock` with ``wait=False``)."""


class RunReplacedError(RuntimeError):
    """The run directory this process holds was removed or replaced under it (:func:`check_owner`)."""


def check_owner(run_dir: str | Path) -> None:
    """Raise :class:`RunReplacedError` if this process holds ``run_dir``'s :class:`RunLock` but ``<run_dir>/.lock`` is
    no longer the file it locked: the folder was deleted (and perhaps made again by another run) while this process
    worked in it. Writing on would mix two runs' files under a lock the new owner cannot see. A no-op for a
    directory this process does not hold (the non-main processes of a launch). Cheap: one ``stat``."""
    path = Path(run_dir) / LOCK_FILE
    held = _held.get(str(path.resolve()))
    if held is None:
        return
    mine = os.fstat(held[0])
    try:
        now = os.stat(path)
    except FileNotFoundError:
        now = None
    if now is None or (now.st_ino, now.st_dev) != (mine.st_ino, mine.st_dev):
        raise RunReplacedError(f"{Path(run_dir)} was removed or replaced while this process (pid {os.getpid()}) was "
                               "training in it; stopping without writing to it, so whatever is there now stays intact")


# ---------------------------------------------------------------------------- stage timing (the rehearsal)

STAGES_ENV = "CONPREDIFF_STAGES"


class Stage:
    """Wall time and peak memory of one stage of a run (train, checkpoint, export, sample, metrics, check),
    appended as one JSON line to the file ``$CONPREDIFF_STAGES`` names; a no-op when it is unset.

    Used by :mod:`experiments.rehearse`, which runs the real runner commands and sums the lines per stage. Fields:
    ``stage``, ``rank``, ``seconds`` (wall), ``peak_rss_gb`` (the process's resident set, sampled every
    ``interval`` seconds by a thread while the stage runs, and at its start and end; GiB), ``peak_cuda_gb``
    (``torch.cuda.max_memory_allocated`` over the stage, reset at its start; GiB; absent without CUDA).
    Use as a context manager, a decorator (:func:`staged`), or with :meth:`start` / :meth:`stop` where a block is
    too long to re-indent.
    """

    def __init__(self, name: str, interval: float = 0.05):
        self.name, self.interval, self.path = name, interval, os.environ.get(STAGES_ENV)
        self._thread = None

    def start(self) -> "Stage":
        if not self.path:
            return self
        import threading

        import psutil
        import torch

        self._proc, self._t0, self._done = psutil.Process(), time.perf_counter(), threading.Event()
        self._peak = self._proc.memory_info().rss
        self._cuda = torch.cuda.is_available() and torch.cuda.is_initialized()
        if self._cuda:
            torch.cuda.reset_peak_memory_stats()

        def watch() -> None:
            while not self._done.wait(self.interval):
                self._peak = max(self._peak, self._proc.memory_info().rss)

        self._thread = threading.Thread(target=watch, daemon=True)
        self._thread.start()
        return self

    def stop(self) -> None:
        if self._thread is None:
            return
        import torch

        self._done.set()
        self._thread.join()
        self._thread = None
        row = {"stage": self.name, "rank": int(os.environ.get("RANK", "0")), "pid": os.getpid(),
               "seconds": round(time.perf_counter() - self._t0, 3),
               "peak_rss_gb": round(max(self._peak, self._proc.memory_info().rss) / 2**30, 3)}
        if self._cuda or (torch.cuda.is_available() and torch.cuda.is_initialized()):
            row["peak_cuda_gb"] = round(torch.cuda.max_memory_allocated() / 2**30, 3)
        append_jsonl(self.path, row)

    def __enter__(self) -> "Stage":
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()


def staged(name: str) -> Callable:
    """Decorator: each call of the function is one :class:`Stage` named ``name``."""
    import functools

    def wrap(fn: Callable) -> Callable:
        @functools.wraps(fn)
        def inner(*args, **kwargs):
            with Stage(name):
                return fn(*args, **kwargs)
        return inner
    return wrap
