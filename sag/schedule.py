"""Several guidance methods on disjoint step windows: at most one guides any step.

The PAG repository schedules its modes with ``--guidance_strategies``, e.g.
``'{"sag": [24, 10], "attention_mask_identity": [9, 0]}'``: each mode runs where
``start >= t >= end`` on the respaced index, a step inside no window is a plain step with one
U-Net pass, and two modes active at one step are an error (its ``p_sample`` raises). ``Scheduled``
is that rule over this package's methods, each carrying its own window (``SAGConfig.guide_start`` /
``guide_end``, ``PAGConfig.step_range``); the sampler asks ``for_step(t)`` which one runs.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any, List, Tuple

from .guidance import GuidanceError


@dataclass(frozen=True)
class Scheduled:
    """methods: guidance methods (``SAGConfig``, ``PAGConfig``, ...), each gated by its own window."""
    methods: Tuple[Any, ...]

    def __post_init__(self):
        methods = tuple(self.methods)
        if not methods or not all(hasattr(m, "active_at") and hasattr(m, "predict") for m in methods):
            raise GuidanceError(f"Scheduled needs one or more guidance methods, got {self.methods!r}")
        object.__setattr__(self, "methods", methods)

    def check_steps(self, num_steps: int) -> None:
        """Raise at the first of steps 0..num_steps-1 that two methods would both guide (the official error)."""
        for t in range(num_steps):
            self.for_step(t)

    def active_at(self, t_index: int) -> bool:
        return any(m.active_at(t_index) for m in self.methods)

    def for_step(self, t_index: int):
        """The one method that guides step ``t_index`` (None inside no window)."""
        active = [m for m in self.methods if m.active_at(t_index)]
        if len(active) > 1:
            raise GuidanceError(f"step t={t_index} is in the windows of {', '.join(type(m).__name__ for m in active)}: "
                                "at most one guidance method may run at a step")
        return active[0] if active else None

    def attention_sites(self) -> List[str]:
        sites: List[str] = []
        for method in self.methods:
            sites += [s for s in method.attention_sites() if s not in sites]
        return sites

    def predict(self, model, diffusion, x_t, t, y=None, clip_denoised=True):
        """Needs the step index: the sampler calls ``for_step(t_index).predict`` instead."""
        raise GuidanceError("Scheduled.predict needs the step: use for_step(t_index).predict(...)")
