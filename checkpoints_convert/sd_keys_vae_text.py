"""Original single-file Stable Diffusion checkpoints (LDM layout) -> our VAE and text-encoder names.

Our SD networks use the diffusers / transformers parameter names (``unet.sd_vae``,
``unet.clip_text``). A single file such as ``v1-5-pruned-emaonly.safetensors`` holds them under:

VAE (``first_stage_model.*``; a bare VAE file such as ``vae-ft-mse-840000-ema-pruned`` has the
same keys without the prefix):

=======================================  ==================================================
LDM                                      ours (diffusers ``AutoencoderKL``)
=======================================  ==================================================
encoder.down.{i}.block.{j}.*             encoder.down_blocks.{i}.resnets.{j}.*
encoder.down.{i}.downsample.conv         encoder.down_blocks.{i}.downsamplers.0.conv
decoder.up.{i}.block.{j}.*               decoder.up_blocks.{n-1-i}.resnets.{j}.*  (levels reversed:
decoder.up.{i}.upsample.conv             decoder.up_blocks.{n-1-i}.upsamplers.0.conv  LDM counts up
                                                                                      from the image)
{encoder,decoder}.mid.block_1 / block_2  {encoder,decoder}.mid_block.resnets.0 / 1
{encoder,decoder}.mid.attn_1.norm        ...mid_block.attentions.0.group_norm
...mid.attn_1.q / k / v / proj_out       ...to_q / to_k / to_v / to_out.0 (1x1 conv [C, C, 1, 1] -> linear [C, C])
{encoder,decoder}.norm_out               {encoder,decoder}.conv_norm_out
resnet nin_shortcut                      resnet conv_shortcut
conv_in, conv_out, quant_conv, post_quant_conv, norm1, conv1, norm2, conv2: unchanged
=======================================  ==================================================

Text encoder, SD 1.x (``cond_stage_model.transformer.*``): transformers' own names, so only the
prefix goes (``text_model.`` is added when an old file lacks it) and the legacy ``position_ids``
buffer is dropped.

Text encoder, SD 2.x (OpenCLIP ViT-H/14, ``cond_stage_model.model.*``):

=======================================  ==================================================
OpenCLIP                                 ours (transformers ``CLIPTextModel``)
=======================================  ==================================================
token_embedding.weight                   text_model.embeddings.token_embedding.weight
positional_embedding [L, D]              text_model.embeddings.position_embedding.weight
transformer.resblocks.{i}.ln_1 / ln_2    text_model.encoder.layers.{i}.layer_norm1 / layer_norm2
...attn.in_proj_weight [3D, D] (+ bias)  ...self_attn.q_proj / k_proj / v_proj (rows 0:D, D:2D, 2D:3D)
...attn.out_proj                         ...self_attn.out_proj
...mlp.c_fc / mlp.c_proj                 ...mlp.fc1 / mlp.fc2
ln_final                                 text_model.final_layer_norm
text_projection, logit_scale, visual.*   dropped (SD does not use them)
=======================================  ==================================================

SD 2.x conditions on the **penultimate** OpenCLIP layer followed by ``ln_final``
(``FrozenOpenCLIPEmbedder(layer="penultimate")`` in every SD 2.x inference config). As diffusers'
SD 2.x folders do, the last resblock is dropped and the config says one layer fewer, so the
model's last layer is the penultimate one (``unet.clip_text`` docstring). ``penultimate=False``
keeps every layer.

The ``*_config_from_ldm`` functions infer diffusers / transformers style config dicts from tensor
shapes. Shapes cannot tell everything; the documented rules for the rest:

* VAE ``norm_num_groups``: 32 (SD) or, when some width is not a multiple of 32, the largest divisor
  of 32 dividing every width; ``scaling_factor`` 0.18215 (SD 1.x / 2.x) unless given.
* text ``num_attention_heads``: hidden_size / 64 (every CLIP / OpenCLIP text tower SD uses has
  64-wide heads) unless given; ``hidden_act``: ``quick_gelu`` for OpenAI CLIP (SD 1.x), ``gelu``
  for OpenCLIP (SD 2.x).

A model whose settings break these rules needs its config from a diffusers folder.
"""
from __future__ import annotations

import math
import re
from typing import Dict, Mapping, Optional

import torch

from .errors import CheckpointError

__all__ = ["text_encoder_config_from_ldm", "text_encoder_state_from_ldm", "vae_config_from_ldm", "vae_state_from_ldm"]

VAE_PREFIX = "first_stage_model."
CLIP_PREFIX = "cond_stage_model.transformer."
OPENCLIP_PREFIX = "cond_stage_model.model."
SD_SCALING_FACTOR = 0.18215
CLIP_HEAD_WIDTH = 64

_RESNET_NAMES = {"norm1": "norm1", "conv1": "conv1", "norm2": "norm2", "conv2": "conv2", "nin_shortcut": "conv_shortcut"}
_ATTENTION_NAMES = {"norm": "group_norm", "q": "to_q", "k": "to_k", "v": "to_v", "proj_out": "to_out.0"}
_TENSOR = r"(weight|bias)"


def _vae_part(state_dict: Mapping[str, torch.Tensor]) -> Dict[str, torch.Tensor]:
    """The VAE's LDM keys without ``first_stage_model.`` (or a bare VAE file's keys)."""
    part = {k[len(VAE_PREFIX):]: v for k, v in state_dict.items() if k.startswith(VAE_PREFIX)}
    if not part:
        part = {k: v for k, v in state_dict.items() if k.split(".", 1)[0] in ("encoder", "decoder", "quant_conv", "post_quant_conv")}
    if "decoder.conv_in.weight" not in part:
        raise CheckpointError("no Stable Diffusion VAE in this checkpoint (no 'first_stage_model.decoder.conv_in.weight'): "
                              "expected an original single-file SD checkpoint or a bare LDM VAE file")
    return part


def _count(part: Mapping[str, torch.Tensor], pattern: str) -> int:
    """1 + the largest integer captured by ``pattern`` over the keys (0 if none matches)."""
    found = [int(m.group(1)) for m in (re.fullmatch(pattern, k) for k in part) if m]
    return max(found) + 1 if found else 0


def _vae_name(key: str, num_up: int) -> Optional[str]:
    """Our name for one LDM VAE key (without prefix), or None if it is no VAE parameter."""
    rules = (
        (rf"(encoder|decoder)\.(conv_in|conv_out)\.{_TENSOR}", lambda m: f"{m[1]}.{m[2]}.{m[3]}"),
        (rf"(encoder|decoder)\.norm_out\.{_TENSOR}", lambda m: f"{m[1]}.conv_norm_out.{m[2]}"),
        (rf"(post_quant_conv|quant_conv)\.{_TENSOR}", lambda m: f"{m[1]}.{m[2]}"),
        (rf"(encoder|decoder)\.mid\.block_([12])\.(\w+)\.{_TENSOR}",
         lambda m: f"{m[1]}.mid_block.resnets.{int(m[2]) - 1}.{_RESNET_NAMES[m[3]]}.{m[4]}" if m[3] in _RESNET_NAMES else None),
        (rf"(encoder|decoder)\.mid\.attn_1\.(\w+)\.{_TENSOR}",
         lambda m: f"{m[1]}.mid_block.attentions.0.{_ATTENTION_NAMES[m[2]]}.{m[3]}" if m[2] in _ATTENTION_NAMES else None),
        (rf"encoder\.down\.(\d+)\.block\.(\d+)\.(\w+)\.{_TENSOR}",
         lambda m: f"encoder.down_blocks.{m[1]}.resnets.{m[2]}.{_RESNET_NAMES[m[3]]}.{m[4]}" if m[3] in _RESNET_NAMES else None),
        (rf"encoder\.down\.(\d+)\.downsample\.conv\.{_TENSOR}", lambda m: f"encoder.down_blocks.{m[1]}.downsamplers.0.conv.{m[2]}"),
        (rf"decoder\.up\.(\d+)\.block\.(\d+)\.(\w+)\.{_TENSOR}",
         lambda m: (f"decoder.up_blocks.{num_up - 1 - int(m[1])}.resnets.{m[2]}.{_RESNET_NAMES[m[3]]}.{m[4]}"
                    if m[3] in _RESNET_NAMES else None)),
        (rf"decoder\.up\.(\d+)\.upsample\.conv\.{_TENSOR}",
         lambda m: f"decoder.up_blocks.{num_up - 1 - int(m[1])}.upsamplers.0.conv.{m[2]}"),
    )
    for pattern, rename in rules:
        match = re.fullmatch(pattern, key)
        if match:
            return rename(match)
    return None


def vae_state_from_ldm(state_dict: Mapping[str, torch.Tensor]) -> Dict[str, torch.Tensor]:
    """``first_stage_model.*`` (or a bare LDM VAE file) -> ``AutoencoderKL`` state dict (see the
    module docstring's table). Attention q/k/v/proj_out 1x1 conv weights [C, C, 1, 1] become linear
    weights [C, C]; every other tensor is passed through unchanged. Keys of the file that are no
    VAE parameter under the VAE prefix (e.g. a training loss's) -> one-line CheckpointError."""
    part = _vae_part(state_dict)
    num_up = _count(part, r"decoder\.up\.(\d+)\..*")
    ours: Dict[str, torch.Tensor] = {}
    unknown = []
    for key, tensor in part.items():
        name = _vae_name(key, num_up)
        if name is None:
            unknown.append(key)
            continue
        if ".attentions.0.to_" in name and name.endswith(".weight") and tensor.dim() == 4:
            if tuple(tensor.shape[2:]) != (1, 1):
                raise CheckpointError(f"VAE attention weight {key} has shape {tuple(tensor.shape)}; expected a 1x1 conv [C, C, 1, 1]")
            tensor = tensor.reshape(tensor.shape[0], tensor.shape[1])
        ours[name] = tensor
    if unknown:
        raise CheckpointError(f"{len(unknown)} VAE key(s) of this checkpoint are no AutoencoderKL parameter, e.g. "
                              f"{', '.join(sorted(unknown)[:3])}: is it a Stable Diffusion 1.x / 2.x checkpoint?")
    return ours


def vae_config_from_ldm(state_dict: Mapping[str, torch.Tensor], scaling_factor: float = SD_SCALING_FACTOR,
                        sample_size: int = 512) -> dict:
    """A diffusers ``vae/config.json``-style dict inferred from the LDM VAE's shapes (module
    docstring: ``norm_num_groups`` and ``scaling_factor`` by rule)."""
    part = _vae_part(state_dict)
    levels = _count(part, r"encoder\.down\.(\d+)\..*")
    widths = [int(part[f"encoder.down.{i}.block.0.conv1.weight"].shape[0]) for i in range(levels)]
    groups = math.gcd(32, *widths)
    return {
        "_class_name": "AutoencoderKL",
        "in_channels": int(part["encoder.conv_in.weight"].shape[1]),
        "out_channels": int(part["decoder.conv_out.weight"].shape[0]),
        "latent_channels": int(part["decoder.conv_in.weight"].shape[1]),
        "block_out_channels": widths,
        "down_block_types": ["DownEncoderBlock2D"] * levels,
        "up_block_types": ["UpDecoderBlock2D"] * levels,
        "layers_per_block": _count(part, r"encoder\.down\.0\.block\.(\d+)\..*"),
        "act_fn": "silu",
        "norm_num_groups": groups,
        "mid_block_add_attention": "decoder.mid.attn_1.q.weight" in part,
        "use_quant_conv": "quant_conv.weight" in part,
        "use_post_quant_conv": "post_quant_conv.weight" in part,
        "scaling_factor": scaling_factor,
        "sample_size": sample_size,
    }


def _text_layout(state_dict: Mapping[str, torch.Tensor]) -> str:
    """"clip" (SD 1.x, transformers names) or "openclip" (SD 2.x); CheckpointError if neither."""
    if any(k.startswith(CLIP_PREFIX) for k in state_dict):
        return "clip"
    if any(k.startswith(OPENCLIP_PREFIX) for k in state_dict):
        return "openclip"
    raise CheckpointError("no Stable Diffusion text encoder in this checkpoint (no 'cond_stage_model.transformer.*' "
                          "(SD 1.x) or 'cond_stage_model.model.*' (SD 2.x) keys)")


def _clip_state(state_dict: Mapping[str, torch.Tensor]) -> Dict[str, torch.Tensor]:
    ours = {}
    for key, tensor in state_dict.items():
        if not key.startswith(CLIP_PREFIX):
            continue
        name = key[len(CLIP_PREFIX):]
        if not name.startswith("text_model."):            # files saved from a bare CLIPTextTransformer
            name = "text_model." + name
        if name != "text_model.embeddings.position_ids":   # legacy buffer, always 0..L-1
            ours[name] = tensor
    return ours


_OPENCLIP_LAYER_NAMES = {"ln_1": "layer_norm1", "ln_2": "layer_norm2", "attn.out_proj": "self_attn.out_proj",
                         "mlp.c_fc": "mlp.fc1", "mlp.c_proj": "mlp.fc2"}
_OPENCLIP_DROPPED = ("text_projection", "logit_scale", "attn_mask")


def _openclip_state(state_dict: Mapping[str, torch.Tensor], penultimate: bool) -> Dict[str, torch.Tensor]:
    part = {k[len(OPENCLIP_PREFIX):]: v for k, v in state_dict.items() if k.startswith(OPENCLIP_PREFIX)}
    layers = _count(part, r"transformer\.resblocks\.(\d+)\..*")
    kept = layers - 1 if penultimate else layers
    ours, unknown = {}, []
    for key, tensor in part.items():
        if key in _OPENCLIP_DROPPED or key.startswith("visual."):
            continue
        if key == "token_embedding.weight":
            ours["text_model.embeddings.token_embedding.weight"] = tensor
        elif key == "positional_embedding":
            ours["text_model.embeddings.position_embedding.weight"] = tensor
        elif (match := re.fullmatch(rf"ln_final\.{_TENSOR}", key)):
            ours[f"text_model.final_layer_norm.{match[1]}"] = tensor
        elif (match := re.fullmatch(r"transformer\.resblocks\.(\d+)\.attn\.in_proj_(weight|bias)", key)):
            layer, kind = int(match[1]), match[2]
            if layer < kept:                          # fused [q; k; v] rows -> three projections
                for proj, rows in zip(("q_proj", "k_proj", "v_proj"), tensor.chunk(3, dim=0)):
                    ours[f"text_model.encoder.layers.{layer}.self_attn.{proj}.{kind}"] = rows
        elif (match := re.fullmatch(rf"transformer\.resblocks\.(\d+)\.(.+)\.{_TENSOR}", key)) and match[2] in _OPENCLIP_LAYER_NAMES:
            layer, module, kind = int(match[1]), match[2], match[3]
            if layer < kept:
                ours[f"text_model.encoder.layers.{layer}.{_OPENCLIP_LAYER_NAMES[module]}.{kind}"] = tensor
        else:
            unknown.append(key)
    if unknown:
        raise CheckpointError(f"{len(unknown)} OpenCLIP key(s) of this checkpoint have no CLIPTextModel counterpart, e.g. "
                              f"{', '.join(sorted(unknown)[:3])}: is it a Stable Diffusion 2.x checkpoint?")
    return ours


def text_encoder_state_from_ldm(state_dict: Mapping[str, torch.Tensor], penultimate: bool = True) -> Dict[str, torch.Tensor]:
    """The single file's text encoder -> ``CLIPTextModel`` state dict (SD 1.x CLIP or SD 2.x
    OpenCLIP layout, module docstring). For OpenCLIP, ``penultimate`` drops the last layer (SD 2.x)."""
    if _text_layout(state_dict) == "clip":
        return _clip_state(state_dict)
    return _openclip_state(state_dict, penultimate)


def text_encoder_config_from_ldm(state_dict: Mapping[str, torch.Tensor], num_attention_heads: Optional[int] = None,
                                 penultimate: bool = True) -> dict:
    """A transformers ``text_encoder/config.json``-style dict inferred from the shapes of
    ``text_encoder_state_from_ldm(state_dict, penultimate)`` (heads = hidden / 64 unless given)."""
    layout = _text_layout(state_dict)
    ours = text_encoder_state_from_ldm(state_dict, penultimate)
    vocab_size, hidden_size = ours["text_model.embeddings.token_embedding.weight"].shape
    layers = _count(ours, r"text_model\.encoder\.layers\.(\d+)\..*")
    if num_attention_heads is None:
        if hidden_size % CLIP_HEAD_WIDTH:
            raise CheckpointError(f"cannot infer the text encoder's heads: hidden size {hidden_size} is not a multiple of "
                                  f"CLIP's head width {CLIP_HEAD_WIDTH}; take the config from a diffusers folder")
        num_attention_heads = hidden_size // CLIP_HEAD_WIDTH
    return {
        "architectures": ["CLIPTextModel"],
        "model_type": "clip_text_model",
        "vocab_size": int(vocab_size),
        "hidden_size": int(hidden_size),
        "intermediate_size": int(ours["text_model.encoder.layers.0.mlp.fc1.weight"].shape[0]),
        "num_hidden_layers": layers,
        "num_attention_heads": int(num_attention_heads),
        "max_position_embeddings": int(ours["text_model.embeddings.position_embedding.weight"].shape[0]),
        "hidden_act": "quick_gelu" if layout == "clip" else "gelu",
        "layer_norm_eps": 1e-5,
    }
