"""``python -m sag.sd`` (sag/sd/cli.py) on the tiny random-weight SD folder (tests/fixtures/diffusers/sd15_tiny,
128x128 images, 2 steps): files written, grid and side-by-side shapes, the sidecar, the salient masks of
``--save-intermediates``, the side-by-side's left column equal to a plain run of the same seeds, one-line errors.

``main([...])`` runs in-process; ``python -m sag.sd`` runs once as a subprocess (the module entry point).
"""
from __future__ import annotations

import hashlib
import json
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from conftest import one_line_error_check
from sag.sd.cli import main

FOLDER = Path(__file__).parent / "fixtures" / "diffusers" / "sd15_tiny"
REPO = Path(__file__).resolve().parents[1]
SIZE, PAD = 128, 2                        # the tiny model's default image size; make_grid's padding
N = 2

pytestmark = pytest.mark.usefixtures("one_thread")


def sd_args(out, *extra) -> list:
    return ["a red cube on a table", "--model", str(FOLDER), "--steps", "2", "--num-samples", str(N),
            "--batch-size", "1", "--seed", "5", "--no-progress", "--out", str(out), *map(str, extra)]


def png(path) -> np.ndarray:
    with Image.open(path) as image:
        image.load()
        return np.asarray(image.convert("RGB"))


assert_one_line_error = one_line_error_check("sag.sd")


def main_one_thread(args) -> int:
    """main() with one intra-op thread, as the conftest's ``one_thread`` gives the tests (the module-scoped
    runs below are set up before a function-scoped fixture would apply)."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        return main(args)
    finally:
        torch.set_num_threads(before)


@pytest.fixture(scope="module")
def sag_run(tmp_path_factory):
    """SAG (s 0.75) with CFG 7.5, 2 samples in batches of 1, masks of the first sample."""
    out = tmp_path_factory.mktemp("sd_sag")
    assert main_one_thread(sd_args(out, "--sag-scale", 0.75, "--cfg", 7.5, "--save-intermediates", 1)) == 0
    return out


@pytest.fixture(scope="module")
def plain_run(tmp_path_factory):
    """The same command without SAG: CFG only."""
    out = tmp_path_factory.mktemp("sd_plain")
    assert main_one_thread(sd_args(out, "--sag-scale", 0, "--cfg", 7.5)) == 0
    return out


def test_files_and_grid_shapes(sag_run):
    names = sorted(p.name for p in sag_run.iterdir())
    assert names == ["grid.png", "intermediates", "sample_000000.png", "sample_000001.png", "samples.json",
                     f"samples_{N}x{SIZE}x{SIZE}x3.npz", "side_by_side.png"]
    assert not list(sag_run.rglob("*.tmp"))                                  # atomic writes left nothing behind
    arr = np.load(sag_run / f"samples_{N}x{SIZE}x{SIZE}x3.npz")["arr_0"]
    assert arr.dtype == np.uint8 and arr.shape == (N, SIZE, SIZE, 3) and arr.std() > 0
    for i in range(N):
        assert np.array_equal(png(sag_run / f"sample_{i:06d}.png"), arr[i])
    cell = SIZE + PAD
    assert png(sag_run / "grid.png").shape == (PAD + cell, PAD + N * cell, 3)
    side = png(sag_run / "side_by_side.png")
    assert side.shape == (PAD + N * cell, PAD + 2 * cell, 3)                 # a row per sample: unguided | guided
    for i in range(N):
        y = PAD + i * cell
        assert np.array_equal(side[y:y + SIZE, PAD + cell:PAD + cell + SIZE], arr[i])


def test_left_column_is_a_plain_run_with_the_same_seeds(sag_run, plain_run):
    """Seed base + i gives sample i its latents: the unguided column equals a plain run, and SAG changed the images."""
    plain = np.load(plain_run / f"samples_{N}x{SIZE}x{SIZE}x3.npz")["arr_0"]
    guided = np.load(sag_run / f"samples_{N}x{SIZE}x{SIZE}x3.npz")["arr_0"]
    side = png(sag_run / "side_by_side.png")
    for i in range(N):
        y = PAD + i * (SIZE + PAD)
        assert np.array_equal(side[y:y + SIZE, PAD:PAD + SIZE], plain[i])
    assert np.abs(plain.astype(int) - guided.astype(int)).max() > 10
    assert not (plain_run / "side_by_side.png").exists()                      # nothing to compare without guidance


def test_sidecar(sag_run):
    side = json.loads((sag_run / "samples.json").read_text())
    assert side["format"] == "sag-sd/1" and side["prompt"] == "a red cube on a table"
    call = side["pipeline_call"]
    assert (call["num_inference_steps"], call["guidance_scale"], call["sag_scale"], call["pag_scale"]) == (2, 7.5, 0.75, 0.0)
    assert call["seg_sigma"] == "inf" and side["method"] == "sag+cfg"
    assert side["seeds"]["base"] == 5 and (side["seeds"]["first_seed"], side["seeds"]["last_seed"]) == (5, 6)
    assert side["num_samples"] == N and side["batch_size"] == 1 and side["steps"] == 2
    assert side["image_size"] == {"height": SIZE, "width": SIZE}
    assert side["scheduler"]["class"] == "DDIMScheduler" and side["scheduler"]["override"] is None
    assert side["dtype"]["unet_forward"] == "float32" and side["dtype"]["vae_weights"] == "float32"
    assert side["device"] == "cpu"
    assert set(side["versions"]) == {"sag", "torch", "numpy", "python"}
    files = {f["path"]: f["sha256"] for f in side["model"]["files"]}
    unet = "unet/diffusion_pytorch_model.safetensors"
    assert files[unet] == hashlib.sha256((FOLDER / unet).read_bytes()).hexdigest()
    assert side["command"].startswith("python -m sag.sd ") and "--sag-scale 0.75" in side["command"]
    assert side["outputs"]["intermediates"] == "intermediates" and side["outputs"]["intermediate_samples"] == 1


def test_masks_of_save_intermediates(sag_run):
    """One strip for the first sample only: one row (the mask, latent resolution 16x16), one column per step."""
    strips = sorted((sag_run / "intermediates").iterdir())
    assert [p.name for p in strips] == ["sample_000000.png"]
    with Image.open(strips[0]) as image:
        image.load()
        text = dict(image.text)
        strip = np.asarray(image.convert("RGB"))
    latent = SIZE // 8
    assert text["rows"] == "salient_mask" and len(text["columns_t"].split(",")) == 2
    assert strip.shape == (PAD + latent + PAD, PAD + 2 * (latent + PAD), 3)
    cells = [strip[PAD:PAD + latent, PAD + k * (latent + PAD):PAD + k * (latent + PAD) + latent] for k in range(2)]
    for cell in cells:
        assert set(np.unique(cell)) <= {0, 255}                             # a binary mask
        assert 0 < (cell == 255).mean() < 1                                 # some, not all, latent pixels blurred


def test_pag_with_another_scheduler(tmp_path):
    """PAG (batched) instead of SAG, with the folder's DDIM schedule run by Euler; the sidecar says so."""
    assert main(sd_args(tmp_path, "--pag-scale", 3.0, "--scheduler", "euler", "--num-samples", 1, "--no-compare")) == 0
    side = json.loads((tmp_path / "samples.json").read_text())
    assert side["scheduler"] == {**side["scheduler"], "class": "EulerDiscreteScheduler", "override": "euler"}
    assert side["pipeline_call"]["sag_scale"] == 0.0 and side["pipeline_call"]["pag_scale"] == 3.0
    assert not (tmp_path / "side_by_side.png").exists()
    assert np.load(tmp_path / f"samples_1x{SIZE}x{SIZE}x3.npz")["arr_0"].std() > 0


def test_single_file_and_bfloat16(plain_run, tmp_path):
    """The same weights as one LDM file (configs and tokenizer from --config-folder) draw the plain run's
    images bit for bit; --dtype bf16 runs the U-Net under CPU bfloat16 autocast, recorded in the sidecar."""
    single = FOLDER.parent / "sd15_tiny_ldm.safetensors"
    assert main_one_thread(sd_args(tmp_path / "single", "--model", single, "--config-folder", FOLDER,
                                   "--sag-scale", 0)) == 0
    name = f"samples_{N}x{SIZE}x{SIZE}x3.npz"
    assert np.array_equal(np.load(tmp_path / "single" / name)["arr_0"], np.load(plain_run / name)["arr_0"])
    side = json.loads((tmp_path / "single" / "samples.json").read_text())
    assert side["model"]["layout"] == "single file" and len(side["model"]["files"]) == 1
    assert main_one_thread(sd_args(tmp_path / "bf16", "--dtype", "bf16", "--num-samples", 1)) == 0
    dtype = json.loads((tmp_path / "bf16" / "samples.json").read_text())["dtype"]
    assert dtype["unet_forward"] == "bfloat16 (autocast)" and dtype["vae_weights"] == "float32"


@pytest.mark.parametrize("extra, fragments", [
    (["--height", "100"], ["--height 100", "multiple of 8"]),
    (["--scheduler", "lms"], ["--scheduler", "ddim", "euler", "pndm"]),
    (["--steps", "0"], ["--steps must be a positive integer"]),
    (["--seed", str(2**32 - 1)], ["--seed", "32 bits"]),
    (["--dtype", "int8"], ["--dtype"]),
    (["--device", "tpu"], ["--device", "use cpu, cuda"]),
    (["--sag-scale", "0", "--save-intermediates"], ["--save-intermediates", "--sag-scale"]),
    (["--seg-sigma", "0"], ["--seg-sigma must be > 0"]),
    (["--sag-scale", "0.5", "--pag-scale", "3"], ["--sag-scale and --pag-scale together", "choose one"]),
    (["--dtype", "fp16", "--device", "cpu"], ["--dtype fp16", "CUDA"]),
])
def test_bad_command_lines_are_one_line(tmp_path, capsys, extra, fragments):
    code = main(sd_args(tmp_path / "out", *extra))
    assert_one_line_error(code, capsys.readouterr().err, *fragments)
    assert not (tmp_path / "out" / "samples.json").exists()


def test_missing_model_and_missing_part_are_one_line(tmp_path, capsys):
    code = main(["a cat", "--model", str(tmp_path / "nowhere"), "--out", str(tmp_path / "out")])
    assert_one_line_error(code, capsys.readouterr().err, "--model", "nowhere", "does not exist")
    broken = tmp_path / "broken"
    shutil.copytree(FOLDER, broken)
    shutil.rmtree(broken / "vae")
    code = main(["a cat", "--model", str(broken), "--steps", "1", "--no-progress", "--out", str(tmp_path / "out")])
    assert_one_line_error(code, capsys.readouterr().err, "vae")
    assert not (tmp_path / "out").exists()


def test_out_that_is_a_file_is_one_line(tmp_path, capsys):
    taken = tmp_path / "taken"
    taken.write_text("not a folder")
    code = main(sd_args(taken))
    assert_one_line_error(code, capsys.readouterr().err, "--out", "not a folder")


def test_module_entry_point(tmp_path):
    """``python -m sag.sd`` runs sag/sd/cli.py: one stderr line and status 2 for a missing folder."""
    proc = subprocess.run([sys.executable, "-m", "sag.sd", "a cat", "--model", str(tmp_path / "missing"),
                           "--out", str(tmp_path)], cwd=REPO, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2
    assert proc.stderr.strip().startswith("sag.sd: error: --model") and len(proc.stderr.strip().splitlines()) == 1
