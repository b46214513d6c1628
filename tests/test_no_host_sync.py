"""No host synchronisation inside a sampling step, for every guidance method.

The step runs on the ``meta`` device: tensors there have shapes and dtypes but no values, so any
``.item()``, ``int(tensor)``, ``bool(tensor)`` or data-dependent Python branch raises. A step that
completes on ``meta`` reads no tensor value on the host, which is what keeps a CUDA loop asynchronous.
"""
import math

import pytest
import torch

from diffusion import DiffusionConfig, GaussianDiffusion
from sag import SAGConfig, guided_step
from sag.cfg import CFGConfig, CFGWith
from sag.perturbed import PAGConfig, SEGConfig
from unet import UNet, UNetConfig

CONFIG = UNetConfig(image_size=16, model_channels=32, out_channels=6, num_res_blocks=1, attention_resolutions=(8,),
                    channel_mult=(1, 2), num_head_channels=32, num_classes=4)
SITE = "output.1"
SAG = dict(site=SITE, blur_sigma=1.0, kernel_size=5)
METHODS = {
    "unguided": None,
    "SAG": SAGConfig(scale=0.5, **SAG),
    "SAG official maps": SAGConfig(scale=0.5, map_mode="official", official_num_heads=2, **SAG),
    "blur guidance": SAGConfig(scale=0.5, blur_everywhere=True, **SAG),
    "PAG": PAGConfig(scale=1.0),
    "PAG sequential": PAGConfig(scale=1.0, batched=False),
    "SEG": SEGConfig(scale=1.0, sigma=2.0),
    "SEG sigma inf": SEGConfig(scale=1.0, sigma=math.inf),
    "CFG": CFGConfig(2.0, null_label=0),
    "SAG+CFG": CFGWith(CFGConfig(2.0, null_label=0), SAGConfig(scale=0.5, **SAG)),
    "PAG+CFG in range": CFGWith(CFGConfig(2.0, null_label=0), PAGConfig(scale=1.0, step_range=(9, 0))),
    "PAG+CFG out of range": CFGWith(CFGConfig(2.0, null_label=0), PAGConfig(scale=1.0, step_range=(3, 0))),
    "SEG+CFG": CFGWith(CFGConfig(2.0, null_label=0), SEGConfig(scale=1.0, sigma=2.0)),
}


@pytest.fixture(scope="module")
def meta_setup():
    model = UNet(CONFIG).to("meta").eval()
    diffusion = GaussianDiffusion.from_config(DiffusionConfig(steps=100, noise_schedule="cosine", learn_sigma=True,
                                                              timestep_respacing="10"))
    x = torch.randn(2, 3, 16, 16, device="meta")
    return model, diffusion, x, torch.randn_like(x), torch.zeros(2, dtype=torch.long, device="meta")


def test_meta_device_really_rejects_host_reads():
    with pytest.raises((RuntimeError, NotImplementedError)):
        int(torch.zeros(2, dtype=torch.long, device="meta")[0])


@pytest.mark.parametrize("use_ddim", [False, True], ids=["ddpm", "ddim"])
@pytest.mark.parametrize("name", list(METHODS))
def test_a_guided_step_reads_no_tensor_value(meta_setup, name, use_ddim):
    model, diffusion, x, noise, y = meta_setup
    info = guided_step(model, diffusion, x, 5, guidance=METHODS[name], y=y, noise=noise, use_ddim=use_ddim, eta=0.5)
    assert info.x_prev.device.type == "meta" and info.x_prev.shape == x.shape
    # The CFG + PAG pair runs its PAG pass only inside PAG's range, chosen from the Python index.
    if name.startswith("PAG+CFG"):
        assert (info.sag.inner is None) == name.endswith("out of range")
