"""Sampler settings reach the diffusers schedulers, and records name them."""

from types import SimpleNamespace

import pytest
import torch

from core.config import DiffusionConfig
from core.inpaint import repaint
from core.models import build_scheduler, sampler_name, sampling_scheduler
from core.sample import denoise


class ZeroEps:
    """A 'UNet' that predicts no noise: x0 = x_t / sqrt(alpha_bar_t) lies far outside [-1, 1] early on."""

    config = SimpleNamespace(in_channels=1, sample_size=4)

    def __call__(self, x, t, **kwargs):
        return SimpleNamespace(sample=torch.zeros_like(x))


@pytest.mark.parametrize("sampler", ["ddim", "ddpm"])
def test_clip_sample_reaches_the_sampling_scheduler(sampler):
    train = build_scheduler(DiffusionConfig(beta_schedule="squaredcos_cap_v2"))
    assert train.config.clip_sample is False  # exported pipelines say what they were trained to sample with
    assert build_scheduler(DiffusionConfig(clip_sample=True)).config.clip_sample is True
    assert sampling_scheduler(train, sampler).config.clip_sample is False
    clipped = sampling_scheduler(train, sampler, clip_sample=True)
    assert clipped.config.clip_sample is True
    free = denoise(ZeroEps(), sampling_scheduler(train, sampler, clip_sample=False), [0, 1], 10)
    held = denoise(ZeroEps(), clipped, [0, 1], 10)
    assert free.abs().max() > 2 and held.abs().max() <= 1 + 1e-5


def test_repaint_honours_clip_sample():
    config = build_scheduler(DiffusionConfig(beta_schedule="squaredcos_cap_v2")).config
    images, known = torch.zeros(2, 1, 4, 4), torch.zeros(2, 1, 4, 4)
    known[..., :2] = 1
    out = {clip: repaint(ZeroEps(), config, images, known, [0, 1], steps=10, jump_length=2, jump_n_sample=2,
                         clip_sample=clip) for clip in (False, True)}
    assert not torch.equal(out[False], out[True])


def test_sampler_names_say_how_samples_were_drawn():
    assert sampler_name(DiffusionConfig()) == "ddim-50-noclip"
    assert sampler_name(DiffusionConfig(clip_sample=True, guidance_scale=2.0)) == "ddim-50-clip-cfg2"
    assert sampler_name(DiffusionConfig(sampler="ddpm", sampling_steps=1000)) == "ddpm-1000-noclip"
    assert sampler_name(DiffusionConfig(num_train_timesteps=100), "discrete") == "mask-replace-ancestral-100"
