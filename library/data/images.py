"""Image files: finding them, reading sizes from headers, decoding to uint8 arrays, resizing, cropping to a bucket
and kohya's augmentations (COMPAT §7.1, §9.2). Which bucket an image goes to is `library.data.buckets`' job.
"""
from __future__ import annotations

import difflib
import logging
import math
import os
import struct
import time
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import cv2
import numpy as np
import torch
from PIL import Image, UnidentifiedImageError
from tqdm import tqdm

from library.data.buckets import BucketAssignment
from library.errors import FlagError, UserInputError
from library.options.choices import RESIZE_INTERPOLATIONS

logger = logging.getLogger(__name__)


def _openable_extensions(extensions: Sequence[str]) -> list[str]:
    registered = Image.registered_extensions()
    return [ext for ext in extensions if registered.get(ext) in Image.OPEN]


# kohya's list in both cases, plus .avif/.jxl when this Pillow build can open them (COMPAT §9.2)
_BASE_EXTENSIONS = [".png", ".jpg", ".jpeg", ".webp", ".bmp"]
IMAGE_EXTENSIONS: tuple[str, ...] = tuple(
    ext for lower in _BASE_EXTENSIONS + _openable_extensions([".avif", ".jxl"]) for ext in (lower, lower.upper()))
_IMAGE_SUFFIXES = frozenset(ext.lower() for ext in IMAGE_EXTENSIONS)

# Lanczos and box through PIL, the other RESIZE_INTERPOLATIONS through OpenCV (COMPAT §9.2)
_PIL_FILTERS = {"lanczos": Image.Resampling.LANCZOS, "box": Image.Resampling.BOX}
_CV2_FLAGS = {"nearest": cv2.INTER_NEAREST, "bilinear": cv2.INTER_LINEAR, "linear": cv2.INTER_LINEAR,
              "bicubic": cv2.INTER_CUBIC, "cubic": cv2.INTER_CUBIC, "area": cv2.INTER_AREA}

# EXIF orientation -> the transpose that makes the image upright (values 5-8 swap width and height)
_ORIENTATION_TRANSPOSE = {2: Image.Transpose.FLIP_LEFT_RIGHT, 3: Image.Transpose.ROTATE_180,
                          4: Image.Transpose.FLIP_TOP_BOTTOM, 5: Image.Transpose.TRANSPOSE,
                          6: Image.Transpose.ROTATE_270, 7: Image.Transpose.TRANSVERSE, 8: Image.Transpose.ROTATE_90}
_EXIF_ORIENTATION_TAG = 0x0112
# read_image_sizes: files per task, and the per-file time above which threads are worth their GIL cost
_SIZE_CHUNK = 128
_SLOW_STORAGE_SECONDS_PER_FILE = 0.0005
_PIL_ERRORS = (OSError, SyntaxError, ValueError, EOFError, struct.error, Image.DecompressionBombError)


class CorruptImageError(UserInputError):
    """An image file that cannot be read; the message is `<path>: <reason>`."""

    def __init__(self, path: object, reason: str):
        self.path, self.reason = Path(path), reason
        super().__init__(f"{path}: {reason}")


def _corrupt(path: object, error: BaseException) -> CorruptImageError:
    if isinstance(error, FileNotFoundError):
        return CorruptImageError(path, "file not found")
    if isinstance(error, UnidentifiedImageError):
        return CorruptImageError(path, "cannot identify image file (not an image, or a format Pillow cannot read)")
    return CorruptImageError(path, f"cannot read image ({type(error).__name__}: {error})")


def is_image_file(path: str | os.PathLike) -> bool:
    """True for a file name with one of IMAGE_EXTENSIONS (any letter case)."""
    return Path(path).suffix.lower() in _IMAGE_SUFFIXES


def list_image_files(folder: str | os.PathLike, recursive: bool = False) -> list[Path]:
    """Image files directly in `folder` (or below it), sorted by path string like kohya's glob.

    Hidden names (starting with ".") are skipped, as glob skips them: macOS "._x.png" files and our temp files.
    """
    folder = Path(folder)
    if not folder.is_dir():
        what = "is not a folder" if folder.exists() else "folder not found"
        raise UserInputError(f"{folder}: {what}; expected a folder of images ({', '.join(_BASE_EXTENSIONS)})")
    candidates = folder.rglob("*") if recursive else folder.iterdir()
    found = [path for path in candidates
             if is_image_file(path) and not any(part.startswith(".") for part in path.relative_to(folder).parts)
             and path.is_file()]
    return sorted(found, key=str)


def _orientation(image: Image.Image) -> int:
    """The EXIF orientation from the header bytes only (Pillow's `getexif` on PNG would decode the pixels)."""
    exif_bytes = image.info.get("exif")
    if not exif_bytes:
        return 1
    exif = Image.Exif()
    try:
        exif.load(exif_bytes)
    except _PIL_ERRORS:
        return 1
    orientation = exif.get(_EXIF_ORIENTATION_TAG, 1)
    return orientation if orientation in _ORIENTATION_TRANSPOSE else 1


def read_image_size(path: str | os.PathLike) -> tuple[int, int]:
    """(width, height) as displayed, from the header only: EXIF orientations 5-8 swap the sides.

    kohya ignores EXIF orientation; we honour it here and in `load_image` so both agree. A header read cannot
    see truncated pixel data; `load_image` reports that.

    Raises:
        CorruptImageError: the file is missing, not an image or has a broken header.
    """
    try:
        with open(path, "rb") as file:
            quick = _quick_header_size(file)
    except OSError as error:
        raise _corrupt(path, error) from error
    if quick is not None:
        return quick
    try:
        with _open_image(path) as image:
            width, height = image.size
            orientation = _orientation(image)
    except _PIL_ERRORS as error:
        raise _corrupt(path, error) from error
    return (height, width) if orientation >= 5 else (width, height)


def _quick_header_size(file) -> tuple[int, int] | None:
    """Size of a PNG/JPEG/WebP/BMP from its first bytes, 5-10x faster than `Image.open`; None -> ask Pillow.

    Anything unusual (WebP with EXIF, old BMP headers, huge images Pillow refuses, odd bytes) returns None so
    Pillow decides, and reports the problem in its own words.
    """
    head = file.read(32)
    try:
        if head.startswith(b"\x89PNG\r\n\x1a\n") and head[12:16] == b"IHDR":
            size = struct.unpack(">II", head[16:24])
            size = size[::-1] if _png_orientation(file) >= 5 else size
        elif head.startswith(b"\xff\xd8"):
            size = _jpeg_size(file)
        elif head.startswith(b"RIFF") and head[8:12] == b"WEBP":
            size = _webp_size(head)
        elif head.startswith(b"BM") and struct.unpack("<I", head[14:18])[0] >= 40:
            width, height = struct.unpack("<ii", head[18:26])
            size = (width, abs(height))
        else:
            return None
    except (struct.error, ValueError, IndexError):
        return None
    if size is None or min(size) <= 0 or size[0] * size[1] > 2 * (Image.MAX_IMAGE_PIXELS or math.inf):
        return None
    return int(size[0]), int(size[1])


def _png_orientation(file) -> int:
    """Orientation from an eXIf chunk before the image data (what Pillow sees at open), else 1."""
    file.seek(8)
    while True:
        length, chunk_type = struct.unpack(">I4s", file.read(8))
        if chunk_type == b"eXIf":
            return _exif_orientation(file.read(length))
        if chunk_type in (b"IDAT", b"IEND"):
            return 1
        file.seek(length + 4, os.SEEK_CUR)


def _jpeg_size(file) -> tuple[int, int] | None:
    """Walk the JPEG markers up to the first SOFn; the first APP1 "Exif" segment gives the orientation."""
    file.seek(2)
    orientation = None
    while True:
        marker = file.read(2)
        while marker[:1] == b"\xff" and marker[1:2] == b"\xff":  # fill bytes
            marker = marker[1:] + file.read(1)
        if len(marker) < 2 or marker[0] != 0xFF:
            return None
        code = marker[1]
        if code in (0x01, 0xD8) or 0xD0 <= code <= 0xD7:
            continue
        length = struct.unpack(">H", file.read(2))[0]
        if code in _JPEG_SOF_MARKERS:
            height, width = struct.unpack(">xHH", file.read(5))
            return (height, width) if (orientation or 1) >= 5 else (width, height)
        segment = file.read(length - 2)
        if code == 0xE1 and orientation is None and segment.startswith(b"Exif\x00\x00"):
            orientation = _exif_orientation(segment)


_JPEG_SOF_MARKERS = frozenset({0xC0, 0xC1, 0xC2, 0xC3, 0xC5, 0xC6, 0xC7, 0xC9, 0xCA, 0xCB, 0xCD, 0xCE, 0xCF})


def _exif_orientation(exif_bytes: bytes) -> int:
    """Tag 0x0112 of IFD0 in a TIFF-structured EXIF block (optionally after "Exif\\0\\0"); 1 when absent."""
    data = exif_bytes[6:] if exif_bytes.startswith(b"Exif\x00\x00") else exif_bytes
    order = {b"II": "<", b"MM": ">"}.get(data[:2])
    if order is None:
        return 1
    ifd_offset = struct.unpack(order + "I", data[4:8])[0]
    entry_count = struct.unpack(order + "H", data[ifd_offset:ifd_offset + 2])[0]
    for entry in range(entry_count):
        start = ifd_offset + 2 + 12 * entry
        tag, value_type = struct.unpack(order + "HH", data[start:start + 4])
        if tag == _EXIF_ORIENTATION_TAG:
            value_format = "H" if value_type == 3 else "I"
            value = struct.unpack_from(order + value_format, data, start + 8)[0]
            return value if value in _ORIENTATION_TRANSPOSE else 1
    return 1


def _webp_size(head: bytes) -> tuple[int, int] | None:
    chunk = head[12:16]
    if chunk == b"VP8 " and head[23:26] == b"\x9d\x01\x2a":
        width, height = struct.unpack("<HH", head[26:30])
        return width & 0x3FFF, height & 0x3FFF
    if chunk == b"VP8L" and head[20] == 0x2F:
        bits = int.from_bytes(head[21:25], "little")
        return (bits & 0x3FFF) + 1, ((bits >> 14) & 0x3FFF) + 1
    if chunk == b"VP8X" and not head[20] & 0x08:  # 0x08: has EXIF (at the end of the file): let Pillow read it
        return int.from_bytes(head[24:27], "little") + 1, int.from_bytes(head[27:30], "little") + 1
    return None


def _open_image(path: str | os.PathLike) -> Image.Image:
    """`Image.open`, trying the format the extension names first: probing every plugin costs 3x the time."""
    expected_format = Image.registered_extensions().get(Path(path).suffix.lower())
    if expected_format is not None:
        try:
            return Image.open(path, formats=[expected_format])
        except UnidentifiedImageError:
            pass  # misnamed files (a PNG saved as .jpg) are common; fall back to probing every format
    return Image.open(path)


def _sizes_or_errors(paths: list[Path]) -> list[tuple[int, int] | CorruptImageError]:
    sizes: list[tuple[int, int] | CorruptImageError] = []
    for path in paths:
        try:
            sizes.append(read_image_size(path))
        except CorruptImageError as error:
            sizes.append(error)
    return sizes


def read_image_sizes(paths: Sequence[str | os.PathLike], workers: int = 4,
                     show_progress: bool = True) -> dict[Path, tuple[int, int] | CorruptImageError]:
    """Header sizes of many images; unreadable files map to their CorruptImageError instead of raising.

    Keys are the given paths as `Path` objects, in the given order. A header read costs tens of microseconds
    of Python time, and threads fight over the GIL (measured: 4 threads read 4x fewer files per second than
    one on a warm local disk). So the first chunk is timed in this thread, and `workers` threads are used
    only when it shows slow storage (network or cold disk), where they overlap the waiting.
    """
    keys = [path if isinstance(path, Path) else Path(path) for path in paths]
    chunks = [keys[start:start + _SIZE_CHUNK] for start in range(0, len(keys), _SIZE_CHUNK)]
    results: dict[Path, tuple[int, int] | CorruptImageError] = {}
    bar = tqdm(total=len(keys), desc="reading image sizes", unit="img", disable=not show_progress or len(keys) < 2)
    started = time.perf_counter()
    for chunk in chunks[:1]:
        results.update(zip(chunk, _sizes_or_errors(chunk)))
        bar.update(len(chunk))
    seconds_per_file = (time.perf_counter() - started) / max(1, len(results))
    if workers > 1 and seconds_per_file > _SLOW_STORAGE_SECONDS_PER_FILE:
        logger.debug("slow storage (%.1f ms per header): reading with %d threads", seconds_per_file * 1e3, workers)
        with ThreadPoolExecutor(max_workers=workers) as pool:
            for chunk, sizes in zip(chunks[1:], pool.map(_sizes_or_errors, chunks[1:])):
                results.update(zip(chunk, sizes))
                bar.update(len(chunk))
    else:
        for chunk in chunks[1:]:
            results.update(zip(chunk, _sizes_or_errors(chunk)))
            bar.update(len(chunk))
    bar.close()
    failures = sum(isinstance(size, CorruptImageError) for size in results.values())
    if failures:
        logger.warning("%d of %d images could not be read", failures, len(keys))
    return results



def load_image(path: str | os.PathLike, with_alpha: bool = False) -> np.ndarray:
    """Decode to uint8 HxWx3 RGB (HxWx4 RGBA with `with_alpha`; alpha is 255 where the file has none).

    EXIF orientation is applied. Grayscale, CMYK, palette (with transparency), LA and 16-bit files are converted;
    16-bit values are scaled to 8 bits rather than clipped.

    Raises:
        CorruptImageError: the file is missing, not an image, or its pixel data is broken or truncated.
    """
    try:
        with _open_image(path) as image:
            orientation = _orientation(image)
            image.load()
            array = _to_rgb_array(image, with_alpha)
    except _PIL_ERRORS as error:
        raise _corrupt(path, error) from error
    if orientation != 1:
        array = np.asarray(Image.fromarray(array).transpose(_ORIENTATION_TRANSPOSE[orientation]))
    return np.ascontiguousarray(array)


def _to_rgb_array(image: Image.Image, with_alpha: bool) -> np.ndarray:
    target = "RGBA" if with_alpha else "RGB"
    if image.mode == "I" or image.mode.startswith("I;16"):
        wide = np.asarray(image.convert("I"), dtype=np.int64).clip(0, 65535)
        # 16-bit to 8-bit with rounding; Pillow's own convert would clip everything above 255 to white
        gray = ((wide * 255 + 32767) // 65535).astype(np.uint8)
        channels = [gray] * 3 + ([np.full_like(gray, 255)] if with_alpha else [])
        return np.stack(channels, axis=-1)
    if image.mode == target:
        return np.asarray(image, dtype=np.uint8)
    if image.mode == "P" and "transparency" in image.info:
        # through RGBA, so the palette transparency is honoured (and Pillow does not warn)
        image = image.convert("RGBA")
    return np.asarray(image.convert(target), dtype=np.uint8)


def check_interpolation(name: str | None, source: str = "resize_interpolation") -> str | None:
    """Return `name` if it is a valid interpolation (or None); else raise FlagError naming the closest one."""
    if name is None or name in RESIZE_INTERPOLATIONS:
        return name
    close = difflib.get_close_matches(str(name), RESIZE_INTERPOLATIONS, n=1)
    hint = f"; did you mean {close[0]}?" if close else ""
    raise FlagError(f"{source} {name!r}: unknown interpolation; expected one of "
                    f"{', '.join(RESIZE_INTERPOLATIONS)}{hint}")


def resize_image(image: np.ndarray, size: Sequence[int], interpolation: str | None = None) -> np.ndarray:
    """Resize an HxW(xC) uint8 array to `size` (width, height) with kohya's interpolation rule (COMPAT §9.2).

    With no name: OpenCV INTER_AREA when neither side grows, PIL Lanczos otherwise.
    """
    check_interpolation(interpolation)
    width, height = int(size[0]), int(size[1])
    if width <= 0 or height <= 0:
        raise ValueError(f"resize target must be positive, got {width}x{height}")
    if interpolation is None:
        shrinking = image.shape[1] >= width and image.shape[0] >= height
        interpolation = "area" if shrinking else "lanczos"
    if interpolation in _PIL_FILTERS:
        resized = Image.fromarray(np.ascontiguousarray(image)).resize((width, height), _PIL_FILTERS[interpolation])
        return np.asarray(resized)
    return cv2.resize(np.ascontiguousarray(image), (width, height), interpolation=_CV2_FLAGS[interpolation])


def resize_and_crop(image: np.ndarray, assignment: BucketAssignment, random_crop: bool,
                    rng: np.random.Generator | None,
                    interpolation: str | None = None) -> tuple[np.ndarray, tuple[int, int]]:
    """Resize to `assignment.resized_size`, then cut the bucket out: centered, or at a random offset.

    Returns the bucket-sized image and the crop offset (left, top) actually used.
    """
    resized_w, resized_h = assignment.resized_size
    if (image.shape[1], image.shape[0]) != (resized_w, resized_h):
        image = resize_image(image, (resized_w, resized_h), interpolation)
    bucket_w, bucket_h = assignment.bucket_reso
    if resized_w < bucket_w or resized_h < bucket_h:
        raise ValueError(f"resized size {resized_w}x{resized_h} does not cover bucket {bucket_w}x{bucket_h}")
    if random_crop and rng is None:
        raise ValueError("random_crop needs a numpy Generator")
    left = _crop_start(resized_w - bucket_w, random_crop, rng)
    top = _crop_start(resized_h - bucket_h, random_crop, rng)
    return np.ascontiguousarray(image[top:top + bucket_h, left:left + bucket_w]), (left, top)


def _crop_start(spare: int, random_crop: bool, rng: np.random.Generator | None) -> int:
    # kohya: center is spare // 2; random is uniform over 0..spare inclusive
    if spare <= 0:
        return 0
    return int(rng.integers(0, spare + 1)) if random_crop else spare // 2


def parse_face_box_from_name(path: str | os.PathLike) -> tuple[int, int, int, int] | None:
    """(cx, cy, w, h) from a name like `name_cx_cy_w_h.png` (kohya's face_crop_aug_range), else None.

    kohya uses the box only when cx > 0; we also require w, h > 0 (a zero face size would divide by zero).
    """
    tokens = Path(path).stem.split("_")
    if len(tokens) < 4:
        return None
    try:
        center_x, center_y, face_w, face_h = (int(token) for token in tokens[-4:])
    except ValueError:
        return None
    if center_x <= 0 or face_w <= 0 or face_h <= 0:
        return None
    return center_x, center_y, face_w, face_h


def face_crop(image: np.ndarray, face_center_size: Sequence[int], scale_range: Sequence[float],
              target_reso: Sequence[int], rng: np.random.Generator, random_crop: bool = False) -> np.ndarray:
    """kohya's face crop: scale so the face fills a random fraction in `scale_range`, crop around it.

    The scale is drawn so that `min(target) / face_size` lies in [1/hi, 1/lo], never enlarging unless the image
    is smaller than the target (kohya fails there; we enlarge just enough to cover). `random_crop` moves the
    crop by a triangular-ish offset like kohya; otherwise a small jitter is added when the range is not a point.
    """
    target_w, target_h = int(target_reso[0]), int(target_reso[1])
    height, width = image.shape[:2]
    if (width, height) == (target_w, target_h):
        return image
    center_x, center_y, face_w, face_h = (int(value) for value in face_center_size)
    face_size = max(face_w, face_h)
    short_side = min(target_w, target_h)
    cover_scale = max(target_h / height, target_w / width)
    low = min(1.0, max(cover_scale, short_side / (face_size * scale_range[1])))
    high = min(1.0, max(low, short_side / (face_size * scale_range[0])))
    scale = low if low >= high else float(rng.uniform(low, high))
    scale = max(scale, cover_scale)
    new_w = max(target_w, int(width * scale + 0.5))
    new_h = max(target_h, int(height * scale + 0.5))
    image = resize_image(image, (new_w, new_h))
    jitter_range = scale_range[0] != scale_range[1]
    top = _face_crop_start(new_h, target_h, int(center_y * scale + 0.5), face_size, short_side,
                           random_crop, jitter_range, rng)
    left = _face_crop_start(new_w, target_w, int(center_x * scale + 0.5), face_size, short_side,
                            random_crop, jitter_range, rng)
    return np.ascontiguousarray(image[top:top + target_h, left:left + target_w])


def _face_crop_start(length: int, target: int, face_position: int, face_size: int, short_side: int,
                     random_crop: bool, jitter_range: bool, rng: np.random.Generator) -> int:
    start = face_position - target // 2
    if random_crop:
        # kohya: the sum of two uniform draws, so the face stays near the centre more often than not
        reach = max(length - face_position, face_position)
        start += int(rng.integers(0, reach + 1)) + int(rng.integers(0, reach + 1)) - reach
    elif jitter_range and face_size > short_side // 10 and face_size >= 40:
        start += int(rng.integers(-face_size // 20, face_size // 20 + 1))
    return max(0, min(start, length - target))


def color_augment(image: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """kohya's color_aug: with probability 0.33, half the time a hue shift, else a gamma change.

    Hue: a uniform shift in [-8, 8] on OpenCV's 0..179 hue scale (wrapping), as kohya does. Gamma: uniform in
    [0.95, 1.05] applied to values normalised to 0..1, which is what albumentations' RandomGamma (the
    augmentation kohya's comment names) does; kohya's dependency-free version raises the raw 0..255 values to
    the power, a much stronger brightness change. Alpha (a 4th channel) is left alone.
    """
    if rng.random() > 0.33:
        return image
    rgb = np.ascontiguousarray(image[..., :3])
    if rng.random() > 0.5:
        hsv = cv2.cvtColor(rgb, cv2.COLOR_RGB2HSV)
        hue_shift = rng.uniform(-8.0, 8.0)
        hsv[..., 0] = ((hsv[..., 0].astype(np.float32) + hue_shift) % 180).astype(np.uint8)
        rgb = cv2.cvtColor(hsv, cv2.COLOR_HSV2RGB)
    else:
        gamma = rng.uniform(0.95, 1.05)
        table = np.clip(np.power(np.arange(256) / 255.0, gamma) * 255.0 + 0.5, 0, 255).astype(np.uint8)
        rgb = table[rgb]
    if image.shape[-1] == 4:
        return np.concatenate([rgb, image[..., 3:]], axis=-1)
    return rgb


def flip_horizontal(image: np.ndarray) -> np.ndarray:
    """Mirror left-right (kohya's flip_aug), as a contiguous copy."""
    return np.ascontiguousarray(image[:, ::-1])


def alpha_mask_from(image: np.ndarray) -> np.ndarray:
    """float32 HxW in 0..1 from the 4th channel; 1.0 everywhere for an image without alpha (COMPAT §7.1)."""
    if image.ndim == 3 and image.shape[2] == 4:
        return image[..., 3].astype(np.float32) / 255.0
    return np.ones(image.shape[:2], dtype=np.float32)


def to_model_tensor(image_rgb: np.ndarray) -> torch.Tensor:
    """uint8 HxWx3 (a 4th channel is dropped) -> float32 CxHxW in -1..1, like kohya's ToTensor + Normalize(0.5)."""
    # torch.as_tensor copies read-only arrays (PIL's np.asarray views) instead of warning about them
    pixels = torch.as_tensor(np.ascontiguousarray(image_rgb[..., :3])) if image_rgb.flags.writeable else \
        torch.tensor(np.ascontiguousarray(image_rgb[..., :3]))
    return (pixels.permute(2, 0, 1).float() / 255.0 - 0.5) / 0.5

