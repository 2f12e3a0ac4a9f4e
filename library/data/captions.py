"""Caption side files and per-sample caption processing (COMPAT §9.2, §9.4, §9.5).

Owns reading `<image stem><caption_extension>` files and turning a raw caption into the text one training step
sees (prefix/suffix, dropout, wildcards, keep/shuffle/tag dropout, token warmup). Textual-inversion token
replacement and tokenisation live elsewhere.
"""
from __future__ import annotations

import logging
import math
import random
import re
from dataclasses import dataclass
from pathlib import Path

from library.errors import UserInputError

logger = logging.getLogger(__name__)

# kohya re-joins processed tags with a comma and a space, whatever `caption_separator` is (COMPAT §9.5).
TAG_JOINER = ", "
# kohya treats a file name with 5 or more `_` parts as `<stem>_<cx>_<cy>_<w>_<h>` (face-crop names, COMPAT §9.4).
FACE_CROP_PARTS = 4

_WILDCARD = re.compile(r"\{([^}]+)\}")


class CaptionFileError(UserInputError):
    """A caption side file that exists but cannot be used (not UTF-8, empty)."""


@dataclass
class CaptionOptions:
    """Caption settings of one subset; field names are kohya's dataset-config keys (COMPAT §9.2)."""

    shuffle_caption: bool = False
    caption_separator: str = ","
    keep_tokens: int = 0
    keep_tokens_separator: str = ""
    secondary_separator: str | None = None
    enable_wildcard: bool = False
    caption_prefix: str | None = None
    caption_suffix: str | None = None
    caption_dropout_rate: float = 0.0
    caption_dropout_every_n_epochs: int = 0
    caption_tag_dropout_rate: float = 0.0
    token_warmup_min: int = 1
    token_warmup_step: float = 0.0

    @property
    def rearranges_tags(self) -> bool:
        """kohya only splits the caption into tags when shuffle, tag dropout or token warmup is on (§9.5 step 4)."""
        return bool(self.shuffle_caption or (self.token_warmup_step or 0) > 0
                    or (self.caption_tag_dropout_rate or 0) > 0)

    @property
    def is_deterministic(self) -> bool:
        """True when a caption always processes to the same text, so text-encoder outputs may be cached.

        Wildcards count as random because a `{a|b}` or a multi-line caption picks anew each time.
        """
        dropout = (self.caption_dropout_rate or 0) > 0 or (self.caption_dropout_every_n_epochs or 0) > 0
        return not (self.rearranges_tags or dropout or self.enable_wildcard)


def caption_file_candidates(image_path: str | Path, caption_extension: str) -> list[Path]:
    """Caption files kohya looks for, in order: `<stem><ext>`, then the face-crop stem (COMPAT §9.4).

    kohya splits the whole path at `_`; we split only the file stem so a folder name with underscores cannot
    trigger the face-crop fallback.
    """
    image_path = Path(image_path)
    if caption_extension and not caption_extension.startswith("."):
        caption_extension = "." + caption_extension  # the dataset config adds the dot too (COMPAT §9.2)
    candidates = [image_path.with_name(image_path.stem + caption_extension)]
    parts = image_path.stem.split("_")
    if len(parts) > FACE_CROP_PARTS:
        face_stem = "_".join(parts[:-FACE_CROP_PARTS])
        candidates.append(image_path.with_name(face_stem + caption_extension))
    return candidates


def read_caption_file(image_path: str | Path, caption_extension: str, enable_wildcard: bool,
                      folder_names: set[str] | None = None) -> str | None:
    """The caption for an image from its side file, or None when there is no caption file.

    folder_names: the file names in the image's folder, when the caller listed it already (one listing per
    folder instead of one stat per image: the difference is seconds on 100k-image datasets).

    Without wildcards only the first line is used (stripped); with wildcards every non-empty line is kept,
    joined by "\\n", and one is picked per use (COMPAT §9.4).

    Raises:
        CaptionFileError: the file is not UTF-8 or has no content at all.
    """
    for candidate in caption_file_candidates(image_path, caption_extension):
        exists = candidate.name in folder_names if folder_names is not None else candidate.is_file()
        if exists:
            return _caption_from_text(candidate, read_utf8_text(candidate), enable_wildcard)
    return None


def read_utf8_text(path: Path) -> str:
    """The text of a caption or tag file; a byte-order mark is dropped.

    Raises:
        CaptionFileError: the file is not UTF-8, naming the file and the first bad byte.
    """
    data = path.read_bytes()
    try:
        # utf-8-sig drops a byte-order mark, which kohya would otherwise keep as an invisible first character
        return data.decode("utf-8-sig")
    except UnicodeDecodeError as error:
        raise CaptionFileError(f"{path}: expected UTF-8 text, got byte 0x{data[error.start]:02x} at offset "
                               f"{error.start}; re-save the caption file as UTF-8") from None


def _caption_from_text(path: Path, text: str, enable_wildcard: bool) -> str:
    lines = text.splitlines()
    if not lines:
        raise CaptionFileError(f"{path}: caption file is empty; write a caption or delete the file "
                               "(then class_tokens are used)")
    if enable_wildcard:
        caption = "\n".join(line.strip() for line in lines if line.strip())
    else:
        caption = lines[0].strip()
    if not caption:
        # kohya accepts a file of blank lines and trains with an empty caption; keep that, but say so
        logger.warning("%s: caption file has no text; the image trains with an empty caption", path)
    return caption


def process_caption(caption: str, options: CaptionOptions, *, epoch: int, step: int, max_steps: int | None,
                    rng: random.Random, transform=None) -> str:
    """The caption one sample trains with: COMPAT §9.5 steps 1-5, in that order.

    Args:
        caption: raw caption (may hold several lines when wildcards are enabled).
        epoch: current epoch, 1-based (kohya's `caption_dropout_every_n_epochs` test is `epoch % N == 0`).
        step: current optimisation step, 0-based, for token warmup.
        max_steps: total steps; needed only for a fractional `token_warmup_step` (None turns that warmup off).
        rng: the only source of randomness, so a seeded rng gives the same caption again.
        transform: `(caption, rng) -> caption` applied last, unless the caption was dropped (kohya's dataset
            replacements: textual inversion's token expansion or templates).
    """
    caption = add_prefix_suffix(caption, options.caption_prefix, options.caption_suffix)
    if is_dropped(options, epoch, rng):
        return ""
    if options.enable_wildcard:
        caption = expand_wildcards(rng.choice(caption.split("\n")) if "\n" in caption else caption, rng)
    else:
        caption = caption.split("\n")[0]
    if options.rearranges_tags:
        caption = rearrange_tags(caption, options, step=step, max_steps=max_steps, rng=rng)
    elif options.keep_tokens_separator and options.keep_tokens_separator in caption:
        # kohya leaves the separator text in the caption here (COMPAT §18.3); a literal "|||" reaching the text
        # encoder is never what the user meant, so we drop it and join the parts as step 4 would.
        fixed, flexible, suffix = split_by_separator(caption, options.keep_tokens_separator, options.caption_separator)
        caption = TAG_JOINER.join(fixed + flexible + suffix)
    if options.secondary_separator:
        caption = caption.replace(options.secondary_separator, options.caption_separator)
    return caption if transform is None else transform(caption, rng)


def add_prefix_suffix(caption: str, prefix: str | None, suffix: str | None) -> str:
    """Step 1: glue prefix and suffix on with one space; they then take part in keep/shuffle like any text."""
    if prefix:
        caption = prefix + " " + caption
    if suffix:
        caption = caption + " " + suffix
    return caption


def is_dropped(options: CaptionOptions, epoch: int, rng: random.Random) -> bool:
    """Step 2: whole-caption dropout by rate, or every N-th (1-based) epoch."""
    rate = options.caption_dropout_rate or 0
    if rate > 0 and rng.random() < rate:
        return True
    every_n = options.caption_dropout_every_n_epochs or 0
    return every_n > 0 and epoch % every_n == 0


def expand_wildcards(caption: str, rng: random.Random) -> str:
    """Step 3: replace each `{a|b|c}` with one random choice; `{{` and `}}` stand for literal braces."""
    open_mark, close_mark = "\ue000", "\ue001"  # private-use characters as temporary stand-ins for `{{`/`}}`
    while open_mark in caption or close_mark in caption:
        open_mark, close_mark = open_mark + "\ue000", close_mark + "\ue001"
    caption = caption.replace("{{", open_mark).replace("}}", close_mark)
    caption = _WILDCARD.sub(lambda match: rng.choice(match.group(1).split("|")), caption)
    return caption.replace(open_mark, "{").replace(close_mark, "}")


def split_by_separator(caption: str, keep_separator: str, tag_separator: str) -> tuple[list[str], list[str], list[str]]:
    """Fixed-prefix, flexible and fixed-suffix tags around the first and second `keep_tokens_separator`.

    kohya strips each tag and drops empty ones in this form (COMPAT §9.5).
    """
    fixed_part, flexible_part = caption.split(keep_separator, 1)
    suffix_part = ""
    if keep_separator in flexible_part:
        flexible_part, suffix_part = flexible_part.split(keep_separator, 1)
    return tuple(_nonempty_tags(part, tag_separator) for part in (fixed_part, flexible_part, suffix_part))


def _nonempty_tags(text: str, tag_separator: str) -> list[str]:
    return [tag.strip() for tag in text.split(tag_separator) if tag.strip()]


def split_tags(caption: str, options: CaptionOptions) -> tuple[list[str], list[str], list[str]]:
    """Step 4 split: by `keep_tokens_separator` when present in the caption, else the first `keep_tokens` tags.

    Without the separator kohya strips each tag but keeps empty ones ("a,,b" is three tags), so `keep_tokens`
    counts positions exactly as kohya does; we match that to keep users' settings meaning the same.
    """
    if options.keep_tokens_separator and options.keep_tokens_separator in caption:
        return split_by_separator(caption, options.keep_tokens_separator, options.caption_separator)
    tags = [tag.strip() for tag in caption.strip().split(options.caption_separator)]
    keep = max(options.keep_tokens or 0, 0)
    return tags[:keep], tags[keep:], []


def warmup_tag_count(flexible_count: int, options: CaptionOptions, step: int, max_steps: int | None) -> int:
    """How many flexible tags token warmup allows at `step` (kohya's linear ramp, COMPAT §9.2).

    `token_warmup_min` tags at step 0, growing linearly to all of them at `token_warmup_step`; a value below 1
    is a fraction of `max_steps`. The arithmetic order follows kohya's so rounding agrees.
    """
    warmup_step = options.token_warmup_step or 0
    if 0 < warmup_step < 1:
        if max_steps is None:
            return flexible_count
        warmup_step = math.floor(warmup_step * max_steps)
    if not warmup_step or step >= warmup_step:
        return flexible_count
    minimum = options.token_warmup_min
    return math.floor(step * ((flexible_count - minimum) / warmup_step)) + minimum


def rearrange_tags(caption: str, options: CaptionOptions, *, step: int, max_steps: int | None,
                   rng: random.Random) -> str:
    """Step 4: split, warm up, shuffle and tag-drop the flexible tags, then join everything with ", "."""
    fixed, flexible, suffix = split_tags(caption, options)
    flexible = flexible[:max(warmup_tag_count(len(flexible), options, step, max_steps), 0)]
    if options.shuffle_caption:
        rng.shuffle(flexible)
    rate = options.caption_tag_dropout_rate or 0
    if rate > 0:
        flexible = [tag for tag in flexible if rng.random() >= rate]
    return TAG_JOINER.join(fixed + flexible + suffix)
