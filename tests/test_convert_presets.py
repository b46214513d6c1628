"""Presets of the released OpenAI files, structure inference and one-line mismatch diagnoses.

The real checkpoints are GBs and not available here, so each preset's file is imitated by a state
dict of zero-cost ``device="meta"`` tensors with the official key names and shapes. The shapes come
from ``official_shapes`` (tests/official_shapes.py), written from the official ``UNetModel`` /
``EncoderUNetModel`` constructors independently of the package. Reproducing ECOSYSTEM.md's measured parameter counts from the preset
flags checks the flags, the defaults filled in, and the generator at once.
"""
import dataclasses
import json
from pathlib import Path

import pytest
import torch

from checkpoints_convert.errors import CheckpointError, FlagError
from checkpoints_convert.flags import (classifier_config_from_flags, family_from_names, resolve_flags,
                                      unet_config_from_flags)
from checkpoints_convert.inspect_official import (attention_resolutions_for, diagnose_classifier_mismatch,
                                                  diagnose_mismatch, infer_structure)
from checkpoints_convert.presets import (PRESETS, Preset, candidates_for, detect_preset, preset_flags,
                                         resolve_preset_name)
from checkpoints_convert.safe_load import load_state_dict
from official_shapes import meta_state_dict, official_shapes

FIXTURES = Path(__file__).parent / "fixtures" / "official"


def preset_config(preset):
    return preset.classifier_config() if preset.kind == "classifier" else preset.unet_config()


def numel(sd):
    return sum(t.numel() for t in sd.values())


# ------------------------------------------------------------------------------------------------
# The generator against the fixture files (real official state dicts)
# ------------------------------------------------------------------------------------------------

def fixture_flags(case):
    return json.loads((FIXTURES / case / "config.json").read_text())["official_flags"]


@pytest.mark.parametrize("case", ["adm_uncond", "adm_cond_cg", "iddpm", "pag_adm"])
def test_generator_reproduces_fixture_models(case):
    real = load_state_dict(FIXTURES / case / "model.pt")
    expected = official_shapes(unet_config_from_flags(resolve_flags(fixture_flags(case))))
    assert {k: tuple(v.shape) for k, v in real.items()} == expected


def test_generator_reproduces_fixture_classifier():
    real = load_state_dict(FIXTURES / "adm_cond_cg" / "classifier.pt")
    expected = official_shapes(classifier_config_from_flags(resolve_flags(fixture_flags("adm_cond_cg"))))
    assert {k: tuple(v.shape) for k, v in real.items()} == expected


# ------------------------------------------------------------------------------------------------
# Presets
# ------------------------------------------------------------------------------------------------

def test_preset_inventory():
    kinds = {}
    for p in PRESETS.values():
        kinds.setdefault((p.family, p.kind), []).append(p.name)
    assert len(kinds[("guided", "diffusion")]) == 9          # 5 ImageNet + 4 LSUN
    assert len(kinds[("guided", "upsampler")]) == 2
    assert len(kinds[("guided", "classifier")]) == 4
    assert len(kinds[("improved", "diffusion")]) + len(kinds[("improved", "upsampler")]) == 8
    assert len(PRESETS) == 23
    for name, p in PRESETS.items():
        assert p.filename == name + ".pt" and p.url.endswith("/" + p.filename)
        assert p.url.startswith("https://openaipublic.blob.core.windows.net/diffusion/")
        assert ("jul-2021" in p.url) == (p.family == "guided")
        assert isinstance(p, Preset) and p.published


@pytest.mark.parametrize("name", list(PRESETS))
def test_preset_flags_resolve_to_configs(name):
    p = PRESETS[name]
    # The README flags name guided-diffusion by themselves (num_head_channels, resblock_updown, classifier_*)
    # or no repository at all (every improved-diffusion README line): the preset's family decides.
    assert family_from_names(p.official_flags) == ("guided" if p.family == "guided" else None)
    assert p.resolved().family == p.family
    config = preset_config(p)
    if p.kind != "classifier":
        d = p.diffusion_config()
        assert d.learn_sigma and config.out_channels == 6
        assert config.super_res == (p.kind == "upsampler")


# ECOSYSTEM.md section 3.3, measured on the official modules.
ECOSYSTEM_PARAMS = {
    "64x64_diffusion": 295_904_454, "128x128_diffusion": 421_529_606, "256x256_diffusion": 553_838_086,
    "256x256_diffusion_uncond": 552_814_086, "512x512_diffusion": 558_997_638, "64_256_upsampler": 311_795_910,
    "128_512_upsampler": 308_835_270, "lsun_bedroom": 552_814_086, "lsun_cat": 552_814_086,
    "lsun_horse": 552_814_086, "lsun_horse_nodropout": 552_814_086,
    "imagenet64_uncond_100M_1500K": 121_063_942, "imagenet64_uncond_vlb_100M_1500K": 121_063_942,
    "cifar10_uncond_50M_500K": 52_546_438, "cifar10_uncond_vlb_50M_500K": 52_546_438,
    "imagenet64_cond_270M_250K": 273_049_350, "upsample_cond_500K": 279_792_390,
    "lsun_uncond_100M_1200K_bs128": 113_676_678, "lsun_uncond_100M_2400K_bs64": 113_676_678,
}


@pytest.mark.parametrize("name", list(ECOSYSTEM_PARAMS))
def test_parameter_counts_match_ecosystem(name):
    sd = meta_state_dict(PRESETS[name].unet_config())
    assert numel(sd) == ECOSYSTEM_PARAMS[name] == PRESETS[name].num_params


@pytest.mark.parametrize("name", list(PRESETS))
def test_each_preset_is_detected_from_its_meta_state_dict(name):
    p = PRESETS[name]
    sd = meta_state_dict(preset_config(p))
    found = candidates_for(sd)
    assert p in found
    if p.group is None:
        assert found == [p]
    else:
        assert [q.name for q in found] == [q.name for q in PRESETS.values() if q.group == p.group]
    assert detect_preset(sd) is found[0]


def test_shape_groups():
    sd = meta_state_dict(PRESETS["lsun_cat"].unet_config())
    names = [p.name for p in candidates_for(sd)]
    assert names == ["256x256_diffusion_uncond", "lsun_bedroom", "lsun_cat", "lsun_horse", "lsun_horse_nodropout"]
    assert detect_preset(sd).name == "256x256_diffusion_uncond"


def test_detection_rejects_near_misses():
    c = PRESETS["256x256_diffusion_uncond"].unet_config()
    assert detect_preset(meta_state_dict(dataclasses.replace(c, num_res_blocks=3))) is None
    sd = meta_state_dict(c)
    sd["extra.weight"] = torch.empty(10, device="meta")           # same structure, different count
    assert detect_preset(sd) is None
    assert detect_preset({"state": {}, "param_groups": []}) is None
    assert detect_preset(load_state_dict(FIXTURES / "adm_uncond" / "model.pt")) is None


def test_infer_structure_on_meta_preset():
    s = infer_structure(meta_state_dict(PRESETS["64x64_diffusion"].unet_config()))
    assert s["kind"] == "unet" and s["model_channels"] == 192 and s["num_res_blocks"] == 3
    assert s["channel_mult"] == (1, 2, 3, 4) and s["attention_ds"] == (2, 4, 8)
    assert attention_resolutions_for(s, 64) == (32, 16, 8)
    assert s["class_cond"] and s["num_classes"] == 1000 and s["learn_sigma"] and s["resblock_updown"]
    s512 = infer_structure(meta_state_dict(PRESETS["512x512_diffusion"].unet_config()))
    assert s512["channel_mult"] == (0.5, 1, 1, 2, 2, 4, 4)
    up = infer_structure(meta_state_dict(PRESETS["64_256_upsampler"].unet_config()))
    assert up["super_res"] and up["in_channels"] == 6 and up["learn_sigma"]
    lsun = infer_structure(meta_state_dict(PRESETS["lsun_uncond_100M_1200K_bs128"].unet_config()))
    assert not lsun["use_scale_shift_norm"] and not lsun["resblock_updown"] and lsun["attention_ds"] == (16,)
    clf = infer_structure(meta_state_dict(PRESETS["512x512_classifier"].classifier_config()))
    assert clf["kind"] == "classifier" and clf["image_size"] == 512 and clf["channel_mult"] == (0.5, 1, 1, 2, 2, 4, 4)


def test_preset_sag_settings():
    s = PRESETS["256x256_diffusion_uncond"].sag
    assert (s["scale"], s["blur_sigma"], s["site"], s["official_guide_scale"]) == (0.5, 9.0, "output.2", 1.5)
    s = PRESETS["128x128_diffusion"].sag
    assert (s["scale"], s["blur_sigma"], s["site"], s["classifier_scale"]) == (0.1, 3.0, "output.8", 0.5)
    assert PRESETS["256x256_diffusion"].sag["scale"] == 0.2
    assert PRESETS["lsun_cat"].sag["scale"] == 0.05 and PRESETS["lsun_horse"].sag["scale"] == 0.01
    for name in ("64x64_diffusion", "512x512_diffusion", "lsun_bedroom", "cifar10_uncond_50M_500K"):
        assert PRESETS[name].sag is None
    for name, p in PRESETS.items():        # every SAG site is an attention block of that model
        if p.sag:
            from checkpoints_convert.flags import attention_sites
            assert p.sag["site"] in attention_sites(p.unet_config())


def test_preset_silent_settings():
    """The settings the weights cannot reveal (ECOSYSTEM.md 3.4) come out of the presets right."""
    c64 = PRESETS["64x64_diffusion"].unet_config()
    assert c64.use_new_attention_order and c64.num_head_channels == 64
    assert PRESETS["64x64_diffusion"].diffusion_config().noise_schedule == "cosine"
    assert PRESETS["128x128_diffusion"].unet_config().num_heads == 4
    assert PRESETS["128x128_diffusion"].unet_config().num_head_channels == -1
    d = PRESETS["imagenet64_uncond_100M_1500K"].diffusion_config()
    assert d.rescale_timesteps and d.steps == 4000 and d.noise_schedule == "cosine"
    assert not PRESETS["imagenet64_cond_270M_250K"].diffusion_config().rescale_timesteps
    assert PRESETS["lsun_uncond_100M_1200K_bs128"].unet_config().num_heads == 1
    assert PRESETS["imagenet64_uncond_vlb_100M_1500K"].diffusion_config().use_kl


def test_resolve_preset_name():
    p = PRESETS["256x256_diffusion_uncond"]
    for text in ("256x256_diffusion_uncond", "256x256_diffusion_uncond.pt", "models/256x256_diffusion_uncond.pt",
                 "256X256_Diffusion_Uncond.PT"):
        assert resolve_preset_name(text) is p
    assert preset_flags("lsun_cat.pt")["dropout"] == "0.1"
    flags = preset_flags("lsun_cat")
    flags["dropout"] = "0.5"
    assert PRESETS["lsun_cat"].official_flags["dropout"] == "0.1"          # a copy
    with pytest.raises(FlagError, match=r"did you mean 256x256_diffusion_uncond\?.*valid presets are") as info:
        resolve_preset_name("256x256_diffusion_uncnd")
    assert "\n" not in str(info.value)


# ------------------------------------------------------------------------------------------------
# infer_structure / diagnose_mismatch on the real fixture files
# ------------------------------------------------------------------------------------------------

def fixture_case(case):
    sd = load_state_dict(FIXTURES / case / "model.pt")
    return sd, unet_config_from_flags(resolve_flags(fixture_flags(case)))


def test_infer_structure_fixtures():
    s = infer_structure(load_state_dict(FIXTURES / "adm_uncond" / "model.pt"))
    assert s == {**s, "kind": "unet", "model_channels": 32, "in_channels": 3, "out_channels": 6, "learn_sigma": True,
                 "class_cond": False, "num_classes": None, "use_scale_shift_norm": True, "num_res_blocks": 2,
                 "channel_mult": (1, 1, 1), "resblock_updown": True, "attention_ds": (2, 4), "super_res": False,
                 "num_params": 737_318}
    s = infer_structure(load_state_dict(FIXTURES / "adm_cond_cg" / "model.pt"))
    assert s["class_cond"] and s["num_classes"] == 1000 and s["channel_mult"] == (1, 1, 1, 1)
    assert s["attention_ds"] == (2, 4, 8)
    s = infer_structure(load_state_dict(FIXTURES / "iddpm" / "model.pt"))
    assert s["channel_mult"] == (1, 2, 2, 2) and s["num_res_blocks"] == 1 and not s["resblock_updown"]
    assert attention_resolutions_for(s, 32) == (16, 8)
    c = infer_structure(load_state_dict(FIXTURES / "adm_cond_cg" / "classifier.pt"))
    assert c["kind"] == "classifier" and c["model_channels"] == 32 and c["num_res_blocks"] == 1
    assert c["channel_mult"] == (1, 2, 3, 4) and c["attention_ds"] == (2, 8) and c["pool"] == "attention"
    assert c["image_size"] == 64 and c["out_channels"] == 1000 and c["resblock_updown"]


def test_infer_structure_kinds():
    assert infer_structure({"state": {}, "param_groups": []})["kind"] == "optimizer"
    assert infer_structure({"encoder.0.weight": torch.zeros(1)})["kind"] == "unknown"


@pytest.mark.parametrize("case", ["adm_uncond", "adm_cond_cg", "iddpm", "pag_adm"])
def test_right_flags_give_no_diagnosis(case):
    sd, config = fixture_case(case)
    assert diagnose_mismatch(sd, config) is None


WRONG = [  # (fixture, field changes, expected flag in the one-line diagnosis)
    ("adm_uncond", dict(out_channels=3), "--learn_sigma True"),
    ("adm_uncond", dict(num_classes=1000), "--class_cond False"),
    ("adm_cond_cg", dict(num_classes=None), "--class_cond True"),
    ("adm_uncond", dict(model_channels=64), "--num_channels 32"),
    ("adm_uncond", dict(num_res_blocks=3), "--num_res_blocks 2"),
    ("adm_uncond", dict(resblock_updown=False), "--resblock_updown True"),
    ("iddpm", dict(resblock_updown=True), "--resblock_updown False"),
    ("adm_uncond", dict(use_scale_shift_norm=False), "--use_scale_shift_norm True"),
    ("adm_uncond", dict(attention_resolutions=(16,)), "--attention_resolutions 16,8"),
    ("adm_uncond", dict(channel_mult=(1, 2, 2)), "--channel_mult 1,1,1"),
    ("iddpm", dict(channel_mult=(1, 2, 3, 4), image_size=64, attention_resolutions=(32, 16)), "--image_size 32"),
    ("adm_uncond", dict(super_res=True), "--large_size"),
]


@pytest.mark.parametrize("case,changes,flag", WRONG, ids=[f"{c}-{'-'.join(ch)}" for c, ch, _ in WRONG])
def test_wrong_flag_is_named(case, changes, flag):
    sd, config = fixture_case(case)
    message = diagnose_mismatch(sd, dataclasses.replace(config, **changes))
    assert message is not None and flag in message and "\n" not in message


def test_diagnose_learn_sigma_message():
    sd, config = fixture_case("adm_uncond")
    message = diagnose_mismatch(sd, dataclasses.replace(config, out_channels=3))
    assert message == "checkpoint predicts the variance (6 output channels): pass --learn_sigma True"


def test_diagnose_other_files():
    _, config = fixture_case("adm_uncond")
    assert "optimizer state" in diagnose_mismatch({"state": {}, "param_groups": []}, config)
    classifier = load_state_dict(FIXTURES / "adm_cond_cg" / "classifier.pt")
    assert "--classifier_path" in diagnose_mismatch(classifier, config)
    assert "not an official" in diagnose_mismatch({"conv.weight": torch.zeros(1)}, config)


def test_diagnose_meta_upsampler_and_image_size():
    up = PRESETS["64_256_upsampler"].unet_config()
    base = PRESETS["256x256_diffusion"].unet_config()
    assert "upsampler" in diagnose_mismatch(meta_state_dict(up), dataclasses.replace(up, super_res=False))
    assert "drop --large_size" in diagnose_mismatch(meta_state_dict(base), dataclasses.replace(base, super_res=True))
    # ADM-256 weights with --image_size 128 (default channel_mult (1,1,2,3,4)): the size is named
    wrong = unet_config_from_flags(resolve_flags(dict(PRESETS["256x256_diffusion"].official_flags, image_size="128")))
    assert "--image_size 256" in diagnose_mismatch(meta_state_dict(base), wrong)


def test_diagnose_classifier():
    sd = load_state_dict(FIXTURES / "adm_cond_cg" / "classifier.pt")
    config = classifier_config_from_flags(resolve_flags(fixture_flags("adm_cond_cg")))
    assert diagnose_classifier_mismatch(sd, config) is None
    cases = [(dict(model_channels=64), "--classifier_width 32"),
             (dict(num_res_blocks=2), "--classifier_depth 1"),
             (dict(attention_resolutions=(32, 16, 8)), "--classifier_attention_resolutions 32,8"),
             (dict(pool="adaptive"), "--classifier_pool attention"),
             (dict(use_scale_shift_norm=False), "--classifier_use_scale_shift_norm True"),
             (dict(resblock_updown=False), "--classifier_resblock_updown True")]
    for changes, flag in cases:
        message = diagnose_classifier_mismatch(sd, dataclasses.replace(config, **changes))
        assert message is not None and flag in message, (changes, message)
    wrong_size = classifier_config_from_flags(resolve_flags(dict(fixture_flags("adm_cond_cg"), image_size=128)))
    assert "--image_size 64" in diagnose_classifier_mismatch(sd, wrong_size)
    unet = load_state_dict(FIXTURES / "adm_cond_cg" / "model.pt")
    assert "not a classifier" in diagnose_classifier_mismatch(unet, config)


def test_broken_layout_is_one_line_error():
    sd = load_state_dict(FIXTURES / "adm_uncond" / "model.pt")
    broken = {k: v for k, v in sd.items() if not k.startswith("input_blocks.4.")}
    with pytest.raises(CheckpointError) as info:
        infer_structure(broken)
    assert "\n" not in str(info.value)
