"""``python -m sag.sd.bench`` (also ``python -m sag.bench --sd``): what one Stable Diffusion step costs with
CFG, with SAG + CFG and with PAG + CFG, side by side in one run on the same U-Net, latents and timestep.

* ``cond``     one conditional pass of B (no guidance; the floor);
* ``cfg``      classifier-free guidance: one batched pass of 2B ([uncond; cond]);
* ``sag_cfg``  SAG + CFG as diffusers' SAG pipeline runs it: the 2B pass with the mid block's map read
               from the uncond half (explicit softmax in that one block), then the degraded pass of B;
               the floor is 1.5x CFG;
* ``pag_cfg``  PAG + CFG batched: one pass of 3B ([uncond; cond; cond-perturbed], identity attention
               at the mid block; unlike the ADM U-Net, the SD U-Net computes the cond rows' layers before
               the mid block twice: it has no ``copies`` prefix sharing yet).

Each step is what the pipeline runs per denoising step: ``sag.sd.guided_output`` (the guidance
protocol) and the DDIM ``scheduler.step``. Every attention block whose map nobody reads runs fused
``scaled_dot_product_attention`` (the U-Net's default). Methods interleaved round-robin (as
``python -m sag.bench``), the median of ``--repeats`` on two clocks: wall time (``time.perf_counter``,
with ``torch.cuda.synchronize`` on CUDA) and, on the CPU, this process's CPU time
(``time.process_time``), which a machine shared with other processes inflates far less (with one
intra-op thread it is the step's own work); the 1-minute load average is printed before and after.

SAG + CFG cannot cost less than CFG + one conditional pass of B (the degraded pass needs the first
pass's output), so the report also gives ``sag_cfg / (cfg + cond)``: what SAG costs beyond its passes
(mask, blur, re-noise, the explicit softmax of the one captured block). On a CPU a pass of B costs more
than half a pass of 2B, so the 1.5x floor is higher there; ``--batch`` raises the batch efficiency.

The U-Net has SD 1.5's structure (``SD15_UNET``: channels 320, 640, 1280, 1280, 2 layers per block,
8 heads, cross-attention 768, 77 text tokens) with random (seeded) weights; ``--channels`` scales the
widths (base 320) and ``--latent`` the latent side (64 = 512 px) so it fits a small CPU. Ratios, not
absolute times, are what the targets check: SAG + CFG <= 1.55x CFG, PAG + CFG <= SAG + CFG.
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import sys
import time
from typing import Callable, Dict, Optional, Sequence

import torch

SD15_UNET = {
    "_class_name": "UNet2DConditionModel", "sample_size": 64, "in_channels": 4, "out_channels": 4,
    "block_out_channels": [320, 640, 1280, 1280], "layers_per_block": 2, "attention_head_dim": 8,
    "cross_attention_dim": 768, "norm_num_groups": 32, "flip_sin_to_cos": True, "freq_shift": 0,
    "down_block_types": ["CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "DownBlock2D"],
    "up_block_types": ["UpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D"],
}
SD15_SCHEDULER = {"_class_name": "DDIMScheduler", "beta_start": 0.00085, "beta_end": 0.012,
                  "beta_schedule": "scaled_linear", "num_train_timesteps": 1000, "set_alpha_to_one": False,
                  "steps_offset": 1, "clip_sample": False, "prediction_type": "epsilon", "timestep_spacing": "leading"}
TEXT_TOKENS = 77
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
METHODS = {"cond": "one conditional pass of B", "cfg": "CFG 7.5, one pass of 2B",
           "sag_cfg": "SAG 0.75 + CFG 7.5: 2B (mid map from the uncond half) + B degraded",
           "pag_cfg": "PAG 3.0 (mid) + CFG 7.5: one pass of 3B"}
TARGET_SAG_VS_CFG = 1.55


def unet_config(channels: int = 320, latent: int = 64) -> dict:
    """SD 1.5's U-Net config with the widths scaled to base ``channels`` (SD 1.5: 320; a multiple of
    32, the group norm's groups) and ``sample_size`` = ``latent``."""
    widths = [channels * m for m in (1, 2, 4, 4)]
    return {**SD15_UNET, "block_out_channels": widths, "sample_size": latent}


def _cpu_name() -> Optional[str]:
    try:
        with open("/proc/cpuinfo") as f:
            return next((line.split(":", 1)[1].strip() for line in f if line.startswith("model name")), None)
    except OSError:
        return platform.processor() or None


def _parse_args(argv: Optional[Sequence[str]]):
    p = argparse.ArgumentParser(prog="python -m sag.sd.bench", description=__doc__.split("\n\n")[0])
    p.add_argument("--channels", type=int, default=320, help="base width (SD 1.5: 320; widths x1, x2, x4, x4)")
    p.add_argument("--latent", type=int, default=64, help="latent side (SD 1.5 at 512 px: 64)")
    p.add_argument("--batch", type=int, default=1, help="images per step B (CFG runs 2B, PAG 3B)")
    p.add_argument("--device", default="cpu")
    p.add_argument("--dtype", default="float32", choices=sorted(DTYPES), help="U-Net autocast dtype")
    p.add_argument("--steps", type=int, default=50, help="DDIM steps; the timed step is the middle one")
    p.add_argument("--repeats", type=int, default=5)
    p.add_argument("--warmup", type=int, default=1)
    p.add_argument("--threads", type=int, default=None, help="torch intra-op threads (default: torch's)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--json", action="store_true", help="print one JSON object instead of the table")
    args = p.parse_args(argv)
    if args.channels <= 0 or args.channels % 32:
        p.error(f"--channels must be a positive multiple of 32 (the group norm's groups), got {args.channels}")
    if args.latent <= 0 or args.latent % 8:
        p.error(f"--latent must be a positive multiple of 8 (three downsamplings), got {args.latent}")
    if args.batch <= 0 or args.steps < 2 or args.repeats <= 0:
        p.error("--batch and --repeats must be positive, --steps at least 2")
    return args


def run_bench(args) -> dict:
    from diffusion.sd_schedulers import scheduler_from_config
    from sag.bench import _loadavg
    from unet.sd_unet import SDUNet, SDUNetConfig

    from .guidance import build_guidance, guided_output

    if args.threads:
        torch.set_num_threads(args.threads)
    device, dtype = torch.device(args.device), DTYPES[args.dtype]
    torch.manual_seed(args.seed)
    config = unet_config(args.channels, args.latent)
    unet = SDUNet(SDUNetConfig.from_diffusers(config)).to(device).eval()
    scheduler = scheduler_from_config(SD15_SCHEDULER)
    scheduler.set_timesteps(args.steps, device=device)
    t = scheduler.timesteps.tolist()[args.steps // 2]
    generator = torch.Generator().manual_seed(args.seed + 1)
    B, D = args.batch, config["cross_attention_dim"]
    x = torch.randn(B, 4, args.latent, args.latent, generator=generator).to(device)
    cond, uncond = (torch.randn(B, TEXT_TOKENS, D, generator=generator).to(device) for _ in range(2))
    guidances = {"cond": None,
                 "cfg": build_guidance(unet, guidance_scale=7.5, negative_embeds=uncond),
                 "sag_cfg": build_guidance(unet, guidance_scale=7.5, negative_embeds=uncond, sag_scale=0.75),
                 "pag_cfg": build_guidance(unet, guidance_scale=7.5, negative_embeds=uncond, pag_scale=3.0)}

    def step(guidance) -> Callable[[], torch.Tensor]:
        def run():
            with torch.inference_mode():
                out = guided_output(guidance, unet, scheduler, t, x, cond, dtype).output
                return scheduler.step(out, t, x).prev_sample
        return run

    fns = {name: step(g) for name, g in guidances.items()}
    load_before = _loadavg()
    started = time.perf_counter()
    wall, cpu = _interleaved_two_clocks(fns, device, args.repeats, args.warmup)
    seconds = time.perf_counter() - started
    clocks = {"wall": wall} if device.type != "cpu" else {"wall": wall, "cpu": cpu}
    ratio = {clock: {name: ms[name] / ms["cfg"] for name in ms} for clock, ms in clocks.items()}
    return {
        "unet": {"structure": "SD 1.5", "block_out_channels": config["block_out_channels"],
                 "latent": args.latent, "image_px": 8 * args.latent,
                 "params_m": sum(p.numel() for p in unet.parameters()) / 1e6, "weights": "random (seeded)",
                 "sag_site": unet.sag_site, "fused_attention_where_no_map_is_read": True},
        "batch": B, "device": str(device), "dtype": args.dtype, "threads": torch.get_num_threads(),
        "cpu": _cpu_name() if device.type == "cpu" else torch.cuda.get_device_name(device),
        "torch": torch.__version__, "timestep": t, "repeats": args.repeats, "warmup": args.warmup,
        "loadavg_1min": {"before": load_before, "after": _loadavg()}, "cores": os.cpu_count(),
        "seconds": round(seconds, 1),
        "methods": {name: {**{f"{clock}_ms": ms[name] for clock, ms in clocks.items()},
                           **{f"{clock}_x_cfg": ratio[clock][name] for clock in clocks}, "about": METHODS[name]}
                    for name in wall},
        "sag_beyond_its_passes": {clock: ms["sag_cfg"] / (ms["cfg"] + ms["cond"]) for clock, ms in clocks.items()},
        "targets": {clock: {f"sag_cfg <= {TARGET_SAG_VS_CFG} x cfg": ratio[clock]["sag_cfg"] <= TARGET_SAG_VS_CFG,
                            "pag_cfg <= sag_cfg": ms["pag_cfg"] <= ms["sag_cfg"]} for clock, ms in clocks.items()},
    }


def _interleaved_two_clocks(fns: Dict[str, Callable[[], object]], device, repeats: int, warmup: int):
    """Median ms of each function on the wall clock and on this process's CPU clock, run round-robin
    (the starting method rotates every round, so drift in the machine's load hits all alike)."""
    from sag.bench import _sync
    names = list(fns)
    for _ in range(warmup):
        for fn in fns.values():
            fn()
    wall: Dict[str, list] = {name: [] for name in names}
    cpu: Dict[str, list] = {name: [] for name in names}
    for round_index in range(repeats):
        for name in names[round_index % len(names):] + names[:round_index % len(names)]:
            _sync(device)
            w, c = time.perf_counter(), time.process_time()
            fns[name]()
            _sync(device)
            wall[name].append((time.perf_counter() - w) * 1e3)
            cpu[name].append((time.process_time() - c) * 1e3)
    return ({n: statistics.median(v) for n, v in wall.items()}, {n: statistics.median(v) for n, v in cpu.items()})


def format_report(r: dict) -> str:
    u = r["unet"]
    load = " -> ".join("?" if v is None else f"{v:.2f}" for v in r["loadavg_1min"].values())
    clocks = list(r["targets"])
    lines = [f"sag.sd.bench  {u['structure']} U-Net structure, widths {u['block_out_channels']}, "
             f"{u['params_m']:.0f}M params ({u['weights']}), latent {u['latent']}x{u['latent']} "
             f"({u['image_px']} px), batch {r['batch']}, {r['device']} {r['dtype']}, {r['threads']} threads",
             f"  {r['cpu']}; torch {r['torch']}; DDIM t = {r['timestep']}; median of {r['repeats']} after "
             f"{r['warmup']} warmup, methods interleaved; 1-min load {load} on {r['cores']} cores", "",
             f"  {'method':<10}" + "".join(f"{clock + ' ms':>11}{'x CFG':>8}" for clock in clocks) + "  about"]
    for name, m in r["methods"].items():
        lines.append(f"  {name:<10}" + "".join(f"{m[clock + '_ms']:>11.1f}{m[clock + '_x_cfg']:>7.3f}x"
                                               for clock in clocks) + f"  {m['about']}")
    for clock in clocks:
        lines.append(f"  {clock}: SAG+CFG / (CFG + cond) = {r['sag_beyond_its_passes'][clock]:.3f}; targets: "
                     + ", ".join(f"{k} {'MET' if v else 'NOT met'}" for k, v in r["targets"][clock].items()))
    return "\n".join(lines)


def main(argv: Optional[Sequence[str]] = None) -> int:
    args = _parse_args(argv)
    report = run_bench(args)
    print(json.dumps(report, indent=1) if args.json else format_report(report))
    return 0


if __name__ == "__main__":
    sys.exit(main())
