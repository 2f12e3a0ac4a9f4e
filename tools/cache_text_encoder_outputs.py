"""Cache text-encoder outputs of a dataset's captions to disk (`<image stem>_te_outputs.npz`), before training.

Keys follow kohya (hidden_state1, hidden_state2, pool2 for SDXL; hidden_state1 for SD1/SD2). Beyond kohya,
each file records a fingerprint of the caption, the tokenizers, the encoder weights and the settings, so an
edited caption is re-encoded instead of silently reused. Captions must be deterministic (no shuffle, dropout,
wildcards or token warm-up). Under `accelerate launch --num_processes N` each process caches its own share.
"""
from __future__ import annotations

import argparse
import logging
import sys
from pathlib import Path

if __package__ in (None, ""):
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from library.cli import run_cli
from library.options.dataset import add_dataset_arguments
from library.options.model import add_model_arguments, add_text_encoding_arguments
from library.options.training import add_training_arguments

logger = logging.getLogger(__name__)


def setup_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    for add in (add_model_arguments, add_dataset_arguments, add_text_encoding_arguments, add_training_arguments):
        add(parser)
    parser.add_argument("--sdxl", action="store_true",
                        help="the model is SDXL (checked against the file; the family is detected anyway)")
    parser.add_argument("--text_encoder_batch_size", type=int, default=None,
                        help="captions encoded at once (default: --vae_batch_size)")
    parser.add_argument("--console_log_level", default=None, help="logging level (DEBUG also shows tracebacks)")
    return parser


def main(argv: list[str] | None = None):
    args = setup_parser().parse_args(argv)
    if not args.pretrained_model_name_or_path:
        from library.errors import FlagError

        raise FlagError("--pretrained_model_name_or_path is required (the model whose text encoders are used)")
    import torch

    from library.data.caching import cache_text_encoder_outputs
    from library.data.prepare import dataset_group_from_args, process_info
    from library.models.load import detect_family, load_text_encoders
    from library.options.training import weight_dtype
    from library.text.conditioning import CaptionEncoder
    from library.text.tokenize import load_tokenizers

    family = detect_family(args.pretrained_model_name_or_path, args.v_parameterization, v2=args.v2,
                           expected_families=("sdxl",) if args.sdxl else None)
    process = process_info()
    group = dataset_group_from_args(args, family, lint=process.is_main)
    group.check_text_encoder_outputs_cacheable()  # before loading the encoders
    encoders = load_text_encoders(args.pretrained_model_name_or_path, family, dtype=weight_dtype(args.mixed_precision))
    device = torch.device("cuda", process.index % torch.cuda.device_count()) if torch.cuda.is_available() else "cpu"
    for encoder in encoders:
        encoder.to(device).requires_grad_(False)
    caption_encoder = CaptionEncoder(family, load_tokenizers(family, args.tokenizer_cache_dir), encoders,
                                     max_token_length=args.max_token_length, clip_skip=args.clip_skip,
                                     weighted=args.weighted_captions)
    return cache_text_encoder_outputs(group, caption_encoder, to_disk=True,
                                      batch_size=args.text_encoder_batch_size or args.vae_batch_size,
                                      skip_check=args.skip_cache_check, process_index=process.index,
                                      num_processes=process.count, show_progress=process.is_main)


if __name__ == "__main__":
    run_cli(main)
