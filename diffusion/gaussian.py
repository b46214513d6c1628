"""The (respaced) Gaussian diffusion process: forward noising, posterior, model output → p(x_{t−1}|x_t),
one DDPM step, one DDIM step, classifier-guidance corrections and the training objective.

Sources (equation numbers refer to the arXiv versions):
  * Ho et al. 2020, DDPM (arXiv 2006.11239): q(x_t|x_0) Eq. 4, posterior q(x_{t−1}|x_t, x_0)
    Eqs. 6–7, x̂_0 from ε Eq. 15, ancestral sampling Algorithm 2.
  * Nichol & Dhariwal 2021, IDDPM (arXiv 2102.09672): learned-range variance Eq. 15, hybrid loss
    Eq. 16, timestep respacing §4.
  * Song et al. 2021, DDIM (arXiv 2010.02502): update Eq. 12, σ_t(η) Eq. 16.
  * Dhariwal & Nichol 2021, ADM (arXiv 2105.05233): classifier guidance as a mean shift
    (Algorithm 1, after Sohl-Dickstein et al. 2015) and as a score shift (Algorithm 2).
  * openai/guided-diffusion @ 22e0df8: ``guided_diffusion/gaussian_diffusion.py`` and
    ``guided_diffusion/respace.py`` (``SpacedDiffusion``, ``_WrappedModel``); improved-diffusion
    @ 1bc7bbb for ``rescale_timesteps``.

Timesteps ``t`` are always indices into the *respaced* process (0..num_timesteps−1), a LongTensor
[N]; ``model_timesteps(t)`` is what the network sees.  Official quirks reproduced on purpose:
  * the process is always the respaced one, even with respacing "": betas are re-derived as
    1 − ᾱ_i/ᾱ_prev from the base ᾱ at the kept steps (they differ from the base betas in the last bit);
  * every coefficient is gathered from a float64 table and rounded to float32 before it multiplies a
    tensor (``_extract_into_tensor``), so the sampling state stays float32;
  * FIXED_LARGE uses the variance append(β̃_1, β_{1:}) of the respaced process.
"""
from __future__ import annotations

import enum
from typing import Callable, NamedTuple, Optional

import numpy as np
import torch
from torch import Tensor

from .config import DiffusionConfig
from .losses import discretized_gaussian_log_likelihood, mean_flat, normal_kl
from .schedules import get_named_beta_schedule, space_timesteps


class ModelMeanType(enum.Enum):
    """What the first C output channels of the network predict."""
    EPSILON = "epsilon"   # the noise ε
    START_X = "start_x"   # x_0 itself


class ModelVarType(enum.Enum):
    """Where the variance of p(x_{t−1}|x_t) comes from."""
    LEARNED = "learned"              # channels C:2C are log σ² directly
    LEARNED_RANGE = "learned_range"  # channels C:2C are v ∈ [−1, 1] between log β̃_t and log β_t
    FIXED_SMALL = "fixed_small"      # σ² = β̃_t (posterior variance)
    FIXED_LARGE = "fixed_large"      # σ² = β_t (with β̃_1 at t = 0)


class MeanVariance(NamedTuple):
    """p(x_{t−1}|x_t) from one model output; every field is [N x C x H x W] float32."""
    mean: Tensor          # posterior mean from the processed x̂_0
    variance: Tensor      # σ²_t
    log_variance: Tensor  # log σ²_t
    pred_x0: Tensor       # x̂_0 after denoised_fn and clipping
    eps: Tensor           # ε̂: the raw eps channels (EPSILON) or derived from x̂_0 (START_X)


class ScoreCondition(NamedTuple):
    """Result of ``condition_score``: the shifted x̂_0 and ε̂, both [N x C x H x W]."""
    pred_x0: Tensor
    eps: Tensor


def _check_batch(x: Tensor, t: Tensor) -> None:
    assert t.ndim == 1 and x.ndim >= 1 and t.shape[0] == x.shape[0], \
        f"t must be [N] for x [N x ...], got t {tuple(t.shape)} and x {tuple(x.shape)}"


def ddim_sigma_from_alphas(alpha_bar: Tensor, alpha_bar_prev: Tensor, eta: float) -> Tensor:
    """σ_t(η) = η · √((1 − ᾱ_{t−1})/(1 − ᾱ_t)) · √(1 − ᾱ_t/ᾱ_{t−1})  (DDIM Eq. 16).

    alpha_bar, alpha_bar_prev: float32 tensors of one shape (0-d, [N] or broadcast to the sample);
    eta: Python float.  Shared by ``GaussianDiffusion.ddim_sigma`` and the SD DDIM scheduler.
    """
    return eta * torch.sqrt((1 - alpha_bar_prev) / (1 - alpha_bar)) * torch.sqrt(1 - alpha_bar / alpha_bar_prev)


def ddim_mean(pred_x0: Tensor, eps: Tensor, alpha_bar_prev: Tensor, sigma: Tensor) -> Tensor:
    """The deterministic part of the DDIM update (DDIM Eq. 12): √ᾱ_{t−1} · x̂_0 + √(1 − ᾱ_{t−1} − σ_t²) · ε.

    pred_x0, eps: [N x C x H x W]; alpha_bar_prev, sigma: float32 coefficients that broadcast against
    them (0-d, or [N, 1, 1, 1] / expanded).  The step adds σ_t · z to this when η > 0.
    Shared by ``GaussianDiffusion.ddim_step`` and the SD DDIM scheduler (same float32 operations).
    """
    return pred_x0 * torch.sqrt(alpha_bar_prev) + torch.sqrt(1 - alpha_bar_prev - sigma ** 2) * eps


class GaussianDiffusion:
    """A Gaussian diffusion process respaced onto the kept timesteps of a base schedule.

    All schedule arrays are float64 numpy of length ``num_timesteps`` with the guided-diffusion names.
    """

    def __init__(self, config: DiffusionConfig, *, model_mean_type: Optional[ModelMeanType] = None,
                 model_var_type: Optional[ModelVarType] = None):
        """Build from ``config``; the optional overrides select types no official flag can (LEARNED)."""
        config.validate()
        self.config = config
        self.model_mean_type = model_mean_type or (
            ModelMeanType.START_X if config.predict_xstart else ModelMeanType.EPSILON)
        self.model_var_type = model_var_type or (
            ModelVarType.LEARNED_RANGE if config.learn_sigma else
            ModelVarType.FIXED_SMALL if config.sigma_small else ModelVarType.FIXED_LARGE)
        self.rescale_timesteps = config.rescale_timesteps
        self.original_num_steps = config.steps

        # Respacing (IDDPM §4): keep ᾱ at the chosen steps, re-derive β_i = 1 − ᾱ_i / ᾱ_prev.
        base_betas = get_named_beta_schedule(config.noise_schedule, config.steps)
        base_alphas_cumprod = np.cumprod(1.0 - base_betas, axis=0)
        kept = space_timesteps(config.steps, config.timestep_respacing)
        self.timestep_map = np.array(kept, dtype=np.int64)
        kept_alphas_cumprod = base_alphas_cumprod[self.timestep_map]
        betas = 1.0 - kept_alphas_cumprod / np.append(1.0, kept_alphas_cumprod[:-1])
        assert (betas > 0).all() and (betas <= 1).all()
        self.betas = betas
        self.num_timesteps = len(betas)

        # Marginals q(x_t | x_0) (DDPM Eq. 4), in float64 with the official operation order.
        alphas = 1.0 - betas
        self.alphas_cumprod = np.cumprod(alphas, axis=0)
        self.alphas_cumprod_prev = np.append(1.0, self.alphas_cumprod[:-1])
        self.alphas_cumprod_next = np.append(self.alphas_cumprod[1:], 0.0)
        self.sqrt_alphas_cumprod = np.sqrt(self.alphas_cumprod)
        self.sqrt_one_minus_alphas_cumprod = np.sqrt(1.0 - self.alphas_cumprod)
        self.log_one_minus_alphas_cumprod = np.log(1.0 - self.alphas_cumprod)
        self.sqrt_recip_alphas_cumprod = np.sqrt(1.0 / self.alphas_cumprod)
        self.sqrt_recipm1_alphas_cumprod = np.sqrt(1.0 / self.alphas_cumprod - 1)

        # Posterior q(x_{t−1} | x_t, x_0) (DDPM Eqs. 6–7); β̃_0 = 0, so its log is clipped to β̃_1.
        self.posterior_variance = betas * (1.0 - self.alphas_cumprod_prev) / (1.0 - self.alphas_cumprod)
        self.posterior_log_variance_clipped = np.log(
            np.append(self.posterior_variance[1], self.posterior_variance[1:]))
        self.posterior_mean_coef1 = betas * np.sqrt(self.alphas_cumprod_prev) / (1.0 - self.alphas_cumprod)
        self.posterior_mean_coef2 = ((1.0 - self.alphas_cumprod_prev) * np.sqrt(alphas)
                                     / (1.0 - self.alphas_cumprod))
        # FIXED_LARGE: β_t, with β̃_1 at t = 0 "to get a better decoder log likelihood" (official).
        self.fixed_large_variance = np.append(self.posterior_variance[1], betas[1:])
        self._device_tables: dict[torch.device, dict[str, Tensor]] = {}

    @classmethod
    def from_config(cls, config: DiffusionConfig) -> "GaussianDiffusion":
        """The process ``create_gaussian_diffusion`` builds from the same flags (always respaced)."""
        return cls(config)

    # ----------------------------------------------------------------- coefficient extraction
    _TABLES = ("betas", "alphas_cumprod", "alphas_cumprod_prev", "sqrt_alphas_cumprod",
               "sqrt_one_minus_alphas_cumprod", "sqrt_recip_alphas_cumprod",
               "sqrt_recipm1_alphas_cumprod", "posterior_variance", "posterior_log_variance_clipped",
               "posterior_mean_coef1", "posterior_mean_coef2", "fixed_large_variance")

    def _tables(self, device: torch.device) -> dict[str, Tensor]:
        """The float64 tables on ``device``, copied once per device (no per-call host copies)."""
        tables = self._device_tables.get(device)
        if tables is None:
            arrays = {name: getattr(self, name) for name in self._TABLES}
            arrays["log_betas"] = np.log(self.betas)
            arrays["fixed_large_log_variance"] = np.log(self.fixed_large_variance)
            # MPS has no float64; rounding to float32 before the gather gives the same values.
            dtype = torch.float32 if device.type == "mps" else torch.float64
            tables = {name: torch.from_numpy(a).to(device=device, dtype=dtype)
                      for name, a in arrays.items()}
            tables["timestep_map"] = torch.from_numpy(self.timestep_map).to(device)
            self._device_tables[device] = tables
        return tables

    def _extract(self, name: str, t: Tensor, shape: torch.Size) -> Tensor:
        """table[t] rounded to float32, viewed [N, 1, …] and expanded to ``shape`` (official order)."""
        coef = self._tables(t.device)[name][t].float()
        return coef.view(-1, *([1] * (len(shape) - 1))).expand(shape)

    def model_timesteps(self, t: Tensor) -> Tensor:
        """What the network receives for respaced index t: [N] → [N].

        timestep_map[t] (int64), or timestep_map[t] · 1000/T_original as float32 when
        ``rescale_timesteps`` (improved-diffusion's default).
        """
        assert t.ndim == 1, f"t must be [N], got {tuple(t.shape)}"
        mapped = self._tables(t.device)["timestep_map"][t]
        if self.rescale_timesteps:
            return mapped.float() * (1000.0 / self.original_num_steps)
        return mapped

    # ------------------------------------------------------------------- forward process
    def q_sample(self, x0: Tensor, t: Tensor, noise: Tensor) -> Tensor:
        """x_t = √ᾱ_t · x_0 + √(1 − ᾱ_t) · ε  (DDPM Eq. 4).  x0, noise: [N x C x H x W] → same."""
        _check_batch(x0, t)
        assert noise.shape == x0.shape, (noise.shape, x0.shape)
        return (self._extract("sqrt_alphas_cumprod", t, x0.shape) * x0
                + self._extract("sqrt_one_minus_alphas_cumprod", t, x0.shape) * noise)

    def q_posterior_mean_variance(self, x0: Tensor, x_t: Tensor, t: Tensor):
        """q(x_{t−1} | x_t, x_0) = N(μ̃, β̃_t) with μ̃ = coef1_t · x_0 + coef2_t · x_t (DDPM Eqs. 6–7).

        x0, x_t: [N x C x H x W].  Returns (mean, variance, log_variance_clipped), each of that shape.
        """
        _check_batch(x_t, t)
        assert x0.shape == x_t.shape, (x0.shape, x_t.shape)
        mean = (self._extract("posterior_mean_coef1", t, x_t.shape) * x0
                + self._extract("posterior_mean_coef2", t, x_t.shape) * x_t)
        return (mean, self._extract("posterior_variance", t, x_t.shape),
                self._extract("posterior_log_variance_clipped", t, x_t.shape))

    def predict_x0_from_eps(self, x_t: Tensor, t: Tensor, eps: Tensor) -> Tensor:
        """x̂_0 = √(1/ᾱ_t) · x_t − √(1/ᾱ_t − 1) · ε  (DDPM Eq. 15).  [N x C x H x W] → same."""
        _check_batch(x_t, t)
        assert eps.shape == x_t.shape, (eps.shape, x_t.shape)
        return (self._extract("sqrt_recip_alphas_cumprod", t, x_t.shape) * x_t
                - self._extract("sqrt_recipm1_alphas_cumprod", t, x_t.shape) * eps)

    def predict_eps_from_x0(self, x_t: Tensor, t: Tensor, x0: Tensor) -> Tensor:
        """ε = (√(1/ᾱ_t) · x_t − x_0) / √(1/ᾱ_t − 1), the inverse of ``predict_x0_from_eps``."""
        _check_batch(x_t, t)
        assert x0.shape == x_t.shape, (x0.shape, x_t.shape)
        return ((self._extract("sqrt_recip_alphas_cumprod", t, x_t.shape) * x_t - x0)
                / self._extract("sqrt_recipm1_alphas_cumprod", t, x_t.shape))

    # ------------------------------------------------------------------- reverse process
    def model_variance(self, var_values: Optional[Tensor], x_t: Tensor, t: Tensor):
        """σ²_t and log σ²_t of p(x_{t−1}|x_t) for the model's variance type: each [N x C x H x W].

        LEARNED_RANGE (IDDPM Eq. 15): f = (v + 1)/2, log σ² = f · log β_t + (1 − f) · log β̃_t (clipped).
        LEARNED: log σ² = v.  FIXED_SMALL: β̃_t.  FIXED_LARGE: β_t (β̃_1 at t = 0).
        var_values v: the model's channels C:2C for the learned types, else None.
        """
        _check_batch(x_t, t)
        kind = self.model_var_type
        if kind in (ModelVarType.LEARNED, ModelVarType.LEARNED_RANGE):
            assert var_values is not None and var_values.shape == x_t.shape, \
                f"{kind.name} needs variance values shaped like x_t {tuple(x_t.shape)}"
            if kind == ModelVarType.LEARNED:
                log_var = var_values
            else:
                min_log = self._extract("posterior_log_variance_clipped", t, x_t.shape)
                max_log = self._extract("log_betas", t, x_t.shape)
                frac = (var_values + 1) / 2
                log_var = frac * max_log + (1 - frac) * min_log
            return torch.exp(log_var), log_var
        var_name, log_name = {
            ModelVarType.FIXED_SMALL: ("posterior_variance", "posterior_log_variance_clipped"),
            ModelVarType.FIXED_LARGE: ("fixed_large_variance", "fixed_large_log_variance"),
        }[kind]
        return self._extract(var_name, t, x_t.shape), self._extract(log_name, t, x_t.shape)

    def p_mean_variance(self, model_output: Tensor, x_t: Tensor, t: Tensor, clip_denoised: bool = True,
                        denoised_fn: Optional[Callable[[Tensor], Tensor]] = None) -> MeanVariance:
        """p(x_{t−1}|x_t) from a raw model output, as guided-diffusion's ``p_mean_variance``.

        model_output: [N x C x H x W], or [N x 2C x H x W] for learned variances (ε or x_0 first,
        variance values second); x_t: [N x C x H x W]; t: [N].
        x̂_0 = (ε → x_0 by DDPM Eq. 15, or the output itself), then ``denoised_fn``, then clamp to
        [−1, 1] if ``clip_denoised``; mean = posterior mean from that x̂_0. ε is the output itself,
        or (x_0-predicting models) derived from the unclipped output.
        """
        _check_batch(x_t, t)
        N, C = x_t.shape[:2]
        learned = self.model_var_type in (ModelVarType.LEARNED, ModelVarType.LEARNED_RANGE)
        expected = (N, 2 * C if learned else C, *x_t.shape[2:])
        assert model_output.shape == expected, \
            f"model output {tuple(model_output.shape)}, expected {expected}"
        out, var_values = (torch.split(model_output, C, dim=1) if learned else (model_output, None))
        variance, log_variance = self.model_variance(var_values, x_t, t)

        def process(x0: Tensor) -> Tensor:
            if denoised_fn is not None:
                x0 = denoised_fn(x0)
            return x0.clamp(-1, 1) if clip_denoised else x0

        if self.model_mean_type == ModelMeanType.EPSILON:
            eps = out
            pred_x0 = process(self.predict_x0_from_eps(x_t, t, eps))
        else:
            # x_0-predicting model: eps comes from the raw, unclipped output (as the SAG / PAG
            # repositories' p_mean_variance return it); only x̂_0 is clipped.
            eps = self.predict_eps_from_x0(x_t, t, out)
            pred_x0 = process(out)
        mean, _, _ = self.q_posterior_mean_variance(pred_x0, x_t, t)
        return MeanVariance(mean, variance, log_variance, pred_x0, eps)

    def condition_mean(self, mean: Tensor, variance: Tensor, grad: Tensor) -> Tensor:
        """Classifier guidance as a mean shift: μ + Σ · ∇_x log p(y|x_t) (ADM Algorithm 1).

        mean, variance, grad: [N x C x H x W]; grad already carries the classifier scale.
        """
        assert mean.shape == variance.shape == grad.shape, (mean.shape, variance.shape, grad.shape)
        return mean.float() + variance * grad.float()

    def condition_score(self, pred_x0: Tensor, x_t: Tensor, t: Tensor, grad: Tensor) -> ScoreCondition:
        """Classifier guidance as a score shift (ADM Algorithm 2): ε' = ε − √(1 − ᾱ_t) · ∇_x log p(y|x_t).

        ε is re-derived from ``pred_x0``; x̂_0' = x̂_0(ε') is NOT re-clipped (official behaviour).
        All tensors [N x C x H x W]; t: [N].  The new posterior mean is
        ``q_posterior_mean_variance(result.pred_x0, x_t, t)[0]``.
        """
        _check_batch(x_t, t)
        assert grad.shape == x_t.shape == pred_x0.shape, (grad.shape, x_t.shape, pred_x0.shape)
        alpha_bar = self._extract("alphas_cumprod", t, x_t.shape)
        eps = self.predict_eps_from_x0(x_t, t, pred_x0)
        eps = eps - (1 - alpha_bar).sqrt() * grad   # √(1 − ᾱ) taken in float32, as official
        return ScoreCondition(self.predict_x0_from_eps(x_t, t, eps), eps)

    @staticmethod
    def ddpm_step(mean: Tensor, log_variance: Tensor, t: Tensor, noise: Tensor) -> Tensor:
        """Ancestral step (DDPM Algorithm 2): x_{t−1} = μ + 1[t ≠ 0] · exp(½ log σ²) · z.

        mean, log_variance, noise: [N x C x H x W]; t: [N] (the mask is computed on-device).
        """
        _check_batch(mean, t)
        assert mean.shape == log_variance.shape == noise.shape, \
            (mean.shape, log_variance.shape, noise.shape)
        nonzero = (t != 0).float().view(-1, *([1] * (mean.ndim - 1)))  # no noise at the last step
        return mean + nonzero * torch.exp(0.5 * log_variance) * noise

    def ddim_sigma(self, t: Tensor, eta: float, shape: torch.Size) -> Tensor:
        """σ_t(η) = η · √((1 − ᾱ_{t−1})/(1 − ᾱ_t)) · √(1 − ᾱ_t/ᾱ_{t−1})  (DDIM Eq. 16), broadcast to shape."""
        assert t.ndim == 1 and t.shape[0] == shape[0], f"t must be [N] for shape {tuple(shape)}"
        return ddim_sigma_from_alphas(self._extract("alphas_cumprod", t, shape),
                                      self._extract("alphas_cumprod_prev", t, shape), eta)

    def ddim_step(self, x_t: Tensor, pred_x0: Tensor, t: Tensor, eta: float = 0.0,
                  noise: Optional[Tensor] = None) -> Tensor:
        """DDIM update (Eq. 12): x_{t−1} = x̂_0 √ᾱ_{t−1} + √(1 − ᾱ_{t−1} − σ²) · ε + 1[t ≠ 0] σ z.

        ε is re-derived from ``pred_x0`` (the official SAG/CG path passes the clipped, guided x̂_0).
        x_t, pred_x0, noise: [N x C x H x W]; t: [N]; eta: Python float; noise may be None iff eta == 0
        (the official code adds 0 · z, which changes nothing).
        """
        _check_batch(x_t, t)
        assert pred_x0.shape == x_t.shape, (pred_x0.shape, x_t.shape)
        eps = self.predict_eps_from_x0(x_t, t, pred_x0)
        alpha_bar_prev = self._extract("alphas_cumprod_prev", t, x_t.shape)
        sigma = self.ddim_sigma(t, eta, x_t.shape)
        mean_pred = ddim_mean(pred_x0, eps, alpha_bar_prev, sigma)
        if noise is None:
            assert eta == 0, "ddim_step with eta != 0 needs noise"
            return mean_pred
        assert noise.shape == x_t.shape, (noise.shape, x_t.shape)
        nonzero = (t != 0).float().view(-1, *([1] * (x_t.ndim - 1)))
        return mean_pred + nonzero * sigma * noise

    # ----------------------------------------------------------------------------- training
    def vb_terms_bpd(self, model_output: Tensor, x0: Tensor, x_t: Tensor, t: Tensor,
                     clip_denoised: bool = True):
        """One term of L_vlb in bits per dimension (IDDPM §2): (bpd [N], pred_x0 [N x C x H x W]).

        t > 0: KL(q(x_{t−1}|x_t, x_0) ‖ p(x_{t−1}|x_t)); t = 0: −log p(x_0|x_1), the discretised decoder.
        """
        true_mean, _, true_log_var = self.q_posterior_mean_variance(x0, x_t, t)
        out = self.p_mean_variance(model_output, x_t, t, clip_denoised=clip_denoised)
        kl = mean_flat(normal_kl(true_mean, true_log_var, out.mean, out.log_variance)) / np.log(2.0)
        nll = -discretized_gaussian_log_likelihood(x0, out.mean, 0.5 * out.log_variance)
        nll = mean_flat(nll) / np.log(2.0)
        return torch.where(t == 0, nll, kl), out.pred_x0

    def training_losses(self, model_fn: Callable[[Tensor, Tensor], Tensor], x0: Tensor, t: Tensor,
                        noise: Optional[Tensor] = None) -> dict[str, Tensor]:
        """Per-sample training losses for respaced steps t: {"loss", and "mse"/"vb" where used}, each [N].

        use_kl: loss = T · L_t (rescaled KL).  Otherwise the hybrid objective (IDDPM Eq. 16):
        mse = ‖target − output‖² (target ε or x_0), plus for learned variances vb = L_t computed with
        the mean channels detached, so the variance learns only through vb; vb is scaled by T/1000
        when ``rescale_learned_sigmas``.  model_fn(x_t, model_timesteps(t)) returns the raw output.
        """
        _check_batch(x0, t)
        noise = torch.randn_like(x0) if noise is None else noise
        x_t = self.q_sample(x0, t, noise)
        model_output = model_fn(x_t, self.model_timesteps(t))
        if self.config.use_kl:
            bpd, _ = self.vb_terms_bpd(model_output, x0, x_t, t, clip_denoised=False)
            return {"loss": bpd * self.num_timesteps}
        terms = {}
        if self.model_var_type in (ModelVarType.LEARNED, ModelVarType.LEARNED_RANGE):
            C = x0.shape[1]
            model_output, var_values = torch.split(model_output, C, dim=1)
            frozen = torch.cat([model_output.detach(), var_values], dim=1)
            terms["vb"], _ = self.vb_terms_bpd(frozen, x0, x_t, t, clip_denoised=False)
            if self.config.rescale_learned_sigmas:
                terms["vb"] = terms["vb"] * (self.num_timesteps / 1000.0)  # "the VB term hurts the MSE"
        target = noise if self.model_mean_type == ModelMeanType.EPSILON else x0
        assert model_output.shape == target.shape, (model_output.shape, target.shape)
        terms["mse"] = mean_flat((target - model_output) ** 2)
        terms["loss"] = terms["mse"] + terms.get("vb", 0.0)
        return terms


# The step functions are also usable as plain functions: ddpm_step(mean, log_variance, t, noise)
# and ddim_step(diffusion, x_t, pred_x0, t, eta, noise).
ddpm_step = GaussianDiffusion.ddpm_step
ddim_step = GaussianDiffusion.ddim_step
