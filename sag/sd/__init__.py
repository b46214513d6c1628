"""Stable Diffusion 1.x / 2.x with Self-Attention Guidance, PAG, SEG and CFG.

    from sag.sd import load_pipeline
    pipe = load_pipeline("path/to/sd-folder")                 # diffusers folder, or a single file + config_folder=
    images = pipe("a prompt", sag_scale=0.75, num_inference_steps=50)   # numpy [B x H x W x 3] in [0, 1]
"""
from __future__ import annotations

import os
from typing import Optional, Union

import torch

from .guidance import ScaledInputUNet, SchedulerTimestep, build_guidance, guided_output
from .pipeline import SDStepInfo, StableDiffusionPipeline, check_precision

__all__ = ["load_pipeline", "StableDiffusionPipeline", "SDStepInfo", "build_guidance", "guided_output",
           "ScaledInputUNet", "SchedulerTimestep"]


def load_pipeline(path_or_folder: Union[str, os.PathLike], device=None, dtype: torch.dtype = torch.float32,
                  config_folder: Optional[Union[str, os.PathLike]] = None) -> StableDiffusionPipeline:
    """Load an SD model into a :class:`StableDiffusionPipeline`.

    path_or_folder: a diffusers SD folder, or an original single-file checkpoint (``.safetensors`` /
    ``.ckpt``) together with ``config_folder`` (a diffusers folder giving the tokenizer, and the configs
    where it has them; see ``checkpoints_convert.sd_load``). device: default CPU. dtype: the U-Net's
    compute precision (float32, bfloat16, or float16 on CUDA; autocast, the VAE stays float32).
    Bad input raises one ``CheckpointError`` / ``GuidanceError`` line.
    """
    from checkpoints_convert.sd_load import load_components
    check_precision(device, dtype)                       # before minutes of loading
    parts = load_components(path_or_folder, config_folder)
    return StableDiffusionPipeline(parts.unet, parts.vae, parts.text_encoder, parts.tokenizer, parts.scheduler,
                                   device=device, dtype=dtype, source=str(path_or_folder))
