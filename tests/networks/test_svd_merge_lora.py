"""svd_merge_lora on tiny-model LoRAs: identity for one LoRA, exact weighted sums, metadata, refusals."""
from __future__ import annotations

import json

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file

from networks import svd_merge_lora
from networks.lora import safetensors_hashes
from networks.lora_file import read_lora, write_lora
from tests.cli_helpers import run_error
from tests.networks.test_resize_lora import assert_close_float32, save_tiny_lora


@pytest.fixture(scope="module")
def sd1_loras(tiny_models, tmp_path_factory):
    """Two SD1 LoRAs (ranks 2 and 3, 3x3 convs rank 1 and 2); the second lacks its text-encoder modules."""
    folder = tmp_path_factory.mktemp("merge_inputs")
    first = save_tiny_lora(tiny_models, folder / "a.safetensors", dim=2, alpha=1.0, seed=1, conv_dim="1",
                           metadata={"ss_base_model_version": "sd_v1", "ss_v2": "False"})
    full = save_tiny_lora(tiny_models, folder / "b_full.safetensors", dim=3, alpha=3.0, seed=2, conv_dim="2",
                          conv_alpha="1", metadata={"ss_base_model_version": "sd_v1", "ss_v2": "False"})
    unet_only = read_lora(full)
    modules = {name: pair for name, pair in unet_only.modules.items() if name.startswith("lora_unet_")}
    second = write_lora(folder / "b.safetensors", modules, unet_only.metadata)
    return first, second


def test_one_lora_at_its_own_rank_is_the_identity(sd1_loras, tmp_path):
    first, _ = sd1_loras
    target = tmp_path / "merged.safetensors"
    svd_merge_lora.main(["--models", str(first), "--ratios", "1", "--new_rank", "2", "--new_conv_rank", "1",
                         "--save_to", str(target)])
    before, after = read_lora(first), read_lora(target)
    assert set(after.modules) == set(before.modules)
    for name, pair in before.modules.items():
        merged = after.modules[name]
        assert merged.rank == pair.rank and merged.alpha == merged.rank, name  # kohya: alpha = rank (scale 1)
        assert_close_float32(merged.delta(), pair.delta())


def test_two_loras_sum_exactly_when_the_rank_fits(sd1_loras, tmp_path):
    first, second = sd1_loras
    target = tmp_path / "merged.safetensors"
    svd_merge_lora.main(["--models", str(first), str(second), "--ratios", "0.7", "-0.4", "--new_rank", "5",
                         "--new_conv_rank", "3", "--save_to", str(target)])
    a, b, merged = read_lora(first), read_lora(second), read_lora(target)
    assert set(merged.modules) == set(a.modules) and set(b.modules) < set(a.modules)
    for name, pair in a.modules.items():
        expected = pair.delta(torch.float64) * 0.7
        if name in b.modules:
            expected = expected + b.modules[name].delta(torch.float64) * -0.4
            assert merged.modules[name].rank == min(5 if not pair.is_conv3x3 else 3, *expected.flatten(1).shape)
        else:  # text-encoder modules are only in the first file: 0.7 × ΔW_a at its rank 2
            assert merged.modules[name].rank == 2
        assert_close_float32(merged.modules[name].delta(torch.float64), expected)


def test_metadata_and_hashes(sd1_loras, tmp_path):
    first, second = sd1_loras
    target = tmp_path / "merged.safetensors"
    svd_merge_lora.main(["--models", str(first), str(second), "--new_rank", "2", "--new_conv_rank", "1",
                         "--save_to", str(target), "--save_precision", "bf16"])
    with safe_open(str(target), "pt") as handle:
        metadata = handle.metadata()
    state = load_file(str(target))
    assert {tensor.dtype for tensor in state.values()} == {torch.bfloat16}
    assert metadata["ss_network_module"] == "networks.lora"
    assert (metadata["ss_network_dim"], metadata["ss_network_alpha"]) == ("2", "2")
    assert json.loads(metadata["ss_network_args"]) == {"conv_dim": "1", "conv_alpha": "1"}
    assert metadata["ss_merged_from"] == "a.safetensors, b.safetensors"
    assert (metadata["ss_base_model_version"], metadata["ss_v2"]) == ("sd_v1", "False")
    assert (metadata["sshs_model_hash"], metadata["sshs_legacy_hash"]) == safetensors_hashes(state, metadata)


def test_mixing_sd1_and_sdxl_is_one_line_exit_2(tiny_models, sd1_loras, tmp_path, capsys):
    first, _ = sd1_loras
    sdxl = save_tiny_lora(tiny_models, tmp_path / "xl.safetensors", family="sdxl", dim=2, metadata={})
    target = tmp_path / "merged.safetensors"
    error = run_error(svd_merge_lora.main, ["--models", str(first), str(sdxl), "--save_to", str(target)], capsys)
    assert error == (f"error: --models: {first} is an SD1.x/SD2.x LoRA but {sdxl} is an SDXL LoRA; "
                     "merge LoRAs of one model family only")
    assert not target.exists()


def test_ratio_count_must_match_model_count(sd1_loras, tmp_path, capsys):
    first, second = sd1_loras
    error = run_error(svd_merge_lora.main, ["--models", str(first), str(second), "--ratios", "0.5",
                                            "--save_to", str(tmp_path / "m.safetensors")], capsys)
    assert error == "error: --ratios: expected one ratio per model (2 for --models), got 1"


def test_save_to_an_input_is_refused_and_the_input_unchanged(sd1_loras, capsys):
    first, second = sd1_loras
    original = second.read_bytes()
    error = run_error(svd_merge_lora.main, ["--models", str(first), str(second), "--save_to", str(second)], capsys)
    assert error.startswith(f"error: --save_to {second} is also an input (--models)")
    assert second.read_bytes() == original


def test_checkpoint_among_models_is_refused(tiny_models, sd1_loras, tmp_path, capsys):
    first, _ = sd1_loras
    checkpoint = tiny_models.path("sd1")
    error = run_error(svd_merge_lora.main, ["--models", str(first), str(checkpoint), "--save_to",
                                            str(tmp_path / "m.safetensors")], capsys)
    assert error.startswith(f"error: {checkpoint}: is a model checkpoint, not a LoRA")


def test_help(capsys):
    with pytest.raises(SystemExit) as exit_info:
        svd_merge_lora.main(["--help"])
    assert exit_info.value.code == 0
    assert "--new_conv_rank" in capsys.readouterr().out
