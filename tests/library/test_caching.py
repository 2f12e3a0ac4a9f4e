"""Latent and text-encoder-output caching with the tiny models: files, keys, reuse, invalidation, batches.

Datasets are small noise images in tmp_path (tests/cache_fixtures.py); the VAEs and text encoders are the
session's tiny random models, so values are checked against the same model run directly.
"""
from __future__ import annotations

import copy
from types import SimpleNamespace

import numpy as np
import pytest
import torch

from library.data.caching import cache_latents, cache_text_encoder_outputs
from library.data.latent_cache import FINGERPRINT_KEY, CacheError, LatentCacheEntry
from library.data.text_cache import CAPTION_FINGERPRINT_KEY
from library.errors import FlagError, UserInputError
from library.text.conditioning import CaptionEncoder
from library.text.tokenize import load_tokenizers
from tests.cache_fixtures import (
    BUCKET_FLAGS,
    SIZES,
    all_batches,
    build_group,
    make_dreambooth_dir,
    npz_names,
    random_pixels,
    read_npz,
    write_image,
)

TWO_SIZES = {"square": SIZES["square"], "wide": SIZES["wide"]}
CAPTIONS = {"square": "a photo of a red cube", "wide": "a wide landscape", "tall": "a tall tower",
            "small": "a small bird"}


class PosteriorMeanVae(torch.nn.Module):
    """The wrapped VAE with a zero-width posterior, so a cached "sample" is exactly the posterior mean."""

    def __init__(self, vae):
        super().__init__()
        self.vae = vae

    def encode(self, pixels: torch.Tensor):
        distribution = self.vae.encode(pixels).latent_dist
        return SimpleNamespace(latent_dist=SimpleNamespace(mean=distribution.mean,
                                                           std=torch.zeros_like(distribution.std)))


def posterior(vae, pixels: np.ndarray):
    """Mean and std of the VAE posterior of one uint8 HxWx3 image, normalised to -1..1 here, not by the library."""
    tensor = torch.from_numpy(np.ascontiguousarray(pixels)).permute(2, 0, 1).float() / 127.5 - 1.0
    with torch.no_grad():
        distribution = vae.encode(tensor[None]).latent_dist
    return distribution.mean[0].numpy(), distribution.std[0].numpy()


@pytest.fixture(scope="module")
def sdxl_vae(tiny_models):
    return tiny_models.bundle("sdxl").vae


# ---- latents on disk ---------------------------------------------------------------------------------------------

@pytest.mark.parametrize("family, suffix", [("sdxl", "sdxl"), ("sd1", "sd")])
def test_disk_cache_has_kohya_names_keys_sizes_and_crop_values(tmp_path, tiny_models, family, suffix):
    image_dir = make_dreambooth_dir(tmp_path)
    group = build_group(tmp_path, *BUCKET_FLAGS, latent_suffix=suffix)
    stats = cache_latents(group, tiny_models.bundle(family).vae, to_disk=True, latent_suffix=suffix)
    assert (stats.computed, stats.reused, stats.invalid_reasons) == (4, 0, {"no cache file": 4})
    # the original image size is in the name, zero-padded (COMPAT §7.2)
    assert npz_names(image_dir) == [f"small_0048x0080_{suffix}.npz", f"square_0064x0064_{suffix}.npz",
                                    f"tall_0064x0096_{suffix}.npz", f"wide_0096x0064_{suffix}.npz"]
    wide = read_npz(image_dir / f"wide_0096x0064_{suffix}.npz")
    assert set(wide) == {"latents", "original_size", "crop_ltrb", FINGERPRINT_KEY}  # no flip, no alpha asked
    assert wide["latents"].shape == (4, 8, 8) and wide["latents"].dtype == np.float32  # bucket 64x64 / 8
    assert np.isfinite(wide["latents"]).all()
    assert wide["original_size"].tolist() == [96, 64]
    # 96x64 fitted into 64x64: 64 x 42.67, centred vertically (COMPAT §10.4)
    np.testing.assert_allclose(wide["crop_ltrb"], [0, 10, 64, 10 + 64 / 1.5])
    small = read_npz(image_dir / f"small_0048x0080_{suffix}.npz")
    assert small["latents"].shape == (4, 12, 4)  # bucket 32x96 (W x H) -> [4, 96/8, 32/8]
    assert small["original_size"].tolist() == [48, 80]
    np.testing.assert_allclose(small["crop_ltrb"], [0, 21, 32, 21 + 32 / 0.6])

    again = cache_latents(build_group(tmp_path, *BUCKET_FLAGS, latent_suffix=suffix),
                          tiny_models.bundle(family).vae, to_disk=True, latent_suffix=suffix)
    assert (again.computed, again.reused, again.invalid_reasons) == (0, 4, None)
    assert again.describe() == "4 reused, 0 computed"


def test_flipped_latents_encode_the_mirrored_image(tmp_path, sdxl_vae):
    image_dir = make_dreambooth_dir(tmp_path, {"square": SIZES["square"]})
    pixels = random_pixels(SIZES["square"], seed=0)  # the same noise make_dreambooth_dir wrote
    group = build_group(tmp_path, "--resolution", "64", "--flip_aug")
    cache_latents(group, PosteriorMeanVae(sdxl_vae), to_disk=True, latent_suffix="sdxl")
    cached = read_npz(image_dir / "square_0064x0064_sdxl.npz")
    expected, _ = posterior(sdxl_vae, pixels)
    expected_flipped, _ = posterior(sdxl_vae, pixels[:, ::-1])
    np.testing.assert_allclose(cached["latents"], expected, atol=1e-5)
    np.testing.assert_allclose(cached["latents_flipped"], expected_flipped, atol=1e-5)
    # the encoder is not mirror-symmetric, so flipped latents are a second encoding, not a flipped array
    assert not np.allclose(cached["latents_flipped"], expected[..., ::-1], atol=1e-3)


def test_cached_latents_are_a_posterior_sample_not_the_mean(tmp_path, sdxl_vae):
    image_dir = make_dreambooth_dir(tmp_path, {"square": SIZES["square"]})
    cache_latents(build_group(tmp_path, "--resolution", "64"), sdxl_vae, to_disk=True, latent_suffix="sdxl")
    latents = read_npz(image_dir / "square_0064x0064_sdxl.npz")["latents"]
    mean, std = posterior(sdxl_vae, random_pixels(SIZES["square"], seed=0))
    standardized = (latents - mean) / std  # kohya caches latent_dist.sample() (COMPAT §7.1): N(0, 1) here
    assert abs(standardized.mean()) < 0.3 and 0.7 < standardized.std() < 1.3


def test_alpha_mask_comes_from_the_alpha_channel(tmp_path, sdxl_vae):
    image_dir = tmp_path / "1_thing"
    alpha = np.tile(np.arange(64, dtype=np.uint8) * 4, (64, 1))  # 0, 4, ..., 252 from left to right
    write_image(image_dir / "masked.png", (64, 64), seed=3, alpha=alpha)
    write_image(image_dir / "opaque.png", (64, 64), seed=4)
    cache_latents(build_group(tmp_path, "--resolution", "64", "--alpha_mask"), sdxl_vae, to_disk=True,
                  latent_suffix="sdxl")
    masked = read_npz(image_dir / "masked_0064x0064_sdxl.npz")
    assert masked["alpha_mask"].dtype == np.float32 and masked["alpha_mask"].shape == (64, 64)
    np.testing.assert_allclose(masked["alpha_mask"], alpha / 255.0, atol=1e-6)
    np.testing.assert_array_equal(read_npz(image_dir / "opaque_0064x0064_sdxl.npz")["alpha_mask"], 1.0)


# ---- invalidation -------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("change, expected_reason", [
    ("other VAE", "made with another VAE"),
    ("other dtype", "made with another VAE/dtype"),  # the weights' dtype is part of the VAE identity too
    ("other resolution", "latent size differs from bucket"),
    ("flip_aug turned on", "missing latents_flipped"),
])
def test_stale_cache_is_recomputed(tmp_path, sdxl_vae, change, expected_reason):
    image_dir = make_dreambooth_dir(tmp_path, {"square": SIZES["square"]})
    cache_latents(build_group(tmp_path, "--resolution", "64"), sdxl_vae, to_disk=True, latent_suffix="sdxl")
    before = read_npz(image_dir / "square_0064x0064_sdxl.npz")["latents"]
    flags, vae = ["--resolution", "64"], sdxl_vae
    if change == "other VAE":
        from library.models.tiny import build_tiny_bundle

        vae = build_tiny_bundle("sdxl", seed=1).vae
    elif change == "other dtype":
        vae = copy.deepcopy(sdxl_vae).to(torch.bfloat16)
    elif change == "other resolution":
        flags = ["--resolution", "32"]
    else:
        flags.append("--flip_aug")
    stats = cache_latents(build_group(tmp_path, *flags), vae, to_disk=True, latent_suffix="sdxl")
    assert (stats.computed, stats.reused, stats.invalid_reasons) == (1, 0, {expected_reason: 1})
    after = read_npz(image_dir / "square_0064x0064_sdxl.npz")
    assert npz_names(image_dir) == ["square_0064x0064_sdxl.npz"]  # the same file, rewritten
    if change == "other resolution":
        assert after["latents"].shape == (4, 4, 4)
    elif change == "flip_aug turned on":
        assert after["latents_flipped"].shape == (4, 8, 8)
    else:
        assert not np.allclose(after["latents"], before, atol=1e-3)


def test_skip_cache_check_reuses_a_stale_file_and_reading_it_names_the_file(tmp_path, sdxl_vae):
    image_dir = make_dreambooth_dir(tmp_path, TWO_SIZES)
    cache_latents(build_group(tmp_path, "--resolution", "64"), sdxl_vae, to_disk=True, latent_suffix="sdxl")
    group = build_group(tmp_path, "--resolution", "32")
    stats = cache_latents(group, sdxl_vae, to_disk=True, latent_suffix="sdxl", skip_check=True)
    assert (stats.computed, stats.reused) == (0, 2)
    with pytest.raises(CacheError) as raised:
        all_batches(group)
    message = str(raised.value)
    assert str(image_dir) in message and "_sdxl.npz" in message
    assert "latents are 8x8 but bucket 32x32 (WxH) needs 4x4" in message
    assert "run without --skip_cache_check" in message


def test_kohya_file_without_fingerprint_is_reused_when_its_shapes_fit(tmp_path, sdxl_vae):
    image_dir = make_dreambooth_dir(tmp_path, TWO_SIZES)
    # what kohya writes: plain np.savez, its three keys, no fingerprint of ours
    np.savez(image_dir / "square_0064x0064_sdxl.npz", latents=np.full((4, 8, 8), 0.25, dtype=np.float32),
             original_size=np.array([64, 64]), crop_ltrb=np.array([0, 0, 64, 64]))
    np.savez(image_dir / "wide_0096x0064_sdxl.npz", latents=np.zeros((4, 4, 4), dtype=np.float32),
             original_size=np.array([96, 64]), crop_ltrb=np.array([0, 0, 64, 64]))
    group = build_group(tmp_path, "--resolution", "64")
    stats = cache_latents(group, sdxl_vae, to_disk=True, latent_suffix="sdxl")
    assert (stats.reused, stats.computed, stats.invalid_reasons) == (1, 1, {"latent size differs from bucket": 1})
    square = read_npz(image_dir / "square_0064x0064_sdxl.npz")
    assert FINGERPRINT_KEY not in square and np.all(square["latents"] == 0.25)  # untouched
    by_key = {batch["image_keys"][0]: batch["latents"] for batch in all_batches(group)}
    assert torch.all(by_key[str(image_dir / "square.png")] == 0.25)


def test_legacy_stem_npz_is_used_instead_of_a_new_file(tmp_path, sdxl_vae):
    image_dir = make_dreambooth_dir(tmp_path, {"square": SIZES["square"]})
    legacy = image_dir / "square.npz"
    np.savez(legacy, latents=np.full((4, 8, 8), -1.5, dtype=np.float32), original_size=np.array([64, 64]),
             crop_ltrb=np.array([0, 0, 64, 64]))
    group = build_group(tmp_path, "--resolution", "64")
    stats = cache_latents(group, sdxl_vae, to_disk=True, latent_suffix="sdxl")
    assert (stats.reused, stats.computed) == (1, 0)
    assert npz_names(image_dir) == ["square.npz"] and group.images[0].latents_npz == legacy
    assert torch.all(all_batches(group)[0]["latents"] == -1.5)


def test_memory_mode_keeps_latents_on_the_records_and_writes_nothing(tmp_path, sdxl_vae):
    image_dir = make_dreambooth_dir(tmp_path)
    group = build_group(tmp_path, *BUCKET_FLAGS, "--flip_aug")
    stats = cache_latents(group, sdxl_vae, to_disk=False, latent_suffix="sdxl", num_processes=2, process_index=1)
    assert stats.computed == 4 and stats.skipped_other_process == 0  # in memory every process encodes everything
    assert npz_names(image_dir) == []
    shapes = {info.absolute_path.stem: info.latents.latents.shape for info in group.images}
    assert shapes == {"square": (4, 8, 8), "wide": (4, 8, 8), "tall": (4, 12, 4), "small": (4, 12, 4)}
    assert all(isinstance(info.latents, LatentCacheEntry) and info.latents_npz is None for info in group.images)
    for batch in all_batches(group):
        info = next(info for info in group.images if str(info.absolute_path) == batch["image_keys"][0])
        expected = info.latents.latents_flipped if batch["flippeds"][0] else info.latents.latents
        assert batch["images"] is None and torch.equal(batch["latents"][0], torch.from_numpy(expected))


def test_batches_after_caching_carry_latents_and_flipped_samples_use_latents_flipped(tmp_path, sdxl_vae):
    image_dir = make_dreambooth_dir(tmp_path, TWO_SIZES)
    for name, size in TWO_SIZES.items():
        np.savez(image_dir / f"{name}_{size[0]:04d}x{size[1]:04d}_sdxl.npz",
                 latents=np.full((4, 8, 8), 1.0, dtype=np.float32),
                 latents_flipped=np.full((4, 8, 8), -1.0, dtype=np.float32),
                 original_size=np.array(size), crop_ltrb=np.array([0, 0, 64, 64]))
    group = build_group(tmp_path, "--resolution", "64", "--flip_aug")
    assert cache_latents(group, sdxl_vae, to_disk=True, latent_suffix="sdxl").reused == 2
    batches = all_batches(group, epochs=4)  # 2 images x 2 repeats x 4 epochs: both sides occur
    flips = [batch["flippeds"][0] for batch in batches]
    assert True in flips and False in flips
    for batch in batches:
        assert batch["images"] is None and batch["latents"].shape == (1, 4, 8, 8)
        assert torch.all(batch["latents"] == (-1.0 if batch["flippeds"][0] else 1.0))


def test_each_process_caches_its_share_even_when_the_other_started_first(tmp_path, sdxl_vae):
    image_dir = make_dreambooth_dir(tmp_path)
    # process 1 finishes before process 0 looks at the files; the split must not depend on what exists by then
    second = cache_latents(build_group(tmp_path, *BUCKET_FLAGS), sdxl_vae, to_disk=True, latent_suffix="sdxl",
                           process_index=1, num_processes=2)
    first = cache_latents(build_group(tmp_path, *BUCKET_FLAGS), sdxl_vae, to_disk=True, latent_suffix="sdxl",
                          process_index=0, num_processes=2)
    for stats in (first, second):
        assert (stats.computed, stats.reused, stats.skipped_other_process) == (2, 0, 2)
    assert len(npz_names(image_dir)) == 4


# ---- refusals -----------------------------------------------------------------------------------------------------

class OverflowingVae(torch.nn.Module):
    """The wrapped VAE as caching sees one running in `dtype`, whose posterior mean overflows for every image
    (an fp16 SDXL VAE does this on bright images)."""

    def __init__(self, vae, dtype: torch.dtype):
        super().__init__()
        self.marker = torch.nn.Parameter(torch.zeros(1, dtype=dtype))  # the first parameter sets the dtype
        self.vae = vae

    def encode(self, pixels: torch.Tensor):
        distribution = self.vae.encode(pixels.float()).latent_dist
        mean = distribution.mean.clone()
        mean[:, 0, 0, 0] = float("inf")
        return SimpleNamespace(latent_dist=SimpleNamespace(mean=mean, std=distribution.std))


@pytest.mark.parametrize("dtype, hint", [
    (torch.float16, "the VAE runs in float16, which overflows on some images; pass --no_half_vae to encode in "
                    "float32"),
    (torch.float32, "the VAE runs in float32, so its weights are probably damaged; check the VAE or model file"),
])
def test_nan_latents_from_the_vae_stop_before_any_cache_is_written(tmp_path, sdxl_vae, dtype, hint):
    image_dir = make_dreambooth_dir(tmp_path, {"square": SIZES["square"]})
    cache_latents(build_group(tmp_path, "--resolution", "64"), sdxl_vae, to_disk=True, latent_suffix="sdxl")
    old_cache = image_dir / "square_0064x0064_sdxl.npz"
    before = old_cache.read_bytes()
    with pytest.raises(UserInputError) as raised:  # another VAE: the old file is stale and would be redone
        cache_latents(build_group(tmp_path, "--resolution", "64"), OverflowingVae(sdxl_vae, dtype), to_disk=True,
                      latent_suffix="sdxl")
    assert str(raised.value) == (f"{image_dir / 'square.png'}: the VAE encoded this image to NaN/inf latents; "
                                 f"{hint} (no cache was written for it)")
    assert old_cache.read_bytes() == before and npz_names(image_dir) == ["square_0064x0064_sdxl.npz"]


def test_nan_latents_in_memory_mode_name_every_image_of_the_batch(tmp_path, sdxl_vae):
    image_dir = make_dreambooth_dir(tmp_path, TWO_SIZES)
    group = build_group(tmp_path, "--resolution", "64", "--flip_aug")
    with pytest.raises(UserInputError) as raised:
        cache_latents(group, OverflowingVae(sdxl_vae, torch.bfloat16), to_disk=False, latent_suffix="sdxl",
                      vae_batch_size=2)
    assert str(raised.value).startswith(f"{image_dir / 'square.png'}, {image_dir / 'wide.png'}: the VAE encoded "
                                        "these images to NaN/inf latents; the VAE runs in bfloat16")
    assert all(info.latents is None for info in group.images) and npz_names(image_dir) == []


def test_a_cached_file_with_nan_latents_is_encoded_again_with_a_warning(tmp_path, sdxl_vae, caplog):
    image_dir = make_dreambooth_dir(tmp_path, TWO_SIZES)
    cache_latents(build_group(tmp_path, "--resolution", "64"), sdxl_vae, to_disk=True, latent_suffix="sdxl")
    poisoned = image_dir / "wide_0096x0064_sdxl.npz"
    arrays = read_npz(poisoned)
    arrays["latents"][0, 0, 0] = np.nan  # what an overflowing half-precision VAE wrote in an earlier run
    np.savez(poisoned, **arrays)
    with caplog.at_level("WARNING", logger="library.data.latent_cache"):
        stats = cache_latents(build_group(tmp_path, "--resolution", "64"), sdxl_vae, to_disk=True,
                              latent_suffix="sdxl")
    assert (stats.computed, stats.reused, stats.invalid_reasons) == (1, 1, {"latents not finite (NaN/inf)": 1})
    assert f"{poisoned}: cached latents contain NaN/inf values; encoding the image again" in caplog.text
    assert np.isfinite(read_npz(poisoned)["latents"]).all()


@pytest.mark.parametrize("flag", ["--color_aug", "--random_crop"])
def test_latent_caching_refuses_augmentations_that_change_pixels(tmp_path, sdxl_vae, flag):
    image_dir = make_dreambooth_dir(tmp_path, {"square": SIZES["square"]})
    group = build_group(tmp_path, "--resolution", "64", flag)
    with pytest.raises(FlagError, match="cannot be used with color_aug or random_crop") as raised:
        cache_latents(group, sdxl_vae, to_disk=True, latent_suffix="sdxl")
    assert str(image_dir) in str(raised.value)
    assert npz_names(image_dir) == []


@pytest.mark.parametrize("flags", [["--shuffle_caption"], ["--caption_dropout_rate", "0.1"], ["--enable_wildcard"]])
def test_text_encoder_caching_refuses_captions_that_change(tmp_path, tiny_models, flags):
    image_dir = make_dreambooth_dir(tmp_path, {"square": SIZES["square"]}, {"square": "a, b, c"})
    group = build_group(tmp_path, "--resolution", "64", *flags)
    bundle = tiny_models.bundle("sd1")
    encoder = CaptionEncoder(bundle.family, load_tokenizers(bundle.family), bundle.text_encoders)
    with pytest.raises(FlagError, match="needs fixed captions") as raised:
        cache_text_encoder_outputs(group, encoder, to_disk=True)
    assert str(image_dir) in str(raised.value)
    assert npz_names(image_dir) == []


# ---- text-encoder outputs -----------------------------------------------------------------------------------------

def caption_encoder(tiny_models, family: str, **settings) -> CaptionEncoder:
    bundle = tiny_models.bundle(family)
    return CaptionEncoder(bundle.family, load_tokenizers(bundle.family), bundle.text_encoders, **settings)


# tiny widths: CLIP-L 32, OpenCLIP 64, projection 32 (library/models/tiny.py)
@pytest.mark.parametrize("family, max_token_length, expected_shapes", [
    ("sd1", None, {"hidden_state1": (77, 32)}),
    ("sd1", 225, {"hidden_state1": (227, 32)}),
    ("sdxl", None, {"hidden_state1": (77, 32), "hidden_state2": (77, 64), "pool2": (32,)}),
    ("sdxl", 225, {"hidden_state1": (227, 32), "hidden_state2": (227, 64), "pool2": (32,)}),
])
def test_text_encoder_cache_keys_and_lengths(tmp_path, tiny_models, family, max_token_length, expected_shapes):
    image_dir = make_dreambooth_dir(tmp_path, captions=CAPTIONS)
    encoder = caption_encoder(tiny_models, family, max_token_length=max_token_length)
    stats = cache_text_encoder_outputs(build_group(tmp_path, "--resolution", "64"), encoder, to_disk=True)
    assert (stats.computed, stats.reused) == (4, 0)
    assert npz_names(image_dir) == [f"{name}_te_outputs.npz" for name in ("small", "square", "tall", "wide")]
    arrays = read_npz(image_dir / "wide_te_outputs.npz")
    assert {key: value.shape for key, value in arrays.items() if key != CAPTION_FINGERPRINT_KEY} == expected_shapes
    again = cache_text_encoder_outputs(build_group(tmp_path, "--resolution", "64"), encoder, to_disk=True)
    assert (again.computed, again.reused) == (0, 4)


def test_editing_one_caption_re_encodes_exactly_that_image(tmp_path, tiny_models):
    image_dir = make_dreambooth_dir(tmp_path, captions=CAPTIONS)
    encoder = caption_encoder(tiny_models, "sdxl")
    cache_text_encoder_outputs(build_group(tmp_path, "--resolution", "64"), encoder, to_disk=True)
    before = {path.name: path.read_bytes() for path in image_dir.glob("*_te_outputs.npz")}
    (image_dir / "tall.caption").write_text("a tall tower at night", encoding="utf-8")
    stats = cache_text_encoder_outputs(build_group(tmp_path, "--resolution", "64"), encoder, to_disk=True)
    assert (stats.computed, stats.reused) == (1, 3)
    assert stats.invalid_reasons == {"caption, tokenizer or encoder settings changed": 1}
    after = {path.name: path.read_bytes() for path in image_dir.glob("*_te_outputs.npz")}
    assert [name for name in sorted(before) if before[name] != after[name]] == ["tall_te_outputs.npz"]


@pytest.mark.parametrize("settings, expected_reason", [
    ({"clip_skip": 2}, "caption, tokenizer or encoder settings changed"),
    ({"max_token_length": 150}, "sequence length differs (other --max_token_length?)"),
])
def test_other_encoding_settings_re_encode_everything(tmp_path, tiny_models, settings, expected_reason):
    make_dreambooth_dir(tmp_path, captions=CAPTIONS)
    cache_text_encoder_outputs(build_group(tmp_path, "--resolution", "64"), caption_encoder(tiny_models, "sd1"),
                               to_disk=True)
    stats = cache_text_encoder_outputs(build_group(tmp_path, "--resolution", "64"),
                                       caption_encoder(tiny_models, "sd1", **settings), to_disk=True)
    assert (stats.computed, stats.reused, stats.invalid_reasons) == (4, 0, {expected_reason: 4})


@pytest.mark.parametrize("family", ["sd1", "sdxl"])
def test_cached_outputs_joined_equal_encoding_the_caption(tmp_path, tiny_models, family):
    make_dreambooth_dir(tmp_path, captions=CAPTIONS)
    encoder = caption_encoder(tiny_models, family, max_token_length=150)
    group = build_group(tmp_path, "--resolution", "64", "--caption_prefix", "photo,")
    cache_text_encoder_outputs(group, encoder, to_disk=True)
    for batch in all_batches(group):
        joined = CaptionEncoder.join_cached(batch["text_encoder_outputs"])
        with torch.no_grad():
            direct = encoder.encode(batch["captions"])
        assert batch["captions"][0].startswith("photo, ")
        torch.testing.assert_close(joined.hidden_states, direct.hidden_states, atol=1e-5, rtol=1e-5)
        if family == "sdxl":
            torch.testing.assert_close(joined.pooled, direct.pooled, atol=1e-5, rtol=1e-5)
        else:
            assert joined.pooled is None
