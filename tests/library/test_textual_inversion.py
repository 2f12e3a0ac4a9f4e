"""Textual-inversion embeddings: file formats, checks against the model, tokens in the tokenizers and encoders."""
from __future__ import annotations

import pytest
import torch
from safetensors.torch import save_file

from library.errors import FlagError, ModelFormatError, UserInputError
from library.families import family_by_name
from library.models.tiny import tiny_text_config
from library.text.conditioning import CaptionEncoder
from library.text.prompt_weights import tokenize_weighted
from library.text.textual_inversion import (
    Embedding,
    embedding_token_ids,
    expand_embedding_tokens,
    install_embeddings,
    load_embedding,
    read_embedding_file,
)
from library.text.tokenize import BOS_ID, EOS_ID, VOCAB_SIZE, build_clip_tokenizer, load_tokenizers, tokenize_chunks

A, PHOTO = 320, 1125  # CLIP ids of "a</w>" and "photo</w>"


def fresh_encoders(family_name: str) -> list:
    """New tiny text encoders (the tests change them in place), with the widths of the tiny models."""
    from transformers import CLIPTextModel, CLIPTextModelWithProjection

    family = family_by_name(family_name)
    with torch.random.fork_rng():
        torch.manual_seed(0)
        return [(CLIPTextModelWithProjection if spec.with_projection else CLIPTextModel)(
            tiny_text_config(family, index)).eval() for index, spec in enumerate(family.text_encoders)]


def widths(encoders) -> list[int]:
    return [encoder.config.hidden_size for encoder in encoders]


def vectors(count: int, width: int, seed: int = 1) -> torch.Tensor:
    return torch.randn(count, width, generator=torch.Generator().manual_seed(seed))


def install(family_name: str, *paths):
    family = family_by_name(family_name)
    encoders = fresh_encoders(family_name)
    embeddings = [load_embedding(path, family, widths(encoders)) for path in paths]
    tokenizers = install_embeddings(embeddings, load_tokenizers(family), encoders)
    return embeddings, tokenizers, encoders


def ids_of(tokenizer, prompt: str) -> list[int]:
    return tokenizer(prompt).input_ids


# ----------------------------------------------------------------------------------------------- installing


@pytest.fixture(scope="module")
def sd1_installed(tmp_path_factory):
    """A tiny SD1 encoder with "mychar" (2 vectors, ids 49408-49409) and "MyStyle" (2 vectors, 49410-49411)."""
    folder = tmp_path_factory.mktemp("embeddings")
    save_file({"emb_params": vectors(2, 32, seed=1)}, str(folder / "mychar.safetensors"))
    save_file({"emb_params": vectors(2, 32, seed=2)}, str(folder / "MyStyle.safetensors"))
    embeddings, (tokenizer,), (encoder,) = install("sd1", folder / "mychar.safetensors", folder / "MyStyle.safetensors")
    return embeddings, tokenizer, encoder


def test_sd1_file_with_two_vectors_adds_t_and_t1_with_the_file_vectors(sd1_installed):
    (mychar, _), tokenizer, encoder = sd1_installed
    assert mychar.token_names == ["mychar", "mychar1"]
    assert embedding_token_ids(tokenizer, mychar) == [VOCAB_SIZE, VOCAB_SIZE + 1]
    prompt = expand_embedding_tokens("a mychar photo", [mychar])
    assert prompt == "a mychar mychar1 photo"
    assert ids_of(tokenizer, prompt) == [BOS_ID, A, VOCAB_SIZE, VOCAB_SIZE + 1, PHOTO, EOS_ID]
    table = encoder.get_input_embeddings().weight
    assert table.shape == (VOCAB_SIZE + 4, 32) and encoder.config.vocab_size == VOCAB_SIZE + 4
    torch.testing.assert_close(table[VOCAB_SIZE:VOCAB_SIZE + 2], vectors(2, 32, seed=1), rtol=0, atol=0)
    torch.testing.assert_close(table[VOCAB_SIZE + 2:], vectors(2, 32, seed=2), rtol=0, atol=0)


def test_mixed_case_name_matches_as_typed_and_only_as_a_whole_word(sd1_installed):
    embeddings, tokenizer, _ = sd1_installed
    assert embeddings[1].token == "MyStyle"
    assert ids_of(tokenizer, expand_embedding_tokens("a MyStyle photo", embeddings)) == \
        [BOS_ID, A, VOCAB_SIZE + 2, VOCAB_SIZE + 3, PHOTO, EOS_ID]
    plain = load_tokenizers(family_by_name("sd1"))[0]
    for other_word in ("a mystyle photo", "a MyStyles photo", "a xMyStyle photo"):
        assert expand_embedding_tokens(other_word, embeddings) == other_word
        assert ids_of(tokenizer, other_word) == ids_of(plain, other_word)


@pytest.fixture(scope="module")
def bang_installed(tmp_path_factory):
    """Per family with a "!"-padded tokenizer: "mystyle" (2 vectors) installed into tiny encoders."""
    folder = tmp_path_factory.mktemp("bang")
    installed = {}

    def get(family_name: str):
        if family_name not in installed:
            path = folder / family_name / "mystyle.safetensors"
            path.parent.mkdir()
            blocks = {"emb_params": vectors(2, 64, seed=2)} if family_name != "sdxl" else \
                {"clip_l": vectors(2, 32, seed=1), "clip_g": vectors(2, 64, seed=2)}
            save_file(blocks, str(path))
            installed[family_name] = install(family_name, path)
        return installed[family_name]

    return get


def test_sdxl_clip_l_goes_to_te1_and_clip_g_to_te2(bang_installed):
    (embedding,), tokenizers, (te1, te2) = bang_installed("sdxl")
    new_ids = [VOCAB_SIZE, VOCAB_SIZE + 1]
    assert [embedding_token_ids(tokenizer, embedding) for tokenizer in tokenizers] == [new_ids, new_ids]
    torch.testing.assert_close(te1.get_input_embeddings().weight[VOCAB_SIZE:], vectors(2, 32, seed=1))
    torch.testing.assert_close(te2.get_input_embeddings().weight[VOCAB_SIZE:], vectors(2, 64, seed=2))


@pytest.mark.parametrize("family_name", ["sd2-v", "sdxl"])
def test_pad_token_bang_tokenizers_pad_with_0_and_encode_the_embedding(bang_installed, family_name):
    (embedding,), tokenizers, encoders = bang_installed(family_name)
    prompt = expand_embedding_tokens("a mystyle photo", [embedding])
    bang_tokenizer = tokenizers[-1]
    assert bang_tokenizer.pad_token == "!" and bang_tokenizer.pad_token_id == 0
    chunk = tokenize_chunks(bang_tokenizer, prompt)[0, 0].tolist()
    assert chunk[:6] == [BOS_ID, A, VOCAB_SIZE, VOCAB_SIZE + 1, PHOTO, EOS_ID] and set(chunk[6:]) == {0}
    caption_encoder = CaptionEncoder(family_by_name(family_name), tokenizers, encoders)
    with torch.no_grad():
        styled, plain = caption_encoder.encode([prompt]), caption_encoder.encode(["a cat photo"])
    assert styled.hidden_states.shape == plain.hidden_states.shape
    assert (styled.hidden_states - plain.hidden_states).abs().max() > 1e-3
    if family_name == "sdxl":  # the pooled vector is taken at the first EOS, not at the largest id (a TI token)
        assert torch.isfinite(styled.pooled).all() and (styled.pooled - plain.pooled).abs().max() > 1e-3


def test_encoding_through_the_new_tokens_equals_feeding_the_vectors_directly(sd1_installed):
    (mychar, _), tokenizer, encoder = sd1_installed
    original = fresh_encoders("sd1")[0]
    ids = tokenize_chunks(tokenizer, expand_embedding_tokens("mychar", [mychar]))[:, 0]
    placeholder_ids = tokenize_chunks(tokenizer, "a a")[:, 0]  # same length, the vectors go where "a a" is

    def put_vectors(module, inputs, output):
        output = output.clone()
        output[:, 1:3] = vectors(2, 32, seed=1)
        return output

    handle = original.get_input_embeddings().register_forward_hook(put_vectors)
    with torch.no_grad():
        direct = original(input_ids=placeholder_ids).last_hidden_state
        handle.remove()
        installed = encoder(input_ids=ids).last_hidden_state
        with_plain_word = encoder(input_ids=placeholder_ids).last_hidden_state
    torch.testing.assert_close(installed, direct)
    assert (installed - with_plain_word).abs().max() > 1e-3


def test_cached_tokenizers_are_not_modified(sd1_installed):
    _, installed, _ = sd1_installed
    cached = load_tokenizers(family_by_name("sd1"))[0]
    assert installed is not cached
    assert len(cached) == VOCAB_SIZE and "mychar" not in cached.get_vocab()
    assert ids_of(cached, "a mychar mychar1 photo") == ids_of(build_clip_tokenizer(), "a mychar mychar1 photo")


def test_no_embeddings_returns_copies_and_leaves_the_encoder_alone():
    encoders = fresh_encoders("sd1")
    cached = load_tokenizers(family_by_name("sd1"))
    (copied,) = install_embeddings([], cached, encoders)
    assert copied is not cached[0] and len(copied) == VOCAB_SIZE
    assert encoders[0].get_input_embeddings().num_embeddings == VOCAB_SIZE


# ----------------------------------------------------------------------------------------------- formats


def test_a1111_pt_file_with_string_to_param(tmp_path):
    path = tmp_path / "aone.pt"
    torch.save({"string_to_token": {"*": 265}, "string_to_param": {"*": vectors(3, 32)}, "name": "aone",
                "step": 1500, "sd_checkpoint": "abcdef12", "sd_checkpoint_name": "model"}, str(path))
    assert list(read_embedding_file(path)) == ["string_to_param.*"]
    embedding = load_embedding(path, family_by_name("sd1"), [32])
    assert embedding.token_names == ["aone", "aone1", "aone2"]
    torch.testing.assert_close(embedding.vectors[0], vectors(3, 32), rtol=0, atol=0)


@pytest.mark.parametrize("name, content", [
    ("one.bin", {"<one>": torch.arange(32.0)}),  # diffusers' learned_embeds.bin: one key, a 1-D vector
    ("one.pt", torch.arange(32.0)),  # a bare tensor
    ("one.safetensors", {"emb_params": torch.arange(32.0)}),
])
def test_a_1d_tensor_is_one_vector(tmp_path, name, content):
    path = tmp_path / name
    save_file(content, str(path)) if name.endswith(".safetensors") else torch.save(content, str(path))
    embedding = load_embedding(path, family_by_name("sd1"), [32])
    assert embedding.token == "one" and embedding.token_names == ["one"]
    assert embedding.vectors[0].shape == (1, 32) and embedding.vectors[0][0, 5].item() == 5.0


def test_token_can_be_given_instead_of_the_file_name(tmp_path):
    path = tmp_path / "file name with spaces.safetensors"
    save_file({"emb_params": vectors(1, 32)}, str(path))
    assert load_embedding(path, family_by_name("sd1"), [32], token="spaced").token == "spaced"


# ----------------------------------------------------------------------------------------------- prompts


def test_expansion_keeps_weighting_syntax_and_longer_words():
    two = Embedding("T", [vectors(2, 4)], None)
    three = Embedding("Tx", [vectors(3, 4)], None)
    assert expand_embedding_tokens("(T:1.2), Tx, Txy, T", [two, three]) == "(T T1:1.2), Tx Tx1 Tx2, Txy, T T1"
    assert expand_embedding_tokens("[T] T_1 T1", [two]) == "[T T1] T_1 T1"
    assert expand_embedding_tokens(None, [two]) is None
    assert expand_embedding_tokens("T", []) == "T"


def test_weighted_embedding_tokens_get_the_weight(sd1_installed):
    (embedding, _), tokenizer, _ = sd1_installed
    ids, weights = tokenize_weighted(tokenizer, [expand_embedding_tokens("a (mychar:1.5) photo", [embedding])])
    assert ids[0, 0, :5].tolist() == [BOS_ID, A, VOCAB_SIZE, VOCAB_SIZE + 1, PHOTO]
    assert weights[0, 0, :5].tolist() == pytest.approx([1.0, 1.0, 1.5, 1.5, 1.0])


# ----------------------------------------------------------------------------------------------- bad input


def test_wrong_family_and_width_are_refused_naming_the_file(tmp_path):
    sd_file, xl_file = tmp_path / "sd.safetensors", tmp_path / "xl.safetensors"
    save_file({"emb_params": vectors(2, 768)}, str(sd_file))
    save_file({"clip_l": vectors(2, 768), "clip_g": vectors(2, 1280)}, str(xl_file))
    with pytest.raises(ModelFormatError) as on_sdxl:
        load_embedding(sd_file, family_by_name("sdxl"), [768, 1280])
    assert str(on_sdxl.value) == (f"{sd_file}: holds an SD1/SD2 embedding (emb_params [2, 768]); this sdxl model "
                                  "needs an SDXL embedding with clip_l [n, width of TE1] and clip_g [n, width of TE2]")
    with pytest.raises(ModelFormatError) as on_sd1:
        load_embedding(xl_file, family_by_name("sd1"), [768])
    assert str(on_sd1.value) == (f"{xl_file}: holds an SDXL embedding (clip_l [2, 768], clip_g [2, 1280]); this sd1 "
                                 "model needs an SD1/SD2 embedding (emb_params [n, width])")
    with pytest.raises(ModelFormatError) as on_sd2:
        load_embedding(sd_file, family_by_name("sd2-v"), [1024])
    assert str(on_sd2.value) == (f"{sd_file}: holds emb_params [2, 768]; this sd2-v model's text encoder is 1024 "
                                 "wide, expected [n, 1024]; 768-wide vectors are made for SD1.x (or SDXL's clip_l)")
    with pytest.raises(ModelFormatError, match=r"text encoder 2 is 64 wide, expected \[n, 64\]"):
        load_embedding(xl_file, family_by_name("sdxl"), [768, 64])


@pytest.mark.parametrize("name, content, error, message", [
    ("lora.safetensors", {"lora_unet_down.lora_down.weight": torch.zeros(4, 8), "lora_te_x.alpha": torch.tensor(1.0)},
     ModelFormatError, ("no textual-inversion vectors found (keys: lora_te_x.alpha, lora_unet_down.lora_down.weight); "
                        "is this a LoRA file? expected emb_params, clip_l + clip_g or string_to_param")),
    ("half.safetensors", {"clip_l": torch.zeros(1, 32)}, ModelFormatError,
     "an SDXL embedding needs both clip_l and clip_g tensors; clip_g missing"),
    ("ints.safetensors", {"emb_params": torch.zeros(1, 32, dtype=torch.int64)}, ModelFormatError,
     "emb_params holds torch.int64 values; embedding vectors are floats"),
    ("empty.safetensors", {"emb_params": torch.zeros(0, 32)}, ModelFormatError,
     "emb_params has shape [0, 32]; expected [vectors, width] with at least one vector"),
    ("my style.safetensors", {"emb_params": torch.zeros(1, 32)}, UserInputError,
     "embedding token 'my style' (taken from the file name) cannot be written in a prompt"),
])
def test_files_that_are_not_usable_embeddings(tmp_path, name, content, error, message):
    path = tmp_path / name
    save_file(content, str(path))
    with pytest.raises(error) as raised:
        load_embedding(path, family_by_name("sd1"), [32])
    assert str(raised.value).startswith(f"{path}: ") and message in str(raised.value)


def test_missing_and_corrupt_files(tmp_path):
    missing = tmp_path / "nope.pt"
    with pytest.raises(FlagError) as raised:
        load_embedding(missing, family_by_name("sd1"), [32])
    assert str(raised.value) == f"--textual_inversion_embeddings {missing}: file not found"
    corrupt = tmp_path / "broken.pt"
    corrupt.write_bytes(b"not a torch file")
    with pytest.raises(ModelFormatError, match="not a readable torch file"):
        load_embedding(corrupt, family_by_name("sd1"), [32])


@pytest.mark.parametrize("token", ["cat", "T"])  # "T" is one of CLIP's byte symbols, so kohya refuses it too
def test_a_token_already_in_the_vocabulary_is_refused(tmp_path, token):
    path = tmp_path / f"{token}.safetensors"
    save_file({"emb_params": vectors(1, 32)}, str(path))
    with pytest.raises(UserInputError) as raised:
        install("sd1", path)
    assert str(raised.value) == (f"--textual_inversion_embeddings {path}: token {token!r} is already in the "
                                 f"tokenizer's vocabulary; rename the file (e.g. {token}_emb.safetensors) and use the "
                                 "new name in the prompt")


@pytest.mark.parametrize("first, second", [("a/style.safetensors", "b/style.pt"), ("foo.safetensors", "foo1.pt")])
def test_two_files_with_the_same_token_are_refused(tmp_path, first, second):
    paths = [tmp_path / first, tmp_path / second]
    for path in paths:
        path.parent.mkdir(exist_ok=True)
    save_file({"emb_params": vectors(2, 32)}, str(paths[0]))  # "foo" with 2 vectors makes "foo" and "foo1"
    torch.save({"emb_params": vectors(1, 32)}, str(paths[1]))
    encoders = fresh_encoders("sd1")
    embeddings = [load_embedding(path, family_by_name("sd1"), [32]) for path in paths]
    with pytest.raises(UserInputError) as raised:
        install_embeddings(embeddings, load_tokenizers(family_by_name("sd1")), encoders)
    token = paths[1].stem
    assert str(raised.value) == (f"--textual_inversion_embeddings: {paths[0]} and {paths[1]} both use the token "
                                 f"{token!r}; rename one of the files")
    assert encoders[0].get_input_embeddings().num_embeddings == VOCAB_SIZE  # nothing was changed


def test_installing_into_copied_tokenizers_keeps_ids_contiguous(tmp_path):
    first, second = tmp_path / "firstemb.safetensors", tmp_path / "secondemb.safetensors"
    save_file({"emb_params": vectors(2, 32)}, str(first))
    save_file({"emb_params": vectors(1, 32, seed=3)}, str(second))
    (one, two), (tokenizer,), (encoder,) = install("sd1", first, second)
    assert embedding_token_ids(tokenizer, one) + embedding_token_ids(tokenizer, two) == \
        [VOCAB_SIZE, VOCAB_SIZE + 1, VOCAB_SIZE + 2]
    torch.testing.assert_close(encoder.get_input_embeddings().weight[-1], vectors(1, 32, seed=3)[0])
    with pytest.raises(ValueError, match="not installed"):
        embedding_token_ids(load_tokenizers(family_by_name("sd1"))[0], one)


@pytest.mark.parametrize("suffix", [".pt", ".bin"])
def test_an_embedding_that_would_run_code_is_refused_by_the_exception_type(tmp_path, suffix):
    """torch 2.13 words the refusal "unsupported GLOBAL"; the check must not depend on the wording."""
    from tests.payloads import write_payload

    marker = tmp_path / "code-ran"
    path = write_payload(tmp_path / f"evil{suffix}", marker, {"string_to_param": {"*": vectors(1, 32)}})
    with pytest.raises(ModelFormatError) as raised:
        load_embedding(path, family_by_name("sd1"), [32])
    assert str(raised.value) == (f"{path}: contains Python objects other than tensors and plain values; refusing to "
                                 "unpickle it, so no code in it can run")
    assert not marker.exists()
