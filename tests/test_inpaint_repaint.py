"""RePaint as andreas128/RePaint samples it (ancestral steps, exact jump back), and the Narrow/Wide mask geometry.

Reference: andreas128/RePaint ``guided_diffusion/scheduler.py`` (``get_schedule_jump``) and
``guided_diffusion/gaussian_diffusion.py`` (``p_sample``: the DDPM posterior; ``_undo``:
x_{t+1} ~ N(sqrt(1 - beta_{t+1}) x_t, beta_{t+1} I) with the respaced betas, 1 - beta'_i = a(tau_i) / a(tau_{i-1})).
"""

import hashlib
import inspect

import numpy as np
import pytest
import torch
from diffusers import RePaintScheduler

from core.inpaint import ExactRePaintScheduler, make_mask, repaint, repaint_sampler_name

COSINE = dict(num_train_timesteps=1000, beta_schedule="squaredcos_cap_v2", clip_sample=False)
STEPS, JUMP, RESAMPLE = 50, 5, 5  # the mini preset
STRIDE = 1000 // STEPS


def _scheduler(cls, **kw):
    s = cls(**(COSINE | kw))
    s.set_timesteps(STEPS, JUMP, RESAMPLE)
    return s


def _undo_gain(scheduler, levels: list[int]) -> float:
    """The factor c of x in undo_step(s) at ``levels`` (same noise draw for x and 2x: out(2x) - out(x) = c x)."""
    x = torch.ones(1, 1, 2, 2)
    outs = []
    for scale in (1.0, 2.0):
        g, y = torch.Generator().manual_seed(0), scale * x
        for t in levels:
            y = scheduler.undo_step(y, t, g)
        outs.append(y)
    return float((outs[1] - outs[0]).mean())


def test_jump_back_noises_with_the_interval_it_undoes():
    """The jump diffusers' pipeline makes at strided step 5 (x at level 80 back to 180; cosine, T=50 of 1000, jump 5):
    alpha-bar 0.916 as q(x_180 | x_80) gives; diffusers' undo_step uses the betas of (t, t + 20] instead of
    (t - 20, t] -> 0.907."""
    ours, theirs = _scheduler(ExactRePaintScheduler), _scheduler(RePaintScheduler)
    a = ours.alphas_cumprod.double()
    levels = [100, 120, 140, 160, 180]  # undo_step's arguments for that jump
    assert float(a[180]) == pytest.approx(0.9159, abs=1e-4)
    assert float(a[80]) * _undo_gain(ours, levels) ** 2 == pytest.approx(float(a[180]), rel=1e-5)
    assert float(a[80]) * _undo_gain(theirs, levels) ** 2 == pytest.approx(0.9070, abs=1e-4)
    # One jump step from the clean image (level -20 -> 0): 1 - beta_0, not the product of betas 0..19.
    assert _undo_gain(ours, [0]) ** 2 == pytest.approx(float(a[0]), rel=1e-6)
    assert _undo_gain(theirs, [0]) ** 2 == pytest.approx(0.99825, abs=1e-5)


def test_jump_back_variance_is_the_closed_form():
    """Var[undo_step(0)] = 1 - a_t / a_s (the noise of q(x_t | x_s)) and its mean is sqrt(a_t / a_s) x_s."""
    s = _scheduler(ExactRePaintScheduler)
    a = s.alphas_cumprod.double()
    ratio = float(a[500] / a[480])
    x = torch.full((64, 1, 32, 32), 0.7)
    out = s.undo_step(x, 500, torch.Generator().manual_seed(1))
    assert float(out.mean()) == pytest.approx(ratio**0.5 * 0.7, abs=4 * (1 - ratio) ** 0.5 / 256)
    assert float(out.var()) == pytest.approx(1 - ratio, rel=0.03)


def _posterior(a_t, a_prev, x0, x_t):
    """DDPM posterior q(x_prev | x_t, x0) of the strided chain (guided-diffusion's q_posterior_mean_variance)."""
    beta = 1 - a_t / a_prev
    mean = beta * a_prev**0.5 / (1 - a_t) * x0 + (1 - a_prev) * (1 - beta) ** 0.5 / (1 - a_t) * x_t
    return mean, beta * (1 - a_prev) / (1 - a_t)


@pytest.mark.parametrize("clip", [False, True])
def test_step_with_eta_1_is_repaints_ancestral_step(clip):
    """Unknown region: posterior mean (from the clipped x0 when clipping) + sqrt(posterior variance) z; known
    region: q(x_prev | x0) with the same z. diffusers' eta-1 step differs when clipping (it keeps the raw epsilon)."""
    s = _scheduler(ExactRePaintScheduler, eta=1.0, clip_sample=clip)
    t, prev = 300, 280
    a_t, a_prev = float(s.alphas_cumprod[t]), float(s.alphas_cumprod[prev])
    gen = torch.Generator().manual_seed(3)
    x_t, eps, original = (torch.randn(2, 1, 4, 4, generator=gen) * 2 for _ in range(3))
    mask = torch.zeros(2, 1, 4, 4)
    mask[..., :2] = 1
    out = s.step(eps, t, x_t, original, mask, torch.Generator().manual_seed(7)).prev_sample
    z = torch.randn(x_t.shape, generator=torch.Generator().manual_seed(7))
    x0 = (x_t - (1 - a_t) ** 0.5 * eps) / a_t**0.5
    mean, var = _posterior(a_t, a_prev, x0.clamp(-1, 1) if clip else x0, x_t)
    expected = mask * (a_prev**0.5 * original + (1 - a_prev) ** 0.5 * z) + (1 - mask) * (mean + var**0.5 * z)
    torch.testing.assert_close(out, expected, rtol=1e-4, atol=1e-4)
    theirs = _scheduler(RePaintScheduler, eta=1.0, clip_sample=clip)
    diffusers_out = theirs.step(eps, t, x_t, original, mask, torch.Generator().manual_seed(7)).prev_sample
    assert torch.allclose(out, diffusers_out, atol=1e-4) != clip


def test_repaint_schedule_and_levels_chain_as_repaints():
    """repaint() visits RePaint's get_schedule_jump times (x stride) as x's levels, every step/undo starting where the
    last ended: the first jump leaves from level 800 (40 strided steps) to 900, where diffusers' pipeline leaves
    from 780, and no jump leaves from the finished image."""
    jumps, t, times = {j: RESAMPLE - 1 for j in range(0, STEPS - JUMP, JUMP)}, STEPS, []
    while t >= 1:  # RePaint's get_schedule_jump_paper, with t_T = STEPS
        t -= 1
        times.append(t)
        if jumps.get(t, 0) > 0:
            jumps[t] -= 1
            for _ in range(JUMP):
                t += 1
                times.append(t)
    calls = []

    class Spy(ExactRePaintScheduler):
        def step(self, model_output, timestep, *args, **kw):
            calls.append(("step", int(timestep), int(timestep) - STRIDE))
            return super().step(model_output, timestep, *args, **kw)

        def undo_step(self, sample, timestep, generator=None):
            calls.append(("undo", int(timestep) - STRIDE, int(timestep)))
            return super().undo_step(sample, timestep, generator)

    import core.inpaint as inpaint

    class ZeroEps:
        def __call__(self, x, t):
            return type("Out", (), {"sample": torch.zeros_like(x)})

    original = inpaint.ExactRePaintScheduler
    inpaint.ExactRePaintScheduler = Spy
    try:
        repaint(ZeroEps(), COSINE, torch.zeros(1, 1, 4, 4), torch.ones(1, 1, 4, 4), [0], STEPS, JUMP, RESAMPLE)
    finally:
        inpaint.ExactRePaintScheduler = original
    visited = [calls[0][1]] + [c[2] for c in calls]
    assert visited == [STRIDE * t for t in times] + [-STRIDE]
    assert all(a[2] == b[1] for a, b in zip(calls, calls[1:]))
    assert next(c for c in calls if c[0] == "undo") == ("undo", 800, 820)
    assert calls[-1] == ("step", 0, -STRIDE) and sum(c[0] == "step" for c in calls) == STEPS + 9 * (RESAMPLE - 1) * JUMP


def test_repaint_defaults_to_ancestral_and_names_its_sampler():
    assert inspect.signature(repaint).parameters["eta"].default == 1.0
    from experiments.inpainting import PRESETS

    assert all(p.extra["eta"] == 1.0 for p in PRESETS)
    assert repaint_sampler_name(50, 5, 5, 1.0, False) == "repaint-50-j5-r5-eta1-noclip"
    # The earlier sampler (diffusers' undo step, eta 0) was recorded as repaint-50-j5-r5-noclip: never reused.
    assert repaint_sampler_name(50, 5, 5, 0.0, False) == "repaint-50-j5-r5-eta0-noclip"
    with pytest.raises(ValueError, match="eta"):
        repaint(None, COSINE, torch.zeros(1, 1, 4, 4), torch.ones(1, 1, 4, 4), [0], eta=1.5)


def _hole_fraction(kind: str, resolution: int, seeds: range) -> float:
    return float(np.mean([1 - make_mask(kind, resolution, s).mean().item() for s in seeds]))


def test_narrow_stays_narrower_than_wide_at_every_resolution():
    """Mean hole fraction, seeds 0-99 (``python -c "from tests.test_inpaint_repaint import _hole_fraction as h;
    print([(r, h('wide', r, range(100)), h('narrow', r, range(100))) for r in (16, 32, 256)])"``):
    wide / narrow 16 px 0.478 / 0.253, 32 px 0.453 / 0.258, 256 px 0.424 / 0.239 (narrow was 0.390 at 16 px
    before mask version 2). Asserted on seeds 0-39."""
    seeds = range(40)
    for r in (16, 32, 256):
        wide, narrow = _hole_fraction("wide", r, seeds), _hole_fraction("narrow", r, seeds)
        assert narrow < 0.6 * wide, (r, narrow, wide)
        assert 0.2 < narrow < 0.3, (r, narrow)


def test_paper_scale_stroke_masks_are_unchanged():
    """The 256 px Wide/Narrow geometry (LaMa-style thick/thin strokes) is the one of mask version 1."""
    for kind, digest in (("narrow", "d6ec039a6f6aad66"), ("wide", "a2c31d4fcd671f88")):
        masks = torch.stack([make_mask(kind, 256, s) for s in range(4)])
        assert hashlib.sha256(masks.numpy().tobytes()).hexdigest()[:16] == digest, kind
