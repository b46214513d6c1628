"""Mixed precision: under autocast the U-Net's norms and softmax run in float32, captured maps are
float32, the U-Net hands back float32 eps, and the sampler's own math (x0, blur, re-noising, update)
stays float32.

CUDA is not available to the test suite, so this runs CPU bfloat16 autocast: the same autocast
dispatch (conv / matmul lowered, GroupNorm32 and softmax cast up by our code) as ``sag-sample
--dtype bfloat16`` on CUDA, which wraps the sampling loop in ``torch.autocast("cuda", dtype)``.
"""
import pytest
import torch

from diffusion import DiffusionConfig, GaussianDiffusion
from sag import SAGConfig, guided_step
from unet import Capture, UNet, UNetConfig
from unet.layers import GroupNorm32

CONFIG = UNetConfig(image_size=16, model_channels=32, out_channels=6, num_res_blocks=1, attention_resolutions=(8,),
                    channel_mult=(1, 2), num_head_channels=32)
SITE = "output.1"


@pytest.fixture(scope="module")
def setup():
    torch.manual_seed(0)
    model = UNet(CONFIG).eval()
    with torch.no_grad():                       # non-trivial weights everywhere (zero-init layers included)
        for p in model.parameters():
            p.add_(torch.randn_like(p) * 0.05)
    diffusion = GaussianDiffusion.from_config(DiffusionConfig(steps=100, noise_schedule="cosine", learn_sigma=True,
                                                              timestep_respacing="10"))
    generator = torch.Generator().manual_seed(1)
    x = torch.randn(2, 3, 16, 16, generator=generator)
    return model, diffusion, x, torch.randn(x.shape, generator=generator)


def test_group_norm_computes_in_float32():
    norm = GroupNorm32(64)
    x = torch.randn(2, 64, 4, 4).to(torch.bfloat16)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        y = norm(x)
    assert y.dtype == torch.bfloat16
    assert torch.equal(y, norm(x.float()).to(torch.bfloat16))     # float32 statistics, rounded once


def test_forward_under_autocast_returns_float32_eps_and_maps(setup):
    model, _, x, _ = setup
    t = torch.full((2,), 50)
    with torch.no_grad():
        exact = model(x, t, attention={SITE: Capture()})
        with torch.autocast("cpu", dtype=torch.bfloat16):
            mixed = model(x, t, attention={SITE: Capture()})
    assert mixed.output.dtype == torch.float32
    probs = mixed.attention_maps[SITE].probs
    assert probs.dtype == torch.float32
    torch.testing.assert_close(probs.sum(-1), torch.ones_like(probs.sum(-1)), atol=1e-5, rtol=0)
    # bfloat16 keeps ~3 significant digits: the mixed forward is near, not equal, to float32.
    assert (mixed.output - exact.output).abs().max() < 0.1
    assert (probs - exact.attention_maps[SITE].probs).abs().max() < 0.05


@pytest.mark.parametrize("use_ddim", [False, True], ids=["ddpm", "ddim"])
def test_sag_step_under_autocast_stays_float32_outside_the_unet(setup, use_ddim):
    model, diffusion, x, noise = setup
    sag = SAGConfig(scale=0.5, site=SITE, blur_sigma=1.0, kernel_size=5)
    exact = guided_step(model, diffusion, x, 5, guidance=sag, noise=noise, use_ddim=use_ddim)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        mixed = guided_step(model, diffusion, x, 5, guidance=sag, noise=noise, use_ddim=use_ddim)
    for name in ("x_prev", "eps", "pred_x0"):
        assert getattr(mixed, name).dtype == torch.float32, name
    step = mixed.sag
    for name in ("salient_mask", "blurred_x0", "degraded_x_t", "eps_degraded", "guided_eps"):
        assert getattr(step, name).dtype == torch.float32, name
    assert step.attention_map.probs.dtype == torch.float32
    assert torch.isfinite(mixed.x_prev).all()
    assert (mixed.x_prev - exact.x_prev).abs().max() < 0.1


@pytest.mark.parametrize("request_kind", ["block", "official"])
def test_captured_map_logits_stay_float32_under_autocast(setup, request_kind):
    """The captured map is an island: under bfloat16 autocast its q.k and softmax run in float32 on the
    block's own (bfloat16) qkv, so it equals the float32 map of those qkv values."""
    from unet.attention import attention_weights, split_heads
    from unet.seam import OfficialCapture
    model, _, _, _ = setup
    block = model.decoder[1].attn                                    # the block at SITE
    x = torch.randn(2, block.channels, 8, 8, generator=torch.Generator().manual_seed(3))
    request = Capture() if request_kind == "block" else OfficialCapture(num_heads=2)
    with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16):
        qkv = block.qkv(block.norm(x.reshape(2, block.channels, -1)))
        assert qkv.dtype == torch.bfloat16
        _, captured = block(x, request)
    assert captured.probs.dtype == torch.float32
    heads = block.num_heads if request_kind == "block" else 2
    new_order = block.new_order if request_kind == "block" else False
    with torch.no_grad():                                            # no autocast: float32 products
        q, k, _ = split_heads(qkv.float(), heads, new_order)
        expected = attention_weights(q, k).reshape(2, heads, 64, 64)
    torch.testing.assert_close(captured.probs, expected, atol=1e-6, rtol=0)
    # What the islands prevent: the same map with bfloat16 logits is visibly different.
    with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16):
        lowered = attention_weights(*split_heads(qkv, heads, new_order)[:2]).reshape(2, heads, 64, 64)
    assert (lowered - expected).abs().max() > 1e-4


def test_sampling_loop_under_cpu_bfloat16_returns_float32(setup):
    """``sag.sample(dtype="bfloat16")``: the U-Net passes under autocast, every step's state float32."""
    from sag import sample
    model, diffusion, _, _ = setup
    states = []
    sag = SAGConfig(scale=0.5, site=SITE, blur_sigma=1.0, kernel_size=5)
    out = sample(model, diffusion, (2, 3, 16, 16), guidance=sag, seed=0, dtype="bfloat16",
                 callback=lambda info: states.append(info))
    assert out.dtype == torch.float32 and len(states) == diffusion.num_timesteps
    for info in states:
        assert info.x_prev.dtype == info.eps.dtype == info.pred_x0.dtype == torch.float32
        assert info.sag.attention_map.probs.dtype == info.sag.blurred_x0.dtype == torch.float32
