"""Per-sample random streams: sample i's noise depends on its seed only.

Idea from EDM's ``StackedRandomGenerator`` (NVlabs/edm ``generate.py``; ECOSYSTEM.md section 2): one
``torch.Generator`` per sample, each drawing that sample's slice of every random tensor, the slices
stacked into the batch.  Sample k of a batch of 4 is then bit-identical to the same seed run alone,
whatever the batch size, the batch position, the process count or the device (the official
guided-diffusion / SAG scripts seed nothing and draw from the global RNG, so none of this holds there).

Stream layout, per sample (the sampling loop must keep this order):

* image generator, ``torch.Generator("cpu").manual_seed(seed)``:
    draw 0        = x_T, the initial noise, shape (C, H, W);
    draw 1 + s    = the noise of loop step s (s = 0 first, i.e. the noisiest step), one draw per step,
                    including the last step where the official ``p_sample`` multiplies it by 0, so the
                    noise of a step never depends on which later steps run;
* label generator, seeded with :func:`label_seed` (a hash of the seed): class labels, one draw per
  sample.  A separate stream, so conditional and unconditional runs of one seed share x_T and all
  step noise.

Everything is drawn on the CPU in float32 (CPU and CUDA generators give different streams; a fixed
CPU stream makes results independent of the device), then moved to ``device`` and cast.  The global
RNG is never touched.

Seeds must lie in [0, 2**32): PyTorch's CPU generator (mt19937) keeps only the low 32 bits of its seed,
so seeds s and s + 2**32 would silently give the same noise.
"""
from __future__ import annotations

import hashlib
import numbers
from typing import Iterable, Sequence, Tuple, Union

import torch

__all__ = ["SampleNoise", "label_seed", "MAX_SEED"]

MAX_SEED = 2**32 - 1  # the CPU generator truncates seeds to 32 bits
_LABEL_STREAM = b"sag.seeding/labels/v1"

DeviceLike = Union[torch.device, str]


def label_seed(seed: int) -> int:
    """Seed of the label stream of sample ``seed``: the low 32 bits of SHA-256("sag.seeding/labels/v1", seed).

    Deterministic across processes and Python versions (no ``hash()``), and unrelated to the image
    stream of this or any nearby seed.
    """
    digest = hashlib.sha256(_LABEL_STREAM + b":" + str(int(seed)).encode("ascii")).digest()
    return int.from_bytes(digest[:4], "little")


def _checked_seeds(seeds: Iterable[int]) -> Tuple[int, ...]:
    seeds = tuple(seeds)
    for seed in seeds:
        if isinstance(seed, bool) or not isinstance(seed, numbers.Integral) or not 0 <= seed <= MAX_SEED:
            raise ValueError(f"seeds must be ints in [0, 2**32) (the CPU generator keeps 32 bits), got {seed!r}")
    seeds = tuple(int(seed) for seed in seeds)
    if not seeds:
        raise ValueError("SampleNoise needs at least one seed")
    return seeds


class SampleNoise:
    """One CPU ``torch.Generator`` per sample; every draw is stacked along a new batch axis.

    ``SampleNoise([3, 4]).randn((3, 32, 32))`` equals ``torch.cat([SampleNoise([3]).randn(...),
    SampleNoise([4]).randn(...)])`` bit for bit, and successive calls continue each sample's stream
    (x_T first, then one draw per loop step; see the module docstring).

    Args:
        seeds: one seed per sample, in batch order, each in [0, 2**32).
        device: where the drawn tensors are returned (they are drawn on the CPU, then moved).
    """

    def __init__(self, seeds: Sequence[int], device: DeviceLike = torch.device("cpu")):
        self.seeds = _checked_seeds(seeds)
        self.device = torch.device(device)
        self._image_generators = [torch.Generator(device="cpu").manual_seed(seed) for seed in self.seeds]
        self._label_generators = [torch.Generator(device="cpu").manual_seed(label_seed(seed))
                                  for seed in self.seeds]

    @classmethod
    def from_indices(cls, seed_base: int, indices: Iterable[int],
                     device: DeviceLike = torch.device("cpu")) -> "SampleNoise":
        """Samples named by their global index i, seeded with ``seed_base + i`` (EDM's ``--seeds``)."""
        return cls([seed_base + int(index) for index in indices], device=device)

    def __len__(self) -> int:
        return len(self.seeds)

    def randn(self, shape_per_sample: Tuple[int, ...], dtype: torch.dtype = torch.float32) -> torch.Tensor:
        """Standard normal noise, one ``shape_per_sample`` draw from each sample's image stream.

        Shapes: -> ``[len(seeds) x *shape_per_sample]``, on ``self.device``, drawn in float32 then cast.
        """
        return self._image_draw(shape_per_sample).to(device=self.device, dtype=dtype)

    def _image_draw(self, shape_per_sample: Tuple[int, ...]) -> torch.Tensor:
        shape = tuple(shape_per_sample)
        draws = [torch.randn(shape, generator=generator, dtype=torch.float32)
                 for generator in self._image_generators]                   # len(seeds) x (*shape,)
        return torch.stack(draws)                                           # (len(seeds), *shape) on CPU

    def randn_like(self, x: torch.Tensor) -> torch.Tensor:
        """``randn(x.shape[1:])`` with x's dtype and device; x's batch axis must equal ``len(seeds)``."""
        if x.dim() < 1 or x.shape[0] != len(self.seeds):
            raise ValueError(f"randn_like needs a batch of {len(self.seeds)} (one per seed), got {tuple(x.shape)}")
        return self._image_draw(tuple(x.shape[1:])).to(device=x.device, dtype=x.dtype)

    def randint(self, high: int, shape_per_sample: Tuple[int, ...] = (), *, low: int = 0) -> torch.Tensor:
        """Integers uniform in [low, high) from each sample's label stream (class labels).

        Shapes: -> ``[len(seeds) x *shape_per_sample]`` int64 on ``self.device`` (one label per sample
        with the default ``shape_per_sample = ()``).  The label stream is separate from the image stream,
        so drawing labels never shifts x_T or the step noise.
        """
        shape = tuple(shape_per_sample)
        draws = [torch.randint(low, high, shape, generator=generator, dtype=torch.int64)
                 for generator in self._label_generators]
        return torch.stack(draws).to(self.device)                            # (len(seeds), *shape)

    def __repr__(self) -> str:
        return f"SampleNoise(seeds={list(self.seeds)}, device={str(self.device)!r})"
