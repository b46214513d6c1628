"""Write notebooks/02_sag_on_stable_diffusion.ipynb with its outputs, without Jupyter.

    python notebooks/build_02_sag_on_stable_diffusion.py

The cells are below; they run and are saved the way ``build_01_one_sag_step.py`` runs and saves its own
(its ``build``). The saved notebook runs on the tiny random-weight SD folder of the tests; setting
``SD_FOLDER`` in its second cell points it at a real Stable Diffusion 1.x / 2.x folder.
"""
from __future__ import annotations

from pathlib import Path

from build_01_one_sag_step import HERE, build

CELLS = [
("md", r"""# One step of Self-Attention Guidance on Stable Diffusion

Notebook 01 walks through one SAG step on a pixel-space ADM U-Net. Stable Diffusion is a **latent**
diffusion model: the U-Net denoises 4-channel latents of an autoencoder (a 512 × 512 image is a
4 × 64 × 64 latent), conditioned on CLIP text states through cross-attention, and it is sampled with
classifier-free guidance (CFG). SAG (Hong et al., ICCV 2023, Sec. 5 runs it on SD) carries over with
three changes, which this notebook shows with the package's own pieces, the way diffusers'
`StableDiffusionSAGPipeline` runs them:

| | ADM (notebook 01) | Stable Diffusion (here) |
|---|---|---|
| $\hat x_0$ that is blurred | the image, 3 channels | the **latent** $\hat z_0$, 4 channels, blur 9 taps, $\sigma = 1$ latent pixel |
| map $A_t$ | a chosen decoder block (`output.2`) | the **mid block**'s first transformer block, self-attention (`attn1`) |
| with CFG | (ADM runs SAG alone) | $A_t$, $\hat z_0$ and $\epsilon$ from the **unconditional half**; the degraded pass is unconditional |

With CFG scale $w$ and SAG scale $s$ the guided prediction is

$$\tilde\epsilon = \epsilon_u + w\,(\epsilon_c - \epsilon_u) + s\,\big(\epsilon_u - \epsilon_u(\bar z_t)\big),\qquad
\bar z_t = \sqrt{\bar\alpha_t}\,\big(M_t \odot G_\sigma(\hat z_0) + (1-M_t)\odot \hat z_0\big) + \sqrt{1-\bar\alpha_t}\,\epsilon_u .$$

The model here is the tests' tiny SD-1.x-shaped folder with **random weights** (16 × 16 latents, 128 × 128
images): its images are coloured noise, but every tensor has the shape and the path it has in SD 1.5.
Set `SD_FOLDER` below to a real diffusers folder (e.g. a local copy of `stable-diffusion-v1-5`) to see real
images; on a CPU that takes minutes per image."""),
("code", r"""import time
from pathlib import Path

import numpy as np
import torch
from PIL import Image

import sag
from sag.io import make_grid
from sag.sd import build_guidance, guided_output, load_pipeline
from sag.sd.guidance import SAG_KERNEL_SIZE, ScaledInputUNet
from unet.seam import Capture

SD_FOLDER = None            # <- the path of a real SD 1.x / 2.x diffusers folder, or None for the tiny test model

started = time.time()
tiny = next(p / "tests" / "fixtures" / "diffusers" / "sd15_tiny" for p in (Path.cwd(), *Path.cwd().parents)
            if (p / "tests" / "fixtures" / "diffusers" / "sd15_tiny").is_dir()) if SD_FOLDER is None else None
pipe = load_pipeline(SD_FOLDER or tiny, device="cuda" if torch.cuda.is_available() else "cpu")
unet, scheduler = pipe.unet, pipe.scheduler
STEPS = 25 if SD_FOLDER else 4
print("model:", "a real SD folder" if SD_FOLDER else "the tiny random-weight test folder")
print("U-Net parameters:", sum(p.numel() for p in unet.parameters()), "| latent:", unet.in_channels, "channels,",
      unet.sample_size, "x", unet.sample_size, "| image:", pipe.default_size, "px")
print("scheduler:", type(scheduler).__name__, "| SAG reads", unet.sag_site)"""),
("md", r"""Two display helpers: images in [0, 1] (NHWC numpy, what the pipeline returns, or NCHW tensors),
and latent-sized maps (each channel of a latent as a grey image, rescaled to its own range)."""),
("code", r"""def show(*rows, scale=1):
    # rows of images [B x H x W x 3] in [0, 1] -> one picture (a row per argument, a column per sample)
    rows = [r.permute(0, 2, 3, 1).cpu().numpy() if torch.is_tensor(r) else r for r in rows]
    tiles = np.concatenate([(np.clip(r, 0, 1) * 255).round().astype(np.uint8) for r in rows])
    picture = Image.fromarray(make_grid(tiles, ncol=len(rows[0])))
    return picture.resize((picture.width * scale, picture.height * scale), Image.NEAREST)

def grey(x):
    # [B x C x h x w] -> [B*C x h x w x 3] in [0, 1], each map rescaled to its own min..max
    x = x.detach().float().flatten(0, 1)[:, None]
    lo, hi = x.amin(dim=(2, 3), keepdim=True), x.amax(dim=(2, 3), keepdim=True)
    return ((x - lo) / (hi - lo).clamp_min(1e-8)).expand(-1, 3, -1, -1)"""),
("md", r"""## 1. The text, the CFG batch and the step we look at

With CFG ($w = 7.5 > 1$) the U-Net sees a batch of $2B$: the negative (here empty) prompt's CLIP states
first, then the prompt's. We run the pipeline with SAG for two seeds and catch the latents $z_t$ that
enter the middle step."""),
("code", r"""prompt, w, s = "a photograph of an astronaut riding a horse", 7.5, 0.75
seeds = [0, 1]
cond, uncond = pipe.encode_prompt([prompt] * len(seeds), None, do_classifier_free_guidance=True)
print("text states: cond", tuple(cond.shape), "| uncond", tuple(uncond.shape))

caught = {}
def catch(info):
    caught[info.index] = info
images = pipe(prompt, num_inference_steps=STEPS, guidance_scale=w, sag_scale=s, seeds=seeds, callback=catch)
k = STEPS // 2
t = caught[k].t                                  # the scheduler timestep of step k
z_t = caught[k - 1].latents                      # what step k starts from
print("timesteps:", scheduler.timesteps.tolist(), "| step", k, "has t =", t, "| z_t", tuple(z_t.shape))"""),
("md", r"""## 2. The first pass: $[\epsilon_u; \epsilon_c]$ and the mid-block map of the unconditional half

One forward of $2B$; the attention seam returns the softmax weights of `unet.sag_site` for the rows
`0:B` only (`Capture(samples=...)`), every other attention block runs fused. `ScaledInputUNet` applies
`scheduler.scale_model_input` (a no-op for DDIM / PNDM, $1/\sqrt{\sigma^2+1}$ for Euler) and calls the U-Net."""),
("code", r"""B = len(seeds)
model = ScaledInputUNet(unet, scheduler, t)
t_batch = torch.full((2 * B,), t, device=z_t.device)
out = model(torch.cat([z_t, z_t]), t_batch, torch.cat([uncond, cond]),
            attention={unet.sag_site: Capture(samples=slice(0, B))})
eps_u, eps_c = out.output.float().chunk(2)
A = out.attention_maps[unet.sag_site]
print("A_t:", tuple(A.probs.shape), "on a", A.height, "x", A.width, "grid (the mid block)")
eps_cfg = eps_u + w * (eps_c - eps_u)"""),
("md", r"""## 3. The latent $\hat z_0$ and the salient mask

$\hat z_0$ comes from the unconditional prediction (`scheduler.to_x0_eps`; VP latents here, the sigma
parametrisation for Euler). The mask is computed on the mid block's grid and upsampled (nearest) to the
**latent** grid, not to the image. Rows: the decoded $\hat z_0$ (what the latent looks like as an image),
then the mask (white = salient) per sample."""),
("code", r"""z0_hat, _ = scheduler.to_x0_eps(eps_u, t, z_t)
mask = sag.salient_mask(A, z_t.shape[-2:])                  # [B x 1 x h x w] in {0, 1}
print("z0_hat", tuple(z0_hat.shape), "| mask", tuple(mask.shape), "| salient fraction",
      [round(v, 3) for v in mask.mean(dim=(1, 2, 3)).tolist()])
scale = pipe.default_size // z_t.shape[-1]
show(pipe.decode_latents(z0_hat),
     torch.nn.functional.interpolate(mask, scale_factor=scale).expand(-1, 3, -1, -1))"""),
("md", r"""## 4. Blur inside the mask, re-noise with $\epsilon_u$

The 4-channel latent is blurred with diffusers' 9-tap Gaussian, $\sigma = 1$, reflect padding, and kept
only inside the mask; `scheduler.add_noise` re-noises it to $t$ with the first pass's own $\epsilon_u$.
Rows: the four channels of $\hat z_0$ (one column per channel, sample 0), then of the blurred-in-the-mask
$\tilde z_0$; then $z_t$ and $\bar z_t$ decoded."""),
("code", r"""blurred = sag.gaussian_blur(z0_hat, 1.0, SAG_KERNEL_SIZE)
z0_tilde = mask * blurred + (1 - mask) * z0_hat
z_bar = scheduler.add_noise(z0_tilde, eps_u, t)
print("blur kernel", SAG_KERNEL_SIZE, "taps | |z0_tilde - z0_hat| max", round((z0_tilde - z0_hat).abs().max().item(), 4))
show(grey(z0_hat[:1]), grey(z0_tilde[:1]), scale=4)"""),
("code", r"""show(pipe.decode_latents(z_t), pipe.decode_latents(z_bar))"""),
("md", r"""## 5. The degraded pass and the guided prediction

The third U-Net pass sees $\bar z_t$ with the **unconditional** text states; SAG adds
$s\,(\epsilon_u - \epsilon_u(\bar z_t))$ to the CFG prediction. `sag.sd.guided_output` is the function the
pipeline calls at every step (through the same guidance protocol as ADM: `CFGWith(CFGConfig, SAGConfig)`);
on the same $z_t$ it gives the same prediction."""),
("code", r"""eps_degraded = model(z_bar, t_batch[:B], uncond).output.float()
guided = eps_cfg + s * (eps_u - eps_degraded)
guidance = build_guidance(unet, guidance_scale=w, negative_embeds=uncond, sag_scale=s)
print("the pipeline's guidance:", type(guidance).__name__, "of", type(guidance.cfg).__name__, "and",
      type(guidance.method).__name__)
reference = guided_output(guidance, unet, scheduler, t, z_t, cond)
print("max |by hand - pipeline|:", f"{(guided - reference.output).abs().max().item():.2e}")
print("same mask as the pipeline's step:", torch.equal(mask, caught[k].salient_mask))"""),
("md", r"""## 6. CFG alone vs CFG + SAG, same seeds

Each sample's initial latents come from its own seed (`sag.seeding`), so the two rows start from the same
noise: top CFG only, bottom CFG + SAG (the images of section 1). With random weights the difference is
only what the guidance does to noise; with a real folder it is the paper's Fig. 1 effect."""),
("code", r"""plain = pipe(prompt, num_inference_steps=STEPS, guidance_scale=w, sag_scale=0.0, seeds=seeds)
print("mean |SAG - CFG| per image:", [round(float(v), 4) for v in np.abs(images - plain).mean(axis=(1, 2, 3))])
show(plain, images)"""),
("code", r"""print(f"notebook ran in {time.time() - started:.1f} s")"""),
]


if __name__ == "__main__":
    import torch
    torch.set_num_threads(1)
    path = HERE / "02_sag_on_stable_diffusion.ipynb"
    print(f"wrote {path} in {build(path, CELLS):.1f} s")
