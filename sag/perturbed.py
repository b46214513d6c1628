"""Guidance by a perturbed self-attention: PAG (identity attention) and SEG (blurred queries), as
transforms of the noise predictor for the ADM / IDDPM U-Nets.

* PAG -- Ahn et al., "Self-Rectifying Diffusion Sampling with Perturbed-Attention Guidance",
  ECCV 2024, arXiv 2403.17377v1: the perturbed pass replaces the self-attention map of chosen
  blocks by the identity (each token keeps its own value), all chosen blocks at once.
* SEG -- Hong, "Smoothed Energy Guidance", NeurIPS 2024, arXiv 2408.00760v2: the perturbed pass
  Gaussian-blurs the queries over the token grid (sigma = inf: every query is the mean query).

Notation (paper symbol -> name here)::

    x_t                   x_t              noisy sample at respaced step t         [B x C x H x W]
    eps_theta(x_t)        eps              unperturbed noise prediction (first pass)
    eps_hat_theta(x_t)    eps_perturbed    prediction with the perturbed attention (second pass)
    s                     scale            paper scale; 0 = no guidance
    sigma                 sigma            SEG's query blur, in tokens

    guided eps = eps + s * (eps - eps_perturbed)  ==  eps_perturbed + (1 + s) * (eps - eps_perturbed)

The official PAG ADM code (KU-CVLAB/Perturbed-Attention-Guidance @ ba1c0c9, ``classifier_sample.py``
``replace_attn_layers``, ``gaussian_diffusion.py`` ``p_sample`` / ``ddim_sample``) writes the
right-hand form with ``--guide_scale g = 1 + s``; PAG computes that form (the official rounding);
SEG keeps SEG-SDXL's left-hand form.

Official PAG behaviour reproduced (SPEC.md section 1.4 and Q7/Q8/Q12; numbers = the quirks in
tests/fixtures/official/PROVENANCE.md, "Perturbed-Attention Guidance"):

* identity = each token's own value vector, per head, then ``proj_out`` and the residual (2);
* all chosen layers are perturbed at once, in one perturbed pass on the SAME x_t, t and labels (4, 6);
* only the perturbed pass's eps is used: the variance (noise term, classifier mean shift) is the
  unperturbed pass's, ``first`` (6, 8);
* DDIM re-derives eps from the clipped guided x0 (9; done by ``sag.sampling.guided_step`` for
  every method);
* the step range ``{"attention_mask_identity": [start, end]}`` is inclusive on the respaced index:
  guide iff ``start >= t >= end`` (11);
* the official default layers for ADM-256 (``input_blocks.14.1 input_blocks.16.1
  input_blocks.17.1 middle_block.1``) generalise to :func:`default_pag_sites`.

Official PAG behaviour NOT reproduced, deliberately:

* identity comes from a random mask of drop rate ``--noise_scale`` = 1.0 that draws
  ``rand(B*heads, N, N)`` per perturbed layer per step from the global RNG, interleaved with the
  step noise (2, 17); at rate 1.0 the values never matter, so we draw nothing (replays feed the
  recorded step noise, as the fixtures do);
* ``--noise_scale`` < 1 (a random partial mask; ``--drop_rate`` is never read, 1), the other
  modes (``attention_mask`` is all-NaN at the default rate, 3) and ``--drop_layer_randomly`` (16)
  are refused by the compatibility loader with one line: only the identity (rate 1.0) exists here;
* ``--drop_layers`` names that are no attention block are silently ignored by the official code (4);
  we raise one line listing the valid sites (``checkpoints_convert``);
* the official code rebuilds the attention ops on every call and resets the others to
  ``QKVAttentionLegacy``, which breaks every pass of a new-order model (5); the seam perturbs the
  block's own layout and leaves the model untouched;
* the official passes are sequential; ``batched=True`` (default) runs one forward of 2B with the
  perturbation on the second half, equal to the sequential passes up to float rounding;

SEG on ADM has no official code (SEG-SDXL only, SPEC.md section 1.5); this is the natural port:
blur the q part of the block's qkv over its (height x width) grid, kernel = the smallest odd integer
>= 6 sigma capped at the grid side, reflect padding, sigma > 9999 means infinite blur (SEG-SDXL's
``inf_blur_threshold``).
"""
from __future__ import annotations

import math
from dataclasses import dataclass, replace
from typing import Dict, List, Mapping, NamedTuple, Optional, Sequence, Tuple

import torch

from diffusion import GaussianDiffusion, MeanVariance
from unet.model import UNet
from unet.seam import BlurQueries, IdentityAttention

from .guidance import GuidanceError, run_model

SEG_INF_BLUR_THRESHOLD = 9999.0   # SEG-SDXL pipeline_seg.py: sigma above this is "infinite blur"


def _unwrap(module):
    """Accept a module or a loader result carrying ``.model``."""
    return getattr(module, "model", module)


# -- running several passes on one x_t ----------------------------------------------------------

class Pass(NamedTuple):
    """One U-Net evaluation inside a guided step: the network, its labels, its attention changes
    (site -> request from ``unet.seam``; the request's ``samples`` slice is set by :func:`run_passes`)."""
    model: torch.nn.Module
    y: Optional[torch.Tensor]
    attention: Mapping[str, object]


def run_passes(diffusion: GaussianDiffusion, x_t: torch.Tensor, t: torch.Tensor, passes: Sequence[Pass], *,
               batched: bool, clip_denoised: bool = True, with_maps: bool = False):
    """Evaluate every pass on the same x_t [B x C x H x W] at respaced t [B]; one MeanVariance each.

    ``batched``: the passes on the same network run as one forward of n*B samples, pass k on batch
    rows [kB, (k+1)B), its attention requests limited to those rows (at most one pass per network
    may carry requests; otherwise that network's passes run one by one); when they also share the
    labels (PAG, SEG), a ``UNet`` runs everything before the first request once (``copies=n``,
    sag.bench: about a quarter of a forward saved at the default sites). Not batched: one forward
    per pass, each identical to an unguided ``run_model`` call when it carries no request.

    Returns one MeanVariance per pass, or with ``with_maps`` ``(that list, {site: AttentionMap})``:
    the maps the passes' ``Capture`` requests returned, each for its own pass's B samples.
    """
    batch = x_t.shape[0]
    groups: Dict[int, List[int]] = {}
    for i, p in enumerate(passes):
        groups.setdefault(id(p.model) if batched else i, []).append(i)
    results: List[Optional[MeanVariance]] = [None] * len(passes)
    maps: Dict[str, object] = {}
    for members in groups.values():
        if len(members) == 1 or sum(bool(passes[i].attention) for i in members) > 1:
            for i in members:
                p = passes[i]
                results[i], pass_maps = run_model(p.model, diffusion, x_t, t, p.y, dict(p.attention) or None,
                                                  clip_denoised)
                maps.update(pass_maps or {})
            continue
        n = len(members)
        attention = {site: replace(request, samples=slice(k * batch, (k + 1) * batch))
                     for k, i in enumerate(members) for site, request in passes[i].attention.items()}
        labels = [passes[i].y for i in members]
        net = passes[members[0]].model
        if isinstance(net, UNet) and all(label is labels[0] for label in labels):
            # Same x_t, t and labels: the U-Net computes the layers before the first request once.
            net_out = net(x_t, diffusion.model_timesteps(t), labels[0], attention=attention or None, copies=n)
            out = diffusion.p_mean_variance(net_out.output, torch.cat([x_t] * n), t.repeat(n),
                                            clip_denoised=clip_denoised)
            group_maps = net_out.attention_maps
        else:
            y = None if labels[0] is None else torch.cat(labels)
            out, group_maps = run_model(net, diffusion, torch.cat([x_t] * n), t.repeat(n), y, attention or None,
                                        clip_denoised)
        maps.update(group_maps or {})
        # out: fields [nB x C x H x W]
        for k, i in enumerate(members):
            results[i] = MeanVariance(*(None if field is None else field[k * batch:(k + 1) * batch] for field in out))
    return (results, maps) if with_maps else results


def perturbed_eps(config, model, diffusion: GaussianDiffusion, x_t: torch.Tensor, t: torch.Tensor,
                  y: Optional[torch.Tensor], clip_denoised: bool) -> Tuple[MeanVariance, torch.Tensor]:
    """The two passes of PAG / SEG on x_t: (unperturbed MeanVariance, eps with the perturbed attention)."""
    first, perturbed = run_passes(diffusion, x_t, t, [Pass(model, y, {}), Pass(model, y, config.requests(model))],
                                  batched=config.batched, clip_denoised=clip_denoised)
    return first, perturbed.eps


# -- PAG -----------------------------------------------------------------------------------------

def default_pag_sites(model) -> Tuple[str, ...]:
    """The official PAG layer choice for any ADM / IDDPM U-Net (SPEC.md section 1.4).

    The official ADM-256 default ``input_blocks.14.1 input_blocks.16.1 input_blocks.17.1
    middle_block.1`` is: the last attention block of the second-deepest encoder level that has
    attention, every attention block of the deepest such level, and the middle block. ADM-256 ->
    ``("input.14", "input.16", "input.17", "middle")``; the pag_adm fixture's 32-pixel model ->
    ``("input.5", "input.7", "input.8", "middle")``.
    """
    encoder = [s for s in _unwrap(model).attention_sites() if s.name.startswith("input.")]
    levels = sorted({s.resolution for s in encoder})          # deepest (smallest grid) first
    chosen: List[str] = []
    if len(levels) >= 2:
        chosen.append([s.name for s in encoder if s.resolution == levels[1]][-1])
    if levels:
        chosen += [s.name for s in encoder if s.resolution == levels[0]]
    return tuple(chosen) + ("middle",)


def _check_scale(name: str, scale: float) -> None:
    if not (isinstance(scale, (int, float)) and math.isfinite(scale)):
        raise GuidanceError(f"{name} scale must be a finite number, got {scale!r}")


def _check_sites(name: str, sites) -> Optional[Tuple[str, ...]]:
    if sites is None:
        return None
    sites = (sites,) if isinstance(sites, str) else tuple(sites)
    if not sites or not all(isinstance(s, str) for s in sites):
        raise GuidanceError(f"{name} sites must be a non-empty tuple of site names such as 'middle', got {sites!r}")
    return sites


class PAGStep(NamedTuple):
    """One PAG noise prediction ([B x C x H x W] each)."""
    guided_eps: torch.Tensor
    first: MeanVariance             # the unperturbed pass: eps, unguided pred_x0, variance, log_variance
    eps_perturbed: torch.Tensor     # eps with identity attention at every chosen site


@dataclass(frozen=True)
class PAGConfig:
    """Perturbed-Attention Guidance (PAG paper Eq. for the guided eps):

        guided eps = eps + s * (eps - eps_perturbed)  ==  eps_perturbed + (1 + s) * (eps - eps_perturbed)

    eps_perturbed comes from one pass with identity attention at ALL ``sites`` simultaneously.

    scale:       paper s (0 = off); the official ``--guide_scale`` g is 1 + s (official runs: g = 4.0, s = 3.0).
    sites:       attention sites to perturb; None = :func:`default_pag_sites` of the model at hand.
    step_range:  (start, end): guide iff start >= t >= end on the respaced index, inclusive (official
                 ``--guidance_strategies '{"attention_mask_identity": [start, end]}'``); None = every step.
    batched:     one forward of 2B (perturbation on the second half) instead of two forwards of B;
                 the same up to float rounding.
    """
    scale: float = 3.0
    sites: Optional[Tuple[str, ...]] = None
    step_range: Optional[Tuple[int, int]] = None
    batched: bool = True

    def __post_init__(self):
        _check_scale("PAG", self.scale)
        object.__setattr__(self, "sites", _check_sites("PAG", self.sites))
        if self.step_range is not None:
            start, end = (int(v) for v in self.step_range)
            if not (start >= end >= 0):
                raise GuidanceError(f"PAG step_range must be (start, end) with start >= end >= 0, "
                                    f"got {self.step_range!r}")
            object.__setattr__(self, "step_range", (start, end))

    @property
    def guide_scale(self) -> float:
        """The official ``--guide_scale`` g = 1 + s."""
        return 1.0 + self.scale

    @classmethod
    def from_guide_scale(cls, guide_scale: float, **kwargs) -> "PAGConfig":
        """Build from the official ``--guide_scale`` g (s = g - 1)."""
        return cls(scale=float(guide_scale) - 1.0, **kwargs)

    def active_at(self, t_index: int) -> bool:
        """Official inclusive range on the respaced index: start >= t >= end."""
        return self.step_range is None or self.step_range[0] >= t_index >= self.step_range[1]

    def attention_sites(self) -> List[str]:
        """The explicit sites ([] when they default to the model's own, which always exist)."""
        return list(self.sites or ())

    def requests(self, model) -> Dict[str, IdentityAttention]:
        return {site: IdentityAttention() for site in (self.sites or default_pag_sites(model))}

    def predict(self, model, diffusion, x_t, t, y=None, clip_denoised=True) -> PAGStep:
        """The guidance protocol of ``sag.sampling``: x_t [B x C x H x W], t [B] -> PAGStep."""
        first, eps_perturbed = perturbed_eps(self, model, diffusion, x_t, t, y, clip_denoised)
        # eps_pert + (1 + s)(eps - eps_pert): the official PAG form and rounding.
        return PAGStep(eps_perturbed + self.guide_scale * (first.eps - eps_perturbed), first, eps_perturbed)


# -- SEG -----------------------------------------------------------------------------------------

class SEGStep(NamedTuple):
    """One SEG noise prediction ([B x C x H x W] each)."""
    guided_eps: torch.Tensor
    first: MeanVariance             # the unperturbed pass
    eps_perturbed: torch.Tensor     # eps with blurred queries at every chosen site


@dataclass(frozen=True)
class SEGConfig:
    """Smoothed Energy Guidance (SEG paper; SEG-SDXL ``pipeline_seg.py`` without CFG):

        guided eps = eps + s * (eps - eps_seg)

    eps_seg comes from one pass whose chosen attention blocks blur their queries over the token grid
    with a Gaussian of std ``sigma`` tokens (equal to blurring the attention logits along the query
    axes, the paper's claim). SEG's advice: keep s = 3 and vary sigma.

    scale:       paper s (0 = off), SEG-SDXL's ``seg_scale``.
    sigma:       blur std in tokens; math.inf (or > 9999, SEG-SDXL's threshold) = every query is the mean query.
    sites:       attention sites to perturb (SEG-SDXL default: the middle block).
    kernel_size: None = smallest odd integer >= 6 sigma, capped at the grid side (SEG-SDXL).
    batched:     one forward of 2B instead of two of B (same up to float rounding).
    """
    scale: float = 3.0
    sigma: float = math.inf
    sites: Tuple[str, ...] = ("middle",)
    kernel_size: Optional[int] = None
    batched: bool = True

    def __post_init__(self):
        _check_scale("SEG", self.scale)
        if not (self.sigma > 0):
            raise GuidanceError(f"SEG sigma must be > 0 (math.inf = mean query), got {self.sigma!r}")
        object.__setattr__(self, "sites", _check_sites("SEG", self.sites))

    def active_at(self, t_index: int) -> bool:
        return True

    def attention_sites(self) -> List[str]:
        return list(self.sites)

    def requests(self, model) -> Dict[str, BlurQueries]:
        sigma = math.inf if self.sigma > SEG_INF_BLUR_THRESHOLD else float(self.sigma)
        return {site: BlurQueries(sigma, self.kernel_size) for site in self.sites}

    def predict(self, model, diffusion, x_t, t, y=None, clip_denoised=True) -> SEGStep:
        """The guidance protocol of ``sag.sampling``: x_t [B x C x H x W], t [B] -> SEGStep."""
        first, eps_perturbed = perturbed_eps(self, model, diffusion, x_t, t, y, clip_denoised)
        return SEGStep(first.eps + self.scale * (first.eps - eps_perturbed), first, eps_perturbed)
