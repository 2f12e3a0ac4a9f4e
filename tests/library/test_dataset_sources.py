"""Dataset builder, records side: DreamBooth folders and TOML configs, captions, regularisation balancing, the
validation split, image sizes, fine-tuning metadata, ControlNet pairs, bad input and the start-of-run summary.
"""
from __future__ import annotations

import json
import logging
import random

import pytest

from library.data.group import build_dataset_group
from library.data.prepare import dataset_group_from_args
from library.data.sources import ImageInfo, MissingImagesError, balance_regularization
from library.dataset_config import build_blueprint
from library.errors import UserInputError
from library.families import SD1
from tests.data_fixtures import (
    all_batches,
    blueprint_from_config,
    group_from_config,
    one_subset_config,
    parse_args,
    write_image,
    write_images,
)

SQUARE = (64, 64)


def _flag_group(*argv: str, seed: int = 0, validation: bool = False):
    args = parse_args(*argv)
    return build_dataset_group(build_blueprint(args, None), seed=seed, validation=validation, scan_workers=1)


def _by_name(group) -> dict[str, ImageInfo]:
    """Records keyed by `<folder name>/<file name>`."""
    return {f"{info.absolute_path.parent.name}/{info.absolute_path.name}": info for info in group.images}


# ---- DreamBooth folders, captions, TOML configs ---------------------------------------------------------------

def test_dreambooth_folders_give_repeats_and_class_tokens(tmp_path, caplog):
    train = tmp_path / "train"
    write_images(train / "10_sks dog", [SQUARE] * 3)
    write_images(train / "3_cat", [SQUARE] * 2, seed=1)
    write_images(train / "notes", [SQUARE])  # no repeat count: skipped with a warning (COMPAT §9.3)
    write_image(train / "stray.png")  # files directly in train_data_dir are not a subset
    (train / "10_sks dog" / "img0.caption").write_text("a photo of sks, on grass\nsecond line", encoding="utf-8")
    with caplog.at_level(logging.WARNING):
        group = _flag_group("--train_data_dir", str(train), "--resolution", "64", "--train_batch_size", "4")
    records = _by_name(group)
    assert {name: (info.caption, info.num_repeats) for name, info in records.items()} == {
        "10_sks dog/img0.png": ("a photo of sks, on grass", 10),  # caption file wins, first line only
        "10_sks dog/img1.png": ("sks dog", 10),
        "10_sks dog/img2.png": ("sks dog", 10),
        "3_cat/img0.png": ("cat", 3),
        "3_cat/img1.png": ("cat", 3),
    }
    assert "skipping folder 'notes'" in caplog.text
    assert group.num_train_images == 36 and group.num_reg_images == 0
    assert len(group) == 9  # one 64x64 bucket: ceil(36 / 4)


def test_caption_extension_without_dot_selects_that_file(tmp_path):
    folder = tmp_path / "train" / "2_toy"
    write_images(folder, [SQUARE] * 2)
    (folder / "img0.txt").write_text("from the txt file", encoding="utf-8")
    (folder / "img0.caption").write_text("from the caption file", encoding="utf-8")
    (folder / "img1.caption").write_text("only a .caption file", encoding="utf-8")
    group = _flag_group("--train_data_dir", str(tmp_path / "train"), "--resolution", "64",
                        "--caption_extension", "txt")
    assert [info.caption for info in group.images] == ["from the txt file", "toy"]


def test_toml_two_datasets_share_a_folder_at_two_resolutions(tmp_path):
    folder = tmp_path / "images"
    write_images(folder, [(96, 64)] * 3)
    config = tmp_path / "dataset.toml"
    config.write_text(f"""
[general]
num_repeats = 2
class_tokens = "shoe"

[[datasets]]
resolution = 64
batch_size = 2
  [[datasets.subsets]]
  image_dir = '{folder}'

[[datasets]]
resolution = [96, 64]
batch_size = 4
  [[datasets.subsets]]
  image_dir = '{folder}'
""", encoding="utf-8")
    args = parse_args("--dataset_config", str(config))
    group = build_dataset_group(build_blueprint(args, args.dataset_config), seed=0, scan_workers=1)
    assert [len(dataset.images) for dataset in group.datasets] == [3, 3]
    assert [len(dataset) for dataset in group.datasets] == [3, 2]  # ceil(6/2), ceil(6/4)
    assert len(group) == 5
    targets = [batch["target_sizes_hw"].tolist() for batch in all_batches(group)]
    assert targets[:3] == [[[64, 64]] * 2] * 3  # a batch holds images of one dataset only
    assert sorted(targets[3:], key=len) == [[[64, 96]] * 2, [[64, 96]] * 4]
    assert {info.caption for info in group.images} == {"shoe"}


# ---- regularisation balancing (COMPAT §9.4) ---------------------------------------------------------------------

def test_reg_repeats_grow_round_robin_to_the_train_count(tmp_path):
    write_images(tmp_path / "train" / "10_sks", [SQUARE] * 3)
    write_images(tmp_path / "reg" / "1_dog", [SQUARE] * 4, seed=2)
    group = _flag_group("--train_data_dir", str(tmp_path / "train"), "--reg_data_dir", str(tmp_path / "reg"),
                        "--resolution", "64")
    reg = [info for info in group.images if info.is_reg]
    # 30 train samples; 4 reg images enter with 1 each, then +1 round-robin: 26 more = 6 rounds + 2
    assert [info.absolute_path.name for info in reg] == ["img0.png", "img1.png", "img2.png", "img3.png"]
    assert [info.num_repeats for info in reg] == [8, 8, 7, 7]
    assert group.num_train_images == 30 and group.num_reg_images == 30


def test_reg_images_beyond_the_train_count_are_dropped_with_a_warning(tmp_path, caplog):
    write_images(tmp_path / "train" / "1_sks", [SQUARE] * 2)
    write_images(tmp_path / "reg" / "1_dog", [SQUARE] * 5, seed=2)
    with caplog.at_level(logging.WARNING):
        group = _flag_group("--train_data_dir", str(tmp_path / "train"), "--reg_data_dir", str(tmp_path / "reg"),
                            "--resolution", "64")
    reg = [info for info in group.images if info.is_reg]
    assert [(info.absolute_path.name, info.num_repeats) for info in reg] == [("img0.png", 1), ("img1.png", 1)]
    assert "3 of 5 regularization images are not used: the train images (x repeats) number 2" in caplog.text


def test_reg_first_pass_keeps_own_repeats_and_may_overshoot(tmp_path):
    def record(name: str, repeats: int, is_reg: bool) -> ImageInfo:
        return ImageInfo(name, tmp_path / name, "", repeats, is_reg, 0)

    train = [record(f"t{number}.png", 10, False) for number in range(3)]
    reg = [record("r0.png", 20, True), record("r1.png", 20, True), record("r2.png", 20, True)]
    used = balance_regularization(train, reg)
    # kohya stops as soon as the count reaches 30: 20, then 40 after the second image; the third is unused
    assert [(info.image_key, info.num_repeats) for info in used] == [("r0.png", 20), ("r1.png", 20)]


def test_reg_samples_carry_prior_loss_weight(tmp_path):
    write_images(tmp_path / "train" / "2_sks", [SQUARE] * 2)
    write_images(tmp_path / "reg" / "1_dog", [SQUARE] * 2, seed=2)
    group = _flag_group("--train_data_dir", str(tmp_path / "train"), "--reg_data_dir", str(tmp_path / "reg"),
                        "--resolution", "64", "--train_batch_size", "8", "--prior_loss_weight", "0.25")
    (batch,) = all_batches(group)
    weights = {(key.split("/")[-2], round(weight, 4)) for key, weight in
               zip(batch["image_keys"], batch["loss_weights"].tolist())}
    assert weights == {("2_sks", 1.0), ("1_dog", 0.25)}
    assert len(batch["image_keys"]) == 8  # 2 x 2 train + 2 reg with 2 repeats each


# ---- validation split (COMPAT §9.7) ---------------------------------------------------------------------------

def _split_config(tmp_path, validation_seed: int) -> dict:
    write_images(tmp_path / "train", [SQUARE] * 8)
    write_images(tmp_path / "reg", [SQUARE] * 2, seed=3)
    return {"datasets": [{"resolution": 64, "validation_split": 0.25, "validation_seed": validation_seed,
                          "subsets": [{"image_dir": str(tmp_path / "train"), "num_repeats": 5},
                                      {"image_dir": str(tmp_path / "reg"), "is_reg": True}]}]}


def _split_names(tmp_path, validation_seed: int) -> tuple[set[str], set[str], set[str]]:
    config = _split_config(tmp_path, validation_seed)
    train_group = group_from_config(tmp_path, config)
    validation_group = group_from_config(tmp_path, config, validation=True)
    train = {info.absolute_path.name for info in train_group.images if not info.is_reg}
    reg = {info.absolute_path.name for info in train_group.images if info.is_reg}
    held_out = {info.absolute_path.name for info in validation_group.images}
    return train, reg, held_out


def test_validation_split_is_disjoint_complete_and_without_reg(tmp_path):
    state = random.getstate()
    config = _split_config(tmp_path, validation_seed=7)
    train_group = group_from_config(tmp_path, config)
    validation_group = group_from_config(tmp_path, config, validation=True)
    assert random.getstate() == state  # the split shuffle has its own RNG
    train = [info for info in train_group.images if not info.is_reg]
    held_out = validation_group.images
    assert len(train) == 6 and len(held_out) == 2  # ceil(8 * 0.75) train, the rest held out
    names = {info.absolute_path.name for info in train} | {info.absolute_path.name for info in held_out}
    assert names == {f"img{number}.png" for number in range(8)}
    assert {info.num_repeats for info in train} == {5} and {info.num_repeats for info in held_out} == {1}
    assert not any(info.is_reg for info in held_out)
    assert validation_group.datasets[0].is_validation and len(validation_group) == 2
    assert sum(info.is_reg for info in train_group.images) == 2  # reg images are never held out


def test_validation_split_is_a_function_of_validation_seed(tmp_path):
    first = _split_names(tmp_path, validation_seed=7)
    assert _split_names(tmp_path, validation_seed=7) == first
    other = _split_names(tmp_path, validation_seed=8)
    assert other[2] != first[2] and other[1] == first[1]


def test_validation_group_is_none_without_a_split(tmp_path):
    write_images(tmp_path / "train", [SQUARE] * 3)
    assert group_from_config(tmp_path, one_subset_config(tmp_path / "train"), validation=True) is None


# ---- subsets that contribute nothing, bad images ---------------------------------------------------------------

def test_zero_repeat_subset_is_ignored_and_empty_folder_warned(tmp_path, caplog):
    write_images(tmp_path / "used", [SQUARE] * 2)
    write_images(tmp_path / "muted", [SQUARE] * 2, seed=1)
    (tmp_path / "empty").mkdir()
    config = {"datasets": [{"resolution": 64, "subsets": [
        {"image_dir": str(tmp_path / "used")},
        {"image_dir": str(tmp_path / "muted"), "num_repeats": 0},
        {"image_dir": str(tmp_path / "empty")}]}]}
    with caplog.at_level(logging.WARNING):
        group = group_from_config(tmp_path, config)
    assert {info.absolute_path.parent.name for info in group.images} == {"used"}
    assert f"dataset 0 subset 1 ({tmp_path / 'muted'}): num_repeats 0 < 1; subset ignored" in caplog.text
    assert f"dataset 0 subset 2: no images in {tmp_path / 'empty'}" in caplog.text


def test_no_images_anywhere_is_a_user_error_with_a_hint(tmp_path):
    (tmp_path / "train" / "10_sks").mkdir(parents=True)
    with pytest.raises(UserInputError) as raised:
        _flag_group("--train_data_dir", str(tmp_path / "train"), "--resolution", "64")
    assert str(raised.value) == ("command line: no images found in any dataset; check image_dir / train_data_dir "
                                 "(it must be the parent of folders named like '10_sks dog')")


def test_no_images_beside_a_zero_repeat_subset_says_it_was_skipped(tmp_path):
    write_images(tmp_path / "muted", [SQUARE] * 2)
    (tmp_path / "empty").mkdir()
    config = {"datasets": [{"resolution": 64, "subsets": [{"image_dir": str(tmp_path / "muted"), "num_repeats": 0},
                                                          {"image_dir": str(tmp_path / "empty")}]}]}
    with pytest.raises(UserInputError) as raised:
        group_from_config(tmp_path, config)
    assert str(raised.value).endswith("no images found in any dataset; check image_dir / train_data_dir (it must be "
                                      "the parent of folders named like '10_sks dog'); 1 subset with num_repeats 0 "
                                      "skipped")


def test_corrupt_images_are_all_listed_before_any_model_loads(tmp_path):
    folder = tmp_path / "train" / "1_sks"
    write_images(folder, [SQUARE])
    truncated = folder / "cut.png"
    write_image(truncated, seed=5)
    truncated.write_bytes(truncated.read_bytes()[:200])  # an interrupted copy: the header is intact
    (folder / "notes.png").write_text("this is not an image", encoding="utf-8")
    args = parse_args("--train_data_dir", str(tmp_path / "train"), "--resolution", "64")
    with pytest.raises(UserInputError) as raised:
        dataset_group_from_args(args, SD1)
    lines = str(raised.value).splitlines()
    assert lines == [
        "the dataset has unreadable files; nothing was trained:",
        "unreadable or corrupt images: 2",
        f"  {folder / 'cut.png'}: cannot read image (OSError: image file is truncated)",
        f"  {folder / 'notes.png'}: cannot identify image file (not an image, or a format Pillow cannot read)"]
    assert str(folder / "img0.png") not in str(raised.value)


def test_unreadable_images_are_all_listed_without_the_lint(tmp_path):
    folder = tmp_path / "images"
    write_images(folder, [SQUARE])
    for name in ("a.png", "b.jpg"):
        (folder / name).write_text("not an image", encoding="utf-8")
    with pytest.raises(MissingImagesError) as raised:
        group_from_config(tmp_path, one_subset_config(folder))
    assert str(raised.value).splitlines() == [
        "2 image(s) cannot be read:",
        f"  {folder / 'a.png'}: cannot identify image file (not an image, or a format Pillow cannot read)",
        f"  {folder / 'b.jpg'}: cannot identify image file (not an image, or a format Pillow cannot read)"]


# ---- image sizes --------------------------------------------------------------------------------------------

def test_exif_rotated_jpeg_has_swapped_sides(tmp_path):
    write_image(tmp_path / "images" / "rotated.jpg", (64, 32), exif_orientation=6)  # stored 64 wide, shown 32
    group = group_from_config(tmp_path, one_subset_config(tmp_path / "images"))
    assert group.images[0].image_size == (32, 64)
    (batch,) = all_batches(group)
    assert batch["original_sizes_hw"].tolist() == [[64, 32]]


def test_size_in_a_cache_file_name_wins_over_the_image(tmp_path):
    # kohya reads sizes from `<stem>_WWWWxHHHH_sd.npz` names so cached images are never opened (COMPAT §7.2); a
    # stale name therefore wins over the real 64x64 image, as in kohya
    folder = tmp_path / "images"
    write_image(folder / "img.png", SQUARE)
    (folder / "img_0096x0064_sd.npz").write_bytes(b"")
    blueprint = blueprint_from_config(tmp_path, one_subset_config(folder))
    sd_group = build_dataset_group(blueprint, seed=0, latent_suffix="sd", scan_workers=1)
    assert sd_group.images[0].image_size == (96, 64)
    sdxl_group = build_dataset_group(blueprint, seed=0, latent_suffix="sdxl", scan_workers=1)
    assert sdxl_group.images[0].image_size == (64, 64)  # an _sd name says nothing for SDXL


def test_cache_info_writes_kohya_metadata_cache_and_reuses_it(tmp_path):
    folder = tmp_path / "images"
    write_image(folder / "img0.png", (64, 48))
    (folder / "img0.caption").write_text("a red boot", encoding="utf-8")
    config = one_subset_config(folder, cache_info=True)
    group_from_config(tmp_path, config)
    cache = json.loads((folder / "metadata_cache.json").read_text(encoding="utf-8"))
    assert cache == {str(folder / "img0.png"): {"caption": "a red boot", "resolution": [64, 48]}}
    (folder / "img0.caption").write_text("changed", encoding="utf-8")
    write_image(folder / "img0.png", (32, 32))
    again = group_from_config(tmp_path, config)
    assert (again.images[0].caption, again.images[0].image_size) == ("a red boot", (64, 48))



def test_cache_info_flag_reaches_the_folder_subsets(tmp_path):
    folder = tmp_path / "train" / "2_boot"
    write_image(folder / "img0.png", (64, 48))
    (folder / "img0.caption").write_text("a red boot", encoding="utf-8")
    _flag_group("--train_data_dir", str(tmp_path / "train"), "--resolution", "64", "--cache_info")
    cache = json.loads((folder / "metadata_cache.json").read_text(encoding="utf-8"))
    assert cache == {str(folder / "img0.png"): {"caption": "a red boot", "resolution": [64, 48]}}


def test_dataset_class_is_refused_with_one_line(tmp_path):
    from library.data.prepare import blueprint_from_args
    from library.errors import FlagError

    args = parse_args("--train_data_dir", str(tmp_path), "--resolution", "64", "--dataset_class", "my.Dataset")
    with pytest.raises(FlagError, match="--dataset_class my.Dataset: arbitrary dataset classes are not supported"):
        blueprint_from_args(args, SD1)

# ---- fine-tuning metadata (COMPAT §9.6) ------------------------------------------------------------------------

def test_finetune_metadata_with_stem_and_absolute_keys(tmp_path):
    image_dir, elsewhere = tmp_path / "images", tmp_path / "elsewhere"
    write_image(image_dir / "a.png", SQUARE)
    write_image(image_dir / "b.jpg", (48, 64), seed=1)
    write_image(elsewhere / "c.png", (64, 32), seed=2)
    metadata = {
        "a": {"caption": "a cat", "tags": "red, fluffy"},
        "b.jpg": {"tags": "blue, sitting", "image_size": [96, 64]},  # metadata size wins over the 48x64 file
        str(elsewhere / "c.png"): {"caption": "a dog"},
    }
    (tmp_path / "meta.json").write_text(json.dumps(metadata), encoding="utf-8")
    args = parse_args("--in_json", str(tmp_path / "meta.json"), "--train_data_dir", str(image_dir),
                      "--resolution", "64", "--dataset_repeats", "2")
    blueprint = build_blueprint(args, None)
    assert blueprint.datasets[0].kind == "finetune"
    group = build_dataset_group(blueprint, seed=0, scan_workers=1)
    assert [(info.absolute_path, info.caption, info.image_size, info.num_repeats) for info in group.images] == [
        (image_dir / "a.png", "a cat,red, fluffy", (64, 64), 2),
        (image_dir / "b.jpg", "blue, sitting", (96, 64), 2),
        (elsewhere / "c.png", "a dog", (64, 32), 2)]


def test_finetune_metadata_naming_a_missing_image_fails(tmp_path):
    write_image(tmp_path / "images" / "a.png")
    (tmp_path / "meta.json").write_text(json.dumps({"a": {"caption": "x"}, "gone": {"caption": "y"}}),
                                        encoding="utf-8")
    args = parse_args("--in_json", str(tmp_path / "meta.json"), "--train_data_dir", str(tmp_path / "images"),
                      "--resolution", "64")
    with pytest.raises(UserInputError, match=r"meta\.json: 1 image\(s\) named in the metadata were not found "
                                             r"\(image_dir: .*images\): gone$"):
        build_dataset_group(build_blueprint(args, None), seed=0, scan_workers=1)


# ---- ControlNet pairs ----------------------------------------------------------------------------------------

def _controlnet_config(tmp_path) -> dict:
    return {"datasets": [{"resolution": 64, "subsets": [
        {"image_dir": str(tmp_path / "images"), "conditioning_data_dir": str(tmp_path / "cond"),
         "class_tokens": "edge map"}]}]}


def test_controlnet_pairs_match_by_stem_across_extensions(tmp_path):
    write_images(tmp_path / "images", [SQUARE] * 2)
    write_images(tmp_path / "cond", [SQUARE] * 2, suffix=".jpg", seed=4)
    group = group_from_config(tmp_path, _controlnet_config(tmp_path), supports_controlnet=True)
    assert group.datasets[0].kind == "controlnet"
    assert [info.conditioning_image_path for info in group.images] == [
        tmp_path / "cond" / "img0.jpg", tmp_path / "cond" / "img1.jpg"]


def test_controlnet_missing_conditioning_image_is_named(tmp_path):
    write_images(tmp_path / "images", [SQUARE] * 3)
    write_image(tmp_path / "cond" / "img0.png")
    with pytest.raises(UserInputError) as raised:
        group_from_config(tmp_path, _controlnet_config(tmp_path), supports_controlnet=True)
    assert str(raised.value) == (f"{tmp_path / 'cond'}: conditioning_data_dir has no image for 2 training image(s) "
                                 "(same file stem expected): img1.png, img2.png")


# ---- summary -----------------------------------------------------------------------------------------------------

def test_summary_lines_show_repeats_buckets_and_batches(tmp_path):
    write_images(tmp_path / "train" / "3_sks", [(64, 64), (64, 64), (128, 32)])
    write_images(tmp_path / "reg" / "1_dog", [(64, 64)], seed=2)
    group = _flag_group("--train_data_dir", str(tmp_path / "train"), "--reg_data_dir", str(tmp_path / "reg"),
                        "--resolution", "64", "--enable_bucket", "--min_bucket_reso", "32", "--max_bucket_reso",
                        "128", "--bucket_reso_steps", "32", "--train_batch_size", "2")
    # 9 train samples (6 in 64x64, 3 in 128x32) + 1 reg image balanced to 9 repeats (64x64)
    assert group.summary_lines() == [
        "dataset 0 (dreambooth): resolution 64x64, batch size 2, 10 batches per epoch",
        f"  subset 0: {tmp_path / 'train' / '3_sks'}: 3 images, 9 with repeats",
        f"  subset 1: {tmp_path / 'reg' / '1_dog'}: 1 image, 9 with repeats (regularization)",
        "  buckets: 64x64: 15, 128x32: 3",
        "total: 9 train images (x repeats), 9 regularization, 10 batches per epoch",
    ]
