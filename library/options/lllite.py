"""Flags of ControlNet-LLLite training (sdxl_train_control_net_lllite.py), kohya's names and defaults (TRAINERS
§4.2). The dataset (`conditioning_data_dir` per subset, or --train_data_dir + --conditioning_data_dir) comes from
the dataset flags."""
from __future__ import annotations

import argparse

LLLITE_SAVE_FORMATS = ("safetensors", "ckpt", "pt")


def add_lllite_arguments(parser: argparse.ArgumentParser) -> None:
    group = parser.add_argument_group("ControlNet-LLLite")
    group.add_argument("--cond_emb_dim", type=int, default=None,
                       help="width of the conditioning-image embedding (required; even, e.g. 32)")
    group.add_argument("--network_dim", type=int, default=None,
                       help="width of each LLLite module's MLP (required, e.g. 64)")
    group.add_argument("--network_dropout", type=float, default=None,
                       help="dropout on each module's mid output while training (default none)")
    group.add_argument("--network_weights", type=str, default=None,
                       help="continue from an LLLite file (its dims must match --cond_emb_dim / --network_dim)")
    group.add_argument("--save_model_as", type=str, default="safetensors", choices=LLLITE_SAVE_FORMATS,
                       help="file format (default safetensors, which kohya's generators and ComfyUI's node read; "
                            "ckpt/pt are torch files of the same tensors)")
    group.add_argument("--save_precision", type=str, default=None, choices=(None, "float", "fp16", "bf16"),
                       help="dtype of the saved modules (default: their training dtype, fp32 unless --full_*)")
