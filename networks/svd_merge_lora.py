"""Combine several LoRAs into one by SVD, as kohya's networks/svd_merge_lora.py does: per module
ΔW = Σ ratio_i × ΔW_i (a module missing from a file counts as 0), re-factored to --new_rank / --new_conv_rank.

    python networks/svd_merge_lora.py --models a.safetensors b.safetensors --ratios 0.7 0.5 \\
        --new_rank 16 --new_conv_rank 8 --save_to merged.safetensors --save_precision fp16 --device cuda

The merged file has alpha = rank (scale 1), like kohya's. The same script handles SD1.x, SD2.x and SDXL LoRAs;
all inputs must be for one model family.
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
from library.errors import ModelFormatError
from library.options.output_file import add_overwrite_argument, refuse_existing_output

if TYPE_CHECKING:  # the tensor modules import torch: loaded where used, so --help stays fast
    import torch

    from networks.lora_file import LoRAFile, LoRAPair
    from networks.lora_rank import LowRankDelta, Refactored

logger = logging.getLogger(__name__)


def setup_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--models", nargs="+", required=True, help="LoRA files to merge")
    parser.add_argument("--ratios", nargs="+", type=float, default=None,
                        help="one weight per model (default 1.0 each)")
    parser.add_argument("--new_rank", type=int, default=4, help="rank of Linear/1x1 modules; default 4")
    parser.add_argument("--new_conv_rank", type=int, default=None, help="rank of 3x3 conv modules; default "
                        "--new_rank")
    parser.add_argument("--save_to", required=True, help="output file (.safetensors keeps metadata)")
    parser.add_argument("--save_precision", choices=["float", "fp16", "bf16"], default=None,
                        help="dtype of the saved tensors; default float")
    parser.add_argument("--precision", choices=["float", "fp16", "bf16"], default="float",
                        help="dtype the deltas are summed in (the SVD itself runs in float32); default float")
    parser.add_argument("--device", default="cpu", help="where the SVDs run: cpu or cuda")
    add_overwrite_argument(parser)
    return parser






def summed_deltas(loras: list[LoRAFile], ratios: list[float], dtype: torch.dtype) -> dict[str, LowRankDelta]:
    """Per module name Σ ratio_i × ΔW_i (kept factored) in the first file's weight shape, so a 2-D and a 1x1-conv
    proj_in of SD2 (COMPAT §1.5) still add up."""
    from networks.lora_file import LoRAPair
    from networks.lora_rank import LowRankDelta

    found: dict[str, list[tuple[LoRAFile, LoRAPair, float]]] = {}
    for lora, ratio in zip(loras, ratios):
        for name, pair in lora.modules.items():
            found.setdefault(name, []).append((lora, pair, ratio))
    deltas: dict[str, LowRankDelta] = {}
    for name, entries in tqdm(found.items(), desc="collecting modules", unit="module"):
        first_file, first_pair, _ = entries[0]
        for lora, pair, _ in entries[1:]:
            if _matrix_shape(pair) != _matrix_shape(first_pair):
                raise ModelFormatError(lora.path, f"module {name} has ΔW shape {_matrix_shape(pair)} but "
                                       f"{first_file.path} has {_matrix_shape(first_pair)}; the LoRAs are for "
                                       "different models")
        pairs = [LoRAPair(pair.down.to(dtype), pair.up.to(dtype), pair.alpha) for _, pair, _ in entries]
        deltas[name] = LowRankDelta.of_pairs(pairs, [ratio for _, _, ratio in entries])
    return deltas


def _matrix_shape(pair: LoRAPair) -> tuple[int, int]:
    return int(pair.up.shape[0]), int(pair.down.flatten(1).shape[1])


def merge_modules(loras: list[LoRAFile], ratios: list[float], new_rank: int, new_conv_rank: int,
                  dtype: torch.dtype | None = None, device: torch.device | str = "cpu") -> dict[str, Refactored]:
    """The merged modules: each summed ΔW at new_rank (3x3 convs new_conv_rank), capped by ΔW's own rank bound
    (the summed ranks or the matrix size) since further singular values are zero. `dtype` None: float32."""
    import torch

    from networks.lora_rank import refactor_deltas

    deltas = summed_deltas(loras, ratios, torch.float32 if dtype is None else dtype)

    def rank_for(name: str, singular_values: torch.Tensor) -> int:
        shape = deltas[name].weight_shape
        is_conv3x3 = len(shape) == 4 and tuple(shape[2:]) != (1, 1)
        return min(new_conv_rank if is_conv3x3 else new_rank, int(singular_values.shape[0]))

    return refactor_deltas(deltas, rank_for, lambda name, rank: None, device, description="SVD merge")


def merged_metadata(loras: list[LoRAFile], resized: dict[str, Refactored]) -> dict[str, str]:
    from networks.lora_file import BASE_MODEL_KEYS, network_dims

    dim, alpha, conv_dim, conv_alpha = network_dims({name: item.pair for name, item in resized.items()})
    metadata = {"ss_network_module": "networks.lora", "ss_network_dim": dim, "ss_network_alpha": alpha,
                "ss_merged_from": ", ".join(lora.path.name for lora in loras),
                "ss_training_comment": "SVD merge of " + ", ".join(lora.path.name for lora in loras)}
    if conv_dim is not None:
        metadata["ss_network_args"] = json.dumps({"conv_dim": conv_dim, "conv_alpha": conv_alpha})
    for key in BASE_MODEL_KEYS:
        values = {lora.metadata.get(key) for lora in loras}
        if len(values) == 1 and None not in values:
            metadata[key] = values.pop()
    return metadata


def main(argv: list[str] | None = None) -> dict[str, Refactored]:
    args = setup_parser().parse_args(argv)
    import torch

    from library.models.save import precision_dtype
    from networks.lora_file import check_one_family, check_ratios, read_lora, write_lora
    from networks.lora_rank import positive_rank, refuse_output_over_inputs, resolve_device

    ratios = check_ratios(args.models, args.ratios)
    positive_rank("--new_rank", args.new_rank)
    new_conv_rank = positive_rank("--new_conv_rank", args.new_conv_rank) or args.new_rank
    refuse_output_over_inputs(args.save_to, args.models, "--models")
    refuse_existing_output(args.save_to, args.overwrite, "--save_to")
    device = resolve_device(args.device)
    save_dtype = precision_dtype(args.save_precision) or torch.float32
    compute_dtype = precision_dtype(args.precision)

    loras = [read_lora(path, "--models", compute_dtype) for path in args.models]
    check_one_family(loras)
    merged = merge_modules(loras, ratios, args.new_rank, new_conv_rank, compute_dtype, device)
    metadata = merged_metadata(loras, merged)
    write_lora(args.save_to, {name: item.pair for name, item in merged.items()}, metadata, save_dtype,
               overwrite=args.overwrite)
    logger.info("saved %s: %d modules, ss_network_dim %s", args.save_to, len(merged), metadata["ss_network_dim"])
    return merged


if __name__ == "__main__":
    run_cli(main)
