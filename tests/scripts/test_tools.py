"""End-to-end: make_tiny_model, convert_diffusers20_original_sd and the demo, called in-process."""
from __future__ import annotations

import subprocess
import sys

import pytest
import torch

from library.models.load import load_target_model
from library.models.state_dict_io import TensorFile, read_state_dict
from tests.conftest import ROOT
from tools import convert_diffusers20_original_sd as convert_tool
from tools import demo, make_tiny_model


def test_make_tiny_model_is_seeded_and_loads(tmp_path):
    first = make_tiny_model.main([str(tmp_path / "a.safetensors"), "--family", "sd2-v", "--seed", "3"])
    second = make_tiny_model.main([str(tmp_path / "b.safetensors"), "--family", "sd2-v", "--seed", "3"])
    other = make_tiny_model.main([str(tmp_path / "c.safetensors"), "--family", "sd2-v", "--seed", "4"])
    a, b, c = (read_state_dict(path) for path in (first, second, other))
    assert all(torch.equal(a[key], b[key]) for key in a)
    assert not torch.equal(a["model.diffusion_model.out.2.weight"], c["model.diffusion_model.out.2.weight"])
    assert load_target_model(first).family.name == "sd2-v"


@pytest.mark.parametrize("flag,dtype", [("--fp16", torch.float16), ("--bf16", torch.bfloat16), ("--float", torch.float32)])
def test_convert_precision_flags(tmp_path, tiny_models, flag, dtype):
    output = convert_tool.main([flag, str(tiny_models.path("sdxl", "ckpt")), str(tmp_path / "out.safetensors")])
    tensors = read_state_dict(output)
    assert {tensor.dtype for tensor in tensors.values() if tensor.is_floating_point()} == {dtype}
    assert TensorFile(output).metadata["modelspec.architecture"] == "stable-diffusion-xl-v1-base"


def test_convert_all_formats_chain_is_exact(tmp_path, tiny_models):
    source = tiny_models.path("sd1", "safetensors")
    convert_tool.main([str(source), str(tmp_path / "a.ckpt")])
    convert_tool.main([str(tmp_path / "a.ckpt"), str(tmp_path / "b"), "--use_pickle"])
    assert (tmp_path / "b" / "unet" / "diffusion_pytorch_model.bin").exists()
    convert_tool.main(["--v1", str(tmp_path / "b"), str(tmp_path / "c.safetensors")])
    first, last = read_state_dict(source), read_state_dict(tmp_path / "c.safetensors")
    assert first.keys() == last.keys() and all(torch.equal(first[key], last[key]) for key in first)


def test_convert_overwrite_replaces_existing_output(tmp_path, tiny_models):
    target = tmp_path / "out.safetensors"
    target.write_bytes(b"old")
    convert_tool.main([str(tiny_models.path("sd1")), str(target), "--overwrite"])
    assert load_target_model(target).family.name == "sd1"
    assert sorted(path.name for path in tmp_path.iterdir()) == ["out.safetensors"]  # no temp files left


def test_demo_trains_a_lora_samples_generates_with_it_and_reports_where_everything_is(tmp_path, capsys):
    demo.main(["--output_dir", str(tmp_path), "--steps", "4"])
    out = capsys.readouterr().out
    assert "training: accelerate launch sdxl_train_network.py --pretrained_model_name_or_path" in out
    run_dir = next(tmp_path.iterdir())
    lora = run_dir / "lora" / "tkshape.safetensors"
    assert f"LoRA         : {lora}" in out and lora.exists()
    samples = sorted((run_dir / "lora" / "sample").glob("*.png"))
    assert len(samples) == 6  # 2 prompts at first, after step 2 and after step 4
    assert f"samples      : 6 images in {run_dir / 'lora' / 'sample'}" in out
    assert list((run_dir / "logs").rglob("events.out.tfevents.*"))
    assert "over 4 steps" in out
    assert "generating: python sdxl_gen_img.py --ckpt" in out and "--network_weights" in out
    generated = sorted((run_dir / "generated").glob("*.png"))
    assert len(generated) == 4
    assert f"generated    : 4 images with the LoRA in {run_dir / 'generated'}" in out
    from PIL import Image

    with Image.open(generated[0]) as image:
        assert image.text["networks"].startswith("tkshape.safetensors:") and image.size == (64, 64)


@pytest.mark.parametrize("script", ["tools/make_tiny_model.py", "tools/convert_diffusers20_original_sd.py"])
def test_help_explains_the_flags(script):
    result = subprocess.run([sys.executable, str(ROOT / script), "--help"], capture_output=True, text=True, check=True)
    assert "usage:" in result.stdout and "--" in result.stdout
