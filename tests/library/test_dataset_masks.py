"""Masked loss from mask images (kohya's first documented method): a subset with `conditioning_data_dir` holding
masks of the same stems, trained with --masked_loss. Accepted through the trainer's parser, masks in the batches
(with cached latents too), and the loss they give."""
from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch

import train_network
from library.data.caching import cache_latents
from library.data.prepare import dataset_group_from_args
from library.dataset_config import DatasetConfigError
from library.families import family_by_name
from library.train.loss import LossSettings, mask_from_conditioning_images, training_loss
from library.train.noise import make_noise_scheduler
from tests.data_fixtures import all_batches, write_dataset_config, write_image

SD1 = family_by_name("sd1")


def masked_dataset(tmp_path: Path, count: int = 2, **subset_keys) -> Path:
    """`count` 64x64 noise images, each with a grayscale mask whose left half is black and right half white,
    as the kohya_ss GUI's masked-loss test config lays them out."""
    for number in range(count):
        write_image(tmp_path / "images" / f"img{number}.png", seed=number)
        (tmp_path / "images" / f"img{number}.txt").write_text(f"photo {number}", encoding="utf-8")
        mask = np.zeros((64, 64), dtype=np.uint8)
        mask[:, 32:] = 255
        write_image(tmp_path / "masks" / f"img{number}.png", pixels=mask)
    return write_dataset_config(tmp_path / "dataset.toml", {
        "general": {"caption_extension": ".txt"},
        "datasets": [{"resolution": 64, "batch_size": count, "subsets": [
            {"image_dir": str(tmp_path / "images"), "conditioning_data_dir": str(tmp_path / "masks"),
             **subset_keys}]}]})


def trainer_args(config: Path, *extra: str):
    """The flags as train_network.py parses them."""
    return train_network.parse_args(train_network.setup_parser(), [
        "--pretrained_model_name_or_path", "model.safetensors", "--dataset_config", str(config),
        "--output_dir", "out", *extra])


def test_mask_datasets_are_accepted_with_masked_loss_and_refused_without(tmp_path):
    config = masked_dataset(tmp_path)
    group = dataset_group_from_args(trainer_args(config, "--masked_loss"), SD1)  # as the trainer calls it
    (batch,) = all_batches(group)
    assert batch["conditioning_images"].shape == (2, 3, 64, 64)
    with pytest.raises(DatasetConfigError) as error:
        dataset_group_from_args(trainer_args(config), SD1)
    assert ("datasets[0].subsets[0].conditioning_data_dir: ControlNet-style datasets are not supported by this "
            "script; remove conditioning_data_dir, or pass --masked_loss to use its images as loss masks") \
        in str(error.value)


def test_half_black_mask_gives_the_loss_of_the_white_half(tmp_path):
    group = dataset_group_from_args(trainer_args(masked_dataset(tmp_path), "--masked_loss"), SD1, lint=False)
    (batch,) = all_batches(group)
    masks = mask_from_conditioning_images(batch["conditioning_images"])
    expected_mask = torch.zeros(2, 64, 64)
    expected_mask[:, :, 32:] = 1.0
    torch.testing.assert_close(masks, expected_mask)  # R of the grayscale mask, -1..1 back to 0..1

    generator = torch.Generator().manual_seed(0)
    prediction, target = torch.randn(2, 4, 8, 8, generator=generator), torch.randn(2, 4, 8, 8, generator=generator)
    scheduler = make_noise_scheduler(False, False)
    loss = training_loss(LossSettings(masked_loss=True), prediction, target, torch.tensor([10, 700]), scheduler,
                         torch.ones(2), alpha_masks=masks)
    # by hand: squared error of the white (right) half of the latent; kohya divides by every element
    white_half = (prediction - target)[..., 4:] ** 2
    assert loss.item() == pytest.approx(white_half.sum().item() / prediction.numel(), rel=1e-6)
    assert loss.item() == pytest.approx(0.5 * white_half.mean().item(), rel=1e-6)
    unmasked = training_loss(LossSettings(), prediction, target, torch.tensor([10, 700]), scheduler, torch.ones(2))
    assert unmasked.item() == pytest.approx(((prediction - target) ** 2).mean().item(), rel=1e-6)


def test_masks_come_with_cached_latents_too(tmp_path, tiny_models):
    group = dataset_group_from_args(trainer_args(masked_dataset(tmp_path, flip_aug=True), "--masked_loss"), SD1,
                                    lint=False)
    (uncached,) = all_batches(group)
    cache_latents(group, tiny_models.bundle("sd1").vae, to_disk=False, latent_suffix=SD1.latent_cache_suffix,
                  show_progress=False)
    (cached,) = all_batches(group)
    assert uncached["latents"] is None and cached["latents"] is not None
    assert cached["flippeds"] == uncached["flippeds"]
    torch.testing.assert_close(cached["conditioning_images"], uncached["conditioning_images"])
    for position, flipped in enumerate(cached["flippeds"]):  # a flipped sample's mask is flipped with it
        white = mask_from_conditioning_images(cached["conditioning_images"])[position, 0] == 1.0
        assert white.tolist() == [flipped] * 32 + [not flipped] * 32  # unflipped: the right half is white


def test_mask_follows_the_training_images_bucket_crop(tmp_path):
    """A wide image is resized and centre-cropped to its bucket; its mask gets the same cut."""
    write_image(tmp_path / "images" / "wide.png", size=(128, 64), seed=3)
    mask = np.zeros((64, 128), dtype=np.uint8)
    mask[:, 64:] = 255  # right half white
    write_image(tmp_path / "masks" / "wide.png", pixels=mask)
    config = write_dataset_config(tmp_path / "dataset.toml", {"datasets": [{"resolution": 64, "subsets": [
        {"image_dir": str(tmp_path / "images"), "conditioning_data_dir": str(tmp_path / "masks")}]}]})
    (batch,) = all_batches(dataset_group_from_args(trainer_args(config, "--masked_loss"), SD1, lint=False))
    # 128x64 -> 128x64, centre crop of 64 columns starting at 32: left 32 black, right 32 white
    row = mask_from_conditioning_images(batch["conditioning_images"])[0, 0]
    assert row.tolist() == [0.0] * 32 + [1.0] * 32
    assert batch["conditioning_images"].shape[-2:] == batch["images"].shape[-2:] == (64, 64)
