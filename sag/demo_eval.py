"""Measuring the demo model: a Frechet distance in the feature space of a small shape classifier.

    python -m sag.demo_eval --num 1000 --respacing ddim25 --ddim --threads 2 --out demo_eval.json

FID's Inception network knows nothing of 32 px procedural shapes, so the features here come from a
small CNN (``FeatureNet``) trained on ``sag.demo_data`` to name the largest shape (circle, square,
triangle, stripes); its penultimate layer (64 values) is the feature space. The weights are
``sag/assets/demo_features.pt`` (``--train_features`` re-trains them, a few minutes on one thread).

Rows: no guidance, SAG at several scales, blur guidance; every row uses the same seeds (sample i
starts from seed i), so the rows differ only by the guidance. The reference is ``--num`` held-out
data images (``demo_data`` seed 1; training used seed 0). A "data vs data" row (two disjoint
held-out sets of the same size) shows the distance expected from sampling noise alone.

    FD = |mu_1 - mu_2|^2 + tr(S_1 + S_2 - 2 (S_1 S_2)^(1/2))          (float64, scipy.linalg.sqrtm)

The Frechet distance (and the Inception Score / precision-recall helpers) are ``sag.metrics``, the
functions ``python -m sag.evaluate`` uses for the ADM evaluator's numbers; only the feature network differs.
"""
from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F

from . import demo_data, metrics
from .metrics import frechet_distance  # the ADM evaluator's rule, shared with sag.evaluate

REFERENCE_SEED = 1          # held-out data: training used demo_data seed 0


class FeatureNet(nn.Module):
    """A small CNN classifier of the largest shape; ``features`` is its 64-d penultimate layer."""

    def __init__(self, width: int = 32, features: int = 64):
        super().__init__()
        self.body = nn.Sequential(
            nn.Conv2d(3, width, 3, padding=1), nn.ReLU(), nn.Conv2d(width, width, 3, padding=1), nn.ReLU(),
            nn.MaxPool2d(2),                                                                  # 16
            nn.Conv2d(width, 2 * width, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2),            # 8
            nn.Conv2d(2 * width, 2 * width, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2),        # 4
            nn.Flatten(), nn.Linear(2 * width * 16, features), nn.ReLU())
        self.head = nn.Linear(features, demo_data.NUM_CLASSES)

    def features(self, x: torch.Tensor) -> torch.Tensor:
        return self.body(x)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.body(x))


def train_features(out, minutes: float = 3.0, seed: int = 0, batch_size: int = 128, threads: int = 1,
                   resume_from=None, first_step: int = 0, lr: float = 1e-3) -> dict:
    """Train ``FeatureNet`` on fresh procedural batches (demo_data seed 2) for a wall-clock budget.

    ``resume_from``: weights to continue from; ``first_step``: batch index to continue the data at."""
    torch.set_num_threads(threads)
    torch.manual_seed(seed)
    net = FeatureNet()
    if resume_from is not None:
        net.load_state_dict(torch.load(resume_from, map_location="cpu", weights_only=True))
    optimizer = torch.optim.Adam(net.parameters(), lr=lr)
    start, step = time.time(), first_step
    while time.time() - start < minutes * 60:
        x, y = demo_data.batch(range(step * batch_size, (step + 1) * batch_size), seed=2)
        loss = F.cross_entropy(net(x), y)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        step += 1
    net.eval()
    x, y = demo_data.batch(range(2000), seed=REFERENCE_SEED + 100)
    with torch.no_grad():
        accuracy = (net(x).argmax(1) == y).float().mean().item()
    torch.save({k: v.detach().clone() for k, v in net.state_dict().items()}, out)
    return {"steps": step, "resumed_from_step": first_step, "batch_size": batch_size, "wall_time_s": round(time.time() - start, 1),
            "held_out_accuracy": round(accuracy, 4)}


def load_features(path=None) -> FeatureNet:
    from .demo import FEATURES_PATH
    net = FeatureNet()
    net.load_state_dict(torch.load(path or FEATURES_PATH, map_location="cpu", weights_only=True))
    return net.eval()


@torch.no_grad()
def embed(net: FeatureNet, images: torch.Tensor, batch_size: int = 500) -> np.ndarray:
    """Features [N x 64] (float64) of images [N x 3 x 32 x 32] in [-1, 1]."""
    return np.concatenate([net.features(images[i:i + batch_size].float()).double().numpy()
                           for i in range(0, len(images), batch_size)])


def statistics(features: np.ndarray):
    """Mean [D] and covariance [D x D] (unbiased) of features [N x D], float64 (``sag.metrics.statistics``
    on float64 features)."""
    return metrics.statistics(np.asarray(features, dtype=np.float64))


def default_rows():
    """(name, guidance) for every row of the table; the SAG rows use ``DEMO_SAG``'s site and blur."""
    from dataclasses import replace
    from .demo import DEMO_SAG
    from .guidance import blur_guidance
    rows = [("no guidance", None)]
    rows += [(f"SAG s={s}", replace(DEMO_SAG, scale=s)) for s in (0.1, 0.3, 0.6, 1.0)]
    rows += [("blur guidance s=0.3", blur_guidance(0.3, DEMO_SAG.blur_sigma, kernel_size=DEMO_SAG.kernel_size))]
    return rows


def generate_samples(loaded, guidance, num: int, batch_size: int, first_seed: int = 0,
                     use_ddim: bool = False) -> torch.Tensor:
    from .sampling import sample
    out = []
    for start in range(first_seed, first_seed + num, batch_size):
        seeds = list(range(start, min(start + batch_size, first_seed + num)))
        out.append(sample(loaded.model, loaded.diffusion, (len(seeds), 3, 32, 32), guidance=guidance, seed=seeds,
                          use_ddim=use_ddim))
    return torch.cat(out)


def evaluate(num: int = 1000, respacing: str = "50", batch_size: int = 100, rows=None, out=None,
             threads: int = 1, grid_dir=None, log=print, use_ddim: bool = False) -> dict:
    from .demo import load_demo
    torch.set_num_threads(threads)
    net = load_features()
    reference, _ = demo_data.batch(range(num), seed=REFERENCE_SEED)
    second, _ = demo_data.batch(range(num, 2 * num), seed=REFERENCE_SEED)
    ref_stats = statistics(embed(net, reference))
    sampler = "DDIM, eta 0" if use_ddim else "ancestral (DDPM), learned variance"
    result = {"num": num, "respacing": respacing, "sampler": sampler, "seeds": [0, num - 1],
              "reference": f"demo_data seed {REFERENCE_SEED}, indices 0..{num - 1}", "rows": []}
    if out and Path(out).is_file():                          # resume: keep rows already measured
        old = json.loads(Path(out).read_text())
        if old.get("num") == num and old.get("respacing") == respacing and old.get("sampler") == sampler:
            result["rows"] = old["rows"]
    done = {row["name"] for row in result["rows"]}
    if "data vs data" not in done:
        fd = frechet_distance(*ref_stats, *statistics(embed(net, second)))
        result["rows"].insert(0, {"name": "data vs data", "fd": fd, "seconds": 0.0})
    loaded = load_demo(timestep_respacing=respacing)
    for name, guidance in (rows or default_rows()):
        if name in done:
            continue
        start = time.time()
        images = generate_samples(loaded, guidance, num, batch_size, use_ddim=use_ddim)
        fd = frechet_distance(*ref_stats, *statistics(embed(net, images)))
        with torch.no_grad():
            labels = net(images).argmax(1).bincount(minlength=demo_data.NUM_CLASSES).tolist()
        row = {"name": name, "fd": fd, "seconds": round(time.time() - start, 1), "class_counts": labels,
               "guidance": None if guidance is None else {k: getattr(guidance, k) for k in
                                                          ("scale", "blur_sigma", "site", "kernel_size", "blur_everywhere")}}
        result["rows"].append(row)
        log(f"{name}: FD {fd:.3f} ({row['seconds']} s)")
        if grid_dir:
            Path(grid_dir).mkdir(parents=True, exist_ok=True)
            demo_data.grid(images[:64], 8, scale=2).save(Path(grid_dir) / (name.replace(" ", "_").replace("=", "") + ".png"))
        if out:
            Path(out).write_text(json.dumps(result, indent=1) + "\n")
    return result


def markdown(result: dict) -> str:
    lines = [f"| guidance | FD (features of the demo shape classifier, {result['num']} samples, "
             f"{result['respacing']} steps, {result['sampler']}) |", "|---|---:|"]
    lines += [f"| {row['name']} | {row['fd']:.3f} |" for row in result["rows"]]
    return "\n".join(lines)


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--num", type=int, default=1000, help="samples per row (and reference images)")
    parser.add_argument("--respacing", default="50", help="timestep respacing of the demo process (the demo default: 50)")
    parser.add_argument("--ddim", action="store_true", help="DDIM (eta 0) instead of the ancestral sampler")
    parser.add_argument("--batch_size", type=int, default=100)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--out", default="", help="JSON of the results (rows already in it are kept)")
    parser.add_argument("--rows", default="", help="comma-separated row numbers of the default table to run "
                        "(0 = no guidance, 1-4 = SAG 0.1/0.3/0.6/1.0, 5 = blur 0.3); default all")
    parser.add_argument("--merge", nargs="*", default=[], help="only merge these result JSONs into --out and print the table")
    parser.add_argument("--grids", default="", help="folder for 8 x 8 sample grids of every row")
    parser.add_argument("--train_features", type=float, default=0.0, metavar="MINUTES",
                        help="(re-)train the feature network for MINUTES and save it to sag/assets/demo_features.pt first")
    args = parser.parse_args(argv)
    if args.merge:
        parts = [json.loads(Path(p).read_text()) for p in args.merge]
        order = ["data vs data"] + [name for name, _ in default_rows()]
        rows = {row["name"]: row for part in parts for row in part["rows"]}
        result = dict(parts[0], rows=[rows[n] for n in order if n in rows])
        if args.out:
            Path(args.out).write_text(json.dumps(result, indent=1) + "\n")
        print(markdown(result))
        return
    if args.train_features:
        from .demo import FEATURES_PATH
        print(json.dumps(train_features(FEATURES_PATH, args.train_features, threads=args.threads)), flush=True)
    rows = default_rows()
    if args.rows:
        rows = [rows[int(i)] for i in args.rows.split(",")]
    result = evaluate(args.num, args.respacing, args.batch_size, rows=rows, out=args.out or None, threads=args.threads,
                      grid_dir=args.grids or None, log=lambda s: print(s, flush=True), use_ddim=args.ddim)
    print(markdown(result))
    print("\ncommand: python -m sag.demo_eval " + " ".join(argv if argv is not None else sys.argv[1:]))


if __name__ == "__main__":
    main()
