"""What `gen_img.py` and `sdxl_gen_img.py` do: check the flags, load the model, networks and embeddings, turn
prompts into image jobs, render them in batches and save PNGs that carry their settings.

Every check that needs no model runs before the model is loaded, so a typo costs seconds, not minutes.
"""
from __future__ import annotations

import argparse
import logging
import random
import sys
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field, replace
from pathlib import Path

import torch
from PIL import Image
from tqdm import tqdm

from library.data.images import is_image_file
from library.errors import FlagError, UserInputError
from library.families import ModelFamily
from library.generation import image_output, prompt_options
from library.generation.networks import AppliedNetworks, NetworkSpec, load_networks, network_specs
from library.generation.prompt_options import PromptOptions, SeedSource
from library.options import generation as defaults
from library.output_folders import check_writable_folder
from library.sampling.pipeline import ImageJob, RenderSettings, SizeConditioning, generate_batch, uses_guidance
from library.text import textual_inversion
from library.text.conditioning import CaptionEncoder

logger = logging.getLogger(__name__)

SIZE_MULTIPLE = 8


@dataclass
class Session:
    """The loaded model with its networks and embeddings, ready to render."""

    family: ModelFamily
    unet: torch.nn.Module
    vae: torch.nn.Module
    caption_encoder: CaptionEncoder
    networks: AppliedNetworks
    embeddings: list
    settings: RenderSettings
    model_name: str
    vae_name: str | None
    warned: set[str] = field(default_factory=set)  # notes on prompt options already logged


# ----------------------------------------------------------------------------------------------- checks


def _image_files(path: str | None, flag: str) -> list[Path]:
    """An image file, or the images of a folder in name order."""
    if not path:
        return []
    source = Path(path)
    if source.is_dir():
        files = sorted(item for item in source.iterdir() if is_image_file(item))
        if not files:
            raise FlagError(f"{flag} {path}: the folder has no images (.png, .jpg, .jpeg, .webp, .bmp)")
        return files
    if not source.is_file():
        raise FlagError(f"{flag} {path}: file not found")
    return [source]


def check_arguments(args: argparse.Namespace) -> None:
    """Flag combinations that cannot work, found before any model is read."""
    if not (args.prompt or args.from_file or args.interactive or args.from_png):
        raise FlagError("no prompts: give --prompt, --from_file, --from_png or --interactive")
    if args.fp16 and args.bf16:
        raise FlagError("--fp16 and --bf16 were both given; choose one")
    if args.mask_path and not args.image_path:
        raise FlagError("--mask_path needs --image_path (the image to inpaint)")
    if args.highres_fix_scale is not None and not 0.0 < args.highres_fix_scale < 1.0:
        raise FlagError(f"--highres_fix_scale: expected a fraction between 0 and 1 (e.g. 0.5), got "
                        f"{args.highres_fix_scale}")
    if args.clip_skip is not None and args.clip_skip < 1:
        raise FlagError(f"--clip_skip must be a positive integer (2 = penultimate layer), got {args.clip_skip}")
    if args.highres_fix_scale is not None and args.image_path:
        logger.warning("--highres_fix_scale applies to text-to-image; images from --image_path are rendered at "
                       "their size without it")
    check_writable_folder(args.outdir, "--outdir")
    for file in args.textual_inversion_embeddings or []:
        if not Path(file).is_file():
            raise FlagError(f"--textual_inversion_embeddings {file}: file not found")
    if args.xformers:
        try:
            import xformers.ops  # noqa: F401
        except Exception as error:  # a broken xformers build raises more than ImportError
            raise FlagError(f"--xformers: xformers could not be imported ({error}); use --sdpa") from error


def model_dtype(args: argparse.Namespace) -> torch.dtype:
    return torch.float16 if args.fp16 else torch.bfloat16 if args.bf16 else torch.float32


def vae_batch_size(args: argparse.Namespace) -> int | None:
    """kohya's --vae_batch_size: N images, or a fraction of --batch_size below 1; 0 = the whole batch."""
    value = args.vae_batch_size or 0
    if value <= 0:
        return None
    return max(1, int(value * args.batch_size)) if value < 1 else int(value)


# ----------------------------------------------------------------------------------------------- loading


def load_session(args: argparse.Namespace, specs: list[NetworkSpec], expected_families: tuple[str, ...] | None
                 ) -> Session:
    from library.models.load import detect_family, load_target_model
    from library.train.network_module import check_network_weights_family
    from library.text.tokenize import load_tokenizers

    family = detect_family(args.ckpt, args.v_parameterization, args.v2, expected_families, flag="--ckpt")
    for spec in specs:  # keys only: a wrong-family LoRA is refused before the model is read
        check_network_weights_family(spec.weights, family.name)
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    dtype = model_dtype(args)
    bundle = load_target_model(args.ckpt, v2=args.v2, v_parameterization=args.v_parameterization,
                               vae_path=args.vae, dtype=dtype, expected_families=expected_families)
    family = bundle.family  # v-prediction from --v_parameterization or the model's own scheduler/metadata
    _warn_unused_flags(args, family)
    tokenizers = load_tokenizers(family, args.tokenizer_cache_dir)
    embeddings = [textual_inversion.load_embedding(file, family, [encoder.config.hidden_size
                                                                  for encoder in bundle.text_encoders])
                  for file in args.textual_inversion_embeddings or []]
    if embeddings:
        tokenizers = textual_inversion.install_embeddings(embeddings, tokenizers, bundle.text_encoders)
        logger.info("textual inversion tokens: %s", ", ".join(embedding.token for embedding in embeddings))
    vae_dtype = torch.float32 if args.no_half_vae else dtype
    if next(bundle.vae.parameters()).dtype != vae_dtype:
        bundle.vae.to(dtype=vae_dtype)
    placement = "cpu" if args.lowram else device
    for encoder in bundle.text_encoders:
        encoder.to(placement)
    bundle.vae.to(placement)
    bundle.unet.to(device)
    networks = load_networks(specs, family=family, text_encoders=bundle.text_encoders, vae=bundle.vae,
                             unet=bundle.unet, merge=args.network_merge, device=device, dtype=dtype,
                             show_meta=args.network_show_meta)
    unet = _speed_options(args, bundle.unet, bundle.vae)
    for model in (unet, bundle.vae, *bundle.text_encoders):
        model.requires_grad_(False)
    caption_encoder = CaptionEncoder(family, tokenizers, bundle.text_encoders,
                                     clip_skip=None if family.name == "sdxl" else args.clip_skip)
    settings = RenderSettings(device=device, dtype=dtype, v_parameterization=family.v_parameterization,
                              max_chunks=args.max_embeddings_multiples or 1, vae_batch_size=vae_batch_size(args),
                              offload=args.lowram)
    return Session(family, unet, bundle.vae, caption_encoder, networks, embeddings, settings,
                   model_name=Path(args.ckpt).name, vae_name=Path(args.vae).name if args.vae else None)


def _warn_unused_flags(args: argparse.Namespace, family: ModelFamily) -> None:
    sdxl_only = [name for name in ("original_width", "original_height", "crop_top", "crop_left", "target_width",
                                   "target_height") if getattr(args, name) is not None
                 or getattr(args, f"{name}_negative") is not None]
    if family.name != "sdxl" and sdxl_only:
        logger.warning("--%s: size conditioning exists only for SDXL; ignored for this %s model", sdxl_only[0],
                       family.name)
    if family.name == "sdxl" and args.clip_skip is not None:
        logger.warning("--clip_skip does not apply to SDXL (it uses fixed layers of both encoders); ignored")


def _speed_options(args: argparse.Namespace, unet, vae):
    if args.xformers:
        unet.enable_xformers_memory_efficient_attention()
        vae.enable_xformers_memory_efficient_attention()
        logger.info("attention: xformers")
    if args.vae_tiling or (args.vae_slices or 0) > 0:
        vae.enable_tiling()
        logger.info("VAE: tiled encode/decode")
    if args.opt_channels_last:
        unet.to(memory_format=torch.channels_last)
    if args.torch_compile:
        logger.info("compiling the U-Net with torch.compile (the first batch of each size is slow)")
        return torch.compile(unet)
    return unet


# ----------------------------------------------------------------------------------------------- prompts -> jobs


def prompt_lines(args: argparse.Namespace) -> list[PromptOptions]:
    """Every non-interactive prompt, parsed (and so checked) before the model is loaded."""
    prompts: list[PromptOptions] = []
    if args.prompt:
        prompts.append(prompt_options.parse_generation_line(args.prompt, "--prompt"))
    if args.from_file:
        from_file = prompt_options.read_prompt_file(args.from_file)
        if args.shuffle_prompts:
            random.Random(args.seed).shuffle(from_file)
        prompts.extend(from_file)
    prompts.extend(options_from_png(png, args) for png in args.from_png or [])
    return prompts


def options_from_png(path: str, args: argparse.Namespace) -> PromptOptions:
    """What a PNG written by this tool says about its image, as a prompt line would (`--from_png`); the model,
    networks and embeddings still come from the command line (a differing model is pointed out)."""
    record = image_output.read_png_record(path)
    if record.model and record.model != Path(args.ckpt).name:
        logger.warning("%s was made with %s, now generating with %s", path, record.model, Path(args.ckpt).name)
    if record.image_path and not args.image_path:
        logger.warning("%s was made from the init image %s; give --image_path to regenerate it", path,
                       record.image_path)
    return PromptOptions(
        prompt=record.prompt, negative_prompt=record.negative_prompt, width=record.width, height=record.height,
        steps=record.steps, seeds=[record.seed], scale=record.scale, negative_scale=record.negative_scale,
        # the PNG records every negative scale used: none there means none, whatever --negative_scale says
        negative_scale_off=record.negative_scale is None, strength=record.strength,
        network_multipliers=record.network_multipliers,
        original_width=record.original_width, original_height=record.original_height,
        original_width_negative=record.original_width_negative,
        original_height_negative=record.original_height_negative, crop_top=record.crop_top,
        crop_left=record.crop_left, target_width=record.target_width, target_height=record.target_height,
        crop_top_negative=record.crop_top_negative, crop_left_negative=record.crop_left_negative,
        target_width_negative=record.target_width_negative, target_height_negative=record.target_height_negative,
        sampler=record.sampler, guidance_rescale=record.guidance_rescale, source=str(path))


def interactive_prompts(stream=None) -> Iterator[PromptOptions]:
    """Prompts typed on the console, one per line, until an empty line or end of input."""
    stream = stream or sys.stdin
    number = 0
    while True:
        print("prompt (empty line to quit)> ", end="", flush=True, file=sys.stderr)
        line = stream.readline()
        if not line or not line.strip():
            return
        number += 1
        try:
            yield prompt_options.parse_generation_line(line.strip(), f"interactive prompt {number}")
        except UserInputError as error:  # a typo should not end the session
            print(f"error: {error}", file=sys.stderr)


def _image_size(args, options: PromptOptions, family: ModelFamily, init_image: Image.Image | None) -> tuple[int, int]:
    """(width, height): the prompt's, else the flags', else the init image's (floored to 8), else the family's."""
    width, height = options.width or args.W, options.height or args.H
    if init_image is not None:
        width = width or max(64, init_image.width - init_image.width % SIZE_MULTIPLE)
        height = height or max(64, init_image.height - init_image.height % SIZE_MULTIPLE)
    return width or family.default_resolution, height or family.default_resolution


def _first(*values):
    return next((value for value in values if value is not None), None)


def _size_conditioning(args, options: PromptOptions, width: int, height: int) -> tuple[SizeConditioning,
                                                                                        SizeConditioning]:
    """SDXL size conditioning of the positive and the negative prompt: prompt options, then flags, then the
    image size (crop 0); each negative value defaults to the positive one (kohya)."""
    positive = SizeConditioning(
        original_hw=(_first(options.original_height, args.original_height, height),
                     _first(options.original_width, args.original_width, width)),
        crop_top_left=(_first(options.crop_top, args.crop_top, 0), _first(options.crop_left, args.crop_left, 0)),
        target_hw=(_first(options.target_height, args.target_height, height),
                   _first(options.target_width, args.target_width, width)))
    negative = SizeConditioning(
        original_hw=(_first(options.original_height_negative, args.original_height_negative, positive.original_hw[0]),
                     _first(options.original_width_negative, args.original_width_negative, positive.original_hw[1])),
        crop_top_left=(_first(options.crop_top_negative, args.crop_top_negative, positive.crop_top_left[0]),
                       _first(options.crop_left_negative, args.crop_left_negative, positive.crop_top_left[1])),
        target_hw=(_first(options.target_height_negative, args.target_height_negative, positive.target_hw[0]),
                   _first(options.target_width_negative, args.target_width_negative, positive.target_hw[1])))
    return positive, negative


class InitImages:
    """`--image_path` / `--mask_path` images, used in turn by successive jobs."""

    def __init__(self, args: argparse.Namespace):
        self.images = _image_files(args.image_path, "--image_path")
        self.masks = _image_files(args.mask_path, "--mask_path")
        self.count = 0

    def next(self) -> tuple[Path | None, Path | None]:
        if not self.images:
            return None, None
        index, self.count = self.count, self.count + 1
        mask = self.masks[index % len(self.masks)] if self.masks else None
        return self.images[index % len(self.images)], mask


def _open_image(path: Path | None, flag: str) -> Image.Image | None:
    if path is None:
        return None
    try:
        with Image.open(path) as image:
            image.load()
            return image.copy()
    except (OSError, ValueError) as error:
        raise FlagError(f"{flag} {path}: cannot read the image ({error})") from None


def jobs_for_prompt(args, session_family: ModelFamily, options: PromptOptions, seeds: SeedSource,
                    init_images: InitImages, rng: random.Random) -> Iterator[ImageJob]:
    """The images one prompt line asks for: wildcard variants × --images_per_prompt, each with its seed."""
    variants = prompt_options.expand_wildcards(options.prompt, rng)
    prompt_seeds = list(options.seeds) if options.seeds else None
    for variant in variants:
        for image_index in range(args.images_per_prompt):
            image_path, mask_path = init_images.next()
            init_image = _open_image(image_path, "--image_path")
            width, height = _image_size(args, options, session_family, init_image)
            strength = None
            if init_image is not None:
                strength = options.strength if options.strength is not None else (
                    args.strength if args.strength is not None else defaults.DEFAULT_STRENGTH)
            size, negative_size = _size_conditioning(args, options, width, height)
            scale = options.scale if options.scale is not None else args.scale
            yield ImageJob(
                prompt=variant, negative_prompt=options.negative_prompt or "",
                seed=seeds.next_seed(prompt_seeds, image_index), width=width, height=height,
                steps=options.steps or args.steps, scale=scale,
                negative_scale=requested_negative_scale(args, options) if uses_guidance(scale) else None,
                sampler=options.sampler or args.sampler, strength=strength, init_image=init_image,
                mask=_open_image(mask_path, "--mask_path"),
                guidance_rescale=options.guidance_rescale if options.guidance_rescale is not None
                else args.guidance_rescale,
                size=size, negative_size=negative_size,
                extra={"options": options, "image_path": image_path, "mask_path": mask_path})


def requested_negative_scale(args: argparse.Namespace, options: PromptOptions) -> float | None:
    """The prompt's `--nl`, else `--negative_scale`; `--nl none` turns it off (kohya)."""
    return None if options.negative_scale_off else _first(options.negative_scale, args.negative_scale)


def unused_option_notes(args: argparse.Namespace, family: ModelFamily, options: PromptOptions) -> list[str]:
    """What a prompt asks for that cannot apply to this run (said once per prompt source, then ignored)."""
    notes = []
    scale = options.scale if options.scale is not None else args.scale
    negative_scale = requested_negative_scale(args, options)
    if negative_scale is not None and not uses_guidance(scale):
        notes.append(f"{options.source}: --nl/--negative_scale {negative_scale} needs a CFG scale above 1 (got "
                     f"{scale}); ignored, as kohya does")
    if options.strength is not None and not args.image_path:
        notes.append(f"{options.source}: --t (img2img strength) applies only with --image_path; ignored")
    sdxl_only = [name for name, value in (("ow", options.original_width), ("oh", options.original_height),
                                          ("nw", options.original_width_negative),
                                          ("nh", options.original_height_negative), ("ct", options.crop_top),
                                          ("cl", options.crop_left), ("tw", options.target_width),
                                          ("th", options.target_height)) if value is not None]
    if sdxl_only and family.name != "sdxl":
        notes.append(f"{options.source}: --{sdxl_only[0]}: size conditioning exists only for SDXL; ignored for "
                     f"this {family.name} model")
    return notes


def batches(jobs: Iterable[ImageJob], batch_size: int) -> Iterator[list[ImageJob]]:
    """Consecutive jobs that can share a U-Net batch (same batch key and network multipliers), at most
    `batch_size` each."""
    batch: list[ImageJob] = []
    for job in jobs:
        if batch and (len(batch) == batch_size or _batch_identity(batch[0]) != _batch_identity(job)):
            yield batch
            batch = []
        batch.append(job)
    if batch:
        yield batch


def _batch_identity(job: ImageJob) -> tuple:
    multipliers = job.extra["options"].network_multipliers
    return job.batch_key(), tuple(multipliers) if multipliers else None


# ----------------------------------------------------------------------------------------------- render and save


def _floor_to_multiple(pixels: float) -> int:
    return max(64, int(pixels) - int(pixels) % SIZE_MULTIPLE)


def render(session: Session, args: argparse.Namespace, batch: list[ImageJob]) -> tuple[list[Image.Image], list]:
    """The batch's final images, and the first-stage images of a highres fix (empty without one)."""
    first_stage: list[Image.Image] = []
    if args.highres_fix_scale and batch[0].init_image is None:
        small = [replace(job, width=_floor_to_multiple(job.width * args.highres_fix_scale),
                         height=_floor_to_multiple(job.height * args.highres_fix_scale),
                         steps=args.highres_fix_steps, size=None, negative_size=None) for job in batch]
        first_stage = _generate(session, small)
        batch = [replace(job, init_image=image, strength=args.highres_fix_strength)
                 for job, image in zip(batch, first_stage)]
    return _generate(session, batch), first_stage


def _generate(session: Session, jobs: list[ImageJob]) -> list[Image.Image]:
    return generate_batch(jobs, unet=session.unet, vae=session.vae, caption_encoder=session.caption_encoder,
                          vae_scale_factor=session.family.vae_scale_factor, settings=session.settings)


def image_record(session: Session, args: argparse.Namespace, job: ImageJob, multipliers: list[float]
                 ) -> image_output.ImageRecord:
    """Everything needed to render `job` again, as stored in its PNG."""
    options: PromptOptions = job.extra["options"]
    sdxl = session.family.name == "sdxl"
    size, negative = job.size, job.negative_size
    return image_output.ImageRecord(
        prompt=job.extra["prompt"], raw_prompt=options.prompt if options.prompt != job.extra["prompt"] else None,
        negative_prompt=job.extra["negative_prompt"], seed=job.seed, steps=job.steps,
        scale=job.scale, negative_scale=job.negative_scale, sampler=job.sampler, width=job.width, height=job.height,
        strength=job.strength if job.extra["image_path"] is not None else None,
        guidance_rescale=job.guidance_rescale or None,
        clip_skip=None if sdxl else args.clip_skip, max_embeddings_multiples=args.max_embeddings_multiples,
        network_multipliers=list(multipliers) if len(session.networks) else None,
        original_width=size.original_hw[1] if sdxl else None, original_height=size.original_hw[0] if sdxl else None,
        original_width_negative=negative.original_hw[1] if sdxl else None,
        original_height_negative=negative.original_hw[0] if sdxl else None,
        crop_top=size.crop_top_left[0] if sdxl else None, crop_left=size.crop_top_left[1] if sdxl else None,
        target_width=size.target_hw[1] if sdxl else None, target_height=size.target_hw[0] if sdxl else None,
        crop_top_negative=negative.crop_top_left[0] if sdxl else None,
        crop_left_negative=negative.crop_top_left[1] if sdxl else None,
        target_width_negative=negative.target_hw[1] if sdxl else None,
        target_height_negative=negative.target_hw[0] if sdxl else None,
        highres_fix_scale=args.highres_fix_scale,
        highres_fix_steps=args.highres_fix_steps if args.highres_fix_scale else None,
        highres_fix_strength=args.highres_fix_strength if args.highres_fix_scale else None,
        image_path=str(job.extra["image_path"]) if job.extra["image_path"] else None,
        mask_path=str(job.extra["mask_path"]) if job.extra["mask_path"] else None,
        model=session.model_name, vae=session.vae_name,
        networks=session.networks.described(), network_merge=bool(args.network_merge and len(session.networks)),
        embeddings=[embedding.token for embedding in session.embeddings],
        v_parameterization=session.family.v_parameterization)


class ImageWriter:
    """Names and saves the PNGs of a run (never overwriting a file)."""

    def __init__(self, args: argparse.Namespace):
        self.folder = Path(args.outdir)
        self.sequential = args.sequential_file_name
        self.original_names = args.use_original_file_name
        self.highres = bool(args.highres_fix_scale)
        self.number = image_output.next_sequence_number(self.folder) if self.sequential else None
        self.written: list[Path] = []
        self.count = 0

    def file_name(self, job: ImageJob, index: int, timestamp: str, highres: bool) -> str:
        options: PromptOptions = job.extra["options"]
        if options.file_name:
            return image_output.prompt_file_name(options.file_name)
        if self.sequential:
            number, self.number = self.number, self.number + 1
            return image_output.sequential_file_name(number, highres=highres)
        if self.original_names and job.extra["image_path"] is not None:
            return image_output.original_file_name(job.extra["image_path"], index=index,
                                                   timestamp=timestamp, seed=job.seed, highres=highres)
        return image_output.image_file_name(timestamp=timestamp, index=index, seed=job.seed, highres=highres)

    def save(self, images: list[Image.Image], jobs: list[ImageJob], records: list, highres: bool) -> None:
        timestamp = image_output.file_timestamp()
        for image, job, record in zip(images, jobs, records):
            # kohya numbers images within their batch; a running number keeps names of one run distinct
            name = self.file_name(job, self.count, timestamp, highres)
            self.written.append(image_output.save_png(image, self.folder, name, record))
            self.count += 1


def run_jobs(session: Session, args: argparse.Namespace, jobs: Iterable[ImageJob], writer: ImageWriter,
             total: int | None) -> None:
    with tqdm(total=total, desc="images", unit="image") as progress:
        for batch in batches(jobs, args.batch_size):
            multipliers = session.networks.set_multipliers(batch[0].extra["options"].network_multipliers,
                                                           batch[0].extra["options"].source)
            images, first_stage = render(session, args, batch)
            records = [image_record(session, args, job, multipliers) for job in batch]
            if first_stage and args.highres_fix_save_1st:
                writer.save(first_stage, batch, [replace(record, width=image.width, height=image.height,
                                                         highres_fix_scale=None, highres_fix_steps=None,
                                                         highres_fix_strength=None, steps=args.highres_fix_steps)
                                                 for record, image in zip(records, first_stage)], highres=False)
            writer.save(images, batch, records, highres=bool(first_stage))
            progress.update(len(batch))


def _expanded_jobs(session: Session, args: argparse.Namespace, prompts: Iterable[PromptOptions],
                   seeds: SeedSource, init_images: InitImages, rng: random.Random) -> Iterator[ImageJob]:
    """Jobs with the embedding tokens expanded in the prompts the encoder sees (the PNG keeps what was typed)."""
    for options in prompts:
        check_multipliers(options, len(session.networks))
        for note in unused_option_notes(args, session.family, options):
            if note not in session.warned:
                session.warned.add(note)
                logger.warning(note)
        for job in jobs_for_prompt(args, session.family, options, seeds, init_images, rng):
            job.extra["prompt"], job.extra["negative_prompt"] = job.prompt, job.negative_prompt
            job.prompt = textual_inversion.expand_embedding_tokens(job.prompt, session.embeddings)
            job.negative_prompt = textual_inversion.expand_embedding_tokens(job.negative_prompt, session.embeddings)
            yield job


def check_multipliers(options: PromptOptions, network_count: int) -> None:
    """A prompt's `--am` needs one multiplier per network."""
    if options.network_multipliers is not None and len(options.network_multipliers) != network_count:
        raise FlagError(f"{options.source}: --am: expected {network_count} multiplier(s), one per "
                        f"--network_weights file, got {len(options.network_multipliers)}")


def main(args: argparse.Namespace, expected_families: tuple[str, ...] | None) -> list[Path]:
    """Generate every requested image; returns the written paths."""
    check_arguments(args)
    specs = network_specs(args.network_module, args.network_weights, args.network_mul, args.network_args)
    prompts = prompt_lines(args)
    InitImages(args)  # checks the paths now
    for options in prompts:
        check_multipliers(options, len(specs))
    session = load_session(args, specs, expected_families)
    writer = ImageWriter(args)
    rng = random.Random(args.seed)
    if prompts:
        seeds = SeedSource(args.seed, args.iter_same_seed, args.n_iter * len(prompts) * args.images_per_prompt)
        init_images = InitImages(args)

        def all_iterations() -> Iterator[ImageJob]:
            for _ in range(args.n_iter):
                seeds.start_iteration()
                yield from _expanded_jobs(session, args, prompts, seeds, init_images, rng)

        run_jobs(session, args, all_iterations(), writer, total=args.n_iter * len(prompts) * args.images_per_prompt)
    if args.interactive:
        seeds, init_images = SeedSource(args.seed, args.iter_same_seed, None), InitImages(args)
        for options in interactive_prompts():
            try:
                run_jobs(session, args, _expanded_jobs(session, args, [options], seeds, init_images, rng), writer,
                         total=args.images_per_prompt)
            except UserInputError as error:  # e.g. a wrong --am count: say so and wait for the next prompt
                print(f"error: {error}", file=sys.stderr)
    logger.info("wrote %d image(s) to %s", len(writer.written), writer.folder)
    return writer.written
