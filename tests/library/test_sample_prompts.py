"""Sample-prompt files: kohya's .txt options, .toml defaults + subsets, .json lists, and the error messages."""
from __future__ import annotations

import json
import logging

import pytest

from library.errors import ConfigError, FlagError
from library.sampling.prompts import SamplePrompt, load_sample_prompts, parse_prompt_line


def test_txt_file_skips_blank_and_comment_lines_and_parses_every_option(tmp_path):
    path = tmp_path / "prompts.txt"
    path.write_text("# my prompts\n\n"
                    "a cat, (red hat:1.2) --n blurry, lowres --W 513 --h 700 --D 42 --s 2000 --L 5.5 "
                    "--ss K_Euler_A --cn cond.png\n"
                    "   \n"
                    "a dog\n", encoding="utf-8")
    first, second = load_sample_prompts(path)
    assert first == SamplePrompt(prompt="a cat, (red hat:1.2)", negative_prompt="blurry, lowres", width=512,
                                 height=696, seed=42, steps=1000, scale=5.5, sampler="k_euler_a",
                                 controlnet_image="cond.png", index=0, source=f"{path}:3")
    assert second == SamplePrompt(prompt="a dog", index=1, source=f"{path}:5")


@pytest.mark.parametrize("options, expected", [
    ("--w 10 --h 71", {"width": 64, "height": 64}),   # floored to a multiple of 8, at least 64
    ("--w 1023 --h 1024", {"width": 1016, "height": 1024}),
    ("--s 0", {"steps": 1}),                           # clamped to 1..1000
    ("--l 1", {"scale": 1.0}),
    ("--n  spaced out  --d 0", {"negative_prompt": "spaced out", "seed": 0}),
])
def test_option_values_are_floored_and_clamped_like_kohya(options, expected):
    prompt = parse_prompt_line(f"a house {options}", "p.txt:1")
    assert {key: getattr(prompt, key) for key in expected} == expected


def test_unknown_and_dit_only_options_are_ignored_with_a_warning(caplog):
    with caplog.at_level(logging.WARNING, logger="library.sampling.prompts"):
        prompt = parse_prompt_line("a tree --wh 512 --g 3.5 --s 4", "p.txt:7")
    assert (prompt.prompt, prompt.steps, prompt.width) == ("a tree", 4, None)
    assert "p.txt:7: unknown prompt option --wh ignored (did you mean --w?)" in caplog.text
    assert "p.txt:7: option --g is used by kohya's DiT scripts only; ignored" in caplog.text


@pytest.mark.parametrize("line, message", [
    ("a cat --w big", "p.txt:2: --w: expected a whole number of pixels, got 'big'"),
    ("a cat --s 2.5", "p.txt:2: --s: expected a whole number of steps, got '2.5'"),
    ("a cat --l high", "p.txt:2: --l: expected a number (CFG scale), got 'high'"),
    ("a cat --d -3", "p.txt:2: --d: expected a whole-number seed >= 0, got '-3'"),
])
def test_a_bad_number_names_file_line_option_and_expectation(line, message):
    with pytest.raises(ConfigError) as error:
        parse_prompt_line(line, "p.txt:2")
    assert str(error.value) == message


def test_an_unknown_sampler_suggests_the_nearest_name(tmp_path):
    path = tmp_path / "prompts.txt"
    path.write_text("ok\na cat --ss eulr_a\n", encoding="utf-8")
    with pytest.raises(ConfigError) as error:
        load_sample_prompts(path)
    assert str(error.value).startswith(f"{path}:2: --ss: expected one of ddim, pndm,")
    assert str(error.value).endswith(", got 'eulr_a'; did you mean euler_a?")


def test_toml_subset_overrides_the_prompt_table_defaults(tmp_path):
    path = tmp_path / "prompts.toml"
    path.write_text('[prompt]\nnegative_prompt = "lowres"\nwidth = 640\nheight = 512\nsample_steps = 20\n'
                    'scale = 6\n\n'
                    '[[prompt.subset]]\nprompt = "a castle --w 256"\n\n'
                    '[[prompt.subset]]\nprompt = "a lake"\nwidth = 771\nseed = 7\nsample_sampler = "Euler"\n',
                    encoding="utf-8")
    castle, lake = load_sample_prompts(path)
    # .toml prompt strings are taken as written: kohya parses " --" options in .txt lines and JSON strings only
    assert castle == SamplePrompt(prompt="a castle --w 256", negative_prompt="lowres", width=640, height=512,
                                  steps=20, scale=6.0, index=0, source=f"{path}:prompt.subset[0]")
    assert (lake.width, lake.height, lake.seed, lake.sampler, lake.steps, lake.index) == (768, 512, 7, "euler", 20, 1)


@pytest.mark.parametrize("body, message", [
    ('[prompt]\nwidth = "512"\n[[prompt.subset]]\nprompt = "a"\n',
     "prompt.width: expected a whole number of pixels, got '512'"),
    ('[prompt]\nwidth = 512\n[[prompt.subset]]\nprompt = "a"\n[[prompt.subset]]\nseed = 1\n',
     "prompt.subset[1].prompt: expected a prompt string; every sample prompt table needs a prompt key"),
    ('[prompt]\n[[prompt.subset]]\nprompt = "a"\nscale = true\n',
     "prompt.subset[0].scale: expected a number (CFG scale), got True"),
    ('prompt = "a"\n', "prompt: expected a [prompt] table with [[prompt.subset]] entries, got 'a'"),
    ('[prompt]\nwidth = 512\n', ("prompt.subset: expected at least one [[prompt.subset]] table; "
                                'add one per image: [[prompt.subset]] with prompt = "..."')),
    ('[prompt]\nsubset = 3\n', "prompt.subset: expected a list of [[prompt.subset]] tables, got 3"),
])
def test_toml_errors_name_the_key_path(tmp_path, body, message):
    path = tmp_path / "prompts.toml"
    path.write_text(body, encoding="utf-8")
    with pytest.raises(ConfigError) as error:
        load_sample_prompts(path)
    assert str(error.value) == f"{path}: {message}"


def test_toml_unknown_key_warns_with_the_nearest_kohya_key(tmp_path, caplog):
    path = tmp_path / "prompts.toml"
    path.write_text('[prompt]\nsteps = 5\n[[prompt.subset]]\nprompt = "a"\n', encoding="utf-8")
    with caplog.at_level(logging.WARNING, logger="library.sampling.prompts"):
        (prompt,) = load_sample_prompts(path)
    assert prompt.steps == 30
    assert f"{path}: prompt.steps: unknown sample prompt key ignored (did you mean sample_steps?)" in caplog.text


def test_json_list_of_strings_and_objects(tmp_path):
    path = tmp_path / "prompts.json"
    path.write_text(json.dumps(["a cat --n dog --d 5", {"prompt": "a bird", "height": 100, "sample_steps": 3}]),
                    encoding="utf-8")
    cat, bird = load_sample_prompts(path)
    assert (cat.prompt, cat.negative_prompt, cat.seed, cat.index, cat.source) == ("a cat", "dog", 5, 0, f"{path}:[0]")
    assert (bird.prompt, bird.height, bird.width, bird.steps, bird.index) == ("a bird", 96, None, 3, 1)


@pytest.mark.parametrize("document, message", [
    (["a", 3], "[1]: expected a prompt string or object, got 3"),
    ({"prompt": "a"}, "(top level): expected a list of prompt strings or objects, got 'dict'"),
    ([{"prompt": "a", "seed": -1}], "[0].seed: expected a whole-number seed >= 0, got -1"),
])
def test_json_errors_name_the_item(tmp_path, document, message):
    path = tmp_path / "prompts.json"
    path.write_text(json.dumps(document), encoding="utf-8")
    with pytest.raises(ConfigError) as error:
        load_sample_prompts(path)
    assert str(error.value) == f"{path}: {message}"


def test_missing_file_and_other_extension_name_the_flag(tmp_path):
    with pytest.raises(FlagError) as missing:
        load_sample_prompts(tmp_path / "nope.txt")
    assert str(missing.value) == f"--sample_prompts {tmp_path / 'nope.txt'}: file not found"
    other = tmp_path / "prompts.yaml"
    other.write_text("a cat\n", encoding="utf-8")
    with pytest.raises(FlagError) as wrong:
        load_sample_prompts(other)
    assert str(wrong.value) == f"--sample_prompts {other}: expected a .txt, .toml or .json file, got '.yaml'"


def test_broken_toml_names_the_line(tmp_path):
    path = tmp_path / "prompts.toml"
    path.write_text('[prompt]\nwidth = = 3\n', encoding="utf-8")
    with pytest.raises(ConfigError) as error:
        load_sample_prompts(path)
    assert str(error.value).startswith(f"{path}: line 2: expected valid TOML")


PROMPT_DOCUMENTS = {
    ".txt": "a cat --w 512\n",
    ".toml": '[prompt]\nwidth = 512\n[[prompt.subset]]\nprompt = "a cat"\n',
    ".json": '[{"prompt": "a cat", "width": 512}]',
}


@pytest.mark.parametrize("suffix", list(PROMPT_DOCUMENTS))
@pytest.mark.parametrize("encoding, found", [
    ("utf-16", "UTF-16 text"),  # with a byte-order mark, as Windows Notepad's "Unicode" saves
    ("utf-16-le", "NUL bytes (UTF-16 text?)"),  # without one: ASCII decodes, with a NUL after every letter
    ("cp1252", "byte 0xe9 at offset 2, which is not UTF-8"),
])
def test_a_file_that_is_not_utf8_names_the_flag_and_the_file(tmp_path, suffix, encoding, found):
    path = tmp_path / f"prompts{suffix}"
    # an accented letter at offset 2 for the Windows-1252 case
    text = {".txt": "a \u00e9 cat\n", ".toml": "# \u00e9\n", ".json": '["\u00e9"]'}[suffix] \
        if encoding == "cp1252" else PROMPT_DOCUMENTS[suffix]
    path.write_bytes(text.encode(encoding))
    with pytest.raises(FlagError) as error:
        load_sample_prompts(path)
    assert str(error.value) == f"--sample_prompts {path}: expected UTF-8 text, got {found}; save the file as UTF-8"


@pytest.mark.parametrize("suffix", list(PROMPT_DOCUMENTS))
def test_a_utf8_byte_order_mark_is_dropped(tmp_path, suffix):
    path = tmp_path / f"prompts{suffix}"
    path.write_bytes(PROMPT_DOCUMENTS[suffix].encode("utf-8-sig"))
    (prompt,) = load_sample_prompts(path)
    assert (prompt.prompt, prompt.width) == ("a cat", 512)
