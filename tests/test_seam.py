"""The attention seam: requests in, maps out, nothing stored, nothing hooked."""
import pytest
import torch

from conftest import load_case, max_err, reference
from unet import (AttentionSiteError, BlurQueries, Capture, IdentityAttention, OfficialCapture, UNet,
                  UNetConfig)
from unet.attention import AttentionBlock, merge_heads, split_heads


def _state(model):
    return {name: (dict(m._forward_hooks), dict(m._forward_pre_hooks), sorted(vars(m)))
            for name, m in model.named_modules()}


def test_forward_leaves_no_hooks_and_no_new_attributes():
    ref = reference("adm_uncond")
    model = load_case("adm_uncond").model
    before = _state(model)
    with torch.no_grad():
        model(ref["fwd_x"], ref["fwd_t"], attention={"output.2": Capture(), "middle": IdentityAttention(),
                                                     "input.4": BlurQueries(1.0)})
    after = _state(model)
    assert before == after
    assert all(not h and not p for h, p, _ in after.values())


def test_capture_does_not_change_the_output_and_type_is_stable():
    ref = reference("adm_uncond")
    model = load_case("adm_uncond").model
    with torch.no_grad():
        plain = model(ref["fwd_x"], ref["fwd_t"])
        captured = model(ref["fwd_x"], ref["fwd_t"], attention={"output.2": Capture(), "middle": OfficialCapture(4)})
    assert type(plain) is type(captured) and plain.attention_maps == {}
    assert torch.equal(plain.output, captured.output)
    assert set(captured.attention_maps) == {"output.2", "middle"}


def test_interleaved_calls_with_different_requests_do_not_interfere():
    ref = reference("adm_uncond")
    model = load_case("adm_uncond").model
    x, t = ref["fwd_x"], ref["fwd_t"]
    with torch.no_grad():
        alone_a = model(x, t, attention={"output.2": Capture()})
        alone_b = model(x, t, attention={"middle": IdentityAttention()})
        again_a = model(x, t, attention={"output.2": Capture()})
        plain = model(x, t)
    assert torch.equal(alone_a.attention_maps["output.2"].probs, again_a.attention_maps["output.2"].probs)
    assert torch.equal(alone_a.output, again_a.output)
    assert not torch.equal(alone_b.output, plain.output)       # the perturbation acted
    assert torch.equal(alone_a.output, plain.output)            # and left nothing behind


@pytest.mark.parametrize("new_order", [False, True])
def test_identity_request_gives_each_token_its_own_value(new_order):
    torch.manual_seed(1)
    block = AttentionBlock(64, num_heads=4, use_new_attention_order=new_order)
    x = torch.randn(2, 64, 4, 4)
    with torch.no_grad():
        out, _ = block(x, IdentityAttention())
        qkv = block.qkv(block.norm(x.reshape(2, 64, 16)))
        _, _, v = split_heads(qkv, 4, new_order)
        expected = x + block.proj_out(merge_heads(v, 2)).reshape(2, 64, 4, 4)
    assert max_err(out, expected) <= 1e-6


def test_a_request_can_address_a_batch_slice():
    ref = reference("adm_uncond")
    model = load_case("adm_uncond").model
    x, t = ref["fwd_x"], ref["fwd_t"]
    with torch.no_grad():
        normal = model(x, t).output
        perturbed = model(x, t, attention={"middle": IdentityAttention()}).output
        both = model(torch.cat([x, x]), torch.cat([t, t]), attention={"middle": IdentityAttention(samples=slice(2, 4))}).output
    assert max_err(both[:2], normal) <= 1e-5 and max_err(both[2:], perturbed) <= 1e-5


def test_unknown_or_attentionless_site_is_one_clear_error():
    ref = reference("adm_uncond")
    model = load_case("adm_uncond").model
    for site in ("output.7", "decoder.2", "input.1"):
        with pytest.raises(AttentionSiteError) as err:
            model(ref["fwd_x"], ref["fwd_t"], attention={site: Capture()})
        message = str(err.value)
        assert "\n" not in message and repr(site) in message and "output.2" in message and "middle" in message


def test_seg_blur_limits():
    """BlurQueries with sigma -> 0 is plain attention; sigma = inf makes the attention output constant."""
    torch.manual_seed(2)
    block = AttentionBlock(64, num_heads=4)
    x = torch.randn(2, 64, 8, 8)
    with torch.no_grad():
        plain, _ = block(x)
        tiny, _ = block(x, BlurQueries(1e-3))
        inf, _ = block(x, BlurQueries(float("inf")))
        attn_out = inf - x                                  # proj_out of the attention output
    assert max_err(tiny, plain) <= 1e-6
    flat = attn_out.reshape(2, 64, -1)
    assert max_err(flat, flat[:, :, :1].expand_as(flat)) <= 1e-5


def test_config_errors_are_one_line():
    from unet import ConfigError
    with pytest.raises(ConfigError, match="not divisible by 4"):
        UNetConfig(image_size=30, model_channels=32, channel_mult=(1, 1, 1))
    with pytest.raises(ConfigError, match="multiple of 32"):
        UNetConfig(image_size=32, model_channels=16)


@pytest.mark.parametrize("attention", [
    {"middle": IdentityAttention(samples=slice(2, 4))},                              # PAG-like, one copy perturbed
    {"input.4": BlurQueries(1.0, samples=slice(2, 4)), "output.2": Capture(samples=slice(0, 2))},
    {},                                                                              # no request: copies of one pass
], ids=["identity", "blur+capture", "none"])
def test_copies_equal_a_repeated_batch(attention):
    """``copies=n`` (run_passes for PAG / SEG) == one forward of the batch repeated n times; the rows
    before the first request are computed once, so only batch-size rounding may differ."""
    ref = reference("adm_uncond")
    model = load_case("adm_uncond").model
    x, t = ref["fwd_x"][:2], ref["fwd_t"][:2]
    with torch.no_grad():
        repeated = model(torch.cat([x, x]), t.repeat(2), attention=attention)
        shared = model(x, t, attention=attention, copies=2)
        single = model(x, t).output
    assert shared.output.shape == repeated.output.shape == (4, *single.shape[1:])
    assert max_err(shared.output, repeated.output) <= 1e-5
    assert max_err(shared.output[:2], single) <= 1e-5
    assert set(shared.attention_maps) == set(repeated.attention_maps)
    for site, amap in shared.attention_maps.items():
        assert max_err(amap.probs, repeated.attention_maps[site].probs) <= 1e-5   # measured 2.3e-6
