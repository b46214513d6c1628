"""SD's KL autoencoder against diffusers' AutoencoderKL (tests/fixtures/diffusers/vae_decode), and the
single-file VAE key map."""
import json
from functools import lru_cache
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from checkpoints_convert.errors import CheckpointError
from checkpoints_convert.sd_keys_vae_text import vae_config_from_ldm, vae_state_from_ldm
from unet.config import ConfigError
from unet.sd_vae import AutoencoderKL, AutoencoderKLConfig, SpatialSelfAttention

DIFFUSERS = Path(__file__).parent / "fixtures" / "diffusers"
FOLDER = DIFFUSERS / "sd15_tiny"


@lru_cache(maxsize=None)
def folder_config() -> dict:
    return json.loads((FOLDER / "vae" / "config.json").read_text())


@lru_cache(maxsize=None)
def folder_state():
    return load_file(FOLDER / "vae" / "diffusion_pytorch_model.safetensors")


@lru_cache(maxsize=None)
def vae():
    model = AutoencoderKL(AutoencoderKLConfig.from_diffusers(folder_config())).eval()
    model.load_state_dict(folder_state(), strict=True)
    return model


@lru_cache(maxsize=None)
def reference():
    return torch.load(DIFFUSERS / "vae_decode" / "reference.pt", weights_only=True)


@lru_cache(maxsize=None)
def decoded():
    model = vae()
    with torch.no_grad():
        return model.decode(reference()["latents"] / model.scaling_factor)


def max_err(a, b):
    return (a.double() - b.double()).abs().max().item()


def test_decode_equals_diffusers():
    """vae.decode(latents / scaling_factor) and SD's postprocessing (x/2 + 0.5).clamp(0, 1), NHWC."""
    ref, model = reference(), vae()
    assert model.scaling_factor == 0.18215 and model.downsampling_factor == 8
    image = (decoded() / 2 + 0.5).clamp(0, 1).permute(0, 2, 3, 1)
    assert decoded().shape == (1, 3, 128, 128)
    assert max_err(decoded(), ref["decoded"]) <= 1e-5
    assert max_err(image, ref["image"]) <= 1e-5


def test_decoder_activations_equal_diffusers():
    """The recorded module outputs, the decoder run stage by stage."""
    ref, model = reference(), vae()
    decoder = model.decoder
    with torch.no_grad():
        h = model.post_quant_conv(ref["latents"] / model.scaling_factor)
        acts = {"post_quant_conv": h}
        h = acts["decoder.conv_in"] = decoder.conv_in(h)
        h = acts["decoder.mid_block"] = decoder.mid_block(h)
        for i, level in enumerate(decoder.up_blocks):
            h = acts[f"decoder.up_blocks.{i}"] = level(h)
        acts["decoder.conv_out"] = decoder.conv_out(decoder.conv_act(decoder.conv_norm_out(h)))
    recorded = [k[len("act."):] for k in ref if k.startswith("act.")]
    assert len(recorded) == 6
    for name in recorded:
        assert max_err(acts[name], ref["act." + name]) <= 1e-5, name


def test_encode_round_trip_sanity():
    model = vae()
    images = decoded()[..., :64, 32:64].clamp(-1, 1)   # a non-square crop of a decoded image (small: quick)
    with torch.no_grad():
        mean, logvar = model.encode(images)
        again = model.decode(mean)
    assert mean.shape == logvar.shape == (1, 4, 8, 4)
    assert torch.isfinite(mean).all() and torch.isfinite(logvar).all()
    assert logvar.min() >= -30 and logvar.max() <= 20
    assert again.shape == images.shape and torch.isfinite(again).all()


def test_fused_mid_block_attention_is_softmax_attention():
    """SDPA in the mid block = the explicit one-head formula x + W_o softmax(q k^T / sqrt(C)) v."""
    attention = vae().decoder.mid_block.attentions[0]
    assert isinstance(attention, SpatialSelfAttention)
    x = torch.randn(2, 32, 4, 6, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        tokens = attention.group_norm(x).flatten(2).transpose(1, 2).double()
        q, k, v = (tokens @ p.weight.double().T + p.bias.double() for p in (attention.to_q, attention.to_k, attention.to_v))
        a = torch.softmax(q @ k.transpose(1, 2) / 32 ** 0.5, dim=-1) @ v
        out = a @ attention.to_out[0].weight.double().T + attention.to_out[0].bias.double()
        expected = x.double() + out.transpose(1, 2).reshape(2, 32, 4, 6)
        assert max_err(attention(x), expected) <= 1e-5


def test_bad_shapes_and_configs_are_one_line():
    model = vae()
    with pytest.raises(ValueError, match="multiples of 8"):
        model.encode(torch.zeros(1, 3, 60, 64))
    with pytest.raises(ValueError, match=r"latents \[B, 4, h, w\]"):
        model.decode(torch.zeros(1, 3, 8, 8))
    with pytest.raises(ConfigError, match="act_fn='gelu'"):
        AutoencoderKLConfig.from_diffusers(dict(folder_config(), act_fn="gelu"))
    with pytest.raises(ConfigError, match="only AutoencoderKL"):
        AutoencoderKLConfig.from_diffusers(dict(folder_config(), _class_name="AutoencoderTiny"))
    with pytest.raises(ConfigError, match="not divisible by norm_num_groups"):
        AutoencoderKLConfig.from_diffusers(dict(folder_config(), norm_num_groups=32))


@lru_cache(maxsize=None)
def ldm_state():
    return load_file(DIFFUSERS / "sd15_tiny_ldm.safetensors")


def test_single_file_vae_equals_folder():
    mapped, folder = vae_state_from_ldm(ldm_state()), folder_state()
    assert set(mapped) == set(folder)
    assert all(torch.equal(mapped[k], folder[k]) for k in folder)
    config = vae_config_from_ldm(ldm_state(), sample_size=128)
    assert {k: folder_config()[k] for k in config} == config      # groups 8 = gcd(32, widths 8..32)
    assert AutoencoderKLConfig.from_diffusers(config) == vae().config
    # a bare LDM VAE file (no "first_stage_model." prefix) maps the same
    bare = {k[len("first_stage_model."):]: v for k, v in ldm_state().items() if k.startswith("first_stage_model.")}
    assert vae_state_from_ldm(bare).keys() == folder.keys()


def test_single_file_errors_are_one_line():
    with pytest.raises(CheckpointError, match="no Stable Diffusion VAE"):
        vae_state_from_ldm({"model.diffusion_model.out.0.weight": torch.zeros(1)})
    with pytest.raises(CheckpointError, match="no AutoencoderKL parameter"):
        vae_state_from_ldm(dict(ldm_state(), **{"first_stage_model.loss.logvar": torch.zeros(())}))
