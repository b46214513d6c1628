"""What an OFFICIAL-format state dict reveals about its network, and which flag is wrong.

An official checkpoint is a bare ``{name: tensor}`` dict with guided-diffusion / improved-diffusion
parameter names (ECOSYSTEM.md section 3.2): ``time_embed.{0,2}``, ``label_emb``,
``input_blocks.i.j...``, ``middle_block.{0,1,2}``, ``output_blocks.i.j...``, ``out.{0,2}``;
ResBlock ``in_layers.{0,2}``, ``emb_layers.1``, ``out_layers.{0,3}``, ``skip_connection``;
AttentionBlock ``norm``, ``qkv``, ``proj_out``; Downsample ``op``, Upsample ``conv``; the
classifier's attention pool ``out.2.{positional_embedding,qkv_proj,c_proj}``.

Shapes reveal (ECOSYSTEM.md section 3.4): num_channels (``time_embed.0.weight`` is (4C, C)),
channel_mult (ResBlock widths), num_res_blocks (where the first upsampler sits), resblock_updown
(ResBlock vs ``op`` / ``conv`` resamplers), attention levels (``.1.qkv.weight``), class_cond
(``label_emb.weight``), learn_sigma (``out.2`` has 6 vs 3 outputs), use_scale_shift_norm
(``emb_layers.1`` gives 2x the block width), an upsampler (6 input channels). They do NOT reveal
heads, attention order, schedule, steps, rescale_timesteps or dropout: those come from presets.

Everything here reads only ``.shape`` and ``.numel()``, so it works on ``device="meta"`` tensors.
"""
from __future__ import annotations

import re
from collections import defaultdict
from typing import Any, Dict, List, Mapping, Optional, Tuple

from unet.config import EncoderUNetConfig, UNetConfig

from .errors import CheckpointError
from .flags import (CLASSIFIER_CHANNEL_MULT, GUIDED_CHANNEL_MULT, IMPROVED_CHANNEL_MULT,
                    attention_factors)

__all__ = ["infer_structure", "diagnose_mismatch", "diagnose_classifier_mismatch",
           "attention_resolutions_for", "count_parameters"]

_BLOCK_KEY = re.compile(r"^(input_blocks|output_blocks|middle_block)\.(?:(\d+)\.)?(\d+)\.(.+)$")


def count_parameters(state_dict: Mapping[str, Any]) -> int:
    """Total number of elements over the tensor values (non-tensors are skipped)."""
    return sum(int(v.numel()) for v in state_dict.values() if hasattr(v, "numel"))


def _kind(keys) -> str:
    if "state" in keys and "param_groups" in keys:
        return "optimizer"
    if "time_embed.0.weight" not in keys or not any(k.startswith("input_blocks.") for k in keys):
        return "unknown"
    if any(k.startswith("output_blocks.") for k in keys):
        return "unet"
    if any(k.startswith("out.") for k in keys):
        return "classifier"
    return "unknown"


def _mult(width: int, channels: int) -> float | int:
    m = width / channels
    return int(m) if float(m).is_integer() else m


class _Blocks:
    """Official ``input_blocks`` / ``output_blocks`` grouped as index -> position -> {suffix: shape}."""

    def __init__(self, state_dict: Mapping[str, Any], prefix: str):
        table: Dict[int, Dict[int, Dict[str, Tuple[int, ...]]]] = defaultdict(lambda: defaultdict(dict))
        for key, value in state_dict.items():
            match = _BLOCK_KEY.match(key)
            if match and match.group(1) == prefix and match.group(2) is not None and hasattr(value, "shape"):
                table[int(match.group(2))][int(match.group(3))][match.group(4)] = tuple(value.shape)
        self.table = table
        self.count = (max(table) + 1) if table else 0

    def part(self, index: int, position: int) -> Dict[str, Tuple[int, ...]]:
        return self.table.get(index, {}).get(position, {})

    def kind(self, index: int, position: int) -> Optional[str]:
        """"res", "attn", "op" (conv Downsample), "conv" (conv Upsample), "plain" (input conv) or None."""
        part = self.part(index, position)
        if "in_layers.2.weight" in part:
            return "res"
        if "qkv.weight" in part:
            return "attn"
        if "op.weight" in part:
            return "op"
        if "conv.weight" in part:
            return "conv"
        if "weight" in part:
            return "plain"
        return None

    def res(self, index: int, position: int = 0) -> Optional[Tuple[int, int, bool]]:
        """(in width, out width, has skip conv) of a ResBlock, or None."""
        part = self.part(index, position)
        shape = part.get("in_layers.2.weight")
        if shape is None:
            return None
        return shape[1], shape[0], "skip_connection.weight" in part


def _resblock_scale_shift(state_dict: Mapping[str, Any], prefix: str) -> Optional[bool]:
    emb = state_dict.get(f"{prefix}.emb_layers.1.weight")
    norm = state_dict.get(f"{prefix}.out_layers.0.weight")
    if emb is None or norm is None:
        return None
    return tuple(emb.shape)[0] == 2 * tuple(norm.shape)[0]


def _encoder_layout(blocks: _Blocks, channels: int, nrb: int, levels: int) -> Optional[Dict[str, Any]]:
    """Check an input_blocks layout for (num_res_blocks, levels); return widths/attention or None."""
    if blocks.count != 1 + levels * nrb + (levels - 1):
        return None
    widths, attention, down_kinds = [], [], set()
    for level in range(levels):
        base = 1 + level * (nrb + 1)
        level_widths, level_attn = set(), set()
        for j in range(nrb):
            res = blocks.res(base + j)
            if res is None or blocks.kind(base + j, 2) is not None:
                return None
            if j > 0 and (res[0] != res[1] or res[2]):
                return None                      # only a level's first ResBlock may change width
            level_widths.add(res[1])
            level_attn.add(blocks.kind(base + j, 1) == "attn")
        if len(level_widths) != 1 or len(level_attn) != 1:
            return None
        widths.append(level_widths.pop())
        attention.append(level_attn.pop())
        if level < levels - 1:
            down = base + nrb
            kind = blocks.kind(down, 0)
            if kind == "res":
                res = blocks.res(down)
                if res[0] != res[1] or res[2] or blocks.kind(down, 1) is not None:
                    return None
                down_kinds.add("res")
            elif kind == "op":
                down_kinds.add("op")
            else:
                return None
    if len(down_kinds) > 1:
        return None
    return {
        "channel_mult": tuple(_mult(w, channels) for w in widths),
        "attention_ds": tuple(2 ** level for level, on in enumerate(attention) if on),
        "resblock_updown": (down_kinds.pop() == "res") if down_kinds else None,
    }


def _infer_unet(state_dict: Mapping[str, Any], info: Dict[str, Any]) -> None:
    channels = info["model_channels"]
    inputs, outputs = _Blocks(state_dict, "input_blocks"), _Blocks(state_dict, "output_blocks")
    first_up, up_kind = None, None
    for index in range(outputs.count):
        for position in (1, 2):
            kind = outputs.kind(index, position)
            if kind in ("res", "conv"):
                first_up, up_kind = index, kind
                break
        if first_up is not None:
            break
    nrb = first_up if first_up is not None else outputs.count - 1
    if nrb < 1 or outputs.count % (nrb + 1):
        raise CheckpointError(f"output_blocks has {outputs.count} blocks with the first upsampler at {first_up}: not an official U-Net layout (truncated or renamed state dict?)")
    levels = outputs.count // (nrb + 1)
    layout = _encoder_layout(inputs, channels, nrb, levels)
    if layout is None:
        raise CheckpointError(f"input_blocks ({inputs.count} blocks) do not fit the {levels} levels x {nrb} ResBlocks read from output_blocks: not an official U-Net layout (truncated or renamed state dict?)")
    if up_kind is not None:
        updown = up_kind == "res"
        if layout["resblock_updown"] is not None and layout["resblock_updown"] != updown:
            raise CheckpointError("down- and upsamplers disagree (ResBlock on one side, conv on the other): not an official U-Net layout")
        layout["resblock_updown"] = updown
    info.update(num_res_blocks=nrb, num_levels=levels, **layout)

    in_ch = tuple(state_dict["input_blocks.0.0.weight"].shape)[1]
    out = state_dict.get("out.2.weight")
    out_ch = tuple(out.shape)[0] if out is not None else None
    if out_ch == 2 * in_ch:
        learn_sigma, super_res = True, False
    elif in_ch == out_ch == 6:                   # official upsamplers: RGB + upsampled RGB, learned sigma
        learn_sigma, super_res = True, True
    elif out_ch is not None and in_ch == 2 * out_ch:
        learn_sigma, super_res = False, True
    else:
        learn_sigma, super_res = False, False
    label = state_dict.get("label_emb.weight")
    info.update(
        in_channels=in_ch,
        out_channels=out_ch,
        learn_sigma=learn_sigma,
        super_res=super_res,
        num_classes=tuple(label.shape)[0] if label is not None else None,
        class_cond=label is not None,
        use_scale_shift_norm=_resblock_scale_shift(state_dict, "middle_block.0"),
    )


def _infer_classifier(state_dict: Mapping[str, Any], info: Dict[str, Any]) -> None:
    channels = info["model_channels"]
    inputs = _Blocks(state_dict, "input_blocks")
    pos = state_dict.get("out.2.positional_embedding")
    out0 = state_dict.get("out.0.weight")
    if pos is not None:
        pool, out_ch = "attention", tuple(state_dict["out.2.c_proj.weight"].shape)[0]
    elif out0 is not None and len(tuple(out0.shape)) == 1 and "out.3.weight" in state_dict:
        pool, out_ch = "adaptive", tuple(state_dict["out.3.weight"].shape)[0]
    elif "out.3.weight" in state_dict:
        pool, out_ch = "spatial_v2", tuple(state_dict["out.3.weight"].shape)[0]
    elif "out.2.weight" in state_dict:
        pool, out_ch = "spatial", tuple(state_dict["out.2.weight"].shape)[0]
    else:
        pool, out_ch = None, None
    side = None
    if pos is not None:
        tokens = tuple(pos.shape)[1] - 1
        side = int(round(tokens ** 0.5))
        side = side if side * side == tokens else None

    candidates = []
    for nrb in range(1, inputs.count):
        if inputs.count % (nrb + 1):
            continue
        levels = inputs.count // (nrb + 1)
        layout = _encoder_layout(inputs, channels, nrb, levels)
        if layout is not None:
            image = side * 2 ** (levels - 1) if side else None
            candidates.append((nrb, levels, layout, image))
    if not candidates:
        raise CheckpointError(f"classifier input_blocks ({inputs.count} blocks) fit no official level layout: truncated or renamed state dict?")

    def official(c) -> bool:                    # tie-break: the create_classifier size table
        mult = CLASSIFIER_CHANNEL_MULT.get(c[3])
        return mult is not None and tuple(float(m) for m in mult) == tuple(float(m) for m in c[2]["channel_mult"])
    candidates.sort(key=lambda c: (not official(c), c[0]))
    nrb, levels, layout, image = candidates[0]
    info.update(num_res_blocks=nrb, num_levels=levels, **layout,
                in_channels=tuple(state_dict["input_blocks.0.0.weight"].shape)[1],
                out_channels=out_ch, pool=pool, image_size=image, final_side=side,
                use_scale_shift_norm=_resblock_scale_shift(state_dict, "middle_block.0"),
                ambiguous_layout=len(candidates) > 1 and not (official(candidates[0]) and not official(candidates[1])))


def infer_structure(state_dict: Mapping[str, Any]) -> Dict[str, Any]:
    """Read the architecture that an official-format state dict's names and shapes reveal.

    Returns a dict with at least ``kind`` ("unet" | "classifier" | "optimizer" | "unknown") and
    ``num_params``. For "unet" and "classifier" also: ``model_channels``, ``in_channels``,
    ``out_channels``, ``num_res_blocks``, ``num_levels``, ``channel_mult`` (widths / C; 0.5 possible),
    ``attention_ds`` (downsample factors 1, 2, 4, ... of the levels with attention: the image size is
    not in the weights, so converting to ``--attention_resolutions`` pixels is the caller's job, see
    :func:`attention_resolutions_for`), ``resblock_updown`` (None when there is no resampler),
    ``use_scale_shift_norm``. "unet" adds ``learn_sigma``, ``super_res`` (6 input channels),
    ``num_classes``, ``class_cond``; "classifier" adds ``pool``, ``final_side`` and ``image_size``
    (from the attention pool's positional embedding) and ``ambiguous_layout``.

    Raises CheckpointError when the names are official but the block layout is not.
    """
    keys = set(state_dict.keys())
    info: Dict[str, Any] = {"kind": _kind(keys), "num_params": count_parameters(state_dict)}
    if info["kind"] not in ("unet", "classifier"):
        return info
    try:
        emb = tuple(state_dict["time_embed.0.weight"].shape)
        info["model_channels"] = emb[1]
        info["time_embed_dim"] = emb[0]
        if info["kind"] == "unet":
            _infer_unet(state_dict, info)
        else:
            _infer_classifier(state_dict, info)
    except (KeyError, IndexError, TypeError, AttributeError) as exc:
        raise CheckpointError(f"official key names but an unexpected layout ({type(exc).__name__}: {exc}): truncated or renamed state dict?") from None
    return info


def attention_resolutions_for(structure: Mapping[str, Any], image_size: int) -> Tuple[int, ...]:
    """Attention levels of ``infer_structure`` as ``--attention_resolutions`` pixels for ``image_size``."""
    return tuple(image_size // ds for ds in sorted(structure["attention_ds"]))


def _csv(values) -> str:
    return ",".join(str(int(v)) if float(v).is_integer() else str(v) for v in values)


def _same_mult(a, b) -> bool:
    return tuple(float(x) for x in a) == tuple(float(x) for x in b)


def _size_hint(mult, tables) -> str:
    sizes = sorted({s for table in tables for s, m in table.items() if _same_mult(m, mult)})
    return f"--image_size {sizes[0]} (whose default channel_mult this is) or " if sizes else ""


def _kind_problem(kind: str, wanted: str) -> Optional[str]:
    if kind == wanted:
        return None
    if kind == "optimizer":
        return "this file holds optimizer state (keys state, param_groups), not model weights: use the ema_*.pt or model*.pt file instead of opt*.pt"
    if kind == "classifier" and wanted == "unet":
        return "this is a noisy-image classifier checkpoint (EncoderUNet), not a diffusion U-Net: pass it as --classifier_path"
    if kind == "unet" and wanted == "classifier":
        return "this is a diffusion U-Net checkpoint, not a classifier: pass it as --model_path and the *_classifier.pt file as --classifier_path"
    return "the state dict has no official key names (time_embed.0.weight, input_blocks.*, output_blocks.*): it is not an official ADM/IDDPM checkpoint (already converted, or renamed?)"


def diagnose_mismatch(state_dict: Mapping[str, Any], unet_config: UNetConfig) -> Optional[str]:
    """ONE line naming the official flag most likely wrong for this checkpoint, or None if it fits.

    Checks, in this order: file kind, upsampler vs base model, learn_sigma, class_cond,
    num_channels, channel_mult (levels; hinting the --image_size that defaults to it),
    num_res_blocks, resblock_updown, use_scale_shift_norm, attention_resolutions. Settings the
    weights cannot show (heads, attention order, schedule, steps, rescale_timesteps, dropout) are
    not checked: they come from presets.
    """
    s = infer_structure(state_dict)
    problem = _kind_problem(s["kind"], "unet")
    if problem:
        return problem
    c = unet_config
    if s["super_res"] and not c.super_res:
        return f"checkpoint is an upsampler ({s['in_channels']} input channels: noisy image + upsampled low-res image): use the upsampler flags --large_size/--small_size (super_res_sample.py)"
    if c.super_res and not s["super_res"]:
        return f"checkpoint takes {s['in_channels']} input channels (a base model, not an upsampler): drop --large_size/--small_size and pass --image_size"
    if s["learn_sigma"] != c.learn_sigma:
        if s["learn_sigma"]:
            return f"checkpoint predicts the variance ({s['out_channels']} output channels): pass --learn_sigma True"
        return f"checkpoint does not predict the variance ({s['out_channels']} output channels): pass --learn_sigma False"
    if s["class_cond"] and c.num_classes is None:
        return f"checkpoint is class-conditional (label_emb.weight has {s['num_classes']} classes): pass --class_cond True"
    if not s["class_cond"] and c.num_classes is not None:
        return "checkpoint is unconditional (no label_emb.weight): pass --class_cond False"
    if s["class_cond"] and s["num_classes"] != c.num_classes:
        return f"checkpoint has {s['num_classes']} classes (label_emb.weight) but the config says {c.num_classes}: official flags always mean 1000 classes"
    if s["model_channels"] != c.model_channels:
        return f"checkpoint has num_channels {s['model_channels']} (time_embed.0.weight is {s['time_embed_dim']}x{s['model_channels']}) but the flags say {c.model_channels}: pass --num_channels {s['model_channels']}"
    if not _same_mult(s["channel_mult"], c.channel_mult):
        mult = _csv(s["channel_mult"])
        hint = _size_hint(s["channel_mult"], (GUIDED_CHANNEL_MULT, IMPROVED_CHANNEL_MULT))
        return f"checkpoint has channel_mult {mult} ({s['num_levels']} levels) but the flags give {_csv(c.channel_mult)} (image_size {c.image_size}): pass {hint}--channel_mult {mult}"
    if s["num_res_blocks"] != c.num_res_blocks:
        return f"checkpoint has {s['num_res_blocks']} ResBlocks per level but the flags say {c.num_res_blocks}: pass --num_res_blocks {s['num_res_blocks']}"
    if s["resblock_updown"] is not None and s["resblock_updown"] != c.resblock_updown:
        if s["resblock_updown"]:
            return "checkpoint resamples with ResBlocks (input_blocks.N.0.in_layers where a Downsample op would be): pass --resblock_updown True"
        return "checkpoint resamples with convolutions (input_blocks.N.0.op.weight): pass --resblock_updown False"
    if s["use_scale_shift_norm"] is not None and s["use_scale_shift_norm"] != c.use_scale_shift_norm:
        if s["use_scale_shift_norm"]:
            return "checkpoint uses scale-shift norm (emb_layers.1 outputs twice the block width): pass --use_scale_shift_norm True"
        return "checkpoint does not use scale-shift norm (emb_layers.1 outputs the block width): pass --use_scale_shift_norm False"
    if tuple(s["attention_ds"]) != attention_factors(c):
        want = _csv(attention_resolutions_for(s, c.image_size))
        have = _csv(sorted({c.image_size // ds for ds in attention_factors(c)}, reverse=True)) or "none"
        return (f"checkpoint has attention at downsample factors {_csv(s['attention_ds'])} but the flags give "
                f"{have} px at image_size {c.image_size}: pass --attention_resolutions {want} (or check --image_size)")
    return None


def diagnose_classifier_mismatch(state_dict: Mapping[str, Any], config: EncoderUNetConfig) -> Optional[str]:
    """ONE line naming the ``--classifier_*`` (or ``--image_size``) flag most likely wrong, or None."""
    s = infer_structure(state_dict)
    problem = _kind_problem(s["kind"], "classifier")
    if problem:
        return problem
    c = config
    if s["model_channels"] != c.model_channels:
        return f"classifier has width {s['model_channels']} (time_embed.0.weight is {s['time_embed_dim']}x{s['model_channels']}) but the flags say {c.model_channels}: pass --classifier_width {s['model_channels']}"
    if not _same_mult(s["channel_mult"], c.channel_mult):
        sizes = sorted(k for k, m in CLASSIFIER_CHANNEL_MULT.items() if _same_mult(m, s["channel_mult"]))
        fix = f"pass --image_size {sizes[0]}" if sizes else "it is not an official classifier layout"
        return f"classifier has channel_mult {_csv(s['channel_mult'])} but --image_size {c.image_size} gives {_csv(c.channel_mult)}: {fix}"
    if s["num_res_blocks"] != c.num_res_blocks:
        return f"classifier has {s['num_res_blocks']} ResBlocks per level but the flags say {c.num_res_blocks}: pass --classifier_depth {s['num_res_blocks']}"
    if s["pool"] != c.pool:
        return f"classifier head is {s['pool']!r} pooling but the flags say {c.pool!r}: pass --classifier_pool {s['pool']}"
    if s["out_channels"] != c.out_channels:
        return f"classifier has {s['out_channels']} classes but the config says {c.out_channels}"
    if s["image_size"] is not None and s["image_size"] != c.image_size:
        return f"classifier attention pool is built for image_size {s['image_size']} ({s['final_side']}x{s['final_side']} final grid) but the flags say {c.image_size}: pass --image_size {s['image_size']}"
    if s["resblock_updown"] is not None and s["resblock_updown"] != c.resblock_updown:
        return f"classifier {'resamples with ResBlocks' if s['resblock_updown'] else 'resamples with convolutions'}: pass --classifier_resblock_updown {s['resblock_updown']}"
    if s["use_scale_shift_norm"] is not None and s["use_scale_shift_norm"] != c.use_scale_shift_norm:
        return f"classifier {'uses' if s['use_scale_shift_norm'] else 'does not use'} scale-shift norm: pass --classifier_use_scale_shift_norm {s['use_scale_shift_norm']}"
    if tuple(s["attention_ds"]) != attention_factors(c):
        want = _csv(attention_resolutions_for(s, c.image_size))
        return f"classifier has attention at downsample factors {_csv(s['attention_ds'])}: pass --classifier_attention_resolutions {want} (for image_size {c.image_size})"
    return None
