"""Variational-bound terms and the hybrid training objective of ``diffusion``."""
import math

import pytest
import torch
from torch import nn

from diffusion import (DiffusionConfig, GaussianDiffusion, approx_standard_normal_cdf,
                       discretized_gaussian_log_likelihood, normal_kl)


def test_normal_kl_identical_is_zero_and_matches_closed_form():
    g = torch.Generator().manual_seed(0)
    m1, m2, v1, v2 = torch.randn(4, 100, generator=g, dtype=torch.float64)
    # identical Gaussians: 0 up to float64 rounding of −1 + e^0 (the terms cancel only to ~1e-16)
    assert normal_kl(m1, v1, m1, v1).abs().max() < 1e-15
    ours = normal_kl(m1, v1, m2, v2)
    ref = torch.distributions.kl_divergence(torch.distributions.Normal(m1, (0.5 * v1).exp()),
                                            torch.distributions.Normal(m2, (0.5 * v2).exp()))
    torch.testing.assert_close(ours, ref, rtol=1e-12, atol=1e-12)
    assert (ours >= 0).all()
    # scalars broadcast against tensors (the prior term: KL(q(x_T|x_0) ‖ N(0, I)))
    torch.testing.assert_close(normal_kl(m1, v1, 0.0, 0.0), normal_kl(m1, v1, torch.zeros_like(m1), torch.zeros_like(v1)))


def test_approx_cdf_is_close_to_the_normal_cdf():
    x = torch.linspace(-6, 6, 1001, dtype=torch.float64)
    exact = 0.5 * (1 + torch.erf(x / math.sqrt(2)))
    assert (approx_standard_normal_cdf(x) - exact).abs().max() < 2e-4
    assert approx_standard_normal_cdf(torch.zeros(1))[0] == 0.5


@pytest.mark.parametrize("mean, log_scale", [(0.0, math.log(0.3)), (0.7, math.log(0.01)), (-0.99, math.log(2.0))])
def test_discretized_gaussian_sums_to_one_over_the_256_bins(mean, log_scale):
    x = torch.linspace(-1, 1, 256, dtype=torch.float64)        # the 8-bit grid rescaled to [−1, 1]
    means = torch.full_like(x, mean)
    log_probs = discretized_gaussian_log_likelihood(x, means, torch.full_like(x, log_scale))
    assert log_probs.shape == x.shape and (log_probs <= 0).all()
    torch.testing.assert_close(log_probs.exp().sum(), torch.tensor(1.0, dtype=torch.float64), rtol=0, atol=1e-6)
    # A very narrow Gaussian puts (almost) all mass in the bin of its mean.
    narrow = discretized_gaussian_log_likelihood(x, torch.full_like(x, x[100].item()), torch.full_like(x, -10.0))
    assert narrow.argmax() == 100 and narrow[100] > -1e-6


def test_vb_terms_vanish_for_the_true_posterior():
    # FIXED_SMALL variance = the posterior variance; with the true ε and no clipping p = q, so KL ≈ 0.
    d = GaussianDiffusion.from_config(DiffusionConfig(sigma_small=True, timestep_respacing="20"))
    g = torch.Generator().manual_seed(1)
    x0 = torch.rand(3, 3, 8, 8, generator=g) * 2 - 1
    eps = torch.randn(3, 3, 8, 8, generator=g)
    t = torch.tensor([1, 10, 19])
    bpd, pred_x0 = d.vb_terms_bpd(eps, x0, d.q_sample(x0, t, eps), t, clip_denoised=False)
    assert bpd.shape == (3,) and (bpd.abs() < 1e-4).all()
    bad, _ = d.vb_terms_bpd(eps + 0.5, x0, d.q_sample(x0, t, eps), t, clip_denoised=False)
    assert (bad > 1e-3).all()
    # t = 0: the decoder NLL in bits per dimension, positive
    t0 = torch.zeros(3, dtype=torch.long)
    nll, _ = d.vb_terms_bpd(eps, x0, d.q_sample(x0, t0, eps), t0, clip_denoised=False)
    assert (nll > 0).all() and torch.isfinite(nll).all()


class TinyModel(nn.Module):
    """A conv net that sees the timestep through a scalar embedding: (x_t, t) -> [N x 2C x H x W]."""

    def __init__(self, channels_out=6):
        super().__init__()
        self.conv = nn.Conv2d(3, channels_out, 3, padding=1)
        self.t_scale = nn.Parameter(torch.tensor(1e-3))

    def forward(self, x, t):
        return self.conv(x) + self.t_scale * t.float().view(-1, 1, 1, 1)


def _data(seed=2):
    g = torch.Generator().manual_seed(seed)
    return torch.rand(4, 3, 8, 8, generator=g) * 2 - 1, torch.randn(4, 3, 8, 8, generator=g), torch.tensor([0, 3, 50, 99])


def test_training_losses_hybrid_smoke():
    torch.manual_seed(0)
    d = GaussianDiffusion.from_config(DiffusionConfig(learn_sigma=True, timestep_respacing="100",
                                                      rescale_learned_sigmas=True))
    model = TinyModel()
    x0, noise, t = _data()
    terms = d.training_losses(model, x0, t, noise)
    assert set(terms) == {"loss", "mse", "vb"}
    assert all(v.shape == (4,) and torch.isfinite(v).all() for v in terms.values())
    torch.testing.assert_close(terms["loss"], terms["mse"] + terms["vb"])
    terms["loss"].mean().backward()
    assert model.conv.weight.grad.abs().sum() > 0
    # vb is rescaled by T/1000 = 0.1 when rescale_learned_sigmas
    plain = GaussianDiffusion.from_config(DiffusionConfig(learn_sigma=True, timestep_respacing="100"))
    with torch.no_grad():
        torch.testing.assert_close(plain.training_losses(model, x0, t, noise)["vb"] * 0.1,
                                   d.training_losses(model, x0, t, noise)["vb"])


def test_training_losses_vb_trains_only_the_variance():
    d = GaussianDiffusion.from_config(DiffusionConfig(learn_sigma=True, timestep_respacing="100"))
    x0, noise, t = _data(3)
    eps_out = torch.randn_like(x0, requires_grad=True)
    var_out = (torch.rand_like(x0) * 2 - 1).requires_grad_()
    terms = d.training_losses(lambda x_t, model_t: torch.cat([eps_out, var_out], 1), x0, t, noise)
    terms["vb"].sum().backward(retain_graph=True)
    assert not eps_out.grad.any() and var_out.grad.abs().sum() > 0    # the mean is detached in vb
    var_out.grad, eps_out.grad = None, None
    terms["mse"].sum().backward()
    assert not var_out.grad.any() and eps_out.grad.abs().sum() > 0
    torch.testing.assert_close(terms["mse"], ((noise - eps_out) ** 2).mean(dim=(1, 2, 3)))


def test_training_losses_other_objectives():
    x0, noise, t = _data(4)
    seen = []
    # fixed variance: plain MSE on ε; the model sees the mapped timesteps
    d = GaussianDiffusion.from_config(DiffusionConfig(timestep_respacing="100"))
    terms = d.training_losses(lambda x_t, mt: seen.append(mt) or torch.zeros_like(x_t), x0, t, noise)
    assert set(terms) == {"loss", "mse"} and torch.equal(terms["loss"], terms["mse"])
    torch.testing.assert_close(terms["mse"], (noise ** 2).mean(dim=(1, 2, 3)))
    assert torch.equal(seen[0], d.model_timesteps(t))
    # predict_xstart: the target is x_0
    d = GaussianDiffusion.from_config(DiffusionConfig(predict_xstart=True, timestep_respacing="100"))
    torch.testing.assert_close(d.training_losses(lambda x_t, mt: x0.clone(), x0, t, noise)["mse"], torch.zeros(4))
    # use_kl: the rescaled KL, T · L_t, with gradients into both halves
    d = GaussianDiffusion.from_config(DiffusionConfig(learn_sigma=True, use_kl=True, timestep_respacing="100"))
    out = torch.cat([noise, torch.zeros_like(noise)], 1).requires_grad_()
    terms = d.training_losses(lambda x_t, mt: out, x0, t, noise)
    x_t = d.q_sample(x0, t, noise)
    bpd, _ = d.vb_terms_bpd(out, x0, x_t, t, clip_denoised=False)
    assert set(terms) == {"loss"}
    torch.testing.assert_close(terms["loss"], bpd * 100)
    terms["loss"].sum().backward()
    assert out.grad[:, :3].abs().sum() > 0 and out.grad[:, 3:].abs().sum() > 0
