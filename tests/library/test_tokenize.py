"""Offline CLIP tokenizers, --tokenizer_cache_dir, and the 75/150/225-token chunking rule (COMPAT §14.1–14.2)."""
from __future__ import annotations

import json

import pytest
import torch

from library.errors import FlagError
from library.families import SD1, SD1_TE, SD2_TE, SDXL, SDXL_TE1, SDXL_TE2
from library.text import tokenize as tokenize_module
from library.text.tokenize import load_tokenizer, load_tokenizers, save_tokenizer, tokenize_chunks

BOS, EOS = 49406, 49407
ASTRONAUT = "a photo of an astronaut riding a horse"
ASTRONAUT_IDS = [BOS, 320, 1125, 539, 550, 18376, 6765, 320, 4558, EOS]  # the real CLIP ids

# Words that are one token each, with their CLIP ids (from the astronaut sentence).
WORD_IDS = {"a": 320, "photo": 1125, "of": 539, "an": 550, "astronaut": 18376, "riding": 6765, "horse": 4558}


def caption_of(n_tokens: int) -> tuple[str, list[int]]:
    """A caption of exactly `n_tokens` content tokens, and those ids."""
    words = [list(WORD_IDS)[index % len(WORD_IDS)] for index in range(n_tokens)]
    return " ".join(words), [WORD_IDS[word] for word in words]


@pytest.fixture(scope="module")
def tok_l():
    return load_tokenizer(SD1_TE)  # pads with <|endoftext|>


@pytest.fixture(scope="module")
def tok_g():
    return load_tokenizer(SDXL_TE2)  # pads with "!" (id 0)


# ---------------------------------------------------------------- tokenizers

@pytest.mark.parametrize("spec", [SD1_TE, SD2_TE, SDXL_TE1, SDXL_TE2], ids=["sd1", "sd2", "sdxl1", "sdxl2"])
def test_astronaut_ids_are_the_real_clip_ids(spec):
    tokenizer = load_tokenizer(spec)
    assert tokenizer(ASTRONAUT).input_ids == ASTRONAUT_IDS
    # CLIP's clean-up: lower case, runs of whitespace collapse, ends stripped.
    assert tokenizer("  A Photo\tof  an\nASTRONAUT riding a horse ").input_ids == ASTRONAUT_IDS
    assert tokenizer.model_max_length == 77
    assert (tokenizer.bos_token_id, tokenizer.eos_token_id) == (BOS, EOS)
    assert len(tokenizer) == 49408


def test_pad_ids_follow_the_spec(tok_l, tok_g):
    assert tok_l.pad_token_id == EOS
    assert tok_g.pad_token_id == 0
    assert load_tokenizer(SD2_TE).pad_token_id == 0
    padded_l = tok_l("a photo", padding="max_length", max_length=77).input_ids
    padded_g = tok_g("a photo", padding="max_length", max_length=77).input_ids
    assert padded_l == [BOS, 320, 1125] + [EOS] * 74
    assert padded_g == [BOS, 320, 1125, EOS] + [0] * 73


def test_tokenizers_are_cached_per_process():
    assert load_tokenizer(SD1_TE) is load_tokenizer(SDXL_TE1)  # same hub id and pad token
    assert [t.pad_token_id for t in load_tokenizers(SDXL)] == [EOS, 0]
    assert [t.pad_token_id for t in load_tokenizers(SD1)] == [EOS]


def test_tokenizer_cache_dir_saves_then_loads(tmp_path, monkeypatch):
    specs = [SD1_TE, SDXL_TE2]
    built = [load_tokenizer(spec, cache_dir=tmp_path) for spec in specs]
    for spec in specs:
        folder = tmp_path / spec.tokenizer_id.replace("/", "_")
        assert (folder / "vocab.json").is_file() and (folder / "merges.txt").is_file()
        assert (folder / "tokenizer.json").is_file() and (folder / "tokenizer_config.json").is_file()
    folder = tmp_path / "openai_clip-vit-large-patch14"
    vocab = json.loads((folder / "vocab.json").read_text(encoding="utf-8"))
    assert len(vocab) == 49408 and vocab["<|endoftext|>"] == EOS and vocab["!"] == 0
    merges = (folder / "merges.txt").read_text(encoding="utf-8").splitlines()
    assert merges[0].startswith("#version") and len(merges) == 1 + 48894 and merges[1] == "i n"
    assert (tmp_path / "laion_CLIP-ViT-bigG-14-laion2B-39B-b160k").is_dir()

    monkeypatch.setattr(tokenize_module, "_TOKENIZERS", {})  # forget the in-process cache: read the folders
    loaded = [load_tokenizer(spec, cache_dir=tmp_path) for spec in specs]
    text = ["A photo of an astronaut, riding a horse!", "x " * 90]
    for before, after in zip(built, loaded):
        assert after is not before
        assert after.pad_token_id == before.pad_token_id
        assert torch.equal(tokenize_chunks(after, text, 150), tokenize_chunks(before, text, 150))


def test_folder_with_only_vocab_and_merges_loads_and_pad_is_forced(tmp_path, tok_l):
    """A folder as transformers 4.x's slow tokenizer writes it (no tokenizer.json), padding with EOS: the OpenCLIP
    spec still gets pad id 0, as kohya forces it."""
    saved = tmp_path / "saved"
    save_tokenizer(tok_l, saved)
    folder = tmp_path / SDXL_TE2.tokenizer_id.replace("/", "_")
    folder.mkdir()
    for name in ("vocab.json", "merges.txt"):
        (folder / name).write_bytes((saved / name).read_bytes())
    (folder / "tokenizer_config.json").write_text(json.dumps(
        {"tokenizer_class": "CLIPTokenizer", "model_max_length": 77, "bos_token": "<|startoftext|>",
         "eos_token": "<|endoftext|>", "unk_token": "<|endoftext|>", "pad_token": "<|endoftext|>"}))
    tokenizer = load_tokenizer(SDXL_TE2, cache_dir=tmp_path)
    assert tokenizer.pad_token_id == 0
    assert tokenizer(ASTRONAUT).input_ids == ASTRONAUT_IDS


# ---------------------------------------------------------------- chunking

def _l(*parts):
    """Concatenate lists of ids (test helper for readable expectations)."""
    return [token for part in parts for token in part]


def _cases():
    c = {n: caption_of(n)[1] for n in (76, 150, 226, 300)}
    B, E = [BOS], [EOS]
    # (content tokens, max_token_length, pad==eos expectation, pad==0 expectation)
    return [
        (76, None, [_l(B, c[76][:75], E)], [_l(B, c[76][:75], E)]),
        (76, 75, [_l(B, c[76][:75], E)], [_l(B, c[76][:75], E)]),
        # 76 tokens in two windows: the first is full (OpenCLIP: its PAD end becomes EOS), the second holds one.
        (76, 150, [_l(B, c[76][:75], E), _l(B, c[76][75:], E * 75)],
                  [_l(B, c[76][:75], E), _l(B, c[76][75:], E, [0] * 74)]),
        # third window has no content: OpenCLIP turns its first PAD into EOS.
        (76, 225, [_l(B, c[76][:75], E), _l(B, c[76][75:], E * 75), _l(B, E * 76)],
                  [_l(B, c[76][:75], E), _l(B, c[76][75:], E, [0] * 74), _l(B, E, [0] * 75)]),
        (150, 150, [_l(B, c[150][:75], E), _l(B, c[150][75:], E)],
                   [_l(B, c[150][:75], E), _l(B, c[150][75:], E)]),
        # content ends exactly at a window edge: the third window starts with the real EOS.
        (150, 225, [_l(B, c[150][:75], E), _l(B, c[150][75:], E), _l(B, E * 76)],
                   [_l(B, c[150][:75], E), _l(B, c[150][75:], E), _l(B, E, [0] * 75)]),
        (226, 225, [_l(B, c[226][:75], E), _l(B, c[226][75:150], E), _l(B, c[226][150:225], E)],
                   [_l(B, c[226][:75], E), _l(B, c[226][75:150], E), _l(B, c[226][150:225], E)]),
        (300, 225, [_l(B, c[300][:75], E), _l(B, c[300][75:150], E), _l(B, c[300][150:225], E)],
                   [_l(B, c[300][:75], E), _l(B, c[300][75:150], E), _l(B, c[300][150:225], E)]),
        (300, 150, [_l(B, c[300][:75], E), _l(B, c[300][75:150], E)],
                   [_l(B, c[300][:75], E), _l(B, c[300][75:150], E)]),
        (300, None, [_l(B, c[300][:75], E)], [_l(B, c[300][:75], E)]),
    ]


@pytest.mark.parametrize("n_tokens,max_token_length,expected_l,expected_g", _cases(),
                         ids=lambda value: str(value) if not isinstance(value, list) else "")
def test_chunking_matches_hand_expectations(tok_l, tok_g, n_tokens, max_token_length, expected_l, expected_g):
    text, content = caption_of(n_tokens)
    assert tok_l(text, add_special_tokens=False).input_ids == content  # the caption really has n tokens
    for tokenizer, expected in ((tok_l, expected_l), (tok_g, expected_g)):
        ids = tokenize_chunks(tokenizer, [text], max_token_length)
        assert ids.dtype == torch.long
        assert all(len(chunk) == 77 for chunk in expected)
        assert ids[0].tolist() == expected


def test_short_caption_windows_and_batch(tok_l, tok_g):
    short, long = "a photo", caption_of(100)[0]
    ids_l = tokenize_chunks(tok_l, [short, long], 225)
    ids_g = tokenize_chunks(tok_g, [short, long], 225)
    assert ids_l.shape == ids_g.shape == (2, 3, 77)
    assert ids_l[0].tolist() == [_l([BOS, 320, 1125], [EOS] * 74)] + [_l([BOS], [EOS] * 76)] * 2
    assert ids_g[0].tolist() == [_l([BOS, 320, 1125, EOS], [0] * 73)] + [_l([BOS, EOS], [0] * 75)] * 2
    assert tokenize_chunks(tok_l, short, None).shape == (1, 1, 77)  # a single string is a batch of one


@pytest.mark.parametrize("bad", [0, 76, 100, 300, 77, 150.0, "150"])
def test_invalid_max_token_length_is_a_flag_error(tok_l, bad):
    with pytest.raises(FlagError, match=r"--max_token_length.*75, 150, 225"):
        tokenize_chunks(tok_l, ["a"], bad)
