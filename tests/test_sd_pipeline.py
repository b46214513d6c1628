"""The SD pipeline against diffusers, end to end from the tiny folder (tests/fixtures/diffusers,
PROVENANCE.md there): every recorded SAG / PAG / CFG case with its init_latents and call arguments,
final latents (1e-4), images (1e-3) and per-step tensors; SAG's mask, blur and re-noising on the
recorded tensors; SAG with Euler (which diffusers refuses) by its own math; seeds; v-prediction rules."""
from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import pytest
import torch

from checkpoints_convert.sd_load import build_text_encoder, build_unet, build_vae
from diffusion.sd_schedulers import scheduler_from_config
from sag import gaussian_blur, salient_mask
from sag.guidance import GuidanceError
from sag.seeding import SampleNoise
from sag.sd import load_pipeline
from sag.sd.guidance import SchedulerTimestep, build_guidance, guided_output
from sag.sd.pipeline import StableDiffusionPipeline
from unet.seam import AttentionMap

FIXTURES = Path(__file__).parent / "fixtures" / "diffusers"
FOLDER = FIXTURES / "sd15_tiny"
CASES = ["sag_ddim_cfg", "sag_ddim_nocfg", "sag_pndm_cfg", "plain_ddim_cfg", "pag_mid_cfg", "pag_mid_nocfg",
         "pag_layers_cfg", "pag_mid_cfg_euler"]
SAG_CASES = ["sag_ddim_cfg", "sag_ddim_nocfg", "sag_pndm_cfg"]
LATENTS_TOL, IMAGE_TOL, STEP_TOL = 1e-4, 1e-3, 1e-5


def max_err(a, b) -> float:
    return (torch.as_tensor(a).double() - torch.as_tensor(b).double()).abs().max().item()


pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def pipe():
    return load_pipeline(FOLDER)


def reference(case: str):
    return torch.load(FIXTURES / case / "reference.pt", weights_only=True)


def case_scheduler(case: str):
    """The case's scheduler: its own scheduler_config.json if it has one, else the folder's."""
    path = FIXTURES / case / "scheduler" / "scheduler_config.json"
    if not path.is_file():
        path = FOLDER / "scheduler" / "scheduler_config.json"
    return scheduler_from_config(json.loads(path.read_text()))


def case_kwargs(case: str) -> dict:
    """The recorded diffusers call as our pipeline's keyword arguments."""
    spec = json.loads((FIXTURES / case / "config.json").read_text())["pipeline_call"]
    kwargs = {k: v for k, v in spec["kwargs"].items()
              if k in ("prompt", "negative_prompt", "height", "width", "num_inference_steps", "guidance_scale",
                       "sag_scale", "pag_scale", "eta")}
    setup = spec.get("setup") or ""
    if "set_pag_applied_layers" in setup:
        kwargs["pag_applied_layers"] = tuple(json.loads(setup[setup.index("(") + 1:setup.rindex(")")].replace("'", '"')))
    return kwargs


def run_case(pipe, case: str, output_type: str = "latent"):
    ref = reference(case)
    pipe.scheduler = case_scheduler(case)
    steps = []
    out = pipe(latents=ref["init_latents"], output_type=output_type, callback=steps.append, **case_kwargs(case))
    return ref, out, steps


@pytest.mark.parametrize("case", CASES)
def test_pipeline_matches_diffusers(pipe, case):
    ref, latents, steps = run_case(pipe, case)
    assert len(steps) == len(ref["step_t"])
    assert [s.t for s in steps] == ref["step_t"].tolist()
    # The guided output of every step (measured <= 5.1e-6; the latents it acts on differ by <= 1.2e-5).
    for i, step in enumerate(steps):
        assert max_err(step.model_output, ref["step_model_output"][i]) <= STEP_TOL, (case, i)
        assert max_err(step.latents, ref["step_prev_sample"][i]) <= LATENTS_TOL, (case, i)
    assert max_err(latents, ref["final_latents"]) <= LATENTS_TOL
    assert max_err(pipe.decode_latents(latents).permute(0, 2, 3, 1), ref["image"]) <= IMAGE_TOL


def _sag_inner(details):
    return getattr(details, "inner", None) or details


@pytest.mark.parametrize("case", SAG_CASES)
def test_sag_steps_match_diffusers(pipe, case):
    """Per step: the map's mask (exactly), x0, blur-mask-renoise and the degraded pass, from the
    uncond half with CFG and the cond prediction without."""
    ref, _, steps = run_case(pipe, case)
    for i, step in enumerate(steps):
        sag = _sag_inner(step.details)
        mask = torch.nn.functional.interpolate(ref["sag_mask"][i].float(), size=(16, 16))      # [1, 1, 16, 16]
        assert torch.equal(step.salient_mask, mask), (case, i)
        tol = STEP_TOL if i == 0 else LATENTS_TOL
        assert max_err(sag.first.pred_x0, ref["sag_pred_x0"][i]) <= tol, (case, i)
        assert max_err(sag.blurred_x0, ref["sag_blur_out"][i]) <= tol, (case, i)
        assert max_err(sag.degraded_x_t, ref["sag_degraded_latents"][i]) <= tol, (case, i)
        assert max_err(sag.eps_degraded, ref["degraded_pred"][i]) <= tol, (case, i)


def test_sag_degradation_on_recorded_tensors():
    """No network: the recorded x0 and map of every SAG step give the recorded degraded latents through
    salient_mask, gaussian_blur (9 taps, sigma 1) and the scheduler's add_noise with the recorded eps."""
    for case in SAG_CASES:
        ref, scheduler = reference(case), case_scheduler(case)
        scheduler.set_timesteps(4)
        height, width = ref["sag_map_size"].tolist()
        for i, t in enumerate(ref["step_t"].tolist()):
            x0 = ref["sag_pred_x0"][i]
            attention = AttentionMap(ref["sag_attn_map"][i].view(1, -1, height * width, height * width), height, width)
            mask = salient_mask(attention, x0.shape[-2:])
            degraded_x0 = mask * gaussian_blur(x0, 1.0, 9) + (1 - mask) * x0
            process = SchedulerTimestep(scheduler, t, ref["step_sample"][i])
            degraded = process.q_sample(degraded_x0, None, ref["sag_eps"][i])
            assert max_err(degraded, ref["sag_degraded_latents"][i]) <= STEP_TOL, (case, i)


def test_output_np_and_single_file(pipe):
    """output_type="np": NHWC float32 in [0, 1] equal to diffusers' image; the LDM single file gives the
    same pipeline output bit for bit (its weights are the folder's)."""
    ref, image, _ = run_case(pipe, "sag_ddim_cfg", output_type="np")
    assert isinstance(image, np.ndarray) and image.dtype == np.float32 and image.shape == (1, 128, 128, 3)
    assert max_err(image, ref["image"]) <= IMAGE_TOL
    single = load_pipeline(FIXTURES / "sd15_tiny_ldm.safetensors", config_folder=FOLDER)
    single.scheduler = case_scheduler("sag_ddim_cfg")
    again = single(latents=ref["init_latents"], output_type="np", **case_kwargs("sag_ddim_cfg"))
    assert np.array_equal(again, image)


def test_defaults_and_seeds(pipe):
    """Default size = unet sample_size x vae factor; sample k of a seeded batch equals its seed alone
    (per-sample streams, as sag-sample), with DDIM eta > 0 drawing the step noise per sample too."""
    pipe.scheduler = case_scheduler("plain_ddim_cfg")
    both = pipe("a cat", seeds=[5, 9], num_inference_steps=2, eta=0.5, sag_scale=0.75, output_type="latent")
    assert both.shape == (2, 4, 16, 16)                                   # 128 px: 16 * 8
    alone = pipe("a cat", seeds=[9], num_inference_steps=2, eta=0.5, sag_scale=0.75, output_type="latent")
    assert max_err(both[1:], alone) <= 1e-5
    assert max_err(both[0], both[1]) > 0.1


def _vp_equivalent(scheduler, t, x_euler):
    """Euler's sample x = x0 + sigma eps is the VP sample sqrt(abar) x0 + sqrt(1 - abar) eps times sqrt(1 + sigma^2)."""
    abar = scheduler.alphas_cumprod[int(t)]
    return x_euler * abar.sqrt()


def test_sag_with_euler_is_sag_in_the_sigma_parametrisation(pipe):
    """diffusers refuses SAG with Euler (sag_euler_unsupported); here it works, and its math is checked:
    on the Euler sample x = x_vp * sqrt(1 + sigma^2) at the same timestep, every pass sees the same U-Net
    input as DDIM's SAG on x_vp (scale_model_input on the degraded pass too), x0 is the same, the
    degraded sample is x0_tilde + sigma eps (the sigma-space add_noise), and so the guided eps is DDIM's."""
    ref = reference("sag_euler_unsupported")
    cond, uncond = pipe.encode_prompt("a photo of an astronaut riding a horse on the moon", "blurry, low quality")
    euler, ddim = case_scheduler("sag_euler_unsupported"), case_scheduler("sag_ddim_cfg")
    euler.set_timesteps(4)
    ddim.set_timesteps(4)
    t_euler, t_ddim = euler.timesteps[1].item(), ddim.timesteps[1].item()
    assert t_euler == float(t_ddim) == 501.0
    guidance = build_guidance(pipe.unet, guidance_scale=7.5, negative_embeds=uncond, sag_scale=0.75)
    x_euler = ref["init_latents"] * euler.init_noise_sigma
    x_vp = _vp_equivalent(ddim, t_ddim, x_euler)
    on_euler = guided_output(guidance, pipe.unet, euler, t_euler, x_euler, cond)
    on_vp = guided_output(guidance, pipe.unet, ddim, t_ddim, x_vp, cond)
    sag_e, sag_v = on_euler.details.inner, on_vp.details.inner
    sigma = ((1 - ddim.alphas_cumprod[t_ddim]) / ddim.alphas_cumprod[t_ddim]).sqrt()
    assert torch.equal(sag_e.salient_mask, sag_v.salient_mask)
    assert max_err(sag_e.first.pred_x0, sag_v.first.pred_x0) <= 1e-4           # x0 ~ 3.4 x_T here
    assert max_err(sag_e.degraded_x_t, sag_e.degraded_x0 + sigma * sag_e.first.eps) <= 1e-5
    assert max_err(sag_e.degraded_x_t / (1 + sigma ** 2).sqrt(), sag_v.degraded_x_t) <= 1e-5
    assert max_err(sag_e.eps_degraded, sag_v.eps_degraded) <= 1e-5
    assert max_err(on_euler.output, on_vp.output) <= 1e-4
    # And the whole run: finite, and SAG moves it.
    pipe.scheduler = case_scheduler("sag_euler_unsupported")
    kwargs = case_kwargs("sag_euler_unsupported")
    guided = pipe(latents=ref["init_latents"], output_type="latent", **kwargs)
    plain = pipe(latents=ref["init_latents"], output_type="latent", **dict(kwargs, sag_scale=0.0))
    assert torch.isfinite(guided).all() and max_err(guided, plain) > 0.1


def test_rules_act_on_the_raw_output_for_v_prediction(pipe):
    """With v-prediction every formula combines the raw v outputs (diffusers), SAG's x0 and re-noising
    noise come from v through the scheduler, and the degraded pass's v enters the SAG term."""
    config = json.loads((FOLDER / "scheduler" / "scheduler_config.json").read_text())
    scheduler = scheduler_from_config(dict(config, prediction_type="v_prediction"))
    scheduler.set_timesteps(4)
    t = scheduler.timesteps[0].item()
    cond, uncond = pipe.encode_prompt("a red cube", None)
    x = reference("sag_ddim_cfg")["init_latents"]
    w, s = 5.0, 0.75
    step = guided_output(build_guidance(pipe.unet, guidance_scale=w, negative_embeds=uncond, sag_scale=s),
                         pipe.unet, scheduler, t, x, cond)
    tb = torch.full((1,), t)
    v_c = pipe.unet(x, tb, cond).output
    v_u = pipe.unet(x, tb, uncond).output
    abar = scheduler.alphas_cumprod[t]
    x0_u, eps_u = abar.sqrt() * x - (1 - abar).sqrt() * v_u, (1 - abar).sqrt() * x + abar.sqrt() * v_u
    sag = step.details.inner
    assert max_err(sag.first.pred_x0, x0_u) <= 1e-5
    assert max_err(sag.degraded_x_t, abar.sqrt() * sag.degraded_x0 + (1 - abar).sqrt() * eps_u) <= 1e-5
    v_d = pipe.unet(sag.degraded_x_t, tb, uncond).output
    assert max_err(step.output, v_u + w * (v_c - v_u) + s * (v_u - v_d)) <= 1e-4


def test_pag_and_seg_rules(pipe):
    """PAG / SEG with and without CFG are the diffusers / SEG-paper rules on the batched passes."""
    cond, uncond = pipe.encode_prompt("a red cube", None)
    scheduler = case_scheduler("plain_ddim_cfg")
    scheduler.set_timesteps(4)
    t, x, w, s = 501, reference("pag_mid_cfg")["init_latents"], 4.0, 2.0
    for kind in ("pag", "seg"):
        alone = guided_output(build_guidance(pipe.unet, guidance_scale=1.0, **{f"{kind}_scale": s}),
                              pipe.unet, scheduler, t, x, cond)
        both = guided_output(build_guidance(pipe.unet, guidance_scale=w, negative_embeds=uncond,
                                            **{f"{kind}_scale": s}), pipe.unet, scheduler, t, x, cond)
        e_c, e_p = alone.details.first.eps, alone.details.eps_perturbed
        assert max_err(alone.output, e_c + s * (e_c - e_p)) <= 1e-5
        e_u = both.details.eps_uncond
        assert max_err(both.details.inner.eps_perturbed, e_p) <= 1e-5
        assert max_err(both.output, e_u + w * (e_c - e_u) + s * (e_c - e_p)) <= 1e-4
        assert max_err(e_c, e_p) > 1e-3                                       # the perturbation does something


def test_bad_arguments_are_one_line(pipe):
    for kwargs, match in ((dict(sag_scale=0.5, pag_scale=1.0), "one of sag_scale"),
                          (dict(output_type="pil"), "output_type"),
                          (dict(height=100), "multiples of 8"),
                          (dict(seeds=[1, 2], latents=torch.zeros(1, 4, 16, 16)), "2 seeds for a batch of 1"),
                          (dict(guidance_scale=math.nan), "finite")):
        with pytest.raises(GuidanceError, match=match):
            pipe("x", num_inference_steps=1, **kwargs)


ALL_METHODS = [(method, w) for method in ({}, dict(sag_scale=0.75), dict(pag_scale=3.0), dict(seg_scale=3.0, seg_sigma=2.0))
               for w in (1.0, 7.5)]


@pytest.mark.parametrize("case, eta, steps, methods", [
    ("plain_ddim_cfg", 0.5, 1, ALL_METHODS),
    ("sag_pndm_cfg", 0.0, 2, [(dict(sag_scale=0.75), 7.5)]),
    ("pag_mid_cfg_euler", 0.0, 2, [(dict(sag_scale=0.75), 7.5), (dict(pag_scale=3.0), 7.5)]),
], ids=["ddim-eta", "pndm", "euler"])
def test_the_sampling_loop_reads_no_tensor_value(case, eta, steps, methods):
    """The loop on the ``meta`` device, where any .item() / bool(tensor) raises: no host sync for any
    method, with or without CFG (DDIM with eta noise, one step), nor in the schedulers' multi-step paths
    (PNDM: 3 model calls for 2 steps; Euler), on non-square latents; timesteps are read once, before."""
    configs = {part: json.loads((FOLDER / part / "config.json").read_text()) for part in ("unet", "vae", "text_encoder")}
    with torch.device("meta"):
        networks = build_unet(configs["unet"]), build_vae(configs["vae"]), build_text_encoder(configs["text_encoder"])
    scheduler = case_scheduler(case)
    meta = StableDiffusionPipeline(*networks, tokenizer=None, scheduler=scheduler, device="meta")
    scheduler.set_timesteps(steps)
    timesteps = scheduler.timesteps.tolist()
    x, cond = torch.randn(2, 4, 16, 8, device="meta"), torch.randn(2, 77, 32, device="meta")
    for method, w in methods:
        scheduler.set_timesteps(steps, device="meta")
        guidance = build_guidance(meta.unet, guidance_scale=w, negative_embeds=cond, **method)
        seen = []
        out = meta.denoise(x, cond, guidance, timesteps, eta=eta, streams=SampleNoise([0, 1], "meta"),
                           callback=seen.append)
        assert out.device.type == "meta" and out.shape == x.shape and len(seen) == len(timesteps)
        assert (seen[0].salient_mask is not None) == ("sag_scale" in method)


def test_bfloat16_autocast_and_a_non_square_image():
    """bf16 autocast on the CPU (U-Net only; latents, guidance, scheduler and VAE float32) stays close to
    float32 (measured 9.4e-3 max, 1.1e-3 mean with CFG 7.5), on a 128 x 64 image whose mid-block map is 4 x 8."""
    kwargs = dict(prompt="a cat", seeds=[3], num_inference_steps=3, sag_scale=0.75, height=128, width=64)
    full = load_pipeline(FOLDER)(**kwargs)
    half = load_pipeline(FOLDER, dtype=torch.bfloat16)(**kwargs)
    assert full.shape == half.shape == (1, 128, 64, 3) and half.dtype == np.float32
    assert np.abs(full - half).max() <= 0.03 and np.abs(full - half).mean() <= 3e-3
    with pytest.raises(GuidanceError, match="CUDA"):
        load_pipeline(FOLDER, dtype=torch.float16)
