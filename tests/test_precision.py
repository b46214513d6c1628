"""Precision choice (sag/precision.py) and its use: ``sag.sample(dtype=, fast=)``, ``sag-sample --dtype``.

The auto rule is tested with the CPU flags, the work estimate and the timing probe replaced
(no test times anything); CPU bfloat16 autocast runs for real (it runs on every x86 CPU, natively
or emulated). The float32 islands themselves are in tests/test_mixed_precision.py.
"""
from __future__ import annotations

import json
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch

import sag.precision as precision
from diffusion import DiffusionConfig, GaussianDiffusion
from sag import SAGConfig, sample
from sag.precision import AUTO_MIN_GFLOP, PrecisionError, choose_dtype, cpu_bf16_flags, forward_gflop
from sag.sample import main, resolve_dtype
from unet import UNet, UNetConfig

FIXTURES = Path(__file__).parent / "fixtures" / "official"
CONFIG = UNetConfig(image_size=16, model_channels=32, out_channels=6, num_res_blocks=1, attention_resolutions=(8,),
                    channel_mult=(1, 2), num_head_channels=32)
AMX_CPUINFO = ("processor\t: 0\nmodel name\t: Intel(R) Xeon(R) Processor\n"
               "flags\t\t: fpu sse avx2 avx512f avx512_bf16 amx_bf16 amx_tile\n")
ARM_CPUINFO = "processor\t: 0\nFeatures\t: fp asimd sve bf16 i8mm\n"
OLD_CPUINFO = "processor\t: 0\nflags\t\t: fpu sse avx2 avx512f\n"


def _no_probe():
    raise AssertionError("the probe must not run here")


@pytest.fixture(scope="module")
def model():
    torch.manual_seed(0)
    net = UNet(CONFIG).eval()
    with torch.no_grad():
        for p in net.parameters():
            p.add_(torch.randn_like(p) * 0.05)
    return net


@pytest.fixture(scope="module")
def diffusion():
    return GaussianDiffusion.from_config(DiffusionConfig(steps=100, noise_schedule="cosine", learn_sigma=True,
                                                         timestep_respacing="2"))


# -- the auto rule ------------------------------------------------------------------------------

def test_cpu_flags_are_read_from_cpuinfo():
    assert cpu_bf16_flags(AMX_CPUINFO) == ("amx_bf16", "avx512_bf16")
    assert cpu_bf16_flags(ARM_CPUINFO) == ("bf16",)
    assert cpu_bf16_flags(OLD_CPUINFO) == ()
    assert cpu_bf16_flags("") == ()


def test_auto_picks_bfloat16_only_with_native_units_enough_work_and_a_faster_probe(model):
    big = AUTO_MIN_GFLOP + 1
    # No native units: float32, no probe.
    choice = choose_dtype("auto", "cpu", flags=(), probe=_no_probe)
    assert choice.dtype == torch.float32 and "no native bfloat16" in choice.reason
    # Native units and a probe that measures bfloat16 faster: bfloat16, with the figures recorded.
    choice = choose_dtype("auto", "cpu", flags=("amx_bf16",), probe=lambda: 2.4)
    assert choice.dtype == torch.bfloat16 and "amx_bf16" in choice.reason and "2.40x" in choice.reason
    assert choice.record() == {"requested": "auto", "dtype": "bfloat16", "reason": choice.reason,
                               "cpu_bf16_flags": ["amx_bf16"], "probe_speedup": 2.4, "gflop_per_forward": None}
    # Native units but the probe finds no real gain: float32.
    choice = choose_dtype("auto", "cpu", flags=("avx512_bf16",), probe=lambda: 1.1)
    assert choice.dtype == torch.float32 and "1.10x" in choice.reason
    # Too little work per forward (a tiny model): float32 without probing (deterministic).
    gflop = forward_gflop(model, 2)
    assert 0 < gflop < AUTO_MIN_GFLOP
    choice = choose_dtype("auto", "cpu", model, 2, flags=("amx_bf16",), probe=_no_probe)
    assert choice.dtype == torch.float32 and "too little work" in choice.reason
    assert choice.gflop_per_forward == pytest.approx(gflop)
    # The work grows with the batch: a large batch of the same model goes on to the probe.
    batch = int(big / (gflop / 2)) + 1
    assert choose_dtype("auto", "cpu", model, batch, flags=("amx_bf16",), probe=lambda: 2.0).dtype == torch.bfloat16
    # CUDA: auto is float32 (half precision there is asked for explicitly).
    assert choose_dtype("auto", "cuda", flags=("amx_bf16",), probe=_no_probe).dtype == torch.float32


def test_explicit_dtypes_and_their_errors():
    assert choose_dtype(None, "cpu").dtype == torch.float32
    assert choose_dtype("bf16", "cpu").dtype == torch.bfloat16
    assert choose_dtype(torch.bfloat16, "cpu").requested == "bfloat16"
    assert choose_dtype("float16", "cuda").dtype == torch.float16
    with pytest.raises(PrecisionError, match="float16 needs a CUDA device"):
        choose_dtype("fp16", "cpu")
    with pytest.raises(PrecisionError, match="unknown dtype 'int8'"):
        choose_dtype("int8", "cpu")


def test_work_estimate_scales_with_the_batch(model):
    assert forward_gflop(model, 4) == pytest.approx(2 * forward_gflop(model, 2))
    assert forward_gflop(torch.nn.Linear(2, 2), 1) is None          # no config to rebuild from


# -- the library ---------------------------------------------------------------------------------

def test_sample_dtype_and_fast(model, diffusion):
    sag = SAGConfig(scale=0.5, site="output.1", blur_sigma=1.0, kernel_size=5)
    shape = (2, 3, 16, 16)
    exact = sample(model, diffusion, shape, guidance=sag, seed=3)
    assert torch.equal(sample(model, diffusion, shape, guidance=sag, seed=3, dtype="float32"), exact)
    mixed = sample(model, diffusion, shape, guidance=sag, seed=3, dtype="bf16")
    assert mixed.dtype == torch.float32 and torch.isfinite(mixed).all()
    difference = (mixed - exact).abs()
    assert difference.max() > 0 and difference.mean() < 0.05         # bfloat16 ran, and stayed close
    # fast: fused attention for the call (auto dtype: this tiny model stays float32), the setting restored.
    before = [m.fused for m in model.modules() if hasattr(m, "fused")]
    fast = sample(model, diffusion, shape, guidance=sag, seed=3, fast=True)
    assert [m.fused for m in model.modules() if hasattr(m, "fused")] == before
    assert (fast - exact).abs().max() < 1e-4
    with pytest.raises(PrecisionError, match="float16 needs a CUDA device"):
        sample(model, diffusion, shape, seed=3, dtype="float16")


# -- the CLI -------------------------------------------------------------------------------------

def _uncond_args(out, *extra) -> list:
    flags = json.loads((FIXTURES / "adm_uncond" / "config.json").read_text())["official_flags"]
    args = ["--model_path", str(FIXTURES / "adm_uncond" / "model.pt")]
    for name, value in flags.items():
        if name not in ("batch_size", "use_ddim", "clip_denoised", "timestep_respacing"):
            args += [f"--{name}", str(value)]
    return args + ["--timestep_respacing", "2", "--num_samples", "2", "--batch_size", "2", "--no-progress",
                   "--out", str(out), *extra]


def test_cli_bf16_and_auto_record_the_dtype_that_ran_and_why(tmp_path, monkeypatch):
    assert main(_uncond_args(tmp_path / "bf16", "--dtype", "bf16")) == 0
    side = json.loads((tmp_path / "bf16" / "samples.json").read_text())
    assert side["dtype"] == "bfloat16" and side["settings"]["dtype"] == "bfloat16"
    assert side["dtype_choice"]["requested"] == "bf16" and side["dtype_note"] == "bfloat16 as requested"
    # auto on a CPU with native units, enough work and a faster probe (all three replaced): bfloat16.
    monkeypatch.setattr(precision, "cpu_bf16_flags", lambda: ("amx_bf16",))
    monkeypatch.setattr(precision, "AUTO_MIN_GFLOP", 0.0)
    monkeypatch.setattr(precision, "probe_bf16_speedup", lambda: 1.9)
    assert main(_uncond_args(tmp_path / "auto")) == 0
    side = json.loads((tmp_path / "auto" / "samples.json").read_text())
    assert side["dtype"] == "bfloat16" and side["dtype_choice"]["requested"] == "auto"
    assert side["dtype_choice"]["probe_speedup"] == 1.9 and "1.90x faster" in side["dtype_note"]
    # The same folder again under auto, now on a "CPU without bf16": the finished run keeps its dtype.
    monkeypatch.setattr(precision, "cpu_bf16_flags", lambda: ())
    assert main(_uncond_args(tmp_path / "auto")) == 0                # "nothing to do", not "other settings"
    # A fresh folder on that CPU: float32, and why.
    assert main(_uncond_args(tmp_path / "plain")) == 0
    side = json.loads((tmp_path / "plain" / "samples.json").read_text())
    assert side["dtype"] == "float32" and "no native bfloat16" in side["dtype_note"]


def test_auto_keeps_the_dtype_of_a_run_already_in_the_output(tmp_path):
    shards = tmp_path / "shards"
    shards.mkdir()
    (shards / "run.json").write_text(json.dumps({"settings": {"dtype": "bfloat16"}}))
    args = SimpleNamespace(dtype=None)
    choice = resolve_dtype(args, {}, torch.device("cpu"), None, 1, tmp_path)
    assert choice.dtype == torch.bfloat16 and "already in --out" in choice.reason
    # An explicit --dtype is taken as given (a clash with the folder is then reported as other settings).
    assert resolve_dtype(SimpleNamespace(dtype="float32"), {}, torch.device("cpu"), None, 1, tmp_path).dtype == torch.float32
