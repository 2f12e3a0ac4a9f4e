"""resize_lora on tiny models and constructed LoRAs: identity at the same rank, best rank-k approximation,
3x3 convs, dynamic rank methods, metadata and hashes, refusals."""
from __future__ import annotations

import hashlib
import json

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file

from networks import dylora, resize_lora
from networks.lora import safetensors_hashes
from networks.lora_file import LoRAPair, read_lora, write_lora
from tests.cli_helpers import run_error
from tests.networks.test_dylora import randomize_units
from tests.networks.test_lora import make_network, randomize_up_weights, text_encoder_arg

TRAINING_METADATA = {"ss_network_module": "networks.lora", "ss_network_dim": "4", "ss_network_alpha": "2.0",
                     "ss_network_args": json.dumps({"conv_dim": "2", "conv_alpha": "1"}),
                     "ss_training_comment": "my style", "ss_output_name": "style", "modelspec.title": "style"}


def save_tiny_lora(tiny_models, path, family="sd1", dim=4, alpha=2.0, seed=1, metadata=None, **network_args):
    """A kohya LoRA of a tiny model with random up and down weights (3x3 convs with conv_dim)."""
    bundle = tiny_models.bundle(family)
    network = make_network(bundle, dim=dim, alpha=alpha, **network_args)
    randomize_up_weights(network, seed)
    generator = torch.Generator().manual_seed(seed + 100)
    with torch.no_grad():  # down too, so the file does not depend on the global RNG (test order)
        for module in network.text_encoder_loras + network.unet_loras:
            weight = module.lora_down.weight
            weight.copy_(torch.randn(weight.shape, generator=generator) * 0.1)
    network.save_weights(path, None, dict(TRAINING_METADATA if metadata is None else metadata))
    return path



def best_rank_approximation(delta: torch.Tensor, rank: int) -> torch.Tensor:
    """Independent reference: truncated SVD of ΔW (as a [out, in·k·k] matrix) in float64."""
    matrix = delta.double().reshape(delta.shape[0], -1)
    u, s, vh = torch.linalg.svd(matrix, full_matrices=False)
    return (u[:, :rank] * s[:rank]) @ vh[:rank]


def assert_is_best_rank_approximation(approximation: torch.Tensor, delta: torch.Tensor, rank: int) -> None:
    """Eckart–Young, independent of the basis chosen when singular values nearly tie: the approximation has the
    top-`rank` singular values of ΔW and leaves exactly the dropped ones, ||ΔW − A||_F = sqrt(Σ_{i>rank} S_i²)."""
    singular_values = torch.linalg.svdvals(delta.double().flatten(1))
    got = torch.linalg.svdvals(approximation.double().flatten(1))
    tolerance = 1e-5 * float(singular_values[0])
    torch.testing.assert_close(got[:rank], singular_values[:rank], atol=tolerance, rtol=0)
    assert all(float(value) < tolerance for value in got[rank:])
    residual = torch.linalg.matrix_norm(delta.double().flatten(1) - approximation.double().flatten(1))
    assert float(residual) == pytest.approx(float(singular_values[rank:].pow(2).sum().sqrt()), abs=tolerance)


def assert_close_float32(actual: torch.Tensor, expected: torch.Tensor) -> None:
    """Equal to float32 precision relative to the matrix's largest entry (float32 SVD round-off)."""
    tolerance = 1e-5 * float(expected.abs().max())
    torch.testing.assert_close(actual.double(), expected.double(), atol=tolerance, rtol=0)


def constructed_pair(singular_values, out_features=6, in_features=5, seed=0) -> LoRAPair:
    """A rank-len(S) Linear LoRA (alpha = rank, scale 1) whose ΔW has exactly the singular values S."""
    generator = torch.Generator().manual_seed(seed)
    rank = len(singular_values)
    u, _ = torch.linalg.qr(torch.randn(out_features, rank, generator=generator, dtype=torch.float64))
    v, _ = torch.linalg.qr(torch.randn(in_features, rank, generator=generator, dtype=torch.float64))
    down = torch.tensor(singular_values, dtype=torch.float64)[:, None] * v.T
    return LoRAPair(down.float(), u.float(), float(rank))


def test_same_rank_is_the_identity(tiny_models, tmp_path):
    source = save_tiny_lora(tiny_models, tmp_path / "in.safetensors", conv_dim="2", conv_alpha="1")
    resize_lora.main(["--model", str(source), "--save_to", str(tmp_path / "out.safetensors"), "--new_rank", "4",
                      "--new_conv_rank", "2"])
    before, after = read_lora(source), read_lora(tmp_path / "out.safetensors")
    assert set(after.modules) == set(before.modules)
    assert any(pair.is_conv3x3 for pair in before.modules.values())
    for name, pair in before.modules.items():
        assert (after.modules[name].rank, after.modules[name].alpha) == (pair.rank, pair.alpha), name
        assert_close_float32(after.modules[name].delta(), pair.delta())


def test_lower_rank_keeps_the_top_singular_values_linear_and_3x3(tiny_models, tmp_path):
    source = save_tiny_lora(tiny_models, tmp_path / "in.safetensors", conv_dim="3", conv_alpha="1.5")
    target = tmp_path / "out.safetensors"
    resize_lora.main(["--model", str(source), "--save_to", str(target), "--new_rank", "2", "--new_conv_rank", "1"])
    before, after = read_lora(source), read_lora(target)
    conv_names = [name for name, pair in before.modules.items() if pair.is_conv3x3]
    assert conv_names and len(conv_names) < len(before.modules)
    for name, pair in before.modules.items():
        resized = after.modules[name]
        rank = 1 if pair.is_conv3x3 else 2
        assert resized.rank == rank and resized.down.shape[1:] == pair.down.shape[1:], name
        # kohya keeps alpha/rank: alpha 2 of rank 4 -> 1 at rank 2; conv alpha 1.5 of rank 3 -> 0.5 at rank 1
        assert resized.alpha == pytest.approx(0.5 if pair.is_conv3x3 else 1.0), name
        expected = best_rank_approximation(pair.delta(torch.float64), rank)
        assert_close_float32(resized.delta(torch.float64).reshape(expected.shape), expected)
        assert_is_best_rank_approximation(resized.delta(torch.float64), pair.delta(torch.float64), rank)


def write_constructed_lora(path):
    modules = {"lora_unet_down_blocks_0_attentions_0_proj_in": constructed_pair([8.0, 4.0, 2.0, 1.0], seed=1),
               "lora_te_text_model_encoder_layers_0_mlp_fc1": constructed_pair([5.0, 5.0, 5.0, 5.0], seed=2)}
    write_lora(path, modules, {"ss_network_dim": "4", "ss_network_alpha": "4"})
    return path


@pytest.mark.parametrize("method, param, new_rank, expected_ranks", [
    ("sv_ratio", "4", 4, (3, 4)),          # keep S >= 8/4 = 2: 8, 4, 2
    ("sv_ratio", "2.5", 4, (2, 4)),        # S >= 3.2: 8, 4
    ("sv_fro", "0.9", 4, (2, 4)),          # sqrt(64/85) = .868, sqrt(80/85) = .970; 5,5,5,5: sqrt(3/4) = .866
    ("sv_fro", "0.99", 4, (3, 4)),         # sqrt(84/85) = .994
    ("sv_cumulative", "0.8", 4, (2, 4)),   # 12/15 = 0.8 reached exactly; 5,5,5,5: 15/20 = .75 < .8
    ("sv_cumulative", "0.5", 4, (1, 2)),   # 8/15 = .533; 10/20 = .5
    ("sv_cumulative", "0.99", 2, (2, 2)),  # never above --new_rank
])
def test_dynamic_methods_choose_hand_computed_ranks(tmp_path, method, param, new_rank, expected_ranks):
    source = write_constructed_lora(tmp_path / "in.safetensors")
    target = tmp_path / "out.safetensors"
    resize_lora.main(["--model", str(source), "--save_to", str(target), "--new_rank", str(new_rank),
                      "--dynamic_method", method, "--dynamic_param", param])
    after = read_lora(target)
    ranks = (after.modules["lora_unet_down_blocks_0_attentions_0_proj_in"].rank,
             after.modules["lora_te_text_model_encoder_layers_0_mlp_fc1"].rank)
    assert ranks == expected_ranks
    expected_dim = str(ranks[0]) if ranks[0] == ranks[1] else "Dynamic"
    assert after.metadata["ss_network_dim"] == expected_dim
    assert after.metadata["ss_training_comment"] == f"Dynamic dimension resize with {method}: {float(param)} from 4"


def test_verbose_prints_rank_and_retained_energy(tmp_path, capsys):
    source = write_constructed_lora(tmp_path / "in.safetensors")
    resize_lora.main(["--model", str(source), "--save_to", str(tmp_path / "out.safetensors"), "--new_rank", "2",
                      "--verbose"])
    lines = {line.split()[0]: line.split() for line in capsys.readouterr().out.splitlines()}
    # S = 8, 4, 2, 1 at rank 2: sum 12/15 = 80%, Frobenius sqrt(80/85) = 97.01%, max/min kept 8/4 = 2
    assert lines["lora_unet_down_blocks_0_attentions_0_proj_in"][1:] == ["2", "80.00%", "97.01%", "2.00"]
    assert lines["lora_te_text_model_encoder_layers_0_mlp_fc1"][1:] == ["2", "50.00%", "70.71%", "1.00"]


def test_metadata_updated_and_hashes_valid(tiny_models, tmp_path):
    source = save_tiny_lora(tiny_models, tmp_path / "in.safetensors", conv_dim="2", conv_alpha="1")
    target = tmp_path / "out.safetensors"
    resize_lora.main(["--model", str(source), "--save_to", str(target), "--new_rank", "2", "--new_conv_rank", "1",
                      "--save_precision", "fp16"])
    with safe_open(str(target), "pt") as handle:
        metadata = handle.metadata()
    state = load_file(str(target))
    assert {tensor.dtype for tensor in state.values()} == {torch.float16}
    assert metadata["ss_network_dim"] == "2" and metadata["ss_network_alpha"] == "1"
    assert json.loads(metadata["ss_network_args"]) == {"conv_dim": "1", "conv_alpha": "0.5"}
    assert metadata["ss_training_comment"] == "dimension is resized from 2, 4 to 2 (conv: 1); my style"
    assert metadata["ss_output_name"] == "style" and metadata["modelspec.title"] == "style"
    model_hash, legacy_hash = safetensors_hashes(state, metadata)
    assert (metadata["sshs_model_hash"], metadata["sshs_legacy_hash"]) == (model_hash, legacy_hash)
    data = target.read_bytes()
    header_length = int.from_bytes(data[:8], "little")
    assert hashlib.sha256(data[8 + header_length:]).hexdigest() == model_hash


def test_resizes_a_dylora_file(tiny_models, tmp_path):
    bundle = tiny_models.bundle("sd1")
    network = dylora.create_network(1.0, 4, 4.0, None, text_encoder_arg(bundle), bundle.unet, unit="2")
    randomize_units(network, seed=5)
    source = tmp_path / "dylora.safetensors"
    network.save_weights(source, None, {"ss_network_module": "networks.dylora"})
    resize_lora.main(["--model", str(source), "--save_to", str(tmp_path / "out.safetensors"), "--new_rank", "2"])
    before, after = read_lora(source), read_lora(tmp_path / "out.safetensors")
    for name, pair in before.modules.items():
        assert_is_best_rank_approximation(after.modules[name].delta(torch.float64), pair.delta(torch.float64), 2)


def test_checkpoint_as_model_is_refused(tiny_models, tmp_path, capsys):
    error = run_error(resize_lora.main, ["--model", str(tiny_models.path("sd1")), "--save_to",
                                         str(tmp_path / "out.safetensors")], capsys)
    assert error.startswith("error: ") and "is a model checkpoint, not a LoRA" in error
    assert not (tmp_path / "out.safetensors").exists()


def test_save_to_equal_to_the_input_is_refused(tmp_path, capsys):
    source = write_constructed_lora(tmp_path / "in.safetensors")
    original = source.read_bytes()
    error = run_error(resize_lora.main, ["--model", str(source), "--save_to", str(source), "--new_rank", "2"],
                      capsys)
    assert error == (f"error: --save_to {source} is also an input (--model); choose another output file so the "
                     "input stays unchanged")
    assert source.read_bytes() == original


@pytest.mark.parametrize("argv, message", [
    (["--dynamic_param", "0.5"], "error: --dynamic_param is given without --dynamic_method"),
    (["--dynamic_method", "sv_fro"], "error: --dynamic_method sv_fro needs --dynamic_param"),
    (["--dynamic_method", "sv_fro", "--dynamic_param", "1.5"],
     "error: --dynamic_param 1.5: sv_fro expects a fraction in (0, 1]"),
    (["--new_rank", "0"], "error: --new_rank 0: expected a rank of at least 1"),
])
def test_bad_flags_give_one_line(tmp_path, capsys, argv, message):
    source = write_constructed_lora(tmp_path / "in.safetensors")
    error = run_error(resize_lora.main, ["--model", str(source), "--save_to", str(tmp_path / "o.safetensors")] + argv,
                      capsys)
    assert error.startswith(message)


def test_help(capsys):
    with pytest.raises(SystemExit) as exit_info:
        resize_lora.main(["--help"])
    assert exit_info.value.code == 0
    assert "--dynamic_method" in capsys.readouterr().out
