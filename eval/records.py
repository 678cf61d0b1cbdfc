"""Result records: one JSON line per measured number, appended atomically to ``results/records.jsonl``.

A record says what was run and how it was measured, so every number in ``tables/`` and
``figures/`` traces back to a run of this code. ``load_records`` refuses records with missing
fields, naming them and their line.
"""

from __future__ import annotations

import json
import os
import time
import warnings
from pathlib import Path

from core.runlog import JsonlError, append_jsonl, git_commit, iter_jsonl, rewrite_jsonl

ROOT = Path(__file__).resolve().parents[1]
RECORDS = ROOT / "results" / "records.jsonl"


def records_home(records: Path) -> Path:
    """Where a run recorded into ``records`` keeps its artifacts (``<home>/results/{curves,grids}``) and tables: the
    repository for the committed records file, else the records file's folder (a pilot, a sweep)."""
    return ROOT if Path(records).resolve() == RECORDS.resolve() else Path(records).parent
# Every preset's name starts with its scale. mini-long: a mini preset trained longer, where one exists;
# mini-gpu: a larger mini setting (32x32 digits, a bigger UNet) for one GPU, same proxy metrics.
SCALES = ("smoke", "mini", "mini-long", "mini-gpu", "paper")


def scale_of(preset: str) -> str:
    """The scale a preset (or run) name starts with: ``mini-long-digits16-baseline-s0`` -> ``mini-long``."""
    return max((s for s in SCALES if preset == s or preset.startswith(s + "-")), key=len, default="")

REQUIRED = (
    "experiment",  # an experiment package of experiments/ (experiments.registry), e.g. unconditional
    "benchmark",  # e.g. digits16, celebahq256, digits16/wide (inpainting: dataset/mask)
    "method",  # baseline | conprediff | a variant label (strides-12, explicit, ...)
    "scale",  # one of SCALES
    "preset",
    "seed",  # training seed
    "metric",  # protocol in the name: fd_digits_1k, fid30k_cleanfid, lpips_alex, ...
    "value",
    "n_samples",
    "checkpoint",  # training step of the weights used
    "ema",
    "sampler",  # e.g. ddim-50-noclip, repaint-250-j10-r10-clip, mask-replace-ancestral-100
    "reference",  # what generated images were compared with, and its hash
    "backend",  # metric implementation and version
    "git_commit",
    "time",
)


def cpu_cores() -> int:
    """The CPU cores this process may run on (its affinity where the OS reports one)."""
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1


def device() -> str:
    """The accelerator this process computes on: the CUDA device's name, else ``cpu (N cores)``."""
    import torch  # here, not at the top: reading records needs no torch

    if torch.cuda.is_available():
        return torch.cuda.get_device_name()
    return f"cpu ({cpu_cores()} cores)"


# Optional: "device" (filled by make_record); "superseded", a note on why a record no longer counts
# (tables show such records in their own labelled blocks, figures leave them out).
#
# Which trained model a record measured (records made since 2026-12-02):
# - "train_config_sha256": core.train.training_config_sha256 of the run's resolved config (sampling, logging and
#   checkpointing keys left out: they change no weight);
# - "weights_sha256": the exported pipeline's files hash (its provenance.json: EMA weights, scheduler, autoencoder);
# - "overrides": {dotted key: value} of the training keys where the run differs from its preset's own config
#   ({} for the preset as it is; at smoke scale, from the shrunk preset). Tables keep records with overrides out of
#   the preset's rows (a pilot is never a paper row).
# Records older than these fields measured their preset's own config (every committed record was made so): they
# stand for a run with no overrides, whatever its weights (see :func:`same_model`).
MODEL_FIELDS = ("train_config_sha256", "weights_sha256", "overrides")


class RecordError(ValueError):
    pass


def make_record(**fields) -> dict:
    """A complete record: ``git_commit``, ``time`` and ``device`` (where the run was trained and measured: step
    times compare only within one device) are filled in unless given; missing fields raise."""
    rec = {"git_commit": git_commit(), "time": time.strftime("%Y-%m-%dT%H:%M:%S%z"), "device": device(), **fields}
    missing = [k for k in REQUIRED if k not in rec]
    if missing:
        raise RecordError(f"record is missing field(s): {', '.join(missing)}")
    return rec


# What makes two records the same measurement: everything but the measured value and when, where and
# with which code it was measured. A record with the same identity as one already in the file is
# never appended again (a resumed evaluation re-measures nothing twice), unless that one is marked superseded.
IDENTITY = tuple(k for k in REQUIRED if k not in ("value", "backend", "git_commit", "time")) + MODEL_FIELDS[:2]


def record_identity(record: dict) -> tuple:
    """The fields of :data:`IDENTITY` as a hashable key (missing fields, e.g. of legacy records, as None)."""
    return tuple(json.dumps(record.get(k), sort_keys=True) for k in IDENTITY)


def check_not_smoke_into_committed(scales: list[str], path: str | Path, source: str) -> None:
    """Smoke-scale records (plumbing checks that measure nothing) never enter the committed records file: raises
    :class:`RecordError` naming ``source`` when ``path`` is :data:`RECORDS` and any of ``scales`` is ``smoke``."""
    smoke = sum(s == "smoke" for s in scales)
    if smoke and Path(path).resolve() == RECORDS.resolve():
        raise RecordError(f"{source}: {smoke} smoke-scale record(s) (a plumbing check, e.g. --scale smoke or "
                          f"gpu_call.sh with TINY=1): they never enter {RECORDS.name}; nothing was written")


def append_record(record: dict, path: str | Path = RECORDS) -> bool:
    """Append ``record`` (completed by :func:`make_record`) unless one with the same :func:`record_identity` is
    already in ``path``; returns whether it was written. The check and the append hold one file lock, so
    parallel workers appending to the same file cannot both write a measurement."""
    path = Path(path)
    check_not_smoke_into_committed([record.get("scale", "")], path, f"{record.get('preset')} seed {record.get('seed')}")
    path.parent.mkdir(parents=True, exist_ok=True)
    rec = make_record(**record)
    key = record_identity(rec)
    def present(existing: list[dict]) -> bool:  # a superseded record does not count: its measurement is redone
        return any(record_identity(old) == key for old in existing if not old.get("superseded"))

    if append_jsonl(path, rec, unless=present):
        return True
    warnings.warn(f"{path}: a record of {rec['preset']} seed {rec['seed']} {rec['metric']} checkpoint "
                  f"{rec['checkpoint']} n={rec['n_samples']} {rec['sampler']} is already present; not appended again",
                  stacklevel=2)
    return False


def same_model(record: dict, model: dict) -> bool:
    """Whether ``record`` measured the trained model ``model`` describes (any of :data:`MODEL_FIELDS`; given fields
    only). A record older than those fields stands for its preset's own config: it matches a model with no
    ``overrides`` (and not one whose ``overrides`` are unknown, i.e. absent from ``model``)."""
    if not model:
        return True
    if "train_config_sha256" not in record:
        return model.get("overrides") == {}
    return all(record.get(k) == v for k, v in model.items())


def current_match(record: dict, **key) -> bool:
    """``record`` is not superseded, matches every ``key`` field, and measured the model that ``key``'s
    :data:`MODEL_FIELDS` describe (:func:`same_model`)."""
    model = {k: key.pop(k) for k in MODEL_FIELDS if k in key}
    return (not record.get("superseded") and all(record.get(k) == v for k, v in key.items())
            and same_model(record, model))


class OtherModelError(RecordError):
    """The records file already holds current measurements of another trained model for the same preset and seed."""


def check_same_model(records: list[dict], model: dict, where: str | Path = RECORDS, **key) -> None:
    """Raise :class:`OtherModelError` if a current record matching ``key`` (e.g. experiment, preset, seed, scale)
    measured a model other than ``model`` (:func:`same_model`): its numbers would sit in one table row with this
    model's. The message names the records and the two ways on (another ``--records``, or mark them superseded)."""
    others = [r for r in records if current_match(r, **key) and not same_model(r, model)]
    if not others:
        return
    groups: dict[tuple, int] = {}
    for r in others:
        g = (r.get("checkpoint"), r.get("sampler"), r.get("train_config_sha256", "preset's own config (legacy)"),
             r.get("weights_sha256", "?"))
        groups[g] = groups.get(g, 0) + 1
    lines = "\n".join(f"  {n} record(s) at checkpoint {c}, {s}: train config {cf}, weights {w}"
                      for (c, s, cf, w), n in groups.items())
    mine = ", ".join(f"{k} {model[k]}" for k in ("train_config_sha256", "weights_sha256") if k in model)
    overrides = model.get("overrides")
    raise OtherModelError(
        f"{where} already holds measurements of another trained model for "
        + ", ".join(f"{k}={v}" for k, v in key.items()) + f":\n{lines}\nthis run: {mine}"
        + (f" (training keys overridden: {overrides})" if overrides else "")
        + "\nUse another --records file, or mark those superseded: python -m eval.records supersede "
        + " ".join(f"--where {k}={v}" for k, v in key.items()) + " --note 'why'")


def recorded(records: list[dict], **key) -> bool:
    """Some record in ``records`` matches every ``key`` field and is not superseded: a superseded measurement does
    not count as done (it is measured again, as :func:`append_record` lets it be)."""
    return any(current_match(r, **key) for r in records)


def supersede(note: str, path: str | Path = RECORDS, **where) -> int:
    """Mark every current record matching all ``where`` fields superseded with ``note`` (why it no longer counts and
    what replaced it); returns how many. Raises ``RecordError`` for an empty note, no ``where`` fields (that would
    supersede everything), an unknown field, or nothing current that matches. Records already superseded keep
    their note. Safe beside running evaluations (:func:`core.runlog.rewrite_jsonl`)."""
    if not note.strip():
        raise RecordError("supersede needs a note: why the records no longer count and what replaced them")
    if not where:
        raise RecordError("supersede needs at least one field to match (e.g. experiment=..., sampler=...)")
    unknown = sorted(set(where) - set(REQUIRED) - {"device"})
    if unknown:
        raise RecordError(f"unknown record field(s): {', '.join(unknown)}; fields: {', '.join(REQUIRED)}")
    mark = lambda r: {**r, "superseded": note} if current_match(r, **where) else None  # noqa: E731
    if not any(mark(r) for r in load_records(path)):
        raise RecordError(f"{path}: no current record matches {where}")
    return rewrite_jsonl(path, mark)


def merge(source: str | Path, path: str | Path = RECORDS) -> tuple[int, int]:
    """Append to ``path`` the records of ``source`` (another machine's or a cluster job's records file) that it lacks;
    returns ``(appended, skipped)``.

    Skipped: a record already in ``path``, current or since superseded (the same measurement: equal in every field
    but ``superseded``), and one whose measurement ``path`` holds current (:func:`record_identity`, as
    :func:`append_record` skips it). A record superseded in ``source`` alone is appended as it is (it counts
    nowhere). Refused before anything is written, with :class:`OtherModelError`: a record of another trained model
    than the one ``path``'s current records of that preset, seed and scale measured (:func:`check_same_model`; e.g.
    the same grid cell retrained on a GPU). A damaged ``source`` raises :class:`RecordError` naming its line, and so
    does a ``source`` with smoke-scale records when ``path`` is the committed records file."""
    path = Path(path)
    incoming, held = load_records(source), load_records(path) if path.exists() else []
    check_not_smoke_into_committed([r.get("scale", "") for r in incoming], path, str(source))

    def measurement(r: dict) -> str:  # the record whatever became of it since
        return json.dumps({k: v for k, v in r.items() if k != "superseded"}, sort_keys=True)

    seen = {measurement(r) for r in held}
    current = {record_identity(r) for r in held if not r.get("superseded")}
    new: list[dict] = []
    history: list[dict] = []  # superseded in source only: kept as they are (they count nowhere)
    for rec in incoming:
        if measurement(rec) in seen:
            continue
        if rec.get("superseded"):
            history.append(rec)
            continue
        if record_identity(rec) in current:
            continue
        model = {k: rec[k] for k in MODEL_FIELDS if k in rec}
        if "train_config_sha256" not in rec:  # a legacy record stands for its preset's own config
            model = {"overrides": {}}
        check_same_model(held + new, model, path, preset=rec["preset"], seed=rec["seed"], scale=rec["scale"])
        current.add(record_identity(rec))
        new.append(rec)
    for rec in history:
        append_jsonl(path, rec)
    for rec in new:
        append_record(rec, path)
    return len(new) + len(history), len(incoming) - len(new) - len(history)


def load_records(path: str | Path = RECORDS) -> list[dict]:
    """Every record in ``path``; a damaged line or a record missing a required field raises :class:`RecordError`
    naming the file and line. A partial last line (an interrupted append) is dropped with a warning."""
    try:
        lines = iter_jsonl(path)
    except JsonlError as e:
        raise RecordError(str(e)) from None
    out = []
    for n, rec in lines:
        missing = [k for k in REQUIRED if k not in rec]
        if missing:
            raise RecordError(f"{path}:{n}: record is missing field(s): {', '.join(missing)}")
        out.append(rec)
    return out


def main(argv: list[str] | None = None) -> None:
    import argparse

    ap = argparse.ArgumentParser(description="Mark records superseded (they stay in the file and in their own "
                                 "table blocks; figures and verdicts leave them out), or merge another records file.")
    sub = ap.add_subparsers(dest="command", required=True)
    sp = sub.add_parser("supersede", help="python -m eval.records supersede --where experiment=inpainting "
                        "--where sampler=repaint-50-j5-r5-noclip --note 'why, and what replaced them'")
    sp.add_argument("--where", action="append", default=[], metavar="FIELD=VALUE",
                    help="match records whose FIELD equals VALUE (JSON, else a string); repeatable, all must match")
    sp.add_argument("--note", required=True)
    sp.add_argument("--records", type=Path, default=RECORDS)
    mp = sub.add_parser("merge", help="python -m eval.records merge other/records.jsonl: append the records it holds "
                        "that --records lacks (another trained model of a preset and seed is refused, nothing written)")
    mp.add_argument("source", type=Path)
    mp.add_argument("--records", type=Path, default=RECORDS)
    args = ap.parse_args(argv)
    if args.command == "merge":
        try:
            appended, skipped = merge(args.source, args.records)
        except RecordError as e:
            ap.exit(2, f"error: {e}\n")
        print(f"{appended} record(s) appended to {args.records}, {skipped} already there (or superseded in "
              f"{args.source})")
        return
    where = {}
    for item in args.where:
        key, sep, value = item.partition("=")
        if not sep:
            ap.error(f"--where {item!r}: expected FIELD=VALUE")
        try:
            where[key] = json.loads(value)
        except json.JSONDecodeError:
            where[key] = value
    try:
        n = supersede(args.note, args.records, **where)
    except RecordError as e:
        ap.exit(2, f"error: {e}\n")
    print(f"{n} record(s) marked superseded in {args.records}")


if __name__ == "__main__":
    main()
