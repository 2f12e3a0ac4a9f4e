"""Train a LoRA (or another network module) on an SDXL model, with kohya's flags and file formats.

    accelerate launch sdxl_train_network.py --pretrained_model_name_or_path sd_xl_base_1.0.safetensors \\
        --dataset_config dataset.toml --output_dir out --output_name my_lora --network_dim 32 --network_alpha 16 \\
        --network_train_unet_only --cache_latents_to_disk --cache_text_encoder_outputs --mixed_precision bf16

The same flags as train_network.py; only the model hooks differ (two text encoders, pooled vector and size
conditioning). Arguments may also come from `--config_file args.toml`.
"""
from __future__ import annotations

import argparse
import functools
import logging
import sys
from pathlib import Path

if __package__ in (None, ""):
    sys.path.insert(0, str(Path(__file__).resolve().parent))

from library.cli import run_cli

import train_network

logger = logging.getLogger(__name__)


@functools.cache
def _sdxl_trainer_class() -> type:
    """Defines SdxlNetworkTrainer on first use: its base class imports torch and diffusers, which --help and flag
    errors should not wait for."""
    from library.train.network_trainer import NetworkTrainer

    class SdxlNetworkTrainer(NetworkTrainer):
        """SDXL hooks: the U-Net also takes the pooled TE2 vector and the size conditioning (COMPAT §14.4)."""

        supported_families = ("sdxl",)

        def __init__(self):
            super().__init__()
            self.vae_scale_factor = 0.13025
            self.is_sdxl = True

        def assert_extra_args(self, args, train_dataset_group, val_dataset_group=None) -> None:
            super().assert_extra_args(args, train_dataset_group, val_dataset_group)
            if args.clip_skip is not None:
                # kohya warns the same; the flag is dropped so ss_clip_skip / modelspec do not claim it was used
                logger.warning("--clip_skip %s has no effect on SDXL (it always conditions on the penultimate "
                               "layers); ignored and not recorded in the metadata", args.clip_skip)
                args.clip_skip = None

        def call_unet(self, args, accelerator, unet, noisy_latents, timesteps, text_conds, batch, weight_dtype,
                      **kwargs):
            from library.text.encode import as_text_conds
            from library.text.sdxl_cond import sdxl_time_ids

            text_conds = as_text_conds(text_conds)
            time_ids = sdxl_time_ids(batch["original_sizes_hw"], batch["crop_top_lefts"], batch["target_sizes_hw"])
            added = {"text_embeds": text_conds.pooled.to(noisy_latents.device, weight_dtype),
                     "time_ids": time_ids.to(noisy_latents.device, weight_dtype)}
            return unet(noisy_latents, timesteps, encoder_hidden_states=text_conds.hidden_states.to(weight_dtype),
                        added_cond_kwargs=added).sample

        def default_sample_size(self, args) -> tuple[int, int]:
            """SDXL samples default to the training resolution (512 would be far off the model's range)."""
            return self.training_resolution()

    SdxlNetworkTrainer.__qualname__ = "SdxlNetworkTrainer"  # as found by the module __getattr__ below (reprs, pickle)
    return SdxlNetworkTrainer


def __getattr__(name: str):
    # `sdxl_train_network.SdxlNetworkTrainer` (kohya's scripts expose their trainer class) is built on first access
    if name == "SdxlNetworkTrainer":
        return _sdxl_trainer_class()
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def setup_parser() -> argparse.ArgumentParser:
    parser = train_network.setup_parser()
    from library.options.model import add_sdxl_arguments

    add_sdxl_arguments(parser)
    return parser


def main(argv: list[str] | None = None):
    args = train_network.parse_args(setup_parser(), argv)
    return _sdxl_trainer_class()().train(args)


if __name__ == "__main__":
    run_cli(main)
