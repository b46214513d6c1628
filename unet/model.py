"""The ADM / IDDPM U-Net (openai/guided-diffusion ``UNetModel``, ``SuperResModel``;
openai/improved-diffusion ``UNetModel``) with the attention seam.

Layout, with the official indices that name the attention sites::

    encoder[0]            input conv                          (official input_blocks[0])
    encoder[i], i >= 1    ResBlock [+ attention]  or  a downsampling step   (input_blocks[i])
    middle                ResBlock, attention, ResBlock       (middle_block)
    decoder[i]            ResBlock on [h | skip] [+ attention] [+ upsampling]  (output_blocks[i])
    out_norm, out_conv    GroupNorm, SiLU, 3x3 conv           (out.0, out.2)

``forward(x, timesteps, y=None, *, low_res=None, attention=None, copies=1)`` always returns
``UNetOutput(output, attention_maps)``; ``attention`` maps site names (``"input.4"``, ``"middle"``,
``"output.2"``) to requests from ``unet.seam`` and ``attention_maps`` holds one ``AttentionMap`` per
capture request (empty when nothing was asked). The model keeps no state between calls.
"""
from __future__ import annotations

import contextlib
from dataclasses import dataclass
from typing import Dict, Iterator, List, Mapping, NamedTuple, Optional

import torch
import torch.nn as nn
import torch.nn.functional as F

from .attention import AttentionBlock
from .config import UNetConfig
from .layers import Downsample, GroupNorm32, ResBlock, Upsample, timestep_embedding
from .seam import AttentionMap, AttentionRequest


class AttentionSiteError(ValueError):
    """An attention request names a site that does not exist or has no attention (one line)."""


class UNetOutput(NamedTuple):
    output: torch.Tensor                       # [B x out_channels x H x W]
    attention_maps: Dict[str, AttentionMap]    # one entry per Capture / OfficialCapture request


@dataclass(frozen=True)
class AttentionSite:
    name: str            # "input.N" | "middle" | "output.N"
    official_module: str  # e.g. "output_blocks.2.1"
    resolution: int      # grid side at the configured image size
    channels: int
    heads: int
    layout: str          # "legacy" | "new"


class TimeEmbedding(nn.Module):
    """emb = fc2(SiLU(fc1(sinusoid(t)))), [B] -> [B x 4C] (official ``time_embed``)."""

    def __init__(self, model_channels: int):
        super().__init__()
        self.model_channels = model_channels
        self.fc1 = nn.Linear(model_channels, 4 * model_channels)
        self.fc2 = nn.Linear(4 * model_channels, 4 * model_channels)

    def forward(self, timesteps: torch.Tensor) -> torch.Tensor:
        t_emb = timestep_embedding(timesteps, self.model_channels).to(self.fc1.weight.dtype)
        return self.fc2(F.silu(self.fc1(t_emb)))


class UNetBlock(nn.Module):
    """One official ``TimestepEmbedSequential`` step: [res] [attn] [resample]; each part optional."""

    def __init__(self, res: Optional[ResBlock] = None, attn: Optional[AttentionBlock] = None,
                 resample: Optional[nn.Module] = None):
        super().__init__()
        self.res, self.attn, self.resample = res, attn, resample

    def forward(self, h, emb, request=None):
        attention_map = None
        if self.res is not None:
            h = self.res(h, emb)
        if self.attn is not None:
            h, attention_map = self.attn(h, request)
        if self.resample is not None:
            h = self.resample(h, emb) if isinstance(self.resample, ResBlock) else self.resample(h)
        return h, attention_map


class MiddleBlock(nn.Module):
    def __init__(self, res1: ResBlock, attn: AttentionBlock, res2: ResBlock):
        super().__init__()
        self.res1, self.attn, self.res2 = res1, attn, res2

    def forward(self, h, emb, request=None):
        h, attention_map = self.attn(self.res1(h, emb), request)
        return self.res2(h, emb), attention_map


def build_encoder(c, emb_channels: int):
    """The official encoder of both ``UNetModel`` and ``EncoderUNetModel`` from a config with the
    shared fields (model_channels, channel_mult, num_res_blocks, attention_resolutions, heads, ...).

    Returns (res_block_factory, input_conv, encoder blocks, skip channels per block, final channels,
    final downsample factor). Block i+1 of the list is official ``input_blocks[i+1]``.
    """
    heads = dict(num_heads=c.num_heads, num_head_channels=c.num_head_channels,
                 use_new_attention_order=c.use_new_attention_order)
    attention_factors = {c.image_size // r for r in c.attention_resolutions}
    res = lambda cin, cout, resample=None: ResBlock(  # noqa: E731
        cin, emb_channels, c.dropout, cout, c.use_scale_shift_norm, resample)
    ch = int(c.channel_mult[0] * c.model_channels)
    in_channels = 2 * c.in_channels if getattr(c, "super_res", False) else c.in_channels
    input_conv = nn.Conv2d(in_channels, ch, 3, padding=1)
    blocks: List[UNetBlock] = []
    skip_channels = [ch]
    factor = 1
    for level, mult in enumerate(c.channel_mult):
        for _ in range(c.num_res_blocks):
            width = int(mult * c.model_channels)
            attn = AttentionBlock(width, **heads) if factor in attention_factors else None
            blocks.append(UNetBlock(res=res(ch, width), attn=attn))
            ch = width
            skip_channels.append(ch)
        if level != len(c.channel_mult) - 1:
            down = res(ch, ch, "down") if c.resblock_updown else Downsample(ch, c.conv_resample)
            blocks.append(UNetBlock(resample=down))
            skip_channels.append(ch)
            factor *= 2
    return res, input_conv, blocks, skip_channels, ch, factor


class UNet(nn.Module):
    """eps_theta(x_t, t[, y]) (and the variance values when learned): [B x C x H x W] -> [B x C' x H x W]."""

    def __init__(self, config: UNetConfig):
        super().__init__()
        self.config = c = config
        emb_channels = 4 * c.model_channels
        heads = dict(num_heads=c.num_heads, num_head_channels=c.num_head_channels,
                     use_new_attention_order=c.use_new_attention_order)
        heads_up = dict(heads, num_heads=c.num_heads_upsample if c.num_heads_upsample != -1 else c.num_heads)
        attention_factors = {c.image_size // r for r in c.attention_resolutions}

        self.time_embed = TimeEmbedding(c.model_channels)
        self.label_embed = nn.Embedding(c.num_classes, emb_channels) if c.num_classes else None
        res, self.input_conv, encoder, skip_channels, ch, factor = build_encoder(c, emb_channels)
        input_ch = self.input_conv.out_channels
        self.encoder = nn.ModuleList(encoder)       # official input_blocks[1:]
        self.middle = MiddleBlock(res(ch, ch), AttentionBlock(ch, **heads), res(ch, ch))
        decoder: List[UNetBlock] = []
        for level, mult in reversed(list(enumerate(c.channel_mult))):
            for i in range(c.num_res_blocks + 1):
                width = int(mult * c.model_channels)
                block_res = res(ch + skip_channels.pop(), width)
                ch = width
                attn = AttentionBlock(ch, **heads_up) if factor in attention_factors else None
                up = None
                if level and i == c.num_res_blocks:
                    up = res(ch, ch, "up") if c.resblock_updown else Upsample(ch, c.conv_resample)
                    factor //= 2
                decoder.append(UNetBlock(res=block_res, attn=attn, resample=up))
        self.decoder = nn.ModuleList(decoder)       # official output_blocks
        self.out_norm = GroupNorm32(ch)
        self.out_conv = nn.Conv2d(input_ch, c.out_channels, 3, padding=1)

    def use_fused_attention(self, enabled: bool = True) -> "UNet":
        """Run blocks without a capture request through ``F.scaled_dot_product_attention``.

        Default off: the explicit official einsums are bit-identical to the official U-Net; the fused
        kernel equals them to float rounding and saves the T x T matrices (see unet/attention.py).
        """
        for module in self.modules():
            if isinstance(module, AttentionBlock):
                module.fused = bool(enabled)
        return self

    @contextlib.contextmanager
    def fused_attention(self, enabled: bool = True) -> Iterator["UNet"]:
        """``use_fused_attention(enabled)`` for the body of a ``with`` block, then every attention block's
        previous setting back (``sag.sample(fast=True)`` runs its loop inside one)."""
        blocks = [m for m in self.modules() if isinstance(m, AttentionBlock)]
        saved = [block.fused for block in blocks]
        self.use_fused_attention(enabled)
        try:
            yield self
        finally:
            for block, fused in zip(blocks, saved):
                block.fused = fused

    # -- the attention seam -------------------------------------------------------------------

    def _attention_modules(self):
        """(site name, official module name, block, resolution) for every attention block."""
        size = self.config.image_size
        factor = 1
        for i, block in enumerate(self.encoder, start=1):
            if block.attn is not None:
                yield f"input.{i}", f"input_blocks.{i}.1", block.attn, size // factor
            if block.res is None:
                factor *= 2
        yield "middle", "middle_block.1", self.middle.attn, size // factor
        for i, block in enumerate(self.decoder):
            if block.attn is not None:
                yield f"output.{i}", f"output_blocks.{i}.1", block.attn, size // factor
            if block.resample is not None:
                factor //= 2

    def attention_sites(self) -> List[AttentionSite]:
        """Every attention block, with its grid side at ``image_size``, channels, heads and layout."""
        return [AttentionSite(name, official, resolution, attn.channels, attn.num_heads, attn.layout)
                for name, official, attn, resolution in self._attention_modules()]

    def check_attention_sites(self, sites) -> None:
        """Raise one ``AttentionSiteError`` line if any requested site has no attention block."""
        valid = [name for name, *_ in self._attention_modules()]
        unknown = [s for s in sites if s not in valid]
        if unknown:
            raise AttentionSiteError(
                f"no attention block at site(s) {', '.join(map(repr, unknown))}; this U-Net has attention at: {', '.join(valid)}")

    # -- forward -------------------------------------------------------------------------------

    def forward(self, x: torch.Tensor, timesteps: torch.Tensor, y: Optional[torch.Tensor] = None, *,
                low_res: Optional[torch.Tensor] = None,
                attention: Optional[Mapping[str, object]] = None, copies: int = 1) -> UNetOutput:
        """eps_theta and the maps asked for. ``copies`` = n evaluates the batch n times, as one batch of
        nB (copy k = rows [kB, (k+1)B); requests address copies by their ``samples`` slices): equal to
        ``forward(cat([x] * n), t.repeat(n), y.repeat(n))``, but every layer before the first attention
        request runs once on B rows (PAG / SEG: the passes on one x_t agree until the first perturbed block)."""
        c = self.config
        batch = x.shape[0]
        assert copies >= 1, f"copies must be >= 1, got {copies}"
        assert x.dim() == 4 and x.shape[1] == c.in_channels, \
            f"x must be [B x {c.in_channels} x H x W], got {tuple(x.shape)}"
        assert timesteps.shape == (batch,), f"timesteps must be [{batch}], got {tuple(timesteps.shape)}"
        assert (y is not None) == (self.label_embed is not None), \
            "class labels y must be given if and only if the model is class-conditional"
        attention = dict(attention or {})
        if attention:
            self.check_attention_sites(attention)
            for site, request in attention.items():
                if not isinstance(request, AttentionRequest):
                    raise TypeError(f"attention[{site!r}] must be a request from unet.seam, got {request!r}")
        if c.super_res:
            assert low_res is not None, "a super-resolution U-Net needs low_res"
            x = torch.cat([x, F.interpolate(low_res, x.shape[2:], mode="bilinear")], dim=1)

        emb = self.time_embed(timesteps)
        if self.label_embed is not None:
            assert y.shape == (batch,), f"y must be [{batch}], got {tuple(y.shape)}"
            emb = emb + self.label_embed(y)
        maps: Dict[str, AttentionMap] = {}
        shared = copies > 1                 # rows still identical in every copy, kept once

        def request_at(site: str):
            """The site's request; the copies part ways at the first request: replicate what they share."""
            nonlocal h, emb, skips, shared
            request = attention.get(site)
            if shared and request is not None:
                h, emb, *skips = (torch.cat([v] * copies) for v in (h, emb, *skips))
                shared = False
            return request

        h = self.input_conv(x.to(self.input_conv.weight.dtype))
        skips = [h]
        # (request_at runs before h, emb, skips are read: it may replicate them)
        for i, block in enumerate(self.encoder, start=1):
            request = request_at(f"input.{i}")
            h, m = block(h, emb, request)
            if m is not None:
                maps[f"input.{i}"] = m
            skips.append(h)
        request = request_at("middle")
        h, m = self.middle(h, emb, request)
        if m is not None:
            maps["middle"] = m
        for i, block in enumerate(self.decoder):
            request = request_at(f"output.{i}")
            h, m = block(torch.cat([h, skips.pop()], dim=1), emb, request)
            if m is not None:
                maps[f"output.{i}"] = m
        out = self.out_conv(F.silu(self.out_norm(h)))
        if shared:
            out = torch.cat([out] * copies)
        return UNetOutput(out.to(x.dtype), maps)
