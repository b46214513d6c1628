"""The Stable Diffusion pipeline: text -> latents -> image, with SAG / PAG / SEG / CFG guidance.

    pipe = load_pipeline("path/to/sd-folder")            # or an LDM single file + config_folder=
    images = pipe("a prompt", sag_scale=0.75)            # numpy [B x H x W x 3] float in [0, 1]

Arguments mean what they mean in diffusers' ``StableDiffusionSAGPipeline`` /
``StableDiffusionPAGPipeline`` (PROVENANCE.md of tests/fixtures/diffusers, "What a port must copy"):

1. text: ``[negative; positive]`` through the CLIP text encoder; negative = "" when
   ``negative_prompt`` is None; CFG only when ``guidance_scale > 1`` (the negative prompt is then
   ignored entirely);
2. latents: ``latents`` as given, or one standard-normal draw per sample from its own seed (draw 0
   of ``sag.seeding.SampleNoise``, as ``sag-sample`` draws x_T), times ``scheduler.init_noise_sigma``;
3. per step: the guided raw output (``sag.sd.guidance``), then ``scheduler.step``;
4. output: ``"latent"`` -> the final latents [B x 4 x h x w]; ``"np"`` -> ``vae.decode(latents /
   scaling_factor)``, ``(x / 2 + 0.5).clamp(0, 1)``, NHWC float32 numpy. The VAE always runs in float32.

Precision: ``dtype`` float32, or bfloat16 / float16 autocast for the U-Net's forward (float16 on CUDA
only); the latents, the guidance arithmetic, the scheduler and the VAE stay float32. The loop has no
host synchronisation: the timesteps are read once, before it.
"""
from __future__ import annotations

import inspect
import math
import numbers
from typing import Callable, List, NamedTuple, Optional, Sequence, Union

import torch

from sag.guidance import GuidanceError
from sag.seeding import SampleNoise

from .guidance import build_guidance, guided_output, salient_mask_of

OUTPUT_TYPES = ("np", "latent")
DTYPES = (torch.float32, torch.bfloat16, torch.float16)


class SDStepInfo(NamedTuple):
    """What ``callback`` sees after each denoising step."""
    index: int                            # 0 = the noisiest step
    t: Union[int, float]                  # the scheduler timestep
    latents: torch.Tensor                 # the step's output latents [B x 4 x h x w]
    model_output: torch.Tensor            # the guided raw output the step used [B x 4 x h x w]
    salient_mask: Optional[torch.Tensor]  # SAG's mask [B x 1 x h x w] (None without SAG)
    details: Optional[NamedTuple]         # the guidance method's intermediates (SAGStep, CFGStep, ...)


def check_precision(device, dtype: torch.dtype) -> torch.device:
    """The device (default CPU) after checking that ``dtype`` can run there (one line otherwise)."""
    device = torch.device(device) if device is not None else torch.device("cpu")
    if dtype not in DTYPES:
        raise GuidanceError(f"dtype must be one of float32, bfloat16, float16, got {dtype}")
    if dtype == torch.float16 and device.type != "cuda":
        raise GuidanceError("float16 autocast needs a CUDA device; use dtype=torch.bfloat16 on the CPU")
    return device


def _texts(value, name: str) -> List[str]:
    texts = [value] if isinstance(value, str) else list(value)
    if not texts or not all(isinstance(t, str) for t in texts):
        raise GuidanceError(f"{name} must be a string or a non-empty list of strings, got {value!r}")
    return texts


class StableDiffusionPipeline:
    """A loaded SD model: ``unet`` (unet.sd_unet.SDUNet), ``vae`` (unet.sd_vae.AutoencoderKL),
    ``text_encoder`` (unet.clip_text.CLIPTextModel), ``tokenizer`` (unet.clip_tokenizer.CLIPTokenizer),
    ``scheduler`` (diffusion.sd_schedulers). Built by :func:`sag.sd.load_pipeline`.

    dtype: the U-Net's compute precision (float32, or bfloat16 / float16 autocast); ``device`` where
    every module lives.
    """

    def __init__(self, unet, vae, text_encoder, tokenizer, scheduler, *, device=None,
                 dtype: torch.dtype = torch.float32, source: str = ""):
        device = check_precision(device, dtype)
        self.unet, self.vae, self.text_encoder = unet.to(device).eval(), vae.to(device).eval(), text_encoder.to(device).eval()
        self.tokenizer, self.scheduler = tokenizer, scheduler
        self.device, self.dtype, self.source = device, dtype, source

    @property
    def vae_scale_factor(self) -> int:
        """Pixels per latent cell: 2 ** (number of VAE levels - 1) (8 for SD)."""
        return self.vae.downsampling_factor

    @property
    def default_size(self) -> int:
        """diffusers' default height and width: unet sample_size * vae_scale_factor (512 for SD 1.5)."""
        return self.unet.sample_size * self.vae_scale_factor

    # -- text -------------------------------------------------------------------------------------

    @torch.no_grad()
    def _embed(self, texts: Sequence[str]) -> torch.Tensor:
        ids = self.tokenizer(list(texts)).to(self.device)                  # [N x 77]
        return self.text_encoder(ids).float()                              # [N x 77 x D]

    @torch.no_grad()
    def encode_prompt(self, prompt, negative_prompt=None, do_classifier_free_guidance: bool = True):
        """(prompt_embeds [B x L x D], negative_embeds [B x L x D] or None), as diffusers' ``encode_prompt``:
        the negative prompt is "" when None, one negative per prompt (a single one is repeated), and it
        is only encoded with CFG."""
        prompts = _texts(prompt, "prompt")
        cond = self._embed(prompts)
        if not do_classifier_free_guidance:
            return cond, None
        negatives = [""] * len(prompts) if negative_prompt is None else _texts(negative_prompt, "negative_prompt")
        if len(negatives) == 1:
            negatives = negatives * len(prompts)
        if len(negatives) != len(prompts):
            raise GuidanceError(f"{len(negatives)} negative prompts for {len(prompts)} prompts: give one, or one per prompt")
        return cond, self._embed(negatives)

    # -- latents <-> images -----------------------------------------------------------------------

    @torch.no_grad()
    def decode_latents(self, latents: torch.Tensor) -> torch.Tensor:
        """Images [B x 3 x H x W] in [0, 1], float32: vae.decode(latents / scaling_factor), x / 2 + 0.5."""
        with torch.autocast(self.device.type, enabled=False):
            decoded = self.vae.decode(latents.float() / self.vae.config.scaling_factor)
        return (decoded.float() / 2 + 0.5).clamp(0, 1)

    def _initial_latents(self, streams: SampleNoise, shape, latents) -> torch.Tensor:
        drawn = streams.randn(shape)       # draw 0 of every stream is x_T, even when latents are given (seeding.py)
        if latents is None:
            return drawn
        latents = torch.as_tensor(latents)
        if tuple(latents.shape) != tuple(drawn.shape):
            raise GuidanceError(f"latents have shape {tuple(latents.shape)}, expected {tuple(drawn.shape)} "
                                "(batch x latent channels x height/8 x width/8)")
        return latents.to(device=self.device, dtype=torch.float32)

    # -- the call ---------------------------------------------------------------------------------

    @torch.no_grad()
    def __call__(self, prompt, negative_prompt=None, height: Optional[int] = None, width: Optional[int] = None,
                 num_inference_steps: int = 50, guidance_scale: float = 7.5,
                 sag_scale: float = 0.0, sag_blur_sigma: float = 1.0,
                 pag_scale: float = 0.0, pag_applied_layers=("mid",),
                 seg_scale: float = 0.0, seg_sigma: float = math.inf, seg_applied_layers=("mid",),
                 eta: float = 0.0, latents: Optional[torch.Tensor] = None, seeds: Optional[Sequence[int]] = None,
                 output_type: str = "np", callback: Optional[Callable[[SDStepInfo], None]] = None):
        """Generate images for ``prompt`` (a string or a list); see the module docstring.

        Batch size: ``latents.shape[0]`` if latents are given, else ``len(seeds)`` if seeds are given,
        else the number of prompts (seeds 0, 1, ...); a single prompt is repeated over the batch.
        Returns numpy [B x H x W x 3] float32 in [0, 1] (``"np"``) or the final latents (``"latent"``).
        """
        if output_type not in OUTPUT_TYPES:
            raise GuidanceError(f"output_type must be one of {OUTPUT_TYPES}, got {output_type!r}")
        if isinstance(num_inference_steps, bool) or not isinstance(num_inference_steps, numbers.Integral) \
                or num_inference_steps < 1:
            raise GuidanceError(f"num_inference_steps must be an int >= 1, got {num_inference_steps!r}")
        prompts = _texts(prompt, "prompt")
        batch = int(latents.shape[0]) if latents is not None else len(seeds) if seeds is not None else len(prompts)
        seeds = list(range(batch)) if seeds is None else list(seeds)
        if len(seeds) != batch:
            raise GuidanceError(f"{len(seeds)} seeds for a batch of {batch}")
        if len(prompts) == 1:
            prompts = prompts * batch
        if len(prompts) != batch:
            raise GuidanceError(f"{len(prompts)} prompts for a batch of {batch}: give one prompt, or one per sample")
        height = self.default_size if height is None else height
        width = self.default_size if width is None else width
        factor = self.vae_scale_factor
        if height < factor or width < factor or height % factor or width % factor:
            raise GuidanceError(f"height and width must be positive multiples of {factor}, got {height}x{width}")
        do_cfg = guidance_scale > 1.0
        cond, uncond = self.encode_prompt(prompts, negative_prompt, do_cfg)
        guidance = build_guidance(self.unet, guidance_scale=guidance_scale, negative_embeds=uncond,
                                  sag_scale=sag_scale, sag_blur_sigma=sag_blur_sigma, pag_scale=pag_scale,
                                  pag_applied_layers=pag_applied_layers, seg_scale=seg_scale, seg_sigma=seg_sigma,
                                  seg_applied_layers=seg_applied_layers)

        shape = (self.unet.in_channels, height // factor, width // factor)
        streams = SampleNoise(seeds, self.device)
        x = self._initial_latents(streams, shape, latents)
        self.scheduler.set_timesteps(num_inference_steps, device=self.device)
        timesteps = self.scheduler.timesteps.tolist()                       # the one read, before the loop
        x = self.denoise(x * self.scheduler.init_noise_sigma, cond, guidance, timesteps, eta=eta, streams=streams,
                         callback=callback)
        if output_type == "latent":
            return x
        images = self.decode_latents(x)                                     # [B x 3 x H x W]
        return images.permute(0, 2, 3, 1).cpu().numpy()

    @torch.no_grad()
    def denoise(self, latents: torch.Tensor, prompt_embeds: torch.Tensor, guidance, timesteps: Sequence,
                eta: float = 0.0, streams: Optional[SampleNoise] = None,
                callback: Optional[Callable[[SDStepInfo], None]] = None) -> torch.Tensor:
        """The sampling loop: latents [B x C x h x w] (already times init_noise_sigma) through the
        scheduler's ``timesteps`` (Python numbers, read once before), each step's guided output from
        ``guidance`` (:func:`sag.sd.guidance.build_guidance`; None = plain) -> the final latents.
        Reads no tensor value on the host; eta > 0 draws each step's noise from ``streams``."""
        x = latents
        for index, t in enumerate(timesteps):
            guided = guided_output(guidance, self.unet, self.scheduler, t, x, prompt_embeds, self.dtype)
            x = self.scheduler.step(guided.output, t, x, **self._step_kwargs(eta, streams, x.shape[1:])).prev_sample
            if callback is not None:
                callback(SDStepInfo(index, t, x, guided.output, salient_mask_of(guided.details), guided.details))
        return x

    def _step_kwargs(self, eta: float, streams: SampleNoise, shape) -> dict:
        """The extra arguments of ``scheduler.step``: ``eta``, and for eta > 0 (DDIM) the step noise from
        each sample's own stream (draw 1 + step, as ``sag-sample`` draws it)."""
        if eta == 0:
            return {}
        if "noise" not in inspect.signature(self.scheduler.step).parameters:
            raise GuidanceError(f"eta={eta} needs the DDIM scheduler; {type(self.scheduler).__name__} is deterministic "
                                "(use eta=0)")
        return {"eta": float(eta), "noise": streams.randn(shape)}
