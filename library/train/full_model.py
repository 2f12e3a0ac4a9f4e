"""The trained parts of a full fine-tune, shaped like a network module so the one training loop drives it.

Where LoRA training adds small modules to frozen models, full fine-tuning trains the models' own weights. A
`FullModel` holds the parts that train (the U-Net, text encoders) as its submodules, so its state_dict is what
a `--save_state` folder keeps, its parameters are what the optimizer steps and its optimizer groups are kohya's
(TRAINERS §1.2, §1.3, §2.1): the U-Net at --learning_rate (or 23 --block_lr groups), then each text encoder.
"""
from __future__ import annotations

import logging
import re
from dataclasses import dataclass

import torch

from library.errors import FlagError

logger = logging.getLogger(__name__)

# SGM U-Net block of a diffusers parameter name, numbered as kohya's --block_lr (TRAINERS §1.3)
_DOWN = re.compile(r"^down_blocks\.(\d)\.(resnets|attentions|downsamplers)\.(\d)\.")
_UP = re.compile(r"^up_blocks\.(\d)\.(resnets|attentions|upsamplers)\.(\d)\.")
_MID = re.compile(r"^mid_block\.(resnets|attentions)\.(\d)\.")


def sdxl_block_index(name: str) -> int:
    """The --block_lr slot (0-22) of an SDXL U-Net parameter given by its diffusers name.

    SGM numbering: 0 time/label embedding, 1 + input block (input block 0 is conv_in; each diffusers down block d
    holds input blocks 3d+1, 3d+2 and its downsampler 3d+3), 10 + middle block (resnet 0, attention, resnet 1),
    13 + output block (up block u holds output blocks 3u..3u+2, its upsampler in the last one), 22 the output
    norm and conv.
    """
    if name.startswith(("time_embedding.", "add_embedding.")):
        return 0
    if name.startswith("conv_in."):
        return 1
    if name.startswith(("conv_norm_out.", "conv_out.")):
        return 22
    if match := _DOWN.match(name):
        down, kind, index = int(match.group(1)), match.group(2), int(match.group(3))
        return 1 + 3 * down + (3 if kind == "downsamplers" else 1 + index)
    if match := _MID.match(name):
        kind, index = match.group(1), int(match.group(2))
        return 10 + (1 if kind == "attentions" else 2 * index)
    if match := _UP.match(name):
        up, kind, index = int(match.group(1)), match.group(2), int(match.group(3))
        return 13 + 3 * up + (2 if kind == "upsamplers" else index)
    raise ValueError(f"U-Net parameter {name} belongs to no --block_lr block")


@dataclass(frozen=True)
class TrainPlan:
    """What trains at which learning rate. A rate of 0 freezes that part (no gradient is computed)."""

    unet_lr: float
    text_encoder_lrs: tuple[float | None, ...]  # None: that encoder is frozen
    block_lrs: tuple[float, ...] | None = None
    freeze_te1_last_layer: bool = False  # SDXL conditions on TE1's penultimate layer

    @property
    def trains_unet(self) -> bool:
        return self.unet_lr > 0 if self.block_lrs is None else any(lr > 0 for lr in self.block_lrs)

    @property
    def text_encoder_flags(self) -> list[bool]:
        return [lr is not None and lr > 0 for lr in self.text_encoder_lrs]


class FullModel(torch.nn.Module):
    """The network interface of the loop (apply_to, optimizer groups, trainable params) over the models' weights."""

    def __init__(self, plan: TrainPlan, group_names: tuple[str, ...]):
        super().__init__()
        self.plan = plan
        self.group_names = group_names  # kohya's lr log names: unet, text_encoder / text_encoder1, text_encoder2
        self.unet: torch.nn.Module | None = None
        self.text_encoders = torch.nn.ModuleList()
        self._encoder_slots: list[int] = []

    # ---------------------------------------------------------------------------------- network interface

    def apply_to(self, text_encoders, unet, train_text_encoder: bool, train_unet: bool) -> None:
        """Register the parts that train and switch gradients on for exactly their weights."""
        encoders = list(text_encoders) if isinstance(text_encoders, (list, tuple)) else [text_encoders]
        if train_unet and self.plan.trains_unet:
            self.unet = unet
            for name, parameter in unet.named_parameters():
                parameter.requires_grad_(self._unet_lr(name) > 0)
        for slot, (encoder, flag) in enumerate(zip(encoders, self.plan.text_encoder_flags)):
            if not (flag and train_text_encoder):
                continue
            encoder.requires_grad_(True)
            if slot == 0 and self.plan.freeze_te1_last_layer:
                model = getattr(encoder, "text_model", encoder)
                model.encoder.layers[-1].requires_grad_(False)
                model.final_layer_norm.requires_grad_(False)
            self.text_encoders.append(encoder)
            self._encoder_slots.append(slot)

    def _unet_lr(self, name: str) -> float:
        if self.plan.block_lrs is None:
            return self.plan.unet_lr
        return self.plan.block_lrs[sdxl_block_index(name)]

    def prepare_optimizer_params_with_multiple_te_lrs(self, text_encoder_lrs, unet_lr, default_lr):
        """kohya's groups: the U-Net (one group, or one per non-zero --block_lr block), then each text encoder."""
        groups, names = [], []
        if self.unet is not None:
            if self.plan.block_lrs is None:
                groups.append({"params": [p for p in self.unet.parameters() if p.requires_grad],
                               "lr": self.plan.unet_lr})
                names.append(self.group_names[0])
            else:
                by_block: dict[int, list] = {}
                for name, parameter in self.unet.named_parameters():
                    if parameter.requires_grad:
                        by_block.setdefault(sdxl_block_index(name), []).append(parameter)
                for block in sorted(by_block):
                    groups.append({"params": by_block[block], "lr": self.plan.block_lrs[block]})
                    names.append(f"block{block}")
        for slot, encoder in zip(self._encoder_slots, self.text_encoders):
            groups.append({"params": [p for p in encoder.parameters() if p.requires_grad],
                           "lr": self.plan.text_encoder_lrs[slot]})
            names.append(self.group_names[1 + slot])
        return groups, names

    def get_trainable_params(self):
        return [parameter for parameter in self.parameters() if parameter.requires_grad]

    def stop_text_encoder_training(self) -> None:
        """--stop_text_encoder_training: the encoders' weights stay as they are from now on (no gradients)."""
        for encoder in self.text_encoders:
            encoder.requires_grad_(False)
            for parameter in encoder.parameters():
                parameter.grad = None

    def enable_gradient_checkpointing(self) -> None:
        """The trainer already switched it on for the U-Net and the trained encoders."""

    def on_epoch_start(self, text_encoder, unet) -> None:
        """Nothing per epoch (the trained models' train/eval modes are set by the trainer)."""

    def prepare_grad_etc(self, text_encoder, unet) -> None:
        """Gradients were switched on in apply_to."""

    def load_weights(self, file: str):
        raise FlagError(f"--network_weights {file}: full fine-tuning trains the model itself; start from another "
                        "model with --pretrained_model_name_or_path")
