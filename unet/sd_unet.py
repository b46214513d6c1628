"""The Stable Diffusion 1.x / 2.x latent U-Net (diffusers' ``UNet2DConditionModel`` as SD uses it), on the
attention seam.

eps_theta(z_t, t, c) (or v, as the scheduler's ``prediction_type`` says; the network does not know):
z_t [B, 4, h, w] latents, t the timestep, c [B, L, D] the text encoder's hidden states.

Layout (parameter names are diffusers' state-dict names, so a diffusers folder's
``unet/diffusion_pytorch_model.safetensors`` loads with ``strict=True``)::

    conv_in                                     3x3 conv, in_channels -> C0
    time_embedding.linear_1 / linear_2          sinusoid(t) [B, C0] -> SiLU MLP -> temb [B, 4 C0]
    down_blocks.i   resnets.j [+ attentions.j] for j < layers_per_block, [+ downsamplers.0] (not the last)
    mid_block       resnets.0, attentions.0, resnets.1
    up_blocks.i     resnets.j [+ attentions.j] for j <= layers_per_block (input = [h | skip]), [+ upsamplers.0]
    conv_norm_out, conv_out                     GroupNorm, SiLU, 3x3 conv -> out_channels

A ResNet block is  h = conv2(drop(SiLU(norm2(conv1(SiLU(norm1(x))) + time_emb_proj(SiLU(temb)))))),
out = (conv_shortcut(x) + h) / output_scale_factor. An ``attentions.j`` is a spatial transformer:
x + proj_out(blocks(proj_in(GroupNorm(x)))) with 1x1-conv (SD 1.x) or linear (SD 2.x) projections; each of
its ``transformer_blocks.k`` is  x += attn1(LN1(x)) (self-attention); x += attn2(LN2(x), c) (cross-attention);
x += ff(LN3(x)) with a GEGLU feed-forward (a, g = proj(x) split in two; a * GELU(g); net.2 back to C).
Attention: softmax(q k^T / sqrt(d)) v over ``heads`` heads of width d = C / heads, then ``to_out.0``.

diffusers' naming quirk (SPEC.md §1.2 m, fixtures PROVENANCE.md): ``attention_head_dim`` in SD configs is
the number of **heads** (8 for SD 1.x; SD 2.x gives a per-down-block list, [5, 10, 20, 20] = channels / 64).
``num_attention_heads`` (null in SD configs) means heads too and wins when set. The mid block uses the last
entry; up block i the reversed list's i-th.

The attention seam (unet/seam.py): ``forward(..., attention={site: request})`` where a site is the name of a
self-attention module, ``"<block>.attentions.<j>.transformer_blocks.<k>.attn1"`` (``self_attention_sites()``;
``match_layers`` turns diffusers PAG ids such as ``"mid"`` into sites). ``Capture`` returns that module's
softmax probabilities [B_slice, heads, N, N] float32 as an ``AttentionMap`` with the grid's height and width;
``IdentityAttention`` replaces them by the identity (PAG: out = to_out(to_v(x))); ``BlurQueries`` blurs the
queries over the grid (SEG; sigma = inf gives the mean query). Cross-attention (``attn2``) takes no
request. Everything else runs ``F.scaled_dot_product_attention`` (``use_fused_attention(False)`` switches to
the explicit softmax, the same function to float rounding). Nothing is stored on modules between calls.
"""
from __future__ import annotations

import re
from dataclasses import dataclass, fields
from typing import Dict, Iterable, List, Mapping, Optional, Sequence, Tuple, Union

import torch
import torch.nn as nn
import torch.nn.functional as F

from .attention import attend, attention_weights, captured_attention_weights, fused_attention, gaussian_blur_tokens
from .layers import timestep_embedding
from .model import AttentionSiteError, UNetOutput
from .seam import AttentionMap, BlurQueries, Capture, IdentityAttention, apply_on_samples

_DOWN_BLOCKS = {"CrossAttnDownBlock2D": True, "DownBlock2D": False}   # block type -> has attention
_UP_BLOCKS = {"CrossAttnUpBlock2D": True, "UpBlock2D": False}
_MID_BLOCK = "UNetMidBlock2DCrossAttn"

# UNet2DConditionModel options SD 1.x / 2.x never use: the value each must keep (diffusers' "off" default).
_MUST_BE_OFF = {
    "act_fn": "silu", "addition_embed_type": None, "addition_time_embed_dim": None, "attention_type": "default",
    "class_embed_type": None, "class_embeddings_concat": False, "cross_attention_norm": None,
    "dual_cross_attention": False, "encoder_hid_dim": None, "encoder_hid_dim_type": None,
    "mid_block_only_cross_attention": None, "mid_block_type": _MID_BLOCK, "num_class_embeds": None,
    "only_cross_attention": False, "projection_class_embeddings_input_dim": None, "resnet_skip_time_act": False,
    "resnet_time_scale_shift": "default", "reverse_transformer_layers_per_block": None, "time_cond_proj_dim": None,
    "time_embedding_act_fn": None, "time_embedding_dim": None, "time_embedding_type": "positional",
    "timestep_post_act": None,
}
# Options that do not change inference: read and ignored.
_IGNORED = {"_class_name", "_diffusers_version", "_name_or_path", "_use_default_values", "dropout",
            "addition_embed_type_num_heads"}


@dataclass(frozen=True)
class SDUNetConfig:
    """Every structural field of an SD 1.x / 2.x U-Net. ``num_attention_heads`` and
    ``transformer_layers_per_block`` are resolved per down block (up blocks use them reversed, the mid
    block the last entry)."""
    in_channels: int = 4
    out_channels: int = 4
    sample_size: int = 64                        # latent side the model was trained at (512 px / 8 for SD 1.x)
    block_out_channels: Tuple[int, ...] = (320, 640, 1280, 1280)
    down_block_types: Tuple[str, ...] = ("CrossAttnDownBlock2D",) * 3 + ("DownBlock2D",)
    up_block_types: Tuple[str, ...] = ("UpBlock2D",) + ("CrossAttnUpBlock2D",) * 3
    layers_per_block: int = 2
    num_attention_heads: Tuple[int, ...] = (8, 8, 8, 8)
    transformer_layers_per_block: Tuple[int, ...] = (1, 1, 1, 1)
    cross_attention_dim: int = 768
    use_linear_projection: bool = False
    upcast_attention: bool = False
    flip_sin_to_cos: bool = True
    freq_shift: float = 0
    downsample_padding: int = 1
    norm_num_groups: int = 32
    norm_eps: float = 1e-5
    conv_in_kernel: int = 3
    conv_out_kernel: int = 3
    mid_block_scale_factor: float = 1.0
    resnet_out_scale_factor: float = 1.0
    center_input_sample: bool = False
    dropout: float = 0.0

    def __post_init__(self):
        levels = len(self.block_out_channels)
        for name in ("down_block_types", "up_block_types", "num_attention_heads", "transformer_layers_per_block"):
            if len(getattr(self, name)) != levels:
                raise ValueError(f"U-Net config: {name} has {len(getattr(self, name))} entries but block_out_channels "
                                 f"has {levels}; give one per block")
        unknown = [t for t in self.down_block_types if t not in _DOWN_BLOCKS] + \
                  [t for t in self.up_block_types if t not in _UP_BLOCKS]
        if unknown:
            raise ValueError(f"U-Net config: unsupported block type(s) {', '.join(unknown)}; SD 1.x/2.x use "
                             f"{', '.join(_DOWN_BLOCKS)} / {', '.join(_UP_BLOCKS)}")
        for channels, heads in zip(self.block_out_channels, self.num_attention_heads):
            if channels % heads or channels % self.norm_num_groups:
                raise ValueError(f"U-Net config: {channels} channels are not divisible by {heads} heads "
                                 f"and {self.norm_num_groups} norm groups")

    @classmethod
    def from_diffusers(cls, config: Mapping) -> "SDUNetConfig":
        """The ``unet/config.json`` of a diffusers folder (a ``UNet2DConditionModel``) -> config.

        Missing keys take diffusers' defaults; an option SD 1.x / 2.x do not use (class or addition
        embeddings, other block or time-embedding types, ...) -> one-line ValueError naming them.
        """
        config = dict(config)
        class_name = config.get("_class_name", "UNet2DConditionModel")
        if class_name != "UNet2DConditionModel":
            raise ValueError(f"U-Net config: class {class_name!r} is not supported; expected UNet2DConditionModel")
        known = {f.name for f in fields(cls)} | {"attention_head_dim"}
        unsupported = [f"{key}={value!r}" for key, value in config.items()
                       if key in _MUST_BE_OFF and not _is_off(value, _MUST_BE_OFF[key])]
        unsupported += [f"{key}={value!r}" for key, value in config.items()
                        if key not in known and key not in _MUST_BE_OFF and key not in _IGNORED
                        and value not in (None, False)]
        if unsupported:
            raise ValueError(f"U-Net config: option(s) not used by SD 1.x/2.x and not supported: "
                             f"{', '.join(unsupported)}")
        levels = len(config.get("block_out_channels", cls.block_out_channels))
        for key in ("layers_per_block", "cross_attention_dim"):
            if isinstance(config.get(key), (list, tuple)):
                raise ValueError(f"U-Net config: per-block {key} lists are not supported (SD 1.x/2.x use one value)")
        # diffusers' naming bug: attention_head_dim holds the number of heads; num_attention_heads wins if set
        heads = config.get("num_attention_heads") or config.get("attention_head_dim") or 8
        values = {key: config[key] for key in known - {"attention_head_dim"} if key in config}
        values["num_attention_heads"] = _per_block(heads, levels)
        values["transformer_layers_per_block"] = _per_block(config.get("transformer_layers_per_block", 1), levels)
        values["cross_attention_dim"] = config.get("cross_attention_dim", 1280)      # diffusers' default
        if values.get("sample_size") is None:
            values.pop("sample_size", None)
        for key in ("block_out_channels", "down_block_types", "up_block_types"):
            if key in values:
                values[key] = tuple(values[key])
        return cls(**values)


def _is_off(value, off) -> bool:
    if isinstance(value, (list, tuple)):            # e.g. only_cross_attention [false, false, ...]
        return all(_is_off(v, off) for v in value)
    return value == off or (off is False and value is None) or (off is None and value is False)


def _per_block(value: Union[int, Sequence[int]], levels: int) -> Tuple[int, ...]:
    if isinstance(value, (list, tuple)):
        if not all(isinstance(v, int) for v in value):
            raise ValueError(f"U-Net config: nested per-block lists are not supported, got {value!r}")
        return tuple(value)
    return (int(value),) * levels


# -- blocks -------------------------------------------------------------------------------------------

class TimestepEmbedding(nn.Module):
    """temb = linear_2(SiLU(linear_1(sinusoid(t)))): [B] -> [B, 4 C0]."""

    def __init__(self, channels: int, flip_sin_to_cos: bool, freq_shift: float):
        super().__init__()
        self.channels, self.flip_sin_to_cos, self.freq_shift = channels, flip_sin_to_cos, freq_shift
        self.linear_1 = nn.Linear(channels, 4 * channels)
        self.linear_2 = nn.Linear(4 * channels, 4 * channels)

    def forward(self, timesteps: torch.Tensor) -> torch.Tensor:
        t_emb = timestep_embedding(timesteps, self.channels, flip_sin_to_cos=self.flip_sin_to_cos,
                                   freq_shift=self.freq_shift)      # float32, as diffusers computes it
        return self.linear_2(F.silu(self.linear_1(t_emb.to(self.linear_1.weight.dtype))))


class ResnetBlock2D(nn.Module):
    """out = (conv_shortcut(x) + conv2(drop(SiLU(norm2(conv1(SiLU(norm1(x))) + time_emb_proj(SiLU(temb))))))) / scale.
    x [B, C_in, H, W], temb [B, E] -> [B, C_out, H, W]. ``temb_channels=None`` (the VAE, ``unet.sd_vae``):
    no ``time_emb_proj`` and no temb term, as diffusers' ResnetBlock2D."""

    def __init__(self, in_channels: int, out_channels: int, temb_channels: Optional[int], groups: int, eps: float,
                 dropout: float, output_scale_factor: float):
        super().__init__()
        self.norm1 = nn.GroupNorm(groups, in_channels, eps=eps)
        self.conv1 = nn.Conv2d(in_channels, out_channels, 3, padding=1)
        self.time_emb_proj = nn.Linear(temb_channels, out_channels) if temb_channels is not None else None
        self.norm2 = nn.GroupNorm(groups, out_channels, eps=eps)
        self.dropout = nn.Dropout(dropout)
        self.conv2 = nn.Conv2d(out_channels, out_channels, 3, padding=1)
        self.conv_shortcut = nn.Conv2d(in_channels, out_channels, 1) if in_channels != out_channels else None
        self.output_scale_factor = output_scale_factor

    def forward(self, x: torch.Tensor, temb: Optional[torch.Tensor] = None) -> torch.Tensor:
        h = self.conv1(F.silu(self.norm1(x)))
        if self.time_emb_proj is not None:
            h = h + self.time_emb_proj(F.silu(temb))[:, :, None, None]
        h = self.conv2(self.dropout(F.silu(self.norm2(h))))
        skip = self.conv_shortcut(x) if self.conv_shortcut is not None else x
        return (skip + h) / self.output_scale_factor


class Downsample2D(nn.Module):
    """Stride-2 3x3 conv; ``padding`` 0 pads one zero row/column at the bottom/right first (diffusers)."""

    def __init__(self, channels: int, padding: int):
        super().__init__()
        self.padding = padding
        self.conv = nn.Conv2d(channels, channels, 3, stride=2, padding=padding)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.padding == 0:
            x = F.pad(x, (0, 1, 0, 1))
        return self.conv(x)


class Upsample2D(nn.Module):
    """Nearest-neighbour x2, then a 3x3 conv."""

    def __init__(self, channels: int):
        super().__init__()
        self.conv = nn.Conv2d(channels, channels, 3, padding=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.conv(F.interpolate(x, scale_factor=2.0, mode="nearest"))


def _to_heads(t: torch.Tensor, heads: int) -> torch.Tensor:
    """[b, N, heads*d] -> [(b heads), d, N] in the layout of unet/attention.py's helpers (a transposed view of a
    contiguous [(b heads), N, d], so the fused kernel gets contiguous rows without another copy)."""
    b, n, inner = t.shape
    return t.reshape(b, n, heads, inner // heads).transpose(1, 2).reshape(b * heads, n, inner // heads).transpose(1, 2)


def _from_heads(a: torch.Tensor, batch: int) -> torch.Tensor:
    """[(b heads), d, N] -> [b, N, heads*d]."""
    bh, d, n = a.shape
    return a.reshape(batch, bh // batch, d, n).permute(0, 3, 1, 2).reshape(batch, n, -1)


class Attention(nn.Module):
    """Multi-head attention with diffusers' parameter names (``to_q``, ``to_k``, ``to_v``, ``to_out.0``).

    Self-attention (``context=None``) takes a seam request; cross-attention attends to the text states.
    x [B, N, C], context [B, L, D] -> ([B, N, C], AttentionMap or None).
    """

    def __init__(self, query_dim: int, heads: int, context_dim: Optional[int], upcast: bool, dropout: float):
        super().__init__()
        self.heads = heads
        self.is_cross_attention = context_dim is not None
        self.upcast = upcast            # q k^T in float32 on the explicit path (softmax is float32 always)
        self.fused = True               # set by SDUNet.use_fused_attention(); a construction-time choice
        kv_dim = context_dim if context_dim is not None else query_dim
        self.to_q = nn.Linear(query_dim, query_dim, bias=False)
        self.to_k = nn.Linear(kv_dim, query_dim, bias=False)
        self.to_v = nn.Linear(kv_dim, query_dim, bias=False)
        self.to_out = nn.ModuleList([nn.Linear(query_dim, query_dim), nn.Dropout(dropout)])

    def _attend(self, q, k, v, request, grid: Tuple[int, int]) -> Tuple[torch.Tensor, Optional[AttentionMap]]:
        """One batch (slice): q [b, N, C], k, v [b, S, C] -> [b, N, C] through the op the request names."""
        batch = q.shape[0]
        if isinstance(request, IdentityAttention):
            return v, None                                   # A = I: each token keeps its own value
        q, k, v = (_to_heads(t, self.heads) for t in (q, k, v))
        if isinstance(request, BlurQueries):
            q = gaussian_blur_tokens(q, batch, grid[0], grid[1], request.sigma, request.kernel_size)
        if self.fused and not isinstance(request, Capture):
            return _from_heads(fused_attention(q, k, v), batch), None
        if isinstance(request, Capture):                     # a map someone reads: float32 logits, also under autocast
            weights = captured_attention_weights(q, k)       # [(b heads), N, S] float32
            attention_map = AttentionMap(weights.reshape(batch, self.heads, *weights.shape[1:]), grid[0], grid[1])
            return _from_heads(attend(weights, v), batch), attention_map
        if self.upcast:
            q, k = q.float(), k.float()
        return _from_heads(attend(attention_weights(q, k), v), batch), None

    def forward(self, x: torch.Tensor, context: Optional[torch.Tensor] = None, request=None,
                grid: Tuple[int, int] = (0, 0)) -> Tuple[torch.Tensor, Optional[AttentionMap]]:
        assert (context is None) != self.is_cross_attention, "cross-attention needs the context, self-attention none"
        assert request is None or not self.is_cross_attention, "cross-attention takes no seam request"
        source = x if context is None else context
        q, k, v = self.to_q(x), self.to_k(source), self.to_v(source)
        out, attention_map = apply_on_samples(
            lambda rows, rows_request: self._attend(q[rows], k[rows], v[rows], rows_request, grid), request, x.shape[0])
        return self.to_out[1](self.to_out[0](out)), attention_map


class GEGLU(nn.Module):
    """a, g = proj(x).chunk(2); a * GELU(g) (exact erf GELU): [..., C] -> [..., inner]."""

    def __init__(self, dim: int, inner: int):
        super().__init__()
        self.proj = nn.Linear(dim, 2 * inner)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        a, gate = self.proj(x).chunk(2, dim=-1)
        return a * F.gelu(gate)


class FeedForward(nn.Module):
    """net = [GEGLU(C -> 4C), Dropout, Linear(4C -> C)]."""

    def __init__(self, dim: int, dropout: float):
        super().__init__()
        self.net = nn.ModuleList([GEGLU(dim, 4 * dim), nn.Dropout(dropout), nn.Linear(4 * dim, dim)])

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        for layer in self.net:
            x = layer(x)
        return x


class BasicTransformerBlock(nn.Module):
    """x += attn1(LN1(x)); x += attn2(LN2(x), context); x += ff(LN3(x)).  x [B, N, C] -> same.

    ``site`` is attn1's module name in the whole U-Net (the seam's address for this block), fixed at construction.
    """

    def __init__(self, dim: int, heads: int, context_dim: int, upcast: bool, dropout: float, site: str):
        super().__init__()
        self.site = site
        self.norm1 = nn.LayerNorm(dim)
        self.attn1 = Attention(dim, heads, None, upcast, dropout)
        self.norm2 = nn.LayerNorm(dim)
        self.attn2 = Attention(dim, heads, context_dim, upcast, dropout)
        self.norm3 = nn.LayerNorm(dim)
        self.ff = FeedForward(dim, dropout)

    def forward(self, x, context, request, grid) -> Tuple[torch.Tensor, Optional[AttentionMap]]:
        a, attention_map = self.attn1(self.norm1(x), None, request, grid)
        x = x + a
        x = x + self.attn2(self.norm2(x), context)[0]
        return x + self.ff(self.norm3(x)), attention_map


class SpatialTransformer(nn.Module):
    """diffusers' ``Transformer2DModel`` as SD uses it: x + proj_out(blocks(proj_in(GroupNorm(x)))).
    proj_in/out are 1x1 convs (SD 1.x) or linear layers (SD 2.x, ``use_linear_projection``).
    x [B, C, H, W], context [B, L, D] -> [B, C, H, W] and the maps asked for (site -> map)."""

    def __init__(self, channels: int, heads: int, layers: int, context_dim: int, groups: int, linear: bool,
                 upcast: bool, dropout: float, name: str):
        super().__init__()
        self.linear = linear
        self.norm = nn.GroupNorm(groups, channels, eps=1e-6)
        self.proj_in = nn.Linear(channels, channels) if linear else nn.Conv2d(channels, channels, 1)
        self.transformer_blocks = nn.ModuleList([
            BasicTransformerBlock(channels, heads, context_dim, upcast, dropout, f"{name}.transformer_blocks.{k}.attn1")
            for k in range(layers)])
        self.proj_out = nn.Linear(channels, channels) if linear else nn.Conv2d(channels, channels, 1)

    def forward(self, x, context, attention: Mapping, maps: Dict[str, AttentionMap]) -> torch.Tensor:
        batch, channels, height, width = x.shape
        h = self.norm(x)
        if not self.linear:
            h = self.proj_in(h)
        h = h.permute(0, 2, 3, 1).reshape(batch, height * width, channels)      # token n = pixel (n // W, n % W)
        if self.linear:
            h = self.proj_in(h)
        for block in self.transformer_blocks:
            h, attention_map = block(h, context, attention.get(block.site), (height, width))
            if attention_map is not None:
                maps[block.site] = attention_map
        if self.linear:
            h = self.proj_out(h)
        h = h.reshape(batch, height, width, channels).permute(0, 3, 1, 2).contiguous()
        if not self.linear:
            h = self.proj_out(h)
        return x + h


class DownBlock(nn.Module):
    """``CrossAttnDownBlock2D`` (with ``attentions``) or ``DownBlock2D``: resnets [+ attention] each, then a
    downsampler unless last. Returns h and every output the up path takes as a skip."""

    def __init__(self, resnets, attentions, downsample: Optional[nn.Module]):
        super().__init__()
        self.resnets = nn.ModuleList(resnets)
        self.attentions = nn.ModuleList(attentions)          # empty for DownBlock2D
        self.downsamplers = nn.ModuleList([downsample]) if downsample is not None else None

    def forward(self, h, temb, context, attention, maps) -> Tuple[torch.Tensor, List[torch.Tensor]]:
        skips = []
        for j, resnet in enumerate(self.resnets):
            h = resnet(h, temb)
            if self.attentions:
                h = self.attentions[j](h, context, attention, maps)
            skips.append(h)
        if self.downsamplers is not None:
            h = self.downsamplers[0](h)
            skips.append(h)
        return h, skips


class MidBlock(nn.Module):
    """``UNetMidBlock2DCrossAttn``: resnets.0, attentions.0, resnets.1."""

    def __init__(self, resnets, attentions):
        super().__init__()
        self.resnets = nn.ModuleList(resnets)
        self.attentions = nn.ModuleList(attentions)

    def forward(self, h, temb, context, attention, maps) -> torch.Tensor:
        h = self.resnets[0](h, temb)
        for attn, resnet in zip(self.attentions, self.resnets[1:]):
            h = resnet(attn(h, context, attention, maps), temb)
        return h


class UpBlock(nn.Module):
    """``CrossAttnUpBlock2D`` / ``UpBlock2D``: per resnet, h = [h | skip] -> resnet [-> attention]; then an
    upsampler unless last."""

    def __init__(self, resnets, attentions, upsample: Optional[nn.Module]):
        super().__init__()
        self.resnets = nn.ModuleList(resnets)
        self.attentions = nn.ModuleList(attentions)
        self.upsamplers = nn.ModuleList([upsample]) if upsample is not None else None

    def forward(self, h, skips: List[torch.Tensor], temb, context, attention, maps) -> torch.Tensor:
        for j, resnet in enumerate(self.resnets):
            h = resnet(torch.cat([h, skips.pop()], dim=1), temb)
            if self.attentions:
                h = self.attentions[j](h, context, attention, maps)
        if self.upsamplers is not None:
            h = self.upsamplers[0](h)
        return h


# -- the U-Net --------------------------------------------------------------------------------------

_LEGACY_PAG_ID = re.compile(r"(down|mid|up)\.block_\d+(\.attentions_\d+)?")


class SDUNet(nn.Module):
    """eps_theta(z_t, t, c) of SD 1.x / 2.x: [B, in_channels, h, w] -> [B, out_channels, h, w] (h, w divisible
    by 2^(number of down blocks - 1))."""

    def __init__(self, config: SDUNetConfig):
        super().__init__()
        self.config = c = config
        temb_channels = 4 * c.block_out_channels[0]
        groups, eps, drop = c.norm_num_groups, c.norm_eps, c.dropout

        def resnet(cin, cout, scale=c.resnet_out_scale_factor):
            return ResnetBlock2D(cin, cout, temb_channels, groups, eps, drop, scale)

        def transformer(channels, heads, layers, name):
            return SpatialTransformer(channels, heads, layers, c.cross_attention_dim, groups,
                                      c.use_linear_projection, c.upcast_attention, drop, name)

        self.conv_in = nn.Conv2d(c.in_channels, c.block_out_channels[0], c.conv_in_kernel,
                                 padding=(c.conv_in_kernel - 1) // 2)
        self.time_embedding = TimestepEmbedding(c.block_out_channels[0], c.flip_sin_to_cos, c.freq_shift)
        levels = len(c.block_out_channels)
        down = []
        out_ch = c.block_out_channels[0]
        for i, block_type in enumerate(c.down_block_types):
            in_ch, out_ch = out_ch, c.block_out_channels[i]
            resnets = [resnet(in_ch if j == 0 else out_ch, out_ch) for j in range(c.layers_per_block)]
            attentions = [transformer(out_ch, c.num_attention_heads[i], c.transformer_layers_per_block[i],
                                      f"down_blocks.{i}.attentions.{j}")
                          for j in range(c.layers_per_block)] if _DOWN_BLOCKS[block_type] else []
            last = i == levels - 1
            down.append(DownBlock(resnets, attentions, None if last else Downsample2D(out_ch, c.downsample_padding)))
        self.down_blocks = nn.ModuleList(down)
        top = c.block_out_channels[-1]
        self.mid_block = MidBlock(
            [resnet(top, top, c.mid_block_scale_factor), resnet(top, top, c.mid_block_scale_factor)],
            [transformer(top, c.num_attention_heads[-1], c.transformer_layers_per_block[-1], "mid_block.attentions.0")])
        up = []
        reversed_channels = list(reversed(c.block_out_channels))
        reversed_heads = list(reversed(c.num_attention_heads))
        reversed_layers = list(reversed(c.transformer_layers_per_block))
        out_ch = reversed_channels[0]
        for i, block_type in enumerate(c.up_block_types):
            prev_ch, out_ch = out_ch, reversed_channels[i]
            skip_in_ch = reversed_channels[min(i + 1, levels - 1)]      # the down level below this one
            count = c.layers_per_block + 1
            resnets = [resnet((prev_ch if j == 0 else out_ch) + (skip_in_ch if j == count - 1 else out_ch), out_ch)
                       for j in range(count)]
            attentions = [transformer(out_ch, reversed_heads[i], reversed_layers[i], f"up_blocks.{i}.attentions.{j}")
                          for j in range(count)] if _UP_BLOCKS[block_type] else []
            last = i == levels - 1
            up.append(UpBlock(resnets, attentions, None if last else Upsample2D(out_ch)))
        self.up_blocks = nn.ModuleList(up)
        self.conv_norm_out = nn.GroupNorm(groups, c.block_out_channels[0], eps=eps)
        self.conv_out = nn.Conv2d(c.block_out_channels[0], c.out_channels, c.conv_out_kernel,
                                  padding=(c.conv_out_kernel - 1) // 2)
        self._sites = tuple(m.site for m in self.modules() if isinstance(m, BasicTransformerBlock))   # fixed names

    # -- properties the pipeline reads ------------------------------------------------------------------

    @property
    def in_channels(self) -> int:
        return self.config.in_channels

    @property
    def out_channels(self) -> int:
        return self.config.out_channels

    @property
    def sample_size(self) -> int:
        return self.config.sample_size

    @property
    def downsample_factor(self) -> int:
        """Latent height and width must be multiples of this (2 per downsampler)."""
        return 2 ** (len(self.config.block_out_channels) - 1)

    def use_fused_attention(self, enabled: bool = True) -> "SDUNet":
        """Default on (as diffusers): every attention without a Capture request runs
        ``F.scaled_dot_product_attention``; off: the explicit softmax everywhere (same function to rounding)."""
        for module in self.modules():
            if isinstance(module, Attention):
                module.fused = bool(enabled)
        return self

    # -- the attention seam -------------------------------------------------------------------------------

    def self_attention_sites(self) -> Tuple[str, ...]:
        """Every self-attention module name, in forward order (down blocks, mid block, up blocks)."""
        return self._sites

    @property
    def sag_site(self) -> str:
        """The self-attention diffusers' SAG pipeline reads: the mid block's first transformer block."""
        return self.mid_block.attentions[0].transformer_blocks[0].site

    def match_layers(self, layer_ids: Union[str, Iterable[str]]) -> Tuple[str, ...]:
        """PAG ``pag_applied_layers`` ids -> self-attention sites (model order, each once), as diffusers matches them.

        * diffusers >= 0.30 (``pipelines/pag/pag_utils.py``): an id is a regular expression; it selects every
          self-attention module whose name it ``re.search``-es ("." is a wildcard): ``"mid"`` -> the mid block's
          attn1, ``"up_blocks.1"`` -> every attn1 of up_blocks.1, an exact site name -> that site. (Its
          "fake integral match" exclusion compares the name's last component, ``attn1`` here, so never applies.)
        * the first PAG release's ids ``"<down|mid|up>.block_<i>[.attentions_<j>]"`` (no module name contains
          them as a regex, so they are read structurally): block type, block index (the mid block is
          ``block_0``) and attention index of the site.

        An id that selects nothing -> one-line ValueError listing the valid ids.
        """
        if isinstance(layer_ids, str):
            layer_ids = [layer_ids]
        sites = self.self_attention_sites()
        selected = set()
        for layer_id in layer_ids:
            if not isinstance(layer_id, str):
                raise ValueError(f"PAG layer ids are strings, got {layer_id!r}")
            if _LEGACY_PAG_ID.fullmatch(layer_id):
                matched = [s for s in sites if layer_id in _legacy_ids(s)]
            else:
                try:
                    pattern = re.compile(layer_id)
                except re.error as error:
                    raise ValueError(f"PAG layer id {layer_id!r} is not a valid regular expression ({error})") from None
                matched = [s for s in sites if pattern.search(s)]
            if not matched:
                legacy = sorted({i for s in sites for i in _legacy_ids(s)}, key=lambda i: (len(i.split(".")), i))
                hint = " (cross-attention attn2 is never perturbed)" if "attn2" in layer_id else ""
                raise ValueError(f"PAG layer id {layer_id!r} matches no self-attention of this U-Net{hint}; valid ids: "
                                 f"{', '.join(legacy)}, or a regular expression over the sites {', '.join(sites)}")
            selected.update(matched)
        return tuple(s for s in sites if s in selected)

    def _check_requests(self, attention: Mapping) -> None:
        sites = self.self_attention_sites()
        for site, request in attention.items():
            if site not in sites:
                if site.endswith(".attn2") and site[:-1] + "1" in sites:
                    raise AttentionSiteError(f"{site!r} is a cross-attention; only self-attention (attn1) sites take "
                                             f"attention requests")
                raise AttentionSiteError(f"no self-attention site {site!r} (layer ids such as 'mid' go through "
                                         f"match_layers); this U-Net's sites: {', '.join(sites)}")
            if not isinstance(request, (Capture, IdentityAttention, BlurQueries)):
                raise TypeError(f"attention[{site!r}] must be Capture, IdentityAttention or BlurQueries from "
                                f"unet.seam, got {request!r}")

    # -- forward ------------------------------------------------------------------------------------------

    def forward(self, sample: torch.Tensor, timestep, encoder_hidden_states: torch.Tensor,
                attention: Optional[Mapping[str, object]] = None) -> UNetOutput:
        """sample [B, in_channels, h, w]; timestep a number, a 0-d or a [B] tensor (int or float);
        encoder_hidden_states [B, L, cross_attention_dim]; attention {site: request}.
        Returns UNetOutput(output [B, out_channels, h, w] in sample's dtype, {site: AttentionMap})."""
        c = self.config
        if sample.dim() != 4 or sample.shape[1] != c.in_channels:
            raise ValueError(f"sample must be [B, {c.in_channels}, h, w], got {tuple(sample.shape)}")
        batch, _, height, width = sample.shape
        factor = self.downsample_factor
        if height % factor or width % factor:
            raise ValueError(f"latent size {height}x{width} is not divisible by {factor} (the U-Net halves it "
                             f"{factor.bit_length() - 1} times); use a latent size that is a multiple of {factor}")
        if encoder_hidden_states.dim() != 3 or encoder_hidden_states.shape[0] != batch \
                or encoder_hidden_states.shape[2] != c.cross_attention_dim:
            raise ValueError(f"encoder_hidden_states must be [{batch}, L, {c.cross_attention_dim}], "
                             f"got {tuple(encoder_hidden_states.shape)}")
        timesteps = torch.as_tensor(timestep, device=sample.device)
        if timesteps.dim() == 0:
            timesteps = timesteps.expand(batch)
        if timesteps.shape != (batch,):
            raise ValueError(f"timestep must be a number, a 0-d or a [{batch}] tensor, "
                             f"got shape {tuple(timesteps.shape)}")
        attention = dict(attention or {})
        self._check_requests(attention)

        dtype = self.conv_in.weight.dtype
        x = sample.to(dtype)
        if c.center_input_sample:
            x = 2 * x - 1.0
        context = encoder_hidden_states.to(dtype)
        temb = self.time_embedding(timesteps)
        maps: Dict[str, AttentionMap] = {}
        h = self.conv_in(x)
        skips = [h]
        for block in self.down_blocks:
            h, block_skips = block(h, temb, context, attention, maps)
            skips.extend(block_skips)
        h = self.mid_block(h, temb, context, attention, maps)
        for block in self.up_blocks:
            h = block(h, skips, temb, context, attention, maps)
        out = self.conv_out(F.silu(self.conv_norm_out(h)))
        return UNetOutput(out.to(sample.dtype), maps)


def _legacy_ids(site: str) -> Tuple[str, str, str]:
    """The first PAG release's ids that select ``site``: type, type.block_i, type.block_i.attentions_j."""
    parts = site.split(".")
    block_type = parts[0].split("_")[0]                     # down_blocks -> down, mid_block -> mid
    if parts[0] == "mid_block":
        block, attention = "block_0", f"attentions_{parts[2]}"
    else:
        block, attention = f"block_{parts[1]}", f"attentions_{parts[3]}"
    return block_type, f"{block_type}.{block}", f"{block_type}.{block}.{attention}"
