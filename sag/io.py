"""Output files of the sampling commands (``sag-sample``, ``python -m sag.sd``): the ADM-evaluator npz,
per-batch shards, the PNG grid, intermediate strips and the JSON sidecar, all written atomically.

Formats (ECOSYSTEM.md sections 1.1 and 6; DESIGN.md "Names and formats"):

* ``samples_{N}x{H}x{W}x3.npz`` -- ``arr_0`` uint8 NHWC in [0, 255] (what the ADM evaluator reads),
  ``arr_1`` int64 class labels [N] when labels were used (class-conditional model or classifier
  guidance), exactly what guided-diffusion's ``image_sample.py`` / ``classifier_sample.py`` write.
* ``shards/shard_{first:06d}_{last:06d}_{digest}.npz`` -- one batch: ``indices`` int64 [B] (global
  sample indices), ``images`` uint8 [B x H x W x 3], optionally ``labels`` int64 [B]. A shard is
  keyed by the indices it holds, never by rank or batch position, so any process count or batch size
  can resume from any set of shards.
* ``grid.png`` -- up to 64 samples in a near-square grid (torchvision ``make_grid`` look: 2 px padding).
* ``samples.json`` -- every setting (written last, so its presence means the run finished).

Atomic writes: the bytes go to ``name.tmp`` in the same directory, then ``os.replace`` (atomic on
POSIX and Windows), so a killed process never leaves a truncated file under the final name.
"""
from __future__ import annotations

import hashlib
import json
import math
import os
from pathlib import Path
from typing import Dict, List, Optional, Sequence, Tuple

import numpy as np
import torch
from PIL import Image

__all__ = [
    "atomic_write", "to_uint8_nhwc", "to_uint8_image", "npz_name", "write_npz", "shard_name", "write_shard",
    "read_shard_indices", "list_shards", "merge_shards", "make_grid", "write_png", "write_json", "read_json", "image_strip",
]

SHARD_GLOB = "shard_*.npz"


class atomic_write:
    """Context manager: open ``path + '.tmp'`` for binary writing; on success ``os.replace`` it onto
    ``path``; on error remove the temporary file and leave ``path`` untouched."""

    def __init__(self, path):
        self.path = Path(path)
        self.tmp = self.path.with_name(self.path.name + ".tmp")
        self.file = None

    def __enter__(self):
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self.file = open(self.tmp, "wb")
        return self.file

    def __exit__(self, exc_type, exc, tb):
        self.file.close()
        if exc_type is None:
            os.replace(self.tmp, self.path)
        else:
            try:
                self.tmp.unlink()
            except FileNotFoundError:
                pass
        return False


def to_uint8_nhwc(x: torch.Tensor) -> np.ndarray:
    """[B x C x H x W] float in [-1, 1] -> uint8 [B x H x W x C] numpy, with the official rounding
    ``((x + 1) * 127.5).clamp(0, 255).to(torch.uint8)`` (truncation toward zero, as guided-diffusion)."""
    images = ((x.float() + 1) * 127.5).clamp(0, 255).to(torch.uint8)
    return images.permute(0, 2, 3, 1).contiguous().cpu().numpy()


def to_uint8_image(x: torch.Tensor) -> np.ndarray:
    """One picture [C x H x W] in [-1, 1] (clamped) -> uint8 [H x W x 3]; one channel is repeated."""
    x = x.detach().float().cpu()
    if x.shape[0] == 1:
        x = x.repeat(3, 1, 1)
    return to_uint8_nhwc(x.clamp(-1, 1)[None])[0]


def npz_name(num: int, height: int, width: int, channels: int = 3) -> str:
    """The official file name ``samples_{N}x{H}x{W}x{C}.npz``."""
    return f"samples_{num}x{height}x{width}x{channels}.npz"


def _savez(path, arrays: Dict[str, np.ndarray]) -> None:
    # A file object keeps np.savez from appending ".npz" to the temporary name.
    with atomic_write(path) as f:
        np.savez(f, **arrays)


def write_npz(path, images: np.ndarray, labels: Optional[np.ndarray] = None) -> None:
    """The ADM-evaluator npz: ``arr_0`` uint8 NHWC, ``arr_1`` int64 labels when given (atomic)."""
    if images.dtype != np.uint8 or images.ndim != 4 or images.shape[-1] != 3:
        raise ValueError(f"arr_0 must be uint8 [N x H x W x 3], got {images.dtype} {images.shape}")
    arrays = {"arr_0": images}
    if labels is not None:
        arrays["arr_1"] = np.asarray(labels, dtype=np.int64)
    _savez(path, arrays)


# -- shards ------------------------------------------------------------------------------------

def shard_name(indices: Sequence[int]) -> str:
    """``shard_{first:06d}_{last:06d}_{digest}.npz``; the digest (of the whole index list) keeps two
    batches with the same first and last index (e.g. [0, 2] and [0, 1, 2]) apart."""
    indices = [int(i) for i in indices]
    digest = hashlib.sha1(",".join(map(str, indices)).encode("ascii")).hexdigest()[:10]
    return f"shard_{indices[0]:06d}_{indices[-1]:06d}_{digest}.npz"


def write_shard(directory, indices: Sequence[int], images: np.ndarray, labels: Optional[np.ndarray]) -> Path:
    """Write one batch (global ``indices`` [B], ``images`` uint8 [B x H x W x 3], ``labels`` [B] or None)."""
    arrays = {"indices": np.asarray(indices, dtype=np.int64), "images": images}
    if labels is not None:
        arrays["labels"] = np.asarray(labels, dtype=np.int64)
    path = Path(directory) / shard_name(indices)
    _savez(path, arrays)
    return path


def list_shards(directory) -> List[Path]:
    """Completed shard files (``.tmp`` leftovers of a killed writer are not shards)."""
    directory = Path(directory)
    return sorted(directory.glob(SHARD_GLOB)) if directory.is_dir() else []


def read_shard_indices(directory) -> set:
    """The global sample indices already held by the shards in ``directory``."""
    done = set()
    for path in list_shards(directory):
        with np.load(path) as data:
            done.update(int(i) for i in data["indices"])
    return done


def merge_shards(directory, num: int) -> Tuple[np.ndarray, Optional[np.ndarray]]:
    """All shards of ``directory`` in index order: (images uint8 [num x H x W x 3], labels int64 [num] or None).

    Raises ``ValueError`` (one line) if an index in [0, num) is missing or shards disagree on shape.
    """
    images = labels = None
    filled = np.zeros(num, dtype=bool)
    for path in list_shards(directory):
        with np.load(path) as data:
            idx = data["indices"]
            keep = (idx >= 0) & (idx < num)
            idx = idx[keep]
            batch = data["images"][keep]
            batch_labels = data["labels"][keep] if "labels" in data.files else None
        if images is None:
            images = np.zeros((num,) + batch.shape[1:], dtype=np.uint8)
            labels = np.zeros(num, dtype=np.int64) if batch_labels is not None else None
        if batch.shape[1:] != images.shape[1:] or (batch_labels is None) != (labels is None):
            raise ValueError(f"shard {path.name} does not match the other shards (shape {batch.shape[1:]})")
        images[idx] = batch
        if labels is not None:
            labels[idx] = batch_labels
        filled[idx] = True
    if images is None or not filled.all():
        missing = np.flatnonzero(~filled)
        raise ValueError(f"{len(missing)} of {num} samples have no shard in {directory} (first missing: {missing[:5].tolist()})")
    return images, labels


# -- images ------------------------------------------------------------------------------------

def make_grid(images: np.ndarray, max_images: int = 64, padding: int = 2, ncol: Optional[int] = None) -> np.ndarray:
    """uint8 [N x H x W x 3] -> one uint8 image of the first ``max_images`` in a near-square grid."""
    images = images[:max_images]
    n, h, w, c = images.shape
    ncol = ncol or int(math.ceil(math.sqrt(n)))
    nrow = int(math.ceil(n / ncol))
    grid = np.zeros((padding + nrow * (h + padding), padding + ncol * (w + padding), c), dtype=np.uint8)
    for k in range(n):
        r, q = divmod(k, ncol)
        y, x = padding + r * (h + padding), padding + q * (w + padding)
        grid[y:y + h, x:x + w] = images[k]
    return grid


def image_strip(rows: Sequence[Sequence[np.ndarray]], padding: int = 2) -> np.ndarray:
    """Rows of equally sized uint8 [H x W x 3] images -> one padded uint8 image (rows x columns)."""
    nrow, ncol = len(rows), max(len(r) for r in rows)
    h, w, c = rows[0][0].shape
    out = np.full((padding + nrow * (h + padding), padding + ncol * (w + padding), c), 255, dtype=np.uint8)
    for r, row in enumerate(rows):
        for q, img in enumerate(row):
            y, x = padding + r * (h + padding), padding + q * (w + padding)
            out[y:y + h, x:x + w] = img
    return out


def write_png(path, image: np.ndarray, text: Optional[Dict[str, str]] = None) -> None:
    """uint8 [H x W x 3] -> PNG (atomic), with optional tEXt chunks."""
    from PIL.PngImagePlugin import PngInfo
    info = None
    if text:
        info = PngInfo()
        for key, value in text.items():
            info.add_text(key, value)
    with atomic_write(path) as f:
        Image.fromarray(image).save(f, format="PNG", pnginfo=info)


# -- JSON --------------------------------------------------------------------------------------

def write_json(path, data) -> None:
    """Pretty JSON (atomic)."""
    with atomic_write(path) as f:
        f.write((json.dumps(data, indent=2, sort_keys=False) + "\n").encode("utf-8"))


def read_json(path) -> Optional[dict]:
    """The JSON object in ``path``, or None if it is absent or unreadable."""
    try:
        with open(path, "r", encoding="utf-8") as f:
            data = json.load(f)
    except (OSError, ValueError):
        return None
    return data if isinstance(data, dict) else None
