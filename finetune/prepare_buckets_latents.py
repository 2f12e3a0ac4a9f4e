"""Assign buckets and cache latents for a fine-tuning metadata file (kohya's finetune/prepare_buckets_latents.py).

For every image in `in_json`: choose its bucket from --max_resolution and the bucket flags, encode it with the
model's VAE into `<image stem>.npz` (kohya v0.9.1 naming, which the datasets read as legacy caches), and write
`out_json` with each entry's `train_resolution` (bucket size) and `image_size`. Valid existing caches are kept.
"""
from __future__ import annotations

import argparse
import logging
import sys
from pathlib import Path

if __package__ in (None, ""):
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from library.cli import run_cli

logger = logging.getLogger(__name__)


def setup_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("train_data_dir", help="folder with the images (keys in in_json are relative to it)")
    parser.add_argument("in_json", help="metadata file to read (from merge_captions_to_metadata.py and friends)")
    parser.add_argument("out_json", help="metadata file to write (may be the same as in_json)")
    parser.add_argument("model_name_or_path", help="checkpoint or diffusers folder whose VAE encodes the images")
    parser.add_argument("--v2", action="store_true", help="the model is SD2.x (checked against the file)")
    parser.add_argument("--batch_size", type=int, default=1, help="images per VAE call")
    parser.add_argument("--max_resolution", type=str, default="512,512",
                        help="bucket base resolution 'width,height' (its area is the bucket max area)")
    parser.add_argument("--min_bucket_reso", type=int, default=256, help="smallest bucket side, pixels")
    parser.add_argument("--max_bucket_reso", type=int, default=1024, help="largest bucket side, pixels")
    parser.add_argument("--bucket_reso_steps", type=int, default=64, help="bucket side granularity, pixels")
    parser.add_argument("--bucket_no_upscale", action="store_true", help="never enlarge images to fill a bucket")
    parser.add_argument("--mixed_precision", type=str, default="no", choices=("no", "fp16", "bf16"),
                        help="VAE dtype")
    parser.add_argument("--full_path", action="store_true", help="in_json keys are absolute image paths")
    parser.add_argument("--flip_aug", action="store_true", help="also cache latents of the flipped image")
    parser.add_argument("--alpha_mask", action="store_true", help="also store the alpha channel as a loss mask")
    parser.add_argument("--skip_existing", action="store_true",
                        help="keep an existing .npz without checking it (kohya's flag; like --skip_cache_check)")
    parser.add_argument("--recursive", action="store_true", help="accepted for compatibility; keys name the files")
    parser.add_argument("--console_log_level", default=None, help="logging level (DEBUG also shows tracebacks)")
    return parser


def main(argv: list[str] | None = None):
    args = setup_parser().parse_args(argv)
    from library.data.caching import cache_latents
    from library.data.group import build_dataset_group
    from library.data.metadata import load_metadata_dict, write_metadata
    from library.dataset_config import (DatasetBlueprint, DatasetGroupBlueprint, DatasetParams, SubsetParams,
                                        parse_resolution)
    from library.models.load import detect_family, load_vae
    from library.options.training import weight_dtype

    family = detect_family(args.model_name_or_path, v2=args.v2)
    params = DatasetParams(resolution=parse_resolution(args.max_resolution, "--max_resolution"), batch_size=1,
                           enable_bucket=True, min_bucket_reso=args.min_bucket_reso,
                           max_bucket_reso=args.max_bucket_reso, bucket_reso_steps=args.bucket_reso_steps,
                           bucket_no_upscale=args.bucket_no_upscale)
    subset = SubsetParams(image_dir=None if args.full_path else args.train_data_dir, metadata_file=args.in_json,
                          flip_aug=args.flip_aug, alpha_mask=args.alpha_mask)
    blueprint = DatasetGroupBlueprint(datasets=[DatasetBlueprint("finetune", params, [subset])], source=args.in_json)
    group = build_dataset_group(blueprint, seed=0, latent_suffix=family.latent_cache_suffix)
    vae = load_vae(args.model_name_or_path, family, dtype=weight_dtype(args.mixed_precision))
    stats = cache_latents(group, vae.requires_grad_(False), to_disk=True, latent_suffix=family.latent_cache_suffix,
                          vae_batch_size=args.batch_size, skip_check=args.skip_existing, legacy_names=True)
    metadata = load_metadata_dict(args.in_json)
    for info in group.images:
        entry = metadata.setdefault(info.image_key, {})
        entry["train_resolution"] = list(info.bucket.bucket_reso)
        entry["image_size"] = list(info.image_size)
    write_metadata(args.out_json, metadata)
    logger.info("wrote %s (%d images); latents: %s", args.out_json, len(metadata), stats.describe())
    return stats


if __name__ == "__main__":
    run_cli(main)
