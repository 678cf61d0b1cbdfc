"""The readings' options: per-module gradient clipping and the decoder reading the denoised point."""

import pytest
import torch
from diffusers import DDPMScheduler

from core.config import RunConfig
from core.train import build_training_module, clip_gradients


def _module(**context):
    cfg = RunConfig.from_dict({"model": {"block_out_channels": [8, 8], "norm_num_groups": 4},
                               "context": {"hidden_dim": 8, "latent_dim": 4, "depth": 1, **context}})
    torch.manual_seed(0)
    return cfg, build_training_module(cfg, 1, 8)


@pytest.mark.parametrize("prediction_type", ["epsilon", "v_prediction"])
def test_predicted_x0_matches_diffusers_step(prediction_type):
    _, module = _module()
    module.scheduler = DDPMScheduler(1000, beta_schedule="squaredcos_cap_v2", prediction_type=prediction_type,
                                     clip_sample=False)
    x_t, out = torch.randn(3, 1, 8, 8), torch.randn(3, 1, 8, 8)
    t = torch.tensor([5, 400, 990])
    mine = module.predicted_x0(x_t, out, t)
    for i in range(3):
        ref = module.scheduler.step(out[i : i + 1], int(t[i]), x_t[i : i + 1]).pred_original_sample
        torch.testing.assert_close(mine[i : i + 1], ref, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("reads", ["denoised", "features+denoised"])
def test_denoised_input_sends_the_context_gradient_through_the_unet_output(reads):
    x0, noise, t = torch.randn(2, 1, 8, 8), torch.randn(2, 1, 8, 8), torch.tensor([10, 500])
    grads = {}
    for name in ("features", reads):
        _, module = _module(decoder_input=name)
        losses = module(x0, noise, t)
        losses["context_loss"].backward()
        grads[name] = module.unet.conv_out.weight.grad
    # Features come from the last up-block, before conv_out: no context gradient reaches it.
    assert grads["features"] is None or grads["features"].abs().max() == 0
    assert grads[reads].abs().max() > 0


def test_denoised_clip_forms_the_input_from_the_clamped_x0_and_bounds_the_gradient_at_t_999():
    """mu~(x_t, clamp(x0_hat)) by hand; at t = 999 (alpha-bar 2.4e-9) x0_hat is far outside [-1, 1], so the clamped
    input sends no gradient to the UNet's output, where the unclamped one sends a large one."""
    from core.objective import posterior_mean_coefficients

    x0, noise, t = torch.randn(2, 1, 8, 8), torch.randn(2, 1, 8, 8), torch.tensor([999, 500])
    seen, grads = {}, {}
    for clip in (0.0, 1.0):
        _, module = _module(decoder_input="denoised", denoised_clip=clip)
        module.scheduler = DDPMScheduler(1000, beta_schedule="squaredcos_cap_v2", clip_sample=False)  # the mini presets'
        module.context.forward = lambda features, target, gens=None, weights=None, _c=clip: (
            seen.__setitem__(_c, features) or (features.pow(2).sum(), torch.zeros(3)))
        out = {}
        module.unet.register_forward_hook(lambda m, i, o: out.__setitem__("eps", o.sample))
        losses = module(x0, noise, t)
        out["eps"].retain_grad()
        losses["context_loss"].backward()
        grads[clip] = out["eps"].grad
        x_t = module.scheduler.add_noise(x0, noise, t)
        c0, ct = (c.view(-1, 1, 1, 1) for c in posterior_mean_coefficients(module.scheduler, t))
        x0_hat = module.predicted_x0(x_t, out["eps"].detach(), t)
        x0_hat = x0_hat.clamp(-clip, clip) if clip else x0_hat
        torch.testing.assert_close(seen[clip].detach(), c0 * x0_hat + ct * x_t)
    assert grads[0.0][0].abs().max() > 1e3 * grads[0.0][1].abs().max()  # t = 999 dominates unclamped
    assert grads[1.0][0].abs().max() == 0 and grads[1.0][1].abs().max() > 0
    with pytest.raises(Exception, match="denoised_clip"):
        RunConfig.from_dict({"context": {"denoised_clip": 1.0}})  # decoder_input=features reads no denoised point
    for bad in (-1.0, float("nan"), float("inf")):
        with pytest.raises(Exception, match="denoised_clip"):
            RunConfig.from_dict({"context": {"decoder_input": "denoised", "denoised_clip": bad}})


def test_per_module_clipping_leaves_the_decoder_alone_and_clips_the_backbone_as_the_baseline():
    from accelerate import Accelerator

    cfg, module = _module()
    x0, noise, t = torch.randn(2, 1, 8, 8), torch.randn(2, 1, 8, 8), torch.tensor([10, 500])

    def grads_after(grad_clip, max_norm):
        module.zero_grad()
        (module(x0, noise, t)["loss"] * 100).backward()  # large, so that clipping acts
        tc = RunConfig.from_dict({"train": {"grad_clip": grad_clip, "max_grad_norm": max_norm}}).train
        norms = clip_gradients(Accelerator(cpu=True), module, tc)
        norm = lambda ps: torch.linalg.vector_norm(torch.stack([p.grad.norm() for p in ps if p.grad is not None]))  # noqa: E731
        return norms, float(norm(module.unet.parameters())), float(norm(module.context.parameters()))

    norms, unet, ctx = grads_after("per_module", 1.0)
    assert unet == pytest.approx(1.0, rel=1e-4) and norms["grad_norm_backbone"] > 1
    assert ctx == pytest.approx(norms["grad_norm_context"], rel=1e-5) and ctx > 1  # not clipped
    norms, unet, ctx = grads_after("joint", 1.0)
    assert (unet**2 + ctx**2) ** 0.5 == pytest.approx(1.0, rel=1e-4) and unet < 1
    with pytest.raises(Exception, match="grad_clip"):
        RunConfig.from_dict({"train": {"grad_clip": "sometimes"}})
    with pytest.raises(Exception, match="decoder_input"):
        RunConfig.from_dict({"backbone": "discrete", "context": {"decoder_input": "denoised"}})


TINY_PROBE = ["model.block_out_channels=[8,16]", "model.norm_num_groups=4", "model.layers_per_block=1",
              "model.attention=[]", "model.mid_attention=false", "train.batch_size=4", "data.num_examples=16",
              "context.hidden_dim=8", "context.latent_dim=4"]


@pytest.mark.parametrize("preset", ["mini-digits16-conprediff", "mini-digits16-discrete-conprediff"])
def test_grad_ratio_splits_the_total_gradient_and_scales_with_lambda(preset):
    """grad_point and grad_context are the two parts of the training gradient on the backbone: their norms and
    cosine rebuild the norm of the total loss's gradient; λ scales the context part alone."""
    from experiments.readings.grad_ratio import batch_inputs, build, find_preset, gradient_balance, measure
    from core.config import apply_overrides
    from core.data import ImageData
    from core.train import ema_target

    one = measure(preset, 0, 1, overrides=TINY_PROBE)["median"]
    three = measure(preset, 0, 1, overrides=TINY_PROBE + ["context.weight=3"])["median"]
    assert three["grad_point"] == pytest.approx(one["grad_point"], rel=1e-6)
    assert three["ratio"] == pytest.approx(3 * one["ratio"], rel=1e-5)
    cfg = RunConfig.from_dict(apply_overrides(find_preset(preset).run_config(0).to_dict(), TINY_PROBE))
    module, vae = build(cfg)
    inputs = batch_inputs(cfg, module, vae, ImageData(cfg.data), 0)
    parts = gradient_balance(module, inputs)
    assert parts["grad_point"] == pytest.approx(one["grad_point"], rel=1e-6)  # build() starts from the run's init
    module, vae = build(cfg)
    module(*batch_inputs(cfg, module, vae, ImageData(cfg.data), 0))["loss"].backward()
    total = torch.cat([p.grad.flatten() for p in ema_target(module).parameters() if p.grad is not None]).norm()
    a, b, c = parts["grad_point"], parts["grad_context"], parts["cosine"]
    assert float(total) == pytest.approx((a * a + b * b + 2 * a * b * c) ** 0.5, rel=1e-4)


def test_grad_ratio_refuses_a_preset_without_context():
    from core.config import ConfigError
    from experiments.readings.grad_ratio import measure

    with pytest.raises(ConfigError, match="no context term"):
        measure("mini-digits16-baseline", 0, 1, overrides=TINY_PROBE)
    with pytest.raises(ConfigError, match="close: mini-digits16-conprediff"):
        measure("mini-digits16-conprediff-typo", 0, 1)


def test_grad_ratio_at_a_fixed_timestep_noises_every_image_to_it():
    from core.config import ConfigError, apply_overrides
    from core.data import ImageData
    from experiments.readings.grad_ratio import batch_inputs, build, find_preset, measure

    cfg = RunConfig.from_dict(apply_overrides(find_preset("mini-digits16-conprediff").run_config(0).to_dict(), TINY_PROBE))
    module, vae = build(cfg)
    drawn = batch_inputs(cfg, module, vae, ImageData(cfg.data), 0)
    fixed = batch_inputs(cfg, module, vae, ImageData(cfg.data), 0, timestep=999)
    assert drawn[2].unique().numel() > 1 and fixed[2].tolist() == [999] * cfg.train.batch_size
    torch.testing.assert_close(fixed[1], drawn[1])  # same images and noise, only t changes
    out = measure("mini-digits16-conprediff", 0, 1, overrides=TINY_PROBE, timestep=999)
    assert out["timestep"] == 999 and out["median"]["ratio"] != measure(
        "mini-digits16-conprediff", 0, 1, overrides=TINY_PROBE)["median"]["ratio"]
    with pytest.raises(ConfigError, match="outside"):
        measure("mini-digits16-conprediff", 0, 1, overrides=TINY_PROBE, timestep=1000)
    with pytest.raises(ConfigError, match="continuous"):
        measure("mini-digits16-discrete-conprediff", 0, 1, overrides=TINY_PROBE, timestep=5)
