"""Text-encoder output cache files: kohya's keys, caption fingerprints and when a cached output is redone."""
from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from library.data.latent_cache import CacheError
from library.data.text_cache import (
    TextEncoderOutputs,
    caption_fingerprint,
    check_text_encoder_outputs,
    load_text_encoder_outputs,
    save_text_encoder_outputs,
    te_outputs_npz_path,
)

TOKENIZERS = ["clip-l vocab 3f2a", "open-clip-g vocab 91bc"]
CAPTION = "a photo of a cat, sitting on a red chair"


def sdxl_outputs(length: int = 77, dtype=np.float32) -> TextEncoderOutputs:
    rng = np.random.default_rng(0)
    return TextEncoderOutputs(hidden_states=[rng.standard_normal((length, 768)).astype(dtype),
                                             rng.standard_normal((length, 1280)).astype(dtype)],
                              pooled=rng.standard_normal(1280).astype(dtype))


@pytest.fixture
def sdxl_cache(tmp_path) -> tuple[Path, str]:
    path, fingerprint = tmp_path / "cat_te_outputs.npz", caption_fingerprint(CAPTION, TOKENIZERS, None)
    save_text_encoder_outputs(path, sdxl_outputs(), fingerprint)
    return path, fingerprint


def test_te_outputs_name_keeps_folder_and_dotted_stem():
    assert te_outputs_npz_path("data/sub/photo.v2.png") == Path("data/sub/photo.v2_te_outputs.npz")


def test_sd1_round_trip(tmp_path):
    path, hidden = tmp_path / "a_te_outputs.npz", np.arange(77 * 768, dtype=np.float32).reshape(77, 768)
    save_text_encoder_outputs(path, TextEncoderOutputs(hidden_states=[hidden]), "f" * 64)
    with np.load(path, allow_pickle=False) as stored:
        assert sorted(stored.files) == ["hidden_state1", "sdtk_caption_fingerprint"]
    loaded = load_text_encoder_outputs(path, n_encoders=1)
    assert len(loaded.hidden_states) == 1 and loaded.pooled is None
    np.testing.assert_array_equal(loaded.hidden_states[0], hidden)
    assert check_text_encoder_outputs(path, "f" * 64, 1, 77, skip_check=False) == (True, "ok")


def test_sdxl_round_trip_casts_fp16_to_float32_on_read(tmp_path):
    path, outputs = tmp_path / "a_te_outputs.npz", sdxl_outputs(length=227, dtype=np.float16)
    save_text_encoder_outputs(path, outputs, "fp")
    with np.load(path, allow_pickle=False) as stored:
        assert sorted(stored.files) == ["hidden_state1", "hidden_state2", "pool2", "sdtk_caption_fingerprint"]
        assert stored["pool2"].shape == (1280,) and stored["hidden_state2"].dtype == np.float16
    loaded = load_text_encoder_outputs(path, n_encoders=2)
    assert [state.shape for state in loaded.hidden_states] == [(227, 768), (227, 1280)]
    assert loaded.pooled.dtype == np.float32 and loaded.hidden_states[1].dtype == np.float32
    np.testing.assert_array_equal(loaded.pooled, outputs.pooled.astype(np.float32))


def test_fingerprint_changes_with_every_input():
    base = caption_fingerprint(CAPTION, TOKENIZERS, None)
    variants = [caption_fingerprint(CAPTION + ".", TOKENIZERS, None),
                caption_fingerprint(CAPTION, ["clip-l vocab 0000", TOKENIZERS[1]], None),
                caption_fingerprint(CAPTION, TOKENIZERS, 225),
                caption_fingerprint(CAPTION, TOKENIZERS, None, extra="clip_skip=2")]
    assert base == caption_fingerprint(CAPTION, list(TOKENIZERS), None)
    assert len(base) == 64 and int(base, 16) >= 0
    assert len({base, *variants}) == 5


def test_edited_caption_is_invalid(sdxl_cache):
    path, _ = sdxl_cache
    edited = caption_fingerprint(CAPTION.replace("red", "blue"), TOKENIZERS, None)
    assert check_text_encoder_outputs(path, edited, 2, 77, skip_check=False) == (
        False, "caption, tokenizer or encoder settings changed")


def test_other_sequence_length_is_invalid(sdxl_cache):
    path, fingerprint = sdxl_cache
    assert check_text_encoder_outputs(path, fingerprint, 2, 227, skip_check=False) == (
        False, "sequence length differs (other --max_token_length?)")
    assert check_text_encoder_outputs(path, fingerprint, 2, None, skip_check=False) == (True, "ok")


def test_kohya_file_without_fingerprint_is_invalid_but_loads(tmp_path):
    path, outputs = tmp_path / "a_te_outputs.npz", sdxl_outputs()
    np.savez(path, hidden_state1=outputs.hidden_states[0], hidden_state2=outputs.hidden_states[1],
             pool2=outputs.pooled)
    fingerprint = caption_fingerprint(CAPTION, TOKENIZERS, None)
    assert check_text_encoder_outputs(path, fingerprint, 2, 77, skip_check=False) == (
        False, "no caption fingerprint (written by another tool)")
    assert check_text_encoder_outputs(path, fingerprint, 2, 77, skip_check=True) == (True, "exists (not checked)")
    np.testing.assert_array_equal(load_text_encoder_outputs(path, 2).pooled, outputs.pooled)


def test_missing_pool_or_broken_file_is_invalid(tmp_path):
    path, outputs = tmp_path / "a_te_outputs.npz", sdxl_outputs()
    np.savez(path, hidden_state1=outputs.hidden_states[0], hidden_state2=outputs.hidden_states[1])
    assert check_text_encoder_outputs(path, "x", 2, 77, skip_check=False) == (False, "missing pool2")
    with pytest.raises(CacheError, match=r"a_te_outputs\.npz: missing key\(s\) pool2"):
        load_text_encoder_outputs(path, 2)
    path.write_bytes(b"\x00garbage" * 20)
    assert check_text_encoder_outputs(path, "x", 2, 77, skip_check=False) == (False, "unreadable npz")
    path.unlink()
    assert check_text_encoder_outputs(path, "x", 2, 77, skip_check=False) == (False, "no cache file")


def test_save_refuses_tensors_and_keeps_old_file(tmp_path, sdxl_cache):
    torch = pytest.importorskip("torch")
    path, fingerprint = sdxl_cache
    with pytest.raises(TypeError, match="hidden_state1: expected a numpy array, got Tensor"):
        save_text_encoder_outputs(path, TextEncoderOutputs(hidden_states=[torch.zeros(77, 768)]), "other")
    assert check_text_encoder_outputs(path, fingerprint, 2, 77, skip_check=False) == (True, "ok")
