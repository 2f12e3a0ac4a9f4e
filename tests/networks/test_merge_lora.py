"""merge_lora / sdxl_merge_lora on tiny models: merged checkpoints equal W + ratio·ΔW and the dynamic LoRA,
--concat is exact, kohya's equal-rank merge, SDXL block weights, metadata and keys, refusals."""
from __future__ import annotations

import math

import pytest
import torch
from safetensors import safe_open

from library.models.load import load_target_model
from library.models.state_dict_io import read_state_dict
from networks import lora, merge_lora, sdxl_merge_lora
from networks.lora_file import read_lora
from tests.cli_helpers import run_error
from tests.networks.test_lora import (
    assert_outputs_close,
    fresh_copy,
    make_network,
    model_outputs,
    randomize_up_weights,
    text_encoder_arg,
)

METADATA = {"ss_network_module": "networks.lora", "ss_base_model_version": "sd_v1"}


def save_lora(tiny_models, path, family="sd1", dim=4, alpha=2.0, seed=1, conv=True):
    bundle = tiny_models.bundle(family)
    network = make_network(bundle, dim=dim, alpha=alpha, **({"conv_dim": "2", "conv_alpha": "1"} if conv else {}))
    randomize_up_weights(network, seed)
    with torch.no_grad():  # down weights random too, so ranks and cross terms matter
        generator = torch.Generator().manual_seed(seed + 100)
        for module in network.text_encoder_loras + network.unet_loras:
            weight = module.lora_down.weight
            weight.copy_(torch.randn(weight.shape, generator=generator) * 0.1)
    network.save_weights(path, None, dict(METADATA))
    return path



def networks_by_name(bundle, lora_path):
    network, _ = lora.create_network_from_weights(1.0, lora_path, bundle.vae, text_encoder_arg(bundle), bundle.unet)
    return {module.lora_name: module.original_module for module in network.text_encoder_loras + network.unet_loras}


def test_merge_into_checkpoint_equals_weight_plus_ratio_delta_and_dynamic_lora(tiny_models, tmp_path):
    lora_path = save_lora(tiny_models, tmp_path / "a.safetensors")
    out = tmp_path / "merged.safetensors"
    merge_lora.main(["--sd_model", str(tiny_models.path("sd1")), "--models", str(lora_path), "--ratios", "0.7",
                     "--save_to", str(out)])
    merged = load_target_model(out)
    original_layers = networks_by_name(tiny_models.bundle("sd1"), lora_path)
    merged_layers = networks_by_name(merged, lora_path)
    pairs = read_lora(lora_path).modules
    assert any(pair.is_conv3x3 for pair in pairs.values())
    assert any(name.startswith("lora_te_") for name in pairs)
    for name, pair in pairs.items():
        before, after = original_layers[name].weight, merged_layers[name].weight
        expected = before + 0.7 * pair.delta().reshape(before.shape)
        torch.testing.assert_close(after, expected, atol=1e-6, rtol=0)
        assert not torch.allclose(after, before)

    dynamic = fresh_copy(tiny_models, "sd1")
    network, _ = lora.create_network_from_weights(0.7, lora_path, dynamic.vae, text_encoder_arg(dynamic),
                                                  dynamic.unet)
    network.load_weights(lora_path)
    network.apply_to(text_encoder_arg(dynamic), dynamic.unet)
    assert_outputs_close(model_outputs(merged), model_outputs(dynamic), atol=1e-5)


def test_concat_of_two_loras_is_exact_sum_of_deltas(tiny_models, tmp_path):
    first = save_lora(tiny_models, tmp_path / "a.safetensors", dim=4, alpha=2.0, seed=1)
    second = save_lora(tiny_models, tmp_path / "b.safetensors", dim=2, alpha=1.0, seed=2)
    out = tmp_path / "ab.safetensors"
    merge_lora.main(["--models", str(first), str(second), "--ratios", "0.6", "-1.5", "--concat", "--shuffle",
                     "--save_to", str(out)])
    a, b, merged = read_lora(first).modules, read_lora(second).modules, read_lora(out).modules
    assert set(merged) == set(a)
    for name, pair in merged.items():
        assert pair.rank == a[name].rank + b[name].rank and pair.alpha == pair.rank
        expected = 0.6 * a[name].delta() + -1.5 * b[name].delta().reshape(a[name].delta().shape)
        torch.testing.assert_close(pair.delta(), expected, atol=1e-6, rtol=0)


def test_equal_rank_merge_follows_kohya_sqrt_ratio_rule(tiny_models, tmp_path):
    first = save_lora(tiny_models, tmp_path / "a.safetensors", alpha=2.0, seed=1)
    second = save_lora(tiny_models, tmp_path / "b.safetensors", alpha=4.0, seed=2)
    out = tmp_path / "ab.safetensors"
    merge_lora.main(["--models", str(first), str(second), "--ratios", "0.5", "-2", "--save_to", str(out)])
    a, b, merged = read_lora(first).modules, read_lora(second).modules, read_lora(out).modules
    # s_a = sqrt(0.5 · α_a/α_a); s_b = sqrt(2 · α_b/α_a) = 2 for Linear (4/2), sqrt(2) for 3x3 convs (conv alpha 1);
    # the sign of -2 goes on down
    for name, pair in merged.items():
        scale_b = math.sqrt(2 * b[name].alpha / a[name].alpha)
        assert pair.alpha == a[name].alpha and scale_b == (2.0 if not pair.is_conv3x3 else math.sqrt(2))
        torch.testing.assert_close(pair.down, math.sqrt(0.5) * a[name].down - scale_b * b[name].down, atol=1e-6,
                                   rtol=0)
        torch.testing.assert_close(pair.up, math.sqrt(0.5) * a[name].up + scale_b * b[name].up, atol=1e-6, rtol=0)
    single = tmp_path / "single.safetensors"
    merge_lora.main(["--models", str(first), "--ratios", "-0.3", "--save_to", str(single)])
    for name, pair in read_lora(single).modules.items():  # one file: exactly ratio × ΔW
        torch.testing.assert_close(pair.delta(), -0.3 * a[name].delta(), atol=1e-6, rtol=0)


def test_merged_lora_keys_and_metadata(tiny_models, tmp_path):
    first = save_lora(tiny_models, tmp_path / "a.safetensors", dim=4, seed=1)
    second = save_lora(tiny_models, tmp_path / "b.safetensors", dim=2, seed=2)
    out = tmp_path / "ab.safetensors"
    merge_lora.main(["--models", str(first), str(second), "--concat", "--save_to", str(out),
                     "--save_precision", "fp16"])
    with safe_open(str(out), "pt") as handle:
        metadata, keys = handle.metadata(), list(handle.keys())
        assert handle.get_tensor(keys[0]).dtype == torch.float16
    assert all(key.startswith(("lora_te_", "lora_unet_")) for key in keys)
    assert all(key.endswith((".lora_down.weight", ".lora_up.weight", ".alpha")) for key in keys)
    assert metadata["ss_network_dim"] == "6" and metadata["ss_network_alpha"] == "6"
    assert metadata["ss_network_module"] == "networks.lora"
    assert metadata["ss_merged_from"] == "a.safetensors, b.safetensors"
    assert metadata["ss_base_model_version"] == "sd_v1"
    assert metadata["sshs_model_hash"] and metadata["sshs_legacy_hash"]


def test_sdxl_block_weight_zero_leaves_that_block_unchanged(tiny_models, tmp_path):
    lora_path = save_lora(tiny_models, tmp_path / "xl.safetensors", family="sdxl", conv=False)
    out = tmp_path / "merged.safetensors"
    weights = [1.0] * 13 + [0.0] * 9 + [1.0]  # output_blocks (slots 13-21) off
    sdxl_merge_lora.main(["--sd_model", str(tiny_models.path("sdxl")), "--models", str(lora_path),
                          "--lbws", str(weights).replace(" ", ""), "--save_to", str(out)])
    before, after = read_state_dict(tiny_models.path("sdxl")), read_state_dict(out)
    names = read_lora(lora_path).modules
    assert any(name.startswith("lora_unet_output_blocks_") for name in names)
    changed = {key for key in before if not torch.equal(before[key], after[key])}
    assert not any(key.startswith("model.diffusion_model.output_blocks.") for key in changed)
    assert any(key.startswith("model.diffusion_model.input_blocks.") for key in changed)
    assert any(key.startswith("conditioner.embedders.1.") for key in changed)


@pytest.mark.parametrize("extra, message", [
    (["--ratios", "1", "2"], "--ratios: expected one ratio per model (1 for --models), got 2"),
    (["--lbws", "[1,2]"], "--lbws [1,2]: expected 23 weights (one per SDXL block slot 0-22), got 2"),
])
def test_sdxl_flag_count_errors(tiny_models, tmp_path, capsys, extra, message):
    lora_path = save_lora(tiny_models, tmp_path / "xl.safetensors", family="sdxl", conv=False)
    argv = ["--models", str(lora_path), "--save_to", str(tmp_path / "out.safetensors"), *extra]
    assert run_error(sdxl_merge_lora.main, argv, capsys) == f"error: {message}"
    assert not (tmp_path / "out.safetensors").exists()


def test_mixed_families_are_refused(tiny_models, tmp_path, capsys):
    sd1 = save_lora(tiny_models, tmp_path / "sd1.safetensors", conv=False)
    xl = save_lora(tiny_models, tmp_path / "xl.safetensors", family="sdxl", conv=False)
    out = tmp_path / "out.safetensors"
    error = run_error(merge_lora.main, ["--sd_model", str(tiny_models.path("sdxl")), "--models", str(sd1),
                                        "--save_to", str(out)], capsys)
    assert error.startswith(f"error: --models {sd1}: expected a network for SDXL")
    error = run_error(merge_lora.main, ["--models", str(sd1), str(xl), "--save_to", str(out)], capsys)
    assert error == (f"error: --models: {sd1} is an SD1.x/SD2.x LoRA but {xl} is an SDXL LoRA; "
                     "merge LoRAs of one model family only")
    error = run_error(sdxl_merge_lora.main, ["--models", str(sd1), "--save_to", str(out)], capsys)
    assert "sdxl_merge_lora.py merges SDXL LoRAs" in error
    assert not out.exists()


def test_unequal_ranks_without_concat_name_the_module(tiny_models, tmp_path, capsys):
    first = save_lora(tiny_models, tmp_path / "a.safetensors", dim=4, conv=False)
    second = save_lora(tiny_models, tmp_path / "b.safetensors", dim=2, conv=False)
    error = run_error(merge_lora.main, ["--models", str(first), str(second), "--save_to",
                                        str(tmp_path / "out.safetensors")], capsys)
    name = min(read_lora(first).modules)
    assert error == (f"error: --models: module {name} has rank 4 in {first} but 2 in {second}; merging without "
                     "--concat needs equal ranks, add --concat")


def test_checkpoint_as_lora_and_output_over_input_are_refused(tiny_models, tmp_path, capsys):
    checkpoint = tiny_models.path("sd1")
    error = run_error(merge_lora.main, ["--sd_model", str(checkpoint), "--models", str(checkpoint),
                                        "--save_to", str(tmp_path / "out.safetensors")], capsys)
    assert "is a model checkpoint, not a LoRA" in error
    lora_path = save_lora(tiny_models, tmp_path / "a.safetensors", conv=False)
    content = lora_path.read_bytes()
    error = run_error(merge_lora.main, ["--models", str(lora_path), "--save_to", str(lora_path)], capsys)
    assert error == (f"error: --save_to {lora_path} is also an input (--models/--sd_model); choose another "
                     "output file so the input stays unchanged")
    assert lora_path.read_bytes() == content


@pytest.mark.parametrize("tool, flag", [(merge_lora, "--concat"), (sdxl_merge_lora, "--lbws")])
def test_help(tool, flag, capsys):
    with pytest.raises(SystemExit) as exit_info:
        tool.main(["--help"])
    assert exit_info.value.code == 0
    text = capsys.readouterr().out
    assert flag in text and "--sd_model" in text and "APPROXIMATION" in text


def _float_dtypes(path) -> set[torch.dtype]:
    return {tensor.dtype for tensor in read_state_dict(path).values() if tensor.is_floating_point()}


@pytest.mark.parametrize("precision_flags, expected", [
    ([], torch.float32),  # kohya: --save_precision defaults to --precision, whose default is float
    (["--precision", "fp16"], torch.float16),
    (["--save_precision", "bf16"], torch.bfloat16),
    (["--precision", "bf16", "--save_precision", "fp16"], torch.float16),
])
def test_save_precision_is_the_dtype_of_the_saved_lora_and_checkpoint(tiny_models, tmp_path, precision_flags,
                                                                      expected):
    lora_path = save_lora(tiny_models, tmp_path / "a.safetensors", conv=False)
    merged_lora = tmp_path / "merged-lora.safetensors"
    merge_lora.main(["--models", str(lora_path), "--save_to", str(merged_lora), *precision_flags])
    checkpoint = tmp_path / "merged-model.safetensors"
    merge_lora.main(["--sd_model", str(tiny_models.path("sd1")), "--models", str(lora_path), "--save_to",
                     str(checkpoint), *precision_flags])
    assert _float_dtypes(merged_lora) == {expected}
    assert _float_dtypes(checkpoint) == {expected}


def test_save_precision_help_says_what_it_sets_and_its_default(capsys):
    with pytest.raises(SystemExit):
        merge_lora.main(["--help"])
    text = " ".join(capsys.readouterr().out.split())
    assert ("dtype of the floating-point tensors in the saved file (merged LoRA or checkpoint): float (float32), "
            "fp16 or bf16; default: the --precision dtype, as in kohya") in text
