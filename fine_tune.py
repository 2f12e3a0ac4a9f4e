"""Fine-tune a whole SD1.x / SD2.x model on fine-tuning (metadata) datasets, with kohya's flags and file formats.

    accelerate launch fine_tune.py --pretrained_model_name_or_path model.safetensors \\
        --dataset_config dataset.toml --output_dir out --output_name my_model --learning_rate 2e-6 \\
        --max_train_epochs 10 --mixed_precision bf16 --gradient_checkpointing [--train_text_encoder]

The U-Net trains at --learning_rate (0 = frozen); the text encoder only with --train_text_encoder, at
--learning_rate_te. The whole model is saved in --save_model_as (default: the source's format). DreamBooth
folders are trained with train_db.py, SDXL models with sdxl_train.py. Arguments may also come from
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


def setup_parser(dreambooth: bool = False, sdxl: bool = False) -> argparse.ArgumentParser:
    """The shared training flags plus those of full fine-tuning (no network flags: the model itself trains)."""
    from library.config_file import add_config_file_arguments
    from library.options import dataset, finetune, metadata, model, noise_loss, optimizer, sampling, training

    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    for add in (model.add_model_arguments, model.add_text_encoding_arguments, dataset.add_dataset_arguments,
                training.add_training_arguments, training.add_training_loop_arguments,
                training.add_output_arguments, optimizer.add_optimizer_arguments,
                noise_loss.add_noise_and_loss_arguments, sampling.add_sampling_arguments,
                metadata.add_metadata_arguments, training.add_logging_arguments, add_config_file_arguments):
        add(parser)
    finetune.add_finetune_arguments(parser, sdxl=sdxl, dreambooth=dreambooth)
    return parser


@functools.cache
def trainer_class(kind: str) -> type:
    """The trainer of each script, built on first use (its base classes import torch and diffusers)."""
    from library.train.finetune_trainer import FineTuning
    from library.train.network_trainer import NetworkTrainer

    if kind == "sdxl":
        import sdxl_train_network

        base, families = sdxl_train_network.SdxlNetworkTrainer, ("sdxl",)
        attributes = {"script_name": "sdxl_train.py", "dataset_kinds": ("finetune", "dreambooth")}
    else:
        base, families = NetworkTrainer, NetworkTrainer.supported_families
        attributes = {"script_name": "train_db.py", "dataset_kinds": ("dreambooth",), "dreambooth": True,
                      "tracker_name": "dreambooth"} if kind == "db" else {}
    name = {"sdxl": "SdxlFineTuneTrainer", "db": "DreamBoothTrainer"}.get(kind, "FineTuneTrainer")
    return type(name, (FineTuning, base), {"supported_families": families, **attributes})


def main(argv: list[str] | None = None):
    from library.config_file import parse_args_with_config

    args = parse_args_with_config(setup_parser(), argv)
    return trainer_class("sd")().train(args)


if __name__ == "__main__":
    run_cli(main)
