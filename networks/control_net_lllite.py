"""ControlNet-LLLite for SDXL (kohya's lightweight ControlNet): modules, network and file format (TRAINERS §4.1,
COMPAT §4 as corrected by TRAINERS §8).

Each module wraps one Linear layer of the U-Net's transformer blocks (input blocks and middle block; self-attention
q/k/v and cross-attention q) and changes the layer's *input*:
`x' = x + up(mid(cat(cond_emb, down(x)))) * multiplier`, then the layer runs on `x'`. `cond_emb` is the
conditioning image (RGB in -1..1) embedded by a small conv stack down to that block's resolution (÷8, ÷16 or ÷32
by depth), flattened to `[B, h·w, cond_emb_dim]`; it is computed in `set_cond_image` (once per training step and
per generated image, outside the U-Net's forward) and repeated for classifier-free guidance's doubled batch.

Keys: `lllite_unet_<SGM path with _>.{conditioning1.0,conditioning1.2[,conditioning1.4],down.0,mid.0,up.0}.
{weight,bias}`, e.g. `lllite_unet_input_blocks_4_1_transformer_blocks_0_attn1_to_q.down.0.weight` — kohya's names,
so kohya's strict loader and ComfyUI's LLLite node read our files and we read theirs.
"""
from __future__ import annotations

import logging
import os
import re
from collections.abc import Mapping
from pathlib import Path

import torch

from library.errors import FlagError, ModelFormatError
from networks import naming
from networks.patching import ForwardPatch

logger = logging.getLogger(__name__)

LLLITE_PREFIX = "lllite_unet"
ARCHITECTURE = "stable-diffusion-xl-v1-base/control-net-lllite"
# the wrapped layers inside each transformer block (attn2's k/v read the text, not the image)
TARGET_LAYERS = ("attn1.to_q", "attn1.to_k", "attn1.to_v", "attn2.to_q")
_SGM_BLOCK = re.compile(r"^(input_blocks|middle_block|output_blocks)\.(\d+)\.")


def module_depth(sgm_path: str) -> int:
    """kohya's depth of a wrapped layer (TRAINERS §4.1): input block index <= 2: 1, <= 5: 2, else 3; middle 3."""
    match = _SGM_BLOCK.match(sgm_path)
    if match is None:
        raise ValueError(f"{sgm_path} is in no SGM U-Net block")
    kind, index = match.group(1), int(match.group(2))
    if kind == "middle_block":
        return 3
    if kind == "input_blocks":
        return 1 if index <= 2 else (2 if index <= 5 else 3)
    raise ValueError(f"{sgm_path}: LLLite modules are not placed in output blocks")


def _conditioning_stack(cond_emb_dim: int, depth: int) -> torch.nn.Sequential:
    half = cond_emb_dim // 2
    layers: list[torch.nn.Module] = [torch.nn.Conv2d(3, half, kernel_size=4, stride=4), torch.nn.ReLU()]
    if depth == 1:
        layers.append(torch.nn.Conv2d(half, cond_emb_dim, kernel_size=2, stride=2))
    elif depth == 2:
        layers.append(torch.nn.Conv2d(half, cond_emb_dim, kernel_size=4, stride=4))
    else:
        layers += [torch.nn.Conv2d(half, half, kernel_size=4, stride=4), torch.nn.ReLU(),
                   torch.nn.Conv2d(half, cond_emb_dim, kernel_size=2, stride=2)]
    return torch.nn.Sequential(*layers)


class LLLiteModule(ForwardPatch):
    """One LLLite module around a Linear layer (`in_features` C): conditioning1 (conv stack), down (C -> m),
    mid (m + c -> m), up (m -> C, zero weight: an untrained module adds only up's bias)."""

    def __init__(self, name: str, original_module: torch.nn.Linear, depth: int, cond_emb_dim: int, mlp_dim: int,
                 dropout: float | None = None, multiplier: float = 1.0):
        super().__init__(original_module)
        if not isinstance(original_module, torch.nn.Linear):
            raise TypeError(f"{name}: LLLite wraps Linear layers, got {type(original_module).__name__}")
        channels = original_module.in_features
        self.lllite_name, self.depth = name, depth
        self.conditioning1 = _conditioning_stack(cond_emb_dim, depth)
        self.down = torch.nn.Sequential(torch.nn.Linear(channels, mlp_dim), torch.nn.ReLU())
        self.mid = torch.nn.Sequential(torch.nn.Linear(mlp_dim + cond_emb_dim, mlp_dim), torch.nn.ReLU())
        self.up = torch.nn.Sequential(torch.nn.Linear(mlp_dim, channels))
        torch.nn.init.zeros_(self.up[0].weight)  # the bias keeps PyTorch's default init, as kohya's
        self.dropout, self.multiplier = dropout, multiplier
        self.cond_image: torch.Tensor | None = None
        self._cond_emb: torch.Tensor | None = None
        self.enabled = True

    def set_cond_image(self, cond_image: torch.Tensor | None) -> None:
        """Embed the conditioning image now, outside the U-Net's forward: once per image, and never inside a
        gradient-checkpointed block (whose recomputation must save the same tensors as its first run)."""
        self.cond_image = cond_image
        if cond_image is None:
            self._cond_emb = None
            return
        weight = self.conditioning1[0].weight
        embedded = self.conditioning1(cond_image.to(weight.device, dtype=weight.dtype))
        batch, channels = embedded.shape[:2]
        self._cond_emb = embedded.reshape(batch, channels, -1).transpose(1, 2)  # [B, h*w, c]

    def forward(self, x: torch.Tensor, *args, **kwargs) -> torch.Tensor:
        if self._cond_emb is None or not self.enabled or self.multiplier == 0.0:
            return self.original_forward(x, *args, **kwargs)
        cond = self._cond_emb.to(x.dtype)
        if cond.shape[1] != x.shape[1]:
            raise ValueError(f"{self.lllite_name}: the conditioning image gives {cond.shape[1]} positions for "
                             f"{x.shape[1]} tokens; it must have the size of the generated/trained image")
        if x.shape[0] != cond.shape[0]:  # classifier-free guidance runs the batch twice
            if x.shape[0] % cond.shape[0]:
                raise ValueError(f"{self.lllite_name}: batch {x.shape[0]} for {cond.shape[0]} conditioning images")
            cond = cond.repeat(x.shape[0] // cond.shape[0], 1, 1)
        hidden = self.mid(torch.cat([cond, self.down(x)], dim=-1))
        if self.training and self.dropout:
            hidden = torch.nn.functional.dropout(hidden, p=self.dropout)
        return self.original_forward(x + self.up(hidden) * self.multiplier, *args, **kwargs)


def lllite_targets(unet: torch.nn.Module) -> list[tuple[str, str, torch.nn.Linear]]:
    """(kohya name, SGM path, layer) of every layer LLLite wraps in a diffusers SDXL U-Net, in model order."""
    if naming.scheme_for_unet(unet) is not naming.SDXL_SCHEME:
        raise FlagError("ControlNet-LLLite is for SDXL models; this U-Net is SD1.x/2.x")
    sgm_paths = naming.unet_sgm_module_paths(unet)
    targets = []
    for path, module in unet.named_modules():
        if not isinstance(module, torch.nn.Linear) or not path.startswith(("down_blocks.", "mid_block.")):
            continue
        if ".transformer_blocks." not in path or not path.endswith(TARGET_LAYERS):
            continue
        sgm = sgm_paths[path]
        targets.append((naming.lora_name(LLLITE_PREFIX, sgm), sgm, module))
    return targets


class ControlNetLLLite(torch.nn.Module):
    """The LLLite modules of one SDXL U-Net, with the network interface of the one training loop."""

    def __init__(self, unet: torch.nn.Module, cond_emb_dim: int, mlp_dim: int, dropout: float | None = None,
                 multiplier: float = 1.0):
        super().__init__()
        check_dims(cond_emb_dim, mlp_dim)
        self.cond_emb_dim, self.mlp_dim, self.multiplier = cond_emb_dim, mlp_dim, multiplier
        self.unet_modules = torch.nn.ModuleList(
            LLLiteModule(name, layer, module_depth(sgm), cond_emb_dim, mlp_dim, dropout, multiplier)
            for name, sgm, layer in lllite_targets(unet))
        if not self.unet_modules:
            raise FlagError("the U-Net has no transformer layers for ControlNet-LLLite")
        logger.info("ControlNet-LLLite: %d modules, cond_emb_dim %d, network_dim %d", len(self.unet_modules),
                    cond_emb_dim, mlp_dim)

    # ---------------------------------------------------------------------------------- use

    def apply_to(self, text_encoders=None, unet=None, train_text_encoder: bool = False,
                 train_unet: bool = True) -> None:
        for module in self.unet_modules:
            module.apply_to()

    def restore(self) -> None:
        for module in self.unet_modules:
            module.restore()

    def set_cond_image(self, cond_image: torch.Tensor | None) -> None:
        """`[B, 3, H, W]` in -1..1 at the image's size (None: the modules pass their layers' input through)."""
        for module in self.unet_modules:
            module.set_cond_image(cond_image)

    def set_multiplier(self, multiplier: float) -> None:
        self.multiplier = multiplier
        for module in self.unet_modules:
            module.multiplier = multiplier

    def set_enabled(self, enabled: bool) -> None:
        """Switch every module off (`--control_net_ratios`, `--highres_fix_disable_control_net`) or on."""
        for module in self.unet_modules:
            module.enabled = enabled

    # ---------------------------------------------------------------------------------- training interface

    def prepare_optimizer_params_with_multiple_te_lrs(self, text_encoder_lrs, unet_lr, default_lr):
        return [{"params": list(self.parameters()), "lr": unet_lr or default_lr}], ["unet"]

    def get_trainable_params(self):
        return list(self.parameters())

    def enable_gradient_checkpointing(self) -> None:
        """The trainer switches it on for the U-Net the modules sit in."""

    def on_epoch_start(self, text_encoder=None, unet=None) -> None:
        self.train()

    def prepare_grad_etc(self, text_encoder=None, unet=None) -> None:
        self.requires_grad_(True)

    # ---------------------------------------------------------------------------------- files

    def file_state_dict(self, dtype: torch.dtype | None = None) -> dict[str, torch.Tensor]:
        tensors = {}
        for module in self.unet_modules:
            for key, value in module.state_dict().items():
                value = value.detach().to("cpu")
                tensors[f"{module.lllite_name}.{key}"] = (value.to(dtype) if dtype is not None else value).contiguous()
        return tensors

    def save_weights(self, file: str | os.PathLike, dtype: torch.dtype | None, metadata: Mapping[str, str] | None
                     ) -> None:
        """kohya's layout; .safetensors with the metadata given (modelspec.*), .pt/.ckpt as a torch dict."""
        tensors = self.file_state_dict(dtype)
        if Path(file).suffix.lower() == ".safetensors":
            from safetensors.torch import save_file

            save_file(tensors, str(file), metadata=dict(metadata or {}))
        else:
            torch.save(tensors, file)

    def load_weights(self, file: str | os.PathLike) -> str:
        """Load an LLLite file strictly (kohya's generators do): every module and shape must match."""
        tensors = read_lllite_file(file)
        expected = self.file_state_dict()
        missing = sorted(set(expected) - set(tensors))
        extra = sorted(set(tensors) - set(expected))
        if missing or extra:
            sample = (missing or extra)[0]
            raise ModelFormatError(Path(file), f"does not fit this model's LLLite modules: {len(missing)} missing "
                                               f"and {len(extra)} unexpected tensors (e.g. {sample})")
        for key, value in tensors.items():
            if tuple(value.shape) != tuple(expected[key].shape):
                raise ModelFormatError(Path(file), f"{key} has shape {list(value.shape)}; this network "
                                                   f"(cond_emb_dim {self.cond_emb_dim}, network_dim "
                                                   f"{self.mlp_dim}) expects {list(expected[key].shape)}")
        by_module = {module.lllite_name: module for module in self.unet_modules}
        for name, module in by_module.items():
            prefix = name + "."
            module.load_state_dict({key[len(prefix):]: value for key, value in tensors.items()
                                    if key.startswith(prefix)})
        return f"{len(by_module)} LLLite modules"


def check_dims(cond_emb_dim: int | None, mlp_dim: int | None) -> None:
    if not cond_emb_dim or cond_emb_dim < 2 or cond_emb_dim % 2:
        raise FlagError(f"--cond_emb_dim {cond_emb_dim}: expected an even width of at least 2 (e.g. 32)")
    if not mlp_dim or mlp_dim < 1:
        raise FlagError(f"--network_dim {mlp_dim}: expected the LLLite MLP width, at least 1 (e.g. 64)")


def read_lllite_file(file: str | os.PathLike) -> dict[str, torch.Tensor]:
    """The tensors of an LLLite file (.safetensors or a torch dict), refused by name when it is something else."""
    from library.models.state_dict_io import read_state_dict

    path = Path(file)
    if not path.is_file():
        raise FlagError(f"{path}: file not found")
    tensors = read_state_dict(path)
    if not tensors or not all(key.startswith(LLLITE_PREFIX + "_") for key in tensors):
        sample = ", ".join(list(tensors)[:2])
        hint = " (a LoRA file?)" if any(key.startswith(("lora_unet_", "lora_te")) for key in tensors) else ""
        raise ModelFormatError(path, f"is not a ControlNet-LLLite file{hint}: its keys ({sample}, ...) do not "
                                     f"start with {LLLITE_PREFIX}_")
    return tensors


def dims_from_weights(tensors: Mapping[str, torch.Tensor]) -> tuple[int, int]:
    """(cond_emb_dim, mlp_dim) as kohya's readers infer them: 2 x conditioning1.0's out-channels, down's rows."""
    first = next(key for key in tensors if key.endswith(".conditioning1.0.weight"))
    down = next(key for key in tensors if key.endswith(".down.0.weight"))
    return 2 * int(tensors[first].shape[0]), int(tensors[down].shape[0])


def is_lllite_state_dict(keys) -> bool:
    keys = list(keys)
    return bool(keys) and all(key.startswith(LLLITE_PREFIX + "_") for key in keys)


def create_network_from_weights(unet: torch.nn.Module, file: str | os.PathLike, multiplier: float = 1.0
                                ) -> ControlNetLLLite:
    """An LLLite network built for `unet` with the dims of `file`, its weights loaded strictly."""
    tensors = read_lllite_file(file)
    cond_emb_dim, mlp_dim = dims_from_weights(tensors)
    network = ControlNetLLLite(unet, cond_emb_dim, mlp_dim, multiplier=multiplier)
    network.load_weights(file)
    return network
