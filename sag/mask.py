"""The salient mask M_t of Self-Attention Guidance: where the model looks, at image resolution.

Paper: Hong, Lee, Jang, Kim, "Improving Sample Quality of Diffusion Models Using Self-Attention
Guidance", ICCV 2023 (arXiv 2210.00939).  With A_t the softmax self-attention of one U-Net block at
step t (rows = queries, columns = keys, each row sums to 1), averaged over heads, the mask marks the
key positions that receive more attention than the average:

    r[k]  = sum_q mean_h A_t[h, q, k]          (attention received by key k; mean_k r[k] = 1)
    M_t   = Up( 1[r > threshold] ),            threshold = 1.0 (the mean of r)

Official code: SAG ``guided_diffusion/gaussian_diffusion.py`` ``attention_masking`` (commit
``a36f251dac2fc535e9d0670b86527df9eb1c661c`` of https://github.com/SusungHong/Self-Attention-Guidance):

    attn_mask = attn.reshape(B, num_heads, T, T).mean(1).sum(1) > 1.0
    attn_mask = attn_mask.reshape(B, r, r).unsqueeze(1).repeat(1, 3, 1, 1).int().float()
    attn_mask = F.interpolate(attn_mask, (H, W))            # default mode "nearest"

Differences, all deliberate (SPEC.md Q3, Q4):

* the grid (height, width) is the captured block's own (``AttentionMap.height/width``), not the
  official depth table, and may be non-square; token n is pixel (n // width, n % width), the
  official row-major order;
* the mask keeps one channel, ``(B, 1, H, W)``, and broadcasts over the image channels, where the
  official code repeats it to exactly 3 (RGB) channels; ``mask.expand(-1, 3, -1, -1)`` is the
  official tensor, value for value;
* the heads averaged are whatever the map holds: the block's real heads (``Capture``) or the official
  pseudo-heads (``OfficialCapture``, SPEC.md Q1/Q2); the reduction is the same.

Everything here is shape-checked on the host and computed on the map's device, with no sync.
"""
from __future__ import annotations

from typing import TYPE_CHECKING, Tuple

import torch
import torch.nn.functional as F

if TYPE_CHECKING:  # the seam type lives in unet/; only its fields are read here
    from unet.seam import AttentionMap

__all__ = ["attention_received", "salient_mask"]


def _checked_probs(attention_map: "AttentionMap") -> torch.Tensor:
    probs, height, width = attention_map.probs, attention_map.height, attention_map.width
    if probs.dim() != 4:
        raise ValueError(f"attention probs must be (B, heads, N, N), got shape {tuple(probs.shape)}")
    tokens = height * width
    if probs.shape[-2:] != (tokens, tokens):
        raise ValueError(f"attention probs {tuple(probs.shape)} do not match the {height}x{width} grid "
                         f"(expected (B, heads, {tokens}, {tokens}))")
    return probs


def attention_received(attention_map: "AttentionMap") -> torch.Tensor:
    """Attention each key position receives: r[b, k] = sum_q mean_h A[b, h, q, k].

    The mean over heads comes first, then the sum over the query axis (rows), in the official order
    (``attn.reshape(B, heads, T, T).mean(1).sum(1)``).  Because every row of a softmax sums to 1, the N
    values of r sum to N, i.e. their mean is exactly 1 (up to rounding): r > 1 means "more than average".

    Shapes: probs ``[B x heads x N x N]`` (rows = queries, columns = keys), N = height * width
    -> ``[B x N]`` in probs' dtype, token n = pixel (n // width, n % width).
    """
    probs = _checked_probs(attention_map)       # (B, heads, N, N)
    return probs.mean(dim=1).sum(dim=1)         # (B, N): mean over heads, then sum over queries


def salient_mask(attention_map: "AttentionMap", image_size: Tuple[int, int],
                 threshold: float = 1.0) -> torch.Tensor:
    """SAG's mask M_t = Up(1[r > threshold]) with r = :func:`attention_received` (strict ``>``).

    The binary map on the block's (height, width) grid is upsampled to ``image_size`` with
    ``F.interpolate(mode="nearest")``, the official default (an integer ratio repeats each cell as a
    block; other ratios follow PyTorch's legacy ``nearest`` index rule, as the official code does).
    ``threshold = 1.0`` is the mean of r, so M_t marks the positions that receive more attention than
    the average position.

    Shapes: probs ``[B x heads x N x N]``, N = height * width -> ``[B x 1 x H x W]`` float32 in {0, 1},
    (H, W) = ``image_size``.  The single channel broadcasts over the image channels (the official code
    repeats it to 3 channels; see the module docstring).

    Args:
        attention_map: ``AttentionMap(probs, height, width)`` from the U-Net's attention seam.
        image_size: (H, W) of the image the mask applies to.
        threshold: a key is salient when it receives strictly more than this (official: 1.0).
    """
    image_height, image_width = image_size
    if image_height < 1 or image_width < 1:
        raise ValueError(f"image_size must be two positive ints (H, W), got {image_size}")
    received = attention_received(attention_map)                                    # (B, N)
    batch = received.shape[0]
    on_grid = (received > threshold).reshape(batch, 1, attention_map.height, attention_map.width)
    on_grid = on_grid.to(torch.float32)                                              # (B, 1, h, w) in {0, 1}
    return F.interpolate(on_grid, size=(int(image_height), int(image_width)), mode="nearest")  # (B, 1, H, W)
