"""``python -m sag.bench`` (sag/bench.py): the report's structure and its one-line errors.

Benchmarks measure, tests never time: nothing here asserts a speed, only that every method was run
and reported with positive times and ratios, on a smoke-sized model, one repeat, no warmup.
"""
from __future__ import annotations

import contextlib
import io
import json

import pytest

from sag.bench import CORE_METHODS, main


@pytest.fixture(scope="module")
def report():
    out = io.StringIO()
    with contextlib.redirect_stdout(out):
        assert main(["--tiny", "--repeats", "1", "--warmup", "0", "--micro-repeats", "1", "--json"]) == 0
    return json.loads(out.getvalue())


def test_every_method_is_reported(report):
    assert set(report["methods"]) == set(CORE_METHODS)     # the tiny 64x64 kind is class-conditional: cfg runs
    for name, m in report["methods"].items():
        assert m["ms"] > 0 and m["min_ms"] > 0, name
        assert m["ratio"] > 0 and m["ratio_paired"] > 0 and m["ratio_of_mins"] > 0, name
        assert len(m["times_ms"]) == 1
        assert m["peak_mem_mb"] is not None and m["peak_mem_mb"] >= 0, name
        assert m["host_syncs"] is None                          # counted on CUDA only
        # Throughput of a whole run at this step's cost, and the counted FLOPs (no known CPU peak).
        assert m["images_per_s"] == pytest.approx(report["batch"] / (m["ms"] / 1e3 * report["num_timesteps"]))
        assert m["gflop_per_step"] > 0 and m["tflops_per_s"] > 0 and m["fraction_of_peak"] is None
    assert report["peak_tflops"] is None
    # Two passes of B cost about twice one pass of B (the first pass is the same in both).
    flops = {name: m["gflop_per_step"] for name, m in report["methods"].items()}
    assert 1.9 < flops["sag"] / flops["unguided"] < 2.2 and 1.9 < flops["blur"] / flops["unguided"] < 2.1
    assert report["methods"]["unguided"]["ratio"] == 1.0
    assert report["methods"]["official_like"]["fused_attention"] is False
    assert report["methods"]["plain_eager"]["fused_attention"] is False


def test_comparisons_targets_and_micro_benchmarks(report):
    assert report["comparisons"]["sag_vs_official_like"] > 0
    assert report["comparisons"]["unguided_vs_plain_eager"] > 0
    assert set(report["targets"]) == {"sag_ratio_le_2.03", "blur_ratio_le_2.03", "pag_le_sag", "seg_le_sag",
                                      "unguided_le_plain_eager", "sag_faster_than_official_like",
                                      "sag_vs_official_like_le_0.9"}
    assert all(isinstance(v, bool) for v in report["targets"].values())
    # The plain eager baseline runs the same function as the U-Net's default (explicit) path.
    assert report["checks"]["plain_eager_vs_unet_max_abs_diff"] == 0.0
    attention, blur = report["micro"]["attention"], report["micro"]["blur"]
    assert attention["explicit_ms"] > 0 and attention["fused_ms"] > 0 and attention["max_abs_diff"] < 1e-4
    assert blur["separable_ms"] > 0 and blur["conv2d_ms"] > 0 and blur["max_abs_diff"] < 1e-5
    assert report["device"] == "cpu" and report["batch"] == 2 and report["repeats"] == 1


def test_text_report_and_errors(capsys):
    assert main(["--tiny", "--repeats", "1", "--warmup", "0", "--micro-repeats", "1", "--no-memory",
                 "--methods", "sag,seg", "--peak-tflops", "2.5"]) == 0
    out = capsys.readouterr().out
    assert "unguided" in out and "sag" in out and "seg" in out and "micro-benchmarks" in out
    assert "img/s" in out and "of peak: against 2.5 TFLOP/s" in out
    assert main(["--tiny", "--dtype", "float16"]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("sag.bench: error: --dtype float16: float16 needs a CUDA device") and "\n" not in err
    assert main(["--config", "no_such_model"]) == 2
    assert "unknown preset" in capsys.readouterr().err
    assert main(["--tiny", "--methods", "sag,warp"]) == 2
    assert "unknown method(s) warp" in capsys.readouterr().err


def test_bfloat16_on_the_cpu_runs_ours_under_autocast_and_official_like_in_float32():
    """``--dtype bf16`` runs on the CPU: our methods under bfloat16 autocast, the official-like row in
    float32 (the official code has no CPU mixed precision), with the bfloat16 target against it."""
    out = io.StringIO()
    with contextlib.redirect_stdout(out):
        assert main(["--tiny", "--dtype", "bf16", "--repeats", "1", "--warmup", "0", "--micro-repeats", "1",
                     "--no-memory", "--methods", "sag,official_like", "--json"]) == 0
    report = json.loads(out.getvalue())
    dtypes = {name: m["dtype"] for name, m in report["methods"].items()}
    assert dtypes == {"unguided": "bfloat16", "sag": "bfloat16", "official_like": "float32"}
    assert "sag_vs_official_like_le_0.55" in report["targets"] and "sag_vs_official_like_le_0.9" not in report["targets"]
    assert report["device_name"] and isinstance(report["cpu_bf16_flags"], list)
