"""The A1111 weighted-prompt syntax and weighted tokenization (COMPAT §13)."""
from __future__ import annotations

import logging

import pytest
import torch

from library.families import SD1_TE, SDXL_TE2
from library.text.prompt_weights import parse_prompt_attention, tokenize_weighted
from library.text.tokenize import load_tokenizer, tokenize_chunks

BOS, EOS = 49406, 49407
DOWN = 1 / 1.1

PROMPTS = [
    ("", [("", 1.0)]),
    ("a cat", [("a cat", 1.0)]),
    ("(cat)", [("cat", 1.1)]),
    ("[cat]", [("cat", DOWN)]),
    ("((cat))", [("cat", 1.1 * 1.1)]),
    ("[[cat]]", [("cat", DOWN * DOWN)]),
    ("(cat:1.5)", [("cat", 1.5)]),
    ("(cat : 0.5 )", [("cat ", 0.5)]),
    ("((cat:1.5))", [("cat", 1.5 * 1.1)]),
    ("a (b) c", [("a ", 1.0), ("b", 1.1), (" c", 1.0)]),
    ("(a (b) c)", [("a ", 1.1), ("b", 1.21), (" c", 1.1)]),
    ("(a [b] c:2)", [("a ", 2.0), ("b", 2.0 * DOWN), (" c", 2.0)]),
    ("a (red:1.5) [car]", [("a ", 1.0), ("red", 1.5), (" ", 1.0), ("car", DOWN)]),
    # escapes are literal characters
    (r"\(cat\)", [("(cat)", 1.0)]),
    (r"\[cat\] and \\", [("[cat] and \\", 1.0)]),
    (r"(a \(b\))", [("a (b)", 1.1)]),
    # unbalanced brackets apply to the rest of the prompt; unmatched closers are text
    ("a (b c", [("a ", 1.0), ("b c", 1.1)]),
    ("a [b c", [("a ", 1.0), ("b c", DOWN)]),
    ("((a) b", [("a", 1.21), (" b", 1.1)]),
    ("a ) b ]", [("a ) b ]", 1.0)]),
    ("a:1.5) b", [("a:1.5) b", 1.0)]),
    ("time: 12:30", [("time: 12:30", 1.0)]),
    # adjacent equal weights merge
    ("(a)(b)", [("ab", 1.1)]),
    ("(a:1.5) (b:1.5)", [("a", 1.5), (" ", 1.0), ("b", 1.5)]),
    ("(a:1.2.3)", [("a:1.2.3)", 1.1)]),  # not a number: text, and the "(" stays open (A1111 would raise)
    ("a\\b", [("ab", 1.0)]),  # a backslash before anything else is dropped, as in A1111
]


@pytest.mark.parametrize("prompt,expected", PROMPTS, ids=[p or "<empty>" for p, _ in PROMPTS])
def test_parse_prompt_attention(prompt, expected):
    result = parse_prompt_attention(prompt)
    assert [text for text, _ in result] == [text for text, _ in expected]
    assert [weight for _, weight in result] == pytest.approx([weight for _, weight in expected], rel=1e-12)


@pytest.fixture(scope="module")
def tokenizers():
    return load_tokenizer(SD1_TE), load_tokenizer(SDXL_TE2)


def test_weights_are_copied_to_every_token_of_a_piece(tokenizers):
    for tokenizer in tokenizers:
        ids, weights = tokenize_weighted(tokenizer, ["a (astronaut riding:1.3) [horse] of"], None)
        assert ids.shape == weights.shape == (1, 1, 77)
        assert ids[0, 0, :7].tolist() == [BOS, 320, 18376, 6765, 4558, 539, EOS]
        assert ids[0, 0, 7:].tolist() == [tokenizer.pad_token_id] * 70
        assert weights[0, 0, :7].tolist() == pytest.approx([1.0, 1.0, 1.3, 1.3, DOWN, 1.0, 1.0])
        assert weights[0, 0, 7:].tolist() == [1.0] * 70
        assert weights.dtype == torch.float32


@pytest.mark.parametrize("max_token_length", [None, 150, 225])
def test_unweighted_prompt_gives_the_plain_ids(tokenizers, max_token_length):
    captions = ["A photo of an astronaut riding a horse", "photo " * 80, "a " * 160, ""]
    for tokenizer in tokenizers:
        ids, weights = tokenize_weighted(tokenizer, captions, max_token_length)
        assert torch.equal(ids, tokenize_chunks(tokenizer, captions, max_token_length))
        assert torch.all(weights == 1.0)


def test_weights_follow_tokens_across_windows(tokenizers):
    _, tok_g = tokenizers
    caption = "photo " * 75 + "(horse:2) a"  # token 76 (the first of window 2) is weighted
    ids, weights = tokenize_weighted(tok_g, [caption], 150)
    assert ids.shape == (1, 2, 77)
    assert ids[0, 0, 76].item() == EOS  # full first window ends with EOS (pad != eos fix-up)
    assert ids[0, 1, :4].tolist() == [BOS, 4558, 320, EOS]
    assert weights[0, 1, :4].tolist() == [1.0, 2.0, 1.0, 1.0]
    assert torch.all(weights[0, 0] == 1.0)


def test_too_long_prompt_is_truncated_with_a_warning(tokenizers, caplog):
    tok_l, _ = tokenizers
    with caplog.at_level(logging.WARNING, logger="library.text.prompt_weights"):
        ids, weights = tokenize_weighted(tok_l, ["(photo:1.5) " * 80], None)
    assert "truncated" in caplog.text
    assert ids[0, 0].tolist() == [BOS] + [1125] * 75 + [EOS]
    assert weights[0, 0].tolist() == [1.0] + [1.5] * 75 + [1.0]
