"""Generality across backbones (paper Figure 5): each backbone with and without context prediction.

Mini scale, 16x16 digits, same UNet widths and budgets: pixel DDPM (the unconditional table's runs),
latent diffusion on an 8x8x2 autoencoder this repository trains (``experiments.backbones.autoencoder``),
and discrete mask-and-replace diffusion on 8-level quantised pixels (``core.discrete``, its loss weighted as
VQ-Diffusion's; context targets are the level values of the true tokens). Paper scale: the paper's backbones are LDM and
Improved VQ-Diffusion; its Figure 5 gives no numeric values ("n/a").

    python -m experiments.backbones --scale mini --seeds 0,1,2
"""

from __future__ import annotations

import copy
from pathlib import Path

from eval.tables import read_table_spec

from ..presets import Preset
from ..presets import MINI, ldm4_config, merge
from ..unconditional import PRESETS as UNCONDITIONAL
from .autoencoder import AUTOENCODER, train_autoencoder

_base = {p.name: p for p in UNCONDITIONAL}


def _relabel(name: str, benchmark: str) -> Preset:
    p = copy.deepcopy(_base[name])
    p.benchmark = benchmark
    return p


MINI_LATENT = merge(MINI, backbone="latent", model={"vae": str(AUTOENCODER.relative_to(AUTOENCODER.parents[1]))})
# The discrete loss weighted as VQ-Diffusion weights it (L_t / p(t), importance-sampled t, adaptive aux), the
# cited backbone's; our earlier per-token mean made the context gradient 20x the point gradient and the discrete
# ConPreDiff rows far worse (results/readings/README.md; those records are superseded). The discrete rows of this
# table are the readings' vq-loss runs of the same configuration (its table.yaml's ``borrowed``).
MINI_DISCRETE = merge(MINI, backbone="discrete", model={"token_levels": 8, "token_embed_dim": 32},
                      diffusion={"num_train_timesteps": 100, "sampling_steps": 100, "discrete_loss": "vq_diffusion"})

PRESETS = [
    _relabel("mini-digits16-baseline", "pixel"),
    _relabel("mini-digits16-conprediff", "pixel"),
    # Minutes per seed on 2 idle CPU cores (measured: 282, 269 s and 348, 328, 342 s); the first latent run
    # also trains the shared autoencoder once, ~10 min.
    Preset("mini-digits16-latent-baseline", "mini", "baseline", "latent", MINI_LATENT, prepare=train_autoencoder,
           expected_minutes=4.6),
    Preset("mini-digits16-latent-conprediff", "mini", "conprediff", "latent",
           merge(MINI_LATENT, context={"enabled": True}), prepare=train_autoencoder, expected_minutes=5.6),
    Preset("mini-digits16-discrete-baseline", "mini", "baseline", "discrete", MINI_DISCRETE),
    Preset("mini-digits16-discrete-conprediff", "mini", "conprediff", "discrete",
           merge(MINI_DISCRETE, context={"enabled": True})),
    Preset("paper-celebahq256-ldm4-baseline", "paper", "baseline", "latent", ldm4_config("celebahq256", 410_000, 48)),
    Preset("paper-celebahq256-conprediff", "paper", "conprediff", "latent",
           merge(ldm4_config("celebahq256", 410_000, 48), context={"enabled": True})),
]

# Its table and figure, declared in table.yaml (eval.tables reads that file as data; see experiments.registry).
TABLE = read_table_spec(Path(__file__).with_name("table.yaml"))
