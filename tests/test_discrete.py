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
