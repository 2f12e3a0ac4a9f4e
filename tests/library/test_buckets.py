"""Bucketing against kohya's rules (COMPAT §10): bucket lists, assignment, no-upscale, crop values, batches."""
from __future__ import annotations

import random
import time

import numpy as np
import pytest

from library.data.buckets import (
    BucketAssigner,
    BucketAssignment,
    BucketSettings,
    ImageTooSmallError,
    bucket_histogram,
    crop_top_left_for_sdxl,
    epoch_batches,
    fit_crop_ltrb,
    format_bucket_histogram,
    group_into_batches,
    make_bucket_resolutions,
    mean_aspect_error,
    shuffled_batches,
)
from library.errors import ConfigError, UserInputError


def _with_transposes(pairs):
    return sorted({size for width, height in pairs for size in ((width, height), (height, width))})


def test_sdxl_buckets_with_max_2048_match_compat_vector():
    tall = [(960, 1088), (896, 1152), (832, 1216), (768, 1280), (768, 1344), (704, 1408), (704, 1472), (640, 1536),
            (640, 1600), (576, 1664), (576, 1728), (576, 1792), (512, 1856), (512, 1920), (512, 1984), (512, 2048),
            (448, 2048), (384, 2048), (320, 2048), (256, 2048)]
    expected = _with_transposes([(1024, 1024)] + tall)
    buckets = make_bucket_resolutions((1024, 1024), 256, 2048, 64)
    assert len(buckets) == 41
    assert buckets == expected


def test_sdxl_buckets_with_cli_defaults_all_have_a_1024_side():
    expected = _with_transposes([(width, 1024) for width in range(256, 1025, 64)])
    buckets = make_bucket_resolutions((1024, 1024), 256, 1024, 64)
    assert len(buckets) == 25
    assert buckets == expected


SD1_BUCKETS = [(256, 832), (256, 896), (256, 960), (256, 1024), (320, 704), (320, 768), (384, 640), (448, 576),
               (512, 512), (576, 448), (640, 384), (704, 320), (768, 320), (832, 256), (896, 256), (960, 256),
               (1024, 256)]


@pytest.fixture(scope="module")
def sd1_assigner():
    return BucketAssigner(BucketSettings.from_values(512, enable_bucket=True))


def test_sd1_512_buckets_hand_computed(sd1_assigner):
    # w=320: 262144 // 320 = 819 -> 768; w=704: 372 -> 320; w=832: 315 -> 256 ...
    assert sd1_assigner.predefined == SD1_BUCKETS


@pytest.mark.parametrize("size,bucket,resized,crop,aspect_error", [
    ((448, 576), (448, 576), (448, 576), (0.0, 0.0, 448.0, 576.0), 0.0),            # exact bucket
    ((1920, 1080), (640, 384), (683, 384), (0.0, 12.0, 640.0, 372.0), 5 / 3 - 16 / 9),  # wide: 384/1080 scale
    ((1000, 3000), (256, 832), (277, 832), (0.0, 32.0, 256.0, 800.0), 256 / 832 - 1 / 3),  # tall
    ((100, 100), (512, 512), (512, 512), (0.0, 0.0, 512.0, 512.0), 0.0),            # tiny image is enlarged
    ((200, 300), (384, 640), (427, 640), (0.0, 32.0, 384.0, 608.0), 0.6 - 2 / 3),   # 200 * 640/300 = 426.67
])
def test_assign_hand_computed(sd1_assigner, size, bucket, resized, crop, aspect_error):
    assignment = sd1_assigner.assign(size)
    assert assignment.bucket_reso == bucket
    assert assignment.resized_size == resized
    assert assignment.crop_ltrb == pytest.approx(crop)
    assert assignment.aspect_error == pytest.approx(aspect_error)


def test_ties_go_to_the_first_bucket_in_sorted_order():
    # buckets (128,384) (128,512) (256,256) (384,128) (512,128): aspects 1/3, 1/4, 1, 3, 4
    assigner = BucketAssigner(BucketSettings.from_values((256, 256), True, 128, 512, 128))
    assert assigner.predefined == [(128, 384), (128, 512), (256, 256), (384, 128), (512, 128)]
    halfway_1_and_3 = assigner.assign((200, 100))  # aspect 2: |1-2| == |3-2|
    assert halfway_1_and_3 == BucketAssignment((256, 256), (512, 256), (0.0, 64.0, 256.0, 192.0), -1.0)
    halfway_3_and_4 = assigner.assign((350, 100))  # aspect 3.5
    assert halfway_3_and_4.bucket_reso == (384, 128)
    assert halfway_3_and_4.resized_size == (448, 128)


def test_closest_bucket_matches_brute_force_argmin():
    assigner = BucketAssigner(BucketSettings.from_values(1024, True, 256, 2048, 64))
    aspects = np.array([width / height for width, height in assigner.predefined])
    rng = random.Random(1)
    for _ in range(2000):
        size = (rng.randint(1, 6000), rng.randint(1, 6000))
        expected = assigner.predefined[int(np.abs(aspects - size[0] / size[1]).argmin())]
        if size in assigner.predefined:
            expected = size
        assert assigner.assign(size).bucket_reso == expected, size


@pytest.fixture(scope="module")
def no_upscale_assigner():
    return BucketAssigner(BucketSettings.from_values(512, True, 256, 1024, 64, bucket_no_upscale=True))


def test_no_upscale_has_no_predefined_buckets_and_keeps_small_images(no_upscale_assigner):
    assert no_upscale_assigner.predefined == []
    small = no_upscale_assigner.assign((300, 200))
    assert small.resized_size == (300, 200)      # 60000 <= 512*512: untouched
    assert small.bucket_reso == (256, 192)        # floored to multiples of 64, cropped
    assert small.crop_ltrb == pytest.approx((0.0, 10.0, 256.0, 256 / 1.5 + 10.0))


def test_no_upscale_height_variant(no_upscale_assigner):
    # ar 16/9: Wa = 682.67, Ha = 384. V1: R(682.67) = 640, R(640 / ar = 360) = 320 -> |2 - 1.778| = 0.222.
    # V2: R(384) = 384, R(384 * ar = 682.67) = 640 -> |1.667 - 1.778| = 0.111, so V2: (int(682.67 + .5), 384).
    assignment = no_upscale_assigner.assign((1920, 1080))
    assert assignment.resized_size == (683, 384)
    assert assignment.bucket_reso == (640, 384)


def test_no_upscale_width_variant(no_upscale_assigner):
    # ar 9/16: Wa = 384, Ha = 682.67. V1: 384 / R(682.67) = 384/640 -> 0.0375; V2: R(360) / 640 = 320/640 -> 0.0625
    assignment = no_upscale_assigner.assign((1080, 1920))
    assert assignment.resized_size == (384, 683)
    assert assignment.bucket_reso == (384, 640)


def test_no_upscale_exact_aspect(no_upscale_assigner):
    # ar 4/3: V1 gives 576x384 (error 1/6); V2: R(443.4) = 384, R(512) = 512 -> error 0
    assert no_upscale_assigner.assign((1024, 768)).bucket_reso == (512, 384)
    assert no_upscale_assigner.assign((1024, 768)).resized_size == (512, 384)


def test_no_upscale_rejects_image_thinner_than_a_step(no_upscale_assigner):
    with pytest.raises(ImageTooSmallError, match="50x300: a side is shorter than bucket_reso_steps=64"):
        no_upscale_assigner.assign((50, 300))


def test_without_enable_bucket_the_resolution_is_the_only_bucket():
    assigner = BucketAssigner(BucketSettings.from_values((512, 512), enable_bucket=False))
    assert assigner.predefined == []
    assignment = assigner.assign((800, 600))
    assert assignment.bucket_reso == (512, 512)
    assert assignment.resized_size == (683, 512)  # cover: 800 * 512/600 = 682.67
    assert assignment.crop_ltrb == (0.0, 64.0, 512.0, 448.0)


def test_fit_crop_and_sdxl_crop_top_left_with_flip():
    # bucket wider than the image: fitted width 384 * 1.001 = 384.384, left = (640 - 384.384) // 2 = 127
    crop = fit_crop_ltrb((640, 384), (1001, 1000))
    assert crop == pytest.approx((127.0, 0.0, 511.384, 384.0))
    assert crop_top_left_for_sdxl(crop, (640, 384), flipped=False) == (0.0, 127.0)
    top, left = crop_top_left_for_sdxl(crop, (640, 384), flipped=True)
    assert (top, left) == (0.0, pytest.approx(640 - 511.384))


def test_settings_round_min_down_and_max_up():
    settings = BucketSettings.from_values(512, True, min_bucket_reso=300, max_bucket_reso=1000)
    assert (settings.min_bucket_reso, settings.max_bucket_reso) == (256, 1024)


def test_settings_without_enable_bucket_ignore_bucket_keys():
    settings = BucketSettings.from_values(512, False, min_bucket_reso=9999, bucket_reso_steps=0,
                                          bucket_no_upscale=True)
    assert settings.resolution == (512, 512)
    assert settings.bucket_no_upscale is False


@pytest.mark.parametrize("kwargs,message", [
    ({"min_bucket_reso": 768}, ("ds.toml: min_bucket_reso: expected at most the smaller resolution side 512, "
                                "got 768; set min_bucket_reso <= 512 or raise resolution")),
    ({"max_bucket_reso": 448}, ("ds.toml: max_bucket_reso: expected at least the larger resolution side 512, "
                                "got 448; set max_bucket_reso >= 512 or lower resolution")),
    ({"bucket_reso_steps": 0}, ("ds.toml: bucket_reso_steps: expected a positive integer (64 for SD1/2, "
                                "32 or 64 for SDXL), got 0")),
])
def test_settings_errors_name_file_key_and_values(kwargs, message):
    with pytest.raises(ConfigError) as caught:
        BucketSettings.from_values(512, True, source="ds.toml", **kwargs)
    assert str(caught.value) == message


def test_settings_reject_a_bad_resolution():
    with pytest.raises(ConfigError, match=r"resolution: expected a positive integer or \[width, height\]"):
        BucketSettings.from_values((0, 512), True)


def test_group_into_batches_in_sorted_bucket_order_last_short():
    batches = group_into_batches({(512, 512): [1, 2, 3, 4, 5], (448, 576): [6, 7]}, 2)
    assert batches == [[6, 7], [1, 2], [3, 4], [5]]
    with pytest.raises(UserInputError, match="batch_size: expected a positive integer, got 0"):
        group_into_batches({(512, 512): [1]}, 0)


def test_shuffled_batches_are_a_function_of_seed_plus_epoch_only():
    batches = group_into_batches({(512, 512): list(range(40)), (448, 576): list(range(40, 60))}, 2)
    state = random.getstate()
    first = shuffled_batches(batches, seed=42, epoch=1)
    assert random.getstate() == state
    assert first == shuffled_batches(batches, seed=42, epoch=1)
    assert first != shuffled_batches(batches, seed=42, epoch=2)
    assert first == shuffled_batches(batches, seed=41, epoch=2)  # kohya seeds with seed + epoch
    assert sorted(first) == sorted(batches)
    expected = list(batches)
    random.Random(43).shuffle(expected)  # kohya: random.seed(seed + epoch); random.shuffle(batches)
    assert first == expected


def test_epoch_batches_reshuffle_inside_buckets_deterministically():
    buckets = {(512, 512): list(range(10)), (448, 576): list(range(10, 15))}
    state = random.getstate()
    epoch1 = epoch_batches(buckets, 3, seed=7, epoch=1)
    assert random.getstate() == state
    assert epoch1 == epoch_batches(buckets, 3, seed=7, epoch=1)
    assert epoch1 != epoch_batches(buckets, 3, seed=7, epoch=2)
    assert sorted(len(batch) for batch in epoch1) == [1, 2, 3, 3, 3, 3]  # 10 -> 3+3+3+1, 5 -> 3+2
    for batch in epoch1:
        assert all(item < 10 for item in batch) or all(item >= 10 for item in batch)
    assert sorted(item for batch in epoch1 for item in batch) == list(range(15))
    assert buckets[(512, 512)] == list(range(10))  # input untouched


def test_histogram_format_and_mean_aspect_error(sd1_assigner):
    assignments = [sd1_assigner.assign(size) for size in [(512, 512)] * 3 + [(1920, 1080), (448, 576)]]
    histogram = bucket_histogram(assignments)
    assert histogram == {(448, 576): 1, (512, 512): 3, (640, 384): 1}
    assert format_bucket_histogram(histogram) == "512x512: 3, 448x576: 1, 640x384: 1"
    assert format_bucket_histogram({}) == "(no images)"
    assert mean_aspect_error(assignments) == pytest.approx((16 / 9 - 5 / 3) / 5)
    assert mean_aspect_error([]) == 0.0


def test_assigning_100k_images_is_fast():
    assigner = BucketAssigner(BucketSettings.from_values(1024, True, 256, 2048, 64))
    rng = random.Random(0)
    distinct = [(rng.randint(400, 6000), rng.randint(400, 6000)) for _ in range(5000)]
    sizes = [distinct[rng.randrange(len(distinct))] for _ in range(100_000)]
    started = time.perf_counter()
    assignments = [assigner.assign(size) for size in sizes]
    assert time.perf_counter() - started < 1.0
    assert len(assignments) == 100_000
