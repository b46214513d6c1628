"""Self-Attention Guidance, blur guidance and classifier guidance as transforms of the noise
predictor (Hong et al., "Improving Sample Quality of Diffusion Models Using Self-Attention
Guidance", ICCV 2023, arXiv 2210.00939v4).

Notation (paper symbol -> name here)::

    x_t                 x_t                     noisy sample at respaced step t      [B x C x H x W]
    eps_theta(x_t)      eps                     first-pass noise prediction          [B x C x H x W]
    A_t                 attention_map           softmax weights of one block         [B x heads x N x N]
    x0_hat              x0_hat                  predicted x0 (clipped as the sampler clips)
    M_t                 salient_mask            1 where a token receives > mean attention  [B x 1 x H x W]
    G_sigma(x0_hat)     blurred_x0              Gaussian blur, 31 taps, reflect padding
    x0_tilde            degraded_x0             M * G(x0_hat) + (1 - M) * x0_hat
    x_bar_t             degraded_x_t            sqrt(abar_t) x0_tilde + sqrt(1 - abar_t) eps
    eps_theta(x_bar_t)  eps_degraded            second-pass noise prediction
    s                   scale                   guidance scale; 0 = no guidance

    guided eps = eps + s * (eps - eps_degraded)  ==  eps_degraded + (1 + s) * (eps - eps_degraded)

The official SAG code (SusungHong/Self-Attention-Guidance @ a36f251, ``gaussian_diffusion.py``
``p_sample`` / ``ddim_sample`` / ``attention_masking``) writes the right-hand form with
``--guide_scale g = 1 + s``; ``sag_step`` computes that form too, so its float32 rounding is the
official one (s = 0 then gives eps up to one rounding, as the official ``--guide_scale 1.0`` does). Reproduced official behaviour: the clipped, unguided x0_hat is what is
blurred; x_bar_t is re-noised with the first pass's own eps at the same t; the second pass's
variance is discarded (the first pass's is used); SAG runs iff ``guide_start > t`` (respaced index).
"""
from __future__ import annotations

import math
from dataclasses import dataclass, replace
from typing import Callable, NamedTuple, Optional

import torch
import torch.nn.functional as F

from diffusion import GaussianDiffusion, MeanVariance
from unet.seam import AttentionMap, Capture, OfficialCapture

from .blur import gaussian_blur
from .mask import salient_mask as compute_salient_mask

MAP_MODES = ("block", "official")


class GuidanceError(ValueError):
    """A guidance setting that cannot work (one line)."""


@dataclass(frozen=True)
class SAGConfig:
    """Settings of Self-Attention Guidance (and of blur guidance when ``blur_everywhere``).

    scale:        paper s (0 = off); the official ``--guide_scale`` is ``1 + s``.
    blur_sigma:   std of the Gaussian blur of x0_hat, in pixels (official ``--blur_sigma``).
    site:         attention block whose map makes the mask (official ``--sel_attn_block output
                  --sel_attn_depth 2`` is ``"output.2"``).
    kernel_size:  blur taps (official: 31 whatever sigma).
    threshold:    a token is salient when the attention it receives exceeds this (1.0 = the mean).
    guide_start:  guide at respaced step index t iff ``guide_start > t`` (official meaning); None = every step.
                  Any integer is taken as officially: 0 (or below) guides no step.
    guide_end:    and iff ``t >= guide_end`` (0 = down to the last step, the SAG repository's only
                  choice; the PAG repository's ``{"sag": [start, end]}`` is guide_start = start + 1,
                  guide_end = end). A window with guide_start <= guide_end is empty: no step is guided.
    map_mode:     "block" = the block's own heads and layout (the paper's math); "official" = the
                  official SAG map (model-wide ``official_num_heads``, legacy split; SPEC.md Q1/Q2),
                  which made the published numbers.
    blur_everywhere: blur guidance, the paper's baseline: M = 1, no attention needed.
    """
    scale: float = 0.5
    blur_sigma: float = 9.0
    site: str = "output.2"
    kernel_size: int = 31
    threshold: float = 1.0
    guide_start: Optional[int] = None
    guide_end: int = 0
    map_mode: str = "block"
    official_num_heads: int = 4
    blur_everywhere: bool = False

    def __post_init__(self):
        if not math.isfinite(self.scale):
            raise GuidanceError(f"SAG scale must be a finite number, got {self.scale}")
        if not (math.isfinite(self.blur_sigma) and self.blur_sigma > 0):
            raise GuidanceError(f"blur_sigma must be a finite number > 0, got {self.blur_sigma}")
        if self.kernel_size < 1 or self.kernel_size % 2 == 0:
            raise GuidanceError(f"kernel_size must be a positive odd integer, got {self.kernel_size}")
        if self.map_mode not in MAP_MODES:
            raise GuidanceError(f"map_mode must be one of {MAP_MODES}, got {self.map_mode!r}")
        if self.guide_end < 0:
            raise GuidanceError(f"SAG guides where guide_start > t >= guide_end: guide_end must be >= 0, "
                                f"got guide_end={self.guide_end}")
        if self.official_num_heads < 1:
            raise GuidanceError(f"official_num_heads must be >= 1, got {self.official_num_heads}")

    @property
    def guide_scale(self) -> float:
        """The official ``--guide_scale`` g = 1 + s."""
        return 1.0 + self.scale

    @classmethod
    def from_guide_scale(cls, guide_scale: float, **kwargs) -> "SAGConfig":
        """Build from the official ``--guide_scale`` g (s = g - 1)."""
        return cls(scale=float(guide_scale) - 1.0, **kwargs)

    def active_at(self, t_index: int) -> bool:
        """Official gating: SAG runs iff ``guide_start > t >= guide_end`` on the respaced index (a Python int)."""
        return (self.guide_start is None or self.guide_start > t_index) and t_index >= self.guide_end

    def attention_sites(self):
        return [] if self.blur_everywhere else [self.site]

    def predict(self, model, diffusion, x_t, t, y=None, clip_denoised=True) -> "SAGStep":
        """The guidance protocol of ``sag.sampling``: one SAG step (see :func:`sag_step`)."""
        return sag_step(model, diffusion, x_t, t, self, y, clip_denoised)

    def attention_request(self):
        if self.blur_everywhere:
            return None
        return OfficialCapture(self.official_num_heads) if self.map_mode == "official" else Capture()


def blur_guidance(scale: float, blur_sigma: float, **kwargs) -> SAGConfig:
    """Blur guidance (the SAG paper's baseline): SAG with M = 1, x_bar_t = re-noised G(x0_hat)."""
    return SAGConfig(scale=scale, blur_sigma=blur_sigma, blur_everywhere=True, **kwargs)


def run_model(model, diffusion: GaussianDiffusion, x: torch.Tensor, t: torch.Tensor,
              y: Optional[torch.Tensor] = None, attention=None, clip_denoised: bool = True):
    """One U-Net pass at respaced index t: the network sees ``diffusion.model_timesteps(t)``.

    Returns ``(MeanVariance, attention_maps)``; x [B x C x H x W], t [B] (long).
    """
    if getattr(model, "label_embed", True) is None:
        y = None       # labels may exist for the classifier alone (unconditional U-Net + classifier guidance)
    out = model(x, diffusion.model_timesteps(t), y, attention=attention)
    return diffusion.p_mean_variance(out.output, x, t, clip_denoised=clip_denoised), out.attention_maps


class SAGStep(NamedTuple):
    """Everything one SAG step computes ([B x C x H x W] unless noted)."""
    guided_eps: torch.Tensor
    first: MeanVariance                      # first pass: eps, unguided pred_x0, variance, log_variance
    attention_map: Optional[AttentionMap]    # [B x heads x N x N] (None for blur guidance)
    salient_mask: torch.Tensor               # [B x 1 x H x W] in {0, 1}
    blurred_x0: torch.Tensor
    degraded_x0: torch.Tensor
    degraded_x_t: torch.Tensor
    eps_degraded: torch.Tensor


def sag_step(model, diffusion: GaussianDiffusion, x_t: torch.Tensor, t: torch.Tensor, config: SAGConfig,
             y: Optional[torch.Tensor] = None, clip_denoised: bool = True) -> SAGStep:
    """One Self-Attention-Guided noise prediction at respaced index t (paper Sec. 4, Eq. for x_bar_t).

    x_t [B x C x H x W], t [B] -> SAGStep with guided_eps = eps + s (eps - eps(x_bar_t)).
    """
    request = config.attention_request()
    # 1. First pass, reading A_t at the chosen site: eps_theta(x_t) and x0_hat (clipped as the sampler clips).
    first, maps = run_model(model, diffusion, x_t, t, y, {config.site: request} if request else None, clip_denoised)
    return sag_after_first_pass(model, diffusion, x_t, t, config, first, maps.get(config.site), y, clip_denoised)


def sag_after_first_pass(model, diffusion: GaussianDiffusion, x_t: torch.Tensor, t: torch.Tensor,
                         config: SAGConfig, first: MeanVariance, attention_map: Optional[AttentionMap],
                         y: Optional[torch.Tensor] = None, clip_denoised: bool = True) -> SAGStep:
    """Steps 2-6 of :func:`sag_step` from a first pass already made (e.g. the unconditional half of a
    batched CFG forward): mask, blur, re-noise, second pass, guided eps.

    x_t [B x C x H x W], t [B], first: MeanVariance of the B samples, attention_map [B x heads x N x N]
    (None for blur guidance) -> SAGStep.
    """
    x0_hat = first.pred_x0
    # 2. Salient mask M_t: tokens receiving more than the mean attention, upsampled to the image (nearest).
    if config.blur_everywhere:
        mask = torch.ones_like(x0_hat[:, :1])
    else:
        mask = compute_salient_mask(attention_map, x_t.shape[-2:], config.threshold)
    # 3. Degrade: blur x0_hat inside the mask only.
    blurred_x0 = gaussian_blur(x0_hat, config.blur_sigma, config.kernel_size)
    degraded_x0 = mask * blurred_x0 + (1 - mask) * x0_hat
    # 4. Re-noise with the first pass's own eps: x_bar_t = sqrt(abar_t) x0_tilde + sqrt(1 - abar_t) eps.
    degraded_x_t = diffusion.q_sample(degraded_x0, t, noise=first.eps)
    # 5. Second pass on x_bar_t (same t and labels); only its eps is used.
    eps_degraded = run_model(model, diffusion, degraded_x_t, t, y, None, clip_denoised)[0].eps
    # 6. Guide away from the degraded prediction: eps_bar + (1 + s)(eps - eps_bar), the official form
    #    and rounding (= eps + s (eps - eps_bar) up to one float32 rounding).
    guided_eps = eps_degraded + config.guide_scale * (first.eps - eps_degraded)
    return SAGStep(guided_eps, first, attention_map, mask, blurred_x0, degraded_x0, degraded_x_t, eps_degraded)


def classifier_grad(classifier, diffusion: GaussianDiffusion, x_t: torch.Tensor, t: torch.Tensor,
                    y: torch.Tensor, classifier_scale: float) -> torch.Tensor:
    """Classifier guidance term: scale * grad_x log p_phi(y | x_t, t), taken at x_t (official ``cond_fn``).

    The classifier sees the same model timesteps as the U-Net. x_t [B x C x H x W], y [B] -> [B x C x H x W].
    """
    with torch.enable_grad():
        x_in = x_t.detach().requires_grad_(True)
        log_probs = F.log_softmax(classifier(x_in, diffusion.model_timesteps(t)), dim=-1)
        selected = log_probs[torch.arange(log_probs.shape[0], device=log_probs.device), y.view(-1)]
        return torch.autograd.grad(selected.sum(), x_in)[0] * classifier_scale
