"""``python -m sag.sd "a prompt" --model FOLDER ...``: see :mod:`sag.sd.cli`."""
import sys

from sag.sd.cli import main

if __name__ == "__main__":
    sys.exit(main())
