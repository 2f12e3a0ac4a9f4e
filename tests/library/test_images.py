"""Image files: scanning, header sizes (with EXIF orientation), decoding, resizing, cropping and augmentations."""
from __future__ import annotations

import random

import cv2
import numpy as np
import pytest
import torch
from PIL import Image, ImageOps

from library.data.buckets import BucketAssigner, BucketSettings
from library.data.images import (
    IMAGE_EXTENSIONS,
    CorruptImageError,
    _quick_header_size,
    alpha_mask_from,
    color_augment,
    face_crop,
    flip_horizontal,
    list_image_files,
    load_image,
    parse_face_box_from_name,
    read_image_size,
    read_image_sizes,
    resize_and_crop,
    resize_image,
    to_model_tensor,
)
from library.errors import FlagError, UserInputError


def _noise(height: int, width: int, channels: int = 3, seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, 256, (height, width, channels), dtype=np.uint8)


def _exif(orientation: int) -> Image.Exif:
    exif = Image.Exif()
    exif[0x0112] = orientation
    return exif


def test_extensions_cover_kohya_list_in_both_cases():
    for extension in (".png", ".jpg", ".jpeg", ".webp", ".bmp"):
        assert extension in IMAGE_EXTENSIONS and extension.upper() in IMAGE_EXTENSIONS


def test_list_image_files_sorted_filtered_and_recursive(tmp_path):
    for name in ("b.png", "a.JPG", "c.txt", ".hidden.png", "sub/d.webp"):
        (tmp_path / name).parent.mkdir(exist_ok=True)
        (tmp_path / name).write_bytes(b"")
    assert [path.name for path in list_image_files(tmp_path)] == ["a.JPG", "b.png"]
    assert [path.name for path in list_image_files(tmp_path, recursive=True)] == ["a.JPG", "b.png", "d.webp"]
    with pytest.raises(UserInputError, match=r"missing: folder not found; expected a folder of images"):
        list_image_files(tmp_path / "missing")


FORMAT_CASES = [
    ("plain.png", {}, "RGB"),
    ("gray.png", {}, "L"),
    ("baseline.jpg", {"quality": 90}, "RGB"),
    ("progressive.jpg", {"progressive": True}, "RGB"),
    ("cmyk.jpg", {}, "CMYK"),
    ("lossy.webp", {"quality": 80}, "RGB"),
    ("lossless.webp", {"lossless": True}, "RGB"),
    ("alpha.webp", {}, "RGBA"),
    ("plain.bmp", {}, "RGB"),
]


@pytest.mark.parametrize("name,save_options,mode", FORMAT_CASES)
def test_header_size_matches_pillow(tmp_path, name, save_options, mode):
    path = tmp_path / name
    Image.new(mode, (37, 23)).save(path, **save_options)
    assert read_image_size(path) == (37, 23)
    with open(path, "rb") as file:
        assert _quick_header_size(file) == (37, 23)  # the fast path (no Pillow) covers the common formats


@pytest.mark.parametrize("name,orientation,expected", [
    ("rot6.jpg", 6, (20, 30)), ("rot8.jpg", 8, (20, 30)), ("rot3.jpg", 3, (30, 20)),
    ("rot5.png", 5, (20, 30)), ("rot6.webp", 6, (20, 30)),
])
def test_header_size_honours_exif_orientation(tmp_path, name, orientation, expected):
    path = tmp_path / name
    Image.new("RGB", (30, 20)).save(path, exif=_exif(orientation))
    assert read_image_size(path) == expected
    with Image.open(path) as image:
        assert ImageOps.exif_transpose(image).size == expected  # Pillow agrees


def test_misnamed_png_is_still_read(tmp_path):
    path = tmp_path / "really_a_png.jpg"
    Image.fromarray(_noise(9, 14)).save(path, format="PNG")
    assert read_image_size(path) == (14, 9)
    assert load_image(path).shape == (9, 14, 3)


def test_load_applies_exif_rotation(tmp_path):
    pixels = np.zeros((2, 3, 3), np.uint8)
    pixels[0, 0] = (255, 0, 0)  # top-left red
    path = tmp_path / "rot6.png"
    Image.fromarray(pixels).save(path, exif=_exif(6))  # 6: display rotated 90 degrees clockwise
    loaded = load_image(path)
    assert loaded.shape == (3, 2, 3)
    assert tuple(loaded[0, 1]) == (255, 0, 0)  # top-left moved to top-right


def test_mode_conversions(tmp_path):
    Image.new("L", (4, 3), 77).save(tmp_path / "l.png")
    assert load_image(tmp_path / "l.png").tolist() == np.full((3, 4, 3), 77).tolist()
    rgba = np.zeros((3, 4, 4), np.uint8)
    rgba[..., 0], rgba[..., 3] = 200, 51
    Image.fromarray(rgba).save(tmp_path / "rgba.png")
    assert load_image(tmp_path / "rgba.png").shape == (3, 4, 3)
    assert load_image(tmp_path / "rgba.png", with_alpha=True)[0, 0].tolist() == [200, 0, 0, 51]
    Image.new("LA", (4, 3), (90, 0)).save(tmp_path / "la.png")
    assert load_image(tmp_path / "la.png", with_alpha=True)[0, 0].tolist() == [90, 90, 90, 0]
    Image.new("RGB", (4, 3), (1, 2, 3)).save(tmp_path / "rgb.png")
    assert load_image(tmp_path / "rgb.png", with_alpha=True)[..., 3].min() == 255
    cmyk = load_image(_save(Image.new("CMYK", (4, 3), (0, 255, 255, 0)), tmp_path / "cmyk.jpg"))
    assert cmyk.shape == (3, 4, 3) and cmyk[1, 1, 0] > 200 and cmyk[1, 1, 1] < 60


def _save(image: Image.Image, path, **options):
    image.save(path, **options)
    return path


def test_palette_with_transparency(tmp_path):
    palette_image = Image.new("P", (4, 2), 0)
    palette_image.putpalette([10, 20, 30, 200, 100, 50] + [0] * 762)
    palette_image.putpixel((3, 1), 1)
    path = _save(palette_image, tmp_path / "p.png", transparency=0)
    rgba = load_image(path, with_alpha=True)
    assert rgba[0, 0].tolist() == [10, 20, 30, 0]
    assert rgba[1, 3].tolist() == [200, 100, 50, 255]
    assert load_image(path)[1, 3].tolist() == [200, 100, 50]


def test_16_bit_grayscale_is_scaled_not_clipped(tmp_path):
    wide = np.array([[0, 32768, 65535]], dtype=np.uint16)
    path = _save(Image.fromarray(wide), tmp_path / "gray16.png")
    loaded = load_image(path)
    assert loaded[0, :, 0].tolist() == [0, 128, 255]
    assert read_image_size(path) == (3, 1)


def test_corrupt_files_name_the_file(tmp_path):
    text = tmp_path / "notes.png"
    text.write_text("this is not an image")
    with pytest.raises(CorruptImageError, match=r"notes\.png: cannot identify image file") as caught:
        read_image_size(text)
    assert caught.value.path == text
    with pytest.raises(CorruptImageError, match=r"notes\.png: cannot identify image file"):
        load_image(text)
    good = _save(Image.fromarray(_noise(64, 64)), tmp_path / "half.png")
    good.write_bytes(good.read_bytes()[: good.stat().st_size // 2])
    assert read_image_size(good) == (64, 64)  # the header is intact
    with pytest.raises(CorruptImageError, match=r"half\.png: cannot read image \(OSError: .*truncated"):
        load_image(good)


def test_read_image_sizes_collects_errors(tmp_path):
    paths = [_save(Image.new("RGB", (5 + index, 7)), tmp_path / f"ok{index}.png") for index in range(3)]
    (tmp_path / "bad.jpg").write_bytes(b"\xff\xd8garbage")
    paths += [tmp_path / "bad.jpg", tmp_path / "gone.png"]
    sizes = read_image_sizes([str(path) for path in paths], workers=2)
    assert list(sizes) == paths
    assert [sizes[path] for path in paths[:3]] == [(5, 7), (6, 7), (7, 7)]
    assert isinstance(sizes[paths[3]], CorruptImageError)
    assert str(sizes[paths[4]]) == f"{paths[4]}: file not found"


def test_resize_uses_area_to_shrink_and_lanczos_to_enlarge():
    image = _noise(40, 60)
    assert np.array_equal(resize_image(image, (30, 20)), cv2.resize(image, (30, 20), interpolation=cv2.INTER_AREA))
    enlarged = np.asarray(Image.fromarray(image).resize((90, 50), Image.Resampling.LANCZOS))
    assert np.array_equal(resize_image(image, (90, 50)), enlarged)  # one side grows -> Lanczos
    boxed = np.asarray(Image.fromarray(image).resize((30, 20), Image.Resampling.BOX))
    assert np.array_equal(resize_image(image, (30, 20), "box"), boxed)
    cubic = cv2.resize(image, (30, 20), interpolation=cv2.INTER_CUBIC)
    assert np.array_equal(resize_image(image, (30, 20), "bicubic"), cubic)
    assert resize_image(_noise(40, 60, 4), (30, 20), "lanczos").shape == (20, 30, 4)


def test_unknown_interpolation_suggests_the_closest():
    with pytest.raises(FlagError) as caught:
        resize_image(_noise(4, 4), (2, 2), "lanczoz")
    assert str(caught.value) == ("resize_interpolation 'lanczoz': unknown interpolation; expected one of lanczos, "
                                 "nearest, bilinear, linear, bicubic, cubic, area, box; did you mean lanczos?")


def test_resize_and_crop_center_and_random():
    assignment = BucketAssigner(BucketSettings.from_values(512, True)).assign((1920, 1080))
    image = _noise(1080, 1920)
    cropped, offset = resize_and_crop(image, assignment, False, None)
    assert cropped.shape == (384, 640, 3)
    assert offset == (21, 0)  # resized to 683x384: (683 - 640) // 2
    resized = resize_image(image, (683, 384))
    assert np.array_equal(cropped, resized[:, 21:661])
    first = resize_and_crop(image, assignment, True, np.random.default_rng(5))
    again = resize_and_crop(image, assignment, True, np.random.default_rng(5))
    assert first[1] == again[1] and np.array_equal(first[0], again[0])
    left, top = first[1]
    assert 0 <= left <= 43 and top == 0
    assert np.array_equal(first[0], resized[:, left:left + 640])


def test_flip_alpha_and_model_tensor():
    image = np.arange(2 * 3 * 4, dtype=np.uint8).reshape(2, 3, 4)
    assert flip_horizontal(image)[0, 0].tolist() == image[0, 2].tolist()
    image[..., 3] = [[0, 51, 255], [255, 255, 102]]
    assert alpha_mask_from(image) == pytest.approx(np.array([[0.0, 0.2, 1.0], [1.0, 1.0, 0.4]]))
    assert alpha_mask_from(image).dtype == np.float32
    assert alpha_mask_from(image[..., :3]).tolist() == [[1.0] * 3] * 2
    pixels = np.array([[[0, 255, 128]]], dtype=np.uint8)
    tensor = to_model_tensor(pixels)
    assert tensor.shape == (3, 1, 1) and tensor.dtype == torch.float32
    assert tensor.flatten().tolist() == pytest.approx([-1.0, 1.0, 128 / 127.5 - 1.0], abs=1e-6)


@pytest.mark.parametrize("name,expected", [
    ("photo_120_80_40_50.png", (120, 80, 40, 50)),
    ("my_cat_7_8_9_10.jpg", (7, 8, 9, 10)),
    ("photo.png", None),
    ("photo_a_80_40_50.png", None),
    ("photo_0_80_40_50.png", None),  # kohya uses the box only when cx > 0
])
def test_face_box_from_name(name, expected):
    assert parse_face_box_from_name(f"/data/{name}") == expected


def test_face_crop_centres_the_face_at_the_drawn_scale():
    image = _noise(800, 1000)
    # range (3.2, 3.2): scale = 256 / (100 * 3.2) = 0.8 -> 800x640; face centre (400, 320); crop at (272, 192)
    cropped = face_crop(image, (500, 400, 100, 100), (3.2, 3.2), (256, 256), np.random.default_rng(0))
    expected = resize_image(image, (800, 640))[192:448, 272:528]
    assert np.array_equal(cropped, expected)
    near_corner = face_crop(image, (30, 20, 100, 100), (3.2, 3.2), (256, 256), np.random.default_rng(0))
    assert np.array_equal(near_corner, resize_image(image, (800, 640))[:256, :256])  # clamped to the edge


def test_color_augment_is_seeded_rare_and_small():
    colourful = _noise(8, 8)
    outputs = [color_augment(colourful, np.random.default_rng(seed)) for seed in range(300)]
    assert np.array_equal(outputs[7], color_augment(colourful, np.random.default_rng(7)))
    changed = sum(not np.array_equal(out, colourful) for out in outputs)
    assert 50 <= changed <= 110  # p = 0.33 (99 of 300), less the draws too small to move a uint8 value
    gray = np.tile(np.arange(0, 256, 4, dtype=np.uint8)[None, :, None], (4, 1, 3))
    for seed in range(300):
        out = color_augment(gray, np.random.default_rng(seed))  # hue cannot move gray: only gamma shows
        assert out.dtype == np.uint8 and np.abs(out.astype(int) - gray).max() <= 6
        assert np.all(np.diff(out[0, :, 0].astype(int)) >= 0)  # gamma keeps the order
    rgba = np.dstack([_noise(8, 8), np.full((8, 8), 9, np.uint8)])
    for seed in range(20):
        assert color_augment(rgba, np.random.default_rng(seed))[..., 3].max() == 9


def test_color_augment_does_not_touch_the_global_rng():
    state = random.getstate()
    color_augment(_noise(4, 4), np.random.default_rng(1))
    assert random.getstate() == state
