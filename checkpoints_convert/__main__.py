"""Convert an official checkpoint to our self-describing format.

    python -m checkpoints_convert IN.pt OUT.pt [--preset NAME] [--official_flag value ...]

With no flags the file is recognised from its structure (presets); official flags (e.g.
``--num_channels 256 --learn_sigma True``) override or replace the preset's. The output holds the
model and diffusion configs, the recommended SAG settings and the state dict under our names, and
loads with ``torch.load(weights_only=True)``.
"""
from __future__ import annotations

import argparse
import sys

from unet import ConfigError

from .errors import CheckpointError
from .load import load_official, save_checkpoint


def _official_flags(extra):
    flags, i = {}, 0
    while i < len(extra):
        name = extra[i]
        if not name.startswith("--") or i + 1 >= len(extra):
            raise CheckpointError(f"official flags come as '--name value' pairs; cannot read {name!r}")
        flags[name[2:]] = extra[i + 1]
        i += 2
    return flags


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="python -m checkpoints_convert", description=__doc__.split("\n\n")[0])
    parser.add_argument("input", help="official checkpoint (.pt state dict)")
    parser.add_argument("output", help="where to write the sag checkpoint")
    parser.add_argument("--preset", help="preset name (e.g. 256x256_diffusion_uncond); default: detected")
    args, extra = parser.parse_known_args(argv)
    try:
        loaded = load_official(args.input, _official_flags(extra), preset=args.preset)
        save_checkpoint(args.output, loaded)
    except (CheckpointError, ConfigError, ValueError) as err:
        print(f"checkpoints_convert: error: {err}", file=sys.stderr)
        return 2
    name = loaded.preset.name if loaded.preset is not None else "custom flags"
    print(f"wrote {args.output} ({name}, {sum(p.numel() for p in loaded.model.parameters()):,} parameters)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
