"""`--overwrite` for the tools that write one model or LoRA output, and the check that an existing output is refused
without it. Training runs use `--overwrite_output` (library/options/training.py), not this."""
from __future__ import annotations

import argparse
import os
from pathlib import Path

from library.errors import FlagError


def add_overwrite_argument(parser: argparse.ArgumentParser | argparse._ArgumentGroup) -> None:
    parser.add_argument("--overwrite", action="store_true",
                        help="replace an existing output file or folder (without it an existing output is refused "
                             "and left untouched)")


def refuse_existing_output(path: str | os.PathLike, overwrite: bool, flag: str) -> None:
    """Call before any model is read, so the user learns at once; the writer gets `overwrite` too.

    Raises:
        FlagError: `path` exists (a file, a folder or a link) and `overwrite` is False.
    """
    output = Path(path)
    if overwrite or not (output.exists() or output.is_symlink()):
        return
    raise FlagError(f"{flag} {path}: already exists; pass --overwrite to replace it (or choose another {flag})")
