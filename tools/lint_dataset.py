"""Scan a dataset and list every problem at once: corrupt images, missing or unreadable captions, captions over
the token budget, images smaller than their bucket, duplicates, and the share each bucket crops away.

Takes the training flags (`--dataset_config` or `--train_data_dir`/`--in_json`, `--resolution`, bucket flags,
`--max_token_length`). Exit code 0 when nothing fatal was found, 2 when images or captions cannot be read.
Training scripts run the same scan before loading any model (skip it with --skip_dataset_lint).
With --debug_dataset the batches of the first epoch are listed too (bucket, sizes, crop, flip, caption).
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

if __package__ in (None, ""):
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from library.cli import run_cli
from library.options.dataset import add_dataset_arguments
from library.options.model import add_text_encoding_arguments
from library.options.training import add_training_arguments


def setup_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_dataset_arguments(parser)
    add_text_encoding_arguments(parser)
    add_training_arguments(parser)
    parser.add_argument("--sdxl", action="store_true",
                        help="count caption tokens with the SDXL tokenizers (same vocabulary as SD1; affects nothing "
                             "else)")
    parser.add_argument("--console_log_level", default=None, help="logging level (DEBUG also shows tracebacks)")
    return parser


def main(argv: list[str] | None = None):
    args = setup_parser().parse_args(argv)
    from library.data.lint import raise_if_fatal
    from library.data.prepare import blueprint_from_args, lint_from_args
    from library.families import SD1, SDXL

    family = SDXL if args.sdxl else SD1
    blueprint = blueprint_from_args(args, family)
    report = lint_from_args(args, blueprint, family)
    print("\n".join(report.lines()))
    raise_if_fatal(report)
    if args.debug_dataset:
        from library.data.debug import describe_batches
        from library.data.group import build_dataset_group

        group = build_dataset_group(blueprint, seed=args.seed if args.seed is not None else 0,
                                    latent_suffix=family.latent_cache_suffix, scanned_sizes=report.image_sizes)
        print("\n".join(group.summary_lines()))
        for line in describe_batches(group, epoch=1):
            print(line)
    return report


if __name__ == "__main__":
    run_cli(main)
