"""Train a LoRA (or another network module) on an SD1.x / SD2.x model, with kohya's flags and file formats.

    accelerate launch train_network.py --pretrained_model_name_or_path model.safetensors \\
        --dataset_config dataset.toml --output_dir out --output_name my_lora --network_dim 16 --network_alpha 8 \\
        --learning_rate 1e-4 --max_train_epochs 10 --save_every_n_epochs 2 --mixed_precision bf16

Arguments may also come from `--config_file args.toml` (flags on the command line win). SDXL models are trained
with sdxl_train_network.py.
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

if __package__ in (None, ""):
    sys.path.insert(0, str(Path(__file__).resolve().parent))

from library.cli import run_cli


def setup_parser() -> argparse.ArgumentParser:
    """Every flag of network training, declared once in library/options and shared with the SDXL script."""
    from library.config_file import add_config_file_arguments
    from library.options import dataset, metadata, model, network, noise_loss, optimizer, sampling, training

    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    for add in (model.add_model_arguments, model.add_text_encoding_arguments, dataset.add_dataset_arguments,
                network.add_network_arguments, training.add_training_arguments, training.add_training_loop_arguments,
                training.add_output_arguments, optimizer.add_optimizer_arguments,
                noise_loss.add_noise_and_loss_arguments, sampling.add_sampling_arguments,
                metadata.add_metadata_arguments, training.add_logging_arguments, add_config_file_arguments):
        add(parser)
    return parser


def parse_args(parser: argparse.ArgumentParser, argv: list[str] | None):
    from library.config_file import parse_args_with_config

    return parse_args_with_config(parser, argv)


def main(argv: list[str] | None = None):
    args = parse_args(setup_parser(), argv)
    # imported after parsing, so --help and flag errors do not wait for torch and diffusers
    from library.train.network_trainer import NetworkTrainer

    return NetworkTrainer().train(args)


if __name__ == "__main__":
    run_cli(main)
