"""Turn dataset-config subsets into image records: DreamBooth folders, fine-tuning metadata, ControlNet pairs.

Owns which images a subset contributes (with captions, repeats and sizes), kohya's regularisation balancing
(COMPAT §9.4) and the validation hold-out (§9.7). Pixels, bucketing and caching live elsewhere.
"""
from __future__ import annotations

import json
import logging
import math
import os
import random
from dataclasses import dataclass, field
from pathlib import Path

from library.data.captions import read_caption_file
from library.data.images import CorruptImageError, list_image_files, parse_face_box_from_name, read_image_sizes
from library.data.metadata import assemble_caption, read_metadata, resolve_image_path
from library.dataset_config import SubsetParams
from library.errors import UserInputError

logger = logging.getLogger(__name__)

METADATA_CACHE_NAME = "metadata_cache.json"  # kohya's `cache_info` file (COMPAT §9.2)


@dataclass
class ImageInfo:
    """One training image and everything known about it before pixels are read."""

    image_key: str
    absolute_path: Path
    caption: str
    num_repeats: int
    is_reg: bool
    subset_index: int
    image_size: tuple[int, int] | None = None  # (width, height) after EXIF orientation
    conditioning_image_path: Path | None = None
    face_box: tuple[int, int, int, int] | None = None  # (cx, cy, w, h) from the file name
    # filled in by bucketing and caching
    bucket: object | None = None  # library.data.buckets.BucketAssignment
    latents_npz: Path | None = None
    latents: object | None = None  # in-memory LatentCacheEntry when --cache_latents
    text_encoder_outputs_npz: Path | None = None
    text_encoder_outputs: object | None = None  # in-memory TextEncoderOutputs
    extra: dict = field(default_factory=dict)


class MissingImagesError(UserInputError):
    """Images that cannot be read; every one is listed so the user fixes them in one go."""

    def __init__(self, problems: dict[Path, str]):
        self.problems = problems
        lines = [f"{len(problems)} image(s) cannot be read:"]
        lines += [f"  {path}: {reason}" for path, reason in sorted(problems.items())]
        super().__init__("\n".join(lines))


def subset_images(subset: SubsetParams, subset_index: int, kind: str) -> list[ImageInfo]:
    """The images of one subset with their raw captions (processing happens per sample, later)."""
    if kind == "finetune":
        return _finetune_images(subset, subset_index)
    infos = _folder_images(subset, subset_index)
    if kind == "controlnet":
        _attach_conditioning_images(subset, infos)
    return infos


def _folder_images(subset: SubsetParams, subset_index: int) -> list[ImageInfo]:
    """DreamBooth / ControlNet: images directly in `image_dir`, captions from side files or class tokens."""
    image_dir = Path(subset.image_dir)
    if not image_dir.is_dir():
        raise UserInputError(f"{image_dir}: image_dir not found (subset {subset_index})")
    cached = _read_metadata_cache(image_dir) if subset.cache_info else {}
    infos, without_caption = [], 0
    folder_names = set(os.listdir(image_dir))
    for path in list_image_files(image_dir):
        key = str(path)
        if key in cached:
            caption = cached[key]["caption"]
        else:
            caption = read_caption_file(path, subset.caption_extension, subset.enable_wildcard, folder_names)
            if caption is None:
                caption = subset.class_tokens or ""
                without_caption += subset.class_tokens is None
        size = tuple(cached[key]["resolution"]) if key in cached else None
        infos.append(ImageInfo(key, path, caption, subset.num_repeats, bool(subset.is_reg), subset_index,
                               image_size=size, face_box=parse_face_box_from_name(path)))
    if without_caption:
        logger.warning("%s: %d image(s) have neither a %s file nor class_tokens; they train with an empty caption",
                       image_dir, without_caption, subset.caption_extension)
    return infos


def _finetune_images(subset: SubsetParams, subset_index: int) -> list[ImageInfo]:
    """Fine-tuning: images named by the metadata file (absolute paths or keys relative to `image_dir`)."""
    entries = read_metadata(subset.metadata_file)
    image_dir = Path(subset.image_dir) if subset.image_dir else None
    infos, missing = [], []
    for entry in entries:
        path = resolve_image_path(image_dir, entry.image_key)
        if path is None:
            missing.append(entry.image_key)
            continue
        caption = assemble_caption(entry, subset.caption_separator, subset.enable_wildcard)
        size = tuple(entry.image_size) if entry.image_size else None
        infos.append(ImageInfo(entry.image_key, path, caption, subset.num_repeats, False, subset_index,
                               image_size=size, face_box=parse_face_box_from_name(path)))
    if missing:
        shown = ", ".join(missing[:5]) + (" ..." if len(missing) > 5 else "")
        raise UserInputError(f"{subset.metadata_file}: {len(missing)} image(s) named in the metadata were not found "
                             f"(image_dir: {image_dir}): {shown}")
    return infos


def _attach_conditioning_images(subset: SubsetParams, infos: list[ImageInfo]) -> None:
    """ControlNet: every image needs a conditioning image with the same stem (any image extension)."""
    folder = Path(subset.conditioning_data_dir)
    by_stem = {path.stem: path for path in list_image_files(folder)}
    missing = []
    for info in infos:
        match = by_stem.get(info.absolute_path.stem)
        if match is None:
            missing.append(info.absolute_path.name)
        info.conditioning_image_path = match
    if missing:
        shown = ", ".join(missing[:5]) + (" ..." if len(missing) > 5 else "")
        raise UserInputError(f"{folder}: conditioning_data_dir has no image for {len(missing)} training image(s) "
                             f"(same file stem expected): {shown}")


def fill_image_sizes(infos: list[ImageInfo], known_sizes: dict[str, tuple[int, int]] | None = None,
                     workers: int = 4, scanned_sizes: dict[Path, tuple[int, int]] | None = None) -> None:
    """Give every record its (width, height): from metadata, cache file names, an earlier scan, or the header.

    known_sizes: keyed by image path without extension (sizes parsed from cache file names).
    scanned_sizes: keyed by image path (the dataset lint's scan, so images are not read twice).
    Raises MissingImagesError listing every corrupt or unreadable image.
    """
    known_sizes, scanned_sizes = known_sizes or {}, scanned_sizes or {}
    todo = []
    for info in infos:
        if info.image_size is None:
            info.image_size = scanned_sizes.get(info.absolute_path)
        if info.image_size is None:
            stem_key = str(info.absolute_path.with_suffix(""))
            info.image_size = known_sizes.get(stem_key)
        if info.image_size is None:
            todo.append(info)
    if not todo:
        return
    sizes = read_image_sizes([info.absolute_path for info in todo], workers=workers)
    problems = {}
    for info in todo:
        size = sizes[info.absolute_path]
        if isinstance(size, CorruptImageError):
            problems[info.absolute_path] = str(size).split(": ", 1)[-1]
        else:
            info.image_size = tuple(size)
    if problems:
        raise MissingImagesError(problems)


def balance_regularization(train: list[ImageInfo], reg: list[ImageInfo]) -> list[ImageInfo]:
    """kohya's balancing (COMPAT §9.4): use reg images round-robin until they match the train count.

    The train count includes repeats. In the first pass each reg image enters with its own repeats; later
    passes add one repeat at a time. Reg images not reached in the first pass stay unused.
    """
    if not reg:
        return []
    target = sum(info.num_repeats for info in train)
    used: list[ImageInfo] = []
    count, first_pass = 0, True
    while count < target:
        for info in reg:
            if first_pass:
                used.append(info)
                count += info.num_repeats
            else:
                info.num_repeats += 1
                count += 1
            if count >= target:
                break
        first_pass = False
    if len(used) < len(reg):
        logger.warning("%d of %d regularization images are not used: the train images (x repeats) number %d",
                       len(reg) - len(used), len(reg), target)
    return used


def split_for_validation(infos: list[ImageInfo], validation_split: float, seed: int,
                         is_training: bool) -> list[ImageInfo]:
    """Hold out a share of a subset for validation (COMPAT §9.7), identically for the train and val side.

    kohya keeps the first ceil(n*(1-split)) for training and the last round(n*split) for validation, which can
    overlap by one image (n=3, split=0.5); here validation is exactly the rest, so the two never share an image.
    The shuffle uses its own RNG, so the global random state is untouched. Validation images use 1 repeat.
    """
    if validation_split <= 0:
        return list(infos) if is_training else []
    order = sorted(infos, key=lambda info: str(info.absolute_path))
    random.Random(seed).shuffle(order)
    n_train = math.ceil(len(order) * (1 - validation_split))
    if is_training:
        return order[:n_train]
    held_out = order[n_train:]
    for info in held_out:
        info.num_repeats = 1
    return held_out


def _read_metadata_cache(image_dir: Path) -> dict:
    path = image_dir / METADATA_CACHE_NAME
    if not path.exists():
        return {}
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError) as error:
        logger.warning("%s: unreadable (%s); re-scanning the folder", path, error)
        return {}
    return data if isinstance(data, dict) else {}


def write_metadata_cache(infos: list[ImageInfo], subset: SubsetParams) -> None:
    """`cache_info = true`: remember captions and sizes in `<image_dir>/metadata_cache.json` (kohya's format)."""
    from library.models.state_dict_io import atomic_output

    data = {info.image_key: {"caption": info.caption, "resolution": list(info.image_size)}
            for info in infos if info.image_size is not None}
    path = Path(subset.image_dir) / METADATA_CACHE_NAME
    with atomic_output(path) as temp:
        temp.write_text(json.dumps(data, ensure_ascii=False), encoding="utf-8")
