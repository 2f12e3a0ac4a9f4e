"""kohya-compatible DyLoRA (`--network_module networks.dylora`): one LoRA trained for every rank up to network_dim.

Owns the per-unit parameters, the random-rank training forward and DyLoRA's `--network_args` (COMPAT §3, §6);
naming, targets, LR groups and the (ordinary LoRA) file format are reused from networks/lora.py.
"""
from __future__ import annotations

import difflib
import logging
import math
import os
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

import torch

from library.models.state_dict_io import read_state_dict
from networks import naming
from networks.lora import (
    LoRAModule,
    LoRANetwork,
    _arg_error,
    check_all_names_placed,
    _is_unset,
    _number,
    lora_weight_delta,
)
from networks.naming import LoRATarget, RankPlan

logger = logging.getLogger(__name__)

DEFAULT_UNIT = 1
KNOWN_NETWORK_ARGS = ("unit", "conv_dim", "conv_alpha", "loraplus_lr_ratio", "loraplus_unet_lr_ratio",
                      "loraplus_text_encoder_lr_ratio")
# kohya's DyLoRA has no dropouts; the trainer still passes `dropout` (= --network_dropout, COMPAT §6), which
# create_network reports once as --network_dropout.
UNSUPPORTED_NETWORK_ARGS = ("rank_dropout", "module_dropout")


class DyLoRAModule(LoRAModule):
    """A LoRAModule whose ranks are trained in units of `unit` rows of lora_down / columns of lora_up.

    Each unit is its own parameter, so a unit left out of a step's graph has no gradient and the optimizer skips
    it (no momentum or weight-decay update), as kohya's one-parameter-per-rank layout does. The state dict holds
    the concatenated `lora_down.weight` / `lora_up.weight` of an ordinary LoRA (COMPAT §3).
    """

    def __init__(self, lora_name: str, original_module: torch.nn.Module, multiplier: float = 1.0,
                 lora_dim: int = naming.DEFAULT_NETWORK_DIM, alpha: float | None = naming.DEFAULT_NETWORK_ALPHA,
                 unit: int = DEFAULT_UNIT):
        if lora_dim % unit:
            raise ValueError(f"{lora_name}: rank {lora_dim} is not a multiple of unit {unit}")  # checked earlier
        super().__init__(lora_name, original_module, multiplier, lora_dim, alpha)
        self.unit = unit
        self._fused = False  # its own forward over rank units (not networks/lora_ops.py)
        down_layer, up_layer = self.lora_down, self.lora_up  # initialised as in LoRA (Kaiming / zeros)
        del self.lora_down, self.lora_up
        self.conv_options = ({"stride": down_layer.stride, "padding": down_layer.padding}
                             if isinstance(down_layer, torch.nn.Conv2d) else None)
        self.unit_count = lora_dim // unit
        down_units = down_layer.weight.detach().split(unit, dim=0)
        up_units = up_layer.weight.detach().split(unit, dim=1)
        for index, (down, up) in enumerate(zip(down_units, up_units)):
            self.register_parameter(f"lora_down_unit{index}", torch.nn.Parameter(down.clone()))
            self.register_parameter(f"lora_up_unit{index}", torch.nn.Parameter(up.clone()))

    def down_units(self) -> list[torch.nn.Parameter]:
        return [getattr(self, f"lora_down_unit{index}") for index in range(self.unit_count)]

    def up_units(self) -> list[torch.nn.Parameter]:
        return [getattr(self, f"lora_up_unit{index}") for index in range(self.unit_count)]

    def down_weight(self) -> torch.Tensor:
        """The full lora_down weight [r, in(, k, k)] as a LoRA file holds it."""
        return torch.cat(self.down_units(), dim=0)

    def up_weight(self) -> torch.Tensor:
        """The full lora_up weight [out, r(, 1, 1)] as a LoRA file holds it."""
        return torch.cat(self.up_units(), dim=1)

    def training_weights(self, unit_index: int) -> tuple[torch.Tensor, torch.Tensor]:
        """Ranks [0, b + unit) with b = unit_index * unit; only unit `unit_index` stays in the autograd graph."""
        downs = [unit.detach() for unit in self.down_units()[:unit_index]] + [self.down_units()[unit_index]]
        ups = [unit.detach() for unit in self.up_units()[:unit_index]] + [self.up_units()[unit_index]]
        return torch.cat(downs, dim=0), torch.cat(ups, dim=1)

    def forward(self, x: torch.Tensor, *args, **kwargs) -> torch.Tensor:
        original_output = self.original_forward(x, *args, **kwargs)
        if self.training:
            # torch's RNG (not `random`) so that gradient checkpointing's recompute draws the same rank
            unit_index = int(torch.randint(self.unit_count, (1,)).item())
            down, up = self.training_weights(unit_index)
            # kohya: alpha/r * sqrt(r / (b + unit)) while training (COMPAT §3)
            scale = self.scale * math.sqrt(self.lora_dim / ((unit_index + 1) * self.unit))
        else:
            down, up, scale = self.down_weight(), self.up_weight(), self.scale
        return original_output + self._low_rank_output(x, down, up) * (self.multiplier * scale)

    def _low_rank_output(self, x: torch.Tensor, down: torch.Tensor, up: torch.Tensor) -> torch.Tensor:
        if self.conv_options is not None:
            return torch.nn.functional.conv2d(torch.nn.functional.conv2d(x, down, **self.conv_options), up)
        return torch.nn.functional.linear(torch.nn.functional.linear(x, down), up)

    @torch.no_grad()
    def scale_weights_(self, factor: float) -> None:
        for parameter in self.down_units() + self.up_units():
            parameter.mul_(factor)

    # -- the state dict is an ordinary LoRA's (COMPAT §3)

    def _save_to_state_dict(self, destination: dict, prefix: str, keep_vars: bool) -> None:
        down, up = self.down_weight(), self.up_weight()
        destination[prefix + naming.LORA_DOWN] = down if keep_vars else down.detach()
        destination[prefix + naming.LORA_UP] = up if keep_vars else up.detach()
        destination[prefix + naming.ALPHA] = self.alpha if keep_vars else self.alpha.detach()

    def _load_from_state_dict(self, state_dict: Mapping, prefix: str, local_metadata: dict, strict: bool,
                              missing_keys: list, unexpected_keys: list, error_msgs: list) -> None:
        targets = {naming.LORA_DOWN: (self.down_units(), 0), naming.LORA_UP: (self.up_units(), 1),
                   naming.ALPHA: ([self.alpha], None)}
        for tensor_name, (destinations, dim) in targets.items():
            key = prefix + tensor_name
            if key not in state_dict:
                missing_keys.append(key)
                continue
            own = self.alpha if dim is None else torch.cat(destinations, dim=dim)
            value = state_dict[key]
            if tuple(value.shape) != tuple(own.shape):
                error_msgs.append(f"size mismatch for {key}: copying a param with shape {tuple(value.shape)}, "
                                  f"the shape in current model is {tuple(own.shape)}.")
                continue
            pieces = [value] if dim is None else value.split(self.unit, dim=dim)
            with torch.no_grad():
                for destination, piece in zip(destinations, pieces):
                    destination.copy_(piece)
        if strict:
            own_keys = {prefix + tensor_name for tensor_name in targets}
            unexpected_keys.extend(k for k in state_dict if k.startswith(prefix) and k not in own_keys)


# ----------------------------------------------------------------------------------------------- network


class DyLoRANetwork(LoRANetwork):
    """LoRANetwork of DyLoRAModules; every `unit` ranks of each module are trained as one piece."""

    def __init__(self, text_encoder: Any, unet: torch.nn.Module, rank_plan: RankPlan | None = None,
                 multiplier: float = 1.0, unit: int = DEFAULT_UNIT):
        self.unit = unit  # set before LoRANetwork.__init__, which calls _create_loras (a plain int is allowed)
        super().__init__(text_encoder, unet, rank_plan, multiplier)

    def _make_module(self, target: LoRATarget, dim: int, alpha: float, dropouts: dict) -> DyLoRAModule:
        return DyLoRAModule(target.name, target.module, self.multiplier, dim, alpha, self.unit)

    @torch.no_grad()
    def apply_max_norm_regularization(self, max_norm_value: float, device: torch.device | str
                                      ) -> tuple[int, float, float]:
        """As LoRANetwork's (scale both sides by sqrt of the ratio), over the concatenated units."""
        keys_scaled, norms = 0, []
        for lora in self.text_encoder_loras + self.unet_loras:
            delta = lora_weight_delta(lora.down_weight().to(device, torch.float32),
                                      lora.up_weight().to(device, torch.float32), lora.scale)
            norm = delta.norm().clamp(min=max_norm_value / 2)
            ratio = float(norm.clamp(max=max_norm_value) / norm)
            if ratio != 1.0:
                keys_scaled += 1
                lora.scale_weights_(ratio ** 0.5)
            norms.append(float(delta.norm()) * ratio)
        if not norms:
            return 0, 0.0, 0.0
        return keys_scaled, sum(norms) / len(norms), max(norms)


# ----------------------------------------------------------------------------------------------- --network_args


@dataclass
class DyLoRAArgs:
    """The typed `--network_args` of networks.dylora."""

    unit: int = DEFAULT_UNIT
    conv_dim: int | None = None
    conv_alpha: float = naming.DEFAULT_CONV_ALPHA
    loraplus_ratios: dict[str, float | None] = field(default_factory=dict)


def _warn_ignored_args(kwargs: Mapping[str, Any]) -> None:
    for key, value in kwargs.items():
        if key == "dropout":
            continue
        if key in UNSUPPORTED_NETWORK_ARGS:
            if not _is_unset(value):
                logger.warning("--network_args %s=%s: DyLoRA has no dropout (as in kohya); ignored", key, value)
        elif key not in KNOWN_NETWORK_ARGS:
            close = difflib.get_close_matches(key, KNOWN_NETWORK_ARGS, n=1)
            hint = f"; did you mean {close[0]}?" if close else ""
            logger.warning("--network_args %s: not an option of networks.dylora, ignored%s", key, hint)


def _divisors(number: int) -> list[int]:
    return [candidate for candidate in range(1, number + 1) if number % candidate == 0]


def parse_unit(value: Any, ranks: list[int], ranks_source: str) -> int:
    """`unit`: a positive integer dividing every rank; the error lists the valid units."""
    unit = _number("unit", value, int, minimum=1)
    bad_rank = next((rank for rank in ranks if rank % unit), None)
    if bad_rank is not None:
        valid = _divisors(math.gcd(*ranks))
        raise _arg_error("unit", f"a divisor of {ranks_source} ({bad_rank})", value,
                         f"valid units: {', '.join(map(str, valid))}")
    return unit


def parse_network_args(kwargs: Mapping[str, Any], network_dim: int) -> DyLoRAArgs:
    """Turn the `--network_args` strings into DyLoRAArgs; bad values raise FlagError naming the key."""
    _warn_ignored_args(kwargs)
    given = {key: value for key, value in kwargs.items() if key in KNOWN_NETWORK_ARGS and not _is_unset(value)}
    args = DyLoRAArgs()
    args.unit = parse_unit(given.get("unit", DEFAULT_UNIT), [network_dim], "--network_dim")
    if "conv_dim" in given:
        args.conv_dim = _number("conv_dim", given["conv_dim"], int, minimum=0) or None
        if args.conv_dim is not None and args.conv_dim != network_dim:
            # kohya's DyLoRA trains every module at one rank, so 3x3 convs must use network_dim (COMPAT §3)
            raise _arg_error("conv_dim", f"the value of --network_dim ({network_dim})", given["conv_dim"],
                             "DyLoRA trains 3x3 convs at the same rank as the other layers")
    if "conv_alpha" in given:
        args.conv_alpha = _number("conv_alpha", given["conv_alpha"], float)
    for key in ("loraplus_lr_ratio", "loraplus_unet_lr_ratio", "loraplus_text_encoder_lr_ratio"):
        args.loraplus_ratios[key] = _number(key, given[key], float, minimum=0) if key in given else None
    return args


# ----------------------------------------------------------------------------------------------- entry points


def create_network(multiplier: float, network_dim: int | None, network_alpha: float | None, vae: Any,
                   text_encoder: Any, unet: torch.nn.Module, neuron_dropout: float | None = None,
                   **kwargs: Any) -> DyLoRANetwork:
    """kohya's entry point: a fresh DyLoRA for the model; kwargs are the `--network_args` values."""
    network_dim = naming.DEFAULT_NETWORK_DIM if network_dim is None else int(network_dim)
    network_alpha = naming.DEFAULT_NETWORK_ALPHA if network_alpha is None else float(network_alpha)
    args = parse_network_args(kwargs, network_dim)
    dropout = neuron_dropout if neuron_dropout is not None else kwargs.get("dropout")
    if not _is_unset(dropout) and _number("dropout", dropout, float):
        logger.warning("--network_dropout %s: DyLoRA has no dropout (as in kohya); ignored", dropout)
    plan = RankPlan(network_dim, network_alpha, args.conv_dim, args.conv_alpha)
    network = DyLoRANetwork(text_encoder, unet, plan, multiplier, args.unit)
    network.set_loraplus_lr_ratio(*args.loraplus_ratios.values())
    logger.info("DyLoRA: rank %d trained in units of %d", network_dim, args.unit)
    return network


def create_network_from_weights(multiplier: float, file: str | os.PathLike | None, vae: Any, text_encoder: Any,
                                unet: torch.nn.Module, weights_sd: Mapping[str, torch.Tensor] | None = None,
                                for_inference: bool = False, **kwargs: Any
                                ) -> tuple[DyLoRANetwork, Mapping[str, torch.Tensor]]:
    """A DyLoRA whose modules, ranks and alphas match a LoRA file; `unit` (default 1) must divide every rank."""
    source = file if file is not None else "<weights>"
    if weights_sd is None:
        weights_sd = read_state_dict(file)
    aliases = naming.diffusers_unet_name_aliases(unet, naming.scheme_for_unet(unet))
    dims, alphas = naming.ranks_from_weights(naming.rename_unet_aliases(weights_sd, aliases), source)
    unit = DEFAULT_UNIT if _is_unset(kwargs.get("unit")) else parse_unit(kwargs["unit"], list(dims.values()),
                                                                        f"the ranks in {source}")
    network = DyLoRANetwork(text_encoder, unet, RankPlan(module_dims=dims, module_alphas=alphas), multiplier, unit)
    check_all_names_placed(network, dims, source)
    network.to_model_layout(weights_sd, source)  # raises on shape mismatches now rather than at load time
    return network, weights_sd
