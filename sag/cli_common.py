"""What the sampling commands share: ``sag-sample`` (ADM / IDDPM, ``sag/sample.py``) and
``python -m sag.sd`` (Stable Diffusion, ``sag/sd/cli.py``).

* One-line errors: :class:`UsageError` for a command line or output folder that cannot work,
  :class:`OneLineParser` (argparse raising it instead of printing usage), :func:`known_errors` (the
  exception types a command reports as one line; a command adds its own) and :func:`report_error`
  (``PROG: error: message`` on stderr, newlines folded).
* Settings: :func:`check_seed_range` (per-sample seeds ``seed + i`` must fit the CPU generator's
  32 bits, see ``sag.seeding``), :func:`resolve_device`.
* The JSON sidecar: :func:`jsonable`, :func:`versions`, :func:`diff_keys`, :func:`utc_iso`.
* Per-step pictures and progress: :class:`StepStrips` (a sampling callback collecting chosen
  quantities of chosen samples, written as one PNG strip per sample: rows = quantities, columns =
  steps) and :func:`step_callback` (the strips and a progress bar's step counter in one callback).

Files are written by ``sag.io`` (atomic: temporary name, then rename).
"""
from __future__ import annotations

import argparse
import datetime as _dt
import json
import platform
import sys
from pathlib import Path
from typing import Any, Callable, Dict, List, Optional, Sequence

import numpy as np
import torch

from .seeding import MAX_SEED

__all__ = ["UsageError", "OneLineParser", "known_errors", "report_error", "check_seed_range", "resolve_device",
           "jsonable", "versions", "diff_keys", "utc_iso", "StepStrips", "step_callback"]


# ------------------------------------------------------------------------------------------------
# One-line errors
# ------------------------------------------------------------------------------------------------

class UsageError(ValueError):
    """A command line or output folder that cannot work (one line)."""


class OneLineParser(argparse.ArgumentParser):
    """argparse that raises one-line UsageErrors instead of printing usage and exiting."""

    def error(self, message):  # noqa: D401 - argparse hook
        raise UsageError(message)


def known_errors(*extra: type) -> tuple:
    """The exception types a command reports as one line (everything else is a bug and keeps its
    traceback): usage, checkpoint, config, diffusion, guidance, attention-site and non-finite errors,
    plus a command's own ``extra`` types."""
    from checkpoints_convert.errors import CheckpointError
    from diffusion import DiffusionError
    from unet import AttentionSiteError, ConfigError

    from .guidance import GuidanceError
    from .sampling import NonFiniteError
    return (UsageError, CheckpointError, ConfigError, DiffusionError, GuidanceError, AttentionSiteError,
            NonFiniteError, *extra)


def report_error(prog: str, err: BaseException) -> None:
    """``{prog}: error: {message}`` as one line on stderr (newlines in the message become "; ")."""
    from checkpoints_convert.errors import one_line
    print(f"{prog}: error: {one_line(err, limit=1000)}", file=sys.stderr, flush=True)


# ------------------------------------------------------------------------------------------------
# Settings
# ------------------------------------------------------------------------------------------------

def check_seed_range(seed: int, num_samples: int) -> None:
    """Sample i uses seed ``seed + i``; every one must lie in [0, 2**32) (``sag.seeding.MAX_SEED``)."""
    if not 0 <= seed or seed + num_samples - 1 > MAX_SEED:
        raise UsageError(f"--seed {seed} with {num_samples} samples leaves [0, 2**32); the per-sample seeds "
                         "seed + i must fit in 32 bits")


def resolve_device(requested: Optional[str], ctx=None) -> torch.device:
    """``--device`` (default cuda if available, else cpu). ``ctx`` (``sag.sample.Dist``: ``world_size``,
    ``local_rank``) is the torchrun context: with several processes each rank takes cuda:LOCAL_RANK."""
    name = requested or ("cuda" if torch.cuda.is_available() else "cpu")
    try:
        device = torch.device(name)
    except (RuntimeError, ValueError):
        raise UsageError(f"--device {name!r} is not a device (use cpu, cuda or cuda:N)") from None
    if device.type == "cuda":
        if not torch.cuda.is_available():
            raise UsageError(f"--device {name} asked for CUDA but torch.cuda.is_available() is False; use --device cpu")
        if ctx is not None and ctx.world_size > 1 and device.index is None:
            device = torch.device("cuda", ctx.local_rank % torch.cuda.device_count())
        torch.cuda.set_device(device)
    elif device.type != "cpu":
        raise UsageError(f"--device {name!r} is not supported; use cpu or cuda")
    return device


# ------------------------------------------------------------------------------------------------
# Sidecar
# ------------------------------------------------------------------------------------------------

def jsonable(obj):
    """Round-trip through JSON (tuples become lists) so stored and fresh settings compare equal."""
    return json.loads(json.dumps(obj, default=str))


def versions() -> Dict[str, str]:
    """The versions a run's sidecar records: sag, torch, numpy, python."""
    try:
        from importlib.metadata import version
        sag_version = version("sag")
    except Exception:  # not installed: running from a checkout
        sag_version = "0.1.0+checkout"
    return {"sag": sag_version, "torch": torch.__version__, "numpy": np.__version__,
            "python": platform.python_version()}


def diff_keys(a: Dict[str, Any], b: Dict[str, Any]) -> List[str]:
    """The keys whose values differ between two settings dicts (sorted)."""
    return sorted(k for k in set(a) | set(b) if a.get(k) != b.get(k))


def utc_iso(seconds: float) -> str:
    """A ``time.time()`` value as an ISO 8601 UTC stamp to the second."""
    return _dt.datetime.fromtimestamp(seconds, _dt.timezone.utc).isoformat(timespec="seconds")


# ------------------------------------------------------------------------------------------------
# Per-step pictures, progress
# ------------------------------------------------------------------------------------------------

class StepStrips:
    """Sampling callback: per recorded step, the quantities named by ``ROWS`` of chosen samples,
    written as one PNG per sample (``sample_{index:06d}.png``: rows = ``ROWS``, columns = steps, the
    steps' ``t`` in the PNG's ``columns_t`` text chunk).

    A subclass names its ``ROWS`` and implements :meth:`pictures`: the callback's ``info`` -> one
    tensor per row, each [B x C x H x W] in [-1, 1] (C = 1 or 3), or None to skip the step.
    """

    ROWS: Sequence[str] = ()

    def __init__(self, positions: Dict[int, int]):
        self.positions = positions                     # batch position -> global sample index
        self.columns: Dict[int, List[List[np.ndarray]]] = {i: [[] for _ in self.ROWS] for i in positions.values()}
        self.steps: List[int] = []

    def pictures(self, info) -> Optional[Sequence[torch.Tensor]]:
        raise NotImplementedError

    def __call__(self, info) -> None:
        tensors = self.pictures(info)
        if tensors is None:
            return
        from .io import to_uint8_image
        t = float(info.t)                              # ADM: an int index; SD: the scheduler's (Euler: float) timestep
        self.steps.append(int(t) if t.is_integer() else t)
        for pos, index in self.positions.items():
            for row, tensor in zip(self.columns[index], tensors):
                row.append(to_uint8_image(tensor[pos]))

    def write(self, directory: Path) -> None:
        from .io import image_strip, write_png
        for index, rows in self.columns.items():
            if rows[0]:
                text = {"rows": ",".join(self.ROWS), "columns_t": ",".join(map(str, self.steps))}
                write_png(Path(directory) / f"sample_{index:06d}.png", image_strip(rows), text)


def step_callback(recorder: Optional[Callable], bar, num_steps: int) -> Optional[Callable]:
    """One sampling callback: ``recorder(info)`` and the step counter on the progress bar ``bar``
    (tqdm; ``info.index`` is the loop position, 0 = noisiest). None when there is nothing to do."""
    if recorder is None and bar is None:
        return None

    def callback(info):
        if recorder is not None:
            recorder(info)
        if bar is not None:
            bar.set_postfix_str(f"step {info.index + 1}/{num_steps}", refresh=False)
            bar.refresh()
    return callback
