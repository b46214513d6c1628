"""Official parameter names <-> ours, both ways, for ``UNet`` and ``EncoderUNet``.

The official modules are ``TimestepEmbedSequential`` lists, so a parameter's official name carries
the position of its module in the block: ``input_blocks.4.1.qkv.weight`` is the attention (position
1) of input block 4; ``output_blocks.2.2.conv.weight`` the upsampler (position 2) of output block 2.
Our names say what the module is (``encoder.3.attn.qkv.weight``, ``decoder.2.resample.conv.weight``).
The map is derived from the model's own structure, so it cannot drift from the architecture:

=====================================  =====================================
ours                                   official
=====================================  =====================================
time_embed.fc1 / fc2                   time_embed.0 / time_embed.2
label_embed                            label_emb
input_conv                             input_blocks.0.0
encoder.{i-1}.{res|attn|resample}      input_blocks.{i}.{position}
middle.res1 / attn / res2              middle_block.0 / 1 / 2
decoder.{i}.{res|attn|resample}        output_blocks.{i}.{position}
out_norm / out_conv                    out.0 / out.2
ResBlock norm1 conv1 emb_proj          in_layers.0 in_layers.2 emb_layers.1
ResBlock norm2 conv2 skip              out_layers.0 out_layers.3 skip_connection
Downsample conv                        op
classifier head (attention pool)       out.0 (norm), out.2.{positional_embedding,qkv_proj,c_proj}
classifier head (adaptive)             out.0 (norm), out.3 (conv)
classifier head (spatial[_v2])         out.0 (fc1), [out.1 (norm)], out.2 / out.3 (fc2)
=====================================  =====================================
"""
from __future__ import annotations

from typing import Dict, Iterator, Mapping, Tuple

import torch
import torch.nn as nn

from unet.classifier import EncoderUNet
from unet.layers import Downsample, ResBlock
from unet.model import UNet

RESBLOCK_NAMES = {"norm1": "in_layers.0", "conv1": "in_layers.2", "emb_proj": "emb_layers.1",
                  "norm2": "out_layers.0", "conv2": "out_layers.3", "skip": "skip_connection"}


def _module_prefixes(model: nn.Module) -> Iterator[Tuple[str, str, nn.Module]]:
    """(our prefix, official prefix, module) for every module whose parameters are renamed as a unit."""
    yield "time_embed.fc1", "time_embed.0", model.time_embed.fc1
    yield "time_embed.fc2", "time_embed.2", model.time_embed.fc2
    if getattr(model, "label_embed", None) is not None:
        yield "label_embed", "label_emb", model.label_embed
    yield "input_conv", "input_blocks.0.0", model.input_conv
    for i, block in enumerate(model.encoder):
        parts = [p for p in ("res", "attn", "resample") if getattr(block, p) is not None]
        for position, part in enumerate(parts):
            yield f"encoder.{i}.{part}", f"input_blocks.{i + 1}.{position}", getattr(block, part)
    for position, part in enumerate(("res1", "attn", "res2")):
        yield f"middle.{part}", f"middle_block.{position}", getattr(model.middle, part)
    if isinstance(model, UNet):
        for i, block in enumerate(model.decoder):
            parts = [p for p in ("res", "attn", "resample") if getattr(block, p) is not None]
            for position, part in enumerate(parts):
                yield f"decoder.{i}.{part}", f"output_blocks.{i}.{position}", getattr(block, part)
        yield "out_norm", "out.0", model.out_norm
        yield "out_conv", "out.2", model.out_conv
    else:
        pool = model.config.pool
        if pool == "attention":
            yield "head_norm", "out.0", model.head_norm
            yield "pool", "out.2", model.pool
        elif pool == "adaptive":
            yield "head_norm", "out.0", model.head_norm
            yield "head_conv", "out.3", model.head_conv
        else:
            yield "head_fc1", "out.0", model.head_fc1
            if model.head_norm is not None:
                yield "head_norm", "out.1", model.head_norm
            yield "head_fc2", "out.3" if pool == "spatial_v2" else "out.2", model.head_fc2


def _inner_official(module: nn.Module, inner: str) -> str:
    """Rename a parameter path inside one module (``norm1.weight`` of a ResBlock -> ``in_layers.0.weight``)."""
    if isinstance(module, ResBlock):
        head, _, tail = inner.partition(".")
        return f"{RESBLOCK_NAMES[head]}.{tail}"
    if isinstance(module, Downsample):
        return inner.replace("conv.", "op.", 1)
    return inner


def key_map(model: nn.Module) -> Dict[str, str]:
    """{our parameter name: official name} for every entry of ``model.state_dict()``."""
    if not isinstance(model, (UNet, EncoderUNet)):
        raise TypeError(f"key_map needs a UNet or EncoderUNet, got {type(model).__name__}")
    mapping: Dict[str, str] = {}
    for ours, official, module in _module_prefixes(model):
        for inner in module.state_dict():
            mapping[f"{ours}.{inner}"] = f"{official}.{_inner_official(module, inner)}"
    missing = set(model.state_dict()) - set(mapping)
    assert not missing, f"key map does not cover {sorted(missing)[:5]}"
    assert len(set(mapping.values())) == len(mapping), "two of our parameters map to one official name"
    return mapping


class KeyMismatch(ValueError):
    """Official state dict and model disagree: ``missing``, ``unexpected`` and ``mismatched`` keys."""

    def __init__(self, missing, unexpected, mismatched):
        self.missing, self.unexpected, self.mismatched = sorted(missing), sorted(unexpected), mismatched
        parts = []
        if self.missing:
            parts.append(f"{len(self.missing)} missing (e.g. {self.missing[0]})")
        if self.unexpected:
            parts.append(f"{len(self.unexpected)} unexpected (e.g. {self.unexpected[0]})")
        if self.mismatched:
            k, (want, got) = next(iter(mismatched.items()))
            parts.append(f"{len(mismatched)} with wrong shapes (e.g. {k}: model {want}, file {got})")
        super().__init__("checkpoint does not fit the model: " + "; ".join(parts))


def official_to_ours(model: nn.Module, official: Mapping[str, torch.Tensor]) -> Dict[str, torch.Tensor]:
    """Rename an official state dict for ``model``: every key consumed once, every shape checked."""
    mapping = key_map(model)
    shapes = {k: tuple(v.shape) for k, v in model.state_dict().items()}
    inverse = {o: ours for ours, o in mapping.items()}
    missing = set(inverse) - set(official)
    unexpected = set(official) - set(inverse)
    mismatched = {k: (shapes[inverse[k]], tuple(v.shape)) for k, v in official.items()
                  if k in inverse and shapes[inverse[k]] != tuple(v.shape)}
    if missing or unexpected or mismatched:
        raise KeyMismatch(missing, unexpected, mismatched)
    return {inverse[k]: v for k, v in official.items()}


def ours_to_official(model: nn.Module, ours: Mapping[str, torch.Tensor]) -> Dict[str, torch.Tensor]:
    """Inverse of :func:`official_to_ours`: our state dict -> official names (same tensors)."""
    mapping = key_map(model)
    if set(ours) != set(mapping):
        raise KeyMismatch(set(mapping) - set(ours), set(ours) - set(mapping), {})
    return {mapping[k]: v for k, v in ours.items()}
