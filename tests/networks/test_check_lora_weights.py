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
