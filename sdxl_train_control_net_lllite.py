"""ControlNet-LLLite for SDXL: train kohya's lightweight ControlNet on (image, conditioning image) pairs, with
kohya's flags and file format.

    accelerate launch sdxl_train_control_net_lllite.py --pretrained_model_name_or_path sd_xl_base_1.0.safetensors \\
        --dataset_config dataset.toml --output_dir out --output_name canny_lllite --cond_emb_dim 32 \\
        --network_dim 64 --learning_rate 2e-4 --optimizer_type AdamW8bit --mixed_precision bf16 \\
        --gradient_checkpointing --cache_text_encoder_outputs --max_train_epochs 12

The dataset's subsets give `conditioning_data_dir` (a conditioning image with each image's name and size; see
tools/make_conditioning_images.py), or --train_data_dir IMAGES --conditioning_data_dir CONDITIONS. Only the
LLLite modules train (the U-Net stays as it is); each conditioning image gets its image's resize, crop and flip.
Sample prompts take their conditioning image with `--cn path`. The file loads in sdxl_gen_img.py
(--control_net_lllite_models) and ComfyUI's LLLite node. Arguments may also come from `--config_file args.toml`.
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
    """The shared training flags plus LLLite's (no LoRA network flags)."""
    from library.config_file import add_config_file_arguments
    from library.options import dataset, lllite, metadata, model, noise_loss, optimizer, sampling, training

    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    for add in (model.add_model_arguments, model.add_text_encoding_arguments, dataset.add_dataset_arguments,
                training.add_training_arguments, training.add_training_loop_arguments,
                training.add_output_arguments, optimizer.add_optimizer_arguments,
                noise_loss.add_noise_and_loss_arguments, sampling.add_sampling_arguments,
                metadata.add_metadata_arguments, training.add_logging_arguments, lllite.add_lllite_arguments,
                model.add_sdxl_arguments, add_config_file_arguments):
        add(parser)
    return parser


@functools.cache
def trainer_class() -> type:
    """The LLLite trainer, built on first use (torch, diffusers)."""
    import sdxl_train_network
    from library.train.lllite_trainer import LLLiteTraining

    return type("SdxlControlNetLLLiteTrainer", (LLLiteTraining, sdxl_train_network.SdxlNetworkTrainer), {})


def main(argv: list[str] | None = None):
    from library.config_file import parse_args_with_config

    args = parse_args_with_config(setup_parser(), argv)
    return trainer_class()().train(args)


if __name__ == "__main__":
    run_cli(main)
