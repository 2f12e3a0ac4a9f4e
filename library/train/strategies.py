"""Small stand-ins for kohya's strategy objects (library/strategy_base.py), so trainer subclasses written for
kohya's `get_tokenize_strategy` / `get_text_encoding_strategy` / `get_latents_caching_strategy` /
`get_text_encoder_outputs_caching_strategy` hooks find the methods they call. They hold no state of their own:
the work is done by library/text (tokenizers, CaptionEncoder) and library/data (caches).
"""
from __future__ import annotations

from dataclasses import dataclass

import torch


@dataclass
class TokenizeStrategy:
    """kohya's TokenizeStrategy: `tokenize(text)` -> token ids per tokenizer, `[B, n, 77]` windows."""

    tokenizers: list
    max_token_length: int | None = None

    def tokenize(self, text: str | list[str]) -> list[torch.Tensor]:
        from library.text.tokenize import tokenize_chunks

        captions = [text] if isinstance(text, str) else list(text)
        return [tokenize_chunks(tokenizer, captions, self.max_token_length) for tokenizer in self.tokenizers]

    def tokenize_with_weights(self, text: str | list[str]) -> tuple[list[torch.Tensor], list[torch.Tensor]]:
        from library.text.prompt_weights import tokenize_weighted

        captions = [text] if isinstance(text, str) else list(text)
        pairs = [tokenize_weighted(tokenizer, captions, self.max_token_length) for tokenizer in self.tokenizers]
        return [ids for ids, _ in pairs], [weights for _, weights in pairs]


@dataclass
class TextEncodingStrategy:
    """kohya's TextEncodingStrategy: token ids -> `text_encoder_conds` (a TextConds, which reads as kohya's list)."""

    caption_encoder: object  # library.text.conditioning.CaptionEncoder with the run's settings

    def _encoder_for(self, models: list):
        from library.text.conditioning import CaptionEncoder

        encoder = self.caption_encoder
        if list(models) == list(encoder.text_encoders):
            return encoder
        return CaptionEncoder(encoder.family, encoder.tokenizers, list(models), max_token_length=encoder.max_token_length,
                              clip_skip=encoder.clip_skip, weighted=encoder.weighted)

    def encode_tokens(self, tokenize_strategy, models: list, tokens: list[torch.Tensor]):
        return self._encoder_for(models)._encode_tokens([(ids, None) for ids in tokens], normalize_mean=False)

    def encode_tokens_with_weights(self, tokenize_strategy, models: list, tokens: list[torch.Tensor],
                                   weights: list[torch.Tensor]):
        return self._encoder_for(models)._encode_tokens(list(zip(tokens, weights)), normalize_mean=False)


@dataclass(frozen=True)
class LatentsCachingStrategy:
    """kohya's LatentsCachingStrategy, as far as the loop needs it: the cache-name suffix (`_sd` / `_sdxl`)."""

    cache_suffix: str
    cache_to_disk: bool
    batch_size: int | None
    skip_disk_cache_validity_check: bool


@dataclass(frozen=True)
class TextEncoderOutputsCachingStrategy:
    """kohya's TextEncoderOutputsCachingStrategy, as far as the loop needs it: where and how outputs are cached."""

    cache_to_disk: bool
    batch_size: int | None
    skip_disk_cache_validity_check: bool
