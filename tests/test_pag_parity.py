"""PAG forwards, steps and loops equal the official PAG code's recorded runs (pag_adm fixture:
KU-CVLAB/Perturbed-Attention-Guidance @ ba1c0c9 on a tiny random-weight unconditional ADM, see
tests/fixtures/official/pag_adm/README.md), in batched and in sequential mode."""
import dataclasses

import pytest
import torch

from checkpoints_convert import FlagError
from conftest import load_case, max_err, reference
from sag import guided_step, sample
from sag.perturbed import PAGConfig, default_pag_sites
from unet import IdentityAttention

FWD_TOL, LAYER_TOL, STEP_TOL, LOOP_TOL = 1e-5, 2e-5, 5e-5, 1e-3
OFFICIAL_LAYERS = ("input_blocks.5.1", "input_blocks.7.1", "input_blocks.8.1", "middle_block.1")
MODES = pytest.mark.parametrize("batched", [True, False], ids=["batched", "sequential"])


@pytest.fixture(scope="module")
def ref():
    return reference("pag_adm")


@pytest.fixture(scope="module")
def ddpm():
    return load_case("pag_adm")                                            # respacing "10", use_ddim False


@pytest.fixture(scope="module")
def ddim():
    return load_case("pag_adm", timestep_respacing="ddim10", use_ddim=True)


def _pag(loaded, batched):
    return dataclasses.replace(loaded.guidance, batched=batched)


def test_compat_api_sets_up_official_pag(ddpm):
    g = ddpm.guidance
    assert isinstance(g, PAGConfig)
    assert g.scale == pytest.approx(3.0) and g.guide_scale == pytest.approx(4.0)
    assert g.sites == ("input.5", "input.7", "input.8", "middle") == default_pag_sites(ddpm.model)
    assert g.step_range == (10, 0) and [g.active_at(t) for t in (11, 10, 0)] == [False, True, True]


@pytest.mark.parametrize("override, words", [
    (dict(noise_scale=0.5), "only the identity"),
    (dict(guidance_strategies={"attention_mask_identity": [10, 0], "sag": [5, 0]}), "at most one"),  # official: ValueError
    (dict(guidance_strategies={"attention_drop": [10, 0]}), "not supported"),      # not silently unguided
])
def test_compat_api_refuses_what_it_does_not_reproduce(override, words):
    with pytest.raises(FlagError) as err:
        load_case("pag_adm", **override)
    assert words in str(err.value) and "\n" not in str(err.value)


def test_drop_layers_that_are_no_attention_block_are_ignored_as_officially():
    """PROVENANCE.md PAG quirk 4: the official code silently skips names that match no AttentionBlock
    (its ADM-256 default list on this U-Net perturbs only middle_block.1); we skip them with a warning."""
    with pytest.warns(UserWarning, match="input_blocks.6.1"):
        g = load_case("pag_adm", drop_layers=["input_blocks.5.1", "input_blocks.6.1"]).guidance
    assert g.sites == ("input.5",)
    with pytest.warns(UserWarning, match="input_blocks.14.1 input_blocks.16.1 input_blocks.17.1"):
        g = load_case("pag_adm", drop_layers=["input_blocks.14.1", "input_blocks.16.1", "input_blocks.17.1",
                                              "middle_block.1"]).guidance
    assert g.sites == ("middle",)
    with pytest.warns(UserWarning, match="perturbs nothing"):
        assert load_case("pag_adm", drop_layers=["input_blocks.6.1"]).guidance is None


def test_sag_and_pag_on_disjoint_windows(ref):
    """{"attention_mask_identity": [9, 5], "sag": [3, 1]}: PAG at t = 9..5, SAG at t = 3..1, plain
    steps at 4 and 0 (the PAG repository's p_sample picks the one mode whose window holds t)."""
    from sag import SAGConfig, SAGStep
    from sag.perturbed import PAGStep
    from sag.schedule import Scheduled
    loaded = load_case("pag_adm", guidance_strategies={"attention_mask_identity": [9, 5], "sag": [3, 1]})
    g = loaded.guidance
    assert isinstance(g, Scheduled)
    pag, sag = g.methods
    assert isinstance(pag, PAGConfig) and pag.step_range == (9, 5) and pag.scale == pytest.approx(3.0)
    assert isinstance(sag, SAGConfig) and (sag.guide_start, sag.guide_end, sag.map_mode) == (4, 1, "official")
    steps = []
    sample(loaded.model, loaded.diffusion, (2, 3, 32, 32), guidance=g, x_T=ref["loop_x_T"],
           noise=list(ref["loop_noise"]), callback=steps.append)
    kinds = {s.t: type(s.sag).__name__ for s in steps}
    assert kinds == {9: "PAGStep", 8: "PAGStep", 7: "PAGStep", 6: "PAGStep", 5: "PAGStep", 4: "NoneType",
                     3: "SAGStep", 2: "SAGStep", 1: "SAGStep", 0: "NoneType"}
    assert all(isinstance(s.sag, (PAGStep, SAGStep, type(None))) for s in steps)


def test_new_attention_order_runs_the_legacy_split_under_pag_flags(ref, tmp_path):
    """PAG quirk 5: the PAG repository's model_fn puts QKVAttentionLegacy in every block on every
    call, so with PAG flags a new-order model runs the legacy split (the weights are the same)."""
    plain = load_case("pag_adm").model
    with pytest.warns(UserWarning, match="legacy head split"):
        loaded = load_case("pag_adm", use_new_attention_order=True)
    assert loaded.model.config.use_new_attention_order is False
    with torch.no_grad():
        assert torch.equal(loaded.model(ref["fwd_x"], ref["fwd_t"]).output, plain(ref["fwd_x"], ref["fwd_t"]).output)


def test_guide_scale_one_is_no_guidance():
    assert load_case("pag_adm", guide_scale=1.0).guidance is None


def test_forward_with_and_without_identity_attention(ddpm, ref):
    model = ddpm.model
    identity = {site: IdentityAttention() for site in ddpm.guidance.sites}
    with torch.no_grad():
        plain = model(ref["fwd_x"], ref["fwd_t"]).output
        perturbed = model(ref["fwd_x"], ref["fwd_t"], attention=identity).output
    assert max_err(plain, ref["fwd_out"]) <= FWD_TOL
    assert max_err(perturbed, ref["fwd_out_perturbed"]) <= FWD_TOL


def _v_rows(qkv, heads=4):
    """The v rows of a legacy-layout qkv [B x 3C x T] (fixture README): [B x C x T]."""
    batch, width, length = qkv.shape
    ch = width // (3 * heads)
    return qkv.reshape(batch * heads, 3 * ch, length)[:, 2 * ch:].reshape(batch, heads * ch, length)


def _attention_inputs(model, x, t, perturb: bool):
    """Walk the encoder and the middle block by hand (perturbing the PAG layers or not); per PAG
    layer: (h entering the attention block [B x C x H x W], the block)."""
    inputs = {}
    emb = model.time_embed(t)
    h = model.input_conv(x)

    def attention(name, attn, h_in):
        inputs[name] = (h_in, attn)
        return attn(h_in, IdentityAttention() if perturb else None)[0]

    for i, block in enumerate(model.encoder, start=1):                  # encoder[i - 1] = input_blocks[i]
        if f"input_blocks.{i}.1" in OFFICIAL_LAYERS:
            h = attention(f"input_blocks.{i}.1", block.attn, block.res(h, emb))
        else:
            h = block(h, emb)[0]
    attention("middle_block.1", model.middle.attn, model.middle.res1(h, emb))
    return inputs


def test_each_perturbed_layer_attention_output(ddpm, ref):
    """Per layer: the official identity output is the v rows of the official qkv; our qkv(norm(h)) is
    the official qkv; our block adds proj_out of the official attention output (both passes)."""
    with torch.no_grad():
        for perturb in (True, False):
            inputs = _attention_inputs(ddpm.model, ref["fwd_x"], ref["fwd_t"], perturb)
            for layer in OFFICIAL_LAYERS:
                key = "fwd_" + layer.replace(".", "_")
                h_in, attn = inputs[layer]
                batch, channels = h_in.shape[:2]
                flat = h_in.reshape(batch, channels, -1)
                out = attn(h_in, IdentityAttention() if perturb else None)[0].reshape(batch, channels, -1)
                if perturb:
                    ref_qkv, ref_out = ref[key + "_qkv_perturbed"], ref[key + "_attn_out_perturbed"]
                    assert torch.equal(_v_rows(ref_qkv), ref_out)
                    qkv = attn.qkv(attn.norm(flat))
                    assert max_err(qkv, ref_qkv) <= LAYER_TOL, layer
                    assert max_err(_v_rows(qkv), ref_out) <= LAYER_TOL, layer
                    assert max_err(out, flat + attn.proj_out(_v_rows(qkv))) <= 1e-6, layer
                else:
                    ref_out = ref[key + "_attn_out"]
                assert max_err(out, flat + attn.proj_out(ref_out)) <= LAYER_TOL, layer


@MODES
def test_ddpm_step(ddpm, ref, batched):
    t_index = int(ref["step_t"][0])
    assert torch.equal(ddpm.diffusion.model_timesteps(ref["step_t"]), ref["step_model_t"])
    with torch.no_grad():
        info = guided_step(ddpm.model, ddpm.diffusion, ref["step_x"], t_index, guidance=_pag(ddpm, batched),
                           noise=ref["step_noise"])
    step = info.sag
    assert max_err(step.first.eps, ref["step_eps_xt"]) <= STEP_TOL
    assert max_err(step.first.pred_x0, ref["step_pred_xstart"]) <= STEP_TOL
    assert max_err(step.first.log_variance, ref["step_model_log_variance"]) <= STEP_TOL
    assert max_err(step.eps_perturbed, ref["step_eps_perturbed"]) <= STEP_TOL
    assert max_err(step.guided_eps, ref["step_guided_eps"]) <= STEP_TOL
    assert max_err(info.pred_x0, ref["step_guided_pred_xstart"]) <= STEP_TOL
    mean = ddpm.diffusion.q_posterior_mean_variance(info.pred_x0, ref["step_x"], ref["step_t"])[0]
    assert max_err(mean, ref["step_guided_mean"]) <= STEP_TOL
    assert max_err(info.x_prev, ref["step_sample"]) <= STEP_TOL


@MODES
def test_ddim_step(ddim, ref, batched):
    x, t = ref["ddim_step_x"], ref["ddim_step_t"]
    assert torch.equal(ddim.diffusion.model_timesteps(t), ref["ddim_step_model_t"])
    with torch.no_grad():
        info = guided_step(ddim.model, ddim.diffusion, x, int(t[0]), guidance=_pag(ddim, batched), use_ddim=True)
    step = info.sag
    assert max_err(step.first.eps, ref["ddim_step_eps_xt"]) <= STEP_TOL
    assert max_err(step.eps_perturbed, ref["ddim_step_eps_perturbed"]) <= STEP_TOL
    assert max_err(step.guided_eps, ref["ddim_step_guided_eps"]) <= STEP_TOL
    assert max_err(info.pred_x0, ref["ddim_step_guided_pred_xstart"]) <= STEP_TOL
    eps_rederived = ddim.diffusion.predict_eps_from_x0(x, t, info.pred_x0)   # official: from the CLIPPED x0
    assert max_err(eps_rederived, ref["ddim_step_eps_rederived"]) <= STEP_TOL
    assert max_err(info.x_prev, ref["ddim_step_sample"]) <= STEP_TOL


def test_our_form_equals_the_official_form(ref):
    eps, eps_p, g = ref["step_eps_xt"], ref["step_eps_perturbed"], float(ref["guide_scale"])
    ours = eps + (g - 1) * (eps - eps_p)
    assert max_err(ours, ref["step_guided_eps"]) <= 1e-5


@MODES
def test_ddpm_loop(ddpm, ref, batched):
    steps = []
    x0 = sample(ddpm.model, ddpm.diffusion, (2, 3, 32, 32), guidance=_pag(ddpm, batched), x_T=ref["loop_x_T"],
                noise=list(ref["loop_noise"]), callback=steps.append)
    assert [s.t for s in steps] == ref["loop_t"].tolist()
    assert [int(s.sag is not None) for s in steps] == ref["loop_pag_on"].tolist()
    assert max_err(torch.stack([s.x_t for s in steps]), ref["loop_x_t"]) <= LOOP_TOL
    assert max_err(x0, ref["loop_final_sample"]) <= LOOP_TOL


@MODES
def test_ddim_loop(ddim, ref, batched):
    steps = []
    x0 = sample(ddim.model, ddim.diffusion, (2, 3, 32, 32), guidance=_pag(ddim, batched), x_T=ref["loop_x_T"],
                use_ddim=True, callback=steps.append)                  # eta = 0: no noise, as official
    assert [s.t for s in steps] == ref["ddim_t"].tolist()
    assert [int(s.sag is not None) for s in steps] == ref["ddim_pag_on"].tolist()
    assert max_err(x0, ref["ddim_final_sample"]) <= LOOP_TOL
