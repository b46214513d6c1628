"""The SD U-Net in an original single-file (LDM / CompVis) checkpoint: its key layout -> diffusers' names
(which are ours, ``unet/sd_unet.py``), and its diffusers-style config inferred from the shapes.

The U-Net's keys sit under ``model.diffusion_model.`` (``v1-5-pruned-emaonly.safetensors`` layout). With
L = layers_per_block and level i = 0..levels-1 (``input_blocks`` count L + 1 per level, the last without
its downsampler; ``output_blocks`` L + 1 per level)::

    LDM                                           ours (diffusers)
    time_embed.0 / time_embed.2                   time_embedding.linear_1 / linear_2
    input_blocks.0.0                              conv_in
    input_blocks.{1 + i(L+1) + j}.0 / .1          down_blocks.i.resnets.j / down_blocks.i.attentions.j
    input_blocks.{(i+1)(L+1)}.0.op                down_blocks.i.downsamplers.0.conv
    middle_block.0 / .1 / .2                      mid_block.resnets.0 / attentions.0 / resnets.1
    output_blocks.{i(L+1) + j}.0 / .1             up_blocks.i.resnets.j / up_blocks.i.attentions.j
    output_blocks.{i(L+1) + L}.{1 or 2}.conv      up_blocks.i.upsamplers.0.conv (position 2 after an attention)
    out.0 / out.2                                 conv_norm_out / conv_out
    ResBlock in_layers.0 in_layers.2 emb_layers.1 norm1 conv1 time_emb_proj
    ResBlock out_layers.0 out_layers.3            norm2 conv2
    ResBlock skip_connection                      conv_shortcut
    SpatialTransformer (norm, proj_in, transformer_blocks.k.{attn1,attn2,ff,norm1-3}, proj_out): same names

Shapes are kept (SD 2.x's linear ``proj_in`` / ``proj_out`` are 2-D in both layouts).

**Heads cannot be read from shapes**: to_q / to_k / to_v are C x C whatever the head count. They follow
from the model family, which the text-context width identifies: 768 (CLIP ViT-L, SD 1.x, LDM
``num_heads: 8``) -> 8 heads in every block; 1024 (OpenCLIP ViT-H, SD 2.x, LDM ``num_head_channels: 64``) ->
channels / 64 heads per block ([5, 10, 20, 20] for SD 2.x). Any other width (e.g. a test model) needs the
config of a diffusers folder (``folder_config``), which is then checked against the shapes. ``sample_size``
(64; 96 for the 768-px SD 2.x models) and ``upcast_attention`` (False; it only matters in half precision)
cannot be read either: a folder's config supplies them when given.
"""
from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Dict, List, Mapping, Optional, Tuple

from .errors import CheckpointError

LDM_UNET_PREFIX = "model.diffusion_model."
_RESNET_NAMES = {"in_layers.0": "norm1", "in_layers.2": "conv1", "emb_layers.1": "time_emb_proj",
                 "out_layers.0": "norm2", "out_layers.3": "conv2", "skip_connection": "conv_shortcut"}


@dataclass(frozen=True)
class _Structure:
    levels: int
    layers_per_block: int
    down_attention: Tuple[bool, ...]
    up_attention: Tuple[bool, ...]


def _unet_keys(state_dict: Mapping) -> Dict[str, object]:
    unet = {k[len(LDM_UNET_PREFIX):]: v for k, v in state_dict.items() if k.startswith(LDM_UNET_PREFIX)}
    if not unet:
        raise CheckpointError(f"no '{LDM_UNET_PREFIX}*' keys: this is not an original (LDM) single-file Stable "
                              f"Diffusion checkpoint")
    if any(k.startswith("label_emb.") for k in unet):
        raise CheckpointError("the U-Net has class embeddings (label_emb: an unCLIP / upscaler model); only SD 1.x / "
                              "2.x text-to-image U-Nets are supported")
    return unet


def _structure(unet: Mapping) -> _Structure:
    """Levels, layers per block and which levels have attention, from the key names."""
    inputs = {int(m.group(1)) for k in unet if (m := re.match(r"input_blocks\.(\d+)\.", k))}
    downsamplers = sorted(int(m.group(1)) for k in unet if (m := re.match(r"input_blocks\.(\d+)\.0\.op\.weight$", k)))
    if not inputs:
        raise CheckpointError("the U-Net has no input_blocks: not an SD U-Net")
    per_level = downsamplers[0] if downsamplers else max(inputs)     # L + 1 (L when one level, no downsampler)
    levels = len(downsamplers) + 1
    layers = per_level - 1 if downsamplers else per_level
    if max(inputs) != levels * (layers + 1) - 1 or downsamplers != [(i + 1) * (layers + 1) for i in range(levels - 1)]:
        raise CheckpointError(f"the U-Net's input_blocks 0..{max(inputs)} with downsamplers at {downsamplers} do not "
                              f"form an SD U-Net (L resnets per level, then a downsampler)")
    down = tuple(f"input_blocks.{1 + i * (layers + 1)}.1.proj_in.weight" in unet for i in range(levels))
    up = tuple(f"output_blocks.{i * (layers + 1)}.1.proj_in.weight" in unet for i in range(levels))
    return _Structure(levels, layers, down, up)


def _prefix_table(s: _Structure) -> List[Tuple[str, str, bool]]:
    """(LDM prefix, our prefix, is a ResBlock) for every module, both sides ending in '.'."""
    table = [("time_embed.0.", "time_embedding.linear_1.", False), ("time_embed.2.", "time_embedding.linear_2.", False),
             ("input_blocks.0.0.", "conv_in.", False)]
    per_level = s.layers_per_block + 1
    for i in range(s.levels):
        for j in range(s.layers_per_block):
            n = 1 + i * per_level + j
            table.append((f"input_blocks.{n}.0.", f"down_blocks.{i}.resnets.{j}.", True))
            if s.down_attention[i]:
                table.append((f"input_blocks.{n}.1.", f"down_blocks.{i}.attentions.{j}.", False))
        if i < s.levels - 1:
            table.append((f"input_blocks.{(i + 1) * per_level}.0.op.", f"down_blocks.{i}.downsamplers.0.conv.", False))
    table += [("middle_block.0.", "mid_block.resnets.0.", True), ("middle_block.1.", "mid_block.attentions.0.", False),
              ("middle_block.2.", "mid_block.resnets.1.", True)]
    for i in range(s.levels):
        for j in range(per_level):
            n = i * per_level + j
            table.append((f"output_blocks.{n}.0.", f"up_blocks.{i}.resnets.{j}.", True))
            if s.up_attention[i]:
                table.append((f"output_blocks.{n}.1.", f"up_blocks.{i}.attentions.{j}.", False))
        if i < s.levels - 1:
            position = 2 if s.up_attention[i] else 1
            table.append((f"output_blocks.{i * per_level + s.layers_per_block}.{position}.conv.",
                          f"up_blocks.{i}.upsamplers.0.conv.", False))
    table += [("out.0.", "conv_norm_out.", False), ("out.2.", "conv_out.", False)]
    return table


def _rename(key: str, table, source: int) -> Optional[str]:
    """Rename ``key`` through the table from column ``source`` (0 = LDM, 1 = ours) to the other one."""
    resnet_names = _RESNET_NAMES if source == 0 else {v: k for k, v in _RESNET_NAMES.items()}
    for row in table:
        prefix, target, is_resnet = row[source], row[1 - source], row[2]
        if key.startswith(prefix):
            rest = key[len(prefix):]
            if is_resnet:
                module, _, leaf = rest.rpartition(".")
                if module not in resnet_names:
                    return None
                rest = f"{resnet_names[module]}.{leaf}"
            return target + rest
    return None


def unet_state_from_ldm(state_dict: Mapping) -> Dict[str, object]:
    """``model.diffusion_model.*`` tensors of a single-file checkpoint -> our (diffusers) U-Net state dict.

    Other keys (VAE, text encoder, schedule buffers) are ignored; a U-Net key the layout does not
    have -> one-line CheckpointError.
    """
    unet = _unet_keys(state_dict)
    table = _prefix_table(_structure(unet))
    renamed, unknown = {}, []
    for key, tensor in unet.items():
        ours = _rename(key, table, 0)
        if ours is None:
            unknown.append(key)
        else:
            renamed[ours] = tensor
    if unknown:
        raise CheckpointError(f"{len(unknown)} U-Net key(s) of the single file are not in the SD layout, e.g. "
                              f"{', '.join(LDM_UNET_PREFIX + k for k in unknown[:3])}")
    return renamed


def unet_state_to_ldm(state_dict: Mapping) -> Dict[str, object]:
    """The inverse: our (diffusers) U-Net state dict -> ``model.diffusion_model.*`` keys."""
    table = _prefix_table(_structure_from_ours(state_dict))
    out = {}
    for key, tensor in state_dict.items():
        ldm = _rename(key, table, 1)
        if ldm is None:
            raise CheckpointError(f"U-Net key {key!r} has no place in the LDM layout")
        out[LDM_UNET_PREFIX + ldm] = tensor
    return out


def _structure_from_ours(state_dict: Mapping) -> _Structure:
    levels = 1 + max(int(m.group(1)) for k in state_dict if (m := re.match(r"down_blocks\.(\d+)\.", k)))
    layers = 1 + max(int(m.group(1)) for k in state_dict if (m := re.match(r"down_blocks\.0\.resnets\.(\d+)\.", k)))
    down = tuple(f"down_blocks.{i}.attentions.0.proj_in.weight" in state_dict for i in range(levels))
    up = tuple(f"up_blocks.{i}.attentions.0.proj_in.weight" in state_dict for i in range(levels))
    return _Structure(levels, layers, down, up)


def unet_config_from_ldm(state_dict: Mapping, folder_config: Optional[Mapping] = None) -> dict:
    """A diffusers-style ``unet/config.json`` dict for the single file's U-Net, inferred from its shapes.

    Heads: 8 for a 768-wide text context (SD 1.x), channels / 64 per block for 1024 (SD 2.x); see the module
    docstring. With ``folder_config`` (a diffusers folder's ``unet/config.json``), that config is returned
    after checking every field the shapes determine against it (mismatch -> one-line CheckpointError); it
    is required when the context width is neither 768 nor 1024.
    """
    unet = _unet_keys(state_dict)
    s = _structure(unet)
    per_level = s.layers_per_block + 1
    conv_in = unet["input_blocks.0.0.weight"]
    channels = [int(unet[f"input_blocks.{1 + i * per_level}.0.out_layers.3.weight"].shape[0]) for i in range(s.levels)]
    context_dims = {int(v.shape[1]) for k, v in unet.items() if k.endswith("attn2.to_k.weight")}
    proj_in = [v for k, v in unet.items() if k.endswith(".proj_in.weight")]
    if len(context_dims) != 1 or not proj_in:
        raise CheckpointError(f"the U-Net's cross-attentions have context widths {sorted(context_dims)}; an SD U-Net "
                              f"has cross-attention with one width")
    context = context_dims.pop()

    def transformer_layers(prefix: str) -> int:
        return len({m.group(1) for k in unet if (m := re.match(re.escape(prefix) + r"transformer_blocks\.(\d+)\.", k))})

    # per level; the mid block uses the last entry (diffusers), so a level without attention gets the mid's count
    mid_layers = transformer_layers("middle_block.1.")
    layers = [transformer_layers(f"input_blocks.{1 + i * per_level}.1.") if s.down_attention[i] else mid_layers
              for i in range(s.levels)]
    inferred = {
        "in_channels": int(conv_in.shape[1]),
        "out_channels": int(unet["out.2.weight"].shape[0]),
        "block_out_channels": channels,
        "layers_per_block": s.layers_per_block,
        "down_block_types": ["CrossAttnDownBlock2D" if a else "DownBlock2D" for a in s.down_attention],
        "up_block_types": ["CrossAttnUpBlock2D" if a else "UpBlock2D" for a in s.up_attention],
        "mid_block_type": "UNetMidBlock2DCrossAttn",
        "cross_attention_dim": context,
        "use_linear_projection": proj_in[0].dim() == 2,
        "transformer_layers_per_block": layers[0] if len(set(layers)) == 1 else layers,
        "conv_in_kernel": int(conv_in.shape[2]),
        "conv_out_kernel": int(unet["out.2.weight"].shape[2]),
    }
    if folder_config is not None:
        folder = dict(folder_config)
        defaults = {"mid_block_type": "UNetMidBlock2DCrossAttn", "transformer_layers_per_block": 1,
                    "use_linear_projection": False, "conv_in_kernel": 3, "conv_out_kernel": 3}
        differ = [f"{key} {value!r} (folder: {folder.get(key, defaults.get(key))!r})" for key, value in inferred.items()
                  if _as_list(folder.get(key, defaults.get(key))) != _as_list(value)]
        if differ:
            raise CheckpointError(f"the single file's U-Net does not fit the folder's unet/config.json: "
                                  f"{'; '.join(differ)}")
        return folder
    if context == 768:
        heads = 8
    elif context == 1024:
        heads = [c // 64 for c in channels]
    else:
        raise CheckpointError(f"cannot infer the U-Net's attention heads from the shapes: text context width {context} "
                              f"is neither SD 1.x's 768 nor SD 2.x's 1024; give the config of a diffusers folder "
                              f"(config_folder)")
    return {
        "_class_name": "UNet2DConditionModel",
        **inferred,
        "attention_head_dim": heads,                 # diffusers' name for the number of heads
        "num_attention_heads": None,
        "sample_size": 64,
        "upcast_attention": False,
        "flip_sin_to_cos": True,
        "freq_shift": 0,
        "downsample_padding": 1,
        "norm_num_groups": 32,
        "norm_eps": 1e-5,
        "act_fn": "silu",
        "center_input_sample": False,
        "mid_block_scale_factor": 1,
    }


def _as_list(value):
    return list(value) if isinstance(value, (list, tuple)) else value
