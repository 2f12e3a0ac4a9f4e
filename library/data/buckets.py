"""Aspect-ratio bucketing as kohya does it (COMPAT §10): the bucket list, per-image assignment, the SDXL crop
values and the grouping of items into per-bucket batches. Pure functions and dataclasses; no image I/O.
"""
from __future__ import annotations

import bisect
import logging
import math
import numbers
import random
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from typing import TypeVar

from library.errors import ConfigError, UserInputError

logger = logging.getLogger(__name__)

T = TypeVar("T")
Size = tuple[int, int]


def make_bucket_resolutions(resolution: Size, min_size: int, max_size: int, divisible: int) -> list[Size]:
    """kohya's predefined buckets for `resolution` (width, height), sorted by width then height (COMPAT §10.1)."""
    width, height = resolution
    max_area = width * height
    buckets = set()
    square_side = int(math.sqrt(max_area) // divisible) * divisible
    buckets.add((square_side, square_side))
    bucket_width = min_size
    while bucket_width <= max_size:
        bucket_height = min(max_size, int((max_area // bucket_width) // divisible) * divisible)
        if bucket_height >= min_size:
            buckets.add((bucket_width, bucket_height))
            buckets.add((bucket_height, bucket_width))
        bucket_width += divisible
    return sorted(buckets)


@dataclass(frozen=True)
class BucketSettings:
    """The bucketing keys of one dataset, already adjusted and checked; build it with `from_values`."""

    resolution: Size
    enable_bucket: bool = False
    min_bucket_reso: int = 256
    max_bucket_reso: int = 1024
    bucket_reso_steps: int = 64
    bucket_no_upscale: bool = False

    @classmethod
    def from_values(cls, resolution: int | Sequence[int], enable_bucket: bool = False,
                    min_bucket_reso: int | None = 256, max_bucket_reso: int | None = 1024,
                    bucket_reso_steps: int | None = 64, bucket_no_upscale: bool = False,
                    source: str = "dataset config") -> BucketSettings:
        """Check the values and round min/max to multiples of the step like kohya.

        `source` names the file (or "command line") in error messages.

        Raises:
            ConfigError: a resolution that is not positive, a step <= 0, or min/max that exclude the resolution.
        """
        size = _resolution_pair(resolution, source)
        if not enable_bucket:
            # kohya ignores every bucket key (and turns bucket_no_upscale off) without enable_bucket
            return cls(size, False, min_bucket_reso or 256, max_bucket_reso or 1024, bucket_reso_steps or 64, False)
        steps = 64 if bucket_reso_steps is None else bucket_reso_steps
        if not isinstance(steps, int) or steps <= 0:
            raise ConfigError(source, "bucket_reso_steps", "a positive integer (64 for SD1/2, 32 or 64 for SDXL)",
                              got=steps)
        lowest = _round_min(256 if min_bucket_reso is None else min_bucket_reso, steps)
        highest = _round_max(1024 if max_bucket_reso is None else max_bucket_reso, steps)
        if lowest > min(size):
            raise ConfigError(source, "min_bucket_reso", f"at most the smaller resolution side {min(size)}",
                              got=lowest, hint=f"set min_bucket_reso <= {min(size)} or raise resolution")
        if highest < max(size):
            raise ConfigError(source, "max_bucket_reso", f"at least the larger resolution side {max(size)}",
                              got=highest, hint=f"set max_bucket_reso >= {max(size)} or lower resolution")
        if bucket_no_upscale:
            logger.info("bucket_no_upscale: min_bucket_reso and max_bucket_reso are ignored")
        return cls(size, True, lowest, highest, steps, bool(bucket_no_upscale))


def _resolution_pair(resolution: int | Sequence[int], source: str) -> Size:
    if isinstance(resolution, int):
        resolution = (resolution, resolution)
    values = tuple(resolution)
    is_side = [isinstance(value, numbers.Integral) and not isinstance(value, bool) and value > 0 for value in values]
    if len(values) != 2 or not all(is_side):
        raise ConfigError(source, "resolution", "a positive integer or [width, height]", got=resolution)
    return int(values[0]), int(values[1])


def _round_min(value: int, steps: int) -> int:
    # kohya rounds min_bucket_reso down and max_bucket_reso up to a multiple of the step, with a warning
    if value % steps:
        logger.warning("min_bucket_reso %d is not a multiple of bucket_reso_steps %d; using %d",
                       value, steps, value - value % steps)
    return value - value % steps


def _round_max(value: int, steps: int) -> int:
    if value % steps:
        logger.warning("max_bucket_reso %d is not a multiple of bucket_reso_steps %d; using %d",
                       value, steps, value + steps - value % steps)
        return value + steps - value % steps
    return value


@dataclass(frozen=True, slots=True)
class BucketAssignment:
    """Where one image goes: bucket (w, h), the size it is resized to before the crop, the SDXL crop values.

    `aspect_error` is kohya's signed `bucket_w / bucket_h - image_w / image_h`.
    """

    bucket_reso: Size
    resized_size: Size
    crop_ltrb: tuple[float, float, float, float]
    aspect_error: float


class ImageTooSmallError(UserInputError):
    """An image side is shorter than `bucket_reso_steps` under `bucket_no_upscale`, so no bucket can hold it."""


def fit_crop_ltrb(bucket_reso: Size, image_size: Size) -> tuple[float, float, float, float]:
    """kohya's `crop_ltrb`: the image *fitted inside* the bucket, not the real crop (COMPAT §10.4, §18.6)."""
    bucket_w, bucket_h = bucket_reso
    image_aspect = image_size[0] / image_size[1]
    if bucket_w / bucket_h > image_aspect:
        fitted_w, fitted_h = bucket_h * image_aspect, bucket_h
    else:
        fitted_w, fitted_h = bucket_w, bucket_w / image_aspect
    left = (bucket_w - fitted_w) // 2
    top = (bucket_h - fitted_h) // 2
    return float(left), float(top), float(left + fitted_w), float(top + fitted_h)


def crop_top_left_for_sdxl(crop_ltrb: Sequence[float], bucket_reso: Size, flipped: bool) -> tuple[float, float]:
    """(top, left) for SDXL's `crop_top_lefts`; a flipped sample uses `left = bucket_w - right` (COMPAT §10.4)."""
    left, top, right, _ = crop_ltrb
    if flipped:
        left = bucket_reso[0] - right
    return top, left


class BucketAssigner:
    """Assigns images to buckets for one dataset; results are cached per distinct image size."""

    def __init__(self, settings: BucketSettings):
        self.settings = settings
        self.max_area = settings.resolution[0] * settings.resolution[1]
        if settings.enable_bucket and not settings.bucket_no_upscale:
            self.predefined = make_bucket_resolutions(settings.resolution, settings.min_bucket_reso,
                                                      settings.max_bucket_reso, settings.bucket_reso_steps)
            candidates = self.predefined
        else:
            self.predefined = []
            # without enable_bucket kohya uses one predefined bucket, the resolution itself (COMPAT §10.3)
            candidates = [] if settings.enable_bucket else [settings.resolution]
        self._candidates = list(candidates)
        self._candidate_set = set(candidates)
        self._sorted_aspects, self._first_index = _aspect_index(candidates)
        self._cache: dict[Size, BucketAssignment] = {}

    def assign(self, image_size: Sequence[int]) -> BucketAssignment:
        """The bucket, resized size and crop values of an image of `image_size` (width, height)."""
        key = (int(image_size[0]), int(image_size[1]))
        cached = self._cache.get(key)
        if cached is None:
            cached = self._cache[key] = self._compute(key)
        return cached

    def _compute(self, image_size: Size) -> BucketAssignment:
        width, height = image_size
        if width <= 0 or height <= 0:
            raise UserInputError(f"image size {width}x{height}: expected positive width and height")
        if self._candidates:
            bucket_reso = self._closest_bucket(image_size)
            resized_size = _cover_size(image_size, bucket_reso)
        else:
            resized_size = self._no_upscale_size(image_size)
            steps = self.settings.bucket_reso_steps
            bucket_reso = (resized_size[0] - resized_size[0] % steps, resized_size[1] - resized_size[1] % steps)
            if 0 in bucket_reso:
                raise ImageTooSmallError(
                    f"image of {width}x{height}: a side is shorter than bucket_reso_steps={steps}, so "
                    "bucket_no_upscale has no bucket for it; enlarge or remove the image")
        aspect_error = bucket_reso[0] / bucket_reso[1] - width / height
        return BucketAssignment(bucket_reso, resized_size, fit_crop_ltrb(bucket_reso, image_size), aspect_error)

    def _closest_bucket(self, image_size: Size) -> Size:
        # kohya: the exact size if it is a bucket, else the smallest |bucket aspect - image aspect|, first on ties
        if image_size in self._candidate_set:
            return image_size
        aspect = image_size[0] / image_size[1]
        aspects = self._sorted_aspects
        position = bisect.bisect_left(aspects, aspect)
        if position == 0:
            return self._candidates[self._first_index[0]]
        if position == len(aspects):
            return self._candidates[self._first_index[-1]]
        below, above = aspect - aspects[position - 1], aspects[position] - aspect
        index_below, index_above = self._first_index[position - 1], self._first_index[position]
        if above < below or (above == below and index_above < index_below):
            return self._candidates[index_above]
        return self._candidates[index_below]

    def _no_upscale_size(self, image_size: Size) -> Size:
        """kohya's bucket_no_upscale resize: keep small images, shrink large ones to area A (COMPAT §10.3)."""
        width, height = image_size
        if width * height <= self.max_area:
            return image_size
        aspect = width / height
        area_width = math.sqrt(self.max_area * aspect)
        area_height = self.max_area / area_width
        steps = self.settings.bucket_reso_steps
        width_rounded = _round_to_steps(area_width, steps)
        height_for_width = _round_to_steps(width_rounded / aspect, steps)
        error_width_variant = _aspect_distance(width_rounded, height_for_width, aspect)
        height_rounded = _round_to_steps(area_height, steps)
        width_for_height = _round_to_steps(height_rounded * aspect, steps)
        error_height_variant = _aspect_distance(width_for_height, height_rounded, aspect)
        # kohya keeps the width variant only when strictly better; sides are rounded half up
        if error_width_variant < error_height_variant:
            return width_rounded, int(width_rounded / aspect + 0.5)
        return int(height_rounded * aspect + 0.5), height_rounded


def _aspect_index(candidates: list[Size]) -> tuple[list[float], list[int]]:
    """Distinct bucket aspect ratios in ascending order, each with the first bucket index that has it."""
    by_aspect: dict[float, int] = {}
    for index, (bucket_w, bucket_h) in enumerate(candidates):
        by_aspect.setdefault(bucket_w / bucket_h, index)
    aspects = sorted(by_aspect)
    return aspects, [by_aspect[aspect] for aspect in aspects]


def _cover_size(image_size: Size, bucket_reso: Size) -> Size:
    """Resize to cover the bucket: match the height when the image is relatively wider, else the width."""
    width, height = image_size
    if width / height > bucket_reso[0] / bucket_reso[1]:
        scale = bucket_reso[1] / height
    else:
        scale = bucket_reso[0] / width
    return int(width * scale + 0.5), int(height * scale + 0.5)


def _round_to_steps(value: float, steps: int) -> int:
    """kohya's R(x): round half up to an int, then drop the remainder modulo the step."""
    rounded = int(value + 0.5)
    return rounded - rounded % steps


def _aspect_distance(width: int, height: int, aspect: float) -> float:
    return abs(width / height - aspect) if height > 0 else math.inf


def group_into_batches(bucket_to_items: dict[Size, list[T]], batch_size: int) -> list[list[T]]:
    """Cut each bucket (in sorted bucket order) into batches of `batch_size`; the last one may be short."""
    if not isinstance(batch_size, int) or batch_size <= 0:
        raise UserInputError(f"batch_size: expected a positive integer, got {batch_size!r}")
    batches = []
    for bucket_reso in sorted(bucket_to_items):
        items = bucket_to_items[bucket_reso]
        batches.extend(items[start:start + batch_size] for start in range(0, len(items), batch_size))
    return batches


def shuffled_batches(batches: Sequence[list[T]], seed: int, epoch: int) -> list[list[T]]:
    """The batch order of one epoch: a shuffle seeded with `seed + epoch` (kohya's order, COMPAT §10.5).

    Uses its own `random.Random`, so the global RNG is untouched. Items keep their batches; use
    `epoch_batches` to also reshuffle the items inside each bucket.
    """
    order = list(batches)
    random.Random(seed + epoch).shuffle(order)
    return order


def epoch_batches(bucket_to_items: dict[Size, list[T]], batch_size: int, seed: int, epoch: int) -> list[list[T]]:
    """Batches of one epoch with kohya's two shuffles, both from `Random(seed + epoch)` (COMPAT §10.5).

    First the (bucket, batch number) order is shuffled, then the items inside each bucket (sorted bucket
    order), and the batches are cut from the shuffled buckets. kohya shuffles the buckets in place, so its
    epoch N starts from epoch N-1's order; here every epoch starts from the given order, so the result
    depends on (seed, epoch) only.
    """
    if not isinstance(batch_size, int) or batch_size <= 0:
        raise UserInputError(f"batch_size: expected a positive integer, got {batch_size!r}")
    rng = random.Random(seed + epoch)
    buckets = [list(bucket_to_items[bucket_reso]) for bucket_reso in sorted(bucket_to_items)]
    slots = [(bucket_index, start) for bucket_index, items in enumerate(buckets)
             for start in range(0, len(items), batch_size)]
    rng.shuffle(slots)
    for items in buckets:
        rng.shuffle(items)
    return [buckets[bucket_index][start:start + batch_size] for bucket_index, start in slots]


def bucket_histogram(assignments: Iterable[BucketAssignment]) -> dict[Size, int]:
    """Number of images per bucket, keyed by bucket (w, h) in sorted order."""
    counts: dict[Size, int] = {}
    for assignment in assignments:
        counts[assignment.bucket_reso] = counts.get(assignment.bucket_reso, 0) + 1
    return dict(sorted(counts.items()))


def format_bucket_histogram(histogram: dict[Size, int]) -> str:
    """One line such as "512x512: 10, 448x576: 3": most used buckets first, then by size."""
    ordered = sorted(histogram.items(), key=lambda item: (-item[1], item[0]))
    return ", ".join(f"{width}x{height}: {count}" for (width, height), count in ordered) or "(no images)"


def mean_aspect_error(assignments: Iterable[BucketAssignment]) -> float:
    """Mean of |aspect_error|, the figure kohya logs and stores in `bucket_info` (0.0 for no images)."""
    errors = [abs(assignment.aspect_error) for assignment in assignments]
    return sum(errors) / len(errors) if errors else 0.0
