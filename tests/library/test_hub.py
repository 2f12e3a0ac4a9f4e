"""--huggingface_* / --save_state_to_huggingface / --async_upload / --resume_from_huggingface, with
huggingface_hub.HfApi replaced at its boundary by a recorder (no network): what is uploaded where, the repository
created with its visibility, threads for async uploads, and the state folder downloaded for --resume."""
from __future__ import annotations

import logging
import threading
from pathlib import Path

import huggingface_hub
import pytest

import train_network
from library.errors import FlagError
from library.train import hub, run_setup


class FakeHfApi:
    """Records every call; holds `existing` repositories and `remote` files {repo path: bytes}."""

    calls: list[tuple] = []
    existing: set[str] = set()
    remote: dict[str, bytes] = {}
    cache: Path = Path()
    fail_uploads = False

    def __init__(self, token=None):
        self.token = token

    def repo_exists(self, repo_id, *, repo_type=None, token=None):
        return repo_id in self.existing

    def create_repo(self, repo_id, *, repo_type=None, private=None, exist_ok=False, **_):
        self.calls.append(("create_repo", repo_id, repo_type, private, self.token))
        self.existing.add(repo_id)

    def upload_file(self, *, path_or_fileobj, path_in_repo, repo_id, repo_type=None, **_):
        if self.fail_uploads:
            raise OSError("connection reset")
        self.calls.append(("upload_file", repo_id, repo_type, path_in_repo, Path(path_or_fileobj).read_bytes(),
                           threading.current_thread().name))

    def upload_folder(self, *, repo_id, folder_path, path_in_repo=None, repo_type=None, **_):
        files = sorted(path.name for path in Path(folder_path).iterdir())
        self.calls.append(("upload_folder", repo_id, repo_type, path_in_repo, files,
                           threading.current_thread().name))

    def list_repo_files(self, repo_id, *, revision=None, repo_type=None, token=None):
        self.calls.append(("list_repo_files", repo_id, revision, repo_type, self.token))
        return sorted(self.remote)

    def hf_hub_download(self, repo_id, filename, *, revision=None, repo_type=None, **_):
        target = self.cache / repo_id / (revision or "main") / filename
        target.parent.mkdir(parents=True, exist_ok=True)
        target.write_bytes(self.remote[filename])
        return str(target)


@pytest.fixture
def fake_hub(monkeypatch, tmp_path):
    monkeypatch.setattr(huggingface_hub, "HfApi", FakeHfApi)
    monkeypatch.setattr(FakeHfApi, "calls", [])
    monkeypatch.setattr(FakeHfApi, "existing", set())
    monkeypatch.setattr(FakeHfApi, "remote", {})
    monkeypatch.setattr(FakeHfApi, "cache", tmp_path / "hub-cache")
    monkeypatch.setattr(FakeHfApi, "fail_uploads", False)
    monkeypatch.setattr(hub, "_ensured_repos", set())
    yield FakeHfApi
    hub.wait_for_uploads()


def _args(*flags: str):
    return train_network.setup_parser().parse_args(list(flags))


def _saved(tmp_path: Path) -> tuple[Path, Path]:
    network = tmp_path / "lora-000001.safetensors"
    network.write_bytes(b"weights")
    state = tmp_path / "lora-000001-state"
    state.mkdir()
    for name in ("model.safetensors", "optimizer.bin", "train_state.json"):
        (state / name).write_bytes(name.encode())
    return network, state


def test_network_file_goes_to_path_in_repo_of_a_new_private_repo(fake_hub, tmp_path):
    network, state = _saved(tmp_path)
    args = _args("--huggingface_repo_id", "me/my-lora", "--huggingface_path_in_repo", "runs/a/",
                 "--huggingface_token", "hf_x")
    hub.upload_saved(args, network)
    hub.upload_saved(args, state)  # no --save_state_to_huggingface: states stay local
    hub.upload_saved(args, network)
    assert fake_hub.calls == [
        ("create_repo", "me/my-lora", None, True, "hf_x"),
        ("upload_file", "me/my-lora", None, "runs/a/lora-000001.safetensors", b"weights", "MainThread"),
        ("upload_file", "me/my-lora", None, "runs/a/lora-000001.safetensors", b"weights", "MainThread"),
    ], "the repository is created once, private by default"


def test_state_folder_upload_public_repo_and_async_thread(fake_hub, tmp_path):
    network, state = _saved(tmp_path)
    args = _args("--huggingface_repo_id", "me/states", "--huggingface_repo_type", "dataset",
                 "--huggingface_repo_visibility", "public", "--save_state_to_huggingface", "--async_upload")
    future = hub.upload_saved(args, state)
    assert future is not None
    hub.upload_saved(args, network, force_sync=True)  # the final file: synchronous, as kohya
    hub.wait_for_uploads()
    assert fake_hub.calls[0] == ("create_repo", "me/states", "dataset", False, None)
    folder_call = next(call for call in fake_hub.calls if call[0] == "upload_folder")
    assert folder_call[:5] == ("upload_folder", "me/states", "dataset", "lora-000001-state",
                               ["model.safetensors", "optimizer.bin", "train_state.json"])
    assert folder_call[5].startswith("hub-upload"), "--async_upload uploads in a background thread"
    file_call = next(call for call in fake_hub.calls if call[0] == "upload_file")
    assert file_call[3:] == ("lora-000001.safetensors", b"weights", "MainThread")


def test_failed_upload_is_logged_and_training_goes_on(fake_hub, tmp_path, caplog):
    network, _ = _saved(tmp_path)
    fake_hub.fail_uploads = True
    with caplog.at_level(logging.ERROR, logger="library.train.hub"):
        hub.upload_saved(_args("--huggingface_repo_id", "me/x"), network)
    assert f"uploading {network} to me/x/lora-000001.safetensors failed (OSError: connection reset); the local " \
           "copy is kept" in caplog.text
    assert network.exists()


def test_no_repo_id_uploads_nothing(fake_hub, tmp_path):
    network, _ = _saved(tmp_path)
    assert hub.upload_saved(_args(), network) is None
    assert fake_hub.calls == []


def test_resume_from_huggingface_downloads_the_state_folder(fake_hub):
    fake_hub.remote.update({"runs/a/last-state/model.safetensors": b"m", "runs/a/last-state/train_state.json": b"{}",
                            "runs/a/last.safetensors": b"other"})
    args = _args("--resume", "me/my-lora/runs/a/last-state:v2:dataset", "--resume_from_huggingface",
                 "--huggingface_token", "hf_y")
    folder = hub.resume_folder(args)
    assert folder == fake_hub.cache / "me/my-lora" / "v2" / "runs/a/last-state"
    assert sorted(path.name for path in folder.iterdir()) == ["model.safetensors", "train_state.json"]
    assert (folder / "model.safetensors").read_bytes() == b"m"
    assert fake_hub.calls == [("list_repo_files", "me/my-lora", "v2", "dataset", "hf_y")]


def test_resume_location_forms_as_kohya():
    assert hub.parse_hub_location("me/r/a/b-state") == hub.HubLocation("me/r", "a/b-state", None, None)
    assert hub.parse_hub_location("me/r/s:main") == hub.HubLocation("me/r", "s", "main", "model")
    assert hub.parse_hub_location("me/r/s:main:dataset") == hub.HubLocation("me/r", "s", "main", "dataset")
    assert hub.resume_folder(_args("--resume", "local/state")) == Path("local/state")
    assert hub.resume_folder(_args()) is None


def test_resume_folder_that_holds_nothing_is_one_line(fake_hub):
    fake_hub.remote.update({"other/model.safetensors": b"m"})
    with pytest.raises(FlagError) as caught:
        hub.download_state_for_resume(_args("--resume", "me/r/last-state:main", "--resume_from_huggingface"))
    assert str(caught.value) == "--resume me/r/last-state:main: no files under 'last-state' in me/r@main"


@pytest.mark.parametrize(("flags", "message"), [
    (["--save_state_to_huggingface"], "--save_state_to_huggingface needs --huggingface_repo_id"),
    (["--resume_from_huggingface"], "--resume_from_huggingface needs --resume owner/name/path/in/repo"),
    (["--resume_from_huggingface", "--resume", "just-a-name"],
     "--resume just-a-name: with --resume_from_huggingface expected owner/name/path/in/repo[:revision[:repo_type]]"),
])
def test_hub_flag_mistakes_fail_before_models_load(tmp_path, flags, message):
    args = _args("--pretrained_model_name_or_path", "m.safetensors", "--output_dir", str(tmp_path), *flags)
    with pytest.raises(FlagError) as caught:
        run_setup.check_output_flags(args)
    assert str(caught.value).startswith(message)


def test_resume_from_huggingface_skips_the_local_folder_check(tmp_path, caplog):
    args = _args("--pretrained_model_name_or_path", "m.safetensors", "--output_dir", str(tmp_path),
                 "--resume", "me/r/last-state", "--resume_from_huggingface", "--async_upload")
    with caplog.at_level(logging.WARNING, logger="library.train.hub"):
        run_setup.check_output_flags(args)
    assert "--async_upload has no effect without --huggingface_repo_id; ignored" in caplog.text


def test_a_training_run_uploads_its_saves_and_resumes_from_the_hub(fake_hub, tiny_models, tmp_path):
    """The trainer calls the Hub: each step save and its state (async), the final file (synchronously) and the
    final state; a second run resumes from the uploaded state folder, downloaded through the Hub."""
    from safetensors import safe_open

    from tests.scripts.test_train_network import base_argv, dataset_toml, run_sd

    out = tmp_path / "out"
    hub_flags = ("--huggingface_repo_id", "me/lora", "--huggingface_path_in_repo", "runs",
                 "--save_state_to_huggingface", "--async_upload")
    run_sd(base_argv(tiny_models.path("sd1"), dataset_toml(tmp_path, batch_size=1), out, "--max_train_steps", "2",
                     "--save_every_n_steps", "1", "--save_state", *hub_flags))
    uploads = [(call[0], call[3], call[-1].startswith("hub-upload")) for call in fake_hub.calls
               if call[0].startswith("upload")]
    assert uploads == [("upload_file", "runs/lora-step00000001.safetensors", True),
                       ("upload_folder", "runs/lora-step00000001-state", True),
                       ("upload_file", "runs/lora-step00000002.safetensors", True),
                       ("upload_folder", "runs/lora-step00000002-state", True),
                       ("upload_file", "runs/lora.safetensors", False),
                       ("upload_folder", "runs/lora-state", True)]
    assert fake_hub.calls[0] == ("create_repo", "me/lora", None, True, None)
    assert next(call[4] for call in fake_hub.calls if call[3] == "runs/lora.safetensors") == \
        (out / "lora.safetensors").read_bytes()

    fake_hub.remote.update({f"runs/lora-state/{path.name}": path.read_bytes()
                            for path in (out / "lora-state").iterdir()})
    trainer, final = run_sd(base_argv(tiny_models.path("sd1"), dataset_toml(tmp_path, batch_size=1),
                                      tmp_path / "resumed", "--max_train_steps", "3", "--resume", "me/lora/runs/lora-state",
                                      "--resume_from_huggingface"))
    assert trainer._run.progress.global_step == 3
    assert len(trainer.loss_history) == 1, "the resumed run trains only the third step"
    with safe_open(final, "pt") as file:
        assert file.metadata()["ss_steps"] == "3"
