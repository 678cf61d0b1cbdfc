"""Regenerate ``tables/*.md`` and ``tables/*.csv`` from result records and the paper's numbers.

    python -m eval.tables                                   # results/records.jsonl -> tables/
    python -m eval.tables --records R.jsonl --out DIR       # elsewhere (the golden-file test does this)

Per table: a *paper scale* block (the paper's numbers, with this repository's paper-scale numbers
beside them when it has any) and, per other scale, one block per protocol (sampler, training steps,
number of samples, reference set: records differing in any of these are never averaged together).
Each block gives mean +- std over training seeds, n, and each method's difference to the baseline of
the same protocol with a named test: the paired t-test by seed where both arms share their seeds,
Welch's t-test otherwise, its p, the 95% CI of the difference, and Holm-adjusted p across the
comparison's metrics. "Better"/"worse" means p < 0.05; everything else is "inconclusive". Records
carrying a ``superseded`` note (e.g. the mini runs first sampled with x0 clipping) keep their own
blocks, last and labelled with the note. Output has no timestamps: running it twice gives no diff.
"""

from __future__ import annotations

import argparse
import math
import warnings
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pandas as pd
from scipy import stats

from .metric_specs import higher_is_better  # noqa: F401 (eval.figures and the tests take it from here too)
from .records import RECORDS, ROOT, load_records

PAPER = Path(__file__).resolve().parent / "paper_numbers.csv"
# Where ``python -m eval.tables`` and ``python -m eval.figures`` find the table specs when none are given: every
# ``*/table.yaml`` one folder below (one per experiment package; :func:`table_specs`). eval reads these as data and
# imports nothing from the experiments, which hand their specs in (``experiments.registry``).
SPECS = ROOT / "experiments"


class TableError(ValueError):
    pass


@dataclass(frozen=True)
class Borrow:
    """Rows a table shows from another experiment's records (the same runs, never re-measured).

    ``methods`` maps the source's method names to the names shown; ``benchmarks`` limits the benchmarks (None: all).
    By default rows are borrowed only into blocks (scale and protocol) and benchmarks where the table has records
    of its own; ``new_blocks`` borrows them wherever the source has them (rows that stand in for the table's own).
    """

    source: str
    methods: dict
    benchmarks: tuple | None = None
    new_blocks: bool = False


@dataclass(frozen=True)
class FigureSpec:
    """The bar figure drawn from a table's rows (``eval.figures``): ``file`` under ``figures/``; ``kind``
    ``grouped`` (:func:`eval.figures.grouped`: a panel per metric of ``metrics``, bars per benchmark and method,
    the baseline first, then ``order``, ticks renamed by ``labels``) or ``decoding_efficiency``
    (:func:`eval.figures.decoding_efficiency`: quality bars with the step time as markers); ``title`` heads it."""

    file: str
    title: str
    kind: str = "grouped"
    order: tuple[str, ...] = ()
    labels: dict = field(default_factory=dict)
    metrics: tuple[str, ...] = ("fd_digits", "confident_digits")


@dataclass(frozen=True)
class TableSpec:
    """What an experiment's table and figure need, declared by the experiment (its ``table.yaml``).

    ``name``: the experiment (records' ``experiment`` field; ``tables/<name>.md``). ``title``: the table's heading.
    ``comparisons``: (method, reference method) pairs tested besides "each method vs the baseline", where RESULTS.md
    states an ordering between two variants. ``borrowed``: rows shown from other experiments' records
    (:class:`Borrow`). ``paper_baseline``: the paper's row the baseline presets reproduce at paper scale (its number
    and ours share a line when the protocols match). ``figure``: its bar figure, if any (:class:`FigureSpec`).
    """

    name: str
    title: str
    comparisons: tuple[tuple[str, str], ...] = ()
    borrowed: tuple[Borrow, ...] = ()
    paper_baseline: str | None = None
    figure: FigureSpec | None = None


def read_table_spec(path: Path) -> TableSpec:
    """The :class:`TableSpec` of ``path`` (``<experiment>/table.yaml``; the experiment is the folder's name).

    Keys: ``title`` (required), ``comparisons`` (a list of [method, reference] pairs), ``borrowed`` (a list of
    mappings with the fields of :class:`Borrow`), ``paper_baseline``, ``figure`` (the fields of :class:`FigureSpec`).
    Raises ``TableError`` naming the file for a missing title, an unknown key or a malformed entry.
    """
    import yaml

    path = Path(path)
    d = yaml.safe_load(path.read_text()) or {}
    known = {"title", "comparisons", "borrowed", "paper_baseline", "figure"}
    if not isinstance(d, dict) or "title" not in d or set(d) - known:
        raise TableError(f"{path}: a mapping with a title and only the keys {sorted(known)} expected; got "
                         f"{sorted(d) if isinstance(d, dict) else type(d).__name__}")
    try:
        comparisons = tuple((str(m), str(ref)) for m, ref in d.get("comparisons") or [])
        borrowed = tuple(Borrow(**{**b, "benchmarks": tuple(b["benchmarks"]) if b.get("benchmarks") else None})
                         for b in d.get("borrowed") or [])
        figure = d.get("figure")
        if figure is not None:
            figure = FigureSpec(**{k: tuple(v) if k in ("order", "metrics") else v for k, v in figure.items()})
    except (TypeError, ValueError) as e:
        raise TableError(f"{path}: {e}") from e
    if figure is not None and figure.kind not in ("grouped", "decoding_efficiency"):
        raise TableError(f"{path}: figure kind {figure.kind!r}; expected grouped or decoding_efficiency")
    return TableSpec(path.parent.name, d["title"], comparisons, borrowed, d.get("paper_baseline"), figure)


def table_specs(folder: Path = SPECS) -> dict[str, TableSpec]:
    """Every ``folder/*/table.yaml`` as {experiment: :class:`TableSpec`}, by folder name."""
    return {spec.name: spec for spec in map(read_table_spec, sorted(Path(folder).glob("*/table.yaml")))}


BASELINE = "baseline"


def fmt(x: float) -> str:
    if x is None or (isinstance(x, float) and math.isnan(x)):
        return "n/a"
    return f"{x:.4g}" if abs(x) >= 1e-3 or x == 0 else f"{x:.2e}"


def mean_std(mean: float, std: float, n: int) -> str:
    return f"{fmt(mean)} (n={n})" if n < 2 else f"{fmt(mean)} ± {fmt(std)} (n={n})"


# A cell holds the records of one protocol: the same scale, sampler, training length (checkpoint), number of
# samples and reference set. Records differing in any of these are never averaged together.
PROTOCOL = ["checkpoint", "n_samples", "reference"]
# "pilot": records of a run whose training keys were overridden against its preset (their "overrides" field): never
# one cell with the preset's own runs, and never in the paper-scale block beside the paper's numbers.
BLOCK = ["experiment", "scale", "superseded", "pilot", "sampler", *PROTOCOL]
CELL = [*BLOCK, "benchmark", "method", "metric"]
ALPHA = 0.05
def with_borrowed(summary: pd.DataFrame, specs: dict[str, TableSpec] | None = None) -> pd.DataFrame:
    """Add the rows each table borrows (``TableSpec.borrowed``; ``specs`` default :func:`table_specs`): another
    experiment's cells, relabelled, where the table has no cell of that method, and (unless ``new_blocks``) only in
    the blocks (scale and protocol) and benchmarks where the table has records of its own. The borrowed rows follow
    the summary's: first those shown to compare against, then those standing in for a table's own (``new_blocks``),
    each group in ``specs`` order (the verdicts list comparisons in row order)."""
    where = BLOCK[1:] + ["benchmark"]  # a block of a table, on one benchmark
    extra = []
    for table, spec in (table_specs() if specs is None else specs).items():
        sources = spec.borrowed
        own = summary[summary["experiment"] == table]
        blocks = set(map(tuple, own[where].values.tolist()))
        have = set(map(tuple, own[CELL].values.tolist()))
        for b in sources:
            rows = summary[(summary["experiment"] == b.source) & summary["method"].isin(list(b.methods))
                           & (summary["benchmark"].isin(b.benchmarks) if b.benchmarks else True)]
            rows = rows.assign(experiment=table, method=rows["method"].map(b.methods))
            keep = [(b.new_blocks or tuple(w) in blocks) and tuple(c) not in have
                    for w, c in zip(rows[where].values.tolist(), rows[CELL].values.tolist())]
            extra.append((b.new_blocks, rows[keep]))
    extra = [rows for _, rows in sorted(extra, key=lambda e: e[0])]  # stable: spec order within each group
    return pd.concat([summary, *extra], ignore_index=True) if extra else summary


def pilot_label(overrides) -> str:
    """``""`` for a run of its preset's own config (or a record older than the ``overrides`` field), else the
    overridden training keys, e.g. ``train.steps=3, train.batch_size=2``."""
    if not isinstance(overrides, dict) or not overrides:
        return ""
    return ", ".join(f"{k}={v}" for k, v in sorted(overrides.items()))


def summarize(records: list[dict]) -> pd.DataFrame:
    """One row per cell (``CELL``: experiment, scale, superseded, sampler, checkpoint, n_samples, reference,
    benchmark, method, metric): mean, std, n, seeds, the per-seed values and the devices.

    Raises ``TableError`` naming the records when one cell holds two records of the same seed (a run measured
    twice with the same protocol): which one counts is not the table's to guess.
    """
    out_cols = CELL + ["mean", "std", "n", "seeds", "values", "devices"]
    if not records:
        return pd.DataFrame(columns=out_cols)
    df = pd.DataFrame(records)
    for optional in ("device", "superseded"):
        df[optional] = df[optional].fillna("") if optional in df else ""
    df["pilot"] = [pilot_label(o) for o in (df["overrides"] if "overrides" in df else [None] * len(df))]
    twice = df[df.duplicated(CELL + ["seed"], keep=False)]
    if not twice.empty:
        shown = twice[["experiment", "preset", "seed", "checkpoint", "n_samples", "sampler", "metric", "value", "time"]]
        raise TableError("records measured twice with the same protocol (same preset, seed, checkpoint, samples, "
                         "sampler, reference and metric); remove or mark one superseded:\n"
                         + shown.to_string(index=False))
    g = df.sort_values("seed").groupby(CELL, sort=True)
    out = g["value"].agg(mean="mean", std="std", n="count").reset_index()
    out["seeds"] = g["seed"].agg(lambda s: ",".join(map(str, s))).values
    out["values"] = g.apply(lambda d: dict(zip(d["seed"], d["value"])), include_groups=False).values
    out["devices"] = g["device"].agg(lambda s: "; ".join(sorted(set(s) - {""}))).values
    return out[out_cols]


@dataclass(frozen=True)
class Comparison:
    """``method`` minus ``reference`` on one metric: Δ of the means, the 95% CI of Δ and p of the deciding test.

    ``test`` is ``paired`` (paired t-test by seed; both arms have the same seeds, n >= 2) or ``welch`` (Welch's
    unequal-variance t-test; n >= 2 per arm), or ``""`` when neither applies (then p and the CI are NaN).
    ``p_welch`` is given whenever both arms have n >= 2, so a table can show both.
    """

    delta: float
    ci_low: float
    ci_high: float
    p: float
    test: str
    p_welch: float


def compare(method: dict[int, float], reference: dict[int, float], confidence: float = 0.95) -> Comparison:
    """Compare two arms given as ``{training seed: value}``.

    Paired t-test by seed (``scipy.stats.ttest_rel``) on the seeds both arms share, when they share at least 2: a
    seed fixes the initial weights, the data order and the noise, so each seed is a block. Then Δ is the mean
    paired difference over those seeds (equal to the difference of the means when the arms have the same seeds).
    Welch's t-test (``scipy.stats.ttest_ind(equal_var=False)``) on all values otherwise, Δ = mean(method) -
    mean(reference). Two-sided; the CI uses the same test's t quantile (Welch-Satterthwaite degrees of freedom
    for Welch). ``test`` is ``paired``, ``paired on seeds 0,1,2`` (a subset of either arm), ``welch`` or ``""``.
    """
    a, b = np.array(list(method.values()), float), np.array(list(reference.values()), float)
    nan = math.nan
    # Values of no spread up to float rounding (two seeds whose differences are both -0.049) make t infinite:
    # scipy then reports p = 0 or 1e-16 and a zero-width CI. No t-test is defined there: p and CI are NaN.
    rounding = 1e-9 * max(1e-300, *np.abs(a), *np.abs(b)) if len(a) and len(b) else 0.0

    def no_spread(v) -> bool:
        return float(np.ptp(v)) <= rounding
    p_welch, welch = nan, None
    shared = sorted(set(method) & set(reference))
    with np.errstate(all="ignore"), warnings.catch_warnings():
        warnings.simplefilter("ignore")
        if len(a) >= 2 and len(b) >= 2 and not (no_spread(a) and no_spread(b)):
            welch = stats.ttest_ind(a, b, equal_var=False)
            p_welch = float(welch.pvalue)
        if len(shared) >= 2:
            x, y = [method[s] for s in shared], [reference[s] for s in shared]
            test = "paired" if len(shared) == len(a) == len(b) else "paired on seeds " + ",".join(map(str, shared))
            if no_spread(np.subtract(x, y)):
                return Comparison(float(np.mean(x) - np.mean(y)), nan, nan, nan, test, p_welch)
            res = stats.ttest_rel(x, y)
            ci = res.confidence_interval(confidence)
            return Comparison(float(np.mean(x) - np.mean(y)), float(ci.low), float(ci.high), float(res.pvalue), test,
                              p_welch)
        delta = float(a.mean() - b.mean())
        if welch is not None:
            ci = welch.confidence_interval(confidence)
            return Comparison(delta, float(ci.low), float(ci.high), p_welch, "welch", p_welch)
        if len(a) >= 2 and len(b) >= 2:  # both arms without spread: Welch's test is not defined
            return Comparison(delta, nan, nan, nan, "welch", nan)
    return Comparison(delta, nan, nan, nan, "", p_welch)


def holm(pvalues: list[float]) -> list[float]:
    """Holm-Bonferroni adjusted p-values (Holm 1979), same order as given; NaNs stay NaN and are not counted."""
    idx = sorted((i for i, p in enumerate(pvalues) if not math.isnan(p)), key=lambda i: pvalues[i])
    out, running = [math.nan] * len(pvalues), 0.0
    for rank, i in enumerate(idx):
        running = max(running, min(1.0, (len(idx) - rank) * pvalues[i]))
        out[i] = running
    return out


def verdict(c: Comparison, metric: str, p_holm: float) -> str:
    """``better``/``worse`` only at p < ALPHA of the deciding test; ``(not after Holm)`` when the Holm-adjusted p
    across the comparison's metrics is not below ALPHA."""
    if not c.test:
        return "n < 2 seeds"
    if math.isnan(c.p) or c.p >= ALPHA:
        return "inconclusive"
    better = c.delta > 0 if higher_is_better(metric) else c.delta < 0
    return ("better" if better else "worse") + ("" if p_holm < ALPHA else " (not after Holm)")


def with_deltas(summary: pd.DataFrame, specs: dict[str, TableSpec] | None = None) -> pd.DataFrame:
    """Add, for every method other than the baseline, its comparison with the baseline of the same cell
    protocol (and the table's ``TableSpec.comparisons``; ``specs`` default :func:`table_specs`): ``vs``, ``delta``, ``ci_low``, ``ci_high``, ``test``,
    ``p``, ``p_welch``, ``p_holm`` (Holm across the metrics of one method-vs-reference comparison in one block)
    and ``verdict``."""
    extra = ["vs", "delta", "ci_low", "ci_high", "test", "p", "p_welch", "p_holm", "verdict"]
    specs = table_specs() if specs is None else specs
    rows, comparisons = [], {}  # comparisons: row position -> its Comparison, for the verdict after Holm
    by_key = {tuple(r[k] for k in CELL): r for r in summary.to_dict("records")}
    for r in summary.to_dict("records"):
        # a variant's own baseline ("baseline-<variant>") is compared only as the table's comparisons say
        refs = [] if r["method"] == BASELINE or r["method"].startswith(BASELINE + "-") else [BASELINE]
        spec = specs.get(r["experiment"])
        refs += [ref for m, ref in (spec.comparisons if spec else ()) if m == r["method"]]
        if len(refs) > 1 and by_key.get(tuple({**r, "method": BASELINE}[k] for k in CELL)) is None:
            refs.remove(BASELINE)  # the block has no plain baseline, but the row has its own reference
        if BASELINE not in refs:  # a row of its own (its mean), then any comparisons the table asks for
            rows.append({**r, **dict.fromkeys(extra, ""), "delta": math.nan, "p": math.nan, "p_holm": math.nan})
        for ref in refs:
            base = by_key.get(tuple({**r, "method": ref}[k] for k in CELL))  # the reference's cell, same protocol
            if base is None:
                rows.append({**r, **dict.fromkeys(extra, ""), "vs": ref, "delta": math.nan, "p": math.nan,
                             "p_holm": math.nan, "verdict": f"no {ref} with this protocol"})
                continue
            c = compare(r["values"], base["values"])
            comparisons[len(rows)] = c
            rows.append({**r, "vs": ref, "delta": c.delta, "ci_low": c.ci_low, "ci_high": c.ci_high, "test": c.test,
                         "p": c.p, "p_welch": c.p_welch, "p_holm": math.nan, "verdict": ""})
    out = pd.DataFrame(rows, columns=list(summary.columns) + extra)
    # Holm across the quality metrics of one comparison (block, benchmark, method, reference); step time is a
    # cost, not a quality claim, and is its own family.
    out["_cost"] = out["metric"] == "step_time_s"
    for _, family in out[out["vs"] != ""].groupby(BLOCK + ["benchmark", "method", "vs", "_cost"], sort=False):
        adjusted = holm([float(p) for p in family["p"]])
        for i, p_adj in zip(family.index, adjusted):
            out.at[i, "p_holm"] = p_adj
    for i, c in comparisons.items():
        out.at[i, "verdict"] = verdict(c, out.at[i, "metric"], out.at[i, "p_holm"])
    return out.drop(columns="_cost")


def fmt_p(p: float) -> str:
    if p is None or (isinstance(p, float) and math.isnan(p)) or p == "":
        return ""
    return "<0.001" if p < 0.001 else f"{p:.2g}" if p < 0.1 else f"{p:.2f}"


def _text(x) -> str:
    return "" if x is None or (isinstance(x, float) and math.isnan(x)) else str(x)


def shown_path(path: Path) -> str:
    """``path`` relative to the repository when inside it (tables must not depend on where it is cloned)."""
    path = Path(path).resolve()
    return str(path.relative_to(ROOT)) if path.is_relative_to(ROOT) else path.name


def render(spec: TableSpec, summary: pd.DataFrame, paper: pd.DataFrame, records: str = "results/records.jsonl") -> str:
    """``tables/<spec.name>.md``: the paper-scale block, then one block per other scale and protocol."""
    name = spec.name
    lines = [f"# {spec.title}", "",
             f"Generated by `python -m eval.tables` from `{records}` and `eval/paper_numbers.csv`; do not edit.", "",
             VERDICT_RULE, ""]
    ours = summary[summary["experiment"] == name]
    p = paper[paper["table"] == name]
    for b in spec.borrowed:
        if b.benchmarks and not set(ours["benchmark"]) & set(b.benchmarks):
            continue  # nothing of this table runs on those benchmarks yet: nothing borrowed
        shown = ", ".join(k if k == v else f"{v} (its {k})" for k, v in b.methods.items())
        lines += [f"Rows {shown}{' of ' + ', '.join(b.benchmarks) if b.benchmarks else ''} are the `{b.source}` "
                  "table's records (the same runs), shown here" + (" as this table's rows." if b.new_blocks
                                                                  else " to compare against."), ""]
    # Paper scale: the paper's numbers, each with its protocol; ours on the same line only where the protocol is
    # the same (paper_numbers.csv's our_metric, or the same metric name), else on lines of their own.
    lines += ["## Paper scale", "",
              "| Benchmark | Method | Metric | Paper | Paper's protocol | This repo (mean ± std, n) | Source |",
              "|---|---|---|---|---|---|---|"]
    ours_paper = ours[(ours["scale"] == "paper") & (ours["pilot"] == "") & ours["vs"].isin(["", BASELINE])]
    used = set()
    for r in p.sort_values(["benchmark", "method", "metric"]).itertuples(index=False):
        same = ours_paper[(ours_paper["benchmark"] == r.benchmark)
                          & ours_paper["method"].isin({r.method, BASELINE} if spec.paper_baseline == r.method
                                                      else {r.method})
                          & ours_paper["metric"].isin({r.metric, _text(getattr(r, "our_metric", ""))} - {""})]
        used |= set(same.index)
        our_val = "; ".join(f"{mean_std(o.mean, o.std, o.n)} ({o.metric})" for o in same.itertuples()) or "not run"
        lines.append(f"| {r.benchmark} | {r.method} | {r.metric} | {fmt(float(r.value))} | "
                     f"{_text(getattr(r, 'protocol', '')) or 'not stated'} | {our_val} | {r.source} |")
    for o in ours_paper.drop(index=list(used)).sort_values(["benchmark", "method", "metric"]).itertuples():
        lines.append(f"| {o.benchmark} | {o.method} | {o.metric} | n/a | | {mean_std(o.mean, o.std, o.n)} "
                     "| this repository |")
    if p.empty and ours_paper.empty:
        lines.append("| n/a | n/a | n/a | n/a | | not run | the paper reports no values |")
    # Other scales, one block per protocol (current ones first): ours, with the comparison to the baseline.
    # Paper-scale pilots (training overridden) come last, in blocks of their own.
    pilots = ours[(ours["scale"] == "paper") & (ours["pilot"] != "")]
    for scale in sorted(set(ours["scale"]) - {"paper"}) + (["paper"] if not pilots.empty else []):
        lines += ["", f"## Scale: {scale}" + (" (pilot runs: not the paper presets' numbers)" if scale == "paper" else "")]
        at_scale = pilots if scale == "paper" else ours[ours["scale"] == scale]
        blocks = sorted(at_scale.groupby(BLOCK[2:], sort=False),
                        key=lambda kv: (kv[0][0] != "", kv[0][1] != "", *map(str, kv[0])))
        for (superseded, pilot, sampler, checkpoint, n_samples, reference), block in blocks:
            lines += ["", f"### Sampler `{sampler}`, {checkpoint:,} training steps, {n_samples:,} samples"
                      + (" (superseded)" if superseded else "") + (" (pilot)" if pilot else ""), ""]
            lines += [f"Superseded: {superseded}", ""] if superseded else []
            lines += [f"Pilot: trained with the preset's training keys overridden ({pilot}); not the preset's "
                      "numbers.", ""] if pilot else []
            lines += [f"Reference set: {reference}.", "", *_devices(block),
                      "| Benchmark | Method | Metric | Paper | This repo (mean ± std, n) | Δ vs baseline [95% CI] "
                      "| p (test) | p Holm | Verdict |",
                      "|---|---|---|---|---|---|---|---|---|"]
            main = block[block["vs"].isin(["", BASELINE])]
            for r in main.sort_values(["benchmark", "metric", "method"], key=_baseline_first).itertuples(index=False):
                arrow = "↑" if higher_is_better(r.metric) else "↓"
                lines.append(f"| {r.benchmark} | {r.method} | {r.metric} {arrow} | n/a | {mean_std(r.mean, r.std, r.n)} "
                             f"| {_delta(r)} | {_p(r)} | {fmt_p(r.p_holm)} | {r.verdict} |")
            others = block[~block["vs"].isin(["", BASELINE])]
            if not others.empty:
                lines += ["", "Comparisons between variants (same rule):", "",
                          "| Benchmark | Metric | Method | vs | Δ (method − vs) [95% CI] | p (test) | p Holm | Verdict |",
                          "|---|---|---|---|---|---|---|---|"]
                for r in others.sort_values(["benchmark", "method", "vs", "metric"]).itertuples(index=False):
                    arrow = "↑" if higher_is_better(r.metric) else "↓"
                    lines.append(f"| {r.benchmark} | {r.metric} {arrow} | {r.method} | {r.vs} | {_delta(r)} | {_p(r)} "
                                 f"| {fmt_p(r.p_holm)} | {r.verdict} |")
    return "\n".join(lines) + "\n"


VERDICT_RULE = (
    "Verdict: better or worse only where the deciding test gives p < 0.05, two-sided: the paired t-test by "
    "training seed on the seeds both arms share (`paired`, or `paired on seeds …` when one arm has more seeds; Δ "
    "is then the mean paired difference), Welch's t-test on all seeds when fewer than 2 are shared (`welch`). The "
    "95% CI of Δ comes from the same test. `p Holm` is Holm-adjusted across the quality metrics of one comparison "
    "(step time is its own family); a verdict that does not survive it says `(not after Holm)`. Anything else is "
    "inconclusive.")


def _delta(r) -> str:
    if isinstance(r.delta, str) or math.isnan(r.delta):
        return ""
    sign = lambda x: ("+" if x >= 0 else "") + fmt(x)  # noqa: E731
    ci = "" if r.ci_low == "" or math.isnan(r.ci_low) else f" [{sign(r.ci_low)}, {sign(r.ci_high)}]"
    return sign(r.delta) + ci


def _p(r) -> str:
    return f"{fmt_p(r.p)} ({r.test})" if r.test else ""


def _devices(block: pd.DataFrame) -> list[str]:
    """Which rows were trained and measured on which device (step times compare only within one)."""
    on: dict[str, dict[str, set]] = {}  # device -> benchmark -> methods
    for r in block.itertuples(index=False):
        for d in filter(None, r.devices.split("; ")):
            on.setdefault(d, {}).setdefault(r.benchmark, set()).add(r.method)
    if not on:
        return []
    order = lambda ms: ", ".join(sorted(ms, key=lambda m: (m != BASELINE, m)))  # noqa: E731
    benches, lines = set(block["benchmark"]), ["Trained and measured on:", ""]
    for d, by_bench in sorted(on.items()):
        if set(by_bench) == benches and len({frozenset(m) for m in by_bench.values()}) == 1:
            lines.append(f"- {d}: {order(next(iter(by_bench.values())))}")
        else:
            lines.append(f"- {d}: " + "; ".join(f"{b} ({order(m)})" for b, m in sorted(by_bench.items())))
    return lines + [""]


def _baseline_first(col: pd.Series) -> pd.Series:
    return col.map(lambda m: "" if m == BASELINE else m) if col.name == "method" else col


def write_tables(records_path: Path = RECORDS, out_dir: Path = ROOT / "tables", paper_path: Path = PAPER,
                 specs: dict[str, TableSpec] | None = None) -> list[Path]:
    """Write ``<name>.md`` and ``<name>.csv`` per table of ``specs`` (default :func:`table_specs`) and
    ``verdicts.md`` under ``out_dir``; returns the paths written. Raises ``TableError`` (see :func:`summarize`)."""
    specs = table_specs() if specs is None else specs
    summary = with_deltas(with_borrowed(summarize(load_records(records_path)), specs), specs)
    paper = pd.read_csv(paper_path)
    out_dir.mkdir(parents=True, exist_ok=True)
    written = []
    for name, spec in specs.items():
        md = out_dir / f"{name}.md"
        md.write_text(render(spec, summary, paper, shown_path(records_path)))
        csv = out_dir / f"{name}.csv"
        rows = summary[summary["experiment"] == name].copy()
        rows["values"] = rows["values"].map(lambda v: ";".join(f"{x:.6g}" for x in v.values()))
        if (rows["pilot"] == "").all():  # the column only where a pilot is (the CSVs kept their columns before it)
            rows = rows.drop(columns="pilot")
        rows.to_csv(csv, index=False, float_format="%.6g")
        written += [md, csv]
    verdicts = out_dir / "verdicts.md"
    verdicts.write_text(render_verdicts(summary, shown_path(records_path)))
    return written + [verdicts]


def render_verdicts(summary: pd.DataFrame, records: str) -> str:
    """Every comparison of the current (not superseded) blocks, one line per comparison: its significant metrics.

    The one place RESULTS.md and README.md take a "better" or "worse" from.
    """
    lines = ["# Verdicts", "", f"Generated by `python -m eval.tables` from `{records}`; do not edit. Current records "
             "only (superseded blocks are in each table). Per comparison (a method against the baseline, or against "
             "another variant, in one block: table, scale, sampler, training steps, samples), the quality metrics "
             "whose difference is significant (p < 0.05; step time left out) and how many are inconclusive.", "",
             VERDICT_RULE, "",
             "| Table | Scale | Sampler, steps, samples | Benchmark | Method | vs | n | Better (p; Holm) | Worse (p; Holm) "
             "| Inconclusive |", "|---|---|---|---|---|---|---|---|---|---|"]
    cur = summary[(summary["superseded"] == "") & (summary["pilot"] == "") & (summary["vs"] != "")
                  & (summary["metric"] != "step_time_s")
                  & ~summary["verdict"].astype(str).str.startswith("no ")]  # a reference not measured yet: no comparison
    keys = ["experiment", "scale", "sampler", "checkpoint", "n_samples", "benchmark", "method", "vs"]
    for key, g in cur.groupby(keys, sort=False):
        exp, scale, sampler, ck, ns, bench, method, vs = key
        cell = lambda word: "; ".join(  # noqa: E731
            f"{r.metric} ({fmt_p(r.p)}; {fmt_p(r.p_holm)})" for r in g.itertuples() if r.verdict.startswith(word)) or "–"
        n = "/".join(sorted({f"{r.n}" for r in g.itertuples()}))
        lines.append(f"| {exp} | {scale} | {sampler}, {ck:,}, {ns:,} | {bench} | {method} | {vs} | {n} | {cell('better')} "
                     f"| {cell('worse')} | {int((g['verdict'] == 'inconclusive').sum())} of {len(g)} |")
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--records", type=Path, default=RECORDS)
    parser.add_argument("--out", type=Path, default=ROOT / "tables")
    parser.add_argument("--paper", type=Path, default=PAPER)
    parser.add_argument("--specs", type=Path, default=SPECS,
                        help="folder whose */table.yaml declare the tables (default: the experiment packages)")
    args = parser.parse_args(argv)
    for path in write_tables(args.records, args.out, args.paper, table_specs(args.specs)):
        print(path)


if __name__ == "__main__":
    main()
