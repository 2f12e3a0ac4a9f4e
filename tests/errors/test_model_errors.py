"""Bad model input: one clear line naming the file and what was expected, exit code 2, nothing written."""
from __future__ import annotations

import pickle

import pytest
import torch

from library.cli import run_cli
from library.models.state_dict_io import read_state_dict, write_state_dict
from tools import convert_diffusers20_original_sd as convert_tool


class NotATensor:
    """Pickled into a .ckpt to check that loading never unpickles arbitrary objects."""


def make_lora_file(path):
    write_state_dict(path, {
        "lora_unet_down_blocks_0_attentions_0_proj_in.lora_down.weight": torch.zeros(4, 32),
        "lora_unet_down_blocks_0_attentions_0_proj_in.lora_up.weight": torch.zeros(32, 4),
        "lora_unet_down_blocks_0_attentions_0_proj_in.alpha": torch.tensor(4.0),
    })


def make_truncated(path, tiny_models):
    data = tiny_models.path("sd1").read_bytes()
    path.write_bytes(data[: len(data) // 2])


def make_text_file(path, tiny_models=None):
    path.write_text("this is not a checkpoint\n")


def make_unknown_layout(path, tiny_models=None):
    write_state_dict(path, {"foo.bar.weight": torch.zeros(2), "baz.bias": torch.zeros(2)})


def make_pickle_payload(path, tiny_models=None):
    with open(path, "wb") as handle:
        pickle.dump({"state_dict": {"x": NotATensor()}}, handle)


def make_unet_without_vae(path, tiny_models):
    state_dict = {key: value for key, value in read_state_dict(tiny_models.path("sd1")).items()
                  if not key.startswith("first_stage_model.")}
    write_state_dict(path, state_dict)


def make_missing_unet_tensor(path, tiny_models):
    state_dict = read_state_dict(tiny_models.path("sd1"))
    del state_dict["model.diffusion_model.input_blocks.1.1.proj_out.weight"]
    write_state_dict(path, state_dict)


CASES = [
    ("lora.safetensors", lambda path, tiny: make_lora_file(path), "no UNet keys found; is this a LoRA file?"),
    ("half.safetensors", make_truncated, "truncated"),
    ("notes.safetensors", make_text_file, "not a readable safetensors file"),
    ("weird.safetensors", make_unknown_layout, "unknown key layout"),
    ("payload.ckpt", make_pickle_payload, "refusing to unpickle"),
    ("novae.safetensors", make_unet_without_vae, "no VAE keys"),
    ("incomplete.safetensors", make_missing_unet_tensor, "input_blocks.1.1.proj_out.weight is missing"),
    ("model.unknownext", make_text_file, "unknown file type"),
]


def run_convert(argv, capsys):
    with pytest.raises(SystemExit) as exit_info:
        run_cli(convert_tool.main, argv)
    error = capsys.readouterr().err.strip().splitlines()
    return exit_info.value.code, error


@pytest.mark.parametrize("name,make,expected", CASES, ids=[case[0] for case in CASES])
def test_bad_model_file_gives_one_clear_line_and_writes_nothing(tmp_path, tiny_models, capsys, name, make, expected):
    bad = tmp_path / name
    make(bad, tiny_models)
    output = tmp_path / "out.safetensors"
    code, error = run_convert([str(bad), str(output)], capsys)
    assert code == 2
    assert len(error) == 1, error
    assert str(bad) in error[0] and expected in error[0], error[0]
    assert not output.exists()
    assert [path.name for path in tmp_path.iterdir()] == [name]


def test_v2_flag_on_sdxl_file(tmp_path, tiny_models, capsys):
    code, error = run_convert(["--v2", str(tiny_models.path("sdxl")), str(tmp_path / "o.safetensors")], capsys)
    assert code == 2 and "--v2" in error[0] and "SDXL" in error[0]
    assert not (tmp_path / "o.safetensors").exists()


def test_sdxl_flag_on_sd1_file(tmp_path, tiny_models, capsys):
    code, error = run_convert(["--sdxl", str(tiny_models.path("sd1")), str(tmp_path / "o.safetensors")], capsys)
    assert code == 2 and "SD1.x" in error[0] and "expects SDXL" in error[0]


def test_missing_input_and_missing_vae(tmp_path, tiny_models, capsys):
    code, error = run_convert([str(tmp_path / "nope.safetensors"), str(tmp_path / "o.safetensors")], capsys)
    assert code == 2 and "nope.safetensors" in error[0] and "not found" in error[0]

    from library.errors import ModelFormatError
    from library.models.load import load_target_model

    with pytest.raises(ModelFormatError, match="missing_vae.safetensors: --vae file not found"):
        load_target_model(tiny_models.path("sd1"), vae_path=tmp_path / "missing_vae.safetensors")


def test_converter_never_overwrites_input_or_existing_output(tmp_path, tiny_models, capsys):
    source = tmp_path / "model.safetensors"
    source.write_bytes(tiny_models.path("sd1").read_bytes())
    before = source.read_bytes()
    code, error = run_convert([str(source), str(source)], capsys)
    assert code == 2 and "the output is the input" in error[0]
    existing = tmp_path / "existing.safetensors"
    existing.write_bytes(b"keep me")
    code, error = run_convert([str(source), str(existing)], capsys)
    assert code == 2 and "already exists" in error[0] and "--overwrite" in error[0]
    assert existing.read_bytes() == b"keep me" and source.read_bytes() == before
