"""Flags of the image generators (`gen_img.py`, `sdxl_gen_img.py`): kohya's spelling and defaults, declared once."""
from __future__ import annotations

import argparse

from library.options.value_types import fraction, positive_int
from library.options.choices import SAMPLER_NAMES

DEFAULT_STEPS = 50
DEFAULT_SCALE = 7.5
DEFAULT_SAMPLER = "ddim"
DEFAULT_STRENGTH = 0.8
DEFAULT_HIGHRES_FIX_STEPS = 28
DEFAULT_HIGHRES_FIX_STRENGTH = 0.5
DEFAULT_OUTDIR = "outputs"




def _image_size(value: str) -> int:
    number = int(value)
    if number < 64 or number % 8:
        lower = max(64, number - number % 8)
        raise argparse.ArgumentTypeError(f"expected a multiple of 8 >= 64, got {value}; did you mean {lower} or "
                                         f"{lower + 8}?")
    return number


def _seed(value: str) -> int:
    number = int(value)
    if number < 0:
        raise argparse.ArgumentTypeError(f"expected a whole-number seed >= 0, got {value!r}")
    return number


def add_generation_model_arguments(parser: argparse.ArgumentParser, *, sdxl_flag: bool) -> None:
    group = parser.add_argument_group("model")
    group.add_argument("--ckpt", type=str, required=True,
                       help="model: single-file checkpoint (.safetensors/.ckpt, LDM or SGM layout) or diffusers "
                            "folder; the family (SD1.x / SD2.x / SDXL) is detected from it")
    group.add_argument("--vae", type=str, default=None, help="use this VAE instead of the checkpoint's")
    group.add_argument("--v2", action="store_true", help="the model is SD2.x (checked against the file)")
    group.add_argument("--v_parameterization", action="store_true",
                       help="the model predicts velocity (SD2.x 768-v, v-prediction SDXL fine-tunes): sample with "
                            "v-prediction; files that record modelspec.prediction_type = v need no flag")
    if sdxl_flag:
        group.add_argument("--sdxl", action="store_true", help="the model is SDXL (checked against the file)")
    group.add_argument("--tokenizer_cache_dir", type=str, default=None,
                       help="folder to save tokenizers to and load them from (built offline when missing)")
    group.add_argument("--textual_inversion_embeddings", type=str, nargs="*", default=None,
                       help="embedding files (.safetensors/.pt); each file's name (without extension) is its token, "
                            "write it in prompts")


def add_prompt_arguments(parser: argparse.ArgumentParser) -> None:
    group = parser.add_argument_group("prompts")
    group.add_argument("--prompt", type=str, default=None,
                       help='prompt, with optional inline options, e.g. "a cat --n blurry --w 768 --d 42"')
    group.add_argument("--from_file", type=str, default=None,
                       help="text file with one prompt (and inline options) per line; # starts a comment line")
    group.add_argument("--from_png", type=str, nargs="*", default=None,
                       help="regenerate images from the settings stored in PNGs written by this tool")
    group.add_argument("--interactive", action="store_true", help="read prompts from the console, one per line")
    group.add_argument("--shuffle_prompts", action="store_true", help="shuffle the prompts of --from_file")
    group.add_argument("--images_per_prompt", type=positive_int, default=1, help="images per prompt (default 1)")
    group.add_argument("--n_iter", type=positive_int, default=1, help="repeat all prompts this many times")
    group.add_argument("--batch_size", type=positive_int, default=1,
                       help="images rendered together (same size, steps and scale)")
    group.add_argument("--seed", type=_seed, default=None,
                       help="seed; the image seeds are drawn from it (one image: this seed itself); default random")
    group.add_argument("--iter_same_seed", action="store_true",
                       help="without --seed: all images of one --n_iter iteration use the same random seed")
    group.add_argument("--max_embeddings_multiples", type=positive_int, default=None,
                       help="allow prompts of up to 75 × N tokens (encoded in 75-token chunks); default 1 (75 tokens)")
    group.add_argument("--clip_skip", type=int, default=None,
                       help="use the output of the k-th last text-encoder layer (2 = penultimate); SD1.x")


def add_image_arguments(parser: argparse.ArgumentParser, *, default_size_help: str) -> None:
    group = parser.add_argument_group("image and sampling")
    group.add_argument("--W", type=_image_size, default=None, help=f"image width ({default_size_help})")
    group.add_argument("--H", type=_image_size, default=None, help=f"image height ({default_size_help})")
    group.add_argument("--steps", type=positive_int, default=DEFAULT_STEPS,
                       help=f"denoising steps (default {DEFAULT_STEPS})")
    group.add_argument("--sampler", type=str.lower, default=DEFAULT_SAMPLER, choices=SAMPLER_NAMES,
                       help=f"sampler (default {DEFAULT_SAMPLER})")
    group.add_argument("--scale", type=float, default=DEFAULT_SCALE,
                       help=f"classifier-free guidance scale (default {DEFAULT_SCALE}; 1 or less: no negative pass)")
    group.add_argument("--negative_scale", type=float, default=None,
                       help="kohya's negative scale: guide from the empty prompt, toward the prompt by --scale and "
                            "away from the negative prompt by this factor (3 U-Net passes per step); a prompt's --nl "
                            "overrides it, --nl none turns it off; needs --scale above 1 (default: off)")
    group.add_argument("--guidance_rescale", type=fraction, default=0.0,
                       help="rescale the guided prediction toward the positive one's std (0..1, 0.7 is common with "
                            "zero-terminal-SNR models)")
    sizes = group.add_argument_group("SDXL size conditioning (default: the image size, crop 0)")
    for name, what in (("original_width", "original width"), ("original_height", "original height"),
                       ("crop_top", "crop top"), ("crop_left", "crop left"), ("target_width", "target width"),
                       ("target_height", "target height")):
        sizes.add_argument(f"--{name}", type=int, default=None, help=f"SDXL conditioning: {what}")
        sizes.add_argument(f"--{name}_negative", type=int, default=None,
                           help=f"SDXL conditioning of the negative prompt: {what} (default: the positive one's)")


def add_img2img_arguments(parser: argparse.ArgumentParser) -> None:
    group = parser.add_argument_group("image to image, inpainting, highres fix")
    group.add_argument("--image_path", type=str, default=None,
                       help="init image, or a folder of them (used in turn): image-to-image")
    group.add_argument("--mask_path", type=str, default=None,
                       help="inpainting mask (or folder), white = repaint, black = keep; needs --image_path")
    group.add_argument("--strength", type=fraction, default=None,
                       help=f"img2img strength: 0 returns the image, 1 ignores it (default {DEFAULT_STRENGTH})")
    group.add_argument("--use_original_file_name", action="store_true",
                       help="name outputs after their init image (img2img)")
    group.add_argument("--highres_fix_scale", type=float, default=None,
                       help="highres fix: render at this fraction of the size first (e.g. 0.5), then upscale and "
                            "refine with img2img")
    group.add_argument("--highres_fix_steps", type=positive_int, default=DEFAULT_HIGHRES_FIX_STEPS,
                       help=f"steps of the first highres-fix stage (default {DEFAULT_HIGHRES_FIX_STEPS})")
    group.add_argument("--highres_fix_strength", type=fraction, default=DEFAULT_HIGHRES_FIX_STRENGTH,
                       help=f"img2img strength of the second stage (default {DEFAULT_HIGHRES_FIX_STRENGTH})")
    group.add_argument("--highres_fix_save_1st", action="store_true", help="also save the first-stage images")


def add_generation_network_arguments(parser: argparse.ArgumentParser) -> None:
    group = parser.add_argument_group("networks (LoRA, LyCORIS, DyLoRA)")
    group.add_argument("--network_module", type=str, nargs="*", default=None,
                       help="module per network (networks.lora, lycoris.kohya, ...); one for all; default "
                            "networks.lora")
    group.add_argument("--network_weights", type=str, nargs="*", default=None, help="network files, one per network")
    group.add_argument("--network_mul", type=float, nargs="*", default=None,
                       help="multiplier per network (default 1.0); a prompt's --am overrides them")
    group.add_argument("--network_args", type=str, nargs="*", default=None,
                       help='extra arguments per network: "key=value;key=value"')
    group.add_argument("--network_merge", action="store_true",
                       help="merge the networks into the weights once (no per-step cost; --am is then ignored)")
    group.add_argument("--network_show_meta", action="store_true", help="log each network file's metadata")


def add_output_and_performance_arguments(parser: argparse.ArgumentParser) -> None:
    group = parser.add_argument_group("output")
    group.add_argument("--outdir", type=str, default=DEFAULT_OUTDIR,
                       help=f"folder for the PNGs (default {DEFAULT_OUTDIR}); existing files are never overwritten")
    group.add_argument("--sequential_file_name", action="store_true",
                       help="name images im_000001.png, ... (continuing after the numbers already there)")
    perf = parser.add_argument_group("precision and speed")
    perf.add_argument("--fp16", action="store_true", help="run the models in float16")
    perf.add_argument("--bf16", action="store_true", help="run the models in bfloat16")
    perf.add_argument("--no_half_vae", action="store_true",
                      help="keep the VAE in float32 (the SDXL VAE overflows in float16)")
    perf.add_argument("--xformers", action="store_true", help="xformers attention (GPU)")
    perf.add_argument("--sdpa", action="store_true", help="PyTorch scaled-dot-product attention (the default)")
    perf.add_argument("--vae_batch_size", type=float, default=0,
                      help="images per VAE encode/decode call: N, or a fraction of --batch_size if below 1 "
                           "(default: all at once)")
    perf.add_argument("--vae_slices", type=int, default=None,
                      help="decode large images in tiles to save memory (any value > 0 turns tiling on)")
    perf.add_argument("--vae_tiling", action="store_true", help="decode large images in tiles to save memory")
    perf.add_argument("--lowram", action="store_true",
                      help="keep the text encoders and VAE in system RAM and move each to the GPU only while used")
    perf.add_argument("--torch_compile", action="store_true",
                      help="compile the U-Net with torch.compile (slow first batch, faster afterwards)")
    perf.add_argument("--opt_channels_last", action="store_true", help="channels-last memory format for the U-Net")
    perf.add_argument("--console_log_level", type=str, default=None, help="DEBUG, INFO (default), WARNING")
