"""Dataset lint: every problem of a folder in one report, fatal ones stop the run, and the lint_dataset tool.

The broken folder holds one example of each problem the lint knows; the clean folder holds nothing to report,
including a JPEG with harmless bytes after its end marker.
"""
from __future__ import annotations

import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from library.data.lint import find_duplicates, lint_dataset, raise_if_fatal, truncation_problem
from library.dataset_config import build_blueprint
from library.errors import UserInputError
from library.families import SD1
from library.text.tokenize import load_tokenizer
from tests.cache_fixtures import dataset_args, jpeg_bytes, write_image
from tests.conftest import ROOT

LONG_CAPTION = " ".join(["word"] * 80)  # one token per word: 80 tokens


def write_config(folder: Path, image_dir: Path) -> Path:
    """A dataset config with one subset and no class_tokens, so an image without caption file has no caption."""
    config = folder / "dataset.toml"
    config.write_text(f'[general]\nresolution = 64\ncaption_extension = ".txt"\n\n[[datasets]]\n\n'
                      f'[[datasets.subsets]]\nimage_dir = "{image_dir.as_posix()}"\n', encoding="utf-8")
    return config


@pytest.fixture
def broken_dir(tmp_path) -> Path:
    image_dir = tmp_path / "broken"
    write_image(image_dir / "good.png", (64, 64), seed=0)
    (image_dir / "good.txt").write_text("a good photo", encoding="utf-8")
    (image_dir / "corrupt.png").write_bytes(b"\x89PNG\r\n\x1a\n" + b"not really a png" * 8)
    whole = jpeg_bytes((64, 64), seed=1)
    (image_dir / "truncated.jpg").write_bytes(whole[:len(whole) // 2])
    write_image(image_dir / "uncaptioned.png", (64, 64), seed=2)
    write_image(image_dir / "empty.png", (64, 64), seed=3)
    (image_dir / "empty.txt").write_text("", encoding="utf-8")
    write_image(image_dir / "wordy.png", (64, 64), seed=4)
    (image_dir / "wordy.txt").write_text(LONG_CAPTION, encoding="utf-8")
    write_image(image_dir / "tiny.png", (32, 48), seed=5)
    (image_dir / "tiny.txt").write_text("tiny", encoding="utf-8")
    shutil.copy(image_dir / "good.png", image_dir / "copy.png")
    (image_dir / "copy.txt").write_text("a copy", encoding="utf-8")
    for name in ("corrupt", "truncated"):
        (image_dir / f"{name}.txt").write_text(name, encoding="utf-8")
    return image_dir


@pytest.fixture
def clean_dir(tmp_path) -> Path:
    image_dir = tmp_path / "clean"
    write_image(image_dir / "one.png", (64, 64), seed=10)
    write_image(image_dir / "two.png", (128, 64), seed=11)
    (image_dir / "three.jpg").write_bytes(jpeg_bytes((64, 96), seed=12) + b"\x00" * 500)  # trailing padding
    for name in ("one", "two", "three"):
        (image_dir / f"{name}.txt").write_text(f"photo {name}", encoding="utf-8")
    return image_dir


def lint(image_dir: Path):
    config = write_config(image_dir.parent, image_dir)
    blueprint = build_blueprint(dataset_args("--dataset_config", str(config)), str(config))
    return lint_dataset(blueprint, tokenizer=load_tokenizer(SD1.text_encoders[0]), workers=1)


def test_one_report_lists_every_problem(broken_dir):
    report = lint(broken_dir)
    assert report.images_scanned == 8
    assert sorted(path.name for path in report.corrupt_images) == ["corrupt.png", "truncated.jpg"]
    assert "truncated" in report.corrupt_images[broken_dir / "truncated.jpg"]
    assert list(report.caption_errors) == [broken_dir / "empty.txt"]
    assert "caption file is empty" in report.caption_errors[broken_dir / "empty.txt"]
    assert report.missing_captions == [broken_dir / "uncaptioned.png"]
    assert report.long_captions == [(broken_dir / "wordy.png", 80)]
    # 32x48 goes to the 64x64 bucket by covering it: scaled by 2 to 64x96 (COMPAT §10.2)
    assert report.upscaled_images == [(broken_dir / "tiny.png", (32, 48), (64, 64), 2.0)]
    assert report.duplicates == [[broken_dir / "copy.png", broken_dir / "good.png"]]
    assert report.fatal
    lines = report.lines()
    assert lines[0] == "dataset lint: 8 images scanned"
    assert "unreadable or corrupt images (fatal): 2" in lines
    assert "captions longer than 75 tokens (the rest is cut off; see --max_token_length): 1" in lines
    assert f"  {broken_dir / 'tiny.png'}: 32x48 -> bucket 64x64 (x2.00)" in lines
    assert f"  {broken_dir / 'copy.png'} = {broken_dir / 'good.png'}" in lines
    assert "no problems found" not in lines


def test_raise_if_fatal_names_both_bad_images_and_the_empty_caption(broken_dir):
    with pytest.raises(UserInputError) as raised:
        raise_if_fatal(lint(broken_dir))
    message = str(raised.value)
    assert message.startswith("the dataset has unreadable files; nothing was trained:")
    for name in ("corrupt.png", "truncated.jpg", "empty.txt"):
        assert str(broken_dir / name) in message
    assert "wordy.png" not in message and "copy.png" not in message  # warnings do not stop the run


def test_clean_folder_reports_no_problems(clean_dir):
    report = lint(clean_dir)
    assert not report.fatal and report.images_scanned == 3
    assert report.lines()[-1] == "no problems found"
    assert report.image_sizes == {clean_dir / "one.png": (64, 64), clean_dir / "two.png": (128, 64),
                                  clean_dir / "three.jpg": (64, 96)}
    raise_if_fatal(report)


def test_longer_token_budget_accepts_the_long_caption(broken_dir):
    config = write_config(broken_dir.parent, broken_dir)
    blueprint = build_blueprint(dataset_args("--dataset_config", str(config)), str(config))
    report = lint_dataset(blueprint, tokenizer=load_tokenizer(SD1.text_encoders[0]), max_token_length=150,
                          workers=1)
    assert report.long_captions == [] and report.max_tokens == 150


def test_truncation_check_tells_cut_files_from_padded_ones(tmp_path):
    whole = jpeg_bytes((48, 48), seed=7)
    cut, padded, intact = tmp_path / "cut.jpg", tmp_path / "padded.jpeg", tmp_path / "intact.jpg"
    cut.write_bytes(whole[:-200])
    padded.write_bytes(whole + b"\xff" * 100)
    intact.write_bytes(whole)
    assert "truncated" in truncation_problem(cut)
    assert truncation_problem(padded) is None and truncation_problem(intact) is None
    png = write_image(tmp_path / "cut.png", (48, 48), seed=8)
    png.write_bytes(png.read_bytes()[:-30])
    assert truncation_problem(png) is not None
    assert truncation_problem(tmp_path / "anything.webp") is None  # no end marker known: not checked


def test_duplicates_need_identical_bytes_not_just_equal_sizes(tmp_path):
    first = write_image(tmp_path / "a.png", (16, 16), seed=1)
    same = tmp_path / "b.png"
    same.write_bytes(first.read_bytes())
    other = tmp_path / "c.png"
    other.write_bytes(first.read_bytes()[:-1] + b"\x00")  # same size, one byte differs
    assert find_duplicates([other, same, first]) == [[first, same]]
    assert find_duplicates([first, other]) == []


def run_lint_tool(config: Path) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "tools/lint_dataset.py", "--dataset_config", str(config)],
                          cwd=ROOT, capture_output=True, text=True, timeout=120, check=False)


def test_lint_tool_exits_2_and_names_the_bad_files(broken_dir):
    result = run_lint_tool(write_config(broken_dir.parent, broken_dir))
    assert result.returncode == 2
    assert result.stderr.count("error: the dataset has unreadable files") == 1
    for name in ("corrupt.png", "truncated.jpg", "empty.txt"):
        assert str(broken_dir / name) in result.stderr
    assert "dataset lint: 8 images scanned" in result.stdout


def test_lint_tool_exits_0_on_a_clean_dataset(clean_dir):
    result = run_lint_tool(write_config(clean_dir.parent, clean_dir))
    assert result.returncode == 0, result.stderr
    assert result.stdout.splitlines()[-1] == "no problems found"
    assert "error:" not in result.stderr
