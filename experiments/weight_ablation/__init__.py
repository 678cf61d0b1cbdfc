"""Context weight λ (not a paper table; the paper does not state λ): how much context prediction to add.

Mini scale: the unconditional 16x16 digits task with λ in {0 (the baseline), 0.01, 0.1, 1 (the
default, the unconditional table's ConPreDiff row)}, all else fixed; the baseline and λ = 1 rows are
the unconditional table's runs (shared run directories). Paper scale: the CelebA-HQ LDM-4 preset
with λ = 0.1.

    python -m experiments.weight_ablation --scale mini --seeds 0,1,2
"""

from __future__ import annotations

from pathlib import Path

from eval.tables import read_table_spec

from ..presets import Preset
from ..presets import MINI, ldm4_config, merge
from ..unconditional import PRESETS as UNCONDITIONAL

_base = {p.name: p for p in UNCONDITIONAL}


def _mini(weight: float, minutes: float) -> Preset:
    label = f"lambda-{weight:g}"
    return Preset(f"mini-digits16-{label}", "mini", label, "digits16", merge(MINI, context={"enabled": True, "weight": weight}),
                  expected_minutes=minutes)


PRESETS = [
    _base["mini-digits16-baseline"],
    _mini(0.1, 12.2),  # measured: 741, 723, 728 s
    _mini(0.01, 11.4),  # measured: 676, 693 s
    _base["mini-digits16-conprediff"],  # lambda = 1
    Preset("paper-celebahq256-lambda-0.1", "paper", "lambda-0.1", "celebahq256",
           merge(ldm4_config("celebahq256", 410_000, 48), context={"enabled": True, "weight": 0.1}), num_samples=50_000),
]

# Its table and figure, declared in table.yaml (eval.tables reads that file as data; see experiments.registry).
TABLE = read_table_spec(Path(__file__).with_name("table.yaml"))
