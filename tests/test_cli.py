"""The ``sag-sample`` CLI (sag/sample.py): output layout, determinism, resume, intermediates, bad input.

Tiny fixture checkpoints (tests/fixtures/official), 2-3 respaced steps, a handful of samples.
``main([...])`` runs in-process for speed; ``python -m sag.sample`` runs as a subprocess twice (the
killed-and-resumed run and the one-line error), which proves the module entry point.
"""
from __future__ import annotations

import hashlib
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from conftest import one_line_error_check
from sag.sample import NO_MODEL_MESSAGE, main

FIXTURES = Path(__file__).parent / "fixtures" / "official"
REPO = Path(__file__).resolve().parents[1]
# Sampling flags we pass ourselves; the rest of a fixture's official_flags are model / SAG / classifier flags.
_SAMPLING = {"batch_size", "use_ddim", "clip_denoised", "timestep_respacing", "classifier_guidance", "classifier_scale"}


def official_args(case: str, **overrides) -> list:
    """``--model_path`` plus a fixture's recorded official flags as ``--name value`` CLI arguments."""
    flags = json.loads((FIXTURES / case / "config.json").read_text())["official_flags"]
    args = ["--model_path", str(FIXTURES / case / "model.pt")]
    for name, value in flags.items():
        if name not in _SAMPLING:
            args += [f"--{name}", str(value)]
    for name, value in overrides.items():
        args += [f"--{name}", str(value)]
    return args


def uncond(**overrides) -> list:
    """SAG on the unconditional 32x32 fixture (guide_scale 1.5, output.2, sigma 9), 3 DDPM steps."""
    return official_args("adm_uncond", timestep_respacing=3, **overrides) + ["--no-progress"]


def run(args, capsys):
    """main() in-process -> (exit status, stdout, stderr)."""
    code = main([str(a) for a in args])
    out = capsys.readouterr()
    return code, out.out, out.err


def npz_files(folder: Path) -> list:
    return sorted(Path(folder).glob("*.npz")) if Path(folder).exists() else []


assert_one_line_error = one_line_error_check("sag-sample")


# ---------------------------------------------------------------------------------------------
# A reference run (6 samples, batch 2) shared by the layout, batch-size and resume tests.
# ---------------------------------------------------------------------------------------------

N, SIZE = 6, 32
NPZ = f"samples_{N}x{SIZE}x{SIZE}x3.npz"


@pytest.fixture(scope="module")
def reference_run(tmp_path_factory):
    out = tmp_path_factory.mktemp("ref")
    assert main([str(a) for a in uncond(num_samples=N, batch_size=2, out=out)]) == 0
    return out


def test_npz_layout_grid_and_sidecar(reference_run):
    with np.load(reference_run / NPZ) as data:
        assert data.files == ["arr_0"]                       # unconditional: no labels
        images = data["arr_0"]
    assert images.dtype == np.uint8 and images.shape == (N, SIZE, SIZE, 3)
    assert images.std() > 0
    assert not (reference_run / "shards").exists()            # merged, then removed
    with Image.open(reference_run / "grid.png") as grid:
        grid.load()
        assert grid.mode == "RGB" and grid.size == (2 + 3 * (SIZE + 2), 2 + 2 * (SIZE + 2))
    side = json.loads((reference_run / "samples.json").read_text())
    g = side["guidance"]
    assert g["method"] == "sag" and g["scale"] == 0.5 and g["official_guide_scale"] == 1.5
    assert (g["blur_sigma"], g["site"], g["map_mode"], g["guide_start"]) == (9.0, "output.2", "official", 250)
    assert side["seeds"]["base"] == 0 and (side["seeds"]["first_index"], side["seeds"]["last_index"]) == (0, N - 1)
    model = FIXTURES / "adm_uncond" / "model.pt"
    assert side["checkpoint"]["sha256"] == hashlib.sha256(model.read_bytes()).hexdigest()
    assert side["sampler"]["name"] == "ddpm" and side["sampler"]["steps"] == 3
    assert side["official_flags"]["resolved"]["num_channels"] == 32
    assert side["official_flags"]["resolved"]["num_samples"] == N
    for key in ("versions", "device", "dtype", "world_size", "command", "settings"):
        assert key in side
    assert set(side["versions"]) == {"sag", "torch", "numpy", "python"}
    assert side["world_size"] == 1 and side["dtype"] == "float32"


def test_batch_size_invariance(reference_run, tmp_path):
    """Batch 3 vs batch 2: each sample has its own noise stream, so the images agree up to float
    rounding of batched CPU kernels: at most 1 uint8 level on a few pixels (bitwise equal on most runs)."""
    assert main([str(a) for a in uncond(num_samples=N, batch_size=3, out=tmp_path)]) == 0
    a = np.load(reference_run / NPZ)["arr_0"].astype(int)
    b = np.load(tmp_path / NPZ)["arr_0"].astype(int)
    diff = np.abs(a - b)
    assert diff.max() <= 1
    assert (diff > 0).mean() < 1e-3


def test_exact_attention_matches_the_fused_default(reference_run, tmp_path):
    """The default runs fused SDPA where no map is read; --exact-attention the official einsums.
    They are the same function up to float rounding (~2e-6 on eps): at most 1 uint8 level apart."""
    assert main([str(a) for a in uncond(num_samples=N, batch_size=2, out=tmp_path) + ["--exact-attention"]]) == 0
    fused = np.load(reference_run / NPZ)["arr_0"].astype(int)
    exact = np.load(tmp_path / NPZ)["arr_0"].astype(int)
    assert np.abs(fused - exact).max() <= 1
    for folder, mode in ((reference_run, "fused"), (tmp_path, "exact")):
        assert json.loads((folder / "samples.json").read_text())["settings"]["attention"] == mode


def test_finished_run_is_not_redone(reference_run, capsys):
    npz = reference_run / NPZ
    before = npz.stat().st_mtime_ns
    code, out, err = run(uncond(num_samples=N, batch_size=4, out=reference_run), capsys)
    assert code == 0 and err == ""
    assert "nothing to do" in out and len(out.strip().splitlines()) == 1
    assert npz.stat().st_mtime_ns == before


def test_output_folder_with_other_settings_is_refused(reference_run, capsys):
    code, _, err = run(uncond(num_samples=N, batch_size=2, out=reference_run, seed=7), capsys)
    assert_one_line_error(code, err, "other settings", "seed")


def test_killed_run_resumes_to_identical_bytes(reference_run, tmp_path, capsys):
    """SIGKILL a ``python -m sag.sample`` run after its first shard, rerun: same arr_0 bytes as the
    uninterrupted run (same batch size), and only the missing samples are drawn."""
    out = tmp_path / "killed"
    shards = out / "shards"
    env = dict(os.environ, OMP_NUM_THREADS="2", PYTHONPATH=str(REPO) + os.pathsep + os.environ.get("PYTHONPATH", ""))
    cmd = [sys.executable, "-m", "sag.sample", *map(str, uncond(num_samples=N, batch_size=2, out=out))]
    proc = subprocess.Popen(cmd, cwd=REPO, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    try:
        deadline = time.monotonic() + 120
        while not list(shards.glob("shard_*.npz")):
            assert proc.poll() is None, proc.stderr.read().decode()
            assert time.monotonic() < deadline, "no shard appeared"
            time.sleep(0.005)
        proc.send_signal(signal.SIGKILL)
        proc.wait(timeout=30)
    finally:
        if proc.poll() is None:
            proc.kill()
        proc.stdout.close()
        proc.stderr.close()
    assert proc.returncode == -signal.SIGKILL
    assert not npz_files(out), "the run finished before it could be killed"
    assert 1 <= len(list(shards.glob("shard_*.npz"))) < N // 2
    code, stdout, err = run(uncond(num_samples=N, batch_size=2, out=out), capsys)
    assert code == 0, err
    side = json.loads((out / "samples.json").read_text())
    assert 2 <= side["resumed_samples"] < N
    assert np.load(out / NPZ)["arr_0"].tobytes() == np.load(reference_run / NPZ)["arr_0"].tobytes()


# ---------------------------------------------------------------------------------------------
# Class-conditional model with classifier guidance; our own flags.
# ---------------------------------------------------------------------------------------------

def test_class_conditional_with_classifier_guidance(tmp_path):
    from sag import SampleNoise
    args = official_args("adm_cond_cg", timestep_respacing="ddim2", use_ddim=True, classifier_scale=1.0,
                         num_samples=2, batch_size=2, seed=11, out=tmp_path)
    args += ["--classifier_path", FIXTURES / "adm_cond_cg" / "classifier.pt", "--no-progress"]
    assert main([str(a) for a in args]) == 0
    with np.load(tmp_path / "samples_2x64x64x3.npz") as data:
        assert data.files == ["arr_0", "arr_1"]
        assert data["arr_0"].dtype == np.uint8 and data["arr_0"].shape == (2, 64, 64, 3)
        labels = data["arr_1"]
    assert labels.dtype == np.int64
    assert labels.tolist() == SampleNoise([11, 12]).randint(1000).tolist()   # label i from seed + i
    side = json.loads((tmp_path / "samples.json").read_text())
    assert side["classifier"]["used"] and side["classifier"]["scale"] == 1.0 and len(side["classifier"]["sha256"]) == 64
    assert side["sampler"]["name"] == "ddim" and side["labels"]["mode"] == "per-seed"


def test_unconditional_model_with_classifier_guidance(tmp_path):
    """CG on an unconditional U-Net (guided-diffusion's 256-uncond + classifier recipe): the labels
    go to the classifier only, and are saved as arr_1. The 64x64 U-Net is random, in our format."""
    from checkpoints_convert import LoadedModel, save_checkpoint
    from diffusion import DiffusionConfig, GaussianDiffusion
    from unet import UNet, UNetConfig
    torch.manual_seed(0)
    unet = UNet(UNetConfig(image_size=64, model_channels=32, channel_mult=(1, 1, 1, 1), attention_resolutions=(16, 8),
                           num_heads=4, out_channels=6, use_scale_shift_norm=True, resblock_updown=True))
    ckpt = tmp_path / "uncond64.pt"
    save_checkpoint(ckpt, LoadedModel(unet, GaussianDiffusion.from_config(DiffusionConfig(learn_sigma=True)), None))
    flags = json.loads((FIXTURES / "adm_cond_cg" / "config.json").read_text())["official_flags"]
    args = ["--model_path", ckpt, "--classifier_path", FIXTURES / "adm_cond_cg" / "classifier.pt",
            "--timestep_respacing", 2, "--num_samples", 1, "--out", tmp_path / "out", "--no-progress"]
    for name in ("classifier_width", "classifier_depth", "classifier_attention_resolutions", "classifier_pool"):
        args += [f"--{name}", flags[name]]
    assert main([str(a) for a in args]) == 0
    with np.load(tmp_path / "out" / "samples_1x64x64x3.npz") as data:
        assert data.files == ["arr_0", "arr_1"] and data["arr_1"].tolist() == labels_from_seeds([0])


def labels_from_seeds(seeds):
    from sag import SampleNoise
    return SampleNoise(seeds).randint(1000).tolist()


def test_save_intermediates_and_sag_scale(tmp_path):
    """--sag-scale s overrides --guide_scale (both recorded); --save-intermediates 1 writes one strip:
    4 rows (x0, mask, blurred x0, x_bar_t) by 3 columns (SAG ran at every step)."""
    assert main([str(a) for a in uncond(num_samples=2, batch_size=2, out=tmp_path, **{"sag-scale": 0.25})]
                + ["--save-intermediates", "1"]) == 0
    strips = sorted((tmp_path / "intermediates").glob("*.png"))
    assert [p.name for p in strips] == ["sample_000000.png"]
    with Image.open(strips[0]) as strip:
        assert strip.size == (2 + 3 * (SIZE + 2), 2 + 4 * (SIZE + 2))
        assert strip.text["rows"] == "pred_x0,salient_mask,blurred_x0,degraded_x_t"
    g = json.loads((tmp_path / "samples.json").read_text())["guidance"]
    assert g["scale"] == 0.25 and g["official_guide_scale"] == 1.25


def test_blur_guidance_and_sag_checkpoint(tmp_path):
    """--blur-guidance on a sag-format checkpoint (made by save_checkpoint) with only --timestep_respacing."""
    from checkpoints_convert import load_official, save_checkpoint
    flags = json.loads((FIXTURES / "adm_uncond" / "config.json").read_text())["official_flags"]
    ckpt = tmp_path / "sag.pt"
    save_checkpoint(ckpt, load_official(FIXTURES / "adm_uncond" / "model.pt", flags))
    out = tmp_path / "out"
    assert main(["--model_path", str(ckpt), "--timestep_respacing", "2", "--num_samples", "1", "--blur-guidance",
                 "--out", str(out), "--no-progress"]) == 0
    side = json.loads((out / "samples.json").read_text())
    assert side["checkpoint"]["format"] == "sag"
    assert side["guidance"]["method"] == "blur" and side["guidance"]["scale"] == 0.5


# ---------------------------------------------------------------------------------------------
# Bad input: one line on stderr, exit status 2, no npz.
# ---------------------------------------------------------------------------------------------

def _bad(capsys, tmp_path, args, *fragments):
    out = tmp_path / "out"
    code, _, err = run(list(args) + ["--out", out], capsys)
    assert_one_line_error(code, err, *fragments)
    assert not npz_files(out)


def test_no_model_path_without_the_demo_asset(capsys, tmp_path, monkeypatch):
    import sag.demo
    monkeypatch.setattr(sag.demo, "DEMO_PATH", tmp_path / "missing-demo.pt")
    _bad(capsys, tmp_path, ["--num_samples", "1"], NO_MODEL_MESSAGE)


def test_readme_main_command_on_the_embedded_demo_model(tmp_path):
    """The README's main command (sag-sample with no checkpoint), with a small sample count."""
    import numpy as np
    from PIL import Image
    out = tmp_path / "demo"
    assert main(["--num_samples", "3", "--use_ddim", "True", "--timestep_respacing", "ddim5", "--out", str(out),
                 "--no-progress"]) == 0
    arr = np.load(out / "samples_3x32x32x3.npz")["arr_0"]
    assert arr.shape == (3, 32, 32, 3) and arr.dtype == np.uint8
    sidecar = json.loads((out / "samples.json").read_text())
    assert sidecar["settings"]["guidance"]["method"] == "sag" and sidecar["settings"]["sampler"] == "ddim"
    with Image.open(out / "side_by_side.png") as grid:      # unguided row over the SAG row
        assert grid.size[1] > 2 * 32


def test_missing_checkpoint(capsys, tmp_path):
    _bad(capsys, tmp_path, uncond() + ["--model_path", tmp_path / "nope.pt"], "nope.pt", "does not exist")


def test_not_a_checkpoint(capsys, tmp_path):
    page = tmp_path / "model.pt"
    page.write_text("<html>404</html>")
    _bad(capsys, tmp_path, uncond() + ["--model_path", page], "not a PyTorch checkpoint")


class _Payload:
    """Pickles to a call of os.makedirs(marker): it must never run."""

    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        return (os.makedirs, (self.marker,))


def test_pickle_with_code_is_refused_unread(capsys, tmp_path):
    marker = tmp_path / "code-ran"
    evil = tmp_path / "evil.pt"
    torch.save({"weight": _Payload(str(marker))}, evil)
    _bad(capsys, tmp_path, uncond() + ["--model_path", evil], "refused", "pickled code")
    assert not marker.exists()


def test_flags_that_do_not_fit_the_checkpoint(capsys, tmp_path):
    _bad(capsys, tmp_path, uncond(num_channels=64), "num_channels")


def test_unknown_official_flag(capsys, tmp_path):
    _bad(capsys, tmp_path, uncond(bogus_flag=3), "unknown", "--bogus_flag")


def test_image_size_not_divisible(capsys, tmp_path):
    _bad(capsys, tmp_path, uncond(image_size=34, attention_resolutions=17), "image_size 34", "divisible")


@pytest.mark.parametrize("flag", ["batch_size", "num_samples"])
@pytest.mark.parametrize("value", [0, -2])
def test_counts_must_be_positive(capsys, tmp_path, flag, value):
    _bad(capsys, tmp_path, uncond(**{flag: value}), f"--{flag}", "positive")


@pytest.mark.parametrize("respacing, fragment", [("abc", "timestep_respacing"), ("5000", "5000")])
def test_respacing_that_does_not_parse(capsys, tmp_path, respacing, fragment):
    args = official_args("adm_uncond", timestep_respacing=respacing) + ["--no-progress"]
    _bad(capsys, tmp_path, args, fragment)


@pytest.mark.parametrize("extra, fragment", [
    (["--blur_sigma", "0"], "blur_sigma"),
    (["--blur_sigma", "-2"], "blur_sigma"),
    (["--guide_scale", "inf"], "finite"),
    (["--sag-scale", "nan"], "finite"),
])
def test_bad_guidance_settings(capsys, tmp_path, extra, fragment):
    _bad(capsys, tmp_path, uncond() + extra, fragment)


def test_attention_site_without_attention_official_flags(capsys, tmp_path):
    # output_blocks 6-8 of this U-Net run at 32x32, where it has no attention.
    _bad(capsys, tmp_path, uncond(sel_attn_depth=7), "output_blocks.7.1", "output.2")


def test_attention_site_without_attention_sag_checkpoint(capsys, tmp_path):
    from checkpoints_convert import load_official, save_checkpoint
    flags = json.loads((FIXTURES / "adm_uncond" / "config.json").read_text())["official_flags"]
    ckpt = tmp_path / "sag.pt"
    save_checkpoint(ckpt, load_official(FIXTURES / "adm_uncond" / "model.pt", flags))
    _bad(capsys, tmp_path, ["--model_path", ckpt, "--timestep_respacing", "2", "--sel_attn_depth", "7"],
         "output.7", "output.2")


def test_class_label_out_of_range(capsys, tmp_path):
    args = official_args("adm_cond_cg", timestep_respacing="ddim2") + ["--class-label", "1000", "--no-progress"]
    _bad(capsys, tmp_path, args, "--class-label 1000", "out of range")


def test_class_label_on_unconditional_model(capsys, tmp_path):
    _bad(capsys, tmp_path, uncond() + ["--class-label", "3"], "unconditional")


def test_non_finite_values_name_the_step(capsys, tmp_path):
    _bad(capsys, tmp_path, uncond(num_samples=2, clip_denoised=False, **{"sag-scale": 1e38}),
         "non-finite", "step 0")


def test_unknown_preset(capsys, tmp_path):
    _bad(capsys, tmp_path, uncond() + ["--preset", "no_such_model"], "unknown preset")


@pytest.mark.skipif(torch.cuda.is_available(), reason="half precision is allowed on CUDA")
def test_half_precision_needs_cuda(capsys, tmp_path):
    _bad(capsys, tmp_path, uncond() + ["--dtype", "float16"], "CUDA")


def test_module_entry_point_error_is_one_line(tmp_path):
    """``python -m sag.sample`` runs sag/sample.py: one stderr line and status 2 for a missing checkpoint."""
    env = dict(os.environ, PYTHONPATH=str(REPO) + os.pathsep + os.environ.get("PYTHONPATH", ""))
    missing = tmp_path / "missing.pt"
    proc = subprocess.run([sys.executable, "-m", "sag.sample", "--model_path", str(missing), "--out", str(tmp_path)],
                          cwd=REPO, env=env, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("sag-sample: error: ") and "missing.pt" in lines[0]


# ---------------------------------------------------------------------------------------------
# Official command lines and presets
# ---------------------------------------------------------------------------------------------

def test_readme_style_command(tmp_path):
    """The SAG README's 256-uncond line (classifier loaded but off, --use_fp16 True) runs on CPU:
    fp16 is a GPU switch, recorded as ignored; no classifier guidance, no labels."""
    args = uncond(num_samples=1, batch_size=16, out=tmp_path, use_fp16=True, classifier_scale=0.0,
                  classifier_guidance=False, classifier_path=FIXTURES / "adm_cond_cg" / "classifier.pt")
    assert main([str(a) for a in args]) == 0
    side = json.loads((tmp_path / "samples.json").read_text())
    assert side["classifier"]["used"] is False and side["labels"] is None
    assert side["dtype"] == "float32" and "ignored on CPU" in side["dtype_note"]
    assert np.load(tmp_path / "samples_1x32x32x3.npz").files == ["arr_0"]


def test_official_argparse_forms():
    """'--name=value', values starting with '-', True/False booleans, last repeated value wins."""
    from sag.sample import parse_args
    args, official = parse_args(["--model_path=m.pt", "--num_heads_upsample", "-1", "--use_ddim", "True",
                                 "--guide_scale=1.1", "--guide_scale", "1.2", "--seed", "3", "--no-progress"])
    assert args.model_path == "m.pt" and args.use_ddim is True and args.seed == 3 and args.progress is False
    assert official == {"num_heads_upsample": "-1", "guide_scale": "1.2"}


def test_preset_brings_the_sag_readme_settings():
    from checkpoints_convert.presets import resolve_preset_name
    from sag.sample import _preset_sampling_flags
    flags = _preset_sampling_flags(resolve_preset_name("256x256_diffusion_uncond"))
    assert flags == {"timestep_respacing": "250", "guide_scale": 1.5, "blur_sigma": 9.0, "guide_start": 250,
                     "sel_attn_block": "output", "sel_attn_depth": 2}
    flags = _preset_sampling_flags(resolve_preset_name("128x128_diffusion"))
    assert flags["sel_attn_depth"] == 8 and flags["blur_sigma"] == 3.0 and flags["guide_scale"] == 1.1


def _guidance_for(extra):
    """The guidance resolve_model settles for the unconditional fixture without its SAG flags, plus ``extra``."""
    from sag.sample import parse_args, resolve_model
    base = official_args("adm_uncond")
    keep, i = [], 0
    while i < len(base):                       # drop the fixture's SAG flags
        if base[i][2:] in ("guide_scale", "guide_start", "blur_sigma", "sel_attn_block", "sel_attn_depth"):
            i += 2
            continue
        keep.append(base[i])
        i += 1
    args, official = parse_args(keep + list(extra))
    return resolve_model(args, official, torch.device("cpu")).loaded.guidance


def test_own_guidance_flags_keep_the_other_settings():
    assert _guidance_for([]) is None                                   # no SAG flags, no preset: unguided
    g = _guidance_for(["--sag-scale", "0.3"])                          # official SAG defaults, scale s
    assert (g.scale, g.guide_scale, g.site, g.blur_sigma, g.guide_start, g.map_mode) == \
        (0.3, 1.3, "output.2", 9.0, 250, "official")
    g = _guidance_for(["--sel_attn_depth", "4", "--blur_sigma", "3", "--sag-scale", "0.2"])
    assert (g.scale, g.site, g.blur_sigma) == (0.2, "output.4", 3.0)
    assert _guidance_for(["--guide_scale", "1.5", "--sag-scale", "0"]) is None
    g = _guidance_for(["--blur-guidance"])
    assert g.blur_everywhere and (g.scale, g.blur_sigma) == (0.5, 9.0)
    assert _guidance_for(["--guide_scale", "1.0", "--blur-guidance"]) is None   # explicitly off stays off
