"""The dataset config (kohya's `--dataset_config` TOML/JSON schema, COMPAT §9): loading, strict validation with
key paths, and the blueprint (resolved dataclasses) that `library.data` builds datasets from.

Reading images, captions and metadata is not done here; only folder names are read for `--train_data_dir`.
"""
from __future__ import annotations

import argparse
import dataclasses
import difflib
import json
import logging
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

import toml

from library.data.captions import CaptionOptions
from library.errors import ConfigError, FlagError, UserInputError
from library.options.choices import RESIZE_INTERPOLATIONS
from library.options.dataset import datasets_from_flags, parse_face_crop_aug_range, parse_resolution
from library.text_files import read_utf8_text

logger = logging.getLogger(__name__)

DatasetKind = Literal["dreambooth", "finetune", "controlnet"]
KIND_NAMES = {"dreambooth": "DreamBooth", "finetune": "fine-tuning", "controlnet": "ControlNet"}
CLI_SOURCE = "command line"
VAE_FACTOR = 8  # SD/SDXL VAEs map 8x8 pixels to one latent


@dataclass
class SubsetParams(CaptionOptions):
    """One image folder or metadata file with its caption and augmentation settings (defaults: COMPAT §9.2).

    The caption keys are inherited from `CaptionOptions`, so they and their defaults are declared once.
    """

    image_dir: str | None = None
    num_repeats: int = 1
    color_aug: bool = False
    flip_aug: bool = False
    face_crop_aug_range: tuple[float, float] | None = None
    random_crop: bool = False
    custom_attributes: dict = field(default_factory=dict)
    resize_interpolation: str | None = None
    caption_extension: str = ".caption"
    class_tokens: str | None = None
    cache_info: bool = False
    is_reg: bool = False
    alpha_mask: bool = False
    metadata_file: str | None = None
    conditioning_data_dir: str | None = None

    def __post_init__(self) -> None:
        # kohya adds the dot to a caption extension given without one (COMPAT §9.2)
        if self.caption_extension and not self.caption_extension.startswith("."):
            self.caption_extension = "." + self.caption_extension


@dataclass
class DatasetParams:
    """Settings shared by every subset of one dataset; `resolution` is (width, height)."""

    resolution: tuple[int, int]
    batch_size: int = 1
    enable_bucket: bool = False
    min_bucket_reso: int = 256
    max_bucket_reso: int = 1024
    bucket_reso_steps: int = 64
    bucket_no_upscale: bool = False
    network_multiplier: float = 1.0
    validation_split: float = 0.0
    validation_seed: int | None = None
    resize_interpolation: str | None = None
    prior_loss_weight: float = 1.0
    debug_dataset: bool = False


@dataclass
class DatasetBlueprint:
    kind: DatasetKind
    params: DatasetParams
    subsets: list[SubsetParams]


@dataclass
class DatasetGroupBlueprint:
    datasets: list[DatasetBlueprint]
    source: str  # the config path, or "command line"


# ---- the schema: which keys exist, where they may appear, and what values they take (COMPAT §9.2) ----

@dataclass(frozen=True)
class ConfigProblem:
    key: str  # path such as datasets[0].subsets[1].num_repeats
    text: str  # what is wrong, e.g. "expected an integer, got 'ten'"


class DatasetConfigError(ConfigError):
    """Every problem found in one dataset config; the first line gives the count when there are several."""

    def __init__(self, file: object, problems: list[ConfigProblem]):
        self.file, self.problems = str(file), list(problems)
        self.key, self.expected, self.got = problems[0].key, problems[0].text, None
        lines = [f"{self.file}: {problem.key}: {problem.text}" for problem in problems]
        if len(lines) > 1:
            lines.insert(0, f"{self.file}: {len(lines)} problems in the dataset config:")
        UserInputError.__init__(self, "\n".join(lines))


def _show(value: object) -> str:
    if isinstance(value, bool):
        return f"{str(value).lower()} (a boolean)"
    return "a table" if isinstance(value, dict) else repr(value)


def _is_int(value: object) -> bool:
    # TOML `true` is a bool, and Python bools are ints: reject them explicitly
    return isinstance(value, int) and not isinstance(value, bool)


def _is_number(value: object) -> bool:
    return _is_int(value) or isinstance(value, float)


def _is_pair(value: object, accepts: Callable[[object], bool]) -> bool:
    return isinstance(value, (list, tuple)) and len(value) == 2 and all(accepts(part) for part in value)


def _value_check(accepts: Callable[[object], bool], expected: str) -> Callable[[object], str | None]:
    """A checker returning None for a good value, else "expected <expected>, got <value>"."""
    def check(value: object) -> str | None:
        return None if accepts(value) else f"expected {expected}, got {_show(value)}"
    return check


def _positive_int(value: object) -> bool:
    return _is_int(value) and value > 0


_integer = _value_check(_is_int, "an integer")
# kohya skips a subset whose num_repeats is below 1 with a warning; 0 is how users switch a subset off, but a
# negative count is a typo, so only 0 keeps kohya's skip
_repeats = _value_check(lambda value: _is_int(value) and value >= 0,
                        "an integer >= 1 (or 0 to skip the subset)")
_positive = _value_check(_positive_int, "a positive integer")
_non_negative = _value_check(lambda value: _is_int(value) and value >= 0, "a non-negative integer")
_number = _value_check(_is_number, "a number")
_rate = _value_check(lambda value: _is_number(value) and 0 <= value <= 1, "a number from 0 to 1")
_boolean = _value_check(lambda value: isinstance(value, bool), "true or false")
_string = _value_check(lambda value: isinstance(value, str), "a string")
_table = _value_check(lambda value: isinstance(value, dict), "a table")
_range = _value_check(lambda value: _is_pair(value, _is_number) and value[0] <= value[1],
                      "two numbers [low, high] with low <= high")


def _resolution(value: object) -> str | None:
    if _positive_int(value) or _is_pair(value, _positive_int):
        return None
    hint = " (a string like '768,512' is for --resolution; here write [768, 512])" if isinstance(value, str) else ""
    return f"expected a positive integer or [width, height], got {_show(value)}{hint}"


def _interpolation(value: object) -> str | None:
    if value in RESIZE_INTERPOLATIONS:
        return None
    close = difflib.get_close_matches(str(value), RESIZE_INTERPOLATIONS, n=1)
    hint = f"; did you mean {close[0]}?" if close else ""
    return f"expected one of {', '.join(RESIZE_INTERPOLATIONS)}, got {_show(value)}{hint}"


def _keys(levels: str, check: Callable[[object], str | None], *names: str) -> dict:
    return {name: (levels, check) for name in names}


# levels: G = [general], D = [[datasets]], S = [[datasets.subsets]] (COMPAT §9.2)
DATASET_LEVELS, INHERITABLE_LEVELS, SUBSET_LEVEL = "GD", "GDS", "S"
KEY_SPECS: dict[str, tuple[str, Callable[[object], str | None]]] = {
    **_keys(DATASET_LEVELS, _resolution, "resolution"),
    **_keys(DATASET_LEVELS, _positive, "batch_size", "min_bucket_reso", "max_bucket_reso", "bucket_reso_steps"),
    **_keys(DATASET_LEVELS, _boolean, "enable_bucket", "bucket_no_upscale"),
    **_keys(DATASET_LEVELS, _number, "network_multiplier"),
    **_keys(DATASET_LEVELS, _rate, "validation_split"),
    **_keys(DATASET_LEVELS, _integer, "validation_seed"),
    # num_repeats = 0 is legal: the dataset builder skips that subset with a warning
    **_keys(INHERITABLE_LEVELS, _repeats, "num_repeats"),
    **_keys(INHERITABLE_LEVELS, _non_negative, "keep_tokens", "caption_dropout_every_n_epochs", "token_warmup_min"),
    **_keys(INHERITABLE_LEVELS, _number, "token_warmup_step"),
    **_keys(INHERITABLE_LEVELS, _rate, "caption_dropout_rate", "caption_tag_dropout_rate"),
    **_keys(INHERITABLE_LEVELS, _boolean, "shuffle_caption", "enable_wildcard", "color_aug", "flip_aug",
            "random_crop", "cache_info"),
    **_keys(INHERITABLE_LEVELS, _string, "caption_separator", "keep_tokens_separator", "secondary_separator",
            "caption_prefix", "caption_suffix", "caption_extension", "class_tokens"),
    **_keys(INHERITABLE_LEVELS, _range, "face_crop_aug_range"),
    **_keys(INHERITABLE_LEVELS, _table, "custom_attributes"),
    **_keys(INHERITABLE_LEVELS, _interpolation, "resize_interpolation"),
    **_keys(SUBSET_LEVEL, _string, "image_dir", "metadata_file", "conditioning_data_dir"),
    **_keys(SUBSET_LEVEL, _boolean, "is_reg", "alpha_mask"),
}
# kohya rejects these in the file: they only come from flags (COMPAT §9.2, ARGPARSE_SPECIFIC_SCHEMA)
CLI_ONLY_KEYS = ("prior_loss_weight", "max_token_length", "debug_dataset")
# flag names users carry over into the file by mistake
FLAG_NAME_HINTS = {"train_batch_size": "batch_size", "dataset_repeats": "num_repeats", "train_data_dir": "image_dir",
                   "reg_data_dir": "image_dir with is_reg = true", "in_json": "metadata_file",
                   "caption_extention": "caption_extension"}
# the flag that supplies a key's command-line fallback, where its name differs (kohya's argparse mapping)
KEY_TO_FLAG = {"batch_size": "train_batch_size", "num_repeats": "dataset_repeats"}
# never inherited: they say what a subset *is*, so they come from the subset table alone
OWN_SUBSET_KEYS = ("image_dir", "is_reg", "metadata_file", "conditioning_data_dir")
LEVEL_NAMES = {"G": "general", "D": "dataset", "S": "subset"}


# ---- loading and validation ----

def load_dataset_config(path: str | Path) -> dict:
    """Parse a `.toml` or `.json` dataset config (chosen by suffix, as kohya does: COMPAT §9.1)."""
    path = Path(path)
    suffix = path.suffix.lower()
    if suffix not in (".toml", ".json"):
        raise ConfigError(path, "--dataset_config", "a .toml or .json file", got=path.suffix or "no extension")
    if not path.is_file():
        raise UserInputError(f"{path}: dataset config not found (--dataset_config)")
    text = read_utf8_text(path, "--dataset_config")
    try:
        return toml.loads(text) if suffix == ".toml" else json.loads(text)
    except toml.TomlDecodeError as error:
        raise ConfigError(path, f"line {error.lineno}, column {error.colno}", "valid TOML", hint=error.msg) from None
    except json.JSONDecodeError as error:
        raise ConfigError(path, f"line {error.lineno}, column {error.colno}", "valid JSON", hint=error.msg) from None


def validate_dataset_config(raw: dict, file: str) -> None:
    """Check every key and value; raise one DatasetConfigError listing all problems, each with its key path."""
    problems: list[ConfigProblem] = []
    if not isinstance(raw, dict):
        raise DatasetConfigError(file, [ConfigProblem("(top level)", "expected a table with [general] and "
                                                      f"[[datasets]], got {_show(raw)}")])
    for key in raw:
        if key not in ("general", "datasets"):
            problems.append(_misplaced_top_level_key(key))
    general = raw.get("general", {})
    if isinstance(general, dict):
        _check_keys(general, "general", "G", problems)
    else:
        problems.append(ConfigProblem("general", f"expected a table ([general]), got {_show(general)}"))
    datasets = raw.get("datasets")
    if not datasets:
        problems.append(ConfigProblem("datasets", "expected at least one [[datasets]] table, found none"))
    elif not isinstance(datasets, list):
        problems.append(ConfigProblem("datasets", f"expected an array of tables ([[datasets]]), got {_show(datasets)}"))
    else:
        for index, dataset in enumerate(datasets):
            _check_dataset(dataset, f"datasets[{index}]", problems)
    if problems:
        raise DatasetConfigError(file, problems)


def _misplaced_top_level_key(key: str) -> ConfigProblem:
    if key in KEY_SPECS or key in CLI_ONLY_KEYS:
        return ConfigProblem(key, "found at the top of the file; put it under [general] (defaults for every "
                                  "dataset) or in a [[datasets]] table")
    close = difflib.get_close_matches(key, ("general", "datasets"), n=1)
    return ConfigProblem(key, "unknown key" + (f"; did you mean {close[0]}?" if close else
                                               "; the file has [general] and [[datasets]] only"))


def _check_dataset(dataset: object, path: str, problems: list[ConfigProblem]) -> None:
    if not isinstance(dataset, dict):
        problems.append(ConfigProblem(path, f"expected a table ([[datasets]]), got {_show(dataset)}"))
        return
    _check_keys(dataset, path, "D", problems)
    subsets = dataset.get("subsets")
    if not subsets:
        problems.append(ConfigProblem(f"{path}.subsets", "expected at least one [[datasets.subsets]] table, "
                                                         "found none"))
        return
    if not isinstance(subsets, list) or not all(isinstance(subset, dict) for subset in subsets):
        problems.append(ConfigProblem(f"{path}.subsets", "expected an array of tables ([[datasets.subsets]]), "
                                                         f"got {_show(subsets)}"))
        return
    for index, subset in enumerate(subsets):
        _check_keys(subset, f"{path}.subsets[{index}]", "S", problems)
        _check_subset_kind(subset, f"{path}.subsets[{index}]", problems)
    kinds = sorted({subset_kind(subset) for subset in subsets})
    if len(kinds) > 1:
        names = " and ".join(KIND_NAMES[kind] for kind in kinds)
        problems.append(ConfigProblem(path, f"mixes {names} subsets (metadata_file / conditioning_data_dir set in "
                                            "some subsets only); put each kind in its own [[datasets]]"))


def _check_keys(table: dict, path: str, level: str, problems: list[ConfigProblem]) -> None:
    for key, value in table.items():
        where = f"{path}.{key}"
        if key == "subsets" and level == "D":
            continue
        if key in CLI_ONLY_KEYS:
            problems.append(ConfigProblem(where, f"command-line only; pass --{key}"))
        elif key in ("subsets", "datasets"):
            inside = "a [[datasets]] table" if key == "subsets" else "the top level of the file"
            problems.append(ConfigProblem(where, f"not allowed in {LEVEL_NAMES[level]}; it belongs in {inside}"))
        elif key not in KEY_SPECS:
            problems.append(ConfigProblem(where, _unknown_key_text(key, level)))
        elif level not in KEY_SPECS[key][0]:
            problems.append(ConfigProblem(where, _wrong_level_text(KEY_SPECS[key][0])))
        else:
            text = KEY_SPECS[key][1](value)
            if text:
                problems.append(ConfigProblem(where, text))


def _unknown_key_text(key: str, level: str) -> str:
    if key in FLAG_NAME_HINTS:
        return f"unknown key (that is a command-line flag); the dataset config calls it {FLAG_NAME_HINTS[key]}"
    allowed_here = [name for name, (levels, _) in KEY_SPECS.items() if level in levels]
    close = difflib.get_close_matches(key, allowed_here, n=1) or difflib.get_close_matches(key, list(KEY_SPECS), n=1)
    return "unknown key" + (f"; did you mean {close[0]}?" if close else "")


def _wrong_level_text(levels: str) -> str:
    if levels == SUBSET_LEVEL:
        return "expected at subset level ([[datasets.subsets]])"
    return "a dataset-level key; move it to [[datasets]] or [general]"


def subset_kind(subset: dict) -> DatasetKind:
    """Which dataset type a raw subset table belongs to (COMPAT §9.1)."""
    if subset.get("conditioning_data_dir") is not None:
        return "controlnet"
    return "finetune" if subset.get("metadata_file") is not None else "dreambooth"


def _check_subset_kind(subset: dict, path: str, problems: list[ConfigProblem]) -> None:
    kind = subset_kind(subset)
    if kind == "controlnet" and subset.get("metadata_file") is not None:
        problems.append(ConfigProblem(f"{path}.metadata_file", "not allowed together with conditioning_data_dir "
                                                               "(a ControlNet subset reads captions from files)"))
    if kind in ("dreambooth", "controlnet") and subset.get("image_dir") is None:
        problems.append(ConfigProblem(f"{path}.image_dir", f"required in a {KIND_NAMES[kind]} subset; expected the "
                                                           "folder that directly contains the images"))
    if kind != "dreambooth" and "is_reg" in subset:
        problems.append(ConfigProblem(f"{path}.is_reg", f"not allowed in a {KIND_NAMES[kind]} subset; "
                                                        "regularisation images need a DreamBooth subset (no "
                                                        "metadata_file or conditioning_data_dir)"))


# ---- from config file or flags to a blueprint ----

FLOAT_KEYS = ("caption_dropout_rate", "caption_tag_dropout_rate", "network_multiplier", "validation_split",
              "prior_loss_weight")


def _cli_values(args: argparse.Namespace) -> dict:
    """The command-line fallbacks by config key name, checked like config values (COMPAT §9.1)."""
    values = {}
    for key, (_, check) in KEY_SPECS.items():
        flag = KEY_TO_FLAG.get(key, key)
        value = getattr(args, flag, None)
        if value is None or key in OWN_SUBSET_KEYS:
            continue
        if key == "resolution":
            value = parse_resolution(value, "--resolution")
        elif key == "face_crop_aug_range":
            value = parse_face_crop_aug_range(value)
        text = check(value)
        if text:
            raise FlagError(f"--{flag}: {text}")
        values[key] = value
    for key in ("prior_loss_weight", "debug_dataset"):
        if getattr(args, key, None) is not None:
            values[key] = getattr(args, key)
    return values


def build_blueprint(args: argparse.Namespace, config_path: str | None,
                    supports_controlnet: bool | None = None) -> DatasetGroupBlueprint:
    """Resolve every dataset and subset value: subset -> dataset -> general -> command line -> default.

    supports_controlnet: whether `conditioning_data_dir` datasets are allowed; by default only with
    `--masked_loss`, where their images are loss masks (kohya's LoRA trainers: ConfigSanitizer(..., masked_loss)).
    """
    if supports_controlnet is None:
        supports_controlnet = bool(getattr(args, "masked_loss", False))
    if config_path:
        ignored = [f"--{name}" for name in ("train_data_dir", "reg_data_dir", "in_json") if getattr(args, name, None)]
        if ignored:
            # kohya takes the datasets from the config alone when one is given (COMPAT §9.1)
            logger.warning("%s ignored: --dataset_config defines the datasets", ", ".join(ignored))
        raw = load_dataset_config(config_path)
        validate_dataset_config(raw, str(config_path))
        source, general, datasets_raw = str(config_path), raw.get("general", {}), raw["datasets"]
    else:
        source, general, datasets_raw = CLI_SOURCE, {}, datasets_from_flags(args, supports_controlnet)
    cli = _cli_values(args)
    _check_some_subset_is_repeated(datasets_raw, general, cli, source)
    datasets = [_resolve_dataset(index, dataset, general, cli, source, supports_controlnet)
                for index, dataset in enumerate(datasets_raw)]
    return DatasetGroupBlueprint(datasets=datasets, source=source)


def _lookup(key: str, chain: list[tuple[dict, str]]) -> tuple[object, str | None]:
    """The first non-null value of `key` along (table, key path) pairs, and the path it came from."""
    return next(((table[key], path) for table, path in chain if table.get(key) is not None), (None, None))


def _chain_paths(where: str, key: str, subset_index: int | None = None) -> list[str]:
    """Key paths of the levels a value is looked up in; the last one is the command-line flag."""
    paths = [f"{where}.{key}", f"general.{key}", f"--{KEY_TO_FLAG.get(key, key)}"]
    return paths if subset_index is None else [f"{where}.subsets[{subset_index}].{key}", *paths]


def _check_some_subset_is_repeated(datasets_raw: list[dict], general: dict, cli: dict, source: str) -> None:
    """Refuse a config whose every subset has num_repeats 0: kohya would skip them all and then find no images.

    One problem per place a 0 was written (a [general] default counts once for every subset it reaches).
    """
    zero_at: dict[str, object] = {}
    for index, dataset in enumerate(datasets_raw):
        for subset_index, subset in enumerate(dataset["subsets"]):
            paths = _chain_paths(f"datasets[{index}]", "num_repeats", subset_index)
            value, path = _lookup("num_repeats", list(zip([subset, dataset, general, cli], paths)))
            if value is None or value >= 1:
                return
            zero_at.setdefault(path, value)
    text = "every subset has num_repeats 0 and is skipped, so there is nothing to train on"
    if source == CLI_SOURCE:
        flag, value = next(iter(zero_at.items()))
        raise FlagError(f"{flag}: expected an integer >= 1, got {value}; {text}")
    problems = [ConfigProblem(path, f"expected an integer >= 1, got {value}; {text}" +
                              (" (subsets without num_repeats take --dataset_repeats)" if path.startswith("--") else ""))
                for path, value in zero_at.items()]
    raise DatasetConfigError(source, problems)


def _size_text(sides: tuple[int, ...] | list[int], as_list: bool) -> str:
    """Sides as the user writes them: `67` for a square, `[768, 512]` in a file, `768,512` on the command line."""
    if as_list:
        return str(list(sides))
    return str(sides[0]) if len(set(sides)) == 1 else ",".join(str(side) for side in sides)


def _check_vae_sizes(params: dict, dataset: dict, general: dict, cli: dict, where: str, source: str) -> None:
    """Refuse training sizes the VAE cannot encode exactly (sides not multiples of 8).

    Without buckets the resolution is the one training size; with buckets it only sets the area and every
    bucket is a multiple of bucket_reso_steps (COMPAT §10), so the step is what must fit.
    """
    key = "bucket_reso_steps" if params.get("enable_bucket") else "resolution"
    sides = params["resolution"] if key == "resolution" else (params.get("bucket_reso_steps", 64),)
    if all(side % VAE_FACTOR == 0 for side in sides):
        return
    written, path = _lookup(key, list(zip([dataset, general, cli], _chain_paths(where, key))))
    lower = [max(VAE_FACTOR, side - side % VAE_FACTOR) for side in sides]
    upper = [side + (-side) % VAE_FACTOR for side in sides]
    from_flag = path.startswith("--")
    as_list = not from_flag and isinstance(written, list)
    hint = "use " + " or ".join(dict.fromkeys(_size_text(choice, as_list) for choice in (lower, upper)))
    expected = f"sides that are multiples of {VAE_FACTOR}" if key == "resolution" else f"a multiple of {VAE_FACTOR}"
    if from_flag:
        raise FlagError(f"{path}: expected {expected}, got {_size_text(sides, as_list)}; {hint}")
    raise ConfigError(source, path, expected, got=written, hint=hint)


def _resolve_fields(cls: type, chain: list[dict]) -> dict:
    """First non-null value per field along the chain; `false` is a value (kohya's search_value)."""
    values = {}
    for spec in dataclasses.fields(cls):
        lookup = chain[:1] if spec.name in OWN_SUBSET_KEYS else chain
        value = next((table[spec.name] for table in lookup if table.get(spec.name) is not None), None)
        if value is None:
            continue
        if spec.name == "resolution":
            value = parse_resolution(value)
        elif spec.name == "face_crop_aug_range":
            value = (float(value[0]), float(value[1]))
        elif spec.name in FLOAT_KEYS:
            value = float(value)
        elif spec.name == "custom_attributes":
            value = dict(value)
        values[spec.name] = value
    return values


def _resolve_dataset(index: int, dataset: dict, general: dict, cli: dict, source: str,
                     supports_controlnet: bool) -> DatasetBlueprint:
    where = f"datasets[{index}]"
    params = _resolve_fields(DatasetParams, [dataset, general, cli])
    if "resolution" not in params:
        if source == CLI_SOURCE:
            raise FlagError("--resolution: required; expected a size in pixels like 512 or 768,512 (width,height)")
        raise ConfigError(source, f"{where}.resolution", "a resolution such as 512 or [768, 512]",
                          hint="none is set in this dataset, in [general] or by --resolution")
    _check_vae_sizes(params, dataset, general, cli, where, source)
    kind = _infer_kind(dataset["subsets"], where, source, supports_controlnet)
    subsets = [SubsetParams(**_resolve_fields(SubsetParams, [subset, dataset, general, cli]))
               for subset in dataset["subsets"]]
    return DatasetBlueprint(kind=kind, params=DatasetParams(**params),
                            subsets=_drop_duplicate_subsets(subsets, kind, where))


def _infer_kind(subsets: list[dict], where: str, source: str, supports_controlnet: bool) -> DatasetKind:
    kinds = {subset_kind(subset) for subset in subsets}
    if len(kinds) > 1:
        raise DatasetConfigError(source, [ConfigProblem(where, "mixes dataset kinds; put each in its own dataset")])
    kind = kinds.pop()
    if kind == "controlnet" and not supports_controlnet:
        raise DatasetConfigError(source, [ConfigProblem(
            f"{where}.subsets[0].conditioning_data_dir",
            "ControlNet-style datasets are not supported by this script; remove conditioning_data_dir, or pass "
            "--masked_loss to use its images as loss masks (white = trained, black = ignored)")])
    return kind


def _drop_duplicate_subsets(subsets: list[SubsetParams], kind: DatasetKind, where: str) -> list[SubsetParams]:
    """Keep the first subset per image_dir (metadata_file for fine-tuning) in one dataset (COMPAT §9.1).

    Subsets with num_repeats 0 are skipped later and, as in kohya, do not claim their folder.
    """
    claimed: set[str | None] = set()
    kept = []
    for index, subset in enumerate(subsets):
        identity = subset.metadata_file if kind == "finetune" else subset.image_dir
        if subset.num_repeats >= 1:
            if identity in claimed:
                logger.warning("%s.subsets[%d]: ignored, %s is already a subset of this dataset", where, index,
                               identity)
                continue
            claimed.add(identity)
        kept.append(subset)
    return kept


def describe_blueprint(blueprint: DatasetGroupBlueprint) -> list[str]:
    """One readable line per dataset and per subset, for the start-of-training summary."""
    lines = [f"datasets from {blueprint.source}:"]
    for index, dataset in enumerate(blueprint.datasets):
        params = dataset.params
        buckets = "off"
        if params.enable_bucket:
            buckets = ("no upscale" if params.bucket_no_upscale else
                       f"{params.min_bucket_reso}-{params.max_bucket_reso}") + f", step {params.bucket_reso_steps}"
        lines.append(f"dataset {index} ({KIND_NAMES[dataset.kind]}): resolution {params.resolution[0]}x"
                     f"{params.resolution[1]}, batch size {params.batch_size}, buckets {buckets}")
        for subset_index, subset in enumerate(dataset.subsets):
            parts = [f"  subset {subset_index}: {subset.image_dir or subset.metadata_file}",
                     f"{subset.num_repeats} repeats"]
            if subset.metadata_file and subset.image_dir:
                parts[0] += f" (metadata {subset.metadata_file})"
            if subset.class_tokens:
                parts.append(f"class tokens {subset.class_tokens!r}")
            if subset.is_reg:
                parts.append("regularisation")
            lines.append(", ".join(parts))
    return lines
