"""The official command-line flags, their defaults, and the configs they describe.

The official checkpoints are documented only as command lines (``--num_channels 256
--num_head_channels 64 ...``) whose missing flags take each repository's ``script_util.py``
defaults. This module holds those flag tables, resolves a flag dict the way the official argparse
would (``str2bool`` for booleans, defaults for what is missing), and turns the result into our
configs: :class:`~unet.config.UNetConfig`, :class:`~diffusion.config.DiffusionConfig`,
:class:`~unet.config.EncoderUNetConfig`, and plain dicts of SAG / PAG settings.

Sources (read as specification, not copied):

* openai/guided-diffusion @ 22e0df8: ``guided_diffusion/script_util.py`` (``diffusion_defaults``,
  ``model_and_diffusion_defaults``, ``classifier_defaults``, ``sr_model_and_diffusion_defaults``,
  ``create_model``, ``create_classifier``, ``sr_create_model``, ``str2bool``) and the
  ``create_argparser`` of ``scripts/{image,classifier,super_res}_sample.py``.
* openai/improved-diffusion @ 1bc7bbb: ``improved_diffusion/script_util.py`` (``sigma_small``;
  no ``num_head_channels`` / ``resblock_updown`` / ``use_new_attention_order`` / ``use_fp16`` /
  ``channel_mult``; ``rescale_timesteps`` and ``rescale_learned_sigmas`` default True).
* SusungHong/Self-Attention-Guidance @ a36f251: ``guided_diffusion/script_util.py:sag_defaults``
  (guide_scale 1.5, guide_start 250, sel_attn_block "output", sel_attn_depth 2, blur_sigma 9,
  classifier_guidance False) and ``classifier_sample.py`` / ``image_sample.py``.
* KU-CVLAB/Perturbed-Attention-Guidance @ ba1c0c9: ``guided_diffusion/script_util.py:sag_defaults``
  (guide_scale **4.0**, drop_rate, drop_layer_randomly, noise_scale, guide_schedule ...) and
  ``classifier_sample.py:create_argparser`` (drop_layers, guidance_strategies, seed, gpu, ...).

Scale convention (DESIGN.md decision 1): the official ``--guide_scale`` g is ``1 + s``; the
settings dicts returned here carry the paper's ``s = g - 1`` under ``"scale"`` and keep g under
``"official_guide_scale"`` for the sidecar.
"""
from __future__ import annotations

import difflib
import json
import re
from dataclasses import dataclass
from typing import Any, Dict, Iterable, List, Literal, Mapping, Optional, Sequence, Tuple

from diffusion.config import DiffusionConfig
from unet.config import ConfigError, EncoderUNetConfig, UNetConfig

from .errors import FlagError

__all__ = [
    "Family", "ResolvedFlags",
    "GUIDED_MODEL_DEFAULTS", "GUIDED_SUPER_RES_DEFAULTS", "GUIDED_CLASSIFIER_DEFAULTS",
    "GUIDED_SAMPLE_DEFAULTS", "SAG_DEFAULTS", "PAG_DEFAULTS",
    "IMPROVED_MODEL_DEFAULTS", "IMPROVED_SUPER_RES_DEFAULTS", "IMPROVED_SAMPLE_DEFAULTS",
    "GUIDED_CHANNEL_MULT", "GUIDED_SUPER_RES_CHANNEL_MULT", "IMPROVED_CHANNEL_MULT",
    "IMPROVED_SUPER_RES_CHANNEL_MULT", "CLASSIFIER_CHANNEL_MULT",
    "str2bool", "resolve_flags", "normalise_flags", "family_from_names", "recommended_sag_site", "unet_config_from_flags", "diffusion_config_from_flags",
    "classifier_config_from_flags", "sag_settings_from_flags", "pag_settings_from_flags",
    "official_module_to_site", "site_to_official_module", "attention_sites",
    "attention_factors", "valid_flag_names",
]

Family = Literal["guided", "improved"]

# ------------------------------------------------------------------------------------------------
# Flag tables: every flag the official scripts accept, with its official default.
# ------------------------------------------------------------------------------------------------

# guided-diffusion model_and_diffusion_defaults() (its diffusion_defaults() included).
GUIDED_MODEL_DEFAULTS: Dict[str, Any] = dict(
    image_size=64,
    num_channels=128,
    num_res_blocks=2,
    num_heads=4,
    num_heads_upsample=-1,
    num_head_channels=-1,
    attention_resolutions="16,8",
    channel_mult="",
    dropout=0.0,
    class_cond=False,
    use_checkpoint=False,
    use_scale_shift_norm=True,
    resblock_updown=False,
    use_fp16=False,
    use_new_attention_order=False,
    learn_sigma=False,                  # diffusion_defaults() from here on
    diffusion_steps=1000,
    noise_schedule="linear",
    timestep_respacing="",
    use_kl=False,
    predict_xstart=False,
    rescale_timesteps=False,
    rescale_learned_sigmas=False,
)

# guided-diffusion sr_model_and_diffusion_defaults(): the upsampler scripts add these two and drop
# image_size, channel_mult and use_new_attention_order.
GUIDED_SUPER_RES_DEFAULTS: Dict[str, Any] = dict(large_size=256, small_size=64)

# guided-diffusion classifier_defaults() (image_size is shared with the model table).
GUIDED_CLASSIFIER_DEFAULTS: Dict[str, Any] = dict(
    classifier_use_fp16=False,
    classifier_width=128,
    classifier_depth=2,
    classifier_attention_resolutions="32,16,8",
    classifier_use_scale_shift_norm=True,
    classifier_resblock_updown=True,
    classifier_pool="attention",
)

# Sampling-script flags of guided-diffusion image_sample.py / classifier_sample.py /
# super_res_sample.py (create_argparser defaults).
GUIDED_SAMPLE_DEFAULTS: Dict[str, Any] = dict(
    clip_denoised=True,
    num_samples=10000,
    batch_size=16,
    use_ddim=False,
    model_path="",
    classifier_path="",
    classifier_scale=1.0,
    base_samples="",
)

# SAG repo sag_defaults(); blur_sigma is an int in the official argparse (type(9)); we accept floats.
SAG_DEFAULTS: Dict[str, Any] = dict(
    guide_scale=1.5,
    guide_start=250,
    sel_attn_block="output",
    sel_attn_depth=2,
    blur_sigma=9,
    classifier_guidance=False,
)

# PAG repo: its own sag_defaults() (guide_scale 4.0, not 1.5) plus classifier_sample.py extras.
PAG_DEFAULTS: Dict[str, Any] = dict(
    guide_scale=4.0,
    drop_rate=1.0,                      # never read by the official code (SPEC Q12)
    drop_layer_randomly=False,
    noise_scale=1.0,                    # the drop rate actually used (SPEC Q12)
    guide_start=250,
    guide_schedule=None,
    sel_attn_block="output",
    sel_attn_depth=2,
    blur_sigma=9,
    classifier_guidance=False,
    sample_class=-1,
    gpu=None,
    gpu_offset=0,
    note="",
    visualize=False,
    visualize_interval=1,
    visualize_step_interval=1,
    verbose=True,
    results_dir="default",
    results_root_dir="RESULTS",
    save_png=True,
    log_datetime=True,
    seed=0,
    seed_everything=True,
    drop_layers=["input_blocks.14.1", "input_blocks.16.1", "input_blocks.17.1", "middle_block.1"],
    guidance_strategies=None,
)

# improved-diffusion model_and_diffusion_defaults().
IMPROVED_MODEL_DEFAULTS: Dict[str, Any] = dict(
    image_size=64,
    num_channels=128,
    num_res_blocks=2,
    num_heads=4,
    num_heads_upsample=-1,
    attention_resolutions="16,8",
    dropout=0.0,
    learn_sigma=False,
    sigma_small=False,
    class_cond=False,
    diffusion_steps=1000,
    noise_schedule="linear",
    timestep_respacing="",
    use_kl=False,
    predict_xstart=False,
    rescale_timesteps=True,
    rescale_learned_sigmas=True,
    use_checkpoint=False,
    use_scale_shift_norm=True,
)
IMPROVED_SUPER_RES_DEFAULTS: Dict[str, Any] = dict(large_size=256, small_size=64)
IMPROVED_SAMPLE_DEFAULTS: Dict[str, Any] = dict(
    clip_denoised=True, num_samples=10000, batch_size=16, use_ddim=False, model_path="", base_samples="",
)

# channel_mult hard-coded by image size when --channel_mult is "" (or absent, improved-diffusion).
GUIDED_CHANNEL_MULT = {512: (0.5, 1, 1, 2, 2, 4, 4), 256: (1, 1, 2, 2, 4, 4), 128: (1, 1, 2, 3, 4), 64: (1, 2, 3, 4)}
GUIDED_SUPER_RES_CHANNEL_MULT = {512: (1, 1, 2, 2, 4, 4), 256: (1, 1, 2, 2, 4, 4), 64: (1, 2, 3, 4)}
IMPROVED_CHANNEL_MULT = {256: (1, 1, 2, 2, 4, 4), 64: (1, 2, 3, 4), 32: (1, 2, 2, 2)}
IMPROVED_SUPER_RES_CHANNEL_MULT = {256: (1, 1, 2, 2, 4, 4), 64: (1, 2, 3, 4)}
CLASSIFIER_CHANNEL_MULT = dict(GUIDED_CHANNEL_MULT)   # guided-diffusion create_classifier

_SAG_NAMES = frozenset(SAG_DEFAULTS)
_PAG_ONLY_NAMES = frozenset(PAG_DEFAULTS) - _SAG_NAMES
_SUPER_RES_NAMES = frozenset(GUIDED_SUPER_RES_DEFAULTS)
_GUIDED_NAMES = frozenset(GUIDED_MODEL_DEFAULTS) | _SUPER_RES_NAMES | frozenset(GUIDED_CLASSIFIER_DEFAULTS) \
    | frozenset(GUIDED_SAMPLE_DEFAULTS) | _SAG_NAMES | frozenset(PAG_DEFAULTS)
_IMPROVED_NAMES = frozenset(IMPROVED_MODEL_DEFAULTS) | frozenset(IMPROVED_SUPER_RES_DEFAULTS) \
    | frozenset(IMPROVED_SAMPLE_DEFAULTS)
_GUIDED_ONLY = _GUIDED_NAMES - _IMPROVED_NAMES          # num_head_channels, resblock_updown, SAG/PAG/classifier ...
_IMPROVED_ONLY = _IMPROVED_NAMES - _GUIDED_NAMES        # sigma_small
# Names that describe no network and no diffusion process -- the guidance (SAG / PAG repositories),
# the classifier and the sampling scripts' flags: both families take them (sag guides any ADM / IDDPM
# U-Net), with the defaults of the scripts that define them.
_NETWORK_FREE = _SAG_NAMES | frozenset(PAG_DEFAULTS) | frozenset(GUIDED_CLASSIFIER_DEFAULTS) \
    | frozenset(GUIDED_SAMPLE_DEFAULTS)
# guided-diffusion names that do describe the network (num_head_channels, channel_mult, resblock_updown,
# use_new_attention_order, use_fp16): improved-diffusion takes them only at the value it builds anyway.
_GUIDED_MODEL_ONLY = frozenset(GUIDED_MODEL_DEFAULTS) - frozenset(IMPROVED_MODEL_DEFAULTS)

# Flags whose value type is not the type of their default (official argparse special cases).
_FLOAT_FLAGS = frozenset({"blur_sigma"})                # official type int; "3.5" accepted here
_OPTIONAL_STR_FLAGS = frozenset({"guide_schedule", "gpu"})
_LIST_FLAGS = frozenset({"drop_layers"})                # nargs="+"
_JSON_FLAGS = frozenset({"guidance_strategies"})        # type=json.loads
_CSV_FLAGS = frozenset({"attention_resolutions", "channel_mult", "classifier_attention_resolutions"})


def valid_flag_names(family: Optional[Family] = None) -> frozenset:
    """Every flag name the official scripts of ``family`` accept (both families when None); the
    improved family also takes the network-free guidance, classifier and sampling flags."""
    if family is None:
        return _GUIDED_NAMES | _IMPROVED_NAMES
    return _GUIDED_NAMES if family == "guided" else _IMPROVED_NAMES | _NETWORK_FREE


# ------------------------------------------------------------------------------------------------
# Value parsing, argparse style.
# ------------------------------------------------------------------------------------------------

def str2bool(value: Any, name: str = "flag") -> bool:
    """The official ``str2bool``: bools pass; "yes/true/t/y/1" and "no/false/f/n/0" in any case.

    The integers 0 and 1 are also accepted (JSON configs write them); anything else is a FlagError.
    """
    if isinstance(value, bool):
        return value
    if isinstance(value, int) and value in (0, 1):
        return bool(value)
    if isinstance(value, str):
        low = value.strip().lower()
        if low in ("yes", "true", "t", "y", "1"):
            return True
        if low in ("no", "false", "f", "n", "0"):
            return False
    raise FlagError(f"--{name} {value!r} is not a boolean: pass True or False (official str2bool also takes yes/no, t/f, y/n, 1/0)")


def _parse_int(value: Any, name: str) -> int:
    if isinstance(value, bool):
        raise FlagError(f"--{name} expects an integer, got the boolean {value}")
    if isinstance(value, int):
        return value
    if isinstance(value, float) and value.is_integer():
        return int(value)
    if isinstance(value, str):
        try:
            return int(value.strip())
        except ValueError:
            pass
    raise FlagError(f"--{name} expects an integer, got {value!r}")


def _parse_float(value: Any, name: str) -> float:
    if isinstance(value, bool):
        raise FlagError(f"--{name} expects a number, got the boolean {value}")
    if isinstance(value, (int, float)):
        return float(value)
    if isinstance(value, str):
        try:
            return float(value.strip())
        except ValueError:
            pass
    raise FlagError(f"--{name} expects a number, got {value!r}")


def _parse_csv(value: Any, name: str) -> str:
    """A comma-separated flag ("16,8"); a list or tuple of numbers is joined the same way."""
    if isinstance(value, str):
        return ",".join(p.strip() for p in value.split(",")) if value.strip() else ""
    if isinstance(value, (int, float)) and not isinstance(value, bool):
        return _fmt_number(value)
    if isinstance(value, (list, tuple)):
        return ",".join(_fmt_number(v) if not isinstance(v, str) else v.strip() for v in value)
    raise FlagError(f"--{name} expects comma-separated numbers like 16,8, got {value!r}")


def _fmt_number(v: Any) -> str:
    if isinstance(v, float) and v.is_integer():
        return str(int(v))
    return str(v)


def _parse_value(name: str, value: Any, default: Any) -> Any:
    """Parse one flag value the way the official argparse types would (type of the default)."""
    if name in _CSV_FLAGS:
        return _parse_csv(value, name)
    if name in _LIST_FLAGS:
        if isinstance(value, str):
            return [p for p in re.split(r"[\s,]+", value.strip()) if p]
        if isinstance(value, (list, tuple)) and all(isinstance(p, str) for p in value):
            return [p.strip() for p in value]
        raise FlagError(f"--{name} expects module names like input_blocks.14.1 middle_block.1, got {value!r}")
    if name in _JSON_FLAGS:
        if value is None or isinstance(value, dict):
            return value
        if isinstance(value, str):
            try:
                parsed = json.loads(value)
            except json.JSONDecodeError as exc:
                raise FlagError(f"--{name} is not valid JSON ({exc.msg}): pass e.g. '{{\"attention_mask_identity\": [250, 0]}}'") from None
            if not isinstance(parsed, dict):
                raise FlagError(f"--{name} must be a JSON object like {{\"attention_mask_identity\": [250, 0]}}, got {value!r}")
            return parsed
        raise FlagError(f"--{name} expects a JSON object, got {value!r}")
    if name in _OPTIONAL_STR_FLAGS:
        if value is None or isinstance(value, str):
            return value
        return str(value)
    if name in _FLOAT_FLAGS:
        return _parse_float(value, name)
    if name == "timestep_respacing" and isinstance(value, int) and not isinstance(value, bool):
        return str(value)
    if isinstance(default, bool):
        return str2bool(value, name)
    if isinstance(default, int):
        return _parse_int(value, name)
    if isinstance(default, float):
        return _parse_float(value, name)
    if isinstance(default, str):
        if not isinstance(value, str):
            raise FlagError(f"--{name} expects a string, got {value!r}")
        return value
    return value


# ------------------------------------------------------------------------------------------------
# resolve_flags
# ------------------------------------------------------------------------------------------------

@dataclass(frozen=True)
class ResolvedFlags:
    """A complete official flag set: what the official argparse would hand to ``create_*``.

    family:   "guided" (guided-diffusion and its SAG / PAG forks) or "improved" (improved-diffusion).
    variant:  which script's guidance table applied: "openai", "sag" (SAG flags given) or "pag"
              (PAG-only flags given: ``guide_scale`` then defaults to 4.0). The guidance, classifier
              and sampling flags describe no network, so both families take them.
    super_res: the upsampler scripts' flags (``large_size`` / ``small_size``) were given; then
              ``values["image_size"]`` is set to ``large_size``.
    values:   every flag of the family with its parsed value (given or default). Treat as read-only.
    given:    the names the caller passed.
    """
    family: Family
    variant: Literal["openai", "sag", "pag"]
    super_res: bool
    values: Dict[str, Any]
    given: frozenset


def _normalise_name(name: Any) -> str:
    if not isinstance(name, str):
        raise FlagError(f"flag names must be strings, got {name!r}")
    return name[2:] if name.startswith("--") else name


def normalise_flags(flags: Optional[Mapping[str, Any]]) -> Dict[str, Any]:
    """A flag dict keyed by the names without their leading ``--`` (values untouched)."""
    return {_normalise_name(name): value for name, value in (flags or {}).items()}


def _unknown_flag_error(name: str, valid: Iterable[str], family: Optional[str]) -> FlagError:
    close = difflib.get_close_matches(name, sorted(valid), n=1, cutoff=0.5)
    where = f"{family}-diffusion" if family else "official"
    hint = f"did you mean --{close[0]}?" if close else "see checkpoints_convert.flags.valid_flag_names()"
    return FlagError(f"unknown {where} flag --{name}: {hint}")


def family_from_names(names: Iterable[str]) -> Optional[Family]:
    """The repository that flag names reveal, or None when every name is common to both.

    An improved-diffusion-only name (``sigma_small``) means improved; otherwise any guided-only name
    (``num_head_channels``, ``resblock_updown``, ``use_fp16``, the SAG / PAG / classifier flags) means
    guided. Improved-only and guided-only network names together are a FlagError naming both.
    """
    names = set(names)
    improved = sorted(names & _IMPROVED_ONLY)
    guided = sorted(names & _GUIDED_MODEL_ONLY)
    if improved and guided:
        raise FlagError(
            f"flags mix improved-diffusion (--{', --'.join(improved)}) and guided-diffusion "
            f"(--{', --'.join(guided[:3])}{', ...' if len(guided) > 3 else ''}) names; a checkpoint comes "
            f"from one repository: drop one set or pass family= explicitly")
    if improved:
        return "improved"
    return "guided" if names & _GUIDED_ONLY else None


def _infer_family(names: Iterable[str]) -> Family:
    return family_from_names(names) or "guided"


def _foreign_flag_problem(name: str, value: Any, family: Family, values: Mapping[str, Any]) -> Optional[str]:
    """Why a flag of the other repository would change what ``family`` builds, or None when its
    value is what that repository builds anyway (then it is accepted and has no effect)."""
    if family == "guided":                                  # sigma_small
        if not str2bool(value, name) or values["learn_sigma"]:
            return None                                     # learned variances ignore it
        return "guided-diffusion has no small fixed variance: with --learn_sigma False it always uses the large one"
    parsed = _parse_value(name, value, GUIDED_MODEL_DEFAULTS[name])
    if name == "use_fp16":
        return None                                         # a GPU speed switch, not the network
    if name == "num_head_channels":
        return None if parsed == -1 else "improved-diffusion splits attention into --num_heads heads, never by head width"
    if name in ("resblock_updown", "use_new_attention_order"):
        return None if not parsed else {"resblock_updown": "improved-diffusion always resamples with convolutions",
                                         "use_new_attention_order": "improved-diffusion's attention has the legacy order"}[name]
    table = IMPROVED_SUPER_RES_CHANNEL_MULT if "large_size" in values else IMPROVED_CHANNEL_MULT
    builds = table.get(values.get("large_size", values["image_size"]))
    if not parsed or (builds is not None and _parse_channel_mult(parsed) == builds):
        return None
    return f"improved-diffusion fixes channel_mult by the image size ({_fmt_mult(builds) if builds else 'none for this size'})"


def _fmt_mult(mult) -> str:
    return ",".join(_fmt_number(m) for m in mult)


def resolve_flags(flags: Mapping[str, Any], family: Optional[Family] = None) -> ResolvedFlags:
    """Validate and complete an official flag dict, as the official argparse would.

    Args:
        flags: flag name (with or without ``--``) -> value; values may be Python values or
            argparse-style strings ("True", "16,8", "250").
        family: "guided" or "improved"; inferred when None by :func:`family_from_names`, neither
            meaning guided. (Loading a checkpoint decides it otherwise: checkpoints_convert.resolve.)

    Returns: a :class:`ResolvedFlags` whose ``values`` holds every flag of the family.

    A network flag of the other family is accepted only at the value the family builds anyway
    (``--resblock_updown False`` for improved, ``--sigma_small False`` for guided) and is then left
    out of ``values``. Raises FlagError (one line) for an unknown name (with the closest valid one),
    another family's flag that would change the network, a value that does not parse, or upsampler
    flags mixed with base-model-only ones.
    """
    given = normalise_flags(flags)
    everything = valid_flag_names(None)
    for name in given:
        if name not in everything:
            raise _unknown_flag_error(name, valid_flag_names(family), family)
    if family is None:
        family = _infer_family(given)
    elif family not in ("guided", "improved"):
        raise FlagError(f"family must be 'guided' or 'improved', got {family!r}")
    own = valid_flag_names(family)
    foreign = {name: value for name, value in given.items() if name not in own}

    super_res = bool(set(given) & _SUPER_RES_NAMES)
    variant = "pag" if set(given) & _PAG_ONLY_NAMES else ("sag" if set(given) & _SAG_NAMES else "openai")
    if family == "guided":
        defaults = dict(GUIDED_MODEL_DEFAULTS)
        if super_res:
            defaults.update(GUIDED_SUPER_RES_DEFAULTS)
    else:
        defaults = dict(IMPROVED_MODEL_DEFAULTS)
        defaults.update(IMPROVED_SAMPLE_DEFAULTS)
        if super_res:
            defaults.update(IMPROVED_SUPER_RES_DEFAULTS)
    defaults.update(GUIDED_CLASSIFIER_DEFAULTS)             # the network-free flags: one table for both
    defaults.update(GUIDED_SAMPLE_DEFAULTS)
    defaults.update(PAG_DEFAULTS if variant == "pag" else SAG_DEFAULTS)

    values = {k: (list(v) if isinstance(v, list) else v) for k, v in defaults.items()}
    for name, value in given.items():
        if name not in foreign:
            values[name] = _parse_value(name, value, defaults.get(name, PAG_DEFAULTS.get(name)))
    other = "improved" if family == "guided" else "guided"
    for name, value in foreign.items():
        problem = _foreign_flag_problem(name, value, family, values)
        if problem:
            raise FlagError(f"--{name} is {'an' if other == 'improved' else 'a'} {other}-diffusion flag, not "
                            f"{'a' if family == 'guided' else 'an'} {family}-diffusion one ({problem}): drop it")

    if super_res:
        large = values["large_size"]
        if "image_size" in given and values["image_size"] != large:
            raise FlagError(f"--image_size {values['image_size']} contradicts --large_size {large}: the upsampler scripts take only --large_size and --small_size")
        if values.get("channel_mult"):
            raise FlagError("--channel_mult is not a flag of the upsampler scripts (channel_mult follows --large_size): drop it")
        if values.get("use_new_attention_order"):
            raise FlagError("--use_new_attention_order is not a flag of the upsampler scripts: drop it")
        if values["small_size"] <= 0 or values["small_size"] >= large:
            raise FlagError(f"--small_size {values['small_size']} must be positive and smaller than --large_size {large}")
        values["image_size"] = large
    return ResolvedFlags(family=family, variant=variant, super_res=super_res, values=values,
                         given=frozenset(given))


def _as_resolved(flags: Any) -> ResolvedFlags:
    return flags if isinstance(flags, ResolvedFlags) else resolve_flags(flags)


# ------------------------------------------------------------------------------------------------
# Configs from flags
# ------------------------------------------------------------------------------------------------

def _parse_channel_mult(text: str) -> Tuple[float, ...]:
    try:
        mult = tuple(float(p) for p in text.split(","))
    except ValueError:
        raise FlagError(f"--channel_mult {text!r} must be comma-separated numbers like 1,1,2,2,4,4") from None
    return tuple(int(m) if m.is_integer() else m for m in mult)


def _attention_pixels(text: str, image_size: int, num_levels: int, flag: str) -> Tuple[int, ...]:
    """``--attention_resolutions`` -> the feature-map sizes (pixels) that really get attention.

    The official code turns each resolution r into the factor ``image_size // r`` and adds
    attention where the running downsample factor equals it. A resolution that does not divide the
    image size is refused here (officially it would silently land on another level); one whose factor
    is never reached is dropped, as the official network silently has no attention there.
    """
    if not text.strip():
        return ()
    pixels = []
    for part in text.split(","):
        res = _parse_int(part, flag)
        if res <= 0 or image_size % res:
            raise FlagError(f"--{flag} {res} does not divide image size {image_size}: official code would use factor {image_size}//{res} silently; pass sizes like {image_size // 2},{image_size // 4}")
        factor = image_size // res
        if factor & (factor - 1) == 0 and factor < 2 ** num_levels and res not in pixels:
            pixels.append(res)
    return tuple(sorted(pixels, reverse=True))


def attention_factors(config: UNetConfig | EncoderUNetConfig) -> Tuple[int, ...]:
    """Downsample factors (1, 2, 4, ...) of the levels that have attention, ascending."""
    levels = len(config.channel_mult)
    factors = {config.image_size // r for r in config.attention_resolutions}
    return tuple(sorted(f for f in factors if f & (f - 1) == 0 and f < 2 ** levels))


def unet_config_from_flags(flags: ResolvedFlags | Mapping[str, Any]) -> UNetConfig:
    """The U-Net the official ``create_model`` / ``sr_create_model`` would build from these flags.

    channel_mult "" takes the family's per-size default (guided 64/128/256/512, improved
    32/64/256; upsamplers by ``large_size``); out_channels is 6 with ``learn_sigma``; num_classes is
    1000 with ``class_cond``; improved-diffusion has no head-channels, resblock_updown or new
    attention order. Raises FlagError (one line) for an unsupported size or an invalid U-Net.
    """
    r = _as_resolved(flags)
    v = r.values
    size = v["image_size"]
    if r.super_res:
        table = GUIDED_SUPER_RES_CHANNEL_MULT if r.family == "guided" else IMPROVED_SUPER_RES_CHANNEL_MULT
        if size not in table:
            raise FlagError(f"unsupported --large_size {size} for the {r.family}-diffusion upsampler: the official sr_create_model knows {', '.join(map(str, sorted(table)))}")
        mult = table[size]
    elif r.family == "improved":
        if size not in IMPROVED_CHANNEL_MULT:
            raise FlagError(f"unsupported --image_size {size} for improved-diffusion (no --channel_mult flag there): use 32, 64 or 256, or the guided-diffusion flags with --channel_mult")
        mult = IMPROVED_CHANNEL_MULT[size]
    elif v["channel_mult"]:
        mult = _parse_channel_mult(v["channel_mult"])
    else:
        if size not in GUIDED_CHANNEL_MULT:
            raise FlagError(f"no default channel_mult for --image_size {size} (guided-diffusion knows 64, 128, 256, 512): pass --channel_mult, e.g. --channel_mult 1,2,2,2")
        mult = GUIDED_CHANNEL_MULT[size]
    attention = _attention_pixels(v["attention_resolutions"], size, len(mult), "attention_resolutions")
    guided = r.family == "guided"
    try:
        return UNetConfig(
            image_size=size,
            in_channels=3,
            model_channels=v["num_channels"],
            out_channels=6 if v["learn_sigma"] else 3,
            num_res_blocks=v["num_res_blocks"],
            attention_resolutions=attention,
            dropout=v["dropout"],
            channel_mult=mult,
            num_classes=1000 if v["class_cond"] else None,
            num_heads=v["num_heads"],
            num_head_channels=v["num_head_channels"] if guided else -1,
            num_heads_upsample=v["num_heads_upsample"],
            use_scale_shift_norm=v["use_scale_shift_norm"],
            resblock_updown=v["resblock_updown"] if guided else False,
            use_new_attention_order=v.get("use_new_attention_order", False) if guided else False,
            super_res=r.super_res,
        )
    except ConfigError as exc:
        raise FlagError(f"these flags describe no valid U-Net: {exc}") from None


_SCHEDULES = ("linear", "cosine")
_RESPACING = re.compile(r"^(|ddim\d+|\d+(,\d+)*)$")


def diffusion_config_from_flags(flags: ResolvedFlags | Mapping[str, Any]) -> DiffusionConfig:
    """The diffusion process of ``create_gaussian_diffusion`` (guided: sigma_small is always False)."""
    r = _as_resolved(flags)
    v = r.values
    if v["noise_schedule"] not in _SCHEDULES:
        close = difflib.get_close_matches(str(v["noise_schedule"]), _SCHEDULES, n=1)
        hint = f"did you mean {close[0]}?" if close else "use linear or cosine"
        raise FlagError(f"unknown --noise_schedule {v['noise_schedule']!r}: {hint}")
    if v["diffusion_steps"] < 1:
        raise FlagError(f"--diffusion_steps must be at least 1, got {v['diffusion_steps']}")
    respacing = v["timestep_respacing"].replace(" ", "")
    if not _RESPACING.match(respacing):
        raise FlagError(f"--timestep_respacing {v['timestep_respacing']!r} is not '', a count like 250, section counts like 10,15,20, or ddimN like ddim25")
    return DiffusionConfig(
        steps=v["diffusion_steps"],
        noise_schedule=v["noise_schedule"],
        timestep_respacing=respacing,
        learn_sigma=v["learn_sigma"],
        sigma_small=v.get("sigma_small", False) if r.family == "improved" else False,
        use_kl=v["use_kl"],
        predict_xstart=v["predict_xstart"],
        rescale_timesteps=v["rescale_timesteps"],
        rescale_learned_sigmas=v["rescale_learned_sigmas"],
    )


_POOLS = ("adaptive", "attention", "spatial", "spatial_v2")


def classifier_config_from_flags(flags: ResolvedFlags | Mapping[str, Any]) -> EncoderUNetConfig:
    """The noisy-image classifier of guided-diffusion ``create_classifier``.

    channel_mult is fixed by ``--image_size`` (64/128/256/512 only), num_head_channels is
    hard-coded 64, 1000 classes; width, depth, attention, pool, scale-shift and resblock_updown
    come from the ``--classifier_*`` flags. improved-diffusion has no classifier.
    """
    r = _as_resolved(flags)
    if r.family != "guided":
        raise FlagError("improved-diffusion has no classifier: classifier flags belong to guided-diffusion (classifier_sample.py)")
    v = r.values
    size = v["image_size"]
    if size not in CLASSIFIER_CHANNEL_MULT:
        raise FlagError(f"unsupported --image_size {size} for the classifier: the official create_classifier knows only 64, 128, 256, 512")
    mult = CLASSIFIER_CHANNEL_MULT[size]
    pool = v["classifier_pool"]
    if pool not in _POOLS:
        close = difflib.get_close_matches(str(pool), _POOLS, n=1)
        raise FlagError(f"unknown --classifier_pool {pool!r}: {'did you mean ' + close[0] + '?' if close else 'use adaptive, attention, spatial or spatial_v2'}")
    attention = _attention_pixels(v["classifier_attention_resolutions"], size, len(mult), "classifier_attention_resolutions")
    try:
        return EncoderUNetConfig(
            image_size=size,
            in_channels=3,
            model_channels=v["classifier_width"],
            out_channels=1000,
            num_res_blocks=v["classifier_depth"],
            attention_resolutions=attention,
            channel_mult=mult,
            num_head_channels=64,
            use_scale_shift_norm=v["classifier_use_scale_shift_norm"],
            resblock_updown=v["classifier_resblock_updown"],
            pool=pool,
        )
    except ConfigError as exc:
        raise FlagError(f"these classifier flags describe no valid classifier: {exc}") from None


# ------------------------------------------------------------------------------------------------
# Attention sites: official module names <-> our site names
# ------------------------------------------------------------------------------------------------

_MODULE_RE = re.compile(r"^(input_blocks|output_blocks)\.(\d+)\.1$")
_SITE_RE = re.compile(r"^(input|output)\.(\d+)$")


def official_module_to_site(name: str) -> str:
    """``input_blocks.14.1`` -> ``input.14``, ``middle_block.1`` -> ``middle``, ``output_blocks.2.1`` -> ``output.2``."""
    if isinstance(name, str):
        text = name.strip()
        if text == "middle_block.1":
            return "middle"
        match = _MODULE_RE.match(text)
        if match:
            return f"{'input' if match.group(1) == 'input_blocks' else 'output'}.{int(match.group(2))}"
    raise FlagError(f"{name!r} names no attention module: use input_blocks.N.1, middle_block.1 or output_blocks.N.1 (the AttentionBlock is position 1 of its block)")


def site_to_official_module(site: str) -> str:
    """``input.14`` -> ``input_blocks.14.1``, ``middle`` -> ``middle_block.1``, ``output.2`` -> ``output_blocks.2.1``."""
    if isinstance(site, str):
        text = site.strip()
        if text == "middle":
            return "middle_block.1"
        match = _SITE_RE.match(text)
        if match:
            return f"{match.group(1)}_blocks.{int(match.group(2))}.1"
    raise FlagError(f"unknown attention site {site!r}: use input.N, middle or output.N")


def attention_sites(config: UNetConfig) -> List[str]:
    """Our names of every attention block of the U-Net ``config`` describes, in forward order.

    Input block ``1 + level * (num_res_blocks + 1) + j`` and output block
    ``(L - 1 - level) * (num_res_blocks + 1) + i`` carry attention when their level's downsample
    factor ``2**level`` is an attention factor; the middle block always does.
    """
    levels = len(config.channel_mult)
    factors = set(attention_factors(config))
    nrb = config.num_res_blocks
    sites = []
    for level in range(levels):
        if 2 ** level in factors:
            sites += [f"input.{1 + level * (nrb + 1) + j}" for j in range(nrb)]
    sites.append("middle")
    for k, level in enumerate(reversed(range(levels))):
        if 2 ** level in factors:
            sites += [f"output.{k * (nrb + 1) + i}" for i in range(nrb + 1)]
    return sites


def recommended_sag_site(config: UNetConfig) -> str:
    """The SAG site used when none is typed: the official default ``output.2`` (``--sel_attn_block
    output --sel_attn_depth 2``) where that block has attention -- every released guided-diffusion
    U-Net --, else the last output block of the deepest decoder level with attention (the
    improved-diffusion LSUN U-Nets, attention at 16 px only: ``output.5``; CIFAR-10: ``output.7``),
    else ``middle`` (a U-Net without attention levels)."""
    sites = attention_sites(config)
    default = f"output.{SAG_DEFAULTS['sel_attn_depth']}"
    if default in sites:
        return default
    outputs = [site for site in sites if site.startswith("output.")]
    return outputs[config.num_res_blocks] if outputs else "middle"   # each level has num_res_blocks + 1


def _valid_sites(r: ResolvedFlags) -> Optional[List[str]]:
    """The attention sites of the U-Net the flags describe; None when the model flags themselves
    fail (they fail on their own, with their own message, when the model is built)."""
    try:
        return attention_sites(unet_config_from_flags(r))
    except FlagError:
        return None


def _check_sites(valid: Optional[Sequence[str]], sites: Sequence[str], flag: str) -> None:
    """Refuse sites that name no attention block of this U-Net (officially: a crash or a silent no-op)."""
    for site in sites:
        if valid is not None and site not in valid:
            raise FlagError(f"{flag} points at {site_to_official_module(site)}, which is not an attention block of this U-Net: valid sites are {', '.join(valid)}")


def _attention_layers(r: ResolvedFlags, names: Sequence[str]) -> Tuple[List[str], List[str]]:
    """Official module names -> (our sites of the names that are attention blocks of this U-Net,
    the names that are not)."""
    valid = _valid_sites(r)
    sites, ignored = [], []
    for name in names:
        try:
            site = official_module_to_site(name)
        except FlagError:
            site = None
        if site is None or (valid is not None and site not in valid):
            ignored.append(str(name))
        elif site not in sites:
            sites.append(site)
    return sites, ignored


def _paper_scale(guide_scale: float) -> float:
    """Paper s from the official g = 1 + s, rounded so 1.1 gives 0.1 rather than 0.10000000000000009."""
    return round(float(guide_scale) - 1.0, 12)


def sag_settings_from_flags(flags: ResolvedFlags | Mapping[str, Any],
                            unet_config: Optional[UNetConfig] = None) -> Optional[Dict[str, Any]]:
    """SAG settings in our terms from the SAG repo's flags (their defaults where not given).

    Returns ``{"scale": s = guide_scale - 1, "official_guide_scale": g, "guide_start": int,
    "blur_sigma": float, "site": "output.d" | "middle", "map_mode": "official",
    "official_num_heads": num_heads}``, or None for PAG-repo flags without a "sag" mode in
    ``--guidance_strategies`` (that repo's ``--guide_scale`` is the PAG scale; with a "sag" mode
    the dict adds its ``step_range``). Both families take SAG flags: they describe no network.
    ``unet_config``: the U-Net guided (default: the one the flags describe); its sites and its
    ``num_heads`` are used. A site the user did not type never fails: without ``--sel_attn_depth``
    the output site is :func:`recommended_sag_site`. ``map_mode`` is "official" because the
    published numbers use the model-wide ``num_heads`` with the legacy split (SPEC.md Q1/Q2);
    whether to use it is the caller's decision. Any ``--guide_start`` is taken as the official code
    takes it (guide where guide_start > t; 0 or below: never). Raises FlagError when a typed
    ``--sel_attn_block/--sel_attn_depth`` names no attention block.
    """
    r = _as_resolved(flags)
    v = r.values
    sag_window = None
    if r.variant == "pag":
        # The PAG repo reuses --guide_scale for its own scale and runs SAG only as the "sag"
        # mode of --guidance_strategies, over [start, end] respaced steps.
        strategies = v.get("guidance_strategies") or {}
        if "sag" not in strategies:
            return None
        sag_window = _strategy_window(strategies, "sag")
    if unet_config is None:
        try:
            unet_config = unet_config_from_flags(r)
        except FlagError:
            unet_config = None       # the model flags fail on their own, with their own message
    valid = attention_sites(unet_config) if unet_config is not None else None
    block = v["sel_attn_block"]
    if block == "middle":
        site = "middle"
    elif block == "output":
        depth = v["sel_attn_depth"]
        if depth < 0:
            raise FlagError(f"--sel_attn_depth must be non-negative, got {depth}")
        site = f"output.{depth}"
        if "sel_attn_depth" not in r.given and unet_config is not None:
            recommended = recommended_sag_site(unet_config)
            site = recommended if recommended.startswith("output.") else site
    else:
        raise FlagError(f"--sel_attn_block {block!r} is not supported by the official SAG code: use output (with --sel_attn_depth) or middle")
    _check_sites(valid, [site], "--sel_attn_block/--sel_attn_depth")
    return {
        "scale": _paper_scale(v["guide_scale"]),
        "official_guide_scale": float(v["guide_scale"]),
        "guide_start": int(v["guide_start"]),
        "blur_sigma": float(v["blur_sigma"]),
        "site": site,
        "map_mode": "official",
        "official_num_heads": int(unet_config.num_heads if unet_config is not None else v["num_heads"]),
        **({"step_range": sag_window} if sag_window is not None else {}),
    }


def _strategy_window(strategies: Mapping[str, Any], mode: str) -> Tuple[int, int]:
    window = strategies[mode]
    if not (isinstance(window, (list, tuple)) and len(window) == 2):
        raise FlagError(f"--guidance_strategies {mode} must be [start, end], got {window!r}")
    start, end = (_parse_int(x, "guidance_strategies") for x in window)
    if start < 0 or end < 0:
        raise FlagError(f"--guidance_strategies {mode} [{start}, {end}] must be non-negative step indices (it applies where end <= t <= start)")
    return start, end          # start < end: officially no step satisfies it, the mode never runs


def pag_settings_from_flags(flags: ResolvedFlags | Mapping[str, Any]) -> Optional[Dict[str, Any]]:
    """PAG settings in our terms from the PAG repo's flags, or None without an identity strategy.

    Returns ``{"scale": s = guide_scale - 1, "official_guide_scale": g, "sites": [...],
    "step_range": (start, end), "drop_rate": noise_scale, "random_layer": drop_layer_randomly,
    "other_strategies": {...}}``. ``step_range`` is inclusive on respaced indices: PAG applies at
    step t iff end <= t <= start (``--guidance_strategies '{"attention_mask_identity": [start, end]}'``).
    ``drop_rate`` is ``--noise_scale``, the rate the official code really uses (``--drop_rate`` is
    never read, SPEC.md Q12); 1.0 is the exact identity. ``--drop_layers`` names that are no
    attention block of this U-Net are left out of ``sites`` and listed in ``ignored_layers``: the
    official code silently ignores them (PROVENANCE.md PAG quirk 4; its ADM-256 default list on a
    smaller U-Net perturbs only ``middle_block.1``). ``other_strategies`` lists any other
    modes of ``--guidance_strategies`` untouched, for the caller to accept or refuse.
    """
    r = _as_resolved(flags)
    v = r.values
    strategies = v.get("guidance_strategies")
    if not strategies or "attention_mask_identity" not in strategies:
        return None
    start, end = _strategy_window(strategies, "attention_mask_identity")
    layers = v.get("drop_layers", PAG_DEFAULTS["drop_layers"])
    sites, ignored = _attention_layers(r, layers)
    return {
        "scale": _paper_scale(v["guide_scale"]),
        "official_guide_scale": float(v["guide_scale"]),
        "sites": sites,
        "ignored_layers": ignored,
        "step_range": (start, end),
        "drop_rate": float(v.get("noise_scale", 1.0)),
        "random_layer": bool(v.get("drop_layer_randomly", False)),
        "other_strategies": {k: w for k, w in strategies.items() if k != "attention_mask_identity"},
    }
