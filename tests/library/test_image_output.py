"""Generated-image output: PNG text written and read back, A1111 `parameters`, file names, never overwriting."""
from __future__ import annotations

import contextlib
import logging
from datetime import datetime

import pytest
from PIL import Image
from PIL.PngImagePlugin import PngInfo

from library.errors import ConfigError, UserInputError
from library.generation import image_output
from library.generation.image_output import (
    ImageRecord,
    a1111_parameters,
    file_timestamp,
    image_file_name,
    next_sequence_number,
    original_file_name,
    png_text_chunks,
    prompt_file_name,
    read_png_record,
    record_to_prompt_line,
    save_png,
    sequential_file_name,
)
from library.sampling.prompts import parse_prompt_line

BASIC = {"seed": 123, "steps": 30, "scale": 7.5, "sampler": "euler_a", "width": 512, "height": 768}


def _full_record() -> ImageRecord:
    """Every field used; text with unicode, commas, parentheses, a newline and " --" (fine inside a PNG)."""
    return ImageRecord(
        prompt="日本語の猫, (masterpiece:1.2), [sketch]\nsecond line --not an option",
        negative_prompt="blurry, lowres — ünïcode", raw_prompt="{日本語の猫|犬}, (masterpiece:1.2)", **BASIC,
        negative_scale=5.0, strength=0.6, guidance_rescale=0.7, clip_skip=2, max_embeddings_multiples=3,
        network_multipliers=[0.8, 1.0], original_width=1024, original_height=1536, original_width_negative=512,
        original_height_negative=768, crop_top=0, crop_left=16, target_width=1024, target_height=1536,
        crop_top_negative=8, crop_left_negative=0, target_width_negative=512, target_height_negative=768,
        highres_fix_scale=0.5, highres_fix_steps=20, highres_fix_strength=0.45, image_path="init.png",
        mask_path="mask.png", model="sd_xl_base_1.0.safetensors", vae="sdxl_vae.safetensors",
        networks=[("style:v2,final.safetensors", 0.8), ("detail.safetensors", -1.5e-05)], network_merge=True,
        embeddings=["EasyNegative", "bad-hands-5"], v_parameterization=True)


def _png_with_text(path, texts: dict[str, str], size=(8, 8)):
    info = PngInfo()
    for key, text in texts.items():
        info.add_text(key, text)
    Image.new("RGB", size).save(path, pnginfo=info)
    return path


def test_full_record_round_trips_through_a_png(tmp_path):
    record = _full_record()
    path = save_png(Image.new("RGB", (512, 768), "red"), tmp_path, "full.png", record)
    assert path == tmp_path / "full.png"
    assert read_png_record(path) == record


def test_minimal_record_round_trips_and_writes_only_the_keys_it_uses(tmp_path):
    record = ImageRecord(prompt="a dog", negative_prompt="", **BASIC)
    path = save_png(Image.new("RGB", (64, 64)), tmp_path, "dog.png", record)
    assert read_png_record(path) == record
    assert set(Image.open(path).text) == {"prompt", "negative-prompt", "seed", "steps", "scale", "sampler",
                                          "width", "height", "parameters"}


def test_text_chunks_are_visible_to_pil_with_kohya_keys_and_values(tmp_path):
    path = save_png(Image.new("RGB", (16, 16)), tmp_path, "x.png", _full_record())
    text = Image.open(path).text
    assert text["prompt"] == "日本語の猫, (masterpiece:1.2), [sketch]\nsecond line --not an option"
    assert {key: text[key] for key in ("seed", "steps", "scale", "sampler", "negative-scale", "original-width",
                                       "original-height-negative", "crop-top", "crop-left", "crop-top-negative",
                                       "crop-left-negative", "target-width-negative", "target-height-negative")} == {
        "seed": "123", "steps": "30", "scale": "7.5", "sampler": "euler_a", "negative-scale": "5.0",
        "original-width": "1024", "original-height-negative": "768", "crop-top": "0", "crop-left": "16",
        "crop-top-negative": "8", "crop-left-negative": "0", "target-width-negative": "512",
        "target-height-negative": "768"}
    assert text["networks"] == "style:v2,final.safetensors:0.8,detail.safetensors:-1.5e-05"
    assert text["network-multipliers"] == "0.8,1.0"
    assert text["embeddings"] == "EasyNegative,bad-hands-5"
    assert text["network-merge"] == "true" and text["v-parameterization"] == "true"


def test_a1111_parameters_golden():
    record = ImageRecord(prompt="a cat, (red hat:1.2)", negative_prompt="blurry", **BASIC,
                         model="models/sd15.safetensors")
    assert a1111_parameters(record) == ("a cat, (red hat:1.2)\nNegative prompt: blurry\n"
                                        "Steps: 30, Sampler: euler_a, CFG scale: 7.5, Seed: 123, Size: 512x768, "
                                        "Model: sd15")
    assert png_text_chunks(record)["parameters"] == a1111_parameters(record)


def test_a1111_parameters_quote_separators_and_skip_an_empty_negative():
    record = ImageRecord(prompt="a dog", negative_prompt="", seed=7, steps=20, scale=5, sampler="ddim", width=640,
                         height=640, model="my, model.ckpt", vae="vae.safetensors", strength=0.6, clip_skip=2)
    assert a1111_parameters(record) == ('a dog\nSteps: 20, Sampler: ddim, CFG scale: 5.0, Seed: 7, Size: 640x640, '
                                        'Model: "my, model", VAE: vae.safetensors, Denoising strength: 0.6, '
                                        'Clip skip: 2')


def test_kohya_made_png_reads_with_size_from_the_image(tmp_path):
    path = _png_with_text(tmp_path / "im_20240102030405_000_42.png", {
        "prompt": "a castle", "negative-prompt": "fog", "seed": "42", "sampler": "k_euler", "steps": "28",
        "scale": "6.0", "original-height": "1024", "original-width": "768", "original-height-negative": "512",
        "original-width-negative": "512", "crop-top": "0", "crop-left": "0"}, size=(64, 96))
    assert read_png_record(path) == ImageRecord(
        prompt="a castle", negative_prompt="fog", seed=42, steps=28, scale=6.0, sampler="k_euler", width=64,
        height=96, original_width=768, original_height=1024, original_width_negative=512,
        original_height_negative=512, crop_top=0, crop_left=0)


def test_a1111_only_png_reads_from_parameters(tmp_path):
    parameters = ("masterpiece, 1girl\nNegative prompt: worst quality\nSteps: 20, Sampler: Euler a, "
                  "Schedule type: Automatic, CFG scale: 7, Seed: 3456, Size: 512x640, Model hash: abc, "
                  'Model: anything-v5, Denoising strength: 0.4, Clip skip: 2, Version: "f2.0.1, x"')
    path = _png_with_text(tmp_path / "a1111.png", {"parameters": parameters})
    assert read_png_record(path) == ImageRecord(
        prompt="masterpiece, 1girl", negative_prompt="worst quality", seed=3456, steps=20, scale=7.0,
        sampler="euler_a", width=512, height=640, model="anything-v5", strength=0.4, clip_skip=2)


def test_our_keys_win_over_parameters(tmp_path):
    record = ImageRecord(prompt="a cat", negative_prompt="", **BASIC)
    texts = png_text_chunks(record) | {"parameters": "a dog\nSteps: 5, Sampler: DDIM, CFG scale: 1, Seed: 9, "
                                                     "Size: 64x64"}
    assert read_png_record(_png_with_text(tmp_path / "both.png", texts)) == record


def test_never_overwrites_and_numbers_the_new_file(tmp_path, caplog):
    first_record = ImageRecord(prompt="first", negative_prompt="", **BASIC)
    second_record = ImageRecord(prompt="second", negative_prompt="", **BASIC)
    first = save_png(Image.new("RGB", (8, 8), "red"), tmp_path, "same.png", first_record)
    first_bytes = first.read_bytes()
    with caplog.at_level(logging.INFO, logger="library.generation.image_output"):
        second = save_png(Image.new("RGB", (8, 8), "blue"), tmp_path, "same.png", second_record)
    third = save_png(Image.new("RGB", (8, 8), "green"), tmp_path, "same.png", second_record)
    assert (first.name, second.name, third.name) == ("same.png", "same_1.png", "same_2.png")
    assert first.read_bytes() == first_bytes
    assert read_png_record(first).prompt == "first" and read_png_record(second).prompt == "second"
    assert "same.png already exists; saving as same_1.png" in caplog.text
    assert sorted(path.name for path in tmp_path.iterdir()) == ["same.png", "same_1.png", "same_2.png"]


def test_a_file_that_is_not_ours_is_left_alone(tmp_path):
    (tmp_path / "mine.png").write_bytes(b"precious")
    path = save_png(Image.new("RGB", (8, 8)), tmp_path, "mine", ImageRecord(prompt="x", negative_prompt="", **BASIC))
    assert path.name == "mine_1.png" and (tmp_path / "mine.png").read_bytes() == b"precious"


def test_a_failed_write_leaves_no_file_behind(tmp_path, monkeypatch):
    @contextlib.contextmanager
    def failing_output(path, overwrite=True):
        raise OSError("No space left on device")
        yield path

    monkeypatch.setattr(image_output, "atomic_output", failing_output)
    with pytest.raises(OSError, match="No space left"):
        save_png(Image.new("RGB", (8, 8)), tmp_path, "x.png", ImageRecord(prompt="x", negative_prompt="", **BASIC))
    assert list(tmp_path.iterdir()) == []


def test_save_creates_the_folder_and_rejects_a_file_as_folder(tmp_path):
    record = ImageRecord(prompt="x", negative_prompt="", **BASIC)
    assert save_png(Image.new("RGB", (8, 8)), tmp_path / "a" / "b", "x.png", record).is_file()
    (tmp_path / "outputs").write_text("not a folder")
    with pytest.raises(UserInputError) as error:
        save_png(Image.new("RGB", (8, 8)), tmp_path / "outputs", "x.png", record)
    assert str(error.value) == f"{tmp_path / 'outputs'}: expected a folder for the images, but it is a file"
    with pytest.raises(ValueError, match="plain file name"):
        save_png(Image.new("RGB", (8, 8)), tmp_path, "../x.png", record)


def test_file_names_follow_the_documented_scheme():
    timestamp = file_timestamp(datetime(2024, 1, 2, 3, 4, 5))
    assert timestamp == "20240102030405"
    assert image_file_name(timestamp=timestamp, index=7, seed=42) == "im_20240102030405_007_42.png"
    assert image_file_name(timestamp=timestamp, index=7, seed=42, highres=True) == "im_20240102030405_hr_007_42.png"
    assert sequential_file_name(12) == "im_000012.png"
    assert sequential_file_name(12, highres=True) == "im_hr_000012.png"
    assert original_file_name("/data/in/cat photo.jpg", timestamp=timestamp, index=0, seed=5,
                              highres=True) == "cat photo_20240102030405_hr_000_5.png"


def test_sequential_numbers_continue_after_the_largest_existing_one(tmp_path):
    assert next_sequence_number(tmp_path / "missing") == 1
    for name in ("im_000003.png", "im_000009.png", "IM_000002.PNG", "im_hr_000004.png", "im_000008_1.png",
                 "im_20240102030405_000_42.png", "other_000099.png", "im_000077.jpg"):
        (tmp_path / name).write_bytes(b"")
    number = next_sequence_number(tmp_path)
    assert number == 10
    record = ImageRecord(prompt="x", negative_prompt="", **BASIC)
    save_png(Image.new("RGB", (8, 8)), tmp_path, sequential_file_name(number), record)
    assert next_sequence_number(tmp_path) == 11


@pytest.mark.parametrize("name, expected", [
    ("portrait", "portrait.png"),
    ("Cat.PNG", "Cat.PNG"),
    ("a/b\\c", "a_b_c.png"),
    ("../../etc/passwd", "_.._etc_passwd.png"),
    ("  .hidden  ", "hidden.png"),
    ('what?: "yes"', "what__ _yes_.png"),
    ("猫の絵", "猫の絵.png"),
])
def test_prompt_file_names_are_made_safe(name, expected):
    assert prompt_file_name(name) == expected


@pytest.mark.parametrize("name", ["", "..", " .png", "  "])
def test_unusable_prompt_file_names_are_refused(name):
    with pytest.raises(UserInputError) as error:
        prompt_file_name(name)
    assert str(error.value) == (f"--f {name!r}: expected a file name for the image, got nothing usable; "
                                "write e.g. --f portrait_01")


def test_bad_files_name_the_file_and_what_is_wrong(tmp_path):
    missing = tmp_path / "none.png"
    with pytest.raises(UserInputError, match="none.png: no such file$"):
        read_png_record(missing)
    (tmp_path / "notes.png").write_text("hello")
    with pytest.raises(UserInputError, match=r"notes\.png: not a readable PNG image \("):
        read_png_record(tmp_path / "notes.png")
    Image.new("RGB", (8, 8)).save(tmp_path / "photo.png", format="JPEG")
    with pytest.raises(UserInputError) as error:
        read_png_record(tmp_path / "photo.png")
    assert str(error.value) == f"{tmp_path / 'photo.png'}: expected a PNG image, got a JPEG image"
    plain = _png_with_text(tmp_path / "plain.png", {"Software": "paint"})
    with pytest.raises(UserInputError) as error:
        read_png_record(plain)
    assert str(error.value) == (f"{plain} has no 'prompt'/'seed'/'steps'/'scale'/'sampler' PNG text; "
                                "was it made by gen_img.py?")


@pytest.mark.parametrize("key, text, message", [
    ("seed", "abc", "seed: expected a whole number, got 'abc'"),
    ("sampler", "eulr_a", ("sampler: expected one of ddim, pndm, lms, euler, euler_a, heun, dpm_2, dpm_2_a, "
                           "dpmsolver, dpmsolver++, dpmsingle, k_lms, k_euler, k_euler_a, k_dpm_2, k_dpm_2_a, "
                           "got 'eulr_a'; did you mean euler_a?")),
    ("network-merge", "maybe", "network-merge: expected true or false, got 'maybe'"),
    ("networks", "lora.safetensors", ("networks: expected name:multiplier pairs separated by commas, "
                                      "got 'lora.safetensors'")),
])
def test_bad_setting_text_names_file_key_and_value(tmp_path, key, text, message):
    texts = png_text_chunks(ImageRecord(prompt="x", negative_prompt="", **BASIC)) | {key: text}
    path = _png_with_text(tmp_path / "bad.png", texts)
    with pytest.raises(ConfigError) as error:
        read_png_record(path)
    assert str(error.value) == f"{path}: {message}"


def _sdxl_record(prompt: str) -> ImageRecord:
    return ImageRecord(prompt=prompt, negative_prompt="blurry", **BASIC, strength=0.6, network_multipliers=[0.8, 1],
                       original_width=1024, original_height=1536, original_width_negative=512,
                       original_height_negative=768, crop_top=0, crop_left=8, model="x.safetensors", clip_skip=2)


def test_prompt_line_golden_and_it_parses_back():
    line = record_to_prompt_line(_sdxl_record("a cat,\n  (red hat:1.2)"))
    assert line == ("a cat, (red hat:1.2) --n blurry --w 512 --h 768 --d 123 --s 30 --l 7.5 --ss euler_a --t 0.6 "
                    "--am 0.8,1.0 --ow 1024 --oh 1536 --nw 512 --nh 768 --ct 0 --cl 8")
    parsed = parse_prompt_line(line, "regen.txt:1")
    assert (parsed.prompt, parsed.negative_prompt, parsed.width, parsed.height, parsed.seed, parsed.steps,
            parsed.scale, parsed.sampler) == ("a cat, (red hat:1.2)", "blurry", 512, 768, 123, 30, 7.5, "euler_a")


def test_prompt_line_without_negative_has_no_n_option():
    record = ImageRecord(prompt="a dog", negative_prompt="", seed=1, steps=20, scale=7, sampler="ddim", width=512,
                         height=512)
    assert record_to_prompt_line(record) == "a dog --w 512 --h 512 --d 1 --s 20 --l 7.0 --ss ddim"


@pytest.mark.parametrize("prompt, message", [
    ("a cat --n not negative", ("the prompt 'a cat --n not negative' contains ' --', which kohya's prompt "
                                "lines read as the start of an option; regenerate this image with --from_png "
                                "instead")),
    ("#hashtag cat", ("the prompt '#hashtag cat' starts with '#', which marks a comment line in prompt files; "
                      "regenerate this image with --from_png instead")),
])
def test_prompts_a_prompt_line_cannot_hold_are_refused(prompt, message):
    with pytest.raises(UserInputError) as error:
        record_to_prompt_line(_sdxl_record(prompt))
    assert str(error.value) == message
