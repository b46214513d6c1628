"""Self-attention of the ADM / IDDPM U-Net, and the only code that computes or alters its weights.

``AttentionBlock`` is the official block (GroupNorm -> 1x1 conv to q,k,v -> multi-head attention ->
1x1 ``proj_out`` -> residual). Heads are ``channels // num_head_channels`` when
``num_head_channels`` is set, else ``num_heads``. Two qkv layouts exist (guided-diffusion
``QKVAttentionLegacy`` / ``QKVAttention``):

* legacy: the 3C qkv channels are [q_h0 k_h0 v_h0 | q_h1 k_h1 v_h1 | ...] (heads first);
* new order: [q_h0 .. q_hH | k_h0 .. k_hH | v_h0 .. v_hH] (q, k, v first).

Weights: A = softmax(q^T k / sqrt(d)) per head, rows = queries, softmax over keys in float32.
By default every block runs the explicit official einsums in the official tensor layout, which is
bit-identical to the official U-Net (tests/test_unet_parity.py). ``UNet.use_fused_attention(True)``
switches blocks without a capture request to ``F.scaled_dot_product_attention``: the same function
up to float rounding (~2e-6 on the fixtures, which the 1/sqrt(abar) factor of x0 amplifies at
high noise) and no T x T matrix in memory; the bench measures what it buys. A block with a
request from the seam (``unet/seam.py``) does what is asked and returns its map, if any.
"""
from __future__ import annotations

import math
from typing import Optional, Tuple

import torch
import torch.nn as nn
import torch.nn.functional as F

from .layers import GroupNorm32
from .seam import AttentionMap, BlurQueries, Capture, IdentityAttention, OfficialCapture, apply_on_samples


def split_heads(qkv: torch.Tensor, num_heads: int, new_order: bool) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """qkv [B x 3C x T] -> q, k, v each [(B heads) x d x T] (d = C / heads), per the block's layout.

    This is the official tensor layout; keeping it (and the official einsums below) makes the
    default path bit-identical to guided-diffusion's ``QKVAttentionLegacy`` / ``QKVAttention``.
    """
    batch, width, length = qkv.shape
    d = width // (3 * num_heads)
    if new_order:
        q, k, v = (t.reshape(batch * num_heads, d, length) for t in qkv.chunk(3, dim=1))
    else:
        q, k, v = qkv.reshape(batch * num_heads, 3 * d, length).split(d, dim=1)
    return q, k, v


def merge_heads(a: torch.Tensor, batch: int) -> torch.Tensor:
    """[(B heads) x d x T] -> [B x (heads d) x T] (head-major channels, both layouts)."""
    return a.reshape(batch, -1, a.shape[-1])


def attention_weights(q: torch.Tensor, k: torch.Tensor) -> torch.Tensor:
    """A = softmax_keys(q^T k / sqrt(d)): [(B h) x d x T] twice -> [(B h) x T x T] float32.

    As the official code: q and k are each scaled by d^(-1/4) before the product ("more stable
    with f16 than dividing afterwards"), and the softmax runs in float32.
    """
    scale = 1.0 / math.sqrt(math.sqrt(q.shape[1]))
    logits = torch.einsum("bct,bcs->bts", q * scale, k * scale)
    return torch.softmax(logits.float(), dim=-1)


def attend(weights: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    """a_t = sum_s A_ts v_s: [(B h) x T x S], [(B h) x d x S] -> [(B h) x d x T]."""
    return torch.einsum("bts,bcs->bct", weights.type(v.dtype), v)


def fused_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    """The same function through ``F.scaled_dot_product_attention`` (no T x T matrix kept):
    [(B h) x d x T] -> [(B h) x d x T]. Equal to the explicit path to ~2e-6 on the fixtures.

    SDPA gets contiguous 4-D [1 x (B h) x T x d] tensors: its fused kernels take only 4-D inputs with
    a contiguous last dimension; strided or 3-D ones silently fall back to the unfused math path
    (on the CPU 3.6x slower than the flash kernel at a 32x32 grid, and slower than the explicit einsums).
    """
    q, k, v = (t.transpose(1, 2).contiguous().unsqueeze(0) for t in (q, k, v))
    return F.scaled_dot_product_attention(q, k, v)[0].transpose(1, 2)


def official_sag_map(qkv: torch.Tensor, num_heads: int) -> torch.Tensor:
    """The map the official SAG code builds (``attention_from_qkv``, SPEC.md Q1/Q2).

    The qkv tensor [B x 3C x T] is cast to float32 and always split the legacy way into
    ``num_heads`` groups (the model-wide constructor argument, not the block's heads): group g's
    "q", "k" are the first two thirds of channels [3Cg/n, 3C(g+1)/n). Returns [B x n x T x T].
    """
    q, k, _ = split_heads(qkv.float(), num_heads, new_order=False)
    weights = attention_weights(q, k)
    return weights.reshape(qkv.shape[0], num_heads, *weights.shape[1:])


def gaussian_blur_tokens(q: torch.Tensor, batch: int, height: int, width: int, sigma: float,
                          kernel_size: Optional[int]) -> torch.Tensor:
    """SEG's query blur: q [(B h) x d x T] viewed per channel as a (height x width) grid.

    sigma = inf -> every token replaced by the mean token. Otherwise a separable Gaussian with
    reflect padding; kernel = smallest odd integer >= 6 sigma, capped at the grid side (SEG-SDXL).
    """
    if math.isinf(sigma):
        return q.mean(dim=2, keepdim=True).expand_as(q)
    if kernel_size is None:
        kernel_size = math.ceil(6 * sigma)
        kernel_size += 1 - kernel_size % 2
        side = min(height, width)
        kernel_size = min(kernel_size, side + 1 - side % 2)    # SEG-SDXL: capped at the grid side (+1 when even)
    radius = kernel_size // 2
    taps = torch.linspace(-radius, radius, kernel_size, device=q.device, dtype=torch.float32)
    kernel = torch.exp(-0.5 * (taps / sigma) ** 2)
    kernel = (kernel / kernel.sum()).to(q.dtype)
    grid = q.reshape(batch, -1, height, width)
    channels = grid.shape[1]
    grid = F.pad(grid, (radius, radius, radius, radius), mode="reflect")
    grid = F.conv2d(grid, kernel.view(1, 1, -1, 1).expand(channels, 1, -1, 1), groups=channels)
    grid = F.conv2d(grid, kernel.view(1, 1, 1, -1).expand(channels, 1, 1, -1), groups=channels)
    return grid.reshape(q.shape)


class AttentionBlock(nn.Module):
    """x + proj_out(MultiHeadAttention(qkv(norm(x)))), x: [B x C x H x W] -> same shape."""

    def __init__(self, channels: int, num_heads: int = 1, num_head_channels: int = -1,
                 use_new_attention_order: bool = False):
        super().__init__()
        if num_head_channels == -1:
            self.num_heads = num_heads
        else:
            if channels % num_head_channels:
                raise ValueError(f"attention channels {channels} are not divisible by num_head_channels {num_head_channels}")
            self.num_heads = channels // num_head_channels
        if channels % self.num_heads:
            raise ValueError(f"attention channels {channels} are not divisible by num_heads {self.num_heads}")
        self.channels = channels
        self.new_order = use_new_attention_order
        self.norm = GroupNorm32(channels)
        self.qkv = nn.Conv1d(channels, 3 * channels, 1)
        self.proj_out = nn.Conv1d(channels, channels, 1)
        self.fused = False   # set by UNet.use_fused_attention(); a construction-time choice, never per call

    @property
    def layout(self) -> str:
        return "new" if self.new_order else "legacy"

    def _attend(self, qkv: torch.Tensor, request, height: int, width: int) -> Tuple[torch.Tensor, Optional[AttentionMap]]:
        """One batch (slice) through the attention op the request names. qkv [b x 3C x T] -> [b x C x T]."""
        batch = qkv.shape[0]
        q, k, v = split_heads(qkv, self.num_heads, self.new_order)
        if isinstance(request, IdentityAttention):
            return merge_heads(v, batch), None                 # A = I: each token keeps its own value
        if isinstance(request, BlurQueries):
            q = gaussian_blur_tokens(q, batch, height, width, request.sigma, request.kernel_size)
        attention_map = None
        if self.fused and not isinstance(request, Capture):
            a = fused_attention(q, k, v)
        else:
            weights = attention_weights(q, k)                # [(b h) x T x T] float32
            a = attend(weights, v)
            if isinstance(request, Capture):
                attention_map = AttentionMap(weights.reshape(batch, self.num_heads, *weights.shape[1:]), height, width)
        if isinstance(request, OfficialCapture):
            attention_map = AttentionMap(official_sag_map(qkv, request.num_heads), height, width)
        return merge_heads(a, batch), attention_map

    def forward(self, x: torch.Tensor, request=None) -> Tuple[torch.Tensor, Optional[AttentionMap]]:
        batch, channels, height, width = x.shape
        assert channels == self.channels, f"AttentionBlock expects {self.channels} channels, got {channels}"
        x_flat = x.reshape(batch, channels, height * width)
        qkv = self.qkv(self.norm(x_flat))                                        # [B x 3C x T]
        a, attention_map = apply_on_samples(
            lambda rows, rows_request: self._attend(qkv[rows], rows_request, height, width), request, batch)
        h = self.proj_out(a.to(qkv.dtype))
        return (x_flat + h).reshape(batch, channels, height, width), attention_map
