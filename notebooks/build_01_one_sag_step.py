"""Write notebooks/01_one_sag_step.ipynb with its outputs, without Jupyter.

    python notebooks/build_01_one_sag_step.py

The cells are below; each code cell is executed in one shared namespace (the way a kernel runs
them top to bottom), its printed text is kept as a ``stream`` output and the value of its last
line, as Jupyter would display it, as ``image/png`` (a PIL image) or ``text/plain`` (anything else
that is not None). The result is nbformat 4 JSON that any notebook viewer renders.
"""
from __future__ import annotations

import ast
import base64
import contextlib
import io
import json
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent

CELLS = [
("md", r"""# One step of Self-Attention Guidance, on the embedded demo model

Self-Attention Guidance (SAG; Hong, Lee, Jang, Kim, *Improving Sample Quality of Diffusion Models
Using Self-Attention Guidance*, ICCV 2023, arXiv 2210.00939) makes a diffusion model's prediction
better by contrasting it with its prediction for a copy of the image in which **the regions the
model attends to are blurred**. This notebook runs one guided step of the package's sampler on the
small demo model that ships with `sag` (a 1.4 M-parameter ADM U-Net trained on procedural 32 × 32
shapes; no download, no GPU) and shows every intermediate the package computes:

| paper | here | shape |
|---|---|---|
| $x_t$ | `x_t` | B × 3 × 32 × 32 |
| $\epsilon_\theta(x_t)$, $\hat x_0$ | `step.first.eps`, `step.first.pred_x0` | B × 3 × 32 × 32 |
| $A_t$ | `step.attention_map.probs` | B × heads × N × N |
| $M_t$ | `step.salient_mask` | B × 1 × 32 × 32 |
| $G_\sigma(\hat x_0)$ | `step.blurred_x0` | B × 3 × 32 × 32 |
| $\tilde x_0$, $\bar x_t$ | `step.degraded_x0`, `step.degraded_x_t` | B × 3 × 32 × 32 |
| $\epsilon_\theta(\bar x_t)$ | `step.eps_degraded` | B × 3 × 32 × 32 |

Everything below comes from the package's own functions (`sag.sample`'s `callback`, `sag.sag_step`,
`sag.attention_received`); nothing is re-implemented here. Images are shown with PIL only."""),
("code", r"""import time
import torch
import sag
from sag import demo_data
from sag.demo import DEMO_SAG, load_demo

started = time.time()
loaded = load_demo(timestep_respacing="ddim25")    # DDIM's 25 evenly strided steps of the 1000-step cosine process
model, diffusion = loaded.model, loaded.diffusion
print(model.config)
print("parameters:", sum(p.numel() for p in model.parameters()))
print("respaced steps:", diffusion.num_timesteps)
print("recommended SAG settings:", DEMO_SAG)"""),
("md", r"""The U-Net has self-attention at 16 × 16 and 8 × 8. SAG reads the attention map of **one** block
(`DEMO_SAG.site`); the official ADM setting reads a decoder block at 8 × 8, and so does the demo's
default, `output.1`:"""),
("code", r"""for site in model.attention_sites():
    print(f"{site.name:9s} {site.official_module:20s} {site.resolution:2d} x {site.resolution:<2d} "
          f"{site.channels:3d} channels, {site.heads} heads")"""),
("md", r"""A small helper to look at tensors: `demo_data.grid` tiles images in [-1, 1]; maps in other ranges are
rescaled to [-1, 1] per image first. Each row below is one quantity, each column one sample."""),
("code", r"""def as_image(x):
    # [B x C x H x W] -> images in [-1, 1] with 3 channels (single-channel maps become grey, rescaled per image)
    x = x.detach().float()
    if x.shape[1] == 1:
        lo = x.amin(dim=(1, 2, 3), keepdim=True)
        hi = x.amax(dim=(1, 2, 3), keepdim=True)
        x = (2 * (x - lo) / (hi - lo).clamp_min(1e-8) - 1).expand(-1, 3, -1, -1)
    return x.clamp(-1, 1)

def rows(*tensors, scale=4):
    # one row per tensor, one column per sample
    columns = tensors[0].shape[0]
    return demo_data.grid(torch.cat([as_image(t) for t in tensors]), columns=columns, scale=scale)

def signed(x):
    # a signed quantity (eps, differences) shown symmetrically around grey: x / max|x| per image
    x = x.detach().float()
    return x / x.abs().amax(dim=(1, 2, 3), keepdim=True).clamp_min(1e-8)"""),
("md", r"""## 1. Sampling with SAG, and catching one step

`sag.sample` runs the sampler from $x_T$ (seeded per sample); here DDIM with $\eta = 0$
(`use_ddim=True`), the README's main command (this small model's samples are cleaner with it than
with 25 or 50 ancestral steps: Fréchet distance 39 vs 90 in a pilot of 300 samples). With `guidance=DEMO_SAG`,
at every respaced step it calls `sag.sag_step`, and its `callback` receives
`StepInfo(index, t, x_t, x_prev, eps, pred_x0, sag)` after each step, where `sag` is the step's
`SAGStep`. We keep the step halfway through the 25 (respaced index $t = 12$) for four seeds."""),
("code", r"""seeds = [0, 1, 2, 3]
caught = {}

def keep_step(info):
    if info.t == 12:
        caught["info"] = info

final = sag.sample(model, diffusion, (len(seeds), 3, 32, 32), guidance=DEMO_SAG, seed=seeds, use_ddim=True,
                   callback=keep_step)
info = caught["info"]
step = info.sag                      # the SAGStep of that step
x_t = info.x_t
t = torch.full((len(seeds),), info.t, dtype=torch.long)
print("step", info.index, "of", diffusion.num_timesteps, "| respaced t =", info.t,
      "| model timestep =", diffusion.model_timesteps(t)[0].item())
print(type(step).__name__, "fields:", step._fields)"""),
("md", r"""## 2. The first pass: $\epsilon_\theta(x_t)$ and $\hat x_0$

The network predicts the noise in $x_t$; the prediction of the clean image follows from
$x_t = \sqrt{\bar\alpha_t}\,x_0 + \sqrt{1-\bar\alpha_t}\,\epsilon$:

$$\hat x_0 = \operatorname{clip}_{[-1,1]}\!\Big(\frac{x_t - \sqrt{1-\bar\alpha_t}\,\epsilon_\theta(x_t)}{\sqrt{\bar\alpha_t}}\Big)$$

`step.first` holds `eps`, `pred_x0`, and the learned `variance` / `log_variance`. Rows: $x_t$, $\hat x_0$,
$\epsilon_\theta(x_t)$ (scaled to its max)."""),
("code", r"""rows(x_t, step.first.pred_x0, signed(step.first.eps))"""),
("md", r"""## 3. The attention map $A_t$ and the salient mask $M_t$

During the first pass, the block at `DEMO_SAG.site` returned its softmax weights
$A_t \in \mathbb{R}^{B\times h\times N\times N}$ (rows: queries, columns: keys; $N = 8\cdot 8$).
The attention each key position **receives**, averaged over heads and summed over queries, has mean 1;
the mask keeps the positions above the mean and is upsampled (nearest) to the image:

$$r_k = \sum_q \tfrac1h\sum_{\text{head}} A_t[\text{head}, q, k], \qquad M_t = \operatorname{Up}\big(\mathbb 1[r > 1]\big)$$

Rows: $x_t$, $\hat x_0$, $r$ (upsampled for display, grey levels rescaled per image), $M_t$ (white = salient)."""),
("code", r"""probs = step.attention_map.probs
print("A_t:", tuple(probs.shape), "| rows sum to", probs.sum(-1).mean().item())
received = sag.attention_received(step.attention_map)          # [B x N]
grid_side = step.attention_map.height
received_img = received.reshape(-1, 1, grid_side, grid_side)
received_img = torch.nn.functional.interpolate(received_img, size=(32, 32), mode="nearest")
print("mean of r:", received.mean().item(), "| salient fraction per sample:",
      [round(v, 3) for v in step.salient_mask.mean(dim=(1, 2, 3)).tolist()])
rows(x_t, step.first.pred_x0, received_img, step.salient_mask * 2 - 1)"""),
("md", r"""## 4. Degrading the salient part: $G_\sigma(\hat x_0)$, $\tilde x_0$ and $\bar x_t$

$\hat x_0$ is blurred (Gaussian, $\sigma$ = `DEMO_SAG.blur_sigma` px, `DEMO_SAG.kernel_size` taps) and the
blurred copy replaces $\hat x_0$ **only inside the mask**; the result is re-noised to step $t$ with the
first pass's own $\epsilon$:

$$\tilde x_0 = M_t \odot G_\sigma(\hat x_0) + (1 - M_t)\odot \hat x_0, \qquad
\bar x_t = \sqrt{\bar\alpha_t}\,\tilde x_0 + \sqrt{1-\bar\alpha_t}\,\epsilon_\theta(x_t)$$

Rows: $\hat x_0$, $G_\sigma(\hat x_0)$, $\tilde x_0$, $\bar x_t$, $x_t$."""),
("code", r"""print("blur: sigma", DEMO_SAG.blur_sigma, "px,", DEMO_SAG.kernel_size, "taps")
rows(step.first.pred_x0, step.blurred_x0, step.degraded_x0, step.degraded_x_t, x_t)"""),
("md", r"""## 5. The second pass and the guided $\epsilon$

The network sees $\bar x_t$ at the same $t$; SAG moves the prediction away from that "degraded" one:

$$\tilde\epsilon = \epsilon_\theta(x_t) + s\,\big(\epsilon_\theta(x_t) - \epsilon_\theta(\bar x_t)\big)$$

(the official code writes $\epsilon_\theta(\bar x_t) + (1+s)(\epsilon_\theta(x_t) - \epsilon_\theta(\bar x_t))$,
the same thing with `--guide_scale` $= 1+s$). Rows: $\epsilon_\theta(x_t)$, $\epsilon_\theta(\bar x_t)$,
their difference, and its per-pixel magnitude — it is concentrated where $M_t$ is on."""),
("code", r"""difference = step.first.eps - step.eps_degraded
print("scale s =", DEMO_SAG.scale)
print("guided eps == eps + s (eps - eps_degraded):",
      torch.allclose(step.guided_eps, step.first.eps + DEMO_SAG.scale * difference, atol=1e-6))
inside = (difference.abs() * step.salient_mask).sum() / (3 * step.salient_mask.sum()).clamp_min(1)
outside = (difference.abs() * (1 - step.salient_mask)).sum() / (3 * (1 - step.salient_mask).sum()).clamp_min(1)
print(f"mean |eps - eps_degraded| inside the mask {inside.item():.4f}, outside {outside.item():.4f}")
rows(signed(step.first.eps), signed(step.eps_degraded), signed(difference), difference.abs().sum(1, keepdim=True))"""),
("md", r"""## 6. The same step, called directly

`sag.sag_step(model, diffusion, x_t, t, config)` is the function the sampler called; run on the caught
$x_t$, it gives back the same guided $\epsilon$. The sampler then forms $\hat x_0$ from the guided
$\epsilon$ and takes the DDIM step (the ancestral sampler would use the first pass's variance);
`info.x_prev` is $x_{t-1}$."""),
("code", r"""again = sag.sag_step(model, diffusion, x_t, t, DEMO_SAG)
print("same guided eps as inside the sampler:", torch.allclose(again.guided_eps, step.guided_eps, atol=1e-5))
print("same mask:", torch.equal(again.salient_mask, step.salient_mask))
rows(x_t, info.pred_x0, info.x_prev)"""),
("md", r"""## 7. Unguided vs SAG, same seeds

Every sample's starting noise and step noise come from its own seed, so the two rows start from the same
$x_T$ and see the same noise; they differ only by the guidance. Top: no guidance; bottom: SAG with
`DEMO_SAG`. (The demo model is small and trained for 90 CPU minutes; the measured effect of SAG on it
is in the README's table, from `python -m sag.demo_eval`.)"""),
("code", r"""compare_seeds = list(range(100, 108))
plain = sag.sample(model, diffusion, (8, 3, 32, 32), guidance=None, seed=compare_seeds, use_ddim=True)
guided = sag.sample(model, diffusion, (8, 3, 32, 32), guidance=DEMO_SAG, seed=compare_seeds, use_ddim=True)
print("mean |SAG - unguided| per sample:", [round(v, 3) for v in (guided - plain).abs().mean(dim=(1, 2, 3)).tolist()])
rows(plain, guided)"""),
("code", r"""print(f"notebook ran in {time.time() - started:.1f} s")"""),
]


def _run_cell(source: str, namespace: dict):
    """exec a cell; return (stdout text, value of a final expression or None)."""
    tree = ast.parse(source)
    last = None
    if tree.body and isinstance(tree.body[-1], ast.Expr):
        last = ast.Expression(tree.body.pop().value)
    buffer = io.StringIO()
    with contextlib.redirect_stdout(buffer):
        exec(compile(tree, "<cell>", "exec"), namespace)
        value = eval(compile(last, "<cell>", "eval"), namespace) if last is not None else None
    return buffer.getvalue(), value


def _outputs(text: str, value, count: int):
    outputs = []
    if text:
        outputs.append({"output_type": "stream", "name": "stdout", "text": text.splitlines(keepends=True)})
    if value is not None:
        data = {"text/plain": [repr(value)]}
        if hasattr(value, "save") and hasattr(value, "size"):          # a PIL image
            png = io.BytesIO()
            value.save(png, format="PNG")
            data = {"image/png": base64.b64encode(png.getvalue()).decode("ascii"),
                    "text/plain": [f"<PIL.Image {value.size[0]}x{value.size[1]}>"]}
        outputs.append({"output_type": "execute_result", "execution_count": count, "data": data, "metadata": {}})
    return outputs


def build(path=HERE / "01_one_sag_step.ipynb", cell_sources=CELLS) -> float:
    """Run ``cell_sources`` ((kind, source) pairs) in one namespace and write them, with their outputs, to ``path``
    (the other notebooks' builders call this with their own cells)."""
    sys.path.insert(0, str(ROOT))
    namespace = {"__name__": "__main__"}
    cells, count, start = [], 0, time.time()
    for kind, source in cell_sources:
        lines = source.strip("\n").splitlines(keepends=True)
        if kind == "md":
            cells.append({"cell_type": "markdown", "metadata": {}, "source": lines})
            continue
        count += 1
        text, value = _run_cell(source, namespace)
        cells.append({"cell_type": "code", "execution_count": count, "metadata": {}, "source": lines,
                      "outputs": _outputs(text, value, count)})
    notebook = {"cells": cells, "metadata": {
        "kernelspec": {"display_name": "Python 3", "language": "python", "name": "python3"},
        "language_info": {"name": "python"}}, "nbformat": 4, "nbformat_minor": 5}
    Path(path).write_text(json.dumps(notebook, indent=1) + "\n")
    return time.time() - start


if __name__ == "__main__":
    import torch
    torch.set_num_threads(1)
    print(f"wrote {HERE / '01_one_sag_step.ipynb'} in {build():.1f} s")
