"""Running a script's `main` as its command line does, for tests of bad input; collecting log records."""
from __future__ import annotations

import contextlib
import logging

import pytest

from library.cli import run_cli


def run_error(main, argv: list[str], capsys) -> str:
    """Run `main(argv)` through `run_cli`; assert exit code 2 and return the error line: `error: ...` from our
    checks, `<prog>: error: ...` after argparse's usage line. Progress bars may have written to stderr before."""
    with pytest.raises(SystemExit) as exit_info:
        run_cli(main, argv)
    assert exit_info.value.code == 2
    lines = [line for line in capsys.readouterr().err.strip().splitlines() if line.strip()]
    assert lines and "error: " in lines[-1], lines
    return lines[-1]


@contextlib.contextmanager
def captured_logs():
    """Every log record (INFO and up) while the block runs: caplog is per test, while shared training runs are
    per module."""
    records: list[logging.LogRecord] = []

    class Collect(logging.Handler):
        def emit(self, record):
            records.append(record)

    root = logging.getLogger()
    handler, level = Collect(logging.INFO), root.level
    root.addHandler(handler)
    root.setLevel(logging.INFO)
    try:
        yield records
    finally:
        root.removeHandler(handler)
        root.setLevel(level)
