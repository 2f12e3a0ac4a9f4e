"""extract_lora_from_dylora on a tiny SD1 DyLoRA: rank k is the first k units, alpha copied, kohya file names."""
from __future__ import annotations

import json

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file

from networks import dylora, extract_lora_from_dylora
from networks.lora import lora_weight_delta, safetensors_hashes
from networks.lora_file import read_lora
from tests.cli_helpers import run_error
from tests.networks.test_dylora import randomize_units
from tests.networks.test_lora import text_encoder_arg


@pytest.fixture(scope="module")
def dylora_file(tiny_models, tmp_path_factory):
    """A rank-4 DyLoRA (unit 2, 3x3 convs included) with random units, saved as training saves it; and the network."""
    bundle = tiny_models.bundle("sd1")
    network = dylora.create_network(1.0, 4, 3.0, None, text_encoder_arg(bundle), bundle.unet, unit="2",
                                    conv_dim="4", conv_alpha="2")
    randomize_units(network)
    path = tmp_path_factory.mktemp("dylora") / "dy.safetensors"
    metadata = {"ss_network_module": "networks.dylora", "ss_network_dim": "4", "ss_network_alpha": "3.0",
                "ss_network_args": json.dumps({"unit": "2", "conv_dim": "4", "conv_alpha": "2"}),
                "ss_training_comment": "dyn"}
    network.save_weights(path, None, metadata)
    return path, network


def test_rank_k_is_the_first_k_units(dylora_file, tmp_path):
    source, network = dylora_file
    outputs = extract_lora_from_dylora.main(["--model", str(source), "--save_to", str(tmp_path / "out.safetensors"),
                                             "--unit", "1"])
    assert [path.name for path in outputs] == ["out-0001.safetensors", "out-0002.safetensors",
                                               "out-0003.safetensors"]
    modules = {module.lora_name: module for module in network.text_encoder_loras + network.unet_loras}
    assert any(module.lora_down_unit0.dim() == 4 and module.lora_down_unit0.shape[2] == 3
               for module in modules.values())
    for rank, path in zip((1, 2, 3), outputs):
        extracted = read_lora(path)
        assert set(extracted.modules) == set(modules)
        for name, module in modules.items():
            pair = extracted.modules[name]
            down, up = module.down_weight().detach(), module.up_weight().detach()
            assert torch.equal(pair.down, down[:rank]) and torch.equal(pair.up, up[:, :rank]), name
            assert pair.alpha == float(module.alpha)  # copied unchanged (kohya): alpha / k at rank k
            torch.testing.assert_close(pair.delta(), lora_weight_delta(down[:rank], up[:, :rank],
                                                                       float(module.alpha) / rank))


def test_default_unit_from_metadata_and_metadata_updated(dylora_file, tmp_path):
    source, _ = dylora_file
    outputs = extract_lora_from_dylora.main(["--model", str(source), "--save_to", str(tmp_path / "small.safetensors"),
                                             "--save_precision", "fp16"])
    assert [path.name for path in outputs] == ["small-0002.safetensors"]
    with safe_open(str(outputs[0]), "pt") as handle:
        metadata = handle.metadata()
    state = load_file(str(outputs[0]))
    assert {tensor.dtype for tensor in state.values()} == {torch.float16}
    assert metadata["ss_network_dim"] == "2" and metadata["ss_network_alpha"] == "3.0"
    assert metadata["ss_training_comment"] == "extracted rank 2 from DyLoRA of rank 4; dyn"
    assert (metadata["sshs_model_hash"], metadata["sshs_legacy_hash"]) == safetensors_hashes(state, metadata)


def test_unit_not_below_the_rank_is_refused(dylora_file, tmp_path, capsys):
    source, _ = dylora_file
    error = run_error(extract_lora_from_dylora.main, ["--model", str(source), "--save_to",
                                                      str(tmp_path / "o.safetensors"), "--unit", "4"], capsys)
    assert error == (f"error: --unit 4: {source} has rank 4, so there is no smaller rank to extract; "
                     "choose a unit below 4")
    assert list(tmp_path.iterdir()) == []


def test_output_over_the_input_is_refused(dylora_file, capsys):
    source, _ = dylora_file
    original = source.read_bytes()
    # --save_to dy.safetensors with rank 2 would write dy-0002.safetensors; name the input itself that way
    renamed = source.with_name("dy-0002.safetensors")
    renamed.write_bytes(original)
    error = run_error(extract_lora_from_dylora.main, ["--model", str(renamed), "--save_to", str(source)], capsys)
    assert error.startswith(f"error: --save_to {renamed} is also an input (--model)")
    assert renamed.read_bytes() == original


def test_checkpoint_as_model_is_refused(tiny_models, tmp_path, capsys):
    error = run_error(extract_lora_from_dylora.main, ["--model", str(tiny_models.path("sd1")), "--save_to",
                                                      str(tmp_path / "o.safetensors"), "--unit", "1"], capsys)
    assert "is a model checkpoint, not a LoRA" in error


def test_help(capsys):
    with pytest.raises(SystemExit) as exit_info:
        extract_lora_from_dylora.main(["--help"])
    assert exit_info.value.code == 0
    assert "--unit" in capsys.readouterr().out
