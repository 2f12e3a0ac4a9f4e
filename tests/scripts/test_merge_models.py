"""tools/merge_models.py on tiny checkpoints: Σ ratio_i × W_i per tensor, --unet_only, precision, refusals."""
from __future__ import annotations

import pytest
import torch
from safetensors import safe_open

from library.families import UNET_PREFIX
from library.models.state_dict_io import read_state_dict, write_state_dict
from tests.cli_helpers import run_error
from tools import merge_models


@pytest.fixture()
def two_checkpoints(tiny_models, tmp_path):
    """The tiny SD1 checkpoint and a copy with every float tensor shifted by noise."""
    first = tiny_models.path("sd1")
    generator = torch.Generator().manual_seed(3)
    state = read_state_dict(first)
    shifted = {key: tensor + torch.randn(tensor.shape, generator=generator).to(tensor.dtype)
               if tensor.is_floating_point() else tensor for key, tensor in state.items()}
    second = tmp_path / "b.safetensors"
    write_state_dict(second, shifted)
    return first, second



def test_weighted_merge_is_ratio_sum_per_tensor(two_checkpoints, tmp_path):
    first, second = two_checkpoints
    out = tmp_path / "merged.safetensors"
    merge_models.main(["--models", str(first), str(second), "--ratios", "0.25", "0.75", "--output", str(out)])
    a, b, merged = read_state_dict(first), read_state_dict(second), read_state_dict(out)
    assert list(merged) == list(a)
    for key, tensor in merged.items():
        if tensor.is_floating_point():
            torch.testing.assert_close(tensor, 0.25 * a[key] + 0.75 * b[key], atol=1e-6, rtol=0)
        else:
            assert torch.equal(tensor, a[key])
    with safe_open(str(out), "pt") as handle:
        metadata = handle.metadata()
    assert metadata["modelspec.architecture"] == "stable-diffusion-v1"
    assert metadata["merged_from"] == f"{first.name}×0.25, b.safetensors×0.75"


def test_unet_only_keeps_first_text_encoder_and_vae(two_checkpoints, tmp_path):
    first, second = two_checkpoints
    out = tmp_path / "merged.safetensors"
    merge_models.main(["--models", str(first), str(second), "--unet_only", "--save_to", str(out),
                       "--save_precision", "fp16"])
    a, b, merged = read_state_dict(first), read_state_dict(second), read_state_dict(out)
    for key, tensor in merged.items():
        if key.startswith(UNET_PREFIX):  # default ratios: 1/2 each
            assert tensor.dtype == torch.float16
            torch.testing.assert_close(tensor.float(), (0.5 * a[key] + 0.5 * b[key]).half().float())
        elif tensor.is_floating_point():
            assert torch.equal(tensor, a[key].half())


def test_refusals(two_checkpoints, tiny_models, tmp_path, capsys):
    first, second = two_checkpoints
    out = tmp_path / "out.safetensors"
    argv = ["--models", str(first), str(second), "--ratios", "1", "--output", str(out)]
    error = run_error(merge_models.main, argv, capsys)
    assert error == "error: --ratios: expected one ratio per model (2 for --models), got 1"
    xl = tiny_models.path("sdxl")
    error = run_error(merge_models.main, ["--models", str(first), str(xl), "--output", str(out)], capsys)
    assert error == f"error: --models: {first} is SD1.x but {xl} is SDXL; merge checkpoints of one model family only"
    content = second.read_bytes()
    error = run_error(merge_models.main, ["--models", str(first), str(second), "--output", str(second)], capsys)
    assert error == (f"error: --output {second} is also an input (--models); choose another output file so the "
                     "input stays unchanged")
    assert second.read_bytes() == content
    assert not out.exists()


def test_help(capsys):
    with pytest.raises(SystemExit) as exit_info:
        merge_models.main(["--help"])
    assert exit_info.value.code == 0
    text = capsys.readouterr().out
    assert "--unet_only" in text and "not normalized" in text
