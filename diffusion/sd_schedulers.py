"""Stable Diffusion's schedulers on the discrete VP schedule: DDIM, PNDM (PLMS) and Euler discrete,
configured from a diffusers folder's ``scheduler/scheduler_config.json`` and equal to diffusers 0.42.

Sources (equation numbers refer to the arXiv versions):
  * Ho et al. 2020, DDPM (arXiv 2006.11239): x_t = √ᾱ_t x_0 + √(1 − ᾱ_t) ε, Eq. 4.
  * Song et al. 2021, DDIM (arXiv 2010.02502): update Eq. 12, σ_t(η) Eq. 16.
  * Liu et al. 2022, PNDM (arXiv 2202.09778): the transfer φ (Eq. 11) and the linear multistep
    (PLMS, Eq. 12; the first steps as diffusers' ``skip_prk_steps`` runs them, below).
  * Karras et al. 2022, EDM (arXiv 2206.00364): Euler in σ space, x = x_0 + σ ε, dx/dσ = (x − x_0)/σ.
  * Salimans & Ho 2022 (arXiv 2202.00512): v = √ᾱ ε − √(1 − ᾱ) x_0 (v-prediction).
  * Lin et al. 2024 (arXiv 2305.08891) Algorithm 1: betas rescaled to zero terminal SNR.
  * huggingface/diffusers 0.42 ``schedulers/scheduling_ddim.py``, ``scheduling_pndm.py``,
    ``scheduling_euler_discrete.py`` (the specification of the numerics; no code taken from them).

Sample parametrisations (what ``sample`` means, and what ``to_x0_eps`` / ``add_noise`` use):
  * DDIM, PNDM (VP):  x_t = √ᾱ_t · x_0 + √(1 − ᾱ_t) · ε, the U-Net sees x_t itself.
  * Euler (σ space):  x = x_0 + σ · ε with σ = √((1 − ᾱ)/ᾱ), the U-Net sees x / √(σ² + 1), which is the
    VP sample of the same (x_0, ε).  So x_euler = x_vp · √(1 + σ²), and x_0, ε, v mean the same in both.

Parity notes: every table is float32 and computed with diffusers' operations in diffusers' order
(betas by ``torch.linspace`` in float32, ᾱ by a float32 ``cumprod``, Euler's σ by ``np.interp`` in
float64 on the float32 σ table, then rounded to float32), and each step does diffusers' float32
operations in its order, so timesteps, ᾱ and σ are bit-identical and steps agree to float32 rounding.
The DDIM update itself (``ddim_mean``, ``ddim_sigma_from_alphas``) and the cosine betas are the ones the
ADM process in ``diffusion.gaussian`` / ``diffusion.schedules`` uses.  With η > 0 the DDIM σ_t is DDIM
Eq. 16 in the ADM operation order (diffusers takes one square root of the product: ≤ 1 ulp apart).
``vp_x0_eps`` / ``add_noise`` are the same math as ``GaussianDiffusion.predict_x0_from_eps`` / ``q_sample``
but not the same arithmetic: those gather float64 tables (√(1/ᾱ), √(1/ᾱ − 1)) as guided-diffusion does,
these take float32 square roots of the float32 ᾱ as diffusers does; each is bit-exact to its reference.

Device: ``set_timesteps(n, device)`` puts every table there; a step looks its coefficients up on the
device (a timestep may be a Python number or a 0-d / [B] tensor), with no host synchronisation.  The
sampling state is float32: each step computes in float32 and returns float32 tensors.
"""
from __future__ import annotations

from typing import NamedTuple, Optional, Sequence, Union

import numpy as np
import torch
from torch import Tensor

from .gaussian import ddim_mean, ddim_sigma_from_alphas
from .schedules import DiffusionError, get_named_beta_schedule

__all__ = ["SUPPORTED_SCHEDULERS", "SchedulerStep", "DDIMScheduler", "PNDMScheduler", "EulerDiscreteScheduler",
           "scheduler_from_config", "sd_betas", "rescale_zero_terminal_snr", "spaced_timesteps", "vp_x0_eps"]

BETA_SCHEDULES = ("linear", "scaled_linear", "squaredcos_cap_v2")
TIMESTEP_SPACINGS = ("leading", "trailing", "linspace")
Timestep = Union[int, float, Tensor]
Generators = Union[torch.Generator, Sequence[torch.Generator], None]


class SchedulerStep(NamedTuple):
    """One scheduler step: both [B x C x H x W] float32."""
    prev_sample: Tensor            # the sample at the next (less noisy) timestep
    pred_original_sample: Tensor   # x̂_0 this step's model output predicts


# ------------------------------------------------------------------------------------ tables
def sd_betas(beta_schedule: str, beta_start: float, beta_end: float, num_train_timesteps: int,
             trained_betas: Optional[Sequence[float]] = None) -> Tensor:
    """The training betas, [T] float32, as diffusers builds them.

    "linear":            linspace(β_start, β_end, T) in float32.
    "scaled_linear":     linspace(√β_start, √β_end, T)² in float32 (Stable Diffusion: 0.00085 .. 0.012).
    "squaredcos_cap_v2": the cosine schedule (Nichol & Dhariwal 2021, Eq. 17, β ≤ 0.999), rounded to float32.
    ``trained_betas`` (a list of T numbers), when given, replaces the schedule.
    """
    if trained_betas is not None:
        if len(trained_betas) != num_train_timesteps:
            raise DiffusionError(f"trained_betas has {len(trained_betas)} values but num_train_timesteps is "
                                 f"{num_train_timesteps}; give one beta per training step")
        return torch.tensor(trained_betas, dtype=torch.float32)
    if beta_schedule == "linear":
        return torch.linspace(beta_start, beta_end, num_train_timesteps, dtype=torch.float32)
    if beta_schedule == "scaled_linear":
        return torch.linspace(beta_start ** 0.5, beta_end ** 0.5, num_train_timesteps, dtype=torch.float32) ** 2
    if beta_schedule == "squaredcos_cap_v2":
        return torch.from_numpy(get_named_beta_schedule("cosine", num_train_timesteps)).float()
    raise DiffusionError(f"beta_schedule {beta_schedule!r} is not supported; supported: " + ", ".join(BETA_SCHEDULES))


def rescale_zero_terminal_snr(betas: Tensor) -> Tensor:
    """Betas whose √ᾱ is shifted and scaled so that √ᾱ_T = 0 and √ᾱ_1 is unchanged (Lin et al. 2024,
    Algorithm 1): √ᾱ' = (√ᾱ − √ᾱ_T) · √ᾱ_1 / (√ᾱ_1 − √ᾱ_T), then back to betas.  [T] float32 → [T]."""
    sqrt_alpha_bar = torch.cumprod(1.0 - betas, dim=0).sqrt()
    first, last = sqrt_alpha_bar[0].clone(), sqrt_alpha_bar[-1].clone()
    sqrt_alpha_bar = (sqrt_alpha_bar - last) * (first / (first - last))
    alpha_bar = sqrt_alpha_bar ** 2
    alphas = torch.cat([alpha_bar[0:1], alpha_bar[1:] / alpha_bar[:-1]])
    return 1 - alphas


def spaced_timesteps(spacing: str, num_train_timesteps: int, num_inference_steps: int,
                     steps_offset: int) -> np.ndarray:
    """The inference timesteps, noisiest first, as float64 (integer-valued except "linspace").

    "leading"  (SD 1.x):  k · (T // n) + steps_offset, k = n−1 .. 0  (SD 1.5, n = 50: 981, 961, …, 1).
    "trailing":           round(T − k · T/n) − 1, k = 0 .. n−1  (always contains T − 1; no offset).
    "linspace":           linspace(0, T − 1, n) reversed; DDIM / PNDM round it, Euler keeps the fractions.
    (Lin et al. 2024, Table 2, compares the three.)
    """
    T, n = num_train_timesteps, num_inference_steps
    if isinstance(n, bool) or not isinstance(n, int) or not 1 <= n <= T:
        raise DiffusionError(f"num_inference_steps must be an integer in [1, {T}] (num_train_timesteps), got {n!r}")
    if spacing == "leading":
        return (np.arange(0, n) * (T // n)).round()[::-1] + steps_offset
    if spacing == "trailing":
        # [:n]: for some n (61, 103, ...) float rounding gives arange an (n+1)-th value ≈ 0, i.e. a timestep −1
        # that diffusers runs as an extra step on ᾱ[−1] (wrapped index); we keep the n real steps.
        return (np.round(np.arange(T, 0, -T / n)) - 1)[:n]
    if spacing == "linspace":
        return np.linspace(0, T - 1, n)[::-1]
    raise DiffusionError(f"timestep_spacing {spacing!r} is not supported; supported: " + ", ".join(TIMESTEP_SPACINGS))


# ---------------------------------------------------------------------------- shared helpers
def vp_x0_eps(model_output: Tensor, sample: Tensor, alpha_bar: Tensor, prediction_type: str):
    """(x̂_0, ε̂) from a model output at a VP sample x_t = √ᾱ x_0 + √(1 − ᾱ) ε (DDPM Eq. 4).

    epsilon:       x̂_0 = (x_t − √(1 − ᾱ) ε̂) / √ᾱ,         ε̂ = output.
    v_prediction:  x̂_0 = √ᾱ x_t − √(1 − ᾱ) v,              ε̂ = √ᾱ v + √(1 − ᾱ) x_t.
    sample:        x̂_0 = output,                           ε̂ = (x_t − √ᾱ x̂_0) / √(1 − ᾱ).
    model_output, sample: [B x C x H x W] float32; alpha_bar: float32, 0-d or [B, 1, 1, 1].
    Diffusers' operation order (``DDIMScheduler.step``, the SAG pipeline's ``pred_x0`` / ``pred_epsilon``).
    """
    beta = 1 - alpha_bar
    if prediction_type == "epsilon":
        return (sample - beta ** 0.5 * model_output) / alpha_bar ** 0.5, model_output
    if prediction_type == "v_prediction":
        return (alpha_bar ** 0.5 * sample - beta ** 0.5 * model_output,
                alpha_bar ** 0.5 * model_output + beta ** 0.5 * sample)
    assert prediction_type == "sample", prediction_type
    return model_output, (sample - alpha_bar ** 0.5 * model_output) / beta ** 0.5


def _per_sample(coefficient: Tensor, like: Tensor) -> Tensor:
    """A 0-d coefficient as it is (it broadcasts like a scalar); a [B] one viewed [B, 1, 1, 1]."""
    if coefficient.ndim == 0:
        return coefficient
    assert coefficient.ndim == 1 and coefficient.shape[0] in (1, like.shape[0]), \
        f"timesteps {tuple(coefficient.shape)} for a batch {tuple(like.shape)}: give one or one per sample"
    return coefficient.view(-1, *([1] * (like.ndim - 1)))


def _check_pair(model_output: Tensor, sample: Tensor) -> None:
    assert sample.ndim == 4 and model_output.shape == sample.shape, \
        f"model_output {tuple(model_output.shape)} and sample {tuple(sample.shape)} must both be [B x C x H x W]"


def _step_noise(shape: torch.Size, generator: Generators, device: torch.device) -> Tensor:
    """Standard normal noise of ``shape`` in float32 on ``device``: from one generator, or from a list of
    one generator per sample (sample i's noise from generator i alone), drawn on each generator's device."""
    if isinstance(generator, (list, tuple)):
        if len(generator) != shape[0]:
            raise ValueError(f"got {len(generator)} generators for a batch of {shape[0]}; give one per sample")
        return torch.cat([torch.randn((1, *shape[1:]), generator=g, device=g.device) for g in generator]).to(device)
    return torch.randn(shape, generator=generator,
                       device=generator.device if generator is not None else device).to(device)


def _require(class_name: str, options: dict, key: str, allowed: tuple, hint: str = "") -> None:
    value = options[key]
    if value not in allowed:
        raise DiffusionError(f"{class_name}: {key}={value!r} is not supported (supported: "
                             + ", ".join(repr(a) for a in allowed) + ")" + (f"; {hint}" if hint else ""))


# Defaults of the options each class reads, as diffusers 0.42 has them (a key missing from a folder's
# config takes these; keys the class does not read are ignored, as diffusers ignores them).
_COMMON_DEFAULTS = dict(num_train_timesteps=1000, beta_start=0.0001, beta_end=0.02, beta_schedule="linear",
                        trained_betas=None, prediction_type="epsilon", timestep_spacing="leading", steps_offset=0)


class _Scheduler:
    """What the three schedulers share: reading the config, the float32 ᾱ table, device moves."""
    class_defaults: dict = {}
    prediction_types: tuple = ("epsilon", "v_prediction", "sample")

    def __init__(self, config: Optional[dict] = None, **overrides):
        """``config``: a scheduler_config.json dict (keys this class does not read are kept, unused);
        ``overrides`` replace its keys."""
        name = type(self).__name__
        defaults = {**_COMMON_DEFAULTS, **self.class_defaults}
        given = {**(config or {}), **overrides}
        options = {key: default if given.get(key) is None else given[key] for key, default in defaults.items()}
        T = options["num_train_timesteps"]
        if isinstance(T, bool) or not isinstance(T, int) or T < 2:
            raise DiffusionError(f"{name}: num_train_timesteps must be an integer >= 2, got {T!r}")
        offset = options["steps_offset"]
        if isinstance(offset, bool) or not isinstance(offset, int) or offset < 0:
            raise DiffusionError(f"{name}: steps_offset must be a non-negative integer, got {offset!r}")
        _require(name, options, "beta_schedule", BETA_SCHEDULES)
        _require(name, options, "timestep_spacing", TIMESTEP_SPACINGS)
        _require(name, options, "prediction_type", self.prediction_types)
        self._validate(name, options)
        # Like a diffusers scheduler's ``config``: the given keys (other classes' too, so that a swap such as
        # scheduler_from_config(dict(s.config), "DDIMScheduler") keeps the folder's clip_sample false), the
        # options this class reads with their defaults filled in, and its own class name.
        self.config = {**given, **options, "_class_name": name}
        self.num_train_timesteps = T
        self.prediction_type = options["prediction_type"]
        betas = sd_betas(options["beta_schedule"], options["beta_start"], options["beta_end"], T,
                         options["trained_betas"])
        if options.get("rescale_betas_zero_snr"):
            betas = rescale_zero_terminal_snr(betas)
        self.betas = betas
        self.alphas_cumprod = torch.cumprod(1.0 - betas, dim=0)    # ᾱ_t, [T] float32
        self.num_inference_steps: Optional[int] = None
        self.timesteps: Optional[Tensor] = None

    def _validate(self, name: str, options: dict) -> None:
        """Class-specific option checks (one-line DiffusionError)."""

    def _spaced(self, num_inference_steps: int) -> np.ndarray:
        return spaced_timesteps(self.config["timestep_spacing"], self.num_train_timesteps, num_inference_steps,
                                self.config["steps_offset"])

    @staticmethod
    def _lookup(table: Tensor, timestep: Timestep) -> Tensor:
        """table[t] for integer timesteps t (a number, 0-d or [B] tensor) → t's shape, on the table's device.

        ``index_select``, not ``table[t]``: indexing with a 0-d tensor reads its value on the host.
        """
        t = torch.as_tensor(timestep, device=table.device).long()
        return table.index_select(0, t.reshape(-1)).reshape(t.shape)

    def _check_ready(self) -> None:
        if self.num_inference_steps is None:
            raise DiffusionError(f"{type(self).__name__}: call set_timesteps(num_inference_steps) before step()")

    def __repr__(self) -> str:
        return f"{type(self).__name__}({self.config})"


class _VPScheduler(_Scheduler):
    """DDIM and PNDM: integer timesteps, the VP sample x_t = √ᾱ_t x_0 + √(1 − ᾱ_t) ε."""
    init_noise_sigma = 1.0   # x_T ~ N(0, I)

    def __init__(self, config: Optional[dict] = None, **overrides):
        super().__init__(config, **overrides)
        # ᾱ "before" the last step: 1, or ᾱ_0 (SD's set_alpha_to_one = False).
        self.final_alpha_cumprod = (torch.tensor(1.0) if self.config["set_alpha_to_one"]
                                    else self.alphas_cumprod[0])

    def _set_timesteps(self, num_inference_steps: int, device) -> np.ndarray:
        timesteps = np.round(self._spaced(num_inference_steps)).astype(np.int64)
        self.num_inference_steps = num_inference_steps
        self.alphas_cumprod = self.alphas_cumprod.to(device)
        self.final_alpha_cumprod = self.final_alpha_cumprod.to(device)
        return timesteps

    def _alpha_bar_prev(self, prev_timestep: Tensor) -> Tensor:
        """ᾱ at the previous timestep, or ``final_alpha_cumprod`` below 0 (chosen on the device)."""
        return torch.where(prev_timestep >= 0, self._lookup(self.alphas_cumprod, prev_timestep.clamp(min=0)),
                           self.final_alpha_cumprod)

    def _timestep_tensor(self, timestep: Timestep) -> Tensor:
        return torch.as_tensor(timestep, device=self.alphas_cumprod.device).long()

    def scale_model_input(self, sample: Tensor, timestep: Timestep = None) -> Tensor:
        """The U-Net input: the VP sample itself."""
        return sample

    def to_x0_eps(self, model_output: Tensor, timestep: Timestep, sample: Tensor):
        """(x̂_0, ε̂) of a model output at the VP sample x_t (``vp_x0_eps``), both [B x C x H x W] float32.

        What diffusers' SAG pipeline calls ``pred_x0`` / ``pred_epsilon``; x̂_0 is not clipped.
        """
        _check_pair(model_output, sample)
        alpha_bar = _per_sample(self._lookup(self.alphas_cumprod, timestep), sample)
        return vp_x0_eps(model_output.float(), sample.float(), alpha_bar, self.prediction_type)

    def add_noise(self, x0: Tensor, noise: Tensor, timestep: Timestep) -> Tensor:
        """x_t = √ᾱ_t · x_0 + √(1 − ᾱ_t) · ε  (DDPM Eq. 4; diffusers' ``add_noise``).  [B x C x H x W] → same."""
        assert x0.shape == noise.shape, (x0.shape, noise.shape)
        alpha_bar = _per_sample(self._lookup(self.alphas_cumprod, timestep), x0)
        return alpha_bar ** 0.5 * x0.float() + (1 - alpha_bar) ** 0.5 * noise.float()


class DDIMScheduler(_VPScheduler):
    """DDIM (Song et al. 2021) with η, as diffusers' ``DDIMScheduler``.

    Step t → t − T//n (diffusers uses this fixed stride for every spacing); below 0 the step goes to
    ``final_alpha_cumprod``.  Options: clip_sample (+ clip_sample_range), set_alpha_to_one,
    rescale_betas_zero_snr; thresholding is refused.
    """
    class_defaults = dict(set_alpha_to_one=True, clip_sample=True, clip_sample_range=1.0, thresholding=False,
                          rescale_betas_zero_snr=False)

    def _validate(self, name, options):
        _require(name, options, "thresholding", (False,), "dynamic thresholding is for pixel-space models, "
                 "not SD latents: set thresholding false")

    def set_timesteps(self, num_inference_steps: int, device=None) -> None:
        """``timesteps``: [n] int64 on ``device``, noisiest first (leading, 50 steps, offset 1: 981 … 1)."""
        self.timesteps = torch.from_numpy(self._set_timesteps(num_inference_steps, device)).to(device)

    def step(self, model_output: Tensor, timestep: Timestep, sample: Tensor, eta: float = 0.0,
             generator: Generators = None, noise: Optional[Tensor] = None) -> SchedulerStep:
        """x_{t'} = √ᾱ_{t'} x̂_0 + √(1 − ᾱ_{t'} − σ²) ε̂ + σ z, t' = t − T//n, σ = σ_t(η)  (DDIM Eqs. 12, 16).

        model_output, sample: [B x C x H x W]; timestep: an entry of ``timesteps`` (number or 0-d tensor);
        η > 0 draws z from ``generator`` (one, or one per sample) unless ``noise`` [B x C x H x W] is given.
        """
        self._check_ready()
        _check_pair(model_output, sample)
        t = self._timestep_tensor(timestep)
        alpha_bar = _per_sample(self._lookup(self.alphas_cumprod, t), sample)
        alpha_bar_prev = _per_sample(self._alpha_bar_prev(t - self.num_train_timesteps // self.num_inference_steps),
                                     sample)
        pred_x0, eps = vp_x0_eps(model_output.float(), sample.float(), alpha_bar, self.prediction_type)
        if self.config["clip_sample"]:
            clip = self.config["clip_sample_range"]
            pred_x0 = pred_x0.clamp(-clip, clip)          # ε̂ stays the model's (diffusers' default)
        sigma = ddim_sigma_from_alphas(alpha_bar, alpha_bar_prev, eta)
        prev_sample = ddim_mean(pred_x0, eps, alpha_bar_prev, sigma)
        if eta > 0:
            if noise is not None and generator is not None:
                raise ValueError("give the DDIM step either noise or generator, not both")
            if noise is None:
                noise = _step_noise(sample.shape, generator, sample.device)
            assert noise.shape == sample.shape, (noise.shape, sample.shape)
            prev_sample = prev_sample + sigma * noise.float()
        return SchedulerStep(prev_sample, pred_x0)


class PNDMScheduler(_VPScheduler):
    """PLMS, the linear multistep part of PNDM (Liu et al. 2022), as diffusers' ``PNDMScheduler`` with
    ``skip_prk_steps`` (Stable Diffusion 1.x's scheduler): n inference steps take n + 1 model calls.

    Timesteps (leading, 4 steps, offset 1): 751, 501, 501, 251, 1.  Over one run it keeps the model
    outputs ε_k of the calls (ε_1, the second call's, is not kept) and steps with
      call 0:  ε' = ε_0                              from x at t_0, stores x and ε_0
      call 1:  ε' = (ε_0 + ε_1)/2                    re-steps from the stored x at t_0
      call 2:  ε' = (3 ε_k − ε_{k−1})/2             (Adams–Bashforth 2, on the kept history)
      call 3:  ε' = (23 ε_k − 16 ε_{k−1} + 5 ε_{k−2})/12
      later:   ε' = (55 ε_k − 59 ε_{k−1} + 37 ε_{k−2} − 9 ε_{k−3})/24
    each through the transfer φ (PNDM Eq. 11), which equals the DDIM η = 0 update in exact arithmetic:
      x_{t'} = √(ᾱ_{t'}/ᾱ_t) x_t − (ᾱ_{t'} − ᾱ_t) ε' / (ᾱ_t √(1 − ᾱ_{t'}) + √(ᾱ_t (1 − ᾱ_t) ᾱ_{t'})).
    With v-prediction the history holds the raw v outputs and ε' is the combined v turned into ε at the
    stepped sample (diffusers' rule; only call 0 equals the ε-prediction run exactly).
    ``set_timesteps`` starts a fresh history.  The Runge–Kutta warm-up (skip_prk_steps false) is refused.
    """
    class_defaults = dict(set_alpha_to_one=False, skip_prk_steps=False)
    prediction_types = ("epsilon", "v_prediction")

    def _validate(self, name, options):
        _require(name, options, "skip_prk_steps", (True,), "the Runge-Kutta warm-up is not implemented; SD's "
                 "configs set skip_prk_steps true (pass skip_prk_steps=True)")

    def set_timesteps(self, num_inference_steps: int, device=None) -> None:
        """``timesteps``: [n + 1] int64 on ``device``, the second one repeated; resets the PLMS history."""
        ascending = self._set_timesteps(num_inference_steps, device)[::-1]
        plms = np.concatenate([ascending[:-1], ascending[-2:-1], ascending[-1:]])[::-1].copy()
        self.timesteps = torch.from_numpy(plms).to(device)
        self._history: list[Tensor] = []          # kept raw model outputs, at most 4
        self._first_sample: Optional[Tensor] = None
        self._calls = 0

    def _transfer(self, sample: Tensor, timestep: Tensor, prev_timestep: Tensor, combined: Tensor) -> Tensor:
        """φ: x_t → x_{t'} along the combined output (PNDM Eq. 11), diffusers' float32 operation order.

        The history holds raw model outputs; with v-prediction the combination is turned into ε here, at
        the stepped sample and timestep (as diffusers does), not each output at its own step.
        """
        alpha_bar = _per_sample(self._lookup(self.alphas_cumprod, timestep), sample)
        alpha_bar_prev = _per_sample(self._alpha_bar_prev(prev_timestep), sample)
        eps = combined
        if self.prediction_type == "v_prediction":
            eps = vp_x0_eps(combined, sample, alpha_bar, "v_prediction")[1]
        sample_coeff = (alpha_bar_prev / alpha_bar) ** 0.5
        eps_denominator = (alpha_bar * (1 - alpha_bar_prev) ** 0.5
                           + (alpha_bar * (1 - alpha_bar) * alpha_bar_prev) ** 0.5)
        return sample_coeff * sample - (alpha_bar_prev - alpha_bar) * eps / eps_denominator

    def step(self, model_output: Tensor, timestep: Timestep, sample: Tensor, eta: float = 0.0,
             generator: Generators = None) -> SchedulerStep:
        """One PLMS step (see the class docstring).  model_output, sample: [B x C x H x W]; timestep: the
        next entry of ``timesteps`` (the calls must follow them in order).  eta must be 0 (deterministic)."""
        self._check_ready()
        _check_pair(model_output, sample)
        if eta != 0:
            raise ValueError("PNDMScheduler is deterministic: eta must be 0 (eta is a DDIM option)")
        output, sample = model_output.float(), sample.float()
        pred_x0 = self.to_x0_eps(output, timestep, sample)[0]
        stride = self.num_train_timesteps // self.num_inference_steps
        t = self._timestep_tensor(timestep)
        calls, history = self._calls, self._history
        if calls == 1:
            # Second call at the same t: average with the first output, re-step from the stored x at t + stride.
            t, prev_t = t + stride, t
            combined, sample = (output + history[-1]) / 2, self._first_sample
            self._first_sample = None
        else:
            prev_t = t - stride
            self._history = history = history[-3:] + [output]
            if calls == 0:
                combined, self._first_sample = output, sample
            elif len(history) == 2:
                combined = (3 * history[-1] - history[-2]) / 2
            elif len(history) == 3:
                combined = (23 * history[-1] - 16 * history[-2] + 5 * history[-3]) / 12
            else:
                combined = (1 / 24) * (55 * history[-1] - 59 * history[-2] + 37 * history[-3] - 9 * history[-4])
        self._calls += 1
        return SchedulerStep(self._transfer(sample, t, prev_t, combined), pred_x0)


class EulerDiscreteScheduler(_Scheduler):
    """Euler's method on the probability-flow ODE in σ space (Karras et al. 2022, Algorithm 1 without
    churn), as diffusers' ``EulerDiscreteScheduler``: x = x_0 + σ ε, x̂_0 from the model, then
      x_{next} = x + (x − x̂_0)/σ · (σ_next − σ).
    σ_i = √((1 − ᾱ)/ᾱ) linearly interpolated at the (float) timesteps, then 0 appended (or σ_min with
    final_sigmas_type "sigma_min").  The U-Net sees ``scale_model_input`` = x / √(σ² + 1) and the start is
    x_T = init_noise_sigma · z.  Refused: karras / exponential / beta sigmas, log-linear interpolation,
    continuous v-prediction timesteps.
    """
    class_defaults = dict(timestep_spacing="linspace", interpolation_type="linear", use_karras_sigmas=False,
                          use_exponential_sigmas=False, use_beta_sigmas=False, timestep_type="discrete",
                          final_sigmas_type="zero", rescale_betas_zero_snr=False)

    def _validate(self, name, options):
        for key in ("use_karras_sigmas", "use_exponential_sigmas", "use_beta_sigmas"):
            _require(name, options, key, (False,), "only the interpolated training sigmas are implemented")
        _require(name, options, "interpolation_type", ("linear",))
        _require(name, options, "final_sigmas_type", ("zero", "sigma_min"))
        if options["timestep_type"] != "discrete" and options["prediction_type"] == "v_prediction":
            raise DiffusionError(f"{name}: timestep_type={options['timestep_type']!r} with v_prediction is not "
                                 "supported (supported: 'discrete')")

    def __init__(self, config: Optional[dict] = None, **overrides):
        super().__init__(config, **overrides)
        if self.config["rescale_betas_zero_snr"]:
            self.alphas_cumprod[-1] = 2.0 ** -24      # σ_T finite (diffusers' choice)
        self._train_sigmas = ((1 - self.alphas_cumprod) / self.alphas_cumprod) ** 0.5   # [T] float32
        # Before set_timesteps: every training step, as diffusers starts.
        T = self.num_train_timesteps
        self._set_schedule(np.linspace(0, T - 1, T)[::-1].astype(np.float32),
                           torch.cat([self._train_sigmas.flip(0), torch.zeros(1)]), None)

    def _set_schedule(self, timesteps: np.ndarray, sigmas: Tensor, device) -> None:
        self._host_timesteps = timesteps                                 # for checks on CPU values
        self.timesteps = torch.from_numpy(timesteps.copy()).to(device)   # [n] float32
        self.sigmas = sigmas.to(device)                                  # [n + 1] float32

    def set_timesteps(self, num_inference_steps: int, device=None) -> None:
        """``timesteps`` [n] float32 and ``sigmas`` [n + 1] float32 on ``device``, noisiest first."""
        timesteps = self._spaced(num_inference_steps).astype(np.float32)
        train_sigmas = self._train_sigmas.numpy()
        sigmas = np.interp(timesteps, np.arange(0, len(train_sigmas)), train_sigmas)   # float64
        last = 0.0 if self.config["final_sigmas_type"] == "zero" else float(
            ((1 - self.alphas_cumprod[0]) / self.alphas_cumprod[0]) ** 0.5)
        sigmas = torch.from_numpy(np.concatenate([sigmas, [last]]).astype(np.float32))
        self.num_inference_steps = num_inference_steps
        self._set_schedule(timesteps, sigmas, device)

    @property
    def init_noise_sigma(self) -> Tensor:
        """The std of x_T: σ_max for "linspace" / "trailing" spacing, √(σ_max² + 1) for "leading" (0-d)."""
        sigma_max = self.sigmas.max()
        if self.config["timestep_spacing"] in ("linspace", "trailing"):
            return sigma_max
        return (sigma_max ** 2 + 1) ** 0.5

    def _sigmas_at(self, timestep: Timestep, like: Tensor):
        """(σ, σ_next) of the scheduled timestep(s) t, found on the device: 0-d, or [B, 1, 1, 1] for [B] t.

        t must be one of ``timesteps`` (a number or a CPU tensor is checked; a device tensor is not, to
        avoid a host sync; an unscheduled one would give σ = 0).
        """
        if not isinstance(timestep, Tensor) or timestep.device.type == "cpu":
            values = np.asarray(torch.as_tensor(timestep, dtype=torch.float32)).reshape(-1)
            if not np.isin(values, self._host_timesteps).all():
                raise DiffusionError(f"EulerDiscreteScheduler: timestep {values.tolist()} is not in the schedule; "
                                     "pass entries of scheduler.timesteps (call set_timesteps first)")
        t = torch.as_tensor(timestep, device=self.timesteps.device, dtype=torch.float32)
        match = (self.timesteps == t.unsqueeze(-1)).float()     # [n] or [B, n], one 1 per row
        sigma = (match * self.sigmas[:-1]).sum(-1)
        sigma_next = (match * self.sigmas[1:]).sum(-1)
        return _per_sample(sigma, like), _per_sample(sigma_next, like)

    def scale_model_input(self, sample: Tensor, timestep: Timestep) -> Tensor:
        """The U-Net input x / √(σ² + 1): the VP sample of the same (x_0, ε).  [B x C x H x W] → same."""
        sigma = self._sigmas_at(timestep, sample)[0]
        return sample / ((sigma ** 2 + 1) ** 0.5)

    def _x0_eps(self, model_output: Tensor, sample: Tensor, sigma: Tensor):
        """(x̂_0, ε̂) at the σ-space sample x = x_0 + σ ε; the model saw x / √(σ² + 1) (float32 in and out).

        epsilon:       x̂_0 = x − σ ε̂.
        v_prediction:  x̂_0 = −σ/√(σ² + 1) · v + x/(σ² + 1),  ε̂ = v/√(σ² + 1) + σ x/(σ² + 1)
                       (``vp_x0_eps`` at x_vp = x/√(σ² + 1), ᾱ = 1/(σ² + 1)).
        sample:        x̂_0 = output,  ε̂ = (x − x̂_0)/σ.
        """
        if self.prediction_type == "epsilon":
            return sample - sigma * model_output, model_output
        if self.prediction_type == "v_prediction":
            variance = sigma ** 2 + 1
            return (model_output * (-sigma / variance ** 0.5) + sample / variance,
                    model_output / variance ** 0.5 + sigma * sample / variance)
        return model_output, (sample - model_output) / sigma

    def to_x0_eps(self, model_output: Tensor, timestep: Timestep, sample: Tensor):
        """(x̂_0, ε̂) of a model output (the U-Net ran on ``scale_model_input(sample)``) at the σ-space
        ``sample``: x = x̂_0 + σ ε̂.  Both [B x C x H x W] float32."""
        _check_pair(model_output, sample)
        sigma = self._sigmas_at(timestep, sample)[0]
        return self._x0_eps(model_output.float(), sample.float(), sigma)

    def add_noise(self, x0: Tensor, noise: Tensor, timestep: Timestep) -> Tensor:
        """x = x_0 + σ_t · ε, the σ-space sample at a scheduled timestep.  [B x C x H x W] → same."""
        assert x0.shape == noise.shape, (x0.shape, noise.shape)
        sigma = self._sigmas_at(timestep, x0)[0]
        return x0.float() + noise.float() * sigma

    def step(self, model_output: Tensor, timestep: Timestep, sample: Tensor, eta: float = 0.0,
             generator: Generators = None) -> SchedulerStep:
        """x_next = x + (x − x̂_0)/σ · (σ_next − σ).  model_output, sample: [B x C x H x W]; timestep: an
        entry of ``timesteps``.  Deterministic: eta must be 0 (churn is not implemented)."""
        _check_pair(model_output, sample)
        if eta != 0:
            raise ValueError("EulerDiscreteScheduler is deterministic: eta must be 0 (eta is a DDIM option)")
        sample = sample.float()
        sigma, sigma_next = self._sigmas_at(timestep, sample)
        pred_x0 = self._x0_eps(model_output.float(), sample, sigma)[0]
        derivative = (sample - pred_x0) / sigma
        return SchedulerStep(sample + derivative * (sigma_next - sigma), pred_x0)


SUPPORTED_SCHEDULERS = {cls.__name__: cls for cls in (DDIMScheduler, PNDMScheduler, EulerDiscreteScheduler)}


def scheduler_from_config(config: dict, class_name: Optional[str] = None, **overrides):
    """The scheduler a ``scheduler_config.json`` dict describes: class ``class_name``, else
    ``config["_class_name"]``; ``overrides`` replace config keys (e.g. ``skip_prk_steps=True`` when a
    DDIM folder's config is run with PNDM).  An unsupported class is one DiffusionError line."""
    name = class_name or config.get("_class_name")
    supported = ", ".join(SUPPORTED_SCHEDULERS)
    if name is None:
        raise DiffusionError(f"the scheduler config has no _class_name; pass class_name (supported: {supported})")
    if name not in SUPPORTED_SCHEDULERS:
        raise DiffusionError(f"{name} is not supported; supported: {supported}")
    return SUPPORTED_SCHEDULERS[name](config, **overrides)
