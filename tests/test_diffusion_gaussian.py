"""Closed-form properties of the Gaussian process, the variances, the DDPM/DDIM steps and guidance."""
import numpy as np
import pytest
import torch

from diffusion import (DiffusionConfig, GaussianDiffusion, MeanVariance, ModelMeanType, ModelVarType,
                       ddim_step, ddpm_step)


def make(**kwargs):
    return GaussianDiffusion.from_config(DiffusionConfig(**kwargs))


@pytest.fixture(scope="module")
def d():
    return make(learn_sigma=True, timestep_respacing="50")


def batch(d, n=4, seed=0):
    g = torch.Generator().manual_seed(seed)
    x0 = torch.rand(n, 3, 8, 8, generator=g) * 2 - 1
    eps = torch.randn(n, 3, 8, 8, generator=g)
    t = torch.randint(0, d.num_timesteps, (n,), generator=g)
    t[0], t[-1] = 0, d.num_timesteps - 1
    return x0, eps, t


def f32(d, name, t):
    """The float32 coefficient the process uses, as [N, 1, 1, 1]."""
    return torch.from_numpy(getattr(d, name))[t].float().view(-1, 1, 1, 1)


# ---------------------------------------------------------------- forward process and conversions
def test_q_sample_then_predict_x0_is_identity(d):
    x0, eps, t = batch(d)
    x_t = d.q_sample(x0, t, eps)
    assert x_t.dtype == torch.float32 and x_t.shape == x0.shape
    # float32 coefficients: the error scales with √(1/ᾱ_t) (≈ 157 at the last linear step)
    atol = 2e-6 * f32(d, "sqrt_recip_alphas_cumprod", t)
    assert ((d.predict_x0_from_eps(x_t, t, eps) - x0).abs() <= atol).all()
    # ε = (…)/√(1/ᾱ − 1) divides by a small number at t = 0: scale the bound by it
    eps_atol = 2e-6 * (1 + f32(d, "sqrt_recip_alphas_cumprod", t) / f32(d, "sqrt_recipm1_alphas_cumprod", t))
    assert ((d.predict_eps_from_x0(x_t, t, x0) - eps).abs() <= eps_atol).all()
    assert torch.equal(d.q_sample(x0, torch.zeros_like(t), eps),
                       f32(d, "sqrt_alphas_cumprod", 0) * x0 + f32(d, "sqrt_one_minus_alphas_cumprod", 0) * eps)


def test_eps_and_x0_conversions_are_inverse(d):
    _, eps, t = batch(d, seed=1)
    t = t.clamp(min=1)  # at t = 0, √(1/ᾱ − 1) is small and ε is ill-conditioned
    x_t = torch.randn_like(eps)
    x0 = d.predict_x0_from_eps(x_t, t, eps)
    torch.testing.assert_close(d.predict_eps_from_x0(x_t, t, x0), eps, rtol=1e-4, atol=1e-4)


def test_posterior_mean_is_linear_and_exact_for_consistent_inputs(d):
    x0, eps, t = batch(d, seed=2)
    x_t = d.q_sample(x0, t, eps)
    mean, var, log_var = d.q_posterior_mean_variance(x0, x_t, t)
    assert mean.shape == var.shape == log_var.shape == x0.shape
    torch.testing.assert_close(mean, f32(d, "posterior_mean_coef1", t) * x0 + f32(d, "posterior_mean_coef2", t) * x_t)
    assert torch.equal(var, f32(d, "posterior_variance", t).expand_as(x0))
    # at t = 0 the posterior is the point mass at x0 (coef1 = 1, coef2 = 0)
    torch.testing.assert_close(mean[0], x0[0], rtol=0, atol=1e-6)


def test_model_timesteps():
    t = torch.tensor([0, 5, 9])
    d = make(timestep_respacing="10")
    out = d.model_timesteps(t)
    assert out.dtype == torch.int64 and out.tolist() == [0, 555, 999]
    d = make(steps=4000, noise_schedule="cosine", timestep_respacing="10", rescale_timesteps=True)
    out = d.model_timesteps(t)
    assert out.dtype == torch.float32 and out.tolist() == [0.0, 2222 * 0.25, 3999 * 0.25]


# --------------------------------------------------------------------------------------- variances
def test_learned_range_interpolates_between_fixed_variances(d):
    x0, _, t = batch(d, n=8, seed=3)
    lo, log_lo = d.model_variance(-torch.ones_like(x0), x0, t)
    hi, log_hi = d.model_variance(torch.ones_like(x0), x0, t)
    assert torch.equal(log_lo, f32(d, "posterior_log_variance_clipped", t).expand_as(x0))  # v = −1: log β̃_t
    # v = +1: log β_t, taken in float64 and then rounded (official order)
    assert torch.equal(log_hi, torch.from_numpy(np.log(d.betas))[t].float().view(-1, 1, 1, 1).expand_as(x0))
    v = torch.rand_like(x0) * 2 - 1
    var, log_var = d.model_variance(v, x0, t)
    torch.testing.assert_close(var, torch.exp(log_var))
    assert (log_var >= log_lo - 1e-6).all() and (log_var <= log_hi + 1e-6).all()
    # … and for t ≥ 1 the two ends are exactly the FIXED_SMALL and FIXED_LARGE variances.
    small = make(timestep_respacing="50", sigma_small=True)
    large = make(timestep_respacing="50")
    s_var, s_log = small.model_variance(None, x0, t)
    l_var, l_log = large.model_variance(None, x0, t)
    assert torch.equal(s_log, log_lo) and torch.equal(s_var, f32(d, "posterior_variance", t).expand_as(x0))
    k = t >= 1
    assert torch.equal(l_log[k], log_hi[k]) and torch.equal(l_var[k], f32(d, "betas", t).expand_as(x0)[k])
    # FIXED_LARGE at t = 0 uses β̃_1 (official "better decoder log likelihood")
    assert torch.equal(l_var[0], f32(d, "posterior_variance", torch.tensor([1]))[0].expand_as(x0[0]))


def test_learned_variance_is_log_sigma_squared():
    d = GaussianDiffusion(DiffusionConfig(learn_sigma=True), model_var_type=ModelVarType.LEARNED)
    v = torch.randn(2, 3, 4, 4)
    var, log_var = d.model_variance(v, v, torch.tensor([3, 7]))
    assert torch.equal(log_var, v) and torch.equal(var, torch.exp(v))


# --------------------------------------------------------------------------------- p_mean_variance
def test_p_mean_variance_epsilon_learned_range(d):
    x0, eps, t = batch(d, seed=4)
    x_t = d.q_sample(x0, t, eps)
    v = torch.rand_like(x0) * 2 - 1
    out = d.p_mean_variance(torch.cat([3 * eps, v], dim=1), x_t, t)   # 3ε pushes x̂_0 outside [−1, 1]
    assert isinstance(out, MeanVariance)
    assert torch.equal(out.eps, 3 * eps)                                 # the raw eps channels
    assert torch.equal(out.pred_x0, d.predict_x0_from_eps(x_t, t, 3 * eps).clamp(-1, 1))
    assert out.pred_x0.abs().max() == 1
    assert torch.equal(out.mean, d.q_posterior_mean_variance(out.pred_x0, x_t, t)[0])
    var, log_var = d.model_variance(v, x_t, t)
    assert torch.equal(out.variance, var) and torch.equal(out.log_variance, log_var)
    # denoised_fn runs before the clamp; no clamp without clip_denoised
    out2 = d.p_mean_variance(torch.cat([eps, v], 1), x_t, t, clip_denoised=False, denoised_fn=lambda x: 5 * x)
    assert torch.equal(out2.pred_x0, 5 * d.predict_x0_from_eps(x_t, t, eps))
    out3 = d.p_mean_variance(torch.cat([eps, v], 1), x_t, t, denoised_fn=lambda x: 5 * x)
    assert torch.equal(out3.pred_x0, (5 * d.predict_x0_from_eps(x_t, t, eps)).clamp(-1, 1))


def test_p_mean_variance_start_x_fixed():
    d = make(predict_xstart=True, timestep_respacing="50")
    x0, eps, t = batch(d, seed=5)
    t = t.clamp(min=1)
    x_t = d.q_sample(x0, t, eps)
    out = d.p_mean_variance(x0, x_t, t)
    assert torch.equal(out.pred_x0, x0)
    assert torch.equal(out.eps, d.predict_eps_from_x0(x_t, t, x0))
    torch.testing.assert_close(out.eps, eps, rtol=1e-3, atol=1e-3)
    # An output outside [-1, 1]: x0 is clipped, eps comes from the raw output (SAG / PAG repos'
    # p_mean_variance: _predict_eps_from_xstart(x_t, t, model_output)).
    raw = 3 * x0
    out = d.p_mean_variance(raw, x_t, t)
    assert torch.equal(out.pred_x0, raw.clamp(-1, 1)) and (raw.abs() > 1).any()
    assert torch.equal(out.eps, d.predict_eps_from_x0(x_t, t, raw))
    with pytest.raises(AssertionError, match="model output"):
        d.p_mean_variance(torch.cat([x0, x0], 1), x_t, t)   # FIXED_LARGE wants C channels
    with pytest.raises(AssertionError, match="t must be"):
        d.p_mean_variance(x0, x_t, t[:2])


# ----------------------------------------------------------------------------------- step functions
def test_ddpm_step(d):
    x0, eps, t = batch(d, seed=6)
    mean, log_var = torch.randn_like(x0), torch.randn_like(x0) - 3
    out = ddpm_step(mean, log_var, t, eps)
    assert torch.equal(out[0], mean[0])                      # t = 0: no noise
    torch.testing.assert_close(out[1:], mean[1:] + torch.exp(0.5 * log_var[1:]) * eps[1:])
    assert torch.equal(d.ddpm_step(mean, log_var, t, eps), out)


def test_ddim_eta0_is_deterministic_and_follows_the_marginals(d):
    x0, eps, t = batch(d, seed=7)
    x_t = d.q_sample(x0, t, eps)
    a = d.ddim_step(x_t, x0, t, 0.0, torch.randn_like(x0))
    b = d.ddim_step(x_t, x0, t, 0.0, 10 * torch.randn_like(x0))
    c = ddim_step(d, x_t, x0, t, 0.0, None)
    assert torch.equal(a, b) and torch.equal(a, c)
    # with the true x_0 and ε, DDIM (η = 0) lands on q_sample(x_0, t − 1, ε); at t = 0 on x_0 itself
    k = t >= 1
    prev = d.q_sample(x0[k], t[k] - 1, eps[k])
    torch.testing.assert_close(a[k], prev, rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(a[~k], x0[~k], rtol=0, atol=1e-6)


def test_ddim_eta1_sigma_is_posterior_std(d):
    t = torch.arange(d.num_timesteps)
    shape = (d.num_timesteps, 1, 1, 1)
    # In float64 the identity σ_t(1)² = β̃_t holds to the last bits …
    a, a_prev = d.alphas_cumprod, d.alphas_cumprod_prev
    np.testing.assert_allclose((1 - a_prev) / (1 - a) * (1 - a / a_prev), d.posterior_variance, rtol=1e-12)
    # … and in float32 up to the cancellation in 1 − ᾱ_t/ᾱ_{t−1} (≈ 8e-5 relative at t = 1, where β_t ≈ 2e-3).
    sigma = d.ddim_sigma(t, 1.0, shape)
    torch.testing.assert_close(sigma, f32(d, "posterior_variance", t).sqrt(), rtol=2e-4, atol=0)
    assert sigma[0].item() == 0.0
    x_t, pred_x0, noise = torch.randn(3, d.num_timesteps, 1, 2, 2)
    half = d.ddim_step(x_t, pred_x0, t, 0.5, noise) - d.ddim_step(x_t, pred_x0, t, 0.5, torch.zeros_like(noise))
    torch.testing.assert_close(half, 0.5 * sigma * noise * (t != 0).view(-1, 1, 1, 1), rtol=1e-4, atol=1e-6)
    with pytest.raises(AssertionError, match="needs noise"):
        d.ddim_step(x_t, pred_x0, t, 1.0, None)


# ---------------------------------------------------------------------------- classifier guidance
def test_condition_mean_and_score(d):
    x0, eps, t = batch(d, seed=8)
    t = t.clamp(min=1)
    x_t = d.q_sample(x0, t, eps)
    mean, var = torch.randn_like(x0), torch.rand_like(x0)
    grad = torch.randn_like(x0)
    assert torch.equal(d.condition_mean(mean, var, torch.zeros_like(grad)), mean)
    assert torch.equal(d.condition_mean(mean, var, grad), mean + var * grad)
    out = d.condition_score(x0, x_t, t, grad)
    shift = (1 - f32(d, "alphas_cumprod", t)).sqrt()
    torch.testing.assert_close(out.eps, d.predict_eps_from_x0(x_t, t, x0) - shift * grad)
    assert torch.equal(out.pred_x0, d.predict_x0_from_eps(x_t, t, out.eps))
    # x̂_0 moves by √(1−ᾱ)·√(1/ᾱ − 1)·grad = (1−ᾱ)/√ᾱ · grad, and is not re-clipped
    step = shift * f32(d, "sqrt_recipm1_alphas_cumprod", t)
    torch.testing.assert_close(out.pred_x0, x0 + step * grad, rtol=1e-3, atol=1e-3 * step.max().item())
    zero = d.condition_score(x0, x_t, t, torch.zeros_like(grad))
    torch.testing.assert_close(zero.pred_x0, x0, rtol=1e-3, atol=1e-3)


# ------------------------------------------------------------------------------ device agnosticism
def test_runs_without_host_syncs_on_meta_tensors(d):
    # Meta tensors have no data: any .item(), .tolist() or data-dependent branch would raise.
    x = torch.empty(2, 3, 4, 4, device="meta")
    t = torch.empty(2, dtype=torch.long, device="meta")
    out = d.p_mean_variance(torch.empty(2, 6, 4, 4, device="meta"), x, t)
    assert out.mean.device.type == "meta" and out.mean.dtype == torch.float32
    assert d.ddpm_step(out.mean, out.log_variance, t, x).device.type == "meta"
    assert d.ddim_step(x, out.pred_x0, t, 1.0, x).device.type == "meta"
    assert d.condition_score(out.pred_x0, x, t, x).eps.device.type == "meta"
    assert d.q_sample(x, t, x).device.type == "meta" and d.model_timesteps(t).device.type == "meta"
    assert set(d._device_tables) >= {torch.device("meta")}
    tables = d._device_tables[torch.device("meta")]
    d.q_sample(x, t, x)
    assert d._device_tables[torch.device("meta")] is tables   # copied once per device


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_cuda_matches_cpu(d):
    x0, eps, t = batch(d, seed=9)
    cpu = d.p_mean_variance(torch.cat([eps, eps.tanh()], 1), d.q_sample(x0, t, eps), t)
    dev = torch.device("cuda")
    x0c, epsc, tc = x0.to(dev), eps.to(dev), t.to(dev)
    gpu = d.p_mean_variance(torch.cat([epsc, epsc.tanh()], 1), d.q_sample(x0c, tc, epsc), tc)
    for a, b in zip(cpu, gpu):
        torch.testing.assert_close(b.cpu(), a, rtol=1e-5, atol=1e-5)
    assert d.model_timesteps(tc).device == tc.device
