"""SAG, PAG, SEG and CFG on Stable Diffusion through the guidance protocol of ``sag/`` (the same
``predict`` / ``active_at`` / attention sites as on ADM), with an SD scheduler in place of
``GaussianDiffusion``.

The methods themselves are the ADM ones, unchanged: :class:`sag.SAGConfig` (mask, blur, re-noise,
second pass), :class:`sag.PAGConfig` / :class:`sag.SEGConfig` (identity attention / blurred queries
at chosen sites, batched with the normal pass), :class:`sag.CFGConfig` / :class:`sag.CFGWith` (the
CFG batch and the combination rules). What is SD-specific lives here, in two small adapters built
for one denoising step:

* :class:`SchedulerTimestep` plays the diffusion process (``model_timesteps``, ``p_mean_variance``,
  ``q_sample``) with the scheduler's own x0 and re-noising (``to_x0_eps`` / ``add_noise``): VP
  latents for DDIM / PNDM, the sigma parametrisation x = x0 + sigma eps for Euler (SPEC.md Q13);
* :class:`ScaledInputUNet` calls the SD U-Net as the guidance code calls a network,
  ``model(x, t, y, attention=...)`` with y = the text embeddings [B x L x D], applying
  ``scheduler.scale_model_input`` on EVERY pass, SAG's degraded one included (diffusers' SAG
  pipeline skips it there, which is one reason it refuses Euler), under autocast when asked.

The rules, as diffusers runs them (w = ``guidance_scale``, CFG on iff w > 1; s = the method's scale,
on iff s > 0; ``pipeline_stable_diffusion_sag.py``, ``pag_utils.py``; SPEC.md section 1.2 (l)(m), 1.4, 1.5)::

    CFG           out = out_u + w (out_c - out_u)
    SAG           out = out_c + s (out_c - out_c(x_bar))                       (no CFG: map, x0 from out_c)
    SAG + CFG     out = out_u + w (out_c - out_u) + s (out_u - out_u(x_bar))   (map, x0, eps from the uncond half)
    PAG / SEG     out = out_c + s (out_c - out_c_perturbed)
    + CFG         out = out_u + w (out_c - out_u) + s (out_c - out_c_perturbed)

``out`` is the network's raw output, eps or v (``prediction_type``): diffusers applies every rule to
the raw output, and so do we. :class:`SchedulerTimestep` therefore hands the raw output to the
formulas of ``sag/`` in the ``eps`` field of ``MeanVariance`` (for epsilon models it IS eps), and
converts it to eps at the step's own x_t only where SAG re-noises. SAG's mask is the mid block's
first transformer block's self-attention map (``unet.sag_site``), blurred x0 = the 4-channel latent
x0 through a 9-tap Gaussian (sigma ``sag_blur_sigma``, diffusers: 1.0) with reflect padding.

SEG follows the SEG paper (sigma = inf: every query is the mean query; finite sigma: a real Gaussian
blur of the queries), not diffusers 0.42's hook, whose two branches are swapped (SPEC.md Q14): its
finite sigma gives the mean query (our sigma = inf) and its "infinite" default an almost uniform
9x9 blur. PAG's ``pag_adaptive_scale`` is not offered (SPEC.md Q16).
"""
from __future__ import annotations

import contextlib
import math
from typing import NamedTuple, Optional, Sequence

import torch

from diffusion import MeanVariance
from sag.cfg import CFGConfig, CFGWith
from sag.guidance import GuidanceError, SAGConfig
from sag.perturbed import PAGConfig, SEGConfig

SAG_KERNEL_SIZE = 9          # diffusers' SAG pipeline: gaussian_blur_2d(pred_x0, kernel_size=9, sigma=1.0)


class SchedulerTimestep:
    """The diffusion-process protocol of ``sag.guidance`` / ``sag.perturbed`` for one SD denoising step.

    scheduler: an SD scheduler (``to_x0_eps``, ``add_noise``); timestep: the step's scheduler timestep
    (a Python int for DDIM / PNDM, float for Euler); x_t: the step's latents [B x C x h x w], float32.

    The ``t`` tensors the guidance code passes around are this timestep broadcast to the batch; the
    network receives them unchanged (``model_timesteps``).
    """

    def __init__(self, scheduler, timestep, x_t: torch.Tensor):
        self.scheduler, self.timestep, self.x_t = scheduler, timestep, x_t

    def model_timesteps(self, t: torch.Tensor) -> torch.Tensor:
        return t

    def p_mean_variance(self, model_output: torch.Tensor, x: torch.Tensor, t: torch.Tensor,
                        clip_denoised: bool = False) -> MeanVariance:
        """x0 of the latents x [N x C x h x w] from the raw output [N x C x h x w] (``to_x0_eps``, no
        clipping); ``eps`` = the raw output itself (see the module docstring), float32; no variances
        (the SD samplers take them from the scheduler)."""
        if model_output.shape != x.shape:
            raise ValueError(f"U-Net output {tuple(model_output.shape)} does not match the latents {tuple(x.shape)}")
        output = model_output.float()
        pred_x0, _ = self.scheduler.to_x0_eps(output, self.timestep, x)
        return MeanVariance(None, None, None, pred_x0, output)

    def q_sample(self, x0: torch.Tensor, t: torch.Tensor, noise: torch.Tensor) -> torch.Tensor:
        """SAG's re-noising: ``add_noise(x0, eps, timestep)`` with eps what the raw output ``noise``
        [B x C x h x w] implies at the step's x_t (eps itself for epsilon models; VP:
        sqrt(abar) x0 + sqrt(1 - abar) eps, Euler: x0 + sigma eps)."""
        if noise.shape != self.x_t.shape:
            raise ValueError(f"SAG re-noises the step's {tuple(self.x_t.shape)} latents, got {tuple(noise.shape)}")
        _, eps = self.scheduler.to_x0_eps(noise, self.timestep, self.x_t)
        return self.scheduler.add_noise(x0, eps, self.timestep)


def autocast_context(device: torch.device, dtype: torch.dtype):
    """torch.autocast for the U-Net's forward in bfloat16 / float16, nothing for float32."""
    if dtype == torch.float32:
        return contextlib.nullcontext()
    return torch.autocast(torch.device(device).type, dtype=dtype)


class ScaledInputUNet:
    """The SD U-Net called the way ``sag.guidance.run_model`` calls a network.

        model(x, t, encoder_hidden_states, attention=None)
            = unet(scheduler.scale_model_input(x, timestep), t, encoder_hidden_states, attention=attention)

    x [N x C x h x w] (the scheduler's latents), t [N], encoder_hidden_states [N x L x D]; the forward
    runs under autocast in ``dtype`` (float32: none). Returns the U-Net's ``UNetOutput``.
    """

    def __init__(self, unet, scheduler, timestep, dtype: torch.dtype = torch.float32):
        self.unet, self.scheduler, self.timestep, self.dtype = unet, scheduler, timestep, dtype

    def __call__(self, x, t, encoder_hidden_states, attention=None):
        model_input = self.scheduler.scale_model_input(x, self.timestep)
        with autocast_context(x.device, self.dtype):
            return self.unet(model_input, t, encoder_hidden_states, attention=attention)


def build_guidance(unet, *, guidance_scale: float = 7.5, negative_embeds: Optional[torch.Tensor] = None,
                   sag_scale: float = 0.0, sag_blur_sigma: float = 1.0,
                   pag_scale: float = 0.0, pag_applied_layers: Sequence[str] = ("mid",),
                   seg_scale: float = 0.0, seg_sigma: float = math.inf,
                   seg_applied_layers: Sequence[str] = ("mid",)):
    """The guidance method of one pipeline call, or None for plain conditional sampling.

    guidance_scale w: CFG iff w > 1 (then ``negative_embeds`` [B x L x D] is the unconditional input);
    sag_scale / pag_scale / seg_scale: each method on iff its scale > 0 (diffusers), at most one of
    them; layer ids as diffusers' PAG pipelines take them (``unet.match_layers``).
    """
    for name, value in (("guidance_scale", guidance_scale), ("sag_scale", sag_scale), ("pag_scale", pag_scale),
                        ("seg_scale", seg_scale), ("sag_blur_sigma", sag_blur_sigma)):
        if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
            raise GuidanceError(f"{name} must be a finite number, got {value!r}")
    methods = []
    if sag_scale > 0:
        methods.append(SAGConfig(scale=float(sag_scale), blur_sigma=float(sag_blur_sigma), site=unet.sag_site,
                                 kernel_size=SAG_KERNEL_SIZE))
    if pag_scale > 0:
        methods.append(PAGConfig(scale=float(pag_scale), sites=_layers(unet, "pag", pag_applied_layers)))
    if seg_scale > 0:
        methods.append(SEGConfig(scale=float(seg_scale), sigma=seg_sigma,
                                 sites=_layers(unet, "seg", seg_applied_layers)))
    if len(methods) > 1:
        raise GuidanceError("use one of sag_scale, pag_scale, seg_scale at a time (each with or without CFG); "
                            f"got {', '.join(type(m).__name__[:3] for m in methods)} together")
    method = methods[0] if methods else None
    if guidance_scale <= 1:
        return method
    if negative_embeds is None:
        raise GuidanceError("CFG (guidance_scale > 1) needs the negative prompt's embeddings")
    cfg = CFGConfig(float(guidance_scale), unconditional_input=negative_embeds)
    return cfg if method is None else CFGWith(cfg, method)


def _layers(unet, name: str, layer_ids) -> tuple:
    layer_ids = (layer_ids,) if isinstance(layer_ids, str) else tuple(layer_ids)
    if not layer_ids:
        raise GuidanceError(f"{name}_applied_layers is empty: name at least one layer, e.g. ('mid',)")
    return tuple(unet.match_layers(layer_ids))


class SDGuidedOutput(NamedTuple):
    """One step's guided prediction: ``output`` [B x C x h x w] (raw: eps or v) and the method's
    intermediates (``SAGStep`` / ``PAGStep`` / ``SEGStep`` / ``CFGStep``, None when unguided)."""
    output: torch.Tensor
    details: Optional[NamedTuple]


def guided_output(guidance, unet, scheduler, timestep, x_t: torch.Tensor, prompt_embeds: torch.Tensor,
                  dtype: torch.dtype = torch.float32) -> SDGuidedOutput:
    """The (guided) raw model output at one scheduler timestep: x_t [B x C x h x w] float32,
    prompt_embeds [B x L x D] -> SDGuidedOutput. No host synchronisation."""
    batch = x_t.shape[0]
    if prompt_embeds.shape[0] != batch:
        raise ValueError(f"{prompt_embeds.shape[0]} prompt embeddings for {batch} latents")
    t = torch.full((batch,), timestep, device=x_t.device,
                   dtype=torch.float32 if isinstance(timestep, float) else torch.long)
    model = ScaledInputUNet(unet, scheduler, timestep, dtype)
    process = SchedulerTimestep(scheduler, timestep, x_t)
    if guidance is None:
        output = model(x_t, t, prompt_embeds).output.float()
        return SDGuidedOutput(output, None)
    details = guidance.predict(model, process, x_t, t, prompt_embeds, clip_denoised=False)
    return SDGuidedOutput(details.guided_eps, details)


def salient_mask_of(details) -> Optional[torch.Tensor]:
    """SAG's mask [B x 1 x h x w] from a step's intermediates (SAG alone or inside CFG), else None."""
    inner = getattr(details, "inner", None)
    for step in (details, inner):
        mask = getattr(step, "salient_mask", None)
        if mask is not None:
            return mask
    return None
