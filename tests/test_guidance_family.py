"""PAG, SEG, CFG and their combinations with CFG: the attention math, batched == sequential, the
combination rules, and "scale 0 (w = 1) is the unguided step bit for bit".

Exactness is tested on the sequential path: a batched forward of 2B / 3B equals B-sized forwards only
up to float rounding (here ~3e-6 on eps at s = 0, w = 1; measured 2026-11, torch 2.13 CPU, 2 threads).
"""
import copy
import math

import numpy as np
import pytest
import torch
from scipy.ndimage import correlate1d

from checkpoints_convert import load_official_classifier
from conftest import FIXTURES, load_case, max_err, official_flags, reference
from sag import SAGConfig, guided_step, sag_step
from sag.cfg import CFGConfig, CFGWith
from sag.guidance import GuidanceError, classifier_grad, run_model
from sag.perturbed import PAGConfig, SEGConfig, default_pag_sites
from unet import AttentionBlock, BlurQueries, IdentityAttention, UNet, UNetConfig

NULL = 0                     # stand-in "unconditional" class for the class-conditional fixture network
T_INDEX = 5


# -- the attention math, on one block ----------------------------------------------------------------

def _block(heads, seed=0):
    torch.manual_seed(seed)
    block = AttentionBlock(32, num_heads=heads)
    with torch.no_grad():
        for p in block.parameters():
            p.copy_(torch.randn_like(p) * (0.3 if p.dim() > 1 else 0.1))
    return block.eval(), torch.randn(2, 32, 8, 8)


def test_identity_attention_gives_each_token_its_own_projected_value():
    block, x = _block(heads=4)
    d = 32 // 4
    v_rows = [h * 3 * d + 2 * d + c for h in range(4) for c in range(d)]     # legacy layout: [q k v] per head
    with torch.no_grad():
        n = block.norm(x.reshape(2, 32, 64))
        values = torch.einsum("oc,bct->bot", block.qkv.weight[v_rows, :, 0], n) + block.qkv.bias[v_rows, None]
        expected = x.reshape(2, 32, 64) + block.proj_out(values)
        out = block(x, IdentityAttention())[0]
    assert max_err(out.reshape(2, 32, 64), expected) <= 1e-6


def test_seg_tiny_sigma_is_plain_attention_and_infinite_sigma_is_spatially_constant():
    block, x = _block(heads=2)
    with torch.no_grad():
        plain = block(x)[0]
        tiny = block(x, BlurQueries(1e-3))[0]                  # a 1-tap kernel
        infinite = block(x, BlurQueries(math.inf))[0] - x      # = proj_out(attention output)
    assert max_err(tiny, plain) <= 1e-6
    per_token = infinite.reshape(2, 32, 64)
    assert max_err(per_token, per_token.mean(-1, keepdim=True).expand_as(per_token)) <= 1e-5
    assert max_err(plain - x, infinite) > 1e-2                 # and it did change something


def _blur_grid(a, sigma, height, width):
    """Gaussian blur of a [T x ...] float64 array over its (height x width) token grid, written
    independently of the seam: SEG's kernel rule, torch 'reflect' padding == scipy 'mirror'."""
    size = math.ceil(6 * sigma)
    size += 1 - size % 2
    size = min(size, min(height, width) + 1 - min(height, width) % 2)
    taps = np.arange(size) - size // 2
    kernel = np.exp(-0.5 * (taps / sigma) ** 2)
    kernel /= kernel.sum()
    grid = a.reshape(height, width, *a.shape[1:])
    grid = correlate1d(correlate1d(grid, kernel, axis=0, mode="mirror"), kernel, axis=1, mode="mirror")
    return grid.reshape(a.shape)


def test_blurring_queries_equals_blurring_the_logits_along_the_query_grid():
    block, x = _block(heads=1)
    sigma, d = 1.0, 32
    with torch.no_grad():
        qkv = block.qkv(block.norm(x.reshape(2, 32, 64)))[0].double().numpy()     # [3C x T], one head
        q, k, v = qkv[:d].T, qkv[d:2 * d].T, qkv[2 * d:].T                          # [T x d] each
        logits = q @ k.T / math.sqrt(d)                                              # rows = queries
        blurred_logits = _blur_grid(logits, sigma, 8, 8)                             # blur along the query axis
        # The SEG claim: blur(Q) K^T == blur(Q K^T) (linear in Q), here with explicit logits.
        assert np.abs(_blur_grid(q, sigma, 8, 8) @ k.T / math.sqrt(d) - blurred_logits).max() < 1e-10
        weights = np.exp(blurred_logits - blurred_logits.max(1, keepdims=True))
        a = (weights / weights.sum(1, keepdims=True)) @ v                           # [T x d]
        expected = x[:1].reshape(1, 32, 64) + block.proj_out(torch.from_numpy(a.T[None]).float())
        out = block(x, BlurQueries(sigma))[0][:1]
    assert max_err(out.reshape(1, 32, 64), expected) <= 1e-5


# -- configs -----------------------------------------------------------------------------------------

def test_default_pag_sites_follow_the_official_choice():
    assert default_pag_sites(load_case("pag_adm").model) == ("input.5", "input.7", "input.8", "middle")
    with torch.device("meta"):                                                   # ADM-256 layout, no weights
        adm256 = UNet(UNetConfig(image_size=256, model_channels=256, out_channels=6, attention_resolutions=(32, 16, 8),
                                 channel_mult=(1, 1, 2, 2, 4, 4), num_head_channels=64, resblock_updown=True,
                                 use_scale_shift_norm=True))
    assert default_pag_sites(adm256) == ("input.14", "input.16", "input.17", "middle")


def test_config_gates_and_errors():
    assert [PAGConfig(step_range=(5, 2)).active_at(t) for t in (6, 5, 2, 1)] == [False, True, True, False]
    assert PAGConfig.from_guide_scale(4.0).scale == 3.0 and PAGConfig().active_at(999)
    assert SEGConfig(sigma=9999999.0).requests(None) == {"middle": BlurQueries(math.inf)}     # SEG-SDXL threshold
    for bad in (lambda: PAGConfig(step_range=(2, 5)), lambda: PAGConfig(scale=math.nan),
                lambda: PAGConfig(sites=()), lambda: SEGConfig(sigma=0.0), lambda: CFGConfig(w=math.inf),
                lambda: CFGWith(CFGConfig(2.0), CFGConfig(2.0))):
        with pytest.raises(GuidanceError):
            bad()


# -- on the class-conditional fixture network --------------------------------------------------------

@pytest.fixture(scope="module")
def cond():
    """The class-conditional fixture network on a 32x32 input with B = 1 (fully convolutional; small
    and fast on a shared 2-core CPU), a noisy x_t, step noise and a label."""
    loaded = load_case("adm_cond_cg", timestep_respacing="10", use_ddim=False)
    generator = torch.Generator().manual_seed(7)
    x = torch.randn(1, 3, 32, 32, generator=generator)
    noise = torch.randn(1, 3, 32, 32, generator=generator)
    return loaded.model, loaded.diffusion, x, noise, reference("adm_cond_cg")["y"][:1]


def _sequential_cfg(w):
    return CFGConfig(w, null_label=NULL, batched=False)


SAG_COND = dict(site="output.5", blur_sigma=3.0)               # the fixture's official SAG settings


def _all_methods(s, w, batched):
    cfg = CFGConfig(w, null_label=NULL, batched=batched)
    return {
        "PAG": PAGConfig(scale=s, batched=batched),
        "SEG": SEGConfig(scale=s, sigma=2.0, batched=batched),
        "CFG": cfg,
        "SAG+CFG": CFGWith(cfg, SAGConfig(scale=s, **SAG_COND)),
        "PAG+CFG": CFGWith(cfg, PAGConfig(scale=s, batched=batched)),
        "SEG+CFG": CFGWith(cfg, SEGConfig(scale=s, sigma=math.inf, batched=batched)),
    }


def test_scale_zero_is_the_unguided_step(cond):
    """s = 0 (and w = 1 for CFG) returns the unguided conditional step, on the sequential path:
    exactly for SEG and CFG (eps + s(...) forms), up to one float32 rounding for SAG and PAG, which
    compute the official eps_bar + (1 + s)(eps - eps_bar)."""
    model, diffusion, x, noise, y = cond
    with torch.no_grad():
        plain = guided_step(model, diffusion, x, T_INDEX, y=y, noise=noise)
        for name, method in _all_methods(0.0, 1.0, batched=False).items():
            info = guided_step(model, diffusion, x, T_INDEX, guidance=method, y=y, noise=noise)
            assert info.sag is not None, name
            if name in ("SEG", "CFG"):
                assert torch.equal(info.eps, plain.eps) and torch.equal(info.x_prev, plain.x_prev), name
            else:
                assert max_err(info.eps, plain.eps) <= 1e-6 and max_err(info.x_prev, plain.x_prev) <= 1e-5, name
        # DDIM uses only the guided eps, so the same holds there; checked once.
        ddim = [guided_step(model, diffusion, x, T_INDEX, guidance=g, y=y, use_ddim=True).x_prev
                for g in (None, SEGConfig(scale=0.0, batched=False))]
    assert torch.equal(*ddim)


def _pass_eps(step):
    """The eps of every U-Net pass a step made (conditional / unperturbed, unconditional, perturbed)."""
    inner = getattr(step, "inner", None)
    found = [step.first.eps, getattr(step, "eps_uncond", None), getattr(step, "eps_perturbed", None),
             getattr(inner, "eps_perturbed", None)]
    return [e for e in found if e is not None]


def test_batched_equals_sequential(cond):
    """Every pass agrees to float rounding (<= 1e-5); the guided eps amplifies it by up to 1 + |w - 1| + s."""
    model, diffusion, x, _, y = cond
    t = torch.full((1,), T_INDEX)
    batched, sequential = _all_methods(1.5, 2.5, True), _all_methods(1.5, 2.5, False)
    with torch.no_grad():
        for name in batched:
            a = batched[name].predict(model, diffusion, x, t, y)
            b = sequential[name].predict(model, diffusion, x, t, y)
            for eps_a, eps_b in zip(_pass_eps(a), _pass_eps(b), strict=True):
                assert max_err(eps_a, eps_b) <= 1e-5, name
            assert max_err(a.first.log_variance, b.first.log_variance) <= 1e-5, name
            assert max_err(a.guided_eps, b.guided_eps) <= 5e-5, name


def test_combination_rules(cond):
    model, diffusion, x, _, y = cond
    t, s, w = torch.full((1,), T_INDEX), 1.5, 2.5
    null = torch.full_like(y, NULL)
    cfg = _sequential_cfg(w)
    with torch.no_grad():
        eps_c = run_model(model, diffusion, x, t, y)[0].eps
        eps_u = run_model(model, diffusion, x, t, null)[0].eps
        step = cfg.predict(model, diffusion, x, t, y)
        assert torch.equal(step.first.eps, eps_c) and torch.equal(step.eps_uncond, eps_u)
        assert max_err(step.guided_eps, eps_u + w * (eps_c - eps_u)) <= 1e-5
        # PAG + CFG and SEG + CFG: the perturbed pass is the conditional one (diffusers / SEG-SDXL).
        for method in (PAGConfig(scale=s, batched=False), SEGConfig(scale=s, batched=False)):
            alone = method.predict(model, diffusion, x, t, y)
            both = CFGWith(cfg, method).predict(model, diffusion, x, t, y)
            assert torch.equal(both.inner.eps_perturbed, alone.eps_perturbed)
            rule = eps_u + w * (eps_c - eps_u) + s * (eps_c - alone.eps_perturbed)
            assert max_err(both.guided_eps, rule) <= 1e-5
        # SAG + CFG: SAG from the unconditional half (its map, x_bar_t, a third pass with the null label).
        sag = SAGConfig(scale=s, **SAG_COND)
        alone = sag_step(model, diffusion, x, t, sag, null)
        both = CFGWith(cfg, sag).predict(model, diffusion, x, t, y)
        assert torch.equal(both.inner.degraded_x_t, alone.degraded_x_t) and torch.equal(both.first.eps, eps_c)
        rule = eps_u + w * (eps_c - eps_u) + s * (eps_u - alone.eps_degraded)
        assert max_err(both.guided_eps, rule) <= 1e-5
        # Outside the inner method's own range only CFG applies (chosen on the Python index).
        gated = CFGWith(cfg, PAGConfig(scale=s, step_range=(3, 0), batched=False))
        assert gated.for_step(3) is gated and gated.for_step(T_INDEX) == cfg
        outside = gated.for_step(T_INDEX).predict(model, diffusion, x, t, y)
        assert outside.inner is None and torch.equal(outside.guided_eps, step.guided_eps)


def test_cfg_with_a_second_network_and_its_errors(cond):
    model, diffusion, x, _, y = cond
    t = torch.full((1,), T_INDEX)
    other = copy.deepcopy(model)                                  # a distinct "unconditional" network
    with torch.no_grad():
        two_nets = CFGConfig(2.0, unconditional_model=other, null_label=NULL).predict(model, diffusion, x, t, y)
        one_net = _sequential_cfg(2.0).predict(model, diffusion, x, t, y)
    assert torch.equal(two_nets.guided_eps, one_net.guided_eps)
    with pytest.raises(GuidanceError, match="no null label"):
        CFGConfig(2.0).predict(model, diffusion, x, t, y)
    with pytest.raises(GuidanceError, match="labels"):
        CFGConfig(2.0, null_label=NULL).predict(model, diffusion, x, t, None)


def test_classifier_guidance_composes_on_top(cond):
    model, diffusion, _, _, y = cond
    classifier = load_official_classifier(FIXTURES / "adm_cond_cg" / "classifier.pt", official_flags("adm_cond_cg"))
    generator = torch.Generator().manual_seed(8)
    x, noise = torch.randn(1, 3, 64, 64, generator=generator), torch.randn(1, 3, 64, 64, generator=generator)
    t = torch.full((1,), T_INDEX)                                    # the classifier needs the native 64x64
    with torch.no_grad():
        info = guided_step(model, diffusion, x, T_INDEX, guidance=CFGConfig(2.0, null_label=NULL), y=y, noise=noise,
                           classifier=classifier, classifier_scale=1.0)
    grad = classifier_grad(classifier.model, diffusion, x, t, y, 1.0)
    # Ancestral step on the CFG x0: mean + Sigma * grad + sigma z, Sigma from the conditional pass (``first``).
    first = info.sag.first
    mean = diffusion.q_posterior_mean_variance(info.pred_x0, x, t)[0]
    expected = mean + first.variance * grad + torch.exp(0.5 * first.log_variance) * noise
    assert max_err(info.x_prev, expected) <= 1e-5
