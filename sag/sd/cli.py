"""``python -m sag.sd``: Stable Diffusion 1.x / 2.x images with Self-Attention Guidance (and PAG, SEG, CFG).

    python -m sag.sd "a photo of a cat" --model stable-diffusion-v1-5 --sag-scale 0.75 --steps 50 \\
        --seed 0 --num-samples 4 --out runs/cat

``--model`` is a diffusers folder (``model_index.json``, ``unet/``, ``vae/``, ``text_encoder/``,
``tokenizer/``, ``scheduler/``) or an original single file (``v1-5-pruned-emaonly.safetensors``),
whose configs are inferred from its shapes or taken from ``--config-folder``. The arguments mean
what they mean in the diffusers pipelines (``--cfg`` is ``guidance_scale``, 1 = off; ``--sag-scale``,
``--pag-scale``, ``--seg-scale`` are the paper scales s, 0 = off). With none of the three given, SAG
runs with diffusers' default s = 0.75.

Outputs in ``--out``:

* ``sample_{i:06d}.png`` -- sample i, drawn from seed ``seed + i`` (its initial latents, and any
  noise a scheduler draws, from that seed alone: results do not depend on ``--batch-size``);
* ``samples_{N}x{H}x{W}x3.npz`` -- every sample, ``arr_0`` uint8 NHWC (the ADM evaluator's format);
* ``grid.png`` -- the samples in a near-square grid;
* ``side_by_side.png`` -- one row per sample (the first 8): left the same seed without SAG / PAG /
  SEG (CFG kept as given), right with them (``--no-compare`` skips it);
* ``intermediates/sample_{i:06d}.png`` -- with ``--save-intermediates [K]``: the salient mask of
  each SAG step (columns, the steps' t in the PNG's text) of the first K samples (all without K);
* ``samples.json`` -- every setting, the pipeline call, the seeds, the model's files and their
  SHA-256, dtype, device, versions, timings (written last).

Every file goes to a temporary name first, then is renamed. Bad input is one line on stderr,
``sag.sd: error: ...``, and exit status 2.
"""
from __future__ import annotations

import argparse
import math
import shlex
import sys
import time
from pathlib import Path
from typing import Any, Dict, List, Optional, Sequence

import numpy as np
import torch

from sag.cli_common import (OneLineParser, StepStrips, UsageError, check_seed_range, jsonable, known_errors,
                            report_error, resolve_device, step_callback, utc_iso, versions)

PROG = "sag.sd"
SIDECAR = "samples.json"
SIDECAR_FORMAT = "sag-sd/1"
INTERMEDIATES = "intermediates"
COMPARE_MAX = 8
DEFAULT_SAG_SCALE = 0.75          # diffusers' StableDiffusionSAGPipeline default
DTYPES = {"fp32": torch.float32, "float32": torch.float32, "bf16": torch.bfloat16, "bfloat16": torch.bfloat16,
          "fp16": torch.float16, "float16": torch.float16}
SCHEDULERS = {"ddim": "DDIMScheduler", "pndm": "PNDMScheduler", "euler": "EulerDiscreteScheduler"}
WEIGHT_SUFFIXES = (".safetensors", ".bin", ".ckpt", ".pt")


def build_parser() -> argparse.ArgumentParser:
    p = OneLineParser(prog=f"python -m {PROG}", allow_abbrev=False,
                      description="Sample Stable Diffusion 1.x / 2.x with Self-Attention Guidance (SAG), "
                                  "Perturbed-Attention Guidance (PAG) or Smoothed Energy Guidance (SEG), "
                                  "on top of classifier-free guidance.")
    p.add_argument("prompt", help="the text prompt")
    p.add_argument("--model", required=True,
                   help="a diffusers folder (model_index.json, unet/, vae/, ...) or an original single file")
    p.add_argument("--config-folder", default=None,
                   help="for a single file: a diffusers folder whose configs (and tokenizer) to use "
                        "(default: inferred from the file's shapes)")
    p.add_argument("--negative-prompt", default=None, help="the negative prompt (CFG's unconditional text)")
    p.add_argument("--steps", type=int, default=50, help="inference steps (default 50)")
    p.add_argument("--cfg", type=float, default=7.5, help="classifier-free guidance scale w (1 = off; default 7.5)")
    p.add_argument("--sag-scale", type=float, default=None,
                   help=f"SAG scale s (0 = off; default {DEFAULT_SAG_SCALE} when no --pag-scale / --seg-scale is given)")
    p.add_argument("--sag-blur-sigma", type=float, default=1.0, help="SAG's blur sigma in latent pixels (default 1.0)")
    p.add_argument("--pag-scale", type=float, default=0.0, help="PAG scale s (0 = off)")
    p.add_argument("--pag-layers", default="mid",
                   help="comma-separated PAG layers as the diffusers PAG pipelines name them "
                        "(mid, down.block_1, up.block_0.attentions_0, down_blocks.0.attentions.1, ...; default mid)")
    p.add_argument("--seg-scale", type=float, default=0.0, help="SEG scale s (0 = off)")
    p.add_argument("--seg-sigma", type=float, default=math.inf,
                   help="SEG's query blur sigma in tokens (default inf = the mean query, the SEG paper's limit)")
    p.add_argument("--seg-layers", default="mid", help="comma-separated SEG layers (default mid)")
    p.add_argument("--scheduler", default=None, choices=sorted(SCHEDULERS),
                   help="replace the model's scheduler (keeping its schedule settings); default: the model's own")
    p.add_argument("--eta", type=float, default=0.0, help="DDIM eta (default 0)")
    p.add_argument("--height", type=int, default=None, help="image height, a multiple of 8 (default: the model's)")
    p.add_argument("--width", type=int, default=None, help="image width, a multiple of 8 (default: the model's)")
    p.add_argument("--num-samples", type=int, default=1, help="how many images (default 1)")
    p.add_argument("--batch-size", type=int, default=1, help="images per pipeline call (default 1)")
    p.add_argument("--seed", type=int, default=0, help="sample i uses seed + i (default 0)")
    p.add_argument("--device", default=None, help="cuda if available, else cpu")
    p.add_argument("--dtype", default="fp32", choices=sorted(DTYPES),
                   help="U-Net and text encoder dtype: fp32 (default), bf16, fp16; the VAE runs in float32")
    p.add_argument("--compare", action=argparse.BooleanOptionalAction, default=True,
                   help="write side_by_side.png: the first 8 samples without and with SAG / PAG / SEG, same seeds "
                        "(default on)")
    p.add_argument("--save-intermediates", nargs="?", type=int, const=math.inf, default=0, metavar="K",
                   help="PNG strips of the salient mask per SAG step for the first K samples (all without K)")
    p.add_argument("--out", default="samples/sd", help="output folder (default samples/sd)")
    p.add_argument("--progress", action=argparse.BooleanOptionalAction, default=True, help="progress bar (default on)")
    return p


def _layers(text: str) -> tuple:
    return tuple(x.strip() for x in text.split(",") if x.strip())


def parse_args(argv: Sequence[str]) -> argparse.Namespace:
    """The settings of a command line (without the program name); every check that needs no model."""
    args = build_parser().parse_args(list(argv))
    if not args.prompt.strip():
        raise UsageError("the prompt is empty; give the text to draw as the first argument")
    for name in ("steps", "num_samples", "batch_size"):
        if getattr(args, name) <= 0:
            raise UsageError(f"--{name.replace('_', '-')} must be a positive integer, got {getattr(args, name)}")
    for name in ("height", "width"):
        value = getattr(args, name)
        if value is not None and (value <= 0 or value % 8):
            raise UsageError(f"--{name} {value} is not a positive multiple of 8 (the autoencoder works on 8x8 patches)")
    check_seed_range(args.seed, args.num_samples)
    for name in ("cfg", "sag_scale", "sag_blur_sigma", "pag_scale", "seg_scale", "eta"):
        value = getattr(args, name)
        if value is not None and not math.isfinite(value):
            raise UsageError(f"--{name.replace('_', '-')} must be a finite number, got {value}")
    if args.sag_blur_sigma <= 0:
        raise UsageError(f"--sag-blur-sigma must be > 0, got {args.sag_blur_sigma}")
    if not args.seg_sigma > 0:
        raise UsageError(f"--seg-sigma must be > 0 (inf = the mean query), got {args.seg_sigma}")
    if args.eta < 0:
        raise UsageError(f"--eta must be >= 0, got {args.eta}")
    if args.eta != 0 and args.scheduler not in (None, "ddim"):
        raise UsageError(f"--eta applies to DDIM only, not --scheduler {args.scheduler}")
    if args.sag_scale is None:
        args.sag_scale = DEFAULT_SAG_SCALE if args.pag_scale == 0 and args.seg_scale == 0 else 0.0
    chosen = [f"--{name}-scale" for name in ("sag", "pag", "seg") if getattr(args, f"{name}_scale") != 0]
    if len(chosen) > 1:
        raise UsageError(f"{' and '.join(chosen)} together: choose one of SAG, PAG and SEG (each runs with or without CFG)")
    if min(args.sag_scale, args.pag_scale, args.seg_scale) < 0:
        raise UsageError("--sag-scale / --pag-scale / --seg-scale must be >= 0 (0 = off)")
    if args.save_intermediates < 0:
        raise UsageError(f"--save-intermediates must be >= 0, got {args.save_intermediates}")
    args.save_intermediates = int(min(args.save_intermediates, args.num_samples))   # bare flag: every sample
    if args.save_intermediates and args.sag_scale == 0:
        raise UsageError("--save-intermediates records SAG's salient mask; it needs --sag-scale > 0")
    if not _layers(args.pag_layers) or not _layers(args.seg_layers):
        raise UsageError("--pag-layers / --seg-layers need at least one layer name (e.g. mid)")
    model = Path(args.model).expanduser()
    if not model.exists():
        raise UsageError(f"--model {args.model!r} does not exist (give a diffusers folder or a single .safetensors file)")
    if model.is_dir() and args.config_folder is not None:
        raise UsageError("--config-folder applies to a single-file --model only; this --model is a folder")
    if args.config_folder is not None and not Path(args.config_folder).expanduser().is_dir():
        raise UsageError(f"--config-folder {args.config_folder!r} is not a folder")
    return args


# ------------------------------------------------------------------------------------------------
# The pipeline
# ------------------------------------------------------------------------------------------------

def load(args, device: torch.device):
    """The pipeline of ``--model`` on ``device`` in ``--dtype`` (VAE in float32), with ``--scheduler``."""
    from sag.sd import load_pipeline
    model = Path(args.model).expanduser()
    config_folder = None if args.config_folder is None else Path(args.config_folder).expanduser()
    pipe = load_pipeline(model, device=device, dtype=DTYPES[args.dtype], config_folder=config_folder)
    if args.scheduler is not None:
        pipe.scheduler = _replace_scheduler(pipe.scheduler, SCHEDULERS[args.scheduler])
    return pipe


def _replace_scheduler(scheduler, class_name: str):
    """The same schedule (betas, spacing, offset, prediction type) with another sampler. PNDM runs
    PLMS only (``skip_prk_steps``), as SD 1.5's own scheduler does."""
    from diffusion.sd_schedulers import scheduler_from_config
    overrides = {"skip_prk_steps": True} if class_name == "PNDMScheduler" else {}
    return scheduler_from_config(dict(scheduler.config), class_name, **overrides)


class MaskStrips(StepStrips):
    """Per SAG step, the salient mask (latent resolution) of chosen samples."""

    ROWS = ("salient_mask",)

    def pictures(self, info):
        mask = info.salient_mask                                # sag.sd.SDStepInfo: [B x 1 x h x w] or None
        return None if mask is None else (mask.float() * 2 - 1,)


def to_uint8(images: np.ndarray) -> np.ndarray:
    """The pipeline's float NHWC images in [0, 1] -> uint8, rounded as diffusers' ``numpy_to_pil``."""
    return (np.clip(images, 0.0, 1.0) * 255).round().astype(np.uint8)


def guidance_kwargs(args) -> Dict[str, Any]:
    """The pipeline keywords of the guidance methods (diffusers' names)."""
    return {"guidance_scale": args.cfg, "sag_scale": args.sag_scale, "sag_blur_sigma": args.sag_blur_sigma,
            "pag_scale": args.pag_scale, "pag_applied_layers": _layers(args.pag_layers),
            "seg_scale": args.seg_scale, "seg_sigma": args.seg_sigma, "seg_applied_layers": _layers(args.seg_layers)}


def _number(value):
    """JSON has no infinity: an infinite float is written as the string "inf" (SEG's sigma = inf)."""
    return str(value) if isinstance(value, float) and math.isinf(value) else value


def _dtype_name(dtype: torch.dtype) -> str:
    return str(dtype).replace("torch.", "")


def _weight_files(args) -> List[Dict[str, Any]]:
    """The model's weight files with their SHA-256 (what the sidecar identifies the model by)."""
    from checkpoints_convert.safe_load import sha256_file
    model = Path(args.model).expanduser().resolve()
    files = sorted(f for f in model.rglob("*") if f.suffix in WEIGHT_SUFFIXES) if model.is_dir() else [model]
    return [{"path": str(f.relative_to(model)) if model.is_dir() else str(f), "bytes": f.stat().st_size,
             "sha256": sha256_file(f)} for f in files]


# ------------------------------------------------------------------------------------------------
# Main
# ------------------------------------------------------------------------------------------------

def main(argv: Optional[Sequence[str]] = None) -> int:
    """Entry point of ``python -m sag.sd``; returns the exit status (0, or 2 after a one-line error)."""
    argv = list(sys.argv[1:] if argv is None else argv)
    try:
        args = parse_args(argv)
        return run(args, argv)
    except known_errors() as err:            # the SD layers raise CheckpointError / GuidanceError / DiffusionError
        report_error(PROG, err)
        return 2


def run(args, argv: Sequence[str]) -> int:
    """Draw ``--num-samples`` images in batches and write every output (see the module docstring)."""
    from sag.io import make_grid, npz_name, write_json, write_npz, write_png
    from tqdm.auto import tqdm

    started = time.time()
    device = resolve_device(args.device)
    if DTYPES[args.dtype] == torch.float16 and device.type != "cuda":
        raise UsageError(f"--dtype {args.dtype} runs on CUDA only; use --dtype bf16 (or fp32) on the {device.type}")
    out = Path(args.out)
    if out.exists() and not out.is_dir():
        raise UsageError(f"--out {out} exists and is not a folder")
    pipe = load(args, device)
    try:
        out.mkdir(parents=True, exist_ok=True)
    except OSError as err:
        raise UsageError(f"cannot write to --out {out}: {err.strerror or err}") from None
    call = dict(prompt=args.prompt, negative_prompt=args.negative_prompt, height=args.height, width=args.width,
                num_inference_steps=args.steps, eta=args.eta, **guidance_kwargs(args))
    guided = any(call[k] != 0 for k in ("sag_scale", "pag_scale", "seg_scale"))
    pipe.scheduler.set_timesteps(args.steps)
    model_steps = len(pipe.scheduler.timesteps)          # PNDM: one more U-Net step than inference steps

    n = args.num_samples
    bar = tqdm(total=n * (2 if args.compare and guided else 1), desc="images", unit="img", disable=not args.progress)
    images, plain = [], []
    for first in range(0, n, args.batch_size):
        indices = list(range(first, min(first + args.batch_size, n)))
        seeds = [args.seed + i for i in indices]
        keep = {pos: i for pos, i in enumerate(indices) if i < args.save_intermediates}
        strips = MaskStrips(keep) if keep else None
        images.append(to_uint8(pipe(**call, seeds=seeds, output_type="np",
                                    callback=step_callback(strips, bar if args.progress else None, model_steps))))
        bar.update(len(indices))
        if strips is not None:
            strips.write(out / INTERMEDIATES)
        compared = [i for i in indices if i < COMPARE_MAX]
        if args.compare and guided and compared:
            unguided = dict(call, sag_scale=0.0, pag_scale=0.0, seg_scale=0.0)
            plain.append(to_uint8(pipe(**unguided, seeds=[args.seed + i for i in compared], output_type="np",
                                       callback=step_callback(None, bar if args.progress else None, model_steps))))
            bar.update(len(compared))
    bar.close()
    images = np.concatenate(images)
    _, height, width, _ = images.shape

    for i, image in enumerate(images):
        write_png(out / f"sample_{i:06d}.png", image, {"prompt": args.prompt, "seed": str(args.seed + i)})
    write_npz(out / npz_name(n, height, width), images)
    write_png(out / "grid.png", make_grid(images))
    if plain:
        plain = np.concatenate(plain)
        pairs = np.stack([plain, images[:len(plain)]], axis=1).reshape(-1, height, width, 3)   # [unguided, guided] rows
        write_png(out / "side_by_side.png", make_grid(pairs, ncol=2))
    finished = time.time()
    write_json(out / SIDECAR, sidecar(args, argv, pipe, call, device, (height, width), bool(len(plain)),
                                      started, finished))
    print(f"{PROG}: wrote {n} images to {out} ({finished - started:.1f} s)", flush=True)
    return 0


def sidecar(args, argv, pipe, call, device, size, compared: bool, started: float, finished: float) -> Dict[str, Any]:
    """Every setting of the run (samples.json)."""
    n = args.num_samples
    scheduler = pipe.scheduler
    return jsonable({
        "format": SIDECAR_FORMAT,
        "prompt": args.prompt,
        "negative_prompt": args.negative_prompt,
        "model": {"path": str(Path(args.model).expanduser().resolve()),
                  "layout": "diffusers folder" if Path(args.model).is_dir() else "single file",
                  "config_folder": args.config_folder, "files": _weight_files(args)},
        "pipeline_call": {k: _number(v) for k, v in call.items() if k not in ("prompt", "negative_prompt")},
        "method": "+".join([m for m in ("sag", "pag", "seg") if getattr(args, f"{m}_scale") > 0]
                           + (["cfg"] if args.cfg > 1 else [])) or "none",
        "scheduler": {"class": type(scheduler).__name__, "override": args.scheduler,
                      "config": dict(getattr(scheduler, "config", {}) or {})},
        "steps": args.steps,
        "image_size": {"height": size[0], "width": size[1]},
        "seeds": {"base": args.seed, "first_seed": args.seed, "last_seed": args.seed + n - 1,
                  "rule": "sample i: initial latents and every scheduler noise from seed base + i"},
        "num_samples": n,
        "batch_size": args.batch_size,
        "outputs": {"samples": [f"sample_{i:06d}.png" for i in range(n)], "npz": f"samples_{n}x{size[0]}x{size[1]}x3.npz",
                    "grid": "grid.png", "side_by_side": "side_by_side.png" if compared else None,
                    "side_by_side_layout": "rows: samples; left: without SAG/PAG/SEG, right: with" if compared else None,
                    "intermediates": INTERMEDIATES if args.save_intermediates else None,
                    "intermediate_samples": min(args.save_intermediates, n)},
        "device": str(device),
        "dtype": {"unet_forward": _dtype_name(pipe.dtype) + (" (autocast)" if pipe.dtype != torch.float32 else ""),
                  **{f"{part}_weights": _dtype_name(next(getattr(pipe, part).parameters()).dtype)
                     for part in ("unet", "text_encoder", "vae")},
                  "latents_guidance_scheduler": "float32"},
        "versions": versions(),
        "command": f"python -m {PROG} {shlex.join(argv)}",
        "argv": list(argv),
        "started": utc_iso(started),
        "finished": utc_iso(finished),
        "seconds": round(finished - started, 3),
    })
