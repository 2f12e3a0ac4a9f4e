"""Checks that an output folder can take what a run will write, made before any model loads (a folder that is
a file, read-only or too full would otherwise be found at the first save, after the work is done)."""
from __future__ import annotations

import logging
import os
import shutil
from pathlib import Path

from library.errors import FlagError
from library.models.state_dict_io import format_size, new_temp_folder

logger = logging.getLogger(__name__)


def nearest_existing(folder: Path) -> Path:
    """`folder` or its closest existing ancestor (where a missing folder would be created)."""
    folder = Path(os.path.abspath(folder))
    while not folder.exists() and folder.parent != folder:
        folder = folder.parent
    return folder


def check_writable_folder(folder: str | os.PathLike, flag: str) -> None:
    """`folder` is a folder we can create and write in; raises FlagError naming `flag` otherwise.

    Writing is tried (a folder made and removed again): permission bits say nothing for root or read-only mounts.
    """
    folder = Path(folder)
    if folder.exists() and not folder.is_dir():
        raise FlagError(f"{flag} {folder}: is a file; expected a folder (or a path where one can be created)")
    existing = nearest_existing(folder)
    if not existing.is_dir():
        raise FlagError(f"{flag} {folder}: cannot be created because {existing} is a file")
    try:
        os.rmdir(new_temp_folder(existing / "write-check"))
    except OSError as error:
        reason = error.strerror or str(error)
        raise FlagError(f"{flag} {folder}: cannot write in {existing} ({reason}); choose a folder you can write "
                        "to") from None


def check_free_space(folder: str | os.PathLike, *, minimum: int, planned: int, flag: str, minimum_what: str,
                     planned_what: str) -> None:
    """Refuse when less than `minimum` bytes are free where `folder` is (the run cannot finish); warn when less
    than `planned` are (the saves the flags ask for may not all fit)."""
    existing = nearest_existing(Path(folder))
    try:
        free = shutil.disk_usage(existing).free
    except OSError:
        return
    if free < minimum:
        raise FlagError(f"{flag} {folder}: only {format_size(free)} free there, but {minimum_what} needs about "
                        f"{format_size(minimum)}; free some space or choose another {flag}")
    if free < planned:
        logger.warning("%s %s: %s free there, but %s need about %s; later saves may fail for lack of space",
                       flag, folder, format_size(free), planned_what, format_size(planned))
