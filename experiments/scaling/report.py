"""The scaling tables and figures from the records, one pair per grid (:data:`experiments.scaling.GRIDS`):
``tables/scaling.md`` and ``figures/scaling.png`` for the CPU grid (16x16), ``tables/scaling-mini-gpu.md`` and
``figures/scaling-mini-gpu.png`` for the mini-gpu grid (32x32) once it has records.

Per cell (width, steps) and sampler: each arm's mean ± SD over training seeds, the paired gap ConPreDiff - baseline
with its 95% CI and p (:func:`eval.tables.compare`: paired t-test by seed). Per axis (training length at the mini
width; width at the shortest budget), the **trend test** (:func:`trend`): for every seed measured at every point of the
axis, the least-squares slope of its gap against log2(x) (x = steps, or UNet parameters); then a one-sample t-test of
those per-seed slopes against 0 (``scipy.stats.ttest_1samp``), two-sided, with the 95% CI of the mean slope. A
negative slope on a lower-is-better metric (``fd_digits``) means the gap shrinks as x doubles. Holm's adjustment
runs over the metrics of one (sampler, axis).

    python -m experiments.scaling.report [--records results/records.jsonl] [--out-dir .]
"""

from __future__ import annotations

import argparse
import functools
import itertools
import math
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from scipy import stats

from eval.metric_specs import higher_is_better
from eval.records import RECORDS, ROOT, load_records, records_home

from . import GRID_OF, GRIDS, MINI_GRID, PRESETS, Grid, preset_name

PRIMARY, SECONDARY = "ddpm-250-noclip", "ddim-50-noclip"
TABLE, FIGURE = f"{MINI_GRID.table}.md", f"{MINI_GRID.table}.png"  # the CPU grid's, under tables/ and figures/
METRICS = ("fd_digits", "kid_digits", "confident_digits", "precision_digits", "recall_digits", "fd_context_s123")
CELLS = {p.name: (p.extra["width"], p.extra["steps"], p.method) for p in PRESETS}


@dataclass(frozen=True)
class Trend:
    """Mean of the per-seed slopes of the gap against log2(x), its 95% CI, the one-sample t-test's p, the seeds, and
    the grid points (x) the slopes were fitted on."""

    slope: float
    ci_low: float
    ci_high: float
    p: float
    seeds: tuple[int, ...]
    points: tuple[float, ...] = ()


def trend(gaps: dict[int, dict[float, float]], confidence: float = 0.95) -> Trend:
    """``gaps``: ``{seed: {x: gap}}``. Every slope is fitted on the same points: of the sets of >= 2 points, the one
    that the most seeds have all of (ties: the most points, then the smaller x), so a grid point still being measured
    (fewer seeds than the rest) waits until it has as many seeds instead of emptying the test; the points used are
    in ``points``. Slope per seed: ordinary least squares of gap on log2(x) (``numpy.polyfit`` degree 1); test:
    one-sample t-test of the slopes against 0 (``scipy.stats.ttest_1samp``). Needs >= 2 points and >= 2 seeds,
    else NaNs."""
    xs = sorted({x for g in gaps.values() for x in g})
    best: tuple[tuple[float, ...], tuple[int, ...]] = ((), ())
    for k in range(len(xs), 1, -1):
        for subset in itertools.combinations(xs, k):
            seeds = tuple(sorted(s for s, g in gaps.items() if all(x in g for x in subset)))
            if len(seeds) > len(best[1]):
                best = (subset, seeds)
    points, seeds = best
    if len(seeds) < 2:
        return Trend(math.nan, math.nan, math.nan, math.nan, seeds, points)
    logx = np.log2(np.array(points, float))
    slopes = np.array([np.polyfit(logx, [gaps[s][x] for x in points], 1)[0] for s in seeds])
    res = stats.ttest_1samp(slopes, 0.0)
    ci = res.confidence_interval(confidence)
    return Trend(float(slopes.mean()), float(ci.low), float(ci.high), float(res.pvalue), seeds, points)


def unet_parameters(width: int, grid: Grid = MINI_GRID) -> int:
    """Parameters of ``grid``'s UNet at ``width`` (the UNet alone: the context decoder is dropped after training).
    Built once per (grid, width): the table and the figure both need them."""
    return _unet_parameters(grid.scale, width)


@functools.cache
def _unet_parameters(scale: str, width: int) -> int:
    from core.models import build_unet

    cfg = next(p for p in PRESETS if p.scale == scale and p.extra["width"] == width).run_config(0)
    return sum(p.numel() for p in build_unet(cfg.model, cfg.data.resolution, cfg.data.channels).parameters())


def values(records: list[dict], grid: Grid = MINI_GRID) -> dict:
    """``{(sampler, metric, width, steps, method): {seed: value}}`` of ``grid``'s current, non-overridden records."""
    out: dict = {}
    for r in records:
        if (r["experiment"] != "scaling" or r.get("superseded") or r.get("overrides") or r["preset"] not in CELLS
                or GRID_OF[r["preset"]] is not grid):
            continue
        width, steps, method = CELLS[r["preset"]]
        if r["checkpoint"] != steps:
            continue
        out.setdefault((r["sampler"], r["metric"], width, steps, method), {})[r["seed"]] = r["value"]
    return out


def axes(grid: Grid = MINI_GRID) -> dict[str, list[tuple[int, int]]]:
    """``grid``'s two axes as lists of (width, steps) grid points."""
    return {"steps": [(grid.width, s) for s in grid.steps], "width": [(w, grid.steps[0]) for w in grid.widths]}


def gaps_along(v: dict, sampler: str, metric: str, axis: str, params: dict[int, int],
               grid: Grid = MINI_GRID) -> dict[int, dict[float, float]]:
    """``{seed: {x: ConPreDiff - baseline}}`` along ``axis`` (x: steps, or the width's UNet parameters)."""
    out: dict[int, dict[float, float]] = {}
    for width, steps in axes(grid)[axis]:
        base, ctx = v.get((sampler, metric, width, steps, "baseline"), {}), v.get((sampler, metric, width, steps, "conprediff"), {})
        for seed in set(base) & set(ctx):
            out.setdefault(seed, {})[steps if axis == "steps" else params[width]] = ctx[seed] - base[seed]
    return out


@dataclass(frozen=True)
class Continuation:
    """A longer run's training curve against the recorded shorter run it continues, over the shorter run's logged
    steps: how many steps both logged, and the largest relative difference of the logged loss."""

    method: str
    seed: int
    steps: int
    shorter: int
    compared: int
    max_rel_diff: float


def continuations(curves: Path, grid: Grid = MINI_GRID) -> list[Continuation]:
    """Each continued run of the length axis whose curve and its shorter run's curve are both in ``curves``
    (``<records home>/results/curves/scaling/<run>.jsonl``, kept by the runner). A longer run's ``stats.jsonl`` starts
    with the rows of the run it continued (:func:`experiments.runs.continue_from`); when that run was retrained (its
    folder gone: another machine or session), this says how far the retrain is from the recorded run: 0 bit for bit;
    else float rounding grown by training (measured: 1.7e-6 for a baseline, 1.3e-2 for a ConPreDiff run retrained
    on the same seed's draws a day later: its trajectory is 1% apart by step 100)."""
    from core.runlog import read_jsonl, run_name, split_run_name

    out = []
    for shorter, longer in zip(grid.steps, grid.steps[1:]):
        for method in ("baseline", "conprediff"):
            for path in sorted(curves.glob(f"{preset_name(grid.width, longer, method, grid)}-s*.jsonl")):
                seed = split_run_name(path.stem)[1]
                short = curves / f"{run_name(preset_name(grid.width, shorter, method, grid), seed)}.jsonl"
                if not short.exists():
                    continue
                a = {r["step"]: r["loss"] for r in read_jsonl(short)}
                b = {r["step"]: r["loss"] for r in read_jsonl(path) if r["step"] <= shorter}
                both = sorted(set(a) & set(b))
                rel = max((abs(b[k] - a[k]) / abs(a[k]) for k in both), default=math.nan)
                out.append(Continuation(method, seed, longer, shorter, len(both), rel))
    return out


def fmt(x: float, digits: int = 4) -> str:
    return "n/a" if x is None or (isinstance(x, float) and math.isnan(x)) else f"{x:.{digits}g}"


def effective_ema_decay(decay: float, step: int) -> float:
    """The decay diffusers' ``EMAModel`` (as ``core.train`` builds it: ``decay``, default warm-up) applies at its
    ``step``-th update, asked of diffusers itself (``EMAModel.get_decay``: min(decay, step / (9 + step)))."""
    import torch
    from diffusers.training_utils import EMAModel

    return EMAModel([torch.nn.Parameter(torch.zeros(1))], decay=decay).get_decay(step)


def render(records: list[dict], records_name: str, curves: Path | None = None, grid: Grid = MINI_GRID) -> str:
    """``grid``'s table text; ``curves``: the folder of the runs' training curves (for :func:`continuations`)."""
    from eval.tables import holm

    v = values(records, grid)
    params = {w: unet_parameters(w, grid) for w in grid.widths}
    decay = grid.base["train"]["ema_decay"]
    longer = [f"{s:,}" for s in grid.steps[1:]]
    ema = ", ".join(f"{effective_ema_decay(decay, s):.4g} at {s:,}" + (" steps" if i == 0 else "")
                    for i, s in enumerate(grid.steps))
    lines = [
        f"# Scaling: the ConPreDiff - baseline gap across training length and width ({grid.title})",
        "",
        f"Generated by `python -m experiments.scaling.report` from `{records_name}`; do not edit. Proxy metrics from "
        f"this repository's digits classifier (never FID). Both arms paired by training seed; the {longer[0]}- and "
        f"{longer[1]}-step runs continue the shorter run of their arm and seed (constant LR after warm-up: the same model "
        "as training straight there, tested; whether it continued the recorded shorter model is shown below). "
        f"EMA {decay} with diffusers' warm-up: effective decay {ema}.",
        "",
        f"**{PRIMARY} decides** (the primary protocol, chosen before the grid ran for its power: SPEC section 6); "
        f"{SECONDARY} is shown beside it. Gap: paired t-test by seed, 95% CI. Trend: per seed, the least-squares slope "
        "of the gap against log2(steps) or log2(parameters); one-sample t-test of those slopes (H0: no trend), Holm "
        "over the metrics of one sampler and axis. A slope of the opposite sign to the gap means the gap shrinks.",
        "",
        "UNet parameters: " + ", ".join(f"width {w} ({', '.join(map(str, c))}): {params[w]:,}"
                                        for w, c in grid.widths.items()),
        "",
    ]
    cont = continuations(curves, grid) if curves is not None and curves.is_dir() else []
    if cont:
        lines += ["Each continued run against the recorded shorter run of its arm and seed (their logged training loss, "
                  "every 50 steps up to the shorter budget). 0: it continues the recorded run bit for bit. Otherwise "
                  "the shorter run was trained again first (its folder gone with an earlier session), on the same "
                  "seed's data and noise draws; float rounding (another thread count or library build) then grows "
                  "with training, so the difference says how far the retrain drifted from the recorded run: at ~1e-6 "
                  "it is that run, at ~1e-2 a near-twin (the same draws, weights apart), and the longer budget's gap "
                  "continues the near-twin. The per-seed trend stays a test across independent seeds either way.", "",
                  "| arm | seed | steps | continues | steps compared | max relative loss difference |",
                  "|---|---|---|---|---|---|"]
        lines += [f"| {c.method} | {c.seed} | {c.steps:,} | {c.shorter:,} | {c.compared} | {c.max_rel_diff:.2g} |"
                  for c in cont]
        lines.append("")
    for sampler in (PRIMARY, SECONDARY):
        lines += [f"## {sampler}{' (primary)' if sampler == PRIMARY else ''}", "",
                  "| metric | width | steps | baseline | ConPreDiff | gap [95% CI] | gap / baseline | p (paired) | n |",
                  "|---|---|---|---|---|---|---|---|---|"]
        for metric in METRICS:
            arrow = "↑" if higher_is_better(metric) else "↓"
            for width, steps in axes(grid)["steps"] + [p for p in axes(grid)["width"] if p[0] != grid.width]:
                base = v.get((sampler, metric, width, steps, "baseline"), {})
                ctx = v.get((sampler, metric, width, steps, "conprediff"), {})
                if not base and not ctx:
                    lines.append(f"| {metric} {arrow} | {width} | {steps:,} | not run yet | | | | | |")
                    continue
                c = paired_gap(base, ctx)
                cell = lambda d: (f"{np.mean(list(d.values())):.4g} ± {np.std(list(d.values()), ddof=1):.2g}"  # noqa: E731
                                  if len(d) > 1 else (f"{next(iter(d.values())):.4g}" if d else "–"))
                n = len(set(base) & set(ctx))
                paired_base = np.mean([base[k] for k in set(base) & set(ctx)]) if n else math.nan
                rel = c.delta / paired_base if c and paired_base else math.nan
                lines.append(f"| {metric} {arrow} | {width} | {steps:,} | {cell(base)} | {cell(ctx)} | "
                             + (f"{c.delta:+.4g} [{fmt(c.ci_low)}, {fmt(c.ci_high)}] | {rel:+.1%} | {fmt(c.p, 2)} | {n} |"
                                if c else "| | | |"))
        lines.append("")
        for axis, unit in (("steps", "log2(steps)"), ("width", "log2(UNet parameters)")):
            trends = {m: trend(gaps_along(v, sampler, m, axis, params, grid)) for m in METRICS}
            adjusted = dict(zip(METRICS, holm([trends[m].p for m in METRICS])))
            points = ", ".join(f"{s:,}" if axis == "steps" else f"{params[w]:,}" for w, s in axes(grid)[axis])
            width_of = {params[w]: w for w in grid.widths}
            lines += [f"Trend along {axis} ({points}): slope of the gap per doubling ({unit}). Fitted on the points "
                      "that the most seeds have all of: a point with fewer seeds than the others joins once it has "
                      "as many.", "",
                      f"| metric | slope [95% CI] | p | p (Holm) | seeds | {axis} fitted |", "|---|---|---|---|---|---|"]
            for m in METRICS:
                t = trends[m]
                fitted = ", ".join(f"{int(x):,}" if axis == "steps" else str(width_of[int(x)]) for x in t.points)
                lines.append(f"| {m} | {fmt(t.slope)} [{fmt(t.ci_low)}, {fmt(t.ci_high)}] | {fmt(t.p, 2)} | "
                             f"{fmt(adjusted[m], 2)} | {','.join(map(str, t.seeds)) or 'none'} | {fitted or 'none'} |")
            lines.append("")
    return "\n".join(lines).rstrip() + "\n"


def paired_gap(base: dict[int, float], ctx: dict[int, float]):
    """ConPreDiff - baseline over the seeds both arms have (:func:`eval.tables.compare`, paired), None when none: an
    arm's extra seeds (one measured before the other) stay out of the gap."""
    from eval.tables import compare

    shared = sorted(set(base) & set(ctx))
    return compare({k: ctx[k] for k in shared}, {k: base[k] for k in shared}) if shared else None


def points_along(v: dict, metric: str, axis: str, params: dict[int, int],
                 grid: Grid = MINI_GRID) -> dict[str, list[tuple]]:
    """What the figure draws along ``axis`` ("steps" or "width") for ``metric`` under the primary sampler, from
    :func:`values`' ``v``: ``"gap"``, per grid point with both arms on >= 1 shared seed, ``(x, gap, ci_low, ci_high,
    n)`` (:func:`eval.tables.compare`; a one-seed point has NaN CI and is drawn hollow, off the line); ``"baseline"``
    and ``"conprediff"``, per point with that arm, ``(x, mean, SD over seeds)`` (NaN SD for one seed: no bar).
    x is steps, or UNet parameters (``params``: width -> count)."""
    out: dict[str, list[tuple]] = {"gap": [], "baseline": [], "conprediff": []}
    for width, steps in axes(grid)[axis]:
        x = steps if axis == "steps" else params[width]
        arms = {m: v.get((PRIMARY, metric, width, steps, m), {}) for m in ("baseline", "conprediff")}
        for method, d in arms.items():
            if d:
                out[method].append((x, float(np.mean(list(d.values()))),
                                    float(np.std(list(d.values()), ddof=1)) if len(d) > 1 else math.nan))
        if c := paired_gap(arms["baseline"], arms["conprediff"]):
            out["gap"].append((x, c.delta, c.ci_low, c.ci_high, len(set(arms["baseline"]) & set(arms["conprediff"]))))
    return out


def figure(records: list[dict], out: Path, grid: Grid = MINI_GRID) -> Path:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    v = values(records, grid)
    params = {w: unet_parameters(w, grid) for w in grid.widths}
    fig, ax = plt.subplots(2, 4, figsize=(16, 7), constrained_layout=True)
    for row, metric in enumerate(("fd_digits", "confident_digits")):
        for col, axis in enumerate(("steps", "width")):
            drawn = points_along(v, metric, axis, params, grid)
            a = ax[row, col]
            if drawn["gap"]:
                x, g, low, high, n = (np.array(c) for c in zip(*drawn["gap"]))
                tested = n >= 2  # a point of one seed: hollow, off the line, no CI (none defined)
                a.errorbar(x[tested], g[tested], yerr=np.nan_to_num(np.clip([g - low, high - g], 0, None))[:, tested],
                           marker="o", capsize=4)
                a.plot(x[~tested], g[~tested], "o", mfc="none", color="C0")
                for xi, gi, ni, li in zip(x, g, n, low):  # the seeds behind each point
                    a.annotate(f"n={ni}" + (", no CI" if np.isnan(li) else ""), (xi, gi), xytext=(5, 5),
                               textcoords="offset points", fontsize=7)
            else:
                a.text(0.5, 0.5, "no cell with both arms yet", ha="center", va="center", transform=a.transAxes)
            a.axhline(0, color="grey", lw=0.8)
            a.set_xscale("log", base=2)
            a.set_xlabel(f"training steps (width {grid.width})" if axis == "steps"
                         else f"UNet parameters ({grid.steps[0]:,} steps)")
            a.set_ylabel(f"{metric}: ConPreDiff - baseline")
            a.set_title(f"gap, paired 95% CI ({PRIMARY})", fontsize=9)
            b = ax[row, col + 2]
            for method in ("baseline", "conprediff"):
                if pts := drawn[method]:
                    x, m, s = zip(*pts)
                    b.errorbar(x, m, yerr=s, marker="o", capsize=4, label=method)
                    for xi, mi, si in pts:
                        if math.isnan(si):  # one seed: no bar, so say so
                            b.annotate("n=1", (xi, mi), xytext=(5, -10), textcoords="offset points", fontsize=7)
            b.set_xscale("log", base=2)
            b.set_xlabel(a.get_xlabel())
            b.set_ylabel(f"{metric} (mean ± SD over seeds)")
            b.set_title(f"each arm's level ({PRIMARY})", fontsize=9)
            if drawn["baseline"] or drawn["conprediff"]:
                b.legend(fontsize=8)
    fig.suptitle(f"Scaling grid, {grid.title}: proxy metrics from the digits classifier (not FID)")
    out.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out, dpi=110, metadata={"Software": None})
    plt.close(fig)
    return out


def write(records_path: Path = RECORDS, out_dir: Path | None = None) -> list[Path]:
    """``tables/<grid.table>.md`` and ``figures/<grid.table>.png`` for each grid (:data:`experiments.scaling.GRIDS`)
    that has records in ``records_path``; returns the paths written. ``out_dir`` defaults to the records' home
    (:func:`eval.records.records_home`: the repository for the committed records, else the records file's folder),
    so a look at another records file (a device call's output, a pilot) never rewrites the committed tables.

    Raises:
        FileNotFoundError: ``records_path`` does not exist (a mistyped path is not an empty grid).
    """
    if not Path(records_path).is_file():
        raise FileNotFoundError(f"{records_path}: no such records file")
    out_dir = records_home(records_path) if out_dir is None else out_dir
    records = load_records(records_path)
    shown = records_path.resolve().relative_to(ROOT) if records_path.resolve().is_relative_to(ROOT) else records_path
    curves = records_home(records_path) / "results" / "curves" / "scaling"
    written = []
    for grid in GRIDS.values():
        if not values(records, grid):
            continue
        table = out_dir / "tables" / f"{grid.table}.md"
        table.parent.mkdir(parents=True, exist_ok=True)
        table.write_text(render(records, str(shown), curves, grid))
        written += [table, figure(records, out_dir / "figures" / f"{grid.table}.png", grid)]
    return written


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--records", type=Path, default=RECORDS)
    ap.add_argument("--out-dir", type=Path, default=None, help="writes <out-dir>/tables/scaling.md and "
                    "<out-dir>/figures/scaling.png (and scaling-mini-gpu.*), each grid's once it has records; default: "
                    "the repository for results/records.jsonl, else the records file's folder")
    args = ap.parse_args(argv)
    try:
        written = write(args.records, args.out_dir)
    except FileNotFoundError as e:
        ap.error(str(e))
    for path in written:
        print(path)
    if not written:
        print(f"{args.records}: no scaling records, nothing written")


if __name__ == "__main__":
    main()
