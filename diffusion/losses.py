"""Likelihood terms of the variational bound: Gaussian KL and the discretised decoder.

Sources: Ho et al. 2020 (arXiv 2006.11239) §3.3 (discretised decoder over 256 bins, Eq. 13);
Nichol & Dhariwal 2021 (arXiv 2102.09672) §2–3 (L_vlb in bits per dimension);
openai/guided-diffusion @ 22e0df8, ``guided_diffusion/losses.py`` (same thresholds and clamps).
All functions are elementwise and broadcast; they work on any device and dtype.
"""
from __future__ import annotations

import math

import torch
from torch import Tensor


def mean_flat(x: Tensor) -> Tensor:
    """Mean over every axis but the batch axis: [N x ...] -> [N]."""
    return x.mean(dim=tuple(range(1, x.ndim)))


def normal_kl(mean1, logvar1, mean2, logvar2) -> Tensor:
    """KL(N(μ1, e^{v1}) ‖ N(μ2, e^{v2})) = ½(−1 + v2 − v1 + e^{v1−v2} + (μ1 − μ2)² e^{−v2}), in nats.

    Arguments broadcast against each other (tensors or Python floats; at least one tensor).
    """
    ref = next(a for a in (mean1, logvar1, mean2, logvar2) if isinstance(a, Tensor))
    logvar1, logvar2 = (v if isinstance(v, Tensor) else torch.tensor(v).to(ref)
                        for v in (logvar1, logvar2))
    return 0.5 * (-1.0 + logvar2 - logvar1 + torch.exp(logvar1 - logvar2)
                  + ((mean1 - mean2) ** 2) * torch.exp(-logvar2))


def approx_standard_normal_cdf(x: Tensor) -> Tensor:
    """Φ(x) ≈ ½(1 + tanh(√(2/π)(x + 0.044715 x³))), the tanh approximation used by DDPM."""
    return 0.5 * (1.0 + torch.tanh(math.sqrt(2.0 / math.pi) * (x + 0.044715 * torch.pow(x, 3))))


def discretized_gaussian_log_likelihood(x: Tensor, means: Tensor, log_scales: Tensor) -> Tensor:
    """log P(x) of a Gaussian integrated over the 8-bit bin of x (Ho et al. 2020, Eq. 13), in nats.

    x: [N x C x H x W] images on the 256-level grid rescaled to [−1, 1] (bin half-width 1/255);
    means, log_scales (log σ): same shape.  The edge bins extend to ∓∞ (x < −0.999 or x > 0.999),
    so the probabilities of the 256 bins sum to 1.  Returns a tensor like x.
    """
    assert x.shape == means.shape == log_scales.shape, (x.shape, means.shape, log_scales.shape)
    centered = x - means
    inv_sigma = torch.exp(-log_scales)
    cdf_plus = approx_standard_normal_cdf(inv_sigma * (centered + 1.0 / 255.0))
    cdf_min = approx_standard_normal_cdf(inv_sigma * (centered - 1.0 / 255.0))
    log_cdf_plus = torch.log(cdf_plus.clamp(min=1e-12))
    log_one_minus_cdf_min = torch.log((1.0 - cdf_min).clamp(min=1e-12))
    log_cdf_delta = torch.log((cdf_plus - cdf_min).clamp(min=1e-12))
    return torch.where(x < -0.999, log_cdf_plus,
                       torch.where(x > 0.999, log_one_minus_cdf_min, log_cdf_delta))
