"""VAE state-dict conversion between diffusers AutoencoderKL and the original LDM layout, both directions.

The key map is derived from the config (number of levels, layers per block, channels), so any size converts.
Keys are given and returned WITHOUT the `first_stage_model.` prefix; the caller adds/strips it.

All keys are pure renames (same tensor objects) except the mid-block attention q/k/v/proj_out weights: 1x1 convs
`[C, C, 1, 1]` in LDM and Linear `[C, C]` in diffusers, converted with `reshape` (a view, no copy, meta-safe).
The decoder's up blocks are numbered in reverse: diffusers `decoder.up_blocks.i` is LDM `decoder.up.{n-1-i}`.
"""
from __future__ import annotations

import functools
import inspect
from typing import Callable, Mapping

import torch

from library.errors import ModelFormatError
from library.models.convert_unet import KeyPairs, rename_state_dict

# (diffusers, LDM) module names of a ResnetBlock2D; VAE resnets have no time embedding.
RESNET_MODULES: tuple[tuple[str, str], ...] = (("norm1", "norm1"), ("conv1", "conv1"), ("norm2", "norm2"),
                                               ("conv2", "conv2"))
RESNET_SHORTCUT: tuple[str, str] = ("conv_shortcut", "nin_shortcut")

# Mid-block attention: (diffusers, LDM) module names; the ones in ATTENTION_RESHAPED are conv <-> linear.
ATTENTION_MODULES: tuple[tuple[str, str], ...] = (("group_norm", "norm"), ("to_q", "q"), ("to_k", "k"),
                                                  ("to_v", "v"), ("to_out.0", "proj_out"))
ATTENTION_RESHAPED = ("to_q", "to_k", "to_v", "to_out.0")

# (diffusers, LDM) modules of the encoder / decoder outside the blocks.
CODER_MODULES: tuple[tuple[str, str], ...] = (("conv_in", "conv_in"), ("conv_norm_out", "norm_out"),
                                              ("conv_out", "conv_out"))

DOWN_BLOCK_TYPE = "DownEncoderBlock2D"
UP_BLOCK_TYPE = "UpDecoderBlock2D"


@functools.lru_cache(maxsize=None)
def _vae_defaults() -> dict:
    """diffusers' own defaults of AutoencoderKL, for options a config dict leaves out."""
    from diffusers import AutoencoderKL

    parameters = inspect.signature(AutoencoderKL.__init__).parameters
    return {name: p.default for name, p in parameters.items() if p.default is not inspect.Parameter.empty}


def _option(config: Mapping, name: str):
    return config[name] if name in config else _vae_defaults().get(name)


def _module_pairs(diffusers_module: str, ldm_module: str) -> KeyPairs:
    return [(f"{diffusers_module}.{p}", f"{ldm_module}.{p}") for p in ("weight", "bias")]


def _resnet_pairs(diffusers_prefix: str, ldm_prefix: str, shortcut: bool) -> KeyPairs:
    pairs: KeyPairs = []
    for diffusers_name, ldm_name in RESNET_MODULES + ((RESNET_SHORTCUT,) if shortcut else ()):
        pairs += _module_pairs(f"{diffusers_prefix}.{diffusers_name}", f"{ldm_prefix}.{ldm_name}")
    return pairs


def _mid_pairs(coder: str, attention: bool) -> KeyPairs:
    pairs = _resnet_pairs(f"{coder}.mid_block.resnets.0", f"{coder}.mid.block_1", False)
    if attention:
        for diffusers_name, ldm_name in ATTENTION_MODULES:
            pairs += _module_pairs(f"{coder}.mid_block.attentions.0.{diffusers_name}", f"{coder}.mid.attn_1.{ldm_name}")
    return pairs + _resnet_pairs(f"{coder}.mid_block.resnets.1", f"{coder}.mid.block_2", False)


def _encoder_pairs(channels: list[int], layers: int, shortcut: Callable[[bool], bool]) -> KeyPairs:
    pairs: KeyPairs = []
    for block, out_channels in enumerate(channels):
        in_channels = channels[max(block - 1, 0)]
        for layer in range(layers):
            pairs += _resnet_pairs(f"encoder.down_blocks.{block}.resnets.{layer}",
                                   f"encoder.down.{block}.block.{layer}",
                                   shortcut(layer == 0 and in_channels != out_channels))
        if block < len(channels) - 1:
            pairs += _module_pairs(f"encoder.down_blocks.{block}.downsamplers.0.conv",
                                   f"encoder.down.{block}.downsample.conv")
    return pairs


def _decoder_pairs(channels: list[int], layers: int, shortcut: Callable[[bool], bool]) -> KeyPairs:
    pairs: KeyPairs = []
    reversed_channels = list(reversed(channels))
    levels = len(channels)
    for block, out_channels in enumerate(reversed_channels):
        in_channels = reversed_channels[max(block - 1, 0)]
        ldm_block = levels - 1 - block
        for layer in range(layers + 1):
            pairs += _resnet_pairs(f"decoder.up_blocks.{block}.resnets.{layer}",
                                   f"decoder.up.{ldm_block}.block.{layer}",
                                   shortcut(layer == 0 and in_channels != out_channels))
        if block < levels - 1:
            pairs += _module_pairs(f"decoder.up_blocks.{block}.upsamplers.0.conv",
                                   f"decoder.up.{ldm_block}.upsample.conv")
    return pairs


def _check_block_types(config: Mapping) -> None:
    for name, expected in (("down_block_types", DOWN_BLOCK_TYPE), ("up_block_types", UP_BLOCK_TYPE)):
        types = config.get(name)
        if types is not None and any(t != expected for t in types):
            raise ValueError(f"VAE {name}={tuple(types)!r} is not supported; expected {expected} only")


def _vae_pairs(config: Mapping, shortcut: Callable[[bool], bool] = bool) -> KeyPairs:
    """(diffusers key, LDM key) of every VAE parameter; `shortcut(needed)` decides whether a resnet has one."""
    _check_block_types(config)
    channels = [int(c) for c in _option(config, "block_out_channels")]
    layers = int(_option(config, "layers_per_block"))
    attention = bool(_option(config, "mid_block_add_attention"))
    pairs: KeyPairs = []
    for coder in ("encoder", "decoder"):
        diffusers_in, ldm_in = CODER_MODULES[0]
        pairs += _module_pairs(f"{coder}.{diffusers_in}", f"{coder}.{ldm_in}")
        if coder == "encoder":
            pairs += _encoder_pairs(channels, layers, shortcut) + _mid_pairs(coder, attention)
        else:
            pairs += _mid_pairs(coder, attention) + _decoder_pairs(channels, layers, shortcut)
        for diffusers_name, ldm_name in CODER_MODULES[1:]:
            pairs += _module_pairs(f"{coder}.{diffusers_name}", f"{coder}.{ldm_name}")
    for name in ("quant_conv", "post_quant_conv"):
        if _option(config, f"use_{name}"):
            pairs += _module_pairs(name, name)
    return pairs


def vae_key_pairs(config: Mapping) -> KeyPairs:
    """Every VAE parameter of a diffusers AutoencoderKL config as (diffusers key, LDM key)."""
    return _vae_pairs(config)


def vae_ldm_keys(config: Mapping) -> set[str]:
    """The full LDM VAE key set (without `first_stage_model.`) of a diffusers config."""
    return {ldm for _, ldm in _vae_pairs(config)}


def _optional_shortcuts(config: Mapping) -> KeyPairs:
    """Shortcut keys of every resnet, whatever the channels say.

    Accepted when present so that a caller that knows only the number of levels and layers (a guessed config
    with placeholder channels) can still convert; the required keys are still checked strictly.
    """
    return [pair for pair in _vae_pairs(config, shortcut=lambda needed: True)
            if pair[0].endswith((".conv_shortcut.weight", ".conv_shortcut.bias"))]


def _is_attention_weight(diffusers_key: str) -> bool:
    module, _, param = diffusers_key.rpartition(".")
    return ".mid_block.attentions.0." in module and param == "weight" and module.endswith(ATTENTION_RESHAPED)


def _to_linear(tensor: torch.Tensor) -> torch.Tensor:
    """LDM 1x1 conv weight [C, C, 1, 1] (or conv1d [C, C, 1]) -> Linear weight [C, C]; a view when contiguous."""
    if tensor.ndim == 2:
        return tensor
    if tensor.ndim not in (3, 4) or any(size != 1 for size in tensor.shape[2:]):
        raise ValueError(f"VAE attention weight of shape {tuple(tensor.shape)} is not a 1x1 convolution")
    return tensor.reshape(tensor.shape[0], tensor.shape[1])


def _to_conv(tensor: torch.Tensor) -> torch.Tensor:
    """Linear weight [C, C] -> LDM 1x1 conv weight [C, C, 1, 1]; a view when contiguous."""
    return tensor.reshape(*tensor.shape, 1, 1) if tensor.ndim == 2 else tensor


def vae_diffusers_to_ldm(state_dict: Mapping[str, torch.Tensor], config: Mapping) -> dict[str, torch.Tensor]:
    """diffusers AutoencoderKL state dict -> LDM names (no prefix)."""
    pairs = _vae_pairs(config)
    reshaped = {ldm for diffusers, ldm in pairs if _is_attention_weight(diffusers)}
    return rename_state_dict(state_dict, dict(pairs), "diffusers VAE", optional=dict(_optional_shortcuts(config)),
                             transform=lambda key, tensor: _to_conv(tensor) if key in reshaped else tensor)


def vae_ldm_to_diffusers(state_dict: Mapping[str, torch.Tensor], config: Mapping) -> dict[str, torch.Tensor]:
    """LDM VAE state dict (no prefix) -> diffusers names. Pass only VAE keys (see `vae_ldm_keys`)."""
    pairs = _vae_pairs(config)
    optional = {ldm: diffusers for diffusers, ldm in _optional_shortcuts(config)}
    return rename_state_dict(state_dict, {ldm: diffusers for diffusers, ldm in pairs}, "LDM VAE", optional=optional,
                             transform=lambda key, tensor: _to_linear(tensor) if _is_attention_weight(key) else tensor)


def _count(state_dict: Mapping[str, torch.Tensor], prefix: str) -> int:
    """Number of distinct integer indices right after `prefix` among the keys."""
    indices = {key[len(prefix):].split(".", 1)[0] for key in state_dict if key.startswith(prefix)}
    return len(indices)


def _tensor(state_dict: Mapping[str, torch.Tensor], key: str, path: object) -> torch.Tensor:
    if key not in state_dict:
        raise ModelFormatError(path, f"VAE key {key} is missing; the keys do not make an LDM VAE")
    return state_dict[key]


def vae_config_from_ldm(state_dict: Mapping[str, torch.Tensor], scaling_factor: float, path: object = "<state dict>",
                        sample_size: int | None = None) -> dict:
    """diffusers AutoencoderKL kwargs derived from LDM VAE key names and shapes (no prefix).

    Raises ModelFormatError naming `path` when the keys do not make a VAE.
    """
    levels = _count(state_dict, "encoder.down.")
    if levels == 0:
        raise ModelFormatError(path, "no VAE encoder.down.* keys; the keys do not make an LDM VAE")
    layers = _count(state_dict, "encoder.down.0.block.")
    channels = tuple(int(_tensor(state_dict, f"encoder.down.{i}.block.0.conv1.weight", path).shape[0])
                     for i in range(levels))
    if "quant_conv.weight" in state_dict:
        latent_channels = int(state_dict["quant_conv.weight"].shape[0]) // 2
    else:
        latent_channels = int(_tensor(state_dict, "encoder.conv_out.weight", path).shape[0]) // 2
    config = dict(
        in_channels=int(_tensor(state_dict, "encoder.conv_in.weight", path).shape[1]),
        out_channels=int(_tensor(state_dict, "decoder.conv_out.weight", path).shape[0]),
        down_block_types=(DOWN_BLOCK_TYPE,) * levels,
        up_block_types=(UP_BLOCK_TYPE,) * levels,
        block_out_channels=channels,
        layers_per_block=layers,
        latent_channels=latent_channels,
        norm_num_groups=32,
        scaling_factor=scaling_factor,
    )
    if sample_size is not None:
        config["sample_size"] = sample_size
    for name in ("quant_conv", "post_quant_conv"):
        if f"{name}.weight" not in state_dict:
            config[f"use_{name}"] = False
    if "encoder.mid.attn_1.q.weight" not in state_dict:
        config["mid_block_add_attention"] = False
    return config
