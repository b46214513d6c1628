"""The CUDA path (skipped without a GPU; ``.ci/device_check`` runs it on a lent device).

The same code runs on the device: an official SAG loop on CUDA equals the recorded official run,
a guided step makes no host sync (``torch.cuda.set_sync_debug_mode("error")``), and under
float16 / bfloat16 autocast the captured map, the blur and the sampler's math stay float32.
"""
import pytest
import torch

from conftest import load_case, max_err, reference
from sag import guided_step, sample

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")


@pytest.fixture(scope="module")
def cuda_case():
    # Parity wants full float32 on the device: no TF32 in convolutions or matmuls.
    before = torch.backends.cudnn.allow_tf32, torch.backends.cuda.matmul.allow_tf32
    torch.backends.cudnn.allow_tf32 = torch.backends.cuda.matmul.allow_tf32 = False
    ref = reference("adm_uncond")
    loaded = load_case("adm_uncond", timestep_respacing="10", guide_start=int(ref["loop_full_guide_start"]))
    yield loaded.model.to("cuda"), loaded.diffusion, loaded.guidance, ref
    torch.backends.cudnn.allow_tf32, torch.backends.cuda.matmul.allow_tf32 = before


def test_sag_loop_on_cuda_equals_the_official_run(cuda_case):
    model, diffusion, guidance, ref = cuda_case
    x0 = sample(model, diffusion, (2, 3, 32, 32), guidance=guidance, x_T=ref["loop_x_T"].cuda(),
                noise=[n.cuda() for n in ref["loop_noise"]], device="cuda")
    assert x0.device.type == "cuda"
    assert max_err(x0.cpu(), ref["loop_full_final_sample"]) <= 1e-3


def test_a_guided_step_makes_no_host_sync(cuda_case):
    model, diffusion, guidance, ref = cuda_case
    x = ref["loop_x_T"].cuda()
    noise = torch.randn_like(x)
    with torch.no_grad():
        guided_step(model, diffusion, x, 5, guidance=guidance, noise=noise)     # builds the device caches
        torch.cuda.set_sync_debug_mode("error")
        try:
            info = guided_step(model, diffusion, x, 5, guidance=guidance, noise=noise)
        finally:
            torch.cuda.set_sync_debug_mode(0)
    assert info.sag is not None and info.x_prev.device.type == "cuda"


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=["float16", "bfloat16"])
def test_half_precision_keeps_map_blur_and_step_in_float32(cuda_case, dtype):
    model, diffusion, guidance, ref = cuda_case
    x = ref["loop_x_T"].cuda()
    noise = ref["loop_noise"][4].cuda()
    with torch.no_grad():
        exact = guided_step(model, diffusion, x, 5, guidance=guidance, noise=noise)
        with torch.autocast("cuda", dtype=dtype):
            mixed = guided_step(model, diffusion, x, 5, guidance=guidance, noise=noise)
    step = mixed.sag
    assert step.attention_map.probs.dtype == torch.float32
    for tensor in (step.first.eps, step.blurred_x0, step.degraded_x_t, step.guided_eps, mixed.x_prev):
        assert tensor.dtype == torch.float32 and torch.isfinite(tensor).all()
    assert max_err(mixed.x_prev, exact.x_prev) < 0.1                 # half precision is near, not equal
