"""Flags of textual-inversion training (train_textual_inversion.py, sdxl_train_textual_inversion.py), kohya's
names and defaults (TRAINERS §3.2)."""
from __future__ import annotations

import argparse

TI_SAVE_FORMATS = ("pt", "ckpt", "safetensors")


def add_textual_inversion_arguments(parser: argparse.ArgumentParser) -> None:
    group = parser.add_argument_group("textual inversion")
    group.add_argument("--token_string", type=str, default=None,
                       help="the new token T to train (required; one word that is not in the tokenizer yet). With "
                            "--num_vectors_per_token n the tokens T, T1 ... T{n-1} are added, and every whole-word "
                            "T in captions and sample prompts becomes 'T T1 ... T{n-1}' (kohya replaces T inside "
                            "longer words too). Also the default --output_name")
    group.add_argument("--init_word", type=str, default=None,
                       help="word(s) whose token embeddings start the vectors: vector i copies the word's token "
                            "i mod (its token count). Default: the mean of the vocabulary's embeddings")
    group.add_argument("--num_vectors_per_token", type=int, default=1,
                       help="vectors (tokens) the embedding has (default 1)")
    group.add_argument("--weights", type=str, default=None,
                       help="continue from this embedding file (.safetensors or .pt, kohya's or A1111's); it must "
                            "have --num_vectors_per_token vectors for this model's text encoder(s)")
    group.add_argument("--use_object_template", action="store_true",
                       help="ignore the captions: each image load trains with a random object template "
                            "('a photo of a T', 27 of them)")
    group.add_argument("--use_style_template", action="store_true",
                       help="ignore the captions: each image load trains with a random style template "
                            "('a painting in the style of T', 19 of them); with both flags the object templates "
                            "are used (kohya's rule), with a warning")
    group.add_argument("--save_model_as", type=str, default="pt", choices=TI_SAVE_FORMATS,
                       help="embedding file format (default pt, as kohya): pt/ckpt are torch files of the tensors, "
                            "safetensors also carries modelspec metadata")
    group.add_argument("--save_precision", type=str, default=None, choices=(None, "float", "fp16", "bf16"),
                       help="dtype of the saved vectors (default: their training dtype, fp32 unless --full_*)")
