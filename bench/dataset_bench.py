"""Benchmark the dataset code paths: header scan + bucketing of many files, data-loader throughput at 1024 px,
and latent caching with the tiny SDXL VAE (a first pass, then a second pass that should compute nothing).

Files are generated once under `--workdir` (one small PNG/JPEG pair per size, hard-linked N times) and reused.
Targets: scanning + bucketing 100,000 images in at most 10 s on a 2-core machine.

    python bench/dataset_bench.py [--images 100000] [--workdir bench/_work] [--loader_images 64] [--workers 2]
"""
from __future__ import annotations

import argparse
import logging
import os
import shutil
import sys
import time
from pathlib import Path

import numpy as np
from PIL import Image

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

logger = logging.getLogger(__name__)

# widths x heights of the scanned files: 8 x 8 = 64 sizes from 320 to 2560 px, so most aspect ratios occur
SCAN_SIDES = tuple(range(320, 2561, 320))
LOADER_SIZES = ((1024, 1024), (1152, 896), (896, 1152), (1216, 832))
CACHE_SIZES = ((512, 512), (640, 384), (384, 640), (576, 448))


def smooth_pixels(size: tuple[int, int], seed: int) -> np.ndarray:
    """uint8 HxWx3 that compresses like a photo: upscaled coarse noise plus a little fine noise."""
    width, height = size
    rng = np.random.default_rng(seed)
    coarse = Image.fromarray(rng.integers(0, 256, (12, 12, 3), dtype=np.uint8)).resize((width, height),
                                                                                          Image.Resampling.BICUBIC)
    fine = rng.integers(-6, 7, (height, width, 3))
    return np.clip(np.asarray(coarse, dtype=np.int16) + fine, 0, 255).astype(np.uint8)


def write_templates(folder: Path) -> list[Path]:
    """One PNG and one JPEG per scan size (flat colour: small files, real headers)."""
    folder.mkdir(parents=True, exist_ok=True)
    templates = []
    for width in SCAN_SIDES:
        for height in SCAN_SIDES:
            image = Image.new("RGB", (width, height), (width % 256, height % 256, 128))
            for suffix in (".png", ".jpg"):
                path = folder / f"t_{width}x{height}{suffix}"
                image.save(path)
                templates.append(path)
    return templates


def make_scan_tree(workdir: Path, count: int) -> Path:
    """`<workdir>/scan_<count>/10_sks dog/` with `count` hard links to the templates; reused when complete."""
    from tqdm import tqdm

    train_dir = workdir / f"scan_{count}"
    image_dir = train_dir / "10_sks dog"
    done = train_dir / "complete"
    if done.exists():
        return train_dir
    shutil.rmtree(train_dir, ignore_errors=True)
    image_dir.mkdir(parents=True)
    templates = write_templates(workdir / "templates")
    for index in tqdm(range(count), desc="creating files", unit="file"):
        template = templates[index % len(templates)]
        target = image_dir / f"img{index:06d}{template.suffix}"
        try:
            os.link(template, target)
        except OSError:  # file systems without hard links
            shutil.copyfile(template, target)
    done.write_text(str(count))
    return train_dir


def dataset_args(*argv: str) -> argparse.Namespace:
    from library.options.dataset import add_dataset_arguments
    from library.options.model import add_text_encoding_arguments
    from library.options.training import add_training_arguments

    parser = argparse.ArgumentParser()
    for add in (add_dataset_arguments, add_text_encoding_arguments, add_training_arguments):
        add(parser)
    return parser.parse_args(list(argv))


def report(label: str, count: int, seconds: float) -> None:
    print(f"  {label:<62s} {count:>7d} images {seconds:8.2f} s {count / max(seconds, 1e-9):10.1f} images/s")


def bench_scan(workdir: Path, count: int) -> None:
    """Header scan + buckets, alone and through the real group builder; then the lint that training runs first."""
    from library.data.buckets import BucketAssigner, BucketSettings
    from library.data.group import build_dataset_group
    from library.data.images import list_image_files, read_image_sizes
    from library.data.lint import lint_dataset
    from library.dataset_config import build_blueprint

    train_dir = make_scan_tree(workdir, count)
    print(f"(1) scan + bucketing, {count} files in {train_dir}")
    started = time.perf_counter()
    paths = list_image_files(train_dir / "10_sks dog")
    sizes = read_image_sizes(paths, show_progress=False)
    assigner = BucketAssigner(BucketSettings.from_values(resolution=(1024, 1024), enable_bucket=True,
                                                         min_bucket_reso=256, max_bucket_reso=2048))
    buckets = {assigner.assign(size).bucket_reso for size in sizes.values()}
    report(f"list + read_image_sizes + BucketAssigner ({len(buckets)} buckets)", len(paths),
           time.perf_counter() - started)

    args = dataset_args("--train_data_dir", str(train_dir), "--resolution", "1024", "--enable_bucket",
                        "--max_bucket_reso", "2048")
    started = time.perf_counter()
    blueprint = build_blueprint(args, None)
    group = build_dataset_group(blueprint, seed=0, latent_suffix="sdxl", scan_workers=2)
    report("build_dataset_group (captions, headers, buckets, batches)", len(group.images),
           time.perf_counter() - started)

    started = time.perf_counter()
    lint = lint_dataset(blueprint, workers=2)
    report(f"lint_dataset (+ truncation check, {len(lint.duplicates)} duplicate groups)", lint.images_scanned,
           time.perf_counter() - started)


def write_photo_folder(folder: Path, count: int, sizes: tuple[tuple[int, int], ...], suffix: str) -> Path:
    """`count` photo-like images cycling through `sizes`, written once; returns the DreamBooth parent folder."""
    image_dir = folder / "1_photo"
    image_dir.mkdir(parents=True, exist_ok=True)
    for index in range(count):
        path = image_dir / f"photo{index:04d}{suffix}"
        if not path.exists():
            Image.fromarray(smooth_pixels(sizes[index % len(sizes)], seed=index)).save(path, quality=90)
    return folder


def bench_loader(workdir: Path, count: int, workers: int) -> None:
    """Decode + resize + crop (+ flip, + colour augmentation) through the DataLoader the trainer uses."""
    from library.data.group import build_dataset_group
    from library.dataset_config import build_blueprint

    train_dir = write_photo_folder(workdir / f"loader_{count}", count, LOADER_SIZES, ".jpg")
    print(f"(2) data loader, {count} JPEGs of about 1024 px, batch size 4, num_workers={workers}")
    for label, extra in (("flip_aug", ["--flip_aug"]), ("flip_aug + color_aug", ["--flip_aug", "--color_aug"])):
        args = dataset_args("--train_data_dir", str(train_dir), "--resolution", "1024", "--enable_bucket",
                            "--max_bucket_reso", "2048", "--train_batch_size", "4", *extra)
        group = build_dataset_group(build_blueprint(args, None), seed=0, latent_suffix="sdxl")
        group.set_current_epoch(1)
        loader = group.data_loader(workers=workers, persistent=False)
        started = time.perf_counter()
        images = sum(len(batch["captions"]) for batch in loader)
        report(f"{label} (incl. worker start-up)", images, time.perf_counter() - started)


def bench_caching(workdir: Path, count: int) -> None:
    """Latent caching to disk with the tiny SDXL VAE at about 512 px, then a second pass over the same files."""
    from library.data.caching import cache_latents
    from library.data.group import build_dataset_group
    from library.dataset_config import build_blueprint
    from library.models.tiny import build_tiny_bundle

    train_dir = write_photo_folder(workdir / f"cache_{count}", count, CACHE_SIZES, ".png")
    for stale in train_dir.glob("*/*.npz"):
        stale.unlink()
    vae = build_tiny_bundle("sdxl").vae
    args = dataset_args("--train_data_dir", str(train_dir), "--resolution", "512", "--enable_bucket")
    print(f"(3) latent caching, {count} PNGs of about 512 px, tiny SDXL VAE, vae_batch_size 4")
    for label in ("first pass", "second pass"):
        group = build_dataset_group(build_blueprint(args, None), seed=0, latent_suffix="sdxl")
        started = time.perf_counter()
        stats = cache_latents(group, vae, to_disk=True, latent_suffix="sdxl", vae_batch_size=4, show_progress=False)
        report(f"{label}: {stats.computed} computed, {stats.reused} reused", len(group.images),
               time.perf_counter() - started)
    report("for reference: vae.encode alone, one batch of 4 at 512x512", 4, time_bare_encode(vae))


def time_bare_encode(vae) -> float:
    """Seconds for the VAE alone on 4 images, so the caching overhead (decode, resize, write) shows."""
    import torch

    pixels = torch.rand(4, 3, 512, 512, generator=torch.Generator().manual_seed(0)) * 2 - 1
    with torch.no_grad():
        started = time.perf_counter()
        vae.encode(pixels).latent_dist.sample()
        return time.perf_counter() - started


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--images", type=int, default=100_000, help="files for the scan benchmark")
    parser.add_argument("--workdir", type=Path, default=ROOT / "bench" / "_work", help="where files are generated")
    parser.add_argument("--loader_images", type=int, default=64, help="1024-px JPEGs for the data-loader benchmark")
    parser.add_argument("--cache_images", type=int, default=16, help="512-px PNGs for the caching benchmark")
    parser.add_argument("--workers", type=int, default=2, help="DataLoader worker processes")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.WARNING)
    print(f"dataset benchmark on {os.cpu_count()} CPUs")
    bench_scan(args.workdir, args.images)
    bench_loader(args.workdir, args.loader_images, args.workers)
    bench_caching(args.workdir, args.cache_images)


if __name__ == "__main__":
    main()
