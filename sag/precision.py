"""Compute precision of the U-Net passes: float32, or autocast to bfloat16 / float16 with float32 islands.

Mixed precision here is ``torch.autocast(device.type, dtype)`` around the sampling loop: the U-Net's
convolutions, linear layers and attention products run in the low-precision dtype, and everything
that decides where a sample goes stays float32 (the islands, the same on CPU and CUDA):

* GroupNorm statistics (``unet.layers.GroupNorm32`` casts up) and every softmax (``unet.attention``);
* the captured attention map, logits included (``unet.attention``: the captured block's q.k runs with
  autocast off, so the SAG mask sees float32 weights);
* the U-Net's output is handed back as float32; the blur (``sag.blur`` turns autocast off), the mask,
  x0 / eps conversions, the re-noising, every guidance formula and the sampler updates are
  element-wise float32 operations autocast does not touch.

Where it runs: float16 only on CUDA (PyTorch's CPU float16 kernels are slow or stall). bfloat16 on
CUDA, and on CPUs with native bfloat16 arithmetic (x86 ``amx_bf16`` / ``avx512_bf16``, Arm ``bf16``),
where oneDNN runs bfloat16 convolutions about twice as fast as float32.

``choose_dtype("auto", ...)`` (the CLI default) picks bfloat16 on a CPU only when (1) the CPU reports
native bfloat16 units, (2) one forward does enough work for the gain to beat autocast's casts
(``AUTO_MIN_GFLOP``, counted on a meta-device copy of the model: deterministic, no timing), and (3) a
quick probe (a 3x3 convolution at 128 channels, 32 x 32, timed interleaved in both dtypes, about
20 ms) measures bfloat16 at least ``AUTO_MIN_SPEEDUP`` times faster. Otherwise float32. On CUDA auto
is float32 (half precision there is an explicit choice). The result carries the reason, which the
``sag-sample`` sidecar records.
"""
from __future__ import annotations

import contextlib
import platform
import time
from typing import Callable, List, NamedTuple, Optional, Union

import torch
import torch.nn.functional as F

DTYPES = {"float32": torch.float32, "fp32": torch.float32, "float16": torch.float16, "fp16": torch.float16,
          "half": torch.float16, "bfloat16": torch.bfloat16, "bf16": torch.bfloat16}
DTYPE_CHOICES = ("auto",) + tuple(DTYPES)
# CPU feature flags (``/proc/cpuinfo``) that mean native bfloat16 arithmetic: AMX tiles and AVX-512
# BF16 dot products on x86, the BF16 extension on Arm.
NATIVE_BF16_FLAGS = ("amx_bf16", "avx512_bf16", "bf16")
AUTO_MIN_GFLOP = 20.0          # below this per forward, autocast's casts eat the gain (measured: 0.8 GFLOP slower)
AUTO_MIN_SPEEDUP = 1.25        # the probe's float32 / bfloat16 time must reach this


class PrecisionError(ValueError):
    """A dtype that cannot run on the device (one line)."""


class DtypeChoice(NamedTuple):
    """The dtype the U-Net passes run in, and why (for the sidecar)."""
    dtype: torch.dtype
    reason: str
    requested: str = "auto"
    cpu_bf16_flags: tuple = ()
    probe_speedup: Optional[float] = None      # float32 / bfloat16 time of the probe, when it ran
    gflop_per_forward: Optional[float] = None  # at the run's batch size, when counted

    def record(self) -> dict:
        """JSON-ready: requested, dtype, reason, flags, probe and work figures."""
        return {"requested": self.requested, "dtype": dtype_name(self.dtype), "reason": self.reason,
                "cpu_bf16_flags": list(self.cpu_bf16_flags), "probe_speedup": self.probe_speedup,
                "gflop_per_forward": self.gflop_per_forward}


def dtype_name(dtype: torch.dtype) -> str:
    return str(dtype).replace("torch.", "")


def parse_dtype(value: Union[str, torch.dtype]) -> torch.dtype:
    """torch dtype or a name from ``DTYPES`` -> torch dtype (ValueError with the choices otherwise)."""
    if isinstance(value, torch.dtype):
        if value not in DTYPES.values():
            raise PrecisionError(f"dtype {value} is not supported; use one of float32, bfloat16, float16")
        return value
    if value not in DTYPES:
        raise PrecisionError(f"unknown dtype {value!r}; use one of {', '.join(DTYPE_CHOICES)}")
    return DTYPES[value]


def check_device_dtype(dtype: torch.dtype, device: torch.device) -> None:
    """Raise one line when ``dtype`` cannot run on ``device`` (float16 needs CUDA)."""
    if dtype == torch.float16 and device.type != "cuda":
        raise PrecisionError(f"float16 needs a CUDA device (PyTorch's {device.type} float16 kernels are slow or "
                             "stall); use bfloat16 or float32")
    if dtype == torch.bfloat16 and device.type not in ("cpu", "cuda"):
        raise PrecisionError(f"bfloat16 autocast is supported here on cpu and cuda, not {device.type}")


def autocast(device: Union[str, torch.device], dtype: torch.dtype):
    """``torch.autocast(device.type, dtype)`` for a low-precision dtype; a no-op context for float32."""
    device = torch.device(device)
    if dtype == torch.float32:
        return contextlib.nullcontext()
    check_device_dtype(dtype, device)
    return torch.autocast(device.type, dtype=dtype)


def cpu_bf16_flags(cpuinfo: Optional[str] = None) -> tuple:
    """The native-bfloat16 flags this CPU reports (``NATIVE_BF16_FLAGS`` found in /proc/cpuinfo's
    ``flags`` / ``Features`` line); () when none or unknown (no /proc, another OS)."""
    if cpuinfo is None:
        try:
            with open("/proc/cpuinfo") as f:
                cpuinfo = f.read()
        except OSError:
            return ()
    words: set = set()
    for line in cpuinfo.splitlines():
        key, _, value = line.partition(":")
        if key.strip().lower() in ("flags", "features"):
            words.update(value.split())
    return tuple(flag for flag in NATIVE_BF16_FLAGS if flag in words)


def probe_bf16_speedup(repeats: int = 5, channels: int = 128, size: int = 32) -> float:
    """float32 time / bfloat16-autocast time of one 3x3 convolution [1 x C x size x size] on the CPU,
    best of ``repeats`` runs of each, interleaved (about 20 ms in all on a 2-core Xeon with AMX)."""
    generator = torch.Generator().manual_seed(0)
    x = torch.randn(1, channels, size, size, generator=generator)
    weight = torch.randn(channels, channels, 3, 3, generator=generator) * 0.03

    def run_float32():
        return F.conv2d(x, weight, padding=1)

    def run_bfloat16():
        with torch.autocast("cpu", dtype=torch.bfloat16):
            return F.conv2d(x, weight, padding=1)
    best = {run_float32: float("inf"), run_bfloat16: float("inf")}
    with torch.no_grad():
        for fn in best:                          # warm-up: oneDNN builds its kernels on the first call
            fn()
        for _ in range(repeats):
            for fn in best:
                start = time.perf_counter()
                fn()
                best[fn] = min(best[fn], time.perf_counter() - start)
    return best[run_float32] / best[run_bfloat16]


def forward_gflop(model, batch: int) -> Optional[float]:
    """GFLOP of one U-Net forward at ``batch`` (convolutions, matmuls, attention), counted by
    ``torch.utils.flop_counter`` on a copy of the model built on the meta device (no memory, no
    compute). None when the model cannot be rebuilt from ``type(model)(model.config)``."""
    from torch.utils.flop_counter import FlopCounterMode
    config = getattr(model, "config", None)
    if config is None:
        return None
    try:
        with torch.device("meta"):
            ghost = type(model)(config).eval()
            if hasattr(ghost, "use_fused_attention"):
                ghost.use_fused_attention(True)
            size = config.image_size
            x = torch.empty(1, config.in_channels, size, size)
            t = torch.zeros(1, dtype=torch.long)
            y = torch.zeros(1, dtype=torch.long) if getattr(config, "num_classes", None) else None
            kwargs = {"low_res": torch.empty(1, config.in_channels, size, size)} if getattr(config, "super_res", False) else {}
            with torch.no_grad(), FlopCounterMode(display=False) as counter:
                ghost(x, t, y, **kwargs)
    except Exception:                            # noqa: BLE001 - a model we cannot rebuild: no estimate
        return None
    return counter.get_total_flops() / 1e9 * batch


def choose_dtype(requested: Union[str, torch.dtype, None], device: Union[str, torch.device], model=None,
                 batch: int = 1, *, flags: Optional[tuple] = None,
                 probe: Optional[Callable[[], float]] = None) -> DtypeChoice:
    """The dtype to run, with its reason. ``requested``: "auto", a name from ``DTYPES`` or a torch dtype
    (None = float32). "auto" follows the rule of the module docstring; ``flags`` and ``probe`` replace
    the CPU flag reading and the timing probe (tests)."""
    device = torch.device(device)
    if requested is None:
        return DtypeChoice(torch.float32, "float32 (default)", "float32")
    if not (isinstance(requested, str) and requested == "auto"):
        dtype = parse_dtype(requested)
        check_device_dtype(dtype, device)
        name = requested if isinstance(requested, str) else dtype_name(dtype)
        return DtypeChoice(dtype, f"{dtype_name(dtype)} as requested", name)
    if device.type != "cpu":
        return DtypeChoice(torch.float32, f"auto: float32 on {device.type} (half precision there is an explicit --dtype)")
    flags = cpu_bf16_flags() if flags is None else tuple(flags)
    if not flags:
        return DtypeChoice(torch.float32, f"auto: float32, this CPU ({platform.processor() or platform.machine()}) "
                           f"reports no native bfloat16 units ({' / '.join(NATIVE_BF16_FLAGS)})")
    gflop = forward_gflop(model, batch) if model is not None else None
    if gflop is not None and gflop < AUTO_MIN_GFLOP:
        return DtypeChoice(torch.float32, f"auto: float32, {gflop:.1f} GFLOP per forward (batch {batch}) is too little "
                           f"work for bfloat16 autocast to pay (needs >= {AUTO_MIN_GFLOP:g})", "auto", flags, None, gflop)
    speedup = (probe or probe_bf16_speedup)()
    if speedup >= AUTO_MIN_SPEEDUP:
        return DtypeChoice(torch.bfloat16, f"auto: bfloat16, native units ({', '.join(flags)}) and the startup probe "
                           f"measured bfloat16 convolutions {speedup:.2f}x faster", "auto", flags, speedup, gflop)
    return DtypeChoice(torch.float32, f"auto: float32, the startup probe measured bfloat16 only {speedup:.2f}x "
                       f"faster (needs >= {AUTO_MIN_SPEEDUP:g}) despite {', '.join(flags)}", "auto", flags, speedup, gflop)
