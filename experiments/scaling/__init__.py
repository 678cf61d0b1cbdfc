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

The width-64 cell is about 2.7 hours of 2 CPU cores (53 min per seed's pair, measured);
``experiments/scaling/gpu_call.sh`` runs it (both arms, 3 seeds) on one GPU in one call, with the steps to merge its
records here (``python -m eval.records merge``).
"""

from __future__ import annotations

from ..presets import Preset
from ..presets import MINI, merge

# The primary protocol (ancestral DDPM, 250 steps, no x0 clipping) and DDIM-50 beside it.
DDPM_250 = {"sampler": "ddpm", "sampling_steps": 250, "clip_sample": False}
DDIM_50 = {"sampler": "ddim", "sampling_steps": 50, "clip_sample": False}

WIDTHS = {16: [16, 32, 32], 32: [32, 64, 64], 64: [64, 128, 128]}  # label: the first level's channels
STEPS = (2000, 5000, 12500)
# Minutes per seed on 2 idle CPU cores, estimated: the mini rows' measured training (baseline 8.4 min per 2,000 steps,
# ConPreDiff 1.21x) scaled by steps and, for width, by the UNet's cost (about width^2: x0.3 and x3.5 measured by
# nobody yet, hence estimates), plus DDPM-250 and DDIM-50 sampling and metrics (about 8 min at the mini width).
_TRAIN_MIN = {"baseline": 8.4, "conprediff": 10.2}
_WIDTH_COST = {16: 0.3, 32: 1.0, 64: 3.5}


def preset_name(width: int, steps: int, method: str) -> str:
    return f"mini-digits16-scaling-c{width}-steps{steps}-{method}"


def _cell(width: int, steps: int, method: str, continues: str | None) -> Preset:
    cfg = merge(MINI, model={"block_out_channels": WIDTHS[width]}, train={"steps": steps}, diffusion=DDPM_250,
                context={"enabled": method == "conprediff"})
    previous = STEPS[STEPS.index(steps) - 1] if continues else 0
    minutes = _TRAIN_MIN[method] * _WIDTH_COST[width] * (steps - previous) / 2000 + 8 * _WIDTH_COST[width]
    # The benchmark names the width: eval.tables pools records by (benchmark, method, steps, sampler), and the three
    # widths' 2,000-step cells must not share one cell (the verdicts list compares the arms per width and budget).
    return Preset(preset_name(width, steps, method), "mini", method, f"digits16/c{width}", cfg,
                  expected_minutes=round(minutes, 1),
                  minutes_estimated=True, continues=continues, extra_samplers=(DDIM_50,),
                  extra={"width": width, "steps": steps, "channels": WIDTHS[width]})


PRESETS = []
for _method in ("baseline", "conprediff"):
    for _steps in STEPS:  # the length axis, at the mini width: each budget continues the previous one
        _prev = preset_name(32, STEPS[STEPS.index(_steps) - 1], _method) if _steps != STEPS[0] else None
        PRESETS.append(_cell(32, _steps, _method, _prev))
    for _width in (16, 64):  # the width axis, at 2,000 steps
        PRESETS.append(_cell(_width, 2000, _method, None))

# No table.yaml: the report (experiments.scaling.report) writes tables/scaling.md and figures/scaling.png itself.
TABLE = None
# tests/test_experiments.py smokes every other experiment's presets; these ten are the unconditional mini rows with
# width and steps changed (tests/test_scaling.py checks that, and runs a continued run on a tiny model).
SMOKE_IN_CI = False
