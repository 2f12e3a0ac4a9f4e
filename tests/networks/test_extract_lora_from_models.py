"""extract_lora_from_models on tiny models: a known low-rank ΔW written into a checkpoint comes back exactly (or as
its best rank-dim approximation), unchanged layers are left out, kohya keys and metadata, refusals."""
from __future__ import annotations

import copy

import pytest
import torch
from safetensors import safe_open

from library.models.save import save_model
from networks import extract_lora_from_models as extract
from networks.lora_file import LoRAPair, read_lora, write_lora
from tests.cli_helpers import run_error
from tests.networks.test_lora import make_network


def low_rank(shape: tuple[int, ...], rank: int, seed: int) -> torch.Tensor:
    """A ΔW of exactly `rank` in a layer's weight shape, entries around 0.3 (far above --min_diff)."""
    generator = torch.Generator().manual_seed(seed)
    columns = int(torch.Size(shape[1:]).numel())
    left = torch.randn(shape[0], rank, generator=generator) * 0.5
    right = torch.randn(rank, columns, generator=generator) * 0.5
    return (left @ right).reshape(shape)


def chosen_modules(network) -> dict[str, torch.nn.Module]:
    """A text-encoder Linear, a U-Net attention Linear and a U-Net 3x3 conv, by kohya name."""
    text_linear = network.text_encoder_loras[0]
    unet_linear = next(m for m in network.unet_loras if m.lora_name.endswith("attn1_to_q"))
    conv3x3 = next(m for m in network.unet_loras if isinstance(m.original_module, torch.nn.Conv2d)
                   and m.original_module.kernel_size == (3, 3))
    return {m.lora_name: m.original_module for m in (text_linear, unet_linear, conv3x3)}


def tuned_checkpoint(tiny_models, family: str, path, rank: int) -> dict[str, torch.Tensor]:
    """Write base + known rank-`rank` ΔWs on three layers; return the ΔWs by kohya name."""
    bundle = copy.deepcopy(tiny_models.bundle(family))
    network = make_network(bundle, dim=1, alpha=1, conv_dim=1)
    deltas = {}
    with torch.no_grad():
        for seed, (name, module) in enumerate(chosen_modules(network).items()):
            deltas[name] = low_rank(tuple(module.weight.shape), rank, seed)
            module.weight += deltas[name]
    save_model(bundle, path)
    return deltas


def run_extract(tiny_models, family, tmp_path, dim, rank, *extra):
    tuned = tmp_path / "tuned.safetensors"
    deltas = tuned_checkpoint(tiny_models, family, tuned, rank)
    output = tmp_path / "extracted.safetensors"
    argv = ["--model_org", str(tiny_models.path(family)), "--model_tuned", str(tuned), "--save_to", str(output),
            "--dim", str(dim), "--conv_dim", str(dim), "--clamp_quantile", "1", *extra]
    modules = extract.main(argv)
    return deltas, modules, output


@pytest.fixture(scope="module")
def extractions(tiny_models, tmp_path_factory) -> dict:
    """One rank-4 extraction of a rank-2 change per family, shared by the tests that only read it."""
    return {family: run_extract(tiny_models, family, tmp_path_factory.mktemp(family), dim=4, rank=2)
            for family in ("sd1", "sdxl")}


@pytest.mark.parametrize("family", ["sd1", "sdxl"])
def test_rank_at_least_r_recovers_the_difference_and_skips_unchanged_layers(extractions, family):
    deltas, modules, output = extractions[family]
    assert set(modules) == set(deltas)  # unchanged layers are below --min_diff, so exactly the changed ones
    saved = read_lora(output)
    assert set(saved.modules) == set(deltas)
    for name, delta in deltas.items():
        pair = saved.modules[name]
        assert pair.rank == 4 and pair.alpha == 4.0  # alpha = rank: scale 1 (kohya, COMPAT §2.1)
        torch.testing.assert_close(pair.delta(), delta, atol=2e-5, rtol=1e-5)
    expected_prefix = "lora_te1_" if family == "sdxl" else "lora_te_"
    assert sorted(name.split("_")[1] for name in deltas) == [expected_prefix.split("_")[1], "unet", "unet"]


def test_rank_below_r_is_the_best_rank_dim_approximation(tiny_models, tmp_path):
    deltas, modules, _ = run_extract(tiny_models, "sd1", tmp_path, dim=1, rank=3)
    for name, delta in deltas.items():
        matrix = delta.double().flatten(1)
        u, s, vh = torch.linalg.svd(matrix, full_matrices=False)
        best = (u[:, :1] * s[:1]) @ vh[:1]
        assert modules[name].rank == 1
        torch.testing.assert_close(modules[name].delta().double().flatten(1), best, atol=2e-5, rtol=1e-4)


def test_conv_layer_shapes_and_kohya_metadata(extractions):
    deltas, _, output = extractions["sdxl"]
    conv_name = next(name for name, delta in deltas.items() if delta.dim() == 4)
    with safe_open(str(output), "pt") as handle:
        metadata = handle.metadata()
        conv_down = handle.get_tensor(f"{conv_name}.lora_down.weight")
        conv_up = handle.get_tensor(f"{conv_name}.lora_up.weight")
        keys = set(handle.keys())
    assert conv_down.shape[1:] == deltas[conv_name].shape[1:] and conv_down.shape[0] == 4
    assert conv_up.shape == (deltas[conv_name].shape[0], 4, 1, 1)
    assert keys == {f"{name}.{suffix}" for name in deltas for suffix in ("lora_down.weight", "lora_up.weight", "alpha")}
    assert {key: metadata[key] for key in metadata if key.startswith("ss_")} == {
        "ss_v2": "False", "ss_base_model_version": "sdxl_base_v1-0", "ss_network_module": "networks.lora",
        "ss_network_dim": "4", "ss_network_alpha": "4", "ss_network_args": '{"conv_dim": 4, "conv_alpha": 4}'}
    assert metadata["modelspec.architecture"] == "stable-diffusion-xl-v1-base/lora"
    assert len(metadata["sshs_model_hash"]) == 64 and len(metadata["sshs_legacy_hash"]) == 8


def test_no_metadata_and_precision(tiny_models, tmp_path):
    tuned = tmp_path / "tuned.safetensors"
    tuned_checkpoint(tiny_models, "sd1", tuned, rank=2)
    output = tmp_path / "extracted.safetensors"
    extract.main(["--model_org", str(tiny_models.path("sd1")), "--model_tuned", str(tuned), "--save_to", str(output),
                  "--no_metadata", "--save_precision", "fp16"])
    with safe_open(str(output), "pt") as handle:
        metadata = handle.metadata()
        keys = handle.keys()
        dtypes = {handle.get_tensor(key).dtype for key in keys}
    assert dtypes == {torch.float16}
    assert not any(key.startswith("modelspec.") for key in metadata)
    assert metadata["ss_base_model_version"] == "sd_v1" and metadata["ss_network_args"] == "{}"
    assert read_lora(output).ranks() == {4}  # default --dim 4, and no 3x3 module without --conv_dim


def test_mixed_families_are_refused(tiny_models, tmp_path, capsys):
    output = tmp_path / "out.safetensors"
    error = run_error(extract.main, ["--model_org", str(tiny_models.path("sd1")), "--model_tuned", str(tiny_models.path("sdxl")),
                       "--save_to", str(output)], capsys)
    assert "is an SDXL model but --model_org" in error and "same family" in error
    assert not output.exists()


def test_a_lora_as_model_org_is_refused(tiny_models, tmp_path, capsys):
    lora_path = tmp_path / "style.safetensors"
    write_lora(lora_path, {"lora_unet_x": LoRAPair(torch.ones(2, 3), torch.ones(3, 2), 2.0)}, {})
    error = run_error(extract.main, ["--model_org", str(lora_path), "--model_tuned", str(tiny_models.path("sd1")),
                       "--save_to", str(tmp_path / "out.safetensors")], capsys)
    assert error == (f"error: {lora_path}: is a LoRA file, not a model checkpoint; --model_org takes a full "
                     "checkpoint (.safetensors/.ckpt) or a diffusers folder")


def test_save_to_an_input_is_refused(tiny_models, tmp_path, capsys):
    tuned = tmp_path / "tuned.safetensors"
    tuned.write_bytes(tiny_models.path("sd1").read_bytes())
    before = tuned.read_bytes()
    error = run_error(extract.main, ["--model_org", str(tiny_models.path("sd1")), "--model_tuned", str(tuned),
                       "--save_to", str(tuned)], capsys)
    assert error.startswith(f"error: --save_to {tuned} is also an input (--model_tuned)")
    assert tuned.read_bytes() == before


def test_identical_models_have_nothing_to_extract(tiny_models, tmp_path, capsys):
    base = str(tiny_models.path("sd1"))
    error = run_error(extract.main, ["--model_org", base, "--model_tuned", base, "--save_to", str(tmp_path / "o.safetensors")],
                      capsys)
    assert "no module differs from --model_org by --min_diff 0.01 or more" in error
