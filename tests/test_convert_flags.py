"""Official script flags -> resolved flags -> our configs and guidance settings.

The four fixture configs (tests/fixtures/official/*/config.json, ``official_flags``) were the
exact flags of the official runs that produced the fixtures, so every key must be accepted and
must give the network the fixture describes (its ``block_table``).
"""
import json
from pathlib import Path

import pytest

from checkpoints_convert.errors import CheckpointError, FlagError
from checkpoints_convert.flags import (GUIDED_CHANNEL_MULT, IMPROVED_CHANNEL_MULT, attention_sites,
                                       classifier_config_from_flags, diffusion_config_from_flags,
                                       official_module_to_site, pag_settings_from_flags, resolve_flags,
                                       sag_settings_from_flags, site_to_official_module, str2bool,
                                       unet_config_from_flags)

FIXTURES = Path(__file__).parent / "fixtures" / "official"
CASES = ("adm_uncond", "adm_cond_cg", "iddpm", "pag_adm")


def official_flags(case):
    return json.loads((FIXTURES / case / "config.json").read_text())["official_flags"]


@pytest.mark.parametrize("case", CASES)
def test_every_fixture_flag_is_accepted(case):
    flags = official_flags(case)
    resolved = resolve_flags(flags)
    assert resolved.given == frozenset(flags)
    for name in flags:
        assert name in resolved.values
    unet_config_from_flags(resolved)
    diffusion_config_from_flags(resolved)


def test_family_inference():
    assert resolve_flags(official_flags("iddpm")).family == "improved"
    assert resolve_flags(official_flags("adm_uncond")).family == "guided"
    assert resolve_flags({"sigma_small": "False"}).family == "improved"
    assert resolve_flags({"num_head_channels": 64}).family == "guided"
    assert resolve_flags({"guide_scale": 1.5}).family == "guided"
    assert resolve_flags({"classifier_depth": 4}).family == "guided"
    assert resolve_flags({}).family == "guided"                     # neither: guided
    assert resolve_flags({"num_channels": 128}).family == "guided"  # shared name: guided


def test_family_clash_names_both_sides():
    with pytest.raises(FlagError, match=r"sigma_small.*resblock_updown") as info:
        resolve_flags({"sigma_small": False, "resblock_updown": True})
    assert "\n" not in str(info.value)


def test_explicit_family_refuses_the_other_familys_flags():
    with pytest.raises(FlagError, match="--num_head_channels is a guided-diffusion flag"):
        resolve_flags({"num_head_channels": 64}, family="improved")
    with pytest.raises(FlagError, match="--sigma_small is an improved-diffusion flag"):
        resolve_flags({"sigma_small": True}, family="guided")
    with pytest.raises(FlagError, match="--channel_mult .*1,2,2,2"):
        resolve_flags({"image_size": 32, "channel_mult": "1,2,3,4"}, family="improved")


def test_the_other_familys_flags_at_the_value_the_family_builds_anyway_are_accepted():
    """A guided-diffusion command line for an improved-diffusion file (or the reverse) is fine as long
    as it describes the same network; the foreign flags then have no effect and are not recorded."""
    r = resolve_flags({"image_size": "32", "channel_mult": "1,2,2,2", "resblock_updown": "False",
                       "num_head_channels": "-1", "use_new_attention_order": False, "use_fp16": "True"}, family="improved")
    assert "resblock_updown" not in r.values and unet_config_from_flags(r).channel_mult == (1, 2, 2, 2)
    assert resolve_flags({"sigma_small": True, "learn_sigma": True}, family="guided").values["learn_sigma"]
    improved = resolve_flags({"guide_scale": "1.2", "classifier_depth": 4, "sigma_small": False})
    assert improved.family == "improved" and improved.variant == "sag" and improved.values["guide_scale"] == 1.2


def test_unknown_flag_names_the_nearest_valid_one():
    with pytest.raises(FlagError, match=r"unknown .*--num_channel\b.*did you mean --num_channels\?") as info:
        resolve_flags({"num_channel": 256})
    assert "\n" not in str(info.value)
    with pytest.raises(FlagError, match="did you mean --attention_resolutions"):
        resolve_flags({"attention_resolution": "16,8"})
    with pytest.raises(FlagError, match="did you mean --guide_scale"):
        resolve_flags({"guidance_scale": 1.5})


def test_leading_dashes_are_accepted():
    assert resolve_flags({"--num_channels": "256"}).values["num_channels"] == 256


@pytest.mark.parametrize("text,value", [("True", True), ("true", True), ("T", True), ("yes", True), ("Y", True),
                                        ("1", True), ("False", False), ("f", False), ("NO", False), ("n", False),
                                        ("0", False), (True, True), (False, False)])
def test_str2bool_official_rules(text, value):
    assert str2bool(text) is value


def test_bad_boolean_is_a_one_line_error():
    with pytest.raises(FlagError, match="--learn_sigma 'maybe' is not a boolean"):
        resolve_flags({"learn_sigma": "maybe"})


def test_argparse_strings_are_parsed():
    r = resolve_flags({"image_size": "256", "learn_sigma": "True", "attention_resolutions": "32,16,8",
                       "dropout": "0.1", "class_cond": "False", "timestep_respacing": 250})
    assert r.values["image_size"] == 256 and r.values["learn_sigma"] is True and r.values["class_cond"] is False
    assert r.values["dropout"] == 0.1 and r.values["timestep_respacing"] == "250"
    assert resolve_flags({"attention_resolutions": [16, 8]}).values["attention_resolutions"] == "16,8"
    with pytest.raises(FlagError, match="--num_channels expects an integer"):
        resolve_flags({"num_channels": "wide"})


def test_missing_flags_take_family_defaults():
    guided = resolve_flags({}).values
    assert guided["num_heads"] == 4 and guided["rescale_timesteps"] is False and guided["channel_mult"] == ""
    assert guided["guide_scale"] == 1.5 and guided["classifier_width"] == 128 and guided["clip_denoised"] is True
    improved = resolve_flags({}, family="improved").values
    assert improved["rescale_timesteps"] is True and improved["rescale_learned_sigmas"] is True
    assert improved["num_heads"] == 4 and improved["attention_resolutions"] == "16,8"
    assert improved["use_scale_shift_norm"] is True and improved["num_channels"] == 128
    assert "num_head_channels" not in improved and "resblock_updown" not in improved
    # the PAG repo's own sag_defaults: guide_scale 4.0
    assert resolve_flags({"drop_layers": ["middle_block.1"]}).values["guide_scale"] == 4.0


def test_unet_config_adm_uncond():
    c = unet_config_from_flags(resolve_flags(official_flags("adm_uncond")))
    assert (c.image_size, c.model_channels, c.num_res_blocks) == (32, 32, 2)
    assert c.channel_mult == (1, 1, 1) and c.attention_resolutions == (16, 8)
    assert c.num_head_channels == 4 and c.num_heads == 4 and c.out_channels == 6 and c.num_classes is None
    assert c.resblock_updown and c.use_scale_shift_norm and not c.use_new_attention_order and not c.super_res


def test_unet_config_adm_cond_cg():
    c = unet_config_from_flags(resolve_flags(official_flags("adm_cond_cg")))
    assert c.num_classes == 1000 and c.channel_mult == (1, 1, 1, 1) and c.attention_resolutions == (32, 16, 8)
    assert c.num_head_channels == -1 and c.num_heads == 4


def test_unet_and_diffusion_config_iddpm():
    r = resolve_flags(official_flags("iddpm"))
    c = unet_config_from_flags(r)
    assert c.channel_mult == (1, 2, 2, 2) and c.num_heads == 4 and c.num_head_channels == -1
    assert c.num_res_blocks == 1 and c.dropout == 0.3 and not c.resblock_updown and not c.use_new_attention_order
    d = diffusion_config_from_flags(r)
    assert d.rescale_timesteps and d.rescale_learned_sigmas and d.steps == 4000 and d.noise_schedule == "cosine"
    assert d.learn_sigma and not d.sigma_small


def test_unet_config_pag_adm():
    c = unet_config_from_flags(resolve_flags(official_flags("pag_adm")))
    assert c.num_head_channels == 8 and c.channel_mult == (1, 1, 1)


def test_attention_sites_match_the_fixture_block_tables():
    for case in ("adm_uncond", "adm_cond_cg", "pag_adm"):
        config = json.loads((FIXTURES / case / "config.json").read_text())
        table = config["block_table"]
        expected = ["middle" if line.startswith("middle") else
                    f"{line.split('_')[0]}.{line.split('[')[1].split(']')[0]}"
                    for line in table if "AttentionBlock" in line]
        sites = attention_sites(unet_config_from_flags(resolve_flags(config["official_flags"])))
        assert sorted(sites) == sorted(expected)
    iddpm = json.loads((FIXTURES / "iddpm" / "config.json").read_text())
    names = [line.split(":")[0] for line in iddpm["attention_blocks"]]
    sites = attention_sites(unet_config_from_flags(resolve_flags(iddpm["official_flags"])))
    assert sorted(sites) == sorted(official_module_to_site(n) for n in names)


@pytest.mark.parametrize("size", sorted(GUIDED_CHANNEL_MULT))
def test_guided_channel_mult_defaults(size):
    c = unet_config_from_flags(resolve_flags({"image_size": size, "attention_resolutions": "16"}))
    assert c.channel_mult == tuple(float(m) for m in GUIDED_CHANNEL_MULT[size])


@pytest.mark.parametrize("size", sorted(IMPROVED_CHANNEL_MULT))
def test_improved_channel_mult_defaults(size):
    c = unet_config_from_flags(resolve_flags({"image_size": size}, family="improved"))
    assert c.channel_mult == tuple(float(m) for m in IMPROVED_CHANNEL_MULT[size])


def test_unsupported_size_without_channel_mult():
    with pytest.raises(FlagError, match="pass --channel_mult") as info:
        unet_config_from_flags(resolve_flags({"image_size": 96}))
    assert "\n" not in str(info.value)
    with pytest.raises(FlagError, match="improved-diffusion"):
        unet_config_from_flags(resolve_flags({"image_size": 128}, family="improved"))
    c = unet_config_from_flags(resolve_flags({"image_size": 96, "channel_mult": "1,2,2,2", "attention_resolutions": "24,12"}))
    assert c.channel_mult == (1, 2, 2, 2) and c.attention_resolutions == (24, 12)


def test_attention_resolution_must_divide_the_image():
    with pytest.raises(FlagError, match="does not divide image size 64"):
        unet_config_from_flags(resolve_flags({"image_size": 64, "attention_resolutions": "24"}))


def test_unreachable_attention_resolution_is_dropped_like_the_official_code():
    # 3 levels at 32 px reach 32, 16, 8 only: "4" gives factor 8, which the official loop never meets.
    c = unet_config_from_flags(resolve_flags({"image_size": 32, "channel_mult": "1,1,1", "num_channels": 32,
                                              "attention_resolutions": "16,8,4"}))
    assert c.attention_resolutions == (16, 8)


def test_super_resolution_flags():
    r = resolve_flags({"large_size": "256", "small_size": "64", "num_channels": 192, "learn_sigma": True,
                       "class_cond": True, "resblock_updown": True, "attention_resolutions": "32,16,8"})
    assert r.super_res and r.values["image_size"] == 256
    c = unet_config_from_flags(r)
    assert c.super_res and c.image_size == 256 and c.channel_mult == (1, 1, 2, 2, 4, 4) and c.in_channels == 3
    c512 = unet_config_from_flags(resolve_flags({"large_size": 512, "small_size": 128, "attention_resolutions": "32,16"}))
    assert c512.channel_mult == (1, 1, 2, 2, 4, 4)
    with pytest.raises(FlagError, match="contradicts --large_size"):
        resolve_flags({"large_size": 256, "image_size": 64})
    with pytest.raises(FlagError, match="--channel_mult is not a flag of the upsampler"):
        resolve_flags({"large_size": 256, "channel_mult": "1,2"})


def test_diffusion_config_checks():
    d = diffusion_config_from_flags(resolve_flags({"timestep_respacing": "ddim25", "noise_schedule": "cosine"}))
    assert d.timestep_respacing == "ddim25" and d.noise_schedule == "cosine" and not d.rescale_timesteps
    assert diffusion_config_from_flags(resolve_flags({"timestep_respacing": "10,15,20"})).timestep_respacing == "10,15,20"
    with pytest.raises(FlagError, match="did you mean cosine"):
        diffusion_config_from_flags(resolve_flags({"noise_schedule": "cosin"}))
    with pytest.raises(FlagError, match="timestep_respacing"):
        diffusion_config_from_flags(resolve_flags({"timestep_respacing": "fast"}))


def test_classifier_config_adm_cond_cg():
    c = classifier_config_from_flags(resolve_flags(official_flags("adm_cond_cg")))
    assert (c.image_size, c.model_channels, c.num_res_blocks, c.out_channels) == (64, 32, 1, 1000)
    assert c.channel_mult == (1, 2, 3, 4) and c.attention_resolutions == (32, 8)
    assert c.num_head_channels == 64 and c.pool == "attention" and c.use_scale_shift_norm and c.resblock_updown


def test_classifier_config_defaults_and_errors():
    c = classifier_config_from_flags(resolve_flags({"image_size": 256}))
    assert c.channel_mult == (1, 1, 2, 2, 4, 4) and c.model_channels == 128 and c.num_res_blocks == 2
    assert c.attention_resolutions == (32, 16, 8)
    with pytest.raises(FlagError, match="only 64, 128, 256, 512"):
        classifier_config_from_flags(resolve_flags({"image_size": 32}))
    with pytest.raises(FlagError, match="improved-diffusion has no classifier"):
        classifier_config_from_flags(resolve_flags({}, family="improved"))
    with pytest.raises(FlagError, match="did you mean attention"):
        classifier_config_from_flags(resolve_flags({"classifier_pool": "atention"}))


def test_sag_settings_adm_uncond():
    s = sag_settings_from_flags(resolve_flags(official_flags("adm_uncond")))
    assert s["scale"] == 0.5 and s["official_guide_scale"] == 1.5
    assert s["site"] == "output.2" and s["guide_start"] == 250 and s["blur_sigma"] == 9.0
    assert s["map_mode"] == "official" and s["official_num_heads"] == 4


def test_sag_settings_adm_cond_cg_and_middle():
    s = sag_settings_from_flags(resolve_flags(official_flags("adm_cond_cg")))
    assert s["scale"] == 0.1 and s["site"] == "output.5" and s["blur_sigma"] == 3.0
    flags = dict(official_flags("adm_uncond"), sel_attn_block="middle")
    assert sag_settings_from_flags(resolve_flags(flags))["site"] == "middle"
    # improved-diffusion U-Nets take SAG too (SAG flags describe no network); the default site exists
    assert sag_settings_from_flags(resolve_flags(official_flags("iddpm")))["site"] == "output.2"


def test_sag_site_without_attention_is_refused():
    flags = dict(official_flags("adm_uncond"), sel_attn_depth=7)      # output block 7 is a plain ResBlock
    with pytest.raises(FlagError, match="output_blocks.7.1, which is not an attention block") as info:
        sag_settings_from_flags(resolve_flags(flags))
    assert "\n" not in str(info.value)
    with pytest.raises(FlagError, match="sel_attn_block 'input'"):
        sag_settings_from_flags(resolve_flags(dict(official_flags("adm_uncond"), sel_attn_block="input")))


def test_pag_settings_pag_adm():
    r = resolve_flags(official_flags("pag_adm"))
    assert r.variant == "pag"
    p = pag_settings_from_flags(r)
    assert p["scale"] == 3.0 and p["official_guide_scale"] == 4.0
    assert p["sites"] == ["input.5", "input.7", "input.8", "middle"]
    assert p["step_range"] == (10, 0) and p["drop_rate"] == 1.0 and not p["random_layer"]
    # in the PAG repo --guide_scale is the PAG scale: no SAG unless a "sag" strategy is given
    assert sag_settings_from_flags(r) is None
    both = dict(official_flags("pag_adm"), guidance_strategies={"sag": [10, 5], "attention_mask_identity": [4, 0]})
    assert sag_settings_from_flags(resolve_flags(both))["step_range"] == (10, 5)


def test_pag_settings_absent_or_malformed():
    assert pag_settings_from_flags(resolve_flags(official_flags("adm_uncond"))) is None
    flags = dict(official_flags("pag_adm"), guidance_strategies='{"attention_mask_identity": [250, 0]}')
    assert pag_settings_from_flags(resolve_flags(flags))["step_range"] == (250, 0)
    # [0, 10]: officially 0 >= t >= 10 never holds, so PAG never runs; accepted (load_official warns)
    empty = dict(flags, guidance_strategies={"attention_mask_identity": [0, 10]})
    assert pag_settings_from_flags(resolve_flags(empty))["step_range"] == (0, 10)
    with pytest.raises(FlagError, match="non-negative"):
        pag_settings_from_flags(resolve_flags(dict(flags, guidance_strategies={"attention_mask_identity": [5, -1]})))
    with pytest.raises(FlagError, match="not valid JSON"):
        resolve_flags(dict(flags, guidance_strategies="{attention_mask_identity: [1, 0]}"))
    # the official default layers (ADM-256 indices): on the tiny fixture U-Net only middle_block.1
    # is an attention block; the others are ignored, as the official code ignores them
    default_layers = dict(official_flags("pag_adm"))
    del default_layers["drop_layers"]
    p = pag_settings_from_flags(resolve_flags(default_layers))
    assert p["sites"] == ["middle"]
    assert p["ignored_layers"] == ["input_blocks.14.1", "input_blocks.16.1", "input_blocks.17.1"]


@pytest.mark.parametrize("module,site", [("input_blocks.14.1", "input.14"), ("middle_block.1", "middle"),
                                         ("output_blocks.2.1", "output.2"), ("output_blocks.8.1", "output.8")])
def test_module_site_round_trip(module, site):
    assert official_module_to_site(module) == site
    assert site_to_official_module(site) == module


@pytest.mark.parametrize("bad", ["input_blocks.14", "input_blocks.14.0", "middle_block", "decoder.2.1", "", 3])
def test_unparseable_module_names(bad):
    with pytest.raises(FlagError, match="names no attention module"):
        official_module_to_site(bad)


@pytest.mark.parametrize("bad", ["input", "output.x", "mid", "input.-1"])
def test_unparseable_sites(bad):
    with pytest.raises(FlagError, match="unknown attention site"):
        site_to_official_module(bad)


def test_flag_error_is_a_checkpoint_error_and_a_value_error():
    assert issubclass(FlagError, CheckpointError) and issubclass(FlagError, ValueError)
