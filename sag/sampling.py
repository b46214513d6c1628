"""The sampling loops: ancestral (DDPM, Ho et al. 2020 Alg. 2) and DDIM (Song et al. 2021, Eq. 12)
over a respaced process, with SAG / blur guidance and classifier guidance composed in front of the
same step.

One step (official order, SAG ``p_sample`` / ``ddim_sample``):

1. guided eps: plain eps(x_t), or the guidance method's ``predict`` (SAG, PAG, SEG, CFG, ...) when
   it is active at this respaced index (decided on Python ints);
2. x0 = clip(predict_x0_from_eps(x_t, t, guided eps));
3. DDPM: mean = posterior mean(x0, x_t); + classifier term Sigma * grad (Sigma from the FIRST pass);
   x_{t-1} = mean + 1[t != 0] exp(log Sigma / 2) z;
   DDIM: classifier term as a score shift on eps (x0 not re-clipped); eps re-derived from x0;
   x_{t-1} = x0 sqrt(abar_prev) + sqrt(1 - abar_prev - sigma^2) eps + sigma z.

Gating is decided on Python ints before any tensor work; the loop has no host synchronisation
(non-finite values are tracked on the device and reported once, at the end).
"""
from __future__ import annotations

import contextlib
import math
from typing import Callable, List, NamedTuple, Optional, Sequence, Union

import torch
from tqdm.auto import tqdm

from diffusion import GaussianDiffusion

from .guidance import classifier_grad, run_model
from .precision import autocast, choose_dtype
from .seeding import SampleNoise


class NonFiniteError(FloatingPointError):
    """Sampling produced NaN or inf (one line naming the step)."""


class StepInfo(NamedTuple):
    """What the callback sees after each step."""
    index: int                  # position in the loop, 0 = noisiest
    t: int                      # respaced index (N - 1 ... 0)
    x_t: torch.Tensor           # input of the step        [B x C x H x W]
    x_prev: torch.Tensor        # output x_{t-1}           [B x C x H x W]
    eps: torch.Tensor           # the (guided) eps the step used
    pred_x0: torch.Tensor       # the (guided, clipped, classifier-shifted) x0 the step used
    sag: Optional[NamedTuple]   # the guidance's intermediates (SAGStep for SAG) when it ran at this step


def _unwrap(module):
    """Accept a module or a loader result carrying ``.model``."""
    return getattr(module, "model", module)


@torch.no_grad()
def guided_step(model, diffusion: GaussianDiffusion, x_t: torch.Tensor, t_index: int, *,
                guidance=None, classifier=None, classifier_scale: float = 0.0,
                y: Optional[torch.Tensor] = None, noise: Optional[torch.Tensor] = None,
                use_ddim: bool = False, eta: float = 0.0, clip_denoised: bool = True) -> StepInfo:
    """One denoising step x_t -> x_{t-1} at respaced index ``t_index`` (a Python int).

    x_t [B x C x H x W]; noise [B x C x H x W] (None only for DDIM with eta = 0, or at t = 0).
    """
    batch = x_t.shape[0]
    t = torch.full((batch,), t_index, device=x_t.device, dtype=torch.long)
    # 1. Noise prediction, guided by SAG when it is active at this step.
    details = None
    if guidance is not None and guidance.active_at(t_index):
        step_guidance = guidance.for_step(t_index) if hasattr(guidance, "for_step") else guidance
        details = step_guidance.predict(model, diffusion, x_t, t, y, clip_denoised)
        first, eps = details.first, details.guided_eps
        # 2. x0 from the guided eps, clipped as the sampler clips.
        pred_x0 = diffusion.predict_x0_from_eps(x_t, t, eps)
        if clip_denoised:
            pred_x0 = pred_x0.clamp(-1, 1)
    else:
        first = run_model(model, diffusion, x_t, t, y, None, clip_denoised)[0]
        eps, pred_x0 = first.eps, first.pred_x0          # the model's own x0 (x0-predicting models too)
    if noise is None and not (use_ddim and eta == 0):
        if t_index != 0:
            raise ValueError(f"step t={t_index} needs noise [B x C x H x W] (only DDIM with eta = 0 and the "
                             "last step t = 0 take none)")
        noise = torch.zeros_like(x_t)                    # the last step adds no noise (1[t != 0] = 0)
    grad = None
    if classifier is not None and classifier_scale != 0:
        grad = classifier_grad(_unwrap(classifier), diffusion, x_t, t, y, classifier_scale)
    if use_ddim:
        # 3b. DDIM: classifier guidance as a score shift (not re-clipped), then the update.
        if grad is not None:
            pred_x0 = diffusion.condition_score(pred_x0, x_t, t, grad).pred_x0
        x_prev = diffusion.ddim_step(x_t, pred_x0, t, eta, noise if eta != 0 else None)
    else:
        # 3a. Ancestral: posterior mean of the guided x0, the first pass's variance.
        mean = diffusion.q_posterior_mean_variance(pred_x0, x_t, t)[0]
        if grad is not None:
            mean = diffusion.condition_mean(mean, first.variance, grad)
        x_prev = diffusion.ddpm_step(mean, first.log_variance, t, noise)
    return StepInfo(-1, t_index, x_t, x_prev, eps, pred_x0, details)


@torch.no_grad()
def sample(model, diffusion: GaussianDiffusion, shape: Sequence[int], *,
           guidance=None, classifier=None, classifier_scale: float = 0.0,
           y: Optional[torch.Tensor] = None, x_T: Optional[torch.Tensor] = None,
           noise: Optional[Sequence[torch.Tensor]] = None, use_ddim: bool = False, eta: float = 0.0,
           progress: bool = False, seed: Union[int, Sequence[int]] = 0, clip_denoised: bool = True,
           callback: Optional[Callable[[StepInfo], None]] = None,
           device: Optional[Union[str, torch.device]] = None,
           dtype: Optional[Union[str, torch.dtype]] = None, fast: bool = False) -> torch.Tensor:
    """Draw samples x_0 [B x C x H x W] from the respaced process, optionally guided.

    guidance:  a guidance method (``SAGConfig`` for SAG or blur guidance, ...) or None. A method
               provides ``active_at(t_index) -> bool``, ``attention_sites() -> list`` and
               ``predict(model, diffusion, x_t, t, y, clip_denoised)`` returning a NamedTuple with
               ``guided_eps`` and ``first`` (the unperturbed pass's MeanVariance); optionally
               ``for_step(t_index)`` -> the method that runs at that step (``CFGWith`` uses it for
               its inner method's range).
    classifier, classifier_scale: classifier guidance (a classifier module, or a loader result with ``.model``).
    y:         class labels [B] for class-conditional models (and the classifier).
    x_T:       initial noise; default: drawn per sample from ``seed + i`` (or the given seed list).
    noise:     one tensor per step, in loop order, used verbatim (replay of official runs);
               default: each step's noise from the same per-sample streams (so sample k does not
               depend on the batch it is in).
    dtype:     precision of the U-Net passes (``sag.precision``): None = as the caller set it up
               (float32, or an enclosing ``torch.autocast``); "float32"; "bfloat16" / "bf16" (CPU or
               CUDA autocast); "float16" (CUDA); "auto" = bfloat16 on a CPU with native bf16 units when
               enough work per forward and a startup probe make it faster, else float32. Norms, softmax,
               captured maps, the blur, the guidance formulas and the sampler stay float32, and so
               does the result.
    fast:      what ``sag-sample`` does by default: attention blocks whose map nobody reads run fused
               ``scaled_dot_product_attention`` during this call (equal to the official einsums to
               ~2e-6; the model's own setting is restored afterwards), and ``dtype`` defaults to "auto".
               Default False: a model from ``load_official`` / ``load_checkpoint`` runs the official
               einsums everywhere, bit-identical to the official U-Net.
    """
    model = _unwrap(model)
    device = torch.device(device) if device is not None else next(model.parameters()).device
    shape = tuple(shape)
    batch = shape[0]
    seeds = [seed + i for i in range(batch)] if isinstance(seed, int) else list(seed)
    if len(seeds) != batch:
        raise ValueError(f"got {len(seeds)} seeds for a batch of {batch}")
    streams = SampleNoise(seeds, device)
    x = streams.randn(shape[1:])             # draw 0 of every stream is x_T, even when x_T is given,
    if x_T is not None:                      # so step noise is the same whether or not it was
        x = x_T                              # (seeding.py's stream layout)
    x = x.to(device=device, dtype=torch.float32)
    if x.shape != shape:
        raise ValueError(f"x_T has shape {tuple(x.shape)}, expected {shape}")
    indices = list(range(diffusion.num_timesteps))[::-1]
    if noise is not None and len(noise) != len(indices):
        raise ValueError(f"noise must hold one tensor per step ({len(indices)}), got {len(noise)}")
    if y is not None:
        y = y.to(device)
    if guidance is not None:
        model.check_attention_sites(guidance.attention_sites())
    draw_noise = not use_ddim or eta != 0
    if fast and dtype is None:
        dtype = "auto"
    if fast and not hasattr(model, "fused_attention"):
        raise ValueError(f"fast=True needs a U-Net with fused attention (unet.UNet), got {type(model).__name__}")
    precision = (contextlib.nullcontext() if dtype is None
                 else autocast(device, choose_dtype(dtype, device, model, batch).dtype))
    attention = model.fused_attention(True) if fast else contextlib.nullcontext()

    first_bad_step = torch.full((), -1, dtype=torch.long, device=device)
    with precision, attention:
        for i, t_index in enumerate(tqdm(indices, disable=not progress, desc="sampling")):
            if noise is not None:
                step_noise = noise[i].to(device=device, dtype=torch.float32)
            else:
                step_noise = streams.randn(shape[1:]) if draw_noise else None
            info = guided_step(model, diffusion, x, t_index, guidance=guidance, classifier=classifier,
                               classifier_scale=classifier_scale, y=y, noise=step_noise, use_ddim=use_ddim,
                               eta=eta, clip_denoised=clip_denoised)
            x = info.x_prev
            # Remember the first step that produced NaN/inf, on the device (no sync in the loop).
            bad = ~torch.isfinite(x).all()
            first_bad_step = torch.where(bad & (first_bad_step < 0), torch.full_like(first_bad_step, i), first_bad_step)
            if callback is not None:
                callback(info._replace(index=i))
    bad_index = int(first_bad_step)          # the one host sync, after the loop
    if bad_index >= 0:
        raise NonFiniteError(
            f"non-finite values appeared at sampling step {bad_index} (respaced t={indices[bad_index]}); "
            "check the guidance scales and the model's dtype")
    return x
