"""``python -m sag.evaluate`` end to end on the official e2e pair (tests/fixtures/official/evaluator/e2e):
the network on 88 images, then IS, FID, sFID, precision and recall against the unmodified evaluator's
numbers. Separate from test_evaluate.py because each 2048-d ``scipy.linalg.sqrtm`` (the official Frechet
rule) takes ~30 s on 2 cores; this file runs in about a minute and a half."""
import json
import warnings

import numpy as np
import pytest
import torch

from sag import evaluate

from test_evaluate import EVALUATOR, config, random_inception_state


def test_cli_reproduces_the_official_evaluation(tmp_path, capsys, one_thread):
    for name in ("ref.npz", "sample.npz"):
        (tmp_path / name).write_bytes((EVALUATOR / "e2e" / name).read_bytes())
    weights = tmp_path / "inception_random.pth"
    torch.save(random_inception_state(), weights)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        code = evaluate.main([str(tmp_path / "ref.npz"), str(tmp_path / "sample.npz"), "--inception", str(weights),
                              "--batch-size", "20"])
    out = capsys.readouterr().out.splitlines()
    assert code == 0
    expected = config("e2e")["plain"]
    written = json.loads((tmp_path / "sample.evaluation.json").read_text())
    printed = dict(line.split(": ") for line in out[-5:])
    assert list(printed) == ["Inception Score", "FID", "sFID", "Precision", "Recall"]
    for key, label in (("inception_score", "Inception Score"), ("fid", "FID"), ("sfid", "sFID")):
        assert written[key] == pytest.approx(expected[key], rel=1e-3) and float(printed[label]) == written[key]
    assert (written["precision"], written["recall"]) == (expected["precision"], expected["recall"])    # exact
    assert len(list(tmp_path.glob("*.inception-*.npz"))) == 2                 # both feature sets cached
