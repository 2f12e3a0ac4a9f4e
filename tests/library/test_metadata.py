"""Fine-tuning metadata: .json and .jsonl reading, errors that name the entry, image lookup, caption assembly."""
from __future__ import annotations

import json
import logging

import pytest

from library.data.images import list_image_files
from library.data.metadata import (
    MetadataEntry,
    assemble_caption,
    load_metadata_dict,
    read_metadata,
    resolve_image_path,
    write_metadata,
)
from library.errors import ConfigError, UserInputError


def write_json(path, data) -> str:
    path.write_text(json.dumps(data), encoding="utf-8")
    return str(path)


def entry(caption=None, tags=None) -> MetadataEntry:
    return MetadataEntry("img", caption, tags, None, None)


def test_read_json_metadata(tmp_path):
    path = write_json(tmp_path / "meta.json", {
        "img1": {"caption": "a cat", "tags": "cat, pet", "train_resolution": [512, 768], "image_size": [1000, 1500]},
        "/data/img2.png": {"tags": "dog"}})
    assert read_metadata(path) == [
        MetadataEntry("img1", "a cat", "cat, pet", (1000, 1500), (512, 768)),
        MetadataEntry("/data/img2.png", None, "dog", None, None)]


def test_read_jsonl_metadata_skips_blank_lines_and_later_duplicates_win(tmp_path, caplog):
    path = tmp_path / "meta.jsonl"
    path.write_text('{"image_path": "a.png", "caption": "old"}\n\n'
                    '{"image_path": "b.png", "caption": "b", "image_size": [64, 32], "tags": "t"}\n'
                    '{"image_path": "a.png", "caption": "new"}\n', encoding="utf-8")
    with caplog.at_level(logging.WARNING):
        entries = read_metadata(path)
    assert entries == [MetadataEntry("b.png", "b", "t", (64, 32), None), MetadataEntry("a.png", "new", None, None, None)]
    assert "line 4: a.png is listed again; the later line wins" in caplog.text
    assert load_metadata_dict(path) == {"b.png": {"caption": "b", "image_size": [64, 32], "tags": "t"},
                                        "a.png": {"caption": "new"}}


@pytest.mark.parametrize("data,message", [
    ({"img1": {"train_resolution": 512}}, '"img1".train_resolution: expected [width, height], got 512'),
    ({"img1": {"image_size": [64, 0]}}, '"img1".image_size: expected [width, height], got [64, 0]'),
    ({"img1": {"caption": 5}}, '"img1".caption: expected a string, got 5'),
    ({"img1": "a cat"}, "\"img1\": expected an object with caption/tags, got 'a cat'"),
    (["img1"], "(top level): expected an object keyed by image path, got 'list'"),
])
def test_bad_json_entries_name_the_file_key_and_field(tmp_path, data, message):
    path = write_json(tmp_path / "meta.json", data)
    with pytest.raises(ConfigError) as error:
        read_metadata(path)
    assert str(error.value) == f"{path}: {message}"


def test_bad_jsonl_lines_name_the_line(tmp_path):
    path = tmp_path / "meta.jsonl"
    path.write_text('{"image_path": "a.png"}\n{"caption": "no path"}\n', encoding="utf-8")
    with pytest.raises(ConfigError, match=r"meta.jsonl: line 2.image_path: expected a non-empty string$"):
        read_metadata(path)
    path.write_text('{"image_path": "a.png", "tags": ["x"]}\n', encoding="utf-8")
    with pytest.raises(ConfigError, match=r"meta.jsonl: line 1.tags: expected a string, got \['x'\]$"):
        read_metadata(path)
    path.write_text('{"image_path": "a.png"\n', encoding="utf-8")
    with pytest.raises(UserInputError, match=r"meta.jsonl: line 1: not valid JSON"):
        read_metadata(path)


def test_missing_or_broken_json_file(tmp_path):
    with pytest.raises(UserInputError, match="nope.json: metadata file not found$"):
        read_metadata(tmp_path / "nope.json")
    (tmp_path / "bad.json").write_text('{"a": {"caption": "x",}}', encoding="utf-8")
    with pytest.raises(UserInputError, match=r"bad.json: line 1: not valid JSON \(Expecting property name"):
        read_metadata(tmp_path / "bad.json")


def test_resolve_image_path_handles_stems_relative_and_absolute_keys(tmp_path):
    (tmp_path / "sub").mkdir()
    for name in ("a.png", "B.JPG", "sub/c.webp", "d.v2.jpeg"):
        (tmp_path / name).write_bytes(b"")
    assert resolve_image_path(tmp_path, "a") == tmp_path / "a.png"  # kohya tools write stems
    assert resolve_image_path(tmp_path, "B") == tmp_path / "B.JPG"
    assert resolve_image_path(tmp_path, "d.v2") == tmp_path / "d.v2.jpeg"
    assert resolve_image_path(tmp_path, "sub/c.webp") == tmp_path / "sub" / "c.webp"
    assert resolve_image_path(None, str(tmp_path / "a.png")) == tmp_path / "a.png"
    assert resolve_image_path(tmp_path / "elsewhere", str(tmp_path / "sub" / "c.webp")) == tmp_path / "sub" / "c.webp"
    assert resolve_image_path(tmp_path, "missing") is None
    assert resolve_image_path(tmp_path, str(tmp_path / "missing.png")) is None


@pytest.mark.parametrize("caption,tags,wildcard,expected", [
    ("a cat", "cat, pet", False, "a cat,cat, pet"),
    ("a cat", None, False, "a cat"),
    (None, "cat, pet", False, "cat, pet"),  # tags alone (kohya v0.9.1), not an empty caption
    ("", "cat", False, "cat"),
    (None, None, False, ""),
    ("a cat\n\nthe cat", "cat\npet", True, "a cat,cat,pet\nthe cat,cat,pet"),
    ("a cat\nthe cat", "cat", False, "a cat\nthe cat,cat"),
])
def test_assemble_caption(caption, tags, wildcard, expected):
    assert assemble_caption(entry(caption, tags), ",", wildcard) == expected


def test_write_metadata_is_utf8_indented_and_round_trips(tmp_path):
    data = {"猫": {"caption": "a cat", "train_resolution": [512, 512]}, "b": {"tags": "x"}}
    path = write_metadata(tmp_path / "out.json", data)
    text = path.read_text(encoding="utf-8")
    assert '"猫": {\n    "caption": "a cat",' in text
    assert load_metadata_dict(path) == data
    write_metadata(tmp_path / "out.jsonl", data)
    assert (tmp_path / "out.jsonl").read_text(encoding="utf-8").splitlines()[1] == '{"image_path": "b", "tags": "x"}'
    assert load_metadata_dict(tmp_path / "out.jsonl") == data
    assert sorted(item.name for item in tmp_path.iterdir()) == ["out.json", "out.jsonl"]  # no temp files left


def test_write_metadata_refuses_a_folder(tmp_path):
    with pytest.raises(UserInputError, match="is a folder; expected a .json file name"):
        write_metadata(tmp_path, {})


def test_list_images_filters_extensions_and_recurses(tmp_path):
    (tmp_path / "deep").mkdir()
    for name in ("b.PNG", "a.jpg", "notes.txt", "deep/c.bmp"):
        (tmp_path / name).write_bytes(b"")
    assert [path.name for path in list_image_files(tmp_path)] == ["a.jpg", "b.PNG"]
    assert [path.name for path in list_image_files(tmp_path, recursive=True)] == ["a.jpg", "b.PNG", "c.bmp"]
