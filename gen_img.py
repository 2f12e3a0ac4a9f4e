"""Generate images with an SD1.x / SD2.x / SDXL model, LoRA and other networks, and textual-inversion embeddings.

    python gen_img.py --ckpt model.safetensors --network_weights my_lora.safetensors --network_mul 0.8 \\
        --prompt "a photo of a cat --n blurry --d 42" --images_per_prompt 4 --steps 30 --sampler euler_a --outdir out

Prompts may carry kohya's inline options (--n negative prompt, --w/--h size, --d seeds, --s steps, --l scale,
--nl negative scale, --t img2img strength, --am network multipliers, --ss sampler, SDXL --ow/--oh/--nw/--nh/--ct/
--cl). Every PNG stores its settings; regenerate one with --from_png. sdxl_gen_img.py is the same tool for SDXL models.
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

if __package__ in (None, ""):
    sys.path.insert(0, str(Path(__file__).resolve().parent))

from library.cli import run_cli

SDXL_ONLY = ("sdxl",)


def setup_parser(*, sdxl_script: bool = False) -> argparse.ArgumentParser:
    """Every generator flag, declared once in library/options/generation.py and shared with sdxl_gen_img.py."""
    from library.options import generation

    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    generation.add_generation_model_arguments(parser, sdxl_flag=not sdxl_script)
    generation.add_prompt_arguments(parser)
    generation.add_image_arguments(parser, default_size_help="default 1024 for SDXL" if sdxl_script else
                                   "default: 512 for SD1.x/SD2.x-512, 768 for SD2.x-v, 1024 for SDXL")
    generation.add_img2img_arguments(parser)
    generation.add_generation_network_arguments(parser)
    generation.add_output_and_performance_arguments(parser)
    return parser


def main(argv: list[str] | None = None, *, sdxl_script: bool = False) -> list[Path]:
    args = setup_parser(sdxl_script=sdxl_script).parse_args(argv)
    # imported after parsing, so --help and flag errors do not wait for torch and diffusers
    from library.generation.run import main as generate

    expected = SDXL_ONLY if sdxl_script or getattr(args, "sdxl", False) else None
    return generate(args, expected)


if __name__ == "__main__":
    run_cli(main)
