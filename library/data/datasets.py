"""The torch Dataset of one `[[datasets]]` entry: bucketed batches per epoch, and the samples inside them.

Each item of `ImageDataset` is a whole batch (images of one bucket), so the DataLoader runs with
`batch_size=1` and `collate_batch` unwraps it (COMPAT §10.5). The epoch and step live in shared memory so
that persistent DataLoader workers see them.
"""
from __future__ import annotations

import logging
import multiprocessing
import random
from dataclasses import dataclass, fields

import numpy as np
import torch

from library.data.buckets import (
    BucketAssigner,
    BucketSettings,
    crop_top_left_for_sdxl,
    epoch_batches,
    group_into_batches,
)
from library.data.captions import CaptionOptions, process_caption
from library.data.images import (
    alpha_mask_from,
    color_augment,
    face_crop,
    flip_horizontal,
    load_image,
    resize_and_crop,
    resize_image,
    to_model_tensor,
)
from library.data.latent_cache import LatentCacheEntry, load_latent_cache
from library.data.sources import ImageInfo
from library.data.text_cache import load_text_encoder_outputs
from library.dataset_config import DatasetParams, SubsetParams

logger = logging.getLogger(__name__)


@dataclass
class Sample:
    """One image of a batch, ready to stack."""

    pixels_or_latents: torch.Tensor
    is_latent: bool
    caption: str
    loss_weight: float
    original_size_hw: tuple[int, int]
    crop_top_left: tuple[int, int]
    target_size_hw: tuple[int, int]
    flipped: bool
    alpha_mask: torch.Tensor | None
    conditioning_image: torch.Tensor | None
    text_encoder_outputs: object | None
    image_key: str
    custom_attributes: dict


def caption_options(subset: SubsetParams) -> CaptionOptions:
    """The caption options of a subset (field names are kohya's keys on both sides)."""
    return CaptionOptions(**{f.name: getattr(subset, f.name) for f in fields(CaptionOptions)})


def bucket_settings(params: DatasetParams) -> BucketSettings:
    return BucketSettings.from_values(resolution=tuple(params.resolution), enable_bucket=params.enable_bucket,
                                      min_bucket_reso=params.min_bucket_reso, max_bucket_reso=params.max_bucket_reso,
                                      bucket_reso_steps=params.bucket_reso_steps,
                                      bucket_no_upscale=params.bucket_no_upscale)


class ImageDataset(torch.utils.data.Dataset):
    """Bucketed batches of one dataset. `images` already have sizes; buckets are assigned here."""

    def __init__(self, params: DatasetParams, subsets: list[SubsetParams], images: list[ImageInfo], *,
                 seed: int, kind: str = "dreambooth", is_validation: bool = False):
        self.params, self.subsets, self.images = params, subsets, images
        self.kind, self.seed, self.is_validation = kind, seed, is_validation
        self.caption_options = [caption_options(subset) for subset in subsets]
        self.assigner = BucketAssigner(bucket_settings(params))
        for info in images:
            info.bucket = self.assigner.assign(tuple(info.image_size))
        self._bucket_items = self._items_per_bucket()
        self._num_batches = len(group_into_batches(self._bucket_items, params.batch_size))
        self._epoch = multiprocessing.Value("i", 1)
        self._step = multiprocessing.Value("i", 0)
        self.max_steps: int | None = None
        # (caption, rng) -> caption, applied after the caption processing unless the caption was dropped
        # (textual inversion's token expansion and templates); picklable for the loader's worker processes
        self.caption_transform = None
        self.n_text_encoders = 1  # set by the text-encoder caching pass (2 for SDXL)
        self._order_epoch: int | None = None
        self._order: list[list[int]] = []

    # ---- epoch bookkeeping -------------------------------------------------------------------------------
    def _items_per_bucket(self) -> dict[tuple[int, int], list[int]]:
        """Image indices (one entry per repeat) grouped by bucket."""
        per_bucket: dict[tuple[int, int], list[int]] = {}
        for index, info in enumerate(self.images):
            per_bucket.setdefault(tuple(info.bucket.bucket_reso), []).extend([index] * info.num_repeats)
        return per_bucket

    def set_current_epoch(self, epoch: int) -> None:
        """1-based epoch; the batch order is a function of (seed, epoch) only."""
        self._epoch.value = epoch

    def set_current_step(self, step: int) -> None:
        self._step.value = step

    def set_max_steps(self, max_steps: int) -> None:
        self.max_steps = max_steps

    @property
    def current_epoch(self) -> int:
        return self._epoch.value

    def batches_for_epoch(self, epoch: int) -> list[list[int]]:
        if self._order_epoch != epoch:
            # kohya shuffles the images inside each bucket too, not only the batch order (COMPAT §10.5); without
            # that, the repeats of one image would share a batch and every epoch would repeat the same batches
            self._order = epoch_batches(self._bucket_items, self.params.batch_size, self.seed, epoch)
            self._order_epoch = epoch
        return self._order

    def __len__(self) -> int:
        return self._num_batches

    @property
    def num_train_images(self) -> int:
        """Images x repeats: what one epoch sees."""
        return sum(info.num_repeats for info in self.images)

    def bucket_counts(self) -> dict[tuple[int, int], int]:
        counts: dict[tuple[int, int], int] = {}
        for info in self.images:
            reso = tuple(info.bucket.bucket_reso)
            counts[reso] = counts.get(reso, 0) + info.num_repeats
        return dict(sorted(counts.items()))

    # ---- samples -----------------------------------------------------------------------------------------
    def __getitem__(self, index: int) -> dict:
        epoch = self.current_epoch
        batch = self.batches_for_epoch(epoch)[index]
        samples = [self.load_sample(image_index, epoch, f"{index}/{position}")
                   for position, image_index in enumerate(batch)]
        return stack_samples(samples, self.params.network_multiplier)

    def load_sample(self, image_index: int, epoch: int, salt: str) -> Sample:
        info = self.images[image_index]
        subset = self.subsets[info.subset_index]
        rng = random.Random(f"{self.seed}/{epoch}/{salt}")
        np_rng = np.random.default_rng(rng.getrandbits(64))
        flipped = bool(subset.flip_aug) and rng.random() < 0.5
        bucket = info.bucket
        target_w, target_h = bucket.bucket_reso
        entry = self._cached_latents(info, subset)
        if entry is not None:
            tensor = torch.from_numpy(np.ascontiguousarray(
                entry.latents_flipped if flipped else entry.latents)).float()
            alpha = entry.alpha_mask if subset.alpha_mask else None
            if alpha is not None and flipped:
                alpha = alpha[:, ::-1]
            is_latent = True
            # kohya loads conditioning images (masks for --masked_loss) with cached latents too; caching
            # needs the centre crop
            conditioning = self._conditioning(info, subset, center_crop_offset(bucket), flipped)
        else:
            tensor, alpha, conditioning = self._load_pixels(info, subset, flipped, np_rng)
            is_latent = False
        top, left = crop_top_left_for_sdxl(bucket.crop_ltrb, bucket.bucket_reso, flipped)
        caption = process_caption(info.caption, self.caption_options[info.subset_index], epoch=epoch,
                                  step=self._step.value, max_steps=self.max_steps, rng=rng,
                                  transform=self.caption_transform)
        return Sample(
            pixels_or_latents=tensor, is_latent=is_latent, caption=caption,
            loss_weight=self.params.prior_loss_weight if info.is_reg else 1.0,
            original_size_hw=(info.image_size[1], info.image_size[0]), crop_top_left=(int(top), int(left)),
            target_size_hw=(target_h, target_w), flipped=flipped,
            alpha_mask=None if alpha is None else torch.from_numpy(np.ascontiguousarray(alpha)).float(),
            conditioning_image=conditioning, text_encoder_outputs=self._cached_text_outputs(info),
            image_key=info.image_key, custom_attributes=dict(subset.custom_attributes or {}))

    def _cached_latents(self, info: ImageInfo, subset: SubsetParams) -> LatentCacheEntry | None:
        if info.latents is not None:
            return info.latents
        if info.latents_npz is not None:
            return load_latent_cache(info.latents_npz, tuple(info.bucket.bucket_reso),
                                     need_flipped=bool(subset.flip_aug), need_alpha=bool(subset.alpha_mask))
        return None

    def _cached_text_outputs(self, info: ImageInfo):
        if info.text_encoder_outputs is not None:
            return info.text_encoder_outputs
        if info.text_encoder_outputs_npz is not None:
            return load_text_encoder_outputs(info.text_encoder_outputs_npz, n_encoders=self.n_text_encoders)
        return None

    def _load_pixels(self, info: ImageInfo, subset: SubsetParams, flipped: bool, np_rng: np.random.Generator):
        """Decode, crop to the bucket, augment; returns (image tensor, alpha mask or None, conditioning or None)."""
        image = load_image(info.absolute_path, with_alpha=bool(subset.alpha_mask))
        bucket = info.bucket
        crop_offset = (0, 0)
        if subset.face_crop_aug_range and info.face_box is not None:
            image = face_crop(image, info.face_box, tuple(subset.face_crop_aug_range), tuple(bucket.bucket_reso),
                              np_rng)
        else:
            image, crop_offset = resize_and_crop(image, bucket, bool(subset.random_crop), np_rng,
                                                 interpolation=subset.resize_interpolation)
        alpha = alpha_mask_from(image) if subset.alpha_mask else None
        rgb = np.ascontiguousarray(image[..., :3])
        if subset.color_aug:
            rgb = color_augment(rgb, np_rng)
        if flipped:
            rgb = flip_horizontal(rgb)
            alpha = None if alpha is None else alpha[:, ::-1]
        return to_model_tensor(rgb), alpha, self._conditioning(info, subset, crop_offset, flipped)

    def _conditioning(self, info: ImageInfo, subset: SubsetParams, crop_offset: tuple[int, int],
                      flipped: bool) -> torch.Tensor | None:
        """The conditioning image as RGB CxHxW in -1..1 (kohya's ToTensor + Normalize(0.5)), with the training
        image's resize, crop and flip (never colour augmentation); None without one."""
        if info.conditioning_image_path is None:
            return None
        cond = crop_like(load_image(info.conditioning_image_path), info.bucket, crop_offset,
                         subset.resize_interpolation)
        return to_model_tensor(flip_horizontal(cond) if flipped else cond)


def center_crop_offset(bucket) -> tuple[int, int]:
    """(left, top) of the centre crop of the bucket out of the resized image (resize_and_crop without random_crop)."""
    (resized_w, resized_h), (bucket_w, bucket_h) = bucket.resized_size, bucket.bucket_reso
    return max(resized_w - bucket_w, 0) // 2, max(resized_h - bucket_h, 0) // 2


def crop_like(image: np.ndarray, bucket, crop_offset: tuple[int, int], interpolation: str | None) -> np.ndarray:
    """Resize `image` to the bucket's resized size and cut the bucket at `crop_offset` (left, top)."""
    resized_w, resized_h = bucket.resized_size
    if (image.shape[1], image.shape[0]) != (resized_w, resized_h):
        image = resize_image(image, (resized_w, resized_h), interpolation)
    left, top = crop_offset
    width, height = bucket.bucket_reso
    return image[top:top + height, left:left + width]


def stack_samples(samples: list[Sample], network_multiplier: float = 1.0) -> dict:
    """Stack the samples of one batch into the dict the trainer reads (kohya's batch keys where they exist)."""
    first = samples[0]
    stacked = torch.stack([sample.pixels_or_latents for sample in samples])
    batch = {
        "latents": stacked if first.is_latent else None,
        "images": None if first.is_latent else stacked,
        "captions": [sample.caption for sample in samples],
        "loss_weights": torch.tensor([sample.loss_weight for sample in samples], dtype=torch.float32),
        "original_sizes_hw": torch.tensor([sample.original_size_hw for sample in samples], dtype=torch.long),
        "crop_top_lefts": torch.tensor([sample.crop_top_left for sample in samples], dtype=torch.long),
        "target_sizes_hw": torch.tensor([sample.target_size_hw for sample in samples], dtype=torch.long),
        "flippeds": [sample.flipped for sample in samples],
        "alpha_masks": (torch.stack([sample.alpha_mask for sample in samples])
                        if first.alpha_mask is not None else None),
        "conditioning_images": (torch.stack([sample.conditioning_image for sample in samples])
                                if first.conditioning_image is not None else None),
        "network_multipliers": torch.full((len(samples),), float(network_multiplier)),
        "image_keys": [sample.image_key for sample in samples],
        "custom_attributes": [sample.custom_attributes for sample in samples],
        "text_encoder_outputs": _stack_text_outputs([sample.text_encoder_outputs for sample in samples]),
    }
    return batch


def _stack_text_outputs(outputs: list) -> dict | None:
    if outputs[0] is None:
        return None
    hidden = [torch.stack([torch.from_numpy(np.asarray(out.hidden_states[i])) for out in outputs])
              for i in range(len(outputs[0].hidden_states))]
    pooled = None
    if outputs[0].pooled is not None:
        pooled = torch.stack([torch.from_numpy(np.asarray(out.pooled)) for out in outputs])
    return {"hidden_states": hidden, "pooled": pooled}


def collate_batch(items: list[dict]) -> dict:
    """DataLoader collate for `batch_size=1` over pre-built batches."""
    return items[0]
