"""Flags that choose and save the base model (kohya spelling and defaults)."""
from __future__ import annotations

import argparse



def add_model_arguments(parser: argparse.ArgumentParser) -> None:
    group = parser.add_argument_group("model")
    group.add_argument("--pretrained_model_name_or_path", type=str, default=None,
                       help="base model: a single-file checkpoint (.safetensors/.ckpt, LDM or SGM layout) or a "
                            "diffusers folder")
    group.add_argument("--v2", action="store_true",
                       help="the base model is SD2.x (checked against the file; the family is detected anyway)")
    group.add_argument("--v_parameterization", action="store_true",
                       help="the model predicts velocity (v) instead of noise (SD2.x 768-v and similar)")
    group.add_argument("--vae", type=str, default=None,
                       help="use this VAE instead of the checkpoint's (LDM or diffusers file, or diffusers folder)")


def add_text_encoding_arguments(parser: argparse.ArgumentParser) -> None:
    group = parser.add_argument_group("text encoding")
    group.add_argument("--max_token_length", type=int, default=None, choices=(None, 75, 150, 225),
                       help="tokens per caption: 75 (default, one CLIP window), 150 or 225 (encoded in 75-token "
                            "chunks and concatenated)")
    group.add_argument("--clip_skip", type=int, default=None,
                       help="use the output of the k-th last text-encoder layer (2 = penultimate); SD1.x/2.x (no effect for SDXL: warned)")
    group.add_argument("--tokenizer_cache_dir", type=str, default=None,
                       help="folder to save tokenizers to and load them from (they are built offline from the "
                            "bundled CLIP vocabulary when missing)")


def add_sdxl_arguments(parser: argparse.ArgumentParser) -> None:
    """kohya's SDXL-only loading flag of every SDXL training script (sdxl_train_util.add_sdxl_training_arguments)."""
    parser.add_argument("--disable_mmap_load_safetensors", action="store_true",
                        help="no effect here (warned at start): tensors are always read one at a time")
