"""Small seeded image datasets on disk for the caching, lint and cache-tool tests (a plain module, not a conftest).

Images are random noise of a chosen size, so every file differs and bucketing has work; captions are optional.
"""
from __future__ import annotations

import argparse
import io
from pathlib import Path

import numpy as np
from PIL import Image

# A 64-px base with 32-px steps gives these buckets (COMPAT §10.1): 32x96, 32x128, 64x64, 96x32, 128x32.
BUCKET_FLAGS = ("--resolution", "64", "--enable_bucket", "--min_bucket_reso", "32", "--max_bucket_reso", "128",
                "--bucket_reso_steps", "32")
# name -> (width, height); with BUCKET_FLAGS: square and wide go to 64x64, tall and small to 32x96
SIZES = {"square": (64, 64), "wide": (96, 64), "tall": (64, 96), "small": (48, 80)}
CLASS_FOLDER = "2_sks dog"


def random_pixels(size: tuple[int, int], seed: int, channels: int = 3) -> np.ndarray:
    """uint8 HxWxC noise for an image of `size` (width, height)."""
    width, height = size
    return np.random.default_rng(seed).integers(0, 256, (height, width, channels), dtype=np.uint8)


def write_image(path: Path, size: tuple[int, int], seed: int, alpha: np.ndarray | None = None) -> Path:
    """Write a noise image (format from the suffix); `alpha` (HxW uint8) makes it an RGBA PNG."""
    pixels = random_pixels(size, seed)
    if alpha is not None:
        pixels = np.concatenate([pixels, alpha[..., None]], axis=-1)
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(pixels).save(path)
    return path


def jpeg_bytes(size: tuple[int, int], seed: int, quality: int = 90) -> bytes:
    buffer = io.BytesIO()
    Image.fromarray(random_pixels(size, seed)).save(buffer, format="JPEG", quality=quality)
    return buffer.getvalue()


def make_dreambooth_dir(train_data_dir: Path, sizes: dict[str, tuple[int, int]] | None = None,
                        captions: dict[str, str] | None = None, folder: str = CLASS_FOLDER) -> Path:
    """`<train_data_dir>/<folder>/<name>.png` for every entry of `sizes`; returns the image folder."""
    image_dir = train_data_dir / folder
    for seed, (name, size) in enumerate((sizes or SIZES).items()):
        write_image(image_dir / f"{name}.png", size, seed)
    for name, caption in (captions or {}).items():
        (image_dir / f"{name}.caption").write_text(caption, encoding="utf-8")
    return image_dir


def dataset_args(*argv: str) -> argparse.Namespace:
    """The dataset, text-encoding and training flags, parsed like a training script parses them."""
    from library.options.dataset import add_dataset_arguments
    from library.options.model import add_text_encoding_arguments
    from library.options.training import add_training_arguments

    parser = argparse.ArgumentParser()
    for add in (add_dataset_arguments, add_text_encoding_arguments, add_training_arguments):
        add(parser)
    return parser.parse_args(list(argv))


def build_group(train_data_dir: Path, *flags: str, latent_suffix: str = "sdxl", config: Path | None = None):
    """A DatasetGroup of a DreamBooth folder (or of `config`), built through the real blueprint path."""
    from library.data.group import build_dataset_group
    from library.dataset_config import build_blueprint

    source = ("--dataset_config", str(config)) if config else ("--train_data_dir", str(train_data_dir))
    args = dataset_args(*source, *flags)
    blueprint = build_blueprint(args, args.dataset_config)
    return build_dataset_group(blueprint, seed=0, latent_suffix=latent_suffix, scan_workers=1)


def npz_names(folder: Path) -> list[str]:
    return sorted(path.name for path in folder.glob("*.npz"))


def read_npz(path: Path) -> dict[str, np.ndarray]:
    with np.load(path, allow_pickle=False) as archive:
        return {key: archive[key] for key in archive.files}


def all_batches(group, epochs: int = 1) -> list[dict]:
    """Every batch of the first `epochs` epochs, in order."""
    batches = []
    for epoch in range(1, epochs + 1):
        group.set_current_epoch(epoch)
        batches.extend(group[index] for index in range(len(group)))
    return batches
