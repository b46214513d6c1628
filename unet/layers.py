"""Building blocks of the ADM / IDDPM U-Net: timestep embedding, float32 GroupNorm, ResBlock,
Downsample, Upsample.

Equivalent, function for function, to openai/guided-diffusion ``guided_diffusion/nn.py`` and
``unet.py`` (commit 22e0df8) and openai/improved-diffusion ``unet.py``; the parameter names are our
own readable ones (``checkpoints_convert.keymap`` maps the official names onto them).
"""
from __future__ import annotations

import math
from typing import Optional

import torch
import torch.nn as nn
import torch.nn.functional as F


def timestep_embedding(timesteps: torch.Tensor, dim: int, max_period: float = 10000.0, *,
                       flip_sin_to_cos: bool = True, freq_shift: float = 0) -> torch.Tensor:
    """Sinusoidal embedding of (possibly fractional) timesteps; ADM order [cos | sin] by default.

    freqs_i = exp(-ln(max_period) * i / (half - freq_shift)), i = 0..half-1;
    emb = [cos(t * freqs), sin(t * freqs)], or [sin | cos] with ``flip_sin_to_cos=False``
    (diffusers' ``Timesteps(flip_sin_to_cos, downscale_freq_shift)``; SD uses True, 0 = the ADM form).
    timesteps: [B] (int or float) -> [B x dim] float32.
    """
    assert timesteps.dim() == 1, f"timesteps must be 1-D, got shape {tuple(timesteps.shape)}"
    half = dim // 2
    freqs = torch.exp(-math.log(max_period) * torch.arange(half, dtype=torch.float32, device=timesteps.device)
                      / (half - freq_shift))
    args = timesteps[:, None].float() * freqs[None]
    pair = [torch.cos(args), torch.sin(args)] if flip_sin_to_cos else [torch.sin(args), torch.cos(args)]
    embedding = torch.cat(pair, dim=-1)
    if dim % 2:
        embedding = torch.cat([embedding, torch.zeros_like(embedding[:, :1])], dim=-1)
    return embedding


class GroupNorm32(nn.GroupNorm):
    """GroupNorm(32, C) computed in float32 whatever the activations' dtype (ADM's ``normalization``)."""

    def __init__(self, channels: int):
        super().__init__(32, channels)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return super().forward(x.float()).type(x.dtype)


class Downsample(nn.Module):
    """Halve the resolution: a stride-2 3x3 conv (``conv``) or, without conv, 2x2 average pooling."""

    def __init__(self, channels: int, use_conv: bool):
        super().__init__()
        self.conv = nn.Conv2d(channels, channels, 3, stride=2, padding=1) if use_conv else None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.conv(x) if self.conv is not None else F.avg_pool2d(x, kernel_size=2, stride=2)


class Upsample(nn.Module):
    """Double the resolution: nearest-neighbour interpolation, then an optional 3x3 conv."""

    def __init__(self, channels: int, use_conv: bool):
        super().__init__()
        self.conv = nn.Conv2d(channels, channels, 3, padding=1) if use_conv else None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = F.interpolate(x, scale_factor=2, mode="nearest")
        return self.conv(x) if self.conv is not None else x


class ResBlock(nn.Module):
    """Residual block conditioned on the timestep (and label) embedding.

        h = conv1(SiLU(norm1(x)))                       (resampled between SiLU and conv1 when up/down)
        scale-shift: h = conv2(drop(SiLU(norm2(h) * (1 + scale) + shift))),  [scale | shift] = emb_proj(SiLU(emb))
        additive:    h = conv2(drop(SiLU(norm2(h + emb_proj(SiLU(emb))))))
        out = skip(x) + h

    x: [B x C_in x H x W], emb: [B x E] -> [B x C_out x H' x W'] (H' = 2H up, H/2 down).
    """

    def __init__(self, channels: int, emb_channels: int, dropout: float, out_channels: Optional[int] = None,
                 use_scale_shift_norm: bool = False, resample: Optional[str] = None):
        super().__init__()
        out_channels = out_channels or channels
        assert resample in (None, "up", "down")
        self.resample = resample
        self.use_scale_shift_norm = use_scale_shift_norm
        self.norm1 = GroupNorm32(channels)
        self.conv1 = nn.Conv2d(channels, out_channels, 3, padding=1)
        self.emb_proj = nn.Linear(emb_channels, 2 * out_channels if use_scale_shift_norm else out_channels)
        self.norm2 = GroupNorm32(out_channels)
        self.dropout = nn.Dropout(p=dropout)
        self.conv2 = nn.Conv2d(out_channels, out_channels, 3, padding=1)
        # The official code uses a 1x1 conv when the width changes (use_conv=False everywhere in ADM).
        self.skip = nn.Conv2d(channels, out_channels, 1) if out_channels != channels else None

    def _resample(self, x: torch.Tensor) -> torch.Tensor:
        if self.resample == "up":
            return F.interpolate(x, scale_factor=2, mode="nearest")
        if self.resample == "down":
            return F.avg_pool2d(x, kernel_size=2, stride=2)
        return x

    def forward(self, x: torch.Tensor, emb: torch.Tensor) -> torch.Tensor:
        h = F.silu(self.norm1(x))
        h = self.conv1(self._resample(h))
        x = self._resample(x)
        emb_out = self.emb_proj(F.silu(emb)).type(h.dtype)[:, :, None, None]
        if self.use_scale_shift_norm:
            scale, shift = emb_out.chunk(2, dim=1)
            h = self.norm2(h) * (1 + scale) + shift
        else:
            h = self.norm2(h + emb_out)
        h = self.conv2(self.dropout(F.silu(h)))
        return (self.skip(x) if self.skip is not None else x) + h
