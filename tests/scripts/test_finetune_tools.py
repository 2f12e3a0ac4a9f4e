"""finetune/ caption tools run in-process on a folder of three tiny PNGs: merge captions, merge tags, clean."""
from __future__ import annotations

import json
import logging
import subprocess
import sys

import pytest
from PIL import Image

from finetune import clean_captions_and_tags as clean_tool
from finetune import merge_captions_to_metadata as captions_tool
from finetune import merge_dd_tags_to_metadata as tags_tool
from library.errors import FlagError, UserInputError
from tests.conftest import ROOT


@pytest.fixture
def image_dir(tmp_path):
    folder = tmp_path / "images"
    folder.mkdir()
    for name in ("a", "b", "c"):
        Image.new("RGB", (8, 8), (10, 20, 30)).save(folder / f"{name}.png")
    (folder / "a.caption").write_text("a photo of a cat\n", encoding="utf-8")
    (folder / "b.caption").write_text("  a dog  \nsecond line\n", encoding="utf-8")
    for name, tags in (("a", "cat, pet"), ("b", "dog"), ("c", "bird")):
        (folder / f"{name}.txt").write_text(tags, encoding="utf-8")
    return folder


def read_json(path) -> dict:
    return json.loads(path.read_text(encoding="utf-8"))


def test_merge_captions_keys_by_stem_and_reports_missing(image_dir, tmp_path, caplog):
    out = tmp_path / "meta.json"
    with caplog.at_level(logging.WARNING):
        captions_tool.main([str(image_dir), str(out)])
    assert read_json(out) == {"a": {"caption": "a photo of a cat"}, "b": {"caption": "a dog  \nsecond line"}}
    assert f"1 image(s) have no caption file and were skipped: {image_dir / 'c.caption'}" in caplog.text


def test_merge_tags_into_existing_metadata_leaves_in_json_alone(image_dir, tmp_path):
    captions_json, merged_json = tmp_path / "captions.json", tmp_path / "merged.json"
    captions_tool.main([str(image_dir), str(captions_json)])
    before = captions_json.read_bytes()
    tags_tool.main([str(image_dir), str(merged_json), "--in_json", str(captions_json)])
    assert read_json(merged_json) == {"a": {"caption": "a photo of a cat", "tags": "cat, pet"},
                                      "b": {"caption": "a dog  \nsecond line", "tags": "dog"},
                                      "c": {"tags": "bird"}}
    assert captions_json.read_bytes() == before


def test_existing_out_json_is_updated_in_place(image_dir, tmp_path):
    out = tmp_path / "meta.json"
    out.write_text(json.dumps({"a": {"caption": "old", "train_resolution": [64, 64]}, "z": {"caption": "z"}}))
    tags_tool.main([str(image_dir), str(out)])
    assert read_json(out) == {"a": {"caption": "old", "train_resolution": [64, 64], "tags": "cat, pet"},
                              "z": {"caption": "z"}, "b": {"tags": "dog"}, "c": {"tags": "bird"}}
    assert sorted(path.name for path in tmp_path.iterdir()) == ["images", "meta.json"]  # no temp file left


def test_full_path_and_recursive(image_dir, tmp_path):
    (image_dir / "sub").mkdir()
    Image.new("RGB", (8, 8)).save(image_dir / "sub" / "d.png")
    (image_dir / "sub" / "d.txt").write_text("deep", encoding="utf-8")
    out = tmp_path / "meta.json"
    tags_tool.main([str(image_dir), str(out), "--full_path", "--recursive", "--caption_extension", "txt"])
    assert read_json(out) == {str(image_dir / "a.png"): {"tags": "cat, pet"}, str(image_dir / "b.png"): {"tags": "dog"},
                              str(image_dir / "c.png"): {"tags": "bird"}, str(image_dir / "sub" / "d.png"): {"tags": "deep"}}


def test_recursive_without_full_path_is_refused(image_dir, tmp_path):
    with pytest.raises(FlagError, match="^--recursive needs --full_path"):
        tags_tool.main([str(image_dir), str(tmp_path / "meta.json"), "--recursive"])


def test_bad_paths_are_named(image_dir, tmp_path):
    with pytest.raises(UserInputError, match=f"^{tmp_path / 'nope'}: train_data_dir folder not found$"):
        captions_tool.main([str(tmp_path / "nope"), str(tmp_path / "meta.json")])
    with pytest.raises(UserInputError, match="out_json is a folder; expected a .json file name"):
        captions_tool.main([str(image_dir), str(image_dir)])
    with pytest.raises(UserInputError, match="out_json looks like an image"):
        captions_tool.main([str(image_dir), str(image_dir / "a.png")])
    with pytest.raises(UserInputError, match="missing.json: metadata file not found$"):
        captions_tool.main([str(image_dir), str(tmp_path / "out.json"), "--in_json", str(tmp_path / "missing.json")])
    assert not (tmp_path / "out.json").exists()


def test_non_utf8_side_file_is_named(image_dir, tmp_path):
    (image_dir / "c.caption").write_bytes(b"\xff\xfe")
    with pytest.raises(UserInputError, match=r"c.caption: expected UTF-8 text, got byte 0xff at offset 0"):
        captions_tool.main([str(image_dir), str(tmp_path / "meta.json")])


def test_clean_rules(tmp_path):
    path = tmp_path / "meta.json"
    path.write_text(json.dumps({
        "a": {"caption": "  a  cat ,, sitting , ,on a\tmat ,\n\n second  line", "tags": "cat,  cat , ,pet  ear,,dog,"},
        "b": {"caption": "clean", "tags": "x, y", "train_resolution": [64, 64]}}), encoding="utf-8")
    clean_tool.main([str(path), str(path)])  # same file in and out, as kohya allows
    assert read_json(path) == {
        "a": {"caption": "a cat, sitting, on a mat\nsecond line", "tags": "cat, pet ear, dog"},
        "b": {"caption": "clean", "tags": "x, y", "train_resolution": [64, 64]}}
    assert [item.name for item in tmp_path.iterdir()] == ["meta.json"]


def test_clean_writes_a_new_file_and_keeps_the_input(tmp_path):
    source, target = tmp_path / "in.json", tmp_path / "out.json"
    source.write_text(json.dumps({"a": {"tags": "x,x"}}), encoding="utf-8")
    clean_tool.main([str(source), str(target)])
    assert read_json(source) == {"a": {"tags": "x,x"}} and read_json(target) == {"a": {"tags": "x"}}


def test_script_reports_errors_in_one_line(tmp_path):
    result = subprocess.run([sys.executable, str(ROOT / "finetune" / "merge_dd_tags_to_metadata.py"),
                             str(tmp_path / "nope"), str(tmp_path / "meta.json")],
                            check=False, capture_output=True, text=True, cwd=tmp_path, timeout=60)
    assert result.returncode == 2
    assert result.stderr.strip().endswith(f"error: {tmp_path / 'nope'}: train_data_dir folder not found")
