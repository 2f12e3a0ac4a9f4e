"""Convert a Stable Diffusion model between single-file (LDM/SGM .safetensors/.ckpt) and diffusers folders.

The family (SD1.x, SD2.x, SDXL) is detected from the weights; --v1/--v2/--sdxl only assert it. The output
format follows the output path (`.safetensors`, `.ckpt`, otherwise a diffusers folder). The input is never
overwritten, and an existing output is only replaced with --overwrite.
"""
from __future__ import annotations

import argparse
import logging
import sys
from pathlib import Path

if __package__ in (None, ""):
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from library.cli import run_cli
from library.errors import FlagError, UserInputError
from library.options.output_file import add_overwrite_argument, refuse_existing_output

logger = logging.getLogger(__name__)


def setup_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("model_to_load", help="input: single-file checkpoint or diffusers folder")
    parser.add_argument("model_to_save", help="output: x.safetensors / x.ckpt (single file) or a folder (diffusers)")
    family = parser.add_argument_group("model family (detected; these flags only assert it)")
    family.add_argument("--v1", action="store_true", help="the model is SD1.x")
    family.add_argument("--v2", action="store_true", help="the model is SD2.x")
    family.add_argument("--sdxl", action="store_true", help="the model is SDXL")
    family.add_argument("--v_parameterization", action="store_true",
                        help="the model predicts v (recorded in metadata and the diffusers scheduler)")
    family.add_argument("--unet_use_linear_projection", action="store_true",
                        help="accepted for kohya compatibility; the projection type is read from the weights")
    precision = parser.add_argument_group("precision")
    precision.add_argument("--fp16", action="store_true", help="load and save in fp16")
    precision.add_argument("--bf16", action="store_true", help="load and save in bf16")
    precision.add_argument("--float", action="store_true", help="load and save in float32")
    precision.add_argument("--save_precision_as", choices=("fp16", "bf16", "float"), default=None,
                           help="dtype of the saved weights (default: as loaded)")
    output = parser.add_argument_group("output")
    output.add_argument("--use_safetensors", action="store_true",
                        help="diffusers output: write .safetensors weights (default for folders anyway)")
    output.add_argument("--use_pickle", action="store_true", help="diffusers output: write .bin weights")
    output.add_argument("--epoch", type=int, default=0, help="epoch recorded in a .ckpt output")
    output.add_argument("--global_step", type=int, default=0, help="global_step recorded in a .ckpt output")
    output.add_argument("--reference_model", default=None,
                        help="accepted for kohya compatibility and ignored: scheduler and tokenizers are written "
                             "from the detected family, nothing is downloaded")
    add_overwrite_argument(output)
    return parser


def _check_flags(args: argparse.Namespace) -> None:
    if sum([args.v1, args.v2, args.sdxl]) > 1:
        raise FlagError("--v1, --v2 and --sdxl exclude each other; give at most one")
    if sum([args.fp16, args.bf16, args.float]) > 1:
        raise FlagError("--fp16, --bf16 and --float exclude each other; give at most one")
    if args.use_safetensors and args.use_pickle:
        raise FlagError("--use_safetensors and --use_pickle exclude each other")
    source, target = Path(args.model_to_load).resolve(), Path(args.model_to_save).resolve()
    if source == target:
        raise UserInputError(f"{args.model_to_save}: the output is the input; choose another output path")
    refuse_existing_output(args.model_to_save, args.overwrite, "model_to_save")


def _precisions(args: argparse.Namespace):
    import torch

    load_name = "fp16" if args.fp16 else "bf16" if args.bf16 else "float" if args.float else None
    load_dtype = {"fp16": torch.float16, "bf16": torch.bfloat16, "float": torch.float32, None: None}[load_name]
    return load_dtype, args.save_precision_as or load_name


def main(argv: list[str] | None = None) -> Path:
    args = setup_parser().parse_args(argv)
    _check_flags(args)
    from library.models.load import load_target_model
    from library.models.save import format_from_path, save_model

    load_dtype, save_precision = _precisions(args)
    expected = ("sd1", "sd1-v") if args.v1 else ("sdxl",) if args.sdxl else None
    bundle = load_target_model(args.model_to_load, v2=args.v2, v_parameterization=args.v_parameterization,
                               dtype=load_dtype, expected_families=expected)
    save_as = format_from_path(args.model_to_save)
    if save_as.startswith("diffusers") and args.use_pickle:
        save_as = "diffusers"
    if args.reference_model:
        logger.info("--reference_model is not needed and was ignored")
    path = save_model(bundle, args.model_to_save, save_model_as=save_as, precision=save_precision,
                      overwrite=args.overwrite, epoch=args.epoch, global_step=args.global_step)
    logger.info("converted %s -> %s (%s)", args.model_to_load, path, save_as)
    return path


if __name__ == "__main__":
    run_cli(main)
