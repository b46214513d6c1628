"""``torchrun --nproc_per_node 2 -m sag.sample`` (gloo on CPU) gives the images of one process.

Rank r draws the samples i with i % 2 == r, each from its own seed, writes shards, and rank 0 merges
them, so the npz matches a one-process run up to float rounding of batched kernels (<= 1 uint8
level). Launched as ``python -m torch.distributed.run --standalone`` (a free local port).
"""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from sag.sample import main

FIXTURES = Path(__file__).parent / "fixtures" / "official"
REPO = Path(__file__).resolve().parents[1]
# What torchrun prints when it cannot set up its rendezvous (no local sockets in a sandbox).
_LAUNCH_FAILURES = ("RendezvousConnectionError", "RendezvousError", "DistNetworkError", "Address family not supported",
                    "Operation not permitted", "Cannot assign requested address", "errno: 97", "errno: 99")


def _args(out, batch_size):
    flags = json.loads((FIXTURES / "adm_uncond" / "config.json").read_text())["official_flags"]
    args = ["--model_path", str(FIXTURES / "adm_uncond" / "model.pt")]
    for name, value in flags.items():
        if name not in ("batch_size", "use_ddim", "clip_denoised", "timestep_respacing", "classifier_guidance"):
            args += [f"--{name}", str(value)]
    return args + ["--timestep_respacing", "3", "--num_samples", "4", "--batch_size", str(batch_size),
                   "--out", str(out), "--no-progress"]


def test_two_gloo_ranks_match_one_process(tmp_path):
    one, two = tmp_path / "one", tmp_path / "two"
    env = dict(os.environ, OMP_NUM_THREADS="1",
               PYTHONPATH=str(REPO) + os.pathsep + os.environ.get("PYTHONPATH", ""))
    for name in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT"):
        env.pop(name, None)
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
           "-m", "sag.sample", *_args(two, batch_size=1)]
    proc = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=300)
    if proc.returncode != 0 and any(s in proc.stderr for s in _LAUNCH_FAILURES) and not (two / "shards").exists():
        pytest.skip(f"torchrun could not start 2 local processes here: {proc.stderr.strip().splitlines()[-1]}")
    assert proc.returncode == 0, proc.stderr
    assert main(_args(one, batch_size=2)) == 0

    npz = "samples_4x32x32x3.npz"
    a = np.load(one / npz)["arr_0"].astype(int)
    b = np.load(two / npz)["arr_0"].astype(int)
    assert a.shape == b.shape == (4, 32, 32, 3)
    diff = np.abs(a - b)
    assert diff.max() <= 1 and (diff > 0).mean() < 1e-3
    side = json.loads((two / "samples.json").read_text())
    assert side["world_size"] == 2 and side["seeds"]["last_index"] == 3
    assert not (two / "shards").exists()
    assert proc.stdout.count("sag-sample: wrote") == 1                 # rank 0 alone reports
