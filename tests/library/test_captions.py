"""Caption side files and per-sample caption processing against hand-computed results (COMPAT §9.4, §9.5)."""
from __future__ import annotations

import random

import pytest

from library.data.captions import CaptionFileError, CaptionOptions, process_caption, read_caption_file

TEN_TAGS = ", ".join(f"t{i}" for i in range(10))


def run(caption: str, *, epoch: int = 1, step: int = 0, max_steps: int | None = None, seed: int = 0, **options) -> str:
    return process_caption(caption, CaptionOptions(**options), epoch=epoch, step=step, max_steps=max_steps,
                           rng=random.Random(seed))


def outcomes(caption: str, seeds: int = 40, **options) -> set[str]:
    return {run(caption, seed=seed, **options) for seed in range(seeds)}


# --- step 1: prefix / suffix -------------------------------------------------------------------------------------

def test_no_options_leaves_the_caption_untouched():
    assert run("a,b ,  c") == "a,b ,  c"


def test_prefix_and_suffix_are_glued_with_one_space():
    assert run("a, b", caption_prefix="masterpiece,", caption_suffix=", 8k") == "masterpiece, a, b , 8k"


def test_prefix_takes_part_in_keep_tokens_and_shuffle():
    # step 1 comes before step 4, so "sks" and the first tag form one kept tag, and a prefix tag is shuffled
    for seed in range(10):
        result = run("dog, red, blue", seed=seed, caption_prefix="sks", keep_tokens=1, shuffle_caption=True)
        assert result.startswith("sks dog, ") and sorted(result.split(", ")[1:]) == ["blue", "red"]
    firsts = {result.split(", ")[0] for result in outcomes("a, b", caption_prefix="sks,", shuffle_caption=True)}
    assert firsts == {"sks", "a", "b"}


# --- step 2: dropout ---------------------------------------------------------------------------------------------

def test_dropout_rate_one_empties_and_zero_keeps():
    assert run("a, b", caption_dropout_rate=1.0, caption_prefix="p", enable_wildcard=True) == ""
    assert run("a, b", caption_dropout_rate=0.0) == "a, b"


@pytest.mark.parametrize("every_n,expected", [(2, ["a", "", "a", ""]), (3, ["a", "a", "", "a"]), (1, [""] * 4)])
def test_dropout_every_n_epochs_uses_one_based_epochs(every_n, expected):
    assert [run("a", epoch=epoch, caption_dropout_every_n_epochs=every_n) for epoch in (1, 2, 3, 4)] == expected


# --- step 3: wildcards and lines ---------------------------------------------------------------------------------

def test_wildcard_choice_and_literal_braces():
    assert outcomes("a {red|blue} dog", enable_wildcard=True) == {"a red dog", "a blue dog"}
    assert run("{{a|b}} {single}", enable_wildcard=True) == "{a|b} single"
    assert run("a {red|blue} dog") == "a {red|blue} dog"  # without enable_wildcard braces are plain text


def test_multi_line_caption_picks_a_random_line_only_with_wildcards():
    assert outcomes("cat\ndog\nbird", enable_wildcard=True) == {"cat", "dog", "bird"}
    assert run("cat\ndog\nbird") == "cat"


# --- step 4: fixed / flexible split, warmup, shuffle, tag dropout ------------------------------------------------

def test_keep_tokens_with_shuffle_keeps_the_first_n_in_place():
    results = outcomes("a, b, c, d, e", keep_tokens=2, shuffle_caption=True)
    assert all(result.startswith("a, b, ") for result in results)
    assert all(sorted(result.split(", ")[2:]) == ["c", "d", "e"] for result in results)
    assert len(results) == 6  # every order of the 3 flexible tags shows up


def test_keep_tokens_separator_fixes_a_prefix_and_a_suffix():
    results = outcomes("x, y ||| a, b, c ||| z, w", keep_tokens_separator="|||", shuffle_caption=True)
    assert all(result.startswith("x, y, ") and result.endswith(", z, w") for result in results)
    assert {result[len("x, y, "):-len(", z, w")] for result in results} >= {"a, b, c", "c, b, a"}


def test_keep_tokens_separator_is_removed_even_without_shuffle():
    # kohya leaves "|||" in the text here (COMPAT §18.3); we join the parts as the shuffle branch would
    assert run("x, y ||| a, b", keep_tokens_separator="|||") == "x, y, a, b"


def test_tag_stripping_follows_kohya():
    # plain split: tags are stripped but empty ones stay (keep_tokens counts positions like kohya)
    assert run("a,,b ", keep_tokens=3, shuffle_caption=True) == "a, , b"
    # separator split: empty tags are dropped
    assert run("a,, ||| b,", keep_tokens_separator="|||", shuffle_caption=True) == "a, b"


def test_tag_dropout_one_keeps_only_fixed_tags():
    assert run("a, b, c", keep_tokens=1, caption_tag_dropout_rate=1.0) == "a"
    assert run("x ||| a, b ||| z", keep_tokens_separator="|||", caption_tag_dropout_rate=1.0) == "x, z"


@pytest.mark.parametrize("step,count", [(0, 1), (5, 5), (9, 9), (10, 10), (25, 10)])
def test_token_warmup_grows_linearly(step, count):
    # count = floor(step * (10 - 1) / 10) + 1 until step 10, then all ten
    assert run(TEN_TAGS, step=step, token_warmup_step=10) == ", ".join(f"t{i}" for i in range(count))


def test_token_warmup_counts_only_flexible_tags_and_respects_min():
    assert run("k, " + TEN_TAGS, step=0, keep_tokens=1, token_warmup_step=10) == "k, t0"
    assert run(TEN_TAGS, step=0, token_warmup_min=3, token_warmup_step=10) == "t0, t1, t2"


def test_fractional_token_warmup_is_a_share_of_max_steps():
    # 0.5 of 20 steps = step 10, so step 5 gives floor(5 * 9 / 10) + 1 = 5 tags
    assert run(TEN_TAGS, step=5, max_steps=20, token_warmup_step=0.5) == "t0, t1, t2, t3, t4"
    assert run(TEN_TAGS, step=5, max_steps=None, token_warmup_step=0.5) == TEN_TAGS  # unknown length: no warmup


# --- step 5 and the whole order ----------------------------------------------------------------------------------

def test_secondary_separator_groups_words_and_becomes_caption_separator():
    assert run("a;;;b, c", secondary_separator=";;;") == "a,b, c"
    assert outcomes("a;;;b, c", secondary_separator=";;;", shuffle_caption=True) == {"a,b, c", "c, a,b"}


def test_wildcard_runs_before_the_split_and_secondary_separator_last():
    results = outcomes("{x|y}, b ||| dropped ||| c;d", enable_wildcard=True, keep_tokens_separator="|||",
                       secondary_separator=";", caption_tag_dropout_rate=1.0, caption_prefix="p")
    assert results == {"p x, b, c,d", "p y, b, c,d"}


def test_same_seed_gives_the_same_caption():
    options = {"shuffle_caption": True, "caption_tag_dropout_rate": 0.3, "enable_wildcard": True}
    caption = "{a|b}, c, d, e, f, g\nh, i, j"
    assert run(caption, seed=7, **options) == run(caption, seed=7, **options)
    assert len(outcomes(caption, **options)) > 5


@pytest.mark.parametrize("option", [
    {"shuffle_caption": True}, {"caption_dropout_rate": 0.1}, {"caption_dropout_every_n_epochs": 2},
    {"caption_tag_dropout_rate": 0.1}, {"token_warmup_step": 100}, {"enable_wildcard": True}])
def test_random_options_are_not_deterministic(option):
    assert CaptionOptions().is_deterministic
    assert CaptionOptions(keep_tokens=2, caption_prefix="p", secondary_separator=";").is_deterministic
    assert not CaptionOptions(**option).is_deterministic


# --- read_caption_file -------------------------------------------------------------------------------------------

def test_caption_file_first_line_only(tmp_path):
    (tmp_path / "img.txt").write_text("first line  \nsecond\n", encoding="utf-8")
    assert read_caption_file(tmp_path / "img.png", ".txt", enable_wildcard=False) == "first line"
    assert read_caption_file(tmp_path / "img.png", "txt", enable_wildcard=False) == "first line"
    assert read_caption_file(tmp_path / "other.png", ".txt", enable_wildcard=False) is None


def test_caption_file_wildcard_keeps_non_empty_lines(tmp_path):
    (tmp_path / "img.caption").write_text("\ufeffa\n\n  b \n", encoding="utf-8")  # with a byte-order mark
    assert read_caption_file(tmp_path / "img.png", ".caption", enable_wildcard=True) == "a\nb"


def test_face_crop_names_fall_back_to_the_short_stem(tmp_path):
    (tmp_path / "person.txt").write_text("short stem", encoding="utf-8")
    assert read_caption_file(tmp_path / "person_10_20_30_40.png", ".txt", False) == "short stem"
    (tmp_path / "person_10_20_30_40.txt").write_text("exact", encoding="utf-8")
    assert read_caption_file(tmp_path / "person_10_20_30_40.png", ".txt", False) == "exact"
    (tmp_path / "a.txt").write_text("x", encoding="utf-8")
    assert read_caption_file(tmp_path / "a_b_c_d.png", ".txt", False) is None  # 4 parts: not a face-crop name


def test_empty_caption_file_is_an_error(tmp_path):
    (tmp_path / "img.txt").write_bytes(b"")
    with pytest.raises(CaptionFileError) as error:
        read_caption_file(tmp_path / "img.png", ".txt", False)
    assert str(error.value) == (f"{tmp_path / 'img.txt'}: caption file is empty; write a caption or delete the file "
                                "(then class_tokens are used)")


def test_non_utf8_caption_file_is_an_error(tmp_path):
    (tmp_path / "img.txt").write_bytes(b"caf\xe9 au lait")
    with pytest.raises(CaptionFileError) as error:
        read_caption_file(tmp_path / "img.png", ".txt", False)
    assert str(error.value) == (f"{tmp_path / 'img.txt'}: expected UTF-8 text, got byte 0xe9 at offset 3; "
                                "re-save the caption file as UTF-8")
