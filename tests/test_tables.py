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
    assert ("| celebahq256 | conprediff | fid | 3.22 | FID; the paper does not state the implementation or sample "
            "count | 4 (n=1) (fid) |") in text
    # The paper's LDM-4 number names its protocol; ours would share its line only as fid50k_torchfidelity.
    assert "| celebahq256 | LDM-4 | fid | 5.11 | FID on the legacy Inception path" in text
    # Paired by seed: d = (-2, -3, -2.5), t = -2.5 / (0.5 / sqrt 3) = -8.66 on 2 df, p = 0.013.
    assert ("| digits16 | conprediff | fd_digits ↓ | n/a | 8.5 ± 0.5 (n=3) | -2.5 [-3.742, -1.258] | 0.013 (paired) "
            "| 0.013 | better |") in text
    assert "inconclusive" in (FIXTURES / "expected_tables" / "inpainting.md").read_text()
    # Records of another sampler, marked superseded, form their own block after the current one, and their
    # deltas are against the baseline sampled the same way (32 - 21), not the current baseline (32 - 11).
    current, superseded = text.split("### Sampler `ddim-50-clip`, 10 training steps, 100 samples (superseded)")
    assert "### Sampler `ddim-50`, 10 training steps" in current and "Superseded: fixture: sampled with x0 clipping" in superseded
    # |delta| = 11 > 2 SE (4.47), the old rule's "worse"; with 2 seeds the paired test gives p = 0.058.
    assert ("| digits16 | conprediff | fd_digits ↓ | n/a | 32 ± 2.828 (n=2) | +11 [-1.706, +23.71] | 0.058 (paired) "
            "| 0.058 | inconclusive |") in superseded
    # Another training length (checkpoint 20) is its own block, never averaged with checkpoint 10's records.
    assert "### Sampler `ddim-50`, 20 training steps, 100 samples" in current
    assert "| digits16 | conprediff | fd_digits ↓ | n/a | 7.25 ± 0.3536 (n=2) |" in current


def test_compare_matches_scipy_and_a_hand_computed_case():
    from scipy import stats

    from eval.tables import compare

    method, reference = {0: 8.0, 1: 9.0, 2: 8.5}, {0: 10.0, 1: 12.0, 2: 11.0}
    c = compare(method, reference)
    assert c.test == "paired" and c.delta == pytest.approx(-2.5)
    # By hand: d = (-2, -3, -2.5), sd 0.5, t = -8.660 on 2 df; two-sided p = 2 * t.sf(8.660, 2).
    assert c.p == pytest.approx(2 * stats.t.sf(2.5 / (0.5 / 3**0.5), 2), rel=1e-9)
    assert c.p == pytest.approx(0.013072, abs=1e-6)
    half = stats.t.ppf(0.975, 2) * 0.5 / 3**0.5
    assert (c.ci_low, c.ci_high) == pytest.approx((-2.5 - half, -2.5 + half))
    assert c.p_welch == pytest.approx(stats.ttest_ind([8, 9, 8.5], [10, 12, 11], equal_var=False).pvalue)
    # Different seeds: Welch's test decides; its CI uses the Welch-Satterthwaite degrees of freedom.
    w = compare({0: 8.0, 1: 9.0, 2: 8.5}, {3: 10.0, 4: 12.0, 5: 11.0, 6: 13.0})
    ref = stats.ttest_ind([8, 9, 8.5], [10, 12, 11, 13], equal_var=False)
    va, vb = 0.25 / 3, (5 / 3) / 4
    df = (va + vb) ** 2 / (va**2 / 2 + vb**2 / 3)
    assert w.test == "welch" and w.p == pytest.approx(ref.pvalue) and w.p == pytest.approx(2 * stats.t.sf(
        abs(-3.0) / (va + vb) ** 0.5, df))
    assert w.ci_high - w.ci_low == pytest.approx(2 * stats.t.ppf(0.975, df) * (va + vb) ** 0.5)
    # Arms with more seeds than they share: paired on the shared seeds, Δ the mean paired difference there.
    sub = compare(method, {**reference, 3: 20.0, 4: 30.0})
    assert sub.test == "paired on seeds 0,1,2" and (sub.delta, sub.p) == pytest.approx((c.delta, c.p))
    # One seed on either side: no test, no verdict.
    assert compare({0: 1.0}, {0: 2.0}).test == ""


def test_differences_without_spread_get_no_p_value():
    """Two seeds whose paired differences are both -0.049 (up to float rounding) made t infinite, and the scaling
    table printed p = 7.2e-16 with a zero-width CI from two seeds. No t-test is defined there: p and CI are NaN,
    the verdict inconclusive; Δ stays."""
    import math

    from eval.tables import compare, verdict

    c = compare({0: 0.769, 1: 0.759}, {0: 0.818, 1: 0.808})  # differences -0.049 and -0.04900000000000004
    assert c.test == "paired" and c.delta == pytest.approx(-0.049)
    assert math.isnan(c.p) and math.isnan(c.ci_low) and math.isnan(c.ci_high)
    assert verdict(c, "confident_digits", math.nan) == "inconclusive"
    w = compare({0: 0.769, 1: 0.769}, {2: 0.818, 3: 0.818})  # both arms constant, no shared seeds
    assert w.test == "welch" and math.isnan(w.p)
    assert compare({0: 0.769, 1: 0.779}, {0: 0.818, 1: 0.808}).p == pytest.approx(0.1598, abs=1e-4)  # spread: tested


def test_holm_adjustment_by_hand():
    import math

    from eval.tables import holm

    # Sorted 0.01, 0.03, 0.04: 3 x 0.01 = 0.03, max(0.03, 2 x 0.03) = 0.06, max(0.06, 1 x 0.04) = 0.06.
    assert holm([0.01, 0.04, 0.03]) == pytest.approx([0.03, 0.06, 0.06])
    out = holm([0.5, math.nan, 0.4])
    assert out[0] == pytest.approx(0.8) and math.isnan(out[1]) and out[2] == pytest.approx(0.8)


def test_verdict_needs_p_below_005_not_two_standard_errors():
    from eval.tables import summarize, with_deltas

    base = json.loads((FIXTURES / "records.jsonl").read_text().splitlines()[0])
    recs = [dict(base, method=m, seed=s, value=v) for m, vals in
            (("baseline", (10.0, 10.5, 11.0)), ("conprediff", (11.0, 13.0, 12.6))) for s, v in enumerate(vals)]
    row = with_deltas(summarize(recs)).query("method == 'conprediff'").iloc[0]
    two_se = 2 * ((0.25 + 1.12) / 3) ** 0.5
    assert row["delta"] > two_se  # the old rule called this "worse"
    assert row["test"] == "paired" and row["p"] > 0.05 and row["verdict"] == "inconclusive"


def test_readings_borrow_the_unconditional_rows_only_where_they_have_records_of_their_own():
    from eval.tables import summarize, with_borrowed, with_deltas

    base = json.loads((FIXTURES / "records.jsonl").read_text().splitlines()[0])
    recs = [dict(base, method=m, seed=s, value=v + s) for m, v in (("baseline", 10.0), ("conprediff", 12.0)) for s in range(3)]
    assert (with_borrowed(summarize(recs))["experiment"] == "readings").sum() == 0
    recs += [dict(base, experiment="readings", method="target-x0", seed=s, value=9.0 + s * 1.1) for s in range(3)]
    rows = with_deltas(with_borrowed(summarize(recs))).query("experiment == 'readings'")
    assert sorted(rows["method"].unique()) == ["baseline", "conprediff", "target-x0"]
    vs = rows[rows["method"] == "target-x0"].set_index("vs")
    assert vs.loc["baseline", "delta"] == pytest.approx(-0.9) and vs.loc["conprediff", "delta"] == pytest.approx(-2.9)
    # the backbones table lends its latent and discrete rows, only to benchmarks the readings run on
    recs += [dict(base, experiment="backbones", benchmark=b, method=m, seed=s, value=v + s)
             for b in ("pixel", "latent") for m, v in (("baseline", 4.0), ("conprediff", 20.0)) for s in range(3)]
    rows = with_borrowed(summarize(recs)).query("experiment == 'readings'")
    assert set(rows["benchmark"]) == {base["benchmark"]}
    recs += [dict(base, experiment="readings", benchmark="latent", method="lambda-matched", seed=s, value=6.0 + s)
             for s in range(3)]
    rows = with_deltas(with_borrowed(summarize(recs))).query("experiment == 'readings' and benchmark == 'latent'")
    vs = rows[rows["method"] == "lambda-matched"].set_index("vs")
    assert vs.loc["baseline", "delta"] == pytest.approx(2.0) and vs.loc["conprediff", "delta"] == pytest.approx(-14.0)
    assert "pixel" not in set(with_borrowed(summarize(recs)).query("experiment == 'readings'")["benchmark"])

    # the backbones table shows the readings' vq-loss runs as its discrete baseline and ConPreDiff rows, in a block
    # of their own (new_blocks), compared with each other; the readings compare them only as their table.yaml's comparisons say
    vq = [dict(base, experiment="readings", benchmark="discrete", sampler="mask-replace-ancestral-100",
               method=m, seed=s, value=v + s * d) for m, v, d in (("baseline-vq-loss", 3.0, 0.2),
                                                                   ("conprediff-vq-loss", 3.5, 0.3)) for s in range(3)]
    table = with_deltas(with_borrowed(summarize(recs + vq)))
    mine = table.query("experiment == 'backbones' and benchmark == 'discrete'").set_index("method")
    assert mine.loc["conprediff", "vs"] == "baseline" and mine.loc["conprediff", "delta"] == pytest.approx(0.6)
    readings = table.query("experiment == 'readings' and benchmark == 'discrete'")
    assert sorted(map(tuple, readings[["method", "vs"]].values.tolist())) == [
        ("baseline-vq-loss", ""), ("conprediff-vq-loss", ""), ("conprediff-vq-loss", "baseline-vq-loss")]


def test_cells_never_mix_protocols_and_refuse_duplicates():
    """Issue 18, 2: seed 0 measured at checkpoints 4 and 8 and seed 1 at 8 were one cell "n=3, seeds 0,0,1"."""
    from eval.tables import TableError, summarize

    base = json.loads((FIXTURES / "records.jsonl").read_text().splitlines()[0])
    recs = [dict(base, seed=0, checkpoint=4, value=3.0), dict(base, seed=0, checkpoint=8, value=2.0),
            dict(base, seed=1, checkpoint=8, value=2.5), dict(base, seed=1, checkpoint=8, n_samples=16, value=9.0)]
    cells = summarize(recs).set_index(["checkpoint", "n_samples"])
    assert len(cells) == 3
    assert (cells.loc[(4, 100), "n"], cells.loc[(4, 100), "seeds"]) == (1, "0")
    assert (cells.loc[(8, 100), "n"], cells.loc[(8, 100), "seeds"], cells.loc[(8, 100), "mean"]) == (2, "0,1", 2.25)
    with pytest.raises(TableError, match="measured twice") as err:
        summarize(recs + [dict(base, seed=1, checkpoint=8, value=2.6)])
    assert "2.6" in str(err.value) and base["preset"] in str(err.value)


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
    for name, draw in (("fig4.png", lambda p: decoding_efficiency(summary, "decoding_ablation", p)),
                       ("fig5.png", lambda p: grouped(summary, "backbones", p, "t"))):
        first = draw(tmp_path / name).read_bytes()
        assert first[:8] == b"\x89PNG\r\n\x1a\n"
        assert draw(tmp_path / name).read_bytes() == first
    assert grouped(summary, "stride_ablation", tmp_path / "none.png", "t") is None


def test_grouped_bars_only_where_a_method_was_measured():
    """A method measured on one benchmark gets no empty slot on the others (readings.png was mostly gaps)."""
    import pandas as pd

    from eval.figures import bar_layout

    d = pd.DataFrame({"benchmark": ["pixel", "pixel", "pixel", "latent", "latent"],
                      "method": ["x0", "conprediff", "baseline", "lam", "baseline"]})
    assert bar_layout(d, order=("conprediff",)) == [
        (0, "latent", "baseline"), (1, "latent", "lam"),
        (3, "pixel", "baseline"), (4, "pixel", "conprediff"), (5, "pixel", "x0")]


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


def test_figures_leave_out_superseded_records_and_draw_each_current_sampler_in_its_own_group(tmp_path):
    from eval.figures import write_figures

    base = json.loads((FIXTURES / "records.jsonl").read_text().splitlines()[0])
    recs = [dict(base, experiment="stride_ablation", method=m, seed=s, value=v + s, sampler=sampler, **extra)
            for m, v in (("baseline", 10), ("strides-1", 12)) for s in range(2)
            for sampler, extra in (("ddim-50-noclip", {}), ("ddim-50-clip", {"superseded": "clipped"}))]
    path = tmp_path / "r.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in recs))
    made, _ = write_figures(path, tmp_path / "figs")
    assert tmp_path / "figs" / "stride_ablation.png" in made
    one_sampler = (tmp_path / "figs" / "stride_ablation.png").read_bytes()
    path.write_text("".join(json.dumps(r) + "\n" for r in recs if r.get("superseded")))
    _, skipped = write_figures(path, tmp_path / "figs")  # only superseded records left: the old figure goes
    assert "stride_ablation.png" in skipped and not (tmp_path / "figs" / "stride_ablation.png").exists()
    # Two current samplers (a reading sampled with DDPM-250 and DDIM-50): the figure is drawn, with a group per
    # sampler. It used to raise, so the readings figure broke the day its DDPM-250 records landed.
    path.write_text("".join(json.dumps({k: v for k, v in r.items() if k != "superseded"}) + "\n" for r in recs))
    made, _ = write_figures(path, tmp_path / "figs")
    assert tmp_path / "figs" / "stride_ablation.png" in made
    assert (tmp_path / "figs" / "stride_ablation.png").read_bytes() != one_sampler  # the second group's bars


def test_bars_of_two_protocols_are_grouped_apart():
    """Each bar's group names its benchmark and, where the table holds more than one, its protocol."""
    import pandas as pd

    from eval.figures import bar_layout, protocol_groups

    d = pd.DataFrame({"benchmark": ["digits16"] * 4, "method": ["baseline", "t-signal-share"] * 2,
                      "scale": ["mini"] * 4, "sampler": ["ddim-50-noclip"] * 2 + ["ddpm-250-noclip"] * 2,
                      "checkpoint": [2000] * 4, "n_samples": [1000] * 4, "reference": ["digits"] * 4})
    assert list(protocol_groups(d)) == ["digits16\nddim-50-noclip"] * 2 + ["digits16\nddpm-250-noclip"] * 2
    assert [(x, m) for x, _, m in bar_layout(d.assign(benchmark=protocol_groups(d)))] == [
        (0, "baseline"), (1, "t-signal-share"), (3, "baseline"), (4, "t-signal-share")]
    one = d[d["sampler"] == "ddim-50-noclip"]
    assert list(protocol_groups(one)) == ["digits16"] * 2  # one protocol: the benchmark alone, as before
    assert list(protocol_groups(d.assign(checkpoint=[2000, 2000, 5000, 5000]).iloc[[0, 2]])) == [
        "digits16\nddim-50-noclip\n2,000 steps", "digits16\nddpm-250-noclip\n5,000 steps"]


def test_committed_figures_are_drawn_from_the_committed_records(tmp_path):
    """`python -m eval.figures` works on results/records.jsonl and draws every committed figure (it refused once the
    unconditional table gained a second current sampler block, and no test noticed)."""
    import warnings

    from eval.figures import write_figures
    from eval.records import RECORDS, ROOT

    from experiments.scaling.report import FIGURE  # drawn by the scaling experiment's own report

    with warnings.catch_warnings(record=True) as caught:  # e.g. "Tight layout not applied": labels clipped
        warnings.simplefilter("always")
        made, _ = write_figures(RECORDS, tmp_path)
    assert {p.name for p in made} == {p.name for p in (ROOT / "figures").glob("*.png")} - {FIGURE}
    assert not [str(w.message) for w in caught if "layout" in str(w.message).lower()]


def test_every_reading_is_tested_against_conprediff():
    """A reading changes one of ConPreDiff's choices, so its table must test it against ConPreDiff as well as the
    baseline: a reading added to experiments/readings without an entry in its table.yaml's comparisons fails here."""
    from experiments.readings import PRESETS, TABLE

    against = {m for m, ref in TABLE.comparisons if ref == "conprediff"}
    own_arms = {"baseline-vq-loss", "conprediff-vq-loss"}  # the discrete readings re-run both arms: tested as a pair
    assert {p.method for p in PRESETS} - own_arms <= against
    assert ("conprediff-vq-loss", "baseline-vq-loss") in TABLE.comparisons


def test_committed_tables_are_regenerated_from_committed_records(tmp_path):
    """tables/ is exactly what `python -m eval.tables` makes of results/records.jsonl (no hand edits)."""
    from eval.records import RECORDS, ROOT
    from eval.tables import write_tables

    written = write_tables(RECORDS, tmp_path)
    for path in written:
        committed = ROOT / "tables" / path.name
        assert committed.exists(), f"{committed} is missing: run python -m eval.tables"
        assert committed.read_text() == path.read_text(), f"{committed} differs from the records: run python -m eval.tables"


def test_tables_kept_beside_other_records_files_are_regenerated_too(tmp_path):
    """Reproductions and tuning folders keep tables made from their own records.jsonl: each must be what today's
    `python -m eval.tables --records <that file>` makes (they had kept the retired 2-SE rule's verdicts)."""
    from eval.records import ROOT
    from eval.tables import write_tables

    checked = 0
    for records in sorted((ROOT / "results").rglob("records.jsonl")):
        if records == ROOT / "results" / "records.jsonl":
            continue
        kept = [p for folder in (records.parent, records.parent / "tables") for p in sorted(folder.glob("*.md"))
                if "Generated by `python -m eval.tables`" in p.read_text()]
        if not kept:
            continue
        out = tmp_path / records.parent.name
        fresh = {p.name: p for p in write_tables(records, out)}
        for path in kept:
            assert path.name in fresh and path.read_text() == fresh[path.name].read_text(), (
                f"{path} differs from its records: python -m eval.tables --records {records.relative_to(ROOT)} --out ...")
            checked += 1
    assert checked >= 3


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


def test_merge_appends_only_what_the_records_file_lacks_and_refuses_another_model(tmp_path):
    """Merging a copy of the records made before some were superseded re-appended them as current (append_record
    only compares with current records); a record of another trained model of the same preset, seed and scale is
    refused with nothing written."""
    import json

    from eval.records import OtherModelError, load_records, merge, supersede

    def rec(seed, metric, value, weights="w0", **extra):
        return {"experiment": "scaling", "benchmark": "digits16/c32", "method": "baseline", "scale": "mini",
                "preset": "mini-p", "seed": seed, "metric": metric, "value": value, "n_samples": 1000,
                "checkpoint": 2000, "ema": True, "sampler": "ddpm-250-noclip", "reference": "r", "backend": "b",
                "git_commit": "c", "time": "t", "train_config_sha256": "cfg", "weights_sha256": weights,
                "overrides": {}, **extra}

    dest, source = tmp_path / "records.jsonl", tmp_path / "grid.jsonl"
    old = [rec(0, "fd_digits", 1.0), rec(0, "kid_digits", 0.1)]
    dest.write_text("".join(json.dumps(r) + "\n" for r in old))
    source.write_text(dest.read_text())  # the grid started from a copy
    supersede("re-measured", dest, metric="kid_digits")
    fresh = [rec(1, "fd_digits", 2.0, weights="w1"), rec(2, "fd_digits", 3.0, weights="w2")]
    with source.open("a") as f:
        f.write("".join(json.dumps(r) + "\n" for r in fresh))
    assert merge(source, dest) == (2, 2)
    held = load_records(dest)
    assert [(r["seed"], r["metric"], bool(r.get("superseded"))) for r in held] == [
        (0, "fd_digits", False), (0, "kid_digits", True), (1, "fd_digits", False), (2, "fd_digits", False)]
    assert merge(source, dest) == (0, 4)  # idempotent

    before = dest.read_bytes()
    other = tmp_path / "gpu.jsonl"  # seed 1 retrained elsewhere, and a new seed: nothing is written
    other.write_text(json.dumps(rec(3, "fd_digits", 4.0, weights="w3")) + "\n"
                     + json.dumps(rec(1, "kid_digits", 0.2, weights="gpu")) + "\n")
    with pytest.raises(OtherModelError, match="seed=1"):
        merge(other, dest)
    assert dest.read_bytes() == before


def test_merge_refuses_smoke_records_into_the_committed_file(tmp_path, monkeypatch):
    """A smoke-scale records file (gpu_call.sh with TINY=1) merged into results/records.jsonl is refused with nothing
    written, as is a smoke record appended there or a smoke run told to record there; into any other records file it
    merges as before."""
    import json

    import eval.records as records
    from eval.records import RecordError, merge
    from experiments.runner import main  # imported before RECORDS is patched below: the runner keeps the real one
    from experiments.unconditional import PRESETS

    smoke = {"experiment": "scaling", "benchmark": "digits32/c32", "method": "baseline", "scale": "smoke",
             "preset": "mini-gpu-digits32-scaling-c32-steps1500-baseline", "seed": 0, "metric": "fd_digits",
             "value": 1.0, "n_samples": 8, "checkpoint": 3, "ema": True, "sampler": "ddpm-2-noclip", "reference": "r",
             "backend": "b", "git_commit": "c", "time": "t", "overrides": {}}
    source, committed = tmp_path / "out.jsonl", tmp_path / "results" / "records.jsonl"
    source.write_text(json.dumps(smoke) + "\n")
    committed.parent.mkdir()
    committed.write_text("")
    monkeypatch.setattr(records, "RECORDS", committed)
    with pytest.raises(RecordError, match="1 smoke-scale record"):
        merge(source, committed)
    assert committed.read_text() == ""
    assert merge(source, tmp_path / "pilot.jsonl") == (1, 0)
    # the same class through the runner's writer, and the runner itself before any compute
    with pytest.raises(RecordError, match="smoke-scale"):
        records.append_record(smoke, committed)
    assert committed.read_text() == ""
    with pytest.raises(SystemExit):
        main("unconditional", PRESETS, "", ["--scale", "smoke", "--presets", "mini-digits16-baseline",
                                            "--runs-dir", str(tmp_path / "runs"), "--records", str(committed)])
    assert not (tmp_path / "runs").exists()
