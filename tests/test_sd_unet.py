"""The SD latent U-Net (unet/sd_unet.py) against diffusers' UNet2DConditionModel recordings
(tests/fixtures/diffusers, PROVENANCE.md there), its attention seam, PAG layer matching, an SD-2.x-shaped
config, and the single-file (LDM) key map and config inference (checkpoints_convert/sd_keys_unet.py)."""
import json
import math
from functools import lru_cache
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from conftest import max_err
from checkpoints_convert.errors import CheckpointError
from checkpoints_convert.sd_keys_unet import unet_config_from_ldm, unet_state_from_ldm, unet_state_to_ldm
from unet.attention import gaussian_blur_tokens
from unet.model import AttentionSiteError
from unet.sd_unet import SDUNet, SDUNetConfig
from unet.seam import BlurQueries, Capture, IdentityAttention

DIFFUSERS = Path(__file__).parent / "fixtures" / "diffusers"
FOLDER_UNET = DIFFUSERS / "sd15_tiny" / "unet"
TOL = 1e-5                       # PROVENANCE.md: single forwards / maps


@lru_cache(maxsize=None)
def _ref(case: str) -> dict:
    return torch.load(DIFFUSERS / case / "reference.pt", weights_only=True)


def _folder_config() -> dict:
    return json.loads((FOLDER_UNET / "config.json").read_text())


@lru_cache(maxsize=None)
def _folder_unet() -> SDUNet:
    model = SDUNet(SDUNetConfig.from_diffusers(_folder_config())).eval()
    model.load_state_dict(load_file(FOLDER_UNET / "diffusion_pytorch_model.safetensors"), strict=True)
    return model


def _random_unet(config: SDUNetConfig, seed: int = 0) -> SDUNet:
    torch.manual_seed(seed)
    model = SDUNet(config).eval()
    with torch.no_grad():               # norms and biases away from their 1 / 0 init, so every parameter matters
        for p in model.parameters():
            p.add_(0.05 * torch.randn_like(p))
    return model


def _activations(model: SDUNet, sample, t, context):
    """The recorded modules' outputs, by running the model's own blocks in order (no hooks)."""
    with torch.no_grad():
        temb = model.time_embedding(torch.full((sample.shape[0],), int(t)))
        acts = {"time_embedding": temb, "conv_in": model.conv_in(sample)}
        h, skips = acts["conv_in"], [acts["conv_in"]]
        for i, block in enumerate(model.down_blocks):
            h, block_skips = block(h, temb, context, {}, {})
            skips.extend(block_skips)
            acts[f"down_blocks.{i}"] = h
        h = acts["mid_block"] = model.mid_block(h, temb, context, {}, {})
        for i, block in enumerate(model.up_blocks):
            h = acts[f"up_blocks.{i}"] = block(h, skips, temb, context, {}, {})
        acts["conv_out"] = model.conv_out(torch.nn.functional.silu(model.conv_norm_out(h)))
    return acts


# -- the folder's weights against diffusers' forward -----------------------------------------------------

def test_folder_weights_load_strictly_with_diffusers_names():
    model = _folder_unet()
    assert set(model.state_dict()) == set(load_file(FOLDER_UNET / "diffusion_pytorch_model.safetensors"))
    assert model.in_channels == 4 and model.sample_size == 16 and model.downsample_factor == 2


def test_forward_output_activations_and_sag_map_match_diffusers():
    ref, model = _ref("unet_forward"), _folder_unet()
    errors = {}
    for i, t in enumerate(ref["timesteps"]):
        with torch.no_grad():
            out = model(ref["sample"], t, ref["encoder_hidden_states"], attention={model.sag_site: Capture()})
        errors[f"out t={int(t)}"] = max_err(out.output, ref["out"][i])
        attention_map = out.attention_maps[model.sag_site]
        assert attention_map.probs.shape == (2, 8, 64, 64) and attention_map.probs.dtype == torch.float32
        assert (attention_map.height, attention_map.width) == (8, 8)
        errors[f"map t={int(t)}"] = max_err(attention_map.probs.reshape(16, 64, 64), ref["mid_attn_probs"][i])
        for name, act in _activations(model, ref["sample"], t, ref["encoder_hidden_states"]).items():
            errors[f"{name} t={int(t)}"] = max_err(act, ref[f"act.{name}"][i])
    assert max(errors.values()) <= TOL, errors


def test_timestep_forms_give_the_same_output():
    ref, model = _ref("unet_forward"), _folder_unet()
    x, c = ref["sample"], ref["encoder_hidden_states"]
    with torch.no_grad():
        outs = [model(x, t, c).output for t in (501, 501.0, torch.tensor(501), torch.tensor([501, 501]),
                                                 torch.tensor([501.0, 501.0]))]
    assert all(torch.equal(o, outs[0]) for o in outs)


def test_fused_and_explicit_attention_agree():
    """SDPA (default, as diffusers) and the explicit softmax: the same function to float rounding, both equal
    to diffusers' forward, with and without a perturbed slice."""
    ref, model = _ref("unet_forward"), _folder_unet()
    x, c, t = ref["sample"], ref["encoder_hidden_states"], ref["timesteps"][1]
    pag = {model.sag_site: IdentityAttention(samples=slice(1, 2))}
    with torch.no_grad():
        fused = [model(x, t, c).output, model(x, t, c, attention=pag).output]
        model.use_fused_attention(False)
        try:
            explicit = [model(x, t, c).output, model(x, t, c, attention=pag).output]
        finally:
            model.use_fused_attention(True)
    assert max_err(fused[0], ref["out"][1]) <= TOL and max_err(explicit[0], ref["out"][1]) <= TOL
    assert max(max_err(f, e) for f, e in zip(fused, explicit)) <= 1e-6


def test_forward_leaves_no_hooks_and_no_state():
    ref, model = _ref("unet_forward"), _folder_unet()

    def state():
        return {name: (dict(m._forward_hooks), dict(m._forward_pre_hooks), sorted(vars(m)))
                for name, m in model.named_modules()}

    before = state()
    with torch.no_grad():
        model(ref["sample"], 1, ref["encoder_hidden_states"],
              attention={model.sag_site: Capture(), model.self_attention_sites()[0]: BlurQueries(1.0)})
    assert state() == before


# -- PAG: identity attention ------------------------------------------------------------------------------

@pytest.mark.parametrize("case", ["pag_mid_cfg", "pag_layers_cfg"])
def test_pag_unet_call_matches_diffusers(case):
    """diffusers' PAG batch [uncond, cond, cond] with identity attention on the last third at the matched
    layers: our IdentityAttention(samples=slice(2, 3)) at match_layers(pag_applied_layers)."""
    ref, model = _ref(case), _folder_unet()
    config = json.loads((DIFFUSERS / case / "config.json").read_text())
    sites = model.match_layers(config["case"]["pag_applied_layers"])
    assert list(sites) == [name.removesuffix(".processor") for name in config["recorded"]["pag_layers_matched"]]
    request = {site: IdentityAttention(samples=slice(2, 3)) for site in sites}
    with torch.no_grad():
        errors = [max_err(model(ref["unet_in"][s], ref["unet_t"][s], ref["encoder_hidden_states"],
                                attention=request).output, ref["unet_out"][s]) for s in range(len(ref["unet_t"]))]
    assert max(errors) <= TOL, errors


@pytest.mark.parametrize("request_type", [IdentityAttention, lambda samples=None: BlurQueries(2.0, samples=samples),
                                          Capture])
def test_batch_slice_changes_only_its_rows(request_type):
    ref, model = _ref("unet_forward"), _folder_unet()
    x, c = ref["sample"], ref["encoder_hidden_states"]
    sites = model.match_layers(["mid", "up_blocks.1"])
    with torch.no_grad():
        both = model(torch.cat([x, x]), 501, torch.cat([c, c]), attention={s: request_type(samples=slice(2, 4))
                                                                         for s in sites})
        plain = model(x, 501, c).output
        whole = model(x, 501, c, attention={s: request_type() for s in sites})
    assert max_err(both.output[:2], plain) <= 1e-6
    assert max_err(both.output[2:], whole.output) <= 1e-6
    if request_type is IdentityAttention:
        assert max_err(whole.output, plain) > 1e-3            # the perturbation is real
    for site, attention_map in whole.attention_maps.items():  # Capture: the slice's rows only
        assert both.attention_maps[site].probs.shape[0] == 2
        assert max_err(both.attention_maps[site].probs, attention_map.probs) <= 1e-6


# -- SEG: query blur against diffusers' (inverted) hook ------------------------------------------------------

def test_seg_mean_query_matches_the_hooks_finite_sigma():
    """diffusers' SEG hook inverts its branches (SPEC Q14): its finite sigma (3.0) replaces every query by
    the mean query, which is our (and the SEG paper's) sigma = inf."""
    ref, model = _ref("seg_unet_forward"), _folder_unet()
    query = ref["query_plain"].transpose(1, 2)                        # [B, C, N]: per-channel tokens
    assert max_err(gaussian_blur_tokens(query, 1, 8, 8, math.inf, None).transpose(1, 2), ref["query_sigma3"]) <= TOL
    with torch.no_grad():
        run = lambda attention: model(ref["sample"], ref["timestep"], ref["encoder_hidden_states"],  # noqa: E731
                                      attention=attention).output
        assert max_err(run({}), ref["out_plain"]) <= TOL
        assert max_err(run({model.sag_site: BlurQueries(math.inf)}), ref["out_sigma3"]) <= TOL


def test_seg_hooks_infinite_default_is_our_finite_near_uniform_blur():
    """The hook's "infinite" default sigma 9999999 takes its blur branch: kernel ceil(6 sigma) capped at the
    grid side (+1 when even) = 9 on the 8x8 mid grid, reflect padding, weights uniform to ~1e-13. Our
    BlurQueries(9999999.0) with the default (SEG-SDXL) kernel rule is the same blur; it is not the mean query."""
    ref, model = _ref("seg_unet_forward"), _folder_unet()
    query = ref["query_plain"].transpose(1, 2)
    blurred = gaussian_blur_tokens(query, 1, 8, 8, 9999999.0, None).transpose(1, 2)
    assert max_err(blurred, ref["query_sigma_default_inf"]) <= TOL
    with torch.no_grad():
        out = model(ref["sample"], ref["timestep"], ref["encoder_hidden_states"],
                    attention={model.sag_site: BlurQueries(9999999.0)}).output
    assert max_err(out, ref["out_sigma_default_inf"]) <= TOL
    assert max_err(ref["out_sigma_default_inf"], ref["out_sigma3"]) > 1e-3     # the two branches really differ


# -- sites and PAG layer ids ------------------------------------------------------------------------------

def test_sites_and_layer_matching():
    model = _folder_unet()
    sites = model.self_attention_sites()
    assert sites == ("down_blocks.0.attentions.0.transformer_blocks.0.attn1",
                     "down_blocks.0.attentions.1.transformer_blocks.0.attn1",
                     "mid_block.attentions.0.transformer_blocks.0.attn1",
                     "up_blocks.1.attentions.0.transformer_blocks.0.attn1",
                     "up_blocks.1.attentions.1.transformer_blocks.0.attn1",
                     "up_blocks.1.attentions.2.transformer_blocks.0.attn1")
    assert model.sag_site == sites[2] == model.match_layers("mid")[0]
    assert model.match_layers(["mid"]) == (sites[2],)
    assert model.match_layers(["down.block_0"]) == sites[:2]                 # the first PAG release's ids
    assert model.match_layers(["up.block_1.attentions_2", "mid.block_0"]) == (sites[2], sites[5])
    assert model.match_layers(["up"]) == sites[3:]
    assert model.match_layers([sites[4]]) == (sites[4],)                    # an exact name
    assert model.match_layers(["up_blocks.1.attentions.(0|2)"]) == (sites[3], sites[5])   # a regex


@pytest.mark.parametrize("layer_id", ["down_blocks.3", "down.block_1", "up_blocks.(1",
                                      "mid_block.attentions.0.transformer_blocks.0.attn2"])
def test_unknown_layer_id_is_one_line(layer_id):
    with pytest.raises(ValueError) as error:
        _folder_unet().match_layers([layer_id])
    assert "\n" not in str(error.value) and repr(layer_id) in str(error.value)


def test_bad_requests_are_one_line():
    ref, model = _ref("unet_forward"), _folder_unet()
    x, c = ref["sample"], ref["encoder_hidden_states"]
    cases = [({"mid_block.attentions.0.transformer_blocks.0.attn2": Capture()}, "cross-attention"),
             ({"mid": Capture()}, "match_layers"),
             ({model.sag_site: "capture"}, "Capture")]
    for attention, words in cases:
        with pytest.raises((AttentionSiteError, TypeError)) as error:
            model(x, 1, c, attention=attention)
        assert words in str(error.value) and "\n" not in str(error.value)
    with pytest.raises(ValueError, match="not divisible by 2"):
        model(torch.zeros(1, 4, 16, 15), 1, c[:1])


# -- configs ---------------------------------------------------------------------------------------------

def test_unsupported_config_options_are_named_in_one_line():
    config = dict(_folder_config(), class_embed_type="timestep", addition_embed_type="text_time")
    with pytest.raises(ValueError) as error:
        SDUNetConfig.from_diffusers(config)
    message = str(error.value)
    assert "class_embed_type" in message and "addition_embed_type" in message and "\n" not in message
    with pytest.raises(ValueError, match="UNetSpatioTemporal"):
        SDUNetConfig.from_diffusers(dict(_folder_config(), down_block_types=["UNetSpatioTemporal", "DownBlock2D"]))


SD2_STYLE = {   # SD 2.x's options at a small width: linear projections, per-block heads (= channels / 64),
    "_class_name": "UNet2DConditionModel",                       # upcast, 1024-wide context, 3 levels
    "in_channels": 4, "out_channels": 4, "sample_size": 96, "block_out_channels": [64, 128, 128],
    "down_block_types": ["CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "DownBlock2D"],
    "up_block_types": ["UpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D"],
    "layers_per_block": 1, "attention_head_dim": [1, 2, 2], "cross_attention_dim": 1024,
    "use_linear_projection": True, "upcast_attention": True, "transformer_layers_per_block": [1, 2, 2],
    "num_attention_heads": None, "dual_cross_attention": False, "only_cross_attention": False,
    "class_embed_type": None, "num_class_embeds": None, "resnet_time_scale_shift": "default",
}


def test_sd2_style_config_runs_on_a_non_square_latent():
    config = SDUNetConfig.from_diffusers(SD2_STYLE)
    assert config.num_attention_heads == (1, 2, 2) and config.transformer_layers_per_block == (1, 2, 2)
    model = _random_unet(config)
    assert isinstance(model.down_blocks[0].attentions[0].proj_in, torch.nn.Linear)
    sites = model.self_attention_sites()
    assert "mid_block.attentions.0.transformer_blocks.1.attn1" in sites and len(sites) == 1 + 2 + 2 + 2 * 2 + 2 * 1
    x = torch.randn(2, 4, 8, 12)                                           # 64 x 96 px, not square
    context = torch.randn(2, 5, 1024)
    attention = {sites[0]: Capture(), model.sag_site: Capture(samples=slice(1, 2)),
                 sites[-1]: BlurQueries(1.5, samples=slice(0, 1))}
    with torch.no_grad():
        out = model(x, torch.tensor([10, 700]), context, attention=attention)
        model.use_fused_attention(False)
        explicit = model(x, torch.tensor([10, 700]), context, attention=attention)
        model.use_fused_attention(True)
    assert out.output.shape == (2, 4, 8, 12) and torch.isfinite(out.output).all()
    assert set(out.attention_maps) == {sites[0], model.sag_site}            # BlurQueries returns no map
    first, mid = out.attention_maps[sites[0]], out.attention_maps[model.sag_site]
    assert first.probs.shape == (2, 1, 8 * 12, 8 * 12) and (first.height, first.width) == (8, 12)
    assert mid.probs.shape == (1, 2, 2 * 3, 2 * 3) and (mid.height, mid.width) == (2, 3)
    assert torch.allclose(mid.probs.sum(-1), torch.ones(()), atol=1e-5)
    assert max_err(out.output, explicit.output) <= 1e-5
    with pytest.raises(ValueError, match="multiple of 4"):
        model(torch.randn(1, 4, 8, 10), 1, context[:1])


# -- the single file (LDM layout) -------------------------------------------------------------------------

def test_single_file_unet_equals_the_folder():
    single = load_file(DIFFUSERS / "sd15_tiny_ldm.safetensors")
    folder = load_file(FOLDER_UNET / "diffusion_pytorch_model.safetensors")
    mapped = unet_state_from_ldm(single)
    assert set(mapped) == set(folder) and all(torch.equal(mapped[k], folder[k]) for k in folder)
    ldm_unet = {k: v for k, v in single.items() if k.startswith("model.diffusion_model.")}
    assert set(unet_state_to_ldm(folder)) == set(ldm_unet)


def test_single_file_config_from_shapes_and_folder():
    single = load_file(DIFFUSERS / "sd15_tiny_ldm.safetensors")
    # the tiny model's 32-wide context is neither SD 1.x nor 2.x: heads cannot be inferred -> the folder's config
    with pytest.raises(CheckpointError, match="config_folder"):
        unet_config_from_ldm(single)
    assert unet_config_from_ldm(single, _folder_config()) == _folder_config()     # checked against the shapes
    with pytest.raises(CheckpointError, match="block_out_channels"):
        unet_config_from_ldm(single, dict(_folder_config(), block_out_channels=[32, 128]))
    with pytest.raises(CheckpointError, match="not an original"):
        unet_state_from_ldm({"first_stage_model.x": torch.zeros(1)})


@pytest.mark.parametrize("family", ["sd1", "sd2"])
def test_config_inferred_from_shapes_for_sd1_and_sd2(family):
    """SD 1.x (768 context, 8 heads) and SD 2.x (1024, linear projection, channels / 64 heads): the config
    inferred from a single file's shapes rebuilds the same network (every structural field)."""
    source = dict(_folder_config(), cross_attention_dim=768) if family == "sd1" else SD2_STYLE
    config = SDUNetConfig.from_diffusers(source)
    single = unet_state_to_ldm(SDUNet(config).state_dict())
    inferred = unet_config_from_ldm(single)
    assert inferred["attention_head_dim"] == (8 if family == "sd1" else [1, 2, 2])
    rebuilt = SDUNetConfig.from_diffusers(inferred)
    keep = {"sample_size": config.sample_size, "upcast_attention": config.upcast_attention}
    assert SDUNetConfig(**{**rebuilt.__dict__, **keep}) == config
    SDUNet(rebuilt).load_state_dict(unet_state_from_ldm(single), strict=True)


SD15_CONFIG = {  # runwayml/stable-diffusion-v1-5 unet/config.json (diffusers 0.6.0: older keys only)
    "_class_name": "UNet2DConditionModel", "_diffusers_version": "0.6.0", "act_fn": "silu", "attention_head_dim": 8,
    "block_out_channels": [320, 640, 1280, 1280], "center_input_sample": False, "cross_attention_dim": 768,
    "down_block_types": ["CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "DownBlock2D"],
    "downsample_padding": 1, "flip_sin_to_cos": True, "freq_shift": 0, "in_channels": 4, "layers_per_block": 2,
    "mid_block_scale_factor": 1, "norm_eps": 1e-05, "norm_num_groups": 32, "out_channels": 4, "sample_size": 64,
    "up_block_types": ["UpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D"],
}
SD21_CONFIG = dict(SD15_CONFIG, attention_head_dim=[5, 10, 20, 20], cross_attention_dim=1024, sample_size=96,
                   use_linear_projection=True, upcast_attention=True, dual_cross_attention=False,
                   num_class_embeds=None, only_cross_attention=False, class_embed_type=None)


@pytest.mark.parametrize("config, parameters", [(SD15_CONFIG, 859_520_964), (SD21_CONFIG, 865_910_724)])
def test_real_sd_configs_build_the_published_networks(config, parameters):
    """SD 1.5 and SD 2.1 configs (on the meta device: shapes only) give the published parameter counts, 686
    tensors, 16 self-attention sites, the v1-5 single-file key layout and, from its shapes, the same heads."""
    with torch.device("meta"):
        model = SDUNet(SDUNetConfig.from_diffusers(config))
    assert sum(p.numel() for p in model.parameters()) == parameters
    assert len(model.state_dict()) == 686 and len(model.self_attention_sites()) == 16
    single = unet_state_to_ldm(model.state_dict())
    for key in ("input_blocks.3.0.op.weight", "input_blocks.9.0.op.weight", "output_blocks.2.1.conv.weight",
                "output_blocks.5.2.conv.weight", "output_blocks.8.2.conv.weight", "middle_block.1.proj_in.weight",
                "output_blocks.11.1.transformer_blocks.0.attn2.to_k.weight", "out.2.weight", "time_embed.2.weight"):
        assert "model.diffusion_model." + key in single
    inferred = unet_config_from_ldm(single)
    assert inferred["attention_head_dim"] == config["attention_head_dim"]
    assert inferred["use_linear_projection"] == config.get("use_linear_projection", False)


def test_captured_map_has_float32_logits_under_cpu_bfloat16_autocast():
    """Under autocast the projections run in bfloat16, but a map someone reads (SAG's mask) is the softmax
    of float32 logits of those bfloat16 q, k (as on the ADM U-Net), not of bfloat16 logits."""
    from unet.sd_unet import Attention
    torch.manual_seed(0)
    block = Attention(query_dim=64, heads=4, context_dim=None, upcast=False, dropout=0.0).eval()
    x = torch.randn(2, 36, 64)
    with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16):
        _, captured = block(x, request=Capture(), grid=(6, 6))
        q, k = block.to_q(x), block.to_k(x)                       # bfloat16, as the block computes them
    assert q.dtype == torch.bfloat16 and captured.probs.dtype == torch.float32
    q, k = (t.float().reshape(2, 36, 4, 16).transpose(1, 2) for t in (q, k))
    expected = torch.softmax(q @ k.transpose(-1, -2) / math.sqrt(16), dim=-1)
    assert max_err(captured.probs, expected) <= 1e-6
