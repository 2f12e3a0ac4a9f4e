"""Training-state folders: exact round trip, nothing in a state folder can run code, and every missing, truncated,
unsafe or foreign file is one error naming the file before anything is applied."""
from __future__ import annotations

import json
import random
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch

from library.errors import FlagError
from library.models.state_dict_io import DiskFullError
from library.train import state_folder
from library.train.checkpoints import TrainProgress
from tests.payloads import write_payload


class FakeAccelerator:
    """The part of accelerate's Accelerator the state folder uses, for one process."""

    is_main_process = True
    process_index = 0
    num_processes = 1
    device = torch.device("cpu")

    def __init__(self, scaler=None):
        self.scaler = scaler


class TinyNetwork(torch.nn.Module):
    def __init__(self, rank: int = 3):
        super().__init__()
        self.lora_unet_a = torch.nn.Linear(4, rank, bias=False)
        self.lora_unet_b = torch.nn.Linear(rank, 2, bias=False)
        self.register_buffer("alpha", torch.tensor(1.5))


def training_objects(rank: int = 3, optimizer_class=torch.optim.AdamW):
    network = TinyNetwork(rank)
    optimizer = optimizer_class(network.parameters(), lr=1e-2)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: 1.0 / (1 + step))
    return network, optimizer, scheduler


def take_steps(network, optimizer, scheduler, steps: int = 2) -> None:
    for _ in range(steps):
        loss = network.lora_unet_b(network.lora_unet_a(torch.randn(5, 4))).square().mean()
        loss.backward()
        optimizer.step()
        scheduler.step()
        optimizer.zero_grad()


@pytest.fixture()
def saved_state(tmp_path) -> Path:
    torch.manual_seed(0)
    network, optimizer, scheduler = training_objects()
    take_steps(network, optimizer, scheduler)
    folder = tmp_path / "lora-step00000002-state"
    state_folder.save_state(FakeAccelerator(), folder, TrainProgress(epoch=1, batch_in_epoch=2, global_step=2),
                            network, optimizer, scheduler)
    return folder


def test_round_trip_restores_network_optimizer_scheduler_and_random_states(tmp_path):
    torch.manual_seed(0)
    network, optimizer, scheduler = training_objects()
    take_steps(network, optimizer, scheduler)
    folder = tmp_path / "state"
    random.seed(3)
    np.random.seed(4)
    torch.manual_seed(5)
    state_folder.save_state(FakeAccelerator(), folder, TrainProgress(epoch=2, batch_in_epoch=1, global_step=7),
                            network, optimizer, scheduler)
    expected_draws = (random.random(), float(np.random.rand()), float(torch.rand(1)))
    assert sorted(path.name for path in folder.iterdir()) == [
        "model.safetensors", "optimizer.bin", "random_states_0.pkl", "scheduler.bin", "train_state.json"]
    assert not folder.with_name("state.partial").exists()
    take_steps(network, optimizer, scheduler)  # move on, then come back

    fresh = training_objects()
    progress = state_folder.load_state(FakeAccelerator(), folder, *fresh)
    assert (progress.epoch, progress.batch_in_epoch, progress.global_step) == (2, 1, 7)
    assert (random.random(), float(np.random.rand()), float(torch.rand(1))) == expected_draws
    assert fresh[2].last_epoch == 2
    # continuing from the restored objects equals continuing from the originals at save time
    original = training_objects()
    state_folder.load_state(FakeAccelerator(), folder, *original)
    torch.manual_seed(9)
    take_steps(*fresh, steps=1)
    torch.manual_seed(9)
    take_steps(*original, steps=1)
    assert all(torch.equal(a, b) for a, b in zip(fresh[0].state_dict().values(), original[0].state_dict().values()))


# file a state holds -> how the payload is planted; "read" says whether resuming reads (and so refuses) it
PAYLOAD_CASES = {
    "optimizer.bin": True,
    "scheduler.bin": True,
    "random_states_0.pkl": True,
    "scaler.pt": True,
    "custom_checkpoint_0.pkl": False,  # accelerate's name for registered objects: not read while model.safetensors is
    "sampler.bin": False,  # accelerate's sampler state: we keep data order by (seed, epoch), so it is never read
    "dl_state_dict.bin": False,
    "pytorch_model.bin": False,
}


class FakeScaler:
    def __init__(self):
        self.loaded = None

    def state_dict(self):
        return {"scale": 1024.0, "growth_factor": 2.0}

    def load_state_dict(self, state):
        self.loaded = state


@pytest.mark.parametrize("name, read", PAYLOAD_CASES.items())
def test_a_code_payload_in_any_state_file_never_runs(saved_state, tmp_path, name, read):
    marker = tmp_path / "code-ran"
    write_payload(saved_state / name, marker, {"state": {}, "param_groups": []})
    accelerator = FakeAccelerator(scaler=FakeScaler() if name == "scaler.pt" else None)
    if read:
        with pytest.raises(FlagError) as raised:
            state_folder.load_state(accelerator, saved_state, *training_objects())
        assert f"{saved_state / name}: contains Python objects" in str(raised.value)
        assert "refusing to unpickle" in str(raised.value)
    else:
        state_folder.load_state(accelerator, saved_state, *training_objects())
    assert not marker.exists()


@pytest.mark.parametrize("legacy", ["custom_checkpoint_0.pkl", "pytorch_model.bin"])
def test_network_payload_in_a_state_without_model_safetensors_is_refused(saved_state, tmp_path, legacy):
    marker = tmp_path / "code-ran"
    (saved_state / "model.safetensors").unlink()
    write_payload(saved_state / legacy, marker, {"lora_unet_a.weight": torch.zeros(3, 4)})
    with pytest.raises(FlagError, match=f"{legacy}: contains Python objects.*refusing to unpickle"):
        state_folder.load_state(FakeAccelerator(), saved_state, *training_objects())
    assert not marker.exists()


def test_our_earlier_pickled_network_state_still_resumes(saved_state):
    """States of earlier versions hold the network as custom_checkpoint_0.pkl: plain tensors, read weights-only."""
    expected = state_folder.TensorFile(saved_state / "model.safetensors").read()
    torch.save(expected, saved_state / "custom_checkpoint_0.pkl")
    (saved_state / "model.safetensors").unlink()
    network, optimizer, scheduler = training_objects()
    state_folder.load_state(FakeAccelerator(), saved_state, network, optimizer, scheduler)
    assert all(torch.equal(network.state_dict()[key], value) for key, value in expected.items())


def test_a_code_payload_in_train_state_json_is_just_bad_json(saved_state):
    (saved_state / "train_state.json").write_text('{"current_step": "__import__(\'os\')", "epoch": 1}')
    with pytest.raises(FlagError, match=r"train_state.json: current_step: expected a whole number >= 0"):
        state_folder.load_state(FakeAccelerator(), saved_state, *training_objects())
    (saved_state / "train_state.json").write_text("{not json")
    with pytest.raises(FlagError, match="train_state.json is not valid JSON"):
        state_folder.load_state(FakeAccelerator(), saved_state, *training_objects())


def _assert_nothing_applied(network, before):
    assert all(torch.equal(network.state_dict()[key], value) for key, value in before.items())


@pytest.mark.parametrize("damage, message", [
    (lambda folder: (folder / "scheduler.bin").unlink(), r"has no scheduler.bin \(the learning-rate scheduler"),
    (lambda folder: (folder / "random_states_0.pkl").unlink(), r"has no random_states_0.pkl"),
    (lambda folder: (folder / "model.safetensors").unlink(), r"has no model.safetensors"),
    (lambda folder: (folder / "train_state.json").unlink(), r"has no train_state.json"),
    (lambda folder: _truncate(folder / "optimizer.bin"), r"optimizer.bin: not a readable torch file \(truncated"),
    (lambda folder: _truncate(folder / "model.safetensors"), r"model.safetensors: .*(truncated|corrupt)"),
    (lambda folder: (folder / "optimizer.bin").write_text("hello"), r"optimizer.bin: not a readable torch file"),
])
def test_missing_or_truncated_files_are_named_and_nothing_is_applied(saved_state, damage, message):
    damage(saved_state)
    objects = training_objects()
    before = {key: value.clone() for key, value in objects[0].state_dict().items()}
    with pytest.raises(FlagError, match=message) as raised:
        state_folder.load_state(FakeAccelerator(), saved_state, *objects)
    assert str(raised.value).startswith(f"--resume {saved_state}: ")
    _assert_nothing_applied(objects[0], before)


def _truncate(path: Path) -> None:
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])


def test_a_network_of_another_rank_names_the_tensor_and_both_shapes(saved_state):
    objects = training_objects(rank=5)
    before = {key: value.clone() for key, value in objects[0].state_dict().items()}
    with pytest.raises(FlagError) as raised:
        state_folder.load_state(FakeAccelerator(), saved_state, *objects)
    assert str(raised.value) == (f"--resume {saved_state}: model.safetensors: lora_unet_a.weight has shape (3, 4), "
                                 "this run's network has (5, 4) (saved with another --network_dim or --network_args?)")
    _assert_nothing_applied(objects[0], before)


def test_a_network_with_other_modules_is_named(saved_state):
    network, optimizer, scheduler = training_objects()
    network.extra = torch.nn.Linear(2, 2)
    with pytest.raises(FlagError, match=r"model.safetensors holds another network \(3 tensors, this run's has 5; "
                                        r"it lacks extra.weight\)"):
        state_folder.load_state(FakeAccelerator(), saved_state, network, optimizer, scheduler)


def test_an_optimizer_of_another_type_is_named(saved_state):
    objects = training_objects(optimizer_class=torch.optim.SGD)
    with pytest.raises(FlagError) as raised:
        state_folder.load_state(FakeAccelerator(), saved_state, *objects)
    assert "saved with torch.optim.adamw.AdamW, this run uses torch.optim.sgd.SGD (--optimizer_type)" in \
        str(raised.value)


def test_an_optimizer_state_of_another_layout_is_named(saved_state):
    """A kohya state has no optimizer class in train_state.json: the groups and buffer shapes are compared."""
    record = json.loads((saved_state / "train_state.json").read_text())
    del record["optimizer_class"]
    (saved_state / "train_state.json").write_text(json.dumps(record))
    network = TinyNetwork()
    optimizer = torch.optim.AdamW([{"params": [network.lora_unet_a.weight]},
                                   {"params": [network.lora_unet_b.weight]}], lr=1e-2)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: 1.0)
    with pytest.raises(FlagError, match=r"optimizer.bin has parameter groups of sizes \[2\], this run has \[1, 1\]"):
        state_folder.load_state(FakeAccelerator(), saved_state, network, optimizer, scheduler)
    swapped = TinyNetwork()
    optimizer = torch.optim.AdamW([swapped.lora_unet_b.weight, swapped.lora_unet_a.weight], lr=1e-2)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: 1.0)
    with pytest.raises(FlagError, match=r"optimizer.bin: state 'exp_avg' of a parameter has shape \(3, 4\), the "
                                        r"parameter has \(2, 3\)"):
        state_folder.load_state(FakeAccelerator(), saved_state, swapped, optimizer, scheduler)


def test_a_state_written_by_accelerate_as_kohya_does_resumes(tmp_path):
    """kohya prepares the network with accelerate and calls save_state: the same layout, read by us."""
    from accelerate import Accelerator

    torch.manual_seed(0)
    network, optimizer, scheduler = training_objects()
    take_steps(network, optimizer, scheduler)
    accelerator = Accelerator(cpu=True)
    prepared = accelerator.prepare(network, optimizer, scheduler)
    folder = tmp_path / "kohya-state"
    accelerator.save_state(str(folder))
    (folder / "train_state.json").write_text(json.dumps({"current_epoch": 1, "current_step": 2}))
    fresh = training_objects()
    progress = state_folder.load_state(FakeAccelerator(), folder, *fresh)
    assert progress.global_step == 2 and progress.epoch == 0  # the position is derived from the step later
    assert all(torch.equal(a, b) for a, b in zip(fresh[0].state_dict().values(), prepared[0].state_dict().values()))


def test_a_full_disk_keeps_the_earlier_state_and_leaves_no_partial_folder(saved_state, monkeypatch):
    import errno

    before = {path.name: path.read_bytes() for path in saved_state.iterdir()}
    real_save = torch.save

    def disk_full(obj, path, *args, **kwargs):
        if str(path).endswith("optimizer.bin"):
            raise OSError(errno.ENOSPC, "No space left on device")
        return real_save(obj, path, *args, **kwargs)

    monkeypatch.setattr(torch, "save", disk_full)
    with pytest.raises(DiskFullError) as raised:
        state_folder.save_state(FakeAccelerator(), saved_state, TrainProgress(global_step=4), *training_objects())
    assert str(raised.value).startswith(f"{saved_state}: the disk is full")
    assert {path.name: path.read_bytes() for path in saved_state.iterdir()} == before
    assert [path.name for path in saved_state.parent.iterdir()] == [saved_state.name]


def test_saving_over_an_existing_state_replaces_it_whole(saved_state):
    network, optimizer, scheduler = training_objects()
    state_folder.save_state(FakeAccelerator(), saved_state, TrainProgress(global_step=9), network, optimizer,
                            scheduler)
    assert json.loads((saved_state / "train_state.json").read_text())["global_step"] == 9
    assert sorted(path.name for path in saved_state.parent.iterdir()) == [saved_state.name]
    shutil.rmtree(saved_state)


def test_state_files_get_the_umask_permissions(tmp_path):
    import os
    import stat

    previous = os.umask(0o022)
    try:
        folder = tmp_path / "state"
        state_folder.save_state(FakeAccelerator(), folder, TrainProgress(), *training_objects())
    finally:
        os.umask(previous)
    assert stat.S_IMODE(folder.stat().st_mode) == 0o755
    assert {path.name: stat.S_IMODE(path.stat().st_mode) for path in folder.iterdir()} == {
        name: 0o644 for name in ("model.safetensors", "optimizer.bin", "scheduler.bin", "random_states_0.pkl",
                                 "train_state.json")}


def test_a_state_save_into_a_really_full_disk_is_one_error_and_leaves_nothing(small_disk):
    disk = small_disk(256)
    network = torch.nn.Linear(512, 512)  # 1 MiB of weights, 3 MiB with AdamW's buffers
    optimizer = torch.optim.AdamW(network.parameters())
    network(torch.ones(1, 512)).sum().backward()
    optimizer.step()
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: 1.0)
    with pytest.raises(DiskFullError, match=r"lora-state: the disk is full"):
        state_folder.save_state(FakeAccelerator(), disk / "lora-state", TrainProgress(), network, optimizer,
                                scheduler)
    assert list(disk.iterdir()) == []


def test_random_states_written_under_numpy_1_are_read(saved_state):
    """numpy 1.x pickles its arrays as numpy.core.multiarray._reconstruct; numpy 2 moved it to numpy._core."""
    import zipfile

    path = saved_state / "random_states_0.pkl"
    np.random.set_state(torch.load(path, weights_only=False)["numpy_random_seed"])  # our own file, for the value
    expected = np.random.rand()
    with zipfile.ZipFile(path) as archive:
        contents = {name: archive.read(name) for name in archive.namelist()}
    pickle_name = next(name for name in contents if name.endswith("data.pkl"))
    contents[pickle_name] = contents[pickle_name].replace(b"numpy._core.multiarray", b"numpy.core.multiarray")
    assert b"numpy.core.multiarray" in contents[pickle_name]
    with zipfile.ZipFile(path, "w") as archive:
        for name, data in contents.items():
            archive.writestr(name, data)
    np.random.seed(123)
    state_folder.load_state(FakeAccelerator(), saved_state, *training_objects())
    assert np.random.rand() == expected


class FakeEngineAccelerator(FakeAccelerator):
    """accelerate under DeepSpeed: save_state/load_state are the engine's checkpoint (here a marker file)."""

    def __init__(self):
        super().__init__()
        self.loaded: list[str] = []

    def save_state(self, folder: str) -> None:
        Path(folder, "latest").write_text("global_step2")

    def load_state(self, folder: str) -> None:
        self.loaded.append(folder)


def test_a_deepspeed_state_carries_the_progress_and_resumes_at_its_step(tmp_path):
    folder = tmp_path / "m-step00000002-state"
    accelerator = FakeEngineAccelerator()
    state_folder.save_engine_state(accelerator, folder, TrainProgress(epoch=1, batch_in_epoch=2, global_step=2))
    assert sorted(path.name for path in folder.iterdir()) == ["latest", "train_state.json"]
    assert not folder.with_name(folder.name + ".partial").exists()
    progress = state_folder.load_engine_state(accelerator, folder)
    assert (progress.epoch, progress.batch_in_epoch, progress.global_step) == (1, 2, 2)
    assert accelerator.loaded == [str(folder)]


def test_a_state_of_the_other_kind_of_run_is_refused_by_name(saved_state, tmp_path):
    with pytest.raises(FlagError, match="saved by a run without DeepSpeed; resume it without --deepspeed"):
        state_folder.load_engine_state(FakeEngineAccelerator(), saved_state)
    engine_state = tmp_path / "ds-state"
    state_folder.save_engine_state(FakeEngineAccelerator(), engine_state, TrainProgress(global_step=2))
    network, optimizer, scheduler = training_objects()
    with pytest.raises(FlagError, match="saved by a DeepSpeed run .* resume it with --deepspeed"):
        state_folder.load_state(FakeAccelerator(), engine_state, network, optimizer, scheduler)
    # kohya's DeepSpeed states have train_state.json without our "engine" key, and DeepSpeed's `latest` tag
    record = json.loads((engine_state / "train_state.json").read_text())
    del record["engine"]
    (engine_state / "train_state.json").write_text(json.dumps(record))
    with pytest.raises(FlagError, match="saved by a DeepSpeed run"):
        state_folder.load_state(FakeAccelerator(), engine_state, network, optimizer, scheduler)
    assert state_folder.load_engine_state(FakeEngineAccelerator(), engine_state).global_step == 2
