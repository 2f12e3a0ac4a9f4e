"""LoRA-FA (`--network_module networks.lora_fa`, Zhang et al. 2023): networks.lora with lora_down frozen at its
random init, so only lora_up trains; the file format, `--network_args` and all else are networks.lora's.
"""
from __future__ import annotations

import logging
import os
from collections.abc import Mapping
from typing import Any

import torch

from networks import lora
from networks.lora import LoRANetwork

logger = logging.getLogger(__name__)


class LoRAFANetwork(LoRANetwork):
    """LoRANetwork whose lora_down weights never train: requires_grad stays False and no param group holds them."""

    def __init__(self, *args: Any, **kwargs: Any):
        super().__init__(*args, **kwargs)
        self.requires_grad_(True)

    def requires_grad_(self, requires_grad: bool = True) -> LoRAFANetwork:
        """As torch's, but lora_down stays frozen (LoRANetwork and the trainer call this with True)."""
        super().requires_grad_(requires_grad)
        for module in self.text_encoder_loras + self.unet_loras:
            module.lora_down.requires_grad_(False)
        return self

    def get_trainable_params(self):
        return [parameter for parameter in self.parameters() if parameter.requires_grad]

    def prepare_optimizer_params(self, text_encoder_lr: Any = None, unet_lr: float | None = None,
                                 default_lr: float | None = None) -> tuple[list[dict], list[str]]:
        """LoRANetwork's groups without the frozen lora_down weights; a group left empty is dropped."""
        groups, descriptions = super().prepare_optimizer_params(text_encoder_lr, unet_lr, default_lr)
        kept_groups, kept_descriptions = [], []
        for group, description in zip(groups, descriptions):
            trainable = [parameter for parameter in group["params"] if parameter.requires_grad]
            if trainable:
                kept_groups.append({**group, "params": trainable})
                kept_descriptions.append(description)
        return kept_groups, kept_descriptions


def create_network(multiplier: float, network_dim: int | None, network_alpha: float | None, vae: Any,
                   text_encoder: Any, unet: torch.nn.Module, neuron_dropout: float | None = None,
                   **kwargs: Any) -> LoRAFANetwork:
    """kohya's entry point: a fresh LoRA-FA; kwargs are networks.lora's `--network_args`."""
    return lora.build_network(LoRAFANetwork, multiplier, network_dim, network_alpha, text_encoder, unet,
                              neuron_dropout, kwargs)


def create_network_from_weights(multiplier: float, file: str | os.PathLike | None, vae: Any, text_encoder: Any,
                                unet: torch.nn.Module, weights_sd: Mapping[str, torch.Tensor] | None = None,
                                for_inference: bool = False, **kwargs: Any
                                ) -> tuple[LoRAFANetwork, Mapping[str, torch.Tensor]]:
    """A LoRA-FA whose modules, ranks and alphas match a LoRA file (same rules as networks.lora)."""
    return lora.build_network_from_weights(LoRAFANetwork, multiplier, file, text_encoder, unet, weights_sd)
