"""CLIP BPE tokenizer and CLIP text encoder against diffusers/transformers (tests/fixtures/diffusers/text),
and the single-file text-encoder key maps (SD 1.x CLIP, SD 2.x OpenCLIP)."""
import json
import shutil
from functools import lru_cache
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from checkpoints_convert.errors import CheckpointError
from checkpoints_convert.sd_keys_vae_text import text_encoder_config_from_ldm, text_encoder_state_from_ldm
from unet.clip_text import CLIPTextConfig, CLIPTextModel
from unet.clip_tokenizer import CLIPTokenizer, byte_to_unicode, normalize, pre_tokenize
from unet.config import ConfigError

DIFFUSERS = Path(__file__).parent / "fixtures" / "diffusers"
FOLDER = DIFFUSERS / "sd15_tiny"
SPECIALS = ("<|startoftext|>", "<|endoftext|>")


@lru_cache(maxsize=None)
def text_case():
    return (json.loads((DIFFUSERS / "text" / "config.json").read_text()),
            torch.load(DIFFUSERS / "text" / "reference.pt", weights_only=True))


@lru_cache(maxsize=None)
def folder_text_state():
    return load_file(FOLDER / "text_encoder" / "model.safetensors")


@lru_cache(maxsize=None)
def tokenizer():
    return CLIPTokenizer.from_folder(FOLDER / "tokenizer")


@lru_cache(maxsize=None)
def text_encoder():
    config = CLIPTextConfig.from_transformers(json.loads((FOLDER / "text_encoder" / "config.json").read_text()))
    model = CLIPTextModel(config).eval()
    model.load_state_dict(folder_text_state(), strict=True)
    return model


def max_err(a, b):
    return (a.double() - b.double()).abs().max().item()


# ---------------------------------------------------------------- tokenizer

def test_token_ids_equal_clip_tokenizer_for_every_prompt():
    config, ref = text_case()
    prompts = config["case"]["prompts"]
    ids = tokenizer()(prompts)
    assert ids.dtype == torch.long and ids.shape == (5, 77)
    assert torch.equal(ids, ref["input_ids"])
    # unpadded lengths, including the 130-token prompt before truncation to 77 (76 tokens + eos)
    lengths = [len(tokenizer().encode(p, truncation=False)) for p in prompts]
    assert lengths == ref["unpadded_lengths"].tolist()
    assert lengths[2] == 2 and lengths[4] > 77 and ids[4, -1].item() == tokenizer().eos_token_id


def test_tokens_as_recorded():
    """The recorded token strings, read back through vocab.json (ids are not in real CLIP's order)."""
    config, _ = text_case()
    inverse = {i: s for s, i in tokenizer().vocab.items()}
    for prompt, tokens in zip(config["case"]["prompts"], config["recorded"]["tokens"]):
        assert [inverse[i] for i in tokenizer().encode(prompt)] == tokens


def test_normalisation_and_pre_tokenisation():
    assert normalize(" A\t\tPhoto\n of  ÄÖ ") == " a photo of äö "
    assert normalize("Cafe\u0301") == "café"                          # NFC composes e + combining acute
    assert pre_tokenize(normalize("Café 42 naïve's ÄÖ!! x<|endoftext|>"), SPECIALS) == \
        ["café", "4", "2", "naïve", "'s", "äö", "!!", "x", "<|endoftext|>"]
    assert pre_tokenize("東京\u3000tower's", SPECIALS) == ["東京", "tower", "'s"]   # CJK letters; ideographic space
    assert pre_tokenize("a\x1cb", SPECIALS) == ["a", "\x1c", "b"]    # U+001C is no White_Space (Python's isspace says yes)
    assert pre_tokenize("!'s ½", SPECIALS) == ["!'", "s", "½"]        # a symbol run swallows the apostrophe; ½ is \p{N}


def test_byte_table_is_a_bijection_onto_printable_characters():
    table = byte_to_unicode()
    assert len(set(table.values())) == 256
    assert all(table[b] == chr(b) for b in b"az!~")
    assert all(ch.isprintable() and not ch.isspace() for ch in table.values())


def test_sd2_style_pad_token_and_truncation(tmp_path):
    folder = tmp_path / "tokenizer"
    shutil.copytree(FOLDER / "tokenizer", folder)
    special = json.loads((folder / "special_tokens_map.json").read_text())
    special["pad_token"] = "!"                                       # SD 2.x repos pad with "!"
    (folder / "special_tokens_map.json").write_text(json.dumps(special))
    tok = CLIPTokenizer.from_folder(folder)
    ids = tok(["a photo", "word " * 200], max_length=10)
    bang = tok.vocab["!"]
    assert ids.shape == (2, 10)
    assert ids[0, 0].item() == tok.bos_token_id and ids[0, 3].item() == tok.eos_token_id
    assert (ids[0, 4:] == bang).all()
    assert ids[1, -1].item() == tok.eos_token_id and (ids[1] != bang).all()


def test_missing_tokenizer_file_is_one_line(tmp_path):
    with pytest.raises(FileNotFoundError, match="merges.txt"):
        CLIPTokenizer.from_folder(tmp_path)


# ---------------------------------------------------------------- text encoder

def test_hidden_states_equal_encode_prompt():
    config, ref = text_case()
    with torch.no_grad():
        states = text_encoder()(ref["input_ids"])
    assert states.shape == (5, 77, 32)
    assert max_err(states, ref["hidden_states"]) <= 1e-5


def test_cfg_embeddings_pair():
    """[negative; positive] as SD's CFG batch; negative prompt None -> ""."""
    config, ref = text_case()
    prompt, negative = config["case"]["cfg_prompt"], config["case"]["cfg_negative_prompt"]
    with torch.no_grad():
        pair = text_encoder()(tokenizer()([negative, prompt]))
        pair_empty = text_encoder()(tokenizer()(["", prompt]))
    assert max_err(pair, ref["cfg_prompt_embeds"]) <= 1e-5
    assert max_err(pair_empty, ref["cfg_prompt_embeds_no_negative"]) <= 1e-5


def test_clip_skip_is_the_shorter_encoder_as_sd2_folders_ship_it():
    """hidden_layer=-2 (clip skip 1) = final_layer_norm(output of layer L-1) = the same weights with
    the last layer dropped, which is how SD 2.x folders encode OpenCLIP's penultimate layer."""
    _, ref = text_case()
    full = text_encoder()
    short = CLIPTextModel(CLIPTextConfig.from_transformers(
        dict(json.loads((FOLDER / "text_encoder" / "config.json").read_text()), num_hidden_layers=2))).eval()
    short.load_state_dict({k: v for k, v in folder_text_state().items() if ".layers.2." not in k}, strict=True)
    ids = ref["input_ids"][:2]
    with torch.no_grad():
        assert torch.equal(full(ids, hidden_layer=-2), short(ids))
        assert torch.equal(full(ids, hidden_layer=3), full(ids))
        embeddings = full.text_model.embeddings(ids)
        assert torch.equal(full(ids, hidden_layer=0), full.text_model.final_layer_norm(embeddings))
    with pytest.raises(ValueError, match="out of range"):
        full(ids, hidden_layer=-5)


def test_attention_mask_combines_with_the_causal_mask():
    _, ref = text_case()
    ids = ref["input_ids"][:2]
    with torch.no_grad():
        plain = text_encoder()(ids)
        ones = text_encoder()(ids, attention_mask=torch.ones_like(ids))
        padded = text_encoder()(ids, attention_mask=(torch.arange(77) < 14).long().expand(2, 77))
    assert max_err(ones, plain) <= 1e-6
    assert max_err(padded[:, :14], plain[:, :14]) <= 1e-6     # causal: real tokens never see the padding
    assert max_err(padded[:, 14:], plain[:, 14:]) > 1e-3        # padding positions no longer see each other


def test_legacy_position_ids_buffer_loads_strict():
    model = CLIPTextModel(text_encoder().config)
    state = dict(folder_text_state(), **{"text_model.embeddings.position_ids": torch.arange(77)[None]})
    model.load_state_dict(state, strict=True)


def test_unsupported_config_is_one_line():
    config = json.loads((FOLDER / "text_encoder" / "config.json").read_text())
    with pytest.raises(ConfigError, match="hidden_act 'relu'"):
        CLIPTextConfig.from_transformers(dict(config, hidden_act="relu"))


# ---------------------------------------------------------------- single-file layouts

@lru_cache(maxsize=None)
def ldm_state():
    return load_file(DIFFUSERS / "sd15_tiny_ldm.safetensors")


def test_single_file_text_encoder_equals_folder():
    mapped = text_encoder_state_from_ldm(ldm_state())
    folder = folder_text_state()
    assert set(mapped) == set(folder)
    assert all(torch.equal(mapped[k], folder[k]) for k in folder)
    config = text_encoder_config_from_ldm(ldm_state(), num_attention_heads=4)
    expected = json.loads((FOLDER / "text_encoder" / "config.json").read_text())
    assert {k: expected[k] for k in config} == config
    with pytest.raises(CheckpointError, match="cannot infer the text encoder's heads"):
        text_encoder_config_from_ldm(ldm_state())      # 32 wide: no 64-wide CLIP heads


def _openclip_layout(state, extra_layer):
    """The folder's weights written in SD 2.x's OpenCLIP single-file layout, plus one more
    resblock (``extra_layer``) standing for the last layer SD 2.x does not use."""
    p, out = "cond_stage_model.model.", {}
    out[p + "token_embedding.weight"] = state["text_model.embeddings.token_embedding.weight"]
    out[p + "positional_embedding"] = state["text_model.embeddings.position_embedding.weight"]
    out[p + "ln_final.weight"] = state["text_model.final_layer_norm.weight"]
    out[p + "ln_final.bias"] = state["text_model.final_layer_norm.bias"]
    out[p + "text_projection"] = torch.eye(32)
    out[p + "logit_scale"] = torch.tensor(4.6)
    names = {"ln_1": "layer_norm1", "ln_2": "layer_norm2", "attn.out_proj": "self_attn.out_proj",
             "mlp.c_fc": "mlp.fc1", "mlp.c_proj": "mlp.fc2"}
    for i, source in enumerate((0, 1, 2, extra_layer)):
        ours, theirs = f"text_model.encoder.layers.{source}.", f"{p}transformer.resblocks.{i}."
        for kind in ("weight", "bias"):
            for openclip, name in names.items():
                out[f"{theirs}{openclip}.{kind}"] = state[f"{ours}{name}.{kind}"]
            out[f"{theirs}attn.in_proj_{kind}"] = torch.cat(
                [state[f"{ours}self_attn.{proj}.{kind}"] for proj in ("q_proj", "k_proj", "v_proj")])
    return out


def test_openclip_single_file_layout_drops_the_last_layer():
    state = folder_text_state()
    openclip = _openclip_layout(state, extra_layer=0)
    mapped = text_encoder_state_from_ldm(openclip)
    assert set(mapped) == set(state)
    assert all(torch.equal(mapped[k], state[k]) for k in state)
    config = text_encoder_config_from_ldm(openclip, num_attention_heads=4)
    assert config["num_hidden_layers"] == 3 and config["hidden_act"] == "gelu"
    assert text_encoder_config_from_ldm(openclip, num_attention_heads=4, penultimate=False)["num_hidden_layers"] == 4
    assert "text_model.encoder.layers.3.self_attn.q_proj.weight" in text_encoder_state_from_ldm(openclip, penultimate=False)
    with pytest.raises(CheckpointError, match="no CLIPTextModel counterpart"):
        text_encoder_state_from_ldm(dict(openclip, **{"cond_stage_model.model.transformer.resblocks.0.ls_1": torch.ones(32)}))
