"""Print the metadata header of a `.safetensors` file (LoRA, checkpoint, embedding), as kohya's
tools/show_metadata.py does, with JSON-valued keys (ss_tag_frequency, ss_datasets, ss_bucket_info, ...) pretty-printed.

    python tools/show_metadata.py my_lora.safetensors [--full] [--json]

Only the header is read, so this is instant even for multi-GB checkpoints. Without --full each value shows at most
--max_lines lines of at most 2,000 characters; a value nested too deeply to decode is shown as its raw string.
"""
from __future__ import annotations

import argparse
import json
import logging
import struct
import sys
from pathlib import Path

if __package__ in (None, ""):
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from library.cli import run_cli
from library.errors import FlagError, ModelFormatError, UserInputError

logger = logging.getLogger(__name__)

# a safetensors file starts with the header length (8 bytes, little endian) and a JSON header of that many bytes
HEADER_LENGTH_BYTES = 8
MAX_HEADER_BYTES = 100 << 20
DEFAULT_MAX_LINES = 20
MAX_LINE_CHARACTERS = 2000  # per shown line without --full; one 20 MB value would otherwise fill the terminal


def setup_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("file", nargs="?", help=".safetensors file to inspect")
    parser.add_argument("--model", help="the same as the positional file (kohya's flag)")
    parser.add_argument("--full", action="store_true", help="do not shorten long values (lines or characters)")
    parser.add_argument("--max_lines", type=int, default=DEFAULT_MAX_LINES,
                        help=f"lines shown of each value without --full; default {DEFAULT_MAX_LINES} (and at most "
                             f"{MAX_LINE_CHARACTERS} characters per line)")
    parser.add_argument("--json", action="store_true", help="print one JSON object (JSON-valued keys decoded)")
    return parser


def read_metadata(path: str | Path) -> dict[str, str]:
    """The `__metadata__` of a safetensors header ({} when the file has none).

    Raises:
        UserInputError: missing file.
        ModelFormatError: a file that is not safetensors (a .ckpt, a truncated download, ...).
    """
    path = Path(path)
    if not path.is_file():
        raise UserInputError(f"{path}: file not found")
    with open(path, "rb") as handle:
        prefix = handle.read(HEADER_LENGTH_BYTES)
        size = struct.unpack("<Q", prefix)[0] if len(prefix) == HEADER_LENGTH_BYTES else 0
        header_bytes = handle.read(size) if 0 < size <= MAX_HEADER_BYTES else b""
    try:
        header = json.loads(header_bytes.decode("utf-8")) if len(header_bytes) == size and size else None
    except (UnicodeDecodeError, json.JSONDecodeError):
        header = None
    if not isinstance(header, dict):
        raise ModelFormatError(path, "is not a safetensors file (no valid header); only .safetensors files carry "
                                     "metadata (.ckpt/.pt files have none)")
    metadata = header.get("__metadata__") or {}
    return {str(key): str(value) for key, value in metadata.items()}


def decoded(value: str) -> object:
    """A JSON object/array value decoded; anything else (numbers, "True", plain text, JSON nested too deeply for
    Python's decoder) stays the string."""
    if value[:1] not in ("{", "["):
        return value
    try:
        return json.loads(value)
    except (json.JSONDecodeError, RecursionError):
        return value


def pretty_json(value: str, sort_keys: bool) -> str | None:
    """The value as indented JSON, or None when it is not a JSON object/array (or too deep to re-encode)."""
    parsed = decoded(value)
    if isinstance(parsed, str):
        return None
    try:
        return json.dumps(parsed, indent=2, ensure_ascii=False, sort_keys=sort_keys)
    except RecursionError:
        return None


def shortened_line(line: str) -> str:
    if len(line) <= MAX_LINE_CHARACTERS:
        return line
    hidden = len(line) - MAX_LINE_CHARACTERS
    return f"{line[:MAX_LINE_CHARACTERS]} ... ({hidden:,} more characters; --full shows all)"


def format_value(value: str, full: bool, max_lines: int) -> list[str]:
    lines = (pretty_json(value, sort_keys=True) or value).splitlines() or [""]
    if full:
        return lines
    shown = [shortened_line(line) for line in lines[:max_lines]]
    if len(lines) > max_lines:
        shown.append(f"... ({len(lines) - max_lines} more lines; --full shows all)")
    return shown


def metadata_lines(path: str | Path, metadata: dict[str, str], full: bool = False,
                   max_lines: int = DEFAULT_MAX_LINES) -> list[str]:
    """The text shown for a file: a heading, then `key: value` in key order, JSON values indented below."""
    if not metadata:
        return [f"{path}: no metadata"]
    lines = [f"{path}: {len(metadata)} metadata keys"]
    for key in sorted(metadata):
        value_lines = format_value(metadata[key], full, max_lines)
        if len(value_lines) == 1:
            lines.append(f"{key}: {value_lines[0]}")
        else:
            lines.append(f"{key}:")
            lines += [f"  {line}" for line in value_lines]
    return lines


def json_document(metadata: dict[str, str]) -> str:
    """One JSON object, keys sorted, JSON values decoded; built per key so a value too deep to re-encode stays
    its string instead of failing the whole document."""
    if not metadata:
        return "{}"
    items = []
    for key in sorted(metadata):
        text = pretty_json(metadata[key], sort_keys=False) or json.dumps(metadata[key], ensure_ascii=False)
        items.append(f"  {json.dumps(key, ensure_ascii=False)}: " + text.replace("\n", "\n  "))
    return "{\n" + ",\n".join(items) + "\n}"


def main(argv: list[str] | None = None) -> dict[str, str]:
    args = setup_parser().parse_args(argv)
    path = args.file or args.model
    if path is None:
        raise FlagError("no file given: pass the .safetensors file (or --model FILE)")
    if args.max_lines < 1:
        raise FlagError(f"--max_lines {args.max_lines}: expected 1 or more")
    metadata = read_metadata(path)
    # printing the metadata is this tool's product, so it goes to stdout rather than the log
    if args.json:
        print(json_document(metadata))
    else:
        print("\n".join(metadata_lines(path, metadata, args.full, args.max_lines)))
    return metadata


if __name__ == "__main__":
    run_cli(main)
