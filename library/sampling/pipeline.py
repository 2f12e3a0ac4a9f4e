"""A small text-to-image pipeline over our own models: prompt -> text conds -> guided denoising -> VAE -> PIL.

Conditioning goes through the training `CaptionEncoder`, so long and weighted prompts behave as in training.
Each step's guided prediction is one small function (`guided_prediction`) that generators can extend.
"""
from __future__ import annotations

import inspect
import logging
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass

import numpy as np
import torch
from PIL import Image
from tqdm import tqdm

from library.families import ModelFamily
from library.sampling.prompts import SamplePrompt, floor_size
from library.sampling.samplers import make_sampler
from library.text.encode import unwrap_encoder

logger = logging.getLogger(__name__)

SEED_RANGE = 2**32


@dataclass
class GuidanceConds:
    """What the U-Net is conditioned on, batched as [negative, positive] for classifier-free guidance
    (only [positive] when guidance is off). `added_cond_kwargs` holds SDXL's pooled vector and size ids."""

    hidden_states: torch.Tensor
    added_cond_kwargs: dict[str, torch.Tensor] | None = None

    @property
    def guided(self) -> bool:
        return self.hidden_states.shape[0] == 2


def uses_guidance(scale: float) -> bool:
    """kohya's sample pipelines (like diffusers') skip the negative pass unless the CFG scale is above 1."""
    return scale > 1.0


def encode_guidance_conds(caption_encoder, prompt: str, negative_prompt: str, *, guided: bool,
                          size_hw: tuple[int, int], sdxl_size_ids: bool, device, dtype) -> GuidanceConds:
    """Encode negative and positive prompt in one batch (equal token length) and add SDXL size conditioning.

    SDXL: original size = target size = (h, w), crop (0, 0), as kohya's sample pipeline does (COMPAT §14.4).
    """
    captions = [negative_prompt, prompt] if guided else [prompt]
    text_conds = caption_encoder.encode(captions)
    hidden_states = text_conds.hidden_states.to(device=device, dtype=dtype)
    added_cond_kwargs = None
    if sdxl_size_ids:
        height, width = size_hw
        time_ids = torch.tensor([[height, width, 0, 0, height, width]], device=device, dtype=dtype)
        added_cond_kwargs = {"text_embeds": text_conds.pooled.to(device=device, dtype=dtype),
                             "time_ids": time_ids.repeat(len(captions), 1)}
    return GuidanceConds(hidden_states, added_cond_kwargs)


def guided_prediction(unet, scheduler, latents: torch.Tensor, timestep: torch.Tensor, conds: GuidanceConds,
                      guidance_scale: float, dtype: torch.dtype) -> torch.Tensor:
    """The U-Net's prediction for one step, with classifier-free guidance (Ho & Salimans 2022) when batched."""
    batch = conds.hidden_states.shape[0]
    model_input = scheduler.scale_model_input(torch.cat([latents] * batch), timestep)
    prediction = unet(model_input.to(dtype), timestep, encoder_hidden_states=conds.hidden_states,
                      added_cond_kwargs=conds.added_cond_kwargs).sample.float()
    if not conds.guided:
        return prediction
    negative, positive = prediction.chunk(2)
    return negative + guidance_scale * (positive - negative)


def denoise(unet, scheduler, latents: torch.Tensor, conds: GuidanceConds, guidance_scale: float, *,
            generator: torch.Generator, dtype: torch.dtype, show_progress: bool = True) -> torch.Tensor:
    """Run the scheduler's timesteps from `latents` (float32) and return the final latents."""
    step_takes_generator = "generator" in inspect.signature(scheduler.step).parameters
    extra = {"generator": generator} if step_takes_generator else {}
    for timestep in tqdm(scheduler.timesteps, desc="sampling steps", leave=False, disable=not show_progress):
        prediction = guided_prediction(unet, scheduler, latents, timestep, conds, guidance_scale, dtype)
        latents = scheduler.step(prediction, timestep, latents, **extra).prev_sample
    return latents


def initial_latents(generator: torch.Generator, channels: int, size_hw: tuple[int, int], downscale: int,
                    init_noise_sigma: float | torch.Tensor, device) -> torch.Tensor:
    """`[1, C, h/downscale, w/downscale]` standard-normal noise (drawn on the generator's CPU) × the scheduler's
    initial sigma; drawing on CPU makes a seed give the same image on any device."""
    height, width = size_hw
    shape = (1, channels, height // downscale, width // downscale)
    noise = torch.randn(shape, generator=generator, device=generator.device, dtype=torch.float32)
    return noise.to(device) * init_noise_sigma


def decode_latents(vae, latents: torch.Tensor, vae_scale_factor: float) -> Image.Image:
    """Latents -> RGB PIL image, decoded in the VAE's own dtype."""
    parameter = next(vae.parameters())
    decoded = vae.decode((latents / vae_scale_factor).to(parameter.device, parameter.dtype)).sample.float()
    if not torch.isfinite(decoded).all():
        logger.warning("the VAE produced NaN/inf pixels (a half-precision SDXL VAE overflows; use --no_half_vae)")
        decoded = torch.nan_to_num(decoded)
    pixels = ((decoded[0].clamp(-1.0, 1.0) + 1.0) * 127.5).round().to(torch.uint8)
    return Image.fromarray(pixels.permute(1, 2, 0).cpu().numpy().astype(np.uint8))


def vae_downscale(vae) -> int:
    """Pixels per latent cell: 2 per VAE down block after the first (8 for SD's VAE)."""
    return 2 ** (len(vae.config.block_out_channels) - 1)


def resolve_seed(generator_seed: int | None, request_seed: int | None) -> int:
    """The explicit seed, else the prompt's, else one drawn from torch's global generator (so `--seed` makes
    even unseeded samples repeatable, as in kohya)."""
    for seed in (generator_seed, request_seed):
        if seed is not None:
            return int(seed)
    return int(torch.randint(0, SEED_RANGE, (1,)).item())


@contextmanager
def eval_mode(*modules: torch.nn.Module | None) -> Iterator[None]:
    """Put modules in eval mode and give every submodule back its own training flag afterwards."""
    saved = [(module, module.training) for root in modules if root is not None for module in root.modules()]
    for root in modules:
        if root is not None:
            root.eval()
    try:
        yield
    finally:
        for module, training in saved:
            module.training = training


def _autocast(device: torch.device, dtype: torch.dtype):
    # Training runs the frozen models under autocast (LoRA weights stay float32), so sampling does the same.
    enabled = dtype in (torch.float16, torch.bfloat16)
    return torch.autocast(device_type=device.type, dtype=dtype, enabled=enabled)


@torch.no_grad()
def generate(request: SamplePrompt, *, family: ModelFamily, unet, vae, caption_encoder, sampler_name: str,
             device, dtype: torch.dtype, default_size: tuple[int, int], generator_seed: int | None,
             zero_terminal_snr: bool = False, show_progress: bool = True) -> Image.Image:
    """Generate one image for a sample prompt.

    Args:
        sampler_name: used when the prompt names no sampler (`--ss`).
        default_size: (width, height) when the prompt gives none.
        generator_seed: overrides the prompt's seed; with neither, a seed is drawn from torch's global generator.
        zero_terminal_snr: sample with the rescaled schedule the model was trained with (`--zero_terminal_snr`).
    """
    device = torch.device(device)
    unet = unwrap_encoder(unet)
    width = floor_size(request.width or default_size[0])
    height = floor_size(request.height or default_size[1])
    seed = resolve_seed(generator_seed, request.seed)
    generator = torch.Generator("cpu").manual_seed(seed)
    scheduler = make_sampler(request.sampler or sampler_name, family.v_parameterization, zero_terminal_snr)
    scheduler.set_timesteps(request.steps, device=device)
    sdxl_size_ids = getattr(unet.config, "addition_embed_type", None) == "text_time"
    logger.debug("sampling %dx%d, seed %d, %d steps, %s: %s", width, height, seed, request.steps,
                 type(scheduler).__name__, request.prompt)
    with eval_mode(unet, vae, *caption_encoder.text_encoders), _autocast(device, dtype):
        conds = encode_guidance_conds(caption_encoder, request.prompt, request.negative_prompt,
                                      guided=uses_guidance(request.scale), size_hw=(height, width),
                                      sdxl_size_ids=sdxl_size_ids, device=device, dtype=dtype)
        latents = initial_latents(generator, unet.config.in_channels, (height, width), vae_downscale(vae),
                                  scheduler.init_noise_sigma, device)
        latents = denoise(unet, scheduler, latents, conds, request.scale, generator=generator, dtype=dtype,
                          show_progress=show_progress)
    return decode_latents(vae, latents, family.vae_scale_factor)
