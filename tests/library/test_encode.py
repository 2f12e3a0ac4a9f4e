"""Chunked CLIP encoding, clip_skip layers, pooled vector and prompt weights (COMPAT §13, §14.3)."""
from __future__ import annotations

import copy

import pytest
import torch

from library.errors import FlagError
from library.families import SD1_TE, SD2_TE, SDXL_TE2
from library.text.encode import apply_token_weights, encode_chunks, layer_for_clip_skip
from library.text.prompt_weights import tokenize_weighted
from library.text.tokenize import load_tokenizer, tokenize_chunks

EOS = 49407
LONG = "a photo of an astronaut riding a horse on the moon, " * 12  # about 150 tokens
CAPTIONS = [LONG, "a photo of a horse"]


@pytest.fixture(scope="module")
def sd1(tiny_models):
    return tiny_models.bundle("sd1").text_encoders[0], load_tokenizer(SD1_TE)


@pytest.fixture(scope="module")
def sd2(tiny_models):
    return tiny_models.bundle("sd2-v").text_encoders[0], load_tokenizer(SD2_TE)


@pytest.fixture(scope="module")
def te2(tiny_models):
    return tiny_models.bundle("sdxl").text_encoders[1], load_tokenizer(SDXL_TE2)


def _by_hand(encoder, ids, select):
    """Encode every window on its own and stitch: BOS of 0, content of each, last position of the last."""
    outputs = [select(encoder(input_ids=ids[:, k], output_hidden_states=True)) for k in range(ids.shape[1])]
    return torch.cat([outputs[0][:, :1]] + [out[:, 1:76] for out in outputs] + [outputs[-1][:, 76:]], dim=1)


@pytest.mark.parametrize("which", ["sd1", "sd2", "te2"])
@pytest.mark.parametrize("max_token_length", [None, 150, 225])
def test_chunked_encoding_equals_windows_by_hand(request, which, max_token_length):
    encoder, tokenizer = request.getfixturevalue(which)
    ids = tokenize_chunks(tokenizer, CAPTIONS, max_token_length)
    cond = encode_chunks(encoder, ids)
    n = ids.shape[1]
    assert cond.hidden_states.shape == (2, 75 * n + 2, encoder.config.hidden_size)
    assert cond.pooled is None
    expected = _by_hand(encoder, ids, lambda out: out.last_hidden_state)
    torch.testing.assert_close(cond.hidden_states, expected, atol=1e-5, rtol=1e-5)


def test_single_window_is_last_hidden_state(sd1):
    encoder, tokenizer = sd1
    ids = tokenize_chunks(tokenizer, CAPTIONS, None)
    torch.testing.assert_close(encode_chunks(encoder, ids).hidden_states, encoder(ids[:, 0]).last_hidden_state)


def test_clip_skip_layers(sd1):
    encoder, tokenizer = sd1
    ids = tokenize_chunks(tokenizer, CAPTIONS, 150)
    assert layer_for_clip_skip(None) == layer_for_clip_skip(1) == -1
    skip1 = encode_chunks(encoder, ids, layer=layer_for_clip_skip(1)).hidden_states
    torch.testing.assert_close(skip1, encode_chunks(encoder, ids).hidden_states)
    skip2 = encode_chunks(encoder, ids, layer=layer_for_clip_skip(2)).hidden_states
    expected = _by_hand(encoder, ids, lambda out: encoder.final_layer_norm(out.hidden_states[-2]))
    torch.testing.assert_close(skip2, expected, atol=1e-5, rtol=1e-5)
    assert not torch.allclose(skip1, skip2)
    raw = encode_chunks(encoder, ids, layer=-2, final_layer_norm=False).hidden_states  # SDXL style: no norm
    torch.testing.assert_close(raw, _by_hand(encoder, ids, lambda out: out.hidden_states[-2]), atol=1e-5, rtol=1e-5)
    for bad in (0, -1):
        with pytest.raises(FlagError, match="--clip_skip"):
            layer_for_clip_skip(bad)


def _pool_by_hand(encoder, window_ids):
    out = encoder(input_ids=window_ids, output_hidden_states=True)
    first_eos = [row.tolist().index(EOS) for row in window_ids]
    states = torch.stack([out.last_hidden_state[b, pos] for b, pos in enumerate(first_eos)])
    return encoder.text_projection(states)


@pytest.mark.parametrize("max_token_length", [None, 225])
def test_pooled_is_first_eos_of_window_zero_projected(te2, max_token_length):
    encoder, tokenizer = te2
    ids = tokenize_chunks(tokenizer, CAPTIONS, max_token_length)
    cond = encode_chunks(encoder, ids, layer=-2, final_layer_norm=False, return_pooled=True)
    assert cond.pooled.shape == (2, encoder.config.projection_dim)
    torch.testing.assert_close(cond.pooled, _pool_by_hand(encoder, ids[:, 0]), atol=1e-5, rtol=1e-5)


def test_pooled_ignores_added_token_ids(te2):
    """A textual-inversion token id above EOS must not move the pooling position (CLIP's argmax pooling would)."""
    encoder, tokenizer = te2
    encoder = copy.deepcopy(encoder)
    encoder.resize_token_embeddings(49409)
    ids = tokenize_chunks(tokenizer, ["a photo of a horse"], None)
    ids[0, 0, 2] = 49408  # "<ti-token>" instead of "photo"
    cond = encode_chunks(encoder, ids, return_pooled=True)
    expected = _pool_by_hand(encoder, ids[:, 0])
    torch.testing.assert_close(cond.pooled, expected, atol=1e-5, rtol=1e-5)
    at_max_id = encoder.text_projection(encoder(input_ids=ids[:, 0]).last_hidden_state[:, 2])
    assert not torch.allclose(cond.pooled, at_max_id)


@pytest.mark.parametrize("max_token_length", [None, 150])
def test_weighted_encoding_scales_content_positions(sd1, max_token_length):
    encoder, tokenizer = sd1
    ids = tokenize_chunks(tokenizer, CAPTIONS, max_token_length)
    plain = encode_chunks(encoder, ids).hidden_states
    ones = torch.ones(ids.shape)
    torch.testing.assert_close(encode_chunks(encoder, ids, weights=ones).hidden_states, plain, rtol=0, atol=0)

    generator = torch.Generator().manual_seed(0)
    weights = 0.5 + torch.rand(ids.shape, generator=generator)
    weighted = encode_chunks(encoder, ids, weights=weights).hidden_states
    n = ids.shape[1]
    content = torch.cat([weights[:, k, 1:76] for k in range(n)], dim=1)
    expected = plain.clone()
    expected[:, 1:-1] *= content.unsqueeze(-1)  # BOS and the final position keep weight 1
    torch.testing.assert_close(weighted, expected)

    normalized = encode_chunks(encoder, ids, weights=weights, normalize_mean=True).hidden_states
    torch.testing.assert_close(normalized.mean(dim=(1, 2)), plain.mean(dim=(1, 2)), atol=1e-5, rtol=1e-4)
    ratio = (normalized / weighted).flatten(1)
    torch.testing.assert_close(ratio, ratio[:, :1].expand_as(ratio), atol=1e-4, rtol=1e-4)


def test_weighted_caption_end_to_end(sd1):
    encoder, tokenizer = sd1
    ids, weights = tokenize_weighted(tokenizer, ["a photo of an (astronaut:1.5) riding a horse"], None)
    plain_ids = tokenize_chunks(tokenizer, ["a photo of an astronaut riding a horse"], None)
    assert torch.equal(ids, plain_ids)
    plain = encode_chunks(encoder, ids).hidden_states
    weighted = encode_chunks(encoder, ids, weights=weights).hidden_states
    torch.testing.assert_close(weighted[:, 5], plain[:, 5] * 1.5)  # position 5 is "astronaut"
    torch.testing.assert_close(weighted[:, :5], plain[:, :5], rtol=0, atol=0)
    torch.testing.assert_close(weighted[:, 6:], plain[:, 6:], rtol=0, atol=0)


def test_weights_shape_mismatch_is_rejected():
    with pytest.raises(ValueError, match="weights"):
        apply_token_weights(torch.zeros(1, 77, 4), torch.ones(1, 2, 77))
