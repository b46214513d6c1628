"""Loading checkpoint files without ever running code from them.

Plain pickle executes arbitrary callables through ``__reduce__``; ``torch.load(weights_only=True)``
refuses anything but tensors, storages and primitive containers (ECOSYSTEM.md section 3.1). Every
load here uses it, for both the zip format (file starts ``PK\\x03\\x04``) and the legacy pickle
format (``\\x80\\x02``), and never falls back to ``weights_only=False``: a file that needs it is
refused with a one-line error saying how to re-save it.

The official OpenAI files are bare ``OrderedDict``s of fp32 tensors (guided-diffusion
``train_util.save``); the common look-alikes are handled with clear errors or unwrapped:

* missing file, a directory, an empty or non-PyTorch file (e.g. an HTML error page saved by a
  failed download) -> CheckpointError;
* optimizer state (``opt*.pt``: keys ``state`` and ``param_groups``, improved-diffusion issue #37)
  -> CheckpointError;
* a wrapper dict holding the weights under ``"ema"``, ``"state_dict"``, ``"model_state_dict"`` or
  ``"model"`` -> unwrapped, first match in that order (EMA weights first: they are the ones to sample
  from, improved-diffusion README);
* a DDP save whose every key starts with ``"module."`` -> prefix stripped.
"""
from __future__ import annotations

import hashlib
import os
import pickle
from pathlib import Path
from typing import Any, Dict, Mapping, Optional, Tuple, Union

import torch

from .errors import CheckpointError, one_line

__all__ = ["load_state_dict", "load_payload", "unwrap_state_dict", "sha256_file", "sniff_format",
           "WRAPPER_KEYS"]

PathLike = Union[str, os.PathLike]

WRAPPER_KEYS = ("ema", "state_dict", "model_state_dict", "model")   # unwrap order, first match wins
_ZIP_MAGIC = b"PK\x03\x04"


def sniff_format(path: PathLike) -> str:
    """"zip" or "legacy" from the first bytes of an existing file; CheckpointError otherwise."""
    path = Path(path)
    with open(path, "rb") as handle:
        head = handle.read(8)
    if head.startswith(_ZIP_MAGIC):
        return "zip"
    if len(head) >= 2 and head[0] == 0x80 and 2 <= head[1] <= 5:
        return "legacy"
    if not head:
        raise CheckpointError(f"{path} is empty (0 bytes): the download or save was interrupted; fetch the file again")
    looks_text = all(32 <= b < 127 or b in (9, 10, 13) for b in head)
    what = f"it starts with text {head.decode('ascii')!r}" if looks_text else f"it starts with bytes {head!r}"
    raise CheckpointError(f"{path} is not a PyTorch checkpoint ({what}); expected a file written by torch.save (zip 'PK' or pickle 0x80 header), e.g. re-download it if this is an error page")


def _check_path(path: PathLike) -> Path:
    path = Path(path)
    if not path.exists():
        raise CheckpointError(f"no such checkpoint file: {path}; check the path (download URLs are in checkpoints_convert.presets)")
    if path.is_dir():
        raise CheckpointError(f"{path} is a directory, not a checkpoint file: pass the .pt file inside it")
    return path


def load_payload(path: PathLike) -> Any:
    """``torch.load(path, map_location="cpu", weights_only=True)`` with one-line errors; any object.

    For files that are not bare state dicts (our own format, wrapper dicts). Refuses pickled code.
    """
    path = _check_path(path)
    sniff_format(path)
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as exc:
        if "weights only" not in str(exc).lower():        # e.g. "pickle data was truncated"
            raise CheckpointError(f"could not read {path} ({one_line(exc, 200)}): the file may be truncated or corrupt; fetch it again") from None
        raise CheckpointError(
            f"refused: {path} contains pickled code (not a plain state dict), which weights_only=True will not run "
            f"({one_line(exc, 160)}); if you trust it, re-save it as a state dict: "
            f"torch.save(torch.load(f, weights_only=False).state_dict(), 'weights.pt')") from None
    except (RuntimeError, EOFError, OSError, ValueError) as exc:
        raise CheckpointError(f"could not read {path} ({type(exc).__name__}: {one_line(exc, 200)}): the file may be truncated or corrupt; fetch it again") from None


def unwrap_state_dict(obj: Any, source: str = "checkpoint") -> Tuple[Dict[str, torch.Tensor], Optional[str]]:
    """The tensor dict inside ``obj`` and the wrapper key it came from (None for a bare dict).

    Applies the rules of the module docstring: optimizer state is refused, a wrapper is opened under
    the first of :data:`WRAPPER_KEYS` that holds a tensor dict, a ``module.`` prefix shared by every
    key is stripped, and any non-tensor value left is an error.
    """
    if not isinstance(obj, Mapping):
        raise CheckpointError(f"{source} holds a {type(obj).__name__}, not a state dict (a dict of parameter name -> tensor)")
    if "state" in obj and "param_groups" in obj:
        raise CheckpointError(f"{source} looks like optimizer state (opt*.pt: keys state, param_groups), not model weights: use the ema_*.pt or model*.pt file")
    wrapper = None
    if not all(isinstance(v, torch.Tensor) for v in obj.values()):
        for key in WRAPPER_KEYS:
            inner = obj.get(key)
            if isinstance(inner, Mapping) and inner and all(isinstance(v, torch.Tensor) for v in inner.values()):
                obj, wrapper = inner, key
                break
    if not obj:
        raise CheckpointError(f"{source} holds an empty dict: no weights to load")
    state = {}
    for key, value in obj.items():
        if not isinstance(key, str) or not isinstance(value, torch.Tensor):
            keys = ", ".join(map(str, list(obj)[:5]))
            raise CheckpointError(
                f"{source}: entry {key!r} is a {type(value).__name__}, not a tensor; a state dict maps names to tensors "
                f"(top-level keys: {keys}{', ...' if len(obj) > 5 else ''}; weights under one of {', '.join(WRAPPER_KEYS)} are unwrapped)")
        state[key] = value
    if all(k.startswith("module.") for k in state):
        state = {k[len("module."):]: v for k, v in state.items()}
    return state, wrapper


def load_state_dict(path: PathLike) -> Dict[str, torch.Tensor]:
    """Load a model state dict safely: ``weights_only=True``, CPU, one-line errors, no fallback.

    Returns ``{name: tensor}`` (wrappers opened, ``module.`` prefix stripped; see the module
    docstring). Raises CheckpointError for a missing file, a directory, a non-PyTorch file, pickled
    code, optimizer state, or non-tensor values.
    """
    obj = load_payload(path)
    state, _ = unwrap_state_dict(obj, str(path))
    return state


def sha256_file(path: PathLike, chunk_size: int = 1 << 20) -> str:
    """Hex SHA-256 of a file, read in chunks (checkpoints are GBs)."""
    path = _check_path(path)
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for block in iter(lambda: handle.read(chunk_size), b""):
            digest.update(block)
    return digest.hexdigest()
