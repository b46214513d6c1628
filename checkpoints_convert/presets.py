"""Every released OpenAI checkpoint: its flags, size, recommended sampling and SAG settings.

23 files (ECOSYSTEM.md section 3.3; guided-diffusion and improved-diffusion READMEs):

* guided-diffusion (``.../diffusion/jul-2021/<file>``), 15 files: 11 diffusion models -- 5 ImageNet
  base models (64, 128, 256, 256 uncond, 512), 4 LSUN models (bedroom, cat, horse,
  horse_nodropout) and 2 upsamplers (64->256, 128->512) -- plus 4 classifiers (64/128/256/512).
  (The issue text's "10 guided-diffusion models + 2 upsamplers" miscounts the base models: the
  README lists 9 base + 2 upsampler files, i.e. 11.)
* improved-diffusion (``.../diffusion/march-2021/<file>``), 8 files: ImageNet-64 uncond
  (hybrid, vlb), CIFAR-10 uncond (hybrid, vlb), ImageNet-64 cond, the 64->256 upsampler and two
  LSUN-bedroom models.

``official_flags`` holds the README command-line flags as the README writes them (strings); where
the README relies on a script default that :func:`~checkpoints_convert.flags.resolve_flags` would
not otherwise know, the preset spells it out (the improved-diffusion upsampler's
``--large_size 256 --small_size 64``, the classifiers' ``classifier_*`` defaults) and says so in
``notes``. The improved-diffusion README flags contain no improved-only name, so they do not tell
their repository by themselves: a preset resolves them with its own ``family`` (``Preset.resolved``),
and loading a recognised file does the same (``checkpoints_convert.resolve``). Flags the weights
cannot reveal (heads, attention order, schedule, steps, rescale_timesteps) are only trustworthy from
here (ECOSYSTEM.md section 3.4).

Parameter counts are ECOSYSTEM.md's measurements of the official modules; the tests rebuild every
count from the flags with an independent shape generator. No SHA-256 of the released files was
available offline, so ``sha256`` is None everywhere (UNVERIFIED); detection uses structure and
parameter count, and files with identical shapes are reported as a group by :func:`candidates_for`.
"""
from __future__ import annotations

import difflib
import os
from dataclasses import dataclass, field
from functools import lru_cache
from typing import Any, Dict, List, Literal, Mapping, Optional, Tuple

from diffusion.config import DiffusionConfig
from unet.config import EncoderUNetConfig, UNetConfig

from .errors import CheckpointError, FlagError
from .flags import (ResolvedFlags, attention_factors, classifier_config_from_flags,
                    diffusion_config_from_flags, resolve_flags, unet_config_from_flags)
from .inspect_official import count_parameters, infer_structure

__all__ = ["Preset", "PRESETS", "preset_flags", "resolve_preset_name", "candidates_for", "detect_preset"]

GUIDED_URL = "https://openaipublic.blob.core.windows.net/diffusion/jul-2021/"
IMPROVED_URL = "https://openaipublic.blob.core.windows.net/diffusion/march-2021/"


@dataclass(frozen=True)
class Preset:
    """One released checkpoint file."""
    name: str                                   # file name without ".pt"
    filename: str
    url: str
    family: Literal["guided", "improved"]
    kind: Literal["diffusion", "classifier", "upsampler"]
    official_flags: Dict[str, Any]              # README flags, verbatim strings (see module docstring)
    num_params: Optional[int]                   # ECOSYSTEM.md 3.3 measurement; None where not given
    sampling: Dict[str, Any]                    # the README's sampling flags (respacing, classifier + scale)
    sag: Optional[Dict[str, Any]] = None        # SAG README settings (paper s), None where it gives none
    group: Optional[str] = None                 # files whose shapes are identical share a group
    published: str = ""                         # published FID (source named)
    notes: str = ""
    sha256: Optional[str] = None                # UNVERIFIED: not available offline

    def resolved(self) -> ResolvedFlags:
        return resolve_flags(self.official_flags, self.family)

    def unet_config(self) -> UNetConfig:
        return unet_config_from_flags(self.resolved())

    def diffusion_config(self) -> DiffusionConfig:
        return diffusion_config_from_flags(self.resolved())

    def classifier_config(self) -> EncoderUNetConfig:
        return classifier_config_from_flags(self.resolved())


def _sag(scale: float, blur_sigma: float, site: str, *, official_num_heads: int = 4, classifier_scale: float = 0.0,
         note: str = "") -> Dict[str, Any]:
    """SAG README settings in our terms: paper s (README --guide_scale = 1 + s), DDPM-250, guide_start 250."""
    out = {"scale": scale, "official_guide_scale": round(1.0 + scale, 12), "blur_sigma": float(blur_sigma),
           "site": site, "guide_start": 250, "map_mode": "official", "official_num_heads": official_num_heads,
           "timestep_respacing": "250", "classifier_scale": classifier_scale}
    if note:
        out["note"] = note
    return out


_ADM = {"attention_resolutions": "32,16,8", "diffusion_steps": "1000", "learn_sigma": "True",
        "resblock_updown": "True", "use_fp16": "True", "use_scale_shift_norm": "True"}
_ADM_256 = dict(_ADM, image_size="256", noise_schedule="linear", num_channels="256", num_head_channels="64",
                num_res_blocks="2")
_LSUN = dict(_ADM_256, class_cond="False", dropout="0.1")


def _g(name, kind, flags, num_params, sampling, **kw) -> Preset:
    return Preset(name=name, filename=f"{name}.pt", url=f"{GUIDED_URL}{name}.pt", family="guided", kind=kind,
                  official_flags=flags, num_params=num_params, sampling=sampling, **kw)


def _i(name, kind, flags, num_params, **kw) -> Preset:
    return Preset(name=name, filename=f"{name}.pt", url=f"{IMPROVED_URL}{name}.pt", family="improved", kind=kind,
                  official_flags=flags, num_params=num_params,
                  sampling={"timestep_respacing": ""}, **kw)   # README gives no respacing: the full chain


def _classifier(size: int, depth: int) -> Preset:
    flags = {"image_size": str(size), "classifier_attention_resolutions": "32,16,8", "classifier_depth": str(depth),
             "classifier_width": "128", "classifier_pool": "attention", "classifier_resblock_updown": "True",
             "classifier_use_scale_shift_norm": "True"}
    return _g(f"{size}x{size}_classifier", "classifier", flags, None, {},
              published="no FID of its own: guides the ADM-G runs of the diffusion presets",
              notes="README passes only --classifier_depth 4 (64x64) and --image_size; the other classifier_* "
                    "flags are classifier_defaults() made explicit (they equal the README's training flags)")


_PRESET_LIST: List[Preset] = [
    # -- guided-diffusion ImageNet base models -------------------------------------------------
    _g("64x64_diffusion", "diffusion",
       dict(_ADM, class_cond="True", dropout="0.1", image_size="64", noise_schedule="cosine", num_channels="192",
            num_head_channels="64", num_res_blocks="3", use_new_attention_order="True"),
       295_904_454, {"timestep_respacing": "250", "classifier": "64x64_classifier", "classifier_scale": 1.0},
       published="ADM-G ImageNet 64: FID 2.07 (GD README)",
       notes="new attention order; SAG's official map assumes the legacy layout (SPEC Q2); no SAG README settings"),
    _g("128x128_diffusion", "diffusion",
       dict(_ADM, class_cond="True", image_size="128", noise_schedule="linear", num_channels="256", num_heads="4",
            num_res_blocks="2"),
       421_529_606, {"timestep_respacing": "250", "classifier": "128x128_classifier", "classifier_scale": 0.5},
       sag=_sag(0.1, 3, "output.8", classifier_scale=0.5,
                note="SAG README: DDPM-250 with CG 0.5; DDIM variant ddim25 / guide_start 25 / CG 1.0"),
       published="ADM-G 128: FID 2.97 (GD README); SAG README 250 steps: 5.91 -> 5.11 without CG, 2.97 -> 2.58 with CG"),
    _g("256x256_diffusion", "diffusion",
       dict(_ADM_256, class_cond="True", noise_schedule="linear"),
       553_838_086, {"timestep_respacing": "250", "classifier": "256x256_classifier", "classifier_scale": 1.0},
       sag=_sag(0.2, 9, "output.2",
                note="SAG README table gives only s = 0.2; blur_sigma 9 and output.2 assumed as for 256 uncond"),
       published="ADM-G 256: FID 4.59 (GD README); SAG README 250 steps, no CG: 10.94 -> 9.41 (s 0.2)"),
    _g("256x256_diffusion_uncond", "diffusion",
       dict(_ADM_256, class_cond="False", noise_schedule="linear"),
       552_814_086, {"timestep_respacing": "250", "classifier": "256x256_classifier", "classifier_scale": 10.0},
       sag=_sag(0.5, 9, "output.2", note="SAG README: --guide_scale 1.5, CG off; table also s 0.8 (FID 20.08)"),
       group="adm256_uncond_shape",
       published="SAG README 250 steps: FID 26.21 -> 20.31 (s 0.5), 20.08 (s 0.8)"),
    _g("512x512_diffusion", "diffusion",
       dict(_ADM, class_cond="True", image_size="512", noise_schedule="linear", num_channels="256",
            num_head_channels="64", num_res_blocks="2", use_fp16="False"),
       558_997_638, {"timestep_respacing": "250", "classifier": "512x512_classifier", "classifier_scale": 4.0},
       published="ADM-G 512: FID 7.72 (GD README)"),
    # -- guided-diffusion upsamplers -----------------------------------------------------------
    _g("64_256_upsampler", "upsampler",
       dict(_ADM, class_cond="True", large_size="256", small_size="64", noise_schedule="linear",
            num_channels="192", num_heads="4", num_res_blocks="2"),
       311_795_910, {"timestep_respacing": "250"},
       published="ADM-G + upsampling 256: FID 3.94 (GD README)"),
    _g("128_512_upsampler", "upsampler",
       dict(_ADM, attention_resolutions="32,16", class_cond="True", large_size="512", small_size="128",
            noise_schedule="linear", num_channels="192", num_head_channels="64", num_res_blocks="2"),
       308_835_270, {"timestep_respacing": "250"},
       published="ADM-G + upsampling 512: FID 3.85 (GD README)"),
    # -- guided-diffusion LSUN (same shapes as 256x256_diffusion_uncond) -------------------------
    _g("lsun_bedroom", "diffusion", dict(_LSUN), 552_814_086, {"timestep_respacing": "1000"},
       group="adm256_uncond_shape",
       published="LSUN bedroom: FID 1.90 (GD README, 1000 steps)",
       notes="GD README: best samples with 1000 steps"),
    _g("lsun_cat", "diffusion", dict(_LSUN), 552_814_086, {"timestep_respacing": "1000"},
       sag=_sag(0.05, 9, "output.2", note="SAG README: --guide_scale 1.05, image_sample.py"),
       group="adm256_uncond_shape",
       published="LSUN cat: FID 5.57 (GD README, 1000 steps); SAG README 250 steps: 7.03 -> 6.87 (s 0.05)"),
    _g("lsun_horse", "diffusion", dict(_LSUN), 552_814_086, {"timestep_respacing": "1000"},
       sag=_sag(0.01, 9, "output.2", note="SAG README: --guide_scale 1.01, image_sample.py"),
       group="adm256_uncond_shape",
       published="LSUN horse: FID 2.57 (GD README, 1000 steps); SAG README 250 steps: 3.45 -> 3.43 (s 0.01)"),
    _g("lsun_horse_nodropout", "diffusion", dict(_LSUN, dropout="0.0"), 552_814_086,
       {"timestep_respacing": "1000"}, group="adm256_uncond_shape",
       published="no published number"),
    # -- guided-diffusion classifiers ----------------------------------------------------------
    _classifier(64, 4),
    _classifier(128, 2),
    _classifier(256, 2),
    _classifier(512, 2),
    # -- improved-diffusion --------------------------------------------------------------------
    _i("imagenet64_uncond_100M_1500K", "diffusion",
       {"image_size": "64", "num_channels": "128", "num_res_blocks": "3", "learn_sigma": "True",
        "diffusion_steps": "4000", "noise_schedule": "cosine"},
       121_063_942, group="iddpm_imagenet64_uncond_shape",
       published="no FID in the improved-diffusion README (L_hybrid objective)",
       notes="rescale_timesteps True (improved-diffusion default): the network sees t * 1000 / 4000"),
    _i("imagenet64_uncond_vlb_100M_1500K", "diffusion",
       {"image_size": "64", "num_channels": "128", "num_res_blocks": "3", "learn_sigma": "True",
        "diffusion_steps": "4000", "noise_schedule": "cosine", "use_kl": "True"},
       121_063_942, group="iddpm_imagenet64_uncond_shape",
       published="no FID in the improved-diffusion README (L_vlb objective)"),
    _i("cifar10_uncond_50M_500K", "diffusion",
       {"image_size": "32", "num_channels": "128", "num_res_blocks": "3", "learn_sigma": "True", "dropout": "0.3",
        "diffusion_steps": "4000", "noise_schedule": "cosine"},
       52_546_438, group="iddpm_cifar10_shape",
       published="no FID in the improved-diffusion README (L_hybrid objective)"),
    _i("cifar10_uncond_vlb_50M_500K", "diffusion",
       {"image_size": "32", "num_channels": "128", "num_res_blocks": "3", "learn_sigma": "True", "dropout": "0.3",
        "diffusion_steps": "4000", "noise_schedule": "cosine", "use_kl": "True"},
       52_546_438, group="iddpm_cifar10_shape",
       published="no FID in the improved-diffusion README (L_vlb objective)"),
    _i("imagenet64_cond_270M_250K", "diffusion",
       {"image_size": "64", "num_channels": "192", "num_res_blocks": "3", "learn_sigma": "True", "class_cond": "True",
        "diffusion_steps": "4000", "noise_schedule": "cosine", "rescale_learned_sigmas": "False",
        "rescale_timesteps": "False"},
       273_049_350, published="no FID in the improved-diffusion README"),
    _i("upsample_cond_500K", "upsampler",
       {"num_channels": "192", "num_res_blocks": "2", "learn_sigma": "True", "class_cond": "True",
        "diffusion_steps": "4000", "noise_schedule": "linear", "rescale_learned_sigmas": "False",
        "rescale_timesteps": "False", "large_size": "256", "small_size": "64"},
       279_792_390, published="no FID in the improved-diffusion README",
       notes="--large_size 256 --small_size 64 are super_res_sample.py defaults, not README flags"),
    _i("lsun_uncond_100M_1200K_bs128", "diffusion",
       {"image_size": "256", "num_channels": "128", "num_res_blocks": "2", "num_heads": "1", "learn_sigma": "True",
        "use_scale_shift_norm": "False", "attention_resolutions": "16", "diffusion_steps": "1000",
        "noise_schedule": "linear", "rescale_learned_sigmas": "False", "rescale_timesteps": "False"},
       113_676_678, group="iddpm_lsun_shape", published="no FID in the improved-diffusion README (lr 1e-4)"),
    _i("lsun_uncond_100M_2400K_bs64", "diffusion",
       {"image_size": "256", "num_channels": "128", "num_res_blocks": "2", "num_heads": "1", "learn_sigma": "True",
        "use_scale_shift_norm": "False", "attention_resolutions": "16", "diffusion_steps": "1000",
        "noise_schedule": "linear", "rescale_learned_sigmas": "False", "rescale_timesteps": "False"},
       113_676_678, group="iddpm_lsun_shape", published="no FID in the improved-diffusion README (lr 2e-5)",
       notes="README repeats --use_scale_shift_norm False in DIFFUSION_FLAGS"),
]

PRESETS: Dict[str, Preset] = {p.name: p for p in _PRESET_LIST}


def resolve_preset_name(name_or_filename: str) -> Preset:
    """The preset for a name, a file name or a path: "256x256_diffusion_uncond", "...uncond.pt",
    "models/256x256_diffusion_uncond.pt" (case-insensitive). Unknown -> FlagError listing valid names."""
    if isinstance(name_or_filename, Preset):
        return name_or_filename
    text = os.path.basename(str(name_or_filename).strip())
    if text.lower().endswith(".pt"):
        text = text[:-3]
    for name, preset in PRESETS.items():
        if name.lower() == text.lower():
            return preset
    close = difflib.get_close_matches(text, list(PRESETS), n=1, cutoff=0.6)
    hint = f"did you mean {close[0]}? " if close else ""
    raise FlagError(f"unknown preset {name_or_filename!r}: {hint}valid presets are {', '.join(PRESETS)}")


def preset_flags(name: str) -> Dict[str, Any]:
    """A copy of the official flags of a preset (accepts the same names as :func:`resolve_preset_name`)."""
    return dict(resolve_preset_name(name).official_flags)


# ------------------------------------------------------------------------------------------------
# Detection from a state dict
# ------------------------------------------------------------------------------------------------

def _mult_key(mult) -> Tuple[float, ...]:
    return tuple(float(m) for m in mult)


@lru_cache(maxsize=None)
def _signature(name: str) -> Tuple:
    """What infer_structure would report for this preset's file, computed from its flags."""
    preset = PRESETS[name]
    if preset.kind == "classifier":
        c = preset.classifier_config()
        return ("classifier", c.model_channels, _mult_key(c.channel_mult), c.num_res_blocks, attention_factors(c),
                c.pool, c.out_channels, c.use_scale_shift_norm, c.resblock_updown, c.image_size)
    c = preset.unet_config()
    return ("unet", c.model_channels, _mult_key(c.channel_mult), c.num_res_blocks, attention_factors(c),
            c.out_channels, c.num_classes, c.use_scale_shift_norm, c.resblock_updown, c.super_res)


def _structure_signature(s: Mapping[str, Any]) -> Optional[Tuple]:
    if s["kind"] == "classifier":
        return ("classifier", s["model_channels"], _mult_key(s["channel_mult"]), s["num_res_blocks"],
                tuple(s["attention_ds"]), s["pool"], s["out_channels"], s["use_scale_shift_norm"],
                s["resblock_updown"], s["image_size"])
    if s["kind"] == "unet":
        return ("unet", s["model_channels"], _mult_key(s["channel_mult"]), s["num_res_blocks"],
                tuple(s["attention_ds"]), 6 if s["learn_sigma"] else 3, s["num_classes"], s["use_scale_shift_norm"],
                s["resblock_updown"], s["super_res"])
    return None


def candidates_for(state_dict: Mapping[str, Any]) -> List[Preset]:
    """Every preset whose file has this state dict's structure and parameter count, in PRESETS order.

    More than one means the files are indistinguishable by shape (they share ``group``): e.g.
    256x256_diffusion_uncond and the four LSUN models, which differ only in weights (and in the
    dropout flag, which is inactive when sampling) and in their recommended SAG settings.
    """
    try:
        structure = infer_structure(state_dict)
    except CheckpointError:                      # not an official layout: no preset can match
        return []
    signature = _structure_signature(structure)
    if signature is None:
        return []
    total = count_parameters(state_dict)
    found = []
    for name, preset in PRESETS.items():
        if _signature(name) != signature:
            continue
        if preset.num_params is not None and preset.num_params != total:
            continue
        found.append(preset)
    return found


def detect_preset(state_dict: Mapping[str, Any]) -> Optional[Preset]:
    """The released file this state dict is, or None. For a shape group (see :func:`candidates_for`)
    the first member in PRESETS order is returned; call ``candidates_for`` to tell the user so."""
    found = candidates_for(state_dict)
    return found[0] if found else None
