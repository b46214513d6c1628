"""``python -m sag.evaluate REF.npz SAMPLES.npz --inception PATH``: the ADM evaluator (FID, sFID, Inception
Score, precision, recall) in PyTorch, equal to guided-diffusion's ``evaluations/evaluator.py``.

    python -m sag.evaluate VIRTUAL_imagenet256_labeled.npz samples_50000x256x256x3.npz \\
        --inception pt_inception-2015-12-05-6726825d.pth --device cuda

Inputs are npz files whose ``arr_0`` is uint8 [N x H x W x 3] (what ``sag-sample`` and the official
samplers write; any H, W). A file that also holds ``mu, sigma, mu_s, sigma_s`` (the official reference
batches) has those statistics used for FID / sFID instead of its images' (precision / recall still use
``arr_0``). The sequence is the official ``main()``:

    IS   = inception_score(sample logits)                       (splits of 5,000)
    FID  = frechet_distance(sample mu, sigma, ref mu, sigma)    (pool_3 features, 2048)
    sFID = frechet_distance(... spatial ...)                    (mixed_6/conv[..., :7], 2023)
    P, R = precision_recall(ref pool, sample pool)              (k = 3)

The network is ``sag.inception.FIDInception`` with the public ``pt_inception-2015-12-05-6726825d.pth``
weights (not downloaded here: pass the file). Features of each npz are cached beside it as
``<name>.inception-<file sha256>-<weights sha256>.npz``, so a second evaluation against the same reference
only runs the network on the samples. The numbers are printed as the official program prints them and
written to ``<samples>.evaluation.json``.

``--bench`` measures feature extraction (images/s) and the memory of precision/recall in blocks.
"""
from __future__ import annotations

import argparse
import hashlib
import json
import os
import resource
import subprocess
import sys
import time
import warnings
import zipfile
from pathlib import Path
from typing import Dict, Iterable, Optional

import numpy as np
import torch

from .inception import INPUT_SIZE, FIDInception
from .io import atomic_write, write_json
from .metrics import (NEIGHBOURHOOD, MetricInputError, frechet_distance, inception_score, precision_recall,
                      statistics)

__all__ = ["load_inception", "inception_features", "frechet_distance", "inception_score", "precision_recall",
           "evaluate_npz", "read_statistics", "stored_statistics", "read_activations", "EvaluationError", "WEIGHTS_NAME", "WEIGHTS_URL"]

WEIGHTS_NAME = "pt_inception-2015-12-05-6726825d.pth"
WEIGHTS_URL = "https://github.com/mseitzer/pytorch-fid/releases/download/fid_weights/" + WEIGHTS_NAME
WEIGHTS_SHA256_PREFIX = "6726825d"          # torch.hub names a file by the first 8 hex digits of its SHA-256
FEATURE_WIDTHS = {"pool": 2048, "spatial": 2023, "logits": 1008}
STATISTICS_KEYS = ("mu", "sigma", "mu_s", "sigma_s")


class EvaluationError(ValueError):
    """An input the evaluator cannot use; the message is one line saying what to fix."""


def file_sha256(path, chunk: int = 1 << 22) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(chunk), b""):
            digest.update(block)
    return digest.hexdigest()


# -- the network ------------------------------------------------------------------------------------

def load_inception(path, device=None) -> FIDInception:
    """The FID Inception-v3 with the weights of ``path`` (the ``pt_inception`` state dict layout), in eval
    mode on ``device``. Loaded with ``torch.load(weights_only=True)`` and ``strict=True``; a file whose
    SHA-256 does not start with 6726825d (the public file's) loads with a warning."""
    path = Path(path)
    where = f"download {WEIGHTS_NAME} from {WEIGHTS_URL} and pass it with --inception"
    if not path.is_file():
        raise EvaluationError(f"Inception weights not found at {path}: {where}")
    digest = file_sha256(path)
    if not digest.startswith(WEIGHTS_SHA256_PREFIX):
        warnings.warn(f"{path.name} (SHA-256 {digest[:16]}...) is not the public {WEIGHTS_NAME}: its numbers are "
                      "not comparable with published FID / IS")
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as error:                                   # pickle, zip or format errors
        raise EvaluationError(f"{path} is not a PyTorch state dict ({type(error).__name__}): {where}") from None
    if not isinstance(state, dict) or not all(torch.is_tensor(v) for v in state.values()):
        raise EvaluationError(f"{path} holds no plain state dict of tensors: {where}")
    net = FIDInception()
    expected = net.state_dict()
    missing, unexpected = sorted(set(expected) - set(state)), sorted(set(state) - set(expected))
    wrong = sorted(k for k in set(expected) & set(state) if state[k].shape != expected[k].shape)
    if missing or unexpected or wrong:
        first = (missing or unexpected or wrong)[0]
        raise EvaluationError(f"{path} is not the pt_inception layout ({len(missing)} keys missing, {len(unexpected)} "
                              f"unexpected, {len(wrong)} of another shape, e.g. {first}): {where}")
    net.load_state_dict(state, strict=True)
    net.weights_sha256 = digest
    return net.eval().to(device or "cpu")


def network_key(net: FIDInception) -> str:
    """SHA-256 of the weights file the network was loaded from (else of its tensors)."""
    key = getattr(net, "weights_sha256", None)
    if key is None:
        digest = hashlib.sha256()
        for name, tensor in net.state_dict().items():
            digest.update(name.encode())
            digest.update(tensor.detach().cpu().contiguous().numpy().tobytes())
        key = digest.hexdigest()
    return key


def _check_images(images, what: str = "images") -> None:
    shape, dtype = tuple(images.shape), images.dtype
    if len(shape) != 4 or shape[-1] != 3 or dtype not in (np.uint8, torch.uint8):
        raise EvaluationError(f"{what} must be uint8 [N x H x W x 3] (NHWC, 0..255), got {dtype} {shape}")
    if shape[1] < 1 or shape[2] < 1:
        raise EvaluationError(f"{what} have no pixels ({shape[1]} x {shape[2]})")


@torch.no_grad()
def _features_of_batches(net: FIDInception, batches: Iterable, progress=None) -> Dict[str, np.ndarray]:
    device = next(net.parameters()).device
    parts = {name: [] for name in FEATURE_WIDTHS}
    for batch in batches:
        x = torch.as_tensor(batch).to(device).permute(0, 3, 1, 2).float()
        out = net(x)
        for name in parts:
            parts[name].append(out[name].float().cpu().numpy())
        if progress is not None:
            progress.update(len(batch))
    features = {name: np.concatenate(values) for name, values in parts.items()}
    for name, width in FEATURE_WIDTHS.items():
        assert features[name].shape[1:] == (width,), (name, features[name].shape)
        if not np.isfinite(features[name]).all():
            raise EvaluationError(f"the Inception network produced NaN or infinite {name} features: check the weights file")
    return features


def inception_features(net: FIDInception, images, batch_size: int = 64, progress: bool = False) -> Dict[str, np.ndarray]:
    """Features of uint8 images [N x H x W x 3] (numpy or tensor, any size; resized to 299 as TF1 does):
    dict ``pool`` [N x 2048], ``spatial`` [N x 2023], ``logits`` [N x 1008] (bias-free), float32 numpy.
    Batches of ``batch_size`` run on the network's device under ``torch.no_grad``."""
    _check_images(images)
    bar = _progress(len(images), "features") if progress else None
    try:
        return _features_of_batches(net, (images[i:i + batch_size] for i in range(0, len(images), batch_size)), bar)
    finally:
        if bar is not None:
            bar.close()


def _progress(total: int, desc: str):
    from tqdm import tqdm
    return tqdm(total=total, desc=desc, unit="img", file=sys.stderr, dynamic_ncols=True)


# -- npz files ------------------------------------------------------------------------------------

class NpzImages:
    """``arr_0`` of an npz, read in batches straight from the zip member (50k x 256 x 256 x 3 never has
    to be in memory at once); ``shape`` and ``dtype`` come from the .npy header."""

    def __init__(self, path):
        self.path = Path(path)
        if not self.path.is_file():
            raise EvaluationError(f"{self.path} not found")
        try:
            with zipfile.ZipFile(self.path) as archive:
                names = archive.namelist()
                if "arr_0.npy" not in names:
                    raise EvaluationError(f"{self.path} has no arr_0 (keys: {', '.join(n[:-4] for n in names) or 'none'}); "
                                          "the evaluator reads the images from arr_0, as the official samplers write them")
                with archive.open("arr_0.npy") as member:
                    self.shape, self.fortran, self.dtype, self.offset = _npy_header(member)
        except zipfile.BadZipFile:
            raise EvaluationError(f"{self.path} is not an npz file (np.savez / np.savez_compressed)") from None
        _check_images(self, f"arr_0 of {self.path.name}")

    def __len__(self) -> int:
        return self.shape[0]

    def batches(self, batch_size: int):
        per_image = int(np.prod(self.shape[1:])) * self.dtype.itemsize
        with zipfile.ZipFile(self.path) as archive, archive.open("arr_0.npy") as member:
            if self.fortran:                                      # rare: read whole, then batch
                member.seek(0)
                images = np.lib.format.read_array(member)
                for start in range(0, len(images), batch_size):
                    yield np.ascontiguousarray(images[start:start + batch_size])
                return
            member.read(self.offset)
            for start in range(0, len(self), batch_size):
                count = min(batch_size, len(self) - start)
                data = member.read(count * per_image)
                if len(data) != count * per_image:
                    raise EvaluationError(f"{self.path} is truncated: arr_0 ends before image {start + len(data) // per_image}")
                yield np.frombuffer(bytearray(data), dtype=self.dtype).reshape((count,) + tuple(self.shape[1:]))


def _npy_header(member):
    version = np.lib.format.read_magic(member)
    if version == (1, 0):
        shape, fortran, dtype = np.lib.format.read_array_header_1_0(member)
    else:
        shape, fortran, dtype = np.lib.format.read_array_header_2_0(member)
    return shape, fortran, dtype, member.tell()


def _npz_keys(path) -> list:
    try:
        with np.load(path) as data:
            return list(data.files)
    except (OSError, ValueError, zipfile.BadZipFile):
        raise EvaluationError(f"{path} is not a readable npz file") from None


def _cache_path(path: Path, file_key: str, net_key: str) -> Path:
    return path.with_name(f"{path.stem}.inception-{file_key[:16]}-{net_key[:16]}.npz")


def read_activations(npz_path, net: FIDInception, batch_size: int = 64, cache: bool = True,
                     progress: bool = False) -> Dict[str, np.ndarray]:
    """Features of ``arr_0`` of an npz (``pool``, ``spatial``, ``logits``), reusing or writing the cache
    beside the file (keyed by the SHA-256 of the file and of the network's weights)."""
    images = NpzImages(npz_path)
    cached = None
    if cache:
        cached = _cache_path(images.path, file_sha256(images.path), network_key(net))
        if cached.is_file():
            try:
                with np.load(cached) as data:
                    features = {name: data[name] for name in FEATURE_WIDTHS}
                if all(f.shape == (len(images), FEATURE_WIDTHS[n]) for n, f in features.items()):
                    return features
            except (OSError, KeyError, ValueError, zipfile.BadZipFile):
                pass                                                 # unreadable cache: recompute
    bar = _progress(len(images), f"Inception features of {images.path.name}") if progress else None
    try:
        features = _features_of_batches(net, images.batches(batch_size), bar)
    finally:
        if bar is not None:
            bar.close()
    if cached is not None:
        try:
            with atomic_write(cached) as f:
                np.savez(f, **features)
        except OSError as error:
            warnings.warn(f"could not write the feature cache {cached} ({error.strerror}); continuing without it")
    return features


def stored_statistics(npz_path):
    """The file's precomputed ((mu, sigma), (mu_s, sigma_s)) with their dtypes, or None when it holds no
    ``mu`` (``mu`` without the other three is an error: the official evaluator stops with KeyError)."""
    keys = _npz_keys(npz_path)
    if "mu" not in keys:
        return None
    absent = [k for k in STATISTICS_KEYS if k not in keys]
    if absent:
        raise EvaluationError(f"{npz_path} has precomputed mu but no {', '.join(absent)} (the official evaluator stops "
                              f"with KeyError here): store all of {', '.join(STATISTICS_KEYS)}, or none")
    with np.load(npz_path) as data:
        stats = {k: data[k] for k in STATISTICS_KEYS}
    for mu, sigma in (("mu", "sigma"), ("mu_s", "sigma_s")):
        width = stats[mu].shape[0] if stats[mu].ndim == 1 else -1
        if stats[sigma].shape != (width, width):
            raise EvaluationError(f"{npz_path}: {mu} / {sigma} must be [D] / [D x D] (2048 for mu, 2023 for mu_s), "
                                  f"got {stats[mu].shape} / {stats[sigma].shape}")
        if not (np.isfinite(stats[mu]).all() and np.isfinite(stats[sigma]).all()):
            raise EvaluationError(f"{npz_path}: {mu} or {sigma} contains NaN or infinite values")
    return (stats["mu"], stats["sigma"]), (stats["mu_s"], stats["sigma_s"])


def read_statistics(npz_path, activations: Dict[str, np.ndarray]):
    """((mu, sigma) of pool, (mu, sigma) of spatial), as the official ``read_statistics``: the file's
    precomputed ``mu, sigma, mu_s, sigma_s`` when it holds ``mu`` (dtypes kept, ``activations`` unused),
    else the statistics of ``activations`` (float32 mu, float64 sigma)."""
    stored = stored_statistics(npz_path)
    if stored is not None:
        return stored
    return statistics(activations["pool"]), statistics(activations["spatial"])


# -- the evaluation -------------------------------------------------------------------------------

def evaluate_npz(ref_npz, sample_npz, inception_path=None, device=None, batch_size: int = 64, cache: bool = True,
                 progress: bool = False, net: Optional[FIDInception] = None) -> Dict[str, float]:
    """The official evaluation of ``sample_npz`` against ``ref_npz`` -> dict ``fid, sfid, inception_score,
    precision, recall`` (module docstring). ``net``: an already loaded network instead of ``inception_path``."""
    stored = {}
    for path, what in ((ref_npz, "reference"), (sample_npz, "sample")):   # every file check before any work
        count = len(NpzImages(path))
        if count < NEIGHBOURHOOD + 1:
            raise EvaluationError(f"the {what} file {path} holds {count} images; precision/recall (k = "
                                  f"{NEIGHBOURHOOD}) need at least {NEIGHBOURHOOD + 1}")
        stored[what] = stored_statistics(path)
    if net is None:
        net = load_inception(inception_path, device)
    ref_acts = read_activations(ref_npz, net, batch_size, cache, progress)
    sample_acts = read_activations(sample_npz, net, batch_size, cache, progress)
    ref_pool_stats, ref_spatial_stats = stored["reference"] or (statistics(ref_acts["pool"]),
                                                                statistics(ref_acts["spatial"]))
    sample_pool_stats, sample_spatial_stats = stored["sample"] or (statistics(sample_acts["pool"]),
                                                                   statistics(sample_acts["spatial"]))
    result = {"inception_score": inception_score(sample_acts["logits"]),
              "fid": frechet_distance(*sample_pool_stats, *ref_pool_stats),
              "sfid": frechet_distance(*sample_spatial_stats, *ref_spatial_stats)}
    result["precision"], result["recall"] = precision_recall(ref_acts["pool"], sample_acts["pool"],
                                                             device=next(net.parameters()).device)
    return result


def official_printout(result: Dict[str, float]) -> str:
    """The five lines ``evaluator.py`` prints."""
    return "\n".join([f"Inception Score: {result['inception_score']}", f"FID: {result['fid']}",
                      f"sFID: {result['sfid']}", f"Precision: {result['precision']}", f"Recall: {result['recall']}"])


def result_path(sample_npz) -> Path:
    sample_npz = Path(sample_npz)
    return sample_npz.with_name(sample_npz.stem + ".evaluation.json")


# -- bench ----------------------------------------------------------------------------------------

def _peak_rss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024          # Linux: KiB


def _rss_mb() -> float:
    try:
        return int(Path("/proc/self/statm").read_text().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 2 ** 20
    except (OSError, ValueError):
        return _peak_rss_mb()


def _load_average() -> Optional[float]:
    try:
        return round(os.getloadavg()[0], 2)
    except OSError:
        return None


def bench_precision_recall(n: int, dim: int = 2048, device: str = "cpu", seed: int = 0) -> dict:
    """Time and peak memory of ``precision_recall`` on two random feature sets [n x dim] (run it in a fresh
    process for an honest peak: ``python -m sag.evaluate --bench-pr N``)."""
    generator = torch.Generator().manual_seed(seed)
    ref = torch.rand(n, dim, generator=generator).mul_(6).relu_()
    sample = torch.rand(n, dim, generator=generator).mul_(6).relu_()
    if device.startswith("cuda"):
        torch.cuda.reset_peak_memory_stats()
    before = _rss_mb()                    # resident now, with both feature sets in memory
    start = time.perf_counter()
    precision_recall(ref.to(device), sample.to(device), device=device)
    if device.startswith("cuda"):
        torch.cuda.synchronize()
    out = {"n": n, "dim": dim, "device": device, "seconds": round(time.perf_counter() - start, 2),
           "features_mb": round(2 * n * dim * 4 / 2 ** 20, 1), "peak_rss_mb": round(_peak_rss_mb(), 1),
           "peak_rss_above_inputs_mb": round(_peak_rss_mb() - before, 1), "load_average": _load_average()}
    if device.startswith("cuda"):
        out["peak_cuda_allocated_mb"] = round(torch.cuda.max_memory_allocated() / 2 ** 20, 1)
    return out


def bench(device: str = "cpu", batch_size: int = 64, images: int = 128, size: int = 256, pr_sizes=(10_000,),
          inception_path=None, log=print) -> dict:
    """images/s of feature extraction (random weights unless ``inception_path``; speed does not depend
    on the values) and time / peak memory of precision/recall, each P/R size in a fresh process."""
    torch.set_flush_denormal(True)
    net = load_inception(inception_path, device) if inception_path else FIDInception().eval().to(device)
    batch = torch.randint(0, 256, (batch_size, size, size, 3), dtype=torch.uint8, generator=torch.Generator().manual_seed(0))
    inception_features(net, batch[:2], batch_size)                                     # warm-up
    if device.startswith("cuda"):
        torch.cuda.synchronize()
    start, done = time.perf_counter(), 0
    while done < images:
        inception_features(net, batch, batch_size)
        done += batch_size
    if device.startswith("cuda"):
        torch.cuda.synchronize()
    seconds = time.perf_counter() - start
    result = {"device": device, "cpu": _cpu_name(), "threads": torch.get_num_threads(), "load_average": _load_average(),
              "features": {"images": done, "image_size": size, "resized_to": INPUT_SIZE, "batch_size": batch_size,
                           "seconds": round(seconds, 2), "images_per_s": round(done / seconds, 2),
                           "hours_for_60k": round(60_000 / (done / seconds) / 3600, 2)},
              "precision_recall": []}
    log(json.dumps(dict(result["features"], cpu=result["cpu"], threads=result["threads"],
                        load_average=_load_average())))
    for n in pr_sizes:
        command = [sys.executable, "-m", "sag.evaluate", "--bench-pr", str(n), "--device", device]
        run = subprocess.run(command, capture_output=True, text=True, env=dict(os.environ))
        line = run.stdout.strip().splitlines()[-1] if run.returncode == 0 and run.stdout.strip() else None
        entry = json.loads(line) if line else {"n": n, "error": (run.stderr.strip().splitlines() or ["?"])[-1]}
        result["precision_recall"].append(entry)
        log(json.dumps(entry))
    return result


def _cpu_name() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    import platform
    return platform.processor() or platform.machine()


# -- command line ---------------------------------------------------------------------------------

def _one_line_warnings(message, category, filename, lineno, file=None, line=None):
    print(f"warning: {message}", file=sys.stderr if file is None else file)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="python -m sag.evaluate", description=__doc__.splitlines()[0])
    parser.add_argument("ref_npz", nargs="?", help="reference batch (arr_0 uint8 NHWC; optional mu, sigma, mu_s, sigma_s)")
    parser.add_argument("sample_npz", nargs="?", help="samples (arr_0 uint8 NHWC), e.g. what sag-sample writes")
    parser.add_argument("--inception", help=f"path of {WEIGHTS_NAME} ({WEIGHTS_URL})")
    parser.add_argument("--device", default=None, help="cpu, cuda, cuda:1, ... (default: cuda if available)")
    parser.add_argument("--batch-size", type=int, default=64, help="images per network forward (default 64)")
    parser.add_argument("--no-cache", action="store_true", help="neither read nor write feature caches beside the npz files")
    parser.add_argument("--out", default=None, help="result JSON (default: <samples>.evaluation.json beside the samples)")
    parser.add_argument("--bench", action="store_true", help="measure feature extraction and precision/recall memory")
    parser.add_argument("--bench-images", type=int, default=128, help="--bench: images to time (default 128)")
    parser.add_argument("--bench-pr-sizes", default="10000", help="--bench: comma-separated P/R set sizes (default 10000)")
    parser.add_argument("--bench-pr", type=int, default=None, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    warnings.showwarning = _one_line_warnings
    device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    try:
        if args.bench_pr is not None:
            print(json.dumps(bench_precision_recall(args.bench_pr, device=device)))
            return 0
        if args.bench:
            sizes = [int(s) for s in args.bench_pr_sizes.split(",") if s]
            bench(device, args.batch_size, args.bench_images, pr_sizes=sizes, inception_path=args.inception)
            return 0
        if not (args.ref_npz and args.sample_npz and args.inception):
            raise EvaluationError("usage: python -m sag.evaluate REF.npz SAMPLES.npz --inception "
                                  f"{WEIGHTS_NAME} (published at {WEIGHTS_URL})")
        if args.batch_size < 1:
            raise EvaluationError(f"--batch-size must be >= 1, got {args.batch_size}")
        start = time.time()
        result = evaluate_npz(args.ref_npz, args.sample_npz, args.inception, device=device, batch_size=args.batch_size,
                              cache=not args.no_cache, progress=True)
        print("Computing evaluations...")
        print(official_printout(result))
        record = dict(result, reference=str(args.ref_npz), samples=str(args.sample_npz),
                      inception=str(args.inception), device=device, seconds=round(time.time() - start, 1),
                      command="python -m sag.evaluate " + " ".join(argv if argv is not None else sys.argv[1:]))
        out = Path(args.out) if args.out else result_path(args.sample_npz)
        write_json(out, record)
        print(f"wrote {out}", file=sys.stderr)
        return 0
    except (EvaluationError, MetricInputError) as error:
        print(f"error: {error}", file=sys.stderr)
        return 2
    except (OSError, MemoryError) as error:
        print(f"error: {type(error).__name__}: {error}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
