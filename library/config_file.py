"""`--config_file` (a TOML of training arguments) and `--output_config`, as kohya's read_config_from_file
(COMPAT §11): precedence is command line > TOML > parser defaults. Works with any argparse parser. Unknown keys
are ignored with one warning, as kohya ignores them (`--strict_config` makes them errors)."""
from __future__ import annotations

import argparse
import difflib
import logging
import os
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import toml

from library.cli import configure_logging_from_args
from library.errors import ConfigError, FlagError
from library.options.other_families import OTHER_FAMILY_FLAGS, other_family_message

logger = logging.getLogger(__name__)

# kohya leaves the first three out of --output_config files (COMPAT §11); the Hub token is a secret too
NOT_WRITTEN_KEYS = frozenset({"config_file", "output_config", "wandb_api_key", "huggingface_token"})
COMMAND_LINE_ONLY_KEYS = ("config_file", "output_config")


@dataclass
class LoadedConfig:
    """The values of a --config_file that set flags, and the keys it ignored (with the reason or nearest flag)."""

    values: dict[str, Any] = field(default_factory=dict)
    ignored: list[str] = field(default_factory=list)


def add_config_file_arguments(parser: argparse.ArgumentParser) -> None:
    """Declare --config_file and --output_config."""
    group = parser.add_argument_group("config file")
    group.add_argument("--config_file", type=str, default=None,
                       help="read arguments from this TOML file (.toml is appended if missing); tables are "
                            "flattened, and flags given on the command line win over the file")
    group.add_argument("--output_config", action="store_true",
                       help="write the arguments that differ from the defaults to --config_file (never "
                            "overwriting it) and exit")
    group.add_argument("--strict_config", action="store_true",
                       help="make unknown keys in --config_file errors (default: ignored with one warning that "
                            "lists them, as kohya ignores them)")


def config_path(config_file: str | os.PathLike) -> Path:
    """kohya appends ".toml" to any name that does not end with it ("cfg" and "cfg.v2" both gain it)."""
    text = os.fspath(config_file)
    return Path(text if text.endswith(".toml") else text + ".toml")


def parse_args_with_config(parser: argparse.ArgumentParser, argv: list[str] | None = None) -> argparse.Namespace:
    """Parse `argv`, filling unset flags from `--config_file`; with `--output_config` write the file and exit 0.
    The logging flags (`--console_log_level/_file/_simple`, from either source) are applied before returning.

    Raises:
        ConfigError: bad TOML, a value of the wrong type, or (with --strict_config) an unknown key; the message
            names file and key.
        FlagError: a missing config file, --output_config without --config_file, or a flag of another model
            family's trainer (FLUX/SD3).
        SystemExit: 0 after --output_config wrote its file (like argparse's --help).
    """
    check_other_family_flags(parser, sys.argv[1:] if argv is None else argv)
    args = parser.parse_args(argv)
    config_file = getattr(args, "config_file", None)
    if getattr(args, "output_config", False):
        if not config_file:
            raise FlagError("--output_config: needs --config_file <path> to write to, got none")
        write_output_config(parser, args, config_path(config_file))
        raise SystemExit(0)
    if not config_file:
        configure_logging_from_args(args)
        return args
    path = config_path(config_file)
    loaded = load_config_values(parser, path, strict=bool(getattr(args, "strict_config", False)))
    # argparse only fills attributes missing from the namespace, so flags on the command line still win
    args = parser.parse_args(argv, namespace=argparse.Namespace(**loaded.values))
    configure_logging_from_args(args)  # first, so the warning below also reaches --console_log_file
    if loaded.ignored:
        logger.warning("ignored keys in %s: %s (kohya ignores unknown keys too; --strict_config makes them errors)",
                       path, ", ".join(loaded.ignored))
    return args


def check_other_family_flags(parser: argparse.ArgumentParser, argv: list[str]) -> None:
    """A FLUX/SD3 flag on the command line is one line saying where it belongs (before argparse's generic
    "unrecognized arguments")."""
    known = set(parser._option_string_actions)
    for token in argv:
        if token == "--":
            break
        name = token[2:].split("=", 1)[0] if token.startswith("--") else ""
        if name in OTHER_FAMILY_FLAGS and f"--{name}" not in known:
            raise FlagError(other_family_message(name))


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


def load_config_values(parser: argparse.ArgumentParser, path: Path, strict: bool = False) -> LoadedConfig:
    """Read the TOML, flatten its tables one level and check each value against the parser's flag.

    Keys that are no flag of this parser are collected in `ignored` (kohya ignores them), or with `strict`
    (`--strict_config`, also honoured as a key of the file) raise a ConfigError naming the nearest flag.
    """
    if not path.is_file():
        raise FlagError(f"--config_file {path}: file not found")
    logger.info("loading arguments from %s", path)
    try:
        with open(path, encoding="utf-8") as handle:
            document = toml.load(handle)
    except toml.TomlDecodeError as error:
        raise ConfigError(path, f"line {error.lineno}", "valid TOML", hint=error.msg) from error
    actions = _actions_by_key(parser)
    entries = _flattened(path, document)
    strict = strict or any(key == "strict_config" and value in (True, 1) for _, key, value in entries)
    loaded = LoadedConfig()
    for key_path, key, value in entries:
        action = actions.get(key)
        if action is None or key in COMMAND_LINE_ONLY_KEYS:
            loaded.ignored.append(_ignored_key(path, key_path, key, list(actions), strict))
            continue
        if _means_not_set(action, value):
            continue  # kohya_ss writes false / "" for options left empty: the parser default applies
        loaded.values[action.dest] = convert_config_value(action, value, path, key_path)
    return loaded


def _actions_by_key(parser: argparse.ArgumentParser) -> dict[str, argparse.Action]:
    """Keys a config may use: each flag's destination and its option names without `--` (old spellings such as
    caption_extention reach their flag's destination)."""
    actions: dict[str, argparse.Action] = {}
    for action in parser._actions:
        if action.dest == argparse.SUPPRESS or isinstance(action, (argparse._HelpAction, argparse._VersionAction)):
            continue
        if action.default != argparse.SUPPRESS:
            actions[action.dest] = action
        for option in action.option_strings:
            if option.startswith("--"):
                actions.setdefault(option[2:], action)
    return actions


def _ignored_key(path: Path, key_path: str, key: str, choices: list[str], strict: bool) -> str:
    """The entry of the ignored-keys warning for `key`; raises instead under --strict_config."""
    if key in COMMAND_LINE_ONLY_KEYS:
        reason = "only read from the command line"
    elif key in OTHER_FAMILY_FLAGS:
        reason = f"a {OTHER_FAMILY_FLAGS[key]} option"
    else:
        close = difflib.get_close_matches(key, choices, n=1, cutoff=0.6)
        reason = f"did you mean {close[0]}?" if close else None
    if strict and key not in COMMAND_LINE_ONLY_KEYS:
        hint = other_family_message(key) if key in OTHER_FAMILY_FLAGS else (reason or "see --help for the arguments")
        raise ConfigError(path, key_path, "an argument of this script (a flag name without --)", hint=hint)
    return f"{key_path} ({reason})" if reason else key_path


def _means_not_set(action: argparse.Action, value: Any) -> bool:
    """false, an empty string or an empty list for a flag that takes a value means "not given" (kohya_ss writes
    `resume = false`, `vae = ""`); for a path that must not become a file named "False"."""
    if action.nargs == 0:
        return False
    if value is False or value is None or (isinstance(value, str) and not value):
        return True
    return isinstance(value, list) and not value and action.nargs != "*"  # `optimizer_args = []` is a value


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


def convert_config_value(action: argparse.Action, value: Any, path: Path, key_path: str) -> Any:
    """Check a TOML value against an argparse action and convert it the way the command line would."""
    if action.nargs == 0:
        return _switch_value(action, value, path, key_path)
    if _takes_list(action):
        return _list_value(action, value, path, key_path)
    return _scalar_value(action, value, path, key_path)


def _switch_value(action: argparse.Action, value: Any, path: Path, key_path: str) -> Any:
    if isinstance(action.const, bool):
        if isinstance(value, int) and not isinstance(value, bool) and value in (0, 1):
            return bool(value)  # kohya_ss writes 1 / 0 for some switches (persistent_data_loader_workers = 1)
        if not isinstance(value, bool):
            raise ConfigError(path, key_path, "true or false (or 1 / 0)", got=value)
    if isinstance(action, argparse._CountAction) and (isinstance(value, bool) or not isinstance(value, int)):
        raise ConfigError(path, key_path, "an integer count", got=value)
    return value


def _takes_list(action: argparse.Action) -> bool:
    return action.nargs in ("*", "+") or isinstance(action.nargs, int) or isinstance(action, argparse._AppendAction)


def _list_value(action: argparse.Action, value: Any, path: Path, key_path: str) -> list[Any]:
    if isinstance(value, dict):
        raise ConfigError(path, key_path, "a list", got=value)
    if not isinstance(value, list):
        if isinstance(action.nargs, int) and action.nargs != 1:
            raise ConfigError(path, key_path, f"a list of {action.nargs} items", got=value)
        value = [value]  # a single value for a multi-value flag (text_encoder_lr = 5e-05) is a one-item list
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
