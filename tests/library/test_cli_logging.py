"""kohya's logging flags: --console_log_level (also from a --config_file), --console_log_file and
--console_log_simple, observed in the root logger and the log file's lines."""
from __future__ import annotations

import argparse
import logging

import pytest

from library.cli import configure_logging_from_args, setup_logging
from library.config_file import add_config_file_arguments, parse_args_with_config
from library.errors import FlagError
from library.options.training import add_logging_arguments

logger = logging.getLogger("tests.cli_logging")


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser()
    parser.add_argument("--max_train_steps", type=int, default=1)
    add_logging_arguments(parser)
    add_config_file_arguments(parser)
    return parser


@pytest.fixture(autouse=True)
def restore_root_logger():
    root = logging.getLogger()
    level, handlers = root.level, list(root.handlers)
    yield
    for handler in [h for h in root.handlers if h not in handlers]:
        root.removeHandler(handler)
        handler.close()
    root.setLevel(level)


def test_level_and_log_file_from_the_config_file_take_effect(tmp_path):
    log_file = tmp_path / "train.log"
    config = tmp_path / "args.toml"
    config.write_text(f'console_log_level = "debug"\nconsole_log_file = "{log_file.as_posix()}"\nepoch = 3\n')
    logging.getLogger().setLevel(logging.INFO)
    args = parse_args_with_config(_parser(), ["--config_file", str(config)])
    assert args.console_log_level == "DEBUG"
    assert logging.getLogger().level == logging.DEBUG
    logger.debug("a debug line")
    lines = log_file.read_text(encoding="utf-8").splitlines()
    assert any(line.endswith(f"WARNING library.config_file: ignored keys in {config}: epoch (kohya ignores "
                             "unknown keys too; --strict_config makes them errors)") for line in lines), lines
    assert lines[-1].endswith("DEBUG tests.cli_logging: a debug line")


def test_simple_format_writes_the_message_alone_and_a_second_setup_replaces_the_file(tmp_path):
    first, second = tmp_path / "first.log", tmp_path / "second.log"
    configure_logging_from_args(argparse.Namespace(console_log_file=str(first), console_log_simple=True,
                                                   console_log_level="INFO"))
    logger.info("one")
    configure_logging_from_args(argparse.Namespace(console_log_file=str(second), console_log_simple=False,
                                                   console_log_level="INFO"))
    logger.info("two")
    assert first.read_text(encoding="utf-8") == "one\n"
    assert second.read_text(encoding="utf-8").rstrip().endswith("INFO tests.cli_logging: two")


def test_unwritable_log_file_and_unknown_level_are_flag_errors(tmp_path):
    with pytest.raises(FlagError, match=r"^--console_log_file .*missing/x.log: cannot be written"):
        configure_logging_from_args(argparse.Namespace(console_log_file=str(tmp_path / "missing" / "x.log")))
    with pytest.raises(FlagError, match=r"^--console_log_level LOUD: unknown; expected one of DEBUG, INFO"):
        setup_logging("LOUD")
