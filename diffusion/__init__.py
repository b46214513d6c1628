"""Gaussian diffusion for the ADM / IDDPM U-Nets: schedules, respacing, posterior, DDPM and DDIM
steps, classifier-guidance corrections and the training objective, matching openai/guided-diffusion
@ 22e0df8 (and improved-diffusion @ 1bc7bbb) to float32 rounding.  Imports neither ``unet`` nor ``sag``.

``diffusion.sd_schedulers`` (imported on its own): Stable Diffusion's DDIM / PNDM (PLMS) / Euler discrete
schedulers from a diffusers ``scheduler_config.json``, equal to diffusers 0.42.
"""
from .config import DiffusionConfig
from .gaussian import (GaussianDiffusion, MeanVariance, ModelMeanType, ModelVarType, ScoreCondition,
                       ddim_step, ddpm_step)
from .losses import approx_standard_normal_cdf, discretized_gaussian_log_likelihood, mean_flat, normal_kl
from .schedules import (BETA_SCHEDULES, DiffusionError, betas_for_alpha_bar, get_named_beta_schedule,
                        space_timesteps)

__all__ = [
    "DiffusionConfig", "GaussianDiffusion", "MeanVariance", "ModelMeanType", "ModelVarType",
    "ScoreCondition", "ddpm_step", "ddim_step", "normal_kl", "approx_standard_normal_cdf",
    "discretized_gaussian_log_likelihood", "mean_flat", "BETA_SCHEDULES", "DiffusionError",
    "betas_for_alpha_bar", "get_named_beta_schedule", "space_timesteps",
]
