"""Context decoding efficiency (paper Figure 4): how the neighborhood is decoded, quality vs cost.

Variants, all else fixed on the unconditional 16x16 digits task: no context term (baseline), the
naive explicit decoder (one regression head per neighbor position, order-sensitive L2), and the
distribution decoder scored by exact W2 (ConPreDiff's), entropic Sinkhorn, or sliced W2. Each run
records quality (``fd_digits``...) and its measured training time per step (``step_time_s``).
The paper shows this as a figure without numeric values ("n/a").

    python -m experiments.decoding_ablation --scale mini --seeds 0,1,2
    python -m eval.figures     # -> figures/decoding_efficiency.png
"""

from __future__ import annotations

from pathlib import Path

from eval.tables import read_table_spec

from ..presets import Preset
from ..presets import MINI, ldm4_config, merge
from ..unconditional import PRESETS as UNCONDITIONAL

_base = {p.name: p for p in UNCONDITIONAL}


def _variant(label: str, minutes: float, **context) -> Preset:
    """``minutes``: measured per seed on 2 idle CPU cores."""
    cfg = merge(MINI, context={"enabled": True, **context})
    return Preset(f"mini-digits16-{label}", "mini", label, "digits16", cfg, expected_minutes=minutes)


PRESETS = [
    _base["mini-digits16-baseline"],
    _variant("explicit", minutes=9.2, decoder="explicit"),  # mean of the 3 seeds' runs (613, 513, 534 s)
    _base["mini-digits16-conprediff"],  # distribution decoder + exact W2
    _variant("sinkhorn", minutes=20.0, solver="sinkhorn"),  # seed 2 alone (1,199 s); seeds 0, 1 ran side by side
    _variant("sliced", minutes=10.2, solver="sliced"),  # mean of seeds 0 and 1 (623, 596 s; seed 2 was resumed)
    Preset("paper-celebahq256-explicit", "paper", "explicit", "celebahq256",
           merge(ldm4_config("celebahq256", 410_000, 48), context={"enabled": True, "decoder": "explicit"}), num_samples=50_000),
    Preset("paper-celebahq256-sinkhorn", "paper", "sinkhorn", "celebahq256",
           merge(ldm4_config("celebahq256", 410_000, 48), context={"enabled": True, "solver": "sinkhorn"}), num_samples=50_000),
]

# Its table and figure, declared in table.yaml (eval.tables reads that file as data; see experiments.registry).
TABLE = read_table_spec(Path(__file__).with_name("table.yaml"))
