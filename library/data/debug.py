"""`--debug_dataset`: what each batch of an epoch holds, as text (kohya shows OpenCV windows; we run headless)."""
from __future__ import annotations

from collections.abc import Iterator

import torch

from library.data.group import DatasetGroup


def describe_batches(group: DatasetGroup, epoch: int = 1, max_batches: int | None = None) -> Iterator[str]:
    """Lines describing the batches of `epoch` in the order of each dataset (bucket, then every sample)."""
    group.set_current_epoch(epoch)
    shown = 0
    for dataset_number, dataset in enumerate(group.datasets):
        for index in range(len(dataset)):
            if max_batches is not None and shown >= max_batches:
                return
            batch = dataset[index]
            yield _batch_header(batch, dataset_number, index, epoch)
            for position in range(len(batch["captions"])):
                yield _sample_line(batch, position)
            shown += 1


def _batch_header(batch: dict, dataset_number: int, index: int, epoch: int) -> str:
    height, width = batch["target_sizes_hw"][0].tolist()
    pixels = batch["latents"] if batch["latents"] is not None else batch["images"]
    kind = "latents" if batch["latents"] is not None else "images"
    return (f"epoch {epoch} dataset {dataset_number} batch {index}: bucket {width}x{height}, {len(batch['captions'])} "
            f"sample(s), {kind} {tuple(pixels.shape)} range {_range(pixels)}")


def _sample_line(batch: dict, position: int) -> str:
    original_h, original_w = batch["original_sizes_hw"][position].tolist()
    top, left = batch["crop_top_lefts"][position].tolist()
    parts = [f"  {batch['image_keys'][position]}", f"original {original_w}x{original_h}",
             f"crop top-left ({top}, {left})", f"flipped {batch['flippeds'][position]}",
             f"loss weight {batch['loss_weights'][position].item():g}"]
    if batch["alpha_masks"] is not None:
        parts.append(f"alpha mean {batch['alpha_masks'][position].mean().item():.3f}")
    if batch["conditioning_images"] is not None:
        parts.append(f"conditioning {tuple(batch['conditioning_images'][position].shape)}")
    if batch["custom_attributes"][position]:
        parts.append(f"attributes {batch['custom_attributes'][position]}")
    parts.append(f"caption {batch['captions'][position]!r}")
    return ", ".join(parts)


def _range(tensor: torch.Tensor) -> str:
    return f"{tensor.min().item():.2f}..{tensor.max().item():.2f}"
