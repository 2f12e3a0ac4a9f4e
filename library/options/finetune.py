"""Flags of full fine-tuning (`sdxl_train.py`, `fine_tune.py`, `train_db.py`), kohya's spelling and defaults
(TRAINERS §1.1, §2.1). Which flags a script has depends on its family and dataset kind."""
from __future__ import annotations

import argparse

from library.options.choices import SAVE_FORMATS

BLOCK_LR_COUNT = 23  # SDXL U-Net blocks as kohya's --block_lr numbers them (TRAINERS §1.3)


def _block_lrs(text: str) -> list[float]:
    try:
        values = [float(part) for part in str(text).split(",") if part.strip()]
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected {BLOCK_LR_COUNT} comma-separated numbers, got {text!r}") from None
    if len(values) != BLOCK_LR_COUNT:
        raise argparse.ArgumentTypeError(f"expected exactly {BLOCK_LR_COUNT} comma-separated learning rates (time/"
                                         f"label embedding, 9 input blocks, 3 middle, 9 output, out), got "
                                         f"{len(values)}")
    if any(not 0.0 <= value <= 100.0 for value in values):
        raise argparse.ArgumentTypeError(f"learning rates from 0 to 100 expected, got {text!r}")
    return values


def add_finetune_arguments(parser: argparse.ArgumentParser, *, sdxl: bool, dreambooth: bool) -> None:
    """What trains and how the whole model is saved.

    sdxl: two text encoders (--learning_rate_te1/_te2, --block_lr); otherwise one (--learning_rate_te).
    dreambooth: train_db.py, whose text encoder trains by default (--stop_text_encoder_training).
    """
    group = parser.add_argument_group("full fine-tuning")
    if dreambooth:
        group.add_argument("--stop_text_encoder_training", type=int, default=None,
                           help="stop training the text encoder at this global step (0: never updated; negative: "
                                "never trained); by default it trains for the whole run")
        group.add_argument("--no_token_padding", action="store_true",
                           help="no effect (kohya's v0.10 never reads it either); warned at start")
    else:
        group.add_argument("--train_text_encoder", action="store_true",
                           help="also train the text encoder(s) (default: frozen)")
    if sdxl:
        group.add_argument("--learning_rate_te1", type=float, default=None,
                           help="learning rate of text encoder 1 (CLIP-L; default --learning_rate; 0 = frozen). Its "
                                "last layer and final LayerNorm stay frozen: SDXL reads the layer before")
        group.add_argument("--learning_rate_te2", type=float, default=None,
                           help="learning rate of text encoder 2 (OpenCLIP bigG; default --learning_rate; 0 = frozen)")
        group.add_argument("--block_lr", type=_block_lrs, default=None,
                           help=f"{BLOCK_LR_COUNT} comma-separated U-Net learning rates: time/label embedding, "
                                "input blocks 0-8, middle blocks 0-2, output blocks 0-8, out; a block at 0 is frozen "
                                "(no gradient is computed for it)")
    else:
        group.add_argument("--learning_rate_te", type=float, default=None,
                           help="learning rate of the text encoder (default --learning_rate; 0 = frozen)")
        group.add_argument("--block_lr", type=str, default=None,
                           help="SDXL only (sdxl_train.py): refused here with a message")
    group.add_argument("--diffusers_xformers", action="store_true",
                       help="diffusers' xformers attention in the U-Net and the VAE (needs xformers). kohya: the "
                            "VAE only, skipping its own U-Net attention; the U-Net here is diffusers' either way")
    group.add_argument("--save_model_as", type=str, default=None, choices=(None, *SAVE_FORMATS),
                       help="format of the saved model: ckpt, safetensors (single file, LDM/SGM keys), diffusers, "
                            "diffusers_safetensors (pipeline folder); default: the format of the source model")
    group.add_argument("--use_safetensors", action="store_true",
                       help="without --save_model_as: save as safetensors (single file or pipeline folder)")
    group.add_argument("--save_precision", type=str, default=None, choices=(None, "float", "fp16", "bf16"),
                       help="dtype of the saved model (default: the dtype each part has in training)")
