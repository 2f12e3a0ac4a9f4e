"""LoRA-FA (`--network_module networks.lora_fa`, Zhang et al. 2023): networks.lora with lora_down frozen at its
random init, so only lora_up trains; the file format, `--network_args` and all else are networks.lora's.
"""
from __future__ import annotations

import logging
import os
from collections.abc import Mapping
from typing import Any

import torch

from library.models.state_dict_io import read_state_dict
from networks import lora, naming
from networks.lora import LoRANetwork, _check_all_names_placed
from networks.naming import RankPlan

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
    scheme = naming.scheme_for_unet(unet)
    args = lora.parse_network_args(kwargs, scheme)
    network_dim = naming.DEFAULT_NETWORK_DIM if network_dim is None else int(network_dim)
    network_alpha = naming.DEFAULT_NETWORK_ALPHA if network_alpha is None else float(network_alpha)
    plan = lora.rank_plan_from_args(args, scheme, network_dim, network_alpha)
    dropout = neuron_dropout if neuron_dropout is not None else args.dropout
    network = LoRAFANetwork(text_encoder, unet, plan, multiplier, dropout, args.rank_dropout, args.module_dropout)
    network.set_loraplus_lr_ratio(*args.loraplus_ratios.values())
    network.set_block_lr_weight(args.block_lr_weight)
    return network


def create_network_from_weights(multiplier: float, file: str | os.PathLike | None, vae: Any, text_encoder: Any,
                                unet: torch.nn.Module, weights_sd: Mapping[str, torch.Tensor] | None = None,
                                for_inference: bool = False, **kwargs: Any
                                ) -> tuple[LoRAFANetwork, Mapping[str, torch.Tensor]]:
    """A LoRA-FA whose modules, ranks and alphas match a LoRA file (same rules as networks.lora)."""
    source = file if file is not None else "<weights>"
    if weights_sd is None:
        weights_sd = read_state_dict(file)
    aliases = naming.diffusers_unet_name_aliases(unet, naming.scheme_for_unet(unet))
    dims, alphas = naming.ranks_from_weights(naming.rename_unet_aliases(weights_sd, aliases), source)
    network = LoRAFANetwork(text_encoder, unet, RankPlan(module_dims=dims, module_alphas=alphas), multiplier)
    _check_all_names_placed(network, dims, source)
    network.to_model_layout(weights_sd, source)
    return network, weights_sd
