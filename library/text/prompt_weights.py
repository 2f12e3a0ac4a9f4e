"""The A1111 weighted-prompt syntax (COMPAT §13): the one implementation in this toolkit.

    (text)      weight × 1.1             [text]      weight ÷ 1.1
    (text:1.3)  weight × 1.3             nesting     factors multiply
    \\( \\) \\[ \\] \\\\   literal characters  unclosed ( or [   its factor applies to the rest of the prompt

`parse_prompt_attention` turns a prompt into (text, weight) pieces; `tokenize_weighted` turns captions into
chunked token ids with a weight per token, for `--weighted_captions` and for the generation pipelines.
"""
from __future__ import annotations

import logging
import re

import torch

from library.text.tokenize import CHUNK_CONTENT, chunk_count, split_into_chunks, split_weights_into_chunks

logger = logging.getLogger(__name__)

ROUND_FACTOR = 1.1
SQUARE_FACTOR = 1 / 1.1

# One lexical unit per match, tried in this order: an escaped character, a lone backslash, an explicit weight
# that closes a group (":1.3)" with optional spaces), a bracket, a colon, or a run of ordinary text.
_UNIT = re.compile(r"\\[()\[\]\\]|\\|:\s*([+-]?[.\d]+)\s*\)|[()\[\]]|:|[^\\()\[\]:]+")


def parse_prompt_attention(text: str) -> list[tuple[str, float]]:
    """Split a prompt into (text, weight) pieces; adjacent pieces of equal weight are merged.

    >>> parse_prompt_attention("a (red:1.5) [car]")
    [('a ', 1.0), ('red', 1.5), (' ', 1.0), ('car', 0.9090909090909091)]

    An empty prompt gives [("", 1.0)]. A ")" or "]" with no open group, and a ":number)" outside any "(", are
    kept as text. A backslash before anything other than ( ) [ ] \\ is dropped, as A1111 does.
    """
    pieces: list[list] = []  # [text, weight], mutable while groups close
    open_round: list[int] = []  # index into `pieces` where each open "(" starts
    open_square: list[int] = []

    def scale_from(start: int, factor: float) -> None:
        for piece in pieces[start:]:
            piece[1] *= factor

    for match in _UNIT.finditer(text):
        unit, explicit = match.group(0), match.group(1)
        if unit.startswith("\\"):
            pieces.append([unit[1:], 1.0])
        elif unit == "(":
            open_round.append(len(pieces))
        elif unit == "[":
            open_square.append(len(pieces))
        elif explicit is not None and open_round and _is_number(explicit):
            scale_from(open_round.pop(), float(explicit))
        elif unit == ")" and open_round:
            scale_from(open_round.pop(), ROUND_FACTOR)
        elif unit == "]" and open_square:
            scale_from(open_square.pop(), SQUARE_FACTOR)
        else:
            pieces.append([unit, 1.0])
    for start in open_round:
        scale_from(start, ROUND_FACTOR)
    for start in open_square:
        scale_from(start, SQUARE_FACTOR)

    merged: list[tuple[str, float]] = []
    for piece_text, weight in pieces:
        if merged and merged[-1][1] == weight:
            merged[-1] = (merged[-1][0] + piece_text, weight)
        else:
            merged.append((piece_text, weight))
    return merged or [("", 1.0)]


def _is_number(text: str) -> bool:
    try:
        float(text)
    except ValueError:
        return False
    return True


def weighted_tokens(tokenizer, text: str) -> tuple[list[int], list[float]]:
    """The content token ids of one prompt (no BOS/EOS) and the weight of each, from `parse_prompt_attention`."""
    pieces = parse_prompt_attention(text)
    encoded = tokenizer([piece for piece, _ in pieces], add_special_tokens=False).input_ids
    ids: list[int] = []
    weights: list[float] = []
    for piece_ids, (_, weight) in zip(encoded, pieces):
        ids.extend(piece_ids)
        weights.extend([weight] * len(piece_ids))
    return ids, weights


def chunks_needed(tokenizer, texts: list[str] | str, max_chunks: int) -> int:
    """How many 75-token windows the longest prompt needs (at least 1, at most `max_chunks`): the generators
    encode short prompts in one window even when long ones are allowed (`--max_embeddings_multiples`)."""
    if isinstance(texts, str):
        texts = [texts]
    longest = max((len(weighted_tokens(tokenizer, text)[0]) for text in texts), default=0)
    return max(1, min(max_chunks, -(-longest // CHUNK_CONTENT)))


def tokenize_weighted(tokenizer, texts: list[str] | str, max_token_length: int | None = None, *,
                      n_chunks: int | None = None) -> tuple[torch.LongTensor, torch.Tensor]:
    """Token ids and per-token weights, both `[B, n, 77]`, for weighted captions.

    Each piece of `parse_prompt_attention` is tokenized without BOS/EOS and its weight copied to its tokens;
    the tokens are cut to the budget of 75n (with a warning), wrapped as BOS + tokens + EOS + padding with
    weight 1.0 on those, and split into windows with the same EOS/PAD fix-ups as `tokenize_chunks`.
    n is `--max_token_length` / 75, or `n_chunks` when given (the generators choose any count).
    """
    if n_chunks is None:
        n_chunks = chunk_count(max_token_length)
    if isinstance(texts, str):
        texts = [texts]
    budget = CHUNK_CONTENT * n_chunks
    bos, eos, pad = tokenizer.bos_token_id, tokenizer.eos_token_id, tokenizer.pad_token_id
    all_ids, all_weights = [], []
    for text in texts:
        ids, weights = weighted_tokens(tokenizer, text)
        if len(ids) > budget:
            logger.warning("prompt truncated to %d tokens (it has %d; allow more with --max_token_length (training, "
                           "up to 225) or --max_embeddings_multiples (generation), or shorten it): %.80s",
                           budget, len(ids), text)
            ids, weights = ids[:budget], weights[:budget]
        padding = budget - len(ids)
        all_ids.append([bos, *ids, eos] + [pad] * padding)
        all_weights.append([1.0, *weights, 1.0] + [1.0] * padding)
    ids_tensor = torch.tensor(all_ids, dtype=torch.long)
    weights_tensor = torch.tensor(all_weights, dtype=torch.float32)
    return (split_into_chunks(ids_tensor, n_chunks, eos, pad),
            split_weights_into_chunks(weights_tensor, n_chunks))
