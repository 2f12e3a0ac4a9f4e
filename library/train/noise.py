"""Noise for training: kohya's DDPM schedule, the noise extras (offset, multires, input perturbation), timestep
sampling and the prediction target. Loss formulas and SNR weightings live in `library.train.loss`."""
from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import NamedTuple

import torch
import torch.nn.functional as F
from diffusers import DDPMScheduler

from library.options.choices import NUM_TRAIN_TIMESTEPS

logger = logging.getLogger(__name__)

# kohya's validation loss uses these fixed timesteps, each with the same seeded noise, so the value is comparable
# across steps (train_network.py: process_batch; COMPAT is silent, recalled from sd-scripts).
VALIDATION_TIMESTEPS = (10, 350, 500, 650, 990)
VALIDATION_SEED = 0


@dataclass(frozen=True)
class NoiseSettings:
    """The noise/timestep flag values (kohya spelling); None or False means the feature is off."""

    v_parameterization: bool = False
    zero_terminal_snr: bool = False
    noise_offset: float | None = None
    noise_offset_random_strength: bool = False
    adaptive_noise_scale: float | None = None
    multires_noise_iterations: int | None = None
    multires_noise_discount: float = 0.3
    ip_noise_gamma: float | None = None
    ip_noise_gamma_random_strength: bool = False
    min_timestep: int | None = None
    max_timestep: int | None = None


class NoisyBatch(NamedTuple):
    """What the UNet sees and what it should predict for one batch."""

    noisy_latents: torch.Tensor
    noise: torch.Tensor
    timesteps: torch.Tensor
    target: torch.Tensor


def _randn(shape: tuple[int, ...], like: torch.Tensor, generator: torch.Generator | None) -> torch.Tensor:
    """Standard normal noise drawn on the generator's device (so a CPU generator is reproducible), moved to `like`."""
    device = generator.device if generator is not None else like.device
    return torch.randn(shape, generator=generator, device=device, dtype=like.dtype).to(like.device)


def _uniform_scalar(generator: torch.Generator | None) -> float:
    """One U[0, 1) draw from `generator` (or torch's global generator)."""
    device = generator.device if generator is not None else "cpu"
    return float(torch.rand(1, generator=generator, device=device).item())


def rescale_zero_terminal_snr(betas: torch.Tensor) -> torch.Tensor:
    """Rescale betas so the last timestep has zero SNR, keeping the first (Lin et al. 2023, Algorithm 1)."""
    sqrt_alphas_cumprod = torch.cumprod(1.0 - betas, dim=0).sqrt()
    first, last = sqrt_alphas_cumprod[0].clone(), sqrt_alphas_cumprod[-1].clone()
    # Shift so the last value is 0, then scale so the first value is unchanged.
    sqrt_alphas_cumprod = (sqrt_alphas_cumprod - last) * (first / (first - last))
    alphas_cumprod = sqrt_alphas_cumprod**2
    alphas = torch.cat([alphas_cumprod[:1], alphas_cumprod[1:] / alphas_cumprod[:-1]])
    return 1.0 - alphas


def snr_from_alphas_cumprod(alphas_cumprod: torch.Tensor) -> torch.Tensor:
    """Signal-to-noise ratio alpha_bar / (1 - alpha_bar) of every timestep."""
    return alphas_cumprod / (1.0 - alphas_cumprod)


def make_noise_scheduler(v_parameterization: bool, zero_terminal_snr: bool) -> DDPMScheduler:
    """kohya's training scheduler: DDPM, scaled_linear betas 0.00085 -> 0.012, 1000 steps, no clipping (§14.5)."""
    scheduler = DDPMScheduler(
        num_train_timesteps=NUM_TRAIN_TIMESTEPS, beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear",
        clip_sample=False, prediction_type="v_prediction" if v_parameterization else "epsilon",
    )
    # kohya stores the SNR table *before* the zero-terminal-SNR rescale, so Min-SNR, debiased and v-pred-like
    # weights keep the original schedule's SNR (train_network.py: get_noise_scheduler calls
    # prepare_scheduler_for_custom_training first). This also keeps those weights finite at t=999.
    scheduler.all_snr = snr_from_alphas_cumprod(scheduler.alphas_cumprod)
    if zero_terminal_snr:
        betas = rescale_zero_terminal_snr(scheduler.betas)
        scheduler.betas = betas
        scheduler.alphas = 1.0 - betas
        scheduler.alphas_cumprod = torch.cumprod(scheduler.alphas, dim=0)
        logger.debug("noise schedule rescaled to zero terminal SNR")
    return scheduler


def snr_for_timesteps(scheduler: DDPMScheduler, timesteps: torch.Tensor) -> torch.Tensor:
    """SNR of each timestep: the scheduler's `all_snr` table when set (kohya), else from its alphas_cumprod."""
    table = getattr(scheduler, "all_snr", None)
    if table is None:
        table = snr_from_alphas_cumprod(scheduler.alphas_cumprod)
    return table.to(timesteps.device)[timesteps.long()]


def apply_noise_offset(noise: torch.Tensor, latents: torch.Tensor, noise_offset: float,
                       adaptive_noise_scale: float | None = None, random_strength: bool = False,
                       generator: torch.Generator | None = None) -> torch.Tensor:
    """Add a per-sample, per-channel constant `offset·N(0,1)[B,C,1,1]` (noise offset, Guttenberg 2023; COMPAT §14.5)."""
    if random_strength:
        noise_offset = _uniform_scalar(generator) * noise_offset
    offset: float | torch.Tensor = noise_offset
    if adaptive_noise_scale is not None:
        # kohya grows the offset with |mean latent| per channel, clamped at 0 for a negative scale.
        channel_mean = latents.mean(dim=(2, 3), keepdim=True).abs()
        offset = torch.clamp(noise_offset + adaptive_noise_scale * channel_mean, min=0.0)
    return noise + offset * _randn((latents.shape[0], latents.shape[1], 1, 1), latents, generator)


def pyramid_noise_like(noise: torch.Tensor, iterations: int, discount: float,
                       generator: torch.Generator | None = None) -> torch.Tensor:
    """Multi-resolution (pyramid) noise, Whitaker 2023: add upsampled coarse noise, rescale to unit std."""
    batch, channels, height, width = noise.shape
    pyramid = noise.float()
    for level in range(iterations):
        # kohya shrinks by a random factor in [2, 4) per level rather than exactly 2.
        shrink = (_uniform_scalar(generator) * 2 + 2) ** level
        level_height, level_width = max(1, int(height / shrink)), max(1, int(width / shrink))
        coarse = _randn((batch, channels, level_height, level_width), pyramid, generator)
        pyramid = pyramid + F.interpolate(coarse, size=(height, width), mode="bilinear") * discount**level
        if level_height == 1 or level_width == 1:
            break
    return (pyramid / pyramid.std()).to(noise.dtype)


def sample_timesteps(batch: int, min_timestep: int, max_timestep: int, generator: torch.Generator | None = None,
                     device: torch.device | str | None = None) -> torch.Tensor:
    """Uniform integer timesteps in [min_timestep, max_timestep), one per sample (COMPAT §14.5)."""
    draw_device = generator.device if generator is not None else "cpu"
    timesteps = torch.randint(min_timestep, max_timestep, (batch,), generator=generator, device=draw_device)
    return timesteps.long().to(device if device is not None else draw_device)


def add_noise(scheduler: DDPMScheduler, latents: torch.Tensor, noise: torch.Tensor, timesteps: torch.Tensor,
              ip_noise_gamma: float | None = None, ip_noise_gamma_random_strength: bool = False,
              generator: torch.Generator | None = None) -> torch.Tensor:
    """Forward diffusion; with `ip_noise_gamma`, input perturbation (Ning et al. 2023) on the noisy input only."""
    if ip_noise_gamma:
        strength = ip_noise_gamma
        if ip_noise_gamma_random_strength:
            strength = _uniform_scalar(generator) * ip_noise_gamma
        # The perturbation goes into the UNet input, never into the target (COMPAT §14.5).
        noise = noise + strength * _randn(tuple(latents.shape), latents, generator)
    return scheduler.add_noise(latents, noise, timesteps)


def training_target(scheduler: DDPMScheduler, latents: torch.Tensor, noise: torch.Tensor, timesteps: torch.Tensor,
                    v_parameterization: bool) -> torch.Tensor:
    """The UNet's target: velocity sqrt(a)·noise - sqrt(1-a)·x0 (Salimans & Ho 2022) or the noise itself."""
    if v_parameterization:
        return scheduler.get_velocity(latents, noise, timesteps)
    return noise


def prepare_noisy_latents(settings: NoiseSettings, scheduler: DDPMScheduler, latents: torch.Tensor,
                          generator: torch.Generator | None = None) -> NoisyBatch:
    """Noise, timesteps, noisy latents and target for one training batch, in kohya's order (COMPAT §14.5)."""
    noise = _randn(tuple(latents.shape), latents, generator)
    if settings.noise_offset:
        noise = apply_noise_offset(noise, latents, settings.noise_offset, settings.adaptive_noise_scale,
                                   settings.noise_offset_random_strength, generator)
    if settings.multires_noise_iterations:
        noise = pyramid_noise_like(noise, settings.multires_noise_iterations, settings.multires_noise_discount,
                                   generator)
    min_timestep = 0 if settings.min_timestep is None else settings.min_timestep
    max_timestep = scheduler.config.num_train_timesteps if settings.max_timestep is None else settings.max_timestep
    timesteps = sample_timesteps(latents.shape[0], min_timestep, max_timestep, generator, latents.device)
    noisy_latents = add_noise(scheduler, latents, noise, timesteps, settings.ip_noise_gamma,
                              settings.ip_noise_gamma_random_strength, generator)
    target = training_target(scheduler, latents, noise, timesteps, settings.v_parameterization)
    return NoisyBatch(noisy_latents, noise, timesteps, target)


def prepare_validation_noisy_latents(settings: NoiseSettings, scheduler: DDPMScheduler, latents: torch.Tensor,
                                     timestep: int, seed: int = VALIDATION_SEED) -> NoisyBatch:
    """Validation batch at one fixed timestep with seeded plain noise, so losses compare across training steps.

    The training-only extras (noise offset, multires, input perturbation) are left out: they add variance that
    would hide the change being measured.
    """
    generator = torch.Generator(device="cpu").manual_seed(seed)
    noise = _randn(tuple(latents.shape), latents, generator)
    timesteps = torch.full((latents.shape[0],), timestep, dtype=torch.long, device=latents.device)
    noisy_latents = scheduler.add_noise(latents, noise, timesteps)
    target = training_target(scheduler, latents, noise, timesteps, settings.v_parameterization)
    return NoisyBatch(noisy_latents, noise, timesteps, target)
