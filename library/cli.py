"""Entry-point wrapper: logging set-up, and one clear line plus exit code 2 for bad user input."""
from __future__ import annotations

import logging
import os
import sys
from typing import Callable

from library.errors import UserInputError

logger = logging.getLogger(__name__)


def setup_logging(level: str | None = None) -> None:
    """Configure root logging once; `--console_log_level` or SDTK_LOG_LEVEL choose the level."""
    level = (level or os.environ.get("SDTK_LOG_LEVEL") or "INFO").upper()
    root = logging.getLogger()
    if not root.handlers:
        logging.basicConfig(level=level, format="%(asctime)s %(levelname)s %(name)s: %(message)s", datefmt="%H:%M:%S")
    root.setLevel(level)


def _requested_log_level(argv: list[str]) -> str | None:
    for index, arg in enumerate(argv):
        if arg == "--console_log_level" and index + 1 < len(argv):
            return argv[index + 1]
        if arg.startswith("--console_log_level="):
            return arg.split("=", 1)[1]
    return None


def run_cli(main: Callable[[list[str] | None], object], argv: list[str] | None = None) -> None:
    """Run `main(argv)`; a UserInputError becomes `error: <message>` on stderr and exit code 2.

    With `--console_log_level DEBUG` the traceback is logged as well.
    """
    argv = sys.argv[1:] if argv is None else argv
    level = _requested_log_level(argv)
    setup_logging(level)
    try:
        main(argv)
    except UserInputError as error:
        if logging.getLogger().isEnabledFor(logging.DEBUG):
            logger.debug("traceback", exc_info=True)
        print(f"error: {error}", file=sys.stderr)
        sys.exit(2)
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        sys.exit(130)
