"""Convert an official checkpoint to our self-describing format.

    python -m checkpoints_convert IN.pt OUT.pt [--preset NAME] [--official_flag value ...]

The file is always inspected: a recognised released file takes its README flags and its
repository's defaults for every flag not given; official flags (``--num_channels 256 --learn_sigma
True``, or ``--name=value``) override them and are checked against the file (the rule:
``checkpoints_convert.resolve``). The output holds the model and diffusion configs, the recommended
SAG settings and the state dict under our names, and loads with ``torch.load(weights_only=True)``.
Warnings are one ``checkpoints_convert: warning:`` line each.
"""
from __future__ import annotations

import argparse
import sys
import warnings

from unet import ConfigError

from .errors import CheckpointError, one_line
from .load import load_official, save_checkpoint


def _official_flags(extra):
    """'--name value' and '--name=value' pairs, as the official argparse reads them (last one wins)."""
    flags, i = {}, 0
    while i < len(extra):
        name, eq, inline = extra[i].partition("=")
        if not name.startswith("--") or (not eq and i + 1 >= len(extra)):
            raise CheckpointError(f"official flags come as '--name value' pairs; cannot read {extra[i]!r}")
        flags[name[2:]] = inline if eq else extra[i + 1]
        i += 1 if eq else 2
    return flags


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="python -m checkpoints_convert", description=__doc__.split("\n\n")[0])
    parser.add_argument("input", help="official checkpoint (.pt state dict)")
    parser.add_argument("output", help="where to write the sag checkpoint")
    parser.add_argument("--preset", help="preset name (e.g. 256x256_diffusion_uncond); default: detected")
    args, extra = parser.parse_known_args(argv)
    try:
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            loaded = load_official(args.input, _official_flags(extra), preset=args.preset)
        for line in dict.fromkeys(str(w.message) for w in caught):
            print(f"checkpoints_convert: warning: {one_line(line, limit=1000)}", file=sys.stderr)
        save_checkpoint(args.output, loaded)
    except (CheckpointError, ConfigError, ValueError) as err:
        print(f"checkpoints_convert: error: {one_line(err, limit=1000)}", file=sys.stderr)
        return 2
    name = loaded.preset.name if loaded.preset is not None else "custom flags"
    print(f"wrote {args.output} ({name}, {sum(p.numel() for p in loaded.model.parameters()):,} parameters)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
