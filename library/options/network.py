"""Flags of LoRA-style network training (`train_network.py`, `sdxl_train_network.py`), kohya spelling and defaults."""
from __future__ import annotations

import argparse


def add_network_arguments(parser: argparse.ArgumentParser) -> None:
    group = parser.add_argument_group("network")
    group.add_argument("--network_module", type=str, default="networks.lora",
                       help="module that builds the network: networks.lora (default), networks.dylora, "
                            "networks.lora_fa, lycoris.kohya, or any module with kohya's create_network")
    group.add_argument("--network_dim", type=int, default=None, help="rank of the network (default 4)")
    group.add_argument("--network_alpha", type=float, default=None,
                       help="alpha: the update is scaled by alpha/rank (default 1)")
    group.add_argument("--network_dropout", type=float, default=None,
                       help="dropout on the network's hidden activations (0-1)")
    group.add_argument("--network_args", type=str, default=None, nargs="*",
                       help='extra network options as key=value, e.g. "conv_dim=4" "conv_alpha=1" "algo=locon"')
    group.add_argument("--network_weights", type=str, default=None, help="start from this network file")
    group.add_argument("--dim_from_weights", action="store_true",
                       help="take ranks and alphas from --network_weights instead of --network_dim/--network_alpha")
    group.add_argument("--network_train_unet_only", action="store_true", help="train only the U-Net part")
    group.add_argument("--network_train_text_encoder_only", action="store_true",
                       help="train only the text-encoder part")
    group.add_argument("--unet_lr", type=float, default=None, help="learning rate of the U-Net part")
    group.add_argument("--text_encoder_lr", type=float, default=None, nargs="*",
                       help="learning rate of the text-encoder part; SDXL takes one or two values (TE1 TE2)")
    group.add_argument("--base_weights", type=str, default=None, nargs="*",
                       help="network files merged into the base model before training")
    group.add_argument("--base_weights_multiplier", type=float, default=None, nargs="*",
                       help="multiplier of each --base_weights file (default 1.0 each)")
    group.add_argument("--scale_weight_norms", type=float, default=None,
                       help="max-norm regularization: scale down modules whose update norm exceeds this (1.0 is "
                            "a common value)")
    group.add_argument("--loraplus_lr_ratio", type=float, default=None,
                       help="LoRA+: learning-rate ratio of lora_up to lora_down (e.g. 16)")
    group.add_argument("--loraplus_unet_lr_ratio", type=float, default=None, help="LoRA+ ratio for the U-Net only")
    group.add_argument("--loraplus_text_encoder_lr_ratio", type=float, default=None,
                       help="LoRA+ ratio for the text encoder(s) only")
    group.add_argument("--network_multiplier", type=float, default=1.0,
                       help="multiplier of the network during training (default 1.0)")
    group.add_argument("--save_model_as", type=str, default="safetensors", choices=("safetensors", "ckpt", "pt"),
                       help="file format of the network (default safetensors)")
    group.add_argument("--save_precision", type=str, default=None, choices=(None, "float", "fp16", "bf16"),
                       help="dtype of the saved network (default: the training dtype)")
