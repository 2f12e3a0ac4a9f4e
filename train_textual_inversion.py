"""Textual inversion for SD1.x / SD2.x: train a new token's embedding vectors on a frozen model, with kohya's
flags and file formats.

    accelerate launch train_textual_inversion.py --pretrained_model_name_or_path model.safetensors \\
        --dataset_config dataset.toml --output_dir out --token_string mychar --init_word girl \\
        --num_vectors_per_token 4 --learning_rate 5e-3 --max_train_steps 1500 --save_model_as safetensors

Only the new vectors train (the encoders, the U-Net and every other embedding row stay bit-identical). Captions
(or --use_object_template / --use_style_template) name the token; the file (`emb_params`) is named after it
unless --output_name is given and loads in A1111/Forge, ComfyUI and diffusers. Arguments may also come from
`--config_file args.toml`.
"""
from __future__ import annotations

import argparse
import functools
import sys
from pathlib import Path

if __package__ in (None, ""):
    sys.path.insert(0, str(Path(__file__).resolve().parent))

from library.cli import run_cli


def setup_parser() -> argparse.ArgumentParser:
    """The shared training flags plus those of textual inversion (no network flags: the vectors train)."""
    from library.config_file import add_config_file_arguments
    from library.options import (dataset, metadata, model, noise_loss, optimizer, sampling, textual_inversion,
                                 training)

    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    for add in (model.add_model_arguments, model.add_text_encoding_arguments, dataset.add_dataset_arguments,
                training.add_training_arguments, training.add_training_loop_arguments,
                training.add_output_arguments, optimizer.add_optimizer_arguments,
                noise_loss.add_noise_and_loss_arguments, sampling.add_sampling_arguments,
                metadata.add_metadata_arguments, training.add_logging_arguments,
                textual_inversion.add_textual_inversion_arguments, add_config_file_arguments):
        add(parser)
    return parser


@functools.cache
def trainer_class(sdxl: bool = False) -> type:
    """kohya's TextualInversionTrainer / SdxlTextualInversionTrainer, built on first use (torch, diffusers)."""
    from library.train.textual_inversion import TextualInversion

    if sdxl:
        import sdxl_train_network

        base, name = sdxl_train_network.SdxlNetworkTrainer, "SdxlTextualInversionTrainer"
        attributes = {"script_name": "sdxl_train_textual_inversion.py", "supported_families": ("sdxl",)}
    else:
        from library.train.network_trainer import NetworkTrainer

        base, name, attributes = NetworkTrainer, "TextualInversionTrainer", {}
    return type(name, (TextualInversion, base), attributes)


def main(argv: list[str] | None = None):
    from library.config_file import parse_args_with_config

    args = parse_args_with_config(setup_parser(), argv)
    return trainer_class()().train(args)


if __name__ == "__main__":
    run_cli(main)
