"""The official OpenAI checkpoints: presets, official flags -> configs, official key names <-> ours,
safe loading (``weights_only=True``), one-line errors, our own checkpoint format.

Compatibility API (a public contract)::

    loaded = load_official(checkpoint_path, flags)   # .model, .diffusion, .guidance
    classifier = load_official_classifier(path, flags)

Where the flags not given take their values from: :mod:`checkpoints_convert.resolve`
(``resolve_checkpoint`` applies the rule to a state dict, also one of ``device="meta"`` tensors).
"""
from .errors import CheckpointError, FlagError
from .keymap import KeyMismatch, key_map, official_to_ours, ours_to_official
from .load import (LoadedClassifier, LoadedModel, load_checkpoint, load_official, load_official_classifier,
                   save_checkpoint)
from .resolve import Resolution, resolve_checkpoint

__all__ = [
    "CheckpointError", "FlagError", "KeyMismatch", "LoadedClassifier", "LoadedModel", "Resolution", "key_map",
    "load_checkpoint", "load_official", "load_official_classifier", "official_to_ours", "ours_to_official",
    "resolve_checkpoint", "save_checkpoint",
]
