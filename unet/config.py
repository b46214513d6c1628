"""Configuration of the ADM / IDDPM U-Net and of the ADM noisy-image classifier.

Frozen dataclasses, one field per architecture switch of the official code
(openai/guided-diffusion ``unet.py``, openai/improved-diffusion ``unet.py``). Every field is
validated in ``__post_init__`` with a one-line error, so a bad flag fails before a tensor exists.

Resolutions are feature-map sizes in pixels, as in the official ``--attention_resolutions`` flag
(the official constructor converts them to downsample factors ``image_size // res``).
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Optional, Tuple


class ConfigError(ValueError):
    """A configuration that cannot describe a valid network; the message is one line."""


def _tuple(value, cast):
    if isinstance(value, str):
        value = [v for v in value.split(",") if v.strip()]
    return tuple(cast(v) for v in value)


@dataclass(frozen=True)
class UNetConfig:
    image_size: int                                     # side of the (square) image in pixels
    in_channels: int = 3                                # image channels (doubled internally for super_res)
    model_channels: int = 128                           # base width (official --num_channels)
    out_channels: int = 3                               # 6 when the variance is learned (--learn_sigma)
    num_res_blocks: int = 2                             # ResBlocks per level
    attention_resolutions: Tuple[int, ...] = (16, 8)    # feature-map sizes (pixels) that get self-attention
    dropout: float = 0.0                                # ResBlock dropout (inactive in eval mode)
    channel_mult: Tuple[float, ...] = (1, 2, 2, 2)      # width multiplier per level (0.5 allowed: ADM-512)
    num_classes: Optional[int] = None                   # label embedding size; None = unconditional
    num_heads: int = 1                                  # heads per attention block when num_head_channels == -1
    num_head_channels: int = -1                         # fixed channels per head (overrides num_heads) or -1
    num_heads_upsample: int = -1                        # heads in decoder blocks; -1 = num_heads
    use_scale_shift_norm: bool = False                  # FiLM-like (1 + scale) * norm(h) + shift conditioning
    resblock_updown: bool = False                       # down/upsample with ResBlocks instead of conv/interp
    use_new_attention_order: bool = False               # split q,k,v before heads (QKVAttention) vs legacy
    conv_resample: bool = True                          # learned 3x3 conv in Down/Upsample
    super_res: bool = False                             # upsampler: low-res image is upsampled and concatenated

    def __post_init__(self):
        object.__setattr__(self, "attention_resolutions", _tuple(self.attention_resolutions, int))
        object.__setattr__(self, "channel_mult", _tuple(self.channel_mult, float))
        if self.image_size <= 0:
            raise ConfigError(f"image_size must be positive, got {self.image_size}")
        if self.model_channels <= 0 or self.model_channels % 32:
            raise ConfigError(f"model_channels must be a positive multiple of 32 (GroupNorm(32, C)), got {self.model_channels}")
        if not self.channel_mult:
            raise ConfigError("channel_mult must name at least one level")
        for mult in self.channel_mult:
            width = int(mult * self.model_channels)
            if width <= 0 or width % 32:
                raise ConfigError(f"channel_mult {mult} gives {width} channels; every level's width must be a positive multiple of 32")
        factor = 2 ** (len(self.channel_mult) - 1)
        if self.image_size % factor:
            raise ConfigError(
                f"image_size {self.image_size} is not divisible by {factor}, the U-Net's total downsampling "
                f"for {len(self.channel_mult)} levels; use a multiple of {factor} or fewer levels in channel_mult")
        if self.num_res_blocks < 1:
            raise ConfigError(f"num_res_blocks must be at least 1, got {self.num_res_blocks}")
        if self.num_head_channels == -1 and self.num_heads < 1:
            raise ConfigError(f"num_heads must be at least 1 when num_head_channels is -1, got {self.num_heads}")
        if self.out_channels not in (self.in_channels, 2 * self.in_channels):
            raise ConfigError(f"out_channels {self.out_channels} must be in_channels ({self.in_channels}) or twice it (learned sigma)")
        if self.num_classes is not None and self.num_classes < 1:
            raise ConfigError(f"num_classes must be positive or None, got {self.num_classes}")

    @property
    def learn_sigma(self) -> bool:
        return self.out_channels == 2 * self.in_channels

    @property
    def downsample_factor(self) -> int:
        return 2 ** (len(self.channel_mult) - 1)


@dataclass(frozen=True)
class EncoderUNetConfig:
    """The ADM noisy-image classifier (official ``EncoderUNetModel``)."""
    image_size: int
    in_channels: int = 3
    model_channels: int = 128                           # official --classifier_width
    out_channels: int = 1000                            # number of classes
    num_res_blocks: int = 2                             # official --classifier_depth
    attention_resolutions: Tuple[int, ...] = (32, 16, 8)
    dropout: float = 0.0
    channel_mult: Tuple[float, ...] = (1, 1, 2, 2, 4, 4)
    num_heads: int = 1
    num_head_channels: int = 64                         # official create_classifier hard-codes 64
    use_scale_shift_norm: bool = True
    resblock_updown: bool = True
    use_new_attention_order: bool = False
    conv_resample: bool = True
    pool: str = "attention"                             # "adaptive" | "attention" | "spatial" | "spatial_v2"

    def __post_init__(self):
        object.__setattr__(self, "attention_resolutions", _tuple(self.attention_resolutions, int))
        object.__setattr__(self, "channel_mult", _tuple(self.channel_mult, float))
        if self.pool not in ("adaptive", "attention", "spatial", "spatial_v2"):
            raise ConfigError(f"unknown classifier pool {self.pool!r}; use adaptive, attention, spatial or spatial_v2")
        factor = 2 ** (len(self.channel_mult) - 1)
        if self.image_size % factor:
            raise ConfigError(f"image_size {self.image_size} is not divisible by the classifier's downsampling {factor}")
        for mult in self.channel_mult:
            width = int(mult * self.model_channels)
            if width <= 0 or width % 32:
                raise ConfigError(f"classifier channel_mult {mult} gives {width} channels; widths must be positive multiples of 32")
