"""Dataset builder, batches side: bucketed batches and their per-epoch order, SDXL size conditioning values, sample
contents (pixels, flips, alpha masks, captions, attributes, ControlNet conditioning) and DataLoader workers.
"""
from __future__ import annotations

import random
from collections import Counter

import numpy as np
import torch

from library.data.images import load_image, to_model_tensor
from tests.data_fixtures import (
    all_batches,
    group_from_config,
    noise_pixels,
    one_subset_config,
    write_image,
    write_images,
)

# resolution 64 with 32-pixel steps: buckets (32,96), (32,128), (64,64), (96,32), (128,32) (COMPAT §10.1)
SMALL_BUCKETS = {"enable_bucket": True, "min_bucket_reso": 32, "max_bucket_reso": 128, "bucket_reso_steps": 32}


def _bucketed_group(tmp_path, batch_size: int = 4, **keys):
    """3 square images, 2 wide (96x32) and 1 tall (32x96), 3 repeats each."""
    folder = tmp_path / "images"
    if not folder.exists():
        write_images(folder, [(64, 64)] * 3, stem="square")
        write_images(folder, [(96, 32), (100, 34)], stem="wide", seed=1)
        write_images(folder, [(32, 96)], stem="tall", seed=2)
    config = one_subset_config(folder, num_repeats=3, batch_size=batch_size, **SMALL_BUCKETS, **keys)
    return group_from_config(tmp_path, config)


def _batch_keys(batches: list[dict]) -> list[list[str]]:
    return [[key.rsplit("/", 1)[-1] for key in batch["image_keys"]] for batch in batches]


# ---- buckets and batch order (COMPAT §10.5) ---------------------------------------------------------------------

def test_each_batch_holds_one_bucket_and_counts_are_per_bucket(tmp_path):
    group = _bucketed_group(tmp_path, batch_size=4)
    # 64x64: 9 samples -> 3 batches, 96x32: 6 -> 2, 32x96: 3 -> 1
    assert len(group) == 6
    assert group.datasets[0].bucket_counts() == {(32, 96): 3, (64, 64): 9, (96, 32): 6}
    batches = all_batches(group)
    sizes_per_bucket = Counter()
    for batch in batches:
        targets = {tuple(size) for size in batch["target_sizes_hw"].tolist()}
        assert len(targets) == 1
        (height, width), = targets
        assert batch["images"].shape[1:] == (3, height, width)
        sizes_per_bucket[(width, height)] += len(batch["image_keys"])
    assert sizes_per_bucket == {(64, 64): 9, (96, 32): 6, (32, 96): 3}
    names = Counter(name for keys in _batch_keys(batches) for name in keys)
    assert set(names.values()) == {3} and len(names) == 6  # every image once per repeat


def test_batch_order_is_a_function_of_seed_and_epoch(tmp_path):
    group = _bucketed_group(tmp_path, batch_size=2)
    state = random.getstate()
    epoch1 = _batch_keys(all_batches(group, epoch=1))
    epoch2 = _batch_keys(all_batches(group, epoch=2))
    assert random.getstate() == state
    assert _batch_keys(all_batches(group, epoch=1)) == epoch1
    assert epoch2 != epoch1
    assert Counter(map(tuple, map(sorted, epoch1))) != Counter(map(tuple, map(sorted, epoch2)))  # new pairings
    rebuilt = _bucketed_group(tmp_path, batch_size=2)
    assert _batch_keys(all_batches(rebuilt, epoch=1)) == epoch1


def test_repeats_of_an_image_are_spread_over_batches(tmp_path):
    # kohya shuffles inside each bucket every epoch, so 10 repeats of 2 images do not make 5 batches of
    # [a, a] and 5 of [b, b] (COMPAT §10.5)
    write_images(tmp_path / "images", [(64, 64)] * 2)
    group = group_from_config(tmp_path, one_subset_config(tmp_path / "images", num_repeats=10, batch_size=2))
    for epoch in (1, 2, 3):
        pairs = [tuple(sorted(keys)) for keys in _batch_keys(all_batches(group, epoch))]
        assert ("img0.png", "img1.png") in pairs


# ---- SDXL size conditioning (COMPAT §10.4) -----------------------------------------------------------------------

def test_sdxl_size_conditioning_values_with_and_without_flip(tmp_path):
    folder = tmp_path / "images"
    write_image(folder / "portrait.png", (64, 84))
    write_image(folder / "wide.png", (100, 40), seed=1)
    config = one_subset_config(folder, num_repeats=12, batch_size=4, flip_aug=True, **SMALL_BUCKETS)
    group = group_from_config(tmp_path, config)
    seen = set()
    for batch in all_batches(group):
        for position, key in enumerate(batch["image_keys"]):
            flipped = batch["flippeds"][position]
            values = (batch["original_sizes_hw"][position].tolist(), batch["target_sizes_hw"][position].tolist(),
                      batch["crop_top_lefts"][position].tolist())
            if key.endswith("portrait.png"):
                # bucket 64x64 is wider than 64/84: fitted width 48.76, left 7, right 55.76; flipped 64-55.76
                assert values == ([84, 64], [64, 64], [0, 8] if flipped else [0, 7])
            else:
                # aspect 2.5 -> bucket 96x32: fitted width 80, left 8, right 88; flipped 96-88 = 8
                assert values == ([40, 100], [32, 96], [0, 8])
            seen.add((key.rsplit("/", 1)[-1], flipped))
    assert seen == {("portrait.png", False), ("portrait.png", True), ("wide.png", False), ("wide.png", True)}


# ---- sample contents -----------------------------------------------------------------------------------------

def _half_black_half_white(height: int = 64, width: int = 64, alpha: bool = False) -> np.ndarray:
    pixels = np.zeros((height, width, 4 if alpha else 3), dtype=np.uint8)
    pixels[:, width // 2:, :3] = 255
    if alpha:
        pixels[:, :16, 3] = 255  # opaque on the left quarter only
    return pixels


def test_pixels_are_minus_one_to_one_and_flip_mirrors_them(tmp_path):
    folder = tmp_path / "images"
    write_image(folder / "halves.png", pixels=_half_black_half_white())
    write_image(folder / "noise.png", (64, 64), seed=3)
    config = one_subset_config(folder, num_repeats=8, batch_size=4, flip_aug=True)
    references = {name: to_model_tensor(load_image(folder / name)) for name in ("halves.png", "noise.png")}
    flips = Counter()
    for batch in all_batches(group_from_config(tmp_path, config)):
        images = batch["images"]
        assert images.shape == (4, 3, 64, 64) and images.dtype == torch.float32
        assert images.min() >= -1.0 and images.max() <= 1.0
        for position, key in enumerate(batch["image_keys"]):
            name, flipped = key.rsplit("/", 1)[-1], batch["flippeds"][position]
            expected = references[name].flip(-1) if flipped else references[name]
            assert torch.equal(images[position], expected)
            if name == "halves.png":
                left_value = 1.0 if flipped else -1.0  # black (0) -> -1, white (255) -> 1
                assert images[position, :, :, 0].unique().tolist() == [left_value]
            flips[flipped] += 1
    assert flips[True] > 0 and flips[False] > 0


def test_alpha_mask_from_rgba_png_follows_the_flip(tmp_path):
    folder = tmp_path / "images"
    write_image(folder / "masked.png", pixels=_half_black_half_white(alpha=True))
    config = one_subset_config(folder, num_repeats=6, batch_size=6, flip_aug=True, alpha_mask=True)
    (batch,) = all_batches(group_from_config(tmp_path, config))
    masks = batch["alpha_masks"]
    assert masks.shape == (6, 64, 64) and masks.dtype == torch.float32
    opaque = torch.zeros(64, 64)
    opaque[:, :16] = 1.0
    for position, flipped in enumerate(batch["flippeds"]):
        assert torch.equal(masks[position], opaque.flip(-1) if flipped else opaque)
    assert set(batch["flippeds"]) == {True, False}


def test_no_alpha_masks_or_conditioning_unless_asked(tmp_path):
    write_image(tmp_path / "images" / "img.png")
    (batch,) = all_batches(group_from_config(tmp_path, one_subset_config(tmp_path / "images")))
    assert batch["alpha_masks"] is None and batch["conditioning_images"] is None and batch["latents"] is None


def test_caption_processing_keeps_first_tag_and_applies_prefix(tmp_path):
    folder = tmp_path / "images"
    write_image(folder / "img.png")
    (folder / "img.caption").write_text("sks, red, blue, green, yellow", encoding="utf-8")
    config = one_subset_config(folder, num_repeats=8, batch_size=8, shuffle_caption=True, keep_tokens=1,
                               caption_prefix="photo of")
    captions = [caption for epoch in (1, 2) for batch in all_batches(group_from_config(tmp_path, config), epoch)
                for caption in batch["captions"]]
    assert len(captions) == 16
    for caption in captions:
        tags = caption.split(", ")
        assert tags[0] == "photo of sks"  # the prefix joins the first tag, which keep_tokens=1 holds in place
        assert sorted(tags[1:]) == ["blue", "green", "red", "yellow"]
    assert len(set(captions)) > 1


def test_custom_attributes_and_network_multiplier_reach_every_sample(tmp_path):
    write_images(tmp_path / "images", [(64, 64)] * 3)
    config = one_subset_config(tmp_path / "images", batch_size=3, network_multiplier=0.5,
                               custom_attributes={"diff_output_preservation": True})
    (batch,) = all_batches(group_from_config(tmp_path, config))
    assert batch["custom_attributes"] == [{"diff_output_preservation": True}] * 3
    assert batch["network_multipliers"].tolist() == [0.5, 0.5, 0.5]
    assert batch["loss_weights"].tolist() == [1.0, 1.0, 1.0]


def test_controlnet_conditioning_has_bucket_size_and_flips_with_the_image(tmp_path):
    image_pixels = noise_pixels((96, 64), seed=1)
    write_image(tmp_path / "images" / "img.png", pixels=image_pixels)
    # the conditioning image is the negative of the training image, so every pixel pair must sum to 255
    write_image(tmp_path / "cond" / "img.png", pixels=255 - image_pixels)
    config = {"datasets": [{"resolution": 64, "batch_size": 6, "subsets": [
        {"image_dir": str(tmp_path / "images"), "conditioning_data_dir": str(tmp_path / "cond"),
         "num_repeats": 6, "flip_aug": True}]}]}
    (batch,) = all_batches(group_from_config(tmp_path, config, supports_controlnet=True))
    conditioning = batch["conditioning_images"]
    # kohya's range for conditioning images, as for the training images: ToTensor + Normalize(0.5) -> -1..1
    assert conditioning.shape == (6, 3, 64, 64) and conditioning.min() >= -1.0 and conditioning.max() <= 1.0
    # resize 96x64 -> 96x64 (no change) and a centre crop of 64 columns: identical cut for both
    assert torch.allclose(batch["images"] + conditioning, torch.zeros_like(conditioning), atol=1e-6)
    centre = torch.from_numpy(255 - image_pixels[:, 16:80]).permute(2, 0, 1).float() / 127.5 - 1.0
    for position, flipped in enumerate(batch["flippeds"]):
        assert torch.allclose(conditioning[position], centre.flip(-1) if flipped else centre, atol=1e-6)
    assert set(batch["flippeds"]) == {True, False}


def test_dataloader_workers_yield_the_batches_of_the_main_process(tmp_path):
    # flips and caption shuffles are drawn per sample, so they must not depend on the process either
    group = _bucketed_group(tmp_path, batch_size=2, flip_aug=True, shuffle_caption=True,
                            class_tokens="a, b, c, d, e")
    expected = {}
    for epoch in (2, 3):
        group.set_current_epoch(epoch)
        expected[epoch] = list(group.data_loader(workers=0, shuffle=False))
    loader = group.data_loader(workers=2, persistent=True, shuffle=False)
    for epoch in (2, 3):  # persistent workers see the epoch set after they started
        group.set_current_epoch(epoch)
        loaded = list(loader)
        assert _batch_keys(loaded) == _batch_keys(expected[epoch])
        for batch, reference in zip(loaded, expected[epoch]):
            assert torch.equal(batch["images"], reference["images"])
            assert batch["captions"] == reference["captions"] and batch["flippeds"] == reference["flippeds"]
