"""SDXL dual-encoder context, pooled vector and size conditioning (COMPAT §14.3–14.4)."""
from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from library.families import SDXL
from library.text.prompt_weights import tokenize_weighted
from library.text.sdxl_cond import encode_sdxl, sdxl_vector, size_embeddings
from library.text.tokenize import load_tokenizers, tokenize_chunks

EOS = 49407
CAPTIONS = ["a photo of an astronaut riding a horse on the moon, " * 12, "a photo of a horse"]


@pytest.fixture(scope="module")
def sdxl(tiny_models):
    return tiny_models.bundle("sdxl"), load_tokenizers(SDXL)


def _embedding_by_hand(x: int, dim: int) -> list[float]:
    half = dim // 2
    freqs = [math.exp(-math.log(10000) * i / half) for i in range(half)]
    return [math.cos(x * f) for f in freqs] + [math.sin(x * f) for f in freqs]


def test_size_embeddings_equal_hand_computation():
    original, crop, target = (1216, 832), (16, 48), (1024, 768)
    for dim in (8, 256):
        result = size_embeddings(original, crop, target, dim=dim)
        assert result.shape == (1, 6 * dim) and result.dtype == torch.float32
        expected = [v for x in (*original, *crop, *target) for v in _embedding_by_hand(x, dim)]
        np.testing.assert_allclose(result[0].numpy(), np.array(expected), atol=2e-3)
    # cos first: the very first value is cos(original_h · 1)
    assert size_embeddings(original, crop, target, dim=256)[0, 0].item() == pytest.approx(math.cos(1216), abs=1e-4)
    assert size_embeddings((0, 0), (0, 0), (0, 0), dim=8)[0].tolist() == ([1.0] * 4 + [0.0] * 4) * 6


def test_size_embeddings_batch_and_diffusers_agree(sdxl):
    bundle, _ = sdxl
    unet = bundle.unet
    dim = unet.config.addition_time_embed_dim
    originals = torch.tensor([[1024, 1024], [768, 1344]])
    crops = torch.tensor([[0, 0], [32, 0]])
    targets = torch.tensor([[1024, 1024], [768, 1344]])
    ours = size_embeddings(originals, crops, targets, dim=dim)
    assert ours.shape == (2, 6 * dim)
    # diffusers' SDXL U-Net embeds time_ids = (orig h, orig w, crop top, crop left, target h, target w) itself.
    time_ids = torch.cat([originals, crops, targets], dim=1)
    theirs = unet.add_time_proj(time_ids.flatten()).reshape(2, -1)
    torch.testing.assert_close(ours, theirs, atol=1e-4, rtol=1e-4)
    # one pair broadcasts over the batch
    torch.testing.assert_close(size_embeddings((1024, 1024), crops, (1024, 1024), dim=dim)[0], ours[0])


@pytest.mark.parametrize("max_token_length", [None, 225])
def test_encode_sdxl_context_and_pooled(sdxl, max_token_length):
    bundle, (tok1, tok2) = sdxl
    te1, te2 = bundle.text_encoders
    ids1 = tokenize_chunks(tok1, CAPTIONS, max_token_length)
    ids2 = tokenize_chunks(tok2, CAPTIONS, max_token_length)
    cond = encode_sdxl(bundle.text_encoders, ids1, ids2)
    n = ids1.shape[1]
    d1, d2 = te1.config.hidden_size, te2.config.hidden_size
    assert cond.hidden_states.shape == (2, 75 * n + 2, d1 + d2)
    assert d1 + d2 == bundle.unet.config.cross_attention_dim

    # window 0 by hand: penultimate hidden states, no final LayerNorm, TE1 features first
    out1 = te1(input_ids=ids1[:, 0], output_hidden_states=True)
    out2 = te2(input_ids=ids2[:, 0], output_hidden_states=True)
    torch.testing.assert_close(cond.hidden_states[:, :76, :d1], out1.hidden_states[-2][:, :76], atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(cond.hidden_states[:, :76, d1:], out2.hidden_states[-2][:, :76], atol=1e-5, rtol=1e-5)

    # pooled: TE2 final-LN state at the first EOS of window 0, projected
    first_eos = [row.tolist().index(EOS) for row in ids2[:, 0]]
    if max_token_length == 225:
        assert first_eos[0] == 76  # a full first window ends with the EOS the fix-up put there
    states = torch.stack([out2.last_hidden_state[b, pos] for b, pos in enumerate(first_eos)])
    torch.testing.assert_close(cond.pooled, te2.text_projection(states), atol=1e-5, rtol=1e-5)

    size = size_embeddings((1024, 1024), (0, 0), (1024, 1024), dim=bundle.unet.config.addition_time_embed_dim)
    vector = sdxl_vector(cond.pooled, size.expand(2, -1))
    assert vector.shape == (2, bundle.unet.config.projection_class_embeddings_input_dim)
    torch.testing.assert_close(vector[:, :cond.pooled.shape[1]], cond.pooled)


def test_encode_sdxl_runs_the_unet(sdxl):
    bundle, (tok1, tok2) = sdxl
    cond = encode_sdxl(bundle.text_encoders, tokenize_chunks(tok1, CAPTIONS, 150), tokenize_chunks(tok2, CAPTIONS, 150))
    time_ids = torch.tensor([[1024, 1024, 0, 0, 1024, 1024]] * 2)
    with torch.no_grad():
        out = bundle.unet(torch.zeros(2, 4, 8, 8), 10, encoder_hidden_states=cond.hidden_states,
                          added_cond_kwargs={"text_embeds": cond.pooled, "time_ids": time_ids}).sample
    assert out.shape == (2, 4, 8, 8) and torch.isfinite(out).all()


def test_weighted_sdxl_scales_each_encoder_and_keeps_pooled(sdxl):
    bundle, (tok1, tok2) = sdxl
    text = ["a photo of an (astronaut:1.5) riding a horse"]
    ids1, w1 = tokenize_weighted(tok1, text, None)
    ids2, w2 = tokenize_weighted(tok2, text, None)
    plain = encode_sdxl(bundle.text_encoders, ids1, ids2)
    weighted = encode_sdxl(bundle.text_encoders, ids1, ids2, weights_te1=w1, weights_te2=w2)
    torch.testing.assert_close(weighted.hidden_states[:, 5], plain.hidden_states[:, 5] * 1.5)
    torch.testing.assert_close(weighted.hidden_states[:, 6:], plain.hidden_states[:, 6:], rtol=0, atol=0)
    torch.testing.assert_close(weighted.pooled, plain.pooled, rtol=0, atol=0)
