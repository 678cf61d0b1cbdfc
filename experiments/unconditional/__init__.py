"""Unconditional generation (paper Table 1): baseline vs ConPreDiff.

Paper scale: LDM-4 (UNet on the latents of a VQ-f4 autoencoder) on CelebA-HQ 256 and FFHQ 256,
FID (clean-fid). Mini scale: a pixel DDPM on the embedded 16x16 digits, proxy metrics
(``fd_digits`` and friends, never FID).

    python -m experiments.unconditional --scale mini --seeds 0,1,2
    python -m experiments.unconditional --scale mini-long --seeds 0,1,2   # the same rows, 5,000 steps
    python -m experiments.unconditional --scale mini-gpu --seeds 0,1,2,3,4 --jobs 10   # 32x32, one GPU
    python -m experiments.unconditional --scale paper --presets paper-celebahq256-conprediff --seeds 0
"""

from __future__ import annotations

from pathlib import Path

from eval.tables import read_table_spec

from ..presets import (CELEBAHQ, CELEBAHQ_SECOND_SAMPLER, FFHQ, GPU32, LDM_LR_PER_IMAGE, MINI, PAPER_PRECISION,
                       Preset, estimated_minutes, ldm4_config, merge)

PRESETS = [
    # Minutes per seed: mean of the 3 committed runs, 2026-11-22, 2 CPU cores, nothing else running
    # (training, 1,000 samples, metrics). The 6-run table takes ~65 minutes one run at a time; with
    # --jobs 2 it took 2,767 s from scratch (2026-11-23, results/reproductions/).
    Preset("mini-digits16-baseline", "mini", "baseline", "digits16", MINI, expected_minutes=9.9),
    Preset("mini-digits16-conprediff", "mini", "conprediff", "digits16",
           merge(MINI, context={"enabled": True}), expected_minutes=11.7),
    # [choice] mini-long: the mini rows trained 2.5x longer. A probe of baseline seed 0 trained on to 5,000 steps
    # gained ~0.02 confident_digits per 500 steps up to 3,500 (results/tuning/noclip-probe/), towards issue 6's
    # 0.80 bar; the table asks whether ConPreDiff's gap to a better-trained baseline closes. Minutes: estimated
    # from the mini rows' measured minutes (ConPreDiff's training: (11.7 - 1.5) / 8.4 of the baseline's).
    Preset("mini-long-digits16-baseline", "mini-long", "baseline", "digits16", merge(MINI, train={"steps": 5000}),
           expected_minutes=estimated_minutes(1.0, steps=5000), minutes_estimated=True),
    Preset("mini-long-digits16-conprediff", "mini-long", "conprediff", "digits16",
           merge(MINI, context={"enabled": True}, train={"steps": 5000}),
           expected_minutes=estimated_minutes((11.7 - 1.5) / 8.4, steps=5000), minutes_estimated=True),
    Preset("mini-gpu-digits32-baseline", "mini-gpu", "baseline", "digits32", GPU32),
    Preset("mini-gpu-digits32-conprediff", "mini-gpu", "conprediff", "digits32", merge(GPU32, context={"enabled": True})),
    Preset("paper-celebahq256-ldm4-baseline", "paper", "baseline", "celebahq256", CELEBAHQ,
           paper="FID 5.11, P 0.72, R 0.49 (LDM-4, as cited)", num_samples=50_000, lr_per_image=LDM_LR_PER_IMAGE,
           extra_samplers=CELEBAHQ_SECOND_SAMPLER),
    Preset("paper-celebahq256-conprediff", "paper", "conprediff", "celebahq256",
           merge(CELEBAHQ, context={"enabled": True}), paper="FID 3.22", num_samples=50_000, lr_per_image=LDM_LR_PER_IMAGE,
           extra_samplers=CELEBAHQ_SECOND_SAMPLER),
    Preset("paper-ffhq256-ldm4-baseline", "paper", "baseline", "ffhq256", FFHQ,
           paper="FID 4.98, P 0.73, R 0.50 (LDM-4, as cited)", num_samples=50_000, lr_per_image=LDM_LR_PER_IMAGE),
    Preset("paper-ffhq256-conprediff", "paper", "conprediff", "ffhq256",
           merge(FFHQ, context={"enabled": True}), paper="FID 2.24", num_samples=50_000, lr_per_image=LDM_LR_PER_IMAGE),
]

# Its table and figure, declared in table.yaml (eval.tables reads that file as data; see experiments.registry).
TABLE = read_table_spec(Path(__file__).with_name("table.yaml"))
