"""Bad dataset configs: each golden file under dataset_configs/ names the message fragments it must produce.

Convention: the file's leading `# expect: <fragment>` lines (for JSON, which has no comments, the same lines in a
sibling `<name>.expect` file). Every message must also name the file, so the user knows which config is wrong.
"""
from __future__ import annotations

import argparse
import logging
from pathlib import Path

import pytest

from library.dataset_config import build_blueprint
from library.errors import ConfigError, FlagError, UserInputError
from library.options.dataset import add_dataset_arguments
from tests.cli_helpers import run_error
from tools import lint_dataset

CASES_DIR = Path(__file__).parent / "dataset_configs"
CASES = sorted(path for path in CASES_DIR.iterdir() if path.suffix != ".expect")


def expected_fragments(case: Path) -> list[str]:
    sidecar = case.with_name(case.name + ".expect")
    text = (sidecar if sidecar.exists() else case).read_text(encoding="utf-8")
    return [line.split("# expect:", 1)[1].strip() for line in text.splitlines() if line.startswith("# expect:")]


def default_args(*argv: str) -> argparse.Namespace:
    parser = argparse.ArgumentParser()
    add_dataset_arguments(parser)
    return parser.parse_args(list(argv))


def test_there_are_enough_golden_cases():
    assert len(CASES) >= 12
    assert all(expected_fragments(case) for case in CASES), "every golden file needs an '# expect:' line"


@pytest.mark.parametrize("case", CASES, ids=[case.name for case in CASES])
def test_golden_bad_config(case: Path):
    with pytest.raises(ConfigError) as caught:
        build_blueprint(default_args(), str(case))
    message = str(caught.value)
    assert message.startswith(str(case) + ": ")
    for fragment in expected_fragments(case):
        assert fragment in message, f"{fragment!r} not in:\n{message}"


def test_several_problems_are_reported_one_per_line():
    case = CASES_DIR / "several_problems.toml"
    with pytest.raises(ConfigError) as caught:
        build_blueprint(default_args(), str(case))
    lines = str(caught.value).splitlines()
    assert lines[0] == f"{case}: 3 problems in the dataset config:"
    assert [line.split(": ")[1] for line in lines[1:]] == [
        "general.shuffle_caption", "datasets[0].subsets[0].keep_tokens", "datasets[0].subsets[1].flip_augment"]
    assert caught.value.key == "general.shuffle_caption"


def test_missing_config_file_names_it(tmp_path: Path):
    missing = tmp_path / "nope.toml"
    with pytest.raises(UserInputError, match=r"nope\.toml: dataset config not found \(--dataset_config\)"):
        build_blueprint(default_args(), str(missing))


def test_controlnet_config_is_accepted_by_a_script_that_supports_it():
    blueprint = build_blueprint(default_args(), str(CASES_DIR / "controlnet_unsupported.toml"),
                                supports_controlnet=True)
    assert blueprint.datasets[0].kind == "controlnet"
    assert blueprint.datasets[0].subsets[0].conditioning_data_dir == "images/a_cond"


@pytest.mark.parametrize("argv, fragment", [
    (["--resolution", "big"], "--resolution 'big': expected a size in pixels like 512 or 768,512"),
    (["--resolution", "512,0"], "--resolution '512,0': expected a size in pixels"),
    (["--resolution", "512,512,512"], "--resolution '512,512,512'"),
    (["--resolution", "512", "--caption_dropout_rate", "1.5"],
     "--caption_dropout_rate: expected a number from 0 to 1, got 1.5"),
    (["--resolution", "512", "--bucket_reso_steps", "0"], "--bucket_reso_steps: expected a positive integer, got 0"),
    (["--resolution", "512", "--face_crop_aug_range", "4,2"],
     "--face_crop_aug_range '4,2': expected two numbers 'low,high' with low <= high"),
    (["--resolution", "67"], "--resolution: expected sides that are multiples of 8, got 67; use 64 or 72"),
    (["--resolution", "768,515"],
     "--resolution: expected sides that are multiples of 8, got 768,515; use 768,512 or 768,520"),
    (["--resolution", "512", "--enable_bucket", "--bucket_reso_steps", "12"],
     "--bucket_reso_steps: expected a multiple of 8, got 12; use 8 or 16"),
    (["--resolution", "512", "--dataset_repeats", "-1"],
     "--dataset_repeats: expected an integer >= 1 (or 0 to skip the subset), got -1"),
])
def test_bad_flag_values_name_the_flag(tmp_path: Path, argv: list[str], fragment: str):
    (tmp_path / "10_dog").mkdir()
    with pytest.raises(UserInputError) as caught:
        build_blueprint(default_args("--train_data_dir", str(tmp_path), *argv), None)
    assert fragment in str(caught.value)


def test_no_dataset_at_all_lists_the_three_ways():
    with pytest.raises(UserInputError, match="no dataset given: pass --dataset_config, --train_data_dir"):
        build_blueprint(default_args("--resolution", "512"), None)


def test_missing_resolution_on_the_command_line():
    with pytest.raises(UserInputError, match="--resolution: required"):
        build_blueprint(default_args("--in_json", "meta.json"), None)


def test_images_directly_in_train_data_dir_get_a_hint(tmp_path: Path):
    (tmp_path / "cat.png").write_bytes(b"")
    (tmp_path / "notes").mkdir()
    with pytest.raises(UserInputError) as caught:
        build_blueprint(default_args("--train_data_dir", str(tmp_path), "--resolution", "512"), None)
    assert str(caught.value) == (
        f"--train_data_dir {tmp_path}: no usable sub-folders; train_data_dir must be the parent of folders named "
        "like 10_sks dog (10 repeats, class tokens 'sks dog'); the images are directly in this folder: move them "
        "into such a sub-folder")


def test_missing_train_data_dir(tmp_path: Path):
    with pytest.raises(UserInputError, match="--train_data_dir .*absent: folder not found"):
        build_blueprint(default_args("--train_data_dir", str(tmp_path / "absent"), "--resolution", "512"), None)


def test_controlnet_flag_refused_when_unsupported(tmp_path: Path):
    argv = ["--train_data_dir", str(tmp_path), "--conditioning_data_dir", str(tmp_path), "--resolution", "512"]
    with pytest.raises(UserInputError, match="--conditioning_data_dir: this script does not train on ControlNet"):
        build_blueprint(default_args(*argv), None)


def test_unknown_interpolation_flag_is_refused_by_argparse(capsys):
    with pytest.raises(SystemExit):
        default_args("--resize_interpolation", "lanczoss")
    assert "invalid choice: 'lanczoss'" in capsys.readouterr().err


def test_config_given_with_folder_flags_warns_they_are_ignored(tmp_path: Path, caplog):
    config = tmp_path / "dataset.toml"
    config.write_text('[[datasets]]\nresolution = 512\n[[datasets.subsets]]\nimage_dir = "a"\n')
    with caplog.at_level(logging.WARNING, logger="library.dataset_config"):
        build_blueprint(default_args("--train_data_dir", "x", "--in_json", "m.json"), str(config))
    assert "--train_data_dir, --in_json ignored: --dataset_config defines the datasets" in caplog.text


@pytest.mark.parametrize("keys, flags, resolution", [
    ("resolution = 512", [], (512, 512)),
    ("resolution = [768, 512]", [], (768, 512)),
    ("", ["--resolution", "1024,1024"], (1024, 1024)),
    # with buckets the resolution only sets the area; every bucket is a multiple of bucket_reso_steps (COMPAT §10)
    ("resolution = 1000\nenable_bucket = true\nmax_bucket_reso = 2048", [], (1000, 1000)),
    ("", ["--resolution", "1000", "--enable_bucket", "--max_bucket_reso", "2048"], (1000, 1000)),
])
def test_sizes_the_vae_can_encode_are_accepted(tmp_path: Path, keys: str, flags: list[str], resolution):
    config = tmp_path / "dataset.toml"
    config.write_text(f'[[datasets]]\n{keys}\n[[datasets.subsets]]\nimage_dir = "a"\n', encoding="utf-8")
    blueprint = build_blueprint(default_args(*flags), str(config))
    assert blueprint.datasets[0].params.resolution == resolution


def test_zero_repeats_skips_one_subset_but_not_all(tmp_path: Path):
    config = tmp_path / "dataset.toml"
    config.write_text('[[datasets]]\nresolution = 512\n[[datasets.subsets]]\nimage_dir = "a"\nnum_repeats = 0\n'
                      '[[datasets.subsets]]\nimage_dir = "b"\n', encoding="utf-8")
    subsets = build_blueprint(default_args(), str(config)).datasets[0].subsets
    assert [(subset.image_dir, subset.num_repeats) for subset in subsets] == [("a", 0), ("b", 1)]


def test_zero_repeats_everywhere_names_each_place_a_zero_was_written(tmp_path: Path):
    config = tmp_path / "dataset.toml"
    config.write_text('[general]\nnum_repeats = 0\n[[datasets]]\nresolution = 512\n[[datasets.subsets]]\n'
                      'image_dir = "a"\n[[datasets.subsets]]\nimage_dir = "b"\n[[datasets.subsets]]\n'
                      'image_dir = "c"\nnum_repeats = 0\n', encoding="utf-8")
    with pytest.raises(ConfigError) as caught:
        build_blueprint(default_args(), str(config))
    text = "expected an integer >= 1, got 0; every subset has num_repeats 0 and is skipped, so there is nothing to " \
           "train on"
    assert str(caught.value).splitlines() == [f"{config}: 2 problems in the dataset config:",
                                              f"{config}: general.num_repeats: {text}",
                                              f"{config}: datasets[0].subsets[2].num_repeats: {text}"]


def test_zero_dataset_repeats_flag_for_every_subset_names_the_flag(tmp_path: Path):
    with pytest.raises(FlagError) as caught:
        build_blueprint(default_args("--in_json", "meta.json", "--resolution", "512", "--dataset_repeats", "0"), None)
    assert str(caught.value) == ("--dataset_repeats: expected an integer >= 1, got 0; every subset has num_repeats 0 "
                                 "and is skipped, so there is nothing to train on")


@pytest.mark.parametrize("body, key_and_text", [
    ('[[datasets]]\nresolution = 67\n[[datasets.subsets]]\nimage_dir = "a"\n',
     "datasets[0].resolution: expected sides that are multiples of 8, got 67; use 64 or 72"),
    ('[[datasets]]\nresolution = 512\n[[datasets.subsets]]\nimage_dir = "a"\nnum_repeats = 0\n',
     "datasets[0].subsets[0].num_repeats: expected an integer >= 1, got 0; every subset has num_repeats 0 and is "
     "skipped, so there is nothing to train on"),
])
def test_a_script_prints_one_line_and_exits_2_writing_nothing(tmp_path: Path, capsys, body: str, key_and_text: str):
    config = tmp_path / "dataset.toml"
    config.write_text(body, encoding="utf-8")
    line = run_error(lint_dataset.main, ["--dataset_config", str(config)], capsys)
    assert line == f"error: {config}: {key_and_text}"
    assert [path.name for path in tmp_path.iterdir()] == ["dataset.toml"]
    assert config.read_text(encoding="utf-8") == body
