"""Scaling (not a paper table): does the ConPreDiff - baseline gap at mini scale hold as training and width grow?

The unconditional 16x16 digits task (``experiments.unconditional``'s mini rows), both arms paired by training seed,
on a grid of two axes:

* **training length** at the mini width (32, 64, 64 channels, 1.05 M parameters): 2,000, 5,000 and 12,500 steps.
  The 5,000- and 12,500-step runs are the 2,000- and 5,000-step runs continued (``Preset.continues``): the LR is
  constant after its 100-step warm-up and every random draw is keyed by (seed, step, image), so a continued run is
  the run trained straight to the longer budget (``tests/test_scaling.py`` checks bit equality on a tiny model).
* **width** at 2,000 steps: (16, 32, 32), (32, 64, 64), (64, 128, 128) channels (0.26 M, 1.05 M, 4.17 M
  parameters; every other setting as the mini rows).

Every cell is sampled with **ancestral DDPM-250, no clipping, 1,000 samples (the primary protocol**: at n = 5 its
95% CI half-width on the ``fd_digits`` gap was 18.5% of the baseline's value, against 39% under DDIM-50, SPEC
section 6) and with DDIM-50 beside it. The EMA is diffusers' ``EMAModel`` with decay 0.999 and its default warm-up,
which caps the decay at (1 + n) / (10 + n): effectively 0.9955 at 2,000 steps, 0.9982 at 5,000, 0.999 (the cap is
0.99928) at 12,500.

The table (``tables/scaling.md``, :mod:`experiments.scaling.report`) gives each cell's paired gap and, per axis, a
trend test: each seed's least-squares slope of its gap against log2(steps) or log2(parameters), and a one-sample
t-test of those slopes across seeds (H0: slope 0), with its 95% CI.

    python -m experiments.scaling --scale mini --seeds 0,1,2 --jobs 2
    python -m experiments.scaling.report          # tables/scaling.md and figures/scaling.png from the records

The whole grid is about 10 hours of 2 CPU cores (``grid.sh`` gives each cell's measured minutes).

**The same grid at the mini-gpu setting** (:data:`GPU_GRID`: 32x32 digits, the unconditional mini-gpu rows' UNet and
batch): 1,500, 3,750 and 9,375 steps at width 64 (6.07 M parameters) and widths 32, 64, 128 (1.52 M, 6.07 M, 24.3 M)
at 1,500 steps, for a GPU (not run yet)::

    python -m experiments.scaling --scale mini-gpu --seeds 0,1,2 --jobs 12
    python -m experiments.scaling.report     # then also writes tables/scaling-mini-gpu.md and figures/scaling-mini-gpu.png

``experiments/scaling/gpu_call.sh`` runs its cells in 10-minute device calls that resume, with the steps to merge its
records here (``python -m eval.records merge``).
"""

from __future__ import annotations

from dataclasses import dataclass

from ..presets import GPU32, MINI, Preset, merge

# The primary protocol (ancestral DDPM, 250 steps, no x0 clipping) and DDIM-50 beside it.
DDPM_250 = {"sampler": "ddpm", "sampling_steps": 250, "clip_sample": False}
DDIM_50 = {"sampler": "ddim", "sampling_steps": 50, "clip_sample": False}

@dataclass(frozen=True)
class Grid:
    """One scaling grid: both arms at ``steps`` (at ``width``, each budget continuing the previous one) and at
    ``widths`` (at ``steps[0]``). Preset names are ``<prefix>-c<width>-steps<steps>-<method>``; its table and figure
    are ``tables/<table>.md`` and ``figures/<table>.png`` (:mod:`experiments.scaling.report`)."""

    scale: str
    prefix: str
    benchmark: str  # the data: digits16 (16x16) or digits32 (32x32)
    base: dict  # the config every cell varies (width and steps only)
    widths: dict[int, list[int]]  # label (the first level's channels) -> block_out_channels
    steps: tuple[int, ...]
    width: int  # the width of the steps axis
    table: str
    title: str
    # Minutes per seed on 2 idle CPU cores (mini), estimated: the mini rows' measured training (baseline 8.4 min per
    # 2,000 steps, ConPreDiff 1.21x) scaled by steps and, for width, by the UNet's cost (about width^2), plus DDPM-250
    # and DDIM-50 sampling and metrics (about 8 min at the mini width). None: not a CPU grid.
    cpu_minutes: dict | None = None


MINI_GRID = Grid("mini", "mini-digits16-scaling", "digits16", MINI,
                 widths={16: [16, 32, 32], 32: [32, 64, 64], 64: [64, 128, 128]}, steps=(2000, 5000, 12500), width=32,
                 table="scaling", title="16x16 digits, mini",
                 cpu_minutes={"baseline": 8.4, "conprediff": 10.2, "width_cost": {16: 0.3, 32: 1.0, 64: 3.5}})
# [choice] The same grid at the mini-gpu setting (32x32 digits, GPU32: 2 layers per block, batch 128, 1,500 steps),
# for a GPU: budgets 1,500 (the mini-gpu rows'), 3,750 and 9,375 at the mini-gpu width (64, 128, 128; 6.07 M
# parameters) and widths 32, 64 and 128 at 1,500 steps: the CPU grid's x2.5 budgets and x2 widths, one size up.
# Not measured yet. Cost, estimated from the mini-gpu rows (ten 1,500-step runs at once on an H100 under MPS: 7.5 min
# with DDIM-50 sampling): the 1,500-step cells of widths 32 and 64 fit one 10-minute call (12 runs); width 128 is
# about 4x a width-64 step; the 9,375-step chain is about an hour of one H100.
GPU_GRID = Grid("mini-gpu", "mini-gpu-digits32-scaling", "digits32", GPU32,
                widths={32: [32, 64, 64], 64: [64, 128, 128], 128: [128, 256, 256]}, steps=(1500, 3750, 9375),
                width=64, table="scaling-mini-gpu", title="32x32 digits, mini-gpu")
GRIDS = {g.scale: g for g in (MINI_GRID, GPU_GRID)}


def preset_name(width: int, steps: int, method: str, grid: Grid = MINI_GRID) -> str:
    return f"{grid.prefix}-c{width}-steps{steps}-{method}"


def _cell(grid: Grid, width: int, steps: int, method: str, continues: str | None) -> Preset:
    cfg = merge(grid.base, model={"block_out_channels": grid.widths[width]}, train={"steps": steps}, diffusion=DDPM_250,
                context={"enabled": method == "conprediff"})
    minutes = None
    if grid.cpu_minutes:
        cost = grid.cpu_minutes["width_cost"][width]
        previous = grid.steps[grid.steps.index(steps) - 1] if continues else 0
        minutes = round(grid.cpu_minutes[method] * cost * (steps - previous) / 2000 + 8 * cost, 1)
    # The benchmark names the width: eval.tables pools records by (benchmark, method, steps, sampler), and the three
    # widths' shortest cells must not share one cell (the verdicts list compares the arms per width and budget).
    return Preset(preset_name(width, steps, method, grid), grid.scale, method, f"{grid.benchmark}/c{width}", cfg,
                  expected_minutes=minutes, minutes_estimated=minutes is not None, continues=continues,
                  extra_samplers=(DDIM_50,), extra={"width": width, "steps": steps, "channels": grid.widths[width]})


def grid_presets(grid: Grid) -> list[Preset]:
    out = []
    for method in ("baseline", "conprediff"):
        for i, steps in enumerate(grid.steps):  # the length axis: each budget continues the previous one
            out.append(_cell(grid, grid.width, steps, method,
                             preset_name(grid.width, grid.steps[i - 1], method, grid) if i else None))
        for width in grid.widths:  # the width axis, at the shortest budget
            if width != grid.width:
                out.append(_cell(grid, width, grid.steps[0], method, None))
    return out


PRESETS = [p for g in GRIDS.values() for p in grid_presets(g)]
GRID_OF = {p.name: GRIDS[p.scale] for p in PRESETS}

# No table.yaml: the report (experiments.scaling.report) writes tables/scaling.md and figures/scaling.png itself.
TABLE = None
# tests/test_experiments.py smokes every other experiment's presets; these are the unconditional mini (and mini-gpu)
# rows with width and steps changed (tests/test_scaling.py checks that, and runs a continued run on a tiny model).
SMOKE_IN_CI = False
