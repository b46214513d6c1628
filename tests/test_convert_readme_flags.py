"""Every released checkpoint resolves with its README's flags exactly as printed (issue 13).

For each of the 23 released files: the README command line, verbatim (guided-diffusion, SAG and
improved-diffusion READMEs; MODEL_FLAGS / DIFFUSION_FLAGS / SAG_FLAGS / SAMPLE_FLAGS expanded), is
resolved against an imitation of the file (``device="meta"`` tensors of its exact shapes, named as the
README names it) by the one rule of ``checkpoints_convert.resolve``, and the result must equal
ECOSYSTEM.md section 3.3's row for the file (structure, heads, schedule, steps, rescale_timesteps,
rescale_learned_sigmas, learned-sigma range, attention resolutions), the preset, and the timesteps
the official wrapper feeds the network. The same flags in every spelling users paste resolve alike.
Where a fixture of the family exists (tests/fixtures/official/iddpm, adm_uncond), a README command
adapted to the fixture's small structure runs a step equal to the recorded official one.
"""
import dataclasses

import pytest
import torch

from checkpoints_convert import CheckpointError, FlagError, load_official
from checkpoints_convert.flags import IMPROVED_MODEL_DEFAULTS, GUIDED_MODEL_DEFAULTS
from checkpoints_convert.load import NeverGuidedWarning, _recommended_guidance, never_guided_warnings
from checkpoints_convert.presets import PRESETS
from checkpoints_convert.resolve import resolve_checkpoint
from conftest import FIXTURES, max_err, official_flags, reference
from diffusion import GaussianDiffusion
from official_shapes import meta_state_dict
from readme_commands import (CLASSIFIERS, COMMANDS, DIFFUSION_NAMES, ECOSYSTEM, command_flags, loader_flags,
                             model_path)
from sag import SAGConfig, guided_step


def meta_file(name: str):
    p = PRESETS[name]
    return meta_state_dict(p.classifier_config() if p.kind == "classifier" else p.unet_config())


def resolve_readme(name: str, flags=None, **kw):
    kind = "classifier" if name in CLASSIFIERS else "unet"
    return resolve_checkpoint(meta_file(name), loader_flags(name) if flags is None else flags, kind=kind,
                              source=kw.pop("source", model_path(name)), **kw)


def test_every_preset_has_its_readme_command():
    assert sorted(COMMANDS) == sorted(PRESETS) and len(COMMANDS) == 23
    assert sorted(ECOSYSTEM) == sorted(DIFFUSION_NAMES)


# ------------------------------------------------------------------------------------------------
# Resolution, preset by preset.
# ------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("name", DIFFUSION_NAMES)
def test_readme_flags_resolve_to_the_ecosystem_row_and_the_preset(name):
    r = resolve_readme(name)
    p = PRESETS[name]
    assert p in r.candidates and r.resolved.family == p.family
    (size, cond, ch, nrb, attn, heads, head_ch, new_order, scale_shift, updown, schedule, steps, rescale_t,
     rescale_sigmas, params) = ECOSYSTEM[name]
    c, d = r.config, r.diffusion_config
    assert (c.image_size, c.num_classes is not None, c.model_channels, c.num_res_blocks, c.attention_resolutions) == \
        (size, cond, ch, nrb, attn)
    assert (c.num_heads, c.num_head_channels, c.use_new_attention_order) == (heads, head_ch, new_order)
    assert (c.use_scale_shift_norm, c.resblock_updown, c.out_channels, c.super_res) == \
        (scale_shift, updown, 6, p.kind == "upsampler")
    assert (d.noise_schedule, d.steps, d.learn_sigma, d.sigma_small) == (schedule, steps, True, False)
    assert (d.rescale_timesteps, d.rescale_learned_sigmas) == (rescale_t, rescale_sigmas)
    assert sum(t.numel() for t in meta_file(name).values()) == params
    assert c == p.unet_config()
    readme_respacing = command_flags(COMMANDS[name]).get("timestep_respacing", "")
    assert d == p.diffusion_config().__class__(**{**p.diffusion_config().__dict__,
                                                   "timestep_respacing": readme_respacing})


@pytest.mark.parametrize("name", list(CLASSIFIERS))
def test_readme_flags_resolve_every_classifier(name):
    r = resolve_readme(name)
    size, depth = CLASSIFIERS[name]
    c = r.config
    assert r.preset is PRESETS[name] and c == PRESETS[name].classifier_config()
    assert (c.image_size, c.num_res_blocks, c.model_channels, c.attention_resolutions, c.pool) == \
        (size, depth, 128, (32, 16, 8), "attention")
    assert c.use_scale_shift_norm and c.resblock_updown and c.num_head_channels == 64 and c.out_channels == 1000


@pytest.mark.parametrize("name", DIFFUSION_NAMES)
def test_the_network_sees_the_official_timesteps(name):
    """t * 1000 / 4000 (float) for the 4000-step files with rescale_timesteps True; the original t
    (int) otherwise -- at respaced indices too (improved-diffusion respace._WrappedModel)."""
    r = resolve_readme(name, dict(loader_flags(name), timestep_respacing="100"))
    diffusion = GaussianDiffusion.from_config(r.diffusion_config)
    t = torch.tensor([0, 37, 99])
    original = diffusion.model_timesteps(t) if not r.diffusion_config.rescale_timesteps else None
    seen = diffusion.model_timesteps(t)
    steps = r.diffusion_config.steps
    mapped = torch.tensor([round(i * (steps - 1) / 99) for i in (0, 37, 99)])   # '100' = one section, even stride
    if ECOSYSTEM[name][12]:
        assert seen.dtype == torch.float32 and torch.equal(seen, mapped.float() * (1000.0 / steps))
        assert seen[-1].item() == pytest.approx(999.75)
    else:
        assert torch.equal(original, mapped)


def _spellings(flags: dict):
    """The README flags as typed ("True", "32,16,8"), as Python values, with 1/0 booleans and lists."""
    def python(value):
        if value in ("True", "False"):
            return value == "True"
        for cast in (int, float):
            try:
                return cast(value)
            except ValueError:
                pass
        if "," in value:
            return [int(v) for v in value.split(",")]
        return value
    yield flags
    yield {k: python(v) for k, v in flags.items()}
    yield {f"--{k}": ({"True": "1", "False": "0"}.get(v, v)) for k, v in flags.items()}
    yield {k: ({"True": "true", "False": "f"}.get(v, tuple(python(v)) if "," in v else v)) for k, v in flags.items()}


@pytest.mark.parametrize("name", list(PRESETS))
def test_every_spelling_resolves_alike(name):
    first = None
    for flags in _spellings(loader_flags(name)):
        r = resolve_readme(name, flags)
        got = (r.config, r.diffusion_config, r.preset, {k: v for k, v in r.resolved.values.items()})
        first = first or got
        assert got == first


# ------------------------------------------------------------------------------------------------
# The four failures of the issue, and the rule's edges.
# ------------------------------------------------------------------------------------------------

def test_improved_readme_flags_take_improved_defaults_from_the_file():
    """Case 1: imagenet64_uncond README flags name no repository; the file says improved-diffusion."""
    r = resolve_readme("imagenet64_uncond_100M_1500K")
    assert r.resolved.family == "improved" and r.diffusion_config.rescale_timesteps
    assert "imagenet64_uncond_100M_1500K README flags and improved-diffusion defaults" in r.defaults
    # given flags still win: the user may say otherwise (and then samples as the official code would)
    assert not resolve_readme("imagenet64_uncond_100M_1500K",
                              dict(loader_flags("imagenet64_uncond_100M_1500K"), rescale_timesteps="False")
                              ).diffusion_config.rescale_timesteps


def test_cifar10_readme_flags_build_channel_mult_1222():
    """Case 2: improved-diffusion knows channel_mult 1,2,2,2 for --image_size 32."""
    assert resolve_readme("cifar10_uncond_50M_500K").config.channel_mult == (1, 2, 2, 2)


def test_lsun_improved_readme_flags_need_no_sag_site_and_get_one_they_have(recwarn):
    """Case 3: no SAG flag typed -> no SAG site checked; SAG asked without a site -> a site it has."""
    from checkpoints_convert.flags import recommended_sag_site, sag_settings_from_flags
    for name in ("lsun_uncond_100M_1200K_bs128", "lsun_uncond_100M_2400K_bs64"):
        r = resolve_readme(name)
        assert r.config.attention_resolutions == (16,) and r.config.num_heads == 1
        assert recommended_sag_site(r.config) == "output.5"
        asked = resolve_readme(name, dict(loader_flags(name), guide_scale="1.5"))
        s = sag_settings_from_flags(asked.resolved, asked.config)
        assert (s["site"], s["official_num_heads"], s["scale"]) == ("output.5", 1, 0.5)
        typed = resolve_readme(name, dict(loader_flags(name), guide_scale="1.5", sel_attn_depth="2"))
        with pytest.raises(FlagError, match="output_blocks.2.1, which is not an attention block.*output.5") as err:
            sag_settings_from_flags(typed.resolved, typed.config)
        assert "\n" not in str(err.value)
    assert recommended_sag_site(PRESETS["cifar10_uncond_50M_500K"].unet_config()) == "output.7"
    for name in DIFFUSION_NAMES:                       # the official default wherever the U-Net has it
        if PRESETS[name].family == "guided":
            assert recommended_sag_site(PRESETS[name].unet_config()) == "output.2"


def test_guide_start_0_is_accepted_and_guides_no_step():
    """Case 4: officially guide_start > t never holds: no SAG; accepted, with a warning."""
    ref = reference("adm_uncond")
    with pytest.warns(NeverGuidedWarning, match="--guide_start 0 .*none of the 3 sampling steps"):
        loaded = load_official(FIXTURES / "adm_uncond" / "model.pt",
                               dict(official_flags("adm_uncond"), guide_start="0", timestep_respacing="3"))
    g = loaded.guidance
    assert isinstance(g, SAGConfig) and g.guide_start == 0 and not any(g.active_at(t) for t in range(3))
    x, noise = ref["step1_x"], ref["step1_noise"]
    a = guided_step(loaded.model, loaded.diffusion, x, 2, guidance=g, noise=noise)
    b = guided_step(loaded.model, loaded.diffusion, x, 2, guidance=None, noise=noise)
    assert a.sag is None and torch.equal(a.x_prev, b.x_prev)
    assert never_guided_warnings(dataclasses.replace(g, guide_start=1), 3) == []   # a window that guides: silent
    assert "none of the 3" in never_guided_warnings(dataclasses.replace(g, guide_start=5, guide_end=4), 3)[0]


def test_a_contradicting_flag_is_one_line_naming_it():
    for name, flag, value, fragment in [
        ("cifar10_uncond_50M_500K", "num_channels", "64", "pass --num_channels 128"),
        ("lsun_uncond_100M_1200K_bs128", "use_scale_shift_norm", "True", "--use_scale_shift_norm False"),
        ("imagenet64_uncond_100M_1500K", "resblock_updown", "True", "--resblock_updown is a guided-diffusion flag"),
        ("256x256_diffusion_uncond", "sigma_small", "True", "256x256_diffusion_uncond"),
        ("64x64_classifier", "classifier_depth", "2", "--classifier_depth 4"),
    ]:
        flags = {flag: value} if flag == "sigma_small" else dict(loader_flags(name), **{flag: value})
        if flag == "sigma_small":
            flags["learn_sigma"] = "False"
        with pytest.raises(CheckpointError) as err:
            resolve_readme(name, flags)
        assert fragment in str(err.value) and "\n" not in str(err.value), (name, str(err.value))
    with pytest.raises(FlagError, match="family='guided' contradicts .* improved-diffusion's cifar10"):
        resolve_readme("cifar10_uncond_50M_500K", family="guided")


def test_an_unrecognised_file_needs_the_flag_that_the_repositories_default_differently():
    """Rule 5 on files that are no released ones: the imagenet64 README flags at 64 channels (both
    repositories build the file, and with 4000 steps would feed the network different timesteps)."""
    state = meta_state_dict(dataclasses.replace(PRESETS["imagenet64_uncond_100M_1500K"].unet_config(), model_channels=64))
    flags = dict(loader_flags("imagenet64_uncond_100M_1500K"), num_channels="64")
    with pytest.raises(FlagError, match=r"do not say whether guided-diffusion or improved-diffusion.*"
                                        r"t\*1000/4000.*pass --rescale_timesteps$") as err:
        resolve_checkpoint(state, flags, source="finetuned.pt")
    assert "\n" not in str(err.value)
    for value in ("True", "False"):                  # told: either is taken as given
        r = resolve_checkpoint(state, dict(flags, rescale_timesteps=value))
        assert r.diffusion_config.rescale_timesteps == (value == "True") and r.preset is None
    # 1000 steps: both repositories' defaults sample alike, so nothing is asked
    r = resolve_checkpoint(state, dict(flags, diffusion_steps="1000"))
    assert r.resolved.family == "guided" and "sample this file alike" in r.defaults
    # 32 px without --channel_mult: only improved-diffusion's script runs these flags (the iddpm fixture)
    from checkpoints_convert.safe_load import load_state_dict
    iddpm = load_state_dict(FIXTURES / "iddpm" / "model.pt")
    r = resolve_checkpoint(iddpm, dict(loader_flags("cifar10_uncond_50M_500K"), num_channels="32", num_res_blocks="1"))
    assert r.resolved.family == "improved" and r.diffusion_config.rescale_timesteps and "only repository" in r.defaults


def test_shape_groups_are_told_apart_by_file_name_and_flags(recwarn):
    cat = resolve_readme("lsun_cat")
    assert cat.candidates == (PRESETS["lsun_cat"],)
    by_flags = resolve_readme("lsun_bedroom", source="models/bedroom-copy.pt")       # --dropout 0.1
    assert [p.name for p in by_flags.candidates] == ["lsun_bedroom", "lsun_cat", "lsun_horse"]
    assert _recommended_guidance(by_flags, "models/bedroom-copy.pt") is None         # they disagree on SAG
    assert "whose SAG README settings differ" in str(recwarn.pop(UserWarning).message)
    named = resolve_checkpoint(meta_file("lsun_cat"), {}, source="models/256x256_diffusion_uncond.pt")
    assert _recommended_guidance(named, "x").scale == 0.5
    vlb = resolve_readme("imagenet64_uncond_vlb_100M_1500K")                          # --use_kl True
    assert vlb.candidates == (PRESETS["imagenet64_uncond_vlb_100M_1500K"],)


# ------------------------------------------------------------------------------------------------
# README commands on the small official fixtures: a step equal to the recorded official one.
# ------------------------------------------------------------------------------------------------

def test_cifar10_readme_command_on_the_iddpm_fixture_steps_as_improved_diffusion():
    """The cifar10 README flags with the fixture's structure (32 channels, 1 ResBlock) and the
    fixture's respacing, the file named as the released one (``preset=``) or not: improved-diffusion
    decides rescale_timesteps, the network sees t*1000/4000 and the step equals the official p_sample."""
    ref = reference("iddpm")
    flags = dict(loader_flags("cifar10_uncond_50M_500K"), num_channels="32", num_res_blocks="1",
                 timestep_respacing="100")
    for loaded in (load_official(FIXTURES / "iddpm" / "model.pt", flags, preset="cifar10_uncond_50M_500K"),
                   load_official(FIXTURES / "iddpm" / "model.pt", flags)):   # 32 px: only improved builds it
        assert loaded.guidance is None
        assert torch.equal(loaded.diffusion.model_timesteps(ref["pmv_t"]), ref["pmv_t_model"])
        for i, t in enumerate(ref["pmv_t"].tolist()):
            step = guided_step(loaded.model, loaded.diffusion, ref["pmv_x"][i:i + 1], t,
                               noise=ref["psample_noise"][i:i + 1])
            assert max_err(step.x_prev, ref["psample_sample"][i:i + 1]) <= 1e-5
            assert max_err(step.pred_x0, ref["pmv_pred_xstart"][i:i + 1]) <= 1e-5


def test_sag_readme_command_on_the_adm_uncond_fixture_steps_as_the_sag_code():
    """The SAG README's 256-uncond command (MODEL_FLAGS + SAG_FLAGS) with the fixture's structure and
    the fixture's unspaced process: the SAG step (t = 249) equals the recorded official one."""
    ref = reference("adm_uncond")
    structure = {k: official_flags("adm_uncond")[k] for k in
                 ("image_size", "num_channels", "num_head_channels", "channel_mult", "attention_resolutions")}
    flags = dict(loader_flags("256x256_diffusion_uncond"), timestep_respacing="", **structure)
    loaded = load_official(FIXTURES / "adm_uncond" / "model.pt", flags, preset="256x256_diffusion_uncond")
    g = loaded.guidance
    assert (g.scale, g.site, g.blur_sigma, g.guide_start, g.official_num_heads) == (0.5, "output.2", 9.0, 250, 4)
    step = guided_step(loaded.model, loaded.diffusion, ref["step1_x"], 249, guidance=g, noise=ref["step1_noise"])
    assert step.sag is not None and max_err(step.x_prev, ref["step1_sample"]) <= 1e-5


def test_flag_tables_cover_the_readme_names():
    """Every README flag is a name of the official argparse tables (nothing is silently dropped)."""
    from checkpoints_convert.flags import valid_flag_names
    for name in PRESETS:
        assert set(command_flags(COMMANDS[name])) <= valid_flag_names(None), name
    assert set(IMPROVED_MODEL_DEFAULTS) - set(GUIDED_MODEL_DEFAULTS) == {"sigma_small"}


def test_a_pag_window_that_holds_no_step_is_accepted():
    """PAG repository flags: {"attention_mask_identity": [0, 10]} -- officially 0 >= t >= 10 never holds."""
    flags = dict(official_flags("pag_adm"), guidance_strategies='{"attention_mask_identity": [0, 10]}')
    with pytest.warns(NeverGuidedWarning, match="PAG window 0 >= t >= 10 holds none of the 10"):
        loaded = load_official(FIXTURES / "pag_adm" / "model.pt", flags)
    assert loaded.guidance is None
