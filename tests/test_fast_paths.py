"""The fused attention hot path (unet/attention.py ``fused_attention_from_qkv``): the same values as the
composed path (split heads -> SDPA -> merge heads) in both qkv layouts, so trimming its copies changed
no result; and within float rounding of the official einsums."""
import pytest
import torch

from unet.attention import (attend, attention_weights, fused_attention, fused_attention_from_qkv, merge_heads,
                            split_heads)


@pytest.mark.parametrize("new_order", [False, True], ids=["legacy", "new-order"])
def test_one_copy_fused_path_equals_the_composed_one(new_order):
    generator = torch.Generator().manual_seed(0)
    heads, d, tokens, batch = 3, 8, 64, 2
    qkv = torch.randn(batch, 3 * heads * d, tokens, generator=generator)
    q, k, v = split_heads(qkv, heads, new_order)
    composed = merge_heads(fused_attention(q, k, v), batch)
    fast = fused_attention_from_qkv(qkv, heads, new_order)
    assert fast.shape == (batch, heads * d, tokens)
    torch.testing.assert_close(fast, composed, atol=1e-7, rtol=0)
    explicit = merge_heads(attend(attention_weights(q, k), v), batch)
    torch.testing.assert_close(fast, explicit, atol=1e-5, rtol=0)
    # A batch slice (the seam's samples= path hands the block a slice of qkv) takes the same path.
    torch.testing.assert_close(fused_attention_from_qkv(qkv[1:], heads, new_order), composed[1:], atol=1e-7, rtol=0)
