"""The attention seam: what a caller may ask of a U-Net attention block, and what comes back.

A forward takes ``attention={site: request}``; a site is named by the official indices
(``"input.4"``, ``"middle"``, ``"output.2"``: ``input_blocks[4][1]``, ``middle_block[1]``,
``output_blocks[2][1]``); the SD U-Net (``unet/sd_unet.py``) names its self-attention modules as diffusers
does (``"mid_block.attentions.0.transformer_blocks.0.attn1"``). Requests are frozen values; the model never
stores them.

* :class:`Capture` -- compute the block's softmax weights explicitly and return them, with the
  block's own head count and qkv layout (the paper's math).
* :class:`OfficialCapture` -- return the map the official SAG code builds (SPEC.md Q1/Q2): the
  block's qkv tensor re-read with the legacy per-head split and a model-wide ``num_heads``,
  whatever the block's real heads and layout. Reproduces the published SAG numbers.
* :class:`IdentityAttention` -- replace the weights by the identity (PAG): each token gets its own
  value vector.
* :class:`BlurQueries` -- Gaussian-blur the queries over the block's grid (SEG); ``sigma=inf``
  replaces every query by the mean query.

Every request may be limited to a batch slice (``samples=slice(B, 2 * B)``) so one batch can carry
a normal and a perturbed half (PAG, SEG, CFG).
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Callable, NamedTuple, Optional, Tuple

import torch


class AttentionMap(NamedTuple):
    """Softmax attention weights of one block.

    probs: ``(B, heads, N, N)`` float32, rows = queries, columns = keys, each row sums to 1,
    ``N = height * width`` (token ``n`` is pixel ``(n // width, n % width)``).
    """
    probs: torch.Tensor
    height: int
    width: int


@dataclass(frozen=True)
class Capture:
    """Return this block's softmax weights (its own heads and layout)."""
    samples: Optional[slice] = None


@dataclass(frozen=True)
class OfficialCapture:
    """Return the official SAG map: legacy split of the qkv tensor with ``num_heads`` groups."""
    num_heads: int
    samples: Optional[slice] = None


@dataclass(frozen=True)
class IdentityAttention:
    """Replace the weights by the identity matrix (PAG): output = value of the same token."""
    samples: Optional[slice] = None


@dataclass(frozen=True)
class BlurQueries:
    """Blur the queries with a Gaussian of std ``sigma`` tokens over the grid (SEG).

    ``sigma = math.inf`` replaces every query by the mean query. ``kernel_size=None`` follows the
    SEG code: the smallest odd integer >= 6 sigma, capped at the grid side.
    """
    sigma: float
    kernel_size: Optional[int] = None
    samples: Optional[slice] = None

    def __post_init__(self):
        if not (self.sigma > 0):
            raise ValueError(f"BlurQueries sigma must be > 0 (math.inf for the mean query), got {self.sigma}")


AttentionRequest = (Capture, OfficialCapture, IdentityAttention, BlurQueries)


def apply_on_samples(run: Callable[[slice, object], Tuple[torch.Tensor, Optional[AttentionMap]]], request,
                     batch: int) -> Tuple[torch.Tensor, Optional[AttentionMap]]:
    """Honour a request's ``samples`` slice: ``run(rows, request)`` on those rows of the batch,
    ``run(rows, None)`` on the rows before and after, outputs concatenated along dim 0 (in order).

    ``run`` gets a ``slice`` of the batch and returns (output rows, map or None); the map returned is the
    request's (its batch covers the slice only). Used by every attention block (ADM and SD) alike.
    """
    samples = getattr(request, "samples", None)
    if samples is None or samples == slice(None):
        return run(slice(None), request)
    start, stop, step = samples.indices(batch)
    assert step == 1, "attention requests take a contiguous slice of the batch"
    parts = []
    if start > 0:
        parts.append(run(slice(0, start), None)[0])
    selected, attention_map = run(slice(start, stop), request)
    parts.append(selected)
    if stop < batch:
        parts.append(run(slice(stop, batch), None)[0])
    return torch.cat(parts, dim=0), attention_map
