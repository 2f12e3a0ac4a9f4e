"""Text-encoder output cache `.npz` files: names, keys, caption fingerprints, checks, read and write (COMPAT §8).

Owns the file format only; running the text encoders lives in `library/data/caching.py`.
"""
from __future__ import annotations

import hashlib
import json
import logging
import os
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from library.data.latent_cache import CacheError, read_npz_arrays, read_npz_header
from library.models.state_dict_io import atomic_output

logger = logging.getLogger(__name__)

TE_OUTPUTS_SUFFIX = "_te_outputs.npz"  # kohya's TEXT_ENCODER_OUTPUTS_CACHE_SUFFIX (COMPAT §8)
POOLED_KEY = "pool2"  # SDXL: TE2's projected pooled output
# Our own key; kohya ignores it, and kohya's files lack it.
CAPTION_FINGERPRINT_KEY = "sdtk_caption_fingerprint"
NO_FINGERPRINT_REASON = "no caption fingerprint (written by another tool)"
STORED_DTYPES = (np.float16, np.float32)


def hidden_state_key(encoder_index: int) -> str:
    """`hidden_state1` for the first encoder, `hidden_state2` for the second (COMPAT §8)."""
    return f"hidden_state{encoder_index + 1}"


@dataclass
class TextEncoderOutputs:
    """Cached conditioning of one caption: one hidden state per encoder, plus SDXL's pooled vector."""

    hidden_states: list[np.ndarray]  # SDXL: [[L, 768], [L, 1280]]; SD1/2: [[L, 768 or 1024]]
    pooled: np.ndarray | None = None  # SDXL pool2 [1280]


def te_outputs_npz_path(image_path: str | os.PathLike) -> Path:
    """`<image path without ext>_te_outputs.npz` (kohya v0.9.1 and the snapshot, COMPAT §8)."""
    base = Path(image_path).with_suffix("")
    return base.with_name(base.name + TE_OUTPUTS_SUFFIX)


def caption_fingerprint(caption: str, tokenizer_ids: list[str], max_token_length: int | None, extra: str = "") -> str:
    """sha256 hex over the caption and everything else the encoder output depends on.

    tokenizer_ids: identities the caller chooses (vocab hashes, model names, encoder weight fingerprints).
    extra: other settings that change the output, such as clip_skip or weighted captions.
    """
    serialized = json.dumps({"caption": caption, "tokenizers": [str(item) for item in tokenizer_ids],
                             "max_token_length": max_token_length, "extra": extra},
                            sort_keys=True, ensure_ascii=False)
    return hashlib.sha256(serialized.encode("utf-8")).hexdigest()


def _as_stored(array: np.ndarray, name: str, ndim: int) -> np.ndarray:
    if not isinstance(array, np.ndarray):
        raise TypeError(f"{name}: expected a numpy array, got {type(array).__name__}; convert tensors with "
                        ".float().cpu().numpy() (numpy has no bfloat16)")
    if array.ndim != ndim:
        raise ValueError(f"{name}: expected {ndim} dimensions, got shape {list(array.shape)}")
    # kohya keeps fp16 when computed in fp16 and writes float32 otherwise (COMPAT §8); readers cast back
    return array if array.dtype in STORED_DTYPES else array.astype(np.float32)


def save_text_encoder_outputs(path: str | os.PathLike, outputs: TextEncoderOutputs, fingerprint: str) -> None:
    """Write `hidden_state1`(, `hidden_state2`, `pool2`) and our caption fingerprint, atomically."""
    if not outputs.hidden_states:
        raise ValueError("TextEncoderOutputs.hidden_states is empty; expected one array per text encoder")
    arrays = {hidden_state_key(index): _as_stored(hidden, hidden_state_key(index), ndim=2)
              for index, hidden in enumerate(outputs.hidden_states)}
    lengths = {array.shape[0] for array in arrays.values()}
    if len(lengths) > 1:
        raise ValueError(f"hidden states have different sequence lengths {sorted(lengths)}; expected one")
    if outputs.pooled is not None:
        arrays[POOLED_KEY] = _as_stored(outputs.pooled, POOLED_KEY, ndim=1)
    arrays[CAPTION_FINGERPRINT_KEY] = np.array(str(fingerprint))  # 0-d unicode: loads without pickle
    # np.savez appends ".npz" to a path not ending in it (our temp name), so write through a file object
    with atomic_output(path, overwrite=True) as temp, open(temp, "wb") as stream:
        np.savez(stream, **arrays)


def _required_keys(n_encoders: int) -> list[str]:
    if n_encoders < 1:
        raise ValueError(f"n_encoders must be at least 1, got {n_encoders}")
    # two encoders means SDXL, whose cache always carries pool2 (kohya checks all three keys, COMPAT §8)
    return [hidden_state_key(index) for index in range(n_encoders)] + ([POOLED_KEY] if n_encoders >= 2 else [])


def load_text_encoder_outputs(path: str | os.PathLike, n_encoders: int) -> TextEncoderOutputs:
    """Read one caption's cached outputs as float32; raises CacheError naming the file and the missing key."""
    path = Path(path)
    if not path.is_file():
        raise CacheError(path, "text encoder output cache file not found",
                         "run without --skip_cache_check so missing caches are made, or re-run caching")
    keys = _required_keys(n_encoders)
    header = read_npz_header(path)
    if POOLED_KEY in header and POOLED_KEY not in keys:
        keys.append(POOLED_KEY)
    arrays = read_npz_arrays(path, keys)
    hidden_states = [arrays[hidden_state_key(index)].astype(np.float32) for index in range(n_encoders)]
    pooled = arrays[POOLED_KEY].astype(np.float32) if POOLED_KEY in arrays else None
    return TextEncoderOutputs(hidden_states=hidden_states, pooled=pooled)


def _structure_problem(header: dict, n_encoders: int, expected_length: int | None) -> str | None:
    missing = [key for key in _required_keys(n_encoders) if key not in header]
    if missing:
        return "missing " + ", ".join(missing)
    shapes = [header[hidden_state_key(index)][0] for index in range(n_encoders)]
    if any(len(shape) != 2 for shape in shapes):
        return "hidden state is not [length, width]"
    lengths = {shape[0] for shape in shapes}
    if expected_length is not None and lengths != {expected_length}:
        return "sequence length differs (other --max_token_length?)"
    if len(lengths) > 1:
        return "encoders disagree on sequence length"
    return None


def check_text_encoder_outputs(path: str | os.PathLike, fingerprint: str, n_encoders: int,
                               expected_length: int | None, skip_check: bool) -> tuple[bool, str]:
    """Whether a cached output can be reused for this caption; returns (valid, short reason for a log line).

    A file without our caption fingerprint (written by kohya) is INVALID, unlike a kohya latent cache: kohya
    stores no trace of the caption, tokenizer or max_token_length (COMPAT §8), so after a caption edit its file
    still looks complete and would silently train on the old text. Re-encoding one caption is cheap.
    skip_check: only test that the file exists (kohya's --skip_cache_check).
    """
    path = Path(path)
    if not path.is_file():
        return False, "no cache file"
    if skip_check:
        return True, "exists (not checked)"
    try:
        header = read_npz_header(path)
    except CacheError:
        return False, "unreadable npz"
    reason = _structure_problem(header, n_encoders, expected_length)
    if reason is None:
        reason = _fingerprint_problem(path, header, fingerprint)
    if reason is not None:
        logger.debug("%s: text encoder output cache invalid: %s", path, reason)
        return False, reason
    return True, "ok"


def _fingerprint_problem(path: Path, header: dict, fingerprint: str) -> str | None:
    if CAPTION_FINGERPRINT_KEY not in header:
        return NO_FINGERPRINT_REASON
    try:
        stored = read_npz_arrays(path, [CAPTION_FINGERPRINT_KEY])[CAPTION_FINGERPRINT_KEY]
    except CacheError:
        return "unreadable npz"
    if stored.ndim != 0 or str(stored.item()) != fingerprint:
        return "caption, tokenizer or encoder settings changed"
    return None
