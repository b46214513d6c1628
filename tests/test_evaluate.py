"""sag.evaluate / sag.metrics against the unmodified ADM evaluator (tests/fixtures/official/evaluator,
PROVENANCE.md there): the Inception features, P/R, IS and the Frechet offset branch at the fixture's
tolerances, the read_statistics cases, the command line's one-line errors and the feature cache.
The 2048-d Frechet values (each a ~30 s scipy sqrtm on 2 cores) are in test_evaluate_fid.py."""
import json
import warnings
from functools import lru_cache

import numpy as np
import pytest
import torch

from sag import evaluate, metrics
from sag.inception import FIDInception, resize_bilinear_tf1

from conftest import FIXTURES

EVALUATOR = FIXTURES / "evaluator"
CODE_SCALE = 1 / 64                                  # activations.npz: value = code / 64


def config(case):
    return json.loads((EVALUATOR / case / "config.json").read_text())


@lru_cache(maxsize=None)
def random_inception_state():
    """The fixture's random-weight Inception, rebuilt from its lossless packing (PROVENANCE.md's recipe)."""
    packed = np.load(EVALUATOR / "inception_random_packed.npz")
    state = {}
    for key, kind, shape in json.loads(bytes(packed["__manifest__"]).decode()):
        if kind == "signs":
            bits = np.unpackbits(packed[key + "|signs"])[:int(np.prod(shape))].astype(np.float32)
            state[key] = torch.from_numpy(((bits * 2 - 1) * packed[key + "|scale"]).astype(np.float32).reshape(shape))
        else:
            state[key] = torch.from_numpy(np.array(packed[key], np.float32).reshape(shape))
    return state


@pytest.fixture(scope="module")
def weights_file(tmp_path_factory):
    path = tmp_path_factory.mktemp("weights") / "inception_random.pth"
    torch.save(random_inception_state(), path)
    return path


@pytest.fixture(scope="module")
def net(weights_file):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")                  # not the public file: the SHA-256 warning
        return evaluate.load_inception(weights_file)


@lru_cache(maxsize=None)
def pool_sets(factor=1):
    codes = np.load(EVALUATOR / "metrics" / "activations.npz")
    return (codes["pool_ref_codes"].astype(np.float32) * np.float32(CODE_SCALE * factor),
            codes["pool_sample_codes"].astype(np.float32) * np.float32(CODE_SCALE * factor))


def relative_feature_error(ours, reference):
    return float(np.abs(ours - reference).max() / np.abs(reference).max())


# -- network ----------------------------------------------------------------------------------------

def test_network_features_match_the_2015_graph_port(net, one_thread):
    images, expected = np.load(EVALUATOR / "network" / "images.npz"), np.load(EVALUATOR / "network" / "features.npz")
    for batch in ("b32", "b64", "b256"):
        features = evaluate.inception_features(net, images[batch], batch_size=3)       # 3: a partial last batch
        assert set(features) == {"pool", "spatial", "logits"}
        for name, width in (("pool", 2048), ("spatial", 2023), ("logits", 1008)):
            assert features[name].shape == (len(images[batch]), width) and features[name].dtype == np.float32
            # PROVENANCE: 1e-3 of the feature scale (float32 vs float64 internals differ by <= 3.9e-5)
            assert relative_feature_error(features[name], expected[f"{name}_{batch}"]) <= 1e-3, (batch, name)
    one_by_one = evaluate.inception_features(net, torch.from_numpy(images["b32"][:2]), batch_size=1)
    batched = evaluate.inception_features(net, images["b32"][:2])
    for name in batched:
        assert relative_feature_error(one_by_one[name], batched[name]) <= 1e-5


def test_tf1_resize_is_bit_identical_to_the_recorded_op():
    image = np.load(EVALUATOR / "network" / "images.npz")["b32"][:1]
    resized = resize_bilinear_tf1(torch.from_numpy(image).permute(0, 3, 1, 2).float())[0].permute(1, 2, 0).numpy()
    assert np.array_equal(resized, np.load(EVALUATOR / "network" / "features.npz")["resized0_b32"])


@pytest.mark.parametrize("height, width", [(37, 53), (300, 301), (299, 299), (2, 5), (1, 7)])
def test_tf1_resize_rule_on_odd_sizes(height, width):
    """Any size: source coordinate i * (in / out) in float32 (no half-pixel shift), edge clamped; the
    interpolation itself checked against a float64 reference."""
    x = torch.rand(2, 3, height, width, generator=torch.Generator().manual_seed(height)) * 255
    ours = resize_bilinear_tf1(x).double()
    assert ours.shape == (2, 3, 299, 299)

    def weights(n_in):
        source = (np.arange(299, dtype=np.float32) * (np.float32(n_in) / np.float32(299))).astype(np.float64)
        lower = np.floor(source).astype(int)
        matrix = np.zeros((299, n_in))
        matrix[np.arange(299), lower] += 1 - (source - lower)
        matrix[np.arange(299), np.minimum(lower + 1, n_in - 1)] += source - lower
        return torch.from_numpy(matrix)

    reference = weights(height) @ x.double() @ weights(width).T
    assert (ours - reference).abs().max() <= 1e-3           # pixel units (0..255)
    if (height, width) == (299, 299):
        assert torch.equal(resize_bilinear_tf1(x), x)


# -- metrics ----------------------------------------------------------------------------------------

def test_precision_recall_float16_distances_radii_and_fallback_are_exact():
    ref, sample = pool_sets()
    details, expected = np.load(EVALUATOR / "metrics" / "details.npz"), config("metrics")
    distances = metrics.pairwise_distances(sample, ref).numpy()
    assert np.array_equal(distances, details["pr_dist_sample_ref_f16"].astype(np.float32))
    assert np.array_equal(metrics.manifold_radii(ref).numpy(), details["pr_radii_ref"])
    assert np.array_equal(metrics.manifold_radii(sample).numpy(), details["pr_radii_sample"])
    pr = expected["precision_recall"]
    assert evaluate.precision_recall(ref, sample) == (pr["precision"], pr["recall"])     # exact
    # x16: the float16 squared norms overflow, every block falls back to float32
    ref16, sample16 = pool_sets(16)
    assert np.array_equal(metrics.manifold_radii(ref16).numpy(), details["prfb_radii_ref"])
    fallback = expected["precision_recall_fp32_fallback"]
    assert evaluate.precision_recall(ref16, sample16) == pytest.approx((fallback["precision"], fallback["recall"]), abs=0)


def test_precision_recall_of_other_set_sizes_and_blocking(monkeypatch):
    """The e2e sets (48 / 40 rows), and the same answer when the official 10k blocks are made tiny."""
    features, expected = np.load(EVALUATOR / "e2e" / "features.npz"), config("e2e")["plain"]
    ref, sample = features["pool_e2e_ref"], features["pool_e2e_sample"]
    assert np.array_equal(metrics.manifold_radii(ref).numpy(), np.float32(expected["radii_ref"]))
    assert np.array_equal(metrics.manifold_radii(sample).numpy(), np.float32(expected["radii_sample"]))
    assert evaluate.precision_recall(ref, sample) == (expected["precision"], expected["recall"])
    ref, sample = pool_sets()
    monkeypatch.setattr(metrics, "BLOCK", 256)      # 3 x 2 blocks with ragged edges; no block overflows
    assert evaluate.precision_recall(ref, sample) == (config("metrics")["precision_recall"]["precision"],
                                                      config("metrics")["precision_recall"]["recall"])


def test_float32_fallback_is_decided_per_block(monkeypatch):
    """One row that overflows float16 sends only the blocks it is in to float32."""
    ref, sample = pool_sets()
    ref = ref[:64].copy()
    ref[0] *= 16
    monkeypatch.setattr(metrics, "BLOCK", 32)
    blocked = metrics._BlockedFeatures(ref, "cpu")
    first = blocked.distances((0, 32), blocked, (32, 64))
    second = blocked.distances((32, 64), blocked, (32, 64))
    assert torch.equal(first, metrics._float32_distances(torch.from_numpy(ref[:32]), torch.from_numpy(ref[32:])))
    assert second.dtype == torch.float16 and torch.equal(second.float(), metrics.pairwise_distances(ref[32:], ref[32:]))


def test_inception_score_splits_and_zero_probabilities():
    _, sample = pool_sets()
    logits = sample @ random_inception_state()["fc.weight"].numpy().T          # the softmax graph: pool @ W, no bias
    for split, expected in config("metrics")["inception_score"].items():
        assert evaluate.inception_score(logits, split_size=int(split)) == pytest.approx(expected["value"], rel=1e-3)
    # a probability of exactly 0: the official p log p is nan; its limit 0 is used (with a warning)
    peaked = np.array([[0.0, 200.0], [200.0, 0.0], [0.0, 200.0]], np.float32)
    with pytest.warns(UserWarning, match="exactly 0"):
        score = evaluate.inception_score(peaked)
    p = np.array([1 / 3, 2 / 3])
    assert score == pytest.approx(np.exp(-(p * np.log(p)).sum()), rel=1e-6)


def test_frechet_offset_branch_and_argument_order():
    codes, expected = np.load(EVALUATOR / "metrics" / "activations.npz"), config("metrics")["fid_offset_branch"]
    sample, ref = metrics.statistics(codes["offset_sample"]), metrics.statistics(codes["offset_ref"])
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        assert evaluate.frechet_distance(*sample, *ref) == pytest.approx(expected["value"], rel=1e-3)
        assert evaluate.frechet_distance(*ref, *sample) == pytest.approx(expected["value_reversed_order"], rel=1e-3)
    assert sum("adding 1e-06" in str(w.message) for w in caught) == 1         # only (sample, ref) is non-finite
    # the rule is "offset only when sqrtm is not finite": without it the value would be 1.2e-3 away
    assert abs(expected["value_without_offset_eigvals"] / expected["value"] - 1) > 1e-3


def test_statistics_keep_the_official_dtypes():
    ref, _ = pool_sets()
    mu, sigma = metrics.statistics(ref)
    assert mu.dtype == np.float32 and sigma.dtype == np.float64 and sigma.shape == (2048, 2048)


def test_metric_inputs_fail_with_one_line():
    ref, sample = pool_sets()
    with pytest.raises(metrics.MetricInputError, match="at least 4"):
        evaluate.precision_recall(ref[:3], sample)
    bad = sample.copy()
    bad[0, 0] = np.nan
    with pytest.raises(metrics.MetricInputError, match="NaN"):
        evaluate.precision_recall(ref, bad)
    with pytest.raises(metrics.MetricInputError, match="NaN"):
        evaluate.frechet_distance(np.full(2, np.nan), np.eye(2), np.zeros(2), np.eye(2))


def test_shared_with_the_demo():
    from sag import demo_eval
    assert demo_eval.frechet_distance is evaluate.frechet_distance is metrics.frechet_distance


# -- files, statistics and the command line -------------------------------------------------------

def test_read_statistics_cases():
    folder = EVALUATOR / "metrics" / "read_statistics"
    stored = np.load(folder / "ref_stats_with_images.npz")
    unused = {"pool": np.zeros((2, 2048), np.float32), "spatial": np.zeros((2, 2023), np.float32)}
    for name in ("ref_stats_with_images.npz", "ref_stats_only.npz"):
        (mu, sigma), (mu_s, sigma_s) = evaluate.read_statistics(folder / name, unused)
        assert np.array_equal(mu, stored["mu"]) and np.array_equal(sigma_s, stored["sigma_s"])
        assert mu.dtype == np.float64 and mu_s.dtype == np.float32           # dtypes kept
    with pytest.raises(evaluate.EvaluationError, match="no mu_s, sigma_s"):
        evaluate.read_statistics(folder / "ref_mu_without_mu_s.npz", unused)
    activations = {"pool": np.random.default_rng(0).random((5, 2048), np.float32),
                   "spatial": np.random.default_rng(1).random((5, 2023), np.float32)}
    (mu, _), _ = evaluate.read_statistics(folder / "sample_without_stats.npz", activations)
    assert np.array_equal(mu, activations["pool"].mean(0))
    with pytest.raises(evaluate.EvaluationError, match="no arr_0"):
        evaluate.NpzImages(folder / "ref_stats_only.npz")


def write_images(path, images, **extra):
    np.savez(path, arr_0=images, **extra)
    return path


def run_cli(argv, capsys):
    code = evaluate.main([str(a) for a in argv])
    captured = capsys.readouterr()
    return code, captured.out, captured.err


def test_cli_errors_are_one_line(tmp_path, weights_file, capsys):
    images = np.random.default_rng(0).integers(0, 256, (6, 16, 16, 3), dtype=np.uint8)
    good = write_images(tmp_path / "good.npz", images)
    cases = {
        "missing weights": ([good, good, "--inception", tmp_path / "absent.pth"], WEIGHTS_HINT),
        "not weights": ([good, good, "--inception", good], WEIGHTS_HINT),
        "no arr_0": ([good, np.savez(tmp_path / "x.npz", images=images) or tmp_path / "x.npz", "--inception",
                      weights_file], "no arr_0"),
        "float images": ([good, write_images(tmp_path / "f.npz", images.astype(np.float32)), "--inception",
                          weights_file], "must be uint8"),
        "grey images": ([good, write_images(tmp_path / "g.npz", images[..., 0]), "--inception", weights_file],
                        "must be uint8"),
        "too few": ([good, write_images(tmp_path / "t.npz", images[:3]), "--inception", weights_file], "at least 4"),
        "mu without mu_s": ([write_images(tmp_path / "m.npz", images, mu=np.zeros(2048), sigma=np.eye(2048)), good,
                             "--inception", weights_file], "no mu_s"),
        "NaN statistics": ([write_images(tmp_path / "n.npz", images, mu=np.full(2048, np.nan), sigma=np.eye(2048),
                                         mu_s=np.zeros(2023), sigma_s=np.eye(2023)), good, "--inception", weights_file],
                           "NaN"),
        "not an npz": ([good, tmp_path / "absent.npz", "--inception", weights_file], "not found"),
    }
    for name, (argv, message) in cases.items():
        code, out, err = run_cli(argv, capsys)
        lines = [line for line in err.splitlines() if not line.startswith("warning:")]
        assert code == 2 and len(lines) == 1 and lines[0].startswith("error:") and message in lines[0], (name, err)
        assert "Traceback" not in err


WEIGHTS_HINT = "pt_inception-2015-12-05-6726825d.pth"


def test_load_inception_layout_and_hash_warning(tmp_path, weights_file):
    with pytest.warns(UserWarning, match="not the public"):
        net = evaluate.load_inception(weights_file)
    assert isinstance(net, FIDInception) and not net.training
    assert len(net.state_dict()) == 472 and sum(p.numel() for p in net.parameters()) + sum(
        b.numel() for b in net.buffers()) == 23_885_392
    broken = dict(random_inception_state())
    broken.pop("fc.bias")
    torch.save(broken, tmp_path / "broken.pth")
    with pytest.raises(evaluate.EvaluationError, match="1 keys missing"):
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            evaluate.load_inception(tmp_path / "broken.pth")


def test_activation_cache_is_keyed_by_file_and_network(tmp_path, net, monkeypatch, one_thread):
    images = np.load(EVALUATOR / "network" / "images.npz")["b32"]
    path = write_images(tmp_path / "samples.npz", images)
    first = evaluate.read_activations(path, net, batch_size=2)
    cached = list(tmp_path.glob("samples.inception-*.npz"))
    assert len(cached) == 1 and evaluate.network_key(net)[:16] in cached[0].name
    expected = np.load(EVALUATOR / "network" / "features.npz")
    assert relative_feature_error(first["pool"], expected["pool_b32"]) <= 1e-3

    def no_network(*args, **kwargs):
        raise AssertionError("the network ran although the cache holds these features")
    monkeypatch.setattr(evaluate, "_features_of_batches", no_network)
    again = evaluate.read_activations(path, net)
    assert all(np.array_equal(first[k], again[k]) for k in first)
    write_images(path, images[::-1].copy())                     # new content: new key, the network must run
    with pytest.raises(AssertionError, match="network ran"):
        evaluate.read_activations(path, net)


def test_streamed_npz_batches_equal_the_array(tmp_path):
    images = np.random.default_rng(2).integers(0, 256, (11, 7, 9, 3), dtype=np.uint8)
    for save in (np.savez, np.savez_compressed):
        save(tmp_path / "a.npz", arr_0=images, arr_1=np.arange(11))
        reader = evaluate.NpzImages(tmp_path / "a.npz")
        assert len(reader) == 11 and np.array_equal(np.concatenate(list(reader.batches(4))), images)


def test_evaluate_npz_uses_stored_statistics_in_the_official_order(tmp_path, monkeypatch):
    """ref_with_stats.npz: FID / sFID from the file's mu, sigma (not its images); P/R and IS from arr_0;
    frechet_distance(sample..., reference...) as the official main() calls it."""
    for name in ("ref_with_stats.npz", "sample.npz"):
        (tmp_path / name).write_bytes((EVALUATOR / "e2e" / name).read_bytes())
    pools = np.load(EVALUATOR / "e2e" / "features.npz")
    rng = np.random.default_rng(3)
    acts = {"ref_with_stats": pools["pool_e2e_ref"], "sample": pools["pool_e2e_sample"]}

    def fixture_features(path, net, *args, **kwargs):
        pool = acts[path.stem if hasattr(path, "stem") else str(path).rsplit("/", 1)[-1][:-4]]
        return {"pool": pool, "spatial": rng.random((len(pool), 2023), dtype=np.float32),
                "logits": pool @ random_inception_state()["fc.weight"].numpy().T}
    calls = []
    monkeypatch.setattr(evaluate, "read_activations", fixture_features)
    monkeypatch.setattr(evaluate, "frechet_distance", lambda *args: calls.append(args) or 0.0)
    result = evaluate.evaluate_npz(tmp_path / "ref_with_stats.npz", tmp_path / "sample.npz", net=FIDInception())
    expected = config("e2e")["ref_with_precomputed_stats"]
    assert (result["precision"], result["recall"]) == (expected["precision"], expected["recall"])
    assert result["inception_score"] == pytest.approx(expected["inception_score"], rel=1e-3)
    stored = np.load(tmp_path / "ref_with_stats.npz")
    (fid_args, sfid_args) = calls
    assert np.array_equal(fid_args[0], acts["sample"].mean(0)) and fid_args[0].dtype == np.float32
    assert fid_args[2] is not None and np.array_equal(fid_args[2], stored["mu"]) and np.array_equal(fid_args[3], stored["sigma"])
    assert np.array_equal(sfid_args[2], stored["mu_s"]) and np.array_equal(sfid_args[3], stored["sigma_s"])
