"""--config_file TOML (tables flattened, command line wins, checked types, unknown keys ignored with one warning
or refused with --strict_config, kohya_ss value forms) and the --output_config round trip, on a small parser with
every kind of flag."""
from __future__ import annotations

import argparse
import logging
from pathlib import Path

import pytest
import toml

from library.config_file import add_config_file_arguments, config_path, parse_args_with_config
from library.errors import ConfigError, FlagError
from library.options.optimizer import steps_or_ratio


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser()
    parser.add_argument("--max_train_steps", type=int, default=1600)
    parser.add_argument("--learning_rate", type=float, default=2e-6)
    parser.add_argument("--output_name", type=str, default=None)
    parser.add_argument("--output_dir", default="out")
    parser.add_argument("--cache_latents", action="store_true")
    parser.add_argument("--no_metadata", action="store_true")
    parser.add_argument("--optimizer_args", type=str, default=None, nargs="*")
    parser.add_argument("--mixed_precision", type=str, default="no", choices=["no", "fp16", "bf16"])
    parser.add_argument("--lr_warmup_steps", type=steps_or_ratio, default=0)
    parser.add_argument("--resolution", type=str, default="512")
    parser.add_argument("--noise_offset", type=float, default=None)
    parser.add_argument("--text_encoder_lr", type=float, default=None, nargs="*")
    parser.add_argument("--resume", type=str, default=None)
    parser.add_argument("--vae", type=str, default=None)
    parser.add_argument("--save_last_n_epochs_state", type=int, default=None)
    parser.add_argument("--persistent_data_loader_workers", action="store_true")
    parser.add_argument("--caption_extension", type=str, default=".caption")
    parser.add_argument("--caption_extention", type=str, dest="caption_extension", default=argparse.SUPPRESS)
    add_config_file_arguments(parser)
    return parser


def _write(path: Path, text: str) -> Path:
    path.write_text(text, encoding="utf-8")
    return path


def _error_for(tmp_path: Path, text: str) -> str:
    config = _write(tmp_path / "cfg.toml", text)
    with pytest.raises(ConfigError) as caught:
        parse_args_with_config(_parser(), ["--config_file", str(config)])
    return str(caught.value)


def test_tables_are_flattened_into_flags(tmp_path):
    config = _write(tmp_path / "cfg.toml", """
output_name = "my_lora"
[training]
max_train_steps = 500
cache_latents = true
mixed_precision = "bf16"
[optimizer]
learning_rate = 1
optimizer_args = ["weight_decay=0.01", "betas=0.9,0.999"]
lr_warmup_steps = 0.1
""")
    args = parse_args_with_config(_parser(), ["--config_file", str(config)])
    assert (args.output_name, args.max_train_steps, args.cache_latents, args.mixed_precision) == (
        "my_lora", 500, True, "bf16")
    assert args.learning_rate == 1.0 and isinstance(args.learning_rate, float)
    assert args.optimizer_args == ["weight_decay=0.01", "betas=0.9,0.999"]
    assert args.lr_warmup_steps == 0.1
    assert (args.output_dir, args.no_metadata, args.resolution) == ("out", False, "512"), "defaults stay"


def test_command_line_wins_over_the_file(tmp_path):
    config = _write(tmp_path / "cfg.toml", 'max_train_steps = 500\noutput_name = "from_file"\n'
                                           'optimizer_args = ["a=1"]\n')
    args = parse_args_with_config(_parser(), ["--config_file", str(config), "--max_train_steps", "7",
                                              "--optimizer_args", "b=2"])
    assert (args.max_train_steps, args.output_name, args.optimizer_args) == (7, "from_file", ["b=2"])


def test_toml_is_appended_to_the_name_as_kohya(tmp_path):
    _write(tmp_path / "cfg.toml", "max_train_steps = 3\n")
    assert parse_args_with_config(_parser(), ["--config_file", str(tmp_path / "cfg")]).max_train_steps == 3
    assert config_path("a/cfg.v2") == Path("a/cfg.v2.toml")
    with pytest.raises(FlagError) as caught:
        parse_args_with_config(_parser(), ["--config_file", str(tmp_path / "cfg.json")])
    assert str(caught.value) == f"--config_file {tmp_path / 'cfg.json.toml'}: file not found"


def test_no_config_file_is_a_plain_parse():
    args = parse_args_with_config(_parser(), ["--max_train_steps", "9"])
    assert (args.max_train_steps, args.config_file, args.output_config) == (9, None, False)


@pytest.mark.parametrize(("text", "message"), [
    ("max_train_steps = \"100\"\n", "max_train_steps: expected an integer, got '100'"),
    ("max_train_steps = 1.5\n", "max_train_steps: expected an integer, got 1.5"),
    ("[t]\nlearning_rate = \"1e-4\"\n", "t.learning_rate: expected a number, got '1e-4'"),
    ("cache_latents = \"yes\"\n", "cache_latents: expected true or false (or 1 / 0), got 'yes'"),
    ("cache_latents = 2\n", "cache_latents: expected true or false (or 1 / 0), got 2"),
    ("resume = true\n", "resume: expected a string, got True"),
    ("resolution = 1024\n", "resolution: expected a string, got 1024; quote it: \"1024\""),
    ("[a]\noptimizer_args = {b = 1}\n", "a.optimizer_args: expected a list, got {'b': 1}"),
    ("optimizer_args = [1, 2]\n", "optimizer_args[0]: expected a string, got 1"),
    ("mixed_precision = \"bf61\"\n", "mixed_precision: expected one of no, fp16, bf16, got 'bf61'; did you mean bf16?"),
    ("lr_warmup_steps = 2.5\n", ("lr_warmup_steps: expected a value for steps_or_ratio, got 2.5; expected a whole "
                                "step count or a ratio below 1, got '2.5'; did you mean 2?")),
    ("max_train_steps = = 3\n", "line 1: expected valid TOML"),
])
def test_bad_values_name_the_file_and_key(tmp_path, text, message):
    assert _error_for(tmp_path, text).startswith(f"{tmp_path / 'cfg.toml'}: {message}")


def test_output_config_round_trip(tmp_path):
    config = tmp_path / "saved.toml"
    flags = ["--max_train_steps", "300", "--learning_rate", "0.0001", "--output_name", "run1", "--cache_latents",
             "--optimizer_args", "weight_decay=0.01", "betas=0.9,0.99", "--lr_warmup_steps", "0.05",
             "--mixed_precision", "fp16", "--resolution", "768,768"]
    with pytest.raises(SystemExit) as exited:
        parse_args_with_config(_parser(), [*flags, "--config_file", str(config), "--output_config"])
    assert exited.value.code == 0
    assert toml.load(config) == {
        "max_train_steps": 300, "learning_rate": 0.0001, "output_name": "run1", "cache_latents": True,
        "optimizer_args": ["weight_decay=0.01", "betas=0.9,0.99"], "lr_warmup_steps": 0.05,
        "mixed_precision": "fp16", "resolution": "768,768"}, "only values that differ from the defaults"
    from_file = vars(parse_args_with_config(_parser(), ["--config_file", str(config)]))
    from_command_line = vars(_parser().parse_args(flags))
    assert {**from_file, "config_file": None} == from_command_line


def test_output_config_refuses_to_overwrite(tmp_path):
    config = _write(tmp_path / "saved.toml", "max_train_steps = 1\n")
    with pytest.raises(FlagError) as caught:
        parse_args_with_config(_parser(), ["--max_train_steps", "5", "--config_file", str(config), "--output_config"])
    assert str(caught.value) == (f"--output_config: {config} already exists; delete it or choose another "
                                 f"--config_file")
    assert config.read_text() == "max_train_steps = 1\n"
    assert [path.name for path in tmp_path.iterdir()] == ["saved.toml"], "no temp file left behind"


def test_output_config_needs_a_config_file():
    with pytest.raises(FlagError, match=r"^--output_config: needs --config_file <path> to write to, got none$"):
        parse_args_with_config(_parser(), ["--output_config"])


GUI_STYLE_KEYS = """
epoch = 10
noise_offset_type = "Original"
t5xxl = ""
config_file = "other.toml"
[optimizer]
learning_rat = 1e-4
learning_rate = 0.5
"""


def test_unknown_keys_are_ignored_and_listed_in_one_warning(tmp_path, caplog):
    config = _write(tmp_path / "args.toml", GUI_STYLE_KEYS)
    with caplog.at_level(logging.WARNING, logger="library.config_file"):
        args = parse_args_with_config(_parser(), ["--config_file", str(config)])
    assert args.learning_rate == 0.5 and not hasattr(args, "epoch") and not hasattr(args, "t5xxl")
    warnings = [record.getMessage() for record in caplog.records if record.levelno == logging.WARNING]
    assert warnings == [
        f"ignored keys in {config}: epoch, noise_offset_type (did you mean noise_offset?), t5xxl (a FLUX/SD3 "
        "option), config_file (only read from the command line), optimizer.learning_rat (did you mean "
        "learning_rate?) (kohya ignores unknown keys too; --strict_config makes them errors)"]


@pytest.mark.parametrize("strict_from", ["command line", "file"])
def test_strict_config_makes_unknown_keys_errors(tmp_path, strict_from):
    extra = "strict_config = true\n" if strict_from == "file" else ""
    config = _write(tmp_path / "cfg.toml", extra + "[optimizer]\nlearning_rat = 1e-4\n")
    argv = ["--config_file", str(config)] + (["--strict_config"] if strict_from == "command line" else [])
    with pytest.raises(ConfigError) as caught:
        parse_args_with_config(_parser(), argv)
    assert str(caught.value) == (f"{config}: optimizer.learning_rat: expected an argument of this script (a flag "
                                 "name without --); did you mean learning_rate?")


def test_strict_config_names_the_family_of_a_flux_key(tmp_path):
    config = _write(tmp_path / "cfg.toml", 'apply_t5_attn_mask = true\n')
    with pytest.raises(ConfigError, match=r"apply_t5_attn_mask: expected an argument of this script .*; "
                                          r"--apply_t5_attn_mask belongs to FLUX/SD3 training"):
        parse_args_with_config(_parser(), ["--config_file", str(config), "--strict_config"])


def test_kohya_ss_value_forms_mean_what_kohya_reads(tmp_path):
    config = _write(tmp_path / "cfg.toml", """
text_encoder_lr = 5e-05
resume = false
vae = ""
save_last_n_epochs_state = false
max_train_steps = false
persistent_data_loader_workers = 1
cache_latents = 0
optimizer_args = "weight_decay=0.1"
caption_extention = ".txt"
mixed_precision = ""
""")
    args = parse_args_with_config(_parser(), ["--config_file", str(config)])
    assert args.text_encoder_lr == [5e-05], "a single value for a multi-value flag is a one-item list"
    assert (args.resume, args.vae, args.save_last_n_epochs_state) == (None, None, None), "false / '' mean not set"
    assert (args.max_train_steps, args.mixed_precision) == (1600, "no"), "not set: the parser default"
    assert args.persistent_data_loader_workers is True and args.cache_latents is False
    assert args.optimizer_args == ["weight_decay=0.1"]
    assert args.caption_extension == ".txt", "kohya's old spelling reaches its flag"


def test_empty_list_is_a_value_for_star_flags(tmp_path):
    config = _write(tmp_path / "cfg.toml", "optimizer_args = []\ntext_encoder_lr = [1e-4, 2e-4]\n")
    args = parse_args_with_config(_parser(), ["--config_file", str(config)])
    assert (args.optimizer_args, args.text_encoder_lr) == ([], [1e-4, 2e-4])


@pytest.mark.parametrize("argv", [["--t5xxl", "t5.safetensors"], ["--blocks_to_swap=4"], ["--weighting_scheme"]])
def test_flux_sd3_flags_on_the_command_line_are_one_line(argv):
    name = argv[0][2:].split("=")[0]
    with pytest.raises(FlagError) as caught:
        parse_args_with_config(_parser(), argv)
    assert str(caught.value) == (f"--{name} belongs to FLUX/SD3 training (kohya's FLUX/SD3 scripts); this script "
                                 "trains SD1.x/2.x and SDXL models, where it has no meaning")


def test_output_config_leaves_out_the_hub_token(tmp_path):
    parser = _parser()
    parser.add_argument("--huggingface_token", type=str, default=None)
    config = tmp_path / "saved.toml"
    with pytest.raises(SystemExit):
        parse_args_with_config(parser, ["--huggingface_token", "hf_secret", "--max_train_steps", "2",
                                        "--config_file", str(config), "--output_config"])
    assert toml.load(config) == {"max_train_steps": 2}
