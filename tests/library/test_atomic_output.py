"""Atomic outputs: permissions from the umask, a full disk is one clear error with the earlier file intact and no
temp file left, and what a killed save leaves behind is recognised."""
from __future__ import annotations

import os
import signal
import stat
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from PIL import Image

from library.models.state_dict_io import DiskFullError, atomic_output, write_state_dict
from tests.conftest import ROOT


@pytest.fixture()
def umask():
    previous = os.umask(0o022)
    try:
        yield lambda value: os.umask(value)
    finally:
        os.umask(previous)


def mode(path: Path) -> int:
    return stat.S_IMODE(path.stat().st_mode)


@pytest.mark.parametrize("mask, file_mode, folder_mode", [(0o022, 0o644, 0o755), (0o077, 0o600, 0o700),
                                                         (0o002, 0o664, 0o775)])
def test_written_files_and_folders_get_the_umask_permissions(tiny_models, tmp_path, umask, mask, file_mode,
                                                             folder_mode):
    from library.models.save import save_model

    umask(mask)
    for suffix in (".safetensors", ".ckpt"):
        path = tmp_path / f"model{suffix}"
        write_state_dict(path, {"weight": torch.ones(2)})
        assert mode(path) == file_mode, suffix
    folder = save_model(tiny_models.bundle("sd1"), tmp_path / "diffusers", save_model_as="diffusers_safetensors")
    assert mode(folder) == folder_mode
    assert mode(folder / "unet") == folder_mode
    assert mode(folder / "unet" / "diffusion_pytorch_model.safetensors") == file_mode


def test_a_failed_write_leaves_the_old_file_and_no_temp_file(tmp_path):
    path = tmp_path / "lora.safetensors"
    path.write_bytes(b"old")
    with pytest.raises(RuntimeError):
        with atomic_output(path) as temp:
            temp.write_bytes(b"half")
            raise RuntimeError("crash while writing")
    assert path.read_bytes() == b"old"
    assert [p.name for p in tmp_path.iterdir()] == ["lora.safetensors"]


@pytest.mark.parametrize("suffix", [".safetensors", ".ckpt"])
def test_a_full_disk_is_one_error_and_keeps_the_earlier_file(small_disk, suffix):
    disk = small_disk(256)
    path = disk / f"model{suffix}"
    write_state_dict(path, {"weight": torch.ones(4)})
    earlier = path.read_bytes()
    with pytest.raises(DiskFullError) as raised:
        write_state_dict(path, {"weight": torch.ones(1 << 18)})  # 1 MiB
    assert str(raised.value).startswith(f"{path}: the disk is full (no space left in {disk}")
    assert path.read_bytes() == earlier
    assert [p.name for p in disk.iterdir()] == [path.name]


@pytest.mark.parametrize("save_model_as", ["safetensors", "ckpt", "diffusers_safetensors"])
def test_a_conversion_into_a_full_disk_writes_nothing(tiny_models, small_disk, save_model_as):
    from library.models.save import save_model

    disk = small_disk(256)
    with pytest.raises(DiskFullError, match="the disk is full"):
        suffix = {"safetensors": ".safetensors", "ckpt": ".ckpt"}.get(save_model_as, "")
        save_model(tiny_models.bundle("sd1"), disk / f"out{suffix}", save_model_as=save_model_as)
    assert list(disk.iterdir()) == []


def test_a_png_into_a_full_disk_is_one_error_and_leaves_nothing(small_disk):
    import numpy as np

    from library.generation.image_output import ImageRecord, save_png

    disk = small_disk(128)
    noise = Image.fromarray(np.random.default_rng(0).integers(0, 255, (512, 512, 3), dtype=np.uint8))
    with pytest.raises(DiskFullError, match="the disk is full"):
        save_png(noise, disk, "image.png", ImageRecord(prompt="a cat", negative_prompt="", seed=1, steps=2, scale=7.0, sampler="ddim",
                                                       width=512, height=512))
    assert list(disk.iterdir()) == []


def test_a_write_killed_with_sigkill_leaves_only_a_recognisable_temp_file(tmp_path):
    """kill -9 cannot be cleaned up after: the half-written data stays under a hidden temp name, never under the
    user's; the next training run of that name removes it (tests/scripts/test_training_safety.py)."""
    target = tmp_path / "lora.safetensors"
    target.write_bytes(b"earlier lora")
    script = f"""
import os, signal, sys
sys.path.insert(0, {str(ROOT)!r})
import safetensors.torch, torch
from library.models.state_dict_io import write_state_dict

def dying_save(tensors, filename, metadata=None):
    with open(filename, "wb") as handle:
        handle.write(b"half a file")
    os.kill(os.getpid(), signal.SIGKILL)

safetensors.torch.save_file = dying_save
write_state_dict({str(target)!r}, {{"weight": torch.ones(3)}})
"""
    result = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=120)
    assert result.returncode == -signal.SIGKILL, result.stderr
    assert target.read_bytes() == b"earlier lora"
    left = [path for path in tmp_path.iterdir() if path != target]
    assert len(left) == 1 and left[0].name.startswith(".lora.safetensors.") and \
        left[0].name.endswith(".tmp.safetensors") and left[0].read_bytes() == b"half a file"


def test_merge_models_into_a_full_disk_is_one_line_and_writes_nothing(tiny_models, small_disk, capsys):
    from tests.cli_helpers import run_error
    from tools import merge_models

    disk = small_disk(256)
    model = tiny_models.path("sd1")
    line = run_error(merge_models.main, ["--models", str(model), str(model), "--output",
                                         str(disk / "merged.safetensors")], capsys)
    assert line.startswith(f"error: {disk / 'merged.safetensors'}: the disk is full (no space left in {disk}")
    assert list(disk.iterdir()) == []
