"""SD schedulers (``diffusion.sd_schedulers``) against diffusers 0.42.1, and the x0 / eps / re-noise math
SAG needs in each scheduler's own sample parametrisation (tests/fixtures/diffusers, PROVENANCE.md there).

Parity: tables exactly, every recorded step and SAG quantity to 1e-5 (measured: 0, bit-identical on CPU).
Euler-SAG has no reference run (diffusers' SAG pipeline refuses Euler), so its math is tested by identities.
"""
import json
import math
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from diffusion import DiffusionError
from diffusion.sd_schedulers import (DDIMScheduler, EulerDiscreteScheduler, PNDMScheduler, rescale_zero_terminal_snr,
                                     scheduler_from_config, sd_betas, spaced_timesteps)

FIXTURES = Path(__file__).parent / "fixtures" / "diffusers"
TOL = 1e-5
# the scheduler_config.json of each recorded scheduler, and the cases that ran it
CONFIG_OF = {"ddim": "sd15_tiny", "pndm": "sag_pndm_cfg", "euler": "pag_mid_cfg_euler"}
CASES = {"sag_ddim_cfg": "ddim", "sag_ddim_nocfg": "ddim", "plain_ddim_cfg": "ddim", "sag_pndm_cfg": "pndm",
         "pag_mid_cfg_euler": "euler"}
SAG_CASES = ("sag_ddim_cfg", "sag_ddim_nocfg", "sag_pndm_cfg")


def folder_config(kind: str) -> dict:
    return json.loads((FIXTURES / CONFIG_OF[kind] / "scheduler" / "scheduler_config.json").read_text())


def recorded_scheduler(kind: str, steps: int = 4):
    scheduler = scheduler_from_config(folder_config(kind))
    scheduler.set_timesteps(steps)
    return scheduler


def steps_of(case: str) -> dict:
    return torch.load(FIXTURES / "scheduler_steps" / f"{case}.pt", weights_only=True)


def max_err(a, b) -> float:
    return (a.float() - b.float()).abs().max().item()


# ------------------------------------------------------------------------------ tables (exact)
@pytest.mark.parametrize("kind", list(CONFIG_OF))
def test_tables_equal_diffusers(kind):
    ref = torch.load(FIXTURES / "schedulers" / "reference.pt", weights_only=True)
    scheduler = recorded_scheduler(kind)
    assert type(scheduler).__name__ == folder_config(kind)["_class_name"]
    assert scheduler.timesteps.dtype == ref[f"{kind}.timesteps"].dtype
    assert torch.equal(scheduler.timesteps, ref[f"{kind}.timesteps"])
    assert scheduler.alphas_cumprod.dtype == torch.float32
    assert torch.equal(scheduler.alphas_cumprod, ref[f"{kind}.alphas_cumprod"])
    assert float(scheduler.init_noise_sigma) == ref[f"{kind}.init_noise_sigma"].item()
    if kind == "euler":
        assert torch.equal(scheduler.sigmas, ref["euler.sigmas"])
        assert torch.equal(scheduler.sigmas, steps_of("pag_mid_cfg_euler")["scheduler_sigmas"])


def test_model_index_names_the_folder_scheduler_and_overrides_switch_class():
    model_index = json.loads((FIXTURES / "sd15_tiny" / "model_index.json").read_text())
    config = folder_config("ddim")
    assert isinstance(scheduler_from_config(config, class_name=model_index["scheduler"][1]), DDIMScheduler)
    # How the PNDM case was made: PNDMScheduler.from_config(folder_config, skip_prk_steps=True).
    pndm = scheduler_from_config(config, "PNDMScheduler", skip_prk_steps=True)
    pndm.set_timesteps(4)
    assert pndm.timesteps.tolist() == [751, 501, 501, 251, 1]
    # A swap through another scheduler's config keeps the folder's keys (as diffusers' .config does): Euler
    # does not read clip_sample, yet DDIM built from Euler's config must not fall back to its default True.
    euler = scheduler_from_config(config, "EulerDiscreteScheduler")
    assert euler.config["_class_name"] == "EulerDiscreteScheduler" and euler.config["timestep_spacing"] == "leading"
    ddim = scheduler_from_config(dict(euler.config), "DDIMScheduler")
    assert ddim.config["clip_sample"] is False and ddim.config["set_alpha_to_one"] is False


# ------------------------------------------------------------------ recorded steps replayed
@pytest.mark.parametrize("case", list(CASES))
def test_every_recorded_step_replays(case):
    """step(step_model_output, step_t, step_sample) vs step_prev_sample, in the pipeline's order (PNDM's
    history builds up over the run)."""
    rec = steps_of(case)
    scheduler = recorded_scheduler(CASES[case])
    assert torch.equal(scheduler.timesteps, rec["step_t"])
    assert max_err(rec["init_latents"] * scheduler.init_noise_sigma, rec["step_sample"][0]) == 0
    for i, t in enumerate(scheduler.timesteps):
        out = scheduler.step(rec["step_model_output"][i], t, rec["step_sample"][i])
        assert out.prev_sample.dtype == torch.float32
        assert max_err(out.prev_sample, rec["step_prev_sample"][i]) <= TOL, (case, i)


def test_pndm_whole_run_from_its_own_samples_and_fresh_state_per_set_timesteps():
    """PLMS chained on its own outputs (5 model calls for 4 steps); set_timesteps starts a new history."""
    rec = steps_of("sag_pndm_cfg")
    scheduler = recorded_scheduler("pndm")
    for run in range(2):
        scheduler.set_timesteps(4)
        x = rec["step_sample"][0]
        for i, t in enumerate(scheduler.timesteps):
            x = scheduler.step(rec["step_model_output"][i], t, x).prev_sample
            assert max_err(x, rec["step_prev_sample"][i]) <= TOL, (run, i)
    # Without the reset the second run would combine the first run's outputs: a different result.
    x = scheduler.step(rec["step_model_output"][0], scheduler.timesteps[0], rec["step_sample"][0]).prev_sample
    assert max_err(x, rec["step_prev_sample"][0]) > 1e-3


def test_euler_model_input_is_the_recorded_unet_input():
    rec = steps_of("pag_mid_cfg_euler")
    scheduler = recorded_scheduler("euler")
    for i, t in enumerate(scheduler.timesteps):
        assert max_err(scheduler.scale_model_input(rec["step_sample"][i], t), rec["unet_in_first"][i]) <= TOL


# ---------------------------------------------------------------- SAG quantities (DDIM, PNDM)
@pytest.mark.parametrize("case", SAG_CASES)
def test_sag_x0_eps_and_renoising_equal_the_pipeline(case):
    """x̂0 / ε̂ from the first pass's prediction (the uncond half with CFG) vs the SAG pipeline's pred_x0 /
    pred_epsilon, and add_noise of the recorded blur-masked x̂0 with ε̂ vs its degraded latents."""
    rec = steps_of(case)
    scheduler = recorded_scheduler(CASES[case])
    for i, t in enumerate(scheduler.timesteps):
        x0, eps = scheduler.to_x0_eps(rec["sag_first_pass"][i], t, rec["step_sample"][i])
        assert max_err(x0, rec["sag_pred_x0"][i]) <= TOL and max_err(eps, rec["sag_eps"][i]) <= TOL, (case, i)
        mask = F.interpolate(rec["sag_mask"][i].repeat(1, 4, 1, 1), size=x0.shape[-2:])   # nearest, as diffusers
        degraded_x0 = rec["sag_blur_out"][i] * mask + rec["sag_pred_x0"][i] * (1 - mask)
        renoised = scheduler.add_noise(degraded_x0, rec["sag_eps"][i], t)
        assert max_err(renoised, rec["sag_degraded_latents"][i]) <= TOL, (case, i)
        assert 0 < mask.mean() < 1                     # both branches of the mask are exercised


# ----------------------------------------------------------- parametrisation identities (no reference)
def schedulers_for(prediction_type: str):
    """DDIM, PNDM, Euler on SD's schedule (leading, offset 1: integer timesteps 751, 501, 251, 1)."""
    config = dict(folder_config("ddim"), prediction_type=prediction_type, skip_prk_steps=True)
    out = {}
    for name in ("DDIMScheduler", "PNDMScheduler", "EulerDiscreteScheduler"):
        if name == "PNDMScheduler" and prediction_type == "sample":
            continue
        scheduler = scheduler_from_config(config, name)
        scheduler.set_timesteps(4)
        out[name] = scheduler
    return out


def random_pair(seed: int):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(2, 4, 8, 8, generator=g) * 2, torch.randn(2, 4, 8, 8, generator=g)   # x0, eps


@pytest.mark.parametrize("prediction_type", ["epsilon", "v_prediction", "sample"])
def test_add_noise_of_to_x0_eps_returns_the_sample(prediction_type):
    for name, scheduler in schedulers_for(prediction_type).items():
        for k, t in enumerate(scheduler.timesteps):
            g = torch.Generator().manual_seed(k)
            sample, output = torch.randn(2, 4, 8, 8, generator=g) * 3, torch.randn(2, 4, 8, 8, generator=g)
            x0, eps = scheduler.to_x0_eps(output, t, sample)
            assert max_err(scheduler.add_noise(x0, eps, t), sample) <= 1e-5 * 3, (name, prediction_type, k)


def vp_velocity(alpha_bar, x0, eps):
    """v = √ᾱ ε − √(1 − ᾱ) x0 (Salimans & Ho 2022), the target of a v-predicting model."""
    return alpha_bar ** 0.5 * eps - (1 - alpha_bar) ** 0.5 * x0


@pytest.mark.parametrize("prediction_type", ["epsilon", "v_prediction"])
def test_euler_sample_is_the_vp_sample_scaled_and_gives_the_same_x0_eps(prediction_type):
    """x_euler = x_vp · √(1 + σ²); the U-Net input scale_model_input(x_euler) is x_vp; x̂0 and ε̂ of the same
    model output agree; so SAG's degraded pass on Euler (x0 + σε, then scale_model_input) sees exactly the
    input the VP re-noising gives."""
    schedulers = schedulers_for(prediction_type)
    ddim, euler = schedulers["DDIMScheduler"], schedulers["EulerDiscreteScheduler"]
    x0, eps = random_pair(0)
    for t, sigma in zip(euler.timesteps, euler.sigmas):
        alpha_bar = ddim.alphas_cumprod[int(t)]
        assert sigma.item() == pytest.approx(math.sqrt((1 - alpha_bar.item()) / alpha_bar.item()), rel=1e-6)
        x_vp = ddim.add_noise(x0, eps, int(t))
        x_euler = euler.add_noise(x0, eps, t)
        assert max_err(x_euler, x_vp * (1 + sigma ** 2) ** 0.5) <= 1e-5 * x_euler.abs().max()
        assert max_err(euler.scale_model_input(x_euler, t), x_vp) <= 1e-5
        output = eps if prediction_type == "epsilon" else vp_velocity(alpha_bar, x0, eps)
        for got, want in zip(euler.to_x0_eps(output, t, x_euler), ddim.to_x0_eps(output, int(t), x_vp)):
            assert max_err(got, want) <= 1e-4
        for got, want in zip(euler.to_x0_eps(output, t, x_euler), (x0, eps)):
            assert max_err(got, want) <= 1e-4


@pytest.mark.parametrize("name", ["DDIMScheduler", "PNDMScheduler", "EulerDiscreteScheduler"])
def test_v_prediction_and_eps_prediction_agree(name):
    """The exact v of a known (x0, ε) through a v-predicting scheduler gives the same (x0, ε) as ε through an
    ε-predicting one, at the same sample."""
    by_eps = schedulers_for("epsilon")[name]
    by_v = schedulers_for("v_prediction")[name]
    x0, eps = random_pair(1)
    for t in by_eps.timesteps:
        sample = by_eps.add_noise(x0, eps, t)
        alpha_bar = by_eps.alphas_cumprod[int(t)]
        v = vp_velocity(alpha_bar, x0, eps)
        for got, want, truth in zip(by_v.to_x0_eps(v, t, sample), by_eps.to_x0_eps(eps, t, sample), (x0, eps)):
            assert max_err(got, want) <= 1e-4 and max_err(got, truth) <= 1e-4
    # and the first step (PNDM's history is then one output, so it too must agree)
    t = by_eps.timesteps[0]
    sample = by_eps.add_noise(x0, eps, t)
    v = vp_velocity(by_eps.alphas_cumprod[int(t)], x0, eps)
    by_v_step, by_eps_step = by_v.step(v, t, sample), by_eps.step(eps, t, sample)
    assert max_err(by_v_step.prev_sample, by_eps_step.prev_sample) <= 1e-4
    assert max_err(by_v_step.pred_original_sample, x0) <= 1e-4


@pytest.mark.parametrize("prediction_type", ["epsilon", "v_prediction"])
def test_euler_step_is_the_ddim_step_in_sigma_space(prediction_type):
    """Euler in σ space and DDIM (η = 0) are the same first-order step: x0 + σ_next ε = √(1 + σ_next²) · DDIM's
    x_prev (the last step differs: Euler goes to σ = 0, DDIM to ᾱ_0)."""
    schedulers = schedulers_for(prediction_type)
    ddim, euler = schedulers["DDIMScheduler"], schedulers["EulerDiscreteScheduler"]
    x0, eps = random_pair(2)
    for k in range(3):
        t, sigma_next = int(ddim.timesteps[k]), euler.sigmas[k + 1]
        output = eps if prediction_type == "epsilon" else vp_velocity(ddim.alphas_cumprod[t], x0, eps)
        x_vp = ddim.add_noise(x0, eps, t)
        euler_next = euler.step(output, euler.timesteps[k], euler.add_noise(x0, eps, euler.timesteps[k]))
        ddim_next = ddim.step(output, t, x_vp)
        assert max_err(euler_next.prev_sample / (1 + sigma_next ** 2) ** 0.5, ddim_next.prev_sample) <= 1e-4
        assert max_err(euler_next.pred_original_sample, ddim_next.pred_original_sample) <= 1e-4


def test_pndm_transfer_is_the_ddim_update():
    """PLMS's first call is the bare transfer φ, which is DDIM's η = 0 update (PNDM paper, Eq. 11)."""
    schedulers = schedulers_for("epsilon")
    ddim, pndm = schedulers["DDIMScheduler"], schedulers["PNDMScheduler"]
    x0, eps = random_pair(3)
    x = ddim.add_noise(x0, eps, 751)
    assert max_err(pndm.step(eps, 751, x).prev_sample, ddim.step(eps, 751, x).prev_sample) <= 1e-5


# ---------------------------------------------------------------------------------- DDIM eta
def test_ddim_eta_adds_sigma_times_per_sample_noise():
    scheduler = recorded_scheduler("ddim")
    rec = steps_of("plain_ddim_cfg")
    t, x, out = scheduler.timesteps[0], rec["step_sample"][0].repeat(2, 1, 1, 1), rec["step_model_output"][0]
    out = out.repeat(2, 1, 1, 1)
    deterministic = scheduler.step(out, t, x).prev_sample
    generators = [torch.Generator().manual_seed(s) for s in (7, 8)]
    noisy = scheduler.step(out, t, x, eta=0.5, generator=generators).prev_sample
    noise = torch.cat([torch.randn(1, 4, 16, 16, generator=torch.Generator().manual_seed(s)) for s in (7, 8)])
    a, a_prev = scheduler.alphas_cumprod[751], scheduler.alphas_cumprod[501]
    variance = (1 - a_prev) / (1 - a) * (1 - a / a_prev)       # diffusers' _get_variance
    sigma = 0.5 * variance ** 0.5
    direction = (1 - a_prev - sigma ** 2) ** 0.5 - (1 - a_prev) ** 0.5   # the ε coefficient shrinks
    x0 = scheduler.to_x0_eps(out, t, x)[0]
    assert max_err(noisy, deterministic + direction * out + sigma * noise) <= 1e-5
    # sample 1's noise is its own generator's, whatever its batch position
    alone = scheduler.step(out[1:], t, x[1:], eta=0.5, generator=[torch.Generator().manual_seed(8)])
    assert torch.equal(alone.prev_sample, noisy[1:])
    # the same with the noise passed in
    assert torch.equal(scheduler.step(out, t, x, eta=0.5, noise=noise).prev_sample, noisy)
    assert max_err(scheduler.step(out, t, x).pred_original_sample, x0) == 0


# --------------------------------------------------------------------- schedule options
def test_timestep_spacings_and_defaults():
    T = 1000
    assert spaced_timesteps("leading", T, 50, 1)[[0, 1, -1]].tolist() == [981, 961, 1]      # SD 1.5, 50 steps
    ddim = DDIMScheduler(folder_config("ddim"), timestep_spacing="trailing")
    ddim.set_timesteps(4)
    assert ddim.timesteps.tolist() == [999, 749, 499, 249]
    trailing_61 = spaced_timesteps("trailing", T, 61, 0)      # arange yields 62 values here (last ≈ 0)
    assert len(trailing_61) == 61 and trailing_61[-1] == 15 and trailing_61[0] == 999
    ddim = DDIMScheduler(folder_config("ddim"), timestep_spacing="linspace")
    ddim.set_timesteps(4)
    assert ddim.timesteps.tolist() == [999, 666, 333, 0]
    pndm = PNDMScheduler(folder_config("pndm"), timestep_spacing="trailing")
    pndm.set_timesteps(4)
    assert pndm.timesteps.tolist() == [999, 749, 749, 499, 249]
    euler = EulerDiscreteScheduler({})            # diffusers' Euler defaults: linspace, linear betas
    assert euler.config["timestep_spacing"] == "linspace" and euler.config["beta_schedule"] == "linear"
    euler.set_timesteps(3)
    assert euler.timesteps.tolist() == [999.0, 499.5, 0.0] and euler.timesteps.dtype == torch.float32
    assert torch.equal(euler.init_noise_sigma, euler.sigmas.max())   # linspace / trailing: σ_max itself
    assert euler.sigmas[-1] == 0
    euler = EulerDiscreteScheduler({}, final_sigmas_type="sigma_min")
    euler.set_timesteps(3)
    assert euler.sigmas[-1].item() == pytest.approx(math.sqrt(1e-4 / (1 - 1e-4)), rel=1e-4)   # σ_0, via float32 ᾱ_0
    # DDIM: set_alpha_to_one defaults to True (ᾱ_prev = 1 at the last step), and clip_sample to True
    ddim = DDIMScheduler({})
    assert ddim.final_alpha_cumprod.item() == 1.0 and ddim.config["clip_sample"] is True
    assert PNDMScheduler({"skip_prk_steps": True}).final_alpha_cumprod == PNDMScheduler(
        {"skip_prk_steps": True}).alphas_cumprod[0]


def test_ddim_clip_sample_clamps_x0_only():
    scheduler = DDIMScheduler(folder_config("ddim"), clip_sample=True, clip_sample_range=0.5)
    scheduler.set_timesteps(4)
    rec = steps_of("plain_ddim_cfg")
    out = scheduler.step(rec["step_model_output"][0], 751, rec["step_sample"][0])
    x0, eps = scheduler.to_x0_eps(rec["step_model_output"][0], 751, rec["step_sample"][0])
    assert out.pred_original_sample.abs().max() == 0.5
    a_prev = scheduler.alphas_cumprod[501]
    assert max_err(out.prev_sample, a_prev ** 0.5 * x0.clamp(-0.5, 0.5) + (1 - a_prev) ** 0.5 * eps) <= 1e-5


def test_beta_schedules():
    linear = sd_betas("linear", 1e-4, 0.02, 1000)
    assert linear.dtype == torch.float32 and linear[0].item() == pytest.approx(1e-4) and linear[-1] == torch.tensor(0.02)
    scaled = sd_betas("scaled_linear", 0.00085, 0.012, 1000)
    assert scaled[0].item() == pytest.approx(0.00085, rel=1e-6) and scaled[-1].item() == pytest.approx(0.012, rel=1e-6)
    assert torch.equal(scaled.sqrt().diff().sign(), torch.ones(999))                # √β linear, increasing
    cosine = sd_betas("squaredcos_cap_v2", 0, 0, 1000)
    assert cosine.dtype == torch.float32 and cosine.max().item() == pytest.approx(0.999)
    assert torch.equal(sd_betas("linear", 0, 0, 3, trained_betas=[0.1, 0.2, 0.3]), torch.tensor([0.1, 0.2, 0.3]))


def test_zero_terminal_snr():
    betas = sd_betas("scaled_linear", 0.00085, 0.012, 1000)
    alpha_bar = torch.cumprod(1 - betas, 0)
    rescaled = torch.cumprod(1 - rescale_zero_terminal_snr(betas), 0)
    assert rescaled[-1].item() == pytest.approx(0, abs=1e-12)
    assert rescaled[0].item() == pytest.approx(alpha_bar[0].item(), rel=1e-6)
    assert (rescaled.diff() < 0).all()
    ddim = DDIMScheduler(folder_config("ddim"), rescale_betas_zero_snr=True, prediction_type="v_prediction")
    assert torch.equal(ddim.alphas_cumprod, rescaled)
    euler = EulerDiscreteScheduler(folder_config("euler"), rescale_betas_zero_snr=True)
    assert euler.alphas_cumprod[-1].item() == 2.0 ** -24 and torch.equal(euler.alphas_cumprod[:-1], rescaled[:-1])


def test_per_sample_timesteps_broadcast():
    scheduler = recorded_scheduler("ddim")
    euler = recorded_scheduler("euler")
    x0, eps = random_pair(4)
    for s, ts in ((scheduler, [751, 251]), (euler, [751.0, 1.0])):
        batched = s.add_noise(x0, eps, torch.tensor(ts))
        one_by_one = torch.cat([s.add_noise(x0[i:i + 1], eps[i:i + 1], ts[i]) for i in range(2)])
        assert torch.equal(batched, one_by_one)


def test_no_tensor_value_is_read_on_the_host():
    """Every call of a sampling loop runs on the meta device (no values: any host read would raise)."""
    for kind in ("ddim", "pndm", "euler"):
        scheduler = scheduler_from_config(folder_config(kind))
        scheduler.set_timesteps(4, device="meta")
        x = torch.randn(2, 4, 8, 8, device="meta") * scheduler.init_noise_sigma
        for t in scheduler.timesteps:
            out = torch.randn_like(x)
            x0, eps = scheduler.to_x0_eps(out, t, x)
            scheduler.scale_model_input(scheduler.add_noise(x0, eps, t), t)
            kwargs = dict(eta=0.5, noise=torch.randn_like(x)) if kind == "ddim" else {}
            x = scheduler.step(out, t, scheduler.scale_model_input(x, t) * 0 + x, **kwargs).prev_sample
        assert x.device.type == "meta" and x.shape == (2, 4, 8, 8)


# ------------------------------------------------------------------------------ one-line errors
@pytest.mark.parametrize("config, kwargs, message", [
    ({"_class_name": "LMSDiscreteScheduler"}, {},
     r"^LMSDiscreteScheduler is not supported; supported: DDIMScheduler, PNDMScheduler, EulerDiscreteScheduler$"),
    ({}, {}, r"^the scheduler config has no _class_name; pass class_name \(supported: DDIMScheduler, "),
    ({"_class_name": "DDIMScheduler", "thresholding": True}, {}, r"^DDIMScheduler: thresholding=True is not supported"),
    ({"_class_name": "EulerDiscreteScheduler", "use_karras_sigmas": True}, {},
     r"^EulerDiscreteScheduler: use_karras_sigmas=True is not supported"),
    ({"_class_name": "EulerDiscreteScheduler", "interpolation_type": "log_linear"}, {}, r"interpolation_type='log_linear'"),
    ({"_class_name": "PNDMScheduler"}, {}, r"^PNDMScheduler: skip_prk_steps=False is not supported .*skip_prk_steps=True"),
    ({"_class_name": "PNDMScheduler", "skip_prk_steps": True, "prediction_type": "sample"}, {},
     r"^PNDMScheduler: prediction_type='sample' is not supported"),
    ({"_class_name": "DDIMScheduler", "beta_schedule": "sqrt"}, {}, r"^DDIMScheduler: beta_schedule='sqrt' is not supported"),
    ({"_class_name": "DDIMScheduler", "timestep_spacing": "karras"}, {}, r"timestep_spacing='karras'"),
    ({"_class_name": "DDIMScheduler", "num_train_timesteps": 0}, {}, r"num_train_timesteps must be an integer >= 2"),
    ({"_class_name": "DDIMScheduler", "trained_betas": [0.1, 0.2]}, {}, r"^trained_betas has 2 values but "),
])
def test_config_errors_are_one_line(config, kwargs, message):
    with pytest.raises(DiffusionError, match=message) as info:
        scheduler_from_config(config, **kwargs)
    assert "\n" not in str(info.value)


def test_usage_errors_are_one_line():
    ddim = scheduler_from_config(folder_config("ddim"))
    x = torch.zeros(1, 4, 8, 8)
    with pytest.raises(DiffusionError, match=r"^DDIMScheduler: call set_timesteps\(num_inference_steps\) before step"):
        ddim.step(x, 751, x)
    with pytest.raises(DiffusionError, match=r"^num_inference_steps must be an integer in \[1, 1000\]"):
        ddim.set_timesteps(1001)
    euler = recorded_scheduler("euler")
    with pytest.raises(DiffusionError, match=r"timestep \[750.0\] is not in the schedule"):
        euler.step(x, 750, x)
    for scheduler in (recorded_scheduler("pndm"), euler):
        with pytest.raises(ValueError, match="is deterministic: eta must be 0"):
            scheduler.step(x, scheduler.timesteps[0], x, eta=0.5)
