"""train_network.py under bad input and faults: no code runs from a state folder, nothing of the user's is
overwritten, and every fault is one line with exit code 2 — before any model loads where it can, before the
training loop otherwise. One shared 1-step run with a saved state keeps this file fast."""
from __future__ import annotations

import logging
import os
import shutil
import stat
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

import train_network
from library.train.network_trainer import NetworkTrainer
from tests.cli_helpers import run_error
from tests.payloads import write_payload
from tests.scripts.test_train_network import base_argv, dataset_toml, run_sd


def tree_bytes(folder: Path) -> dict[str, bytes | None]:
    """Every file (bytes) and folder (None) under `folder`, to show nothing was touched."""
    return {str(path.relative_to(folder)): (path.read_bytes() if path.is_file() else None)
            for path in sorted(folder.rglob("*"))}


@pytest.fixture(scope="session")
def trained_state(tiny_models, tmp_path_factory):
    """One SD1 LoRA run of 2 steps saving its state after step 1: (dataset toml, output folder, state folder)."""
    folder = tmp_path_factory.mktemp("trained_state")
    toml = dataset_toml(folder)
    out = folder / "out"
    run_sd(base_argv(tiny_models.path("sd1"), toml, out, "--max_train_steps", "2", "--save_every_n_steps", "1",
                     "--save_state", "--optimizer_type", "AdamW", "--network_train_unet_only"))
    return toml, out, out / "lora-step00000001-state"


@pytest.fixture()
def no_model_loads(monkeypatch):
    import library.models.load as load

    def must_not_load(*args, **kwargs):
        raise AssertionError("a model was loaded before the bad input was noticed")

    monkeypatch.setattr(load, "load_target_model", must_not_load)


def resume_copy(trained_state, tmp_path) -> tuple[Path, Path]:
    toml, _, state = trained_state
    copy = tmp_path / "resume" / state.name
    shutil.copytree(state, copy)
    return toml, copy


# ------------------------------------------------------------------------------------------- no code from states


def test_a_payload_beside_the_network_state_is_never_read_and_resume_works(tiny_models, trained_state, tmp_path):
    """The attack the issue found: accelerate read custom_checkpoint_0.pkl with weights_only=False."""
    toml, state = resume_copy(trained_state, tmp_path)
    marker = tmp_path / "code-ran"
    for name in ("custom_checkpoint_0.pkl", "sampler.bin", "dl_state_dict.bin"):
        write_payload(state / name, marker)
    trainer, final = run_sd(base_argv(tiny_models.path("sd1"), toml, state.parent, "--max_train_steps", "2",
                                      "--optimizer_type", "AdamW", "--network_train_unet_only", "--resume", str(state)))
    assert final.exists() and len(trainer.loss_history) == 1  # step 2 only
    assert not marker.exists()


@pytest.mark.parametrize("name", ["optimizer.bin", "scheduler.bin", "random_states_0.pkl"])
def test_a_payload_in_a_state_file_is_refused_with_one_line_and_runs_nothing(tiny_models, trained_state, tmp_path,
                                                                             capsys, name):
    toml, state = resume_copy(trained_state, tmp_path)
    marker = tmp_path / "code-ran"
    write_payload(state / name, marker, {"state": {}, "param_groups": []})
    before = tree_bytes(state.parent)
    line = run_error(train_network.main, base_argv(
        tiny_models.path("sd1"), toml, state.parent, "--max_train_steps", "2", "--optimizer_type", "AdamW",
        "--network_train_unet_only", "--resume", str(state)), capsys)
    assert line == (f"error: --resume {state}: {state / name}: contains Python objects other than tensors and plain "
                    "values; refusing to unpickle it, so no code in it can run")
    assert not marker.exists()
    assert tree_bytes(state.parent) == before


def test_resuming_with_another_network_dim_fails_before_the_loop(tiny_models, trained_state, tmp_path):
    toml, state = resume_copy(trained_state, tmp_path)

    class NoLoop(NetworkTrainer):
        def loop(self, *args):
            raise AssertionError("the training loop started")

    with pytest.raises(Exception) as raised:
        run_sd(base_argv(tiny_models.path("sd1"), toml, state.parent, "--max_train_steps", "2", "--optimizer_type",
                         "AdamW", "--network_train_unet_only", "--resume", str(state), "--network_dim", "8"), NoLoop)
    message = str(raised.value)
    assert message.startswith(f"--resume {state}: model.safetensors: lora_unet_")
    assert "has shape (4, " in message and "this run's network has (8, " in message and "--network_dim" in message


# --------------------------------------------------------------------------------- nothing of the user's is lost


def test_output_name_with_a_folder_part_is_refused_and_the_file_outside_is_untouched(tiny_models, tmp_path, capsys,
                                                                                      no_model_loads):
    """`--output_dir out/.. --output_name out/x` used to replace out/x.safetensors past the existing-file guard."""
    out = tmp_path / "out"
    out.mkdir()
    (out / "x.safetensors").write_bytes(b"precious")
    for name in ("out/x", "..", "a\\b"):
        line = run_error(train_network.main, base_argv(tiny_models.path("sd1"), dataset_toml(tmp_path), out / "..")
                         + ["--output_name", name], capsys)
        assert line == (f"error: --output_name {name!r}: expected a file name without folders (no '/', '\\' or "
                        "'..'); put the folder in --output_dir")
    assert (out / "x.safetensors").read_bytes() == b"precious"


def test_a_new_run_does_not_replace_an_existing_state_folder(tiny_models, trained_state, tmp_path, capsys,
                                                             no_model_loads):
    toml, state = resume_copy(trained_state, tmp_path)
    before = tree_bytes(state.parent)
    line = run_error(train_network.main, base_argv(tiny_models.path("sd1"), toml, state.parent), capsys)
    assert line == (f"error: --output_dir {state.parent} already holds {state.name} for --output_name lora; choose "
                    "another --output_name, move the files, or pass --overwrite_output")
    assert tree_bytes(state.parent) == before


def test_the_next_run_removes_what_killed_saves_left_and_writes_with_umask_permissions(tiny_models, tmp_path,
                                                                                       caplog):
    out = tmp_path / "out"
    out.mkdir()
    left = [out / ".lora.safetensors.a1b2c3d4.tmp.safetensors", out / ".lora-step00000002.safetensors.x_y7z9k2.tmp",
            out / "lora-step00000002-state.partial"]
    left[0].write_bytes(b"half")
    left[1].write_bytes(b"half, from an earlier version")
    left[2].mkdir()
    (left[2] / "optimizer.bin").write_bytes(b"half")
    unrelated = [out / ".other.safetensors.a1b2c3d4.tmp", out / "notes.txt"]
    for path in unrelated:
        path.write_text("keep me")
    previous = os.umask(0o022)
    try:
        with caplog.at_level(logging.INFO, logger="library.train.checkpoints"):
            run_sd(base_argv(tiny_models.path("sd1"), dataset_toml(tmp_path), out, "--max_train_steps", "1",
                             "--network_train_unet_only", "--save_state"))
    finally:
        os.umask(previous)
    assert not any(path.exists() for path in left)
    assert all(path.read_text() == "keep me" for path in unrelated)
    for path in left:
        assert f"removed {path}, left by an interrupted save" in caplog.text
    assert stat.S_IMODE((out / "lora.safetensors").stat().st_mode) == 0o644
    assert stat.S_IMODE((out / "lora-state").stat().st_mode) == 0o755
    assert stat.S_IMODE((out / "lora-state" / "model.safetensors").stat().st_mode) == 0o644


def test_a_final_save_on_a_full_disk_keeps_the_network_in_the_temp_folder(tiny_models, tmp_path, monkeypatch,
                                                                          capsys):
    import errno
    import tempfile

    import safetensors.torch

    out = tmp_path / "out"
    rescue = tmp_path / "system-temp"
    rescue.mkdir()
    monkeypatch.setattr(tempfile, "gettempdir", lambda: str(rescue))
    real_save = safetensors.torch.save_file

    def full_in_output_dir(tensors, filename, metadata=None):
        if Path(filename).parent == out:
            raise OSError(errno.ENOSPC, "No space left on device")
        return real_save(tensors, filename, metadata=metadata)

    monkeypatch.setattr(safetensors.torch, "save_file", full_in_output_dir)
    line = run_error(train_network.main, base_argv(tiny_models.path("sd1"), dataset_toml(tmp_path), out,
                                                   "--max_train_steps", "1", "--network_train_unet_only"), capsys)
    kept = rescue / "lora.safetensors"
    assert line.startswith(f"error: {out / 'lora.safetensors'}: the disk is full (no space left in {out}")
    assert line.endswith(f"The network of step 1 was saved to {kept} instead; move it where you want it")
    assert any(key.endswith("lora_up.weight") for key in load_file(kept))
    assert list(out.iterdir()) == []  # no half-written file, no temp file


# ---------------------------------------------------------------------------- checked before any model loads


@pytest.mark.parametrize("extra, expected", [
    (["--network_dim", "-4"], "error: --network_dim -4: expected a rank of at least 1"),
    (["--network_dim", "0"], "error: --network_dim 0: expected a rank of at least 1"),
    (["--learning_rate", "1e38"], "error: --learning_rate 1e+38: expected a learning rate from 0 to 100"),
    (["--learning_rate", "-1"], "error: --learning_rate -1.0: expected a learning rate from 0 to 100"),
    (["--learning_rate", "nan"], "error: --learning_rate nan: expected a learning rate from 0 to 100"),
    (["--learning_rate", "0"], "error: --learning_rate 0: every part that would train has a learning rate of 0 "
                               "(0 freezes a part); nothing would train"),
    (["--unet_lr", "-0.5"], "error: --unet_lr -0.5: expected a learning rate from 0 to 100"),
])
def test_bad_numbers_are_one_line_before_models_load(tiny_models, tmp_path, capsys, no_model_loads, extra, expected):
    line = run_error(train_network.main, base_argv(tiny_models.path("sd1"), dataset_toml(tmp_path), tmp_path / "out",
                                                   *extra), capsys)
    assert line == expected
    assert not (tmp_path / "out").exists()


@pytest.mark.skipif(torch.cuda.is_available(), reason="fp16 works on a GPU")
def test_fp16_without_a_gpu_is_refused_before_models_load(tiny_models, tmp_path, capsys, no_model_loads):
    line = run_error(train_network.main, base_argv(tiny_models.path("sd1"), dataset_toml(tmp_path), tmp_path / "out",
                                                   "--mixed_precision", "fp16"), capsys)
    assert line == ("error: --mixed_precision fp16 needs a GPU, and this run has none (the device is the CPU); use "
                    "--mixed_precision bf16 or no")


def test_output_and_logging_folders_that_are_files_are_refused_before_models_load(tiny_models, tmp_path, capsys,
                                                                                   no_model_loads):
    blocker = tmp_path / "a-file"
    blocker.write_text("not a folder")
    toml = dataset_toml(tmp_path)
    line = run_error(train_network.main, base_argv(tiny_models.path("sd1"), toml, blocker), capsys)
    assert line == (f"error: --output_dir {blocker}: is a file; expected a folder (or a path where one can be "
                    "created)")
    line = run_error(train_network.main, base_argv(tiny_models.path("sd1"), toml, blocker / "sub"), capsys)
    assert line == f"error: --output_dir {blocker / 'sub'}: cannot be created because {blocker} is a file"
    line = run_error(train_network.main, base_argv(tiny_models.path("sd1"), toml, tmp_path / "out",
                                                   "--logging_dir", str(blocker)), capsys)
    assert line.startswith(f"error: --logging_dir {blocker}: is a file")
    assert blocker.read_text() == "not a folder"


def test_a_read_only_output_folder_is_refused_before_models_load(tiny_models, tmp_path, small_disk, capsys,
                                                                 no_model_loads):
    import subprocess

    disk = small_disk(64)
    result = subprocess.run(["mount", "-o", "remount,ro", str(disk)], capture_output=True, text=True, check=False)
    if result.returncode:
        pytest.skip(f"cannot remount the tmpfs read-only: {result.stderr.strip()}")
    line = run_error(train_network.main, base_argv(tiny_models.path("sd1"), dataset_toml(tmp_path), disk / "out"),
                     capsys)
    assert line == (f"error: --output_dir {disk / 'out'}: cannot write in {disk} (Read-only file system); choose a "
                    "folder you can write to")


def test_a_utf16_sample_prompt_file_is_refused_at_start(tiny_models, tmp_path, capsys, no_model_loads):
    prompts = tmp_path / "prompts.txt"
    prompts.write_text("a red circle\n", encoding="utf-16")
    line = run_error(train_network.main, base_argv(tiny_models.path("sd1"), dataset_toml(tmp_path), tmp_path / "out",
                                                   "--sample_prompts", str(prompts)), capsys)
    assert line == f"error: --sample_prompts {prompts}: expected UTF-8 text, got UTF-16 text; save the file as UTF-8"


def test_a_full_checkpoint_as_network_weights_says_it_is_a_full_model(tiny_models, tmp_path, capsys, no_model_loads):
    model = tiny_models.path("sd1")
    line = run_error(train_network.main, base_argv(model, dataset_toml(tmp_path), tmp_path / "out",
                                                   "--network_weights", str(model)), capsys)
    assert line == (f"error: --network_weights {model}: is a full model checkpoint, not a network (LoRA) file; a "
                    "base model goes in --pretrained_model_name_or_path")


# ------------------------------------------------------------------------- checked once the model is loaded


def test_clip_skip_beyond_the_encoder_is_one_line(tiny_models, tmp_path, capsys):
    layers = tiny_models.bundle("sd1").text_encoders[0].config.num_hidden_layers
    line = run_error(train_network.main, base_argv(tiny_models.path("sd1"), dataset_toml(tmp_path), tmp_path / "out",
                                                   "--clip_skip", "100"), capsys)
    assert line == (f"error: --clip_skip 100: this model's text encoder has only {layers} layers; expected 1 to "
                    f"{layers} (2 = the penultimate layer)")


def test_too_little_free_space_is_refused_before_the_loop(tiny_models, tmp_path, monkeypatch, capsys):
    import shutil as shutil_module
    from collections import namedtuple

    usage = namedtuple("usage", "total used free")
    real_usage = shutil_module.disk_usage
    out = tmp_path / "out"
    monkeypatch.setattr("library.output_folders.shutil.disk_usage",
                        lambda path: usage(1 << 30, 1 << 30, 1000) if str(path).startswith(str(tmp_path))
                        else real_usage(path))
    line = run_error(train_network.main, base_argv(tiny_models.path("sd1"), dataset_toml(tmp_path), out,
                                                   "--save_state"), capsys)
    assert line.startswith(f"error: --output_dir {out}: only 1000 bytes free there, but the final network and its "
                           "state needs about ")
    assert not out.exists() or not any(out.iterdir())
