"""Sample-prompt files (`--sample_prompts`): kohya's .txt option syntax, .toml and .json forms (COMPAT §12).

Only parsing and checking live here; generating the images is `library.sampling.pipeline`.
"""
from __future__ import annotations

import difflib
import json
import logging
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from library.errors import ConfigError, FlagError
from library.sampling.samplers import SAMPLER_NAMES
from library.text_files import read_utf8_text

logger = logging.getLogger(__name__)

MIN_SIZE = 64
SIZE_MULTIPLE = 8
MAX_STEPS = 1000
PROMPT_SUFFIXES = (".txt", ".toml", ".json")
# Options kohya's training samplers know but that only its DiT scripts use (guidance, CFG truncation, renorm CFG,
# flow shift): accepted and ignored here, with a note.
DIT_ONLY_OPTIONS = ("g", "ctr", "rcfg", "fs")


@dataclass
class SamplePrompt:
    """One sample image request. None means "use the default" (size: the trainer's, seed: random,
    sampler: --sample_sampler). `index` is the prompt's position in its file; `source` is "file:line"."""

    prompt: str
    negative_prompt: str = ""
    width: int | None = None
    height: int | None = None
    seed: int | None = None
    steps: int = 30
    scale: float = 7.5
    sampler: str | None = None
    controlnet_image: str | None = None
    index: int = 0
    source: str = ""


def floor_size(pixels: int) -> int:
    """kohya floors sample sizes to a multiple of 8, at least 64 (train_util.py: sample_image_inference)."""
    return max(MIN_SIZE, pixels - pixels % SIZE_MULTIPLE)


def clamp_steps(steps: int) -> int:
    """kohya clamps `--s` to 1..1000 (train_util.py: line_to_prompt_dict)."""
    return max(1, min(MAX_STEPS, steps))


class OptionValueError(ValueError):
    """Raised by an option parser whose message needs more than "expected X, got 'text'": `got` replaces the raw
    text in the message and `hint` (e.g. the nearest valid value) is appended."""

    def __init__(self, got: Any, hint: str | None = None):
        super().__init__(got)
        self.got, self.hint = got, hint


@dataclass(frozen=True)
class LineOption:
    """One " --name value" option of a prompt line: the field it sets, the parser of its text (raises ValueError),
    what the user should have written, and optionally a hint for a bad value (e.g. the nearest valid name)."""

    field: str
    parse: Callable[[str], Any]
    expected: str
    hint: Callable[[str], str | None] | None = None


def split_prompt_line(line: str) -> tuple[str, list[tuple[str, str]]]:
    """The prompt text and its (lower-case option name, raw value) pairs; kohya splits on " --" and matches names
    case-insensitively (COMPAT §12)."""
    text, *options = line.strip().split(" --")
    pairs = []
    for option in options:
        name, _, raw_value = option.strip().partition(" ")
        pairs.append((name.lower(), raw_value))
    return text.strip(), pairs


def parse_line_options(line: str, source: str, known: dict[str, LineOption],
                       on_unknown: Callable[[str, str], None]) -> tuple[str, dict[str, Any]]:
    """The prompt text and {field: parsed value} of one prompt line; `on_unknown(source, name)` decides what an
    option not in `known` does (warn or raise).

    Raises:
        ConfigError: a value its option cannot take (names `source`, the option and what was expected).
    """
    text, pairs = split_prompt_line(line)
    values: dict[str, Any] = {}
    for name, raw_value in pairs:
        option = known.get(name)
        if option is None:
            on_unknown(source, name)
            continue
        try:
            values[option.field] = option.parse(raw_value)
        except OptionValueError as error:
            raise ConfigError(source, f"--{name}", option.expected, got=error.got, hint=error.hint) from None
        except ValueError:
            hint = option.hint(raw_value) if option.hint else None
            raise ConfigError(source, f"--{name}", option.expected, got=raw_value.strip(), hint=hint) from None
    return text, values


def whole_number(text: str) -> int:
    """The integer a prompt option holds (ValueError if it is not one)."""
    return int(text.strip())


def seed_number(text: str) -> int:
    """A seed >= 0 (ValueError otherwise)."""
    seed = int(text.strip())
    if seed < 0:
        raise ValueError(text)
    return seed


def sampler_name(text: str) -> str:
    """A sampler name in SAMPLER_NAMES, lower-cased (ValueError otherwise)."""
    name = text.strip().lower()
    if name not in SAMPLER_NAMES:
        raise ValueError(name)
    return name


def nearest_sampler_hint(name: str) -> str | None:
    """"did you mean X?" for the nearest sampler name, if any is near."""
    nearest = difflib.get_close_matches(name.strip().lower(), SAMPLER_NAMES, n=1)
    return f"did you mean {nearest[0]}?" if nearest else None


SAMPLER_EXPECTED = "one of " + ", ".join(SAMPLER_NAMES)

_LINE_OPTIONS: dict[str, LineOption] = {
    "n": LineOption("negative_prompt", str.strip, "a negative prompt"),
    "w": LineOption("width", whole_number, "a whole number of pixels"),
    "h": LineOption("height", whole_number, "a whole number of pixels"),
    "d": LineOption("seed", seed_number, "a whole-number seed >= 0"),
    "s": LineOption("steps", whole_number, "a whole number of steps"),
    "l": LineOption("scale", float, "a number (CFG scale)"),
    "ss": LineOption("sampler", sampler_name, SAMPLER_EXPECTED, nearest_sampler_hint),
    "cn": LineOption("controlnet_image", str.strip, "an image path"),
}


def parse_prompt_line(line: str, source: str = "") -> SamplePrompt:
    """Parse one kohya prompt line: the prompt, then options separated by " --" (case-insensitive names).
    Unknown options are ignored with a warning, as kohya's trainer does.

    Raises:
        ConfigError: an option value that is not what the option takes (names `source`, the option and why).
    """
    text, values = parse_line_options(line, source, _LINE_OPTIONS, _warn_unknown_option)
    return _checked_prompt(text, values, source)


def _warn_unknown_option(source: str, name: str) -> None:
    if name in DIT_ONLY_OPTIONS:
        logger.warning("%s: option --%s is used by kohya's DiT scripts only; ignored", source, name)
        return
    nearest = difflib.get_close_matches(name, list(_LINE_OPTIONS), n=1)
    hint = f" (did you mean --{nearest[0]}?)" if nearest else ""
    logger.warning("%s: unknown prompt option --%s ignored%s", source, name, hint)


def _checked_prompt(text: str, values: dict[str, Any], source: str) -> SamplePrompt:
    """A SamplePrompt with kohya's size flooring and step clamping applied."""
    for size_field in ("width", "height"):
        if values.get(size_field) is not None:
            values[size_field] = floor_size(values[size_field])
    if values.get("steps") is not None:
        values["steps"] = clamp_steps(values["steps"])
    values = {key: value for key, value in values.items() if value is not None}
    return SamplePrompt(prompt=text, source=source, **values)


def _is_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _is_number(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


# kohya's .toml/.json keys -> (SamplePrompt field, check, what the user should have written)
_DICT_KEYS: dict[str, tuple[str, Callable[[Any], bool], str]] = {
    "prompt": ("prompt", lambda value: isinstance(value, str), "a string"),
    "negative_prompt": ("negative_prompt", lambda value: isinstance(value, str), "a string"),
    "width": ("width", _is_int, "a whole number of pixels"),
    "height": ("height", _is_int, "a whole number of pixels"),
    "seed": ("seed", lambda value: _is_int(value) and value >= 0, "a whole-number seed >= 0"),
    "sample_steps": ("steps", _is_int, "a whole number of steps"),
    "scale": ("scale", _is_number, "a number (CFG scale)"),
    "sample_sampler": ("sampler", lambda value: isinstance(value, str) and value.lower() in SAMPLER_NAMES,
                       SAMPLER_EXPECTED),
    "controlnet_image": ("controlnet_image", lambda value: isinstance(value, str), "an image path"),
}


def prompt_from_dict(entry: dict[str, Any], file: str, where: str, key_paths: dict[str, str]) -> SamplePrompt:
    """A SamplePrompt from one kohya prompt table found at `where` in `file`; `key_paths` names where each key
    was written (a [prompt] default or the subset itself), for the error messages."""
    values: dict[str, Any] = {}
    for key, value in entry.items():
        key_path = key_paths.get(key, key)
        if key not in _DICT_KEYS:
            nearest = difflib.get_close_matches(key, list(_DICT_KEYS), n=1, cutoff=0.5)
            hint = f" (did you mean {nearest[0]}?)" if nearest else ""
            logger.warning("%s: %s: unknown sample prompt key ignored%s", file, key_path, hint)
            continue
        field_name, is_valid, expected = _DICT_KEYS[key]
        if not is_valid(value):
            hint = nearest_sampler_hint(value) if key == "sample_sampler" and isinstance(value, str) else None
            raise ConfigError(file, key_path, expected, got=value, hint=hint)
        values[field_name] = value.lower() if key == "sample_sampler" else value
    if "prompt" not in values:
        raise ConfigError(file, f"{where}.prompt", "a prompt string",
                          hint="every sample prompt table needs a prompt key")
    if "scale" in values:
        values["scale"] = float(values["scale"])
    text = values.pop("prompt")
    return _checked_prompt(text, values, f"{file}:{where}")


def load_sample_prompts(path: str | Path) -> list[SamplePrompt]:
    """Read a `--sample_prompts` file (.txt, .toml or .json); each prompt's `index` is its position.

    Raises:
        FlagError: the file is missing, has another extension or is not UTF-8.
        ConfigError: a value in the file is wrong (names the file and the line or key).
    """
    path = Path(path)
    suffix = path.suffix.lower()
    if suffix not in PROMPT_SUFFIXES:
        raise FlagError(f"--sample_prompts {path}: expected a .txt, .toml or .json file, got {suffix or 'no suffix'!r}")
    if not path.is_file():
        raise FlagError(f"--sample_prompts {path}: file not found")
    readers = {".txt": _read_txt, ".toml": _read_toml, ".json": _read_json}
    prompts = readers[suffix](path)
    for index, prompt in enumerate(prompts):
        prompt.index = index
    if not prompts:
        logger.warning("%s: no sample prompts found; no sample images will be made", path)
    return prompts


def _read_txt(path: Path) -> list[SamplePrompt]:
    prompts = []
    for number, line in enumerate(read_utf8_text(path, "--sample_prompts").splitlines(), start=1):
        stripped = line.strip()
        if stripped and not stripped.startswith("#"):
            prompts.append(parse_prompt_line(stripped, f"{path}:{number}"))
    return prompts


def _read_toml(path: Path) -> list[SamplePrompt]:
    import toml

    try:
        document = toml.loads(read_utf8_text(path, "--sample_prompts"))
    except toml.TomlDecodeError as error:
        raise ConfigError(path, f"line {error.lineno}", "valid TOML", hint=error.msg) from None
    table = document.get("prompt")
    if not isinstance(table, dict):
        raise ConfigError(path, "prompt", "a [prompt] table with [[prompt.subset]] entries", got=table)
    subsets = table.get("subset")
    if subsets is None:
        raise ConfigError(path, "prompt.subset", "at least one [[prompt.subset]] table",
                          hint='add one per image: [[prompt.subset]] with prompt = "..."')
    if not isinstance(subsets, list) or not all(isinstance(subset, dict) for subset in subsets):
        raise ConfigError(path, "prompt.subset", "a list of [[prompt.subset]] tables", got=subsets)
    defaults = {key: value for key, value in table.items() if key != "subset"}
    prompts = []
    for index, subset in enumerate(subsets):
        where = f"prompt.subset[{index}]"
        # kohya merges with dict(**defaults, **subset), which raises on a repeated key; we let the subset
        # override the default instead (COMPAT §18.9).
        key_paths = {key: f"prompt.{key}" for key in defaults} | {key: f"{where}.{key}" for key in subset}
        prompts.append(prompt_from_dict(defaults | subset, str(path), where, key_paths))
    return prompts


def _read_json(path: Path) -> list[SamplePrompt]:
    try:
        entries = json.loads(read_utf8_text(path, "--sample_prompts"))
    except json.JSONDecodeError as error:
        raise ConfigError(path, f"line {error.lineno}", "valid JSON", hint=error.msg) from None
    if not isinstance(entries, list):
        raise ConfigError(path, "(top level)", "a list of prompt strings or objects", got=type(entries).__name__)
    prompts = []
    for index, entry in enumerate(entries):
        where = f"[{index}]"
        if isinstance(entry, str):
            prompts.append(parse_prompt_line(entry, f"{path}:{where}"))
        elif isinstance(entry, dict):
            prompts.append(prompt_from_dict(entry, str(path), where, {key: f"{where}.{key}" for key in entry}))
        else:
            raise ConfigError(path, where, "a prompt string or object", got=entry)
    return prompts
