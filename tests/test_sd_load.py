"""Loading Stable Diffusion: the diffusers folder, the original single file, and one clear line for
each way a folder or file can be wrong (checkpoints_convert/sd_load.py)."""
from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

from checkpoints_convert.errors import CheckpointError
from checkpoints_convert.sd_load import load_components, load_folder, load_single_file

FIXTURES = Path(__file__).parent / "fixtures" / "diffusers"
FOLDER = FIXTURES / "sd15_tiny"
SINGLE_FILE = FIXTURES / "sd15_tiny_ldm.safetensors"


pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def folder_parts():
    return load_folder(FOLDER)


@pytest.fixture()
def tmp_folder(tmp_path):
    copy = tmp_path / "sd"
    shutil.copytree(FOLDER, copy)
    return copy


def _assert_same_weights(a: torch.nn.Module, b: torch.nn.Module):
    sa, sb = a.state_dict(), b.state_dict()
    assert sa.keys() == sb.keys()
    for key in sa:
        assert torch.equal(sa[key], sb[key]), key


def _one_line_error(match: str, call, *args, **kwargs):
    with pytest.raises(CheckpointError, match=match) as info:
        call(*args, **kwargs)
    assert "\n" not in str(info.value)
    return str(info.value)


def test_folder_loads_strict_in_float32(folder_parts):
    unet_state = load_file(str(FOLDER / "unet" / "diffusion_pytorch_model.safetensors"))
    ours = folder_parts.unet.state_dict()
    assert all(torch.equal(ours[k], unet_state[k]) for k in unet_state) and len(ours) == len(unet_state)
    text_state = load_file(str(FOLDER / "text_encoder" / "model.safetensors"))
    assert all(k.startswith("text_model.") for k in text_state)
    assert all(torch.equal(folder_parts.text_encoder.state_dict()[k], v) for k, v in text_state.items())
    assert type(folder_parts.scheduler).__name__ == "DDIMScheduler"
    assert folder_parts.tokenizer.model_max_length == 77
    assert not folder_parts.unet.training and next(folder_parts.vae.parameters()).dtype == torch.float32


def test_bin_files_and_unprefixed_text_encoder(tmp_folder, folder_parts):
    """.bin weights load through torch.load(weights_only=True); a text encoder saved without the
    text_model. prefix (transformers >= 5.6) is the same model."""
    unet_dir, text_dir = tmp_folder / "unet", tmp_folder / "text_encoder"
    torch.save(load_file(str(unet_dir / "diffusion_pytorch_model.safetensors")), unet_dir / "diffusion_pytorch_model.bin")
    (unet_dir / "diffusion_pytorch_model.safetensors").unlink()
    text = load_file(str(text_dir / "model.safetensors"))
    save_file({k[len("text_model."):]: v for k, v in text.items()}, str(text_dir / "model.safetensors"))
    parts = load_folder(tmp_folder)
    _assert_same_weights(parts.unet, folder_parts.unet)
    _assert_same_weights(parts.text_encoder, folder_parts.text_encoder)


def test_single_file_equals_the_folder(folder_parts, tmp_path):
    """The LDM single file (PROVENANCE: bit-identical to the folder) loads to the same weights, with the
    configs from a folder, and with a config the folder lacks inferred from the shapes (here the VAE's;
    the tiny U-Net's and text encoder's heads cannot be inferred from 32-wide shapes: one line saying so)."""
    with_configs = load_single_file(SINGLE_FILE, config_folder=FOLDER)
    partial = tmp_path / "partial"
    for part in ("tokenizer", "unet", "text_encoder"):
        shutil.copytree(FOLDER / part, partial / part, ignore=shutil.ignore_patterns("*.safetensors"))
    inferred = load_components(SINGLE_FILE, config_folder=partial)
    for parts in (with_configs, inferred):
        for name in ("unet", "vae", "text_encoder"):
            _assert_same_weights(getattr(parts, name), getattr(folder_parts, name))
    assert type(inferred.scheduler).__name__ == "DDIMScheduler"
    shutil.rmtree(partial / "unet")
    _one_line_error("config_folder", load_components, SINGLE_FILE, config_folder=partial)


def test_single_file_needs_a_tokenizer_folder():
    message = _one_line_error("config_folder", load_components, SINGLE_FILE)
    assert "tokenizer" in message


@pytest.mark.parametrize("edit, match", [
    (lambda f: shutil.rmtree(f / "vae"), r"missing part: .*vae"),
    (lambda f: (f / "unet" / "diffusion_pytorch_model.safetensors").unlink(), "missing unet weights"),
    (lambda f: (f / "tokenizer" / "merges.txt").unlink(), "merges.txt"),
    (lambda f: (f / "model_index.json").unlink(), "model_index.json"),
])
def test_missing_parts_are_one_line(tmp_folder, edit, match):
    edit(tmp_folder)
    _one_line_error(match, load_folder, tmp_folder)


def _edit_json(path: Path, **changes):
    data = json.loads(path.read_text())
    data.update(changes)
    path.write_text(json.dumps(data))


def test_unknown_classes_are_one_line(tmp_folder):
    _edit_json(tmp_folder / "model_index.json", vae=["diffusers", "AutoencoderTiny"])
    _one_line_error("vae class 'AutoencoderTiny' is not supported", load_folder, tmp_folder)
    _edit_json(tmp_folder / "model_index.json", vae=["diffusers", "AutoencoderKL"], _class_name="StableDiffusionXLPipeline")
    _one_line_error("StableDiffusionXLPipeline", load_folder, tmp_folder)
    _edit_json(tmp_folder / "model_index.json", _class_name="StableDiffusionPipeline",
               scheduler=["diffusers", "LMSDiscreteScheduler"])
    _one_line_error("LMSDiscreteScheduler", load_folder, tmp_folder)


def test_wrong_tensors_are_one_line(tmp_folder):
    path = tmp_folder / "vae" / "diffusion_pytorch_model.safetensors"
    state = load_file(str(path))
    extra = dict(state, **{"decoder.extra.weight": torch.zeros(3)})
    save_file(extra, str(path))
    _one_line_error("does not have .*decoder.extra.weight", load_folder, tmp_folder)
    missing = {k: v for k, v in state.items() if k != "decoder.conv_out.bias"}
    save_file(missing, str(path))
    _one_line_error("missing .*decoder.conv_out.bias", load_folder, tmp_folder)
    wrong = dict(state, **{"decoder.conv_out.bias": torch.zeros(4)})
    save_file(wrong, str(path))
    _one_line_error(r"decoder.conv_out.bias has shape \(4,\)", load_folder, tmp_folder)
    (tmp_folder / "vae" / "config.json").write_text("{not json")
    _one_line_error("not valid JSON", load_folder, tmp_folder)
