"""kohya LoRA naming: which layers a LoRA wraps and at what rank, their key names per model family, U-Net blocks.

Pure data and lookups over `named_modules()`; the LoRA modules themselves live in networks/lora.py.
"""
from __future__ import annotations

import logging
import re
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING

from library.errors import ModelFormatError

if TYPE_CHECKING:  # the schemes are plain data; tools read them (block counts) for --help without loading torch
    import torch

logger = logging.getLogger(__name__)

# kohya's prefixes (COMPAT §1.3): te1/te2 only when a *list of two* text encoders is given.
LORA_PREFIX_UNET = "lora_unet"
LORA_PREFIX_TEXT_ENCODER = "lora_te"
LORA_PREFIX_TEXT_ENCODERS = ("lora_te1", "lora_te2")

# Parent classes whose Linear/Conv2d children are wrapped (COMPAT §1.4). The ResNet/sampler classes are only
# searched when 3x3 convs are trained (conv_dim) or when a file names such modules.
UNET_TARGET_CLASSES = ("Transformer2DModel",)
UNET_CONV_TARGET_CLASSES = ("ResnetBlock2D", "Downsample2D", "Upsample2D")
TEXT_ENCODER_TARGET_CLASSES = ("CLIPAttention", "CLIPSdpaAttention", "CLIPMLP")
TEXT_MODEL_PATH = "text_model"  # the CLIP transformer inside CLIPTextModel(WithProjection) in kohya's names

DEFAULT_NETWORK_DIM = 4
DEFAULT_NETWORK_ALPHA = 1.0
DEFAULT_CONV_ALPHA = 1.0  # kohya's default when conv_dim is given without conv_alpha (COMPAT §6)

# Tensor names of one LoRA module in a file: `<name>.<tensor name>` (COMPAT §1.2).
LORA_DOWN = "lora_down.weight"
LORA_UP = "lora_up.weight"
ALPHA = "alpha"


@dataclass(frozen=True)
class NamingScheme:
    """How kohya names and groups the U-Net LoRA modules of one model family.

    sgm_unet_names: names use the SGM module paths (`input_blocks_4_1_...`) rather than the diffusers ones.
    linear_projection_as_conv: a Linear `proj_in`/`proj_out` is written with 1x1-conv shapes, because kohya
        trains SD1/SD2 with conv projections (SD2 single files are reshaped on load, COMPAT §1.5). A1111 and
        ComfyUI reshape either way; diffusers 0.42 `load_lora_weights` refuses 4-D tensors for a Linear layer.
    block_count: slots of `block_dims` / `block_alphas` (COMPAT §6).
    lr_weight_lengths: lengths of down_lr_weight / mid_lr_weight / up_lr_weight.
    lr_weight_padding: 1.0 entries put before and after down+mid+up to make the per-slot LR vector.
    block_index: lora name -> block slot, or -1 for names outside the numbered blocks.
    """

    family: str
    sgm_unet_names: bool
    linear_projection_as_conv: bool
    block_count: int
    lr_weight_lengths: tuple[int, int, int]
    lr_weight_padding: tuple[int, int]
    block_index: Callable[[str], int]


_SD_BLOCK_RE = re.compile(r"^lora_unet_(down|up)_blocks_(\d+)_(resnets|attentions|downsamplers|upsamplers)_(\d+)_")
_SD_LEVEL_SLOTS = 3  # two resnet/attention layers and one sampler per level
_SD_DOWN_SLOTS = 12


def sd_block_index(lora_name: str) -> int:
    """kohya's SD1/SD2 slot: down i/j -> 1+3i+j, down sampler -> 1+3i+2, mid -> 12, up -> 13+... (COMPAT §6)."""
    match = _SD_BLOCK_RE.match(lora_name)
    if match:
        direction, level, kind, layer = match[1], int(match[2]), match[3], int(match[4])
        within = 2 if kind in ("downsamplers", "upsamplers") else layer
        offset = 1 if direction == "down" else _SD_DOWN_SLOTS + 1
        return offset + _SD_LEVEL_SLOTS * level + within
    if lora_name.startswith(f"{LORA_PREFIX_UNET}_mid_block_"):
        return _SD_DOWN_SLOTS
    return -1


_SGM_BLOCK_RE = re.compile(r"^lora_unet_(input_blocks|middle_block|output_blocks)_(\d+)_")
_SGM_BLOCK_OFFSETS = {"input_blocks": 1, "middle_block": 10, "output_blocks": 13}
_SGM_EDGE_SLOTS = {"time_embed": 0, "label_emb": 0, "out": 22}


def sdxl_block_index(lora_name: str) -> int:
    """kohya's SDXL slot: 0 time/label embedding, 1-9 input_blocks, 10-12 middle_block, 13-21 output, 22 out."""
    match = _SGM_BLOCK_RE.match(lora_name)
    if match:
        return _SGM_BLOCK_OFFSETS[match[1]] + int(match[2])
    for stem, slot in _SGM_EDGE_SLOTS.items():
        if lora_name.startswith(f"{LORA_PREFIX_UNET}_{stem}_"):
            return slot
    return -1


SD_SCHEME = NamingScheme("sd1/sd2", False, True, 25, (12, 1, 12), (0, 0), sd_block_index)
SDXL_SCHEME = NamingScheme("sdxl", True, False, 23, (9, 3, 9), (1, 1), sdxl_block_index)


def scheme_for_unet(unet: torch.nn.Module) -> NamingScheme:
    """SDXL's U-Net is told apart by its size/pooled-text embedding (kohya tells it by the U-Net class)."""
    config = getattr(unet, "config", {})
    return SDXL_SCHEME if config.get("addition_embed_type") == "text_time" else SD_SCHEME


def lora_name(prefix: str, module_path: str) -> str:
    """kohya's rule: prefix + "_" + module path with every "." replaced by "_" (COMPAT §1.2)."""
    return f"{prefix}.{module_path}".replace(".", "_")


def text_encoder_prefixes(count: int) -> tuple[str, ...]:
    return LORA_PREFIX_TEXT_ENCODERS[:count] if count > 1 else (LORA_PREFIX_TEXT_ENCODER,) * count


@dataclass(frozen=True)
class LoRATarget:
    """One Linear/Conv2d layer a LoRA module may wrap.

    kind: "linear", "conv1x1" or "conv3x3" (a conv with a larger kernel counts as conv3x3, as in kohya).
    block_index: U-Net block slot of the scheme; -1 for text encoders.
    written_as_conv: a Linear whose LoRA tensors are written with 1x1-conv shapes (see NamingScheme).
    """

    name: str
    module_path: str
    module: torch.nn.Module
    kind: str
    is_unet: bool
    block_index: int = -1
    written_as_conv: bool = False


def layer_kind(module: torch.nn.Module) -> str | None:
    import torch

    if isinstance(module, torch.nn.Linear):
        return "linear"
    if isinstance(module, torch.nn.Conv2d):
        return "conv1x1" if tuple(module.kernel_size) == (1, 1) else "conv3x3"
    return None


def _children_of_targets(model: torch.nn.Module, classes: Sequence[str]) -> Iterable[tuple[str, torch.nn.Module]]:
    """(path, layer) of every Linear/Conv2d under a module of a target class, each layer once, in model order."""
    seen: set[str] = set()
    for parent_path, parent in model.named_modules():
        if type(parent).__name__ not in classes:
            continue
        for child_path, child in parent.named_modules():
            path = f"{parent_path}.{child_path}" if child_path else parent_path
            if layer_kind(child) is not None and path not in seen:
                seen.add(path)
                yield path, child


def unet_sgm_module_paths(unet: torch.nn.Module) -> dict[str, str]:
    """diffusers module path -> SGM module path, derived from the U-Net state-dict key map (convert_unet)."""
    from library.models.convert_unet import unet_key_pairs

    paths = {}
    for diffusers_key, sgm_key in unet_key_pairs(unet.config):
        paths[diffusers_key.rsplit(".", 1)[0]] = sgm_key.rsplit(".", 1)[0]
    return paths


def unet_targets(unet: torch.nn.Module, scheme: NamingScheme, include_conv_blocks: bool) -> list[LoRATarget]:
    """Targets of a diffusers U-Net, named as kohya names them for the scheme's family."""
    classes = UNET_TARGET_CLASSES + (UNET_CONV_TARGET_CLASSES if include_conv_blocks else ())
    sgm_paths = unet_sgm_module_paths(unet) if scheme.sgm_unet_names else None
    targets = []
    for path, module in _children_of_targets(unet, classes):
        name = lora_name(LORA_PREFIX_UNET, sgm_paths[path] if sgm_paths else path)
        kind = layer_kind(module)
        as_conv = scheme.linear_projection_as_conv and kind == "linear" and path.endswith((".proj_in", ".proj_out"))
        targets.append(LoRATarget(name, path, module, kind, True, scheme.block_index(name), as_conv))
    return targets


def text_encoder_targets(text_encoders: Sequence[torch.nn.Module]) -> list[LoRATarget]:
    """Targets of one or two transformers CLIP text encoders (prefix lora_te, or lora_te1/lora_te2)."""
    targets = []
    for prefix, encoder in zip(text_encoder_prefixes(len(text_encoders)), text_encoders):
        # kohya's names include `text_model_` (transformers 4.x paths); transformers 5 flattens CLIPTextModel
        # (no `text_model` child) but not CLIPTextModelWithProjection, so the prefix is added where missing.
        flattened = not hasattr(encoder, TEXT_MODEL_PATH)
        for path, module in _children_of_targets(encoder, TEXT_ENCODER_TARGET_CLASSES):
            named_path = f"{TEXT_MODEL_PATH}.{path}" if flattened else path
            targets.append(LoRATarget(lora_name(prefix, named_path), path, module, layer_kind(module), False))
    return targets


def diffusers_unet_name_aliases(unet: torch.nn.Module, scheme: NamingScheme) -> dict[str, str]:
    """For SGM-named families: diffusers-style LoRA name -> SGM-style name of the same layer.

    SDXL files with diffusers names exist in the wild; kohya renames them to SGM names on load (COMPAT §1.5).
    """
    if not scheme.sgm_unet_names:
        return {}
    return {lora_name(LORA_PREFIX_UNET, diffusers): lora_name(LORA_PREFIX_UNET, sgm)
            for diffusers, sgm in unet_sgm_module_paths(unet).items()}


def split_lora_key(key: str) -> tuple[str, str]:
    """`lora_unet_x.lora_down.weight` -> (`lora_unet_x`, `lora_down.weight`); names never contain dots."""
    name, _, tensor_name = key.partition(".")
    return name, tensor_name


def text_encoder_prefix_hint(names: Iterable[str], encoder_count: int) -> str | None:
    """A family hint when a file's text-encoder prefixes cannot belong to a model with this many encoders."""
    names = list(names)
    has_single = any(name.startswith(LORA_PREFIX_TEXT_ENCODER + "_") for name in names)
    has_pair = any(name.startswith(tuple(p + "_" for p in LORA_PREFIX_TEXT_ENCODERS)) for name in names)
    if encoder_count > 1 and has_single:
        return "the file has lora_te_* keys (an SD1/SD2 LoRA) but the model has two text encoders (SDXL)"
    if encoder_count == 1 and has_pair:
        return "the file has lora_te1_*/lora_te2_* keys (an SDXL LoRA) but the model has one text encoder"
    return None


@dataclass(frozen=True)
class RankPlan:
    """Which (rank, alpha) each target gets; rank 0 means the layer is not wrapped (COMPAT §1.4).

    module_dims/module_alphas (from a file) override everything: only the named layers are wrapped.
    """

    lora_dim: int = DEFAULT_NETWORK_DIM
    alpha: float = DEFAULT_NETWORK_ALPHA
    conv_dim: int | None = None
    conv_alpha: float = DEFAULT_CONV_ALPHA
    block_dims: Sequence[int] | None = None
    block_alphas: Sequence[float] | None = None
    conv_block_dims: Sequence[int] | None = None
    conv_block_alphas: Sequence[float] | None = None
    module_dims: Mapping[str, int] | None = None
    module_alphas: Mapping[str, float] | None = None

    @property
    def includes_conv_blocks(self) -> bool:
        return bool(self.conv_dim or self.conv_block_dims or self.module_dims is not None)

    def rank_for(self, target: LoRATarget) -> tuple[int, float]:
        if self.module_dims is not None:
            dim = self.module_dims.get(target.name, 0)
            return dim, (self.module_alphas or {}).get(target.name, dim)
        is_3x3 = target.kind == "conv3x3"
        if target.is_unet and self.block_dims is not None and target.block_index >= 0:
            if is_3x3:
                dims, alphas = self.conv_block_dims, self.conv_block_alphas
                return (dims[target.block_index], alphas[target.block_index]) if dims else (0, 0.0)
            return self.block_dims[target.block_index], self.block_alphas[target.block_index]
        if is_3x3:
            return (self.conv_dim, self.conv_alpha) if self.conv_dim else (0, 0.0)
        return self.lora_dim, self.alpha


def rename_unet_aliases(weights_sd: Mapping[str, torch.Tensor], aliases: Mapping[str, str]
                        ) -> dict[str, torch.Tensor]:
    """Rename diffusers-style SDXL U-Net names to kohya's SGM names; other keys pass unchanged."""
    if not aliases:
        return dict(weights_sd)
    renamed = {}
    for key, tensor in weights_sd.items():
        name, tensor_name = split_lora_key(key)
        renamed[f"{aliases.get(name, name)}.{tensor_name}" if tensor_name else key] = tensor
    return renamed


def ranks_from_weights(weights_sd: Mapping[str, torch.Tensor], source: object
                       ) -> tuple[dict[str, int], dict[str, float]]:
    """Rank (lora_down rows) and alpha per LoRA name; a file without `.alpha` keys means alpha = rank."""
    dims, alphas = {}, {}
    for key, tensor in weights_sd.items():
        name, tensor_name = split_lora_key(key)
        if tensor_name == LORA_DOWN:
            dims[name] = int(tensor.shape[0])
        elif tensor_name == ALPHA:
            alphas[name] = float(tensor.item())
    if not dims:
        raise ModelFormatError(source, "no *.lora_down.weight tensors; not a kohya LoRA file (LoHa/LoKr files "
                                       "need --network_module lycoris.kohya)")
    return dims, {name: alphas.get(name, float(dim)) for name, dim in dims.items()}
