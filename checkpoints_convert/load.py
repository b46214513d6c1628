"""Loading the official checkpoints (and our own format) into our modules.

``load_official(path, flags)`` is the compatibility entry point: ``flags`` are the official script
flags (guided-diffusion / improved-diffusion / SAG / PAG names and meanings); where the flags not
given take their values from is the rule of :mod:`checkpoints_convert.resolve` (the file is always
inspected; a recognised released file's repository decides them; never a silent guess between
repositories); an unknown flag is an error. Every load is ``torch.load(weights_only=True)``
(``safe_load``) and every failure is one line.
"""
from __future__ import annotations

import dataclasses
import json
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Dict, Mapping, Optional

import torch

from diffusion import DiffusionConfig, GaussianDiffusion
from unet import EncoderUNet, UNet, UNetConfig

from .errors import CheckpointError, FlagError
from .flags import normalise_flags, sag_settings_from_flags
from .inspect_official import diagnose_classifier_mismatch, diagnose_mismatch
from .keymap import KeyMismatch, official_to_ours, ours_to_official
from .presets import Preset
from .resolve import Resolution, resolve_checkpoint
from .safe_load import load_state_dict

FORMAT_TAG = "sag-checkpoint"
FORMAT_VERSION = 1
SAG_FLAGS = ("guide_scale", "guide_start", "blur_sigma", "sel_attn_block", "sel_attn_depth")
GUIDANCE_FLAGS = SAG_FLAGS + ("guidance_strategies", "drop_layers")


@dataclass
class LoadedModel:
    """A diffusion U-Net ready to sample: ``model`` (eval mode), ``diffusion`` (respaced per the
    flags), ``guidance`` (SAG settings, or None when SAG is off), and where they came from."""
    model: UNet
    diffusion: GaussianDiffusion
    guidance: Optional[Any]
    flags: Dict[str, Any] = field(default_factory=dict)
    preset: Optional[Preset] = None

    @property
    def diffusion_config(self) -> DiffusionConfig:
        return self.diffusion.config


@dataclass
class LoadedClassifier:
    """The ADM noisy-image classifier; calling it calls the model (logits [B x classes])."""
    model: EncoderUNet
    flags: Dict[str, Any] = field(default_factory=dict)

    def __call__(self, x: torch.Tensor, timesteps: torch.Tensor) -> torch.Tensor:
        return self.model(x, timesteps)


def _preset_guidance(preset: Optional[Preset]):
    """The SAG README's recommended settings for a recognised file (official map mode), guiding
    every step (the README's commands set --guide_start to the number of sampling steps)."""
    from sag.guidance import SAGConfig
    if preset is None or not preset.sag:
        return None
    rec = preset.sag
    return SAGConfig(scale=rec["scale"], blur_sigma=rec["blur_sigma"], site=rec["site"], guide_start=None,
                     map_mode=rec.get("map_mode", "official"), official_num_heads=rec.get("official_num_heads", 4))


def _recommended_guidance(resolution: Resolution, source) -> Optional[Any]:
    """The SAG README's settings for a recognised file given no guidance flags. Released files of
    one shape (a group the file name and flags did not narrow) must agree on them; otherwise there
    is no recommendation to make, and a warning says how to pick the file."""
    names = [p.name for p in resolution.candidates]
    if len({json.dumps(p.sag, sort_keys=True) for p in resolution.candidates}) > 1:
        warnings.warn(f"{source} has the shapes of {', '.join(names)}, whose SAG README settings differ: no "
                      "SAG by default; pass --preset NAME (or the SAG flags) to choose", stacklevel=3)
        return None
    return _preset_guidance(resolution.preset)


def _window(method) -> str:
    if hasattr(method, "step_range"):
        start, end = method.step_range
        return f"the {type(method).__name__.replace('Config', '')} window {start} >= t >= {end}"
    if method.guide_start is not None and method.guide_start <= method.guide_end:
        return f"--guide_start {method.guide_start} (SAG guides where guide_start > t >= {method.guide_end})"
    return f"the SAG window {method.guide_start} > t >= {method.guide_end}"


def _never_guided(window: str, num_steps: int) -> str:
    return (f"{window} holds none of the {num_steps} sampling steps: it guides no step (the official code "
            "runs it so too), probably not what was meant")


class NeverGuidedWarning(UserWarning):
    """A guidance window that holds none of the sampling steps (accepted: no step is guided)."""


def never_guided_warnings(guidance, num_steps: int) -> list:
    """One line for each guidance method whose window holds none of the ``num_steps`` sampling
    steps: accepted, as the official code accepts it, but probably not what was meant."""
    if guidance is None:
        return []
    return [_never_guided(_window(m), num_steps) for m in getattr(guidance, "methods", (guidance,))
            if not any(m.active_at(t) for t in range(num_steps))]


def _guidance_from_flags(resolved, given: Mapping[str, Any], num_steps: int, unet_config=None):
    """Guidance settings when the flags ask for it, else None.

    SAG (the SAG repository's flags: any SAG flag given) with a non-zero scale. ``--guide_scale 1.0``
    is the official "no guidance": the official code still runs a second pass whose result equals
    eps up to rounding (SPEC.md Q9); we skip it.

    The PAG repository's ``--guidance_strategies '{"attention_mask_identity": [a, b], "sag": [c, d]}'``:
    each mode guides where start >= t >= end (respaced index), at most one per step (a window that
    holds no step -- start < end, or guide_start 0 -- is accepted and guides nothing, with a
    NeverGuidedWarning); PAG is a
    ``PAGConfig`` with s = ``--guide_scale`` - 1 and the sites of ``--drop_layers`` (names that are
    no attention block of this U-Net are ignored with a warning, as the official code ignores them
    silently), SAG a ``SAGConfig`` on its window; both modes together are a ``sag.schedule.Scheduled``,
    whose windows may not overlap on the ``num_steps`` respaced steps the sampler visits.
    Only the exact identity exists here: ``--noise_scale`` (the drop rate the official code really
    uses) below 1, random layer choice and the other modes raise one line.
    """
    from sag.guidance import GuidanceError, SAGConfig
    from sag.perturbed import PAGConfig
    from sag.schedule import Scheduled
    from .flags import pag_settings_from_flags
    strategies = resolved.values.get("guidance_strategies") or {}
    unsupported = sorted(set(strategies) - {"attention_mask_identity", "sag"})
    if unsupported:   # attention_drop / attention_mask / attention_blur ...: refuse rather than run unguided
        raise FlagError(f"--guidance_strategies modes {unsupported} are not supported; "
                        "use {\"attention_mask_identity\": [start, end]} (PAG) and/or {\"sag\": [start, end]}")
    methods = []                 # each gated by its own window
    pag = pag_settings_from_flags(resolved)
    if pag is not None:
        if pag["drop_rate"] != 1.0:
            raise FlagError(f"--noise_scale {pag['drop_rate']} asks for random partial attention masking; "
                            "only the identity perturbation (--noise_scale 1.0) is supported")
        if pag["random_layer"]:
            raise FlagError("--drop_layer_randomly True is not supported: PAG perturbs every --drop_layers block at once")
        if not pag["sites"]:
            warnings.warn(f"--drop_layers {' '.join(pag['ignored_layers'])} names no attention block of this U-Net: "
                          "PAG perturbs nothing and its guidance vanishes (official behaviour); sampling unguided",
                          stacklevel=3)
        elif pag["ignored_layers"]:
            warnings.warn(f"--drop_layers {' '.join(pag['ignored_layers'])}: no attention block of this U-Net "
                          f"there; ignored, as the official PAG code ignores them", stacklevel=3)
        start, end = pag["step_range"]
        if start < end:          # officially start >= t >= end never holds: PAG runs at no step
            warnings.warn(_never_guided(f"the PAG window {start} >= t >= {end}", num_steps), NeverGuidedWarning,
                          stacklevel=3)
        elif pag["sites"] and pag["scale"] != 0:
            methods.append(PAGConfig(scale=pag["scale"], sites=tuple(pag["sites"]), step_range=(start, end)))
    sag_typed = any(name in given for name in SAG_FLAGS) or "sag" in strategies
    settings = sag_settings_from_flags(resolved, unet_config) if sag_typed else None
    if settings is not None and settings["scale"] != 0:
        guide_start, guide_end = settings["guide_start"], 0
        if settings.get("step_range") is not None:
            # The PAG repo's {"sag": [start, end]} runs SAG iff start >= t >= end.
            start, end = settings["step_range"]
            guide_start, guide_end = start + 1, end
        methods.append(SAGConfig(scale=settings["scale"], blur_sigma=settings["blur_sigma"], site=settings["site"],
                                 guide_start=guide_start, guide_end=guide_end,
                                 map_mode=settings.get("map_mode", "official"),
                                 official_num_heads=settings["official_num_heads"]))
    if len(methods) > 1:
        scheduled = Scheduled(tuple(methods))
        try:
            scheduled.check_steps(num_steps)
        except GuidanceError as err:
            raise FlagError(f"--guidance_strategies {json.dumps(strategies)}: {err}") from None
        return scheduled
    return methods[0] if methods else None


def _resolve_file(checkpoint_path, flags, kind, preset=None, family=None):
    state = load_state_dict(checkpoint_path)
    resolution = resolve_checkpoint(state, flags, kind=kind, preset=preset, family=family, source=str(checkpoint_path))
    return state, normalise_flags(flags), resolution


def _build_and_load(cls, config, state, checkpoint_path, diagnose, device):
    """Build ``cls(config)`` and load an official state dict into it: first the one-line diagnosis
    of the flag most likely wrong, then the key map (every key consumed once, shapes checked)."""
    problem = diagnose(state, config)
    if problem:
        raise CheckpointError(f"{checkpoint_path}: {problem}")
    model = cls(config)
    try:
        model.load_state_dict(official_to_ours(model, state))
    except KeyMismatch as err:
        raise CheckpointError(f"{checkpoint_path}: {err}") from None
    return model.eval().to(device)


def load_official(checkpoint_path, flags: Optional[Mapping[str, Any]] = None, *, family: Optional[str] = None,
                  preset: Optional[str] = None, device="cpu") -> LoadedModel:
    """Load an official guided-diffusion / improved-diffusion checkpoint with the official flags.

    Flags not given take the values :mod:`checkpoints_convert.resolve` assigns (the recognised
    released file's README flags and repository defaults; ``preset=`` names the file, ``family=``
    the repository). Structural flags are checked against the file; a mismatch raises one line
    naming the flag most likely wrong (e.g. 6 output channels -> ``--learn_sigma True``).

    ``.guidance``: SAG (official map mode) when SAG flags are given with g != 1 (sites and
    guide_start not typed never fail: see ``sag_settings_from_flags``); PAG for the PAG
    repository's ``--guidance_strategies``; with no guidance flags, the SAG README's recommended
    settings for a recognised released file, else None. A window that guides no step is kept (no
    step is guided, as officially) with a warning.
    """
    state, given, resolution = _resolve_file(checkpoint_path, flags, "unet", preset, family)
    resolved, unet_config = resolution.resolved, resolution.config
    if resolved.variant == "pag" and unet_config.use_new_attention_order:
        # The PAG repository's model_fn re-installs QKVAttentionLegacy in every attention block
        # on every call (PROVENANCE.md PAG quirk 5), so its passes run the legacy head split.
        warnings.warn("PAG repository flags with --use_new_attention_order True: every attention block runs "
                      "the legacy head split, as the official PAG code does (the model's own order is not used)",
                      stacklevel=2)
        unet_config = dataclasses.replace(unet_config, use_new_attention_order=False)
    diffusion = GaussianDiffusion.from_config(resolution.diffusion_config)
    guidance = _guidance_from_flags(resolved, given, diffusion.num_timesteps, unet_config)
    if guidance is None and resolution.preset is not None and not any(name in given for name in GUIDANCE_FLAGS):
        guidance = _recommended_guidance(resolution, checkpoint_path)   # no guidance flags given
    for line in never_guided_warnings(guidance, diffusion.num_timesteps):
        warnings.warn(line, NeverGuidedWarning, stacklevel=2)
    model = _build_and_load(UNet, unet_config, state, checkpoint_path, diagnose_mismatch, device)
    return LoadedModel(model, diffusion, guidance, dict(resolved.values), resolution.preset)


def load_official_classifier(checkpoint_path, flags: Optional[Mapping[str, Any]] = None, *, device="cpu") -> LoadedClassifier:
    """Load an official ADM classifier (``*_classifier.pt``) with the ``classifier_*`` flags (and
    ``--image_size``); flags not given follow :mod:`checkpoints_convert.resolve` (a recognised
    classifier's README flags, then guided-diffusion's ``classifier_defaults()``)."""
    state, _, resolution = _resolve_file(checkpoint_path, flags, "classifier")
    model = _build_and_load(EncoderUNet, resolution.config, state, checkpoint_path, diagnose_classifier_mismatch,
                            device)
    return LoadedClassifier(model, dict(resolution.resolved.values))


# -- our own format ----------------------------------------------------------------------------

def save_checkpoint(path, loaded: LoadedModel) -> None:
    """One ``torch.save`` of plain data (loads with ``weights_only=True``), written atomically:
    format tag and version, model / diffusion configs, recommended guidance, state dict (our names)."""
    payload = {
        "format": FORMAT_TAG, "version": FORMAT_VERSION,
        "model_config": dataclasses.asdict(loaded.model.config),
        "diffusion_config": dataclasses.asdict(loaded.diffusion.config),
        "guidance": _guidance_record(loaded.guidance),
        "preset": loaded.preset.name if loaded.preset is not None else None,
        "state_dict": {k: v.detach().cpu().contiguous() for k, v in loaded.model.state_dict().items()},
    }
    path = Path(path)
    tmp = path.with_name(path.name + ".tmp")
    torch.save(payload, tmp)
    tmp.replace(path)


def _guidance_methods():
    from sag.guidance import SAGConfig
    from sag.perturbed import PAGConfig, SEGConfig
    return {"sag": SAGConfig, "pag": PAGConfig, "seg": SEGConfig}


def _guidance_record(guidance) -> Optional[dict]:
    """Recommended guidance as plain data: {"method": "sag" | "pag" | "seg", **fields}."""
    if guidance is None:
        return None
    for method, cls in _guidance_methods().items():
        if type(guidance) is cls:
            return {"method": method, **dataclasses.asdict(guidance)}
    raise CheckpointError(f"cannot store guidance of type {type(guidance).__name__} in a sag checkpoint")


def _guidance_from_record(record):
    if not record:
        return None
    record = dict(record)
    cls = _guidance_methods().get(record.pop("method", "sag"))
    if cls is None:
        raise CheckpointError(f"unknown guidance method in checkpoint: {record!r}")
    for name, value in record.items():
        if isinstance(value, list):
            record[name] = tuple(value)
    return cls(**record)


def is_our_checkpoint(obj) -> bool:
    return isinstance(obj, dict) and obj.get("format") == FORMAT_TAG


def load_checkpoint(path, *, device="cpu", timestep_respacing: Optional[str] = None) -> LoadedModel:
    """Load our own format (see :func:`save_checkpoint`)."""
    from .safe_load import load_payload
    payload = load_payload(path)
    if not is_our_checkpoint(payload):
        raise CheckpointError(f"{path} is not a sag checkpoint (no '{FORMAT_TAG}' tag); load official files with load_official")
    if payload.get("version") != FORMAT_VERSION:
        raise CheckpointError(f"{path} has sag checkpoint version {payload.get('version')}; this sag reads version {FORMAT_VERSION}")
    model = UNet(UNetConfig(**payload["model_config"]))
    model.load_state_dict(payload["state_dict"])
    diffusion_config = DiffusionConfig(**payload["diffusion_config"])
    if timestep_respacing is not None:
        diffusion_config = dataclasses.replace(diffusion_config, timestep_respacing=timestep_respacing)
    guidance = _guidance_from_record(payload.get("guidance"))
    return LoadedModel(model.eval().to(device), GaussianDiffusion.from_config(diffusion_config), guidance, {}, None)
