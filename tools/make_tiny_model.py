"""Build a tiny random-weight SD1 / SD2(-v) / SDXL model with the real block topology and write it.

The output format follows the path: `x.safetensors` / `x.ckpt` give a single file in the original LDM (SD1/2)
or SGM (SDXL) layout, any other path a diffusers folder (or choose with --save_model_as). Nothing is
downloaded; the same --seed gives the same weights.
"""
from __future__ import annotations

import argparse
import logging
import sys
from pathlib import Path

if __package__ in (None, ""):
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from library.cli import run_cli
from library.families import FAMILIES
from library.options.choices import SAVE_FORMATS
from library.options.output_file import add_overwrite_argument, refuse_existing_output

logger = logging.getLogger(__name__)


def setup_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("output", help="where to write: .safetensors/.ckpt file, or a folder for diffusers")
    parser.add_argument("--family", default="sdxl", choices=sorted(FAMILIES), help="model family (default: sdxl)")
    parser.add_argument("--seed", type=int, default=0, help="random seed of the weights (default: 0)")
    parser.add_argument("--save_model_as", choices=SAVE_FORMATS, default=None,
                        help="output format (default: from the output path)")
    parser.add_argument("--save_precision", choices=("float", "fp16", "bf16"), default=None,
                        help="dtype of the written weights (default: float)")
    add_overwrite_argument(parser)
    return parser


def main(argv: list[str] | None = None) -> Path:
    args = setup_parser().parse_args(argv)
    refuse_existing_output(args.output, args.overwrite, "output")
    from library.models.save import save_model
    from library.models.tiny import build_tiny_bundle

    bundle = build_tiny_bundle(args.family, seed=args.seed)
    path = save_model(bundle, args.output, save_model_as=args.save_model_as, precision=args.save_precision,
                      overwrite=args.overwrite)
    parameters = sum(parameter.numel() for model in bundle.models() for parameter in model.parameters())
    logger.info("wrote tiny %s model (%.1f M parameters, seed %d) to %s", args.family, parameters / 1e6, args.seed, path)
    return path


if __name__ == "__main__":
    run_cli(main)
