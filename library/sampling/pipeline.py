"""A small text-to-image pipeline over our own models: prompts -> text conds -> guided denoising -> VAE -> PIL.

One implementation serves the generators (`gen_img.py`, `sdxl_gen_img.py`) and sampling during training.
`generate_batch` renders several `ImageJob`s that share size, steps, sampler, scale and strength in one U-Net
batch; each job keeps its own seed, so an image does not depend on what else was in its batch. A family
difference is data here: SDXL's U-Net takes size conditioning because its config says so (`text_time`).
"""
from __future__ import annotations

import inspect
import logging
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field

import torch
from PIL import Image
from tqdm import tqdm

from library.families import ModelFamily
from library.sampling import img2img
from library.sampling.prompts import SamplePrompt, floor_size
from library.sampling.samplers import make_sampler
from library.text.encode import unwrap_encoder

logger = logging.getLogger(__name__)

SEED_RANGE = 2**32


@dataclass(frozen=True)
class SizeConditioning:
    """SDXL's micro-conditioning for one side of guidance: original (h, w), crop (top, left), target (h, w)."""

    original_hw: tuple[int, int]
    crop_top_left: tuple[int, int] = (0, 0)
    target_hw: tuple[int, int] | None = None

    def time_ids(self, image_hw: tuple[int, int]) -> list[int]:
        return [*self.original_hw, *self.crop_top_left, *(self.target_hw or image_hw)]


@dataclass
class ImageJob:
    """One image to render. Jobs rendered in one batch must agree on `batch_key()`.

    strength: img2img strength (0 keeps `init_image`, 1 ignores it); None for text-to-image.
    mask: inpainting mask (white = repaint), used with `init_image`.
    size / negative_size: SDXL size conditioning; None = original = target = image size, crop (0, 0).
    negative_scale: kohya's negative scale (`--nl`): guide away from the negative prompt with its own scale,
        relative to the empty prompt (see `guided_prediction`); None = plain classifier-free guidance.
    """

    prompt: str
    negative_prompt: str
    seed: int
    width: int
    height: int
    steps: int
    scale: float
    sampler: str
    strength: float | None = None
    init_image: Image.Image | None = None
    mask: Image.Image | None = None
    guidance_rescale: float = 0.0
    size: SizeConditioning | None = None
    negative_size: SizeConditioning | None = None
    negative_scale: float | None = None
    guide_images: tuple[Image.Image, ...] = ()  # ControlNet-LLLite: one guide image per model (settings.control)
    extra: dict = field(default_factory=dict)  # caller's bookkeeping (prompt index, network multipliers, ...)

    def batch_key(self) -> tuple:
        return (self.width, self.height, self.steps, self.scale, self.sampler, self.strength, self.guidance_rescale,
                self.init_image is not None, self.mask is not None, self.negative_scale, len(self.guide_images))


@dataclass
class GuidanceConds:
    """What the U-Net is conditioned on, batched as [negatives..., positives...] for classifier-free guidance
    (only positives when guidance is off), plus [empty prompts...] with a negative scale (kohya's batch order).
    `added_cond_kwargs` holds SDXL's pooled vector and size ids."""

    hidden_states: torch.Tensor
    guided: bool
    added_cond_kwargs: dict[str, torch.Tensor] | None = None
    negative_scale: float | None = None

    @property
    def parts(self) -> int:
        """How many copies of the latents one U-Net call takes (1, 2 or 3)."""
        return 1 if not self.guided else 2 if self.negative_scale is None else 3


@dataclass(frozen=True)
class RenderSettings:
    """How a batch is rendered (not part of what an image looks like)."""

    device: torch.device
    dtype: torch.dtype
    v_parameterization: bool = False
    zero_terminal_snr: bool = False
    max_chunks: int | None = None  # None: training's caption encoding; else the generators' (see CaptionEncoder)
    vae_batch_size: int | None = None
    offload: bool = False  # text encoders and VAE live on the CPU and visit `device` only while used (--lowram)
    show_progress: bool = True
    # conditions the U-Net from the jobs' guide images, per step (library/sampling/control.py: LLLiteControl)
    control: object | None = None


def uses_guidance(scale: float) -> bool:
    """kohya's sample pipelines (like diffusers') skip the negative pass unless the CFG scale is above 1."""
    return scale > 1.0


def _encode_text(caption_encoder, texts: list[str], max_chunks: int | None):
    return caption_encoder.encode(texts) if max_chunks is None else caption_encoder.encode_prompts(texts, max_chunks)


def encode_guidance_conds(caption_encoder, jobs: Sequence[ImageJob], *, guided: bool, sdxl_size_ids: bool,
                          settings: RenderSettings) -> GuidanceConds:
    """Encode all negative and positive prompts (and, with a negative scale, empty prompts) in one batch (one
    token length) plus SDXL size ids.

    SDXL without explicit size conditioning: original size = target size = image size, crop (0, 0), as kohya's
    sample pipeline does (COMPAT §14.4). The empty-prompt rows take the negative side's size ids, since they
    are the unconditional side of guidance.
    """
    negative_scale = jobs[0].negative_scale if guided else None
    unconditional = [""] * len(jobs) if negative_scale is not None else []
    texts = ([job.negative_prompt for job in jobs] if guided else []) + [job.prompt for job in jobs] + unconditional
    text_conds = _encode_text(caption_encoder, texts, settings.max_chunks)
    device, dtype = settings.device, settings.dtype
    hidden_states = text_conds.hidden_states.to(device=device, dtype=dtype)
    added_cond_kwargs = None
    if sdxl_size_ids:
        def ids(job: ImageJob, negative: bool) -> list[int]:
            image_hw = (job.height, job.width)
            chosen = (job.negative_size or job.size) if negative else job.size
            return (chosen or SizeConditioning(image_hw)).time_ids(image_hw)

        rows = ([ids(job, True) for job in jobs] if guided else []) + [ids(job, False) for job in jobs]
        rows += [ids(job, True) for job in jobs] if unconditional else []
        added_cond_kwargs = {"text_embeds": text_conds.pooled.to(device=device, dtype=dtype),
                             "time_ids": torch.tensor(rows, device=device, dtype=dtype)}
    return GuidanceConds(hidden_states, guided, added_cond_kwargs, negative_scale)


def rescale_guidance(guided: torch.Tensor, positive: torch.Tensor, rescale: float) -> torch.Tensor:
    """Lin et al. 2023 §3.4: scale the guided prediction to the positive prediction's per-sample std, then mix
    `rescale` of that with `1 - rescale` of the plain guided prediction (fixes over-exposure with zero-SNR)."""
    if not rescale:
        return guided
    dims = tuple(range(1, guided.dim()))
    matched = guided * (positive.std(dim=dims, keepdim=True) / guided.std(dim=dims, keepdim=True))
    return rescale * matched + (1.0 - rescale) * guided


def guided_prediction(unet, scheduler, latents: torch.Tensor, timestep: torch.Tensor, conds: GuidanceConds,
                      guidance_scale: float, dtype: torch.dtype, guidance_rescale: float = 0.0) -> torch.Tensor:
    """The U-Net's prediction for one step, with classifier-free guidance (Ho & Salimans 2022) when batched.

    With a negative scale (kohya gen_img.py's `--nl`) the unconditional prediction is the empty prompt's:
    uncond + scale·(positive − uncond) − negative_scale·(negative − uncond).
    """
    model_input = torch.cat([latents] * conds.parts) if conds.guided else latents
    model_input = scheduler.scale_model_input(model_input, timestep)
    prediction = unet(model_input.to(dtype), timestep, encoder_hidden_states=conds.hidden_states,
                      added_cond_kwargs=conds.added_cond_kwargs).sample.float()
    if not conds.guided:
        return prediction
    if conds.negative_scale is None:
        negative, positive = prediction.chunk(2)
        guided = negative + guidance_scale * (positive - negative)
    else:
        negative, positive, unconditional = prediction.chunk(3)
        guided = (unconditional + guidance_scale * (positive - unconditional)
                  - conds.negative_scale * (negative - unconditional))
    return rescale_guidance(guided, positive, guidance_rescale)


def initial_noise(generators: Sequence[torch.Generator], channels: int, latent_hw: tuple[int, int]) -> torch.Tensor:
    """`[B, C, h, w]` standard-normal noise, each image's from its own CPU generator: a seed gives the same image
    on any device and in any batch."""
    shape = (1, channels, *latent_hw)
    return torch.cat([torch.randn(shape, generator=generator, dtype=torch.float32) for generator in generators])


def decode_latents(vae, latents: torch.Tensor, vae_scale_factor: float, batch_size: int | None = None
                   ) -> list[Image.Image]:
    """Latents -> RGB PIL images, decoded in the VAE's own dtype, `batch_size` at a time (`--vae_batch_size`)."""
    parameter = next(vae.parameters())
    batch_size = batch_size or latents.shape[0]
    images = []
    for start in range(0, latents.shape[0], batch_size):
        chunk = (latents[start:start + batch_size] / vae_scale_factor).to(parameter.device, parameter.dtype)
        decoded = vae.decode(chunk).sample.float()
        if not torch.isfinite(decoded).all():
            logger.warning("the VAE produced NaN/inf pixels (a half-precision SDXL VAE overflows; use --no_half_vae)")
            decoded = torch.nan_to_num(decoded)
        images.extend(img2img.tensor_to_image(pixels) for pixels in decoded)
    return images


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


@contextmanager
def on_device(settings: RenderSettings, *modules: torch.nn.Module) -> Iterator[None]:
    """With `settings.offload`, move modules to the device for the block and back to the CPU afterwards."""
    if not settings.offload or settings.device.type == "cpu":
        yield
        return
    for module in modules:
        module.to(settings.device)
    try:
        yield
    finally:
        for module in modules:
            module.to("cpu")


def _autocast(device: torch.device, dtype: torch.dtype):
    # Training runs the frozen models under autocast (LoRA weights stay float32), so sampling does the same.
    enabled = dtype in (torch.float16, torch.bfloat16)
    return torch.autocast(device_type=device.type, dtype=dtype, enabled=enabled)


def _check_batch(jobs: Sequence[ImageJob]) -> None:
    if not jobs:
        raise ValueError("generate_batch needs at least one job")
    keys = {job.batch_key() for job in jobs}
    if len(keys) > 1:
        raise ValueError(f"jobs of one batch must share size, steps, scale, sampler and strength; got {keys}")


def _step_kwargs(scheduler, generators: list[torch.Generator]) -> dict:
    # diffusers' randn_tensor draws batch item i from generators[i]: ancestral noise stays per image.
    return {"generator": generators} if "generator" in inspect.signature(scheduler.step).parameters else {}


def _denoise(unet, scheduler, timesteps, latents: torch.Tensor, conds: GuidanceConds, job: ImageJob,
             generators: list[torch.Generator], settings: RenderSettings, inpaint: tuple | None) -> torch.Tensor:
    """Run `timesteps` from `latents`; with `inpaint` = (clean latents, noise, mask) the kept region is put back
    after every step at the noise level of the next step (clean after the last)."""
    extra = _step_kwargs(scheduler, generators)
    for index, timestep in enumerate(tqdm(timesteps, desc="sampling steps", leave=False,
                                          disable=not settings.show_progress)):
        if settings.control is not None:
            settings.control.at_step(index, len(timesteps))
        prediction = guided_prediction(unet, scheduler, latents, timestep, conds, job.scale, settings.dtype,
                                       job.guidance_rescale)
        latents = scheduler.step(prediction, timestep, latents, **extra).prev_sample
        if inpaint is not None:
            clean, noise, mask = inpaint
            known = clean
            if index + 1 < len(timesteps):
                known = scheduler.add_noise(clean, noise, timesteps[index + 1:index + 2])
            latents = mask * latents + (1.0 - mask) * known
    return latents


def _start_latents(vae, jobs, scheduler, timesteps, noise, settings, vae_scale_factor):
    """Noise × initial sigma for text-to-image; for img2img the encoded images noised to the first timestep.
    Returns (latents, clean image latents or None)."""
    job = jobs[0]
    if job.init_image is None:
        return noise * scheduler.init_noise_sigma, None
    pixels = torch.cat([img2img.image_to_tensor(item.init_image, (job.width, job.height)) for item in jobs])
    clean = img2img.encode_images(vae, pixels, vae_scale_factor, settings.vae_batch_size).to(settings.device)
    first = timesteps[:1].repeat(len(jobs))
    return scheduler.add_noise(clean, noise, first), clean


@torch.no_grad()
def generate_batch(jobs: Sequence[ImageJob], *, unet, vae, caption_encoder, vae_scale_factor: float,
                   settings: RenderSettings) -> list[Image.Image]:
    """Render jobs that share `batch_key()` in one U-Net batch; one image per job, in order.

    img2img with strength 0 runs no step and returns each init image (resized) unchanged.
    """
    _check_batch(jobs)
    job = jobs[0]
    if job.init_image is not None and job.strength is not None and int(job.steps * job.strength) == 0:
        return [img2img.resized_rgb(item.init_image, (job.width, job.height)) for item in jobs]
    unet_config = unwrap_encoder(unet).config  # a torch.compile wrapper is called, its model read
    device = settings.device
    scheduler = make_sampler(job.sampler, settings.v_parameterization, settings.zero_terminal_snr)
    scheduler.set_timesteps(job.steps, device=device)
    timesteps, _ = img2img.strength_timesteps(scheduler, job.steps, job.strength if job.init_image else None)
    generators = [torch.Generator("cpu").manual_seed(item.seed) for item in jobs]
    downscale = vae_downscale(vae)
    latent_hw = (job.height // downscale, job.width // downscale)
    sdxl_size_ids = getattr(unet_config, "addition_embed_type", None) == "text_time"
    logger.debug("rendering %d image(s) %dx%d, %d steps, %s", len(jobs), job.width, job.height, job.steps,
                 type(scheduler).__name__)
    with eval_mode(unet, vae, *caption_encoder.text_encoders), _autocast(device, settings.dtype):
        with on_device(settings, *caption_encoder.text_encoders):
            conds = encode_guidance_conds(caption_encoder, jobs, guided=uses_guidance(job.scale),
                                          sdxl_size_ids=sdxl_size_ids, settings=settings)
        noise = initial_noise(generators, unet_config.in_channels, latent_hw).to(device)
        with on_device(settings, vae):
            latents, clean = _start_latents(vae, jobs, scheduler, timesteps, noise, settings, vae_scale_factor)
        inpaint = None
        if job.mask is not None and clean is not None:
            mask = torch.cat([img2img.latent_mask(item.mask, latent_hw) for item in jobs]).to(device)
            inpaint = (clean, noise, mask)
        if settings.control is not None:
            settings.control.prepare(jobs, job.width, job.height, device)
        try:
            latents = _denoise(unet, scheduler, timesteps, latents, conds, job, generators, settings, inpaint)
        finally:
            if settings.control is not None:
                settings.control.finish()
        with on_device(settings, vae):
            return decode_latents(vae, latents, vae_scale_factor, settings.vae_batch_size)


@torch.no_grad()
def generate(request: SamplePrompt, *, family: ModelFamily, unet, vae, caption_encoder, sampler_name: str,
             device, dtype: torch.dtype, default_size: tuple[int, int], generator_seed: int | None,
             zero_terminal_snr: bool = False, show_progress: bool = True, control=None,
             guide_images: tuple = ()) -> Image.Image:
    """Generate one image for a training sample prompt.

    Args:
        sampler_name: used when the prompt names no sampler (`--ss`).
        default_size: (width, height) when the prompt gives none.
        generator_seed: overrides the prompt's seed; with neither, a seed is drawn from torch's global generator.
        zero_terminal_snr: sample with the rescaled schedule the model was trained with (`--zero_terminal_snr`).
        control / guide_images: ControlNet-LLLite (see RenderSettings.control, ImageJob.guide_images).
    """
    job = ImageJob(prompt=request.prompt, negative_prompt=request.negative_prompt,
                   seed=resolve_seed(generator_seed, request.seed),
                   width=floor_size(request.width or default_size[0]),
                   height=floor_size(request.height or default_size[1]), steps=request.steps, scale=request.scale,
                   sampler=request.sampler or sampler_name, guide_images=tuple(guide_images))
    settings = RenderSettings(device=torch.device(device), dtype=dtype, v_parameterization=family.v_parameterization,
                              zero_terminal_snr=zero_terminal_snr, show_progress=show_progress, control=control)
    return generate_batch([job], unet=unet, vae=vae, caption_encoder=caption_encoder,
                          vae_scale_factor=family.vae_scale_factor, settings=settings)[0]
