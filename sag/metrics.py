"""The ADM evaluator's sample-quality statistics, reproduced number for number: Frechet distance,
Inception Score and the k-NN precision / recall (guided-diffusion ``evaluations/evaluator.py``;
arithmetic as measured in tests/fixtures/official/evaluator/PROVENANCE.md).

Shared by ``sag.evaluate`` (Inception features) and ``sag.demo_eval`` (its small shape classifier).

* Frechet distance (float64 covariances; ``mu`` keeps the dtype it is given -- float32 for the
  evaluator's float32 activations, as ``np.mean`` leaves it)::

      FD = |mu_1 - mu_2|^2 + tr(S_1) + tr(S_2) - 2 tr((S_1 S_2)^(1/2))

  with ``scipy.linalg.sqrtm``; only when that square root is not finite is 1e-6 I added to both
  covariances and the root taken again; a complex root is an error when an imaginary part on its
  diagonal exceeds 1e-3, otherwise its real part is used.
* Inception Score (float32)::

      IS = mean over splits of exp( mean_i KL(p(y|x_i) || p(y)) ),   p(y) = mean_i p(y|x_i) in the split

  splits of ``split_size`` rows in file order; a last, shorter split counts as a whole split in the mean.
* Precision / recall (k = 3): the radius of a point is the squared distance to its 3rd nearest
  neighbour in its own set (the point itself at distance ~0 is the first of the sorted row); a point
  is covered when its squared distance to some point of the other set is ``<=`` that point's radius.
  precision = covered fraction of the samples (by the reference manifold), recall = covered fraction of
  the reference (by the sample manifold). Distances use the official float16 block arithmetic
  (``pairwise_distances``) over 10,000 x 10,000 blocks.
"""
from __future__ import annotations

import warnings
from typing import Tuple

import numpy as np
import torch

__all__ = ["statistics", "frechet_distance", "softmax_probabilities", "inception_score", "pairwise_distances",
           "manifold_radii", "precision_recall", "NEIGHBOURHOOD", "BLOCK"]

NEIGHBOURHOOD = 3        # k of the k-NN manifold
BLOCK = 10_000           # the official row and column batch of every distance computation
PACKET = 8               # float16 lanes of Eigen's AVX packet (TF-CPU's reduce_sum over half)
LEAF = 200               # Eigen's tree-reduction leaf size for half, in packets


class MetricInputError(ValueError):
    """Inputs a metric cannot use (shape, too few rows, NaN); the message is one line."""


def _finite(name: str, array: np.ndarray) -> None:
    if not np.isfinite(array).all():
        raise MetricInputError(f"{name} contains NaN or infinite values; recompute it from finite features")


def statistics(features) -> Tuple[np.ndarray, np.ndarray]:
    """The evaluator's ``compute_statistics``: features [N x D] -> (mean [D] in the features' dtype,
    unbiased covariance [D x D] float64). float32 activations give a float32 mean, as upstream."""
    features = np.asarray(features)
    if features.ndim != 2 or len(features) < 2:
        raise MetricInputError(f"statistics need features [N x D] with N >= 2, got shape {features.shape}")
    _finite("features", features)
    return np.mean(features, axis=0), np.cov(features, rowvar=False)


def _matrix_sqrt(product: np.ndarray) -> np.ndarray:
    from scipy import linalg
    root = linalg.sqrtm(product)
    return root[0] if isinstance(root, tuple) else root     # scipy < 1.10 with disp=False returned a pair


def frechet_distance(mu1, sigma1, mu2, sigma2, eps: float = 1e-6) -> float:
    """Frechet distance between N(mu1, sigma1) and N(mu2, sigma2) (module docstring for the rule).

    ``mu`` [D] and ``sigma`` [D x D]; the evaluator calls it as (sample mu, sample sigma, reference mu,
    reference sigma). Returns a Python float."""
    mean_a, mean_b = np.atleast_1d(mu1), np.atleast_1d(mu2)
    cov_a, cov_b = np.atleast_2d(sigma1), np.atleast_2d(sigma2)
    dim = mean_a.shape[0]
    if mean_a.shape != (dim,) or mean_b.shape != (dim,) or cov_a.shape != (dim, dim) or cov_b.shape != (dim, dim):
        raise MetricInputError(f"Frechet distance needs mu [D] and sigma [D x D] of one D; got {mean_a.shape}, "
                               f"{cov_a.shape}, {mean_b.shape}, {cov_b.shape}")
    for name, value in (("mu", mean_a), ("sigma", cov_a), ("reference mu", mean_b), ("reference sigma", cov_b)):
        _finite(name, value)
    offset_mean = mean_a - mean_b
    root = _matrix_sqrt(cov_a.dot(cov_b))
    if not np.isfinite(root).all():
        warnings.warn(f"the covariance product is singular; adding {eps} to both diagonals (as the ADM evaluator)")
        ridge = np.eye(dim) * eps
        root = _matrix_sqrt((cov_a + ridge).dot(cov_b + ridge))
    if np.iscomplexobj(root):
        if not np.allclose(np.diagonal(root).imag, 0, atol=1e-3):
            raise MetricInputError(f"the matrix square root has an imaginary component of {np.abs(root.imag).max():.3g}")
        root = root.real
    return float(offset_mean.dot(offset_mean) + np.trace(cov_a) + np.trace(cov_b) - 2 * np.trace(root))


def softmax_probabilities(logits) -> np.ndarray:
    """float32 softmax over the last axis of logits [N x C] (what the evaluator's softmax graph returns)."""
    logits = torch.as_tensor(np.asarray(logits), dtype=torch.float32)
    return torch.softmax(logits, dim=-1).numpy()


def inception_score(logits, split_size: int = 5000) -> float:
    """Inception Score of bias-free Inception logits [N x 1008] (module docstring for the rule).

    Where a probability is exactly 0 the evaluator's ``p (log p - log p(y))`` is 0 * -inf = NaN and it
    prints ``nan``; here that term is its limit 0 (a warning says so), equal to the official value
    wherever the official value is a number."""
    logits = np.asarray(logits)
    if logits.ndim != 2 or len(logits) == 0:
        raise MetricInputError(f"inception_score needs logits [N x C] with N >= 1, got shape {logits.shape}")
    if int(split_size) < 1:
        raise MetricInputError(f"split_size must be >= 1, got {split_size}")
    _finite("logits", logits)
    probabilities = softmax_probabilities(logits)
    if (probabilities == 0).any():
        warnings.warn("a softmax probability is exactly 0: the ADM evaluator prints nan here; "
                      "this score uses 0 * log 0 = 0")
    scores = []
    for start in range(0, len(probabilities), int(split_size)):
        split = probabilities[start:start + int(split_size)]
        marginal = np.mean(split, axis=0, keepdims=True)
        with np.errstate(divide="ignore", invalid="ignore"):
            terms = np.where(split > 0, split * (np.log(split) - np.log(marginal)), np.float32(0))
        scores.append(np.exp(np.mean(np.sum(terms, axis=1))))
    return float(np.mean(scores))


# -- precision / recall: the official float16 distance block -------------------------------------

def _packet_horizontal_sum(packet: torch.Tensor) -> torch.Tensor:
    """Eigen ``predux`` of an 8-lane half packet [R x 8]: lanes to float32, (i + i+4), then
    (0 + 2) + (1 + 3), rounded back to half."""
    lanes = packet.float()
    pairs = lanes[:, :4] + lanes[:, 4:]
    return ((pairs[:, 0] + pairs[:, 2]) + (pairs[:, 1] + pairs[:, 3])).half()


def _leaf_half_sum(values: torch.Tensor) -> torch.Tensor:
    """Eigen's vectorised inner-most reduction of half rows [R x n]: four packet accumulators over
    blocks of 32, folded into the first, then single packets, then a scalar tail; every add rounds to half."""
    rows, n = values.shape
    accumulator = values.new_zeros(rows, PACKET)
    start = 0
    if n >= 4 * PACKET:
        stop = (n // (4 * PACKET)) * 4 * PACKET
        blocks = values[:, :stop].reshape(rows, -1, 4, PACKET)
        lanes = [values.new_zeros(rows, PACKET) for _ in range(4)]
        for j in range(blocks.shape[1]):
            for a in range(4):
                lanes[a] = lanes[a] + blocks[:, j, a]
        accumulator = ((lanes[0] + lanes[1]) + lanes[2]) + lanes[3]
        start = stop
    for j in range(start, (n // PACKET) * PACKET, PACKET):
        accumulator = accumulator + values[:, j:j + PACKET]
    tail = values.new_zeros(rows)
    for j in range(max(start, (n // PACKET) * PACKET), n):
        tail = tail + values[:, j]
    return tail + _packet_horizontal_sum(accumulator)


def _tree_half_sum(values: torch.Tensor, first: int) -> torch.Tensor:
    """Eigen's tree reduction: rows longer than 8 * 200 split at the packet boundary after their
    middle (``first`` = flat index of the row's first element, which sets that boundary)."""
    n = values.shape[1]
    if n <= PACKET * LEAF:
        return _leaf_half_sum(values)
    split = PACKET * -(-(first + -(-n // 2)) // PACKET)
    left = min(split - first, n)
    total = _tree_half_sum(values[:, :left], first)
    if left < n:
        total = total + _tree_half_sum(values[:, left:], split)
    return total


def _half_row_norms(features16: torch.Tensor, first_row: int = 0) -> torch.Tensor:
    """``reduce_sum(square(x), 1)`` in float16 as TF-CPU computes it: [R x D] half -> [R] half."""
    squares = features16 * features16
    rows, dim = squares.shape
    norms = squares.new_empty(rows)
    index = torch.arange(rows, device=squares.device) + first_row
    for phase in sorted({(r * dim) % PACKET for r in range(first_row, first_row + min(rows, PACKET))}):
        chosen = ((index * dim) % PACKET) == phase
        norms[chosen] = _tree_half_sum(squares[chosen], phase)
    return norms


def _float32_distances(u: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    norm_u = (u * u).sum(1, keepdim=True)
    norm_v = (v * v).sum(1)[None]
    return ((norm_u - 2 * (u @ v.T)) + norm_v).clamp_min(0)


def pairwise_distances(u, v, first_row_u: int = 0, first_row_v: int = 0) -> torch.Tensor:
    """The evaluator's ``DistanceBlock``: squared Euclidean distances [R x C] (float32 values) between
    rows of u [R x D] and v [C x D], one official block (at most 10,000 x 10,000).

    float16: ``max((|u|^2 - 2 u.v) + |v|^2, 0)`` with each operation rounded to half, u.v accumulated
    in float32; if any value of the block is not finite the whole block is recomputed in float32.
    ``first_row_*``: index of the first row in its tensor (Eigen's row sums depend on alignment)."""
    u = torch.as_tensor(u, dtype=torch.float32)
    v = torch.as_tensor(v, dtype=torch.float32, device=u.device)
    assert u.ndim == 2 and v.ndim == 2 and u.shape[1] == v.shape[1], (u.shape, v.shape)
    u16, v16 = u.half(), v.half()
    return _block_distances(u, v, u16, v16, _half_row_norms(u16, first_row_u), _half_row_norms(v16, first_row_v)).float()


MATMUL_ROWS = 2048       # rows of a block whose float32 products exist at once (memory, not arithmetic)


def _block_distances(u, v, u16, v16, norm_u16, norm_v16) -> torch.Tensor:
    """One block: float16 distances [R x C] (half), or float32 ones when the float16 block is not finite."""
    distances = torch.empty(len(u16), len(v16), dtype=torch.float16, device=u16.device)
    columns = v16.float().T
    with _ieee_float32_matmul(u16.device):
        for start in range(0, len(u16), MATMUL_ROWS):
            distances[start:start + MATMUL_ROWS] = (u16[start:start + MATMUL_ROWS].float() @ columns).half()
    # in place, each step rounded to half: (|u|^2 + (-(2 u.v))) + |v|^2, then max(., 0)
    distances.mul_(2).neg_().add_(norm_u16[:, None]).add_(norm_v16[None]).clamp_min_(0)
    if bool(torch.isfinite(distances).all()):
        return distances
    del distances
    with _ieee_float32_matmul(u.device):
        return _float32_distances(u, v)


class _ieee_float32_matmul:
    """Full float32 matmuls on CUDA (no TF32) for the block; a no-op elsewhere."""

    def __init__(self, device):
        self.cuda = torch.device(device).type == "cuda"

    def __enter__(self):
        if self.cuda:
            self.before = torch.backends.cuda.matmul.allow_tf32
            torch.backends.cuda.matmul.allow_tf32 = False

    def __exit__(self, *exc):
        if self.cuda:
            torch.backends.cuda.matmul.allow_tf32 = self.before
        return False


class _BlockedFeatures:
    """Features [N x D] on a device with their float16 copies and official float16 row norms."""

    def __init__(self, features, device):
        features = np.asarray(features) if not torch.is_tensor(features) else features
        self.full = torch.as_tensor(features, dtype=torch.float32, device=device)
        if self.full.ndim != 2:
            raise MetricInputError(f"precision/recall need features [N x D], got shape {tuple(self.full.shape)}")
        if not bool(torch.isfinite(self.full).all()):
            raise MetricInputError("features contain NaN or infinite values; the feature network produced no usable output")
        self.half = self.full.half()
        self.norms = torch.cat([_half_row_norms(self.half[s:s + BLOCK], s) for s in range(0, len(self), BLOCK)])

    def __len__(self):
        return self.full.shape[0]

    def blocks(self):
        for start in range(0, len(self), BLOCK):
            stop = min(start + BLOCK, len(self))
            yield start, stop

    def distances(self, rows, other, cols) -> torch.Tensor:
        (a, b), (c, d) = rows, cols
        return _block_distances(self.full[a:b], other.full[c:d], self.half[a:b], other.half[c:d],
                                self.norms[a:b], other.norms[c:d])


def _radii(features: _BlockedFeatures, k: int) -> torch.Tensor:
    radii = []
    for rows in features.blocks():
        nearest = None
        for cols in features.blocks():
            block = features.distances(rows, features, cols)
            candidates = torch.topk(block, min(k + 1, block.shape[1]), dim=1, largest=False).values.float()
            if nearest is not None:
                candidates = torch.cat([nearest, candidates], dim=1)
            nearest = torch.topk(candidates, min(k + 1, candidates.shape[1]), dim=1, largest=False, sorted=True).values
        radii.append(nearest[:, k])
    return torch.cat(radii)


def _check_neighbours(n: int, what: str, k: int) -> None:
    if n < k + 1:
        raise MetricInputError(f"precision/recall need at least {k + 1} {what} (k = {k} neighbours besides the point "
                               f"itself), got {n}")


def manifold_radii(features, k: int = NEIGHBOURHOOD, device=None) -> torch.Tensor:
    """Squared distance of each row of features [N x D] to its k-th nearest other row -> [N] float32
    (``ManifoldEstimator.manifold_radii``: index k of the sorted row, the point itself being index 0)."""
    blocked = _BlockedFeatures(features, device or "cpu")
    _check_neighbours(len(blocked), "feature rows", k)
    return _radii(blocked, k)


def precision_recall(ref_pool, sample_pool, k: int = NEIGHBOURHOOD, device=None) -> Tuple[float, float]:
    """(precision, recall) of sample features against reference features, [N x D] each (module docstring).

    Works in official 10,000 x 10,000 blocks, never holding more than one block's distances: a 50k x
    50k evaluation peaks at about one block (10k x 10k float32 and float16 copies, ~1.5 GB) above the
    features themselves, on CPU or GPU. ``device``: where to compute (default: the features' own, else CPU)."""
    if device is None:
        device = ref_pool.device if torch.is_tensor(ref_pool) else "cpu"
    ref, sample = _BlockedFeatures(ref_pool, device), _BlockedFeatures(sample_pool, device)
    _check_neighbours(len(ref), "reference images", k)
    _check_neighbours(len(sample), "sample images", k)
    if ref.full.shape[1] != sample.full.shape[1]:
        raise MetricInputError(f"reference and sample features differ in width: {ref.full.shape[1]} vs {sample.full.shape[1]}")
    ref_radii, sample_radii = _radii(ref, k), _radii(sample, k)
    ref_covered = torch.zeros(len(ref), dtype=torch.bool, device=ref.full.device)
    sample_covered = torch.zeros(len(sample), dtype=torch.bool, device=ref.full.device)
    for a, b in ref.blocks():
        for c, d in sample.blocks():
            block = ref.distances((a, b), sample, (c, d))
            ref_covered[a:b] |= (block <= sample_radii[None, c:d]).any(dim=1)
            sample_covered[c:d] |= (block <= ref_radii[a:b, None]).any(dim=0)
    precision = sample_covered.double().mean().item()
    recall = ref_covered.double().mean().item()
    return precision, recall
