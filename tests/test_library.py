"""The method as a library: README's "ConPreDiff in your own training loop" runs as written, and its loss is the
trainer's on the same batch."""

import re

import torch
import torch.nn.functional as F

from core.config import ContextConfig
from tests.conftest import ROOT


def readme_example() -> str:
    text = (ROOT / "README.md").read_text()
    return re.search(r"<!-- library-example -->\n```python\n(.*?)```", text, re.S).group(1)


def test_the_readme_example_runs_as_written():
    code = readme_example()
    assert len(code.strip().splitlines()) <= 22
    torch.manual_seed(0)
    scope = {"batches": [torch.rand(4, 1, 16, 16) * 2 - 1 for _ in range(2)]}
    exec(compile(code, "README.md", "exec"), scope)
    assert torch.isfinite(scope["loss"]) and set(scope["context"].logged) == {
        "context_loss", "context_loss_s1", "context_loss_s2", "context_loss_s3"}
    assert any(p.grad is not None and p.grad.abs().sum() > 0 for p in scope["context"].parameters())


def test_the_library_term_equals_the_trainers():
    from diffusers import DDPMScheduler, UNet2DModel

    from core import attach_context
    from core.objective import ContextPrediction, DiffusionTrainingModule, image_generators

    torch.manual_seed(0)
    unet = UNet2DModel(sample_size=8, in_channels=1, out_channels=1, block_out_channels=(8, 16), norm_num_groups=4,
                       down_block_types=("DownBlock2D",) * 2, up_block_types=("UpBlock2D",) * 2)
    scheduler = DDPMScheduler(num_train_timesteps=1000, beta_schedule="squaredcos_cap_v2")
    cfg = ContextConfig(strides=(1, 2), latent_dim=4, hidden_dim=8, point_fraction=0.5, weight=0.7)
    term = attach_context(unet, scheduler, cfg)
    x0, noise = torch.rand(3, 1, 8, 8) * 2 - 1, torch.randn(3, 1, 8, 8)
    t = torch.tensor([10, 500, 990])
    pred = unet(scheduler.add_noise(x0, noise, t), t).sample
    mine = F.mse_loss(pred, noise) + term(x0, noise, t, generators=image_generators(0, 5, range(3)))
    term.detach()
    module = DiffusionTrainingModule(unet, scheduler, ContextPrediction(cfg, 8, 1))
    module.context.load_state_dict(term.context.state_dict())
    theirs = module(x0, noise, t, generators=image_generators(0, 5, range(3)))["loss"]
    assert torch.equal(mine, theirs)


def test_timestep_weights_against_a_hand_computation():
    """Issue 28's per-timestep reading: signal share a^2 / (a^2 + b^2) of mu~ = a x0 + b eps; weight 1 everywhere is
    today's loss bit for bit."""
    from diffusers import DDPMScheduler

    from core.objective import ContextPrediction, timestep_weights

    scheduler = DDPMScheduler(num_train_timesteps=1000, beta_schedule="squaredcos_cap_v2")
    t = torch.tensor([0, 10, 500, 900, 999])
    ab = scheduler.alphas_cumprod.double()
    w = []
    for k in t.tolist():
        prev = ab[k - 1] if k > 0 else torch.tensor(1.0, dtype=torch.float64)
        beta = 1 - ab[k] / prev
        c0 = prev.sqrt() * beta / (1 - ab[k])
        ct = (1 - beta).sqrt() * (1 - prev) / (1 - ab[k])
        a, b = c0 + ct * ab[k].sqrt(), ct * (1 - ab[k]).sqrt()
        w.append(float(a * a / (a * a + b * b)))
    got = timestep_weights(ContextConfig(t_weighting="signal_share"), scheduler, t)
    torch.testing.assert_close(got, torch.tensor(w, dtype=torch.float32), rtol=1e-4, atol=1e-6)
    assert got[0] == 1.0 and got[3] < 0.1  # t = 900: mostly the input's own noise (SPEC section 6: 0.16 x0, 0.98 eps)
    assert timestep_weights(ContextConfig(t_weighting="below", t_cut=500), scheduler, t).tolist() == [1, 1, 0, 0, 0]
    assert timestep_weights(ContextConfig(), scheduler, t) is None

    torch.manual_seed(0)
    ctx = ContextPrediction(ContextConfig(strides=(1, 2), latent_dim=4, hidden_dim=8), 6, 1)
    feats, target = torch.randn(2, 6, 8, 8), torch.randn(2, 1, 8, 8)
    from core.objective import image_generators

    plain = ctx(feats, target, image_generators(0, 0, range(2)))[0]
    ones = ctx(feats, target, image_generators(0, 0, range(2)), torch.ones(2))[0]
    assert torch.equal(plain, ones)
    half = ctx(feats, target, image_generators(0, 0, range(2)), torch.tensor([1.0, 0.0]))[0]
    assert half < plain
