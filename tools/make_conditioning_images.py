"""Make the conditioning images that ControlNet-LLLite training reads from `conditioning_data_dir`: one per
training image, with the same base name (`SRC_DIR/foo.jpg` -> `DST_DIR/foo.png`).

    python tools/make_conditioning_images.py train_images conditioning_images [--kind canny]

--kind canny (the default) draws OpenCV Canny edges of the grayscale image: white lines on black, an RGB PNG of the
image's size (after its EXIF rotation, as training sees it). --low_threshold / --high_threshold are Canny's
hysteresis thresholds (0..255): a lower --high_threshold finds fainter edges. --kind depth and --kind pose need
neural models this offline tool does not have: make those images with an external preprocessor (ControlNet
annotators) and put them in the conditioning folder under the training images' base names.

Images are the types training reads (.png .jpg .jpeg .webp .bmp, any letter case; hidden files skipped), in sorted
order; with --recursive subfolders are read too and mirrored under DST_DIR. Alpha and palette images are converted
to RGB first. An existing output is kept (counted as skipped) unless --overwrite; each output is written to a temp
file and renamed, so an interrupted run leaves no half-written image. DST_DIR must not be SRC_DIR. Training looks
for each image's conditioning image directly in its subset's conditioning_data_dir (not in subfolders), so after
--recursive give each mirrored subfolder its own subset.

Exit codes:
  0  every image was written or already there (skipped)
  1  some images could not be read: each is named on stderr, the others were still written
  2  bad input, one line on stderr: SRC_DIR missing or without images, DST_DIR equal to SRC_DIR, thresholds out
     of 0..255 or low > high, --kind depth/pose, two images that would get the same output name
"""
from __future__ import annotations

import argparse
import logging
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING

if __package__ in (None, ""):
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from library.cli import run_cli
from library.errors import FlagError, UserInputError

if TYPE_CHECKING:  # numpy (and torch through the image and file modules) load where used: --help stays fast
    import numpy as np

logger = logging.getLogger(__name__)

KINDS = ("canny", "depth", "pose")
NEURAL_KINDS = {"depth": "a depth-estimation model (MiDaS, Zoe, Depth Anything)",
                "pose": "a pose-estimation model (OpenPose, DWPose)"}
OUTPUT_SUFFIX = ".png"


@dataclass
class Summary:
    """What a run did: outputs written, outputs kept because they existed, and images that could not be read."""

    written: list[Path] = field(default_factory=list)
    skipped: list[Path] = field(default_factory=list)
    failed: list[Path] = field(default_factory=list)

    @property
    def exit_code(self) -> int:
        return 1 if self.failed else 0

    def line(self) -> str:
        text = f"written {len(self.written)}, skipped {len(self.skipped)} existing, failed {len(self.failed)}"
        if self.skipped:
            text += " (--overwrite replaces existing outputs)"
        return text


def setup_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("src_dir", metavar="SRC_DIR", help="folder with the training images")
    parser.add_argument("dst_dir", metavar="DST_DIR",
                        help="folder for the conditioning images (created; must not be SRC_DIR); use it as the "
                             "dataset's conditioning_data_dir")
    parser.add_argument("--kind", choices=KINDS, default="canny",
                        help="canny (default): edge images made here; depth and pose need an external preprocessor")
    parser.add_argument("--low_threshold", type=int, default=100,
                        help="Canny: gradients below this are never edges (0..255, default 100)")
    parser.add_argument("--high_threshold", type=int, default=200,
                        help="Canny: gradients above this always start an edge (0..255, >= --low_threshold, "
                             "default 200)")
    parser.add_argument("--overwrite", action="store_true", help="replace existing outputs (default: keep them)")
    parser.add_argument("--recursive", action="store_true",
                        help="also read subfolders; outputs keep the relative path "
                             "(SRC_DIR/a/x.jpg -> DST_DIR/a/x.png)")
    parser.add_argument("--console_log_level", default=None, help="logging level (DEBUG also shows tracebacks)")
    return parser


def check_kind(kind: str) -> None:
    if kind in NEURAL_KINDS:
        raise FlagError(f"--kind {kind}: needs {NEURAL_KINDS[kind]}, which is not available offline; make the "
                        f"{kind} images with an external preprocessor (ControlNet annotators) and put them in the "
                        "conditioning folder with the training images' base names (foo.jpg -> foo.png)")


def check_thresholds(low: int, high: int) -> None:
    for flag, value in (("--low_threshold", low), ("--high_threshold", high)):
        if not 0 <= value <= 255:
            raise FlagError(f"{flag} {value}: expected a value from 0 to 255")
    if low > high:
        raise FlagError(f"--low_threshold {low} is above --high_threshold {high}; expected low <= high")


def check_folders(source: Path, destination: Path) -> None:
    if not source.exists():
        raise UserInputError(f"SRC_DIR {source}: folder not found")
    if not source.is_dir():
        raise UserInputError(f"SRC_DIR {source}: is not a folder")
    if source.resolve() == destination.resolve():
        raise FlagError(f"DST_DIR {destination}: is SRC_DIR; choose another folder so the training images are not "
                        "mixed with their conditioning images")
    if destination.exists() and not destination.is_dir():
        raise UserInputError(f"DST_DIR {destination}: exists and is not a folder")


def find_images(source: Path, destination: Path, recursive: bool) -> list[Path]:
    """The images to convert, sorted; with `recursive`, those inside DST_DIR (when it lies in SRC_DIR) are left out,
    so a second run does not make conditioning images of conditioning images."""
    from library.data.images import list_image_files

    images = list_image_files(source, recursive=recursive)
    if recursive:
        inside = destination.resolve()
        images = [path for path in images if not path.resolve().is_relative_to(inside)]
    if not images:
        hint = "" if recursive or not any(path.is_dir() for path in source.iterdir()) else \
            " (it has subfolders: add --recursive to read them)"
        raise UserInputError(f"SRC_DIR {source}: no images (.png .jpg .jpeg .webp .bmp){hint}")
    return images


def output_paths(images: list[Path], source: Path, destination: Path) -> list[Path]:
    """`DST_DIR/<relative folder>/<stem>.png` for each image; two images with one output name are refused."""
    targets: dict[Path, Path] = {}
    for image in images:
        relative = image.relative_to(source)
        target = destination / relative.parent / (relative.stem + OUTPUT_SUFFIX)
        if target in targets:
            raise UserInputError(f"SRC_DIR {source}: {targets[target].relative_to(source)} and {relative} would both "
                                 f"be written as {target}; rename one (training matches conditioning images by base "
                                 "name)")
        targets[target] = image
    return list(targets)


def canny_image(rgb: np.ndarray, low: int, high: int) -> np.ndarray:
    """White (255) edge lines on black, HxWx3 uint8, from `cv2.Canny` on the grayscale image."""
    import cv2
    import numpy as np

    edges = cv2.Canny(cv2.cvtColor(rgb, cv2.COLOR_RGB2GRAY), low, high)
    return np.repeat(edges[:, :, None], 3, axis=2)


def save_png(image: np.ndarray, target: Path, overwrite: bool) -> None:
    from PIL import Image

    from library.models.state_dict_io import atomic_output

    try:
        with atomic_output(target, overwrite=overwrite) as temp:
            Image.fromarray(image).save(temp, format="PNG")
    except OSError as error:
        raise UserInputError(f"{target}: cannot be written ({error.strerror or error})") from error


def make_conditioning_images(source: Path, destination: Path, low: int, high: int, overwrite: bool = False,
                             recursive: bool = False) -> Summary:
    """Write a Canny image for every image of `source` into `destination`; unreadable images are named on stderr
    and counted as failed, existing outputs are kept (skipped) unless `overwrite`."""
    check_folders(source, destination)  # before the imports below (torch): a wrong path is answered at once
    from tqdm import tqdm

    from library.data.images import CorruptImageError, load_image

    images = find_images(source, destination, recursive)
    targets = output_paths(images, source, destination)
    try:
        destination.mkdir(parents=True, exist_ok=True)
    except OSError as error:
        raise UserInputError(f"DST_DIR {destination}: cannot be created ({error.strerror or error})") from error
    summary = Summary()
    for image_path, target in zip(tqdm(images, desc="canny", unit="img"), targets):
        if target.exists() and not overwrite:
            summary.skipped.append(target)
            continue
        try:
            rgb = load_image(image_path)  # alpha, palette, grayscale, 16-bit -> RGB, EXIF rotation applied
        except CorruptImageError as error:
            tqdm.write(f"failed: {error}", file=sys.stderr)
            summary.failed.append(image_path)
            continue
        save_png(canny_image(rgb, low, high), target, overwrite)
        summary.written.append(target)
    return summary


def main(argv: list[str] | None = None) -> Summary:
    args = setup_parser().parse_args(argv)
    check_kind(args.kind)
    check_thresholds(args.low_threshold, args.high_threshold)
    summary = make_conditioning_images(Path(args.src_dir), Path(args.dst_dir), args.low_threshold,
                                       args.high_threshold, args.overwrite, args.recursive)
    print(summary.line())
    return summary


def command_line(argv: list[str] | None = None) -> None:
    """main() with the documented exit code: 1 when any image could not be read."""
    summary = main(argv)
    if summary.exit_code:
        sys.exit(summary.exit_code)


if __name__ == "__main__":
    run_cli(command_line)
