"""UNet state-dict conversion between diffusers and the original single-file layout (LDM for SD1/SD2, SGM for SDXL).

Both single-file layouts name the UNet the same way (`input_blocks.N.M`, `middle_block.M`, `output_blocks.N.M`,
`out.*`, `time_embed.*`, SDXL's `label_emb.*`). The key map is derived from the diffusers config (block types,
layers per block, channels, transformer depth), so any size converts: tiny test models as well as the released
ones. Keys are given and returned WITHOUT the `model.diffusion_model.` prefix; the caller adds/strips it.

Every conversion is a pure rename: the returned dict holds the very tensor objects of the input (this also works
on the meta device). Unknown keys and missing keys raise ValueError naming the first such key; `unet_ldm_keys`
tells the full LDM key set of a config so that a loader can split model keys from extra keys first.
"""
from __future__ import annotations

import functools
import inspect
import re
from typing import Callable, Iterable, Mapping, Sequence

import torch

from library.errors import ModelFormatError
from library.families import ModelFamily

# ----------------------------------------------------------------------------------------------- key maps as data

# (diffusers module, LDM module) of the UNet's top-level layers; each has a weight and a bias.
TOP_LEVEL_MODULES: tuple[tuple[str, str], ...] = (
    ("time_embedding.linear_1", "time_embed.0"),
    ("time_embedding.linear_2", "time_embed.2"),
    ("conv_in", "input_blocks.0.0"),
    ("conv_norm_out", "out.0"),
    ("conv_out", "out.2"),
)

# SDXL's size/pooled-text embedding (addition_embed_type="text_time").
TEXT_TIME_MODULES: tuple[tuple[str, str], ...] = (
    ("add_embedding.linear_1", "label_emb.0.0"),
    ("add_embedding.linear_2", "label_emb.0.2"),
)

# (diffusers, LDM) sub-module names inside a ResnetBlock2D / ResBlock.
RESNET_MODULES: tuple[tuple[str, str], ...] = (
    ("norm1", "in_layers.0"),
    ("conv1", "in_layers.2"),
    ("time_emb_proj", "emb_layers.1"),
    ("norm2", "out_layers.0"),
    ("conv2", "out_layers.3"),
)
RESNET_SHORTCUT: tuple[str, str] = ("conv_shortcut", "skip_connection")

# Parameter names inside a Transformer2DModel / SpatialTransformer: identical in both layouts.
TRANSFORMER_PARAMS: tuple[str, ...] = ("norm.weight", "norm.bias", "proj_in.weight", "proj_in.bias",
                                       "proj_out.weight", "proj_out.bias")
TRANSFORMER_BLOCK_PARAMS: tuple[str, ...] = (
    "norm1.weight", "norm1.bias", "norm2.weight", "norm2.bias", "norm3.weight", "norm3.bias",
    "attn1.to_q.weight", "attn1.to_k.weight", "attn1.to_v.weight", "attn1.to_out.0.weight", "attn1.to_out.0.bias",
    "attn2.to_q.weight", "attn2.to_k.weight", "attn2.to_v.weight", "attn2.to_out.0.weight", "attn2.to_out.0.bias",
    "ff.net.0.proj.weight", "ff.net.0.proj.bias", "ff.net.2.weight", "ff.net.2.bias",
)

DOWN_BLOCK_TYPES = {"CrossAttnDownBlock2D": True, "DownBlock2D": False}  # name -> has attention
UP_BLOCK_TYPES = {"CrossAttnUpBlock2D": True, "UpBlock2D": False}
MID_BLOCK_TYPE = "UNetMidBlock2DCrossAttn"

# Config options that change the set of weights and that the single-file layout here does not cover, with the
# value (diffusers' default) that is supported.
UNSUPPORTED_IF_SET: dict[str, object] = {
    "class_embed_type": None,
    "num_class_embeds": None,
    "encoder_hid_dim_type": None,
    "time_cond_proj_dim": None,
    "dual_cross_attention": False,
    "cross_attention_norm": None,
    "attention_type": "default",
    "time_embedding_type": "positional",
    "conv_in_kernel": 3,
    "conv_out_kernel": 3,
}

KeyPairs = list[tuple[str, str]]  # (diffusers key, LDM key)


# ----------------------------------------------------------------------------------------------- config handling


@functools.lru_cache(maxsize=None)
def _unet_defaults() -> dict:
    """diffusers' own defaults of UNet2DConditionModel, for options a config dict leaves out."""
    from diffusers import UNet2DConditionModel

    parameters = inspect.signature(UNet2DConditionModel.__init__).parameters
    return {name: p.default for name, p in parameters.items() if p.default is not inspect.Parameter.empty}


def _option(config: Mapping, name: str):
    """A config option, or diffusers' default when the config leaves it out."""
    return config[name] if name in config else _unet_defaults().get(name)


def _per_block(value, count: int, name: str) -> list:
    """An int-or-sequence config option as one value per block."""
    if isinstance(value, int):
        return [value] * count
    values = list(value)
    if len(values) != count:
        raise ValueError(f"UNet config {name}={value!r} must have one entry per block ({count})")
    return values


def _per_layer(value, count: int) -> list[int]:
    """A transformer depth for one block (int, or one per layer) as one depth per layer."""
    return [value] * count if isinstance(value, int) else [int(v) for v in value]


def _strip_res(block_type: str) -> str:
    return block_type[len("UNetRes"):] if block_type.startswith("UNetRes") else block_type


def _has_attention(block_type: str, known: Mapping[str, bool]) -> bool:
    name = _strip_res(block_type)
    if name not in known:
        raise ValueError(f"UNet block type {block_type!r} is not supported; expected one of {sorted(known)}")
    return known[name]


def _check_supported(config: Mapping) -> None:
    for name, supported in UNSUPPORTED_IF_SET.items():
        value = _option(config, name)
        if value != supported:
            raise ValueError(f"UNet config option {name}={value!r} is not supported by the single-file conversion")
    mid = _option(config, "mid_block_type")
    if mid != MID_BLOCK_TYPE:
        raise ValueError(f"UNet mid_block_type={mid!r} is not supported; expected {MID_BLOCK_TYPE!r}")
    if _option(config, "norm_num_groups") is None:
        raise ValueError("UNet config norm_num_groups=None (no conv_norm_out) is not supported")
    addition = _option(config, "addition_embed_type")
    if addition not in (None, "text_time"):
        raise ValueError(f"UNet addition_embed_type={addition!r} is not supported; expected None or 'text_time'")


# ----------------------------------------------------------------------------------------------- key pairs


def _module_pairs(diffusers_module: str, ldm_module: str, params: Iterable[str] = ("weight", "bias")) -> KeyPairs:
    return [(f"{diffusers_module}.{p}", f"{ldm_module}.{p}") for p in params]


def _resnet_pairs(diffusers_prefix: str, ldm_prefix: str, shortcut: bool) -> KeyPairs:
    modules = RESNET_MODULES + ((RESNET_SHORTCUT,) if shortcut else ())
    pairs: KeyPairs = []
    for diffusers_name, ldm_name in modules:
        pairs += _module_pairs(f"{diffusers_prefix}.{diffusers_name}", f"{ldm_prefix}.{ldm_name}")
    return pairs


def _transformer_pairs(diffusers_prefix: str, ldm_prefix: str, depth: int) -> KeyPairs:
    params = list(TRANSFORMER_PARAMS)
    for index in range(depth):
        params += [f"transformer_blocks.{index}.{p}" for p in TRANSFORMER_BLOCK_PARAMS]
    return [(f"{diffusers_prefix}.{p}", f"{ldm_prefix}.{p}") for p in params]


def _down_pairs(layout: dict) -> KeyPairs:
    """input_blocks.1.. : resnet `.0` and attention `.1` per layer, then the downsampler `.0.op` of the level."""
    pairs: KeyPairs = []
    channels = layout["channels"]
    index = 1
    for block, has_attention in enumerate(layout["down_attention"]):
        for layer in range(layout["layers"][block]):
            in_channels = channels[max(block - 1, 0)] if layer == 0 else channels[block]
            diffusers_prefix = f"down_blocks.{block}"
            pairs += _resnet_pairs(f"{diffusers_prefix}.resnets.{layer}", f"input_blocks.{index}.0",
                                   in_channels != channels[block])
            if has_attention:
                pairs += _transformer_pairs(f"{diffusers_prefix}.attentions.{layer}", f"input_blocks.{index}.1",
                                            layout["down_depth"][block][layer])
            index += 1
        if block < len(channels) - 1:
            pairs += _module_pairs(f"down_blocks.{block}.downsamplers.0.conv", f"input_blocks.{index}.0.op")
            index += 1
    return pairs


def _mid_pairs(layout: dict) -> KeyPairs:
    return (_resnet_pairs("mid_block.resnets.0", "middle_block.0", False)
            + _transformer_pairs("mid_block.attentions.0", "middle_block.1", layout["mid_depth"])
            + _resnet_pairs("mid_block.resnets.1", "middle_block.2", False))


def _up_pairs(layout: dict) -> KeyPairs:
    """output_blocks.0.. : resnet `.0`, attention `.1`, and on the last layer the upsampler `.1.conv`/`.2.conv`."""
    pairs: KeyPairs = []
    levels = len(layout["channels"])
    index = 0
    for block, has_attention in enumerate(layout["up_attention"]):
        layers = layout["layers"][levels - 1 - block] + 1
        for layer in range(layers):
            # Every up-block resnet takes a skip connection, so its input width differs and it has a shortcut.
            diffusers_prefix = f"up_blocks.{block}"
            pairs += _resnet_pairs(f"{diffusers_prefix}.resnets.{layer}", f"output_blocks.{index}.0", True)
            slot = 1
            if has_attention:
                pairs += _transformer_pairs(f"{diffusers_prefix}.attentions.{layer}", f"output_blocks.{index}.1",
                                            layout["up_depth"][block][layer])
                slot = 2
            if layer == layers - 1 and block < levels - 1:
                pairs += _module_pairs(f"{diffusers_prefix}.upsamplers.0.conv", f"output_blocks.{index}.{slot}.conv")
            index += 1
    return pairs


def _layout(config: Mapping) -> dict:
    """The structure of a UNet config that decides its key names, normalised to per-block lists."""
    _check_supported(config)
    channels = [int(c) for c in _option(config, "block_out_channels")]
    levels = len(channels)
    down_types = list(_option(config, "down_block_types"))
    up_types = list(_option(config, "up_block_types"))
    if len(down_types) != levels or len(up_types) != levels:
        raise ValueError(f"UNet config has {levels} block_out_channels but {len(down_types)} down and "
                         f"{len(up_types)} up block types")
    layers = _per_block(_option(config, "layers_per_block"), levels, "layers_per_block")
    depth = _option(config, "transformer_layers_per_block")
    depth = _per_block(depth, levels, "transformer_layers_per_block")
    reverse_depth = _option(config, "reverse_transformer_layers_per_block")
    reverse_depth = list(reversed(depth)) if reverse_depth is None else list(reverse_depth)
    mid_depth = depth[-1] if isinstance(depth[-1], int) else list(depth[-1])[0]
    return dict(
        channels=channels,
        layers=layers,
        down_attention=[_has_attention(t, DOWN_BLOCK_TYPES) for t in down_types],
        up_attention=[_has_attention(t, UP_BLOCK_TYPES) for t in up_types],
        down_depth=[_per_layer(depth[b], layers[b]) for b in range(levels)],
        up_depth=[_per_layer(reverse_depth[b], layers[levels - 1 - b] + 1) for b in range(levels)],
        mid_depth=int(mid_depth),
        text_time=_option(config, "addition_embed_type") == "text_time",
    )


def unet_key_pairs(config: Mapping) -> KeyPairs:
    """Every UNet parameter of a diffusers config as (diffusers key, LDM key), in diffusers' module order."""
    layout = _layout(config)
    pairs: KeyPairs = []
    for diffusers_module, ldm_module in TOP_LEVEL_MODULES[:3]:
        pairs += _module_pairs(diffusers_module, ldm_module)
    if layout["text_time"]:
        for diffusers_module, ldm_module in TEXT_TIME_MODULES:
            pairs += _module_pairs(diffusers_module, ldm_module)
    pairs += _down_pairs(layout) + _up_pairs(layout) + _mid_pairs(layout)
    for diffusers_module, ldm_module in TOP_LEVEL_MODULES[3:]:
        pairs += _module_pairs(diffusers_module, ldm_module)
    return pairs


def unet_ldm_keys(config: Mapping) -> set[str]:
    """The full LDM/SGM UNet key set (without `model.diffusion_model.`) of a diffusers config."""
    return {ldm for _, ldm in unet_key_pairs(config)}


# ----------------------------------------------------------------------------------------------- renaming


def rename_state_dict(state_dict: Mapping[str, torch.Tensor], mapping: Mapping[str, str], what: str,
                      transform: Callable[[str, torch.Tensor], torch.Tensor] | None = None,
                      optional: Mapping[str, str] | None = None) -> dict[str, torch.Tensor]:
    """Rename every key of `state_dict` by `mapping` (source -> target), keeping the tensor objects.

    Keys found in neither `mapping` nor `optional` raise ValueError naming the first; so do keys of `mapping`
    that the state dict lacks. `transform(target_key, tensor)` may reshape a tensor (VAE attention only).
    """
    optional = optional or {}
    converted: dict[str, torch.Tensor] = {}
    for key, tensor in state_dict.items():
        target = mapping.get(key) or optional.get(key)
        if target is None:
            raise ValueError(f"unexpected {what} key {key!r}: not part of the model described by the config")
        converted[target] = transform(target, tensor) if transform else tensor
    missing = [key for key in mapping if key not in state_dict]
    if missing:
        raise ValueError(f"{what} key {missing[0]!r} is missing ({len(missing)} missing in all)")
    return converted


def unet_diffusers_to_ldm(state_dict: Mapping[str, torch.Tensor], config: Mapping) -> dict[str, torch.Tensor]:
    """diffusers UNet2DConditionModel state dict -> LDM/SGM names (no prefix); same tensor objects."""
    return rename_state_dict(state_dict, dict(unet_key_pairs(config)), "diffusers UNet")


def unet_ldm_to_diffusers(state_dict: Mapping[str, torch.Tensor], config: Mapping) -> dict[str, torch.Tensor]:
    """LDM/SGM UNet state dict (no prefix) -> diffusers names; same tensor objects.

    Pass only the UNet keys (see `unet_ldm_keys`): anything else raises ValueError naming the key.
    """
    return rename_state_dict(state_dict, {ldm: diffusers for diffusers, ldm in unet_key_pairs(config)}, "LDM UNet")


# ----------------------------------------------------------------------------------------------- config from keys

_INPUT_RE = re.compile(r"input_blocks\.(\d+)\.(\d+)\.")
_OUTPUT_RE = re.compile(r"output_blocks\.(\d+)\.(\d+)\.")
_DEPTH_RE = re.compile(r"\.transformer_blocks\.(\d+)\.")


class _Keys:
    """Index of an LDM UNet state dict's keys by block, for deriving the config."""

    def __init__(self, state_dict: Mapping[str, torch.Tensor], path: object):
        self.state_dict = state_dict
        self.path = path
        self.input = self._group(_INPUT_RE)
        self.output = self._group(_OUTPUT_RE)

    def _group(self, pattern: re.Pattern) -> dict[int, dict[int, list[str]]]:
        groups: dict[int, dict[int, list[str]]] = {}
        for key in self.state_dict:
            match = pattern.match(key)
            if match:
                groups.setdefault(int(match[1]), {}).setdefault(int(match[2]), []).append(key)
        return groups

    def tensor(self, key: str) -> torch.Tensor:
        if key not in self.state_dict:
            raise ModelFormatError(self.path, f"UNet key {key} is missing; the keys do not make an SD UNet")
        return self.state_dict[key]

    def depth(self, keys: Sequence[str]) -> int:
        """Number of transformer blocks among the keys of one attention module."""
        indices = {int(m[1]) for m in map(_DEPTH_RE.search, keys) if m}
        return max(indices) + 1 if indices else 0


def _input_levels(keys: _Keys) -> list[list[int]]:
    """input_blocks indices (>= 1) grouped by level: a downsampler (`.0.op`) ends a level."""
    levels: list[list[int]] = [[]]
    for index in range(1, max(keys.input) + 1):
        slots = keys.input.get(index)
        if slots is None:
            raise ModelFormatError(keys.path, f"UNet keys input_blocks.{index}.* are missing (the block indices "
                                              "have a gap); the keys do not make an SD UNet")
        if any(key.startswith(f"input_blocks.{index}.0.op.") for key in slots.get(0, [])):
            levels.append([])
        else:
            levels[-1].append(index)
    if any(not level for level in levels):
        raise ModelFormatError(keys.path, "a UNet level without resnets (two downsamplers in a row in "
                                          "input_blocks); the keys do not make an SD UNet")
    return levels


def _up_attention(keys: _Keys, levels: int, layers: list[int]) -> list[bool]:
    flags, index = [], 0
    for block in range(levels):
        first = keys.output.get(index, {}).get(1, [])
        flags.append(any(not key.startswith(f"output_blocks.{index}.1.conv.") for key in first))
        index += layers[levels - 1 - block] + 1
    if index - 1 != max(keys.output, default=-1):
        raise ModelFormatError(keys.path, f"UNet has {max(keys.output, default=-1) + 1} output_blocks but the "
                                          f"input_blocks imply {index}; the keys do not make an SD UNet")
    return flags


def _cross_attention_dim(keys: _Keys) -> int:
    for key in keys.state_dict:
        if key.endswith("attn2.to_k.weight"):
            return int(keys.state_dict[key].shape[1])
    raise ModelFormatError(keys.path, "no cross-attention weights (*.attn2.to_k.weight) in the UNet keys")


def _depths(keys: _Keys, levels: list[list[int]], down_attention: list[bool]) -> tuple[int, ...]:
    depths = [keys.depth(keys.input[level[0]].get(1, [])) if attention else 1
              for level, attention in zip(levels, down_attention)]
    mid = keys.depth([key for key in keys.state_dict if key.startswith("middle_block.1.")])
    if mid == 0:
        raise ModelFormatError(keys.path, "UNet key middle_block.1.transformer_blocks.0.* is missing; "
                                          "the keys do not make an SD UNet")
    if not down_attention[-1]:
        depths[-1] = mid  # diffusers takes the mid block's depth from the last level
    elif depths[-1] != mid:
        raise ModelFormatError(keys.path, f"the middle block has {mid} transformer layers but the last level "
                                          f"{depths[-1]}; diffusers cannot express this UNet")
    return tuple(depths)


def _heads(family: ModelFamily, channels: Sequence[int]) -> int | tuple[int, ...]:
    if family.unet_heads_rule == "fixed8":
        return 8
    if family.unet_heads_rule == "head_dim64":
        return tuple(max(1, c // 64) for c in channels)
    raise ValueError(f"unknown unet_heads_rule {family.unet_heads_rule!r} of family {family.name}")


def _text_time(keys: _Keys, pooled_dim: int | None) -> dict:
    in_features = int(keys.tensor("label_emb.0.0.weight").shape[1])
    if pooled_dim is None:
        if in_features != 2816:
            raise ModelFormatError(keys.path, f"SDXL UNet label_emb takes {in_features} features; the pooled text "
                                              "embedding width is needed to split them (only 2816 is known)")
        pooled_dim = 1280
    time_features = in_features - pooled_dim
    if time_features <= 0 or time_features % 6:
        raise ModelFormatError(keys.path, f"SDXL UNet label_emb takes {in_features} features, which is not 6 "
                                          f"size embeddings plus a pooled embedding of {pooled_dim}")
    return dict(addition_embed_type="text_time", addition_time_embed_dim=time_features // 6,
                projection_class_embeddings_input_dim=in_features)


def unet_config_from_ldm(state_dict: Mapping[str, torch.Tensor], family: ModelFamily, pooled_dim: int | None = None,
                         path: object = "<state dict>") -> dict:
    """diffusers UNet2DConditionModel kwargs derived from LDM/SGM UNet key names and shapes (no prefix).

    Head counts are not stored in the weights; they follow `family.unet_heads_rule`. Raises ModelFormatError
    naming `path` when the keys do not make a UNet.
    """
    keys = _Keys(state_dict, path)
    if not keys.input:
        raise ModelFormatError(path, "no UNet input_blocks.* keys; the keys do not make an SD UNet")
    conv_in = keys.tensor("input_blocks.0.0.weight")
    levels = _input_levels(keys)
    layers = [len(level) for level in levels]
    channels = tuple(int(keys.tensor(f"input_blocks.{level[0]}.0.out_layers.3.weight").shape[0])
                     for level in levels)
    down_attention = [bool(keys.input[level[0]].get(1)) for level in levels]
    up_attention = _up_attention(keys, len(levels), layers)
    proj_in = keys.tensor("middle_block.1.proj_in.weight")
    config = dict(
        sample_size=family.default_resolution // 8,
        in_channels=int(conv_in.shape[1]),
        out_channels=int(keys.tensor("out.2.weight").shape[0]),
        down_block_types=tuple("CrossAttnDownBlock2D" if a else "DownBlock2D" for a in down_attention),
        up_block_types=tuple("CrossAttnUpBlock2D" if a else "UpBlock2D" for a in up_attention),
        block_out_channels=channels,
        layers_per_block=layers[0] if len(set(layers)) == 1 else tuple(layers),
        transformer_layers_per_block=_depths(keys, levels, down_attention),
        attention_head_dim=_heads(family, channels),
        cross_attention_dim=_cross_attention_dim(keys),
        use_linear_projection=proj_in.ndim == 2,
        upcast_attention=family.upcast_attention,
        norm_num_groups=32,
    )
    time_embed_dim = int(keys.tensor("time_embed.0.weight").shape[0])
    if time_embed_dim != 4 * channels[0]:
        config["time_embedding_dim"] = time_embed_dim
    if "label_emb.0.0.weight" in state_dict:
        config.update(_text_time(keys, pooled_dim))
    return config

