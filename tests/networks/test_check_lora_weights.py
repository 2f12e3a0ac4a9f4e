"""check_lora_weights: hand-computed statistics, all-zero and NaN modules flagged with exit code 1, --json, --top,
and a checkpoint refused with exit code 2."""
from __future__ import annotations

import json
import math
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from library.cli import run_cli
from networks import check_lora_weights
from networks.lora_file import LoRAPair, write_lora

ROOT = Path(__file__).resolve().parents[2]


@pytest.fixture()
def lora_path(tmp_path) -> Path:
    """good: ΔW = 0.5 × [[3], [4]] @ [[1, 2]] = [[1.5, 3], [2, 4]]; zero: up all zero; nan: a NaN in down."""
    path = tmp_path / "checked.safetensors"
    write_lora(path, {
        "lora_unet_good": LoRAPair(torch.tensor([[1.0, 2.0]]), torch.tensor([[3.0], [4.0]]), 0.5),
        "lora_unet_zero": LoRAPair(torch.ones(1, 2), torch.zeros(2, 1), 1.0),
        "lora_te_nan": LoRAPair(torch.tensor([[float("nan"), 1.0]]), torch.ones(2, 1), 1.0),
    }, {})
    return path


def test_statistics_are_the_hand_computed_values(lora_path, capsys):
    report = check_lora_weights.main([str(lora_path)])
    good = next(stats for stats in report.modules if stats.name == "lora_unet_good")
    assert (good.rank, good.alpha, good.delta_max, good.up_mean_abs, good.down_mean_abs) == (1, 0.5, 4.0, 3.5, 1.5)
    assert good.delta_norm == pytest.approx(math.sqrt(1.5 ** 2 + 3 ** 2 + 2 ** 2 + 4 ** 2))
    assert good.problem == ""
    assert capsys.readouterr().out.splitlines() == [
        "module          rank    alpha      |dW|_F     max|dW|    mean|up|  mean|down|",
        "lora_te_nan        1        1         nan         nan           1         nan  <- non-finite (NaN/inf) values",
        "lora_unet_good     1      0.5        5.59           4         3.5         1.5",
        "lora_unet_zero     1        1           0           0           0           1  <- all zero (no effect)",
        f"{lora_path}: 3 modules (1 text encoder, 2 U-Net), ranks 1; 2 flagged",
        "  lora_te_nan: non-finite (NaN/inf) values",
        "  lora_unet_zero: all zero (no effect)",
    ]


def test_flagged_modules_give_exit_code_1(lora_path, capsys):
    with pytest.raises(SystemExit) as exit_info:
        run_cli(check_lora_weights.command_line, [str(lora_path)])
    assert exit_info.value.code == 1


def test_a_clean_file_exits_0_and_top_limits_the_listing(tmp_path, capsys):
    path = tmp_path / "clean.safetensors"
    modules = {f"lora_unet_m{index}": LoRAPair(torch.ones(1, 2) * (index + 1), torch.ones(2, 1), 1.0)
               for index in range(3)}
    write_lora(path, modules, {})
    run_cli(check_lora_weights.command_line, [str(path), "--top", "1"])  # no SystemExit: exit code 0
    lines = capsys.readouterr().out.splitlines()
    assert [line.split()[0] for line in lines[1:-1]] == ["lora_unet_m2", "(2"]
    assert lines[2] == "(2 smaller modules not shown; --show_all lists them)"


def test_json_is_one_object_with_nan_as_null(lora_path, capsys):
    check_lora_weights.main([str(lora_path), "--json"])
    parsed = json.loads(capsys.readouterr().out)
    assert parsed["flagged"] == ["lora_te_nan", "lora_unet_zero"] and parsed["exit_code"] == 1
    nan_module = parsed["modules"][0]
    assert nan_module["name"] == "lora_te_nan" and nan_module["delta_norm"] is None


def test_a_checkpoint_is_refused_with_exit_code_2(tiny_models):
    result = subprocess.run([sys.executable, "networks/check_lora_weights.py", str(tiny_models.path("sd1"))],
                            cwd=ROOT, capture_output=True, text=True, check=False)
    assert result.returncode == 2
    assert result.stderr.strip().splitlines()[-1] == (
        f"error: {tiny_models.path('sd1')}: is a model checkpoint, not a LoRA; pass it as the model "
        "(e.g. --sd_model / --model_org)")


@pytest.fixture(scope="module")
def sdxl_lora_with_text_encoders(tiny_models, tmp_path_factory) -> Path:
    """An SDXL LoRA trained by our trainer with both text encoders (2 steps on the tiny SDXL)."""
    import sdxl_train_network
    from tests.scripts.test_train_network import base_argv, dataset_toml

    folder = tmp_path_factory.mktemp("sdxl_te_lora")
    sdxl_train_network.main(base_argv(tiny_models.path("sdxl"), dataset_toml(folder), folder / "out",
                                      "--max_train_steps", "2", "--learning_rate", "1e-2"))
    return folder / "out" / "lora.safetensors"


def test_an_sdxl_lora_trained_with_text_encoders_passes_and_lists_te1_last_layer(sdxl_lora_with_text_encoders,
                                                                                 tiny_models, capsys):
    layers = tiny_models.bundle("sdxl").text_encoders[0].config.num_hidden_layers
    run_cli(check_lora_weights.command_line, [str(sdxl_lora_with_text_encoders), "--json"])  # exit code 0
    parsed = json.loads(capsys.readouterr().out)
    prefix = f"lora_te1_text_model_encoder_layers_{layers - 1}_"
    assert parsed["exit_code"] == 0 and parsed["flagged"] == []
    assert sorted(parsed["never_trained"]) == sorted(
        prefix + suffix for suffix in ("mlp_fc1", "mlp_fc2", "self_attn_k_proj", "self_attn_out_proj",
                                       "self_attn_q_proj", "self_attn_v_proj"))
    # TE2's last layer feeds the pooled embedding, so it learns
    assert not any(name.startswith("lora_te2") for name in parsed["never_trained"])
    run_cli(check_lora_weights.command_line, [str(sdxl_lora_with_text_encoders)])
    lines = capsys.readouterr().out.splitlines()
    assert "; 6 never trained (not used by this model family), 0 flagged" in lines[-2]
    assert lines[-1].startswith("  never trained (not used by this model family): " + prefix)


@pytest.mark.parametrize("damage, expected", [
    ("zero", "all zero (no effect)"),
    ("nan", "non-finite (NaN/inf) values"),
    ("missing_up", "damaged: lora_unet_{0}.lora_down.weight has no matching lora_unet_{0}.lora_up.weight"),
    ("bad_shape", "damaged: lora_unet_{0}.lora_up.weight has shape"),
])
def test_real_damage_in_a_trained_sdxl_lora_still_exits_1_naming_the_module(sdxl_lora_with_text_encoders, tmp_path,
                                                                            capsys, damage, expected):
    from safetensors.torch import load_file, save_file

    tensors = load_file(sdxl_lora_with_text_encoders)
    module = next(key for key in sorted(tensors) if key.startswith("lora_unet_") and key.endswith(".lora_up.weight"))
    name = module[: -len(".lora_up.weight")]
    if damage == "zero":
        tensors[module] = torch.zeros_like(tensors[module])
    elif damage == "nan":
        tensors[module][0, 0] = float("nan")
    elif damage == "missing_up":
        del tensors[module]
    else:
        tensors[module] = tensors[module][:, :1].contiguous()
    path = tmp_path / "damaged.safetensors"
    save_file(tensors, str(path))
    with pytest.raises(SystemExit) as exit_info:
        run_cli(check_lora_weights.command_line, [str(path)])
    assert exit_info.value.code == 1
    lines = capsys.readouterr().out.splitlines()
    assert any(line.startswith(f"  {name}: " + expected.format(name[len('lora_unet_'):])) for line in lines), lines
    assert "1 flagged" in next(line for line in lines if line.startswith(str(path)))


def test_sd1_layers_past_the_recorded_clip_skip_are_never_trained(tmp_path, capsys):
    def module(value: float) -> LoRAPair:
        return LoRAPair(torch.ones(1, 2), torch.full((2, 1), value), 1.0)

    modules = {"lora_te_text_model_encoder_layers_0_mlp_fc1": module(1.0),
               "lora_te_text_model_encoder_layers_1_mlp_fc1": module(0.0),
               "lora_unet_down_blocks_0_attentions_0_proj_in": module(1.0)}
    path = tmp_path / "clip_skip_2.safetensors"
    write_lora(path, modules, {"ss_clip_skip": "2"})
    assert check_lora_weights.main([str(path)]).exit_code == 0
    assert "never trained (not used by this model family): lora_te_text_model_encoder_layers_1_mlp_fc1" in \
        capsys.readouterr().out
    # without clip_skip the last layer is used, so an all-zero module there is damage
    write_lora(path, modules, {"ss_clip_skip": "None"}, overwrite=True)
    report = check_lora_weights.main([str(path)])
    assert report.exit_code == 1 and [stats.name for stats in report.flagged] == [
        "lora_te_text_model_encoder_layers_1_mlp_fc1"]


def test_help_says_what_each_exit_code_means():
    result = subprocess.run([sys.executable, "networks/check_lora_weights.py", "--help"], cwd=ROOT,
                            capture_output=True, text=True, check=True)
    text = " ".join(result.stdout.split())
    assert "0 the file is healthy" in text
    assert "1 real damage: NaN/inf values, an all-zero module that could have learned" in text
    assert "2 the file cannot be read as a LoRA" in text
