"""ControlNet-LLLite while images are generated (sample images during training and the generators): the guide
images of a batch go to the LLLite networks before denoising, and each network is switched off after its share
of the steps (`--control_net_ratios`). Used through `RenderSettings.control` (library/sampling/pipeline.py).
"""
from __future__ import annotations

import logging
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import torch
from PIL import Image

logger = logging.getLogger(__name__)

GUIDE_MULTIPLE = 32  # kohya floors the guide image size to multiples of 32 (TRAINERS §4.4)


def guide_tensor(image: Image.Image, width: int, height: int) -> torch.Tensor:
    """`[3, H, W]` in -1..1: the guide image resized (Lanczos) to the generated image's size, floored to a
    multiple of 32 as kohya does; no other preprocessing (a Canny model needs a Canny image)."""
    size = (max(GUIDE_MULTIPLE, width - width % GUIDE_MULTIPLE), max(GUIDE_MULTIPLE, height - height % GUIDE_MULTIPLE))
    rgb = image.convert("RGB")
    if rgb.size != size:
        rgb = rgb.resize(size, Image.LANCZOS)
    pixels = torch.from_numpy(np.asarray(rgb, dtype=np.float32) / 127.5 - 1.0)
    return pixels.permute(2, 0, 1).contiguous()


@dataclass
class ControlledNetwork:
    network: object  # networks.control_net_lllite.ControlNetLLLite, applied to the U-Net
    ratio: float = 1.0  # on for steps i with i / steps <= ratio (kohya: off at the first i with ratio < i / steps)


class LLLiteControl:
    """The LLLite networks of a generation run; job `k`'s `guide_images[i]` conditions network `i`."""

    def __init__(self, networks: Sequence[ControlledNetwork]):
        self.networks = list(networks)

    def prepare(self, jobs, width: int, height: int, device) -> None:
        for index, entry in enumerate(self.networks):
            images = [job.guide_images[index] if index < len(job.guide_images) else None for job in jobs]
            if any(image is None for image in images):
                entry.network.set_cond_image(None)  # no guide image: the network passes its layers' input on
                continue
            entry.network.set_cond_image(torch.stack([guide_tensor(image, width, height) for image in images])
                                         .to(device))
            entry.network.set_enabled(True)

    def at_step(self, index: int, total: int) -> None:
        for entry in self.networks:
            entry.network.set_enabled(not entry.ratio < index / max(total, 1))

    def finish(self) -> None:
        for entry in self.networks:
            entry.network.set_cond_image(None)
            entry.network.set_enabled(True)
