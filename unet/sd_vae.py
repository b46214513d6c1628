"""Stable Diffusion's KL autoencoder (the "VAE"): images <-> 4-channel latents.

The architecture of diffusers' ``AutoencoderKL`` (``DownEncoderBlock2D`` / ``UpDecoderBlock2D``,
``UNetMidBlock2D`` with one attention), written here; the parameters are named exactly as in a
diffusers folder's ``vae/diffusion_pytorch_model.safetensors`` so it loads with ``strict=True``
(``checkpoints_convert.sd_keys_vae_text`` maps the original LDM ``first_stage_model.*`` layout)::

    encoder:  conv_in -> down_blocks[i] (resnets, then a stride-2 conv except on the last level)
              -> mid_block (resnet, attention, resnet) -> GroupNorm, SiLU, conv_out -> [mean | logvar]
    quant_conv (1x1 on the 2 x latent moments), post_quant_conv (1x1 on a latent)
    decoder:  conv_in -> mid_block -> up_blocks[i] (levels in reverse, layers_per_block + 1 resnets,
              nearest x2 + conv except on the last) -> GroupNorm, SiLU, conv_out

Latents here are **unscaled**: SD's U-Net works on ``scaling_factor * z`` (0.18215 for SD 1.x/2.x), so
a pipeline decodes ``vae.decode(latents / scaling_factor)`` and encodes
``scaling_factor * (mean + exp(logvar / 2) * noise)``.  The scaling lives in the config, never in
these functions.  Attention uses the fused ``F.scaled_dot_product_attention`` (no map is read from
the autoencoder).  Norms run in the activations' dtype, as diffusers does; SD pipelines keep the
VAE in float32 (``force_upcast``).
"""
from __future__ import annotations

from dataclasses import dataclass, fields
from typing import Optional, Tuple

import torch
import torch.nn as nn
import torch.nn.functional as F

from .config import ConfigError
from .sd_unet import Downsample2D, ResnetBlock2D, Upsample2D

__all__ = ["AutoencoderKL", "AutoencoderKLConfig"]

_NORM_EPS = 1e-6   # every GroupNorm of diffusers' AutoencoderKL (resnets, attention, output norms)


@dataclass(frozen=True)
class AutoencoderKLConfig:
    """Every structural field of an SD 1.x / 2.x ``AutoencoderKL`` (defaults: SD 1.5's VAE)."""
    in_channels: int = 3
    out_channels: int = 3
    latent_channels: int = 4
    block_out_channels: Tuple[int, ...] = (128, 256, 512, 512)   # widths per level; 2^(levels-1) downsampling
    layers_per_block: int = 2                                    # encoder resnets per level (decoder: + 1)
    norm_num_groups: int = 32
    mid_block_add_attention: bool = True
    use_quant_conv: bool = True
    use_post_quant_conv: bool = True
    scaling_factor: float = 0.18215     # unet latents = scaling_factor * vae latents (used by the pipeline)
    shift_factor: Optional[float] = None  # SD3/Flux only; None for SD 1.x/2.x
    sample_size: int = 512              # informational (diffusers' tiling threshold)
    force_upcast: bool = True           # diffusers keeps this VAE in float32 under half precision

    def __post_init__(self):
        object.__setattr__(self, "block_out_channels", tuple(int(c) for c in self.block_out_channels))
        if not self.block_out_channels:
            raise ConfigError("AutoencoderKL block_out_channels is empty: give one width per level, e.g. [128, 256, 512, 512]")
        for width in self.block_out_channels:
            if width % self.norm_num_groups:
                raise ConfigError(f"AutoencoderKL width {width} is not divisible by norm_num_groups {self.norm_num_groups}")
        if self.layers_per_block < 1:
            raise ConfigError(f"AutoencoderKL layers_per_block must be >= 1, got {self.layers_per_block}")

    @property
    def downsampling_factor(self) -> int:
        """Image side / latent side (diffusers' ``vae_scale_factor``): 8 for SD."""
        return 2 ** (len(self.block_out_channels) - 1)

    @classmethod
    def from_diffusers(cls, config: dict) -> "AutoencoderKLConfig":
        """The config of a diffusers folder's ``vae/config.json``; an option this port does not
        implement is one ConfigError naming it (unknown keys that change nothing are ignored)."""
        class_name = config.get("_class_name", "AutoencoderKL")
        if class_name != "AutoencoderKL":
            raise ConfigError(f"vae/config.json names class {class_name!r}; only AutoencoderKL (SD 1.x / 2.x) is supported")
        levels = len(config.get("block_out_channels", cls.block_out_channels))
        unsupported = []
        if config.get("act_fn", "silu") != "silu":
            unsupported.append(f"act_fn={config['act_fn']!r}")
        for key, expected in (("down_block_types", "DownEncoderBlock2D"), ("up_block_types", "UpDecoderBlock2D")):
            types = config.get(key, [expected] * levels)
            if list(types) != [expected] * levels:
                unsupported.append(f"{key}={list(types)} (expected {levels} x {expected})")
        for key in ("latents_mean", "latents_std"):
            if config.get(key) is not None:
                unsupported.append(f"{key} (per-channel latent statistics)")
        if unsupported:
            raise ConfigError("unsupported AutoencoderKL options in vae/config.json: " + "; ".join(unsupported))
        known = {f.name for f in fields(cls)}
        return cls(**{k: v for k, v in config.items() if k in known})


def _resnet(in_channels: int, out_channels: int, groups: int) -> ResnetBlock2D:
    """The U-Net's resnet block without time embedding: shortcut(x) + conv2(SiLU(norm2(conv1(SiLU(norm1(x))))))."""
    return ResnetBlock2D(in_channels, out_channels, None, groups, _NORM_EPS, dropout=0.0, output_scale_factor=1.0)


class SpatialSelfAttention(nn.Module):
    """x + to_out(Attention(to_q(n), to_k(n), to_v(n))), n = GroupNorm(x) over the H*W tokens.

    One head of width C (diffusers: ``attention_head_dim = C``), softmax(q k^T / sqrt(C)) v through
    the fused ``F.scaled_dot_product_attention``. [B x C x H x W] -> same shape.
    """

    def __init__(self, channels: int, groups: int):
        super().__init__()
        self.group_norm = nn.GroupNorm(groups, channels, eps=_NORM_EPS)
        self.to_q = nn.Linear(channels, channels)
        self.to_k = nn.Linear(channels, channels)
        self.to_v = nn.Linear(channels, channels)
        self.to_out = nn.ModuleList([nn.Linear(channels, channels), nn.Dropout(0.0)])   # diffusers' names

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        batch, channels, height, width = x.shape
        tokens = self.group_norm(x).reshape(batch, channels, height * width).transpose(1, 2)   # [B x N x C]
        q, k, v = (proj(tokens).unsqueeze(1) for proj in (self.to_q, self.to_k, self.to_v))   # [B x 1 x N x C]
        a = F.scaled_dot_product_attention(q, k, v).squeeze(1)
        h = self.to_out[0](a).transpose(1, 2).reshape(batch, channels, height, width)
        return x + h


class MidBlock2D(nn.Module):
    """resnets[0] -> attentions[0] -> resnets[1] at constant width (attention optional)."""

    def __init__(self, channels: int, groups: int, add_attention: bool):
        super().__init__()
        self.resnets = nn.ModuleList([_resnet(channels, channels, groups) for _ in range(2)])
        self.attentions = nn.ModuleList([SpatialSelfAttention(channels, groups)] if add_attention else [])

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.resnets[0](x)
        for attention in self.attentions:
            h = attention(h)
        return self.resnets[1](h)


class ResnetLevel(nn.Module):
    """One resolution level: ``num_layers`` resnets, then an optional resampler kept where diffusers
    keeps it (``resampler_attr``.0). [B x C_in x H x W] -> [B x C_out x H' x W']."""
    resampler_attr = "resamplers"

    def __init__(self, in_channels: int, out_channels: int, num_layers: int, groups: int,
                 resampler: Optional[nn.Module] = None):
        super().__init__()
        self.resnets = nn.ModuleList([_resnet(in_channels if i == 0 else out_channels, out_channels, groups)
                                      for i in range(num_layers)])
        setattr(self, self.resampler_attr, nn.ModuleList([resampler] if resampler is not None else []))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        for module in (*self.resnets, *getattr(self, self.resampler_attr)):
            x = module(x)
        return x


class EncoderLevel(ResnetLevel):
    """diffusers' ``DownEncoderBlock2D``: ``resnets``, then ``downsamplers.0`` (not on the last level)."""
    resampler_attr = "downsamplers"


class DecoderLevel(ResnetLevel):
    """diffusers' ``UpDecoderBlock2D``: ``resnets``, then ``upsamplers.0`` (not on the last level)."""
    resampler_attr = "upsamplers"


class Encoder(nn.Module):
    """[B x in_channels x H x W] -> moments [B x 2 latent_channels x H/f x W/f], f = 2^(levels-1)."""

    def __init__(self, config: AutoencoderKLConfig):
        super().__init__()
        widths, groups = config.block_out_channels, config.norm_num_groups
        self.conv_in = nn.Conv2d(config.in_channels, widths[0], 3, padding=1)
        self.down_blocks = nn.ModuleList([
            EncoderLevel(widths[max(i - 1, 0)], width, config.layers_per_block, groups,
                         Downsample2D(width, padding=0) if i < len(widths) - 1 else None)
            for i, width in enumerate(widths)])
        self.mid_block = MidBlock2D(widths[-1], groups, config.mid_block_add_attention)
        self.conv_norm_out = nn.GroupNorm(groups, widths[-1], eps=_NORM_EPS)
        self.conv_act = nn.SiLU()
        self.conv_out = nn.Conv2d(widths[-1], 2 * config.latent_channels, 3, padding=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.conv_in(x)
        for level in self.down_blocks:
            h = level(h)
        h = self.mid_block(h)
        return self.conv_out(self.conv_act(self.conv_norm_out(h)))


class Decoder(nn.Module):
    """[B x latent_channels x h x w] -> [B x out_channels x f h x f w], f = 2^(levels-1)."""

    def __init__(self, config: AutoencoderKLConfig):
        super().__init__()
        widths, groups = tuple(reversed(config.block_out_channels)), config.norm_num_groups
        self.conv_in = nn.Conv2d(config.latent_channels, widths[0], 3, padding=1)
        self.mid_block = MidBlock2D(widths[0], groups, config.mid_block_add_attention)
        self.up_blocks = nn.ModuleList([
            DecoderLevel(widths[max(i - 1, 0)], width, config.layers_per_block + 1, groups,
                         Upsample2D(width) if i < len(widths) - 1 else None)
            for i, width in enumerate(widths)])
        self.conv_norm_out = nn.GroupNorm(groups, widths[-1], eps=_NORM_EPS)
        self.conv_act = nn.SiLU()
        self.conv_out = nn.Conv2d(widths[-1], config.out_channels, 3, padding=1)

    def forward(self, z: torch.Tensor) -> torch.Tensor:
        h = self.mid_block(self.conv_in(z))
        for level in self.up_blocks:
            h = level(h)
        return self.conv_out(self.conv_act(self.conv_norm_out(h)))


class AutoencoderKL(nn.Module):
    """SD's KL autoencoder. ``encode``: images in [-1, 1] -> latent Gaussian (mean, logvar);
    ``decode``: unscaled latents -> images (about [-1, 1], not clamped)."""

    def __init__(self, config: AutoencoderKLConfig):
        super().__init__()
        self.config = config
        self.encoder = Encoder(config)
        self.decoder = Decoder(config)
        moments = 2 * config.latent_channels
        self.quant_conv = nn.Conv2d(moments, moments, 1) if config.use_quant_conv else None
        self.post_quant_conv = (nn.Conv2d(config.latent_channels, config.latent_channels, 1)
                                if config.use_post_quant_conv else None)

    @property
    def scaling_factor(self) -> float:
        return self.config.scaling_factor

    @property
    def downsampling_factor(self) -> int:
        return self.config.downsampling_factor

    def encode(self, images: torch.Tensor) -> Tuple[torch.Tensor, torch.Tensor]:
        """Posterior q(z | x) = N(mean, exp(logvar)) of images x in [-1, 1].

        [B x in_channels x H x W] (H, W multiples of f = 2^(levels-1), 8 for SD)
        -> mean, logvar each [B x latent_channels x H/f x W/f]; logvar clamped to [-30, 20] as
        diffusers' ``DiagonalGaussianDistribution`` does. A sample is mean + exp(logvar/2) * noise.
        """
        f = self.downsampling_factor
        if images.dim() != 4 or images.shape[1] != self.config.in_channels or images.shape[2] % f or images.shape[3] % f:
            raise ValueError(f"AutoencoderKL.encode expects images [B, {self.config.in_channels}, H, W] with H and W "
                             f"multiples of {f}, got shape {tuple(images.shape)}")
        moments = self.encoder(images)
        if self.quant_conv is not None:
            moments = self.quant_conv(moments)
        mean, logvar = moments.chunk(2, dim=1)
        return mean, logvar.clamp(-30.0, 20.0)

    def decode(self, latents: torch.Tensor) -> torch.Tensor:
        """Images from UNscaled latents z (a pipeline passes ``latents / scaling_factor``).

        [B x latent_channels x h x w] -> [B x out_channels x f h x f w], values about [-1, 1]
        (not clamped; SD's postprocessing is (x / 2 + 0.5).clamp(0, 1)).
        """
        if latents.dim() != 4 or latents.shape[1] != self.config.latent_channels:
            raise ValueError(f"AutoencoderKL.decode expects latents [B, {self.config.latent_channels}, h, w], "
                             f"got shape {tuple(latents.shape)}")
        if self.post_quant_conv is not None:
            latents = self.post_quant_conv(latents)
        return self.decoder(latents)
