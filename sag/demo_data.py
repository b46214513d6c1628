"""A procedural image dataset for the embedded demo model: 32 x 32 RGB scenes of 1-3 coloured shapes.

Each image is a background (flat colour or a gentle linear gradient) with one to three shapes
(circle, square, triangle, or a disc of stripes) drawn largest first, so smaller shapes sit on top.
Values lie in [-1, 1]; edges are anti-aliased from signed distances (coverage = clip(0.5 - d, 0, 1)).

Deterministic per index: image ``i`` depends only on ``numpy.random.default_rng([seed, i])``, one
fixed-length draw of uniforms per image, so ``images(idx)`` gives the same pixels whatever else is
in the batch. Rendering is vectorised over the batch: 50,000 images take a few seconds.

The label of an image is the shape type of its largest shape (``SHAPES[label]``), for the small
feature network of ``sag.demo_eval``.
"""
from __future__ import annotations

from typing import Sequence, Tuple, Union

import numpy as np
import torch

SHAPES = ("circle", "square", "triangle", "stripes")
NUM_CLASSES = len(SHAPES)
IMAGE_SIZE = 32
MAX_SHAPES = 3
_PER_SHAPE = 8          # uniforms per shape slot: type, cx, cy, radius, hue, saturation, value, stripe phase
_PER_IMAGE = 8          # background: kind, hue, sat, val, hue2-offset, val2, angle, number of shapes
_DRAWS = _PER_IMAGE + MAX_SHAPES * _PER_SHAPE


def _uniforms(indices: np.ndarray, seed: int) -> np.ndarray:
    """[N x _DRAWS] uniforms in [0, 1), row i from the generator seeded by (seed, indices[i])."""
    out = np.empty((len(indices), _DRAWS), dtype=np.float64)
    for row, index in enumerate(indices):
        out[row] = np.random.default_rng([int(seed), int(index)]).random(_DRAWS)
    return out


def _hsv_to_rgb(h, s, v):
    """Vectorised HSV -> RGB, all arrays in [0, 1]; returns [..., 3]."""
    i = np.floor(h * 6.0).astype(np.int64) % 6
    f = h * 6.0 - np.floor(h * 6.0)
    p, q, t = v * (1 - s), v * (1 - s * f), v * (1 - s * (1 - f))
    table = np.stack([np.stack(c, -1) for c in
                      [(v, t, p), (q, v, p), (p, v, t), (p, q, v), (t, p, v), (v, p, q)]], 0)
    return np.take_along_axis(table, i[None, ..., None].repeat(3, -1), 0)[0]


def _render(u: np.ndarray) -> Tuple[np.ndarray, np.ndarray]:
    """Images [N x 3 x 32 x 32] in [-1, 1] (float32) and labels [N] from the uniforms."""
    n, size = u.shape[0], IMAGE_SIZE
    coords = (np.arange(size, dtype=np.float32) + 0.5)
    yy, xx = np.meshgrid(coords, coords, indexing="ij")                  # [H x W]
    # Background: muted colours; kind < 0.4 flat, otherwise a linear gradient between two colours.
    bg = u[:, :_PER_IMAGE]
    c1 = _hsv_to_rgb(bg[:, 1], 0.15 + 0.35 * bg[:, 2], 0.25 + 0.5 * bg[:, 3])
    c2 = _hsv_to_rgb((bg[:, 1] + 0.3 * (bg[:, 4] - 0.5)) % 1.0, 0.15 + 0.35 * bg[:, 2], 0.25 + 0.5 * bg[:, 5])
    angle = 2 * np.pi * bg[:, 6]
    ramp = (np.cos(angle)[:, None, None] * (xx - size / 2) + np.sin(angle)[:, None, None] * (yy - size / 2)) / size + 0.5
    ramp = np.where((bg[:, 0] < 0.4)[:, None, None], 0.0, np.clip(ramp, 0, 1)).astype(np.float32)
    img = (c1[:, :, None, None] * (1 - ramp[:, None]) + c2[:, :, None, None] * ramp[:, None]).astype(np.float32)
    count = 1 + np.minimum((bg[:, 7] * MAX_SHAPES).astype(np.int64), MAX_SHAPES - 1)
    # Shapes: radius in [4, 11] px, centre kept mostly inside the frame; sorted largest first.
    s = u[:, _PER_IMAGE:].reshape(n, MAX_SHAPES, _PER_SHAPE)
    kind = np.minimum((s[..., 0] * NUM_CLASSES).astype(np.int64), NUM_CLASSES - 1)
    radius = 4.0 + 7.0 * s[..., 3]
    radius = np.where(np.arange(MAX_SHAPES)[None] < count[:, None], radius, -1.0)   # unused slots
    order = np.argsort(-radius, axis=1, kind="stable")
    take = lambda a: np.take_along_axis(a, order, 1)  # noqa: E731
    kind, radius = take(kind), take(radius)
    cx = take(s[..., 1]) * (size - 2 * 4) + 4
    cy = take(s[..., 2]) * (size - 2 * 4) + 4
    colour = _hsv_to_rgb(take(s[..., 4]), 0.55 + 0.45 * take(s[..., 5]), 0.55 + 0.45 * take(s[..., 6]))
    phase = take(s[..., 7])
    for slot in range(MAX_SHAPES):
        # Work only on the images whose slot is in use, one shape kind at a time (row subsets).
        for k in range(NUM_CLASSES):
            rows = np.nonzero((kind[:, slot] == k) & (radius[:, slot] > 0))[0]
            if not len(rows):
                continue
            r = radius[rows, slot, None, None].astype(np.float32)
            dx = xx[None] - cx[rows, slot, None, None].astype(np.float32)
            dy = yy[None] - cy[rows, slot, None, None].astype(np.float32)
            if k == 1:                                            # square
                dist = np.maximum(np.abs(dx), np.abs(dy)) - 0.85 * r
            elif k == 2:                                          # upward triangle: apex (0, -r), base y = 0.8 r
                dist = np.maximum(dy - 0.8 * r, (np.abs(dx) - (dy + r) * 0.55) / 1.118)
            else:                                                 # circle, and the disc of stripes
                dist = np.sqrt(dx * dx + dy * dy) - r
            alpha = np.clip(0.5 - dist, 0.0, 1.0)[:, None]
            shade = colour[rows, slot, :, None, None].astype(np.float32)
            if k == 3:                                            # diagonal bands of the colour and a darker shade
                bands = np.sin((dx + dy) * np.float32(2 * np.pi / 6.0)
                               + np.float32(2 * np.pi) * phase[rows, slot, None, None].astype(np.float32))
                shade = shade * (0.35 + 0.65 * np.clip(bands + 0.5, 0, 1))[:, None]
            img[rows] += alpha * (shade - img[rows])
    labels = kind[:, 0]
    return (img * 2.0 - 1.0).astype(np.float32), labels.astype(np.int64)


def generate(indices: Union[int, Sequence[int], np.ndarray], seed: int = 0,
             chunk: int = 4096) -> Tuple[np.ndarray, np.ndarray]:
    """Images [N x 3 x 32 x 32] float32 in [-1, 1] and labels [N] int64 for the given indices
    (an int ``n`` means ``range(n)``). Image i is the same whatever batch it is generated in."""
    idx = np.arange(indices) if isinstance(indices, (int, np.integer)) else np.asarray(indices, dtype=np.int64)
    images = np.empty((len(idx), 3, IMAGE_SIZE, IMAGE_SIZE), dtype=np.float32)
    labels = np.empty(len(idx), dtype=np.int64)
    for start in range(0, len(idx), chunk):
        part = idx[start:start + chunk]
        images[start:start + len(part)], labels[start:start + len(part)] = _render(_uniforms(part, seed))
    return images, labels


def batch(indices, seed: int = 0) -> Tuple[torch.Tensor, torch.Tensor]:
    """``generate`` as torch tensors."""
    images, labels = generate(indices, seed)
    return torch.from_numpy(images), torch.from_numpy(labels)


def to_uint8(images) -> np.ndarray:
    """[N x 3 x H x W] in [-1, 1] (tensor or array) -> [N x H x W x 3] uint8."""
    if isinstance(images, torch.Tensor):
        images = images.detach().cpu().float().numpy()
    return np.clip(np.round((np.asarray(images) + 1.0) * 127.5), 0, 255).astype(np.uint8).transpose(0, 2, 3, 1)


def grid(images, columns: int = 8, pad: int = 2, scale: int = 1):
    """A PIL image tiling [N x 3 x H x W] images in [-1, 1], ``columns`` per row, ``scale``x nearest upscaling."""
    from PIL import Image
    pixels = to_uint8(images)
    n, h, w, _ = pixels.shape
    rows = (n + columns - 1) // columns
    canvas = np.full((rows * (h + pad) + pad, columns * (w + pad) + pad, 3), 255, dtype=np.uint8)
    for i in range(n):
        r, c = divmod(i, columns)
        canvas[pad + r * (h + pad):pad + r * (h + pad) + h, pad + c * (w + pad):pad + c * (w + pad) + w] = pixels[i]
    out = Image.fromarray(canvas)
    return out.resize((out.width * scale, out.height * scale), Image.NEAREST) if scale != 1 else out
