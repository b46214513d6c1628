"""Errors of the checkpoint layer: one line each, saying what is wrong and how to fix it.

Users of the official scripts meet walls of hundreds of "Missing key(s) / size mismatch" lines
when a flag is wrong (guided-diffusion issue #7, RePaint #22/#40; ECOSYSTEM.md section 5). Every
error raised by ``checkpoints_convert`` is instead a single sentence naming the offending file or
flag, the value the checkpoint implies, and the fix.
"""
from __future__ import annotations

__all__ = ["CheckpointError", "FlagError", "one_line"]


def one_line(text: object, limit: int = 300) -> str:
    """Collapse ``text`` onto one line (newlines become "; ") and cut it at ``limit`` characters.

    Used when a message quotes foreign text (an exception from ``torch.load``, a file's first bytes)
    so the one-line rule holds whatever that text contains.
    """
    parts = [p.strip() for p in str(text).splitlines() if p.strip()]
    flat = "; ".join(parts)
    return flat if len(flat) <= limit else flat[: limit - 3] + "..."


class CheckpointError(ValueError):
    """A checkpoint file or state dict that cannot be used as asked. The message is one line."""

    def __init__(self, message: str):
        super().__init__(one_line(message, limit=1000))


class FlagError(CheckpointError):
    """Official script flags (``--num_channels``, ``--guide_scale`` ...) that are unknown,
    malformed, contradictory, or do not fit the checkpoint. The message is one line."""
