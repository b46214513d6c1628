"""``python -m sag.bench``: what one guided sampling step costs, next to an unguided one.

Times, side by side in one run on the same model, inputs and respaced step:

* ``unguided``      one U-Net pass + the DDPM update (``sag.sampling.guided_step`` without guidance);
* ``plain_eager``   the same step through a plain eager forward of the same weights: the official
                    ``UNetModel.forward`` loop with the official attention einsums written out, no
                    seam (the "plain eager implementation" the unguided step must not be slower than);
* ``sag``           Self-Attention Guidance (the preset's README settings, else ``SAGConfig()``);
* ``blur``          blur guidance (SAG with M = 1: no map);
* ``pag``, ``seg``  PAG (default sites) and SEG (sigma = inf, middle block), batched: one pass of 2B
                    whose rows agree until the first perturbed block, computed once up to there;
* ``cfg``           classifier-free guidance with a stand-in null label (class-conditional models only);
* ``official_like`` the COSTS of the official SAG-ADM code emulated with this package's parts (not its
                    code): the official map recomputed from the qkv of the chosen block on EVERY
                    forward (both passes), the 31x31 2-D blur kernel, explicit attention everywhere,
                    float32 (the official code has no mixed precision on the CPU and no bfloat16; with
                    ``--dtype float16`` on CUDA it runs float16, its ``--use_fp16``);
* ``pag_seq``, ``seg_seq`` (``--methods``) PAG / SEG as two sequential passes of B.

Each method is timed with ``time.perf_counter`` (with ``torch.cuda.synchronize`` on CUDA), methods
interleaved round-robin (the order rotates every repeat, so drift hits all equally); the median of
``--repeats`` is reported with its ratio to the unguided step. Peak memory per method, measured once
outside the timed runs: on CUDA ``torch.cuda.max_memory_allocated`` (reset per method) minus what was
allocated before the step; on the CPU the peak of PyTorch's CPU allocator during the step, from the
profiler's allocation events (``profile_memory=True``), also above what was live before the step.
Both count tensors only (not weights, which are live before the step; not the allocator's cache).

``--dtype bfloat16`` runs our methods under ``torch.autocast`` (CPU or CUDA; ``sag.precision``: norms,
softmax, the captured map, the blur and the sampler stay float32), so the official-like row is then the
float32 baseline a user of the official code gets on the same machine.

Micro-benchmarks: the attention block at the config's largest attention grid (fused SDPA vs the
explicit official einsums) and the SAG blur (separable vs the 2-D outer-product kernel).

The model has random (seeded) weights with the preset's structure; speed does not depend on the
values. ``--tiny`` swaps in a small model of the same kind for smoke checks. Benchmarks measure;
the tests only check the report's structure.
"""
from __future__ import annotations

import argparse
import dataclasses
import json
import math
import os
import platform
import statistics
import sys
import time
import warnings
from typing import Callable, Dict, List, NamedTuple, Optional, Sequence

import torch
import torch.nn as nn
import torch.nn.functional as F

from checkpoints_convert.errors import FlagError
from checkpoints_convert.presets import resolve_preset_name
from diffusion import GaussianDiffusion
from unet.model import UNet, UNetOutput
from unet.seam import OfficialCapture

from .blur import gaussian_blur, gaussian_kernel_1d
from .cfg import CFGConfig
from .guidance import SAGConfig, SAGStep, blur_guidance, run_model
from .mask import salient_mask
from .perturbed import PAGConfig, SEGConfig
from .precision import DTYPES, PrecisionError, autocast, check_device_dtype, cpu_bf16_flags, dtype_name
from .sampling import guided_step

CORE_METHODS = ("unguided", "plain_eager", "sag", "blur", "pag", "seg", "cfg", "official_like")
EXTRA_METHODS = ("pag_seq", "seg_seq")
TARGET_SAG_RATIO = 2.03                  # SAG step / unguided step (issue 15)
# Our SAG step / the official-like SAG step, per dtype of our run (the official-like row is float32).
TARGET_VS_OFFICIAL = {torch.float32: 0.9, torch.bfloat16: 0.55}
# Dense (no sparsity) tensor-core peaks in TFLOP/s for float16 / bfloat16, from NVIDIA's datasheets;
# matched against torch.cuda.get_device_name in this order. float32 has no entry: PyTorch runs its
# convolutions in TF32 and its matmuls in full FP32 by default, so no single peak applies (--peak-tflops).
HALF_PRECISION_PEAK_TFLOPS = (("H100 PCIe", 756.0), ("H100", 989.4), ("H200", 989.4), ("A100", 312.0),
                              ("L40S", 362.1), ("A10", 125.0))


class BenchError(ValueError):
    """A benchmark setting that cannot run (one line)."""


# ------------------------------------------------------------------------------------------------
# Baselines: a plain eager forward, and the official SAG code's costs
# ------------------------------------------------------------------------------------------------

def _plain_attention(block, x: torch.Tensor) -> torch.Tensor:
    """The official ``AttentionBlock`` + ``QKVAttention(Legacy)`` forward, written out."""
    b, c, height, width = x.shape
    qkv = block.qkv(block.norm(x.reshape(b, c, -1)))
    heads, d = block.num_heads, c // block.num_heads
    if block.new_order:
        q, k, v = (part.reshape(b * heads, d, -1) for part in qkv.chunk(3, dim=1))
    else:
        q, k, v = qkv.reshape(b * heads, 3 * d, -1).split(d, dim=1)
    scale = 1.0 / math.sqrt(math.sqrt(d))
    weight = torch.einsum("bct,bcs->bts", q * scale, k * scale)
    weight = torch.softmax(weight.float(), dim=-1).type(weight.dtype)
    a = torch.einsum("bts,bcs->bct", weight, v).reshape(b, -1, height * width)
    return (x.reshape(b, c, -1) + block.proj_out(a)).reshape(b, c, height, width)


def _plain_block(block, h: torch.Tensor, emb: torch.Tensor) -> torch.Tensor:
    if block.res is not None:
        h = block.res(h, emb)
    if block.attn is not None:
        h = _plain_attention(block.attn, h)
    if block.resample is not None:
        h = block.resample(h, emb) if hasattr(block.resample, "emb_proj") else block.resample(h)
    return h


class PlainEagerUNet(nn.Module):
    """The same weights run by a plain eager forward (the official ``UNetModel.forward`` loop, the
    official attention einsums, no attention seam, no request checks). Output [B x C' x H x W]."""

    def __init__(self, model: UNet):
        super().__init__()
        self.unet = model    # not ``.model``: sag's _unwrap must not look through this baseline

    def forward(self, x, timesteps, y=None, *, low_res=None, attention=None) -> UNetOutput:
        m = self.unet
        assert not attention, "the plain eager baseline has no attention seam"
        if low_res is not None:
            x = torch.cat([x, F.interpolate(low_res, x.shape[2:], mode="bilinear")], dim=1)
        emb = m.time_embed(timesteps)
        if m.label_embed is not None:
            emb = emb + m.label_embed(y)
        h = m.input_conv(x)
        skips = [h]
        for block in m.encoder:
            h = _plain_block(block, h, emb)
            skips.append(h)
        h = m.middle.res2(_plain_attention(m.middle.attn, m.middle.res1(h, emb)), emb)
        for block in m.decoder:
            h = _plain_block(block, torch.cat([h, skips.pop()], dim=1), emb)
        return UNetOutput(m.out_conv(F.silu(m.out_norm(h))), {})


def gaussian_blur_2d(x: torch.Tensor, sigma: float, kernel_size: int = 31) -> torch.Tensor:
    """torchvision's ``GaussianBlur`` as the official code runs it: ONE depthwise conv with the
    K x K outer-product kernel (K^2 taps per pixel instead of 2K). Same result as ``gaussian_blur``
    up to float rounding."""
    k1d = gaussian_kernel_1d(kernel_size, sigma, device=x.device, dtype=x.dtype)
    channels, pad = x.shape[1], kernel_size // 2
    k2d = torch.outer(k1d, k1d).expand(channels, 1, kernel_size, kernel_size)
    return F.conv2d(F.pad(x, [pad, pad, pad, pad], mode="reflect"), k2d, groups=channels)


@dataclasses.dataclass(frozen=True)
class OfficialLikeSAG:
    """SAG with the costs of the official SAG-ADM code (SusungHong/Self-Attention-Guidance @ a36f251),
    built from this package's parts: its forward hook recomputes the map from the chosen block's qkv
    on EVERY forward (so also on the second pass, where nobody reads it), it blurs with torchvision's
    31x31 2-D kernel, and every attention block runs the explicit einsums (run it with fused
    attention off). The guided eps is the same function as ``sag_step``'s."""
    config: SAGConfig

    def active_at(self, t_index: int) -> bool:
        return self.config.active_at(t_index)

    def attention_sites(self):
        return [self.config.site]

    def predict(self, model, diffusion, x_t, t, y=None, clip_denoised=True) -> SAGStep:
        c = self.config
        request = {c.site: OfficialCapture(c.official_num_heads)}
        first, maps = run_model(model, diffusion, x_t, t, y, request, clip_denoised)
        x0_hat = first.pred_x0
        mask = salient_mask(maps[c.site], x_t.shape[-2:], c.threshold)
        blurred_x0 = gaussian_blur_2d(x0_hat, c.blur_sigma, c.kernel_size)
        degraded_x0 = mask * blurred_x0 + (1 - mask) * x0_hat
        degraded_x_t = diffusion.q_sample(degraded_x0, t, noise=first.eps)
        eps_degraded = run_model(model, diffusion, degraded_x_t, t, y, request, clip_denoised)[0].eps
        guided_eps = first.eps + c.scale * (first.eps - eps_degraded)
        return SAGStep(guided_eps, first, maps[c.site], mask, blurred_x0, degraded_x0, degraded_x_t, eps_degraded)


class _WithLowRes(nn.Module):
    """A super-resolution U-Net with its low-res input bound (repeated for 2B / 3B batched passes).
    The network is ``.net``, not ``.model``: sag's ``_unwrap`` must not look through this wrapper."""

    def __init__(self, net: nn.Module, low_res: torch.Tensor):
        super().__init__()
        self.net, self.low_res = net, low_res

    def attention_sites(self):
        return self.net.attention_sites()

    @property
    def label_embed(self):          # read by CFG to tell a class-conditional network
        return self.net.label_embed

    def forward(self, x, timesteps, y=None, *, attention=None):
        low_res = self.low_res.repeat(x.shape[0] // self.low_res.shape[0], 1, 1, 1)
        kwargs = {} if attention is None else {"attention": attention}
        return self.net(x, timesteps, y, low_res=low_res, **kwargs)


# ------------------------------------------------------------------------------------------------
# Set-up
# ------------------------------------------------------------------------------------------------

def tiny_config(config):
    """A smoke-sized U-Net of the same kind (conditioning, variance, attention layout) as ``config``:
    32 px, 32 channels, levels 32/16/8 with attention at 16 and 8 (output.2 is a 16x16 site)."""
    return dataclasses.replace(
        config, image_size=32, model_channels=32, num_res_blocks=1, channel_mult=(1, 2, 2),
        attention_resolutions=(16, 8), num_heads=2,
        num_head_channels=16 if config.num_head_channels != -1 else -1,
        num_heads_upsample=-1, num_classes=min(config.num_classes, 10) if config.num_classes else None)


def _pick_site(model: UNet, preferred: str) -> str:
    """The SAG site: ``preferred`` when the model has attention there, else its first decoder site."""
    names = [s.name for s in model.attention_sites()]
    if preferred in names:
        return preferred
    decoder = [n for n in names if n.startswith("output.")]
    return decoder[0] if decoder else names[0]


def sag_settings(preset, model: UNet) -> SAGConfig:
    """The preset's SAG README settings (paper s, sigma, site, map mode), else ``SAGConfig()``;
    always active (no ``guide_start`` gate), at a site the model has."""
    s = preset.sag or {}
    base = SAGConfig()
    return SAGConfig(scale=s.get("scale", base.scale), blur_sigma=s.get("blur_sigma", base.blur_sigma),
                     site=_pick_site(model, s.get("site", base.site)), map_mode=s.get("map_mode", base.map_mode),
                     official_num_heads=s.get("official_num_heads", base.official_num_heads))


class Method(NamedTuple):
    name: str
    passes: str            # U-Net evaluations per step, as batch multiples
    fused: bool            # attention blocks without a map request run F.scaled_dot_product_attention
    run: Callable[[], object]
    about: str
    dtype: torch.dtype = torch.float32     # the autocast dtype its U-Net passes run in


def _parse_args(argv: Optional[Sequence[str]]):
    p = argparse.ArgumentParser(prog="python -m sag.bench", description=__doc__.split("\n\n")[0])
    p.add_argument("--config", default="64x64_diffusion",
                   help="preset whose U-Net structure to use, random weights (default 64x64_diffusion)")
    p.add_argument("--tiny", action="store_true", help="a smoke-sized model of the preset's kind")
    p.add_argument("--batch", type=int, default=2)
    p.add_argument("--device", default="cpu", help="cpu (default) or cuda[:N]")
    p.add_argument("--dtype", default="float32", choices=tuple(DTYPES),
                   help="bfloat16 / bf16 (CPU or CUDA autocast), float16 / fp16 (CUDA autocast): norms, softmax, "
                        "the captured map, the blur and the sampler stay float32; the official-like row stays float32")
    p.add_argument("--fused", default="auto", choices=("auto", "on", "off"),
                   help="fused SDPA in every attention block whose map nobody reads; auto = on when the "
                        "attention micro-benchmark finds it faster on this device")
    p.add_argument("--repeats", type=int, default=5, help="timed runs per method (median reported)")
    p.add_argument("--warmup", type=int, default=1, help="untimed runs per method first")
    p.add_argument("--micro-repeats", type=int, default=20, help="runs per micro-benchmark variant")
    p.add_argument("--methods", default=",".join(CORE_METHODS),
                   help=f"comma list from {', '.join(CORE_METHODS + EXTRA_METHODS)} (unguided always runs)")
    p.add_argument("--steps", default="250", help="timestep respacing (default 250)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--threads", type=int, default=None, help="torch intra-op threads (default: torch's)")
    p.add_argument("--channels-last", action="store_true", help="model and inputs in channels-last memory format")
    p.add_argument("--compile", action="store_true", help="torch.compile the U-Net (the first warmup compiles)")
    p.add_argument("--no-memory", action="store_true", help="skip the peak-memory runs")
    p.add_argument("--peak-tflops", type=float, default=None,
                   help="the device's peak TFLOP/s for the fraction-of-peak column (default: NVIDIA's dense "
                        "float16/bfloat16 figure for known GPUs, else none)")
    p.add_argument("--json", action="store_true", help="print one JSON object instead of the tables")
    return p.parse_args(argv)


def _device_and_dtype(args):
    try:
        device = torch.device(args.device)
    except RuntimeError:
        raise BenchError(f"--device {args.device!r} is not a torch device; use cpu or cuda") from None
    if device.type == "cuda" and not torch.cuda.is_available():
        raise BenchError(f"--device {args.device} asked for CUDA but torch.cuda.is_available() is False; use --device cpu")
    if device.type not in ("cpu", "cuda"):
        raise BenchError(f"--device {args.device!r} is not supported; use cpu or cuda")
    dtype = DTYPES[args.dtype]
    try:
        check_device_dtype(dtype, device)
    except PrecisionError as err:
        raise BenchError(f"--dtype {args.dtype}: {err}") from None
    return device, dtype


# ------------------------------------------------------------------------------------------------
# Measurement
# ------------------------------------------------------------------------------------------------

def cpu_name() -> Optional[str]:
    """The CPU's model name (/proc/cpuinfo), else ``platform.processor()``, else None."""
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.lower().startswith("model name"):
                    return line.partition(":")[2].strip()
    except OSError:
        pass
    return platform.processor() or None


def _loadavg() -> Optional[float]:
    """The 1-minute load average (other processes on the machine skew CPU timings), None if unknown."""
    try:
        return os.getloadavg()[0]
    except (AttributeError, OSError):
        return None


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _set_fused(model: UNet, enabled: bool) -> None:
    if any(getattr(m, "fused", enabled) != enabled for m in model.modules()):
        model.use_fused_attention(enabled)


def _time_once(fn: Callable[[], object], device: torch.device) -> float:
    _sync(device)
    start = time.perf_counter()
    fn()
    _sync(device)
    return (time.perf_counter() - start) * 1e3


def _cpu_peak_bytes(fn: Callable[[], object]) -> int:
    """Peak of PyTorch's CPU allocator during ``fn`` above what was live before it, from the
    profiler's allocation / free events in time order."""
    from torch.profiler import ProfilerActivity, profile
    with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        fn()
    events = [e for e in prof.profiler.kineto_results.events() if e.name() == "[memory]"]
    live = peak = 0
    for event in sorted(events, key=lambda e: e.start_ns()):
        live += event.nbytes()
        peak = max(peak, live)
    return peak


def _peak_mb(fn: Callable[[], object], device: torch.device) -> float:
    if device.type == "cuda":
        _sync(device)
        torch.cuda.reset_peak_memory_stats(device)
        before = torch.cuda.memory_allocated(device)
        fn()
        _sync(device)
        return (torch.cuda.max_memory_allocated(device) - before) / 2**20
    return _cpu_peak_bytes(fn) / 2**20


def _count_flops(fn: Callable[[], object]) -> Optional[float]:
    """Floating-point operations of one call, as ``torch.utils.flop_counter`` counts them (convolutions,
    matmuls / einsums, SDPA kernels it knows; elementwise work, norms and softmax are not counted)."""
    from torch.utils.flop_counter import FlopCounterMode
    with FlopCounterMode(display=False) as counter:
        fn()
    return float(counter.get_total_flops())


def _peak_tflops(args, device: torch.device, dtype: torch.dtype) -> Optional[float]:
    if args.peak_tflops is not None:
        return args.peak_tflops
    if device.type != "cuda" or dtype == torch.float32:
        return None
    name = torch.cuda.get_device_name(device)
    return next((peak for key, peak in HALF_PRECISION_PEAK_TFLOPS if key in name), None)


def _count_syncs(fn: Callable[[], object]) -> int:
    """Host synchronisations during ``fn`` on CUDA (torch.cuda sync debug mode, warnings counted)."""
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        torch.cuda.set_sync_debug_mode("warn")
        try:
            fn()
        finally:
            torch.cuda.set_sync_debug_mode("default")
    return sum("synchroniz" in str(w.message).lower() for w in caught)


def _interleaved_medians(fns: Dict[str, Callable[[], object]], device, repeats: int, warmup: int = 2) -> Dict[str, float]:
    """Median ms of each function, the functions run round-robin."""
    for _ in range(warmup):
        for fn in fns.values():
            fn()
    times: Dict[str, List[float]] = {name: [] for name in fns}
    for _ in range(max(repeats, 1)):
        for name, fn in fns.items():
            times[name].append(_time_once(fn, device))
    return {name: statistics.median(t) for name, t in times.items()}


def micro_attention(model: UNet, batch: int, device, repeats: int, autocast, memory_format) -> dict:
    """One attention block at the largest attention grid: explicit einsums vs fused SDPA."""
    site = max(model.attention_sites(), key=lambda s: (s.resolution, s.channels))
    block = {name: attn for name, _, attn, _ in model._attention_modules()}[site.name]
    r = site.resolution
    x = torch.randn(batch, site.channels, r, r, generator=torch.Generator().manual_seed(1))
    x = x.to(device).contiguous(memory_format=memory_format)

    def run(fused: bool):
        def go():
            block.fused = fused
            with torch.no_grad(), autocast():
                return block(x)[0]
        return go
    saved = block.fused
    try:
        diff = (run(False)().float() - run(True)().float()).abs().max().item()
        ms = _interleaved_medians({"explicit": run(False), "fused": run(True)}, device, repeats)
    finally:
        block.fused = saved
    return {"site": site.name, "grid": f"{r}x{r}", "tokens": r * r, "channels": site.channels,
            "heads": site.heads, "layout": site.layout, "batch": batch,
            "explicit_ms": ms["explicit"], "fused_ms": ms["fused"], "speedup": ms["explicit"] / ms["fused"],
            "max_abs_diff": diff}


def micro_blur(batch: int, channels: int, size: int, sigma: float, kernel_size: int, device, repeats: int) -> dict:
    """The SAG blur of x0_hat [B x C x H x W]: separable (2K taps / pixel) vs 2-D outer-product kernel (K^2)."""
    x = torch.randn(batch, channels, size, size, generator=torch.Generator().manual_seed(2)).to(device)
    diff = (gaussian_blur(x, sigma, kernel_size) - gaussian_blur_2d(x, sigma, kernel_size)).abs().max().item()
    ms = _interleaved_medians({"separable": lambda: gaussian_blur(x, sigma, kernel_size),
                               "conv2d": lambda: gaussian_blur_2d(x, sigma, kernel_size)}, device, repeats)
    return {"shape": list(x.shape), "kernel_size": kernel_size, "sigma": sigma, "separable_ms": ms["separable"],
            "conv2d_ms": ms["conv2d"], "speedup": ms["conv2d"] / ms["separable"], "max_abs_diff": diff}


# ------------------------------------------------------------------------------------------------
# The run
# ------------------------------------------------------------------------------------------------

def run_bench(args) -> dict:
    device, dtype = _device_and_dtype(args)
    if args.threads:
        torch.set_num_threads(args.threads)
    try:
        preset = resolve_preset_name(args.config)
    except FlagError as exc:   # one line listing the valid names
        raise BenchError(str(exc)) from None
    if preset.kind == "classifier":
        raise BenchError(f"--config {preset.name} is a classifier; pick a diffusion model or upsampler preset")
    if args.batch < 1 or args.repeats < 1 or args.warmup < 0:
        raise BenchError("--batch and --repeats must be >= 1 and --warmup >= 0")
    methods_asked = [m.strip() for m in args.methods.split(",") if m.strip()]
    unknown = [m for m in methods_asked if m not in CORE_METHODS + EXTRA_METHODS]
    if unknown:
        raise BenchError(f"unknown method(s) {', '.join(unknown)}; choose from {', '.join(CORE_METHODS + EXTRA_METHODS)}")

    config = preset.unet_config()
    if args.tiny:
        config = tiny_config(config)
    diffusion = GaussianDiffusion.from_config(dataclasses.replace(preset.diffusion_config(),
                                                                  timestep_respacing=args.steps))
    torch.manual_seed(args.seed)
    unet = UNet(config).eval().to(device)
    memory_format = torch.channels_last if args.channels_last else torch.contiguous_format
    if args.channels_last:
        unet = unet.to(memory_format=torch.channels_last)
    gen = torch.Generator().manual_seed(args.seed)
    shape = (args.batch, config.in_channels, config.image_size, config.image_size)
    x_t = torch.randn(shape, generator=gen).to(device).contiguous(memory_format=memory_format)
    noise = torch.randn(shape, generator=gen).to(device)
    y = torch.randint(0, config.num_classes, (args.batch,), generator=gen).to(device) if config.num_classes else None
    model: nn.Module = unet
    plain: nn.Module = PlainEagerUNet(unet)
    if config.super_res:
        low = torch.randn(args.batch, config.in_channels, config.image_size // 4, config.image_size // 4,
                          generator=gen).to(device)
        model, plain = _WithLowRes(unet, low), _WithLowRes(plain, low)
    step_model: nn.Module = torch.compile(model) if args.compile else model
    t_index = diffusion.num_timesteps // 2
    official_dtype = torch.float16 if dtype == torch.float16 else torch.float32   # its --use_fp16, else float32

    load_before = _loadavg()
    # Micro-benchmarks first: the attention one decides --fused auto.
    micro = {"attention": micro_attention(unet, args.batch, device, args.micro_repeats,
                                          lambda: autocast(device, dtype), memory_format)}
    sag_cfg = sag_settings(preset, unet)
    if config.image_size > sag_cfg.kernel_size // 2:
        micro["blur"] = micro_blur(args.batch, config.in_channels, config.image_size, sag_cfg.blur_sigma,
                                   sag_cfg.kernel_size, device, args.micro_repeats)
    fused = {"on": True, "off": False}.get(args.fused, micro["attention"]["speedup"] > 1.0)

    def step(guidance=None, net=None, run_dtype=dtype):
        def run():
            with autocast(device, run_dtype):
                return guided_step(net if net is not None else step_model, diffusion, x_t, t_index,
                                   guidance=guidance, y=y, noise=noise)
        return run

    official_like = OfficialLikeSAG(dataclasses.replace(sag_cfg, map_mode="official"))
    table = {
        "unguided": Method("unguided", "1B", fused, step(), "eps(x_t), DDPM update"),
        "plain_eager": Method("plain_eager", "1B", False, step(net=plain),
                              "same step, plain eager forward (official loop + einsums, no seam)"),
        "sag": Method("sag", "2x1B", fused, step(sag_cfg),
                      f"SAG s={sag_cfg.scale} sigma={sag_cfg.blur_sigma} site={sag_cfg.site} map={sag_cfg.map_mode}"),
        "blur": Method("blur", "2x1B", fused, step(blur_guidance(sag_cfg.scale, sag_cfg.blur_sigma)),
                       f"blur guidance s={sag_cfg.scale} sigma={sag_cfg.blur_sigma}"),
        "pag": Method("pag", "1x2B", fused, step(PAGConfig(scale=3.0)),
                      "PAG s=3, default sites, batched (shared prefix)"),
        "seg": Method("seg", "1x2B", fused, step(SEGConfig(scale=3.0)),
                      "SEG s=3, sigma=inf, middle, batched (shared prefix)"),
        "cfg": Method("cfg", "1x2B", fused, step(CFGConfig(w=1.5, null_label=0)),
                      "CFG w=1.5, stand-in null label 0, batched"),
        "official_like": Method("official_like", "2x1B", False, step(official_like, run_dtype=official_dtype),
                                "official SAG costs: map on every forward, 31x31 2-D blur, explicit attention, "
                                f"{dtype_name(official_dtype)}", official_dtype),
        "pag_seq": Method("pag_seq", "2x1B", fused, step(PAGConfig(scale=3.0, batched=False)),
                          "PAG, two sequential passes"),
        "seg_seq": Method("seg_seq", "2x1B", fused, step(SEGConfig(scale=3.0, batched=False)),
                          "SEG, two sequential passes"),
    }
    skipped = {}
    if not config.num_classes:
        skipped["cfg"] = "unconditional model (CFG needs a class-conditional eps_c)"
    names = ["unguided"] + [m for m in dict.fromkeys(methods_asked) if m != "unguided" and m not in skipped]
    methods = [table[n] if n == "official_like" else table[n]._replace(dtype=dtype) for n in names]

    def call(method: Method):
        _set_fused(unet, method.fused)
        return method.run()

    # Equality check (values, not speed): the plain eager forward computes what the U-Net's default path does.
    checks = {}
    if "plain_eager" in names:
        _set_fused(unet, False)
        with torch.no_grad(), autocast(device, dtype):
            ts = diffusion.model_timesteps(torch.full((args.batch,), t_index, device=device))
            ours, theirs = model(x_t, ts, y).output, plain(x_t, ts, y).output
        checks["plain_eager_vs_unet_max_abs_diff"] = (ours.float() - theirs.float()).abs().max().item()

    # Timed runs: warmup, then round-robin with a rotating start.
    compile_s = None
    for _ in range(args.warmup):
        for method in methods:
            start = time.perf_counter()
            call(method)
            if args.compile and compile_s is None and method.name == "unguided":
                compile_s = time.perf_counter() - start
    times: Dict[str, List[float]] = {m.name: [] for m in methods}
    for r in range(args.repeats):
        order = methods[r % len(methods):] + methods[:r % len(methods)]
        for method in order:
            _set_fused(unet, method.fused)
            times[method.name].append(_time_once(method.run, device))

    memory = {}
    if not args.no_memory:
        for method in methods:
            _set_fused(unet, method.fused)
            memory[method.name] = _peak_mb(method.run, device)
    flops = {}
    if not args.compile:                       # the counter dispatches op by op: compiled graphs hide them
        for method in methods:
            _set_fused(unet, method.fused)
            flops[method.name] = _count_flops(method.run)
    peak = _peak_tflops(args, device, dtype)
    syncs = {}
    if device.type == "cuda":
        for method in methods:
            _set_fused(unet, method.fused)
            syncs[method.name] = _count_syncs(method.run)
    _set_fused(unet, False)

    base, base_min = statistics.median(times["unguided"]), min(times["unguided"])
    results = {}
    for method in methods:
        ms = statistics.median(times[method.name])
        results[method.name] = {
            "ms": ms, "min_ms": min(times[method.name]), "ratio": ms / base,
            "ratio_of_mins": min(times[method.name]) / base_min,
            "ratio_paired": statistics.median(a / b for a, b in zip(times[method.name], times["unguided"])),
            "passes": method.passes,
            # A whole run at this step's cost: batch images per (num_timesteps steps).
            "images_per_s": args.batch / (ms / 1e3 * diffusion.num_timesteps),
            "gflop_per_step": None if method.name not in flops else flops[method.name] / 1e9,
            "tflops_per_s": None if method.name not in flops else flops[method.name] / (ms / 1e3) / 1e12,
            "fraction_of_peak": (None if method.name not in flops or peak is None
                                 else flops[method.name] / (ms / 1e3) / 1e12 / peak),
            "fused_attention": method.fused, "dtype": dtype_name(method.dtype), "peak_mem_mb": memory.get(method.name),
            "host_syncs": syncs.get(method.name), "about": method.about, "times_ms": times[method.name]}
    comparisons = {}
    if "sag" in results and "official_like" in results:
        comparisons["sag_vs_official_like"] = results["sag"]["ms"] / results["official_like"]["ms"]
        comparisons["sag_vs_official_like_of_mins"] = results["sag"]["min_ms"] / results["official_like"]["min_ms"]
    if "plain_eager" in results:
        comparisons["unguided_vs_plain_eager"] = base / results["plain_eager"]["ms"]
        comparisons["unguided_vs_plain_eager_of_mins"] = base_min / results["plain_eager"]["min_ms"]
    targets = {}
    if "sag" in results:
        targets[f"sag_ratio_le_{TARGET_SAG_RATIO}"] = results["sag"]["ratio"] <= TARGET_SAG_RATIO
    if "blur" in results:
        targets[f"blur_ratio_le_{TARGET_SAG_RATIO}"] = results["blur"]["ratio"] <= TARGET_SAG_RATIO
    for name in ("pag", "seg"):
        if name in results and "sag" in results:
            targets[f"{name}_le_sag"] = results[name]["ms"] <= results["sag"]["ms"]
    if "plain_eager" in results:
        targets["unguided_le_plain_eager"] = base <= results["plain_eager"]["ms"]
    if "official_like" in results and "sag" in results:
        targets["sag_faster_than_official_like"] = results["sag"]["ms"] < results["official_like"]["ms"]
        if dtype in TARGET_VS_OFFICIAL:
            bound = TARGET_VS_OFFICIAL[dtype]
            targets[f"sag_vs_official_like_le_{bound}"] = comparisons["sag_vs_official_like"] <= bound

    return {
        "config": preset.name + (" (tiny)" if args.tiny else ""),
        "unet": {k: (list(v) if isinstance(v, tuple) else v) for k, v in dataclasses.asdict(config).items()},
        "params_m": sum(p.numel() for p in unet.parameters()) / 1e6,
        "device": str(device), "dtype": args.dtype, "batch": args.batch, "threads": torch.get_num_threads(),
        "torch": torch.__version__, "python": platform.python_version(), "machine": platform.machine(),
        "fused_requested": args.fused, "fused_attention": fused, "channels_last": args.channels_last,
        "compiled": args.compile, "compile_s": compile_s,
        "loadavg_1min": {"before": load_before, "after": _loadavg()},
        "t_index": t_index, "num_timesteps": diffusion.num_timesteps, "repeats": args.repeats, "warmup": args.warmup,
        "device_name": torch.cuda.get_device_name(device) if device.type == "cuda" else cpu_name(),
        "cpu_bf16_flags": list(cpu_bf16_flags()) if device.type == "cpu" else None,
        "peak_tflops": peak,
        "flops": None if args.compile else "torch.utils.flop_counter: convolutions, matmuls and known SDPA kernels",
        "timing": "median of repeats, methods interleaved round-robin (rotating start), time.perf_counter"
                  + (" + torch.cuda.synchronize" if device.type == "cuda" else ""),
        "memory": None if args.no_memory else (
            "CUDA max_memory_allocated during the step minus allocated before it" if device.type == "cuda" else
            "peak of PyTorch's CPU allocator during the step above what was live before it (profiler memory events)"),
        "methods": results, "skipped": skipped, "comparisons": comparisons, "targets": targets,
        "checks": checks, "micro": micro,
    }


def format_report(report: dict) -> str:
    r = report
    lines = [
        f"sag.bench  {r['config']} structure, random weights ({r['params_m']:.1f}M params), batch {r['batch']}, "
        f"{r['device']} ({r['device_name']}) {r['dtype']}, {r['threads']} threads, torch {r['torch']}",
        f"  t = {r['t_index']} of {r['num_timesteps']} respaced steps; median of {r['repeats']} after "
        f"{r['warmup']} warmup; methods interleaved; fused attention {'on' if r['fused_attention'] else 'off'} "
        f"(--fused {r['fused_requested']})" + ("; channels-last" if r["channels_last"] else "")
        + (f"; torch.compile (first call {r['compile_s']:.1f} s)" if r["compiled"] and r["compile_s"] else "")
        + "; 1-min load average {before} -> {after}".format(**{k: "?" if v is None else f"{v:.2f}"
                                                             for k, v in r["loadavg_1min"].items()}),
        "",
        f"  {'method':<14}{'passes':>7}{'ms/step':>10}{'min ms':>10}{'x unguided':>12}{'paired':>9}{'of mins':>9}"
        f"{'peak MB':>9}  about",
    ]
    for name, m in r["methods"].items():
        mem = "n/a" if m["peak_mem_mb"] is None else f"{m['peak_mem_mb']:.1f}"
        lines.append(f"  {name:<14}{m['passes']:>7}{m['ms']:>10.1f}{m['min_ms']:>10.1f}{m['ratio']:>11.3f}x"
                     f"{m['ratio_paired']:>8.3f}x{m['ratio_of_mins']:>8.3f}x{mem:>9}  {m['about']}")
    for name, why in r["skipped"].items():
        lines.append(f"  {name:<14} skipped: {why}")
    lines.append("  x unguided = ratio of the medians (the targets use it); paired = median over repeats of the "
                 "ratio within one round; of mins = ratio of the fastest runs")
    if r["memory"]:
        lines.append(f"  peak MB = {r['memory']}")
    if any(m["host_syncs"] is not None for m in r["methods"].values()):
        lines.append("  host syncs per step: " + ", ".join(f"{k} {m['host_syncs']}" for k, m in r["methods"].items()))
    lines.append("")
    lines.append(f"  {'method':<14}{'img/s':>9}{'GFLOP':>10}{'TFLOP/s':>10}{'of peak':>9}   "
                 f"(img/s: a {r['num_timesteps']}-step run at this step's cost)")
    for name, m in r["methods"].items():
        gflop = "n/a" if m["gflop_per_step"] is None else f"{m['gflop_per_step']:.1f}"
        tflops = "n/a" if m["tflops_per_s"] is None else f"{m['tflops_per_s']:.3f}"
        frac = "n/a" if m["fraction_of_peak"] is None else f"{100 * m['fraction_of_peak']:.1f}%"
        lines.append(f"  {name:<14}{m['images_per_s']:>9.3f}{gflop:>10}{tflops:>10}{frac:>9}")
    if r["peak_tflops"] is None:
        lines.append("  of peak: n/a (no known peak for this device and dtype; pass --peak-tflops)")
    else:
        lines.append(f"  of peak: against {r['peak_tflops']:.1f} TFLOP/s ({r['device_name']}, {r['dtype']})")
    lines.append("")
    c = r["comparisons"]
    if "sag_vs_official_like" in c:
        lines.append(f"  SAG step ({r['methods']['sag']['dtype']}) / official-like SAG step "
                     f"({r['methods']['official_like']['dtype']}) = {c['sag_vs_official_like']:.3f} (medians), "
                     f"{c['sag_vs_official_like_of_mins']:.3f} (mins)")
    if "unguided_vs_plain_eager" in c:
        lines.append(f"  unguided step / plain-eager step = {c['unguided_vs_plain_eager']:.3f} (medians), "
                     f"{c['unguided_vs_plain_eager_of_mins']:.3f} (mins)  (outputs differ by {r['checks'].get('plain_eager_vs_unet_max_abs_diff', float('nan')):.2e}"
                     " with fused off)")
    if r["targets"]:
        lines.append("  targets: " + ", ".join(f"{k} {'MET' if v else 'NOT met'}" for k, v in r["targets"].items()))
    a = r["micro"]["attention"]
    lines += ["", "micro-benchmarks (median ms)",
              f"  attention block {a['site']} ({a['grid']}, {a['channels']} ch, {a['heads']} heads, {a['layout']}, "
              f"batch {a['batch']}): explicit {a['explicit_ms']:.2f}, fused SDPA {a['fused_ms']:.2f} -> "
              f"{a['speedup']:.2f}x (max |diff| {a['max_abs_diff']:.1e})"]
    if "blur" in r["micro"]:
        bl = r["micro"]["blur"]
        lines.append(f"  blur {'x'.join(map(str, bl['shape']))}, {bl['kernel_size']} taps, sigma {bl['sigma']}: "
                     f"2-D {bl['conv2d_ms']:.3f}, separable {bl['separable_ms']:.3f} -> {bl['speedup']:.1f}x "
                     f"(max |diff| {bl['max_abs_diff']:.1e})")
    return "\n".join(lines)


def main(argv: Optional[Sequence[str]] = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if "--sd" in argv:                       # the Stable Diffusion steps: python -m sag.sd.bench
        from .sd.bench import main as sd_main
        return sd_main([a for a in argv if a != "--sd"])
    args = _parse_args(argv)
    try:
        report = run_bench(args)
    except BenchError as exc:
        print(f"sag.bench: error: {exc}", file=sys.stderr)
        return 2
    print(json.dumps(report, indent=1) if args.json else format_report(report))
    return 0


if __name__ == "__main__":
    sys.exit(main())
