"""Key map round trips, load_official's one-line errors, our own checkpoint format, the converter CLI."""
import dataclasses
import pickle

import pytest
import torch

from checkpoints_convert import (CheckpointError, FlagError, load_checkpoint, load_official, load_official_classifier,
                                 official_to_ours, ours_to_official, save_checkpoint)
from checkpoints_convert.__main__ import main as convert_main
from conftest import FIXTURES, load_case, max_err, official_flags, reference


@pytest.mark.parametrize("case", ["adm_uncond", "adm_cond_cg", "iddpm", "pag_adm"])
def test_key_map_round_trip_is_the_identity(case):
    official = torch.load(FIXTURES / case / "model.pt", weights_only=True)
    model = load_case(case).model
    ours = official_to_ours(model, official)
    assert set(ours) == set(model.state_dict())
    back = ours_to_official(model, ours)
    assert list(back) == list(official) or set(back) == set(official)
    assert all(back[k] is official[k] for k in official)


def test_classifier_key_map_round_trip():
    official = torch.load(FIXTURES / "adm_cond_cg" / "classifier.pt", weights_only=True)
    model = load_official_classifier(FIXTURES / "adm_cond_cg" / "classifier.pt", official_flags("adm_cond_cg")).model
    back = ours_to_official(model, official_to_ours(model, official))
    assert set(back) == set(official) and all(back[k] is official[k] for k in official)


@pytest.mark.parametrize("flag,value,expect", [
    ("learn_sigma", False, "--learn_sigma True"),
    ("class_cond", True, "--class_cond False"),
    ("num_channels", 64, "num_channels"),
    ("resblock_updown", False, "resblock_updown"),
    ("use_scale_shift_norm", False, "use_scale_shift_norm"),
    ("num_res_blocks", 3, "num_res_blocks"),
])
def test_wrong_flag_is_one_line_naming_it(flag, value, expect):
    flags = dict(official_flags("adm_uncond"), **{flag: value})
    with pytest.raises(CheckpointError) as err:
        load_official(FIXTURES / "adm_uncond" / "model.pt", flags)
    assert expect in str(err.value) and "\n" not in str(err.value)


def test_unknown_flag_and_classifier_file_and_non_checkpoints(tmp_path):
    with pytest.raises(FlagError, match="num_channel.*num_channels"):
        load_official(FIXTURES / "adm_uncond" / "model.pt", dict(official_flags("adm_uncond"), num_channel=32))
    with pytest.raises(CheckpointError, match="classifier"):
        load_official(FIXTURES / "adm_cond_cg" / "classifier.pt", official_flags("adm_cond_cg"))
    text = tmp_path / "notes.pt"
    text.write_text("not a checkpoint")
    with pytest.raises(CheckpointError, match="not a PyTorch checkpoint"):
        load_official(text, {})
    with pytest.raises(CheckpointError, match="no such checkpoint"):
        load_official(tmp_path / "missing.pt", {})


class _Payload:
    def __reduce__(self):
        import os
        return (os.system, ("touch /tmp/sag-should-not-exist",))


def test_a_pickle_carrying_code_is_refused_unread(tmp_path):
    evil = tmp_path / "evil.pt"
    torch.save({"x": _Payload()}, evil)
    with pytest.raises(CheckpointError, match="code"):
        load_official(evil, {})
    import os
    assert not os.path.exists("/tmp/sag-should-not-exist")


def test_our_format_round_trips_sag_and_pag(tmp_path):
    for case in ("adm_uncond", "pag_adm"):
        loaded = load_case(case)
        path = tmp_path / f"{case}.pt"
        save_checkpoint(path, loaded)
        payload = torch.load(path, weights_only=True)          # plain data only
        assert payload["format"] == "sag-checkpoint" and payload["version"] == 1
        again = load_checkpoint(path)
        assert again.guidance == loaded.guidance
        assert again.model.config == loaded.model.config
        assert again.diffusion.config == loaded.diffusion.config
        ref = reference(case)
        with torch.no_grad():
            assert max_err(again.model(ref["fwd_x"], ref["fwd_t"]).output, ref["fwd_out"]) <= 1e-5


def test_converter_cli(tmp_path, capsys):
    out = tmp_path / "converted.pt"
    argv = [str(FIXTURES / "adm_uncond" / "model.pt"), str(out)]
    for name, value in official_flags("adm_uncond").items():
        argv += [f"--{name}", str(value)]
    assert convert_main(argv) == 0
    assert load_checkpoint(out).guidance.site == "output.2"
    assert convert_main([str(FIXTURES / "adm_uncond" / "model.pt"), str(tmp_path / "x.pt"), "--learn_sigma", "False",
                         "--num_channels", "32"]) == 2
    assert "sag-checkpoint" not in capsys.readouterr().out and not (tmp_path / "x.pt").exists()


def test_a_recognised_file_gets_the_readme_sag_settings():
    """The released files are GBs, so detection itself is tested on meta-tensor state dicts in
    test_convert_presets.py; here: what a recognised file's guidance becomes with no SAG flags."""
    from checkpoints_convert.load import _preset_guidance
    from checkpoints_convert.presets import PRESETS
    g = _preset_guidance(PRESETS["256x256_diffusion_uncond"])
    assert (g.scale, g.blur_sigma, g.site, g.map_mode, g.official_num_heads) == (0.5, 9.0, "output.2", "official", 4)
    assert g.guide_start is None
    assert _preset_guidance(PRESETS["64x64_diffusion"]) is None   # the SAG README gives no settings for it
