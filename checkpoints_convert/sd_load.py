"""Loading Stable Diffusion 1.x / 2.x weights: a diffusers-format folder, or an original single file.

Folder (what ``StableDiffusionPipeline.save_pretrained`` writes)::

    model_index.json                 component classes: unet UNet2DConditionModel, vae AutoencoderKL,
                                     text_encoder CLIPTextModel, tokenizer CLIPTokenizer, scheduler <class>
    unet/config.json                 + diffusion_pytorch_model.safetensors (or .bin)
    vae/config.json                  + diffusion_pytorch_model.safetensors (or .bin)
    text_encoder/config.json         + model.safetensors (or pytorch_model.bin)
    tokenizer/vocab.json, merges.txt (+ special_tokens_map.json, tokenizer_config.json)
    scheduler/scheduler_config.json  the scheduler class from model_index.json (diffusers' rule)

``.safetensors`` files are read with the ``safetensors`` package, ``.bin`` files only with
``torch.load(weights_only=True)`` (``checkpoints_convert.safe_load``); an ``.fp16`` variant is used
when it is the only file. Parameter names are diffusers' / transformers' own, so every state dict
loads as it is (strict); a text encoder saved without the ``text_model.`` prefix (transformers >= 5.6)
gets it back.

Single file (the ``v1-5-pruned-emaonly.safetensors`` / ``.ckpt`` layout: ``model.diffusion_model.*``,
``first_stage_model.*``, ``cond_stage_model.*``): mapped by ``checkpoints_convert.sd_keys_unet`` and
``sd_keys_vae_text``; configs come from ``config_folder`` (a diffusers SD folder of the same model)
where it has them, else they are inferred from the tensor shapes (SD 1.x / 2.x). A single file holds
no tokenizer, so ``config_folder`` (with ``tokenizer/``) is required; its ``scheduler/`` is used if
present, else SD's DDIM settings (epsilon prediction: pass a folder for v-prediction models).

Every problem -- a missing part, an unknown class name, a missing, unexpected or wrongly shaped
tensor -- is one ``CheckpointError`` line naming the file and the fix.
"""
from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Dict, NamedTuple, Optional, Union

import torch

from .errors import CheckpointError, one_line
from .safe_load import load_state_dict

PathLike = Union[str, os.PathLike]

COMPONENT_CLASSES = {
    "unet": ("UNet2DConditionModel",),
    "vae": ("AutoencoderKL",),
    "text_encoder": ("CLIPTextModel",),
    "tokenizer": ("CLIPTokenizer", "CLIPTokenizerFast"),
}
PIPELINE_CLASSES = ("StableDiffusionPipeline", "StableDiffusionImg2ImgPipeline", "StableDiffusionSAGPipeline",
                    "StableDiffusionPAGPipeline")
WEIGHT_FILES = {
    "unet": ("diffusion_pytorch_model.safetensors", "diffusion_pytorch_model.bin",
             "diffusion_pytorch_model.fp16.safetensors", "diffusion_pytorch_model.fp16.bin"),
    "vae": ("diffusion_pytorch_model.safetensors", "diffusion_pytorch_model.bin",
            "diffusion_pytorch_model.fp16.safetensors", "diffusion_pytorch_model.fp16.bin"),
    "text_encoder": ("model.safetensors", "pytorch_model.bin", "model.fp16.safetensors", "pytorch_model.fp16.bin"),
}
TEXT_PREFIX = "text_model."
# SD 1.x's own scheduler settings (v1-inference.yaml: linear_start 0.00085, linear_end 0.012, 1000 steps),
# as diffusers writes them for a DDIM scheduler; used for a single file without config_folder/scheduler.
DEFAULT_SCHEDULER_CONFIG = {
    "_class_name": "DDIMScheduler", "num_train_timesteps": 1000, "beta_start": 0.00085, "beta_end": 0.012,
    "beta_schedule": "scaled_linear", "clip_sample": False, "set_alpha_to_one": False, "steps_offset": 1,
    "prediction_type": "epsilon", "timestep_spacing": "leading",
}


class SDComponents(NamedTuple):
    """The loaded parts of an SD model (modules on the CPU, float32, eval mode)."""
    unet: torch.nn.Module
    vae: torch.nn.Module
    text_encoder: torch.nn.Module
    tokenizer: object
    scheduler: object


# -- files --------------------------------------------------------------------------------------

def read_json(path: PathLike, what: str) -> dict:
    """A JSON object from ``path``; one line if it is missing or not JSON."""
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"missing {what}: {path} does not exist; a diffusers Stable Diffusion folder has it "
                              "(save the pipeline with save_pretrained, or download the whole repository)")
    try:
        value = json.loads(path.read_text(encoding="utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise CheckpointError(f"{path} is not valid JSON ({one_line(exc, 120)}); fetch the file again") from None
    if not isinstance(value, dict):
        raise CheckpointError(f"{path} holds a JSON {type(value).__name__}, expected an object")
    return value


def load_tensors(path: PathLike) -> Dict[str, torch.Tensor]:
    """{name: tensor} from a ``.safetensors`` file (safetensors) or a PyTorch file (weights_only=True)."""
    path = Path(path)
    if path.suffix == ".safetensors":
        if not path.is_file():
            raise CheckpointError(f"no such weights file: {path}")
        from safetensors import SafetensorError
        from safetensors.torch import load_file
        try:
            return load_file(str(path), device="cpu")
        except (SafetensorError, OSError, ValueError) as exc:
            raise CheckpointError(f"could not read {path} ({one_line(exc, 160)}): the file may be truncated or "
                                  "corrupt; fetch it again") from None
    return load_state_dict(path)


def _weights_file(folder: Path, component: str) -> Path:
    for name in WEIGHT_FILES[component]:
        if (folder / name).is_file():
            return folder / name
    if any(folder.glob("*.index.json")):
        raise CheckpointError(f"{folder} holds sharded weights (*.index.json), which are not supported: "
                              f"save the {component} as one {WEIGHT_FILES[component][0]}")
    raise CheckpointError(f"missing {component} weights: {folder} has none of {', '.join(WEIGHT_FILES[component][:2])}")


# -- state dicts into modules -------------------------------------------------------------------

def _listed(keys, limit: int = 4) -> str:
    keys = sorted(keys)
    return ", ".join(keys[:limit]) + (f" (+{len(keys) - limit} more)" if len(keys) > limit else "")


def load_into(module: torch.nn.Module, state: Dict[str, torch.Tensor], component: str, source: str) -> torch.nn.Module:
    """Copy ``state`` into ``module`` (float32, strict): unknown, missing or wrongly shaped tensors are
    one line each. Returns the module in eval mode."""
    expected = module.state_dict()
    unexpected = [k for k in state if k not in expected and not k.endswith("position_ids")]
    if unexpected:
        raise CheckpointError(f"{source}: {len(unexpected)} {component} tensors this model does not have "
                              f"({_listed(unexpected)}); the weights belong to a different architecture or config")
    missing = [k for k in expected if k not in state]
    if missing:
        raise CheckpointError(f"{source}: {len(missing)} {component} tensors are missing ({_listed(missing)}); "
                              "the file is incomplete or its config does not match it")
    for key, value in expected.items():
        if tuple(state[key].shape) != tuple(value.shape):
            raise CheckpointError(f"{source}: {component} tensor {key} has shape {tuple(state[key].shape)}, the "
                                  f"config gives {tuple(value.shape)}; the config.json does not match the weights")
    module.load_state_dict({k: state[k].float() if state[k].is_floating_point() else state[k] for k in expected},
                          strict=True)
    return module.float().eval()


def _with_text_prefix(state: Dict[str, torch.Tensor]) -> Dict[str, torch.Tensor]:
    """transformers >= 5.6 saves CLIPTextModel without ``text_model.``; real SD folders have it."""
    if any(k.startswith(TEXT_PREFIX) for k in state):
        return state
    return {TEXT_PREFIX + k: v for k, v in state.items()}


# -- builders (the network classes live in unet/, the schedulers in diffusion/) ----------------

def build_unet(config: dict):
    from unet.sd_unet import SDUNet, SDUNetConfig
    return SDUNet(_config(SDUNetConfig.from_diffusers, config, "unet"))


def build_vae(config: dict):
    from unet.sd_vae import AutoencoderKL, AutoencoderKLConfig
    return AutoencoderKL(_config(AutoencoderKLConfig.from_diffusers, config, "vae"))


def build_text_encoder(config: dict):
    from unet.clip_text import CLIPTextConfig, CLIPTextModel
    return CLIPTextModel(_config(CLIPTextConfig.from_transformers, config, "text_encoder"))


def _config(factory, config: dict, component: str):
    try:
        return factory(config)
    except (KeyError, TypeError, ValueError) as exc:
        raise CheckpointError(f"{component} config: {one_line(exc, 300)}") from None


def build_scheduler(config: dict, class_name: Optional[str] = None):
    from diffusion.sd_schedulers import scheduler_from_config
    try:
        return scheduler_from_config(config, class_name)
    except (KeyError, TypeError, ValueError) as exc:
        raise CheckpointError(f"scheduler: {one_line(exc, 300)}") from None


def load_tokenizer(folder: PathLike):
    from unet.clip_tokenizer import CLIPTokenizer
    folder = Path(folder)
    for name in ("vocab.json", "merges.txt"):
        if not (folder / name).is_file():
            raise CheckpointError(f"missing tokenizer file {folder / name}: the CLIP tokenizer needs vocab.json and "
                                  "merges.txt (the SD repository's tokenizer/ folder)")
    try:
        return CLIPTokenizer.from_folder(folder)
    except (KeyError, TypeError, ValueError, json.JSONDecodeError) as exc:
        raise CheckpointError(f"tokenizer {folder}: {one_line(exc, 300)}") from None


# -- folder ---------------------------------------------------------------------------------------

def _check_model_index(folder: Path) -> dict:
    index = read_json(folder / "model_index.json", "model_index.json (the folder's list of components)")
    pipeline_class = index.get("_class_name")
    if pipeline_class not in PIPELINE_CLASSES:
        raise CheckpointError(f"{folder / 'model_index.json'}: pipeline class {pipeline_class!r} is not supported; "
                              f"this loads Stable Diffusion 1.x / 2.x folders ({', '.join(PIPELINE_CLASSES)})")
    for component, known in list(COMPONENT_CLASSES.items()) + [("scheduler", None)]:
        entry = index.get(component)
        if not (isinstance(entry, (list, tuple)) and len(entry) == 2 and isinstance(entry[1], str)):
            raise CheckpointError(f"{folder / 'model_index.json'}: no {component} entry (expected e.g. "
                                  f"\"{component}\": [\"diffusers\", \"{(known or ('DDIMScheduler',))[0]}\"])")
        if known is not None and entry[1] not in known:
            raise CheckpointError(f"{folder / 'model_index.json'}: {component} class {entry[1]!r} is not supported "
                                  f"(supported: {', '.join(known)})")
        if not (folder / component).is_dir():
            raise CheckpointError(f"missing part: {folder / component}/ does not exist, but model_index.json lists "
                                  f"{component}; download the whole model folder")
    return index


def load_folder(folder: PathLike) -> SDComponents:
    """Load every part of a diffusers SD folder (see the module docstring)."""
    folder = Path(folder)
    if not folder.is_dir():
        raise CheckpointError(f"no such model folder: {folder}")
    index = _check_model_index(folder)
    parts = {}
    for component, build in (("unet", build_unet), ("vae", build_vae), ("text_encoder", build_text_encoder)):
        sub = folder / component
        module = build(read_json(sub / "config.json", f"{component} config"))
        path = _weights_file(sub, component)
        state = load_tensors(path)
        if component == "text_encoder":
            state = _with_text_prefix(state)
        parts[component] = load_into(module, state, component, str(path))
    scheduler_config = read_json(folder / "scheduler" / "scheduler_config.json", "scheduler config")
    scheduler = build_scheduler(scheduler_config, index["scheduler"][1])
    return SDComponents(parts["unet"], parts["vae"], parts["text_encoder"], load_tokenizer(folder / "tokenizer"),
                        scheduler)


# -- single file ----------------------------------------------------------------------------------

def load_single_file(path: PathLike, config_folder: Optional[PathLike] = None) -> SDComponents:
    """Load an original LDM single-file checkpoint (see the module docstring)."""
    from .sd_keys_unet import unet_config_from_ldm, unet_state_from_ldm
    from .sd_keys_vae_text import (text_encoder_config_from_ldm, text_encoder_state_from_ldm,
                                   vae_config_from_ldm, vae_state_from_ldm)
    path = Path(path)
    if config_folder is None:
        raise CheckpointError(f"{path} is a single-file checkpoint, which holds no tokenizer: pass config_folder=<a "
                              "diffusers SD folder with tokenizer/> (e.g. the SD 1.5 repository; its configs are "
                              "used too, else they are inferred from the weights)")
    config_folder = Path(config_folder)
    if not config_folder.is_dir():
        raise CheckpointError(f"config_folder {config_folder} is not a folder")
    state = load_tensors(path)
    if not any(k.startswith("model.diffusion_model.") for k in state):
        raise CheckpointError(f"{path} has no model.diffusion_model.* tensors: it is not an original SD single-file "
                              "checkpoint (a diffusers folder loads as a folder)")
    parts = {}
    for component, build, config_from_ldm, state_from_ldm in (
            ("unet", build_unet, unet_config_from_ldm, unet_state_from_ldm),
            ("vae", build_vae, vae_config_from_ldm, vae_state_from_ldm),
            ("text_encoder", build_text_encoder, text_encoder_config_from_ldm, text_encoder_state_from_ldm)):
        config_path = config_folder / component / "config.json"
        try:
            folder_config = read_json(config_path, f"{component} config") if config_path.is_file() else None
            if component == "unet":
                config = config_from_ldm(state, folder_config)       # the folder's, checked against the shapes
            else:
                config = folder_config if folder_config is not None else config_from_ldm(state)
            component_state = state_from_ldm(state)
        except (KeyError, ValueError) as exc:
            if isinstance(exc, CheckpointError):
                raise
            raise CheckpointError(f"{path}: {component}: {one_line(exc, 300)}") from None
        if component == "text_encoder":
            component_state = _with_text_prefix(component_state)
        parts[component] = load_into(build(config), component_state, component, str(path))
    tokenizer_folder = config_folder / "tokenizer" if (config_folder / "tokenizer").is_dir() else config_folder
    scheduler_path = config_folder / "scheduler" / "scheduler_config.json"
    scheduler_config = read_json(scheduler_path, "scheduler config") if scheduler_path.is_file() \
        else DEFAULT_SCHEDULER_CONFIG
    return SDComponents(parts["unet"], parts["vae"], parts["text_encoder"], load_tokenizer(tokenizer_folder),
                        build_scheduler(scheduler_config))


def load_components(path_or_folder: PathLike, config_folder: Optional[PathLike] = None) -> SDComponents:
    """A diffusers folder, or a single file (with ``config_folder``)."""
    path = Path(path_or_folder)
    if path.is_dir():
        if config_folder is not None:
            raise CheckpointError(f"{path} is a diffusers folder, which carries its own configs: "
                                  "config_folder is only for single-file checkpoints")
        return load_folder(path)
    if not path.exists():
        raise CheckpointError(f"no such model: {path} (expected a diffusers SD folder or a .safetensors / .ckpt file)")
    return load_single_file(path, config_folder)
