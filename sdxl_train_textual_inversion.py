"""Textual inversion for SDXL: train a new token's vectors for both text encoders (`clip_l` + `clip_g`) on a
frozen model, with kohya's flags and file format.

    accelerate launch sdxl_train_textual_inversion.py --pretrained_model_name_or_path sd_xl_base_1.0.safetensors \\
        --dataset_config dataset.toml --output_dir out --token_string mychar --init_word girl \\
        --num_vectors_per_token 4 --learning_rate 5e-3 --max_train_steps 1500 --save_model_as safetensors

Only the new vectors train. The file loads in A1111/Forge, ComfyUI and diffusers (clip_g into the second text
encoder). Arguments may also come from `--config_file args.toml`.
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

if __package__ in (None, ""):
    sys.path.insert(0, str(Path(__file__).resolve().parent))

from library.cli import run_cli

import train_textual_inversion


def setup_parser() -> argparse.ArgumentParser:
    parser = train_textual_inversion.setup_parser()
    parser.description = __doc__
    from library.options.model import add_sdxl_arguments

    add_sdxl_arguments(parser)
    return parser


def main(argv: list[str] | None = None):
    from library.config_file import parse_args_with_config

    args = parse_args_with_config(setup_parser(), argv)
    return train_textual_inversion.trainer_class(sdxl=True)().train(args)


if __name__ == "__main__":
    run_cli(main)
