"""Regenerate ``figures/*.png`` from committed results (records, training curves, sample grids).

    python -m eval.figures                       # results/records.jsonl -> figures/
    python -m eval.figures --specs DIR           # the tables' specs from DIR/*/table.yaml (default experiments/)

* one bar figure per table whose spec (``eval.tables.TableSpec.figure``, declared in the experiment's
  ``table.yaml``) asks for one: ``grouped`` draws each of its metrics (``fd_digits`` and ``confident_digits`` unless
  the spec says otherwise) in a panel, a bar per benchmark and method (mean +- std over seeds), a group per
  benchmark and protocol where a table holds more than one (e.g. a reading sampled with DDPM-250 and DDIM-50);
  ``decoding_efficiency`` (the paper's Figure 4 analogue) draws quality as bars and the measured training time per
  step as markers on a second axis;
* ``curves_<experiment>.png``: point and context loss over training, one line per run, a row per scale;
* ``samples_<experiment>.png``: the sample grid of seed 0 of each preset.
Records marked ``superseded`` and pilot records (training keys overridden) are left out. Figures without current records are skipped (listed, and
an older file of that name removed). Output is deterministic.
"""

from __future__ import annotations

import argparse
import textwrap
from collections import Counter
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import pandas as pd  # noqa: E402

from core.runlog import read_jsonl, split_run_name  # noqa: E402

from .records import RECORDS, ROOT, SCALES, load_records, scale_of  # noqa: E402
from .tables import SPECS, TableSpec, higher_is_better, summarize, table_specs, with_borrowed  # noqa: E402

RESULTS = ROOT / "results"
SAVE = {"dpi": 120, "metadata": {"Software": None}}
SAMPLE_COLUMNS = 6


def _save(fig, out: Path) -> Path:
    fig.tight_layout()
    fig.savefig(out, **SAVE)
    plt.close(fig)
    return out


def _bars(ax, df: pd.DataFrame, label: str, color: str = "tab:blue"):
    ax.bar(range(len(df)), df["mean"], yerr=df["std"].fillna(0), color=color, capsize=3)
    ax.set_xticks(range(len(df)), [f"{m}\n(n={n})" for m, n in zip(df["method"], df["n"])], fontsize=8)
    ax.set_ylabel(label)


def decoding_efficiency(summary: pd.DataFrame, experiment: str, out: Path, title: str = "Context decoding variants",
                        metric: str = "fd_digits") -> Path | None:
    """Quality (``metric``) per method of ``experiment`` as bars, its training time per step (``step_time_s``) as
    markers on a second axis; None when ``metric`` has no rows."""
    d = summary[summary["experiment"] == experiment]
    quality, timing = d[d["metric"] == metric], d[d["metric"] == "step_time_s"]
    if quality.empty:
        return None
    quality = quality.sort_values("method").reset_index(drop=True)
    fig, ax = plt.subplots(figsize=(7, 4))
    _bars(ax, quality, f"{metric} (lower is better)")
    if not timing.empty:
        t = quality[["method"]].merge(timing, on="method", how="left")
        ax2 = ax.twinx()
        # Markers, not a line: variants whose runs shared a device record no step time (gaps).
        ax2.plot(range(len(t)), t["mean"], "o", color="tab:red")
        for i, (n_time, n_quality) in enumerate(zip(t["n"], quality["n"])):
            if pd.notna(n_time) and n_time < n_quality:  # fewer timed runs than scored ones (shared-device runs)
                ax2.annotate(f"n={int(n_time)}", (i, t["mean"].iloc[i]), xytext=(6, -3), textcoords="offset points",
                             fontsize=7, color="tab:red")
        ax2.set_ylim(0, 1.15 * t["mean"].max())
        devices = "; ".join(sorted(set(timing["devices"]) - {""}))
        ax2.set_ylabel("training time per step (s)" + (f"\n{devices}" if devices else ""), color="tab:red")
        fig.text(0.01, 0.01, "step times: median of each run's own log; runs in different sessions differ by up to ~25%",
                 fontsize=7, color="tab:red")
    ax.set_title(f"{title} ({quality['scale'].iloc[0]} scale)")
    return _save(fig, out)


def bar_layout(d: pd.DataFrame, order: tuple[str, ...] = ()) -> list[tuple[float, str, str]]:
    """(x, benchmark, method) of each bar: per benchmark only the methods it has, the baseline first, then the
    methods in ``order``, then the rest by name; one empty slot between benchmarks."""
    rank = {m: i for i, m in enumerate(order)}
    key = lambda m: (m != "baseline", rank.get(m, len(rank)), m)  # noqa: E731
    bars, x = [], 0.0
    for bench in sorted(d["benchmark"].unique()):
        for method in sorted(d.loc[d["benchmark"] == bench, "method"].unique(), key=key):
            bars.append((x, bench, method))
            x += 1
        x += 1
    return bars


# The protocol of a cell beside its benchmark (eval.tables.BLOCK): bars of two protocols are never one comparison.
PROTOCOL_COLUMNS = ("scale", "sampler", "checkpoint", "n_samples", "reference")


def protocol_groups(d: pd.DataFrame) -> pd.Series:
    """The group each row's bar is drawn in: its benchmark, followed by the protocol columns (``PROTOCOL_COLUMNS``)
    that differ between the rows of ``d``: a reading measured under ancestral DDPM-250 and DDIM-50 gets a bar in
    each sampler's group, never one bar for whichever sampler came first. ``d``: summary rows of one experiment."""
    varying = [c for c in PROTOCOL_COLUMNS if c in d and d[c].nunique(dropna=False) > 1]

    def label(row) -> str:
        parts = [f"{row[c]:,} steps" if c == "checkpoint" else f"{row[c]:,} samples" if c == "n_samples"
                 else str(row[c]) for c in varying]
        return "\n".join([row["benchmark"], *parts])
    return d.apply(label, axis=1) if len(d) else pd.Series([], dtype=str)


def grouped(summary: pd.DataFrame, experiment: str, out: Path, title: str,
            metrics: tuple[str, ...] = ("fd_digits", "confident_digits"), order: tuple[str, ...] = (),
            labels: dict[str, str] | None = None) -> Path | None:
    """Bars per benchmark and method (mean ± std over seeds; the largest n in the tick label), one panel per metric.

    A method gets a bar only on the benchmarks it was measured on (``bar_layout``), and one colour
    throughout. Rows of different protocols (sampler, training steps, samples, reference, scale) are drawn in
    separate groups, each labelled with its protocol (``protocol_groups``). Metrics without records get no panel;
    returns None when none has records.
    """
    d = summary[summary["experiment"] == experiment]
    metrics = tuple(m for m in metrics if (d["metric"] == m).any())
    if not metrics:
        return None
    d = d[d["metric"].isin(metrics)]
    d = d.assign(benchmark=protocol_groups(d))  # a group per benchmark and protocol
    bars = bar_layout(d, order)
    methods = list(dict.fromkeys(m for _, _, m in bars))  # in order of first bar
    colour = {m: plt.cm.tab20(i % 20) if len(methods) > 10 else f"C{i}" for i, m in enumerate(methods)}

    def tick(bench: str, method: str) -> str:
        n = d[(d["benchmark"] == bench) & (d["method"] == method)]["n"]
        return f"{(labels or {}).get(method, method)} (n={int(n.max())})"

    ticks = [tick(b, m) for _, b, m in bars]
    # Rotated 40 degrees at 7 pt, a tick label needs about 0.035 in of height per character: the figure grows with
    # its longest label, so tight_layout never runs out of room (it warned, and clipped, on long method names).
    label_height = 0.035 * max(map(len, ticks))
    fig, axes = plt.subplots(len(metrics), 1, squeeze=False, sharex=True,
                             figsize=(max(7.0, 0.45 * (bars[-1][0] + 1) + 2.5), 2.8 * len(metrics) + 0.4 + label_height))
    for ax, metric in zip(axes[:, 0], metrics):
        for x, bench, method in bars:
            r = d[(d["benchmark"] == bench) & (d["method"] == method) & (d["metric"] == metric)]
            if len(r):
                ax.bar(x, r["mean"].iloc[0], 0.85, yerr=r["std"].fillna(0).iloc[0], capsize=2, color=colour[method])
        ax.set_ylabel(f"{metric}\n({'higher' if higher_is_better(metric) else 'lower'} is better)", fontsize=8)
        ax.tick_params(axis="y", labelsize=8)
    axes[-1, 0].set_xticks([x for x, _, _ in bars], ticks, rotation=40, ha="right", fontsize=7)
    for bench in sorted({b for _, b, _ in bars}):
        xs = [x for x, b, _ in bars if b == bench]
        axes[0, 0].annotate(bench, ((min(xs) + max(xs)) / 2, 1.0), xycoords=("data", "axes fraction"),
                            xytext=(0, 3), textcoords="offset points", ha="center", va="bottom", fontsize=9,
                            weight="bold")
    lines = max(b.count("\n") for _, b, _ in bars) + 1  # a protocol line under each benchmark's name
    axes[0, 0].set_title(f"{title} (mean ± std over seeds)", pad=16 + 11 * (lines - 1))
    return _save(fig, out)


def _scale_rank(scale: str) -> int:
    """Scales in SCALES order (mini, mini-long, mini-gpu, ...), names without a known scale last."""
    return SCALES.index(scale) if scale in SCALES else len(SCALES)


def curves(experiment: str, out: Path) -> Path | None:
    """One row per scale (read off the run names): point loss and context loss over steps, a line per run, one colour
    per preset (its seeds share it) and one legend entry per preset, beside the row."""
    files = sorted((RESULTS / "curves" / experiment).glob("*.jsonl"))
    if not files:
        return None
    by_scale: dict[str, list[Path]] = {}
    for f in files:
        by_scale.setdefault(scale_of(f.stem), []).append(f)
    scales = sorted(by_scale, key=_scale_rank)
    seeds = {scale: Counter(split_run_name(f.stem)[0] for f in by_scale[scale]) for scale in scales}  # per preset
    row_height = [max(3.5, 0.12 * len(seeds[s]) + 0.8) for s in scales]  # a legend line is about 0.12 in at 6 pt
    fig, axes = plt.subplots(len(scales), 2, figsize=(14, sum(row_height)), squeeze=False,
                             gridspec_kw={"height_ratios": row_height})
    for (point_ax, context_ax), scale in zip(axes, scales):
        names, labelled = list(seeds[scale]), set()
        for f in by_scale[scale]:
            rows, preset = read_jsonl(f), split_run_name(f.stem)[0]
            k, n = names.index(preset), seeds[scale][preset]
            # one colour per preset on both panels; tab20 when ten default colours would repeat
            steps, color = [r["step"] for r in rows], (plt.cm.tab20(k % 20) if len(names) > 10 else f"C{k}")
            label = "_nolegend_" if preset in labelled else f"{preset} ({n} seed{'s' if n > 1 else ''})"
            labelled.add(preset)
            point_ax.plot(steps, [r["point_loss"] for r in rows], label=label, lw=1, color=color)
            if "context_loss" in rows[0]:
                context_ax.plot(steps, [r["context_loss"] for r in rows], lw=1, color=color)
        point_ax.set(title=f"point (denoising) loss{f', scale {scale}' if scale else ''}", xlabel="step", yscale="log")
        context_ax.set(title="context loss (sum over strides of W2²)", xlabel="step")
        handles, labels = point_ax.get_legend_handles_labels()
        context_ax.legend(handles, labels, fontsize=6, loc="upper left", bbox_to_anchor=(1.02, 1.0), frameon=False)
    return _save(fig, out)


def samples(experiment: str, out: Path) -> Path | None:
    grids = sorted((RESULTS / "grids" / experiment).glob("*-s0.png"),
                   key=lambda g: (_scale_rank(scale_of(g.stem)), g.stem))
    if not grids:
        return None
    cols = min(SAMPLE_COLUMNS, len(grids))  # rows of at most SAMPLE_COLUMNS grids (readings' 13 made it 55 in wide)
    rows = -(-len(grids) // cols)
    fig, axes = plt.subplots(rows, cols, figsize=(4.2 * cols, 4.8 * rows), squeeze=False)
    for ax in axes.flat:
        ax.axis("off")
    for ax, g in zip(axes.flat, grids):
        ax.imshow(plt.imread(g), interpolation="nearest")
        ax.set_title(textwrap.fill(g.stem, 36), fontsize=9)  # breaks at hyphens: a long run name stays in its column
    return _save(fig, out)


def bar_figure(summary: pd.DataFrame, spec: TableSpec, out: Path) -> Path | None:
    """The bar figure ``spec.figure`` asks for, drawn from the rows of table ``spec.name`` (None: nothing to draw)."""
    f = spec.figure
    if f.kind == "decoding_efficiency":
        return decoding_efficiency(summary, spec.name, out, f.title)
    return grouped(summary, spec.name, out, f.title, f.metrics, f.order, f.labels or None)


def write_figures(records_path: Path = RECORDS, out_dir: Path = ROOT / "figures",
                  specs: dict[str, TableSpec] | None = None) -> tuple[list[Path], list[str]]:
    """Draw every figure whose inputs exist: the bar figures of ``specs`` (default :func:`eval.tables.table_specs`),
    then each experiment's curves and samples; returns (written paths, skipped names). A bar figure draws each
    protocol (sampler, training steps, ...) of its table in a group of its own (``protocol_groups``)."""
    out_dir.mkdir(parents=True, exist_ok=True)
    specs = table_specs() if specs is None else specs
    summary = with_borrowed(summarize([r for r in load_records(records_path)
                                       if not r.get("superseded") and not r.get("overrides")]), specs)  # no pilots
    bar_figures = {  # figure -> (the experiment it draws one bar per row of, how)
        spec.figure.file: (name, lambda p, spec=spec: bar_figure(summary, spec, p))
        for name, spec in specs.items() if spec.figure is not None}
    made, skipped = [], []
    jobs = {name: job for name, (_, job) in bar_figures.items()}
    for experiment in sorted({p.name for p in (RESULTS / "curves").glob("*")} if (RESULTS / "curves").exists() else []):
        jobs[f"curves_{experiment}.png"] = lambda p, e=experiment: curves(e, p)
        jobs[f"samples_{experiment}.png"] = lambda p, e=experiment: samples(e, p)
    for name, job in jobs.items():
        if job(out_dir / name):
            made.append(out_dir / name)
        else:
            skipped.append(name)
            (out_dir / name).unlink(missing_ok=True)  # a figure of records since superseded must not linger
    return made, skipped


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--records", type=Path, default=RECORDS)
    parser.add_argument("--out", type=Path, default=ROOT / "figures")
    parser.add_argument("--specs", type=Path, default=SPECS,
                        help="folder whose */table.yaml declare the tables and their figures (default: the experiment "
                             "packages)")
    args = parser.parse_args(argv)
    made, skipped = write_figures(args.records, args.out, table_specs(args.specs))
    for p in made:
        print(p)
    for s in skipped:
        print(f"skipped (no current records; any old file removed): {s}")


if __name__ == "__main__":
    main()
