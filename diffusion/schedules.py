"""Noise schedules and timestep respacing, in float64 numpy.

Sources (equation numbers refer to the arXiv versions):
  * Ho et al. 2020, "Denoising Diffusion Probabilistic Models" (arXiv 2006.11239): the linear
    schedule, beta_1 = 1e-4 .. beta_T = 0.02 for T = 1000.
  * Nichol & Dhariwal 2021, "Improved Denoising Diffusion Probabilistic Models" (arXiv 2102.09672):
    the cosine schedule (Eq. 17) with s = 0.008 and betas clipped at 0.999.
  * openai/guided-diffusion @ 22e0df8, ``guided_diffusion/gaussian_diffusion.py``
    (``get_named_beta_schedule``, ``betas_for_alpha_bar``) and ``guided_diffusion/respace.py``
    (``space_timesteps``); improved-diffusion @ 1bc7bbb has the same functions.

Parity notes: the schedules are computed with the same float64 operations in the same order as the
official code, so the arrays are bit-identical. ``space_timesteps`` uses Python's ``round()``
(banker's rounding: "7" on 1000 steps gives 166 and 832, not 167 and 833) and "ddimN" takes the
first integer stride that yields exactly N steps, as the official code does.
"""
from __future__ import annotations

import math
from typing import Callable

import numpy as np

BETA_SCHEDULES = ("linear", "cosine")


class DiffusionError(ValueError):
    """A diffusion configuration that cannot be built (one-line message)."""


def betas_for_alpha_bar(num_steps: int, alpha_bar: Callable[[float], float],
                        max_beta: float = 0.999) -> np.ndarray:
    """Discretise a continuous ᾱ(τ), τ ∈ [0, 1], into betas (Nichol & Dhariwal 2021, Eq. 17 ff.).

    beta_i = min(1 − ᾱ((i+1)/T) / ᾱ(i/T), max_beta) for i = 0..T−1.  Returns [T] float64.
    Evaluated with Python floats (``math``) in a loop, like the official code, so that the
    rounding is identical.
    """
    betas = [min(1.0 - alpha_bar((i + 1) / num_steps) / alpha_bar(i / num_steps), max_beta)
             for i in range(num_steps)]
    return np.array(betas, dtype=np.float64)


def _cosine_alpha_bar(tau: float) -> float:
    """f(τ) = cos²((τ + s)/(1 + s) · π/2) with s = 0.008 (Nichol & Dhariwal 2021, Eq. 17)."""
    return math.cos((tau + 0.008) / 1.008 * math.pi / 2) ** 2


def get_named_beta_schedule(name: str, num_steps: int) -> np.ndarray:
    """The betas of a named schedule: [T] float64.

    "linear": Ho et al. 2020 scaled to any T, linspace(s·1e-4, s·0.02, T) with s = 1000/T.
    "cosine": ``betas_for_alpha_bar`` of the cosine ᾱ with max_beta 0.999.
    """
    if not isinstance(num_steps, int) or isinstance(num_steps, bool) or num_steps <= 0:
        raise DiffusionError(f"diffusion steps must be a positive integer, got {num_steps!r}")
    if name == "linear":
        scale = 1000 / num_steps
        return np.linspace(scale * 0.0001, scale * 0.02, num_steps, dtype=np.float64)
    if name == "cosine":
        return betas_for_alpha_bar(num_steps, _cosine_alpha_bar)
    raise DiffusionError(f"unknown noise schedule {name!r}; valid names: "
                         + ", ".join(repr(n) for n in BETA_SCHEDULES))


def space_timesteps(num_steps: int, section_counts: str) -> list[int]:
    """The original timesteps a respaced process keeps, ascending (guided-diffusion ``respace.py``).

    ""          every step, 0..T−1.
    "ddimN"     range(0, T, i) for the first integer stride i in 1..T−1 giving exactly N steps
                (DDIM's uniform striding; "ddim25" on 1000 steps is 0, 40, …, 960).
    "n1,n2,…"   T is cut into len(counts) sections of T//len(counts) steps (the first T % len
                sections get one more); section k keeps n_k indices start + round(j·(size−1)/(n_k−1)),
                j = 0..n_k−1 (a count of 1 keeps the section's first index).
    """
    if not isinstance(num_steps, int) or isinstance(num_steps, bool) or num_steps <= 0:
        raise DiffusionError(f"diffusion steps must be a positive integer, got {num_steps!r}")
    spec = section_counts
    if spec == "":
        return list(range(num_steps))
    if spec.startswith("ddim"):
        try:
            wanted = int(spec[len("ddim"):])
        except ValueError:
            raise DiffusionError(f"cannot parse timestep_respacing {spec!r}: expected 'ddimN' "
                                 "with an integer N, e.g. 'ddim25'") from None
        for stride in range(1, num_steps):
            if len(range(0, num_steps, stride)) == wanted:
                return list(range(0, num_steps, stride))
        raise DiffusionError(f"timestep_respacing {spec!r}: no integer stride gives exactly "
                             f"{wanted} of {num_steps} steps")
    try:
        counts = [int(c) for c in spec.split(",")]
    except ValueError:
        raise DiffusionError(f"cannot parse timestep_respacing {spec!r}: expected '' (all steps), "
                             "'ddimN', or comma-separated step counts such as '250' or "
                             "'10,15,20'") from None
    size_per, extra = divmod(num_steps, len(counts))
    start, kept = 0, []
    for k, count in enumerate(counts):
        size = size_per + (1 if k < extra else 0)
        if count <= 0:
            raise DiffusionError(f"timestep_respacing {spec!r}: step counts must be positive, "
                                 f"got {count}")
        if count > size:
            raise DiffusionError(f"timestep_respacing {spec!r}: section {k} has {size} steps, "
                                 f"cannot take {count}")
        stride = 1 if count == 1 else (size - 1) / (count - 1)
        pos = 0.0
        for _ in range(count):
            kept.append(start + round(pos))  # Python round(): banker's rounding, as official
            pos += stride
        start += size
    return sorted(set(kept))
