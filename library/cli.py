"""Entry-point wrapper: logging set-up (kohya's --console_log_level/_file/_simple), and one clear line plus exit
code 2 for bad user input."""
from __future__ import annotations

import argparse
import logging
import os
import sys
from typing import Callable

from library.errors import FlagError, UserInputError

logger = logging.getLogger(__name__)

LOG_FORMAT = "%(asctime)s %(levelname)s %(name)s: %(message)s"
SIMPLE_LOG_FORMAT = "%(message)s"  # kohya's --console_log_simple: the message alone
LOG_LEVELS = ("DEBUG", "INFO", "WARNING", "ERROR", "CRITICAL")
_HANDLER_ROLE = "_sdtk_role"  # marks the handlers made here, so a second set-up replaces them, not others


def setup_logging(level: str | None = None) -> None:
    """Configure root logging once; `--console_log_level` or SDTK_LOG_LEVEL choose the level."""
    level = _checked_level(level or os.environ.get("SDTK_LOG_LEVEL") or "INFO")
    root = logging.getLogger()
    if not root.handlers:
        logging.basicConfig(level=level, format=LOG_FORMAT, datefmt="%H:%M:%S")
        setattr(root.handlers[0], _HANDLER_ROLE, "console")
    root.setLevel(level)


def configure_logging_from_args(args: argparse.Namespace) -> None:
    """Apply the parsed logging flags, wherever they came from (the command line or a --config_file):
    `console_log_level`, `console_log_simple` (plain message lines) and `console_log_file` (log lines also go to
    that file, overwritten as kohya does). Namespaces without these flags change nothing.

    Raises:
        FlagError: an unknown level, or a log file that cannot be opened.
    """
    level, log_file = getattr(args, "console_log_level", None), getattr(args, "console_log_file", None)
    simple = bool(getattr(args, "console_log_simple", False))
    root = logging.getLogger()
    if level:
        root.setLevel(_checked_level(level))
    if simple:
        for handler in root.handlers:
            if getattr(handler, _HANDLER_ROLE, None) == "console":
                handler.setFormatter(logging.Formatter(SIMPLE_LOG_FORMAT))
    for handler in [h for h in root.handlers if getattr(h, _HANDLER_ROLE, None) == "file"]:
        root.removeHandler(handler)
        handler.close()
    if log_file:
        try:
            handler = logging.FileHandler(log_file, mode="w", encoding="utf-8")
        except OSError as error:
            raise FlagError(f"--console_log_file {log_file}: cannot be written ({error.strerror or error})") from error
        handler.setFormatter(logging.Formatter(SIMPLE_LOG_FORMAT if simple else LOG_FORMAT, datefmt="%H:%M:%S"))
        setattr(handler, _HANDLER_ROLE, "file")
        root.addHandler(handler)


def _checked_level(level: str) -> str:
    name = str(level).upper()
    if name not in LOG_LEVELS:
        raise FlagError(f"--console_log_level {level}: unknown; expected one of {', '.join(LOG_LEVELS)}")
    return name


def _requested_log_level(argv: list[str]) -> str | None:
    for index, arg in enumerate(argv):
        if arg == "--console_log_level" and index + 1 < len(argv):
            return argv[index + 1]
        if arg.startswith("--console_log_level="):
            return arg.split("=", 1)[1]
    return None


def run_cli(main: Callable[[list[str] | None], object], argv: list[str] | None = None) -> None:
    """Run `main(argv)`; a UserInputError becomes `error: <message>` on stderr and exit code 2.

    With `--console_log_level DEBUG` (on the command line or in a --config_file) the traceback is logged as well.
    """
    argv = sys.argv[1:] if argv is None else argv
    try:
        setup_logging(_requested_log_level(argv))
        main(argv)
    except UserInputError as error:
        if logging.getLogger().isEnabledFor(logging.DEBUG):
            logger.debug("traceback", exc_info=True)
        print(f"error: {error}", file=sys.stderr)
        sys.exit(2)
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        sys.exit(130)
