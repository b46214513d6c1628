"""``python -m sag.bench --sd`` / ``python -m sag.sd.bench`` (sag/sd/bench.py) on a smoke-sized SD-1.5-structured
U-Net: every method is reported with its ratio to CFG and the targets are evaluated. Structure only (no timing
is asserted: the numbers depend on the machine and its load)."""
from __future__ import annotations

import json

import pytest

from sag.bench import main

pytestmark = pytest.mark.usefixtures("one_thread")


def test_sd_bench_reports_every_method(capsys):
    assert main(["--sd", "--channels", "32", "--latent", "8", "--repeats", "1", "--warmup", "0", "--steps", "4",
                 "--json"]) == 0
    report = json.loads(capsys.readouterr().out)
    assert set(report["methods"]) == {"cond", "cfg", "sag_cfg", "pag_cfg"}
    for clock in ("wall", "cpu"):                                   # CPU runs report both clocks
        assert report["methods"]["cfg"][f"{clock}_x_cfg"] == 1.0
        assert all(m[f"{clock}_ms"] > 0 for m in report["methods"].values())
        assert set(report["targets"][clock]) == {"sag_cfg <= 1.55 x cfg", "pag_cfg <= sag_cfg"}
        assert report["sag_beyond_its_passes"][clock] > 0
    assert report["unet"]["block_out_channels"] == [32, 64, 128, 128]
    assert report["unet"]["sag_site"] == "mid_block.attentions.0.transformer_blocks.0.attn1"
    assert report["cpu"] and "before" in report["loadavg_1min"]


def test_sd_bench_rejects_a_bad_width(capsys):
    with pytest.raises(SystemExit) as exit_info:
        main(["--sd", "--channels", "40"])
    assert exit_info.value.code == 2
    assert "--channels must be a positive multiple of 32" in capsys.readouterr().err
