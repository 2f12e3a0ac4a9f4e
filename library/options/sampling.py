"""Flags for sample images during training (kohya spelling and defaults, COMPAT §12)."""
from __future__ import annotations

import argparse
import logging

from library.options.choices import SAMPLER_NAMES
from library.options.value_types import positive_int

logger = logging.getLogger(__name__)



def add_sampling_arguments(parser: argparse.ArgumentParser) -> None:
    group = parser.add_argument_group("sample images")
    group.add_argument("--sample_every_n_steps", type=positive_int, default=None,
                       help="generate sample images every N optimizer steps (needs --sample_prompts)")
    group.add_argument("--sample_every_n_epochs", type=positive_int, default=None,
                       help="generate sample images every N epochs; wins over --sample_every_n_steps")
    group.add_argument("--sample_at_first", action="store_true",
                       help="also generate sample images before the first training step")
    group.add_argument("--sample_prompts", type=str, default=None,
                       help="prompt file (.txt with kohya's --n/--w/--h/--d/--s/--l/--ss options, .toml or .json); "
                            "images go to <output_dir>/sample")
    group.add_argument("--sample_sampler", type=str, default="ddim", choices=SAMPLER_NAMES,
                       help="sampler for sample images unless a prompt sets --ss (default ddim)")
