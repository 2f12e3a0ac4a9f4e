"""CLIP tokenizers built offline from the bundled BPE merges, and the 75/150/225-token chunking rule.

Both CLIP tokenizers the families use (OpenAI CLIP-L and OpenCLIP's ViT-H/bigG) share one vocabulary; they
differ only in the padding token: "<|endoftext|>" (pad id == eos id 49407) or "!" (pad id 0). So every
tokenizer is built here from `assets/bpe_simple_vocab_16e6.txt.gz` and nothing is ever downloaded.

Chunking (COMPAT §14.2): a caption is tokenized to `T = max_token_length + 2` tokens and cut into
`n = max_token_length / 75` windows of 77 tokens, each `[BOS, 75 content tokens, last token of the sequence]`.
"""
from __future__ import annotations

import gzip
import json
import logging
import os
import shutil
import tempfile
from functools import lru_cache
from pathlib import Path

import torch

from library.errors import FlagError, UserInputError
from library.families import ModelFamily, TextEncoderSpec

logger = logging.getLogger(__name__)

BPE_VOCAB_PATH = Path(__file__).resolve().parent / "assets" / "bpe_simple_vocab_16e6.txt.gz"
BOS_TOKEN = "<|startoftext|>"
EOS_TOKEN = "<|endoftext|>"
BOS_ID = 49406
EOS_ID = 49407
VOCAB_SIZE = 49408
CHUNK_LENGTH = 77  # CLIP's window: BOS + 75 content tokens + EOS/PAD
CHUNK_CONTENT = CHUNK_LENGTH - 2
MAX_TOKEN_LENGTHS = (75, 150, 225)
# CLIP uses the first 49152 - 256 - 2 merges of the file (after its header line): 256 byte symbols, 256 byte
# symbols with "</w>", one token per merge and the two special tokens make 49408 ids.
_MERGE_COUNT = 49152 - 256 - 2

_TOKENIZERS: dict[tuple, object] = {}


def _byte_symbols() -> list[str]:
    """The 256 printable stand-ins GPT-2/CLIP byte-level BPE uses for bytes 0..255, in vocabulary order.

    Bytes that are printable Latin-1 characters stand for themselves and come first (in byte order); the other
    68 bytes are mapped to code points 256, 257, ... and appended in byte order.
    """
    printable = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1), *range(ord("®"), ord("ÿ") + 1)]
    kept = set(printable)
    others = [byte for byte in range(256) if byte not in kept]
    return [chr(byte) for byte in printable] + [chr(256 + index) for index in range(len(others))]


@lru_cache(maxsize=1)
def clip_vocab_and_merges() -> tuple[dict[str, int], list[tuple[str, str]]]:
    """CLIP's vocabulary (token → id, 49408 entries) and its ordered BPE merges, from the bundled file."""
    with gzip.open(BPE_VOCAB_PATH, "rt", encoding="utf-8") as handle:
        lines = handle.read().split("\n")
    merges = [tuple(line.split()) for line in lines[1:1 + _MERGE_COUNT]]
    if len(merges) != _MERGE_COUNT or any(len(pair) != 2 for pair in merges):
        raise RuntimeError(f"{BPE_VOCAB_PATH} is damaged: expected {_MERGE_COUNT} merge pairs")
    symbols = _byte_symbols()
    tokens = symbols + [symbol + "</w>" for symbol in symbols] + [a + b for a, b in merges] + [BOS_TOKEN, EOS_TOKEN]
    vocab = {token: index for index, token in enumerate(tokens)}
    if len(vocab) != VOCAB_SIZE or vocab[EOS_TOKEN] != EOS_ID:
        raise RuntimeError(f"{BPE_VOCAB_PATH} gives {len(vocab)} distinct tokens, expected {VOCAB_SIZE}")
    return vocab, merges


def build_clip_tokenizer(pad_token: str = EOS_TOKEN):
    """A fresh transformers CLIPTokenizer (tokenizers backend) with the given padding token, 77 tokens max.

    transformers' CLIPTokenizer sets up CLIP's text clean-up itself: NFC, runs of whitespace → one space,
    lower case, CLIP's word-splitting pattern and byte-level BPE with "</w>" word ends.
    """
    from transformers import CLIPTokenizer

    vocab, merges = clip_vocab_and_merges()
    if pad_token not in vocab:
        raise ValueError(f"padding token {pad_token!r} is not in the CLIP vocabulary")
    return CLIPTokenizer(vocab=dict(vocab), merges=list(merges), bos_token=BOS_TOKEN, eos_token=EOS_TOKEN,
                         unk_token=EOS_TOKEN, pad_token=pad_token, model_max_length=CHUNK_LENGTH)


def tokenizer_cache_folder(cache_dir: str | os.PathLike, spec: TextEncoderSpec) -> Path:
    """Where `--tokenizer_cache_dir` keeps the tokenizer of an encoder: `<dir>/<hub id with "/" → "_">`."""
    return Path(cache_dir) / spec.tokenizer_id.replace("/", "_")


def load_tokenizer(spec: TextEncoderSpec, cache_dir: str | os.PathLike | None = None):
    """The tokenizer of one text encoder: pad token per `spec`, model_max_length 77. Cached per process.

    With `cache_dir` (kohya's `--tokenizer_cache_dir`) the tokenizer is read from
    `<cache_dir>/<tokenizer_id with "/" → "_">` when that folder exists (a folder written by kohya, by
    transformers 4.x or by us), otherwise it is built from the bundled vocabulary and saved there.
    The same object is returned on every call with the same arguments; do not modify it.
    """
    folder = tokenizer_cache_folder(cache_dir, spec).resolve() if cache_dir is not None else None
    key = (spec.tokenizer_id, spec.pad_token, str(folder) if folder else None)
    tokenizer = _TOKENIZERS.get(key)
    if tokenizer is not None:
        return tokenizer
    if folder is not None and folder.is_dir():
        tokenizer = _load_saved_tokenizer(folder, spec)
        logger.info("loaded tokenizer %s from %s", spec.tokenizer_id, folder)
    else:
        tokenizer = build_clip_tokenizer(spec.pad_token)
        if folder is not None:
            _save_into_cache(tokenizer, folder)
            logger.info("saved tokenizer %s to %s", spec.tokenizer_id, folder)
    _TOKENIZERS[key] = tokenizer
    return tokenizer


def load_tokenizers(family: ModelFamily, cache_dir: str | os.PathLike | None = None) -> list:
    """One tokenizer per text encoder of the family, in encoder order."""
    return [load_tokenizer(spec, cache_dir) for spec in family.text_encoders]


def save_tokenizer(tokenizer, folder: str | os.PathLike) -> None:
    """Write a tokenizer folder (e.g. `tokenizer/`, `tokenizer_2/` of a diffusers pipeline).

    Besides transformers 5's `tokenizer.json` + `tokenizer_config.json`, the folder gets `vocab.json` and
    `merges.txt`, which transformers 4.x's slow `CLIPTokenizer` (used by kohya) needs.
    """
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    tokenizer.save_pretrained(str(folder))
    model = json.loads(tokenizer.backend_tokenizer.to_str())["model"]
    with open(folder / "vocab.json", "w", encoding="utf-8") as handle:
        json.dump(model["vocab"], handle, ensure_ascii=False)
    lines = [pair if isinstance(pair, str) else " ".join(pair) for pair in model["merges"]]
    with open(folder / "merges.txt", "w", encoding="utf-8") as handle:
        handle.write("#version: 0.2\n" + "\n".join(lines) + "\n")


def _load_saved_tokenizer(folder: Path, spec: TextEncoderSpec):
    from transformers import CLIPTokenizer

    try:
        tokenizer = CLIPTokenizer.from_pretrained(str(folder), local_files_only=True)
    except Exception as error:  # transformers raises several unrelated types for a broken folder
        raise UserInputError(f"{folder}: cannot read the tokenizer saved there ({error}); delete the folder to "
                             "have it rebuilt from the bundled vocabulary") from error
    # kohya forces the padding token of the OpenCLIP tokenizers; do the same whatever the folder says.
    tokenizer.pad_token = spec.pad_token
    tokenizer.model_max_length = CHUNK_LENGTH
    if tokenizer.bos_token_id != BOS_ID or tokenizer.eos_token_id != EOS_ID:
        raise UserInputError(f"{folder}: not a CLIP tokenizer (BOS/EOS ids {tokenizer.bos_token_id}/"
                             f"{tokenizer.eos_token_id}, expected {BOS_ID}/{EOS_ID})")
    return tokenizer


def _save_into_cache(tokenizer, folder: Path) -> None:
    """Save via a temporary sibling folder so a concurrent process never sees a half-written folder."""
    folder.parent.mkdir(parents=True, exist_ok=True)
    temp = Path(tempfile.mkdtemp(prefix=f".{folder.name}.", dir=folder.parent))
    try:
        save_tokenizer(tokenizer, temp)
        try:
            os.rename(temp, folder)
        except OSError:
            if not folder.is_dir():  # not a lost race with another process: a real error
                raise
    finally:
        if temp.exists():
            shutil.rmtree(temp)


def chunk_count(max_token_length: int | None) -> int:
    """Number of 77-token windows for `--max_token_length` (None or 75 → 1, 150 → 2, 225 → 3)."""
    if max_token_length is None:
        return 1
    if isinstance(max_token_length, bool) or not isinstance(max_token_length, int) \
            or max_token_length not in MAX_TOKEN_LENGTHS:
        raise FlagError(f"--max_token_length must be one of {', '.join(map(str, MAX_TOKEN_LENGTHS))} "
                        f"(or left out for 75), got {max_token_length!r}")
    return max_token_length // CHUNK_CONTENT


def chunk_positions(n_chunks: int) -> torch.LongTensor:
    """[n, 77] indices into a sequence of length 75n + 2: `[0, 1+75k … 75+75k, 75n+1]` for chunk k."""
    last = CHUNK_CONTENT * n_chunks + 1
    rows = [[0, *range(1 + CHUNK_CONTENT * k, 1 + CHUNK_CONTENT * (k + 1)), last] for k in range(n_chunks)]
    return torch.tensor(rows, dtype=torch.long)


def split_into_chunks(ids: torch.Tensor, n_chunks: int, eos_id: int, pad_id: int) -> torch.LongTensor:
    """Cut `[B, 75n+2]` token ids into `[B, n, 77]` windows and apply kohya's EOS/PAD fix-ups.

    With pad == eos (CLIP-L) the windows are used as cut. With pad != eos (OpenCLIP): a window whose
    second-to-last token is content (neither EOS nor PAD) ends with EOS, and a window with no content at all
    (first content token is PAD) gets EOS in that place.
    """
    if ids.shape[-1] != CHUNK_CONTENT * n_chunks + 2:
        raise ValueError(f"expected {CHUNK_CONTENT * n_chunks + 2} tokens for {n_chunks} chunks, got {ids.shape[-1]}")
    chunks = ids[:, chunk_positions(n_chunks)].clone()
    if n_chunks > 1 and pad_id != eos_id:
        before_last = chunks[:, :, -2]
        continues = (before_last != eos_id) & (before_last != pad_id)
        chunks[:, :, -1] = torch.where(continues, torch.full_like(before_last, eos_id), chunks[:, :, -1])
        first = chunks[:, :, 1]
        chunks[:, :, 1] = torch.where(first == pad_id, torch.full_like(first, eos_id), first)
    return chunks


def split_weights_into_chunks(weights: torch.Tensor, n_chunks: int) -> torch.Tensor:
    """Cut `[B, 75n+2]` per-token weights into `[B, n, 77]` windows exactly like `split_into_chunks`."""
    return weights[:, chunk_positions(n_chunks)].clone()


def tokenize_chunks(tokenizer, texts: list[str] | str, max_token_length: int | None = None) -> torch.LongTensor:
    """Token ids `[B, n, 77]` for a batch of captions under the 75/150/225-token rule (COMPAT §14.2).

    Each caption is tokenized to `T = 75n + 2` tokens (BOS, at most 75n content tokens, EOS, padding) and
    cut into n windows by `split_into_chunks`.
    """
    n_chunks = chunk_count(max_token_length)
    if isinstance(texts, str):
        texts = [texts]
    total = CHUNK_CONTENT * n_chunks + 2
    ids = tokenizer(list(texts), padding="max_length", truncation=True, max_length=total,
                    return_tensors="pt").input_ids
    return split_into_chunks(ids, n_chunks, tokenizer.eos_token_id, tokenizer.pad_token_id)
