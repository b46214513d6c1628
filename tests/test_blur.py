"""Tests of sag.blur: the official torchvision GaussianBlur(31, sigma) fixture, the kernel, and oracles.

Fixture: tests/fixtures/official/blur/reference.pt (torchvision 0.28 GaussianBlur, same maths as 0.12;
see its README.md).  Independent oracle: scipy.ndimage in float64.
"""
from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import scipy.ndimage as ndimage
import torch
import torch.nn.functional as F

from sag.blur import gaussian_blur, gaussian_kernel_1d

FIXTURE = Path(__file__).parent / "fixtures" / "official" / "blur" / "reference.pt"
SIGMAS = (1, 3, 9)
INPUTS = ("x_2x3x32x32", "x_1x3x64x48")
FIXTURE_ATOL = 1e-6        # PROVENANCE.md "Suggested tolerances": blur
FLOAT32_UNIT = 2.0 ** -24  # unit roundoff of float32


@pytest.fixture(scope="module")
def reference():
    return torch.load(FIXTURE, weights_only=True)


# --- the official fixture -------------------------------------------------------------------------

@pytest.mark.parametrize("sigma", SIGMAS)
def test_kernel_matches_torchvision(reference, sigma):
    kernel = gaussian_kernel_1d(31, sigma)
    assert kernel.shape == (31,) and kernel.dtype == torch.float32
    torch.testing.assert_close(kernel, reference[f"sigma{sigma}_kernel1d"], atol=1e-7, rtol=0)


@pytest.mark.parametrize("sigma", SIGMAS)
@pytest.mark.parametrize("name", INPUTS)
def test_blur_matches_torchvision(reference, sigma, name):
    x = reference[name]
    blurred = gaussian_blur(x, sigma)
    assert blurred.shape == x.shape and blurred.dtype == x.dtype
    torch.testing.assert_close(blurred, reference[f"sigma{sigma}_{name}"], atol=FIXTURE_ATOL, rtol=0)


def test_blur_smallest_official_input(reference):
    assert reference["small_16x16_result"] == "ok"
    blurred = gaussian_blur(reference["x_1x3x16x16"], 3)
    torch.testing.assert_close(blurred, reference["sigma3_x_1x3x16x16"], atol=FIXTURE_ATOL, rtol=0)


def test_official_call_consumed_rng_and_ours_does_not(reference):
    # torchvision's GaussianBlur draws sigma with uniform_(sigma, sigma): one global CPU draw per call.
    assert all(int(reference[f"sigma{sigma}_rng_consumed"]) == 1 for sigma in SIGMAS)
    state = torch.get_rng_state()
    gaussian_blur(reference["x_2x3x32x32"], 3.0)
    gaussian_kernel_1d(17, 0.7)
    assert torch.equal(torch.get_rng_state(), state)


@pytest.mark.parametrize("height, width", [(15, 15), (8, 8), (16, 15)])
def test_too_small_input_raises_clear_error(reference, height, width):
    assert reference[f"small_{height}x{width}_result"].startswith("RuntimeError")  # torchvision refuses too
    with pytest.raises(ValueError) as error:
        gaussian_blur(torch.zeros(1, 3, height, width), 3.0)
    message = str(error.value)
    assert "\n" not in message
    assert f"image {height}x{width} is too small for a 31-tap blur" in message
    assert "H, W >= 16" in message
    assert f"at most {2 * min(height, width) - 1}" in message
    # ... and the advice works: the largest kernel it allows runs.
    gaussian_blur(torch.zeros(1, 3, height, width), 3.0, kernel_size=2 * min(height, width) - 1)


# --- the kernel ------------------------------------------------------------------------------------

@pytest.mark.parametrize("kernel_size, sigma", [(31, 1.0), (31, 9.0), (9, 1.0), (1, 2.0), (5, 0.3)])
def test_kernel_sums_to_one_and_is_symmetric(kernel_size, sigma):
    kernel = gaussian_kernel_1d(kernel_size, sigma)
    assert abs(float(kernel.double().sum()) - 1.0) < 1e-6
    assert torch.equal(kernel, kernel.flip(0))
    assert int(kernel.argmax()) == kernel_size // 2


def test_kernel_equals_formula_with_sigma_rounded_to_float32():
    sigma = 0.1  # not a float32 value: torchvision uses float32(0.1)
    offsets = np.arange(-4, 5, dtype=np.float64)
    sigma32 = np.float64(np.float32(sigma))
    expected = np.exp(-0.5 * (offsets / sigma32) ** 2)
    expected /= expected.sum()
    kernel = gaussian_kernel_1d(9, sigma, dtype=torch.float64)
    np.testing.assert_allclose(kernel.numpy(), expected, rtol=1e-15, atol=1e-300)


def test_kernel_is_cached():
    first = gaussian_kernel_1d(31, 3.0)
    assert gaussian_kernel_1d(31, 3.0) is first
    assert gaussian_kernel_1d(31, 3, device="cpu") is first          # same key after normalisation
    assert gaussian_kernel_1d(31, 3.0, dtype=torch.float64) is not first
    assert gaussian_kernel_1d(31, 3.0, dtype=torch.float64).dtype == torch.float64


@pytest.mark.parametrize("kernel_size", [0, -3, 2, 30, 3.0, True])
def test_bad_kernel_size_raises(kernel_size):
    with pytest.raises(ValueError, match="kernel_size must be an odd int"):
        gaussian_kernel_1d(kernel_size, 1.0)
    with pytest.raises(ValueError, match="kernel_size must be an odd int"):
        gaussian_blur(torch.zeros(1, 1, 40, 40), 1.0, kernel_size=kernel_size)


@pytest.mark.parametrize("sigma", [0.0, -1.0, float("nan"), float("inf"), 1e-50, 1e39, torch.tensor(1.0)])
def test_bad_sigma_raises(sigma):
    with pytest.raises(ValueError, match="sigma must be"):
        gaussian_kernel_1d(31, sigma)
    with pytest.raises(ValueError, match="sigma must be"):
        gaussian_blur(torch.zeros(1, 1, 40, 40), sigma)


def test_bad_image_raises():
    with pytest.raises(ValueError, match=r"\(B, C, H, W\)"):
        gaussian_blur(torch.zeros(3, 32, 32), 1.0)
    with pytest.raises(ValueError, match="floating-point"):
        gaussian_blur(torch.zeros(1, 3, 32, 32, dtype=torch.int64), 1.0)


# --- properties and oracles ------------------------------------------------------------------------

def _generator(seed):
    return torch.Generator().manual_seed(seed)


def test_constant_image_is_unchanged():
    x = torch.full((2, 3, 20, 24), 0.625)
    torch.testing.assert_close(gaussian_blur(x, 3.0), x, atol=1e-6, rtol=0)


def test_any_odd_kernel_size_works():
    x = torch.randn(1, 2, 12, 10, generator=_generator(0))
    for kernel_size in (1, 3, 9, 19):
        blurred = gaussian_blur(x, 1.5, kernel_size=kernel_size)
        assert blurred.shape == x.shape
    torch.testing.assert_close(gaussian_blur(x, 1.5, kernel_size=1), x, atol=0, rtol=0)  # 1 tap = identity


@pytest.mark.parametrize("sigma", [1.0, 3.0, 9.0])
def test_separable_equals_2d_depthwise_conv(sigma):
    """The separable blur equals torchvision's recipe: one reflect pad, one 2-D conv with outer(k, k)."""
    x = torch.randn(2, 3, 33, 40, generator=_generator(1))
    kernel = gaussian_kernel_1d(31, sigma)
    kernel_2d = torch.outer(kernel, kernel).expand(3, 1, 31, 31)
    expected = F.conv2d(F.pad(x, [15, 15, 15, 15], mode="reflect"), kernel_2d, groups=3)
    torch.testing.assert_close(gaussian_blur(x, sigma), expected, atol=1e-6, rtol=0)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_half_precision_blur(dtype):
    x = torch.randn(1, 3, 32, 32, generator=_generator(3))
    blurred = gaussian_blur(x.to(dtype), 3.0)
    assert blurred.dtype == dtype
    torch.testing.assert_close(blurred.float(), gaussian_blur(x, 3.0), atol=3e-2, rtol=0)


def test_autocast_does_not_lower_the_blur_precision():
    """Under CPU bfloat16 autocast (the same dispatch as CUDA autocast) a float32 image is blurred in float32."""
    x = torch.randn(1, 3, 32, 32, generator=_generator(4))
    with torch.autocast("cpu", dtype=torch.bfloat16):
        blurred = gaussian_blur(x, 3.0)
    assert blurred.dtype == torch.float32 and torch.equal(blurred, gaussian_blur(x, 3.0))


def test_no_data_dependent_host_code():
    """Runs on the meta device (shapes only): nothing reads a value, so nothing would sync a GPU."""
    x = torch.empty(2, 3, 32, 48, device="meta")
    blurred = gaussian_blur(x, 9.0)
    assert blurred.device.type == "meta" and blurred.shape == x.shape


def test_blur_keeps_dtype_and_float64_is_exact():
    x = torch.randn(1, 2, 20, 20, generator=_generator(2), dtype=torch.float64)
    blurred = gaussian_blur(x, 2.0, kernel_size=9)
    assert blurred.dtype == torch.float64
    kernel = gaussian_kernel_1d(9, 2.0, dtype=torch.float64).numpy()
    expected = ndimage.correlate1d(ndimage.correlate1d(x.numpy(), kernel, axis=2, mode="mirror"),
                                   kernel, axis=3, mode="mirror")
    np.testing.assert_allclose(blurred.numpy(), expected, rtol=0, atol=1e-14)


def test_scipy_mirror_is_torch_reflect():
    """scipy's mode "mirror" (d c b | a b c d | c b a) is torch's "reflect"; scipy's "reflect" is not."""
    signal = np.arange(1.0, 7.0)                                   # length 6
    padded = F.pad(torch.from_numpy(signal).view(1, 1, 6), [4, 4], mode="reflect").view(-1).numpy()
    for shift in range(-4, 5):                                     # a one-hot kernel reads x[n + shift]
        weights = np.zeros(9)
        weights[4 + shift] = 1.0
        shifted = ndimage.correlate1d(signal, weights, mode="mirror")
        np.testing.assert_array_equal(shifted, padded[4 + shift: 4 + shift + 6])
    assert not np.array_equal(ndimage.correlate1d(signal, np.eye(9)[0], mode="reflect"), padded[:6])


@pytest.mark.parametrize("sigma", [1.0, 2.7, 3.0, 9.0])
def test_matches_scipy_gaussian_filter(reference, sigma):
    """Independent float64 oracle: scipy.ndimage.gaussian_filter, mode "mirror", radius 15.

    scipy builds exp(-x^2 / (2 sigma^2)) on the integer offsets -radius..radius and divides by the sum:
    the same normalised truncated kernel as torchvision (checked equal to correlate1d with that kernel).
    Our kernel uses sigma rounded to float32 and float32 arithmetic, so each tap carries a relative
    error of a few float32 units (exp, then the division) and each of the two passes rounds its
    31-term sum.  With sum(k) = 1 the error per pass is then a few units of 2^-24 times max|x|; we allow
    8 units over both passes (about 2e-6 for these randn inputs, max|x| ~ 4; measured <= 4.3e-7).
    """
    for name in (*INPUTS, "x_1x3x16x16"):
        x = reference[name]
        x64 = x.double().numpy()
        oracle = ndimage.gaussian_filter(x64, sigma=sigma, mode="mirror", radius=15, axes=(2, 3))
        # scipy's kernel is the normalised truncated one: same result as correlate1d with it.
        offsets = np.arange(-15, 16, dtype=np.float64)
        kernel = np.exp(-0.5 * (offsets / sigma) ** 2)
        kernel /= kernel.sum()
        by_hand = ndimage.correlate1d(ndimage.correlate1d(x64, kernel, axis=2, mode="mirror"),
                                      kernel, axis=3, mode="mirror")
        np.testing.assert_allclose(oracle, by_hand, rtol=0, atol=1e-12)

        tolerance = 8 * FLOAT32_UNIT * np.abs(x64).max()
        np.testing.assert_allclose(gaussian_blur(x, sigma).double().numpy(), oracle, rtol=0, atol=tolerance)
