"""Reading the user's text files (prompt lists, dataset configs): UTF-8 with or without a BOM, and a clear
error for anything else (Windows Notepad's "Unicode" is UTF-16)."""
from __future__ import annotations

from pathlib import Path

from library.errors import FlagError

UTF16_BOMS = (b"\xff\xfe", b"\xfe\xff")  # what Windows Notepad's "Unicode" writes


def read_utf8_text(path: Path, flag: str) -> str:
    """The text of a file named by `flag`; UTF-8, with or without a byte-order mark (utf-8-sig drops it).

    Raises:
        FlagError: the file cannot be read or is not UTF-8 (names the flag, the file and how to fix it).
    """
    try:
        data = path.read_bytes()
    except OSError as error:
        raise FlagError(f"{flag} {path}: cannot read the file: {error.strerror or error}") from None
    try:
        text = data.decode("utf-8-sig")
    except UnicodeDecodeError as error:
        found = "UTF-16 text" if data.startswith(UTF16_BOMS) else f"byte 0x{data[error.start]:02x} at offset " \
            f"{error.start}, which is not UTF-8"
        raise FlagError(f"{flag} {path}: expected UTF-8 text, got {found}; save the file as UTF-8") from None
    if "\x00" in text:
        # UTF-16 without a byte-order mark decodes as "UTF-8" with a NUL after every ASCII letter
        raise FlagError(f"{flag} {path}: expected UTF-8 text, got NUL bytes (UTF-16 text?); save the file as UTF-8")
    return text
