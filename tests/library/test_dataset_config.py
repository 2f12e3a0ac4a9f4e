"""Dataset config: the kohya TOML/JSON schema, value precedence, DreamBooth folder names and the flag defaults."""
from __future__ import annotations

import argparse
import json
import logging
from pathlib import Path

import pytest
import toml

from library.dataset_config import (
    DatasetParams,
    SubsetParams,
    build_blueprint,
    describe_blueprint,
    load_dataset_config,
    parse_resolution,
)
from library.errors import FlagError
from library.options.dataset import add_dataset_arguments

FULL_CONFIG = """
[general]
resolution = [768, 512]
batch_size = 2
enable_bucket = true
min_bucket_reso = 320
max_bucket_reso = 1536
bucket_reso_steps = 32
bucket_no_upscale = false
network_multiplier = 0.5
validation_split = 0.1
validation_seed = 42
resize_interpolation = "area"
num_repeats = 3
shuffle_caption = true
caption_separator = ";"
keep_tokens = 1
keep_tokens_separator = "|||"
secondary_separator = ";;;"
enable_wildcard = true
caption_prefix = "photo of"
caption_suffix = "masterpiece"
caption_dropout_rate = 0.05
caption_dropout_every_n_epochs = 3
caption_tag_dropout_rate = 0.1
token_warmup_min = 2
token_warmup_step = 0.5
color_aug = false
flip_aug = true
face_crop_aug_range = [2.0, 4.0]
random_crop = false
custom_attributes = { diff_output_preservation = true }
caption_extension = "txt"
class_tokens = "sks"
cache_info = true

[[datasets]]
resolution = 1024
batch_size = 4
enable_bucket = false
min_bucket_reso = 256
max_bucket_reso = 2048
bucket_reso_steps = 64
bucket_no_upscale = true
network_multiplier = 1
validation_split = 0
validation_seed = 7
resize_interpolation = "bicubic"
num_repeats = 5
caption_dropout_rate = 0

  [[datasets.subsets]]
  image_dir = "train/img"
  num_repeats = 10
  class_tokens = "sks dog"
  alpha_mask = true
  resize_interpolation = "lanczos"
  caption_extension = ".caption"
  flip_aug = false

  [[datasets.subsets]]
  image_dir = "train/reg"
  is_reg = true
  class_tokens = "dog"

[[datasets]]

  [[datasets.subsets]]
  metadata_file = "meta.json"
  image_dir = "train/ft"
  alpha_mask = false

[[datasets]]
batch_size = 1

  [[datasets.subsets]]
  image_dir = "train/cn"
  conditioning_data_dir = "train/cn_cond"
  caption_extension = ".txt"
"""


def parse_flags(*argv: str) -> argparse.Namespace:
    parser = argparse.ArgumentParser()
    add_dataset_arguments(parser)
    return parser.parse_args(list(argv))


def write_config(folder: Path, config: dict, name: str = "dataset.toml") -> str:
    path = folder / name
    path.write_text(toml.dumps(config) if name.endswith(".toml") else json.dumps(config), encoding="utf-8")
    return str(path)


def test_full_kohya_config_resolves_every_level(tmp_path: Path):
    path = tmp_path / "dataset.toml"
    path.write_text(FULL_CONFIG, encoding="utf-8")
    blueprint = build_blueprint(parse_flags(), str(path), supports_controlnet=True)
    assert blueprint.source == str(path)
    assert [dataset.kind for dataset in blueprint.datasets] == ["dreambooth", "finetune", "controlnet"]
    dreambooth, finetune, controlnet = blueprint.datasets
    assert dreambooth.params == DatasetParams(
        resolution=(1024, 1024), batch_size=4, enable_bucket=False, min_bucket_reso=256, max_bucket_reso=2048,
        bucket_reso_steps=64, bucket_no_upscale=True, network_multiplier=1.0, validation_split=0.0,
        validation_seed=7, resize_interpolation="bicubic", prior_loss_weight=1.0, debug_dataset=False)
    train, reg = dreambooth.subsets
    assert train == SubsetParams(
        image_dir="train/img", num_repeats=10, shuffle_caption=True, caption_separator=";", keep_tokens=1,
        keep_tokens_separator="|||", secondary_separator=";;;", enable_wildcard=True, caption_prefix="photo of",
        caption_suffix="masterpiece", caption_dropout_rate=0.0, caption_dropout_every_n_epochs=3,
        caption_tag_dropout_rate=0.1, token_warmup_min=2, token_warmup_step=0.5, color_aug=False, flip_aug=False,
        face_crop_aug_range=(2.0, 4.0), random_crop=False, custom_attributes={"diff_output_preservation": True},
        resize_interpolation="lanczos", caption_extension=".caption", class_tokens="sks dog", cache_info=True,
        is_reg=False, alpha_mask=True)
    assert (reg.is_reg, reg.num_repeats, reg.flip_aug, reg.resize_interpolation) == (True, 5, True, "bicubic")
    # the second dataset sets nothing itself: everything comes from [general]
    assert finetune.params.resolution == (768, 512)
    assert (finetune.params.batch_size, finetune.params.validation_seed) == (2, 42)
    assert finetune.subsets[0].metadata_file == "meta.json"
    assert (finetune.subsets[0].num_repeats, finetune.subsets[0].caption_extension) == (3, ".txt")
    assert controlnet.subsets[0].conditioning_data_dir == "train/cn_cond"
    assert controlnet.params.batch_size == 1


def test_json_config_gives_the_same_blueprint_as_toml(tmp_path: Path):
    toml_path = tmp_path / "dataset.toml"
    toml_path.write_text(FULL_CONFIG, encoding="utf-8")
    json_path = write_config(tmp_path, load_dataset_config(toml_path), "dataset.json")
    from_toml = build_blueprint(parse_flags(), str(toml_path), supports_controlnet=True)
    from_json = build_blueprint(parse_flags(), json_path, supports_controlnet=True)
    assert from_json.datasets == from_toml.datasets
    assert from_json.source == json_path


# where keep_tokens is set (value = level number) -> the value that wins
PRECEDENCE_TABLE = [
    ((), 0),
    (("cli",), 1),
    (("cli", "general"), 2),
    (("cli", "general", "dataset"), 3),
    (("cli", "general", "dataset", "subset"), 4),
    (("general", "subset"), 4),
    (("cli", "dataset"), 3),
]


@pytest.mark.parametrize("levels, expected", PRECEDENCE_TABLE)
def test_most_specific_level_wins(tmp_path: Path, levels: tuple[str, ...], expected: int):
    values = {"cli": 1, "general": 2, "dataset": 3, "subset": 4}
    subset = {"image_dir": "img", **({"keep_tokens": 4} if "subset" in levels else {})}
    dataset = {"resolution": 512, "subsets": [subset], **({"keep_tokens": 3} if "dataset" in levels else {})}
    config = {"datasets": [dataset]}
    if "general" in levels:
        config["general"] = {"keep_tokens": values["general"]}
    argv = ["--keep_tokens", "1"] if "cli" in levels else []
    blueprint = build_blueprint(parse_flags(*argv), write_config(tmp_path, config))
    assert blueprint.datasets[0].subsets[0].keep_tokens == expected


def test_false_in_the_file_is_a_value_and_overrides_true(tmp_path: Path):
    config = {"general": {"shuffle_caption": True, "enable_bucket": True},
              "datasets": [{"resolution": 512, "enable_bucket": False,
                            "subsets": [{"image_dir": "a", "shuffle_caption": False}, {"image_dir": "b"}]}]}
    blueprint = build_blueprint(parse_flags("--shuffle_caption", "--enable_bucket"), write_config(tmp_path, config))
    dataset = blueprint.datasets[0]
    assert [subset.shuffle_caption for subset in dataset.subsets] == [False, True]
    assert dataset.params.enable_bucket is False


def test_dataset_level_keys_fall_back_to_their_flags(tmp_path: Path):
    config = {"datasets": [{"subsets": [{"image_dir": "a"}]}]}
    args = parse_flags("--resolution", "768,512", "--train_batch_size", "6", "--dataset_repeats", "4",
                       "--prior_loss_weight", "0.25", "--face_crop_aug_range", "2.0,4.0", "--debug_dataset")
    dataset = build_blueprint(args, write_config(tmp_path, config)).datasets[0]
    assert (dataset.params.resolution, dataset.params.batch_size) == ((768, 512), 6)
    assert (dataset.params.prior_loss_weight, dataset.params.debug_dataset) == (0.25, True)
    assert (dataset.subsets[0].num_repeats, dataset.subsets[0].face_crop_aug_range) == (4, (2.0, 4.0))


def test_unset_values_use_the_built_in_defaults_when_flags_are_absent(tmp_path: Path):
    # a script that composes other option groups may not have the dataset flags at all
    config = {"datasets": [{"resolution": 640, "subsets": [{"image_dir": "a"}]}]}
    dataset = build_blueprint(argparse.Namespace(), write_config(tmp_path, config)).datasets[0]
    assert dataset.params == DatasetParams(resolution=(640, 640))
    assert dataset.subsets[0] == SubsetParams(image_dir="a")
    assert (dataset.subsets[0].caption_extension, dataset.subsets[0].token_warmup_min) == (".caption", 1)


def test_dreambooth_folders_become_subsets(tmp_path: Path, caplog):
    train, reg = tmp_path / "train", tmp_path / "reg"
    for folder in ("10_sks dog", "5_my_char", "notanumber", "0_x"):
        (train / folder).mkdir(parents=True)
    (reg / "1_dog").mkdir(parents=True)
    (train / "stray.txt").write_text("files in the parent folder are ignored")
    args = parse_flags("--train_data_dir", str(train), "--reg_data_dir", str(reg), "--resolution", "512",
                       "--dataset_repeats", "7", "--caption_extension", "txt")
    with caplog.at_level(logging.WARNING):
        blueprint = build_blueprint(args, None)
    assert blueprint.source == "command line"
    dataset = blueprint.datasets[0]
    assert dataset.kind == "dreambooth"
    summary = [(Path(s.image_dir).name, s.num_repeats, s.class_tokens, s.is_reg) for s in dataset.subsets]
    assert summary == [("10_sks dog", 10, "sks dog", False), ("5_my_char", 5, "my_char", False),
                       ("1_dog", 1, "dog", True)]
    assert all(subset.caption_extension == ".txt" for subset in dataset.subsets)
    assert "skipping folder 'notanumber': its name does not start with a repeat count" in caplog.text
    assert "skipping folder '0_x': repeat count 0 is below 1" in caplog.text


def test_in_json_builds_one_fine_tuning_subset(tmp_path: Path):
    args = parse_flags("--in_json", "meta.json", "--train_data_dir", str(tmp_path), "--resolution", "1024",
                       "--dataset_repeats", "2")
    dataset = build_blueprint(args, None).datasets[0]
    assert dataset.kind == "finetune"
    assert [(s.metadata_file, s.image_dir, s.num_repeats) for s in dataset.subsets] == [
        ("meta.json", str(tmp_path), 2)]


def test_conditioning_data_dir_flag_builds_a_controlnet_dataset(tmp_path: Path):
    args = parse_flags("--train_data_dir", "img", "--conditioning_data_dir", "cond", "--resolution", "512")
    dataset = build_blueprint(args, None, supports_controlnet=True).datasets[0]
    assert dataset.kind == "controlnet"
    assert (dataset.subsets[0].image_dir, dataset.subsets[0].conditioning_data_dir) == ("img", "cond")


@pytest.mark.parametrize("text, expected", [("512", (512, 512)), ("768,512", (768, 512)), (" 640 , 448 ", (640, 448)),
                                            (1024, (1024, 1024)), ([832, 1216], (832, 1216))])
def test_parse_resolution(text, expected):
    assert parse_resolution(text) == expected


@pytest.mark.parametrize("text", ["", "abc", "512x512", "0", "-512", "512,512,512", "512,"])
def test_parse_resolution_rejects(text):
    with pytest.raises(FlagError, match=r"^--resolution .*: expected a size in pixels like 512 or 768,512"):
        parse_resolution(text)


def test_caption_extension_gets_a_leading_dot(tmp_path: Path):
    config = {"datasets": [{"resolution": 512, "subsets": [{"image_dir": "a", "caption_extension": "txt"},
                                                           {"image_dir": "b"}, {"image_dir": "c",
                                                                                "caption_extension": ".tags"}]}]}
    dataset = build_blueprint(parse_flags("--caption_extention", "cap"), write_config(tmp_path, config)).datasets[0]
    assert [subset.caption_extension for subset in dataset.subsets] == [".txt", ".cap", ".tags"]
    assert SubsetParams(caption_extension="wd14").caption_extension == ".wd14"


def test_duplicate_subsets_are_dropped_inside_a_dataset_only(tmp_path: Path, caplog):
    subsets = [{"image_dir": "a", "num_repeats": 0}, {"image_dir": "a", "num_repeats": 2},
               {"image_dir": "a", "num_repeats": 3}, {"image_dir": "b"}]
    config = {"datasets": [{"resolution": 512, "subsets": subsets},
                           {"resolution": 1024, "subsets": [{"image_dir": "a"}]},
                           {"resolution": 512, "subsets": [{"metadata_file": "m.json", "image_dir": "x"},
                                                           {"metadata_file": "m.json", "image_dir": "y"}]}]}
    with caplog.at_level(logging.WARNING):
        blueprint = build_blueprint(parse_flags(), write_config(tmp_path, config))
    first, second, finetune = blueprint.datasets
    # a subset with repeats < 1 is skipped later and does not claim its folder, as in kohya
    assert [(s.image_dir, s.num_repeats) for s in first.subsets] == [("a", 0), ("a", 2), ("b", 1)]
    assert [s.image_dir for s in second.subsets] == ["a"]
    assert [s.image_dir for s in finetune.subsets] == ["x"]
    assert "datasets[0].subsets[2]: ignored, a is already a subset of this dataset" in caplog.text
    assert "datasets[2].subsets[1]: ignored, m.json is already a subset of this dataset" in caplog.text


@pytest.mark.parametrize("subsets, kind", [
    ([{"image_dir": "a"}, {"image_dir": "b", "is_reg": True}], "dreambooth"),
    ([{"metadata_file": "m.json"}, {"metadata_file": "n.jsonl", "image_dir": "b"}], "finetune"),
    ([{"image_dir": "a", "conditioning_data_dir": "c"}], "controlnet"),
])
def test_kind_is_inferred_from_the_subsets(tmp_path: Path, subsets: list[dict], kind: str):
    config = {"datasets": [{"resolution": 512, "subsets": subsets}]}
    blueprint = build_blueprint(parse_flags(), write_config(tmp_path, config), supports_controlnet=True)
    assert blueprint.datasets[0].kind == kind


def test_describe_blueprint_lines(tmp_path: Path):
    config = {"datasets": [
        {"resolution": [768, 512], "batch_size": 2, "enable_bucket": True,
         "subsets": [{"image_dir": "img", "num_repeats": 10, "class_tokens": "sks dog"},
                     {"image_dir": "reg", "is_reg": True}]},
        {"resolution": 512, "enable_bucket": True, "bucket_no_upscale": True,
         "subsets": [{"metadata_file": "m.json", "image_dir": "ft"}]}]}
    path = write_config(tmp_path, config)
    assert describe_blueprint(build_blueprint(parse_flags(), path)) == [
        f"datasets from {path}:",
        "dataset 0 (DreamBooth): resolution 768x512, batch size 2, buckets 256-1024, step 64",
        "  subset 0: img, 10 repeats, class tokens 'sks dog'",
        "  subset 1: reg, 1 repeats, regularisation",
        "dataset 1 (fine-tuning): resolution 512x512, batch size 1, buckets no upscale, step 64",
        "  subset 0: ft (metadata m.json), 1 repeats",
    ]


def test_flag_defaults_match_kohya():
    args = parse_flags()
    expected = {"dataset_repeats": 1, "resolution": None, "train_batch_size": 1, "enable_bucket": False,
                "min_bucket_reso": 256, "max_bucket_reso": 1024, "bucket_reso_steps": 64,
                "caption_extension": ".caption", "caption_separator": ",", "keep_tokens": 0,
                "keep_tokens_separator": "", "caption_dropout_rate": 0.0, "caption_dropout_every_n_epochs": 0,
                "caption_tag_dropout_rate": 0.0, "token_warmup_min": 1, "token_warmup_step": 0,
                "face_crop_aug_range": None, "prior_loss_weight": 1.0, "max_data_loader_n_workers": 8,
                "vae_batch_size": 1, "validation_split": 0.0, "validation_seed": None, "lint_dataset": False,
                "skip_dataset_lint": False}
    assert {name: getattr(args, name) for name in expected} == expected


def test_flags_owned_by_other_groups_are_not_declared_here(capsys):
    for flag in ("--max_token_length", "--clip_skip", "--seed"):
        with pytest.raises(SystemExit):
            parse_flags(flag, "1")
        assert f"unrecognized arguments: {flag}" in capsys.readouterr().err


def test_misspelled_caption_extention_still_works_and_warns(caplog):
    with caplog.at_level(logging.WARNING):
        args = parse_flags("--caption_extention", ".txt")
    assert args.caption_extension == ".txt"
    assert "--caption_extention is deprecated; use --caption_extension" in caplog.text
