"""Shrink a LoRA/LoCon (or a DyLoRA file) to a lower rank by SVD, as kohya's networks/resize_lora.py does.

    python networks/resize_lora.py --model big.safetensors --save_to small.safetensors --new_rank 8 \\
        --new_conv_rank 4 --save_precision fp16 --device cuda
    python networks/resize_lora.py --model big.safetensors --save_to dyn.safetensors --new_rank 32 \\
        --dynamic_method sv_fro --dynamic_param 0.9 --verbose

ΔW of every module is replaced by its best approximation of the new rank; alpha is scaled with the rank
(new_alpha = old_alpha × new_rank / old_rank) so alpha/rank, and with it the LoRA's strength, stays the same.
"""
from __future__ import annotations

import argparse
import json
import logging
import sys
from pathlib import Path
from typing import TYPE_CHECKING

if __package__ in (None, ""):
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from tqdm import tqdm

from library.cli import run_cli
from library.errors import FlagError
from library.options.choices import DYNAMIC_METHODS
from library.options.output_file import add_overwrite_argument, refuse_existing_output

if TYPE_CHECKING:  # the tensor modules import torch: loaded where used, so --help stays fast
    import torch

    from networks.lora_file import LoRAFile
    from networks.lora_rank import Refactored

logger = logging.getLogger(__name__)


def setup_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", required=True, help="LoRA/LoCon/DyLoRA file to resize (.safetensors/.pt/.ckpt)")
    parser.add_argument("--save_to", required=True, help="output file (.safetensors keeps metadata)")
    parser.add_argument("--new_rank", type=int, default=4, help="rank of Linear/1x1 modules (the maximum with "
                        "--dynamic_method); default 4")
    parser.add_argument("--new_conv_rank", type=int, default=None, help="rank of 3x3 conv modules; default "
                        "--new_rank")
    parser.add_argument("--save_precision", choices=["float", "fp16", "bf16"], default=None,
                        help="dtype of the saved tensors; default float")
    parser.add_argument("--device", default="cpu", help="where the SVDs run: cpu or cuda")
    parser.add_argument("--dynamic_method", choices=DYNAMIC_METHODS, default=None,
                        help="choose each module's rank from its singular values (up to --new_rank)")
    parser.add_argument("--dynamic_param", type=float, default=None,
                        help="sv_ratio: keep S >= max(S)/X; sv_fro / sv_cumulative: fraction (0-1] to keep")
    parser.add_argument("--verbose", action="store_true", help="print the rank and retained energy per module")
    add_overwrite_argument(parser)
    return parser


def check_dynamic_flags(method: str | None, param: float | None) -> None:
    if method is None:
        if param is not None:
            raise FlagError("--dynamic_param is given without --dynamic_method; add --dynamic_method "
                            f"{'|'.join(DYNAMIC_METHODS)} or drop --dynamic_param")
        return
    if param is None:
        raise FlagError(f"--dynamic_method {method} needs --dynamic_param")
    if method == "sv_ratio" and param < 1:
        raise FlagError(f"--dynamic_param {param}: sv_ratio expects a ratio of at least 1 (max(S)/kept S)")
    if method != "sv_ratio" and not 0 < param <= 1:
        raise FlagError(f"--dynamic_param {param}: {method} expects a fraction in (0, 1]")


def resize_modules(lora: LoRAFile, new_rank: int, new_conv_rank: int, device: torch.device | str = "cpu",
                   dynamic_method: str | None = None, dynamic_param: float | None = None) -> dict[str, Refactored]:
    """Every module re-factored to at most its new rank (never above its current rank), ΔW kept up to the
    dropped singular values; alpha = old_alpha × rank / old_rank keeps the scale (kohya)."""
    from networks.lora_rank import LowRankDelta, choose_rank, refactor_deltas

    modules = lora.modules

    def rank_for(name: str, singular_values: torch.Tensor) -> int:
        pair = modules[name]
        limit = min(new_conv_rank if pair.is_conv3x3 else new_rank, pair.rank)
        return choose_rank(singular_values, limit, dynamic_method, dynamic_param)

    def alpha_for(name: str, rank: int) -> float:
        return modules[name].alpha * rank / modules[name].rank

    deltas = {name: LowRankDelta.of_pairs([pair], [1.0]) for name, pair in modules.items()}
    return refactor_deltas(deltas, rank_for, alpha_for, device, description="resizing")


def resized_metadata(metadata: dict[str, str], resized: dict[str, Refactored], old_ranks: str, new_rank: int,
                     new_conv_rank: int, dynamic_method: str | None, dynamic_param: float | None) -> dict[str, str]:
    """The input's metadata with the new dims/alphas and a note prepended to ss_training_comment (kohya)."""
    from networks.lora_file import network_dims

    metadata = dict(metadata)
    pairs = {name: item.pair for name, item in resized.items()}
    dim, alpha, conv_dim, conv_alpha = network_dims(pairs)
    metadata["ss_network_dim"], metadata["ss_network_alpha"] = dim, alpha
    if dynamic_method:
        note = f"Dynamic dimension resize with {dynamic_method}: {dynamic_param} from {old_ranks}"
    else:
        conv_note = "" if new_conv_rank == new_rank else f" (conv: {new_conv_rank})"
        note = f"dimension is resized from {old_ranks} to {new_rank}{conv_note}"
    comment = metadata.get("ss_training_comment", "")
    metadata["ss_training_comment"] = f"{note}; {comment}" if comment and comment != "None" else note
    if conv_dim is not None and "ss_network_args" in metadata:
        metadata["ss_network_args"] = _with_conv_args(metadata["ss_network_args"], conv_dim, conv_alpha)
    return metadata


def _with_conv_args(network_args: str, conv_dim: str, conv_alpha: str | None) -> str:
    try:
        parsed = json.loads(network_args)
    except json.JSONDecodeError:
        return network_args  # not kohya's JSON: leave it as the user wrote it
    if isinstance(parsed, dict) and "conv_dim" in parsed:
        parsed["conv_dim"] = conv_dim
        if conv_alpha is not None:
            parsed["conv_alpha"] = conv_alpha
        return json.dumps(parsed)
    return network_args


def report(resized: dict[str, Refactored]) -> None:
    """The --verbose table: per module the rank kept and the fractions of sum(S) and of ||ΔW||_F retained."""
    width = max((len(name) for name in resized), default=10)
    tqdm.write(f"{'module':<{width}}  rank  sum(S) kept  fro kept  max(S)/min kept S")
    for name, item in resized.items():
        choice = item.choice
        tqdm.write(f"{name:<{width}}  {choice.rank:>4}  {choice.sum_fraction:>10.2%}  {choice.fro_fraction:>8.2%}"
                   f"  {choice.max_ratio:>10.2f}")


def main(argv: list[str] | None = None) -> dict[str, Refactored]:
    args = setup_parser().parse_args(argv)
    import torch

    from library.models.save import precision_dtype
    from networks.lora_file import read_lora, write_lora
    from networks.lora_rank import positive_rank, refuse_output_over_inputs, resolve_device

    positive_rank("--new_rank", args.new_rank)
    new_conv_rank = positive_rank("--new_conv_rank", args.new_conv_rank) or args.new_rank
    check_dynamic_flags(args.dynamic_method, args.dynamic_param)
    refuse_output_over_inputs(args.save_to, [args.model], "--model")
    refuse_existing_output(args.save_to, args.overwrite, "--save_to")
    device = resolve_device(args.device)
    save_dtype = precision_dtype(args.save_precision) or torch.float32

    lora = read_lora(args.model, "--model")
    old_ranks = ", ".join(str(rank) for rank in sorted(lora.ranks()))
    logger.info("%s: %d modules of rank %s", args.model, len(lora.modules), old_ranks)
    resized = resize_modules(lora, args.new_rank, new_conv_rank, device, args.dynamic_method, args.dynamic_param)
    if args.verbose:
        report(resized)
    metadata = resized_metadata(lora.metadata, resized, old_ranks, args.new_rank, new_conv_rank,
                                args.dynamic_method, args.dynamic_param)
    write_lora(args.save_to, {name: item.pair for name, item in resized.items()}, metadata, save_dtype,
               overwrite=args.overwrite)
    logger.info("saved %s (ss_network_dim %s)", args.save_to, metadata["ss_network_dim"])
    return resized


if __name__ == "__main__":
    run_cli(main)
