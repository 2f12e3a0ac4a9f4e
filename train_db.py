"""DreamBooth: fine-tune a whole SD1.x / SD2.x model on DreamBooth folders (`10_sks dog`) with regularization
images, with kohya's flags and file formats.

    accelerate launch train_db.py --pretrained_model_name_or_path model.safetensors \\
        --train_data_dir train --reg_data_dir reg --resolution 512 --output_dir out --output_name my_model \\
        --learning_rate 1e-6 --max_train_steps 1600 --prior_loss_weight 1.0 --mixed_precision bf16

The U-Net and the text encoder train (the text encoder until --stop_text_encoder_training); regularization
images count with --prior_loss_weight. The whole model is saved in --save_model_as. Arguments may also come from
`--config_file args.toml`.
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
    parser = fine_tune.setup_parser(dreambooth=True)
    parser.description = __doc__
    return parser


def main(argv: list[str] | None = None):
    from library.config_file import parse_args_with_config

    args = parse_args_with_config(setup_parser(), argv)
    return fine_tune.trainer_class("db")().train(args)


if __name__ == "__main__":
    run_cli(main)
