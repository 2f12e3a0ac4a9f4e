"""Latent cache files: kohya's names and keys, multi-resolution keys, validity checks, merge and atomic writes."""
from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from library.data import latent_cache
from library.data.latent_cache import (
    CacheError,
    CacheFingerprint,
    LatentCacheEntry,
    check_latent_cache,
    existing_cache_path,
    latents_npz_path,
    legacy_npz_path,
    load_latent_cache,
    save_latent_cache,
    shard_for_process,
    sizes_from_cache_names,
)

BUCKET = (128, 64)  # (W, H) -> latents [4, 8, 16], alpha mask [64, 128]
FINGERPRINT = CacheFingerprint(vae_id="vae-a", dtype="float32", bucket_reso=BUCKET, crop="center")


def make_entry(bucket=BUCKET, flipped=True, alpha=True, seed=0) -> LatentCacheEntry:
    rng = np.random.default_rng(seed)
    width, height = bucket
    return LatentCacheEntry(
        latents=rng.standard_normal((4, height // 8, width // 8)).astype(np.float32),
        original_size=(300, 150), crop_ltrb=(0.0, 0.5, 128.0, 63.5),
        latents_flipped=rng.standard_normal((4, height // 8, width // 8)).astype(np.float32) if flipped else None,
        alpha_mask=rng.random((height, width)).astype(np.float32) if alpha else None)


def kohya_arrays(bucket=BUCKET, suffix="") -> dict[str, np.ndarray]:
    width, height = bucket
    return {"latents" + suffix: np.full((4, height // 8, width // 8), 0.25, dtype=np.float32),
            "original_size" + suffix: np.array([width * 2, height * 2]),
            "crop_ltrb" + suffix: np.array([0, 0, width, height])}


# ---- names ------------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("image, size, suffix, expected", [
    ("data/cat.png", (512, 768), "sd", "data/cat_0512x0768_sd.npz"),
    ("data/cat.png", (1024, 1024), "sdxl", "data/cat_1024x1024_sdxl.npz"),
    ("data/sub/deeper/img.webp", (64, 8), "sd", "data/sub/deeper/img_0064x0008_sd.npz"),
    ("data/photo.v2.final.jpg", (640, 480), "sdxl", "data/photo.v2.final_0640x0480_sdxl.npz"),
    ("data/huge.png", (12000, 64), "sd", "data/huge_12000x0064_sd.npz"),
])
def test_latents_npz_path_follows_kohya_naming(image, size, suffix, expected):
    assert latents_npz_path(image, size, suffix) == Path(expected)


def test_legacy_name_keeps_dotted_stem():
    assert legacy_npz_path("data/photo.v2.png") == Path("data/photo.v2.npz")


def test_unknown_family_suffix_is_rejected():
    with pytest.raises(ValueError, match="'sd3'"):
        latents_npz_path("a.png", (64, 64), "sd3")


def test_existing_cache_path_prefers_legacy_like_kohya(tmp_path):
    image = tmp_path / "cat.png"
    assert existing_cache_path(image, (512, 768), "sd") is None
    current = tmp_path / "cat_0512x0768_sd.npz"
    current.write_bytes(b"x")
    assert existing_cache_path(image, (512, 768), "sd") == current
    assert existing_cache_path(image, (512, 768), "sdxl") is None
    legacy = tmp_path / "cat.npz"
    legacy.write_bytes(b"x")
    assert existing_cache_path(image, (512, 768), "sd") == legacy
    current.unlink()
    assert existing_cache_path(image, (512, 768), "sdxl") == legacy


def test_sizes_from_cache_names_parses_only_this_family(tmp_path):
    for name in ("cat_0512x0768_sd.npz", "dog.v2_1024x0640_sdxl.npz", "huge_12000x0064_sd.npz",
                 "cat_te_outputs.npz", "legacy.npz", "odd_512x768_sd.npz"):
        (tmp_path / name).write_bytes(b"")
    assert sizes_from_cache_names(tmp_path, "sd") == {str(tmp_path / "cat"): (512, 768),
                                                     str(tmp_path / "huge"): (12000, 64)}
    assert sizes_from_cache_names(tmp_path, "sdxl") == {str(tmp_path / "dog.v2"): (1024, 640)}
    assert sizes_from_cache_names(tmp_path / "missing", "sd") == {}


# ---- round trip and kohya files ---------------------------------------------------------------------------------

def test_round_trip_keeps_every_key(tmp_path):
    path, entry = tmp_path / "a_0300x0150_sd.npz", make_entry()
    save_latent_cache(path, entry, FINGERPRINT)
    with np.load(path, allow_pickle=False) as stored:
        assert sorted(stored.files) == ["alpha_mask", "crop_ltrb", "latents", "latents_flipped", "original_size",
                                        "sdtk_fingerprint"]
        assert stored["original_size"].tolist() == [300, 150]
        assert np.issubdtype(stored["original_size"].dtype, np.integer)
        assert CacheFingerprint.from_string(str(stored["sdtk_fingerprint"])) == FINGERPRINT
    loaded = load_latent_cache(path, BUCKET, need_flipped=True, need_alpha=True)
    np.testing.assert_array_equal(loaded.latents, entry.latents)
    np.testing.assert_array_equal(loaded.latents_flipped, entry.latents_flipped)
    np.testing.assert_array_equal(loaded.alpha_mask, entry.alpha_mask)
    assert loaded.original_size == (300, 150) and loaded.crop_ltrb == (0.0, 0.5, 128.0, 63.5)
    assert check_latent_cache(path, BUCKET, True, True, FINGERPRINT, skip_check=False) == (True, "ok")


def test_kohya_file_without_fingerprint_is_reused(tmp_path):
    path = tmp_path / "a_0256x0128_sd.npz"
    np.savez(path, **kohya_arrays())
    assert check_latent_cache(path, BUCKET, False, False, FINGERPRINT, skip_check=False) == (True, "ok")
    loaded = load_latent_cache(path, BUCKET, need_flipped=False, need_alpha=False)
    assert loaded.latents.shape == (4, 8, 16) and loaded.latents.dtype == np.float32
    assert loaded.original_size == (256, 128) and loaded.crop_ltrb == (0, 0, 128, 64)
    assert loaded.latents_flipped is None and loaded.alpha_mask is None


def test_multi_resolution_file_serves_the_matching_bucket_only(tmp_path):
    path = tmp_path / "a_0512x0768_sd.npz"
    tall, square = (64, 96), (64, 64)
    arrays = {**kohya_arrays(tall, "_12x8"), **kohya_arrays(square, "_8x8")}
    arrays["latents_8x8"] = np.full((4, 8, 8), 0.75, dtype=np.float32)
    np.savez(path, **arrays)
    assert load_latent_cache(path, tall, False, False).latents.shape == (4, 12, 8)
    assert float(load_latent_cache(path, square, False, False).latents[0, 0, 0]) == 0.75
    assert check_latent_cache(path, tall, False, False, None, skip_check=False) == (True, "ok")
    assert check_latent_cache(path, (96, 64), False, False, None, skip_check=False) == (False, "missing latents")


# ---- invalidation -----------------------------------------------------------------------------------------------

def _garbage(path):
    path.write_bytes(b"this is not a zip archive at all" * 10)


def _truncated(path):
    path.write_bytes(path.read_bytes()[:300])


@pytest.mark.parametrize("case, bucket, need_flipped, need_alpha, fingerprint, damage, reason", [
    ("other bucket", (64, 128), True, True, FINGERPRINT, None, "latent size differs from bucket"),
    ("alpha wanted, missing", BUCKET, True, True, FINGERPRINT, "no_alpha", "missing alpha_mask"),
    ("flipped needed, missing", BUCKET, True, False, FINGERPRINT, "no_flip", "missing latents_flipped"),
    ("alpha present, not wanted", BUCKET, True, False, FINGERPRINT, None, "alpha_mask present but not wanted"),
    ("other VAE", BUCKET, True, True, CacheFingerprint("vae-b", "float32", BUCKET, "center"), None,
     "made with another VAE"),
    ("other dtype", BUCKET, True, True, CacheFingerprint("vae-a", "float16", BUCKET, "center"), None,
     "made with another dtype"),
    ("other crop", BUCKET, True, True, CacheFingerprint("vae-a", "float32", BUCKET, "random"), None,
     "made with another crop"),
    ("garbage bytes", BUCKET, True, True, FINGERPRINT, _garbage, "unreadable npz"),
    ("truncated npz", BUCKET, True, True, FINGERPRINT, _truncated, "unreadable npz"),
    ("missing file", BUCKET, True, True, FINGERPRINT, Path.unlink, "no cache file"),
])
def test_invalid_caches_are_reported_with_a_reason(tmp_path, case, bucket, need_flipped, need_alpha, fingerprint,
                                                   damage, reason):
    path = tmp_path / "a_0300x0150_sd.npz"
    save_latent_cache(path, make_entry(flipped=damage != "no_flip", alpha=damage != "no_alpha"), FINGERPRINT)
    if callable(damage):
        damage(path)
    assert check_latent_cache(path, bucket, need_flipped, need_alpha, fingerprint, skip_check=False) == (False, reason)


@pytest.mark.parametrize("poisoned, fingerprint, need_flipped, bad_keys", [
    ("latents", FINGERPRINT, False, "latents"),
    ("latents_flipped", FINGERPRINT, True, "latents_flipped"),
    ("latents", None, True, "latents"),  # a kohya-style check without our fingerprint
])
def test_nan_or_inf_latents_make_a_cache_invalid_with_a_warning(tmp_path, caplog, poisoned, fingerprint,
                                                                 need_flipped, bad_keys):
    path = tmp_path / "a_0300x0150_sd.npz"
    entry = make_entry()
    getattr(entry, poisoned)[0, 1, 2] = np.nan
    getattr(entry, poisoned)[1, 0, 0] = np.inf
    save_latent_cache(path, entry, FINGERPRINT)
    before = path.read_bytes()
    with caplog.at_level("WARNING", logger="library.data.latent_cache"):
        result = check_latent_cache(path, BUCKET, need_flipped, True, fingerprint, skip_check=False)
    assert result == (False, "latents not finite (NaN/inf)")
    assert f"{path}: cached {bad_keys} contain NaN/inf values; encoding the image again" in caplog.text
    assert path.read_bytes() == before  # checking never rewrites


def test_nan_in_unused_flipped_latents_does_not_invalidate(tmp_path):
    path = tmp_path / "a_0300x0150_sd.npz"
    entry = make_entry()
    entry.latents_flipped[:] = np.nan
    save_latent_cache(path, entry, FINGERPRINT)
    assert check_latent_cache(path, BUCKET, False, True, FINGERPRINT, skip_check=False) == (True, "ok")


def test_loading_nan_latents_names_the_file(tmp_path):
    path = tmp_path / "a_0300x0150_sd.npz"
    entry = make_entry()
    entry.latents[0, 0, 0] = np.nan
    save_latent_cache(path, entry, FINGERPRINT)
    # --skip_cache_check skips the check by design; reading the file for a batch still refuses it
    assert check_latent_cache(path, BUCKET, True, True, FINGERPRINT, skip_check=True) == (True, "exists (not checked)")
    with pytest.raises(CacheError) as error:
        load_latent_cache(path, BUCKET, need_flipped=False, need_alpha=False)
    assert str(error.value) == (f"{path}: latents contain NaN/inf values; run without --skip_cache_check so stale "
                                "caches are made again, or delete the file")


def test_skip_check_only_looks_for_the_file(tmp_path):
    path = tmp_path / "a_0300x0150_sd.npz"
    _garbage(path)
    assert check_latent_cache(path, BUCKET, True, True, FINGERPRINT, skip_check=True) == (True, "exists (not checked)")
    path.unlink()
    assert check_latent_cache(path, BUCKET, True, True, FINGERPRINT, skip_check=True) == (False, "no cache file")


def test_load_names_file_and_size_mismatch(tmp_path):
    path = tmp_path / "a_0300x0150_sd.npz"
    save_latent_cache(path, make_entry(), FINGERPRINT)
    with pytest.raises(CacheError) as error:
        load_latent_cache(path, (64, 128), need_flipped=False, need_alpha=False)
    assert str(error.value) == (f"{path}: latents are 8x16 but bucket 64x128 (WxH) needs 16x8 (height x width in "
                                "latents); run without --skip_cache_check so stale caches are made again, "
                                "or delete the file")


def test_load_rejects_garbage_and_ignores_unwanted_alpha(tmp_path):
    path = tmp_path / "a_0300x0150_sd.npz"
    save_latent_cache(path, make_entry(), FINGERPRINT)
    assert load_latent_cache(path, BUCKET, need_flipped=False, need_alpha=False).alpha_mask is None
    _garbage(path)
    with pytest.raises(CacheError, match=r"a_0300x0150_sd\.npz: not a readable npz file"):
        load_latent_cache(path, BUCKET, need_flipped=False, need_alpha=False)


# ---- writing ----------------------------------------------------------------------------------------------------

def test_save_merges_unrelated_keys_and_drops_stale_entry_keys(tmp_path):
    path = tmp_path / "a_0300x0150_sd.npz"
    np.savez(path, **kohya_arrays((256, 256), "_32x32"), **kohya_arrays(BUCKET, "_8x16"), note=np.array([7]),
             alpha_mask=np.ones((64, 128), dtype=np.float32), sdtk_fingerprint=np.array("old"))
    save_latent_cache(path, make_entry(flipped=False, alpha=False), None)
    with np.load(path, allow_pickle=False) as stored:
        assert sorted(stored.files) == ["crop_ltrb", "crop_ltrb_32x32", "latents", "latents_32x32", "note",
                                        "original_size", "original_size_32x32"]
        assert stored["note"].tolist() == [7]
    assert check_latent_cache(path, BUCKET, False, False, FINGERPRINT, skip_check=False) == (True, "ok")


def test_failed_write_leaves_the_old_file_intact(tmp_path, monkeypatch):
    path = tmp_path / "a_0300x0150_sd.npz"
    old = make_entry(seed=1)
    save_latent_cache(path, old, FINGERPRINT)

    def crash_midway(stream, **arrays):
        stream.write(b"PK\x03\x04 partial")
        raise OSError("disk full")

    monkeypatch.setattr(latent_cache.np, "savez", crash_midway)
    with pytest.raises(OSError, match="disk full"):
        save_latent_cache(path, make_entry(seed=2), FINGERPRINT)
    monkeypatch.undo()
    assert [child.name for child in tmp_path.iterdir()] == [path.name]
    np.testing.assert_array_equal(load_latent_cache(path, BUCKET, True, True).latents, old.latents)


# ---- fingerprint and sharding -----------------------------------------------------------------------------------

def test_fingerprint_round_trip_and_differences():
    other = CacheFingerprint(vae_id="vae-b", dtype="float32", bucket_reso=(64, 64), crop="center")
    assert CacheFingerprint.from_string(FINGERPRINT.to_string()) == FINGERPRINT
    assert FINGERPRINT.differences(other) == ["vae_id", "bucket_reso"]
    with pytest.raises(ValueError):
        CacheFingerprint.from_string('{"vae_id": "x"}')


@pytest.mark.parametrize("num_processes", [2, 3])
def test_shards_cover_each_item_exactly_once(num_processes):
    items = [f"img{i}" for i in range(7)]
    shards = [shard_for_process(items, index, num_processes) for index in range(num_processes)]
    assert sorted(item for shard in shards for item in shard) == sorted(items)
    assert shards[1] == (["img1", "img3", "img5"] if num_processes == 2 else ["img1", "img4"])


def test_shard_rejects_an_index_outside_the_processes():
    with pytest.raises(ValueError, match="process_index 2"):
        shard_for_process([1, 2, 3], 2, 2)
