"""Textual-inversion embedding files (COMPAT §5): reading them, adding their tokens to copies of the tokenizers
and their vectors to the text encoders, and expanding a prompt's `T` into `T T1 ... T{n-1}`.

Saving embeddings and training them belong to the TI trainer, not here.
"""
from __future__ import annotations

import copy
import logging
import os
import re
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import torch

from library.errors import FlagError, ModelFormatError, UserInputError
from library.families import ModelFamily
from library.models.state_dict_io import SAFETENSORS_SUFFIXES, TORCH_SUFFIXES, TensorFile, safe_torch_load

logger = logging.getLogger(__name__)

SINGLE_ENCODER_KEY = "emb_params"  # kohya's SD1/SD2 key (COMPAT §5)
SDXL_KEYS = ("clip_l", "clip_g")  # kohya's SDXL keys: clip_l goes to TE1, clip_g to TE2 (COMPAT §5)
A1111_KEY = "string_to_param"
FLAG = "--textual_inversion_embeddings"
# Characters that the weighted-prompt syntax (COMPAT §13) or the tokenizer's word split would cut a token at.
_UNUSABLE_TOKEN_CHARACTERS = re.compile(r"[\s()\[\]:\\]")
_WIDTH_OWNERS = {768: "SD1.x (or SDXL's clip_l)", 1024: "SD2.x", 1280: "SDXL's clip_g"}


@dataclass
class Embedding:
    """One embedding file, checked against a model: `vectors[i]` is the `[n, dim_i]` block for text encoder i."""

    token: str
    vectors: list[torch.Tensor]
    path: Path

    @property
    def num_vectors(self) -> int:
        return int(self.vectors[0].shape[0])

    @property
    def token_names(self) -> list[str]:
        """kohya's token strings for the n vectors: `T, T1, ..., T{n-1}` (COMPAT §5)."""
        return [self.token] + [f"{self.token}{index}" for index in range(1, self.num_vectors)]


# ----------------------------------------------------------------------------------------------- reading


def read_embedding_file(path: str | os.PathLike) -> dict[str, torch.Tensor]:
    """The vectors of a TI file as 2-D float tensors `[n, dim]`, keyed by what the file calls them.

    Returns `{"clip_l": ..., "clip_g": ...}` for an SDXL file, or a single entry for a one-encoder file:
    `"emb_params"` (kohya), `"string_to_param.*"` (A1111 .pt) or the file's only key (diffusers'
    `{"<token>": Tensor}`). A 1-D tensor is read as one vector.

    Raises:
        FlagError: the file does not exist.
        ModelFormatError: the file cannot be read or holds no embedding (a LoRA, a checkpoint...).
    """
    path = Path(path)
    if not path.is_file():
        raise FlagError(f"{FLAG} {path}: file not found")
    suffix = path.suffix.lower()
    if suffix in SAFETENSORS_SUFFIXES:
        content = TensorFile(path).read()
    elif suffix in TORCH_SUFFIXES:
        content = _load_torch_file(path)
    else:
        raise ModelFormatError(path, f"unknown file type {suffix!r}; a textual-inversion embedding is a "
                                     f".safetensors, .pt or .bin file")
    tensors = _embedding_tensors(path, content)
    return {name: _as_matrix(path, name, tensor) for name, tensor in tensors.items()}


def _load_torch_file(path: Path) -> object:
    """A1111's dicts of tensors, strings and ints load; a pickle that names other Python objects is refused
    without running anything (see safe_torch_load)."""
    return safe_torch_load(path)


def _embedding_tensors(path: Path, content: object) -> dict[str, torch.Tensor]:
    """Pick the embedding out of a file's content, in the order kohya's and A1111's loaders look (COMPAT §5)."""
    if isinstance(content, torch.Tensor):
        return {SINGLE_ENCODER_KEY: content}
    if not isinstance(content, dict):
        raise ModelFormatError(path, f"holds a {type(content).__name__}; expected a dict of tensors "
                                     "(a textual-inversion embedding)")
    if any(key in content for key in SDXL_KEYS):
        missing = [key for key in SDXL_KEYS if not isinstance(content.get(key), torch.Tensor)]
        if missing:
            raise ModelFormatError(path, f"an SDXL embedding needs both clip_l and clip_g tensors; "
                                         f"{' and '.join(missing)} missing")
        return {key: content[key] for key in SDXL_KEYS}
    if isinstance(content.get(SINGLE_ENCODER_KEY), torch.Tensor):
        return {SINGLE_ENCODER_KEY: content[SINGLE_ENCODER_KEY]}
    a1111 = content.get(A1111_KEY)
    if isinstance(a1111, dict):
        # A1111 keeps one entry, "*"; take the first tensor as kohya does.
        for key, value in a1111.items():
            if isinstance(value, torch.Tensor):
                return {f"{A1111_KEY}.{key}": value}
    tensors = {key: value for key, value in content.items() if isinstance(value, torch.Tensor)}
    if len(tensors) == 1 and len(content) == 1:
        return tensors
    raise ModelFormatError(path, _describe_non_embedding(list(content)))


def _describe_non_embedding(keys: list[str]) -> str:
    expected = f"expected {SINGLE_ENCODER_KEY}, clip_l + clip_g or {A1111_KEY}"
    if not keys:
        return f"contains no tensors; {expected} (a textual-inversion embedding)"
    sample = ", ".join(str(key) for key in keys[:3]) + (", ..." if len(keys) > 3 else "")
    if any(str(key).startswith(("lora_unet_", "lora_te", "lllite_unet", "oft_unet")) for key in keys):
        return f"no textual-inversion vectors found (keys: {sample}); is this a LoRA file? {expected}"
    if any(str(key).startswith(("model.diffusion_model.", "conditioner.", "cond_stage_model.")) for key in keys):
        return f"no textual-inversion vectors found (keys: {sample}); this is a model checkpoint, {expected}"
    return f"no textual-inversion vectors found (keys: {sample}); {expected}"


def _as_matrix(path: Path, name: str, tensor: torch.Tensor) -> torch.Tensor:
    if not tensor.is_floating_point():
        raise ModelFormatError(path, f"{name} holds {tensor.dtype} values; embedding vectors are floats")
    if tensor.dim() == 1:  # one vector (diffusers' learned_embeds.bin, old A1111 files)
        tensor = tensor.unsqueeze(0)
    if tensor.dim() != 2 or tensor.shape[0] == 0:
        raise ModelFormatError(path, f"{name} has shape {list(tensor.shape)}; expected [vectors, width] "
                                     "with at least one vector")
    return tensor


def describe_embedding(tensors: dict[str, torch.Tensor]) -> str:
    """What a file holds, for messages: `"clip_l [2, 768], clip_g [2, 1280]"`."""
    return ", ".join(f"{name} {list(tensor.shape)}" for name, tensor in tensors.items())


# ----------------------------------------------------------------------------------------------- checking


def load_embedding(path: str | os.PathLike, family: ModelFamily, encoder_dims: Sequence[int],
                   token: str | None = None) -> Embedding:
    """Read a TI file and check it fits the model: one `[n, encoder_dims[i]]` block per text encoder.

    The token defaults to the file name without its suffix, as kohya and A1111 name embeddings.

    Raises:
        FlagError: the file does not exist.
        ModelFormatError: unreadable, not an embedding, made for another family or another encoder width.
        UserInputError: the token cannot be written in a prompt (spaces, brackets, colons).
    """
    path = Path(path)
    if len(encoder_dims) != len(family.text_encoders):
        raise ValueError(f"{family.name} has {len(family.text_encoders)} text encoder(s), got "
                         f"{len(encoder_dims)} widths")
    tensors = read_embedding_file(path)
    vectors = _vectors_for_family(path, tensors, family)
    for index, (block, width) in enumerate(zip(vectors, encoder_dims)):
        if block.shape[1] != width:
            raise ModelFormatError(path, _width_mismatch_message(tensors, family, index, width, block.shape[1]))
    source = "taken from the file name" if token is None else "given"
    token = path.stem if token is None else token
    _check_token_is_usable(path, token, source)
    embedding = Embedding(token=token, vectors=[block.float() for block in vectors], path=path)
    logger.info("embedding %s: %d vector(s) from %s", token, embedding.num_vectors, path)
    return embedding


def _vectors_for_family(path: Path, tensors: dict[str, torch.Tensor], family: ModelFamily) -> list[torch.Tensor]:
    sdxl_file = set(tensors) == set(SDXL_KEYS)
    if len(family.text_encoders) == 2:
        if not sdxl_file:
            raise ModelFormatError(path, f"holds an SD1/SD2 embedding ({describe_embedding(tensors)}); this "
                                         f"{family.name} model needs an SDXL embedding with clip_l [n, width of TE1] "
                                         "and clip_g [n, width of TE2]")
        clip_l, clip_g = tensors["clip_l"], tensors["clip_g"]
        if clip_l.shape[0] != clip_g.shape[0]:
            raise ModelFormatError(path, f"clip_l and clip_g hold different vector counts "
                                         f"({describe_embedding(tensors)}); both need the same n")
        return [clip_l, clip_g]
    if sdxl_file:
        raise ModelFormatError(path, f"holds an SDXL embedding ({describe_embedding(tensors)}); this {family.name} "
                                     f"model needs an SD1/SD2 embedding ({SINGLE_ENCODER_KEY} [n, width])")
    return list(tensors.values())


def _width_mismatch_message(tensors: dict[str, torch.Tensor], family: ModelFamily, index: int, width: int,
                            got: int) -> str:
    owner = _WIDTH_OWNERS.get(got)
    hint = f"; {got}-wide vectors are made for {owner}" if owner else ""
    encoder = f"text encoder {index + 1}" if len(family.text_encoders) > 1 else "text encoder"
    return (f"holds {describe_embedding(tensors)}; this {family.name} model's {encoder} is {width} wide, "
            f"expected [n, {width}]{hint}")


def is_usable_token(token: str) -> bool:
    """A token can be written in a prompt: one word without spaces, brackets or colons."""
    return bool(token) and not _UNUSABLE_TOKEN_CHARACTERS.search(token)


def _check_token_is_usable(path: Path, token: str, source: str) -> None:
    if not is_usable_token(token):
        raise UserInputError(f"{path}: embedding token {token!r} ({source}) cannot be written in a prompt: it must "
                             "be one word without spaces, brackets or colons; rename the file")


# ----------------------------------------------------------------------------------------------- installing


def install_embeddings(embeddings: Sequence[Embedding], tokenizers: Sequence, text_encoders: Sequence,
                       write_vectors: bool = True) -> list:
    """Add each embedding's tokens `T, T1, ...` to COPIES of the tokenizers and its vectors to the encoders.

    The encoders are changed in place: their token-embedding tables grow and the new rows get the vectors
    (encoder i gets `vectors[i]`); with `write_vectors=False` the encoders are left alone (textual-inversion
    training reads the new ids from its own parameters). The given tokenizers are left untouched (they are
    shared, cached objects).
    Tokens match case-sensitively and only as whole words ("MyStyle" in "a MyStyle photo", not in "MyStyles").

    Raises:
        UserInputError: a token is already a word of the vocabulary, or two files give the same token.
    """
    if len(tokenizers) != len(text_encoders):
        raise ValueError(f"got {len(tokenizers)} tokenizer(s) and {len(text_encoders)} text encoder(s)")
    if any(len(embedding.vectors) != len(text_encoders) for embedding in embeddings):
        raise ValueError("every embedding needs one block of vectors per text encoder")
    _check_unique_tokens(embeddings)
    for tokenizer in tokenizers:
        _check_tokens_are_new(embeddings, tokenizer)
    copies = [_copy_tokenizer(tokenizer) for tokenizer in tokenizers]
    if not embeddings:
        return copies
    for index, (tokenizer, encoder) in enumerate(zip(copies, text_encoders)):
        first_new_id = _add_tokens(tokenizer, embeddings)
        if write_vectors:
            _write_vectors(encoder, first_new_id, [embedding.vectors[index] for embedding in embeddings],
                           len(tokenizer))
    logger.info("added %d textual-inversion token(s) for %d embedding(s)",
                sum(embedding.num_vectors for embedding in embeddings), len(embeddings))
    return copies


def _copy_tokenizer(tokenizer):
    """A deep copy that shares transformers' Python list of BPE merges (49k tuples of str, only read after
    construction): copying that list takes half the time of the whole copy."""
    merges = getattr(tokenizer, "_merges", None)
    return copy.deepcopy(tokenizer, {} if merges is None else {id(merges): merges})


def _check_unique_tokens(embeddings: Sequence[Embedding]) -> None:
    owners: dict[str, Embedding] = {}
    for embedding in embeddings:
        for name in embedding.token_names:
            other = owners.get(name)
            if other is not None:
                raise UserInputError(f"{FLAG}: {other.path} and {embedding.path} both use the token {name!r}; "
                                     "rename one of the files")
            owners[name] = embedding


def _check_tokens_are_new(embeddings: Sequence[Embedding], tokenizer) -> None:
    # kohya refuses a token the tokenizer already knows (add_tokens adds fewer than asked, COMPAT §5): the
    # embedding would be silently ignored, or it would take over an ordinary word.
    vocab = tokenizer.get_vocab()
    for embedding in embeddings:
        taken = [name for name in embedding.token_names if name in vocab]
        if taken:
            raise UserInputError(f"{FLAG} {embedding.path}: token {taken[0]!r} is already in the tokenizer's "
                                 f"vocabulary; rename the file (e.g. {embedding.token}_emb{embedding.path.suffix}) "
                                 "and use the new name in the prompt")


def _add_tokens(tokenizer, embeddings: Sequence[Embedding]) -> int:
    """Add the tokens; return the id of the first one. The ids are checked to be contiguous at the end."""
    from tokenizers import AddedToken

    names = [name for embedding in embeddings for name in embedding.token_names]
    first_new_id = len(tokenizer)
    # normalized=False: matched against the prompt as typed, before CLIP lower-cases it, so "MyStyle" is found;
    # single_word=True: not inside a longer word, the same rule as expand_embedding_tokens.
    added = tokenizer.add_tokens([AddedToken(name, normalized=False, single_word=True) for name in names])
    ids = tokenizer.convert_tokens_to_ids(names)
    if added != len(names) or ids != list(range(first_new_id, first_new_id + len(names))):
        raise RuntimeError(f"textual-inversion tokens got ids {ids}; expected {first_new_id}..."
                           f"{first_new_id + len(names) - 1} at the end of the vocabulary")
    return first_new_id


def _write_vectors(encoder, first_new_id: int, blocks: list[torch.Tensor], vocab_size: int) -> None:
    table = encoder.get_input_embeddings()
    if table.num_embeddings < first_new_id:
        raise ValueError(f"the text encoder has {table.num_embeddings} token rows but the tokenizer already has "
                         f"{first_new_id} tokens")
    if table.num_embeddings < vocab_size:
        # The new rows are overwritten below, so skip transformers' mean/covariance initialisation.
        encoder.resize_token_embeddings(vocab_size, mean_resizing=False)
        table = encoder.get_input_embeddings()
    vectors = torch.cat(blocks, dim=0)
    with torch.no_grad():
        table.weight[first_new_id:first_new_id + vectors.shape[0]] = vectors.to(table.weight)


# ----------------------------------------------------------------------------------------------- prompts


def expand_embedding_tokens(prompt: str | None, embeddings: Sequence[Embedding]) -> str | None:
    """Replace every whole-word `T` with `"T T1 ... T{n-1}"` (kohya, COMPAT §5); `(T:1.2)` → `(T T1:1.2)`.

    Case-sensitive, like the tokens themselves; `T` inside a longer word is left alone.
    """
    if not prompt or not embeddings:
        return prompt
    return expand_tokens(prompt, {embedding.token: " ".join(embedding.token_names) for embedding in embeddings})


def expand_tokens(text: str | None, expansions: dict[str, str]) -> str | None:
    """Replace every whole-word key of `expansions` in `text` by its value (case-sensitive, one pass)."""
    if not text or not expansions:
        return text
    # One pass with the longest names first, so an expansion is never expanded again by another embedding.
    alternatives = "|".join(re.escape(token) for token in sorted(expansions, key=len, reverse=True))
    pattern = re.compile(rf"(?<!\w)(?:{alternatives})(?!\w)")
    return pattern.sub(lambda match: expansions[match.group(0)], text)


def embedding_token_ids(tokenizer, embedding: Embedding) -> list[int]:
    """The ids of an installed embedding's tokens in a tokenizer returned by `install_embeddings`."""
    ids = tokenizer.convert_tokens_to_ids(embedding.token_names)
    if tokenizer.unk_token_id in ids:
        raise ValueError(f"the tokens of {embedding.path} are not installed in this tokenizer")
    return ids
