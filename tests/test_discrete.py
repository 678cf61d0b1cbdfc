import torch
import torch.nn.functional as F

from core.config import ContextConfig, ModelConfig
from core.discrete import DiscreteTrainingModule, MaskReplaceDiffusion, PixelQuantizer, TokenDenoiser
from core.models import build_unet
from core.objective import ContextPrediction


def step_matrix(d: MaskReplaceDiffusion, t: int) -> torch.Tensor:
    """Explicit one-step transition matrix Q[j, i] = q(x_t = i | x_{t-1} = j), (K+1, K+1)."""
    k = d.k
    q = torch.zeros(k + 1, k + 1, dtype=torch.float64)
    q[:k, :k] = d.beta[t] + d.alpha[t] * torch.eye(k, dtype=torch.float64)
    q[:k, k] = d.gamma[t]
    q[k, k] = 1
    return q


def test_schedule_and_closed_form_marginals_match_product_of_steps():
    d = MaskReplaceDiffusion(num_classes=5, num_timesteps=20)
    assert torch.allclose(step_matrix(d, 7).sum(1), torch.ones(6, dtype=torch.float64))
    x0 = torch.arange(5)
    cum = torch.eye(6, dtype=torch.float64)
    for t in range(20):
        cum = cum @ step_matrix(d, t)
        closed = d.q_given_x0(F.one_hot(x0, 5).double().view(5, 5, 1), torch.full((5,), t))
        torch.testing.assert_close(closed[..., 0], cum[:5], rtol=1e-9, atol=1e-12)


def test_closed_form_matches_repeated_one_step_sampling():
    d = MaskReplaceDiffusion(num_classes=4, num_timesteps=10)
    n, t_end = 40_000, 6
    g = torch.Generator().manual_seed(0)
    x = torch.full((n,), 2)
    for t in range(t_end + 1):
        probs = step_matrix(d, t)[x]
        x = torch.multinomial(probs.float(), 1, generator=g).squeeze(-1)
    empirical = torch.bincount(x, minlength=5).double() / n
    closed = d.q_given_x0(F.one_hot(torch.tensor([[2]]), 4).movedim(-1, 1).double(), torch.tensor([t_end]))[0, :, 0]
    sigma = (closed * (1 - closed) / n).sqrt()
    assert ((empirical - closed).abs() <= 5 * sigma + 1e-12).all()
    # and q_sample draws from the same marginal
    xs = d.q_sample(torch.full((1, 200, 200), 2), torch.tensor([t_end]))
    emp2 = torch.bincount(xs.flatten(), minlength=5).double() / xs.numel()
    assert ((emp2 - closed).abs() <= 5 * sigma * (n / xs.numel()) ** 0.5 + 1e-12).all()


def test_posterior_is_bayes_rule_and_sums_to_one():
    d = MaskReplaceDiffusion(num_classes=4, num_timesteps=10)
    for t in (1, 4, 9):
        x0 = torch.randint(0, 4, (64,))
        xt = d.q_sample(x0.view(64, 1), torch.full((64,), t)).view(64)
        post = d.posterior(xt.view(64, 1), F.one_hot(x0, 4).double().view(64, 4, 1), torch.full((64,), t))[..., 0]
        torch.testing.assert_close(post.sum(1), torch.ones(64, dtype=torch.float64))
        prior = d.q_given_x0(F.one_hot(x0, 4).double().view(64, 4, 1), torch.full((64,), t - 1))[..., 0]
        bayes = prior * step_matrix(d, t)[:, xt].T
        torch.testing.assert_close(post, bayes / bayes.sum(1, keepdim=True), rtol=1e-9, atol=1e-12)
        # soft x0 predictions give a proper distribution too
        soft = torch.softmax(torch.randn(64, 4, 1), 1)
        assert torch.allclose(d.posterior(xt.view(64, 1), soft, torch.full((64,), t)).sum(1), torch.ones(64, 1, dtype=torch.float64))


def test_loss_is_zero_for_a_perfect_denoiser_and_context_trains():
    d = MaskReplaceDiffusion(num_classes=8, num_timesteps=10)
    x0 = torch.randint(0, 8, (2, 8, 8))
    t = torch.tensor([0, 5])
    xt = d.q_sample(x0, t)
    perfect = F.one_hot(x0, 8).movedim(-1, 1).float() * 60
    assert d.loss(perfect, x0, xt, t)["vlb_loss"] < 1e-6
    unet = build_unet(ModelConfig(block_out_channels=(16, 32)), 8, 8, out_channels=8)
    quant = PixelQuantizer(8)
    ctx = ContextPrediction(ContextConfig(strides=(1, 2)), 16, 1)
    module = DiscreteTrainingModule(TokenDenoiser(unet, 8), d, quant.codebook, ctx)
    losses = module(x0, t)
    assert set(losses) >= {"loss", "vlb_loss", "aux_loss", "context_loss"}
    losses["loss"].backward()
    assert any(p.grad is not None and p.grad.abs().sum() > 0 for p in unet.up_blocks[-1].parameters())
    gens = [torch.Generator().manual_seed(i) for i in range(2)]
    out = d.sample(module.denoiser, (2, 8, 8), gens)
    assert out.shape == (2, 8, 8) and out.max() < 8
    assert torch.equal(quant.encode(quant.decode(x0)), x0)


def _tiny_module(weighting: str, t_max: int = 6) -> DiscreteTrainingModule:
    torch.manual_seed(0)
    unet = build_unet(ModelConfig(block_out_channels=(16, 32)), 8, 8, out_channels=8)
    d = MaskReplaceDiffusion(num_classes=8, num_timesteps=t_max, aux_weight=0.3)
    return DiscreteTrainingModule(TokenDenoiser(unet, 8), d, PixelQuantizer(8).codebook, loss_weighting=weighting)


def test_vq_diffusion_weighting_is_t_over_p_with_adaptive_aux():
    """VQ-Diffusion's _train_loss: mean_b (L_t + (2 - t/T) aux_w CE) / p(t); uniform p(t) = 1/T while any t has
    been drawn 10 times or fewer. Computed by hand from the per-image terms."""
    module = _tiny_module("vq_diffusion")
    d = module.diffusion
    x0 = torch.randint(0, 8, (4, 8, 8), generator=torch.Generator().manual_seed(1))
    t = torch.tensor([0, 2, 2, 5])
    gens = [torch.Generator().manual_seed(i) for i in range(4)]
    losses = module(x0, t, gens)
    gens = [torch.Generator().manual_seed(i) for i in range(4)]
    x_t = d.q_sample(x0, t, gens)
    vlb, ce = d.loss_terms(module.denoiser(x_t, t), x0, x_t, t)
    expected = ((vlb + (2 - t.double() / 6) * 0.3 * ce) * 6).mean()
    torch.testing.assert_close(losses["point_loss"].double(), expected, rtol=1e-5, atol=0)
    torch.testing.assert_close(losses["vlb_loss"].double(), vlb.mean(), rtol=1e-5, atol=0)
    # the same batch under token_mean: the unweighted token means, T times smaller without the aux term
    plain = d.loss(module.denoiser(x_t, t), x0, x_t, t)
    torch.testing.assert_close(plain["point_loss"].double(), vlb.mean() + 0.3 * ce.mean(), rtol=1e-5, atol=0)
    # history: EMA of L_t^2 from the batch's values, the last image wins among equal t; counts per image
    hist = torch.zeros(6, dtype=torch.float64)
    for b in range(4):
        hist[t[b]] = 0.1 * vlb[b].detach() ** 2  # prior history is 0
    torch.testing.assert_close(module.lt_history, hist, rtol=1e-9, atol=0)
    assert module.lt_count.tolist() == [1, 0, 2, 0, 0, 1]
    module.eval()
    module(x0, t, gens)  # evaluation passes leave the history alone
    assert module.lt_count.tolist() == [1, 0, 2, 0, 0, 1]


def test_vq_diffusion_importance_sampling_follows_sqrt_of_mean_square_loss():
    module = _tiny_module("vq_diffusion", t_max=4)
    gens = [torch.Generator().manual_seed(i) for i in range(3)]
    uniform = module.sample_timesteps(gens)
    gens = [torch.Generator().manual_seed(i) for i in range(3)]
    assert torch.equal(uniform, torch.cat([torch.randint(0, 4, (1,), generator=g) for g in gens]))
    module.lt_count.fill_(10)
    assert module.timestep_probs() is None  # "more than 10 times", as VQ-Diffusion's (Lt_count > 10).all()
    module.lt_count.fill_(11)
    module.lt_history.copy_(torch.tensor([9.0, 4.0, 1.0, 0.25], dtype=torch.float64))
    root = torch.tensor([2.0, 2.0, 1.0, 0.5], dtype=torch.float64) + 1e-4  # p(0) takes p(1)'s weight
    torch.testing.assert_close(module.timestep_probs(), root / root.sum(), rtol=1e-6, atol=0)
    draws = module.sample_timesteps([torch.Generator().manual_seed(i) for i in range(4000)])
    freq = torch.bincount(draws, minlength=4).double() / 4000
    assert (freq - root / root.sum()).abs().max() < 0.03
    # and the loss divides by the probability each t was drawn with
    x0 = torch.randint(0, 8, (2, 8, 8))
    t = torch.tensor([1, 3])
    gens = [torch.Generator().manual_seed(i) for i in range(2)]
    losses = module(x0, t, gens)
    gens = [torch.Generator().manual_seed(i) for i in range(2)]
    x_t = module.diffusion.q_sample(x0, t, gens)
    vlb, ce = module.diffusion.loss_terms(module.denoiser(x_t, t), x0, x_t, t)
    pt = (root / root.sum())[t]
    torch.testing.assert_close(losses["point_loss"].double(), ((vlb + (2 - t / 4) * 0.3 * ce) / pt).mean(),
                               rtol=1e-5, atol=0)


def test_token_mean_draws_timesteps_as_before_and_has_no_history():
    module = _tiny_module("token_mean")
    assert not hasattr(module, "lt_history") and "lt_history" not in module.state_dict()
    gens = [torch.Generator().manual_seed(i) for i in range(5)]
    drawn = module.sample_timesteps(gens)
    gens = [torch.Generator().manual_seed(i) for i in range(5)]
    assert torch.equal(drawn, torch.cat([torch.randint(0, 6, (1,), generator=g) for g in gens]))


def test_vq_diffusion_run_resumes_bit_identically_with_its_history(tmp_path):
    """The importance-sampling state (Lt_history, Lt_count) is saved with each checkpoint: an interrupted run,
    re-run, draws the same t and logs the same losses as a straight one, past the switch from uniform t."""
    import json

    from safetensors.torch import load_file

    from core.config import ConfigError, RunConfig
    from tests.conftest import TINY
    from tests.test_train import run_train

    overrides = TINY + ["backbone=discrete", "model.token_levels=4", "model.token_embed_dim=8",
                        "diffusion.num_train_timesteps=2", "diffusion.sampling_steps=2",
                        "diffusion.discrete_loss=vq_diffusion", "train.steps=6", "train.checkpoint_every=2"]
    straight, resumed = tmp_path / "straight", tmp_path / "resumed"
    run_train(straight, overrides)
    run_train(resumed, overrides, "--stop-after", "3")
    run_train(resumed, overrides)
    rows = [[json.loads(l) for l in (r / "stats.jsonl").read_text().splitlines()] for r in (straight, resumed)]
    assert [r["loss"] for r in rows[0]] == [r["loss"] for r in rows[1]] and len(rows[0]) == 6
    a, b = (load_file(r / "checkpoints/checkpoint-6/model.safetensors") for r in (straight, resumed))
    assert torch.equal(a["lt_history"], b["lt_history"]) and a["lt_count"].sum() == 6 * 8
    assert (a["lt_count"] > 10).all()  # the last steps drew t by importance
    # the option belongs to the discrete backbone only
    try:
        RunConfig.from_dict({"diffusion": {"discrete_loss": "vq_diffusion"}})
    except ConfigError as e:
        assert "diffusion.discrete_loss" in str(e) and "discrete" in str(e)
    else:
        raise AssertionError("vq_diffusion accepted with the pixel backbone")


def test_discrete_backbone_refuses_options_it_would_ignore():
    import pytest

    from core.config import ConfigError, RunConfig

    base = {"backbone": "discrete", "diffusion": {"num_train_timesteps": 100, "sampling_steps": 100}}
    with pytest.raises(ConfigError, match="diffusion.sampling_dtype"):
        RunConfig.from_dict({**base, "diffusion": {**base["diffusion"], "sampling_dtype": "bf16"}})
    with pytest.raises(ConfigError, match="diffusion.discrete_loss"):
        RunConfig.from_dict({**base, "diffusion": {**base["diffusion"], "discrete_loss": "vq"}})
