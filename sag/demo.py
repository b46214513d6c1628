"""The embedded demo model: a small ADM U-Net trained on ``sag.demo_data``'s procedural shapes.

``load_demo()`` needs no download and no GPU: the weights (``sag/assets/demo.pt``, float32, a few MB)
ship inside the package and load with ``torch.load(weights_only=True)``. How they were made is in
``sag/assets/demo.json`` (command, seed, steps, wall time, loss); ``python -m sag.demo_train``
re-trains them.

Recommended SAG settings for these 32 x 32 images (``DEMO_SAG``):

* ``site="output.1"``: a decoder block at 8 x 8, the resolution the official ADM setting
  (``--sel_attn_block output --sel_attn_depth 2``) reads its map at; 64 tokens make a mask with
  shape-sized blobs. ``sag.demo_train.DEMO_CONFIG`` puts attention at 16 and 8 px:
  sites input.3 (16), input.5 (8), middle (8), output.0 (8), output.1 (8), output.2 (16), output.3 (16).
* ``blur_sigma=2.0`` and ``kernel_size=13``: the official sigma 9 with 31 taps is meant for 256 px
  images; at 32 px it would smear a whole shape into the background. sigma = 2 px removes the
  edges and stripes of shapes of radius 4-11 px while keeping their colour blobs, which is the
  "remove fine detail of the salient part" degradation SAG wants. 13 taps cover +-3 sigma (the
  kernel is renormalised) and keep the reflect padding (6 px) well inside the 32 px image.
* ``scale=0.6``: large enough that the effect of SAG is visible in the teaching notebook. It is not
  a quality setting: on this small model ``sag.demo_eval``'s table (1,000 samples, 25 DDIM steps)
  shows no measurable benefit (35.31 unguided; SAG 35.50 / 35.89 / 36.05 / 35.89 at
  s = 0.1 / 0.3 / 0.6 / 1.0; blur guidance s = 0.3: 36.39; another seed set moves the unguided
  value by 0.2).
"""
from __future__ import annotations

from pathlib import Path
from typing import Optional

from .guidance import SAGConfig, blur_guidance

ASSETS = Path(__file__).resolve().parent / "assets"
DEMO_PATH = ASSETS / "demo.pt"
DEMO_RECORD = ASSETS / "demo.json"
FEATURES_PATH = ASSETS / "demo_features.pt"

DEMO_SAG = SAGConfig(scale=0.6, blur_sigma=2.0, site="output.1", kernel_size=13)
DEMO_BLUR = blur_guidance(0.3, 2.0, kernel_size=13)


def load_demo(device="cpu", timestep_respacing: Optional[str] = "50"):
    """The demo model as a ``LoadedModel`` (model in eval mode, a respaced diffusion, ``DEMO_SAG``).

    ``timestep_respacing``: "50" (default) = 50 evenly spaced steps of the 1000-step cosine process;
    "" or None = all 1000 steps; any string ``diffusion.space_timesteps`` reads ("ddim25", "10,15").
    """
    from checkpoints_convert.errors import CheckpointError
    from checkpoints_convert.load import load_checkpoint
    if not DEMO_PATH.is_file():
        raise CheckpointError(f"the embedded demo model {DEMO_PATH} is missing; reinstall sag or run "
                              "python -m sag.demo_train --out sag/assets/demo.pt --minutes 90 --threads 2")
    loaded = load_checkpoint(DEMO_PATH, device=device,
                             timestep_respacing="" if timestep_respacing is None else str(timestep_respacing))
    loaded.guidance = DEMO_SAG
    return loaded
