"""Every tool that writes a model or LoRA refuses an existing output (exit 2, one line naming the flag and path,
the file untouched) before reading any model, and replaces it with --overwrite."""
from __future__ import annotations

import json
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import pytest

from library.models.state_dict_io import TensorFile, read_state_dict
from networks import (dylora, extract_lora_from_dylora, extract_lora_from_models, merge_lora, resize_lora,
                      sdxl_merge_lora, svd_merge_lora)
from tests.cli_helpers import run_error
from tests.networks.test_dylora import randomize_units
from tests.networks.test_extract_lora_from_models import tuned_checkpoint
from tests.networks.test_lora import text_encoder_arg
from tests.networks.test_resize_lora import save_tiny_lora
from tools import convert_diffusers20_original_sd, merge_models

UNRELATED = b"an unrelated file the user wants to keep"


@dataclass
class Tool:
    """A tool, and how to build its inputs in a folder: returns (argv without --overwrite, output, flag)."""

    main: Callable
    inputs: Callable[[object, Path], tuple[list[str], Path, str]]
    checked_before_reading: bool = True


def merge_models_inputs(tiny_models, folder):
    output = folder / "merged.safetensors"
    model = str(tiny_models.path("sd1"))
    return ["--models", model, model, "--save_to", str(output)], output, "--output"


def resize_inputs(tiny_models, folder):
    lora = save_tiny_lora(tiny_models, folder / "in.safetensors")
    output = folder / "small.safetensors"
    return ["--model", str(lora), "--save_to", str(output), "--new_rank", "2"], output, "--save_to"


def merge_into_lora_inputs(tiny_models, folder, family="sd1"):
    lora = save_tiny_lora(tiny_models, folder / "in.safetensors", family=family)
    output = folder / "merged.safetensors"
    return ["--models", str(lora), "--save_to", str(output)], output, "--save_to"


def merge_into_checkpoint_inputs(tiny_models, folder):
    argv, output, flag = merge_into_lora_inputs(tiny_models, folder)
    return ["--sd_model", str(tiny_models.path("sd1")), *argv], output, flag


def svd_merge_inputs(tiny_models, folder):
    argv, output, flag = merge_into_lora_inputs(tiny_models, folder)
    return [*argv, "--new_rank", "2"], output, flag


def dylora_inputs(tiny_models, folder):
    """A rank-4 DyLoRA with unit 2: the one file written is out-0002.safetensors."""
    bundle = tiny_models.bundle("sd1")
    network = dylora.create_network(1.0, 4, 4.0, None, text_encoder_arg(bundle), bundle.unet, unit="2")
    randomize_units(network)
    source = folder / "dy.safetensors"
    network.save_weights(source, None, {"ss_network_module": "networks.dylora",
                                        "ss_network_args": json.dumps({"unit": "2"})})
    return ["--model", str(source), "--save_to", str(folder / "out.safetensors")], folder / "out-0002.safetensors", \
        "--save_to"


def extract_inputs(tiny_models, folder):
    tuned = folder / "tuned.safetensors"
    tuned_checkpoint(tiny_models, "sd1", tuned, rank=1)
    output = folder / "extracted.safetensors"
    return ["--model_org", str(tiny_models.path("sd1")), "--model_tuned", str(tuned), "--save_to", str(output),
            "--dim", "1"], output, "--save_to"


def convert_inputs(tiny_models, folder):
    output = folder / "converted.safetensors"
    return [str(tiny_models.path("sd1")), str(output)], output, "model_to_save"


TOOLS = {
    "merge_models": Tool(merge_models.main, merge_models_inputs),
    "resize_lora": Tool(resize_lora.main, resize_inputs),
    "merge_lora_into_lora": Tool(merge_lora.main, merge_into_lora_inputs),
    "merge_lora_into_checkpoint": Tool(merge_lora.main, merge_into_checkpoint_inputs),
    "sdxl_merge_lora": Tool(sdxl_merge_lora.main, lambda models, folder: merge_into_lora_inputs(models, folder,
                                                                                                "sdxl")),
    "svd_merge_lora": Tool(svd_merge_lora.main, svd_merge_inputs),
    "extract_lora_from_dylora": Tool(extract_lora_from_dylora.main, dylora_inputs, checked_before_reading=False),
    "extract_lora_from_models": Tool(extract_lora_from_models.main, extract_inputs),
    "convert_diffusers20_original_sd": Tool(convert_diffusers20_original_sd.main, convert_inputs),
}


def folder_contents(folder: Path) -> dict[str, bytes]:
    return {path.name: path.read_bytes() for path in folder.iterdir()}


@pytest.mark.parametrize("name", TOOLS)
def test_an_existing_output_is_refused_and_left_untouched(name, tiny_models, tmp_path, capsys):
    tool = TOOLS[name]
    argv, output, flag = tool.inputs(tiny_models, tmp_path)
    output.write_bytes(UNRELATED)
    before = folder_contents(tmp_path)
    error = run_error(tool.main, argv, capsys)
    assert error == (f"error: {flag} {output}: already exists; pass --overwrite to replace it "
                     f"(or choose another {flag})")
    assert folder_contents(tmp_path) == before  # the output and the inputs unchanged, no temp file left


@pytest.mark.parametrize("name", [name for name, tool in TOOLS.items() if tool.checked_before_reading])
def test_the_refusal_comes_before_any_model_is_read(name, tiny_models, tmp_path, capsys, monkeypatch):
    tool = TOOLS[name]
    argv, output, flag = tool.inputs(tiny_models, tmp_path)
    output.write_bytes(UNRELATED)

    def no_reading(self, path):
        raise AssertionError(f"{path} was read before the existing output was refused")

    monkeypatch.setattr(TensorFile, "__init__", no_reading)
    assert f"{flag} {output}: already exists" in run_error(tool.main, argv, capsys)


@pytest.mark.parametrize("name", TOOLS)
def test_overwrite_replaces_the_existing_output(name, tiny_models, tmp_path):
    tool = TOOLS[name]
    argv, output, _ = tool.inputs(tiny_models, tmp_path)
    output.write_bytes(UNRELATED)
    tool.main([*argv, "--overwrite"])
    assert read_state_dict(output)  # a real tensor file now, not the unrelated bytes
    assert not [path for path in tmp_path.iterdir() if path.name.startswith(".")]  # no temp file left


def test_the_output_is_never_an_input_even_with_overwrite(tiny_models, tmp_path, capsys):
    lora = save_tiny_lora(tiny_models, tmp_path / "in.safetensors")
    before = lora.read_bytes()
    error = run_error(resize_lora.main, ["--model", str(lora), "--save_to", str(lora), "--overwrite"], capsys)
    assert "is also an input (--model)" in error and lora.read_bytes() == before
