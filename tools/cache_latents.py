"""Cache VAE latents of a dataset to disk, in kohya's `.npz` names and keys, before training.

Reads the same dataset flags / `--dataset_config` as training. Valid existing caches are kept (a cache made
for another bucket size, crop, VAE or dtype is recomputed; `--skip_cache_check` only checks that the file
exists). Under `accelerate launch --num_processes N` each process caches its own share of the images
(image i -> process i % N) and exits when done; no process waits on another.
"""
from __future__ import annotations

import argparse
import logging
import sys
from pathlib import Path

if __package__ in (None, ""):
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from library.cli import run_cli
from library.options.dataset import add_dataset_arguments
from library.options.model import add_model_arguments, add_text_encoding_arguments
from library.options.training import add_training_arguments

logger = logging.getLogger(__name__)


def setup_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    for add in (add_model_arguments, add_dataset_arguments, add_text_encoding_arguments, add_training_arguments):
        add(parser)
    parser.add_argument("--sdxl", action="store_true",
                        help="the model is SDXL (checked against the file; the family is detected anyway)")
    parser.add_argument("--console_log_level", default=None, help="logging level (DEBUG also shows tracebacks)")
    return parser


def main(argv: list[str] | None = None):
    args = setup_parser().parse_args(argv)
    if not args.pretrained_model_name_or_path:
        from library.errors import FlagError

        raise FlagError("--pretrained_model_name_or_path is required (the model whose VAE encodes the images)")
    from library.data.caching import cache_latents
    from library.data.prepare import dataset_group_from_args, process_info
    from library.models.load import detect_family, load_vae
    from library.options.training import vae_dtype

    family = detect_family(args.pretrained_model_name_or_path, args.v_parameterization, v2=args.v2,
                           expected_families=("sdxl",) if args.sdxl else None)
    process = process_info()
    group = dataset_group_from_args(args, family, lint=process.is_main)
    dtype = vae_dtype(args.mixed_precision, args.no_half_vae)
    vae = load_vae(args.vae or args.pretrained_model_name_or_path, family, dtype=dtype)
    vae.to(_device()).eval().requires_grad_(False)
    stats = cache_latents(group, vae, to_disk=True, latent_suffix=family.latent_cache_suffix,
                          vae_batch_size=args.vae_batch_size, skip_check=args.skip_cache_check,
                          process_index=process.index, num_processes=process.count,
                          seed=args.seed if args.seed is not None else 0, show_progress=process.is_main)
    # one line per process, so a launch that silently ran N single processes (LIBRARIES.md §5) is visible
    logger.info("process %d/%d: %s", process.index, process.count, stats.describe())
    return stats


def _device():
    import torch

    from library.data.prepare import process_info

    if torch.cuda.is_available():
        return torch.device("cuda", process_info().index % torch.cuda.device_count())
    return torch.device("cpu")


if __name__ == "__main__":
    run_cli(main)
