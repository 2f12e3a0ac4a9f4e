"""Starting from an image instead of noise: pixels <-> tensors, the strength -> timesteps rule, and inpainting masks.

img2img (SDEdit, Meng et al. 2022): encode the image, noise it to the timestep that `strength` picks and denoise
from there. Inpainting without an inpainting model blends the known region back after every step (white mask
pixels are repainted, black ones kept, as kohya's and diffusers' legacy inpainting pipelines do).
"""
from __future__ import annotations

import numpy as np
import torch
from PIL import Image

RESAMPLE = Image.Resampling.LANCZOS


def image_to_tensor(image: Image.Image, size_wh: tuple[int, int]) -> torch.Tensor:
    """RGB image resized to (width, height) -> `[1, 3, H, W]` float in [-1, 1]."""
    image = image.convert("RGB")
    if image.size != tuple(size_wh):
        image = image.resize(size_wh, RESAMPLE)
    pixels = torch.from_numpy(np.asarray(image, dtype=np.float32) / 127.5 - 1.0)
    return pixels.permute(2, 0, 1).unsqueeze(0)


def tensor_to_image(pixels: torch.Tensor) -> Image.Image:
    """`[3, H, W]` in [-1, 1] -> RGB PIL image (values outside are clamped)."""
    values = ((pixels.float().clamp(-1.0, 1.0) + 1.0) * 127.5).round().to(torch.uint8)
    return Image.fromarray(values.permute(1, 2, 0).cpu().numpy())


def resized_rgb(image: Image.Image, size_wh: tuple[int, int]) -> Image.Image:
    image = image.convert("RGB")
    return image if image.size == tuple(size_wh) else image.resize(size_wh, RESAMPLE)


def latent_mask(mask: Image.Image, latent_hw: tuple[int, int]) -> torch.Tensor:
    """Mask image -> `[1, 1, h, w]` in [0, 1] at latent size; 1 = repaint (white), 0 = keep (black)."""
    height, width = latent_hw
    gray = mask.convert("L").resize((width, height), Image.Resampling.BILINEAR)
    return torch.from_numpy(np.asarray(gray, dtype=np.float32) / 255.0)[None, None]


def strength_timesteps(scheduler, steps: int, strength: float | None) -> tuple[torch.Tensor, int]:
    """The scheduler's timesteps for `steps` steps, cut to the last `int(steps * strength)` for img2img.

    Returns (timesteps, first index into the schedule). Also tells the scheduler where it starts, so that the
    sigma-based (k-diffusion style) schedulers noise and step from the right place.
    """
    timesteps = scheduler.timesteps
    if strength is None:
        return timesteps, 0
    kept_steps = min(int(steps * strength), steps)
    start = (steps - kept_steps) * scheduler.order
    if hasattr(scheduler, "set_begin_index"):
        scheduler.set_begin_index(start)
    return timesteps[start:], start


@torch.no_grad()
def encode_images(vae, pixels: torch.Tensor, vae_scale_factor: float, batch_size: int | None = None) -> torch.Tensor:
    """`[B, 3, H, W]` pixels -> latents × scale factor, using the posterior mean (the same latents every run)."""
    parameter = next(vae.parameters())
    batch_size = batch_size or pixels.shape[0]
    parts = []
    for start in range(0, pixels.shape[0], batch_size):
        chunk = pixels[start:start + batch_size].to(parameter.device, parameter.dtype)
        parts.append(vae.encode(chunk).latent_dist.mean.float())
    return torch.cat(parts) * vae_scale_factor
