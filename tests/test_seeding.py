"""Tests of sag.seeding: per-sample streams are independent of the batch they are drawn in."""
from __future__ import annotations

import pytest
import torch

from sag.seeding import MAX_SEED, SampleNoise, label_seed

IMAGE = (3, 8, 8)


def draw_loop(noise, steps=3):
    """x_T, then one draw per loop step, then labels: the order a sampling loop uses."""
    x_T = noise.randn(IMAGE)
    step_noise = [noise.randn(IMAGE) for _ in range(steps)]
    labels = noise.randint(1000)
    return x_T, step_noise, labels


def test_batch_size_invariance():
    x_T, step_noise, labels = draw_loop(SampleNoise([10, 11, 12, 13]))
    assert x_T.shape == (4, *IMAGE) and x_T.dtype == torch.float32
    assert labels.shape == (4,) and labels.dtype == torch.int64
    for k, seed in enumerate([10, 11, 12, 13]):
        alone_x_T, alone_steps, alone_labels = draw_loop(SampleNoise([seed]))
        assert torch.equal(x_T[k:k + 1], alone_x_T)
        for batched, alone in zip(step_noise, alone_steps):
            assert torch.equal(batched[k:k + 1], alone)
        assert torch.equal(labels[k:k + 1], alone_labels)


def test_split_batches_equal_one_batch():
    together = SampleNoise([3, 4])
    first, second = SampleNoise([3]), SampleNoise([4])
    for _ in range(3):                                      # x_T then two steps
        assert torch.equal(together.randn(IMAGE), torch.cat([first.randn(IMAGE), second.randn(IMAGE)]))


def test_stream_continues_between_calls():
    noise = SampleNoise([7])
    first, second = noise.randn(IMAGE), noise.randn(IMAGE)
    assert not torch.equal(first, second)
    generator = torch.Generator().manual_seed(7)           # the documented stream: plain CPU randn
    assert torch.equal(first[0], torch.randn(IMAGE, generator=generator))
    assert torch.equal(second[0], torch.randn(IMAGE, generator=generator))


def test_labels_do_not_shift_image_noise():
    with_labels, without_labels = SampleNoise([5, 6]), SampleNoise([5, 6])
    x_T = with_labels.randn(IMAGE)
    labels = with_labels.randint(1000)
    assert torch.equal(x_T, without_labels.randn(IMAGE))
    assert torch.equal(with_labels.randn(IMAGE), without_labels.randn(IMAGE))   # step noise too
    assert ((labels >= 0) & (labels < 1000)).all()
    assert label_seed(5) != 5 and label_seed(5) == label_seed(5) and label_seed(5) != label_seed(6)
    assert 0 <= label_seed(5) <= MAX_SEED


def test_randint_range_and_shape():
    labels = SampleNoise(range(64)).randint(10, low=5)
    assert labels.shape == (64,) and int(labels.min()) >= 5 and int(labels.max()) < 10
    assert SampleNoise([1, 2]).randint(4, (3,)).shape == (2, 3)


def test_different_seeds_differ():
    draws = SampleNoise([0, 1, 2]).randn(IMAGE)
    assert not torch.equal(draws[0], draws[1]) and not torch.equal(draws[1], draws[2])
    labels = [SampleNoise(range(16)).randint(1000), SampleNoise(range(16, 32)).randint(1000)]
    assert not torch.equal(labels[0], labels[1])


def test_device_and_dtype_honoured():
    noise = SampleNoise([1, 2], device="cpu")
    assert noise.device == torch.device("cpu")
    draw = noise.randn(IMAGE, dtype=torch.float64)
    assert draw.device == torch.device("cpu") and draw.dtype == torch.float64
    assert torch.equal(draw.float(), SampleNoise([1, 2]).randn(IMAGE))   # drawn in float32, then cast
    assert noise.randint(10).device == torch.device("cpu")
    like = SampleNoise([1, 2]).randn_like(torch.zeros(2, *IMAGE, dtype=torch.float64))
    assert like.dtype == torch.float64 and torch.equal(like.float(), SampleNoise([1, 2]).randn(IMAGE))
    with pytest.raises(ValueError, match="batch of 2"):
        noise.randn_like(torch.zeros(3, *IMAGE))


def test_from_indices_uses_seed_base_plus_index():
    assert SampleNoise.from_indices(1000, [4, 5]).seeds == (1004, 1005)
    assert torch.equal(SampleNoise.from_indices(1000, [4, 5]).randn(IMAGE), SampleNoise([1004, 1005]).randn(IMAGE))


def test_global_rng_untouched():
    state = torch.get_rng_state()
    draw_loop(SampleNoise([1, 2, 3]))
    assert torch.equal(torch.get_rng_state(), state)


@pytest.mark.parametrize("seeds", [[-1], [2**32], [1.5], [True], []])
def test_bad_seeds_raise(seeds):
    with pytest.raises(ValueError):
        SampleNoise(seeds)
