"""Where the value of every official flag comes from when an official checkpoint is loaded.

One rule, applied by ``load_official``, ``load_official_classifier``, ``sag-sample`` and
``python -m checkpoints_convert`` (all go through :func:`resolve_checkpoint`):

1. **The file is always inspected**, flags or not. Its shapes and parameter count name the released
   file it is (:func:`~checkpoints_convert.presets.candidates_for`); among released files of identical
   shape (e.g. ``256x256_diffusion_uncond`` and the four guided-diffusion LSUN files) its file name
   picks one, else the given flags narrow them (``--dropout 0.1``, ``--use_kl True``).
2. **Given flags win.** They are parsed as the official argparse parses them (``"True"``, ``True``,
   ``"1"``; ``"32,16,8"``, ``[32, 16, 8]``) and checked against the file: a structural contradiction is
   one line naming the flag to change (:func:`~checkpoints_convert.inspect_official.diagnose_mismatch`),
   and so is a flag of the other repository that would change the network.
3. **A recognised released file decides the defaults** of every flag not given (``--preset NAME``
   names it outright): its README flags, then its repository's ``script_util`` defaults
   (improved-diffusion: ``rescale_timesteps True``, channel_mult 1,2,2,2 at 32 px, ...).
4. **An unrecognised file takes the repository its flags name**: ``sigma_small`` is
   improved-diffusion's; ``num_head_channels``, ``channel_mult``, ``resblock_updown``,
   ``use_new_attention_order``, ``use_fp16`` and the SAG / PAG / classifier flags are guided-diffusion's
   (the SAG and PAG repositories are its forks and run their flags with its defaults).
5. **When neither the file nor the flags tell the repository**, both repositories' defaults are
   tried on the file. One whose defaults build no network (no channel_mult for the size) or a network
   of other shapes is out. If both remain and would sample differently -- ``rescale_timesteps`` with
   ``--diffusion_steps`` other than 1000, or heads, attention resolutions, channel_mult -- the load
   fails with one line naming the flag to pass: never a silent guess. If they would sample alike,
   guided-diffusion's values are recorded (they then differ only in a training-only flag,
   ``rescale_learned_sigmas``).

The guidance, classifier and sampling flags describe no network; both repositories take them, with
the defaults of the scripts that define them (``sag_defaults()`` ...). Everything here reads only
shapes, so it runs on ``device="meta"`` state dicts.
"""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Mapping, Optional, Sequence, Tuple, Union

from diffusion.config import DiffusionConfig
from unet.config import ConfigError, EncoderUNetConfig, UNetConfig

from .errors import CheckpointError, FlagError
from .flags import (GUIDED_MODEL_DEFAULTS, IMPROVED_MODEL_DEFAULTS, ResolvedFlags, classifier_config_from_flags,
                    diffusion_config_from_flags, family_from_names, normalise_flags, resolve_flags,
                    unet_config_from_flags)
from .inspect_official import diagnose_classifier_mismatch, diagnose_mismatch, infer_structure
from .presets import Preset, candidates_for, resolve_preset_name

__all__ = ["Resolution", "resolve_checkpoint"]

FAMILIES = ("guided", "improved")
# Flags that describe the released network or its process: what given flags may narrow a shape group by.
_NETWORK_FLAGS = (frozenset(GUIDED_MODEL_DEFAULTS) | frozenset(IMPROVED_MODEL_DEFAULTS)) - {"timestep_respacing"}
# UNetConfig field -> the official flag that sets it (for naming the flag to pass).
_FIELD_FLAG = {"model_channels": "num_channels", "out_channels": "learn_sigma", "num_classes": "class_cond",
               "super_res": "large_size"}


@dataclass(frozen=True)
class Resolution:
    """A checkpoint's complete official flags and the configs they build.

    resolved:    every flag of the family (given, else the released file's README flag, else the
                 repository default); ``resolved.given`` holds the names the caller passed.
    config:      the U-Net (kind "unet") or classifier (kind "classifier") the file holds.
    diffusion_config: the process (None for a classifier).
    preset:      the released file recognised (or named by ``preset=``), None if none.
    candidates:  the released files the file may be (one unless shapes, name and flags leave a group).
    defaults:    where the defaults came from, in words (for messages and sidecars).
    """
    resolved: ResolvedFlags
    config: Union[UNetConfig, EncoderUNetConfig]
    diffusion_config: Optional[DiffusionConfig]
    preset: Optional[Preset]
    candidates: Tuple[Preset, ...]
    defaults: str


def _agrees(preset: Preset, given: Mapping[str, Any]) -> bool:
    """Whether the given network flags have the values this released file's README flags give."""
    names = [n for n in given if n in _NETWORK_FLAGS]
    if not names:
        return True
    try:
        mine = resolve_flags({**preset.official_flags, **{n: given[n] for n in names}}, preset.family).values
    except FlagError:
        return False
    theirs = preset.resolved().values
    return all(mine.get(n) == theirs.get(n) for n in names)


def _narrow(candidates: Sequence[Preset], given: Mapping[str, Any], source: str) -> Tuple[Preset, ...]:
    """Released files of one shape group, narrowed by the file name, then by the given flags."""
    if len(candidates) <= 1:
        return tuple(candidates)
    name = Path(str(source)).name.lower()
    by_name = [p for p in candidates if p.filename.lower() == name]
    if by_name:
        return tuple(by_name)
    agreeing = [p for p in candidates if _agrees(p, given)]
    return tuple(agreeing or candidates)


def _configs(resolved: ResolvedFlags, kind: str):
    try:
        if kind == "classifier":
            return classifier_config_from_flags(resolved), None
        return unet_config_from_flags(resolved), diffusion_config_from_flags(resolved)
    except ConfigError as err:
        raise FlagError(str(err)) from None


def _timestep_scale(d: DiffusionConfig) -> float:
    """What the network's timestep input is multiplied by (rescale_timesteps matters only off 1000 steps)."""
    return 1000.0 / d.steps if d.rescale_timesteps else 1.0


def _sampling_difference(a, b) -> Optional[str]:
    """The first flag whose value makes two (resolved, unet, diffusion) triples sample differently."""
    (ra, ua, da), (rb, ub, db) = a, b
    for f in dataclasses.fields(UNetConfig):
        if f.name != "dropout" and getattr(ua, f.name) != getattr(ub, f.name):
            return _FIELD_FLAG.get(f.name, f.name)
    if _timestep_scale(da) != _timestep_scale(db):
        return "rescale_timesteps"
    for f in ("steps", "noise_schedule", "timestep_respacing", "learn_sigma", "sigma_small", "predict_xstart"):
        if getattr(da, f) != getattr(db, f):
            return {"steps": "diffusion_steps"}.get(f, f)
    return None


def _undetermined_family(state_dict, merged, source: str):
    """Rule 5: neither the file nor the flags name the repository; try both repositories' defaults."""
    built, errors = {}, {}
    for family in FAMILIES:
        try:
            resolved = resolve_flags(merged, family)
            unet, diff = _configs(resolved, "unet")
        except FlagError as err:
            errors[family] = err
            continue
        built[family] = (resolved, unet, diff, diagnose_mismatch(state_dict, unet))
    fitting = [f for f in FAMILIES if f in built and built[f][3] is None]
    if not fitting:
        if not built:
            raise errors["guided"]
        first = next(f for f in FAMILIES if f in built)
        raise CheckpointError(f"{source}: {built[first][3]}")
    if len(fitting) == 2:
        flag = _sampling_difference(built["guided"][:3], built["improved"][:3])
        if flag is not None:
            g, i = built["guided"][0].values, built["improved"][0].values
            if flag == "rescale_timesteps":
                steps = built["guided"][2].steps
                detail = (f"improved-diffusion's default True feeds the network t*1000/{steps}, "
                          "guided-diffusion's False feeds it t")
            else:
                detail = f"guided-diffusion's default {g.get(flag)!r}, improved-diffusion's {i.get(flag)!r}"
            raise FlagError(f"{source} is no released file and its flags do not say whether guided-diffusion or "
                            f"improved-diffusion made it, whose defaults sample it differently ({detail}): "
                            f"pass --{flag}")
    family = fitting[0]
    resolved, unet, diff, _ = built[family]
    how = ("guided-diffusion defaults (the two repositories' defaults sample this file alike)" if len(fitting) == 2
           else f"{family}-diffusion defaults (the only repository whose defaults build this file)")
    return resolved, unet, diff, how


def resolve_checkpoint(state_dict: Mapping[str, Any], flags: Optional[Mapping[str, Any]] = None, *,
                       kind: str = "unet", preset: Optional[str] = None, family: Optional[str] = None,
                       source: str = "checkpoint") -> Resolution:
    """Apply the module's rule to an official state dict (real or ``device="meta"`` tensors).

    flags: official flags (names with or without ``--``; values as typed or as Python values).
    kind: "unet" (diffusion models and upsamplers) or "classifier". preset: a released file's name,
    which then decides the defaults whatever the shapes. family: "guided" / "improved" to name the
    repository (an error if it contradicts a recognised file). source: the file's path (messages,
    and its name picks among released files of one shape).
    Raises CheckpointError / FlagError with one line naming the file or the flag to change.
    """
    given = normalise_flags(flags)
    structure = infer_structure(state_dict)
    wanted = "classifier" if kind == "classifier" else "unet"
    if structure["kind"] == "classifier" and wanted == "unet":
        raise CheckpointError(f"{source} is a classifier checkpoint; load it with load_official_classifier")
    if structure["kind"] == "unet" and wanted == "classifier":
        raise CheckpointError(f"{source} is not a classifier checkpoint (looks like: unet); use load_official")
    if preset is not None:
        found = resolve_preset_name(preset)
        if (found.kind == "classifier") != (wanted == "classifier"):
            raise FlagError(f"--preset {found.name} is a {found.kind}, but {source} is loaded as a "
                            f"{'classifier' if wanted == 'classifier' else 'diffusion model'}")
        candidates: Tuple[Preset, ...] = (found,)
    else:
        candidates = _narrow(candidates_for(state_dict), given, source)
        found = candidates[0] if candidates else None
    if wanted == "classifier":
        if family not in (None, "guided"):
            raise FlagError("improved-diffusion has no classifier: classifiers are guided-diffusion's (family='guided')")
        family = "guided"
    file_family = found.family if found is not None else None
    if family is not None and family not in FAMILIES:
        raise FlagError(f"family must be 'guided' or 'improved', got {family!r}")
    if family is not None and file_family is not None and family != file_family:
        raise FlagError(f"family={family!r} contradicts {source}: it is {file_family}-diffusion's {found.name}")
    merged = {**(found.official_flags if found is not None else {}), **given}
    family = family or file_family or family_from_names(merged)
    if family is None:
        resolved, config, diffusion_config, how = _undetermined_family(state_dict, merged, source)
    else:
        try:
            resolved = resolve_flags(merged, family)
        except FlagError as err:
            if found is None:
                raise
            raise FlagError(f"{source} is {family}-diffusion's {found.name}: {err}") from None
        config, diffusion_config = _configs(resolved, wanted)
        diagnose = diagnose_classifier_mismatch if wanted == "classifier" else diagnose_mismatch
        problem = diagnose(state_dict, config)
        if problem:
            raise CheckpointError(f"{source}: {problem}")
        if found is not None:
            how = f"the {found.name} README flags and {family}-diffusion defaults"
        else:
            how = f"{family}-diffusion defaults (named by the flags)"
    return Resolution(resolved, config, diffusion_config, found, candidates, how)
