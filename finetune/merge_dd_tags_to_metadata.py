"""Collect tagger output files into a fine-tuning metadata JSON (kohya's finetune/merge_dd_tags_to_metadata.py).

Each image's `<stem><caption_extension>` text (default `.txt`, as written by taggers) becomes its "tags"; keys
are file stems, or paths with `--full_path`. An existing `--in_json` (or `out_json` itself) is updated.
"""
from __future__ import annotations

import argparse
import logging
import sys
from pathlib import Path

if __package__ in (None, ""):
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from finetune.merge_captions_to_metadata import add_merge_arguments, merge_side_files
from library.cli import run_cli

logger = logging.getLogger(__name__)


def setup_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__)
    add_merge_arguments(parser, ".txt", "tags")
    return parser


def main(argv: list[str] | None = None) -> Path:
    args = setup_parser().parse_args(argv)
    return merge_side_files(args, "tags")


if __name__ == "__main__":
    run_cli(main)
