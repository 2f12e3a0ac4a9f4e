"""Build the datasets of a run from a blueprint (`library.dataset_config`), and the group the trainer iterates.

Owns the order of preparation: records per subset, validation hold-out, sizes (metadata, cache names,
headers; corrupt images fail here, before any model loads), regularisation balancing, bucketing, and the
summary logged at start.
"""
from __future__ import annotations

import logging
from pathlib import Path

import torch

from library.data.buckets import format_bucket_histogram
from library.data.captions import CaptionOptions
from library.data.datasets import ImageDataset, caption_options, collate_batch
from library.data.latent_cache import sizes_from_cache_names
from library.data.sources import (ImageInfo, balance_regularization, fill_image_sizes, split_for_validation,
                                  subset_images, write_metadata_cache)
from library.dataset_config import DatasetBlueprint, DatasetGroupBlueprint
from library.errors import FlagError, UserInputError

logger = logging.getLogger(__name__)


class DatasetGroup(torch.utils.data.ConcatDataset):
    """All datasets of a run; each item is one batch of one dataset."""

    datasets: list[ImageDataset]

    def __init__(self, datasets: list[ImageDataset]):
        super().__init__(datasets)

    @property
    def images(self) -> list[ImageInfo]:
        return [info for dataset in self.datasets for info in dataset.images]

    @property
    def num_train_images(self) -> int:
        return sum(info.num_repeats for info in self.images if not info.is_reg)

    @property
    def num_reg_images(self) -> int:
        return sum(info.num_repeats for info in self.images if info.is_reg)

    def set_current_epoch(self, epoch: int) -> None:
        for dataset in self.datasets:
            dataset.set_current_epoch(epoch)

    def set_current_step(self, step: int) -> None:
        for dataset in self.datasets:
            dataset.set_current_step(step)

    def set_caption_transform(self, transform) -> None:
        """`(caption, rng) -> caption` for every dataset (see ImageDataset.caption_transform)."""
        for dataset in self.datasets:
            dataset.caption_transform = transform

    def set_max_steps(self, max_steps: int) -> None:
        for dataset in self.datasets:
            dataset.set_max_steps(max_steps)

    def subsets_with(self, predicate) -> list[str]:
        return [str(subset.image_dir or subset.metadata_file) for dataset in self.datasets
                for subset in dataset.subsets if predicate(subset)]

    def check_latents_cacheable(self) -> None:
        """kohya refuses latent caching with colour augmentation or random crop (COMPAT §7.1)."""
        blocked = self.subsets_with(lambda subset: subset.color_aug or subset.random_crop)
        if blocked:
            raise FlagError("--cache_latents / --cache_latents_to_disk cannot be used with color_aug or random_crop "
                            f"(the latents would be frozen); subsets: {', '.join(blocked)}")

    def check_text_encoder_outputs_cacheable(self) -> None:
        """Cached text-encoder outputs need captions that are the same every time (COMPAT §8)."""
        blocked = []
        for dataset in self.datasets:
            for subset in dataset.subsets:
                options: CaptionOptions = caption_options(subset)
                if not options.is_deterministic:
                    blocked.append(str(subset.image_dir or subset.metadata_file))
        if blocked:
            raise FlagError("--cache_text_encoder_outputs needs fixed captions: turn off shuffle_caption, "
                            "caption_dropout_rate, caption_dropout_every_n_epochs, caption_tag_dropout_rate, "
                            f"token_warmup_step and enable_wildcard in these subsets: {', '.join(blocked)}")

    def summary_lines(self, batches_per_epoch: int | None = None) -> list[str]:
        """Images x repeats per subset, bucket histogram, batches per epoch: the start-of-training log."""
        lines = []
        for number, dataset in enumerate(self.datasets):
            params = dataset.params
            lines.append(f"dataset {number} ({dataset.kind}{', validation' if dataset.is_validation else ''}): "
                         f"resolution {params.resolution[0]}x{params.resolution[1]}, batch size {params.batch_size}, "
                         f"{len(dataset)} batches per epoch")
            for index, subset in enumerate(dataset.subsets):
                infos = [info for info in dataset.images if info.subset_index == index]
                repeats = sum(info.num_repeats for info in infos)
                source = subset.image_dir or subset.metadata_file
                reg = " (regularization)" if subset.is_reg else ""
                lines.append(f"  subset {index}: {source}: {_plural(len(infos), 'image')}, {repeats} with repeats{reg}")
            lines.append(f"  buckets: {format_bucket_histogram(dataset.bucket_counts())}")
        total = batches_per_epoch if batches_per_epoch is not None else len(self)
        lines.append(f"total: {self.num_train_images} train images (x repeats), {self.num_reg_images} regularization, "
                     f"{total} batches per epoch")
        return lines

    def data_loader(self, workers: int, persistent: bool = False, shuffle: bool = True):
        """A DataLoader over pre-built batches (batch_size 1; the order itself is reshuffled per epoch)."""
        return torch.utils.data.DataLoader(self, batch_size=1, shuffle=shuffle, collate_fn=collate_batch,
                                           num_workers=workers, persistent_workers=persistent and workers > 0)


def _plural(count: int, noun: str) -> str:
    return f"{count} {noun}{'' if count == 1 else 's'}"


def build_dataset_group(blueprint: DatasetGroupBlueprint, *, seed: int, latent_suffix: str = "sd",
                        validation: bool = False, scan_workers: int = 4,
                        scanned_sizes: dict[Path, tuple[int, int]] | None = None) -> DatasetGroup | None:
    """The training group, or with `validation=True` the held-out group (None when nothing is held out).

    scanned_sizes: image sizes already read (by the dataset lint), so no image header is read twice.
    """
    datasets = []
    for number, dataset_bp in enumerate(blueprint.datasets):
        if validation and not dataset_bp.params.validation_split:
            continue
        dataset = _build_dataset(dataset_bp, number, seed, latent_suffix, validation, scan_workers,
                                 scanned_sizes or {})
        if dataset is not None:
            datasets.append(dataset)
    if not datasets:
        if validation:
            return None
        skipped = sum(subset.num_repeats < 1 for dataset in blueprint.datasets for subset in dataset.subsets)
        note = f"; {_plural(skipped, 'subset')} with num_repeats 0 skipped" if skipped else ""
        raise UserInputError(f"{blueprint.source}: no images found in any dataset; check image_dir / "
                             f"train_data_dir (it must be the parent of folders named like '10_sks dog'){note}")
    return DatasetGroup(datasets)


def _build_dataset(dataset_bp: DatasetBlueprint, number: int, seed: int, latent_suffix: str, validation: bool,
                   scan_workers: int, scanned_sizes: dict) -> ImageDataset | None:
    params = dataset_bp.params
    split_seed = params.validation_seed if params.validation_seed is not None else seed
    train, reg = [], []
    for index, subset in enumerate(dataset_bp.subsets):
        if subset.num_repeats < 1:
            logger.warning("dataset %d subset %d (%s): num_repeats %d < 1; subset ignored", number, index,
                           subset.image_dir or subset.metadata_file, subset.num_repeats)
            continue
        infos = subset_images(subset, index, dataset_bp.kind)
        if not infos:
            logger.warning("dataset %d subset %d: no images in %s", number, index,
                           subset.image_dir or subset.metadata_file)
            continue
        if subset.is_reg:
            if not validation:
                reg.extend(infos)  # regularization images are never held out (COMPAT §9.7)
            continue
        train.extend(split_for_validation(infos, params.validation_split, split_seed, is_training=not validation))
    images = train + reg
    if not images:
        return None
    fill_image_sizes(images, _known_sizes(images, latent_suffix, scanned_sizes), workers=scan_workers,
                     scanned_sizes=scanned_sizes)
    for index, subset in enumerate(dataset_bp.subsets):
        if subset.cache_info and subset.image_dir:
            write_metadata_cache([info for info in images if info.subset_index == index], subset)
    if reg and dataset_bp.kind == "dreambooth":
        reg = balance_regularization(train, reg)
    elif reg:
        raise UserInputError(f"dataset {number}: is_reg is only valid in DreamBooth datasets")
    return ImageDataset(params, list(dataset_bp.subsets), train + reg, seed=seed, kind=dataset_bp.kind,
                        is_validation=validation)


def _known_sizes(images: list[ImageInfo], latent_suffix: str, scanned_sizes: dict) -> dict[str, tuple[int, int]]:
    """Sizes encoded in existing cache file names, so cached images need not be opened (COMPAT §7.2)."""
    known: dict[str, tuple[int, int]] = {}
    folders = {Path(info.absolute_path).parent for info in images
               if info.image_size is None and info.absolute_path not in scanned_sizes}
    for folder in folders:
        known.update(sizes_from_cache_names(folder, latent_suffix))
    return known
