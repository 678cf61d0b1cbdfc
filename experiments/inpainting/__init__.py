"""Inpainting (paper Table 3): RePaint on an unconditionally trained model, baseline vs ConPreDiff.

Each preset inpaints the first N held-out images (the ``test/`` split that ``python -m experiments.data``
writes and training never reads; the digits' fixed test split at mini scale) under the six masks (Wide, Narrow, Super-Resolve 2x,
Alternating Lines, Half, Expand; ``core.inpaint``), one seeded mask and one seeded sampler per image.
Paper scale: a pixel DDPM on CelebA-HQ 256, 100 test images, RePaint T=250, jump 10, 10 resamplings,
RePaint's released masks from ``data/gt_keep_masks/{thick,thin,nn2,ev2li,genhalf,ex64}/`` when that folder is there,
else LaMa's thick/thin generator for Wide/Narrow and the fixed four as at mini scale (``core.masks.paper_masks``),
LPIPS (AlexNet, v0.1). Mini scale: the unconditional table's 16x16 digit models (shared runs), 100
held-out digits, RePaint T=50, jump 5, 5 resamplings [choice, for CPU time]; both scales step ancestrally
in the unknown region (eta 1) with RePaint's exact jump back (``core.inpaint``); metrics
``percep_digits`` (LPIPS-like proxy in the digits classifier, not LPIPS), hole ``mse`` and ``psnr``.

    python -m experiments.inpainting --scale mini --seeds 0,1,2,3,4 --jobs 2
"""

from __future__ import annotations

import copy
from pathlib import Path

from eval.tables import read_table_spec

from ..presets import Preset
from ..presets import PAPER_PRECISION, merge
from ..unconditional import PRESETS as UNCONDITIONAL

_base = {p.name: p for p in UNCONDITIONAL}
# eta 1: ancestral steps in the unknown region, as RePaint's p_sample (core.inpaint.ExactRePaintScheduler).
# RePaint's settings (python -m experiments.inpainting --eval steps=50 --eval jump_length=5 ... overrides them);
# the number of test images is the preset's num_samples (100; --num-samples overrides it).
MINI_REPAINT = {"steps": 50, "jump_length": 5, "jump_n_sample": 5, "eta": 1.0}
PAPER_REPAINT = {"steps": 250, "jump_length": 10, "jump_n_sample": 10, "eta": 1.0}
TEST_IMAGES = 100

# A pixel-space DDPM at 256 px in the spirit of RePaint's guided-diffusion CelebA-HQ model [choice].
_PAPER_PIXEL = {
    "backbone": "pixel",
    "model": {"block_out_channels": [128, 128, 256, 256, 512, 512], "layers_per_block": 2,
              "attention": [False, False, False, False, True, True], "mid_attention": True, "norm_num_groups": 32},
    "data": {"source": "data/celebahq256", "resolution": 256, "channels": 3},
    # RePaint's guided-diffusion sampler clips x0 (clip_denoised: true in its configs).
    "diffusion": {"num_train_timesteps": 1000, "beta_schedule": "linear", "clip_sample": True},
    "train": {"batch_size": 64, "steps": 250_000, "lr": 1e-4, "warmup_steps": 1000, "ema_decay": 0.9999,
              "checkpoint_every": 5000, "log_every": 100, **PAPER_PRECISION},
    "context": {"enabled": False},
}


def _mini(name: str) -> Preset:
    p = copy.deepcopy(_base[name])
    p.extra, p.num_samples = dict(MINI_REPAINT), TEST_IMAGES
    # From scratch: the unconditional run (skipped when that table already trained it) + 3.3 min of RePaint
    # on the six masks (measured: 202 s and 196 s on an idle machine).
    p.expected_minutes = round(p.expected_minutes + 3.3, 1)
    return p


PRESETS = [
    _mini("mini-digits16-baseline"),
    _mini("mini-digits16-conprediff"),
    Preset("paper-celebahq256-pixel-baseline", "paper", "baseline", "celebahq256", _PAPER_PIXEL,
           paper="LPIPS RePaint: wide 0.059, narrow 0.028, sr2x 0.029, lines 0.009, half 0.165, expand 0.435",
           extra=dict(PAPER_REPAINT), num_samples=TEST_IMAGES),
    Preset("paper-celebahq256-pixel-conprediff", "paper", "conprediff", "celebahq256",
           merge(_PAPER_PIXEL, context={"enabled": True}), paper="LPIPS 0.022 (mask column not confirmed)",
           extra=dict(PAPER_REPAINT), num_samples=TEST_IMAGES),
]

# Its table and figure, declared in table.yaml (eval.tables reads that file as data; see experiments.registry).
TABLE = read_table_spec(Path(__file__).with_name("table.yaml"))
