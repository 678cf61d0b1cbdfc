import pytest
import torch
from diffusers import DDPMScheduler, UNet2DModel
from diffusers.utils.torch_utils import randn_tensor

from core.config import ContextConfig, ModelConfig, RunConfig
from core.models import build_scheduler, build_unet
from core.objective import (ContextPrediction, DiffusionTrainingModule, image_generators, posterior_mean_coefficients,
                            randn_per_image)
from core.train import build_training_module


def test_posterior_mean_matches_diffusers_step():
    sched = DDPMScheduler(num_train_timesteps=1000, prediction_type="sample", clip_sample=False, variance_type="fixed_small")
    x0, xt = torch.randn(1, 1, 4, 4), torch.randn(1, 1, 4, 4)
    for t in (0, 1, 10, 500, 999):
        gen = torch.Generator().manual_seed(0)
        prev = sched.step(x0, t, xt, generator=gen).prev_sample
        z = randn_tensor(xt.shape, generator=torch.Generator().manual_seed(0)) if t > 0 else 0
        mean = prev - (sched._get_variance(t) ** 0.5 if t > 0 else 0) * z
        c0, ct = posterior_mean_coefficients(sched, torch.tensor([t]))
        torch.testing.assert_close(c0 * x0 + ct * xt, mean, rtol=1e-4, atol=1e-5)


def test_unet_stays_stock_and_decoder_holds_the_extra_parameters():
    cfg = RunConfig()
    module = build_training_module(cfg, in_channels=1, sample_size=16)
    plain = UNet2DModel(**build_unet(cfg.model, 16, 1).config)
    a, b = module.unet.state_dict(), plain.state_dict()
    assert a.keys() == b.keys() and all(a[k].shape == b[k].shape for k in a)
    extra = {n for n, _ in module.named_parameters()} - {f"unet.{n}" for n, _ in plain.named_parameters()}
    assert extra and all(n.startswith("context.") for n in extra)


@pytest.mark.parametrize("prediction_type", ["epsilon", "v_prediction"])
@pytest.mark.parametrize("decoder", ["distribution", "explicit"])
def test_context_gradient_reaches_last_up_block_not_targets(prediction_type, decoder):
    torch.manual_seed(0)
    cfg = RunConfig.from_dict({"diffusion": {"prediction_type": prediction_type}, "context": {"decoder": decoder}})
    module = build_training_module(cfg, 1, 16)
    x0 = torch.randn(2, 1, 16, 16)
    losses = module(x0, torch.randn_like(x0), torch.tensor([10, 700]))
    assert set(losses) >= {"loss", "point_loss", "context_loss", "context_loss_s1", "context_loss_s3"}
    module.zero_grad()
    losses["context_loss"].backward()
    grads = [p.grad for p in module.unet.up_blocks[-1].parameters()]
    assert any(g is not None and g.abs().sum() > 0 for g in grads)
    # The final projection after the tapped block gets nothing from the context term.
    assert all(p.grad is None or p.grad.abs().sum() == 0 for p in module.unet.conv_out.parameters())


def test_targets_are_detached():
    cfg = ContextConfig(strides=(1, 2))
    ctx = ContextPrediction(cfg, feature_channels=8, target_channels=1)
    feats = torch.randn(2, 8, 6, 6, requires_grad=True)
    target = torch.randn(2, 1, 6, 6, requires_grad=True)
    loss, per_stride = ctx(feats, target)
    loss.backward()
    assert target.grad is None and feats.grad.abs().sum() > 0
    assert per_stride.shape == (2,)


def test_decoder_learns_a_constant_neighborhood():
    """The distribution decoder drives W2 towards zero on an easy target (all neighbors equal)."""
    torch.manual_seed(0)
    ctx = ContextPrediction(ContextConfig(strides=(1,)), feature_channels=4, target_channels=1)
    opt = torch.optim.Adam(ctx.parameters(), lr=1e-2)
    feats, target = torch.randn(4, 4, 8, 8), torch.full((4, 1, 8, 8), 0.5)
    first = None
    for _ in range(200):
        loss, _ = ctx(feats, target)
        first = first if first is not None else loss.item()
        opt.zero_grad()
        loss.backward()
        opt.step()
    assert loss.item() < 0.01 * first


def test_point_fraction_and_solvers_run():
    for solver in ("exact", "sinkhorn", "sliced"):
        cfg = ContextConfig(strides=(1, 2), solver=solver, point_fraction=0.25, pattern="ring")
        ctx = ContextPrediction(cfg, 8, 3)
        gens = [torch.Generator().manual_seed(i) for i in range(2)]
        loss, _ = ctx(torch.randn(2, 8, 8, 8), torch.randn(2, 3, 8, 8), gens)
        assert torch.isfinite(loss)


def test_conditional_unet_with_context():
    cfg = RunConfig.from_dict({"model": {"cross_attention_dim": 16, "attention": [False, True], "text_encoder": "minilm"},
                               "data": {"caption_column": "caption"}})
    unet = build_unet(cfg.model, 16, 1)
    module = DiffusionTrainingModule(unet, build_scheduler(cfg.diffusion), ContextPrediction(cfg.context, 32, 1))
    x0 = torch.randn(2, 1, 16, 16)
    losses = module(x0, torch.randn_like(x0), torch.tensor([3, 4]), encoder_hidden_states=torch.randn(2, 5, 16))
    assert torch.isfinite(losses["loss"])


def test_randn_per_image_cpu_draws_are_pinned():
    """The CPU draws of committed runs, hashed with the code before the noise was drawn in place (commit 8b395ff):
    fp32 per image, stacked on dim 0 or 1, and the context decoder's bf16 draws (fp32 drawn, then cast)."""
    import hashlib

    def digest(t):
        return hashlib.sha256(t.contiguous().view(torch.uint8).numpy().tobytes()).hexdigest()[:16]

    a = randn_per_image(image_generators(3, 7, range(5)), (2, 3, 17), "cpu")
    b = randn_per_image(image_generators(3, 7, range(5)), (2, 3, 17), "cpu", dim=1)
    c = randn_per_image(image_generators(3, 7, range(2, 5)), (2, 4, 8, 8), "cpu", torch.bfloat16, dim=1)
    assert a.dtype == b.dtype == torch.float32 and c.dtype == torch.bfloat16 and c.shape == (2, 3, 4, 8, 8)
    assert a.flatten()[:3].tolist() == [0.6533927917480469, 1.967738389968872, 0.25192388892173767]
    assert digest(a) == "a607e9d8310bf284" and digest(b) == "71c8c1bfbbe1abe7"
    assert digest(c.view(2, 12, 8, 8)) == "c6478fe60c87aa8f"


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_randn_per_image_cuda_half_draws_are_the_float_draws_rounded():
    gens = lambda: image_generators(0, 2, range(3))  # noqa: E731
    fp32 = randn_per_image(gens(), (4, 1000), "cuda", dim=1)
    for dtype in (torch.bfloat16, torch.float16):
        assert torch.equal(randn_per_image(gens(), (4, 1000), "cuda", dtype, dim=1), fp32.to(dtype))


@pytest.mark.parametrize("device", ["cpu", pytest.param("cuda", marks=pytest.mark.skipif(
    not torch.cuda.is_available(), reason="the CUDA path of randn_per_image needs a GPU"))])
def test_randn_per_image_depends_on_each_image_generator_alone(device):
    """Image b's block is a function of gens[b] only (so of its global index, not of the batch or process
    split); on CPU it is exactly what gens[b] draws, on CUDA it is drawn there from a seed gens[b] gives."""
    whole = randn_per_image(image_generators(0, 5, range(6)), (3, 4), device)
    part = randn_per_image(image_generators(0, 5, range(4, 6)), (3, 4), device)
    assert whole.shape == (6, 3, 4) and whole.device.type == device
    torch.testing.assert_close(whole[4:], part)
    assert not torch.equal(whole[0], whole[1])
    stacked = randn_per_image(image_generators(0, 5, range(6)), (3, 4), device, dim=1)
    torch.testing.assert_close(stacked.transpose(0, 1), whole)
    if device == "cpu":
        ref = torch.randn(3, 4, generator=image_generators(0, 5, [2])[0])
        torch.testing.assert_close(whole[2], ref, rtol=0, atol=0)
    else:
        assert 0.5 < whole.std().item() < 1.5
