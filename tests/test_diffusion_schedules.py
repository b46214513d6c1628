"""Schedules, respacing and configuration of ``diffusion``: closed forms and one-line errors."""
import math

import numpy as np
import pytest

from diffusion import (DiffusionConfig, DiffusionError, GaussianDiffusion, betas_for_alpha_bar,
                       get_named_beta_schedule, space_timesteps)


# ---------------------------------------------------------------------------------- beta schedules
def test_linear_endpoints():
    betas = get_named_beta_schedule("linear", 1000)
    assert betas.dtype == np.float64 and betas.shape == (1000,)
    assert betas[0] == 1e-4 and betas[-1] == 0.02            # Ho et al. 2020, T = 1000
    betas = get_named_beta_schedule("linear", 4000)          # scaled by 1000/T
    assert betas[0] == pytest.approx(2.5e-5, rel=1e-15) and betas[-1] == pytest.approx(0.005, rel=1e-15)
    assert (np.diff(betas) > 0).all()


def test_cosine_alpha_bar_matches_its_definition():
    # ᾱ_t = f(t/T) / f(0), f(τ) = cos²((τ + 0.008)/1.008 · π/2)  (Nichol & Dhariwal 2021, Eq. 17)
    T = 1000
    betas = get_named_beta_schedule("cosine", T)
    f = lambda tau: math.cos((tau + 0.008) / 1.008 * math.pi / 2) ** 2
    expected = np.array([f((i + 1) / T) / f(0.0) for i in range(T)])
    alphas_cumprod = np.cumprod(1.0 - betas)
    # Only the last beta is clipped at 0.999 (f(1) = 0 would make it 1).
    assert (betas >= 0.999).sum() == 1 and betas[-1] == 0.999
    np.testing.assert_allclose(alphas_cumprod[:-1], expected[:-1], rtol=1e-10)
    # ᾱ(τ) = 1 − τ on 3 steps: betas 1/3, 1/2, and 1 clipped to max_beta.
    np.testing.assert_allclose(betas_for_alpha_bar(3, lambda tau: 1.0 - tau), [1 / 3, 1 / 2, 0.999], rtol=1e-15)


def test_unknown_schedule_is_one_line_error():
    with pytest.raises(DiffusionError, match=r"^unknown noise schedule 'quadratic'; valid names: "
                                             r"'linear', 'cosine'$"):
        get_named_beta_schedule("quadratic", 1000)
    assert issubclass(DiffusionError, ValueError)


# --------------------------------------------------------------------------------------- respacing
def test_space_timesteps_examples():
    assert space_timesteps(1000, "") == list(range(1000))
    assert space_timesteps(1000, "1000") == list(range(1000))
    assert space_timesteps(1000, "ddim25") == list(range(0, 1000, 40))       # stride 40: 0, 40, …, 960
    assert space_timesteps(1000, "7") == [0, 166, 333, 500, 666, 832, 999]   # banker's rounding
    assert space_timesteps(10, "1,1") == [0, 5]                               # a count of 1 takes the first
    # guided-diffusion's docstring example: 300 steps split into sections of 10, 15 and 20.
    steps = space_timesteps(300, "10,15,20")
    assert len(steps) == 45
    assert steps[:10] == list(range(0, 100, 11))
    assert steps[10] == 100 and steps[24] == 199 and steps[25] == 200 and steps[-1] == 299
    # uneven split: the first T % n sections get one extra step
    assert space_timesteps(10, "2,2,2") == [0, 3, 4, 6, 7, 9]


@pytest.mark.parametrize("spec, message", [
    ("abc", r"^cannot parse timestep_respacing 'abc': expected '' \(all steps\), 'ddimN', or "
            r"comma-separated step counts such as '250' or '10,15,20'$"),
    ("10,,20", r"^cannot parse timestep_respacing '10,,20'"),
    ("ddimx", r"^cannot parse timestep_respacing 'ddimx': expected 'ddimN' with an integer N, e.g. 'ddim25'$"),
    ("ddim3000", r"^timestep_respacing 'ddim3000': no integer stride gives exactly 3000 of 1000 steps$"),
    ("ddim1", r"^timestep_respacing 'ddim1': no integer stride gives exactly 1 of 1000 steps$"),
    ("1001", r"^timestep_respacing '1001': section 0 has 1000 steps, cannot take 1001$"),
    ("10,600", r"^timestep_respacing '10,600': section 1 has 500 steps, cannot take 600$"),
    ("0", r"^timestep_respacing '0': step counts must be positive, got 0$"),
    ("10,-3", r"^timestep_respacing '10,-3': step counts must be positive, got -3$"),
])
def test_bad_respacing_is_one_line_error(spec, message):
    with pytest.raises(DiffusionError, match=message) as info:
        space_timesteps(1000, spec)
    assert "\n" not in str(info.value)
    with pytest.raises(DiffusionError, match=message):
        GaussianDiffusion.from_config(DiffusionConfig(timestep_respacing=spec))


def test_all_steps_respacing_equals_the_original_process():
    base_betas = get_named_beta_schedule("linear", 1000)
    original_alphas_cumprod = np.cumprod(1.0 - base_betas)
    full = GaussianDiffusion.from_config(DiffusionConfig(timestep_respacing=""))
    same = GaussianDiffusion.from_config(DiffusionConfig(timestep_respacing="1000"))
    assert np.array_equal(full.alphas_cumprod, original_alphas_cumprod)   # exact
    for name in ("betas", "alphas_cumprod", "alphas_cumprod_prev", "posterior_variance",
                 "posterior_log_variance_clipped", "posterior_mean_coef1", "posterior_mean_coef2"):
        assert np.array_equal(getattr(full, name), getattr(same, name)), name
    # The re-derived betas equal the base ones only to the last bit (PROVENANCE quirk 15).
    np.testing.assert_allclose(full.betas, base_betas, rtol=1e-12)
    assert full.timestep_map.tolist() == list(range(1000)) and full.num_timesteps == 1000


def test_respaced_process_keeps_alpha_bar():
    base_alphas_cumprod = np.cumprod(1.0 - get_named_beta_schedule("cosine", 1000))
    d = GaussianDiffusion.from_config(DiffusionConfig(noise_schedule="cosine", timestep_respacing="ddim25"))
    assert d.num_timesteps == 25 and d.original_num_steps == 1000
    assert d.timestep_map.dtype == np.int64 and d.timestep_map.tolist() == list(range(0, 1000, 40))
    np.testing.assert_allclose(d.alphas_cumprod, base_alphas_cumprod[::40], rtol=1e-12)
    # Respaced betas: 1 − ᾱ_i / ᾱ_prev.
    np.testing.assert_allclose(d.betas[1:], 1 - d.alphas_cumprod[1:] / d.alphas_cumprod[:-1], rtol=1e-12)


# ------------------------------------------------------------------------------- derived arrays
def test_posterior_coefficients_closed_form():
    d = GaussianDiffusion.from_config(DiffusionConfig(noise_schedule="cosine", timestep_respacing="50"))
    a, a_prev, b = d.alphas_cumprod, d.alphas_cumprod_prev, d.betas
    np.testing.assert_allclose(d.posterior_variance, b * (1 - a_prev) / (1 - a), rtol=1e-12)
    np.testing.assert_allclose(d.posterior_mean_coef1, b * np.sqrt(a_prev) / (1 - a), rtol=1e-12)
    np.testing.assert_allclose(d.posterior_mean_coef2, (1 - a_prev) * np.sqrt(1 - b) / (1 - a), rtol=1e-12)
    assert d.posterior_variance[0] == 0 and d.posterior_log_variance_clipped[0] == np.log(d.posterior_variance[1])
    np.testing.assert_allclose(d.sqrt_recip_alphas_cumprod ** 2 - 1, d.sqrt_recipm1_alphas_cumprod ** 2, rtol=1e-9)
    assert np.array_equal(d.alphas_cumprod_next, np.append(a[1:], 0.0))
    for name in ("sqrt_alphas_cumprod", "sqrt_one_minus_alphas_cumprod", "log_one_minus_alphas_cumprod"):
        assert getattr(d, name).dtype == np.float64 and getattr(d, name).shape == (50,)


# ---------------------------------------------------------------------------------- configuration
def test_config_selects_types():
    from diffusion import ModelMeanType, ModelVarType
    d = GaussianDiffusion.from_config(DiffusionConfig())
    assert (d.model_mean_type, d.model_var_type) == (ModelMeanType.EPSILON, ModelVarType.FIXED_LARGE)
    d = GaussianDiffusion.from_config(DiffusionConfig(sigma_small=True, predict_xstart=True))
    assert (d.model_mean_type, d.model_var_type) == (ModelMeanType.START_X, ModelVarType.FIXED_SMALL)
    d = GaussianDiffusion.from_config(DiffusionConfig(learn_sigma=True, sigma_small=True, rescale_timesteps=True))
    assert d.model_var_type == ModelVarType.LEARNED_RANGE and d.rescale_timesteps
    assert d.config == DiffusionConfig(learn_sigma=True, sigma_small=True, rescale_timesteps=True)


@pytest.mark.parametrize("steps", [0, -5])
def test_config_rejects_non_positive_steps(steps):
    message = rf"^diffusion steps must be a positive integer, got {steps}$"
    with pytest.raises(DiffusionError, match=message):
        DiffusionConfig(steps=steps).validate()
    with pytest.raises(DiffusionError, match=message):
        GaussianDiffusion.from_config(DiffusionConfig(steps=steps))


def test_config_validate():
    cfg = DiffusionConfig(steps=4000, noise_schedule="cosine", timestep_respacing="100")
    assert cfg.validate() is cfg
    with pytest.raises(DiffusionError, match=r"^unknown noise schedule 'cosin'; valid names: 'linear', 'cosine'$"):
        GaussianDiffusion.from_config(DiffusionConfig(noise_schedule="cosin"))
    with pytest.raises(DiffusionError, match=r"^timestep_respacing must be a string"):
        DiffusionConfig(timestep_respacing=250).validate()
