"""Flags shared by training and caching scripts: seed and compute precision (kohya spelling and defaults)."""
from __future__ import annotations

import argparse
from typing import TYPE_CHECKING

from library.options.value_types import positive_int

if TYPE_CHECKING:
    import torch

# --mixed_precision name -> torch dtype name (looked up after parsing, so --help does not load torch)
PRECISIONS = {"no": "float32", "fp16": "float16", "bf16": "bfloat16"}


def add_training_arguments(parser: argparse.ArgumentParser) -> None:
    group = parser.add_argument_group("training")
    group.add_argument("--seed", type=int, default=None,
                       help="random seed for batch order, augmentation and noise (default: none, 0 for data order)")
    group.add_argument("--mixed_precision", type=str, default="no", choices=tuple(PRECISIONS),
                       help="compute dtype of the frozen models: no (float32), fp16 or bf16")
    group.add_argument("--no_half_vae", action="store_true",
                       help="keep the VAE in float32 even with --mixed_precision fp16/bf16 (the SDXL VAE overflows "
                            "in fp16)")


def weight_dtype(mixed_precision: str | None) -> torch.dtype:
    """dtype of the frozen weights for `--mixed_precision`."""
    import torch

    return getattr(torch, PRECISIONS.get(mixed_precision or "no", "float32"))


def vae_dtype(mixed_precision: str | None, no_half_vae: bool) -> torch.dtype:
    import torch

    return torch.float32 if no_half_vae else weight_dtype(mixed_precision)



def add_output_arguments(parser: argparse.ArgumentParser) -> None:
    """Where a training run writes, and how often (kohya's flags, COMPAT §17)."""
    group = parser.add_argument_group("output and saving")
    group.add_argument("--output_dir", type=str, default=None, help="folder for the trained files, samples and states (checked at start: it must be writable, with room "
                            "for the saves the flags ask for)")
    group.add_argument("--output_name", type=str, default=None,
                       help="base name of the saved files, a file name without folders (default: 'last' for the "
                            "final file, 'epoch'/'at' for intermediate ones, as kohya)")
    group.add_argument("--save_every_n_epochs", type=positive_int, default=None, help="save every N epochs")
    group.add_argument("--save_every_n_steps", type=positive_int, default=None, help="save every N optimizer steps")
    group.add_argument("--save_last_n_epochs", type=positive_int, default=None,
                       help="keep only the files of the last N epoch saves (older ones are deleted)")
    group.add_argument("--save_last_n_epochs_state", type=positive_int, default=None,
                       help="keep only the last N epoch states (default: --save_last_n_epochs)")
    group.add_argument("--save_last_n_steps", type=positive_int, default=None,
                       help="keep only the step saves of the last N steps (older ones are deleted)")
    group.add_argument("--save_last_n_steps_state", type=positive_int, default=None,
                       help="keep only the step states of the last N steps (default: --save_last_n_steps)")
    group.add_argument("--save_state", action="store_true",
                       help="with every save, also save the training state (network, optimizer, scheduler, RNG, "
                            "data position) to a '-state' folder for --resume (accelerate's layout, as kohya)")
    group.add_argument("--save_state_on_train_end", action="store_true",
                       help="save the training state once at the end of training")
    group.add_argument("--resume", type=str, default=None,
                       help="resume from a '-state' folder: the run continues exactly where it stopped. Every file "
                            "is checked against this run first and read without unpickling code (a file that would "
                            "need it is refused)")
    group.add_argument("--overwrite_output", action="store_true",
                       help="allow replacing files and '-state' folders of the same name already in --output_dir "
                            "(default: refuse)")


def add_training_loop_arguments(parser: argparse.ArgumentParser) -> None:
    """Length of training, precision and memory/speed switches (kohya spelling and defaults)."""
    group = parser.add_argument_group("training loop")
    group.add_argument("--max_train_steps", type=positive_int, default=1600, help="optimizer steps (default 1600)")
    group.add_argument("--max_train_epochs", type=positive_int, default=None,
                       help="train this many epochs (overrides --max_train_steps)")
    group.add_argument("--gradient_accumulation_steps", type=positive_int, default=1,
                       help="batches whose gradients are summed before each optimizer step (default 1)")
    group.add_argument("--gradient_checkpointing", action="store_true",
                       help="recompute activations in the backward pass: much less memory, about 20%% slower")
    group.add_argument("--full_fp16", action="store_true",
                       help="keep the trained weights and gradients in fp16 too (needs --mixed_precision fp16)")
    group.add_argument("--full_bf16", action="store_true",
                       help="keep the trained weights and gradients in bf16 too (needs --mixed_precision bf16)")
    group.add_argument("--fp8_base", action="store_true",
                       help="store the frozen U-Net (and text encoders) in float8 and compute in the mixed precision "
                            "dtype (needs --mixed_precision fp16/bf16)")
    group.add_argument("--fp8_base_unet", action="store_true", help="like --fp8_base, for the U-Net only")
    group.add_argument("--sdpa", action="store_true", help="use PyTorch scaled-dot-product attention (the default)")
    group.add_argument("--xformers", action="store_true", help="use xformers memory-efficient attention (GPU)")
    group.add_argument("--mem_eff_attn", action="store_true",
                       help="kohya's memory-efficient attention; served by PyTorch SDPA here")
    group.add_argument("--lowram", action="store_true",
                       help="accepted for kohya compatibility: models are already read tensor by tensor, so system "
                            "RAM never holds two copies")
    group.add_argument("--highvram", action="store_true", help="accepted for kohya compatibility")
    group.add_argument("--torch_compile", action="store_true", help="compile the U-Net with torch.compile")
    group.add_argument("--dynamo_backend", type=str, default="inductor",
                       help="torch.compile backend (default inductor)")
    group.add_argument("--ddp_timeout", type=int, default=None,
                       help="minutes before a distributed collective times out")
    group.add_argument("--ddp_gradient_as_bucket_view", action="store_true", help="accepted for kohya compatibility")
    group.add_argument("--ddp_static_graph", action="store_true", help="accepted for kohya compatibility")
    group.add_argument("--max_validation_steps", type=positive_int, default=None,
                       help="validation batches per validation run (default: all)")
    group.add_argument("--validate_every_n_steps", type=positive_int, default=None,
                       help="compute the validation loss every N steps (needs validation_split)")
    group.add_argument("--validate_every_n_epochs", type=positive_int, default=None,
                       help="compute the validation loss every N epochs (default: every epoch with validation_split)")


def add_logging_arguments(parser: argparse.ArgumentParser) -> None:
    group = parser.add_argument_group("logging")
    group.add_argument("--logging_dir", type=str, default=None,
                       help="write TensorBoard logs under this folder (one sub-folder per run)")
    group.add_argument("--log_with", type=str, default=None, choices=(None, "tensorboard", "wandb", "all"),
                       help="tracker: tensorboard (default when --logging_dir is given), wandb or all")
    group.add_argument("--log_prefix", type=str, default=None, help="prefix of the run folder name under --logging_dir")
    group.add_argument("--log_tracker_name", type=str, default=None, help="tracker project name (default: script name)")
    group.add_argument("--log_tracker_config", type=str, default=None, help="TOML of extra tracker init arguments")
    group.add_argument("--wandb_run_name", type=str, default=None, help="W&B run name")
    group.add_argument("--wandb_api_key", type=str, default=None,
                       help="W&B API key (better: `wandb login` once; the key is never written to configs)")
    group.add_argument("--log_config", action="store_true", help="log the arguments to the tracker")
    group.add_argument("--console_log_level", type=str, default=None,
                       help="console logging level: DEBUG, INFO (default), WARNING")
