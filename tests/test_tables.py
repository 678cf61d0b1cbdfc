import json
from pathlib import Path

import pytest

from eval.records import RecordError, append_record, load_records
from eval.tables import write_tables

FIXTURES = Path(__file__).resolve().parent / "fixtures"


def test_tables_match_golden_files_and_are_idempotent(tmp_path):
    write_tables(FIXTURES / "records.jsonl", tmp_path)
    expected = sorted(p.name for p in (FIXTURES / "expected_tables").iterdir())
    assert sorted(p.name for p in tmp_path.iterdir()) == expected
    for name in expected:
        assert (tmp_path / name).read_text() == (FIXTURES / "expected_tables" / name).read_text(), name
    first = {p.name: p.read_text() for p in tmp_path.iterdir()}
    write_tables(FIXTURES / "records.jsonl", tmp_path)
    assert first == {p.name: p.read_text() for p in tmp_path.iterdir()}


def test_golden_table_content():
    text = (FIXTURES / "expected_tables" / "unconditional.md").read_text()
    assert "| celebahq256 | conprediff | fid | 3.22 | 4 (n=1) |" in text
    assert "| digits16 | conprediff | fd_digits ↓ | n/a | 8.5 ± 0.5 (n=3) | -2.5 ± 1.291 | better than baseline |" in text
    assert "inconclusive" in (FIXTURES / "expected_tables" / "inpainting.md").read_text()
    # Records of another sampler, marked superseded, form their own block after the current one, and their
    # deltas are against the baseline sampled the same way (32 - 21), not the current baseline (32 - 11).
    current, superseded = text.split("### Sampler `ddim-50-clip` (superseded)")
    assert "### Sampler `ddim-50`" in current and "Superseded: fixture: sampled with x0 clipping" in superseded
    assert "| digits16 | conprediff | fd_digits ↓ | n/a | 32 ± 2.828 (n=2) | +11 ± 4.472 | worse than baseline |" in superseded


def test_records_refuse_missing_fields(tmp_path):
    path = tmp_path / "r.jsonl"
    with pytest.raises(RecordError, match="missing field.*value"):
        append_record({"experiment": "x"}, path)
    assert not path.exists()
    rec = json.loads((FIXTURES / "records.jsonl").read_text().splitlines()[0])
    append_record(rec, path)
    assert load_records(path)[0]["value"] == rec["value"]
    del rec["benchmark"]
    path.write_text(path.read_text() + json.dumps(rec) + "\n")
    with pytest.raises(RecordError, match=r"r.jsonl:2: record is missing field\(s\): benchmark"):
        load_records(path)


def test_figures_are_deterministic(tmp_path):
    import json

    from eval.figures import decoding_efficiency, grouped
    from eval.tables import summarize

    base = json.loads((FIXTURES / "records.jsonl").read_text().splitlines()[0])
    recs = []
    for seed in range(2):
        for method, fd, t in (("baseline", 10 + seed, 0.2), ("explicit", 9 + seed, 0.3), ("exact", 8 + seed, 0.35)):
            recs.append(dict(base, experiment="decoding_ablation", method=method, seed=seed, metric="fd_digits", value=fd))
            recs.append(dict(base, experiment="decoding_ablation", method=method, seed=seed, metric="step_time_s", value=t))
            recs.append(dict(base, experiment="backbones", benchmark="pixel", method=method, seed=seed, metric="fd_digits", value=fd))
    summary = summarize(recs)
    for name, draw in (("fig4.png", lambda p: decoding_efficiency(summary, p)),
                       ("fig5.png", lambda p: grouped(summary, "backbones", p, "t"))):
        first = draw(tmp_path / name).read_bytes()
        assert first[:8] == b"\x89PNG\r\n\x1a\n"
        assert draw(tmp_path / name).read_bytes() == first
    assert grouped(summary, "stride_ablation", tmp_path / "none.png", "t") is None


def test_scale_of_reads_the_longest_scale_prefix():
    from eval.records import scale_of

    assert scale_of("mini-digits16-baseline-s0") == "mini"
    assert scale_of("mini-long-digits16-conprediff-s2") == "mini-long"
    assert scale_of("mini-gpu-digits32-baseline-s4") == "mini-gpu"
    assert scale_of("paper-celebahq256-conprediff") == "paper"
    assert scale_of("minimal-run") == ""


def test_curves_draw_one_row_per_scale(tmp_path, monkeypatch):
    import matplotlib.pyplot as plt

    from eval import figures

    folder = tmp_path / "curves" / "unconditional"
    folder.mkdir(parents=True)
    for run in ("mini-digits16-baseline-s0", "mini-digits16-conprediff-s0", "mini-gpu-digits32-baseline-s0"):
        rows = [{"step": s, "point_loss": 1 / s, **({"context_loss": 2 / s} if "conprediff" in run else {})}
                for s in (10, 20, 30)]
        (folder / f"{run}.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    monkeypatch.setattr(figures, "RESULTS", tmp_path)
    one_row = 3.5 * figures.SAVE["dpi"]
    height = plt.imread(figures.curves("unconditional", tmp_path / "c.png")).shape[0]
    assert 1.8 * one_row < height < 2.2 * one_row  # mini and mini-gpu
    (folder / "mini-gpu-digits32-baseline-s0.jsonl").unlink()
    assert plt.imread(figures.curves("unconditional", tmp_path / "c.png")).shape[0] < 1.2 * one_row


def test_figures_leave_out_superseded_records_and_refuse_two_current_samplers(tmp_path):
    from eval.figures import write_figures

    base = json.loads((FIXTURES / "records.jsonl").read_text().splitlines()[0])
    recs = [dict(base, experiment="stride_ablation", method=m, seed=s, value=v + s, sampler=sampler, **extra)
            for m, v in (("baseline", 10), ("strides-1", 12)) for s in range(2)
            for sampler, extra in (("ddim-50-noclip", {}), ("ddim-50-clip", {"superseded": "clipped"}))]
    path = tmp_path / "r.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in recs))
    made, _ = write_figures(path, tmp_path / "figs")
    assert tmp_path / "figs" / "stride_ablation.png" in made
    path.write_text("".join(json.dumps(r) + "\n" for r in recs if r.get("superseded")))
    _, skipped = write_figures(path, tmp_path / "figs")  # only superseded records left: the old figure goes
    assert "stride_ablation.png" in skipped and not (tmp_path / "figs" / "stride_ablation.png").exists()
    path.write_text("".join(json.dumps({k: v for k, v in r.items() if k != "superseded"}) + "\n" for r in recs))
    with pytest.raises(ValueError, match="more than one current sampler"):
        write_figures(path, tmp_path / "figs")


def test_committed_tables_are_regenerated_from_committed_records(tmp_path):
    """tables/ is exactly what `python -m eval.tables` makes of results/records.jsonl (no hand edits)."""
    from eval.records import RECORDS, ROOT
    from eval.tables import write_tables

    written = write_tables(RECORDS, tmp_path)
    for path in written:
        committed = ROOT / "tables" / path.name
        assert committed.exists(), f"{committed} is missing: run python -m eval.tables"
        assert committed.read_text() == path.read_text(), f"{committed} differs from the records: run python -m eval.tables"


def test_records_name_their_device_and_commit_outside_a_checkout(tmp_path, monkeypatch):
    import re

    import torch

    from core.runlog import git_commit
    from eval.records import REQUIRED, make_record

    rec = make_record(**{k: 0 for k in REQUIRED if k not in ("git_commit", "time")})
    if torch.cuda.is_available():
        assert rec["device"] == torch.cuda.get_device_name()
    else:
        assert re.fullmatch(r"cpu \(\d+ cores\)", rec["device"])
    assert make_record(**dict(rec, device="NVIDIA H100 80GB HBM3"))["device"] == "NVIDIA H100 80GB HBM3"
    monkeypatch.delenv("CONPREDIFF_GIT_COMMIT", raising=False)
    assert git_commit(tmp_path) == "unknown"
    assert len(git_commit().removesuffix("-dirty")) == 40
    monkeypatch.setenv("CONPREDIFF_GIT_COMMIT", "abc123")  # a copy of the tree on a lent GPU machine
    assert git_commit(tmp_path) == git_commit() == "abc123"
