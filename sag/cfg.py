"""Classifier-free guidance (Ho & Salimans 2022, arXiv 2207.12598) for ADM, alone and combined with
SAG, PAG or SEG, as transforms of the noise predictor.

Notation::

    eps_c      eps_theta(x_t, y)          conditional prediction (the class-conditional network)
    eps_u      eps_theta(x_t, null)       unconditional prediction (a second network, or a stand-in label)
    w          CFGConfig.w                diffusers' ``guidance_scale``: 1 = no guidance, 0 = unconditional only
    s          the inner method's scale   paper s of SAG / PAG / SEG, 0 = off

    CFG:        eps = eps_u + w (eps_c - eps_u)   computed as   eps_c + (w - 1)(eps_c - eps_u)

The two forms are equal; the second returns eps_c bit for bit at w = 1 (SEG-SDXL writes it so).

ADM has no null label (its class-conditional checkpoints were never trained with label dropout), so
neither the official ADM, SAG nor PAG code has CFG (SPEC.md section 1.6). The practical route is a
second network: the 256x256 conditional checkpoint as eps_c and the 256x256 unconditional one as
eps_u (``CFGConfig(w, unconditional_model=uncond)``). ``null_label`` instead feeds one fixed class to
the conditional network as a stand-in "unconditional" input -- useful for tests, not a trained null.

The protocol's ``first`` (whose variance drives the DDPM noise term and the classifier mean shift) is
the CONDITIONAL pass: the sample is drawn from the conditional model's learned variance, as SAG and
PAG use their unperturbed pass's.

Combinations (:class:`CFGWith`), each with the rule of the code that defines it:

* SAG + CFG (diffusers ``pipeline_stable_diffusion_sag.py``, SAG paper Eq. 25 as cited there; SPEC.md
  section 1.2 (l)): SAG is built from the UNCONDITIONAL half -- x0 from eps_u, the unconditional
  pass's attention map, blur-mask-renoise with eps_u, a third pass on x_bar_t with the unconditional
  network:   eps = eps_u + w (eps_c - eps_u) + s (eps_u - eps_u(x_bar_t)).
* PAG + CFG (diffusers ``pag_utils.py``): the perturbed pass is the CONDITIONAL one:
  eps = eps_u + w (eps_c - eps_u) + s (eps_c - eps_c_perturbed).
* SEG + CFG (SEG-SDXL ``pipeline_seg.py``, SPEC.md section 1.5): the same shape,
  eps = eps_c + (w - 1)(eps_c - eps_u) + s (eps_c - eps_c_seg).

The inner method keeps its own gating (SAG ``guide_start``, PAG ``step_range``): the sampler asks
``CFGWith.for_step(t_index)`` for what runs at each step, which is CFG alone outside the method's range
(decided on Python ints; ``CFGWith.predict`` itself always applies the method). Classifier guidance
composes on top of any of these in the sampler.
"""
from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass, field
from typing import List, NamedTuple, Optional, Union

import torch

from diffusion import MeanVariance

from .guidance import GuidanceError, SAGConfig, sag_after_first_pass
from .perturbed import Pass, PAGConfig, PAGStep, SEGConfig, SEGStep, _unwrap, run_passes


def cfg_eps(eps_c: torch.Tensor, eps_u: torch.Tensor, w: float) -> torch.Tensor:
    """eps_u + w (eps_c - eps_u), computed as eps_c + (w - 1)(eps_c - eps_u) (exact at w = 1)."""
    return eps_c + (w - 1) * (eps_c - eps_u)


class CFGStep(NamedTuple):
    """One CFG (or CFG + method) noise prediction ([B x C x H x W] each)."""
    guided_eps: torch.Tensor
    first: MeanVariance          # the conditional pass
    eps_uncond: torch.Tensor     # eps_u
    inner: Optional[NamedTuple]  # SAGStep (unconditional half) / PAGStep / SEGStep (conditional half), or None


@dataclass(frozen=True)
class CFGConfig:
    """Classifier-free guidance for ADM: eps = eps_u + w (eps_c - eps_u) (diffusers' convention).

    w:                  diffusers' ``guidance_scale`` -- w = 1 is the plain conditional model (no
                        guidance), w = 0 the unconditional one; NOT a paper s (which would be w - 1).
    unconditional_model: the network giving eps_u (e.g. ADM 256 uncond next to ADM 256 cond); None = the
                        conditional network itself, fed ``null_label``.
    null_label:         class index fed as the "unconditional" label when the eps_u network is
                        class-conditional (ADM has no trained null label: a stand-in).
    unconditional_input: the eps_u pass's conditioning tensor itself, used as given (Stable Diffusion:
                        the negative or empty prompt's text embeddings [B x L x D]); overrides null_label.
    batched:            when eps_u and eps_c come from the same network, one forward of 2B
                        ([uncond; cond]); the same up to float rounding.
    """
    w: float
    unconditional_model: Optional[torch.nn.Module] = field(default=None, repr=False, compare=False)
    null_label: Optional[int] = None
    batched: bool = True
    unconditional_input: Optional[torch.Tensor] = field(default=None, repr=False, compare=False)

    def __post_init__(self):
        if not (isinstance(self.w, (int, float)) and math.isfinite(self.w)):
            raise GuidanceError(f"CFG w must be a finite number, got {self.w!r}")

    def active_at(self, t_index: int) -> bool:
        return True

    def attention_sites(self) -> List[str]:
        return []

    def unconditional(self, model, y: Optional[torch.Tensor]):
        """(network, labels) of the unconditional pass."""
        if y is None:
            raise GuidanceError("CFG needs class labels y and a class-conditional network for eps_c")
        net = _unwrap(self.unconditional_model) if self.unconditional_model is not None else _unwrap(model)
        if self.unconditional_input is not None:
            return net, self.unconditional_input
        if getattr(net, "label_embed", None) is None:
            return net, None
        if self.null_label is None:
            raise GuidanceError("the eps_u network is class-conditional and ADM has no null label: pass "
                                "unconditional_model=<an unconditional U-Net> or a stand-in null_label=<class>")
        return net, torch.full_like(y, self.null_label)

    def predict(self, model, diffusion, x_t, t, y=None, clip_denoised=True) -> CFGStep:
        """The guidance protocol of ``sag.sampling``: x_t [B x C x H x W], t [B], y [B] -> CFGStep."""
        net_u, y_u = self.unconditional(model, y)
        uncond, cond = run_passes(diffusion, x_t, t, [Pass(net_u, y_u, {}), Pass(_unwrap(model), y, {})],
                                  batched=self.batched, clip_denoised=clip_denoised)
        return CFGStep(cfg_eps(cond.eps, uncond.eps, self.w), cond, uncond.eps, None)


@dataclass(frozen=True)
class CFGWith:
    """CFG combined with SAG, PAG or SEG (rules in the module docstring):

        SAG:        eps_u + w (eps_c - eps_u) + s (eps_u - eps_u(x_bar_t))      (x_bar_t from the uncond half)
        PAG / SEG:  eps_u + w (eps_c - eps_u) + s (eps_c - eps_c_perturbed)

    w = cfg.w (1 = off), s = method.scale (0 = off). With one network and ``batched`` on both configs,
    PAG / SEG + CFG is one forward of 3B ([uncond; cond; cond-perturbed]); SAG + CFG is one forward of
    2B ([uncond; cond], the map read from the uncond half, as diffusers' SAG pipeline does), then the
    x_bar_t pass of B (sequentially: uncond pass with the map, cond pass, x_bar_t pass).
    """
    cfg: CFGConfig
    method: Union[SAGConfig, PAGConfig, SEGConfig]

    def __post_init__(self):
        if not isinstance(self.method, (SAGConfig, PAGConfig, SEGConfig)):
            raise GuidanceError("CFGWith combines CFG with a SAGConfig, PAGConfig or SEGConfig, "
                                f"got {type(self.method).__name__}")

    def active_at(self, t_index: int) -> bool:
        return True                              # CFG guides every step; the method's gate is in for_step

    def for_step(self, t_index: int) -> Union["CFGWith", CFGConfig]:
        """What runs at respaced step ``t_index`` (a Python int, so no host sync): CFG + the method
        inside the method's own range (SAG ``guide_start``, PAG / SEG ``step_range``), CFG alone outside."""
        if self.method.active_at(t_index):
            return self
        return dataclasses.replace(self.cfg, batched=self.cfg.batched and getattr(self.method, "batched", True))

    def attention_sites(self) -> List[str]:
        on_uncond_net = isinstance(self.method, SAGConfig) and self.cfg.unconditional_model is not None
        return [] if on_uncond_net else self.method.attention_sites()

    def predict(self, model, diffusion, x_t, t, y=None, clip_denoised=True) -> CFGStep:
        """The guidance protocol of ``sag.sampling``: x_t [B x C x H x W], t [B], y [B] -> CFGStep."""
        model = _unwrap(model)
        net_u, y_u = self.cfg.unconditional(model, y)
        method, s, w = self.method, self.method.scale, self.cfg.w
        if isinstance(method, SAGConfig):
            # 1. [uncond; cond] (one forward of 2B when batched on one network) with the map read from the
            #    unconditional half, then SAG on that half (x_bar_t, a third pass eps_u(x_bar_t)).
            request = method.attention_request()
            passes = [Pass(net_u, y_u, {method.site: request} if request else {}), Pass(model, y, {})]
            (uncond, cond), maps = run_passes(diffusion, x_t, t, passes, batched=self.cfg.batched,
                                              clip_denoised=clip_denoised, with_maps=True)
            inner = sag_after_first_pass(net_u, diffusion, x_t, t, method, uncond, maps.get(method.site), y_u,
                                         clip_denoised)
            eps_u = inner.first.eps
            # 2. Guide: CFG, then away from the degraded unconditional prediction.
            return CFGStep(cfg_eps(cond.eps, eps_u, w) + s * (eps_u - inner.eps_degraded), cond, eps_u, inner)
        # 1. Passes: [uncond; cond; cond perturbed by PAG / SEG].
        passes = [Pass(net_u, y_u, {}), Pass(model, y, {}), Pass(model, y, method.requests(model))]
        batched = self.cfg.batched and getattr(method, "batched", True)
        uncond, cond, perturbed = run_passes(diffusion, x_t, t, passes, batched=batched, clip_denoised=clip_denoised)
        # 2. Guide: CFG, then away from the perturbed conditional prediction.
        eps_p = perturbed.eps
        step_type = PAGStep if isinstance(method, PAGConfig) else SEGStep
        inner = step_type(cond.eps + s * (cond.eps - eps_p), cond, eps_p)
        return CFGStep(cfg_eps(cond.eps, uncond.eps, w) + s * (cond.eps - eps_p), cond, uncond.eps, inner)
