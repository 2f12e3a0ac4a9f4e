"""Generate images with an SDXL model, LoRA and other networks, and textual-inversion embeddings.

    python sdxl_gen_img.py --ckpt sd_xl_base_1.0.safetensors --network_weights my_lora.safetensors \\
        --prompt "a photo of a cat --n blurry --d 42" --W 1024 --H 1024 --steps 30 --sampler euler_a --bf16 \\
        --outdir out

The same tool and flags as gen_img.py (one implementation), for SDXL checkpoints only; adds nothing but the check.
"""
from __future__ import annotations

import sys
from pathlib import Path

if __package__ in (None, ""):
    sys.path.insert(0, str(Path(__file__).resolve().parent))

from library.cli import run_cli

import gen_img


def setup_parser():
    return gen_img.setup_parser(sdxl_script=True)


def main(argv: list[str] | None = None) -> list[Path]:
    return gen_img.main(argv, sdxl_script=True)


if __name__ == "__main__":
    run_cli(main)
