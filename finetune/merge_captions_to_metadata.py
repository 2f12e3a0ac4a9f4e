"""Collect caption side files into a fine-tuning metadata JSON (kohya's finetune/merge_captions_to_metadata.py).

Each image's `<stem><caption_extension>` text becomes its "caption"; keys are file stems, or paths with
`--full_path`. An existing `--in_json` (or `out_json` itself) is updated, not replaced.
"""
from __future__ import annotations

import argparse
import logging
import sys
from pathlib import Path

from tqdm import tqdm

if __package__ in (None, ""):
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from library.cli import run_cli
from library.data.captions import read_utf8_text
from library.data.metadata import load_metadata_dict, write_metadata
from library.errors import FlagError, UserInputError

logger = logging.getLogger(__name__)

_SHOWN_NAMES = 5


def add_merge_arguments(parser: argparse.ArgumentParser, default_extension: str, what: str) -> None:
    """The flags shared by the caption and tag merge tools (kohya's spelling and defaults)."""
    parser.add_argument("train_data_dir", help="folder with the images and their side files")
    parser.add_argument("out_json", help="metadata file to write (.json; .jsonl writes one object per line)")
    parser.add_argument("--in_json", default=None,
                        help="metadata file to update; default: out_json itself when it exists, else start empty")
    parser.add_argument("--caption_extension", "--caption_extention", default=default_extension,
                        help=f"extension of the {what} files (default {default_extension}); "
                             "--caption_extention is kohya's old spelling")
    parser.add_argument("--full_path", action="store_true",
                        help="key entries by absolute image path instead of file stem (then image_dir is not needed)")
    parser.add_argument("--recursive", action="store_true",
                        help="also search sub-folders (needs --full_path: stems from different folders may collide)")
    parser.add_argument("--debug", action="store_true", help=f"log every image key with its {what}")


def setup_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__)
    add_merge_arguments(parser, ".caption", "caption")
    return parser


def check_paths(args: argparse.Namespace) -> tuple[Path, Path]:
    """The image folder and the output file, after refusing combinations that would lose data."""
    from library.data.images import is_image_file  # numpy, torch: loaded after parsing, so --help stays fast

    if args.recursive and not args.full_path:
        raise FlagError("--recursive needs --full_path: images with the same stem in different folders "
                        "would overwrite each other's entry")
    image_dir, out_json = Path(args.train_data_dir), Path(args.out_json)
    if not image_dir.is_dir():
        problem = "is a file, not a folder" if image_dir.exists() else "folder not found"
        raise UserInputError(f"{image_dir}: train_data_dir {problem}")
    if out_json.is_dir():
        raise UserInputError(f"{out_json}: out_json is a folder; expected a .json file name "
                             "(arguments are: train_data_dir out_json)")
    if is_image_file(out_json):
        raise UserInputError(f"{out_json}: out_json looks like an image; expected a .json file name")
    return image_dir, out_json


def starting_metadata(in_json: str | None, out_json: Path) -> dict[str, dict]:
    """The entries to update: `--in_json`, else an existing out_json (as kohya does), else nothing."""
    if in_json is None and out_json.is_file():
        in_json = str(out_json)
    if in_json is None:
        logger.info("starting a new metadata file")
        return {}
    metadata = load_metadata_dict(in_json)
    logger.info("updating %s (%d entries); fields of images found again are replaced", in_json, len(metadata))
    return metadata


def merge_side_files(args: argparse.Namespace, field: str) -> Path:
    """Read each image's side file into `metadata[key][field]` and write out_json; returns its path."""
    from library.data.images import IMAGE_EXTENSIONS, list_image_files

    image_dir, out_json = check_paths(args)
    extension = args.caption_extension if args.caption_extension.startswith(".") else "." + args.caption_extension
    images = list_image_files(image_dir, recursive=args.recursive)
    if not images:
        raise UserInputError(f"{image_dir}: no images found (looked for {', '.join(IMAGE_EXTENSIONS)}"
                             f"{' in sub-folders too' if args.recursive else '; add --recursive for sub-folders'})")
    logger.info("found %d images in %s", len(images), image_dir)
    metadata = starting_metadata(args.in_json, out_json)
    missing, seen_keys = [], {}
    for image in tqdm(images, desc=f"merging {field}", unit="image"):
        side_file = image.with_name(image.stem + extension)
        if not side_file.is_file():
            missing.append(side_file)
            continue
        key = str(image.absolute()) if args.full_path else image.stem
        if key in seen_keys:
            logger.warning("%s and %s share the key %r; the later one wins (use --full_path)",
                           seen_keys[key], image, key)
        seen_keys[key] = image
        text = read_utf8_text(side_file).strip()
        metadata.setdefault(key, {})[field] = text
        if args.debug:
            logger.info("%s: %s", key, text)
    _report_missing(missing, field)
    write_metadata(out_json, metadata)
    logger.info("wrote %s: %s for %d images (%d entries in total)", out_json, field, len(seen_keys), len(metadata))
    return out_json


def _report_missing(missing: list[Path], field: str) -> None:
    if missing:
        shown = ", ".join(str(path) for path in missing[:_SHOWN_NAMES]) + (" ..." if len(missing) > _SHOWN_NAMES else "")
        logger.warning("%d image(s) have no %s file and were skipped: %s", len(missing), field, shown)


def main(argv: list[str] | None = None) -> Path:
    args = setup_parser().parse_args(argv)
    return merge_side_files(args, "caption")


if __name__ == "__main__":
    run_cli(main)
