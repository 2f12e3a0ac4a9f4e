"""Every flag of kohya's train_network.py / sdxl_train_network.py --help (golden lists in kohya_flags/) is a flag
of ours, parsed into its own destination; flags of kohya's FLUX/SD3/Lumina trainers are refused with one line
that says where they belong."""
from __future__ import annotations

import argparse
import subprocess
import sys
from pathlib import Path

import pytest

import sdxl_train_control_net_lllite
import sdxl_train_network
import sdxl_train_textual_inversion
import train_network
import train_textual_inversion
from library.config_file import parse_args_with_config
from library.errors import FlagError
from library.options.other_families import OTHER_FAMILY_FLAGS
from library.options.value_types import non_negative_int, positive_int
from tests.conftest import ROOT

GOLDEN = Path(__file__).parent / "kohya_flags"


def golden_flags(*names: str, stop_at: str | None = None) -> list[str]:
    """The flags of the golden files; `stop_at`: a section comment where reading a file stops (a script that
    shares only the groups above it)."""
    flags: list[str] = []
    for name in names:
        for line in (GOLDEN / name).read_text(encoding="utf-8").splitlines():
            if stop_at and line.startswith("#") and stop_at in line:
                break
            flag = line.split("#", 1)[0].strip()
            if flag:
                flags.append(flag)
    return flags


def _textual_inversion_flags(sdxl: bool = False) -> list[str]:
    shared = golden_flags("train_network.txt", stop_at="train_network.py: setup_parser")
    return shared + golden_flags("textual_inversion.txt") + (["--disable_mmap_load_safetensors"] if sdxl else [])


SCRIPTS = {
    "train_network.py": (train_network.setup_parser, golden_flags("train_network.txt")),
    "sdxl_train_network.py": (sdxl_train_network.setup_parser, golden_flags("train_network.txt",
                                                                            "sdxl_train_network.txt")),
    "train_textual_inversion.py": (train_textual_inversion.setup_parser, _textual_inversion_flags()),
    "sdxl_train_textual_inversion.py": (sdxl_train_textual_inversion.setup_parser, _textual_inversion_flags(True)),
    "sdxl_train_control_net_lllite.py": (sdxl_train_control_net_lllite.setup_parser, list(dict.fromkeys(
        golden_flags("train_network.txt", stop_at="train_network.py: setup_parser")
        + golden_flags("sdxl_train_network.txt", "control_net_lllite.txt")))),
}


def _sample_value(action: argparse.Action) -> list[str]:
    """Command-line words that this flag accepts (a valid choice, a number of the right kind, or text)."""
    if action.nargs == 0:
        return []
    if action.choices:
        word = str(next(choice for choice in action.choices if choice is not None))
    elif action.type in (int, positive_int, non_negative_int) or getattr(action.type, "__name__", "") == \
            "steps_or_ratio":
        word = "1"
    elif action.type is float:
        word = "0.5"
    else:
        word = "x"
    count = action.nargs if isinstance(action.nargs, int) else 1
    return [word] * count


@pytest.mark.parametrize("script", list(SCRIPTS))
def test_every_kohya_flag_is_accepted_into_its_own_destination(script):
    make_parser, flags = SCRIPTS[script]
    parser = make_parser()
    assert len(flags) == len(set(flags)), "a flag is listed twice in the golden list"
    known = parser._option_string_actions
    assert {flag for flag in flags if flag not in known} == set()
    argv, expected = [], {}
    for flag in flags:
        action = known.get(flag)
        if action is None or isinstance(action, argparse._HelpAction):
            continue
        words = _sample_value(action)
        argv += [flag, *words]
        expected[flag] = action
    args = parser.parse_args(argv)
    for flag, action in expected.items():
        value = getattr(args, action.dest)
        assert value is not None and value is not False or action.const is False, f"{flag} did not reach {action.dest}"


@pytest.mark.parametrize("script", list(SCRIPTS))
def test_other_family_flags_are_refused_with_one_line(script):
    make_parser, flags = SCRIPTS[script]
    parser = make_parser()
    for name, family in OTHER_FAMILY_FLAGS.items():
        assert f"--{name}" not in parser._option_string_actions and f"--{name}" not in flags, name
        with pytest.raises(FlagError) as caught:
            parse_args_with_config(parser, ["--output_dir", "out", f"--{name}", "1"])
        assert str(caught.value).startswith(f"--{name} belongs to {family} training")


def test_flux_flag_on_the_script_command_line_is_exit_code_2():
    result = subprocess.run([sys.executable, "sdxl_train_network.py", "--t5xxl", "t5xxl_fp16.safetensors"],
                            cwd=ROOT, capture_output=True, text=True, timeout=60)
    assert result.returncode == 2
    assert result.stderr.strip().splitlines() == [
        "error: --t5xxl belongs to FLUX/SD3 training (kohya's FLUX/SD3 scripts); this script trains SD1.x/2.x and "
        "SDXL models, where it has no meaning"]
