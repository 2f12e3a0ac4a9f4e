"""Captions -> text conditioning for the U-Net, for any family: tokenize, encode, and (un)pack cached outputs.

One object per run holds the tokenizers, encoders and the caption settings (`--max_token_length`,
`--clip_skip`, `--weighted_captions`). SD1/SD2 use one encoder at `--clip_skip`; a family with two encoders
(SDXL) goes through `library/text/sdxl_cond.encode_sdxl`.
"""
from __future__ import annotations

import hashlib
import json
from collections.abc import Sequence

import numpy as np
import torch

from library.errors import FlagError
from library.families import ModelFamily
from library.text.encode import TextConds, encode_chunks, layer_for_clip_skip
from library.text.prompt_weights import chunks_needed, tokenize_weighted
from library.text.sdxl_cond import encode_sdxl
from library.text.tokenize import tokenize_chunks


class CaptionEncoder:
    """Encodes batches of captions the way training conditions the U-Net."""

    def __init__(self, family: ModelFamily, tokenizers: Sequence, text_encoders: Sequence, *,
                 max_token_length: int | None = None, clip_skip: int | None = None, weighted: bool = False):
        if len(tokenizers) != len(family.text_encoders) or len(text_encoders) != len(family.text_encoders):
            raise ValueError(f"{family.name} needs {len(family.text_encoders)} tokenizer(s) and encoder(s), got "
                             f"{len(tokenizers)} and {len(text_encoders)}")
        self.family, self.tokenizers, self.text_encoders = family, list(tokenizers), list(text_encoders)
        self.max_token_length, self.clip_skip, self.weighted = max_token_length, clip_skip, weighted
        self.layer = layer_for_clip_skip(clip_skip)
        layers = getattr(getattr(self.text_encoders[0], "config", None), "num_hidden_layers", None)
        if clip_skip and not self.dual and isinstance(layers, int) and clip_skip > layers:
            raise FlagError(f"--clip_skip {clip_skip}: this model's text encoder has only {layers} layers; expected "
                            f"1 to {layers} (2 = the penultimate layer)")

    @property
    def dual(self) -> bool:
        return len(self.text_encoders) == 2

    def tokenize(self, captions: list[str]) -> list[tuple[torch.Tensor, torch.Tensor | None]]:
        """Per tokenizer: `[B, n, 77]` ids and (with weighted captions) weights of the same shape."""
        if self.weighted:
            return [tokenize_weighted(tokenizer, captions, self.max_token_length) for tokenizer in self.tokenizers]
        return [(tokenize_chunks(tokenizer, captions, self.max_token_length), None) for tokenizer in self.tokenizers]

    def encode(self, captions: list[str]) -> TextConds:
        """Conditioning as training computes it (`--max_token_length`, `--weighted_captions`, no re-normalising)."""
        return self._encode_tokens(self.tokenize(captions), normalize_mean=False)

    def encode_prompts(self, prompts: list[str], max_chunks: int) -> TextConds:
        """Conditioning as the image generators compute it: always weighted prompts (A1111 syntax) with the mean
        restored after weighting, in as many 75-token windows as the longest prompt needs, at most `max_chunks`
        (`--max_embeddings_multiples`). All prompts of one call get the same window count."""
        n_chunks = max(chunks_needed(tokenizer, prompts, max_chunks) for tokenizer in self.tokenizers)
        tokens = [tokenize_weighted(tokenizer, prompts, n_chunks=n_chunks) for tokenizer in self.tokenizers]
        return self._encode_tokens(tokens, normalize_mean=True)

    def _encode_tokens(self, tokens: list[tuple[torch.Tensor, torch.Tensor | None]], normalize_mean: bool
                       ) -> TextConds:
        if self.dual:
            (ids1, weights1), (ids2, weights2) = tokens
            return encode_sdxl(self.text_encoders, ids1, ids2, weights_te1=weights1, weights_te2=weights2,
                               normalize_mean=normalize_mean)
        ids, weights = tokens[0]
        return encode_chunks(self.text_encoders[0], ids, layer=self.layer, final_layer_norm=True, weights=weights,
                             normalize_mean=normalize_mean)

    def identity(self) -> list[str]:
        """What the outputs depend on besides the caption: tokenizers, encoder weights, settings."""
        from library.models.fingerprint import module_fingerprint

        parts = [_tokenizer_identity(tokenizer) for tokenizer in self.tokenizers]
        parts += [module_fingerprint(encoder) for encoder in self.text_encoders]
        parts.append(f"clip_skip={self.clip_skip};weighted={self.weighted};family={self.family.name}")
        return parts

    def hidden_sizes(self) -> list[int]:
        return [encoder.config.hidden_size for encoder in self.text_encoders]

    def split_for_cache(self, conds: TextConds) -> list[tuple[list[np.ndarray], np.ndarray | None]]:
        """Per sample: the hidden states of each encoder (kohya's hidden_state1/2) and the pooled vector."""
        sizes = self.hidden_sizes()
        hidden = conds.hidden_states.detach().float().cpu()
        per_encoder = torch.split(hidden, sizes, dim=-1) if self.dual else (hidden,)
        pooled = None if conds.pooled is None else conds.pooled.detach().float().cpu()
        return [([states[i].numpy() for states in per_encoder], None if pooled is None else pooled[i].numpy())
                for i in range(hidden.shape[0])]

    @staticmethod
    def join_cached(cached: dict, device=None, dtype=None) -> TextConds:
        """TextConds from a batch's stacked cache (`{"hidden_states": [per encoder], "pooled": ...}`)."""
        parts = list(cached["hidden_states"])
        hidden = torch.cat(parts, dim=-1).to(device=device, dtype=dtype)
        pooled = cached.get("pooled")
        return TextConds(hidden_states=hidden, pooled=None if pooled is None else pooled.to(device=device, dtype=dtype),
                         widths=tuple(part.shape[-1] for part in parts))


def _tokenizer_identity(tokenizer) -> str:
    vocab = json.dumps(sorted(tokenizer.get_vocab().items()), ensure_ascii=False)
    return f"{type(tokenizer).__name__}:pad={tokenizer.pad_token}:{hashlib.sha256(vocab.encode()).hexdigest()[:16]}"
