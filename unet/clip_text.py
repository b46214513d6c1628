"""The CLIP text encoder that conditions Stable Diffusion (transformers' ``CLIPTextModel``).

Token ids -> token + learned position embeddings -> pre-LayerNorm transformer layers with a causal
mask -> ``final_layer_norm``. Parameters are named exactly as in a diffusers folder's
``text_encoder/model.safetensors`` (``text_model.embeddings.token_embedding.weight``,
``text_model.encoder.layers.0.self_attn.q_proj.weight``, ..., ``text_model.final_layer_norm.*``), so
it loads with ``strict=True``; ``checkpoints_convert.sd_keys_vae_text`` maps the original
single-file layouts (SD 1.x ``cond_stage_model.transformer.*``, SD 2.x OpenCLIP
``cond_stage_model.model.*``).

Which hidden states SD's U-Net gets (``hidden_layer``):

* SD 1.x (OpenAI CLIP ViT-L/14, 12 layers, ``quick_gelu``): the last layer, after
  ``final_layer_norm`` (transformers' ``last_hidden_state``): ``hidden_layer=-1``, the default.
* SD 2.x was trained on the **penultimate** layer of OpenCLIP ViT-H/14's 24-layer text tower,
  followed by its final LayerNorm (LDM ``FrozenOpenCLIPEmbedder(layer="penultimate")``). The
  diffusers SD 2.x folders bake this in: their ``text_encoder/config.json`` says
  ``num_hidden_layers: 23`` (the 24th layer is not shipped), so the folder's *last* layer is
  OpenCLIP's penultimate and ``hidden_layer=-1`` is again right. Nothing else in the config marks
  it; the converter drops the last OpenCLIP layer in the same way for single files.
* "clip skip" (diffusers ``encode_prompt(clip_skip=k)``): the output of the k-th layer from the
  end, then ``final_layer_norm``: ``hidden_layer=-(k + 1)``. Generally ``hidden_layer`` indexes
  transformers' ``hidden_states`` tuple (0 = embeddings, i = output of layer i, -1 = last layer),
  and ``final_layer_norm`` is always applied, so ``hidden_layer=-1`` is ``last_hidden_state``.
"""
from __future__ import annotations

from dataclasses import dataclass, fields
from typing import Optional

import torch
import torch.nn as nn
import torch.nn.functional as F

from .config import ConfigError

__all__ = ["CLIPTextConfig", "CLIPTextModel"]

_ACTIVATIONS = {
    "quick_gelu": lambda x: x * torch.sigmoid(1.702 * x),   # OpenAI CLIP (SD 1.x)
    "gelu": F.gelu,                                          # OpenCLIP (SD 2.x): exact erf GELU
}


@dataclass(frozen=True)
class CLIPTextConfig:
    """Structural fields of a transformers ``CLIPTextConfig`` (defaults: SD 1.x's CLIP ViT-L/14)."""
    vocab_size: int = 49408
    hidden_size: int = 768
    intermediate_size: int = 3072
    num_hidden_layers: int = 12
    num_attention_heads: int = 12
    max_position_embeddings: int = 77
    hidden_act: str = "quick_gelu"
    layer_norm_eps: float = 1e-5

    def __post_init__(self):
        if self.hidden_act not in _ACTIVATIONS:
            raise ConfigError(f"CLIP text hidden_act {self.hidden_act!r} is not supported; supported: {sorted(_ACTIVATIONS)}")
        if self.hidden_size % self.num_attention_heads:
            raise ConfigError(f"CLIP text hidden_size {self.hidden_size} is not divisible by num_attention_heads {self.num_attention_heads}")
        if self.num_hidden_layers < 1:
            raise ConfigError(f"CLIP text num_hidden_layers must be >= 1, got {self.num_hidden_layers}")

    @classmethod
    def from_transformers(cls, config: dict) -> "CLIPTextConfig":
        """From a folder's ``text_encoder/config.json`` (a ``CLIPTextModel`` config, or a full
        ``CLIPModel`` config whose ``text_config`` is used). Unknown keys are ignored."""
        if "text_config" in config:
            config = config["text_config"]
        architectures = config.get("architectures") or ["CLIPTextModel"]
        if architectures[0] not in ("CLIPTextModel", "CLIPModel", "CLIPTextModelWithProjection"):
            raise ConfigError(f"text_encoder/config.json names {architectures[0]!r}; only CLIPTextModel (SD 1.x / 2.x) is supported")
        known = {f.name for f in fields(cls)}
        return cls(**{k: v for k, v in config.items() if k in known})


class CLIPAttention(nn.Module):
    """Multi-head self-attention: out_proj(softmax(q k^T / sqrt(d) + mask) v), d = D / heads.
    [B x L x D], additive mask [B x 1 x L x L] or None (= causal) -> [B x L x D]."""

    def __init__(self, config: CLIPTextConfig):
        super().__init__()
        width = config.hidden_size
        self.num_heads = config.num_attention_heads
        self.q_proj = nn.Linear(width, width)
        self.k_proj = nn.Linear(width, width)
        self.v_proj = nn.Linear(width, width)
        self.out_proj = nn.Linear(width, width)

    def forward(self, x: torch.Tensor, mask: Optional[torch.Tensor]) -> torch.Tensor:
        batch, length, width = x.shape
        q, k, v = (proj(x).reshape(batch, length, self.num_heads, -1).transpose(1, 2)
                   for proj in (self.q_proj, self.k_proj, self.v_proj))            # [B x heads x L x d]
        if mask is None:
            a = F.scaled_dot_product_attention(q, k, v, is_causal=True)
        else:
            a = F.scaled_dot_product_attention(q, k, v, attn_mask=mask)
        return self.out_proj(a.transpose(1, 2).reshape(batch, length, width))


class CLIPMLP(nn.Module):
    """fc2(act(fc1(x))), D -> intermediate_size -> D."""

    def __init__(self, config: CLIPTextConfig):
        super().__init__()
        self.activation = _ACTIVATIONS[config.hidden_act]
        self.fc1 = nn.Linear(config.hidden_size, config.intermediate_size)
        self.fc2 = nn.Linear(config.intermediate_size, config.hidden_size)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc2(self.activation(self.fc1(x)))


class CLIPEncoderLayer(nn.Module):
    """Pre-LN block: x + self_attn(layer_norm1(x)), then + mlp(layer_norm2(x))."""

    def __init__(self, config: CLIPTextConfig):
        super().__init__()
        self.self_attn = CLIPAttention(config)
        self.layer_norm1 = nn.LayerNorm(config.hidden_size, eps=config.layer_norm_eps)
        self.mlp = CLIPMLP(config)
        self.layer_norm2 = nn.LayerNorm(config.hidden_size, eps=config.layer_norm_eps)

    def forward(self, x: torch.Tensor, mask: Optional[torch.Tensor]) -> torch.Tensor:
        x = x + self.self_attn(self.layer_norm1(x), mask)
        return x + self.mlp(self.layer_norm2(x))


class CLIPTextEmbeddings(nn.Module):
    """token_embedding(ids) + position_embedding(0..L-1): [B x L] -> [B x L x D]."""

    def __init__(self, config: CLIPTextConfig):
        super().__init__()
        self.token_embedding = nn.Embedding(config.vocab_size, config.hidden_size)
        self.position_embedding = nn.Embedding(config.max_position_embeddings, config.hidden_size)

    def _load_from_state_dict(self, state_dict, prefix, *args, **kwargs):
        # transformers < 4.31 saved the position ids 0..L-1 as a buffer (real SD 1.x/2.x folders and
        # single files carry ``text_model.embeddings.position_ids``): accepted and dropped here, so
        # those files load with strict=True too. Positions are always 0..L-1 below.
        state_dict.pop(prefix + "position_ids", None)
        super()._load_from_state_dict(state_dict, prefix, *args, **kwargs)

    def forward(self, input_ids: torch.Tensor) -> torch.Tensor:
        positions = torch.arange(input_ids.shape[1], device=input_ids.device)
        return self.token_embedding(input_ids) + self.position_embedding(positions)[None]


class CLIPEncoder(nn.Module):
    def __init__(self, config: CLIPTextConfig):
        super().__init__()
        self.layers = nn.ModuleList([CLIPEncoderLayer(config) for _ in range(config.num_hidden_layers)])


class CLIPTextTransformer(nn.Module):
    """Holds the ``text_model.*`` parameters (transformers' module tree)."""

    def __init__(self, config: CLIPTextConfig):
        super().__init__()
        self.embeddings = CLIPTextEmbeddings(config)
        self.encoder = CLIPEncoder(config)
        self.final_layer_norm = nn.LayerNorm(config.hidden_size, eps=config.layer_norm_eps)


class CLIPTextModel(nn.Module):
    """CLIP text tower as SD uses it: ids [B x L] -> hidden states [B x L x D] for cross-attention."""

    def __init__(self, config: CLIPTextConfig):
        super().__init__()
        self.config = config
        self.text_model = CLIPTextTransformer(config)

    def forward(self, input_ids: torch.Tensor, attention_mask: Optional[torch.Tensor] = None,
                hidden_layer: int = -1) -> torch.Tensor:
        """final_layer_norm(hidden_states[hidden_layer]) with hidden_states[0] = embeddings and
        hidden_states[i] = output of layer i (see the module docstring: -1 = SD 1.x / 2.x folders,
        -(k + 1) = clip skip k). Layers after the requested one are not run.

        input_ids: [B x L] int, L <= max_position_embeddings; attention_mask: optional [B x L] of
        1 (attend) / 0 (ignore) combined with the causal mask, as transformers does (SD 1.x / 2.x
        pipelines pass none: padding tokens are encoded too). Returns [B x L x hidden_size].
        """
        layers = self.text_model.encoder.layers
        if input_ids.dim() != 2 or input_ids.shape[1] > self.config.max_position_embeddings:
            raise ValueError(f"CLIPTextModel expects input_ids [B, L] with L <= {self.config.max_position_embeddings}, "
                             f"got shape {tuple(input_ids.shape)}")
        if not -(len(layers) + 1) <= hidden_layer <= len(layers):
            raise ValueError(f"hidden_layer {hidden_layer} is out of range for {len(layers)} layers "
                             f"(use -1 for the last layer, -2 for clip skip 1, ...)")
        x = self.text_model.embeddings(input_ids)
        mask = None if attention_mask is None else self._additive_mask(attention_mask, x.dtype)
        for layer in layers[:hidden_layer % (len(layers) + 1)]:
            x = layer(x, mask)
        return self.text_model.final_layer_norm(x)

    @staticmethod
    def _additive_mask(attention_mask: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
        """Causal and key-padding masks as one additive [B x 1 x L x L] mask (dtype's minimum where
        masked, so a fully masked row stays finite, as in transformers)."""
        length = attention_mask.shape[1]
        causal = torch.ones(length, length, dtype=torch.bool, device=attention_mask.device).tril()
        allowed = causal[None, None] & attention_mask.bool()[:, None, None, :]
        zero = torch.zeros((), dtype=dtype, device=attention_mask.device)
        return torch.where(allowed, zero, torch.finfo(dtype).min)
