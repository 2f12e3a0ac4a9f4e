"""Tiny images and dataset configs on disk for the dataset tests, and the parser scripts use to read dataset flags.

A plain module (not a conftest): tests import what they need. Images are seeded random noise, 32-128 px.
"""
from __future__ import annotations

import argparse
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import toml
from PIL import Image

from library.data.group import DatasetGroup, build_dataset_group
from library.dataset_config import DatasetGroupBlueprint, build_blueprint
from library.options.dataset import add_dataset_arguments
from library.options.model import add_text_encoding_arguments
from library.options.training import add_training_arguments

EXIF_ORIENTATION_TAG = 0x0112


def noise_pixels(size: tuple[int, int], seed: int = 0, channels: int = 3) -> np.ndarray:
    """uint8 H x W x channels of seeded noise for an image of `size` (width, height)."""
    width, height = size
    return np.random.default_rng(seed).integers(0, 256, (height, width, channels), dtype=np.uint8)


def write_image(path: Path, size: tuple[int, int] = (64, 64), seed: int = 0, pixels: np.ndarray | None = None,
                exif_orientation: int | None = None) -> np.ndarray:
    """Write noise (or `pixels`) as PNG/JPEG by the suffix; RGBA when `pixels` has 4 channels. Returns the pixels."""
    if pixels is None:
        pixels = noise_pixels(size, seed)
    path.parent.mkdir(parents=True, exist_ok=True)
    options = {}
    if exif_orientation is not None:
        exif = Image.Exif()
        exif[EXIF_ORIENTATION_TAG] = exif_orientation
        options["exif"] = exif
    if path.suffix.lower() in (".jpg", ".jpeg"):
        options["quality"] = 95
    Image.fromarray(pixels).save(path, **options)
    return pixels


def write_images(folder: Path, sizes: Sequence[tuple[int, int]], stem: str = "img", suffix: str = ".png",
                 seed: int = 0) -> list[Path]:
    """`<stem>0<suffix>`, `<stem>1<suffix>`, ... in `folder`, one per size, each with its own noise."""
    paths = []
    for number, size in enumerate(sizes):
        path = folder / f"{stem}{number}{suffix}"
        write_image(path, size, seed=seed * 1000 + number)
        paths.append(path)
    return paths


def dataset_parser() -> argparse.ArgumentParser:
    """The flag groups a training script composes for its dataset (dataset, text encoding, training)."""
    parser = argparse.ArgumentParser()
    for add in (add_dataset_arguments, add_text_encoding_arguments, add_training_arguments):
        add(parser)
    return parser


def parse_args(*argv: str) -> argparse.Namespace:
    return dataset_parser().parse_args(list(argv))


def write_dataset_config(path: Path, config: dict) -> Path:
    """A `--dataset_config` TOML from a dict ({"general": ..., "datasets": [{..., "subsets": [...]}]})."""
    path.write_text(toml.dumps(config), encoding="utf-8")
    return path


def blueprint_from_config(tmp_path: Path, config: dict, *argv: str,
                          supports_controlnet: bool = False) -> DatasetGroupBlueprint:
    config_path = write_dataset_config(tmp_path / "dataset.toml", config)
    args = parse_args("--dataset_config", str(config_path), *argv)
    return build_blueprint(args, args.dataset_config, supports_controlnet=supports_controlnet)


def group_from_config(tmp_path: Path, config: dict, *argv: str, seed: int = 0, validation: bool = False,
                      supports_controlnet: bool = False) -> DatasetGroup | None:
    """Write `config` as TOML, resolve it with `argv` as the command line, build the (validation) group."""
    blueprint = blueprint_from_config(tmp_path, config, *argv, supports_controlnet=supports_controlnet)
    return build_dataset_group(blueprint, seed=seed, validation=validation, scan_workers=1)


def one_subset_config(image_dir: Path, resolution: int | list[int] = 64, **keys) -> dict:
    """One DreamBooth dataset with one subset; keys whose names are dataset-level go to the dataset table."""
    dataset_keys = {"batch_size", "enable_bucket", "min_bucket_reso", "max_bucket_reso", "bucket_reso_steps",
                    "bucket_no_upscale", "network_multiplier", "validation_split", "validation_seed"}
    dataset = {"resolution": resolution, **{key: value for key, value in keys.items() if key in dataset_keys}}
    subset = {"image_dir": str(image_dir), **{key: value for key, value in keys.items() if key not in dataset_keys}}
    dataset["subsets"] = [subset]
    return {"datasets": [dataset]}


def all_batches(group: DatasetGroup, epoch: int = 1) -> list[dict]:
    """Every batch of one epoch, in group order."""
    group.set_current_epoch(epoch)
    return [group[index] for index in range(len(group))]
