"""Generator prompt lines (gen_img.py options), --from_file files, wildcards and kohya's seed rules."""
from __future__ import annotations

import logging
import random

import pytest

from library.errors import ConfigError, FlagError
from library.generation import prompt_options
from library.generation.prompt_options import (
    PromptOptions,
    SeedSource,
    expand_wildcards,
    parse_generation_line,
    read_prompt_file,
    seed_plan,
)

LOGGER = "library.generation.prompt_options"


@pytest.fixture(autouse=True)
def fresh_warnings(monkeypatch):
    monkeypatch.setattr(prompt_options, "_warned_ignored_options", set())


def _draws(seed: int, count: int) -> list[int]:
    stream = random.Random(seed)
    return [stream.randint(0, 0x7FFFFFFF) for _ in range(count)]


# -------------------------------------------------------------------------------------------------- prompt lines

def test_every_option_is_parsed():
    line = ("a cat, (red hat:1.2) --n blurry, lowres --w 832 --h 1216 --s 2000 --d 1,2, 3 --l 5.5 --nl 2 --t 0.6 "
            "--am 1,-0.5 --ow 2048 --oh 1024 --nw 512 --nh 256 --ct 16 --cl 8 --tw 1024 --th 768 --ss K_Euler_A "
            "--gr 0.7 --f cat_%d")
    assert parse_generation_line(line, "p.txt:1") == PromptOptions(
        prompt="a cat, (red hat:1.2)", negative_prompt="blurry, lowres", width=832, height=1216, steps=1000,
        seeds=[1, 2, 3], scale=5.5, negative_scale=2.0, strength=0.6, network_multipliers=[1.0, -0.5],
        original_width=2048, original_height=1024, original_width_negative=512, original_height_negative=256,
        crop_top=16, crop_left=8, target_width=1024, target_height=768, sampler="k_euler_a", guidance_rescale=0.7,
        file_name="cat_%d", source="p.txt:1")


def test_a_line_without_options_leaves_everything_to_the_command_line():
    assert parse_generation_line("  a dog  ", "--prompt") == PromptOptions(prompt="a dog", source="--prompt")


@pytest.mark.parametrize("line, expected", [
    ("x --W 512 --H 64 --S 0 --D 7 --AM 0.5 --SS Euler --NL None", {
        "width": 512, "height": 64, "steps": 1, "seeds": [7], "network_multipliers": [0.5], "sampler": "euler",
        "negative_scale": None, "negative_scale_off": True}),
    ("x --Ow 640 --CT 0 --T 1", {"original_width": 640, "crop_top": 0, "strength": 1.0}),
])
def test_option_names_are_case_insensitive(line, expected):
    options = parse_generation_line(line, "p.txt:1")
    assert {key: getattr(options, key) for key in expected} == expected


@pytest.mark.parametrize("line, message", [
    ("a --w 500", "p.txt:3: --w: expected a multiple of 8 >= 64, got 500; did you mean 496 or 504?"),
    ("a --h 60", "p.txt:3: --h: expected a multiple of 8 >= 64, got 60; did you mean 64?"),
    ("a --h 56", "p.txt:3: --h: expected a multiple of 8 >= 64, got 56; did you mean 64?"),
    ("a --w big", "p.txt:3: --w: expected a multiple of 8 >= 64, got 'big'"),
    ("a --s many", "p.txt:3: --s: expected a whole number of steps, got 'many'"),
    ("a --d 1,x", "p.txt:3: --d: expected whole-number seeds >= 0, separated by commas, got '1,x'"),
    ("a --d -1", "p.txt:3: --d: expected whole-number seeds >= 0, separated by commas, got '-1'"),
    ("a --l", "p.txt:3: --l: expected a number (CFG scale), got ''"),
    ("a --nl lots", "p.txt:3: --nl: expected a number (negative scale) or none, got 'lots'"),
    ("a --t 1.5", "p.txt:3: --t: expected a number from 0 to 1 (img2img strength), got '1.5'"),
    ("a --am 1;2", "p.txt:3: --am: expected numbers separated by commas, one per network, got '1;2'"),
    ("a --ow 0", "p.txt:3: --ow: expected a whole number of pixels > 0, got '0'"),
    ("a --cl -8", "p.txt:3: --cl: expected a whole number of pixels >= 0, got '-8'"),
    ("a --gr -1", "p.txt:3: --gr: expected a number >= 0 (guidance rescale), got '-1'"),
    ("a --ss eulr_a", ("p.txt:3: --ss: expected one of ddim, pndm, lms, euler, euler_a, heun, dpm_2, dpm_2_a, "
                       "dpmsolver, dpmsolver++, dpmsingle, k_lms, k_euler, k_euler_a, k_dpm_2, k_dpm_2_a, "
                       "got 'eulr_a'; did you mean euler_a?")),
])
def test_a_bad_value_names_the_line_the_option_and_the_expectation(line, message):
    with pytest.raises(ConfigError) as error:
        parse_generation_line(line, "p.txt:3")
    assert str(error.value) == message


def test_clip_guidance_prompt_is_refused_naming_the_line():
    with pytest.raises(ConfigError) as error:
        parse_generation_line("a cat --c a photo of a cat --d 1", "prompts.txt:2")
    assert str(error.value) == ("prompts.txt:2: --c: expected a supported prompt option; CLIP guidance is not "
                                "supported (kohya's --c prompt guides with a separate CLIP model, which this tool "
                                "does not load); remove --c")


def test_negative_scale_none_turns_it_off_and_a_number_sets_it():
    assert parse_generation_line("a --nl none", "p").negative_scale_off
    options = parse_generation_line("a --nl 1.5", "p")
    assert (options.negative_scale, options.negative_scale_off) == (1.5, False)


def test_an_unknown_option_is_an_error_with_the_nearest_option():
    with pytest.raises(ConfigError) as error:
        parse_generation_line("a cat --wh 512", "prompts.txt:4")
    assert str(error.value) == "prompts.txt:4: --wh: expected a known prompt option; did you mean --w?"


def test_an_unknown_option_without_a_near_one_lists_the_known_options():
    with pytest.raises(ConfigError) as error:
        parse_generation_line("a cat --zzzzz 1", "p.txt:1")
    assert str(error.value).startswith("p.txt:1: --zzzzz: expected a known prompt option; known options: --n, --w, ")


def test_deep_shrink_and_gradual_latent_options_warn_once_per_name(caplog):
    with caplog.at_level(logging.WARNING, logger=LOGGER):
        first = parse_generation_line("a cat --dsd1 3 --DST1 0.5 --s 20", "p.txt:1")
        parse_generation_line("a dog --dsd1 4 --glt 0.8", "p.txt:2")
    assert (first.prompt, first.steps) == ("a cat", 20)
    messages = [record.getMessage() for record in caplog.records]
    assert messages == [
        "p.txt:1: --dsd1 (kohya's Deep Shrink / Gradual Latent) is not implemented; ignored",
        "p.txt:1: --dst1 (kohya's Deep Shrink / Gradual Latent) is not implemented; ignored",
        "p.txt:2: --glt (kohya's Deep Shrink / Gradual Latent) is not implemented; ignored",
    ]


# --------------------------------------------------------------------------------------------------- prompt files

def test_prompt_file_skips_comments_and_blank_lines_and_tolerates_a_bom(tmp_path):
    path = tmp_path / "prompts.txt"
    path.write_bytes("\ufeff# my prompts\n\na cat --d 5\n   \n  # indented comment\r\nun chat été --w 640\n"
                     .encode("utf-8"))
    cat, chat = read_prompt_file(path)
    assert cat == PromptOptions(prompt="a cat", seeds=[5], source=f"{path}:3")
    assert chat == PromptOptions(prompt="un chat été", width=640, source=f"{path}:6")


def test_a_bad_line_in_a_prompt_file_names_the_file_and_line(tmp_path):
    path = tmp_path / "prompts.txt"
    path.write_text("ok\n\nbad --w 500\n", encoding="utf-8")
    with pytest.raises(ConfigError, match=r"prompts\.txt:3: --w: expected a multiple of 8 >= 64, got 500"):
        read_prompt_file(path)


def test_a_missing_prompt_file_is_a_flag_error(tmp_path):
    path = tmp_path / "nope.txt"
    with pytest.raises(FlagError) as error:
        read_prompt_file(path)
    assert str(error.value) == f"--from_file {path}: file not found"


@pytest.mark.parametrize("content", ["", "# only a comment\n\n   \n"])
def test_a_prompt_file_without_prompts_is_a_flag_error(tmp_path, content):
    path = tmp_path / "empty.txt"
    path.write_text(content, encoding="utf-8")
    with pytest.raises(FlagError) as error:
        read_prompt_file(path)
    assert str(error.value) == (f"--from_file {path}: no prompts found "
                                "(blank lines and lines starting with # are skipped)")


def test_a_prompt_file_that_is_not_utf8_is_a_flag_error(tmp_path):
    path = tmp_path / "latin1.txt"
    path.write_bytes("caf\xe9\n".encode("latin-1"))
    with pytest.raises(FlagError, match=r"latin1\.txt: expected UTF-8 text"):
        read_prompt_file(path)


# ------------------------------------------------------------------------------------------------------ wildcards

def test_a_prompt_without_wildcards_is_unchanged():
    rng = random.Random(0)
    assert expand_wildcards("a cat, (red:1.2)", rng) == ["a cat, (red:1.2)"]
    assert expand_wildcards(r"a \{literal\} brace", rng) == [r"a \{literal\} brace"]


def test_a_choice_picks_one_variant_at_random():
    expected = random.Random(3).choice(["red", "green", "blue"])
    assert expand_wildcards("a {red|green|blue} cat", random.Random(3)) == [f"a {expected} cat"]
    rng = random.Random(0)
    seen = {expand_wildcards("{red|green|blue}", rng)[0] for _ in range(100)}
    assert seen == {"red", "green", "blue"}


def test_enumerations_multiply_first_one_outermost():
    assert expand_wildcards("{e$$a|b} and {E$$x|y|z}", random.Random(0)) == [
        "a and x", "a and y", "a and z", "b and x", "b and y", "b and z"]


def test_enumeration_with_a_count_lists_every_combination():
    assert expand_wildcards("{e$$2$$a|b|c}", random.Random(0)) == ["a, b", "a, c", "b, c"]


def test_a_random_choice_is_drawn_for_each_enumerated_prompt():
    rng = random.Random(1)
    prompts = expand_wildcards("{e$$a|b|c|d} {p|q|r|s|t|u}", rng)
    assert [prompt[0] for prompt in prompts] == ["a", "b", "c", "d"]
    replay = random.Random(1)
    assert [prompt[2] for prompt in prompts] == [replay.choice("pqrstu") for _ in range(4)]


def test_a_count_picks_that_many_distinct_variants_joined_by_comma():
    for seed in range(20):
        chosen = expand_wildcards("{2$$a|b|c}", random.Random(seed))[0].split(", ")
        assert len(chosen) == 2 and len(set(chosen)) == 2 and set(chosen) <= {"a", "b", "c"}


def test_a_count_range_picks_a_random_number_of_variants():
    counts = {len(expand_wildcards("{1-3$$a|b|c}", random.Random(seed))[0].split(", ")) for seed in range(60)}
    assert counts == {1, 2, 3}
    # a range past the number of variants is capped, like kohya
    assert sorted(expand_wildcards("{5$$a|b}", random.Random(0))[0].split(", ")) == ["a", "b"]


def test_a_custom_separator_alone_and_with_a_count():
    one = expand_wildcards("{$$ and $$a|b|c}", random.Random(0))[0]
    assert one in {"a", "b", "c"}
    two = expand_wildcards("{2$$ and $$a|b|c}", random.Random(0))[0].split(" and ")
    assert len(set(two)) == 2 and set(two) <= {"a", "b", "c"}


def test_unbalanced_braces_stay_literal_with_a_warning(caplog):
    with caplog.at_level(logging.WARNING, logger=LOGGER):
        assert expand_wildcards("a {red|blue cat", random.Random(0)) == ["a {red|blue cat"]
        assert expand_wildcards("a {e$$x|y} cat}", random.Random(0)) == ["a x cat}", "a y cat}"]
    assert "prompt 'a {red|blue cat' has unbalanced braces; they are kept as literal text" in caplog.text
    assert len(caplog.records) == 2


# ---------------------------------------------------------------------------------------------------------- seeds

def test_a_single_image_gets_the_seed_itself():
    assert seed_plan(1234, False, 1, [None], 1) == [1234]


def test_several_images_take_the_predefined_draws_in_order():
    assert seed_plan(1234, False, 2, [None, None], 2) == _draws(1234, 8)


def test_prompt_seeds_come_first_and_the_rest_fall_through_to_the_predefined_draws():
    # 2 prompts × 3 images: the first prompt's two --d seeds are used, its third image and the second prompt's
    # images take the next predefined draws (not the ones "skipped" by the --d images)
    draws = _draws(7, 6)
    assert seed_plan(7, False, 1, [[11, 22], None], 3) == [11, 22, draws[0], draws[1], draws[2], draws[3]]


def test_iter_same_seed_draws_one_seed_per_iteration_after_the_predefined_ones():
    source = SeedSource(5, True, 2)
    draws = _draws(5, 4)  # 2 predefined, then one per iteration
    source.start_iteration()
    assert [source.next_seed(None, 0), source.next_seed(None, 1), source.next_seed(None, 2)] == \
        [draws[0], draws[1], draws[2]]
    source.start_iteration()
    assert [source.next_seed(None, 0), source.next_seed([9], 0), source.next_seed(None, 1)] == [draws[3], 9, draws[3]]


def test_without_predefined_seeds_fresh_draws_continue_the_seeded_stream():
    source = SeedSource(42, False, None)  # interactive mode: no images are planned
    assert [source.next_seed(None, index) for index in range(3)] == _draws(42, 3)


def test_without_a_seed_every_image_gets_a_different_random_seed():
    seeds = seed_plan(None, False, 1, [None], 50)
    assert len(set(seeds)) == 50 and all(0 <= seed <= 0x7FFFFFFF for seed in seeds)
