"""LoRA files as data for the LoRA utilities (merge, resize, extract, check): read kohya-named down/up/alpha
triples, turn them into weight deltas and back (SVD), and write them with kohya's keys and metadata.

The math is on plain tensors (`LoRAPair`), the wiring to models lives in each tool.
"""
from __future__ import annotations

import logging
import os
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import torch

from library.errors import FlagError, ModelFormatError, UserInputError
from library.families import file_kind
from library.models.state_dict_io import TensorFile, write_state_dict
from networks import naming
from networks.lora import lora_weight_delta, safetensors_hashes

logger = logging.getLogger(__name__)

SAFETENSORS_SUFFIXES = (".safetensors",)
FAMILY_WORDS = {"sdxl": "an SDXL LoRA", "sd1-or-sd2": "an SD1.x/SD2.x LoRA"}
# metadata naming the base model; a tool combining LoRAs keeps it when every input agrees (A1111 reads it, COMPAT §1.8)
BASE_MODEL_KEYS = ("ss_base_model_version", "ss_v2", "modelspec.architecture", "modelspec.implementation",
                   "modelspec.prediction_type")


@dataclass
class LoRAPair:
    """One LoRA module: `ΔW = up @ down × alpha / rank` (COMPAT §1.6).

    down: `[r, in]` (Linear), `[r, in, 1, 1]` (1x1 conv) or `[r, in, k, k]` (3x3 conv); up: `[out, r]` or
    `[out, r, 1, 1]`. alpha: the file's alpha (rank when the file has none).
    """

    down: torch.Tensor
    up: torch.Tensor
    alpha: float

    @property
    def rank(self) -> int:
        return int(self.down.shape[0])

    @property
    def scale(self) -> float:
        return self.alpha / self.rank

    @property
    def is_conv(self) -> bool:
        return self.down.dim() == 4

    @property
    def is_conv3x3(self) -> bool:
        return self.down.dim() == 4 and tuple(self.down.shape[2:]) != (1, 1)

    def delta(self, dtype: torch.dtype = torch.float32, device: torch.device | str | None = None) -> torch.Tensor:
        """ΔW in the layer's weight shape (`[out, in]` or `[out, in, k, k]`), scale included."""
        down = self.down.to(device=device, dtype=dtype)
        up = self.up.to(device=device, dtype=dtype)
        return lora_weight_delta(down, up, self.scale)

    def tensors(self, name: str, dtype: torch.dtype | None = None) -> dict[str, torch.Tensor]:
        """The file tensors of this module under kohya's names."""
        cast = (lambda tensor: tensor.to(dtype)) if dtype is not None else (lambda tensor: tensor)
        return {f"{name}.{naming.LORA_DOWN}": cast(self.down).contiguous(),
                f"{name}.{naming.LORA_UP}": cast(self.up).contiguous(),
                f"{name}.{naming.ALPHA}": torch.tensor(float(self.alpha), dtype=dtype or torch.float32)}


@dataclass
class LoRAFile:
    """A LoRA file read into memory: modules by kohya name, and the file's metadata."""

    path: Path
    modules: dict[str, LoRAPair]
    metadata: dict[str, str]
    damaged: dict[str, str] = field(default_factory=dict)  # module -> what is wrong (read_lora(strict=False))

    @property
    def family_hint(self) -> str | None:
        """"sdxl" / "sd1-or-sd2" from key prefixes (lora_te1/te2 or SGM U-Net names mean SDXL), else None."""
        names = list(self.modules)
        if any(name.startswith(naming.LORA_PREFIX_TEXT_ENCODERS) for name in names) or any(
                name.startswith(("lora_unet_input_blocks_", "lora_unet_output_blocks_", "lora_unet_middle_block_"))
                for name in names):
            return "sdxl"
        if any(name.startswith(naming.LORA_PREFIX_TEXT_ENCODER + "_") for name in names) or any(
                name.startswith(("lora_unet_down_blocks_", "lora_unet_up_blocks_", "lora_unet_mid_block_"))
                for name in names):
            return "sd1-or-sd2"
        return None

    def ranks(self) -> set[int]:
        return {pair.rank for pair in self.modules.values()}


def _not_a_lora_reason(keys: list[str]) -> str:
    kind = file_kind(keys)
    if kind == "checkpoint":
        return "is a model checkpoint, not a LoRA; pass it as the model (e.g. --sd_model / --model_org)"
    if kind == "embedding":
        return "is a textual-inversion embedding, not a LoRA"
    if keys and all(key.startswith("lllite_unet_") for key in keys):
        return ("is a ControlNet-LLLite file, not a LoRA; generators take it as --control_net_lllite_models, "
                "sdxl_train_control_net_lllite.py as --network_weights")
    if any(".hada_w1_a" in key or ".lokr_w1" in key or ".oft_" in key for key in keys):
        return ("is a LyCORIS LoHa/LoKr/OFT file; these tools handle LoRA/LoCon (lora_down/lora_up) files only")
    return f"has no lora_down/lora_up tensors (first keys: {', '.join(keys[:3]) or 'none'}); expected a kohya LoRA"


def read_lora(path: str | os.PathLike, flag: str = "LoRA", dtype: torch.dtype | None = torch.float32,
              strict: bool = True) -> LoRAFile:
    """Read a kohya LoRA/LoCon file (`.safetensors`, `.pt`, `.ckpt`).

    With `strict=False` a module missing its up or down tensor, or whose ranks disagree, is listed in
    `LoRAFile.damaged` instead of stopping the read (check_lora_weights reports them).

    Raises:
        UserInputError: missing file (names `flag`).
        ModelFormatError: a checkpoint, embedding or LyCORIS-only file, or (strict) a damaged module.
    """
    path = Path(path)
    if not path.is_file():
        raise UserInputError(f"{flag} {path}: file not found")
    source = TensorFile(path)
    try:
        keys = source.keys()
        down_suffix, up_suffix = "." + naming.LORA_DOWN, "." + naming.LORA_UP
        names = {key[: -len(suffix)] for key in keys for suffix in (down_suffix, up_suffix) if key.endswith(suffix)}
        if not any(key.endswith(down_suffix) for key in keys):
            raise ModelFormatError(path, _not_a_lora_reason(keys))
        modules: dict[str, LoRAPair] = {}
        damaged: dict[str, str] = {}
        for name in sorted(names):
            down_key, up_key, alpha_key = f"{name}{down_suffix}", f"{name}{up_suffix}", f"{name}.{naming.ALPHA}"
            problem = None
            if down_key not in keys or up_key not in keys:
                have, missing = (down_key, up_key) if down_key in keys else (up_key, down_key)
                problem = f"{have} has no matching {missing}"
            else:
                down, up = source.get(down_key), source.get(up_key)
                if up.dim() < 2 or up.shape[1] != down.shape[0]:
                    problem = (f"{up_key} has shape {tuple(up.shape)}, which does not fit {down_key} "
                               f"{tuple(down.shape)} (ranks differ)")
            if problem is not None:
                if strict:
                    raise ModelFormatError(path, f"{problem}; the file is damaged")
                damaged[name] = problem
                continue
            if dtype is not None:
                down, up = down.to(dtype), up.to(dtype)
            alpha = float(source.get(alpha_key).float().item()) if alpha_key in keys else float(down.shape[0])
            modules[name] = LoRAPair(down, up, alpha)
        metadata = dict(source.metadata)
    finally:
        source.close()
    return LoRAFile(path, modules, metadata, damaged)


def lora_state_dict(modules: Mapping[str, LoRAPair], dtype: torch.dtype | None = None) -> dict[str, torch.Tensor]:
    state: dict[str, torch.Tensor] = {}
    for name in sorted(modules):
        state.update(modules[name].tensors(name, dtype))
    return state


def network_dims(modules: Mapping[str, LoRAPair]) -> tuple[str, str, str | None, str | None]:
    """(ss_network_dim, ss_network_alpha, conv dim, conv alpha) as kohya's tools write them: the largest rank and
    its alpha for Linear/1x1 modules, and for 3x3 convs ("Dynamic" when ranks differ)."""
    def describe(pairs: list[LoRAPair]) -> tuple[str | None, str | None]:
        if not pairs:
            return None, None
        ranks = {pair.rank for pair in pairs}
        alphas = {pair.alpha for pair in pairs}
        dim = str(next(iter(ranks))) if len(ranks) == 1 else "Dynamic"
        alpha = _number_text(next(iter(alphas))) if len(alphas) == 1 else "Dynamic"
        return dim, alpha

    linear_dim, linear_alpha = describe([pair for pair in modules.values() if not pair.is_conv3x3])
    conv_dim, conv_alpha = describe([pair for pair in modules.values() if pair.is_conv3x3])
    return linear_dim or "0", linear_alpha or "0", conv_dim, conv_alpha


def _number_text(value: float) -> str:
    return str(int(value)) if float(value).is_integer() else str(value)


def write_lora(path: str | os.PathLike, modules: Mapping[str, LoRAPair], metadata: Mapping[str, str] | None,
               dtype: torch.dtype | None = None, *, overwrite: bool = False) -> Path:
    """Write a LoRA atomically with kohya keys; `.safetensors` get `sshs_*` hashes over the `ss_*` metadata.

    Raises:
        UserInputError: `path` exists and `overwrite` is False (tools check this earlier, naming their flag).
    """
    path = Path(path)
    state = lora_state_dict(modules, dtype)
    metadata = {key: str(value) for key, value in (metadata or {}).items()}
    if path.suffix.lower() in SAFETENSORS_SUFFIXES:
        metadata["sshs_model_hash"], metadata["sshs_legacy_hash"] = safetensors_hashes(state, metadata)
        write_state_dict(path, state, metadata, overwrite=overwrite)
    else:
        from library.models.state_dict_io import atomic_output

        with atomic_output(path, overwrite=overwrite) as temp:
            torch.save(state, str(temp))
    return path


def as_matrix(delta: torch.Tensor) -> torch.Tensor:
    """A layer's ΔW as the matrix SVD works on: `[out, in]`, a conv's `[out, in, k, k]` as `[out, in·k·k]`."""
    return delta.reshape(delta.shape[0], -1)


def svd_factorize(matrix: torch.Tensor, rank: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Best rank-`rank` factors of `[..., out, in]` matrices (a leading batch dim runs all SVDs in one call):
    returns (up `[..., out, r]`, down `[..., r, in]`, all singular values `[..., min(out, in)]`), up @ down ≈ M.
    The singular values are split evenly (√S on each side)."""
    u, s, vh = torch.linalg.svd(matrix.float(), full_matrices=False)
    rank = min(rank, s.shape[-1])
    root = s[..., :rank].sqrt()
    up = u[..., :, :rank] * root.unsqueeze(-2)
    down = root.unsqueeze(-1) * vh[..., :rank, :]
    return up, down, s


def pair_from_factors(up: torch.Tensor, down: torch.Tensor, weight_shape: tuple[int, ...], alpha: float | None = None
                      ) -> LoRAPair:
    """A LoRAPair whose ΔW is `up @ down` for a layer of `weight_shape`; alpha defaults to the rank (scale 1).
    With another alpha, `up` is divided by alpha/rank so ΔW stays the same."""
    rank = down.shape[0]
    alpha = float(rank) if alpha is None else float(alpha)
    up = up / (alpha / rank)
    if len(weight_shape) == 4:
        out_channels, in_channels, kernel_h, kernel_w = weight_shape
        down = down.reshape(rank, in_channels, kernel_h, kernel_w)
        up = up.reshape(out_channels, rank, 1, 1)
    return LoRAPair(down.contiguous(), up.contiguous(), alpha)


# ----------------------------------------------------------------------------------------------- checks shared by tools


def check_ratios(models: Sequence[str], ratios: Sequence[float] | None) -> list[float]:
    """`--ratios`: one per `--models` file (default 1.0 each)."""
    if ratios is None:
        return [1.0] * len(models)
    if len(ratios) != len(models):
        raise FlagError(f"--ratios: expected one ratio per model ({len(models)} for --models), got {len(ratios)}")
    return list(ratios)


def check_one_family(loras: Sequence[LoRAFile], sdxl_only: bool = False) -> None:
    """SD1/SD2 and SDXL LoRAs cannot be combined (the error names one file of each); with `sdxl_only` (the sdxl_
    tools) an SD1/SD2 LoRA is refused."""
    first_of_family: dict[str, LoRAFile] = {}
    for lora_file in loras:
        if lora_file.family_hint is not None:
            first_of_family.setdefault(lora_file.family_hint, lora_file)
    if len(first_of_family) > 1:
        (family_a, file_a), (family_b, file_b) = list(first_of_family.items())[:2]
        raise FlagError(f"--models: {file_a.path} is {FAMILY_WORDS[family_a]} but {file_b.path} is "
                        f"{FAMILY_WORDS[family_b]}; merge LoRAs of one model family only")
    if sdxl_only and "sd1-or-sd2" in first_of_family:
        raise FlagError(f"--models: {first_of_family['sd1-or-sd2'].path} is an SD1.x/SD2.x LoRA; "
                        "sdxl_merge_lora.py merges SDXL LoRAs, use networks/merge_lora.py")
