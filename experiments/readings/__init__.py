"""Readings and confounds (not a paper table): could our own choices, where the paper is silent, make
ConPreDiff look worse than the baseline?

Mini scale, the unconditional 16x16 digits task, one choice changed per row against the unconditional
table's ConPreDiff (λ = 1, exact W2, strides 1-3, the decoder reading the last up-block, gradient
clipping over UNet and decoder together, x_{t-1} targets). The table compares each row with the
unconditional table's baseline and with its ConPreDiff row (same seeds, same protocol):

* ``clip-per-module``: the backbone's gradient clipped on its own at 1 (as the baseline's is), the
  decoder's not at all (``train.grad_clip=per_module``). Joint clipping fired on 135 of 301 ConPreDiff
  steps against 29 of 301 baseline steps: the context gradient shrinks the backbone's steps.
* ``target-x0``: neighbors of x_0 instead of the posterior mean μ̃(x_t, x_0), which is mostly the UNet's
  own noisy input (``context.target=x0``).
* ``reads-denoised``: the decoder reads the model's own x_{t-1} estimate at each point, the "denoised point"
  of the paper's Figure 1 (``context.decoder_input=denoised``); ``reads-features+denoised`` reads both.
  ``reads-denoised-clip`` forms that estimate from x0_hat clamped to [-1, 1], as DDPM's sampler does
  (``context.denoised_clip=1``): unclamped, its gradient on the UNet at t = 999 of the cosine schedule is 361x
  the point loss's and nearly parallel, against 0.002-0.2x at t <= 900 (``grad_ratio.py --timesteps``).
* ``t-signal-share`` / ``t-below-500``: the context term weighted per image by its timestep, by the target's signal
  share a(t)^2 / (a(t)^2 + b(t)^2) where mu~ = a(t) x0 + b(t) eps, or only for t < 500 (``context.t_weighting``);
  sampled with ancestral DDPM-250 first (paired with the unconditional table's DDPM-250 block), DDIM-50 beside it.
  Each halves the term's mean weight over uniform t (0.498 and 0.5); ``t-uniform-0.5`` (λ = 0.5 at every t) is the
  control that separates where in t the term acts from how much of it there is.
* ``decoder-full``: the context decoder and the points it decodes as the paper-scale presets have them (the
  config's defaults: Gaussian dimension 32, two hidden layers of 64, every point's neighborhood), instead of the
  mini's economy (16, one layer of 32, a random quarter of the points, an unbiased but noisier estimate of the
  mean over points). Rules out a decoder too small to fit the neighborhood distributions (the paper's Theorem 4.1
  needs a capable MLP) or a noisy context gradient as the cause.

Two readings concern the other backbones of the backbones table (paper Figure 5), whose ConPreDiff rows are
far worse than their baselines, and compare with that table's rows:

* ``baseline-vq-loss`` / ``conprediff-vq-loss`` (discrete): the point loss weighted as VQ-Diffusion weights it
  (``diffusion.discrete_loss=vq_diffusion``: L_t / p(t) with importance-sampled t, adaptive aux weight), T = 100
  times our per-token mean under uniform t. Our weighting makes the context gradient 20x the point gradient on
  the backbone at initialisation (median of 16 batches, per batch 11-44x; ``results/readings/grad_ratio.jsonl``);
  both arms are re-run since the baseline's loss changes too.
* ``lambda-matched`` (latent): λ chosen so that the context term pulls on the latent UNet as hard, relative to its
  point loss, as it pulls on the pixel UNet once training is under way (:data:`LAMBDA_MATCHED`); ``lambda-0.1``
  goes a step further, to a λ at which the pixel UNet's ConPreDiff was indistinguishable from its baseline (the
  weight ablation).

    python -m experiments.readings --scale mini --seeds 0,1,2 --jobs 2
"""

from __future__ import annotations

from pathlib import Path

from eval.tables import read_table_spec

from ..backbones import MINI_DISCRETE, MINI_LATENT
from ..backbones.autoencoder import train_autoencoder
from ..presets import Preset
from ..presets import MINI, merge

CONPREDIFF = merge(MINI, context={"enabled": True})


def _reading(label: str, **sections) -> Preset:
    cfg = merge(CONPREDIFF, **{k: {**CONPREDIFF.get(k, {}), **v} for k, v in sections.items()})
    return Preset(f"mini-digits16-conprediff-{label}", "mini", label, "digits16", cfg)


# Sampled with ancestral DDPM-250 first (the unconditional table's DDPM-250 block holds the committed baseline and
# ConPreDiff on seeds 0-4 to pair with), DDIM-50 beside it.
DDPM_FIRST = {"diffusion": {"sampler": "ddpm", "sampling_steps": 250}, "extra_samplers": ({"sampler": "ddim",
                                                                                          "sampling_steps": 50},)}


def _timestep_reading(label: str, **context) -> Preset:
    preset = _reading(label, context=context, diffusion=DDPM_FIRST["diffusion"])
    preset.extra_samplers = DDPM_FIRST["extra_samplers"]
    return preset


PRESETS = [
    _reading("clip-per-module", train={"grad_clip": "per_module", "context_max_grad_norm": 0.0}),
    _reading("target-x0", context={"target": "x0"}),
    _reading("reads-denoised", context={"decoder_input": "denoised"}),
    _reading("reads-features+denoised", context={"decoder_input": "features+denoised"}),
    _reading("reads-denoised-clip", context={"decoder_input": "denoised", "denoised_clip": 1.0}),
    _reading("decoder-full", context={"latent_dim": 32, "hidden_dim": 64, "depth": 2, "point_fraction": 1.0}),
    # Issue 28: the context gradient is 3.84x the point gradient at t = 900, where the target mu~ is mostly the input's
    # own noise (0.16 x0 + 0.98 eps, cosine schedule). Each image's term weighted by the target's signal share
    # a(t)^2 / (a(t)^2 + b(t)^2), or kept only below t = 500 (core.objective.timestep_weights).
    _timestep_reading("t-signal-share", t_weighting="signal_share"),
    _timestep_reading("t-below-500", t_weighting="below", t_cut=500),
    # Both weightings halve the term's mean weight over uniform t (signal share 0.498, 1[t < 500] 0.5): the control is
    # the same mean weight at every t, so that "where in t" is read apart from "how much".
    _timestep_reading("t-uniform-0.5", weight=0.5),
]

# The reading became the default: MINI_DISCRETE now weights the loss this way, so these presets equal the
# backbones table's discrete ones (whose rows are these runs); they keep the names they were recorded under.
VQ_LOSS = merge(MINI_DISCRETE)  # a copy: MINI_DISCRETE already sets diffusion.discrete_loss=vq_diffusion
# ‖∇θ λ L_context‖ / ‖∇θ L_point‖ on the backbone, median of 16 batches (python -m experiments.readings.grad_ratio,
# results/readings/grad_ratio.jsonl): pixel UNet 0.41 at initialisation, 0.76 and 0.90 at steps 1,500 and 2,000
# (seed 3); latent UNet 0.51 at initialisation, 2.15 at step 500 (seed 0, λ = 1). Matched to the pixel UNet's trained
# ratio (0.83, the mean of 0.76 and 0.90): λ = 0.83 / 2.15 = 0.39, rounded to 0.4. The steps differ (the pixel
# ratio grows with training), so this is the order of magnitude of the match, not an exact one. Measured later on the
# same latent run continued: 1.37 and 1.16 at steps 1,500 and 2,000, where the match would be λ = 0.55 and 0.78.
LAMBDA_MATCHED = 0.4

PRESETS += [
    Preset("mini-digits16-latent-conprediff-lambda-matched", "mini", "lambda-matched", "latent",
           merge(MINI_LATENT, context={"enabled": True, "weight": LAMBDA_MATCHED}), prepare=train_autoencoder),
    Preset("mini-digits16-latent-conprediff-lambda-0.1", "mini", "lambda-0.1", "latent",
           merge(MINI_LATENT, context={"enabled": True, "weight": 0.1}), prepare=train_autoencoder),
    Preset("mini-digits16-discrete-baseline-vq-loss", "mini", "baseline-vq-loss", "discrete", VQ_LOSS),
    Preset("mini-digits16-discrete-conprediff-vq-loss", "mini", "conprediff-vq-loss", "discrete",
           merge(VQ_LOSS, context={"enabled": True})),
]

# Its table and figure, declared in table.yaml (eval.tables reads that file as data; see experiments.registry).
TABLE = read_table_spec(Path(__file__).with_name("table.yaml"))
