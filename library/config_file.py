"""`--config_file` (a TOML of training arguments) and `--output_config`, as kohya's read_config_from_file
(COMPAT §11): precedence is command line > TOML > parser defaults. Works with any argparse parser."""
from __future__ import annotations

import argparse
import difflib
import logging
import os
from pathlib import Path
from typing import Any

import toml

from library.errors import ConfigError, FlagError

logger = logging.getLogger(__name__)

# kohya leaves these out of --output_config files (COMPAT §11)
NOT_WRITTEN_KEYS = frozenset({"config_file", "output_config", "wandb_api_key"})


def add_config_file_arguments(parser: argparse.ArgumentParser) -> None:
    """Declare --config_file and --output_config."""
    group = parser.add_argument_group("config file")
    group.add_argument("--config_file", type=str, default=None,
                       help="read arguments from this TOML file (.toml is appended if missing); tables are "
                            "flattened, and flags given on the command line win over the file")
    group.add_argument("--output_config", action="store_true",
                       help="write the arguments that differ from the defaults to --config_file (never "
                            "overwriting it) and exit")


def config_path(config_file: str | os.PathLike) -> Path:
    """kohya appends ".toml" to any name that does not end with it ("cfg" and "cfg.v2" both gain it)."""
    text = os.fspath(config_file)
    return Path(text if text.endswith(".toml") else text + ".toml")


def parse_args_with_config(parser: argparse.ArgumentParser, argv: list[str] | None = None) -> argparse.Namespace:
    """Parse `argv`, filling unset flags from `--config_file`; with `--output_config` write the file and exit 0.

    Raises:
        ConfigError: bad TOML, an unknown key, or a value of the wrong type (the message names file and key).
        FlagError: a missing config file, or --output_config without --config_file.
        SystemExit: 0 after --output_config wrote its file (like argparse's --help).
    """
    args = parser.parse_args(argv)
    config_file = getattr(args, "config_file", None)
    if getattr(args, "output_config", False):
        if not config_file:
            raise FlagError("--output_config: needs --config_file <path> to write to, got none")
        write_output_config(parser, args, config_path(config_file))
        raise SystemExit(0)
    if not config_file:
        return args
    values = load_config_values(parser, config_path(config_file))
    # argparse only fills attributes missing from the namespace, so flags on the command line still win
    return parser.parse_args(argv, namespace=argparse.Namespace(**values))


def write_output_config(parser: argparse.ArgumentParser, args: argparse.Namespace, path: Path) -> None:
    """Write every argument that differs from the parser default to `path`; refuse to overwrite (as kohya)."""
    from library.models.state_dict_io import atomic_output  # imports torch, so not at module level (fast --help)

    if path.exists():
        raise FlagError(f"--output_config: {path} already exists; delete it or choose another --config_file")
    defaults = _effective_defaults(parser)
    values: dict[str, Any] = {}
    for key, value in vars(args).items():
        if key in NOT_WRITTEN_KEYS or (key in defaults and value == defaults[key]):
            continue
        if value is None:
            logger.warning("--output_config: %s is None, which TOML cannot hold; left out", key)
            continue
        values[key] = _toml_value(value)
    with atomic_output(path, overwrite=False) as temp, open(temp, "w", encoding="utf-8") as handle:
        toml.dump(values, handle)
    logger.info("wrote %d arguments to %s", len(values), path)


def _toml_value(value: Any) -> Any:
    if isinstance(value, os.PathLike):
        return os.fspath(value)
    if isinstance(value, (list, tuple)):
        return [_toml_value(item) for item in value]
    return value


def _effective_defaults(parser: argparse.ArgumentParser) -> dict[str, Any]:
    """Defaults as parse_args would store them (argparse converts string defaults with the flag's type)."""
    defaults = {}
    for action in parser._actions:
        if action.dest == argparse.SUPPRESS or action.default == argparse.SUPPRESS:
            continue
        default = action.default
        if isinstance(default, str) and callable(action.type):
            try:
                default = action.type(default)
            except (TypeError, ValueError, argparse.ArgumentTypeError):
                pass
        defaults[action.dest] = default
    return defaults


def load_config_values(parser: argparse.ArgumentParser, path: Path) -> dict[str, Any]:
    """Read the TOML, flatten its tables one level and check each value against the parser's flag."""
    if not path.is_file():
        raise FlagError(f"--config_file {path}: file not found")
    logger.info("loading arguments from %s", path)
    try:
        with open(path, encoding="utf-8") as handle:
            document = toml.load(handle)
    except toml.TomlDecodeError as error:
        raise ConfigError(path, f"line {error.lineno}", "valid TOML", hint=error.msg) from error
    actions = {action.dest: action for action in parser._actions
               if action.dest != argparse.SUPPRESS and action.default != argparse.SUPPRESS}
    values = {}
    for key_path, key, value in _flattened(path, document):
        if key in ("config_file", "output_config"):
            logger.warning("%s: %s is only read from the command line; ignored", path, key_path)
            continue
        action = actions.get(key)
        if action is None:
            raise ConfigError(path, key_path, "an argument of this script (a flag name without --)",
                              hint=_did_you_mean(key, list(actions)))
        values[key] = convert_config_value(action, value, path, key_path)
    return values


def _flattened(path: Path, document: dict[str, Any]) -> list[tuple[str, str, Any]]:
    """(key path for messages, flag name, value); kohya merges every table into one namespace (COMPAT §11)."""
    entries: list[tuple[str, str, Any]] = []
    seen: dict[str, str] = {}
    for name, value in document.items():
        items = [(f"{name}.{key}", key, item) for key, item in value.items()] if isinstance(value, dict) \
            else [(name, name, value)]
        for key_path, key, item in items:
            if key in seen:
                logger.warning("%s: %s overrides %s (the later one wins, as kohya)", path, key_path, seen[key])
            seen[key] = key_path
            entries.append((key_path, key, item))
    return entries


def _did_you_mean(key: str, choices: list[str]) -> str | None:
    matches = difflib.get_close_matches(key, choices, n=1, cutoff=0.6)
    return f"did you mean {matches[0]}?" if matches else "see --help for the arguments"


def convert_config_value(action: argparse.Action, value: Any, path: Path, key_path: str) -> Any:
    """Check a TOML value against an argparse action and convert it the way the command line would."""
    if action.nargs == 0:
        return _switch_value(action, value, path, key_path)
    if _takes_list(action):
        return _list_value(action, value, path, key_path)
    return _scalar_value(action, value, path, key_path)


def _switch_value(action: argparse.Action, value: Any, path: Path, key_path: str) -> Any:
    if isinstance(action.const, bool) and not isinstance(value, bool):
        raise ConfigError(path, key_path, "true or false", got=value)
    if isinstance(action, argparse._CountAction) and (isinstance(value, bool) or not isinstance(value, int)):
        raise ConfigError(path, key_path, "an integer count", got=value)
    return value


def _takes_list(action: argparse.Action) -> bool:
    return action.nargs in ("*", "+") or isinstance(action.nargs, int) or isinstance(action, argparse._AppendAction)


def _list_value(action: argparse.Action, value: Any, path: Path, key_path: str) -> list[Any]:
    if not isinstance(value, list):
        raise ConfigError(path, key_path, "a list", got=value, hint=f"write {key_path.split('.')[-1]} = [{value!r}]")
    if action.nargs == "+" and not value:
        raise ConfigError(path, key_path, "a list with at least one item", got=value)
    if isinstance(action.nargs, int) and len(value) != action.nargs:
        raise ConfigError(path, key_path, f"a list of {action.nargs} items", got=value)
    return [_scalar_value(action, item, path, f"{key_path}[{index}]") for index, item in enumerate(value)]


def _scalar_value(action: argparse.Action, value: Any, path: Path, key_path: str) -> Any:
    converted = _typed_value(action.type, value, path, key_path)
    if action.choices is not None and converted not in action.choices:
        choices = [str(choice) for choice in action.choices]
        close = difflib.get_close_matches(str(converted), choices, n=1)
        hint = f"did you mean {close[0]}?" if close else None
        raise ConfigError(path, key_path, f"one of {', '.join(choices)}", got=value, hint=hint)
    return converted


def _typed_value(value_type: Any, value: Any, path: Path, key_path: str) -> Any:
    if value_type is None or value_type is str:
        if not isinstance(value, str):
            raise ConfigError(path, key_path, "a string", got=value, hint=f'quote it: "{value}"')
        return value
    if value_type is int:
        if isinstance(value, bool) or not isinstance(value, int):
            raise ConfigError(path, key_path, "an integer", got=value)
        return value
    if value_type is float:
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise ConfigError(path, key_path, "a number", got=value)
        return float(value)
    if isinstance(value, (bool, list, dict)):
        raise ConfigError(path, key_path, f"a value for {getattr(value_type, '__name__', value_type)}", got=value)
    try:
        # custom types (e.g. steps_or_ratio) parse command-line text, so give them the text form of the value
        return value_type(value if isinstance(value, str) else str(value))
    except (TypeError, ValueError, argparse.ArgumentTypeError) as error:
        raise ConfigError(path, key_path, f"a value for {getattr(value_type, '__name__', value_type)}", got=value,
                          hint=str(error)) from error
