"""Flags shared by training and caching scripts: seed and compute precision (kohya spelling and defaults)."""
from __future__ import annotations

import argparse

import torch

PRECISIONS = {"no": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}


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
    return PRECISIONS.get(mixed_precision or "no", torch.float32)


def vae_dtype(mixed_precision: str | None, no_half_vae: bool) -> torch.dtype:
    return torch.float32 if no_half_vae else weight_dtype(mixed_precision)
