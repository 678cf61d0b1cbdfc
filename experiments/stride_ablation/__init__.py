"""Stride ablation (paper ablation table): which neighborhood strides S help.

Mini scale: the unconditional 16x16 digits task with S in {1}, {1,2}, {1,2,3}, {1,2,3,4} (dilated 3x3
rings) and {1,2,3} as full Chebyshev rings, all else fixed; the no-context baseline and S={1,2,3}
are the unconditional table's runs (shared run directories). The paper reports no numbers for
this ablation ("n/a"). Paper scale: the CelebA-HQ LDM-4 preset with the same stride sets.

    python -m experiments.stride_ablation --scale mini --seeds 0,1,2
"""

from __future__ import annotations

from pathlib import Path

from eval.tables import read_table_spec

from ..presets import Preset
from ..presets import MINI, estimated_minutes, ldm4_config, merge
from ..unconditional import PRESETS as UNCONDITIONAL

_base = {p.name: p for p in UNCONDITIONAL}


def _mini(label: str, strides: list[int], step_time_ratio: float, pattern: str = "dilated") -> Preset:
    cfg = merge(MINI, context={"enabled": True, "strides": strides, "pattern": pattern})
    return Preset(f"mini-digits16-{label}", "mini", label, "digits16", cfg, expected_minutes=estimated_minutes(step_time_ratio),
                  minutes_estimated=True)


def _paper_row(label: str, strides: list[int]) -> Preset:
    cfg = merge(ldm4_config("celebahq256", 410_000, 48), context={"enabled": True, "strides": strides})
    return Preset(f"paper-celebahq256-{label}", "paper", label, "celebahq256", cfg, num_samples=50_000)


PRESETS = [
    _base["mini-digits16-baseline"],
    _mini("strides-1", [1], 1.11),  # step-time ratios to the baseline: benchmarks/RESULTS.md
    _mini("strides-12", [1, 2], 1.22),
    _base["mini-digits16-conprediff"],  # strides 1,2,3 (method label "conprediff")
    _mini("strides-1234", [1, 2, 3, 4], 1.31),
    _mini("ring-123", [1, 2, 3], 1.52, pattern="ring"),
    _paper_row("strides-1", [1]),
    _paper_row("strides-12", [1, 2]),
    _paper_row("strides-1234", [1, 2, 3, 4]),
]

# Its table and figure, declared in table.yaml (eval.tables reads that file as data; see experiments.registry).
TABLE = read_table_spec(Path(__file__).with_name("table.yaml"))
