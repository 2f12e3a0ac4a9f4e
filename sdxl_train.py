"""Fine-tune a whole SDXL model (fine-tuning metadata or DreamBooth datasets), with kohya's flags and formats.

    accelerate launch sdxl_train.py --pretrained_model_name_or_path sd_xl_base_1.0.safetensors \\
        --dataset_config dataset.toml --output_dir out --output_name my_sdxl --learning_rate 4e-7 \\
        --optimizer_type Adafactor --optimizer_args scale_parameter=False relative_step=False warmup_init=False \\
        --gradient_checkpointing --cache_latents_to_disk --cache_text_encoder_outputs --mixed_precision bf16

The U-Net trains at --learning_rate (0 = frozen) or per block with --block_lr; with --train_text_encoder the
encoders train at --learning_rate_te1 / --learning_rate_te2 (TE1's last layer stays frozen). The whole model is
saved in --save_model_as. Arguments may also come from `--config_file args.toml`.
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

if __package__ in (None, ""):
    sys.path.insert(0, str(Path(__file__).resolve().parent))

from library.cli import run_cli

import fine_tune


def setup_parser() -> argparse.ArgumentParser:
    parser = fine_tune.setup_parser(sdxl=True)
    parser.description = __doc__
    from library.options.model import add_sdxl_arguments

    add_sdxl_arguments(parser)
    return parser


def main(argv: list[str] | None = None):
    from library.config_file import parse_args_with_config

    args = parse_args_with_config(setup_parser(), argv)
    return fine_tune.trainer_class("sdxl")().train(args)


if __name__ == "__main__":
    run_cli(main)
