"""Networks for image generation: `--network_module/--network_weights/--network_mul/--network_args`, several at
once, applied dynamically (per-prompt multipliers with `--am`) or merged into the weights (`--network_merge`).

Works with any module of kohya's protocol (COMPAT §16): networks.lora, networks.dylora, lycoris.kohya, ...
"""
from __future__ import annotations

import logging
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from library.errors import FlagError
from library.families import ModelFamily
from library.models.state_dict_io import TensorFile
from library.train import network_module as protocol
from networks import naming

logger = logging.getLogger(__name__)

DEFAULT_MODULE = "networks.lora"


@dataclass(frozen=True)
class NetworkSpec:
    """One network from the command line."""

    module: str
    weights: Path
    multiplier: float = 1.0
    args: tuple[tuple[str, str], ...] = ()

    @property
    def name(self) -> str:
        return self.weights.name


def _per_network(values: list | None, count: int, flag: str) -> list:
    """kohya pairs the i-th value with the i-th network; one value is used for all; more values than networks
    is an error (they would be dropped silently)."""
    values = list(values or [])
    if len(values) > count:
        raise FlagError(f"{flag}: got {len(values)} values for {count} network(s) (--network_weights); "
                        "give one per network")
    if len(values) == 1 and count > 1 and flag == "--network_module":
        return values * count
    return values


def parse_network_args_string(text: str, index: int) -> tuple[tuple[str, str], ...]:
    """kohya's generator form: one string per network, `key=value` pairs separated by ";"."""
    pairs = []
    for item in filter(None, (part.strip() for part in text.split(";"))):
        key, separator, value = item.partition("=")
        if not separator or not key.strip():
            raise FlagError(f"--network_args (network {index + 1}) {item!r}: expected key=value pairs separated "
                            "by ';', e.g. \"conv_dim=4;conv_alpha=1\"")
        pairs.append((key.strip(), value.strip()))
    return tuple(pairs)


def network_specs(modules: list[str] | None, weights: list[str] | None, multipliers: list[float] | None,
                  network_args: list[str] | None) -> list[NetworkSpec]:
    """The networks the command line asks for, checked before any model is loaded (files exist, counts agree)."""
    weights = list(weights or [])
    if not weights:
        if modules:
            raise FlagError("--network_module was given without --network_weights; generation needs trained "
                            "network files")
        if multipliers or network_args:
            raise FlagError("--network_mul/--network_args were given without --network_weights")
        return []
    modules = _per_network(modules, len(weights), "--network_module")
    if modules and len(modules) != len(weights):
        raise FlagError(f"--network_module: got {len(modules)} module(s) for {len(weights)} --network_weights "
                        "files; give one module, or one per file")
    multipliers = _per_network(multipliers, len(weights), "--network_mul")
    network_args = _per_network(network_args, len(weights), "--network_args")
    specs = []
    for index, file in enumerate(weights):
        path = Path(file)
        if not path.is_file():
            raise FlagError(f"--network_weights {file}: file not found")
        specs.append(NetworkSpec(module=modules[index] if modules else DEFAULT_MODULE, weights=path,
                                 multiplier=float(multipliers[index]) if index < len(multipliers) else 1.0,
                                 args=parse_network_args_string(network_args[index], index)
                                 if index < len(network_args) else ()))
    return specs


class AppliedNetworks:
    """The networks in use; dynamic ones can change multipliers between batches."""

    def __init__(self, specs: list[NetworkSpec], networks: list[Any], merged: bool):
        self.specs, self.networks, self.merged = specs, networks, merged
        self.multipliers = [spec.multiplier for spec in specs]
        self._warned_merged = False

    def __len__(self) -> int:
        return len(self.specs)

    def set_multipliers(self, multipliers: list[float] | None, source: str = "") -> list[float]:
        """Apply a prompt's `--am` (None = the `--network_mul` values); returns the multipliers in effect."""
        wanted = [spec.multiplier for spec in self.specs] if multipliers is None else list(multipliers)
        if len(wanted) != len(self.specs):
            raise FlagError(f"{source}: --am: expected {len(self.specs)} multiplier(s), one per network, got "
                            f"{len(wanted)}")
        if self.merged:
            if multipliers is not None and not self._warned_merged:
                logger.warning("--am is ignored with --network_merge: the networks are merged at --network_mul")
                self._warned_merged = True
            return self.multipliers
        for network, multiplier, current in zip(self.networks, wanted, self.multipliers):
            if multiplier != current:
                network.set_multiplier(multiplier)
        self.multipliers = wanted
        return wanted

    def described(self) -> list[tuple[str, float]]:
        return [(spec.name, multiplier) for spec, multiplier in zip(self.specs, self.multipliers)]


def show_metadata(spec: NetworkSpec) -> None:
    """`--network_show_meta`: log a network file's metadata, one key per line."""
    tensor_file = TensorFile(spec.weights)
    try:
        metadata = dict(tensor_file.metadata)
    finally:
        tensor_file.close()
    logger.info("metadata of %s (%d keys)%s", spec.weights, len(metadata),
                "".join(f"\n  {key}: {value}" for key, value in sorted(metadata.items())))


def load_networks(specs: list[NetworkSpec], *, family: ModelFamily, text_encoders: list, vae, unet,
                  merge: bool, device: torch.device, dtype: torch.dtype, show_meta: bool = False) -> AppliedNetworks:
    """Build each network from its file and apply it: merged into the weights (`merge`) or hooked into the
    layers' forward (dynamic). A file made for another model family is refused before anything is built."""
    networks = []
    encoder_argument = text_encoders[0] if len(text_encoders) == 1 else list(text_encoders)
    for spec in specs:
        protocol.check_network_weights_family(spec.weights, family.name)
        if show_meta:
            show_metadata(spec)
        module = protocol.import_network_module(spec.module)
        network, weights_sd = protocol.create_network_from_weights(
            module, spec.multiplier, spec.weights, vae, text_encoders, unet, for_inference=True, **dict(spec.args))
        if network is None:
            raise FlagError(f"--network_weights {spec.weights}: {spec.module} built no network from this file")
        if merge and _mergeable(network):
            network.merge_to(encoder_argument, unet, weights_sd, dtype, device)
            logger.info("merged %s (%s) with multiplier %s", spec.weights, spec.module, spec.multiplier)
        else:
            if merge:
                logger.warning("%s: %s cannot be merged; applied dynamically", spec.weights, type(network).__name__)
            _apply_dynamically(network, spec, encoder_argument, unet, weights_sd, device, dtype)
        networks.append(network)
    return AppliedNetworks(specs, networks, merged=merge and all(_mergeable(network) for network in networks))


def _mergeable(network: Any) -> bool:
    is_mergeable = getattr(network, "is_mergeable", None)
    return hasattr(network, "merge_to") and (is_mergeable is None or bool(is_mergeable()))


def _apply_dynamically(network: Any, spec: NetworkSpec, encoder_argument: Any, unet, weights_sd: dict,
                       device: torch.device, dtype: torch.dtype) -> None:
    # kohya's apply_to takes which parts to patch (LyCORIS insists on both flags): the parts the file has.
    has_text_encoder = any(key.startswith(naming.LORA_PREFIX_TEXT_ENCODER) for key in weights_sd)
    has_unet = any(key.startswith(naming.LORA_PREFIX_UNET) for key in weights_sd)
    network.apply_to(encoder_argument, unet, has_text_encoder, has_unet)
    # Our LoRA maps diffusers-named SDXL keys and 1x1-conv shapes to its own layout; other modules take the file.
    to_model_layout = getattr(network, "to_model_layout", None)
    weights = to_model_layout(weights_sd, spec.weights) if callable(to_model_layout) else weights_sd
    info = network.load_state_dict(weights, strict=False)
    if info.missing_keys:
        logger.warning("%s: %d network tensors were not in the file (first: %s)", spec.weights,
                       len(info.missing_keys), info.missing_keys[0])
    network.to(device=device, dtype=dtype)
    network.eval()
    network.requires_grad_(False)
    logger.info("applied %s (%s) dynamically with multiplier %s", spec.weights, spec.module, spec.multiplier)


def describe_specs(specs: list[NetworkSpec]) -> str:
    return ", ".join(f"{os.path.basename(spec.weights)}×{spec.multiplier}" for spec in specs) or "none"
