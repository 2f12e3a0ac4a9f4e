"""Tidy the "caption" and "tags" fields of a fine-tuning metadata file (kohya's finetune/clean_captions_and_tags.py).

Rules applied (kohya's anime-specific tag rewrites are not reproduced):
  tags      split at ",", trim each tag, collapse runs of spaces/tabs to one space, drop empty tags,
            drop repeated tags (the first stays), join with ", "
  captions  per line: collapse runs of spaces/tabs to one space, remove spaces before a comma, squeeze ", ," /
            ",," to ", ", trim spaces and commas at both ends; blank lines are dropped
            (duplicate words are kept: captions are sentences, not tag lists)
out_json may be the same file as in_json; it is replaced atomically.
"""
from __future__ import annotations

import argparse
import logging
import re
import sys
from pathlib import Path

from tqdm import tqdm

if __package__ in (None, ""):
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from library.cli import run_cli
from library.data.metadata import load_metadata_dict, write_metadata
from library.errors import UserInputError

logger = logging.getLogger(__name__)

_SPACE_RUN = re.compile(r"[ \t]+")
_COMMA_RUN = re.compile(r",(?:\s*,)+\s*")
_SPACE_BEFORE_COMMA = re.compile(r"\s+,")


def clean_tags(tags: str) -> str:
    """Trimmed, de-duplicated, non-empty tags joined with ", "."""
    kept: list[str] = []
    for tag in tags.replace("\n", ",").split(","):
        tag = _SPACE_RUN.sub(" ", tag).strip()
        if tag and tag not in kept:
            kept.append(tag)
    return ", ".join(kept)


def clean_caption(caption: str) -> str:
    """Whitespace and comma noise removed from each line; blank lines dropped (multi-line = wildcard captions)."""
    lines = []
    for line in caption.split("\n"):
        line = _SPACE_RUN.sub(" ", line)
        line = _COMMA_RUN.sub(", ", _SPACE_BEFORE_COMMA.sub(",", line))
        line = line.strip(" \t,")
        if line:
            lines.append(line)
    return "\n".join(lines)


def setup_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("in_json", help="metadata file to read (from merge_captions_to_metadata.py and friends)")
    parser.add_argument("out_json", help="metadata file to write (may be the same as in_json)")
    parser.add_argument("--debug", action="store_true", help="log every changed field before and after")
    return parser


def clean_entry(key: str, fields: dict, debug: bool) -> bool:
    """Clean one entry in place; True when something changed."""
    changed = False
    for name, cleaner in (("caption", clean_caption), ("tags", clean_tags)):
        before = fields.get(name)
        if not isinstance(before, str):
            continue
        after = cleaner(before)
        if after != before:
            fields[name] = after
            changed = True
            if debug:
                logger.info("%s.%s: %r -> %r", key, name, before, after)
    return changed


def main(argv: list[str] | None = None) -> Path:
    args = setup_parser().parse_args(argv)
    out_json = Path(args.out_json)
    if out_json.is_dir():
        raise UserInputError(f"{out_json}: out_json is a folder; expected a .json file name")
    metadata = load_metadata_dict(args.in_json)
    changed = sum(clean_entry(key, fields, args.debug)
                  for key, fields in tqdm(metadata.items(), desc="cleaning", unit="image"))
    write_metadata(out_json, metadata)
    logger.info("wrote %s: %d of %d entries changed", out_json, changed, len(metadata))
    return out_json


if __name__ == "__main__":
    run_cli(main)
