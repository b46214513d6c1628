"""The README command lines through ``sag-sample`` and ``python -m checkpoints_convert`` (issue 13).

Each improved-diffusion README command (``image_sample.py --model_path /path/to/model.pt $MODEL_FLAGS
$DIFFUSION_FLAGS``, verbatim) runs with ``--model_path`` at a random-weight file of the released
file's exact structure (tests/official_shapes.py: random along the last axis, broadcast along the
others, so the file is small) plus two respaced steps and one sample. The slow U-Nets' runs (see
STUBBED) stub the sampler: everything up to and after the denoising loop (resolution, loading the
file into the U-Net, sidecar) still runs. Every guided-diffusion / SAG README command
goes through the CLI's own flag handling and the loader's resolution on a ``device="meta"``
imitation of its file (those networks take seconds to minutes a forward on a CPU).
"""
import dataclasses
import json
import shlex

import pytest
import torch

from checkpoints_convert.__main__ import main as convert_main
from checkpoints_convert.presets import PRESETS
from checkpoints_convert.resolve import resolve_checkpoint
from conftest import FIXTURES, official_flags
from official_shapes import meta_state_dict, random_state_file
from readme_commands import CLASSIFIERS, COMMANDS, DIFFUSION_NAMES, ECOSYSTEM
from sag.sample import SAG_FLAG_NAMES, UsageError, _loader_flags, main, parse_args

IMPROVED = [n for n in DIFFUSION_NAMES if PRESETS[n].family == "improved"]
# The sampler is stubbed for the 256 px LSUN U-Nets (~10 s a forward), the 270M-parameter conditional
# U-Net (~1 s a forward; the class-conditional step is checked on the adm_cond_cg fixture), and the
# L_vlb files, whose forward is their L_hybrid sibling's (same structure and sampling flags; --use_kl
# is training-only). CIFAR-10 and ImageNet-64 (L_hybrid) sample for real.
STUBBED = {"lsun_uncond_100M_1200K_bs128", "lsun_uncond_100M_2400K_bs64", "imagenet64_cond_270M_250K",
           "imagenet64_uncond_vlb_100M_1500K", "cifar10_uncond_vlb_50M_500K"}
TWO_STEPS = ["--timestep_respacing", "2", "--num_samples", "1", "--batch_size", "1", "--no-progress"]


def readme_argv(name: str, model: str) -> list:
    """The README command's arguments after the script, with ``--model_path`` pointing at ``model``."""
    words = shlex.split(COMMANDS[name])
    words = words[next(i for i, w in enumerate(words) if w.startswith("--")):]
    return [model if previous == "--model_path" else w for previous, w in zip([""] + words, words)]


@pytest.fixture(scope="module")
def structure_files(tmp_path_factory):
    """One random-weight file per improved-diffusion structure, named as the README names it."""
    files = {}
    for name in IMPROVED:
        config = PRESETS[name].unet_config()
        if config not in files:
            folder = tmp_path_factory.mktemp(name)
            files[config] = random_state_file(config, folder / "model.pt")
    return {name: files[PRESETS[name].unet_config()] for name in IMPROVED}


def _stub_sampler(monkeypatch):
    import sag.sampling
    monkeypatch.setattr(sag.sampling, "sample", lambda model, diffusion, shape, **kw: torch.zeros(shape))


@pytest.mark.parametrize("name", IMPROVED)
def test_improved_readme_command_runs(name, structure_files, tmp_path, capsys, monkeypatch, one_thread):
    if name in STUBBED:
        _stub_sampler(monkeypatch)
    out = tmp_path / "out"
    code = main(readme_argv(name, str(structure_files[name])) + TWO_STEPS + ["--out", str(out)])
    err = capsys.readouterr().err
    preset = PRESETS[name]
    if preset.kind == "upsampler":                  # sag-sample has no --base_samples: one line says so
        assert code == 2 and err.count("\n") == 1 and "super-resolution" in err and "Traceback" not in err
        return
    assert code == 0, err
    assert "warning" not in err
    side = json.loads((out / "samples.json").read_text())
    assert side["settings"]["model_config"] == json.loads(json.dumps(dataclasses.asdict(preset.unet_config())))
    d = side["settings"]["diffusion_config"]
    rescale_t, steps = ECOSYSTEM[name][12], ECOSYSTEM[name][11]
    assert (d["rescale_timesteps"], d["steps"], d["timestep_respacing"]) == (rescale_t, steps, "2")
    assert side["checkpoint"]["preset"] in [p.name for p in PRESETS.values() if p.group == preset.group] or \
        side["checkpoint"]["preset"] == name
    assert side["guidance"] is None                 # no SAG flag typed, no SAG README settings for the file
    assert side["official_flags"]["resolved"]["rescale_timesteps"] is rescale_t


def test_sag_on_an_improved_lsun_file_takes_a_site_it_has(structure_files, tmp_path, capsys, monkeypatch):
    _stub_sampler(monkeypatch)
    name = "lsun_uncond_100M_1200K_bs128"
    argv = readme_argv(name, str(structure_files[name])) + TWO_STEPS + ["--out", str(tmp_path), "--sag-scale", "0.3"]
    assert main(argv) == 0, capsys.readouterr().err
    g = json.loads((tmp_path / "samples.json").read_text())["guidance"]
    assert (g["site"], g["official_module"], g["official_num_heads"], g["scale"]) == \
        ("output.5", "output_blocks.5.1", 1, 0.3)
    code = main(argv[:-2] + ["--guide_scale", "1.3", "--sel_attn_depth", "2", "--out", str(tmp_path / "typed")])
    lines = capsys.readouterr().err.strip().splitlines()
    assert code == 2 and len(lines) == 1 and "output_blocks.2.1" in lines[0] and "output.5" in lines[0]


def test_guide_start_0_runs_unguided_and_says_so(tmp_path, capsys):
    argv = ["--model_path", str(FIXTURES / "adm_uncond" / "model.pt")]
    for flag, value in official_flags("adm_uncond").items():
        argv += [f"--{flag}", str(value)]
    argv += ["--guide_start", "0", "--timestep_respacing", "2", "--num_samples", "1", "--no-progress",
             "--out", str(tmp_path)]
    assert main(argv) == 0
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("sag-sample: warning: --guide_start 0 ") and "guides no step" in err[0]
    side = json.loads((tmp_path / "samples.json").read_text())
    assert side["guidance"]["guided_steps"] == 0 and side["guidance"]["guide_start"] == 0
    assert side["official_flags"]["resolved"]["guide_start"] == 0


@pytest.mark.parametrize("name", [n for n in PRESETS if PRESETS[n].family == "guided"])
def test_guided_readme_command_resolves_through_the_cli(name):
    """The CLI's flag handling, then the loader's rule on an imitation of the file (no forward); a
    classifier's README command is its diffusion model's, whose --classifier_path it names."""
    words = shlex.split(COMMANDS[name])
    argv = readme_argv(name, words[words.index("--model_path") + 1])
    if PRESETS[name].kind == "upsampler":
        with pytest.raises(UsageError, match="super-resolution"):
            parse_args(argv)
        return
    args, official = parse_args(argv)
    flags = _loader_flags(args, official)
    model = PRESETS[name.replace("classifier", "diffusion")]
    r = resolve_checkpoint(meta_state_dict(model.unet_config()), flags, source=args.model_path)
    assert r.config == model.unet_config() and model in r.candidates
    if args.classifier_path:                        # resolve_classifier hands the loader these flags
        size = model.unet_config().image_size
        clf = PRESETS[f"{size}x{size}_classifier"]
        c = resolve_checkpoint(meta_state_dict(clf.classifier_config()),
                               {k: v for k, v in flags.items() if k not in SAG_FLAG_NAMES},
                               kind="classifier", source=args.classifier_path)
        assert c.config == clf.classifier_config() and c.preset is clf


def test_converter_takes_the_readme_flags(structure_files, tmp_path, capsys):
    name = "cifar10_uncond_50M_500K"
    argv = readme_argv(name, "")[2:]                # the flags after --model_path
    argv = [w if w != "--dropout" else "--dropout=0.3" for w in argv if w != "0.3"]    # '--name=value' too
    out = tmp_path / "cifar10.pt"
    assert convert_main([str(structure_files[name]), str(out), *argv]) == 0, capsys.readouterr().err
    payload = torch.load(out, weights_only=True)
    assert payload["model_config"] == dataclasses.asdict(PRESETS[name].unet_config())
    assert payload["diffusion_config"]["rescale_timesteps"] is True and payload["preset"] == name
    assert convert_main([str(structure_files[name]), str(tmp_path / "x.pt"), *argv, "--num_channels", "64"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "--num_channels 128" in err[0] and not (tmp_path / "x.pt").exists()
