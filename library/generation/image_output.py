"""The output side of the image generators: file names, the PNG text that lets an image be made again, reading
that text back, and saving without overwriting. Making the images is the pipeline's job, not this module's.
"""
from __future__ import annotations

import difflib
import io
import json
import logging
import os
import re
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import datetime
from pathlib import Path
from typing import Any

from PIL import Image
from PIL.PngImagePlugin import PngInfo

from library.errors import ConfigError, UserInputError
from library.models.state_dict_io import atomic_output
from library.sampling.samplers import SAMPLER_NAMES

logger = logging.getLogger(__name__)

TIMESTAMP_FORMAT = "%Y%m%d%H%M%S"
HIGHRES_PREFIX = "hr_"
A1111_KEY = "parameters"
# kohya's generators always write these; without them an image cannot be regenerated.
REQUIRED_KEYS = ("prompt", "seed", "steps", "scale", "sampler")
MAX_NAME_ATTEMPTS = 10000
_SEQUENTIAL_NAME = re.compile(r"im_(?:hr_)?(\d{6,})(?:_\d+)?\.png", re.IGNORECASE)
# Characters that cannot be in a file name on Windows, or would make a path; plus control characters.
_UNSAFE_NAME_CHARACTERS = re.compile(r'[\\/:*?"<>|\x00-\x1f]')


@dataclass
class ImageRecord:
    """Every setting of one generated image: what goes into its PNG text. None / empty / False = not used.

    `model`, `vae` and network names are file names (not full paths: PNGs get shared). `networks` pairs each
    network file with its `--network_mul`; `network_multipliers` is a prompt's `--am` that overrides them.
    """

    prompt: str
    negative_prompt: str
    seed: int
    steps: int
    scale: float
    sampler: str
    width: int
    height: int
    raw_prompt: str | None = None  # the prompt before wildcard expansion (kohya's raw-prompt)
    negative_scale: float | None = None
    strength: float | None = None
    guidance_rescale: float | None = None
    clip_skip: int | None = None
    max_embeddings_multiples: int | None = None
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
    highres_fix_scale: float | None = None
    highres_fix_steps: int | None = None
    highres_fix_strength: float | None = None
    image_path: str | None = None
    mask_path: str | None = None
    model: str | None = None
    vae: str | None = None
    networks: list[tuple[str, float]] = field(default_factory=list)
    network_merge: bool = False
    embeddings: list[str] = field(default_factory=list)
    v_parameterization: bool = False

    def __post_init__(self) -> None:
        # Floats stay floats (a scale of 7 is written "7.0") and pairs stay tuples, so a record read back from a
        # PNG compares equal to the one that was written.
        for name in ("scale", "negative_scale", "strength", "guidance_rescale", "highres_fix_scale",
                     "highres_fix_strength"):
            if getattr(self, name) is not None:
                setattr(self, name, float(getattr(self, name)))
        if self.network_multipliers is not None:
            self.network_multipliers = [float(value) for value in self.network_multipliers]
        self.networks = [(str(name), float(multiplier)) for name, multiplier in self.networks]
        self.embeddings = [str(name) for name in self.embeddings]


# (ImageRecord field, PNG text key, kind). kohya's gen_img.py writes prompt, negative-prompt, seed, steps, scale,
# sampler, negative-scale, raw-prompt and, for SDXL, original-*/crop-*; the other keys are ours, in its kebab-case.
_TEXT_KEYS: tuple[tuple[str, str, str], ...] = (
    ("prompt", "prompt", "text"),
    ("negative_prompt", "negative-prompt", "text"),
    ("seed", "seed", "int"),
    ("steps", "steps", "int"),
    ("scale", "scale", "float"),
    ("sampler", "sampler", "sampler"),
    ("width", "width", "int"),
    ("height", "height", "int"),
    ("raw_prompt", "raw-prompt", "text"),
    ("negative_scale", "negative-scale", "float"),
    ("strength", "strength", "float"),
    ("guidance_rescale", "guidance-rescale", "float"),
    ("clip_skip", "clip-skip", "int"),
    ("max_embeddings_multiples", "max-embeddings-multiples", "int"),
    ("network_multipliers", "network-multipliers", "floats"),
    ("original_width", "original-width", "int"),
    ("original_height", "original-height", "int"),
    ("original_width_negative", "original-width-negative", "int"),
    ("original_height_negative", "original-height-negative", "int"),
    ("crop_top", "crop-top", "int"),
    ("crop_left", "crop-left", "int"),
    ("target_width", "target-width", "int"),
    ("target_height", "target-height", "int"),
    ("crop_top_negative", "crop-top-negative", "int"),
    ("crop_left_negative", "crop-left-negative", "int"),
    ("target_width_negative", "target-width-negative", "int"),
    ("target_height_negative", "target-height-negative", "int"),
    ("highres_fix_scale", "highres-fix-scale", "float"),
    ("highres_fix_steps", "highres-fix-steps", "int"),
    ("highres_fix_strength", "highres-fix-strength", "float"),
    ("image_path", "image-path", "text"),
    ("mask_path", "mask-path", "text"),
    ("model", "model", "text"),
    ("vae", "vae", "text"),
    ("networks", "networks", "networks"),
    ("network_merge", "network-merge", "bool"),
    ("embeddings", "embeddings", "names"),
    ("v_parameterization", "v-parameterization", "bool"),
)
_LIST_KINDS = ("floats", "names", "networks")
_EXPECTED = {
    "text": "text", "int": "a whole number", "float": "a number", "bool": "true or false",
    "sampler": "one of " + ", ".join(SAMPLER_NAMES), "floats": "numbers separated by commas",
    "names": "names separated by commas", "networks": "name:multiplier pairs separated by commas",
}
# A network name runs up to the ":" that is followed by a number and then a comma or the end, so names that
# contain ":" or "," still read back.
_NETWORK_ITEM = re.compile(r"(?P<name>.+?):(?P<multiplier>[-+]?\d+(?:\.\d+)?(?:[eE][-+]?\d+)?)(?:,|$)")


def _encode(kind: str, value: Any) -> str | None:
    """The PNG text of one field, or None when the field is not used."""
    if value is None or value is False or (kind in _LIST_KINDS and not value):
        return None
    if kind == "bool":
        return "true"
    if kind == "floats":
        return ",".join(str(float(number)) for number in value)
    if kind == "names":
        return ",".join(value)
    if kind == "networks":
        return ",".join(f"{name}:{float(multiplier)}" for name, multiplier in value)
    return str(value)


def _decode_networks(text: str) -> list[tuple[str, float]]:
    networks, position = [], 0
    while position < len(text):
        match = _NETWORK_ITEM.match(text, position)
        if match is None:
            raise ValueError(text)
        networks.append((match["name"], float(match["multiplier"])))
        position = match.end()
    return networks


def _decode_bool(text: str) -> bool:
    if text.strip().lower() not in ("true", "false"):
        raise ValueError(text)
    return text.strip().lower() == "true"


def _decode_sampler(text: str) -> str:
    if text.strip().lower() not in SAMPLER_NAMES:
        raise ValueError(text)
    return text.strip().lower()


_DECODERS: dict[str, Callable[[str], Any]] = {
    "text": str, "int": int, "float": float, "bool": _decode_bool, "sampler": _decode_sampler,
    "floats": lambda text: [float(number) for number in text.split(",")],
    "names": lambda text: text.split(","), "networks": _decode_networks,
}


def _decode(path: Path, key: str, kind: str, text: str) -> Any:
    try:
        return _DECODERS[kind](text)
    except ValueError:
        nearest = difflib.get_close_matches(text.strip().lower(), SAMPLER_NAMES, n=1) if kind == "sampler" else []
        hint = f"did you mean {nearest[0]}?" if nearest else None
        raise ConfigError(path, key, _EXPECTED[kind], got=text, hint=hint) from None


def _a1111_quote(text: str) -> str:
    """A1111 writes a setting value JSON-quoted when it holds a separator (",", ":" or a newline)."""
    return json.dumps(text, ensure_ascii=False) if any(mark in text for mark in ",:\n") else text


def a1111_parameters(record: ImageRecord) -> str:
    """The `parameters` text that AUTOMATIC1111/Forge show in their PNG-info tab; the sampler is kohya's name.

    Highres-fix settings are left out: A1111's "Hires upscale/steps" mean the second stage, kohya's the first.
    """
    lines = [record.prompt]
    if record.negative_prompt:
        lines.append(f"Negative prompt: {record.negative_prompt}")
    settings: list[tuple[str, Any]] = [
        ("Steps", record.steps), ("Sampler", record.sampler), ("CFG scale", record.scale), ("Seed", record.seed),
        ("Size", f"{record.width}x{record.height}"),
        ("Model", Path(record.model).stem if record.model else None),
        ("VAE", Path(record.vae).name if record.vae else None),
        ("Denoising strength", record.strength), ("Clip skip", record.clip_skip),
    ]
    lines.append(", ".join(f"{name}: {_a1111_quote(str(value))}" for name, value in settings if value is not None))
    return "\n".join(lines)


def png_text_chunks(record: ImageRecord) -> dict[str, str]:
    """PNG text key -> value for every setting the record uses, plus A1111's `parameters`."""
    chunks = {}
    for field_name, key, kind in _TEXT_KEYS:
        text = _encode(kind, getattr(record, field_name))
        if text is not None:
            chunks[key] = text
    chunks[A1111_KEY] = a1111_parameters(record)
    return chunks


# A1111 sampler names -> kohya's, for PNGs that carry only A1111's `parameters`.
_A1111_SAMPLERS = {
    "euler a": "euler_a", "euler": "euler", "lms": "lms", "heun": "heun", "dpm2": "dpm_2", "dpm2 a": "dpm_2_a",
    "ddim": "ddim", "plms": "pndm", "dpm++ 2m": "dpmsolver++",
}
_A1111_SETTING = re.compile(r'\s*([^:,]+):\s*("(?:\\.|[^\\"])*"|[^,]*)(?:,|$)')


def _a1111_settings(line: str) -> dict[str, str]:
    settings = {}
    for name, value in _A1111_SETTING.findall(line):
        settings[name.strip()] = json.loads(value) if value.startswith('"') else value.strip()
    return settings


def keys_from_a1111(parameters: str) -> dict[str, str]:
    """Our PNG text keys recovered from an A1111 `parameters` text (prompt, negative, steps, sampler, ...)."""
    lines = parameters.strip("\n").split("\n")
    settings = _a1111_settings(lines[-1])
    if "Steps" in settings:
        lines = lines[:-1]
    else:
        settings = {}
    negative_at = next((number for number, line in enumerate(lines) if line.startswith("Negative prompt:")), None)
    prompt_lines = lines if negative_at is None else lines[:negative_at]
    keys = {"prompt": "\n".join(prompt_lines)}
    if negative_at is not None:
        keys["negative-prompt"] = "\n".join(lines[negative_at:]).removeprefix("Negative prompt:").strip()
    renamed = {"Steps": "steps", "CFG scale": "scale", "Seed": "seed", "Model": "model", "VAE": "vae",
               "Denoising strength": "strength", "Clip skip": "clip-skip"}
    keys.update({key: settings[name] for name, key in renamed.items() if name in settings})
    if "Sampler" in settings:
        keys["sampler"] = _A1111_SAMPLERS.get(settings["Sampler"].lower(), settings["Sampler"])
    width, separator, height = settings.get("Size", "").partition("x")
    if separator:
        keys["width"], keys["height"] = width, height
    return keys


def _open_png_text(path: Path) -> tuple[dict[str, str], tuple[int, int]]:
    """The PNG text chunks and the pixel size of `path`; UserInputError when it is missing or not a PNG."""
    if not path.is_file():
        raise UserInputError(f"{path}: no such file")
    try:
        with Image.open(path) as image:
            if image.format != "PNG":
                raise UserInputError(f"{path}: expected a PNG image, got a {image.format} image")
            return dict(image.text), image.size
    except (OSError, SyntaxError) as error:
        # PIL raises SyntaxError for broken PNG chunks and UnidentifiedImageError (an OSError) for non-images.
        raise UserInputError(f"{path}: not a readable PNG image ({error})") from None


def read_png_record(path: str | os.PathLike) -> ImageRecord:
    """The settings stored in a PNG written by `save_png` (or by kohya's gen_img.py, or by A1111).

    Our keys win over A1111's `parameters`, which only fills in what they lack. Width and height default to the
    image's own size (kohya does not write them).

    Raises:
        UserInputError: no such file, not a PNG, or no generation settings in it.
        ConfigError: a setting whose text cannot be read (names the file and the key).
    """
    path = Path(path)
    texts, (image_width, image_height) = _open_png_text(path)
    if A1111_KEY in texts:
        texts = keys_from_a1111(texts[A1111_KEY]) | texts
    missing = [key for key in REQUIRED_KEYS if key not in texts]
    if missing:
        names = "/".join(f"'{key}'" for key in missing)
        raise UserInputError(f"{path} has no {names} PNG text; was it made by gen_img.py?")
    values = {field_name: _decode(path, key, kind, texts[key])
              for field_name, key, kind in _TEXT_KEYS if key in texts}
    values.setdefault("negative_prompt", "")
    values.setdefault("width", image_width)
    values.setdefault("height", image_height)
    return ImageRecord(**values)


def file_timestamp(moment: datetime | None = None) -> str:
    """The timestamp part of image file names (`%Y%m%d%H%M%S`, local time), for `moment` or now."""
    return (moment or datetime.now()).strftime(TIMESTAMP_FORMAT)


def _highres_prefix(highres: bool) -> str:
    return HIGHRES_PREFIX if highres else ""


def image_file_name(*, timestamp: str, index: int, seed: int, highres: bool = False) -> str:
    """kohya's default name: `im_{timestamp}_{hr_}{index:03d}_{seed}.png` (index = position in the batch).

    The naming scheme of all modes (timestamp `%Y%m%d%H%M%S`; `hr_` marks the final image of a highres-fix run,
    so the first-stage image kept by `--highres_fix_save_1st` never shares its name):
      default                    `im_{timestamp}_{hr_}{index:03d}_{seed}.png`   (this function)
      `--sequential_file_name`   `im_{hr_}{number:06d}.png`, continuing after the folder's numbers
                                 (`sequential_file_name`, `next_sequence_number`)
      `--use_original_file_name` `{init image stem}_{timestamp}_{hr_}{index:03d}_{seed}.png`, the default with
                                 the stem in place of `im` (`original_file_name`)
      a prompt's `--f name`      the name made safe, `.png` added (`prompt_file_name`)
    kohya marks highres images with a bare `0`/`1` before the index and names original-name outputs `{stem}.png`;
    `hr_` reads better, and the longer name keeps several images of one init image apart.
    """
    return f"im_{timestamp}_{_highres_prefix(highres)}{index:03d}_{seed}.png"


def sequential_file_name(number: int, *, highres: bool = False) -> str:
    """`--sequential_file_name`: `im_{hr_}{number:06d}.png`."""
    return f"im_{_highres_prefix(highres)}{number:06d}.png"


def next_sequence_number(folder: str | os.PathLike) -> int:
    """The number after the largest `im_NNNNNN.png` (or `im_hr_NNNNNN.png`) in `folder`; 1 when there is none.

    kohya restarts at 1 on every run and overwrites; continuing keeps earlier runs' images.
    """
    folder = Path(folder)
    if not folder.is_dir():
        return 1
    numbers = [int(match[1]) for match in map(_SEQUENTIAL_NAME.fullmatch, os.listdir(folder)) if match]
    return max(numbers, default=0) + 1


def original_file_name(init_image: str | os.PathLike, *, timestamp: str, index: int, seed: int,
                       highres: bool = False) -> str:
    """`--use_original_file_name`: `{init image stem}_{timestamp}_{hr_}{index:03d}_{seed}.png`."""
    stem = prompt_file_name(Path(init_image).stem).removesuffix(".png")
    return f"{stem}_{timestamp}_{_highres_prefix(highres)}{index:03d}_{seed}.png"


def prompt_file_name(name: str) -> str:
    """A prompt's `--f name` made safe: path separators and characters Windows forbids become "_", leading
    dots and spaces go (no hidden files, no ".."), and `.png` is added unless the name already ends with it.

    Raises:
        UserInputError: nothing usable is left of the name.
    """
    stem, suffix = name.strip(), ".png"
    if stem.lower().endswith(".png"):
        stem, suffix = stem[:-4], stem[-4:]
    safe_stem = _UNSAFE_NAME_CHARACTERS.sub("_", stem).lstrip(". ").rstrip()
    if not safe_stem:
        raise UserInputError(f"--f {name!r}: expected a file name for the image, got nothing usable; "
                             "write e.g. --f portrait_01")
    return safe_stem + suffix


def _claim_free_name(folder: Path, file_name: str) -> Path:
    """Create an empty `file_name` (or `stem_1.png`, `stem_2.png`, ...) exclusively and return it.

    The exclusive create ("x") is what makes two generators writing into one folder never pick the same name.
    """
    stem, suffix = file_name[:-4], file_name[-4:]
    for attempt in range(MAX_NAME_ATTEMPTS):
        candidate = folder / (file_name if attempt == 0 else f"{stem}_{attempt}{suffix}")
        try:
            with open(candidate, "x"):
                pass
        except FileExistsError:
            continue
        if attempt:
            logger.info("%s already exists; saving as %s", folder / file_name, candidate.name)
        return candidate
    raise UserInputError(f"{folder}: {file_name} and {MAX_NAME_ATTEMPTS - 1} numbered variants already exist; "
                         "choose another --outdir")


def save_png(image: Image.Image, folder: str | os.PathLike, file_name: str, record: ImageRecord) -> Path:
    """Save `image` with the record's PNG text into `folder` (created if missing) and return the path written.

    Never overwrites: when `file_name` is taken, `_1`, `_2`, ... go before `.png`. The file appears complete or
    not at all (written to a temp file, then renamed over the claimed name).

    Raises:
        UserInputError: `folder` exists but is not a folder.
        ValueError: `file_name` is a path, not a plain name (use `prompt_file_name` on user text).
    """
    if not file_name or Path(file_name).name != file_name or file_name in (".", ".."):
        raise ValueError(f"save_png: expected a plain file name, got {file_name!r}")
    if not file_name.lower().endswith(".png"):
        file_name += ".png"
    folder = Path(folder)
    if folder.exists() and not folder.is_dir():
        raise UserInputError(f"{folder}: expected a folder for the images, but it is a file")
    info = PngInfo()
    for key, text in png_text_chunks(record).items():
        info.add_text(key, text)  # PIL writes iTXt (UTF-8) when the text is not Latin-1
    # Encode before claiming the name, so the claimed but still empty file exists only for a moment.
    encoded = io.BytesIO()
    image.save(encoded, format="PNG", pnginfo=info)
    folder.mkdir(parents=True, exist_ok=True)
    target = _claim_free_name(folder, file_name)
    try:
        with atomic_output(target, overwrite=True) as temp:
            temp.write_bytes(encoded.getvalue())
    except BaseException:
        target.unlink(missing_ok=True)
        raise
    logger.debug("saved %s", target)
    return target


def _one_prompt_line_text(text: str, what: str) -> str:
    """`text` on one line. Whitespace runs become one space (CLIP's tokenizers do the same, so the conditioning
    is unchanged); " --" cannot be written, because kohya's prompt lines split options at it (COMPAT §12)."""
    single_line = " ".join(text.split())
    if " --" in single_line:
        raise UserInputError(f"the {what} {single_line!r} contains ' --', which kohya's prompt lines read as the "
                             "start of an option; regenerate this image with --from_png instead")
    return single_line


def record_to_prompt_line(record: ImageRecord) -> str:
    """The `--from_file` line that makes this image again with the same command-line flags (model, networks,
    clip skip and highres fix are flags, not prompt options, so they are not in it).

    Raises:
        UserInputError: the prompt cannot be written as one line (contains " --" or starts with "#").
    """
    prompt = _one_prompt_line_text(record.prompt, "prompt")
    if prompt.startswith("#"):
        raise UserInputError(f"the prompt {prompt!r} starts with '#', which marks a comment line in prompt files; "
                             "regenerate this image with --from_png instead")
    options: list[tuple[str, Any]] = [
        ("n", _one_prompt_line_text(record.negative_prompt, "negative prompt") or None),
        ("w", record.width), ("h", record.height), ("d", record.seed), ("s", record.steps), ("l", record.scale),
        ("nl", record.negative_scale), ("ss", record.sampler), ("t", record.strength),
        ("am", _encode("floats", record.network_multipliers)),
        ("ow", record.original_width), ("oh", record.original_height),
        ("nw", record.original_width_negative), ("nh", record.original_height_negative),
        ("ct", record.crop_top), ("cl", record.crop_left),
    ]
    return " ".join([prompt] + [f"--{name} {value}" for name, value in options if value is not None])
