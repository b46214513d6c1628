"""Separable Gaussian blur: the degradation SAG applies to the salient part of x0_hat.

The official SAG code blurs the predicted x0 with ``torchvision.transforms.GaussianBlur(kernel_size=31,
sigma=blur_sigma)`` (SAG ``guided_diffusion/gaussian_diffusion.py``, ``attention_masking``, commit
``a36f251dac2fc535e9d0670b86527df9eb1c661c`` of https://github.com/SusungHong/Self-Attention-Guidance).
torchvision (0.12 for the SAG authors, unchanged up to 0.28) does, on a float tensor image:

    k1d[i] = exp(-0.5 * (u_i / sigma)^2) / sum_j exp(-0.5 * (u_j / sigma)^2),
             u = linspace(-(K - 1)/2, (K - 1)/2, K)            (K taps at integer offsets)
    k2d    = outer(k1d, k1d)
    y      = conv2d(reflect_pad(x, K // 2), k2d, groups=C)      (depthwise, "valid")

so, per channel,  y[h, w] = sum_{i, j} k1d[i] k1d[j] x_pad[h + i, w + j].  This module computes the same
thing separably: pad once with ``reflect`` (``d c b | a b c d | c b a``, the edge pixel is not repeated),
convolve along H with k1d, then along W with k1d.  The two orders of summation differ only by float
rounding (<= 1e-6 against the ``blur`` fixture).

Official behaviours kept (SPEC.md Q5, PROVENANCE.md quirk 14):

* the kernel is 31 taps whatever sigma (sigma=3 spans +-5 sigma, sigma=9 is truncated at +-1.67 sigma),
  and the truncated kernel is renormalised to sum 1;
* sigma is rounded to float32 before use (torchvision passes it through a float32 tensor and ``.item()``);
* reflect padding of K // 2 needs H, W >= K // 2 + 1 (16 for 31 taps); smaller images raise.

Official behaviours not kept:

* torchvision's ``GaussianBlur.forward`` draws sigma with ``torch.empty(1).uniform_(sigma, sigma)``, which
  advances the global CPU RNG by one draw per call even though the result is the fixed sigma.  We consume
  no random numbers at all; replaying official noise therefore never depends on how often we blurred.
* torchvision builds the kernel in the image's dtype (on its device); we build it in float32 (float64 for
  float64 images) on the CPU and cast it, identical for float32 images (the only case the official code
  runs) and more accurate for half-precision ones.  Kernels are cached per (K, sigma, device, dtype).
  float16 images on the CPU are blurred in float32 (a PyTorch CPU float16 (1, K) conv stalls).
* the sum is taken in a different order (separable), which is also slightly more accurate: against a
  float64 evaluation with the same float32 k1d, torchvision's float32 output errs by up to 6.2e-7 on the
  fixture inputs (its 2-D kernel outer(k1d, k1d) is itself rounded), ours by up to 1.8e-7.

On CUDA, float32 convolutions may run in TF32 when ``torch.backends.cudnn.allow_tf32`` is on (PyTorch's
default for cuDNN), which changes results at the 1e-3 level; turn it off for parity checks.

No host synchronisation: every check reads shapes only, so the blur runs unchanged on CUDA.
"""
from __future__ import annotations

import functools
import math
import numbers
import struct
from typing import Union

import torch
import torch.nn.functional as F

__all__ = ["gaussian_kernel_1d", "gaussian_blur"]

DeviceLike = Union[torch.device, str, None]


def _round_to_float32(value: float) -> float:
    """The Python float nearest to ``value`` that float32 can hold (what torchvision's ``.item()`` gives)."""
    try:
        return struct.unpack("<f", struct.pack("<f", value))[0]
    except OverflowError:  # beyond float32's range: float32 would make it inf
        return math.inf


def _checked_kernel_size(kernel_size: int) -> int:
    if isinstance(kernel_size, bool) or not isinstance(kernel_size, numbers.Integral):
        raise ValueError(f"kernel_size must be an odd int >= 1, got {kernel_size!r}")
    if kernel_size < 1 or kernel_size % 2 == 0:
        raise ValueError(f"kernel_size must be an odd int >= 1, got {kernel_size}")
    return int(kernel_size)


def _checked_sigma(sigma: float) -> float:
    """Validate sigma and round it to float32, as torchvision does."""
    if isinstance(sigma, torch.Tensor):
        raise ValueError("sigma must be a Python number, not a tensor (reading a tensor would sync the device)")
    if isinstance(sigma, bool) or not isinstance(sigma, numbers.Real):
        raise ValueError(f"sigma must be a finite number > 0, got {sigma!r}")
    sigma32 = _round_to_float32(float(sigma))
    if not (math.isfinite(sigma32) and sigma32 > 0.0):
        raise ValueError(f"sigma must be a finite number > 0 (after rounding to float32), got {sigma!r}")
    return sigma32


@functools.lru_cache(maxsize=128)
def _cached_kernel_1d(kernel_size: int, sigma32: float, device: torch.device, dtype: torch.dtype) -> torch.Tensor:
    # Build on the CPU in float32 (float64 when asked for float64), exactly as torchvision's
    # _get_gaussian_kernel1d does for that dtype, then move and cast once.
    build_dtype = torch.float64 if dtype == torch.float64 else torch.float32
    half_width = (kernel_size - 1) * 0.5
    offsets = torch.linspace(-half_width, half_width, steps=kernel_size, dtype=build_dtype)  # (K,)
    pdf = torch.exp(-0.5 * (offsets / sigma32).pow(2))                                        # (K,)
    kernel = pdf / pdf.sum()                                                                  # (K,), sums to 1
    return kernel.to(device=device, dtype=dtype)


def gaussian_kernel_1d(kernel_size: int, sigma: float, *, device: DeviceLike = None,
                       dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """Normalised, truncated 1-D Gaussian: torchvision's ``_get_gaussian_kernel1d``.

        u_i = i - (K - 1)/2,  i = 0 .. K-1
        k[i] = exp(-0.5 * (u_i / sigma)^2) / sum_j exp(-0.5 * (u_j / sigma)^2)

    sigma is first rounded to float32 (torchvision reads it back from a float32 tensor), and the kernel is
    computed in float32 (float64 if ``dtype`` is float64), then cast to ``dtype`` on ``device``.

    The result is cached per (K, sigma, device, dtype): a second call returns the same tensor object, so
    treat it as read-only.

    Args:
        kernel_size: K, odd, >= 1 (the official SAG value is 31).
        sigma: standard deviation in pixels, finite and > 0.
        device: where the kernel lives (default CPU).
        dtype: floating dtype of the kernel (default float32).

    Returns:
        ``(K,)`` tensor, symmetric, summing to 1 (up to rounding).
    """
    kernel_size = _checked_kernel_size(kernel_size)
    sigma32 = _checked_sigma(sigma)
    if not dtype.is_floating_point:
        raise ValueError(f"dtype must be a floating dtype, got {dtype}")
    device = torch.device("cpu") if device is None else torch.device(device)
    return _cached_kernel_1d(kernel_size, sigma32, device, dtype)


def gaussian_blur(x: torch.Tensor, sigma: float, kernel_size: int = 31) -> torch.Tensor:
    """Gaussian blur with reflect padding, equal to torchvision ``GaussianBlur(kernel_size, sigma)(x)``.

        y[b, c, h, w] = sum_{i, j} k[i] k[j] x_pad[b, c, h + i, w + j],
        x_pad = reflect_pad(x, K // 2 on every side),  k = gaussian_kernel_1d(K, sigma)

    computed separably (one depthwise convolution along H, one along W).  This is the blur of the SAG
    degradation (official ``attention_masking``: ``T.GaussianBlur(kernel_size=31, sigma=blur_sigma)``,
    31 taps whatever sigma).  Unlike torchvision it consumes no random numbers (see the module docstring).

    Shapes: x ``[B x C x H x W]`` floating -> ``[B x C x H x W]``, same dtype and device (also under
    autocast: the convolutions run in x's dtype).  Reflect padding
    needs H, W >= K // 2 + 1 (16 for the official 31 taps).

    Args:
        x: image batch, any floating dtype, any device.
        sigma: standard deviation in pixels, finite and > 0 (rounded to float32, as torchvision does).
        kernel_size: K, odd, >= 1; default 31 as in the official SAG ADM code.
    """
    kernel_size = _checked_kernel_size(kernel_size)
    if x.dim() != 4:
        raise ValueError(f"gaussian_blur expects x of shape (B, C, H, W), got {tuple(x.shape)}")
    if not x.is_floating_point():
        raise ValueError(f"gaussian_blur expects a floating-point image, got {x.dtype}")
    channels, height, width = x.shape[1:]
    pad = kernel_size // 2
    if min(height, width) <= pad:
        largest_kernel = max(2 * min(height, width) - 1, 1)
        raise ValueError(
            f"image {height}x{width} is too small for a {kernel_size}-tap blur (reflect padding {pad} needs "
            f"H, W >= {pad + 1}); pass a smaller odd kernel_size (at most {largest_kernel})")

    device_type = x.device.type
    if torch.amp.is_autocast_available(device_type) and torch.is_autocast_enabled(device_type):
        # Autocast would run the convolutions in half precision; the blur keeps x's dtype instead
        # (SAG blurs the float32 x0 outside the U-Net, whose forward is what mixed precision is for).
        with torch.autocast(device_type, enabled=False):
            return gaussian_blur(x, sigma, kernel_size)
    if device_type == "cpu" and x.dtype == torch.float16:
        # PyTorch's CPU float16 depthwise conv2d with a (1, K) kernel stalls (seen with torch 2.13: over
        # 10 s for a 3x32x62 image, against milliseconds in float32 or bfloat16), so CPU float16 images
        # are blurred in float32 and rounded once at the end (more accurate, not slower).
        return gaussian_blur(x.float(), sigma, kernel_size).to(torch.float16)

    kernel = gaussian_kernel_1d(kernel_size, sigma, device=x.device, dtype=x.dtype)      # (K,)
    kernel_h = kernel.view(1, 1, kernel_size, 1).expand(channels, 1, kernel_size, 1)     # (C, 1, K, 1)
    kernel_w = kernel.view(1, 1, 1, kernel_size).expand(channels, 1, 1, kernel_size)     # (C, 1, 1, K)

    x_pad = F.pad(x, [pad, pad, pad, pad], mode="reflect")       # (B, C, H + 2p, W + 2p)
    blurred = F.conv2d(x_pad, kernel_h, groups=channels)          # (B, C, H, W + 2p): along H
    return F.conv2d(blurred, kernel_w, groups=channels)           # (B, C, H, W): along W
