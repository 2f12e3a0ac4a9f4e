"""Textual inversion on the one training loop: `TextualInversion` turns a `NetworkTrainer` (SD1/2 or SDXL) into
kohya's train_textual_inversion.py / sdxl_train_textual_inversion.py (TRAINERS §3, COMPAT §5).

What differs from LoRA training is here: the new tokens (added to the tokenizers and encoders with
library/text/textual_inversion.py, the generators' code), their vectors as the trained "network"
(library/train/token_vectors.py), the captions (token expansion or templates, library/text/ti_templates.py), the
flag checks, and the embedding file. Phases, loop, noise/loss, sampling, validation, logging, states and exact
resume are NetworkTrainer's.
"""
from __future__ import annotations

import argparse
import dataclasses
import logging
from pathlib import Path

import torch

from library.errors import FlagError, ModelFormatError
from library.text import textual_inversion as ti
from library.text.ti_templates import OBJECT_TEMPLATES, STYLE_TEMPLATES, TokenCaptions
from library.train.token_vectors import TokenVectors

logger = logging.getLogger(__name__)

class TextualInversion:
    """Mixin over NetworkTrainer / SdxlNetworkTrainer (kohya's TextualInversionTrainer hooks as overrides)."""

    script_name = "train_textual_inversion.py"
    tracker_name = "textual_inversion"

    # ------------------------------------------------------------------------------------------ flags

    def prepare_run(self, args: argparse.Namespace):
        from library.train.run_setup import fill_network_flags

        fill_network_flags(args, "textual inversion", network_train_unet_only=False,
                           network_train_text_encoder_only=True)
        args.log_tracker_name = args.log_tracker_name or self.tracker_name
        self._check_ti_flags(args)
        self._num_vectors = args.num_vectors_per_token
        if args.output_name is None:
            args.output_name = args.token_string  # kohya: the file is named after the token
        run = super().prepare_run(args)
        tokenizers = self.load_tokenizer(args)
        tokenizers = list(tokenizers) if isinstance(tokenizers, (list, tuple)) else [tokenizers]
        self.assert_token_string(args.token_string, tokenizers)
        self._init_ids = self._init_word_ids(args, tokenizers)
        self._start_vectors = self._read_weights(args) if args.weights else None
        rule = self.caption_rule(args)
        if not rule.templates:
            self._check_captions_name_the_token(run.train_group, args.token_string)
        for group in (run.train_group, run.val_group):
            if group is not None:
                group.set_caption_transform(rule)
        return run

    def _check_ti_flags(self, args: argparse.Namespace) -> None:
        if not args.token_string:
            raise FlagError("--token_string is required: the new word to train, e.g. --token_string mychar")
        if not ti.is_usable_token(args.token_string):
            raise FlagError(f"--token_string {args.token_string!r}: expected one word without spaces, brackets or "
                            "colons (it is matched as a whole word in captions and prompts)")
        if args.num_vectors_per_token < 1:
            raise FlagError(f"--num_vectors_per_token {args.num_vectors_per_token}: expected at least 1")
        if args.cache_text_encoder_outputs or args.cache_text_encoder_outputs_to_disk:
            raise FlagError("--cache_text_encoder_outputs cannot be used in textual inversion: the embedding being "
                            "trained is part of the text encoder's input, so its outputs change every step")
        if args.use_object_template and args.use_style_template:
            logger.warning("--use_object_template and --use_style_template both given; training with the object "
                           "templates (kohya's rule)")
        if args.init_word is not None and not args.init_word.strip():
            raise FlagError(f"--init_word {args.init_word!r}: tokenizes to nothing (only spaces); give a word "
                            "(e.g. --init_word girl) or leave it out")

    @staticmethod
    def _check_captions_name_the_token(group, token: str) -> None:
        """Without templates the vectors train only through captions that contain the token: none would mean
        hours of training that change nothing (a common kohya_ss report)."""
        from library.data.captions import add_prefix_suffix

        for dataset in group.datasets:
            for info in dataset.images:
                subset = dataset.subsets[info.subset_index]
                caption = add_prefix_suffix(info.caption or "", subset.caption_prefix, subset.caption_suffix)
                if ti.expand_tokens(caption, {token: "\0"}) != caption:
                    return
        raise FlagError(f"--token_string {token}: no caption of the training images contains it as a word, so the "
                        "embedding would never train; put it in the captions (or caption_prefix), or use "
                        "--use_object_template / --use_style_template")

    def check_network_arguments(self, args) -> None:
        from library.train import run_setup

        run_setup.check_learning_rates(args)

    def token_names(self, args) -> list[str]:
        """kohya's tokens of the embedding: T, T1 ... T{n-1}."""
        return [args.token_string] + [f"{args.token_string}{index}" for index in range(1, args.num_vectors_per_token)]

    def caption_rule(self, args) -> TokenCaptions:
        templates = OBJECT_TEMPLATES if args.use_object_template else (
            STYLE_TEMPLATES if args.use_style_template else ())
        return TokenCaptions(args.token_string, " ".join(self.token_names(args)), tuple(templates))

    def assert_token_string(self, token_string: str, tokenizers) -> None:
        """kohya's hook: none of the new tokens may be a word of any tokenizer yet."""
        names = [token_string] + [f"{token_string}{index}" for index in range(1, self._num_vectors)]
        for number, tokenizer in enumerate(tokenizers, start=1):
            vocab = tokenizer.get_vocab()
            taken = [name for name in names if name in vocab or name.lower() + "</w>" in vocab]
            if taken:
                which = f"tokenizer {number}" if len(tokenizers) > 1 else "the tokenizer"
                raise FlagError(f"--token_string {token_string}: {taken[0]!r} is already a word of {which}; the "
                                "embedding would change an ordinary word. Pick a rare string (e.g. "
                                f"{token_string}_ti or sks{token_string})")

    def _init_word_ids(self, args, tokenizers) -> list[list[int]] | None:
        """Per tokenizer, the ids of --init_word without start/end tokens (kohya's per-tokenizer rule)."""
        if args.init_word is None:
            return None
        per_tokenizer = []
        for tokenizer in tokenizers:
            ids = tokenizer(args.init_word, add_special_tokens=False).input_ids
            if not ids:
                raise FlagError(f"--init_word {args.init_word!r}: tokenizes to nothing; give a word")
            per_tokenizer.append(list(ids))
        count = len(per_tokenizer[0])
        if count != args.num_vectors_per_token and args.num_vectors_per_token > 1:
            logger.warning("--init_word %r has %d token(s) for %d vectors: vector i starts from token i mod %d",
                           args.init_word, count, args.num_vectors_per_token, count)
        return per_tokenizer

    def _read_weights(self, args) -> list[torch.Tensor]:
        """--weights checked against this model (family, widths, vector count) before any weight is read."""
        from library.models.load import text_encoder_widths

        path = Path(args.weights)
        if not path.is_file():
            raise FlagError(f"--weights {path}: file not found")
        widths = text_encoder_widths(args.pretrained_model_name_or_path, self.family)
        try:
            embedding = ti.load_embedding(path, self.family, widths, token=args.token_string)
        except (ModelFormatError, FlagError) as error:
            raise FlagError(f"--weights {error}") from None
        if embedding.num_vectors != args.num_vectors_per_token:
            raise FlagError(f"--weights {path}: has {embedding.num_vectors} vector(s), but "
                            f"--num_vectors_per_token is {args.num_vectors_per_token}; give the same count")
        return [block.float() for block in self.load_weights(path)]

    def load_weights(self, file) -> list[torch.Tensor]:
        """kohya's hook: the `[n, width]` block of each text encoder in an embedding file."""
        tensors = ti.read_embedding_file(file)
        return [tensors[key] for key in ti.SDXL_KEYS] if len(self.family.text_encoders) == 2 else \
            list(tensors.values())[:1]

    # ------------------------------------------------------------------------------------------ models

    def cast_text_encoder(self, args) -> bool:
        return bool(args.full_fp16 or args.full_bf16)  # kohya: fp32 encoders under autocast unless --full_*

    def is_train_text_encoder(self, args) -> bool:
        return True  # the vectors' gradient flows through the (frozen) encoders

    def load_models(self, run):
        """The base models, then the new tokens in copies of the tokenizers and rows of the encoders."""
        from library.text.conditioning import CaptionEncoder
        from library.train import strategies

        models = super().load_models(run)
        args = run.args
        start = self._start_vectors or self._initial_vectors(args, models.text_encoders)
        placeholder = ti.Embedding(token=args.token_string, vectors=start, path=Path(args.weights or "init"))
        # the encoders' tables stay as they are: the new ids are read from the trained vectors (TokenVectors)
        tokenizers = ti.install_embeddings([placeholder], models.tokenizers, models.text_encoders,
                                           write_vectors=False)
        self._first_ids = [ti.embedding_token_ids(tokenizer, placeholder)[0] for tokenizer in tokenizers]
        old = models.caption_encoder
        models.tokenizers = tokenizers
        models.tokenize_strategy = strategies.TokenizeStrategy(tokenizers, args.max_token_length)
        models.caption_encoder = CaptionEncoder(old.family, tokenizers, models.text_encoders,
                                                max_token_length=old.max_token_length, clip_skip=old.clip_skip,
                                                weighted=old.weighted)
        models.text_encoding_strategy = self.get_text_encoding_strategy(args)
        self._start = start
        return models

    def _initial_vectors(self, args, text_encoders) -> list[torch.Tensor]:
        n = args.num_vectors_per_token
        blocks = []
        for slot, encoder in enumerate(text_encoders):
            table = encoder.get_input_embeddings().weight.detach().float()
            if self._init_ids is None:
                blocks.append(table.mean(dim=0, keepdim=True).repeat(n, 1))
            else:
                ids = self._init_ids[slot]
                blocks.append(torch.stack([table[ids[index % len(ids)]] for index in range(n)]))
        return blocks

    def make_network(self, run, models) -> TokenVectors:
        return TokenVectors(self._start, self._first_ids)

    def _load_sample_prompts(self, args) -> list:
        prompts = super()._load_sample_prompts(args)
        expansions = {args.token_string: " ".join(self.token_names(args))}
        return [dataclasses.replace(prompt, prompt=ti.expand_tokens(prompt.prompt, expansions),
                                    negative_prompt=ti.expand_tokens(prompt.negative_prompt, expansions))
                for prompt in prompts]

    # ------------------------------------------------------------------------------------------ logging

    def generate_step_logs(self, args, current_loss, avr_loss, lr_scheduler, lr_descriptions, *rest,
                           **named) -> dict:
        """The LoRA trainer's keys plus kohya's TI keys `loss` and `lr` (TRAINERS §3.4)."""
        logs = super().generate_step_logs(args, current_loss, avr_loss, lr_scheduler, lr_descriptions, *rest,
                                          **named)
        return {"loss": current_loss, "lr": float(lr_scheduler.get_last_lr()[0]), **logs}

    # ------------------------------------------------------------------------------------------ saving

    def output_extension(self, args) -> str:
        return "." + args.save_model_as  # kohya: literally "." + the format

    def get_sai_model_spec(self, args) -> dict[str, str]:
        from library.train.metadata import modelspec_metadata

        return modelspec_metadata(args, self.family, kind="textual-inversion",
                                  started_at=self._run.progress.started_at, resolution=self.training_resolution())

    def save_network(self, run, trainable, path: Path, epoch: int) -> None:
        """The embedding file: `emb_params` (SD1/2) or `clip_l` + `clip_g` (SDXL); modelspec metadata in
        .safetensors only, as kohya. Written through a temp file."""
        from library.models.save import precision_dtype
        from library.models.state_dict_io import atomic_output

        dtype = precision_dtype(run.args.save_precision)
        with atomic_output(path) as temp:  # modelspec.* only: no ss_* keys in embeddings (kohya)
            self.save_weights(temp, list(trainable.network.vectors), dtype, dict(trainable.modelspec))
        logger.info("saved %s", path)

    def save_weights(self, file, embs_list, dtype, metadata) -> None:
        """kohya's hook: write the vectors of each text encoder (`embs_list[i]`: `[n, width_i]`)."""
        keys = ti.SDXL_KEYS if len(embs_list) == 2 else (ti.SINGLE_ENCODER_KEY,)
        tensors = {key: block.detach().to("cpu", dtype=dtype or block.dtype).contiguous()
                   for key, block in zip(keys, embs_list)}
        if self._run.args.save_model_as == "safetensors":
            from safetensors.torch import save_file

            save_file(tensors, str(file), metadata={key: str(value) for key, value in (metadata or {}).items()})
        else:
            torch.save(tensors, file)
