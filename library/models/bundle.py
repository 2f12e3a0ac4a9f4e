"""The in-memory model bundle: UNet, VAE and text encoder(s) as diffusers/transformers classes."""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import TYPE_CHECKING

import torch

from library.families import ModelFamily

if TYPE_CHECKING:
    from diffusers import AutoencoderKL, UNet2DConditionModel


@dataclass
class ModelBundle:
    """A loaded Stable Diffusion model.

    text_encoders: one CLIPTextModel (SD1/SD2) or [CLIPTextModel, CLIPTextModelWithProjection] (SDXL).
    extras: tensors of the single file the bundle was read from that belong to no model (DDPM schedule
        buffers, `logit_scale`, SD2's unused last text layer, EMA copies, ...); written back verbatim so that
        file -> model -> file is exact.
    source: the path the bundle was loaded from, if any.
    """

    family: ModelFamily
    unet: "UNet2DConditionModel"
    vae: "AutoencoderKL"
    text_encoders: list
    extras: dict[str, torch.Tensor] = field(default_factory=dict)
    source: str | None = None

    def models(self) -> list[torch.nn.Module]:
        return [self.unet, self.vae, *self.text_encoders]

    def to(self, device: torch.device | str | None = None, dtype: torch.dtype | None = None) -> "ModelBundle":
        for model in self.models():
            model.to(device=device, dtype=dtype)
        return self
