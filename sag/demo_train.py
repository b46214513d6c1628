"""Train the embedded demo model: a small ADM U-Net on the procedural shapes of ``sag.demo_data``.

    python -m sag.demo_train --out sag/assets/demo.pt --minutes 50 --seed 0

Objective and process as IDDPM / ADM: hybrid loss (MSE on eps + the VB term, learned-range
variance, ``learn_sigma``), cosine schedule over 1000 steps, t uniform, Adam, an EMA of the weights
(the EMA is what is saved). Training runs for a wall-clock budget; each step draws a fresh batch of
procedural images (image indices ``step * batch ... step * batch + batch - 1``, so the data is
reproducible from the seed and the step count). The weights go through
``checkpoints_convert.save_checkpoint`` (loads with ``weights_only=True``) together with the
recommended SAG settings, and a JSON record of the run is written next to them (``.json``).

``--init-from sag/assets/demo.pt`` continues an earlier run (its EMA weights, a fresh Adam with
warm-up, the data indices after its recorded steps); the record keeps the earlier record inside it,
so the chain of runs that made the shipped weights stays readable.
"""
from __future__ import annotations

import argparse
import copy
import dataclasses
import json
import math
import sys
import time
from pathlib import Path

import torch

from diffusion import DiffusionConfig, GaussianDiffusion
from unet import UNet, UNetConfig

from . import demo_data
from .demo import DEMO_SAG

DEMO_CONFIG = UNetConfig(image_size=32, model_channels=32, out_channels=6, num_res_blocks=1,
                         attention_resolutions=(16, 8), channel_mult=(1, 2, 2), num_head_channels=32,
                         use_scale_shift_norm=True, resblock_updown=True)
DEMO_DIFFUSION = DiffusionConfig(steps=1000, noise_schedule="cosine", learn_sigma=True)
DEMO_GUIDANCE = DEMO_SAG      # recommended SAG settings saved with the weights (reasoning in sag/demo.py)


def _ema_update(ema: torch.nn.Module, model: torch.nn.Module, decay: float) -> None:
    with torch.no_grad():
        for e, p in zip(ema.parameters(), model.parameters()):
            e.mul_(decay).add_(p.detach(), alpha=1 - decay)
        for e, b in zip(ema.buffers(), model.buffers()):
            e.copy_(b)


def _initial_weights(path, config: UNetConfig):
    """(state_dict, record) of a sag checkpoint to continue from; its record (the .json beside it)
    says how many steps made it, so the data stream continues instead of repeating."""
    import hashlib
    from checkpoints_convert.load import load_checkpoint
    path = Path(path)
    loaded = load_checkpoint(path)
    if loaded.model.config != config:
        raise ValueError(f"--init-from {path}: its U-Net config differs from the one being trained")
    record_path = path.with_suffix(".json")
    previous = json.loads(record_path.read_text()) if record_path.is_file() else {}
    info = {"path": str(path), "sha256": hashlib.sha256(path.read_bytes()).hexdigest(),
            "steps": int(previous.get("total_steps", previous.get("steps", 0))), "record": previous}
    return loaded.model.state_dict(), info


def train(out, minutes: float, seed: int = 0, batch_size: int = 64, lr: float = 5e-4, ema_decay: float = 0.995,
          config: UNetConfig = DEMO_CONFIG, threads: int = 1, log_every: int = 50, max_steps: int = 0,
          save_every_minutes: float = 10.0, command: str = "", init_from=None) -> dict:
    """Train for ``minutes`` (or ``max_steps``); ``init_from``: a sag checkpoint (an earlier run's EMA
    weights) to continue from, with a fresh optimizer and warm-up; its data indices are skipped."""
    torch.set_num_threads(threads)
    torch.manual_seed(seed)
    model = UNet(config).train()
    first_step, init = 0, None
    if init_from is not None:
        state, init = _initial_weights(init_from, config)
        model.load_state_dict(state)
        first_step = init["steps"]
        # Make the random draws of a continued run differ from the first run's.
        torch.manual_seed(seed + first_step)
    ema = copy.deepcopy(model).eval().requires_grad_(False)
    diffusion = GaussianDiffusion.from_config(DEMO_DIFFUSION)
    optimizer = torch.optim.Adam(model.parameters(), lr=lr)
    params = sum(p.numel() for p in model.parameters())
    generator = torch.Generator().manual_seed(seed + first_step)
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    record = {
        "command": command, "seed": seed, "batch_size": batch_size, "lr": lr, "ema_decay": ema_decay,
        "threads": threads, "parameters": params, "model_config": dataclasses.asdict(config),
        "diffusion_config": dataclasses.asdict(DEMO_DIFFUSION), "guidance": dataclasses.asdict(DEMO_GUIDANCE),
        "data": "sag.demo_data.generate(indices, seed=%d), step k uses indices [k*B, (k+1)*B)" % seed,
        "objective": "hybrid: mse(eps) + vb (learned-range sigma), t ~ U{0..999}, cosine schedule",
        "init_from": init,
    }
    start = time.time()
    budget = minutes * 60.0
    step, running, history = 0, None, []
    last_save = start

    def save(final: bool):
        from checkpoints_convert.load import LoadedModel, save_checkpoint
        save_checkpoint(out, LoadedModel(ema, diffusion, DEMO_GUIDANCE, {}, None))
        record.update(steps=step, total_steps=first_step + step, samples_seen=step * batch_size, wall_time_s=round(time.time() - start, 1),
                      final_loss_ema=running, loss_history=history, finished=final,
                      file_bytes=out.stat().st_size)
        out.with_suffix(".json").write_text(json.dumps(record, indent=1) + "\n")

    while time.time() - start < budget and (not max_steps or step < max_steps):
        k = first_step + step
        x0, _ = demo_data.batch(range(k * batch_size, (k + 1) * batch_size), seed)
        t = torch.randint(0, diffusion.num_timesteps, (batch_size,), generator=generator)
        noise = torch.randn(x0.shape, generator=generator)
        losses = diffusion.training_losses(lambda x, ts: model(x, ts).output, x0, t, noise)
        loss = losses["loss"].mean()
        for group in optimizer.param_groups:          # linear warm-up over the first 100 steps
            group["lr"] = lr * min(1.0, (step + 1) / 100)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        optimizer.step()
        # EMA warm-up (as in many small-scale trainers): decay min(d, (1 + k) / (10 + k)).
        # (a continued run's EMA starts from trained weights: no warm-up).
        _ema_update(ema, model, ema_decay if init else min(ema_decay, (1 + step) / (10 + step)))
        value = loss.item()
        if not math.isfinite(value):
            raise FloatingPointError(f"non-finite loss at step {step}")
        running = value if running is None else 0.98 * running + 0.02 * value
        step += 1
        if step % log_every == 0:
            elapsed = time.time() - start
            history.append([step, round(elapsed, 1), round(running, 5), round(losses["mse"].mean().item(), 5)])
            print(f"step {step} t={elapsed:.0f}s loss(ema)={running:.4f} mse={losses['mse'].mean().item():.4f} "
                  f"{elapsed / step:.2f}s/it", flush=True)
        if time.time() - last_save > save_every_minutes * 60:
            save(False)
            last_save = time.time()
    save(True)
    return record


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", required=True, help="checkpoint path (.pt); a .json record is written beside it")
    parser.add_argument("--minutes", type=float, required=True, help="wall-clock training budget")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--batch_size", type=int, default=64)
    parser.add_argument("--lr", type=float, default=5e-4)
    parser.add_argument("--ema_decay", type=float, default=0.995)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--num_res_blocks", type=int, default=DEMO_CONFIG.num_res_blocks)
    parser.add_argument("--model_channels", type=int, default=DEMO_CONFIG.model_channels)
    parser.add_argument("--max_steps", type=int, default=0, help="stop after this many steps (0 = budget only)")
    parser.add_argument("--init-from", "--init_from", dest="init_from", default=None,
                        help="continue from this sag checkpoint (e.g. sag/assets/demo.pt): its weights, fresh Adam "
                             "and warm-up, data indices after the steps its .json records")
    args = parser.parse_args(argv)
    config = dataclasses.replace(DEMO_CONFIG, num_res_blocks=args.num_res_blocks, model_channels=args.model_channels)
    command = "python -m sag.demo_train " + " ".join(argv if argv is not None else sys.argv[1:])
    record = train(args.out, args.minutes, args.seed, args.batch_size, args.lr, args.ema_decay, config,
                   args.threads, max_steps=args.max_steps, command=command, init_from=args.init_from)
    print(json.dumps({k: v for k, v in record.items() if k != "loss_history"}, indent=1))


if __name__ == "__main__":
    main()
