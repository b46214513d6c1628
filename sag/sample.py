"""``sag-sample``: draw samples with Self-Attention Guidance from an ADM / IDDPM checkpoint.

Takes the official ``image_sample.py`` / ``classifier_sample.py`` command lines (guided-diffusion and
the SAG repo: MODEL_FLAGS, diffusion flags, SAG_FLAGS, SAMPLE_FLAGS, classifier flags) with their
official meanings, so a README command works after replacing ``mpiexec -n N python
classifier_sample.py`` with ``torchrun --nproc_per_node N -m sag.sample`` (or ``sag-sample`` for one
process)::

    sag-sample --model_path models/256x256_diffusion_uncond.pt --attention_resolutions 32,16,8 \\
        --class_cond False --image_size 256 --learn_sigma True --num_channels 256 \\
        --num_head_channels 64 --num_res_blocks 2 --resblock_updown True --use_scale_shift_norm True \\
        --guide_scale 1.5 --guide_start 250 --sel_attn_block output --sel_attn_depth 2 --blur_sigma 9 \\
        --timestep_respacing 250 --batch_size 16 --num_samples 64 --out samples/

Our own, clearer flags: ``--preset NAME``, ``--sag-scale S`` (paper s; overrides ``--guide_scale``
g = 1 + s), ``--blur-guidance``, ``--out DIR``, ``--seed N``, ``--class-label K``, ``--eta``,
``--device``, ``--dtype``, ``--exact-attention``, ``--progress/--no-progress``, ``--save-intermediates K``.

Attention: blocks whose map nobody reads run fused ``scaled_dot_product_attention`` (no T x T
matrix; equal to the official einsums to ~2e-6); ``--exact-attention`` runs the official einsums
everywhere, bit-identical to the official U-Net. Captured maps always come from the explicit path.

Precision (``sag.precision``): ``--dtype auto`` (default) runs the U-Net passes under bfloat16
autocast on a CPU with native bfloat16 units (AMX / AVX512-BF16) when one forward is big enough and a
startup probe measures bfloat16 faster, else float32; ``--dtype float32 / bf16 / fp16`` choose. Norms,
softmax, the captured map, the blur and the sampler stay float32. The sidecar records the dtype that
ran and why (``dtype``, ``dtype_note``, ``dtype_choice``). ``sag.sample(..., fast=True)`` is the same
default (fused attention + auto dtype) from Python.

Determinism and scale (DESIGN.md "Scale", ECOSYSTEM.md section 2): sample i is drawn from seed
``seed + i`` only (its x_T, its step noise and, for class-conditional models, its label), so the
images do not depend on the batch size or the process count (beyond floating-point rounding of
batched kernels). Under ``torchrun`` rank r owns the indices i with ``i % world_size == r``; each
batch is written atomically as a shard keyed by its indices; rank 0 merges the shards in index
order into ``samples_{N}x{H}x{W}x3.npz`` (``arr_0`` uint8 NHWC, ``arr_1`` int64 labels when labels
were used), then writes ``grid.png`` and the ``samples.json`` sidecar. A rerun of a killed command
resumes from the shards; a finished run (npz + sidecar with the same settings) is not redone.

Bad input gives one line on stderr, ``sag-sample: error: ...``, and exit status 2; nothing is
written under the final npz name unless every sample was drawn.
"""
from __future__ import annotations

import argparse
import dataclasses
import math
import os
import shlex
import shutil
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Dict, List, Optional, Sequence, Tuple

import numpy as np
import torch

from .precision import DTYPE_CHOICES, DTYPES, DtypeChoice
# The pieces shared with ``python -m sag.sd`` (kept under their former private names here).
from .cli_common import OneLineParser as _Parser
from .cli_common import StepStrips, UsageError, check_seed_range, report_error, resolve_device, utc_iso
from .cli_common import diff_keys as _diff_keys
from .cli_common import jsonable as _jsonable
from .cli_common import known_errors as _known_errors
from .cli_common import step_callback as _callbacks
from .cli_common import versions as _versions

PROG = "sag-sample"
SIDECAR = "samples.json"
SHARDS = "shards"
RUN_FILE = "run.json"
INTERMEDIATES = "intermediates"
SIDECAR_FORMAT = "sag-sample/1"

NO_MODEL_MESSAGE = ("no --model_path given and the embedded demo model is missing from this install; "
                    "reinstall sag or pass --model_path FILE (an official OpenAI checkpoint or a sag checkpoint)")

SAG_FLAG_NAMES = ("guide_scale", "guide_start", "blur_sigma", "sel_attn_block", "sel_attn_depth")
# Official flags a sag checkpoint (which carries its own model config) may still take.
SAG_CHECKPOINT_FLAGS = frozenset(SAG_FLAG_NAMES) | {"timestep_respacing", "use_fp16", "classifier_use_fp16",
                                                    "classifier_width", "classifier_depth",
                                                    "classifier_attention_resolutions",
                                                    "classifier_use_scale_shift_norm",
                                                    "classifier_resblock_updown", "classifier_pool"}


class _Quiet(Exception):
    """Another rank reported the error; leave with status 2 without printing."""


# ------------------------------------------------------------------------------------------------
# Command line
# ------------------------------------------------------------------------------------------------

def _bool(value: str) -> bool:
    from checkpoints_convert.flags import str2bool
    try:
        return str2bool(value)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{value!r} is not a boolean (pass True or False)") from None


def build_parser() -> argparse.ArgumentParser:
    """The flags ``sag-sample`` parses itself; every other ``--name value`` is an official model,
    diffusion, SAG or classifier flag and goes to the checkpoint loader, which validates it."""
    p = _Parser(prog=PROG, allow_abbrev=False, add_help=True,
                description="Sample from an ADM / IDDPM checkpoint with Self-Attention Guidance. "
                            "Any official image_sample.py / classifier_sample.py flag (--num_channels, "
                            "--timestep_respacing, --guide_scale, --classifier_width, ...) is accepted "
                            "as '--name value' with its official meaning.",
                epilog="Under torchrun (torchrun --nproc_per_node N -m sag.sample ...) the samples are "
                       "split over the processes; the results do not depend on N or --batch_size.")
    off = p.add_argument_group("official sampling flags (image_sample.py / classifier_sample.py)")
    off.add_argument("--model_path", default="", help="checkpoint: an official OpenAI .pt or a sag checkpoint")
    off.add_argument("--num_samples", type=int, default=10000, help="how many samples (official default 10000)")
    off.add_argument("--batch_size", type=int, default=16, help="samples per forward pass (official default 16)")
    off.add_argument("--use_ddim", type=_bool, default=False, help="DDIM instead of ancestral sampling (True/False)")
    off.add_argument("--clip_denoised", type=_bool, default=True, help="clip x0 predictions to [-1, 1] (True/False)")
    off.add_argument("--classifier_path", default="", help="noisy-image classifier for classifier guidance")
    off.add_argument("--classifier_scale", type=float, default=None,
                     help="classifier guidance scale (official default 1.0)")
    off.add_argument("--classifier_guidance", type=_bool, default=None,
                     help="SAG repo: use the classifier (default: True when --classifier_path is given)")
    own = p.add_argument_group("sag-sample flags")
    own.add_argument("--preset", default=None, help="preset name: the flags (and recommended SAG settings) of a released checkpoint")
    own.add_argument("--sag-scale", "--sag_scale", dest="sag_scale", type=float, default=None,
                     help="paper SAG scale s (0 = off); overrides --guide_scale (g = 1 + s)")
    own.add_argument("--blur-guidance", "--blur_guidance", dest="blur_guidance", action="store_true",
                     help="blur guidance (the paper's baseline: blur everywhere, no attention mask)")
    own.add_argument("--pag-scale", "--pag_scale", dest="pag_scale", type=float, default=None,
                     help="Perturbed-Attention Guidance with paper scale s (identity attention; official guide_scale = 1 + s)")
    own.add_argument("--pag-sites", "--pag_sites", dest="pag_sites", default=None,
                     help="comma-separated attention sites for PAG (default: the deepest encoder blocks and the middle, as the official ADM runs)")
    own.add_argument("--seg-sigma", "--seg_sigma", dest="seg_sigma", type=float, default=None,
                     help="Smoothed Energy Guidance: blur the queries with this sigma in tokens (inf = mean query)")
    own.add_argument("--seg-scale", "--seg_scale", dest="seg_scale", type=float, default=3.0,
                     help="SEG scale s (default 3.0, fixed as the SEG paper recommends; sigma is the knob)")
    own.add_argument("--seg-sites", "--seg_sites", dest="seg_sites", default="middle",
                     help="comma-separated attention sites for SEG (default: middle)")
    own.add_argument("--compare", action=argparse.BooleanOptionalAction, default=None,
                     help="also write side_by_side.png: the first 8 samples unguided (top) and guided (bottom), same seeds "
                          "(default: on for the embedded demo model)")
    own.add_argument("--out", default="samples", help="output folder (default: samples/)")
    own.add_argument("--seed", type=int, default=0, help="sample i uses seed + i (default 0)")
    own.add_argument("--class-label", "--class_label", dest="class_label", type=int, default=None,
                     help="give every sample this class (default: one label per sample from its seed)")
    own.add_argument("--eta", type=float, default=0.0, help="DDIM eta (default 0.0, as the official scripts)")
    own.add_argument("--device", default=None, help="cuda if available, else cpu")
    own.add_argument("--dtype", default=None, choices=DTYPE_CHOICES,
                     help="precision of the U-Net passes: auto (default: bfloat16 on a CPU with native bf16 units "
                          "(AMX / AVX512-BF16) when a startup probe measures it faster, else float32), float32, "
                          "bfloat16 / bf16 (CPU or CUDA autocast), float16 / fp16 (CUDA); norms, softmax, the "
                          "captured map, the blur and the sampler stay float32")
    own.add_argument("--exact-attention", "--exact_attention", dest="exact_attention", action="store_true",
                     help="every attention block runs the official einsums (bit-identical to the official U-Net); "
                          "default: fused scaled_dot_product_attention wherever no map is read (equal to ~2e-6, faster)")
    own.add_argument("--progress", action=argparse.BooleanOptionalAction, default=True,
                     help="progress bars on rank 0 (default on)")
    own.add_argument("--save-intermediates", "--save_intermediates", dest="save_intermediates", type=int,
                     default=0, metavar="K",
                     help="PNG strips (x0, mask, blurred x0, x_bar_t per SAG step) of the first K samples")
    return p


def _split_argv(parser: argparse.ArgumentParser, argv: Sequence[str]) -> Tuple[List[str], Dict[str, str]]:
    """Separate our flags (for argparse) from the official ``--name value`` flags (a dict of strings).

    Both ``--name value`` and ``--name=value`` are accepted, as with the official argparse; a value
    may start with '-' (``--num_heads_upsample -1``).
    """
    takes_value, no_value = set(), set()
    for action in parser._actions:  # argparse has no public listing of option strings
        for opt in action.option_strings:
            (takes_value if action.nargs != 0 else no_value).add(opt)
    own: List[str] = []
    official: Dict[str, str] = {}
    i = 0
    while i < len(argv):
        token = argv[i]
        name, eq, inline = token.partition("=")
        if token in no_value:
            own.append(token)
            i += 1
            continue
        if name in takes_value:
            if eq:
                own.append(token)
                i += 1
            elif i + 1 < len(argv):
                own.append(f"{name}={argv[i + 1]}")
                i += 2
            else:
                raise UsageError(f"{name} needs a value")
            continue
        if not name.startswith("--") or len(name) <= 2:
            raise UsageError(f"unexpected argument {token!r}: flags come as '--name value'")
        if eq:
            value, i = inline, i + 1
        elif i + 1 < len(argv):
            value, i = argv[i + 1], i + 2
        else:
            raise UsageError(f"{name} needs a value (official flags come as '--name value')")
        official[name[2:]] = value               # as with argparse, a repeated flag's last value wins
    return own, official


def parse_args(argv: Sequence[str]) -> Tuple[argparse.Namespace, Dict[str, str]]:
    """(our settings, official flags as given) from a command line (without the program name)."""
    parser = build_parser()
    own, official = _split_argv(parser, argv)
    args = parser.parse_args(own)
    from checkpoints_convert.flags import PAG_DEFAULTS, SAG_DEFAULTS
    pag_only = sorted(set(official) & (set(PAG_DEFAULTS) - set(SAG_DEFAULTS)))
    if pag_only:
        raise UsageError(f"--{pag_only[0]} is an official PAG-repository flag; use --pag-scale S [--pag-sites a,b] "
                         "(or load_official(path, flags) from Python, which takes the PAG repository's flags)")
    if "base_samples" in official or "large_size" in official or "small_size" in official:
        raise UsageError("super-resolution sampling (--base_samples / --large_size / --small_size) is not supported by sag-sample")
    if args.num_samples <= 0:
        raise UsageError(f"--num_samples must be a positive integer, got {args.num_samples}")
    if args.batch_size <= 0:
        raise UsageError(f"--batch_size must be a positive integer, got {args.batch_size}")
    if args.save_intermediates < 0:
        raise UsageError(f"--save-intermediates must be >= 0, got {args.save_intermediates}")
    check_seed_range(args.seed, args.num_samples)
    if args.sag_scale is not None and not math.isfinite(args.sag_scale):
        raise UsageError(f"--sag-scale must be a finite number, got {args.sag_scale}")
    if args.classifier_scale is not None and not math.isfinite(args.classifier_scale):
        raise UsageError(f"--classifier_scale must be a finite number, got {args.classifier_scale}")
    if not math.isfinite(args.eta) or args.eta < 0:
        raise UsageError(f"--eta must be a finite number >= 0, got {args.eta}")
    if args.eta != 0 and not args.use_ddim:
        raise UsageError("--eta applies to DDIM only; add --use_ddim True")
    return args, official


# ------------------------------------------------------------------------------------------------
# Distributed context
# ------------------------------------------------------------------------------------------------

@dataclass
class Dist:
    """Where this process stands: rank, world size, local rank; ``active`` once torch.distributed is up."""
    rank: int = 0
    world_size: int = 1
    local_rank: int = 0
    active: bool = False
    in_step: bool = False   # every rank passed the last collective and will reach close(): leave together

    @classmethod
    def from_env(cls) -> "Dist":
        """torchrun sets RANK, WORLD_SIZE and LOCAL_RANK; without them this is one process."""
        env = os.environ
        if all(k in env for k in ("RANK", "WORLD_SIZE", "LOCAL_RANK")):
            return cls(int(env["RANK"]), int(env["WORLD_SIZE"]), int(env["LOCAL_RANK"]))
        return cls()

    def init(self, device: torch.device) -> None:
        """Start the process group (gloo on CPU, nccl on CUDA) when there is more than one process."""
        if self.world_size > 1 and not self.active:
            import torch.distributed as dist
            backend = "nccl" if device.type == "cuda" else "gloo"
            dist.init_process_group(backend=backend, init_method="env://")
            self.active = True

    def broadcast(self, obj):
        """rank 0's ``obj`` on every rank."""
        if not self.active:
            return obj
        import torch.distributed as dist
        box = [obj]
        dist.broadcast_object_list(box, src=0)
        return box[0]

    def gather(self, obj) -> list:
        """Every rank's ``obj``, in rank order, on every rank."""
        if not self.active:
            return [obj]
        import torch.distributed as dist
        out = [None] * self.world_size
        dist.all_gather_object(out, obj)
        return out

    def close(self) -> None:
        if self.active:
            import torch.distributed as dist
            if self.in_step:
                # A rank that tears gloo down while another still works can abort ("terminate called
                # without an active exception"); once every rank is known to reach close(), wait for all.
                dist.barrier()
            dist.destroy_process_group()
            self.active = False


def resolve_dtype(args, official: Dict[str, str], device: torch.device, model=None, batch: int = 1,
                  out: Optional[Path] = None) -> DtypeChoice:
    """The dtype the U-Net passes run in, and why (``sag.precision.choose_dtype``; --dtype, default auto).

    The official ``--use_fp16 True`` (a GPU speed switch) means float16 on CUDA and is ignored on CPU
    (where auto decides). Under auto, a run already in ``out`` (finished, or shards of a killed one)
    keeps the dtype it was made with, so a rerun resumes instead of meeting "other settings".
    """
    from checkpoints_convert.flags import str2bool

    from .precision import PrecisionError, choose_dtype
    requested = args.dtype or "auto"
    note = ""
    if requested == "auto" and "use_fp16" in official and str2bool(official["use_fp16"], "use_fp16"):
        if device.type == "cuda":
            return DtypeChoice(torch.float16, "--use_fp16 True: float16 autocast", "use_fp16")
        note = "--use_fp16 True ignored on CPU; "
    previous = _dtype_in_output(out) if requested == "auto" and out is not None else None
    try:
        choice = choose_dtype(previous or requested, device, model, batch)
    except PrecisionError as err:
        raise UsageError(f"--dtype {previous or requested}: {err}"
                         + (f" (the dtype of the run already in --out {out})" if previous else "")) from None
    if previous is not None:
        return choice._replace(requested="auto", reason=f"{note}auto: {previous}, the dtype of the run already in --out {out}")
    return choice._replace(reason=note + choice.reason)


def _dtype_in_output(out: Path) -> Optional[str]:
    """The dtype recorded by a finished run (sidecar) or an unfinished one (shards' run file) in ``out``."""
    from .io import read_json
    for record in (read_json(out / SIDECAR), read_json(out / SHARDS / RUN_FILE)):
        dtype = (record.get("settings") or {}).get("dtype") if isinstance(record, dict) else None
        if dtype in DTYPES:
            return dtype
    return None


# ------------------------------------------------------------------------------------------------
# Model, classifier, guidance
# ------------------------------------------------------------------------------------------------

@dataclass
class Resolved:
    """Everything ``resolve_model`` and its helpers settled."""
    loaded: Any                                  # checkpoints_convert.LoadedModel
    source: Dict[str, Any]                       # checkpoint path, sha256, format, preset
    flags_to_loader: Dict[str, Any] = field(default_factory=dict)


def _check_file(path: str, what: str) -> Path:
    p = Path(path).expanduser()
    if not p.exists():
        raise UsageError(f"{what} {path!r} does not exist")
    if not p.is_file():
        raise UsageError(f"{what} {path!r} is not a file")
    return p


def _preset(args):
    if not args.preset:
        return None
    from checkpoints_convert.presets import resolve_preset_name
    return resolve_preset_name(args.preset)


def _preset_sampling_flags(preset) -> Dict[str, Any]:
    """What ``--preset`` adds beyond the model flags (which ``load_official`` merges itself): the SAG
    settings the SAG README recommends for it, as official flags, and the README's respacing."""
    if preset is None:
        return {}
    flags: Dict[str, Any] = {}
    respacing = (preset.sag or {}).get("timestep_respacing", (preset.sampling or {}).get("timestep_respacing"))
    if respacing is not None:
        flags["timestep_respacing"] = respacing
    if preset.sag:
        sag = preset.sag
        flags["guide_scale"] = sag["official_guide_scale"]
        flags["blur_sigma"] = sag["blur_sigma"]
        flags["guide_start"] = sag["guide_start"]
        if sag["site"] == "middle":
            flags["sel_attn_block"] = "middle"
        else:
            block, _, depth = sag["site"].partition(".")
            flags["sel_attn_block"], flags["sel_attn_depth"] = block, int(depth)
    return flags


def _loader_flags(args, official: Dict[str, str]) -> Dict[str, Any]:
    """The official flags for the loader: the preset's recommended SAG flags, then the user's."""
    flags: Dict[str, Any] = dict(_preset_sampling_flags(_preset(args)))
    flags.update(official)
    return flags


def _default_sag(loaded, flags: Optional[Dict[str, Any]] = None):
    """SAG for a model loaded without SAG settings: the SAG flags the user typed over the official
    defaults (``sag_defaults()``: g 1.5, sigma 9, guide_start 250, official map with the model's
    ``--num_heads``), at a site this U-Net has (``recommended_sag_site`` unless a site is typed)."""
    from checkpoints_convert.flags import resolve_flags, sag_settings_from_flags
    from sag.guidance import SAGConfig
    typed = {k: v for k, v in (flags or {}).items() if k in SAG_FLAG_NAMES}
    settings = sag_settings_from_flags(resolve_flags(typed), loaded.model.config)
    return SAGConfig(scale=settings["scale"], blur_sigma=settings["blur_sigma"], site=settings["site"],
                     guide_start=settings["guide_start"], map_mode=settings["map_mode"],
                     official_num_heads=settings["official_num_heads"])


def _is_sag_checkpoint(path: Path) -> bool:
    """Whether ``path`` is our own format (checked without unpickling anything: the format tag is a
    string constant inside the archive's pickle)."""
    import zipfile
    from checkpoints_convert.load import FORMAT_TAG
    try:
        with zipfile.ZipFile(path) as zf:
            names = [n for n in zf.namelist() if n.endswith("/data.pkl") or n == "data.pkl"]
            if not names:
                return False
            with zf.open(names[0]) as f:
                head = f.read(4096)
    except (zipfile.BadZipFile, OSError):
        return False
    return FORMAT_TAG.encode("ascii") in head


def _sag_checkpoint_guidance(loaded, flags: Dict[str, Any]):
    """SAG settings for a sag checkpoint: its stored recommendation overridden by official SAG flags."""
    from checkpoints_convert.flags import SAG_DEFAULTS, _parse_float, _parse_int
    given = {k: flags[k] for k in SAG_FLAG_NAMES if k in flags}
    if not given:
        return loaded.guidance
    cfg = loaded.guidance or _default_sag(loaded)
    changes: Dict[str, Any] = {}
    if "guide_scale" in given:
        changes["scale"] = round(_parse_float(given["guide_scale"], "guide_scale") - 1.0, 12)
    if "guide_start" in given:
        changes["guide_start"] = _parse_int(given["guide_start"], "guide_start")
    if "blur_sigma" in given:
        changes["blur_sigma"] = _parse_float(given["blur_sigma"], "blur_sigma")
    block = str(given.get("sel_attn_block", "output" if cfg.site.startswith("output") else cfg.site))
    if "sel_attn_block" in given or "sel_attn_depth" in given:
        if block == "middle":
            changes["site"] = "middle"
        elif block == "output":
            depth = _parse_int(given.get("sel_attn_depth", SAG_DEFAULTS["sel_attn_depth"]), "sel_attn_depth")
            changes["site"] = f"output.{depth}"
        else:
            raise UsageError(f"--sel_attn_block {block!r} is not supported by the official SAG code: use output or middle")
    cfg = dataclasses.replace(cfg, **changes)
    return None if cfg.scale == 0 else cfg


def _own_guidance_flags(args, loaded, fmt: str, flags: Dict[str, Any]):
    """Apply ``--sag-scale`` and ``--blur-guidance`` to the guidance the flags (or the preset) gave.

    ``--sag-scale s`` keeps every other setting (site, sigma, guide_start: from the SAG flags, the
    preset's recommendation, or the official SAG defaults) and only replaces the scale; 0 turns SAG
    off. ``--blur-guidance`` turns those settings into blur guidance (no mask).
    """
    g = loaded.guidance
    wants = args.sag_scale is not None and args.sag_scale != 0 or args.blur_guidance
    explicitly_off = any(k in flags for k in SAG_FLAG_NAMES)      # e.g. --guide_scale 1.0
    if g is None and wants and (args.sag_scale is not None or not explicitly_off):
        g = _default_sag(loaded, flags if fmt == "official" else None)
    if g is not None and args.sag_scale is not None:
        g = dataclasses.replace(g, scale=float(args.sag_scale)) if args.sag_scale != 0 else None
    if g is not None and args.blur_guidance:
        from sag.guidance import blur_guidance
        g = blur_guidance(g.scale, g.blur_sigma, guide_start=g.guide_start, kernel_size=g.kernel_size)
    sites = lambda text: tuple(x.strip() for x in text.split(",") if x.strip())  # noqa: E731
    if args.pag_scale is not None or args.seg_sigma is not None:
        if args.pag_scale is not None and args.seg_sigma is not None:
            raise UsageError("choose one of --pag-scale and --seg-sigma")
        if args.sag_scale or args.blur_guidance:
            raise UsageError("--pag-scale / --seg-sigma replace SAG; drop --sag-scale / --blur-guidance")
        from sag.perturbed import PAGConfig, SEGConfig, default_pag_sites
        if args.pag_scale is not None:
            if not math.isfinite(args.pag_scale):
                raise UsageError(f"--pag-scale must be finite, got {args.pag_scale}")
            chosen = sites(args.pag_sites) if args.pag_sites else tuple(default_pag_sites(loaded.model))
            g = PAGConfig(scale=args.pag_scale, sites=chosen) if args.pag_scale != 0 else None
        else:
            if not math.isfinite(args.seg_scale):
                raise UsageError(f"--seg-scale must be finite, got {args.seg_scale}")
            if not args.seg_sigma > 0:
                raise UsageError(f"--seg-sigma must be > 0 (inf = mean query), got {args.seg_sigma}")
            g = SEGConfig(scale=args.seg_scale, sigma=args.seg_sigma, sites=sites(args.seg_sites)) \
                if args.seg_scale != 0 else None
    return g


def _load_official_noting_warnings(path, flags: Dict[str, Any], preset, device):
    """``load_official`` with its warnings (PAG layers ignored, a shape group without one SAG
    recommendation) returned as lines; a window that guides no step is judged later, on the
    guidance kept after --sag-scale / --blur-guidance."""
    import warnings
    from checkpoints_convert.load import NeverGuidedWarning, load_official
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        loaded = load_official(path, flags, preset=preset, device=device)
    return loaded, [str(w.message) for w in caught if not issubclass(w.category, NeverGuidedWarning)]


def _print_warnings(lines: List[str]) -> None:
    """One ``sag-sample: warning:`` line per distinct warning, from rank 0 only."""
    if Dist.from_env().rank != 0:
        return
    from checkpoints_convert.errors import one_line
    for line in dict.fromkeys(lines):
        print(f"{PROG}: warning: {one_line(line, limit=1000)}", file=sys.stderr, flush=True)


def resolve_model(args, official: Dict[str, str], device: torch.device) -> Resolved:
    """The model to sample from: ``--model_path`` (official or sag checkpoint), or the embedded demo model.

    With no ``--model_path`` this is the embedded demo model (``sag.demo.load_demo``; 50 ancestral steps
    unless ``--timestep_respacing`` / ``--use_ddim`` say otherwise; the README runs 25 DDIM steps).
    """
    from checkpoints_convert.load import load_checkpoint, never_guided_warnings
    from checkpoints_convert.safe_load import sha256_file
    flags = _loader_flags(args, official)
    if not args.model_path:
        # The embedded demo model (sag/assets/demo.pt): what the README's main command samples.
        from .demo import DEMO_PATH
        if not DEMO_PATH.is_file():
            raise UsageError(NO_MODEL_MESSAGE)
        path, fmt = DEMO_PATH, "sag-demo"
    else:
        path = _check_file(args.model_path, "--model_path")
        fmt = "sag" if _is_sag_checkpoint(path) else "official"
    notes: List[str] = []
    if fmt != "official":
        extra = sorted(set(official) - SAG_CHECKPOINT_FLAGS)
        if extra:
            raise UsageError(f"--{extra[0]}: {path.name} is a sag checkpoint that carries its own model and diffusion "
                             "config; drop the model flags (only SAG flags and --timestep_respacing apply)")
        if args.preset:
            raise UsageError(f"--preset does not apply to the sag checkpoint {path.name} (it carries its own config)")
        if fmt == "sag-demo":
            from .demo import load_demo
            loaded = load_demo(device, official.get("timestep_respacing", "50"))
        else:
            loaded = load_checkpoint(path, device=device, timestep_respacing=official.get("timestep_respacing"))
        loaded.guidance = _sag_checkpoint_guidance(loaded, flags)
    else:
        loaded, notes = _load_official_noting_warnings(path, flags, args.preset, device)
    loaded.guidance = _own_guidance_flags(args, loaded, fmt, flags)
    _print_warnings(notes + never_guided_warnings(loaded.guidance, loaded.diffusion.num_timesteps))
    if getattr(loaded.model.config, "super_res", False):
        raise UsageError("this is a super-resolution (upsampler) model; sag-sample does not support --base_samples yet")
    source = {"path": str(path.resolve()), "sha256": sha256_file(path), "format": fmt,
              "preset": loaded.preset.name if getattr(loaded, "preset", None) is not None else None}
    return Resolved(loaded, source, flags)


def resolve_classifier(args, flags: Dict[str, Any], device: torch.device, image_size: int):
    """(classifier or None, its sha256 or None, scale, guidance on?). CG runs iff a classifier is
    given, ``--classifier_guidance`` is not False and the scale is non-zero (official default 1.0)."""
    preset = _preset(args)
    default = 1.0
    if preset is not None:
        default = (preset.sag or {}).get("classifier_scale", (preset.sampling or {}).get("classifier_scale", 1.0))
    scale = float(default) if args.classifier_scale is None else float(args.classifier_scale)
    if not args.classifier_path:
        if args.classifier_guidance:
            raise UsageError("--classifier_guidance True needs --classifier_path")
        if args.classifier_scale not in (None, 0.0):
            raise UsageError("--classifier_scale needs --classifier_path (the classifier to guide with)")
        return None, None, 0.0, False
    path = _check_file(args.classifier_path, "--classifier_path")
    on = (True if args.classifier_guidance is None else args.classifier_guidance) and scale != 0
    if not on:
        return None, None, scale, False
    from checkpoints_convert.load import load_official_classifier
    from checkpoints_convert.safe_load import sha256_file
    loader_flags = {k: v for k, v in flags.items() if k not in SAG_FLAG_NAMES}
    if any(k.startswith("classifier_") for k in loader_flags) and "image_size" not in loader_flags:
        loader_flags["image_size"] = image_size    # official: the classifier shares the model's --image_size
    classifier = load_official_classifier(path, loader_flags, device=device)
    return classifier, sha256_file(path), scale, True


# ------------------------------------------------------------------------------------------------
# Settings, sidecar, resume
# ------------------------------------------------------------------------------------------------

def guidance_record(guidance, num_steps: int) -> Optional[Dict[str, Any]]:
    """The guidance settings in both conventions (paper s and official g = 1 + s)."""
    if guidance is None:
        return None
    from checkpoints_convert.flags import site_to_official_module
    from sag.guidance import SAGConfig
    if not isinstance(guidance, SAGConfig):          # PAG / SEG
        rec = {"method": type(guidance).__name__.replace("Config", "").lower(), **dataclasses.asdict(guidance),
               "official_guide_scale": 1.0 + guidance.scale,
               "official_modules": [site_to_official_module(site) for site in guidance.attention_sites()],
               "guided_steps": sum(1 for t in range(num_steps) if guidance.active_at(t))}
        return rec
    rec = {
        "method": "blur" if guidance.blur_everywhere else "sag",
        "scale": guidance.scale,
        "official_guide_scale": guidance.guide_scale,
        "blur_sigma": guidance.blur_sigma,
        "kernel_size": guidance.kernel_size,
        "guide_start": guidance.guide_start,
        "guided_steps": sum(1 for t in range(num_steps) if guidance.active_at(t)),
    }
    if not guidance.blur_everywhere:
        rec.update(site=guidance.site, official_module=site_to_official_module(guidance.site),
                   map_mode=guidance.map_mode, threshold=guidance.threshold,
                   official_num_heads=guidance.official_num_heads if guidance.map_mode == "official" else None)
    return rec


# ------------------------------------------------------------------------------------------------
# Intermediates
# ------------------------------------------------------------------------------------------------

class IntermediateRecorder(StepStrips):
    """Callback collecting, per SAG step, x0 estimate / mask / blurred x0 / x_bar_t of chosen samples."""

    ROWS = ("pred_x0", "salient_mask", "blurred_x0", "degraded_x_t")

    def pictures(self, info):
        s = info.sag
        if s is None:
            return None
        return (s.first.pred_x0, s.salient_mask * 2 - 1, s.blurred_x0, s.degraded_x_t)


# ------------------------------------------------------------------------------------------------
# Main
# ------------------------------------------------------------------------------------------------

def _report(err: BaseException) -> None:
    report_error(PROG, err)


def main(argv: Optional[Sequence[str]] = None) -> int:
    """Entry point of ``sag-sample`` / ``python -m sag.sample``; returns the exit status (0 or 2)."""
    argv = list(sys.argv[1:] if argv is None else argv)
    ctx = Dist.from_env()
    known = _known_errors()
    try:
        args, official = parse_args(argv)
        return _run(args, official, argv, ctx)
    except _Quiet:
        return 2
    except known as err:
        if ctx.rank == 0 or getattr(err, "_sag_rank_local", False):
            _report(err)
        return 2
    finally:
        ctx.close()


def _run(args, official: Dict[str, str], argv: Sequence[str], ctx: Dist) -> int:
    from sag.seeding import SampleNoise

    from .io import (make_grid, merge_shards, npz_name, read_shard_indices, to_uint8_nhwc, write_json, write_npz,
                     write_png, write_shard)
    from .precision import autocast as precision_autocast
    from .sampling import sample

    started = time.time()
    device = resolve_device(args.device, ctx)
    ctx.init(device)

    # 1. Model, guidance, classifier, labels: every check before anything is written.
    resolved = resolve_model(args, official, device)
    loaded = resolved.loaded
    model, diffusion, guidance = loaded.model, loaded.diffusion, loaded.guidance
    model.use_fused_attention(not args.exact_attention)
    # Every rank checks --dtype; rank 0's choice (auto: its probe) is the one all ranks run.
    dtype_choice = ctx.broadcast(resolve_dtype(args, official, device, model, min(args.batch_size, args.num_samples),
                                               Path(args.out)))
    dtype = dtype_choice.dtype
    config = model.config
    if guidance is not None:
        model.check_attention_sites(guidance.attention_sites())   # before anything is written
    from sag.guidance import SAGConfig
    if args.save_intermediates and not isinstance(guidance, SAGConfig):
        raise UsageError("--save-intermediates needs SAG or blur guidance (give SAG flags, --sag-scale or --preset)")
    classifier, classifier_sha, classifier_scale, cg_on = resolve_classifier(args, resolved.flags_to_loader, device,
                                                                         config.image_size)
    if cg_on and classifier.model.config.image_size != config.image_size:
        raise UsageError(f"the classifier is for {classifier.model.config.image_size}x{classifier.model.config.image_size} "
                         f"images but the model makes {config.image_size}x{config.image_size}; pass the matching --classifier_path")
    num_classes = config.num_classes or (classifier.model.config.out_channels if cg_on else None)
    if args.class_label is not None:
        if num_classes is None:
            raise UsageError(f"--class-label {args.class_label}: the model is unconditional and no classifier guides it")
        if not 0 <= args.class_label < num_classes:
            raise UsageError(f"--class-label {args.class_label} is out of range: the model has classes 0..{num_classes - 1}")
    channels, size = config.in_channels, config.image_size
    n = args.num_samples
    out = Path(args.out)
    final_npz = out / npz_name(n, size, size, channels)
    shards_dir = out / SHARDS

    settings = _jsonable({
        "checkpoint_sha256": resolved.source["sha256"],
        "model_config": dataclasses.asdict(config),
        "diffusion_config": dataclasses.asdict(diffusion.config),
        "guidance": guidance_record(guidance, diffusion.num_timesteps),
        "classifier": {"sha256": classifier_sha, "scale": classifier_scale} if cg_on else None,
        "sampler": "ddim" if args.use_ddim else "ddpm",
        "eta": args.eta if args.use_ddim else None,
        "clip_denoised": args.clip_denoised,
        "steps": diffusion.num_timesteps,
        "seed": args.seed,
        "num_samples": n,
        "labels": (None if num_classes is None else
                   {"mode": "fixed", "class_label": args.class_label} if args.class_label is not None else
                   {"mode": "per-seed", "num_classes": num_classes}),
        "dtype": str(dtype).replace("torch.", ""),
        "attention": "exact" if args.exact_attention else "fused",
        "image_shape": [channels, size, size],
    })

    # 2. The output folder: finished? resumable? foreign? (rank 0 decides, everyone follows).
    decision = None
    if ctx.rank == 0:
        try:
            decision = _check_output(out, final_npz, shards_dir, settings)
        except UsageError as err:
            decision = ("error", str(err))
    decision = ctx.broadcast(decision)
    if decision[0] == "error":
        if ctx.rank == 0:
            raise UsageError(decision[1])
        raise _Quiet()
    if decision[0] == "done":
        if ctx.rank == 0:
            print(f"{PROG}: {final_npz} already holds these {n} samples (same settings); nothing to do", flush=True)
        return 0

    # 3. This rank's samples: i % world_size == rank, minus those already in shards, in batches.
    done = read_shard_indices(shards_dir)
    resumed = len([i for i in done if i < n])
    mine = [i for i in range(ctx.rank, n, ctx.world_size) if i not in done]
    batches = [mine[k:k + args.batch_size] for k in range(0, len(mine), args.batch_size)]
    show = args.progress and ctx.rank == 0
    autocast = precision_autocast(device, dtype)
    status = None
    try:
        from tqdm.auto import tqdm
        bar = tqdm(total=len(mine), desc="samples", unit="img", disable=not show)
        for indices in batches:
            seeds = [args.seed + i for i in indices]
            y = None
            if num_classes is not None:
                y = (torch.full((len(indices),), args.class_label, dtype=torch.long) if args.class_label is not None
                     else SampleNoise(seeds).randint(num_classes)).to(device)
            keep = {pos: i for pos, i in enumerate(indices) if i < args.save_intermediates}
            recorder = IntermediateRecorder(keep) if keep else None
            callback = _callbacks(recorder, bar if show else None, diffusion.num_timesteps)
            with autocast:
                x = sample(model, diffusion, (len(indices), channels, size, size), guidance=guidance,
                           classifier=classifier if cg_on else None, classifier_scale=classifier_scale if cg_on else 0.0,
                           y=y, use_ddim=args.use_ddim, eta=args.eta, progress=False,
                           seed=seeds, clip_denoised=args.clip_denoised, callback=callback, device=device)
            if recorder is not None:
                recorder.write(out / INTERMEDIATES)
            write_shard(shards_dir, indices, to_uint8_nhwc(x), None if y is None else y.cpu().numpy())
            bar.update(len(indices))
        bar.close()
    except _known_errors() as err:
        err._sag_rank_local = True               # this rank's own failure: it reports it
        status = err
    # Every rank learns whether any failed; the lowest failing rank alone reports (one line in all).
    failed = [r for r, s in enumerate(ctx.gather(None if status is None else str(status))) if s is not None]
    ctx.in_step = True                           # no collective follows: every rank goes straight to close()
    if failed:
        if ctx.rank == failed[0]:
            raise status
        raise _Quiet()

    # 4. Rank 0 merges the shards in index order, then grid and sidecar; shards go last.
    if ctx.rank != 0:
        return 0
    try:
        images, labels = merge_shards(shards_dir, n)
    except ValueError as err:
        raise UsageError(f"cannot merge the shards: {err}") from None
    write_npz(final_npz, images, labels)
    write_png(out / "grid.png", make_grid(images))
    compare = args.compare if args.compare is not None else resolved.source["format"] == "sag-demo"
    if compare and guidance is not None:
        # The same seeds (and labels) without guidance, top row; the guided samples below.
        k = min(8, n)
        seeds = [args.seed + i for i in range(k)]
        y = None if labels is None else torch.as_tensor(labels[:k]).to(device)
        with autocast:
            plain = sample(model, diffusion, (k, channels, size, size), guidance=None,
                           classifier=classifier if cg_on else None, classifier_scale=classifier_scale if cg_on else 0.0,
                           y=y, use_ddim=args.use_ddim, eta=args.eta, seed=seeds, clip_denoised=args.clip_denoised,
                           device=device)
        write_png(out / "side_by_side.png", make_grid(np.concatenate([to_uint8_nhwc(plain), images[:k]]), ncol=k))
    finished = time.time()
    write_json(out / SIDECAR, _sidecar(args, official, argv, ctx, resolved, settings, device, dtype_choice,
                                       final_npz, labels is not None, cg_on, classifier_scale, started, finished,
                                       resumed))
    shutil.rmtree(shards_dir, ignore_errors=True)
    print(f"{PROG}: wrote {final_npz} ({n} samples, {finished - started:.1f} s)", flush=True)
    return 0


def _check_output(out: Path, final_npz: Path, shards_dir: Path, settings: Dict[str, Any]):
    """("done",) if ``out`` holds this finished run, ("go",) to sample (fresh or resuming); raises
    UsageError when ``out`` holds a run with other settings."""
    from .io import list_shards, read_json, write_json
    if out.exists() and not out.is_dir():
        raise UsageError(f"--out {out} exists and is not a folder")
    sidecar = read_json(out / SIDECAR)
    if sidecar is not None and sidecar.get("format") == SIDECAR_FORMAT:
        if sidecar.get("settings") == settings:
            if final_npz.is_file():
                return ("done",)
        else:
            diff = _diff_keys(sidecar.get("settings") or {}, settings)
            raise UsageError(f"--out {out} already holds a finished run with other settings (differs in: "
                             f"{', '.join(diff[:4])}); pass another --out or remove it")
    run = read_json(shards_dir / RUN_FILE)
    if run is not None and run.get("settings") != settings:
        diff = _diff_keys(run.get("settings") or {}, settings)
        raise UsageError(f"--out {out} holds an unfinished run with other settings (differs in: "
                         f"{', '.join(diff[:4])}); rerun that command to finish it, or pass another --out")
    if run is None and list_shards(shards_dir):
        raise UsageError(f"{shards_dir} holds shards of an unknown run (no {RUN_FILE}); remove them or pass another --out")
    try:
        shards_dir.mkdir(parents=True, exist_ok=True)
        if run is None:
            write_json(shards_dir / RUN_FILE, {"format": SIDECAR_FORMAT, "settings": settings})
    except OSError as err:
        raise UsageError(f"cannot write to --out {out}: {err.strerror or err}") from None
    return ("go",)


def _official_record(args, official, resolved, cg_on, classifier_scale) -> Dict[str, Any]:
    """The official flags: as given, as added by --preset / --sag-scale / --blur-guidance, and the
    full resolved set (official defaults filled in; the sampling flags are the values really used)."""
    added = {k: v for k, v in resolved.flags_to_loader.items() if official.get(k) != v}
    full = dict(resolved.loaded.flags or {})
    if full:
        full.pop("base_samples", None)
        full.update(model_path=args.model_path, num_samples=args.num_samples, batch_size=args.batch_size,
                    use_ddim=args.use_ddim, clip_denoised=args.clip_denoised, classifier_path=args.classifier_path,
                    classifier_scale=classifier_scale, classifier_guidance=cg_on)
        g = resolved.loaded.guidance               # the SAG flags really used (after --sag-scale / --preset)
        if g is None:
            full["guide_scale"] = 1.0
        elif not g.blur_everywhere:
            block, _, depth = g.site.partition(".")
            full.update(guide_scale=g.guide_scale, blur_sigma=g.blur_sigma, sel_attn_block=block,
                        guide_start=g.guide_start if g.guide_start is not None else resolved.loaded.diffusion.num_timesteps)
            if depth:
                full["sel_attn_depth"] = int(depth)
    return {"given": official, "added": added, "preset": args.preset, "resolved": full or None}


def _sidecar(args, official, argv, ctx, resolved, settings, device, dtype_choice, final_npz, has_labels,
             cg_on, classifier_scale, started, finished, resumed) -> Dict[str, Any]:
    """Every setting of the run (samples.json)."""
    loaded = resolved.loaded
    n = args.num_samples
    return _jsonable({
        "format": SIDECAR_FORMAT,
        "settings": settings,
        "outputs": {"npz": final_npz.name, "arr_0": [n, *settings["image_shape"][1:], settings["image_shape"][0]],
                    "arr_1": [n] if has_labels else None, "grid": "grid.png",
                    "intermediates": INTERMEDIATES if args.save_intermediates else None},
        "checkpoint": resolved.source,
        "official_flags": _official_record(args, official, resolved, cg_on, classifier_scale),
        "guidance": settings["guidance"],
        "classifier": {"path": str(Path(args.classifier_path).resolve()) if args.classifier_path else None,
                       "used": cg_on, "scale": classifier_scale if cg_on else 0.0,
                       "sha256": (settings["classifier"] or {}).get("sha256")},
        "sampler": {"name": settings["sampler"], "use_ddim": args.use_ddim, "eta": settings["eta"],
                    "steps": settings["steps"], "timestep_respacing": loaded.diffusion.config.timestep_respacing,
                    "diffusion_steps": loaded.diffusion.config.steps, "clip_denoised": args.clip_denoised},
        "seeds": {"base": args.seed, "first_index": 0, "last_index": n - 1, "first_seed": args.seed,
                  "last_seed": args.seed + n - 1, "rule": "sample i: x_T, step noise and label from seed base + i"},
        "labels": settings["labels"],
        "batch_size": args.batch_size,
        "world_size": ctx.world_size,
        "resumed_samples": resumed,
        "device": str(device),
        "dtype": settings["dtype"],                     # the dtype that ran
        "dtype_note": dtype_choice.reason,              # and why (auto: flags, work, probe)
        "dtype_choice": dtype_choice.record(),
        "versions": _versions(),
        "command": shlex.join([PROG, *argv]),
        "argv": list(argv),
        "started": utc_iso(started),
        "finished": utc_iso(finished),
        "seconds": round(finished - started, 3),
    })


class _CallableModule(type(sys)):
    """Importing this module (``import sag.sample``, the ``sag-sample`` console script) makes Python
    set the attribute ``sag.sample`` -- the sampling function exported by ``sag/__init__.py`` -- to
    this module. Calling the module therefore calls :func:`sag.sampling.sample`, so ``sag.sample(...)``
    keeps working either way."""

    def __call__(self, *args, **kwargs):
        from .sampling import sample
        return sample(*args, **kwargs)


if __name__ == "__main__":
    sys.exit(main())
else:
    sys.modules[__name__].__class__ = _CallableModule
