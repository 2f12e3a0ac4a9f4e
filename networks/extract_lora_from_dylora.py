"""Split a DyLoRA file into ordinary LoRAs of the ranks it was trained for, as kohya's
networks/extract_lora_from_dylora.py does (COMPAT §3).

    python networks/extract_lora_from_dylora.py --model dylora.safetensors --save_to out.safetensors --unit 4

writes out-0004.safetensors, out-0008.safetensors, … for every multiple of --unit below the file's rank. A DyLoRA
is nested, so rank k is the first k rows of lora_down and the first k columns of lora_up; alpha is copied
unchanged (kohya), so a rank-k file applies alpha/k.
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
from library.options.output_file import add_overwrite_argument, refuse_existing_output

if TYPE_CHECKING:  # the tensor modules import torch: loaded where used, so --help stays fast
    from networks.lora_file import LoRAFile, LoRAPair

logger = logging.getLogger(__name__)

DYLORA_MODULE = "networks.dylora"


def setup_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", required=True, help="DyLoRA file to split")
    parser.add_argument("--save_to", required=True,
                        help="output name; each rank k is written as <stem>-<k:04d><suffix> next to it")
    parser.add_argument("--unit", type=int, default=None,
                        help="rank step to extract (default: the file's ss_network_args unit)")
    parser.add_argument("--save_precision", choices=["float", "fp16", "bf16"], default=None,
                        help="dtype of the saved tensors; default: the file's own")
    add_overwrite_argument(parser)
    return parser


def truncate(pair: LoRAPair, rank: int) -> LoRAPair:
    """The first `rank` units of a DyLoRA module; alpha unchanged as kohya copies it (COMPAT §3)."""
    from networks.lora_file import LoRAPair

    return LoRAPair(pair.down[:rank].clone(), pair.up[:, :rank].clone(), pair.alpha)


def file_unit(lora: LoRAFile) -> int | None:
    try:
        network_args = json.loads(lora.metadata.get("ss_network_args", "{}"))
        return int(network_args["unit"]) if isinstance(network_args, dict) and "unit" in network_args else None
    except (json.JSONDecodeError, ValueError, TypeError):
        return None


def ranks_to_extract(lora: LoRAFile, unit: int | None) -> list[int]:
    """unit, 2·unit, … below the file's largest rank (kohya writes no copy of the full rank)."""
    unit = unit or file_unit(lora)
    if unit is None:
        raise FlagError(f"--unit is required: {lora.path} has no DyLoRA unit in its ss_network_args metadata")
    max_rank = max(lora.ranks())
    ranks = list(range(unit, max_rank, unit))
    if not ranks:
        raise FlagError(f"--unit {unit}: {lora.path} has rank {max_rank}, so there is no smaller rank to extract; "
                        f"choose a unit below {max_rank}")
    return ranks


def output_path(save_to: str | Path, rank: int) -> Path:
    save_to = Path(save_to)
    suffix = save_to.suffix or ".safetensors"
    return save_to.with_name(f"{save_to.stem}-{rank:04d}{suffix}")


def extracted_metadata(metadata: dict[str, str], rank: int, max_rank: int) -> dict[str, str]:
    metadata = dict(metadata)
    metadata["ss_network_dim"] = str(rank)
    comment = metadata.get("ss_training_comment", "")
    note = f"extracted rank {rank} from DyLoRA of rank {max_rank}"
    metadata["ss_training_comment"] = f"{note}; {comment}" if comment and comment != "None" else note
    return metadata


def extract(lora: LoRAFile, rank: int) -> dict[str, LoRAPair]:
    return {name: truncate(pair, min(rank, pair.rank)) for name, pair in lora.modules.items()}


def main(argv: list[str] | None = None) -> list[Path]:
    args = setup_parser().parse_args(argv)
    from library.models.save import precision_dtype
    from networks.lora_file import read_lora, write_lora
    from networks.lora_rank import positive_rank, refuse_output_over_inputs

    positive_rank("--unit", args.unit)
    lora = read_lora(args.model, "--model", dtype=None)
    if lora.metadata.get("ss_network_module") not in (None, DYLORA_MODULE):
        logger.warning("%s was trained with %s, not %s: its lower ranks are not trained to work alone", args.model,
                       lora.metadata["ss_network_module"], DYLORA_MODULE)
    ranks = ranks_to_extract(lora, args.unit)
    outputs = [output_path(args.save_to, rank) for rank in ranks]
    for output in outputs:  # every name checked before the first file is written
        refuse_output_over_inputs(output, [args.model], "--model")
        refuse_existing_output(output, args.overwrite, "--save_to")
    save_dtype = precision_dtype(args.save_precision)
    max_rank = max(lora.ranks())
    for rank, output in tqdm(list(zip(ranks, outputs)), desc="extracting", unit="file"):
        write_lora(output, extract(lora, rank), extracted_metadata(lora.metadata, rank, max_rank), save_dtype,
                   overwrite=args.overwrite)
        logger.info("saved %s (rank %d)", output, rank)
    return outputs


if __name__ == "__main__":
    run_cli(main)
