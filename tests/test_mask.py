"""Tests of sag.mask: hand-built maps, and the official SAG mask from tests/fixtures/official/adm_uncond.

The fixture's ``*_colsum_*`` keys are the official reduction ``attn.reshape(B, heads, T, T).mean(1).sum(1)``
and ``*_mask_lowres`` / ``step1_mask_up`` the official mask before and after ``F.interpolate``
(3 channels, repeated); see adm_uncond/README.md.
"""
from __future__ import annotations

from pathlib import Path

import pytest
import torch

from sag.mask import attention_received, salient_mask
from unet.seam import AttentionMap

FIXTURE = Path(__file__).parent / "fixtures" / "official" / "adm_uncond" / "reference.pt"
MAP_ATOL = 1e-5  # PROVENANCE.md "Suggested tolerances": attention maps


@pytest.fixture(scope="module")
def reference():
    return torch.load(FIXTURE, weights_only=True)


def one_key_map(batch, heads, height, width, key):
    """Every query attends only to ``key``: that key receives N, every other key 0."""
    tokens = height * width
    probs = torch.zeros(batch, heads, tokens, tokens)
    probs[..., key] = 1.0
    return AttentionMap(probs, height, width)


def map_with_received(received, height, width):
    """A rank-one map (every query row = received / N), one head, whose column sums are ``received``.

    Rows sum to mean(received), which is 1 for an official column-sum vector (up to rounding).
    """
    batch, tokens = received.shape
    probs = (received / tokens)[:, None, None, :].expand(batch, 1, tokens, tokens)
    return AttentionMap(probs, height, width)


# --- hand-built maps ---------------------------------------------------------------------------------

def test_single_attended_key_gives_single_salient_pixel():
    attention = one_key_map(batch=2, heads=3, height=4, width=4, key=6)   # token 6 = row 1, col 2
    received = attention_received(attention)
    expected_received = torch.zeros(2, 16)
    expected_received[:, 6] = 16.0
    assert torch.equal(received, expected_received)

    mask = salient_mask(attention, (4, 4))
    expected = torch.zeros(2, 1, 4, 4)
    expected[:, 0, 1, 2] = 1.0
    assert mask.dtype == torch.float32 and torch.equal(mask, expected)


def test_uniform_attention_gives_empty_mask():
    # N = 64 is a power of two, so 1/N and the column sums N * (1/N) = 1 are exact in float32.
    probs = torch.full((2, 4, 64, 64), 1.0 / 64)
    attention = AttentionMap(probs, 8, 8)
    assert torch.equal(attention_received(attention), torch.ones(2, 64))
    assert torch.equal(salient_mask(attention, (32, 32)), torch.zeros(2, 1, 32, 32))
    # The comparison is strict: a lower threshold marks everything.
    assert torch.equal(salient_mask(attention, (8, 8), threshold=0.999), torch.ones(2, 1, 8, 8))


def test_received_attention_has_mean_one():
    logits = torch.randn(3, 2, 48, 48, generator=torch.Generator().manual_seed(0))
    received = attention_received(AttentionMap(logits.softmax(dim=-1), 6, 8))
    torch.testing.assert_close(received.mean(dim=1), torch.ones(3), atol=1e-6, rtol=0)


@pytest.mark.parametrize("image_size", [(4, 4), (8, 8)])
def test_nearest_upsampling_of_known_pattern(image_size):
    pattern = torch.tensor([[1.0, 0.0],
                            [0.0, 1.0]])
    received = pattern.reshape(1, 4) * 2.0                # salient tokens receive 2, others 0
    mask = salient_mask(map_with_received(received, 2, 2), image_size)
    factor = image_size[0] // 2
    expected = pattern.repeat_interleave(factor, 0).repeat_interleave(factor, 1)
    assert mask.shape == (1, 1, *image_size)
    assert torch.equal(mask[0, 0], expected)


def test_non_square_grid_is_row_major():
    # height 2, width 4: token n is (n // 4, n % 4); token 5 = row 1, col 1.
    attention = one_key_map(batch=1, heads=1, height=2, width=4, key=5)
    expected_grid = torch.zeros(2, 4)
    expected_grid[1, 1] = 1.0
    assert torch.equal(salient_mask(attention, (2, 4))[0, 0], expected_grid)
    mask = salient_mask(attention, (8, 16))                # 4x along both axes
    assert torch.equal(mask[0, 0], expected_grid.repeat_interleave(4, 0).repeat_interleave(4, 1))


def test_heads_are_averaged_before_the_threshold():
    # Head 0: everyone attends key 0; head 1: everyone attends key 3. Mean: keys 0 and 3 get N/2 each.
    tokens = 4
    probs = torch.zeros(1, 2, tokens, tokens)
    probs[:, 0, :, 0] = 1.0
    probs[:, 1, :, 3] = 1.0
    attention = AttentionMap(probs, 2, 2)
    assert torch.equal(attention_received(attention), torch.tensor([[2.0, 0.0, 0.0, 2.0]]))
    assert torch.equal(salient_mask(attention, (2, 2))[0, 0], torch.tensor([[1.0, 0.0], [0.0, 1.0]]))
    # Only head 0: key 0 alone; a head's own sum would differ from the mean.
    head_zero = AttentionMap(probs[:, :1], 2, 2)
    assert torch.equal(salient_mask(head_zero, (2, 2))[0, 0], torch.tensor([[1.0, 0.0], [0.0, 0.0]]))


def test_mask_broadcasts_over_channels():
    attention = one_key_map(batch=1, heads=1, height=2, width=2, key=0)
    mask = salient_mask(attention, (4, 4))
    image = torch.ones(1, 3, 4, 4)
    assert mask.shape == (1, 1, 4, 4) and (mask * image).shape == (1, 3, 4, 4)


def test_no_data_dependent_host_code():
    """Runs on the meta device (shapes only): nothing reads a value, so nothing would sync a GPU."""
    attention = AttentionMap(torch.empty(2, 4, 32, 32, device="meta"), 4, 8)
    mask = salient_mask(attention, (16, 32))
    assert mask.device.type == "meta" and mask.shape == (2, 1, 16, 32) and mask.dtype == torch.float32


def test_shape_errors():
    with pytest.raises(ValueError, match=r"\(B, heads, N, N\)"):
        attention_received(AttentionMap(torch.zeros(2, 16, 16), 4, 4))
    with pytest.raises(ValueError, match="do not match the 4x4 grid"):
        attention_received(AttentionMap(torch.zeros(2, 1, 15, 15), 4, 4))
    with pytest.raises(ValueError, match="do not match the 2x4 grid"):
        salient_mask(AttentionMap(torch.zeros(1, 1, 16, 16), 2, 4), (16, 16))
    with pytest.raises(ValueError, match="image_size"):
        salient_mask(one_key_map(1, 1, 2, 2, 0), (0, 4))


# --- the official fixture ------------------------------------------------------------------------------

def test_official_map_reduction(reference):
    batch = reference["fwd_colsum_official"].shape[0]
    official = AttentionMap(reference["fwd_attn_official"].reshape(batch, 4, 64, 64), 8, 8)  # (B*4, T, T)
    torch.testing.assert_close(attention_received(official), reference["fwd_colsum_official"],
                               atol=MAP_ATOL, rtol=0)
    true_heads = AttentionMap(reference["fwd_attn_true_heads"].reshape(batch, 8, 64, 64), 8, 8)  # (B*8, T, T)
    torch.testing.assert_close(attention_received(true_heads), reference["fwd_colsum_true_heads"],
                               atol=MAP_ATOL, rtol=0)
    # The two head groupings give different masks (PROVENANCE.md quirk 1): 25 of 128 bits.
    differ = salient_mask(official, (8, 8)) != salient_mask(true_heads, (8, 8))
    assert int(differ.sum()) == 25


@pytest.mark.parametrize("step", ["step1", "step2"])
def test_official_low_resolution_mask(reference, step):
    received = reference[f"{step}_colsum_official"]                      # (B, 64)
    official_mask = reference[f"{step}_mask_lowres"]                     # (B, 3, 8, 8), repeated channels
    batch = received.shape[0]
    by_formula = (received > 1.0).reshape(batch, 1, 8, 8).float()
    assert torch.equal(by_formula.expand(-1, 3, -1, -1), official_mask)
    # Through our API: a map whose column sums are the official ones (error ~4e-7, far below the
    # fixture's min_mask_margin, so no bit can flip).
    attention = map_with_received(received, 8, 8)
    assert float(reference["min_mask_margin"]) > 1e-4
    torch.testing.assert_close(attention_received(attention), received, atol=1e-6, rtol=0)
    assert torch.equal(salient_mask(attention, (8, 8)).expand(-1, 3, -1, -1), official_mask)


def test_official_upsampled_mask(reference):
    attention = map_with_received(reference["step1_colsum_official"], 8, 8)
    mask = salient_mask(attention, tuple(reference["step1_mask_up"].shape[-2:]))   # (B, 1, 32, 32)
    assert mask.shape == (2, 1, 32, 32)
    assert torch.equal(mask.expand(-1, 3, -1, -1), reference["step1_mask_up"])
