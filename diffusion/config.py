"""Configuration of the Gaussian diffusion process, field for field the official flags
(guided-diffusion / improved-diffusion ``create_gaussian_diffusion``)."""
from __future__ import annotations

from dataclasses import dataclass

from .schedules import BETA_SCHEDULES, DiffusionError, space_timesteps


@dataclass(frozen=True)
class DiffusionConfig:
    steps: int = 1000                   # T of the trained process (official --diffusion_steps)
    noise_schedule: str = "linear"      # "linear" | "cosine"
    timestep_respacing: str = ""        # "" = all steps; "250", "10,15,20", "ddim25"
    learn_sigma: bool = False           # model predicts variance values (learned range) in channels C:2C
    sigma_small: bool = False           # improved-diffusion: fixed small variance instead of fixed large
    use_kl: bool = False                # training only: rescaled KL loss
    predict_xstart: bool = False        # model predicts x0 instead of eps
    rescale_timesteps: bool = False     # model sees t * 1000 / steps (float); improved-diffusion default True
    rescale_learned_sigmas: bool = False  # training only: rescaled MSE loss

    def validate(self) -> "DiffusionConfig":
        """Raise a one-line DiffusionError if the flags cannot build a process; return self."""
        if not isinstance(self.steps, int) or isinstance(self.steps, bool) or self.steps <= 0:
            raise DiffusionError(f"diffusion steps must be a positive integer, got {self.steps!r}")
        if self.noise_schedule not in BETA_SCHEDULES:
            raise DiffusionError(f"unknown noise schedule {self.noise_schedule!r}; valid names: "
                                 + ", ".join(repr(n) for n in BETA_SCHEDULES))
        if not isinstance(self.timestep_respacing, str):
            raise DiffusionError("timestep_respacing must be a string such as '', '250', 'ddim25' "
                                 f"or '10,15,20', got {self.timestep_respacing!r}")
        space_timesteps(self.steps, self.timestep_respacing)  # raises on strings that do not parse
        return self
