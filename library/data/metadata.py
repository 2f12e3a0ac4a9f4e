"""Fine-tuning metadata files (`--in_json`, `metadata_file`): read, check, resolve images, assemble captions, write.

Owns the `.json` (object keyed by image) and `.jsonl` (one object per line) formats of COMPAT §9.6. Bucketing
and latent caching of the listed images live elsewhere.
"""
from __future__ import annotations

import json
import logging
from dataclasses import dataclass
from pathlib import Path

from library.errors import ConfigError, UserInputError

logger = logging.getLogger(__name__)

JSONL_SUFFIX = ".jsonl"
_SIZE_FIELDS = ("image_size", "train_resolution")
_TEXT_FIELDS = ("caption", "tags")


@dataclass
class MetadataEntry:
    """One image of a metadata file. Sizes are (width, height)."""

    image_key: str
    caption: str | None
    tags: str | None
    image_size: tuple[int, int] | None
    train_resolution: tuple[int, int] | None


def load_metadata_dict(path: str | Path) -> dict[str, dict]:
    """The raw `{image_key: {field: value}}` mapping of a `.json` or `.jsonl` file, for tools that update it.

    Raises:
        UserInputError: the file is missing or not valid JSON; ConfigError: an entry is not an object.
    """
    return {image_key: fields for image_key, (_, fields) in _load_records(Path(path)).items()}


def read_metadata(path: str | Path) -> list[MetadataEntry]:
    """Checked entries of a metadata file, in file order.

    Raises:
        ConfigError: a field has the wrong type, naming the file, the image key (or JSONL line) and the field.
    """
    path = Path(path)
    return [_checked_entry(path, where, image_key, fields)
            for image_key, (where, fields) in _load_records(path).items()]


def _load_records(path: Path) -> dict[str, tuple[str, dict]]:
    """image key -> (where it is in the file, for messages; its fields)."""
    if not path.is_file():
        raise UserInputError(f"{path}: metadata file not found" + (" (it is a folder)" if path.is_dir() else ""))
    text = path.read_text(encoding="utf-8-sig")
    if path.suffix.lower() == JSONL_SUFFIX:
        return _parse_jsonl(path, text)
    data = _parse_json(path, text, where="")
    if not isinstance(data, dict):
        raise ConfigError(path, "(top level)", "an object keyed by image path", type(data).__name__)
    records = {}
    for image_key, fields in data.items():
        where = json.dumps(image_key, ensure_ascii=False)
        if not isinstance(fields, dict):
            raise ConfigError(path, where, "an object with caption/tags", fields)
        records[image_key] = (where, fields)
    return records


def _parse_json(path: Path, text: str, where: str) -> object:
    try:
        return json.loads(text)
    except json.JSONDecodeError as error:
        line = where or f"line {error.lineno}"
        raise UserInputError(f"{path}: {line}: not valid JSON ({error.msg} at column {error.colno})") from None


def _parse_jsonl(path: Path, text: str) -> dict[str, tuple[str, dict]]:
    """kohya v0.10's JSONL form: one object per line, the image key in `image_path` (COMPAT §9.6)."""
    records: dict[str, tuple[str, dict]] = {}
    for number, line in enumerate(text.splitlines(), start=1):
        if not line.strip():
            continue
        where = f"line {number}"
        record = _parse_json(path, line, where=where)
        if not isinstance(record, dict):
            raise ConfigError(path, where, "an object with image_path and caption", record)
        image_path = record.get("image_path")
        if not isinstance(image_path, str) or not image_path:
            raise ConfigError(path, f"{where}.image_path", "a non-empty string", image_path)
        if image_path in records:
            logger.warning("%s: %s: %s is listed again; the later line wins", path, where, image_path)
            del records[image_path]
        records[image_path] = (where, {key: value for key, value in record.items() if key != "image_path"})
    return records


def _checked_entry(path: Path, where: str, image_key: str, fields: dict) -> MetadataEntry:
    for name in _TEXT_FIELDS:
        value = fields.get(name)
        if value is not None and not isinstance(value, str):
            raise ConfigError(path, f"{where}.{name}", "a string", value)
    sizes = {name: _checked_size(path, f"{where}.{name}", fields.get(name)) for name in _SIZE_FIELDS}
    return MetadataEntry(image_key, fields.get("caption"), fields.get("tags"), sizes["image_size"],
                         sizes["train_resolution"])


def _checked_size(path: Path, key: str, value: object) -> tuple[int, int] | None:
    if value is None:
        return None
    is_pair = isinstance(value, (list, tuple)) and len(value) == 2
    if not is_pair or not all(isinstance(side, int) and not isinstance(side, bool) and side > 0 for side in value):
        raise ConfigError(path, key, "[width, height]", value)
    return int(value[0]), int(value[1])


def resolve_image_path(image_dir: str | Path | None, image_key: str) -> Path | None:
    """The image file an entry names, or None when it cannot be found.

    An absolute key is used as is; otherwise `image_dir/key` when that file exists, else `image_dir/key` plus
    each image extension, because kohya's tools write the file stem without `--full_path` (COMPAT §9.6).
    """
    from library.data.images import IMAGE_EXTENSIONS  # numpy, torch: not for the finetune tools' --help

    key_path = Path(image_key)
    if key_path.is_absolute():
        return key_path if key_path.is_file() else None
    base = Path(image_dir) if image_dir is not None else Path.cwd()
    if (base / key_path).is_file():
        return base / key_path
    for extension in IMAGE_EXTENSIONS:  # both letter cases are in the list
        candidate = base / f"{image_key}{extension}"
        if candidate.is_file():
            return candidate
    return None


def assemble_caption(entry: MetadataEntry, caption_separator: str, enable_wildcard: bool) -> str:
    """The raw training caption of an entry: `caption + caption_separator + tags` (COMPAT §9.6).

    With wildcards the tags (made single-line) are appended to every non-empty caption line. When the caption
    is missing or empty the tags alone are the caption, as in kohya v0.9.1: v0.10 trains such images with an
    empty caption, which silently wastes a tags-only file from merge_dd_tags_to_metadata.py.
    """
    tags = entry.tags or None
    caption = entry.caption or None
    if caption is None or tags is None:
        return caption or tags or ""
    if enable_wildcard:
        single_line_tags = tags.replace("\n", caption_separator)
        return "\n".join(f"{line}{caption_separator}{single_line_tags}" for line in caption.split("\n")
                         if line.strip())
    return caption + caption_separator + tags


def write_metadata(path: str | Path, entries: dict[str, dict]) -> Path:
    """Write `{image_key: fields}` atomically: JSON (indent 2, UTF-8) or, for a `.jsonl` name, one object a line."""
    path = Path(path)
    if path.is_dir():
        raise UserInputError(f"{path}: is a folder; expected a .json file name for the metadata")
    if path.suffix.lower() == JSONL_SUFFIX:
        text = "".join(json.dumps({"image_path": key, **fields}, ensure_ascii=False) + "\n"
                       for key, fields in entries.items())
    else:
        text = json.dumps(entries, indent=2, ensure_ascii=False) + "\n"
    # imported here: state_dict_io pulls in torch, which the JSON-only finetune tools do not otherwise need
    from library.models.state_dict_io import atomic_output

    with atomic_output(path, overwrite=True) as temp:
        temp.write_text(text, encoding="utf-8")
    return path
