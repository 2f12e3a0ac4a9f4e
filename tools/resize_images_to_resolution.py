"""Shrink every image of a folder to fit one or more maximum areas, keeping the aspect ratio (kohya's tool).

For each image and each --max_resolution WxH, an image larger than W*H pixels is scaled down to about that
area (never enlarged), its sides are cut down to multiples of --divisible_by by a center crop, and it is saved
as `<stem>+<WxH>.jpg` (or .png with --save_as_png). Other files are copied unchanged, like kohya; with
--copy_associated_files, files with the image's stem (captions) are also copied as `<stem>+<WxH><ext>`.
"""
from __future__ import annotations

import argparse
import logging
import math
import shutil
import sys
from pathlib import Path
from typing import TYPE_CHECKING

if __package__ in (None, ""):
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from PIL import Image
from tqdm import tqdm

from library.cli import run_cli
from library.errors import FlagError, UserInputError

if TYPE_CHECKING:  # numpy, and torch through the image and file modules, load where used: --help stays fast
    import numpy as np

logger = logging.getLogger(__name__)

INTERPOLATIONS = ("area", "cubic", "lanczos4")


def setup_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("src_img_folder", help="folder with the source images")
    parser.add_argument("dst_img_folder", help="folder for the resized images (created; must differ from the source)")
    parser.add_argument("--max_resolution", default="512x512,384x384,256x256,128x128",
                        help="comma-separated maximum sizes WxH; only the area W*H matters "
                             "(default: 512x512,384x384,256x256,128x128)")
    parser.add_argument("--divisible_by", type=int, default=1,
                        help="crop both sides down to a multiple of this many pixels (default: 1)")
    parser.add_argument("--interpolation", choices=INTERPOLATIONS, default=None,
                        help="area (OpenCV, the default), cubic (PIL bicubic) or lanczos4 (PIL Lanczos)")
    parser.add_argument("--save_as_png", action="store_true", help="write PNG instead of JPEG (quality 100)")
    parser.add_argument("--copy_associated_files", action="store_true",
                        help="also copy files with the image's stem (captions etc.) as <stem>+<WxH><ext>")
    parser.add_argument("--console_log_level", default=None, help="logging level (DEBUG also shows tracebacks)")
    return parser


def parse_max_resolutions(text: str) -> list[tuple[str, int]]:
    """'512x512,384x384' -> [('512x512', 262144), ('384x384', 147456)] (the label and the pixel budget)."""
    parsed = []
    for part in (piece.strip() for piece in text.split(",")):
        sides = part.split("x")
        if len(sides) != 2 or not all(side.strip().isdigit() and int(side) > 0 for side in sides):
            raise FlagError(f"--max_resolution {text!r}: expected comma-separated WxH sizes like 512x512, "
                            f"got {part!r}")
        parsed.append((part, int(sides[0]) * int(sides[1])))
    return parsed


def target_size(width: int, height: int, max_pixels: int) -> tuple[tuple[int, int], bool]:
    """(scaled size before the crop, whether it shrinks): kohya scales both sides by sqrt(max / current)."""
    if width * height <= max_pixels:
        return (width, height), False
    factor = math.sqrt(max_pixels / (width * height))
    return (int(width * factor), int(height * factor)), True


def resize_to_area(image: np.ndarray, max_pixels: int, divisible_by: int, interpolation: str | None) -> np.ndarray:
    """Shrink `image` to at most `max_pixels`, then center-crop both sides to multiples of `divisible_by`."""
    height, width = image.shape[:2]
    (new_w, new_h), shrinks = target_size(width, height, max_pixels)
    if shrinks:
        image = _resize(image, (new_w, new_h), interpolation)
    crop_w, crop_h = new_w - new_w % divisible_by, new_h - new_h % divisible_by
    top, left = (image.shape[0] - crop_h) // 2, (image.shape[1] - crop_w) // 2
    return image[top:top + crop_h, left:left + crop_w]


def _resize(image: np.ndarray, size: tuple[int, int], interpolation: str | None) -> np.ndarray:
    import numpy as np

    from library.data.images import resize_image

    # kohya's tool: cubic and lanczos4 go through PIL, everything else is OpenCV INTER_AREA
    if interpolation == "cubic":
        return np.asarray(Image.fromarray(image).resize(size, Image.Resampling.BICUBIC))
    return resize_image(image, size, "lanczos" if interpolation == "lanczos4" else "area")


def _check_folders(source: Path, destination: Path) -> None:
    if not source.is_dir():
        raise UserInputError(f"{source}: source folder not found")
    if source.resolve() == destination.resolve():
        raise FlagError(f"dst_img_folder {destination}: is the source folder; choose another folder so the "
                        "originals are not mixed with (or replaced by) the resized copies")
    if destination.exists() and not destination.is_dir():
        raise UserInputError(f"{destination}: exists and is not a folder")


def _copy(source: Path, destination: Path) -> None:
    from library.models.state_dict_io import atomic_output

    with atomic_output(destination, overwrite=True) as temp:
        shutil.copyfile(source, temp)


def _save(image: np.ndarray, destination: Path, as_png: bool) -> None:
    from library.models.state_dict_io import atomic_output

    with atomic_output(destination, overwrite=True) as temp:
        Image.fromarray(image).save(temp, format="PNG" if as_png else "JPEG", quality=100)


def resize_folder(source: Path, destination: Path, max_resolutions: list[tuple[str, int]], divisible_by: int,
                  interpolation: str | None, save_as_png: bool, copy_associated_files: bool) -> list[Path]:
    """Write the resized images (and copies) into `destination`; returns the written paths in order."""
    from library.data.images import CorruptImageError, is_image_file, load_image

    _check_folders(source, destination)
    destination.mkdir(parents=True, exist_ok=True)
    files = sorted(path for path in source.iterdir() if path.is_file() and not path.name.startswith("."))
    stems_with_images = {path.stem for path in files if is_image_file(path)}
    written: list[Path] = []
    unreadable = 0
    for path in tqdm(files, desc="resizing", unit="file"):
        if not is_image_file(path):
            targets = [destination / path.name]
            if copy_associated_files and path.stem in stems_with_images:
                targets += [destination / f"{path.stem}+{label}{path.suffix}" for label, _ in max_resolutions]
            for target in targets:
                _copy(path, target)
            written += targets
            continue
        try:
            image = load_image(path)
        except CorruptImageError as error:
            logger.warning("skipped: %s", error)
            unreadable += 1
            continue
        # every size is made from the original (kohya chains them, resizing the previous result again)
        for label, max_pixels in max_resolutions:
            target = destination / f"{path.stem}+{label}{'.png' if save_as_png else '.jpg'}"
            _save(resize_to_area(image, max_pixels, divisible_by, interpolation), target, save_as_png)
            written.append(target)
    if unreadable:
        logger.warning("%d images could not be read and were skipped", unreadable)
    return written


def main(argv: list[str] | None = None) -> list[Path]:
    args = setup_parser().parse_args(argv)
    if args.divisible_by < 1:
        raise FlagError(f"--divisible_by {args.divisible_by}: expected a positive integer")
    max_resolutions = parse_max_resolutions(args.max_resolution)
    written = resize_folder(Path(args.src_img_folder), Path(args.dst_img_folder), max_resolutions,
                            args.divisible_by, args.interpolation, args.save_as_png, args.copy_associated_files)
    logger.info("wrote %d files to %s", len(written), args.dst_img_folder)
    return written


if __name__ == "__main__":
    run_cli(main)
