"""kohya-compatible LoRA network (`--network_module networks.lora`): LoRAModule, LoRANetwork, create_network*.

Owns the low-rank modules, the `--network_args` parsing and the LoRA file format (COMPAT §1, §6, §16); which
layers are wrapped and how they are named lives in networks/naming.py.
"""
from __future__ import annotations

import difflib
import hashlib
import logging
import math
import os
import random
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from tqdm import tqdm

from library.errors import FlagError, ModelFormatError
from library.models.state_dict_io import SAFETENSORS_SUFFIXES, atomic_output, read_state_dict, write_state_dict
from networks import naming
from networks.naming import LoRATarget, NamingScheme, RankPlan
from networks.lora_ops import lora_linear
from networks.patching import ForwardPatch

logger = logging.getLogger(__name__)


class LoRAModule(ForwardPatch):
    """`y = W x + up(down(x)) * multiplier * alpha / rank` around one Linear/Conv2d (COMPAT §1.6).

    The wrapped layer is patched by `apply_to` (networks/patching.py: its `forward` is replaced, the layer is
    kept by reference and out of the LoRA state dict).
    """

    def __init__(self, lora_name: str, original_module: torch.nn.Module, multiplier: float = 1.0,
                 lora_dim: int = naming.DEFAULT_NETWORK_DIM, alpha: float | None = naming.DEFAULT_NETWORK_ALPHA,
                 dropout: float | None = None, rank_dropout: float | None = None,
                 module_dropout: float | None = None):
        super().__init__(original_module)
        self.lora_name = lora_name
        self.lora_dim = lora_dim
        self.lora_down, self.lora_up = _low_rank_pair(original_module, lora_dim)
        # An alpha of 0 or None means "no scaling" (kohya: alpha := rank); saved as a 0-d tensor.
        alpha = float(lora_dim if not alpha else alpha)
        self.register_buffer("alpha", torch.tensor(alpha))
        self.scale = alpha / lora_dim
        self.register_load_state_dict_post_hook(_refresh_scale)
        torch.nn.init.kaiming_uniform_(self.lora_down.weight, a=math.sqrt(5))
        torch.nn.init.zeros_(self.lora_up.weight)
        self.multiplier = multiplier
        self.dropout, self.rank_dropout, self.module_dropout = dropout, rank_dropout, module_dropout
        # Linear layers take the fused update (networks/lora_ops.py); convolutions the plain layers
        self._fused = isinstance(self.lora_down, torch.nn.Linear)
        self.compute_dtype: torch.dtype | None = None  # the dtype of the last fused forward
        # (down, up, their versions) in compute_dtype, cast for all modules at once by LoRANetwork.on_step_start
        self.compute_copies: tuple | None = None

    def forward(self, x: torch.Tensor, *args, **kwargs) -> torch.Tensor:
        original_output = self.original_forward(x, *args, **kwargs)
        # Python's generator (seeded and saved with the run's states like torch's): no host sync on a GPU
        if self.training and self.module_dropout and random.random() < self.module_dropout:
            return original_output
        if self._fused and not (self.training and (self.dropout or self.rank_dropout)):
            down, up = self.lora_down.weight, self.lora_up.weight
            if not torch.compiler.is_compiling():
                self.compute_dtype = original_output.dtype
            # compiled: the graph casts (and fuses the casts) itself; tensor versions cannot be traced
            copies = None if torch.compiler.is_compiling() else self.compute_copies
            if copies is not None and (copies[0].dtype != original_output.dtype
                                       or copies[2] != (down._version, up._version)):
                copies = None  # stale: the weights changed since LoRANetwork.on_step_start cast them
            return lora_linear(x, original_output, down, up, self.multiplier * self.scale,
                               *(copies[:2] if copies is not None else ()))
        hidden = self.lora_down(x)
        scale = self.scale
        if self.training and self.dropout:
            hidden = torch.nn.functional.dropout(hidden, p=self.dropout)
        if self.training and self.rank_dropout:
            hidden = hidden * _rank_keep_mask(hidden, self.lora_dim, self.rank_dropout)
            scale = scale / (1.0 - self.rank_dropout)  # as if the rank were smaller (kohya's rank dropout)
        return original_output + self.lora_up(hidden) * (self.multiplier * scale)

    def merge_into_original(self, down: torch.Tensor, up: torch.Tensor, alpha: float, dtype: torch.dtype | None,
                            device: torch.device | str | None) -> None:
        """Add `multiplier * alpha / rank * up @ down` (from a file) to the wrapped layer's weight."""
        weight = self.original_module.weight
        device = device or weight.device
        compute_dtype = torch.promote_types(weight.dtype, torch.float32)
        delta = lora_weight_delta(down.to(device, compute_dtype), up.to(device, compute_dtype), alpha / down.shape[0])
        merged = weight.data.to(device, compute_dtype) + self.multiplier * delta.reshape(weight.shape)
        # kohya merges in float32, casts to `dtype`, then copies into the layer (which keeps its own dtype)
        weight.data.copy_(merged.to(dtype or weight.dtype))


def _low_rank_pair(module: torch.nn.Module, rank: int) -> tuple[torch.nn.Module, torch.nn.Module]:
    """down/up layers: a conv's down copies its kernel, stride and padding; up is always 1x1 (COMPAT §1.6)."""
    if isinstance(module, torch.nn.Conv2d):
        down = torch.nn.Conv2d(module.in_channels, rank, module.kernel_size, module.stride, module.padding,
                               bias=False)
        return down, torch.nn.Conv2d(rank, module.out_channels, (1, 1), (1, 1), bias=False)
    return torch.nn.Linear(module.in_features, rank, bias=False), torch.nn.Linear(rank, module.out_features, bias=False)


def _refresh_scale(module: LoRAModule, incompatible_keys) -> None:
    module.scale = float(module.alpha) / module.lora_dim


def _rank_keep_mask(hidden: torch.Tensor, rank: int, drop_probability: float) -> torch.Tensor:
    """One keep/drop draw per sample and rank, broadcast over tokens (B, N, r) or pixels (B, r, H, W)."""
    mask = (torch.rand((hidden.shape[0], rank), device=hidden.device) > drop_probability).to(hidden.dtype)
    if hidden.dim() == 3:
        return mask.unsqueeze(1)
    if hidden.dim() == 4:
        return mask[:, :, None, None]
    return mask


def lora_weight_delta(down: torch.Tensor, up: torch.Tensor, scale: float) -> torch.Tensor:
    """ΔW = up @ down * scale; a 3x3 down is composed with the 1x1 up by a convolution (COMPAT §1.6)."""
    if down.dim() == 4 and tuple(down.shape[2:]) != (1, 1):
        return torch.nn.functional.conv2d(down.permute(1, 0, 2, 3), up).permute(1, 0, 2, 3) * scale
    delta = up.flatten(1) @ down.flatten(1)
    return (delta[:, :, None, None] if down.dim() == 4 else delta) * scale


# ----------------------------------------------------------------------------------------------- --network_args

KNOWN_NETWORK_ARGS = (
    "conv_dim", "conv_alpha", "dropout", "rank_dropout", "module_dropout", "block_dims", "block_alphas",
    "conv_block_dims", "conv_block_alphas", "down_lr_weight", "mid_lr_weight", "up_lr_weight",
    "block_lr_zero_threshold", "loraplus_lr_ratio", "loraplus_unet_lr_ratio", "loraplus_text_encoder_lr_ratio",
)
LR_WEIGHT_PRESETS = ("cosine", "sine", "linear", "reverse_linear", "zeros")


@dataclass
class LoRAArgs:
    """The typed `--network_args` of networks.lora. block_lr_weight is the per-slot LR multiplier vector."""

    conv_dim: int | None = None
    conv_alpha: float = naming.DEFAULT_CONV_ALPHA
    dropout: float | None = None
    rank_dropout: float | None = None
    module_dropout: float | None = None
    block_dims: list[int] | None = None
    block_alphas: list[float] | None = None
    conv_block_dims: list[int] | None = None
    conv_block_alphas: list[float] | None = None
    block_lr_weight: list[float] | None = None
    loraplus_ratios: dict[str, float | None] = field(default_factory=dict)


def _arg_error(key: str, expected: str, got: object, hint: str | None = None) -> FlagError:
    return FlagError(f"--network_args {key}: expected {expected}, got {got!r}" + (f"; {hint}" if hint else ""))


def _is_unset(value: Any) -> bool:
    return value is None or (isinstance(value, str) and value.strip().lower() in ("", "none"))


def _number(key: str, value: Any, kind: type, minimum: float | None = None, below: float | None = None):
    """One int/float argument; `below` is an exclusive upper bound (dropout probabilities)."""
    what = "an integer" if kind is int else "a number"
    try:
        number = kind(str(value).strip()) if isinstance(value, str) else kind(value)
    except (TypeError, ValueError):
        raise _arg_error(key, what, value) from None
    if kind is int and not isinstance(value, str) and number != value:
        raise _arg_error(key, what, value)
    if (minimum is not None and number < minimum) or (below is not None and number >= below):
        bounds = f">= {minimum}" if below is None else f"in [{minimum}, {below})"
        raise _arg_error(key, f"{what} {bounds}", value)
    return number


def _items(value: Any) -> list:
    """A comma list given as a string, a list (TOML/Python callers) or a single number."""
    if isinstance(value, str):
        return value.split(",")
    return list(value) if isinstance(value, (list, tuple)) else [value]


def _number_list(key: str, value: Any, kind: type, length: int, family: str) -> list:
    """A comma list with exactly `length` entries."""
    items = _items(value)
    if len(items) != length:
        raise _arg_error(key, f"{length} comma-separated values (one per U-Net block of {family})",
                         f"{len(items)} values", "see COMPAT §6 for the block order")
    return [_number(key, item, kind, minimum=0) for item in items]


def _lr_weights(key: str, value: Any, length: int) -> list[float]:
    """A preset (`sine`, `cosine+0.5`, ...) or a comma list; short lists are filled with 1.0 (kohya)."""
    if isinstance(value, str) and value.strip() and value.strip()[0].isalpha():
        return _lr_weight_preset(key, value.strip(), length)
    weights = [_number(key, item, float, minimum=0) for item in _items(value)]
    if len(weights) != length:
        logger.warning("--network_args %s has %d values; %d are used (missing ones are 1.0)",
                       key, len(weights), length)
    return (weights + [1.0] * length)[:length]


def _lr_weight_preset(key: str, text: str, length: int) -> list[float]:
    name, _, base_text = text.partition("+")
    base = _number(key, base_text, float) if base_text else 0.0
    steps = [i / max(length - 1, 1) for i in range(length)]
    curves = {
        "cosine": [math.sin(math.pi * s / 2) for s in reversed(steps)],
        "sine": [math.sin(math.pi * s / 2) for s in steps],
        "linear": steps,
        "reverse_linear": list(reversed(steps)),
        "zeros": [0.0] * length,
    }
    if name not in curves:
        close = difflib.get_close_matches(name, LR_WEIGHT_PRESETS, n=1)
        hint = f"did you mean {close[0]}?" if close else f"presets: {', '.join(LR_WEIGHT_PRESETS)}"
        raise _arg_error(key, "a comma list of numbers or a preset[+base]", text, hint)
    return [weight + base for weight in curves[name]]


def _warn_unknown_args(kwargs: Mapping[str, Any]) -> None:
    for key in kwargs:
        if key not in KNOWN_NETWORK_ARGS:
            close = difflib.get_close_matches(key, KNOWN_NETWORK_ARGS, n=1)
            hint = f"; did you mean {close[0]}?" if close else ""
            logger.warning("--network_args %s: not an option of networks.lora, ignored%s", key, hint)


def parse_network_args(kwargs: Mapping[str, Any], scheme: NamingScheme) -> LoRAArgs:
    """Turn the `--network_args` strings (or typed values) into LoRAArgs; bad values raise FlagError."""
    _warn_unknown_args(kwargs)
    given = {key: value for key, value in kwargs.items() if key in KNOWN_NETWORK_ARGS and not _is_unset(value)}
    args = LoRAArgs()
    if "conv_dim" in given:
        args.conv_dim = _number("conv_dim", given["conv_dim"], int, minimum=0) or None
    if "conv_alpha" in given:
        args.conv_alpha = _number("conv_alpha", given["conv_alpha"], float)
    for key in ("dropout", "rank_dropout", "module_dropout"):
        if key in given:
            setattr(args, key, _number(key, given[key], float, minimum=0, below=1))
    for key, kind in (("block_dims", int), ("block_alphas", float), ("conv_block_dims", int),
                      ("conv_block_alphas", float)):
        if key in given:
            setattr(args, key, _number_list(key, given[key], kind, scheme.block_count, scheme.family))
    args.block_lr_weight = _block_lr_vector(given, scheme)
    for key in ("loraplus_lr_ratio", "loraplus_unet_lr_ratio", "loraplus_text_encoder_lr_ratio"):
        args.loraplus_ratios[key] = _number(key, given[key], float, minimum=0) if key in given else None
    return args


def _block_lr_vector(given: Mapping[str, Any], scheme: NamingScheme) -> list[float] | None:
    """down + mid + up LR weights (padded with 1.0 for SDXL) as one weight per block slot (COMPAT §6)."""
    keys = ("down_lr_weight", "mid_lr_weight", "up_lr_weight")
    if not any(key in given for key in keys):
        return None
    threshold = _number("block_lr_zero_threshold", given.get("block_lr_zero_threshold", 0.0), float)
    before, after = scheme.lr_weight_padding
    vector = [1.0] * before
    for key, length in zip(keys, scheme.lr_weight_lengths):
        weights = _lr_weights(key, given[key], length) if key in given else [1.0] * length
        vector += [weight if weight > threshold else 0.0 for weight in weights]
    return vector + [1.0] * after


# ----------------------------------------------------------------------------------------------- ranks


def rank_plan_from_args(args: LoRAArgs, scheme: NamingScheme, network_dim: int, network_alpha: float) -> RankPlan:
    """Per-block ranks are used when any block list or block LR weight is given; zero-LR blocks get rank 0."""
    block_lists = (args.block_dims, args.block_alphas, args.conv_block_dims, args.conv_block_alphas)
    if all(values is None for values in block_lists) and args.block_lr_weight is None:
        return RankPlan(network_dim, network_alpha, args.conv_dim, args.conv_alpha)
    count = scheme.block_count
    dims = args.block_dims or [network_dim] * count
    conv_dims = args.conv_block_dims or ([args.conv_dim] * count if args.conv_dim else None)
    if args.block_lr_weight is not None:
        dims = [dim if weight else 0 for dim, weight in zip(dims, args.block_lr_weight)]
        conv_dims = conv_dims and [dim if weight else 0 for dim, weight in zip(conv_dims, args.block_lr_weight)]
    return RankPlan(network_dim, network_alpha, args.conv_dim, args.conv_alpha, dims,
                    args.block_alphas or [network_alpha] * count, conv_dims,
                    args.conv_block_alphas or [args.conv_alpha] * count)


# ----------------------------------------------------------------------------------------------- network


def _as_list(text_encoder: Any) -> list[torch.nn.Module]:
    if text_encoder is None:
        return []
    return [te for te in text_encoder if te is not None] if isinstance(text_encoder, (list, tuple)) else [text_encoder]


class LoRANetwork(torch.nn.Module):
    """All LoRA modules of one model; implements kohya's network-module interface (COMPAT §16)."""

    def __init__(self, text_encoder: Any, unet: torch.nn.Module, rank_plan: RankPlan | None = None,
                 multiplier: float = 1.0, dropout: float | None = None, rank_dropout: float | None = None,
                 module_dropout: float | None = None):
        super().__init__()
        rank_plan = rank_plan or RankPlan()
        self.multiplier = multiplier
        self.scheme = naming.scheme_for_unet(unet)
        self.text_encoder_count = len(_as_list(text_encoder))
        self.unet_name_aliases = naming.diffusers_unet_name_aliases(unet, self.scheme)
        dropouts = {"dropout": dropout, "rank_dropout": rank_dropout, "module_dropout": module_dropout}
        self.text_encoder_loras = self._create_loras(naming.text_encoder_targets(_as_list(text_encoder)),
                                                     rank_plan, dropouts)
        unet_targets = naming.unet_targets(unet, self.scheme, rank_plan.includes_conv_blocks)
        self.unet_loras = self._create_loras(unet_targets, rank_plan, dropouts)
        self.written_as_conv = {t.name for t in unet_targets if t.written_as_conv}
        self.block_index = {t.name: t.block_index for t in unet_targets}
        self.block_lr_weight: list[float] | None = None
        self.loraplus_lr_ratio = self.loraplus_unet_lr_ratio = self.loraplus_text_encoder_lr_ratio = None
        logger.info("LoRA for %s: %d text-encoder modules, %d U-Net modules", self.scheme.family,
                    len(self.text_encoder_loras), len(self.unet_loras))

    def _create_loras(self, targets: list[LoRATarget], plan: RankPlan, dropouts: dict) -> list[LoRAModule]:
        loras = []
        for target in targets:
            dim, alpha = plan.rank_for(target)
            if not dim:
                continue
            if hasattr(self, target.name):
                raise ValueError(f"duplicated LoRA name {target.name}")  # a naming bug, not user input
            lora = self._make_module(target, dim, alpha, dropouts)
            self.add_module(target.name, lora)
            loras.append(lora)
        return loras

    def _make_module(self, target: LoRATarget, dim: int, alpha: float, dropouts: dict) -> LoRAModule:
        """One module of the network (variants such as DyLoRA build their own module class here)."""
        return LoRAModule(target.name, target.module, self.multiplier, dim, alpha, **dropouts)

    # -- kohya interface: hooking, multiplier, training hooks

    def apply_to(self, text_encoder: Any, unet: torch.nn.Module, apply_text_encoder: bool = True,
                 apply_unet: bool = True) -> None:
        """Patch the wrapped layers; a part that is not applied is dropped (its keys are not saved)."""
        if not apply_text_encoder:
            self._drop(self.text_encoder_loras)
            self.text_encoder_loras = []
        if not apply_unet:
            self._drop(self.unet_loras)
            self.unet_loras = []
        for lora in self.text_encoder_loras + self.unet_loras:
            lora.apply_to()

    def _drop(self, loras: list[LoRAModule]) -> None:
        for lora in loras:
            delattr(self, lora.lora_name)

    def on_step_start(self, text_encoder: Any = None, unet: Any = None) -> None:
        """kohya's per-step hook: cast every fused module's weights to its compute dtype in one foreach copy, so
        the modules' forwards cast nothing (fewer operations per step)."""
        modules = [lora for lora in self.text_encoder_loras + self.unet_loras
                   if lora._fused and lora.compute_dtype not in (None, lora.lora_down.weight.dtype)]
        if not modules:
            return
        sources, targets = [], []
        for lora in modules:
            down, up = lora.lora_down.weight, lora.lora_up.weight
            copies = lora.compute_copies
            if copies is None or copies[0].dtype != lora.compute_dtype or copies[0].device != down.device:
                copies = (torch.empty_like(down, dtype=lora.compute_dtype),
                          torch.empty_like(up, dtype=lora.compute_dtype), None)
            sources += [down.detach(), up.detach()]
            targets += [copies[0], copies[1]]
            lora.compute_copies = (copies[0], copies[1], (down._version, up._version))
        with torch.no_grad():
            torch._foreach_copy_(targets, sources)

    def set_multiplier(self, multiplier: float) -> None:
        self.multiplier = multiplier
        for lora in self.text_encoder_loras + self.unet_loras:
            lora.multiplier = multiplier

    def is_mergeable(self) -> bool:
        return True

    def enable_gradient_checkpointing(self) -> None:
        """Nothing to do: LoRA modules hold no activations of their own worth checkpointing."""

    def prepare_grad_etc(self, text_encoder: Any = None, unet: Any = None) -> None:
        self.requires_grad_(True)

    def on_epoch_start(self, text_encoder: Any = None, unet: Any = None) -> None:
        self.train()

    def get_trainable_params(self):
        return self.parameters()

    # -- optimizer parameter groups

    def set_loraplus_lr_ratio(self, loraplus_lr_ratio: float | None = None,
                              loraplus_unet_lr_ratio: float | None = None,
                              loraplus_text_encoder_lr_ratio: float | None = None) -> None:
        self.loraplus_lr_ratio = loraplus_lr_ratio
        self.loraplus_unet_lr_ratio = loraplus_unet_lr_ratio
        self.loraplus_text_encoder_lr_ratio = loraplus_text_encoder_lr_ratio

    def set_block_lr_weight(self, block_lr_weight: Sequence[float] | None) -> None:
        self.block_lr_weight = list(block_lr_weight) if block_lr_weight is not None else None

    def prepare_optimizer_params_with_multiple_te_lrs(self, text_encoder_lr: Any, unet_lr: float | None,
                                                      default_lr: float | None) -> tuple[list[dict], list[str]]:
        return self.prepare_optimizer_params(text_encoder_lr, unet_lr, default_lr)

    def prepare_optimizer_params(self, text_encoder_lr: Any = None, unet_lr: float | None = None,
                                 default_lr: float | None = None) -> tuple[list[dict], list[str]]:
        """(param groups, descriptions): `textencoder[ 1|2]`, `unet` or `unet_block<i>`, suffix ` plus` (LoRA+).

        text_encoder_lr may be a list (one per SDXL encoder; a single entry serves both).
        """
        self.requires_grad_(True)
        groups: list[dict] = []
        descriptions: list[str] = []
        te_ratio = self.loraplus_text_encoder_lr_ratio or self.loraplus_lr_ratio
        te_lrs = _text_encoder_lrs(text_encoder_lr, default_lr, self.text_encoder_count)
        for index, prefix in enumerate(naming.text_encoder_prefixes(self.text_encoder_count)):
            loras = [lora for lora in self.text_encoder_loras if lora.lora_name.startswith(prefix + "_")]
            label = "textencoder" if self.text_encoder_count == 1 else f"textencoder {index + 1}"
            _add_groups(groups, descriptions, loras, te_lrs[index], te_ratio, label)
        unet_ratio = self.loraplus_unet_lr_ratio or self.loraplus_lr_ratio
        unet_lr = unet_lr if unet_lr is not None else default_lr
        if self.block_lr_weight is None:
            _add_groups(groups, descriptions, self.unet_loras, unet_lr, unet_ratio, "unet")
            return groups, descriptions
        for block, loras in sorted(self._unet_loras_by_block().items()):
            weight = self.block_lr_weight[block] if 0 <= block < len(self.block_lr_weight) else 1.0
            lr = unet_lr * weight if unet_lr is not None else None
            _add_groups(groups, descriptions, loras, lr, unet_ratio, f"unet_block{block}")
        return groups, descriptions

    def _unet_loras_by_block(self) -> dict[int, list[LoRAModule]]:
        blocks: dict[int, list[LoRAModule]] = {}
        for lora in self.unet_loras:
            blocks.setdefault(self.block_index.get(lora.lora_name, -1), []).append(lora)
        return blocks

    # -- file I/O

    def file_state_dict(self, dtype: torch.dtype | None = None) -> dict[str, torch.Tensor]:
        """The tensors as written: cast to `dtype` (alpha included, COMPAT §1.7), SD1/SD2 projections 4-D."""
        state_dict = {}
        for key, tensor in self.state_dict().items():
            tensor = tensor.detach().to("cpu", dtype) if dtype is not None else tensor.detach().to("cpu")
            if naming.split_lora_key(key)[0] in self.written_as_conv and tensor.dim() == 2:
                tensor = tensor[:, :, None, None]
            state_dict[key] = tensor.contiguous()
        return state_dict

    def save_weights(self, file: str | os.PathLike, dtype: torch.dtype | None,
                     metadata: Mapping[str, str] | None) -> None:
        """Write atomically: .safetensors with the metadata as given plus sshs_* hashes, else torch.save."""
        state_dict = self.file_state_dict(dtype)
        path = Path(file)
        if path.suffix.lower() in SAFETENSORS_SUFFIXES:
            metadata = dict(metadata or {})
            metadata["sshs_model_hash"], metadata["sshs_legacy_hash"] = safetensors_hashes(state_dict, metadata)
            write_state_dict(path, state_dict, metadata)
            return
        with atomic_output(path) as temp:
            torch.save(state_dict, str(temp))  # kohya's .ckpt/.pt LoRA is the bare dict (COMPAT §1.1)

    def load_weights(self, file: str | os.PathLike):
        """Load a LoRA file into the existing modules (kohya: non-strict); returns torch's missing/unexpected."""
        weights = self.to_model_layout(read_state_dict(file), file)
        own_keys = set(self.state_dict())
        if own_keys and not own_keys & set(weights):
            raise ModelFormatError(file, f"none of its {len(weights)} tensors match a LoRA module of this network "
                                         f"({self.scheme.family}); is it a LoRA for another model family?")
        info = self.load_state_dict(weights, strict=False)
        if info.unexpected_keys:
            logger.warning("%s: %d tensors have no module in this network and were ignored (first: %s)",
                           file, len(info.unexpected_keys), info.unexpected_keys[0])
        return info

    def to_model_layout(self, weights_sd: Mapping[str, torch.Tensor], source: object) -> dict[str, torch.Tensor]:
        """File tensors -> this network's names and shapes: SGM names for diffusers-named SDXL keys, 1x1 convs
        <-> Linear; a tensor that does not fit its module raises ModelFormatError naming `source`."""
        own_shapes = {key: tuple(tensor.shape) for key, tensor in self.state_dict().items()}
        converted = {}
        for key, tensor in naming.rename_unet_aliases(weights_sd, self.unet_name_aliases).items():
            expected = own_shapes.get(key)
            if expected is not None and tuple(tensor.shape) != expected:
                if _without_1x1(tensor.shape) != _without_1x1(expected):
                    raise ModelFormatError(source, f"{key} has shape {list(tensor.shape)} but this "
                                                   f"{self.scheme.family} model needs {list(expected)}; "
                                                   "is the LoRA for another model family?")
                tensor = tensor.reshape(expected)
            converted[key] = tensor
        return converted

    # -- merging and regularization

    def merge_to(self, text_encoder: Any, unet: Any, weights_sd: Mapping[str, torch.Tensor],
                 dtype: torch.dtype | None = None, device: torch.device | str | None = None) -> None:
        """Add the file's LoRA deltas into the wrapped layers' weights (× multiplier); the network is not applied."""
        # Only names matter here: the deltas come from the file's own tensors, reshaped to each layer's weight.
        weights = naming.rename_unet_aliases(weights_sd, self.unet_name_aliases)
        loras = []
        if any(key.startswith(naming.LORA_PREFIX_TEXT_ENCODER) for key in weights):
            loras += self.text_encoder_loras
        if any(key.startswith(naming.LORA_PREFIX_UNET) for key in weights):
            loras += self.unet_loras
        for lora in tqdm(loras, desc="merging LoRA", leave=False):
            down = weights.get(f"{lora.lora_name}.{naming.LORA_DOWN}")
            if down is None:
                continue
            alpha = weights.get(f"{lora.lora_name}.{naming.ALPHA}")
            alpha = float(alpha.item()) if alpha is not None else float(down.shape[0])
            lora.merge_into_original(down, weights[f"{lora.lora_name}.{naming.LORA_UP}"], alpha, dtype, device)
        logger.info("merged %d LoRA modules", len(loras))

    @torch.no_grad()
    def apply_max_norm_regularization(self, max_norm_value: float, device: torch.device | str
                                      ) -> tuple[int, float, float]:
        """Scale down/up pairs whose ‖ΔW‖ exceeds max_norm (each by sqrt of the ratio): (scaled, mean, max)."""
        keys_scaled, norms = 0, []
        for lora in self.text_encoder_loras + self.unet_loras:
            down, up = lora.lora_down.weight, lora.lora_up.weight
            delta = lora_weight_delta(down.to(device, torch.float32), up.to(device, torch.float32), lora.scale)
            norm = delta.norm().clamp(min=max_norm_value / 2)
            ratio = float(norm.clamp(max=max_norm_value) / norm)
            if ratio != 1.0:
                keys_scaled += 1
                down.mul_(ratio ** 0.5)
                up.mul_(ratio ** 0.5)
            norms.append(float(delta.norm()) * ratio)
        if not norms:
            return 0, 0.0, 0.0
        return keys_scaled, sum(norms) / len(norms), max(norms)


def _without_1x1(shape: Sequence[int]) -> tuple[int, ...]:
    """A 1x1-conv weight shape as the equivalent Linear shape (kohya SD2 files may hold either, COMPAT §1.5)."""
    shape = tuple(shape)
    return shape[:2] if len(shape) == 4 and shape[2:] == (1, 1) else shape


def _text_encoder_lrs(text_encoder_lr: Any, default_lr: float | None, count: int) -> list[float | None]:
    if isinstance(text_encoder_lr, (list, tuple)):
        values = [lr for lr in text_encoder_lr if lr is not None] or [default_lr]
    else:
        values = [text_encoder_lr if text_encoder_lr is not None else default_lr]
    return [values[min(index, len(values) - 1)] for index in range(max(count, 1))]


def _add_groups(groups: list[dict], descriptions: list[str], loras: list[LoRAModule], lr: float | None,
                loraplus_ratio: float | None, label: str) -> None:
    """The modules' parameters as one group at `lr`; with LoRA+ their lora_up weights get a group at lr × ratio."""
    plain, plus = [], []
    for lora in loras:
        for name, parameter in lora.named_parameters():
            (plus if loraplus_ratio and name.startswith("lora_up") else plain).append(parameter)
    plus_lr = lr * loraplus_ratio if lr is not None and loraplus_ratio else lr
    for params, group_lr, suffix in ((plain, lr, ""), (plus, plus_lr, " plus")):
        if not params or group_lr == 0:
            continue  # kohya leaves zero-LR blocks out of the optimizer
        group: dict = {"params": params}
        if group_lr is not None:
            group["lr"] = group_lr
        groups.append(group)
        descriptions.append(label + suffix)


def safetensors_hashes(state_dict: Mapping[str, torch.Tensor], metadata: Mapping[str, str]) -> tuple[str, str]:
    """(sshs_model_hash, sshs_legacy_hash) of the file as serialized with only the `ss_*` metadata (COMPAT §2.2)."""
    from safetensors.torch import save

    data = save(dict(state_dict), {key: value for key, value in metadata.items() if key.startswith("ss_")})
    header_length = int.from_bytes(data[:8], "little")
    model_hash = hashlib.sha256(data[8 + header_length:]).hexdigest()
    legacy_hash = hashlib.sha256(data[0x100000:0x110000]).hexdigest()[:8]
    return model_hash, legacy_hash


# ----------------------------------------------------------------------------------------------- entry points


def create_network(multiplier: float, network_dim: int | None, network_alpha: float | None, vae: Any,
                   text_encoder: Any, unet: torch.nn.Module, neuron_dropout: float | None = None,
                   **kwargs: Any) -> LoRANetwork:
    """kohya's entry point: a fresh LoRA for the model; kwargs are the `--network_args` values."""
    return build_network(LoRANetwork, multiplier, network_dim, network_alpha, text_encoder, unet, neuron_dropout,
                         kwargs)


def build_network(network_class: type[LoRANetwork], multiplier: float, network_dim: int | None,
                  network_alpha: float | None, text_encoder: Any, unet: torch.nn.Module,
                  neuron_dropout: float | None, network_args: Mapping[str, Any]) -> LoRANetwork:
    """`create_network` for LoRANetwork and its variants (networks.lora_fa): the same args and rank plan."""
    scheme = naming.scheme_for_unet(unet)
    args = parse_network_args(network_args, scheme)
    network_dim = naming.DEFAULT_NETWORK_DIM if network_dim is None else int(network_dim)
    network_alpha = naming.DEFAULT_NETWORK_ALPHA if network_alpha is None else float(network_alpha)
    plan = rank_plan_from_args(args, scheme, network_dim, network_alpha)
    dropout = neuron_dropout if neuron_dropout is not None else args.dropout
    network = network_class(text_encoder, unet, plan, multiplier, dropout, args.rank_dropout, args.module_dropout)
    network.set_loraplus_lr_ratio(*args.loraplus_ratios.values())
    network.set_block_lr_weight(args.block_lr_weight)
    return network


def create_network_from_weights(multiplier: float, file: str | os.PathLike | None, vae: Any, text_encoder: Any,
                                unet: torch.nn.Module, weights_sd: Mapping[str, torch.Tensor] | None = None,
                                for_inference: bool = False, **kwargs: Any
                                ) -> tuple[LoRANetwork, Mapping[str, torch.Tensor]]:
    """A network whose modules, ranks and alphas match a file; raises naming the file if it does not fit.

    for_inference is accepted for kohya compatibility: the same modules both run dynamically and merge.
    """
    return build_network_from_weights(LoRANetwork, multiplier, file, text_encoder, unet, weights_sd)


def build_network_from_weights(network_class: type[LoRANetwork], multiplier: float, file: str | os.PathLike | None,
                               text_encoder: Any, unet: torch.nn.Module,
                               weights_sd: Mapping[str, torch.Tensor] | None = None
                               ) -> tuple[LoRANetwork, Mapping[str, torch.Tensor]]:
    """`create_network_from_weights` for LoRANetwork and its variants."""
    source = file if file is not None else "<weights>"
    if weights_sd is None:
        weights_sd = read_state_dict(file)
    aliases = naming.diffusers_unet_name_aliases(unet, naming.scheme_for_unet(unet))
    dims, alphas = naming.ranks_from_weights(naming.rename_unet_aliases(weights_sd, aliases), source)
    network = network_class(text_encoder, unet, RankPlan(module_dims=dims, module_alphas=alphas), multiplier)
    check_all_names_placed(network, dims, source)
    network.to_model_layout(weights_sd, source)  # raises on shape mismatches now rather than at load time
    return network, weights_sd


def check_all_names_placed(network: LoRANetwork, dims: Mapping[str, int], source: object) -> None:
    placed = {lora.lora_name for lora in network.text_encoder_loras + network.unet_loras}
    unplaced = sorted(name for name in dims if name not in placed)
    if not unplaced:
        return
    hint = naming.text_encoder_prefix_hint(unplaced, network.text_encoder_count)
    raise ModelFormatError(source, f"{len(unplaced)} of its {len(dims)} LoRA modules match no module of this "
                                   f"{network.scheme.family} model (first: {unplaced[0]}); "
                                   f"{hint or 'is the LoRA for another model family?'}")
