"""Generator prompt lines (gen_img.py's " --option value" superset, COMPAT §12), `--from_file` prompt files,
dynamic-prompt wildcards and kohya's seed rules for generated images.
"""
from __future__ import annotations

import difflib
import itertools
import logging
import random
import re
from dataclasses import dataclass
from pathlib import Path

from library.errors import ConfigError, FlagError
from library.sampling.prompts import (
    MIN_SIZE,
    SAMPLER_EXPECTED,
    SIZE_MULTIPLE,
    LineOption,
    OptionValueError,
    clamp_steps,
    nearest_sampler_hint,
    parse_line_options,
    sampler_name,
    seed_number,
    whole_number,
)
from library.text_files import read_utf8_text

logger = logging.getLogger(__name__)

# kohya draws its seeds with random.randint(0, 0x7FFFFFFF) (gen_img.py).
MAX_RANDOM_SEED = 0x7FFFFFFF
# Options kohya's generator knows that we do not implement: Deep Shrink and Gradual Latent (COMPAT §12).
IGNORED_OPTIONS = ("dsd1", "dst1", "dsd2", "dst2", "dsr", "glt", "glr", "gls", "gle", "glsn", "glus")
# Options kohya's generator knows that cannot work here: refused, so no image is made without what was asked for.
REFUSED_OPTIONS = {
    "c": "CLIP guidance is not supported (kohya's --c prompt guides with a separate CLIP model, which this tool "
         "does not load); remove --c",
}
# `--nl none`: no negative scale for this prompt, even with the command line's --negative_scale (kohya).
NEGATIVE_SCALE_OFF = "none"
_warned_ignored_options: set[str] = set()


@dataclass
class PromptOptions:
    """What one prompt line sets; None means "use the command-line default". `source` is "file:line".

    `negative_scale_off` is `--nl none`: no negative scale even if `--negative_scale` is given. The
    `*_negative` crop/target fields have no prompt option (kohya has none); they come from `--from_png`.
    """

    prompt: str
    negative_prompt: str | None = None
    width: int | None = None
    height: int | None = None
    steps: int | None = None
    seeds: list[int] | None = None
    scale: float | None = None
    negative_scale: float | None = None
    negative_scale_off: bool = False
    strength: float | None = None
    network_multipliers: list[float] | None = None
    original_width: int | None = None
    original_height: int | None = None
    original_width_negative: int | None = None
    original_height_negative: int | None = None
    crop_top: int | None = None
    crop_left: int | None = None
    target_width: int | None = None
    target_height: int | None = None
    crop_top_negative: int | None = None
    crop_left_negative: int | None = None
    target_width_negative: int | None = None
    target_height_negative: int | None = None
    sampler: str | None = None
    guidance_rescale: float | None = None
    file_name: str | None = None
    source: str = ""


def _image_size(text: str) -> int:
    """A generated image side: unlike training samples (floored, COMPAT §12) a wrong size is an error here, since
    the user asked for exactly this size."""
    pixels = whole_number(text)
    if pixels >= MIN_SIZE and pixels % SIZE_MULTIPLE == 0:
        return pixels
    below = pixels - pixels % SIZE_MULTIPLE
    choices = [size for size in (below, below + SIZE_MULTIPLE) if size >= MIN_SIZE] or [MIN_SIZE]
    raise OptionValueError(pixels, "did you mean " + " or ".join(str(size) for size in choices) + "?")


def _positive_int(text: str) -> int:
    number = whole_number(text)
    if number <= 0:
        raise ValueError(text)
    return number


def _non_negative_int(text: str) -> int:
    number = whole_number(text)
    if number < 0:
        raise ValueError(text)
    return number


def _non_negative_float(text: str) -> float:
    number = float(text)
    if not number >= 0:  # also rejects nan
        raise ValueError(text)
    return number


def _strength(text: str) -> float:
    number = float(text)
    if not 0 <= number <= 1:
        raise ValueError(text)
    return number


def _negative_scale(text: str) -> float | str:
    return NEGATIVE_SCALE_OFF if text.strip().lower() == NEGATIVE_SCALE_OFF else float(text)


def _seed_list(text: str) -> list[int]:
    return [seed_number(seed) for seed in text.split(",")]


def _float_list(text: str) -> list[float]:
    return [float(number) for number in text.split(",")]


def _steps(text: str) -> int:
    return clamp_steps(whole_number(text))


_SIZE = "a multiple of 8 >= 64"
GENERATION_OPTIONS: dict[str, LineOption] = {
    "n": LineOption("negative_prompt", str.strip, "a negative prompt"),
    "w": LineOption("width", _image_size, _SIZE),
    "h": LineOption("height", _image_size, _SIZE),
    "s": LineOption("steps", _steps, "a whole number of steps"),
    "d": LineOption("seeds", _seed_list, "whole-number seeds >= 0, separated by commas"),
    "l": LineOption("scale", float, "a number (CFG scale)"),
    "nl": LineOption("negative_scale", _negative_scale, "a number (negative scale) or none"),
    "t": LineOption("strength", _strength, "a number from 0 to 1 (img2img strength)"),
    "am": LineOption("network_multipliers", _float_list, "numbers separated by commas, one per network"),
    "ow": LineOption("original_width", _positive_int, "a whole number of pixels > 0"),
    "oh": LineOption("original_height", _positive_int, "a whole number of pixels > 0"),
    "nw": LineOption("original_width_negative", _positive_int, "a whole number of pixels > 0"),
    "nh": LineOption("original_height_negative", _positive_int, "a whole number of pixels > 0"),
    "ct": LineOption("crop_top", _non_negative_int, "a whole number of pixels >= 0"),
    "cl": LineOption("crop_left", _non_negative_int, "a whole number of pixels >= 0"),
    "tw": LineOption("target_width", _positive_int, "a whole number of pixels > 0"),
    "th": LineOption("target_height", _positive_int, "a whole number of pixels > 0"),
    "ss": LineOption("sampler", sampler_name, SAMPLER_EXPECTED, nearest_sampler_hint),
    "gr": LineOption("guidance_rescale", _non_negative_float, "a number >= 0 (guidance rescale)"),
    "f": LineOption("file_name", str.strip, "a file name"),
}


def _reject_unknown_option(source: str, name: str) -> None:
    """Ignored kohya options warn once per name; anything else is an error, since a typo in a prompt file would
    otherwise make every image of a long run wrong."""
    if name in REFUSED_OPTIONS:
        raise ConfigError(source, f"--{name}", "a supported prompt option", hint=REFUSED_OPTIONS[name])
    if name in IGNORED_OPTIONS:
        if name not in _warned_ignored_options:
            _warned_ignored_options.add(name)
            logger.warning("%s: --%s (kohya's Deep Shrink / Gradual Latent) is not implemented; ignored", source, name)
        return
    nearest = difflib.get_close_matches(name, list(GENERATION_OPTIONS), n=1)
    hint = f"did you mean --{nearest[0]}?" if nearest else "known options: " + ", ".join(
        f"--{option}" for option in GENERATION_OPTIONS)
    raise ConfigError(source, f"--{name}", "a known prompt option", hint=hint)


def parse_generation_line(line: str, source: str) -> PromptOptions:
    """Parse one generator prompt line: the prompt, then options separated by " --" (case-insensitive names).

    Raises:
        ConfigError: an unknown option or a bad value (names `source`, the option, what was expected).
    """
    text, values = parse_line_options(line, source, GENERATION_OPTIONS, _reject_unknown_option)
    if values.get("negative_scale") == NEGATIVE_SCALE_OFF:
        values.update(negative_scale=None, negative_scale_off=True)
    return PromptOptions(prompt=text, source=source, **values)


def read_prompt_file(path: str | Path) -> list[PromptOptions]:
    """The prompts of a `--from_file` file: one per line; blank lines and lines starting with '#' are skipped
    (kohya gen_img.py); UTF-8, with or without a byte-order mark.

    Raises:
        FlagError: the file is missing, not UTF-8 or holds no prompt.
        ConfigError: a line with a bad option (names the file and line).
    """
    path = Path(path)
    if not path.is_file():
        raise FlagError(f"--from_file {path}: file not found")
    lines = read_utf8_text(path, "--from_file").splitlines()
    prompts = []
    for number, line in enumerate(lines, start=1):
        stripped = line.strip()
        if stripped and not stripped.startswith("#"):
            prompts.append(parse_generation_line(stripped, f"{path}:{number}"))
    if not prompts:
        raise FlagError(f"--from_file {path}: no prompts found (blank lines and lines starting with # are skipped)")
    return prompts


# ------------------------------------------------------------------------------------------------------ wildcards

# A {...} group holding no unescaped brace; "\{" and "\}" are literal braces.
_WILDCARD = re.compile(r"(?<!\\)\{((?:\\.|[^{}\\])+)\}")
_STRAY_BRACE = re.compile(r"(?<!\\)[{}]")
_COUNT = re.compile(r"(\d+)(?:-(\d+))?")


@dataclass
class _Wildcard:
    """One {…} group: its choices, how many to pick (a range), the separator and whether to enumerate."""

    choices: list[str]
    count_range: tuple[int, int]
    separator: str
    enumerate: bool

    def all_values(self) -> list[str]:
        low, high = self.count_range
        return [self.separator.join(combination) for count in range(low, high + 1)
                for combination in itertools.combinations(self.choices, count)]

    def random_value(self, rng: random.Random) -> str:
        if self.count_range == (1, 1):
            return rng.choice(self.choices)
        return self.separator.join(rng.sample(self.choices, rng.randint(*self.count_range)))


def _parse_wildcard(body: str) -> _Wildcard:
    """`[e$$][n or n-m$$][separator$$]a|b|c` (kohya gen_img.py dynamic prompts, COMPAT §12)."""
    *prefixes, choice_text = body.split("$$")
    choices = choice_text.split("|")
    enumerate_all = bool(prefixes) and prefixes[0].lower() == "e"
    if enumerate_all:
        prefixes.pop(0)
    count_range = (1, 1)
    if prefixes and (match := _COUNT.fullmatch(prefixes[0].strip())):
        prefixes.pop(0)
        low, high = int(match.group(1)), int(match.group(2) or match.group(1))
        # kohya swaps a reversed range and caps it at the number of choices
        low, high = min(low, high), max(low, high)
        count_range = (min(low, len(choices)), min(high, len(choices)))
    elif len(prefixes) > 1 and not prefixes[0]:
        prefixes.pop(0)  # "{$$ and $$a|b}": an empty count before a separator
    separator = prefixes.pop(0) if prefixes else ", "
    if prefixes:
        logger.warning("wildcard {%s}: unexpected extra '$$' parts %s; they are ignored", body, prefixes)
    return _Wildcard(choices, count_range, separator, enumerate_all)


def expand_wildcards(prompt: str, rng: random.Random) -> list[str]:
    """The prompts a line with wildcards stands for: `{a|b}` one random choice, `{n$$…}` / `{n-m$$…}` that many
    distinct choices, `{sep$$…}` / `{n$$sep$$…}` their separator (", " by default), `{e$$…}` one prompt per
    variant (several enumerations multiply, first one outermost). Each prompt draws its own random choices."""
    parts = _WILDCARD.split(prompt)
    literals, bodies = parts[0::2], parts[1::2]
    if any(_STRAY_BRACE.search(literal) for literal in literals):
        logger.warning("prompt %r has unbalanced braces; they are kept as literal text", prompt)
    if not bodies:
        return [prompt]
    wildcards = [_parse_wildcard(body) for body in bodies]
    enumerated = [wildcard.all_values() for wildcard in wildcards if wildcard.enumerate]
    prompts = []
    for combination in itertools.product(*enumerated):
        enumerated_values = iter(combination)
        pieces = [literals[0]]
        for wildcard, literal in zip(wildcards, literals[1:]):
            pieces.append(next(enumerated_values) if wildcard.enumerate else wildcard.random_value(rng))
            pieces.append(literal)
        prompts.append("".join(pieces))
    return prompts


# ---------------------------------------------------------------------------------------------------------- seeds


class SeedSource:
    """kohya gen_img.py's seed rules, with its own random stream. With --seed S the stream is seeded with S and
    one seed per planned image is drawn up front (if that is a single image, its seed is S itself); each
    iteration with --iter_same_seed draws one seed shared by its images. An image takes, in order: its prompt's
    own `--d` seed, the next planned seed, the iteration seed, a fresh random seed."""

    def __init__(self, seed: int | None, iter_same_seed: bool, total_images: int | None):
        self.rng = random.Random(seed)
        self.iter_same_seed = iter_same_seed
        self.iteration_seed: int | None = None
        self.planned: list[int] = []
        if seed is not None and total_images:
            self.planned = [self.rng.randint(0, MAX_RANDOM_SEED) for _ in range(total_images)]
            if len(self.planned) == 1:
                self.planned = [seed]

    def start_iteration(self) -> None:
        """Call at the start of each --n_iter iteration."""
        if self.iter_same_seed:
            self.iteration_seed = self.rng.randint(0, MAX_RANDOM_SEED)

    def next_seed(self, prompt_seeds: list[int] | None, image_index: int) -> int:
        """The seed of image `image_index` (0-based, within --images_per_prompt) of a prompt with these `--d` seeds."""
        if prompt_seeds and image_index < len(prompt_seeds):
            return prompt_seeds[image_index]
        if self.planned:
            return self.planned.pop(0)
        if self.iteration_seed is not None:
            return self.iteration_seed
        return self.rng.randint(0, MAX_RANDOM_SEED)


def seed_plan(seed: int | None, iter_same_seed: bool, n_iter: int, prompt_seeds: list[list[int] | None],
              images_per_prompt: int) -> list[int]:
    """Every image's seed, in generation order (iterations, then prompts, then images), for prompts with these
    `--d` seeds (None: no --d)."""
    source = SeedSource(seed, iter_same_seed, n_iter * len(prompt_seeds) * images_per_prompt)
    seeds = []
    for _ in range(n_iter):
        source.start_iteration()
        for own_seeds in prompt_seeds:
            seeds.extend(source.next_seed(own_seeds, image_index) for image_index in range(images_per_prompt))
    return seeds
