"""From parsed flags to a ready dataset group: the one place scripts turn dataset flags into datasets.

Used by the training scripts and the standalone caching / lint tools, so they resolve the same config the
same way (blueprint -> lint -> records and sizes -> buckets).
"""
from __future__ import annotations

import argparse
import logging
import os
from dataclasses import dataclass

from library.data.group import DatasetGroup, build_dataset_group
from library.data.lint import lint_dataset, raise_if_fatal
from library.dataset_config import DatasetGroupBlueprint, build_blueprint
from library.errors import FlagError
from library.families import ModelFamily

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class ProcessInfo:
    """This process's place in a multi-process run (accelerate launch / torchrun), or 0 of 1."""

    index: int
    count: int

    @property
    def is_main(self) -> bool:
        return self.index == 0


def process_info() -> ProcessInfo:
    """Read from accelerate's state, falling back to RANK/WORLD_SIZE.

    The fallback matters on CPU: `accelerate launch --multi_gpu` without CUDA starts N processes that each
    believe they are alone (LIBRARIES.md §5); sharding by the launcher's environment still splits the work.
    """
    from accelerate import PartialState

    state = PartialState()
    if state.num_processes > 1:
        return ProcessInfo(state.process_index, state.num_processes)
    world = int(os.environ.get("WORLD_SIZE", "1"))
    return ProcessInfo(int(os.environ.get("RANK", "0")), world) if world > 1 else ProcessInfo(0, 1)


def blueprint_from_args(args: argparse.Namespace, family: ModelFamily | None = None,
                        supports_controlnet: bool | None = None) -> DatasetGroupBlueprint:
    """The blueprint of the dataset flags; ControlNet-style datasets (masks) only with --masked_loss by default.

    Raises:
        FlagError: --dataset_class (kohya's arbitrary dataset classes build on kohya's own dataset internals).
    """
    if getattr(args, "dataset_class", None):
        raise FlagError(f"--dataset_class {args.dataset_class}: arbitrary dataset classes are not supported (kohya's "
                        "are built on its own dataset internals); describe the data with --dataset_config")
    blueprint = build_blueprint(args, getattr(args, "dataset_config", None), supports_controlnet=supports_controlnet)
    if family is not None:
        for number, dataset in enumerate(blueprint.datasets):
            if dataset.params.bucket_reso_steps % family.bucket_reso_multiple:
                logger.warning("dataset %d: bucket_reso_steps %d is not a multiple of %d; %s latents may not "
                               "match the model's downsampling", number, dataset.params.bucket_reso_steps,
                               family.bucket_reso_multiple, family.name)
    return blueprint


def lint_from_args(args: argparse.Namespace, blueprint: DatasetGroupBlueprint, family: ModelFamily | None):
    """Run the dataset lint with the first tokenizer of the family (CLIP-L when unknown)."""
    from library.families import SD1
    from library.text.tokenize import load_tokenizer

    spec = (family or SD1).text_encoders[0]
    tokenizer = load_tokenizer(spec, getattr(args, "tokenizer_cache_dir", None))
    workers = max(1, min(8, os.cpu_count() or 1))
    return lint_dataset(blueprint, tokenizer=tokenizer, max_token_length=getattr(args, "max_token_length", None),
                        workers=workers)


def dataset_group_from_args(args: argparse.Namespace, family: ModelFamily, *, validation: bool = False,
                            blueprint: DatasetGroupBlueprint | None = None, lint: bool = True,
                            supports_controlnet: bool | None = None) -> DatasetGroup | None:
    """Scan (lint unless --skip_dataset_lint), then build the group; fails on corrupt images before models load."""
    blueprint = blueprint or blueprint_from_args(args, family, supports_controlnet=supports_controlnet)
    scanned_sizes = None
    if lint and not validation and not getattr(args, "skip_dataset_lint", False):
        report = lint_from_args(args, blueprint, family)
        for line in report.lines():
            logger.info("%s", line)
        raise_if_fatal(report)
        scanned_sizes = report.image_sizes
    seed = args.seed if getattr(args, "seed", None) is not None else 0
    workers = max(1, min(8, os.cpu_count() or 1))
    group = build_dataset_group(blueprint, seed=seed, latent_suffix=family.latent_cache_suffix,
                                validation=validation, scan_workers=workers, scanned_sizes=scanned_sizes)
    if group is not None:
        for line in group.summary_lines():
            logger.info("%s", line)
    return group
