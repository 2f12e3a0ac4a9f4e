"""Merge LoRAs into a checkpoint, or several LoRAs into one, as kohya's networks/merge_lora.py does
(networks/sdxl_merge_lora.py is this tool with SDXL checks and --lbws).

    python networks/merge_lora.py --sd_model model.safetensors --models a.safetensors b.safetensors \\
        --ratios 0.8 0.5 --save_to merged.safetensors --save_precision fp16
    python networks/merge_lora.py --models a.safetensors b.safetensors --ratios 1 0.5 --concat \\
        --save_to ab.safetensors

Into a checkpoint (--sd_model): every module's weight becomes W + Σ ratio_i × ΔW_i; the output format follows
the --save_to suffix (.safetensors / .ckpt single file, anything else a diffusers folder).

Into one LoRA (no --sd_model):
  --concat   downs and ups are stacked along the rank (ratio × alpha_i/rank_i folded into each up, alpha = the new
             rank), so the merged ΔW is exactly Σ ratio_i × ΔW_i; the rank is the sum of the inputs' ranks.
  default    kohya's equal-rank merge: down = Σ sign(r_i)·s_i·down_i, up = Σ s_i·up_i with
             s_i = sqrt(|r_i| × alpha_i / alpha_1), alpha from the first file. This is exact for one LoRA and an
             APPROXIMATION for several (the cross terms up_i·down_j remain); all files must have equal ranks per
             module. Use --concat (exact) or svd_merge_lora.py (exact then truncated) when that matters.
  --shuffle  randomly permutes each merged module's rank dimension (ΔW unchanged).
"""
from __future__ import annotations

import argparse
import json
import logging
import math
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING

if __package__ in (None, ""):
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from tqdm import tqdm

from library.cli import run_cli
from library.errors import FlagError, ModelFormatError
from library.options.output_file import add_overwrite_argument, refuse_existing_output
from networks import naming

if TYPE_CHECKING:  # the tensor and model modules import torch: loaded where used, so --help stays fast
    import torch

    from networks.lora_file import LoRAFile, LoRAPair

logger = logging.getLogger(__name__)

PRECISION_CHOICES = ("float", "fp16", "bf16")
SDXL_BLOCK_COUNT = naming.SDXL_SCHEME.block_count


def setup_parser(sdxl: bool = False) -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--sd_model", default=None, help="checkpoint to merge into (file or diffusers folder); "
                        "without it the LoRAs are merged into one LoRA")
    parser.add_argument("--models", nargs="+", required=True, help="LoRA files to merge")
    parser.add_argument("--ratios", nargs="+", type=float, default=None, help="one ratio per model (default 1.0)")
    parser.add_argument("--save_to", required=True, help="output: .safetensors/.ckpt file, or a folder (diffusers "
                        "format) when merging into a checkpoint")
    parser.add_argument("--save_precision", choices=PRECISION_CHOICES, default=None,
                        help="dtype of the floating-point tensors in the saved file (merged LoRA or checkpoint): "
                             "float (float32), fp16 or bf16; default: the --precision dtype, as in kohya")
    parser.add_argument("--precision", choices=PRECISION_CHOICES, default="float",
                        help="dtype the merge is computed in; default float")
    parser.add_argument("--v2", action="store_true", help="kohya's flag: the checkpoint is SD2.x (detected anyway)")
    parser.add_argument("--device", default="cpu", help="where the deltas are computed: cpu or cuda")
    parser.add_argument("--concat", action="store_true", help="LoRA merge: stack ranks (exact, ranks may differ)")
    parser.add_argument("--shuffle", action="store_true", help="LoRA merge: permute each module's rank dims")
    parser.add_argument("--no_metadata", action="store_true",
                        help="write only the minimal ss_* metadata (network module/dim/alpha)")
    add_overwrite_argument(parser)
    if sdxl:
        parser.add_argument("--lbws", nargs="+", default=None,
                            help=f"block weights, one JSON list of {SDXL_BLOCK_COUNT} numbers per model, e.g. "
                                 "\"[1,1,...]\": slot 0 time/label embedding, 1-9 input_blocks_0..8, 10-12 "
                                 "middle_block_0..2, 13-21 output_blocks_0..8, 22 out (COMPAT §6); each U-Net "
                                 "module's ratio is multiplied by its block's weight, text encoders keep theirs")
    return parser


# ----------------------------------------------------------------------------------------------- flag checks




def parse_block_weights(lbws: Sequence[str] | None, models: Sequence[str]) -> list[list[float]] | None:
    """--lbws: one JSON list of SDXL_BLOCK_COUNT numbers per model (kohya's SDXL block slots, COMPAT §6)."""
    if lbws is None:
        return None
    if len(lbws) != len(models):
        raise FlagError(f"--lbws: expected one block-weight list per model ({len(models)} for --models), "
                        f"got {len(lbws)}")
    weights = []
    for text in lbws:
        try:
            values = json.loads(text)
        except json.JSONDecodeError:
            values = None
        if not isinstance(values, list) or not all(isinstance(value, (int, float)) for value in values):
            raise FlagError(f"--lbws {text}: expected a JSON list of numbers like \"[1,0.5,...]\"")
        if len(values) != SDXL_BLOCK_COUNT:
            raise FlagError(f"--lbws {text}: expected {SDXL_BLOCK_COUNT} weights (one per SDXL block slot 0-22), "
                            f"got {len(values)}")
        weights.append([float(value) for value in values])
    return weights


def module_ratio(name: str, ratio: float, block_weights: list[float] | None) -> float:
    """The ratio of one module: the file's ratio × its SDXL block weight (text encoders: no block weight)."""
    if block_weights is None:
        return ratio
    block = naming.sdxl_block_index(name)
    return ratio * block_weights[block] if block >= 0 else ratio




def save_precision(args: argparse.Namespace) -> str:
    """kohya merge_lora.py: the saved file's dtype is --save_precision, else the merge's --precision."""
    return args.save_precision or args.precision


# ----------------------------------------------------------------------------------------------- into a checkpoint


def scaled_state_dict(lora_file: LoRAFile, block_weights: list[float] | None) -> dict[str, torch.Tensor]:
    """The file's tensors with each U-Net up weight scaled by its block weight (1 without --lbws)."""
    from networks.lora_file import LoRAPair

    state: dict[str, torch.Tensor] = {}
    for name, pair in lora_file.modules.items():
        factor = module_ratio(name, 1.0, block_weights)
        state.update(LoRAPair(pair.down, pair.up * factor, pair.alpha).tensors(name))
    return state


def merge_into_checkpoint(args: argparse.Namespace, ratios: list[float], block_weights: list[list[float]] | None,
                          sdxl_only: bool) -> Path:
    """Check every LoRA against the checkpoint's family first, then load the model once and merge in place."""
    from library.models.load import detect_family, load_target_model
    from library.models.save import precision_dtype, save_model
    from library.train.network_module import check_network_weights_family
    from networks import lora as lora_network
    from networks.lora_file import read_lora
    from networks.lora_rank import resolve_device

    expected = ("sdxl",) if sdxl_only else None
    family = detect_family(args.sd_model, v2=args.v2 or None, expected_families=expected, flag="--sd_model")
    compute_dtype = precision_dtype(args.precision)
    loras = []
    for path in args.models:
        lora_file = read_lora(path, "--models", compute_dtype)
        check_network_weights_family(path, family.name, "--models")
        loras.append(lora_file)
    device = resolve_device(args.device)
    bundle = load_target_model(args.sd_model, v2=args.v2 or None, dtype=compute_dtype, expected_families=expected)
    text_encoder = bundle.text_encoders if len(bundle.text_encoders) > 1 else bundle.text_encoders[0]
    for index, (lora_file, ratio) in enumerate(zip(loras, ratios)):
        weights = scaled_state_dict(lora_file, block_weights[index] if block_weights else None)
        network, weights = lora_network.create_network_from_weights(ratio, lora_file.path, bundle.vae, text_encoder,
                                                                    bundle.unet, weights_sd=weights)
        network.merge_to(text_encoder, bundle.unet, weights, device=device)
        logger.info("merged %s × %g", lora_file.path, ratio)
    metadata = None if args.no_metadata else {"ss_merged_from": ", ".join(Path(p).name for p in args.models)}
    return save_model(bundle, args.save_to, precision=save_precision(args), overwrite=args.overwrite,
                      metadata=metadata)


# ----------------------------------------------------------------------------------------------- into one LoRA


def _in_layout_of(pair: LoRAPair, reference: LoRAPair, name: str, path: object) -> LoRAPair:
    """`pair` reshaped to `reference`'s tensor layout (an SD2 projection may be 2-D or 1x1-conv, COMPAT §1.5)."""
    from networks.lora_file import LoRAPair

    down_shape = (pair.rank, *reference.down.shape[1:])
    up_shape = (reference.up.shape[0], pair.rank, *reference.up.shape[2:])
    if pair.down.numel() != math.prod(down_shape) or pair.up.numel() != math.prod(up_shape):
        raise ModelFormatError(path, f"module {name} has down {list(pair.down.shape)} / up {list(pair.up.shape)}, "
                                     f"which does not fit {list(reference.down.shape)} / "
                                     f"{list(reference.up.shape)} of the first file; the LoRAs are for different "
                                     "models")
    return LoRAPair(pair.down.reshape(down_shape), pair.up.reshape(up_shape), pair.alpha)


def concat_pairs(pairs: Sequence[LoRAPair], ratios: Sequence[float]) -> LoRAPair:
    """Stack along the rank with ratio × scale in each up: ΔW = Σ ratio_i × ΔW_i exactly, alpha = new rank."""
    import torch

    from networks.lora_file import LoRAPair

    down = torch.cat([pair.down for pair in pairs], dim=0)
    up = torch.cat([pair.up * (ratio * pair.scale) for pair, ratio in zip(pairs, ratios)], dim=1)
    return LoRAPair(down, up, float(down.shape[0]))


def sum_pairs(pairs: Sequence[LoRAPair], ratios: Sequence[float]) -> LoRAPair:
    """kohya's equal-rank merge (see the module docstring): sqrt(|ratio| × alpha_i/alpha_1) on both factors,
    the ratio's sign on down, alpha from the first file."""
    import torch

    from networks.lora_file import LoRAPair

    base_alpha = pairs[0].alpha
    down = torch.zeros_like(pairs[0].down)
    up = torch.zeros_like(pairs[0].up)
    for pair, ratio in zip(pairs, ratios):
        factor = math.sqrt(abs(ratio) * pair.alpha / base_alpha)
        down = down + pair.down * (math.copysign(factor, ratio))
        up = up + pair.up * factor
    return LoRAPair(down, up, base_alpha)


def shuffle_rank(pair: LoRAPair, generator: torch.Generator) -> LoRAPair:
    import torch

    from networks.lora_file import LoRAPair

    order = torch.randperm(pair.rank, generator=generator)
    return LoRAPair(pair.down[order], pair.up[:, order], pair.alpha)


def collect_modules(loras: Sequence[LoRAFile], ratios: Sequence[float], block_weights: list[list[float]] | None
                    ) -> dict[str, list[tuple[LoRAFile, LoRAPair, float]]]:
    """Per module name: (file, pair in the first file's layout, ratio) of every file that has it."""
    found: dict[str, list[tuple[LoRAFile, LoRAPair, float]]] = {}
    for index, (lora_file, ratio) in enumerate(zip(loras, ratios)):
        weights = block_weights[index] if block_weights else None
        for name, pair in lora_file.modules.items():
            entries = found.setdefault(name, [])
            if entries:
                pair = _in_layout_of(pair, entries[0][1], name, lora_file.path)
            entries.append((lora_file, pair, module_ratio(name, ratio, weights)))
    return found


def check_equal_ranks(found: dict[str, list[tuple[LoRAFile, LoRAPair, float]]]) -> None:
    for name, entries in sorted(found.items()):
        first_file, first_pair, _ = entries[0]
        for lora_file, pair, _ in entries[1:]:
            if pair.rank != first_pair.rank:
                raise FlagError(f"--models: module {name} has rank {first_pair.rank} in {first_file.path} but "
                                f"{pair.rank} in {lora_file.path}; merging without --concat needs equal ranks, "
                                "add --concat")


def merge_lora_modules(loras: Sequence[LoRAFile], ratios: Sequence[float], concat: bool = False,
                       shuffle: bool = False, block_weights: list[list[float]] | None = None,
                       seed: int = 0) -> dict[str, LoRAPair]:
    """The merged modules by kohya name (see the module docstring for --concat / default / --shuffle)."""
    import torch

    found = collect_modules(loras, ratios, block_weights)
    if not concat:
        check_equal_ranks(found)
    generator = torch.Generator().manual_seed(seed)
    merged: dict[str, LoRAPair] = {}
    for name, entries in tqdm(found.items(), desc="merging LoRA modules", unit="module"):
        pairs = [pair for _, pair, _ in entries]
        module_ratios = [ratio for _, _, ratio in entries]
        pair = concat_pairs(pairs, module_ratios) if concat else sum_pairs(pairs, module_ratios)
        merged[name] = shuffle_rank(pair, generator) if shuffle else pair
    return merged


def merged_lora_metadata(loras: Sequence[LoRAFile], modules: dict[str, LoRAPair], minimal: bool) -> dict[str, str]:
    from networks.lora_file import BASE_MODEL_KEYS, network_dims

    dim, alpha, conv_dim, conv_alpha = network_dims(modules)
    metadata = {"ss_network_module": "networks.lora", "ss_network_dim": dim, "ss_network_alpha": alpha}
    if conv_dim is not None:
        metadata["ss_network_args"] = json.dumps({"conv_dim": conv_dim, "conv_alpha": conv_alpha})
    if minimal:
        return metadata
    names = ", ".join(lora_file.path.name for lora_file in loras)
    metadata.update({"ss_merged_from": names, "ss_training_comment": f"merge of {names}"})
    for key in BASE_MODEL_KEYS:
        values = {lora_file.metadata.get(key) for lora_file in loras}
        if len(values) == 1 and None not in values:
            metadata[key] = values.pop()
    return metadata


def merge_into_lora(args: argparse.Namespace, ratios: list[float], block_weights: list[list[float]] | None,
                    sdxl_only: bool) -> dict[str, LoRAPair]:
    from library.models.save import precision_dtype
    from networks.lora_file import LoRAFile, LoRAPair, check_one_family, read_lora, write_lora
    from networks.lora_rank import resolve_device

    compute_dtype = precision_dtype(args.precision)
    loras = [read_lora(path, "--models", compute_dtype) for path in args.models]
    check_one_family(loras, sdxl_only)
    device = resolve_device(args.device)
    loras = [LoRAFile(lora_file.path, {name: LoRAPair(pair.down.to(device), pair.up.to(device), pair.alpha)
                                       for name, pair in lora_file.modules.items()}, lora_file.metadata)
             for lora_file in loras]
    merged = merge_lora_modules(loras, ratios, args.concat, args.shuffle, block_weights)
    merged = {name: LoRAPair(pair.down.cpu(), pair.up.cpu(), pair.alpha) for name, pair in merged.items()}
    metadata = merged_lora_metadata(loras, merged, args.no_metadata)
    write_lora(args.save_to, merged, metadata, precision_dtype(save_precision(args)), overwrite=args.overwrite)
    logger.info("saved %s: %d modules, ss_network_dim %s", args.save_to, len(merged), metadata["ss_network_dim"])
    return merged


# ----------------------------------------------------------------------------------------------- entry point


def main(argv: list[str] | None = None, sdxl: bool = False) -> Path | dict[str, LoRAPair]:
    """Returns the saved checkpoint path (--sd_model) or the merged LoRA modules."""
    args = setup_parser(sdxl).parse_args(argv)
    from networks.lora_file import check_ratios
    from networks.lora_rank import refuse_output_over_inputs

    ratios = check_ratios(args.models, args.ratios)
    block_weights = parse_block_weights(getattr(args, "lbws", None), args.models)
    inputs = list(args.models) + ([args.sd_model] if args.sd_model else [])
    refuse_output_over_inputs(args.save_to, inputs, "--models/--sd_model")
    refuse_existing_output(args.save_to, args.overwrite, "--save_to")
    if args.sd_model is None:
        return merge_into_lora(args, ratios, block_weights, sdxl)
    if args.concat or args.shuffle:
        logger.warning("--concat/--shuffle only apply when merging into a LoRA (no --sd_model); ignored")
    return merge_into_checkpoint(args, ratios, block_weights, sdxl)


if __name__ == "__main__":
    run_cli(main)
