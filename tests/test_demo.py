"""The embedded demo model, its procedural data and the Frechet distance of sag.demo_eval."""
import numpy as np
import pytest
import torch

import sag
from sag import demo_data
from sag.demo import DEMO_PATH, DEMO_SAG, load_demo
from sag.demo_eval import frechet_distance, statistics


pytestmark = pytest.mark.usefixtures("one_thread")


def test_demo_file_is_small_and_plain_data():
    assert DEMO_PATH.stat().st_size <= 10 * 1024 * 1024
    payload = torch.load(DEMO_PATH, map_location="cpu", weights_only=True)
    assert payload["format"] == "sag-checkpoint"
    assert all(v.dtype == torch.float32 for v in payload["state_dict"].values())
    assert payload["model_config"]["image_size"] == 32


def test_load_demo_has_sag_site_and_respacing():
    loaded = load_demo(timestep_respacing="10")
    assert loaded.diffusion.num_timesteps == 10
    assert loaded.guidance == DEMO_SAG
    assert DEMO_SAG.site in [s.name for s in loaded.model.attention_sites()]
    assert not loaded.model.training


def test_demo_sample_is_deterministic_and_finite():
    loaded = load_demo(timestep_respacing="10")
    run = lambda: sag.sample(loaded.model, loaded.diffusion, (2, 3, 32, 32), guidance=DEMO_SAG, seed=[7, 8])  # noqa: E731
    a, b = run(), run()
    assert a.shape == (2, 3, 32, 32)
    assert torch.isfinite(a).all()
    assert torch.equal(a, b)


def test_dataset_is_deterministic_per_index():
    images, labels = demo_data.generate(20)
    again, again_labels = demo_data.generate([13, 2, 19])
    assert np.array_equal(again, images[[13, 2, 19]]) and np.array_equal(again_labels, labels[[13, 2, 19]])
    assert images.dtype == np.float32 and images.shape == (20, 3, 32, 32)
    assert images.min() >= -1 and images.max() <= 1
    assert set(labels.tolist()) <= set(range(demo_data.NUM_CLASSES))
    other, _ = demo_data.generate(20, seed=1)
    assert not np.array_equal(other, images)


def test_frechet_distance_closed_forms():
    # 1-D: (m1 - m2)^2 + (s1 - s2)^2
    assert frechet_distance([1.0], [[4.0]], [3.0], [[9.0]]) == pytest.approx(4 + 1)
    # diagonal covariances: |mu1 - mu2|^2 + sum_i (sqrt(a_i) - sqrt(b_i))^2
    a, b = np.array([1.0, 4.0, 0.25]), np.array([9.0, 1.0, 0.25])
    mu1, mu2 = np.array([0.0, 1.0, 2.0]), np.array([1.0, 1.0, 0.0])
    expected = np.sum((mu1 - mu2) ** 2) + np.sum((np.sqrt(a) - np.sqrt(b)) ** 2)
    assert frechet_distance(mu1, np.diag(a), mu2, np.diag(b)) == pytest.approx(expected, rel=1e-9)
    # a full covariance S and c S: (1 - sqrt(c))^2 tr S
    rng = np.random.default_rng(0)
    m = rng.normal(size=(6, 6))
    s = m @ m.T + 0.1 * np.eye(6)
    assert frechet_distance(np.zeros(6), s, np.zeros(6), 4 * s) == pytest.approx(np.trace(s), rel=1e-7)
    # identical Gaussians: 0; symmetric
    assert frechet_distance(mu1, s[:3, :3], mu1, s[:3, :3]) == pytest.approx(0, abs=1e-7)
    assert frechet_distance(mu1, np.diag(a), mu2, s[:3, :3]) == pytest.approx(
        frechet_distance(mu2, s[:3, :3], mu1, np.diag(a)), rel=1e-7)


def test_statistics_are_float64_mean_and_covariance():
    x = np.random.default_rng(1).normal(size=(500, 4)).astype(np.float32)
    mu, cov = statistics(x)
    assert mu.dtype == np.float64 and cov.shape == (4, 4)
    assert np.allclose(cov, np.cov(x.astype(np.float64), rowvar=False))


def test_training_runs_saves_plain_weights_and_continues(tmp_path):
    """Two steps of the demo trainer (small batch), then one more continued from its output."""
    import json

    from checkpoints_convert.load import load_checkpoint
    from sag.demo_train import main as train_main
    first = tmp_path / "a.pt"
    train_main(["--out", str(first), "--minutes", "5", "--max_steps", "2", "--batch_size", "4"])
    record = json.loads(first.with_suffix(".json").read_text())
    assert record["steps"] == 2 and record["total_steps"] == 2 and record["finished"] and record["init_from"] is None
    assert torch.load(first, map_location="cpu", weights_only=True)["format"] == "sag-checkpoint"
    second = tmp_path / "b.pt"
    train_main(["--out", str(second), "--minutes", "5", "--max_steps", "1", "--batch_size", "4",
                "--init-from", str(first)])
    record = json.loads(second.with_suffix(".json").read_text())
    assert record["steps"] == 1 and record["total_steps"] == 3
    assert record["init_from"]["steps"] == 2 and record["init_from"]["record"]["steps"] == 2
    before, after = load_checkpoint(first).model.state_dict(), load_checkpoint(second).model.state_dict()
    assert any(not torch.equal(before[k], after[k]) for k in before)        # it trained on
