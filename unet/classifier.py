"""The ADM noisy-image classifier (openai/guided-diffusion ``EncoderUNetModel``), used for
classifier guidance: the U-Net's encoder and middle block followed by a pooling head.

Heads (official ``--classifier_pool``):

* ``attention`` (the released classifiers): GroupNorm, SiLU, attention pooling with a learned
  positional embedding over [mean token | tokens]; logits are the output at the mean token.
* ``adaptive``: GroupNorm, SiLU, global average pool, 1x1 conv.
* ``spatial`` / ``spatial_v2``: the spatial means after every encoder block and the middle block,
  concatenated, then an MLP (``spatial_v2`` adds a GroupNorm + SiLU inside it).
"""
from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F

from .attention import AttentionBlock, attend, attention_weights, merge_heads, split_heads
from .config import EncoderUNetConfig
from .layers import GroupNorm32
from .model import MiddleBlock, TimeEmbedding, build_encoder


class AttentionPool2d(nn.Module):
    """CLIP-style attention pooling: [B x C x H x W] -> [B x out_channels].

    tokens = [mean(x) | x] + positional_embedding; qkv_proj -> multi-head attention (q,k,v-first
    layout, heads = C / head_channels) -> c_proj; the result at the mean token.
    """

    def __init__(self, grid_side: int, channels: int, head_channels: int, out_channels: int):
        super().__init__()
        self.positional_embedding = nn.Parameter(torch.randn(channels, grid_side ** 2 + 1) / channels ** 0.5)
        self.qkv_proj = nn.Conv1d(channels, 3 * channels, 1)
        self.c_proj = nn.Conv1d(channels, out_channels, 1)
        self.num_heads = channels // head_channels

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        batch, channels = x.shape[:2]
        x = x.reshape(batch, channels, -1)
        x = torch.cat([x.mean(dim=-1, keepdim=True), x], dim=-1)             # [B x C x (T+1)]
        x = x + self.positional_embedding[None].to(x.dtype)
        q, k, v = split_heads(self.qkv_proj(x), self.num_heads, new_order=True)
        x = merge_heads(attend(attention_weights(q, k), v), batch)
        return self.c_proj(x)[:, :, 0]


class EncoderUNet(nn.Module):
    """log p(y | x_t) logits: x [B x C x H x W], timesteps [B] -> [B x out_channels]."""

    def __init__(self, config: EncoderUNetConfig):
        super().__init__()
        self.config = c = config
        emb_channels = 4 * c.model_channels
        heads = dict(num_heads=c.num_heads, num_head_channels=c.num_head_channels,
                     use_new_attention_order=c.use_new_attention_order)
        self.time_embed = TimeEmbedding(c.model_channels)
        res, self.input_conv, encoder, skip_channels, ch, factor = build_encoder(c, emb_channels)
        self.encoder = nn.ModuleList(encoder)
        feature_size = sum(skip_channels)             # spatial means after every encoder block ...
        self.middle = MiddleBlock(res(ch, ch), AttentionBlock(ch, **heads), res(ch, ch))
        feature_size += ch                            # ... and after the middle block

        if c.pool == "attention":
            self.head_norm = GroupNorm32(ch)
            self.pool = AttentionPool2d(c.image_size // factor, ch, c.num_head_channels, c.out_channels)
        elif c.pool == "adaptive":
            self.head_norm = GroupNorm32(ch)
            self.head_conv = nn.Conv2d(ch, c.out_channels, 1)
        else:  # spatial, spatial_v2
            self.head_fc1 = nn.Linear(feature_size, 2048)
            self.head_norm = GroupNorm32(2048) if c.pool == "spatial_v2" else None
            self.head_fc2 = nn.Linear(2048, c.out_channels)

    def forward(self, x: torch.Tensor, timesteps: torch.Tensor) -> torch.Tensor:
        c = self.config
        batch = x.shape[0]
        assert x.dim() == 4 and x.shape[1] == c.in_channels, f"x must be [B x {c.in_channels} x H x W], got {tuple(x.shape)}"
        assert timesteps.shape == (batch,), f"timesteps must be [{batch}], got {tuple(timesteps.shape)}"
        emb = self.time_embed(timesteps)
        h = self.input_conv(x.to(self.input_conv.weight.dtype))
        spatial_means = [h.mean(dim=(2, 3))]
        for block in self.encoder:
            h, _ = block(h, emb)
            spatial_means.append(h.mean(dim=(2, 3)))
        h, _ = self.middle(h, emb)
        spatial_means.append(h.mean(dim=(2, 3)))
        if c.pool == "attention":
            logits = self.pool(F.silu(self.head_norm(h)))
        elif c.pool == "adaptive":
            logits = self.head_conv(F.adaptive_avg_pool2d(F.silu(self.head_norm(h)), 1)).flatten(1)
        else:
            features = torch.cat(spatial_means, dim=-1).to(self.head_fc1.weight.dtype)
            hidden = self.head_fc1(features)
            hidden = F.silu(self.head_norm(hidden)) if self.head_norm is not None else F.relu(hidden)
            logits = self.head_fc2(hidden)
        return logits.to(x.dtype)
