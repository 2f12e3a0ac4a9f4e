"""Flags that describe a trained model in its file's metadata (kohya spelling): the `ss_training_comment`,
`--no_metadata`, and the `modelspec.*` fields (COMPAT §2.1, §2.3). Building the metadata is `library.train.metadata`.
"""
from __future__ import annotations

import argparse
import logging

logger = logging.getLogger(__name__)


def add_metadata_arguments(parser: argparse.ArgumentParser) -> None:
    """Declare the metadata flags; the text ones default to None (nothing written for them)."""
    group = parser.add_argument_group("model metadata")
    group.add_argument("--training_comment", type=str, default=None,
                       help="free text stored as ss_training_comment in the saved file")
    group.add_argument("--no_metadata", action="store_true",
                       help="write only the minimal ss_* keys (base model, network type, dim, alpha) plus the "
                            "modelspec.* keys; dataset, tags and training settings are left out")
    group.add_argument("--metadata_title", type=str, default=None,
                       help="modelspec.title (default: --output_name, else 'LoRA@<unix time>')")
    group.add_argument("--metadata_author", type=str, default=None, help="modelspec.author: who made the model")
    group.add_argument("--metadata_description", type=str, default=None,
                       help="modelspec.description: what the model does")
    group.add_argument("--metadata_license", type=str, default=None,
                       help="modelspec.license: the licence name or URL")
    group.add_argument("--metadata_tags", type=str, default=None,
                       help="modelspec.tags: comma-separated tags, e.g. 'style,anime'")
    group.add_argument("--metadata_usage_hint", type=str, default=None,
                       help="modelspec.usage_hint: how to use the model (weight, prompt advice)")
    group.add_argument("--metadata_thumbnail", type=str, default=None,
                       help="modelspec.thumbnail: an image file (stored as a data: URL) or a data:/http(s) URL")
    group.add_argument("--metadata_merged_from", type=str, default=None,
                       help="modelspec.merged_from: comma-separated names of the models this one was merged from")
    group.add_argument("--metadata_trigger_phrase", type=str, default=None,
                       help="modelspec.trigger_phrase: the words that activate the trained concept")
    group.add_argument("--metadata_preprocessor", type=str, default=None,
                       help="modelspec.preprocessor: the preprocessor the model expects (ControlNet-style models)")
    group.add_argument("--metadata_is_negative_embedding", type=str, default=None,
                       help="modelspec.is_negative_embedding: true or false (textual-inversion embeddings meant "
                            "for the negative prompt)")


def check_metadata_arguments(args: argparse.Namespace) -> None:
    """Fail before training on metadata flags that could only fail at the first save.

    Raises FlagError naming --metadata_thumbnail (missing or non-image file) or --metadata_is_negative_embedding.
    """
    from library.train.metadata import negative_embedding_text, thumbnail_url

    thumbnail = getattr(args, "metadata_thumbnail", None)
    if thumbnail is not None:
        thumbnail_url(thumbnail)
    negative = getattr(args, "metadata_is_negative_embedding", None)
    if negative is not None:
        negative_embedding_text(negative)
