"""kohya's SDXL name for the LoRA merge tool: networks/merge_lora.py with SDXL-only checks and --lbws
(per-block weights, one JSON list of 23 numbers per model, slots as in COMPAT §6).

    python networks/sdxl_merge_lora.py --sd_model sdxl.safetensors --models style.safetensors --ratios 0.8 \\
        --lbws "[1,1,1,1,1,1,1,1,1,1,1,1,1,0,0,0,0,0,0,0,0,0,1]" --save_to merged.safetensors
"""
from __future__ import annotations

import logging
import sys
from pathlib import Path
from typing import TYPE_CHECKING

if __package__ in (None, ""):
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from library.cli import run_cli
from networks import merge_lora

if TYPE_CHECKING:
    from networks.lora_file import LoRAPair

logger = logging.getLogger(__name__)


def setup_parser():
    parser = merge_lora.setup_parser(sdxl=True)
    parser.description = __doc__ + "\n" + (merge_lora.__doc__ or "")
    return parser


def main(argv: list[str] | None = None) -> Path | dict[str, LoRAPair]:
    """merge_lora.main for SDXL: refuses SD1/SD2 checkpoints and LoRAs, accepts --lbws."""
    return merge_lora.main(argv, sdxl=True)


if __name__ == "__main__":
    run_cli(main)
