"""Flags that were once accepted and silently ignored, each shown to change what it should: the saved file
(tensors, metadata), the logs, the optimizer's mode, the models' dtypes, the batches trained, the output and
logging folders. A few shared runs (module fixtures) carry several flags whose effects do not interfere."""
from __future__ import annotations

import logging
import math
import os
import re
from dataclasses import dataclass, field
from pathlib import Path

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file

import sdxl_train_network
import train_network
from library.errors import FlagError
from tests.cli_helpers import captured_logs
from tests.scripts.test_train_network import base_argv, dataset_toml, run_sd

RECORDING_OPTIMIZER = "tests.scripts.recording_optimizer.RecordingSGD"
TRACKER_NAME = "my_tracker"
NETWORK_MULTIPLIER = 3.0  # --network_multiplier
DATASET_MULTIPLIER = 0.5  # the dataset's network_multiplier key


# ---------------------------------------------------------------------------------------------- helpers


def messages(records, level=logging.INFO) -> list[str]:
    return [record.getMessage() for record in records if record.levelno >= level]


def metadata_of(path: Path) -> dict:
    with safe_open(path, "pt") as handle:
        return handle.metadata()


def inner_optimizer(trainer):
    optimizer = trainer._trainable.optimizer
    return getattr(optimizer, "optimizer", optimizer)  # accelerate's wrapper


class Recorder:
    """Mixin for a trainer class: records each micro-batch (training and validation), each sample and each save
    with what the flags under test act on, and the .to() moves of the VAE / text encoders while caching."""

    def __init__(self):
        super().__init__()
        self.events: list[tuple[str, dict]] = []
        self.moves: list[tuple[str, tuple, dict]] = []

    def _state(self) -> dict:
        mode = getattr(inner_optimizer(self), "mode", None) if getattr(self, "_trainable", None) else None
        network = getattr(getattr(self, "_trainable", None), "network", None)
        return {"mode": mode, "threads": torch.get_num_threads(), "epoch": self._run.progress.epoch,
                "multiplier": getattr(network, "multiplier", None)}

    def on_step_start(self, args, accelerator, network, text_encoders, unet, batch, weight_dtype, is_train=True):
        super().on_step_start(args, accelerator, network, text_encoders, unet, batch, weight_dtype,
                              is_train=is_train)
        self.events.append(("step" if is_train else "validation",
                            {**self._state(), "keys": [Path(key).name for key in batch["image_keys"]]}))

    def sample_images(self, accelerator, args, epoch, global_step, device, vae, tokenizers, text_encoder, unet):
        self.events.append(("sample", self._state()))
        super().sample_images(accelerator, args, epoch, global_step, device, vae, tokenizers, text_encoder, unet)

    def save_network(self, run, trainable, path, epoch):
        self.events.append(("save", {**self._state(), "name": Path(path).name}))
        super().save_network(run, trainable, path, epoch)

    def prepare_conditioning(self, run, models):
        spied = [("vae", models.vae)] + [(f"text_encoder{i}", e) for i, e in enumerate(models.text_encoders)]
        for name, model in spied:
            original = model.to

            def spy(*args, _name=name, _original=original, **kwargs):
                self.moves.append((_name, args, kwargs))
                return _original(*args, **kwargs)

            model.to = spy
        try:
            super().prepare_conditioning(run, models)
        finally:
            for _, model in spied:
                del model.to

    def of_kind(self, kind: str) -> list[dict]:
        return [values for event, values in self.events if event == kind]

    def moved_to_cpu(self) -> set[str]:
        """Models offloaded with .to("cpu"); moves onto accelerator.device (a torch.device, the CPU here too)
        are not offloads."""
        return {name for name, args, kwargs in self.moves if "cpu" in (args[:1] + (kwargs.get("device"),))}


def sd_recorder():
    from library.train.network_trainer import NetworkTrainer

    class SdRecorder(Recorder, NetworkTrainer):
        pass

    return SdRecorder


def sdxl_recorder():
    class SdxlRecorder(Recorder, sdxl_train_network.SdxlNetworkTrainer):
        pass

    return SdxlRecorder


@dataclass
class Run:
    trainer: object
    final: Path | None
    out: Path
    root: Path
    logs: list = field(default_factory=list)
    threads_before: int = 0
    threads_after: int = 0


def run_recorded(root: Path, argv: list[str], sdxl: bool = False) -> Run:
    out = root / "out"
    threads_before = torch.get_num_threads()
    with captured_logs() as records:
        if sdxl:
            trainer = sdxl_recorder()()
            final = trainer.train(train_network.parse_args(sdxl_train_network.setup_parser(), argv))
        else:
            trainer, final = run_sd(argv, sd_recorder())
    return Run(trainer, final, out, root, records, threads_before, torch.get_num_threads())


def with_dataset_multiplier(toml: Path, value: float) -> Path:
    text = toml.read_text()
    assert text.count("[[datasets]]\n") == 1
    toml.write_text(text.replace("[[datasets]]\n", f"[[datasets]]\nnetwork_multiplier = {value}\n"))
    return toml


# ---------------------------------------------------------------------------------------------- shared runs

@pytest.fixture(scope="module")
def sd1_run(tiny_models, tmp_path_factory) -> Run:
    """SD1, 2 steps: recording schedule-free-style optimizer, saves and samples every step, validation at step 2,
    a dataset network_multiplier, one loader worker, TensorBoard under a tracker name, --highvram."""
    root = tmp_path_factory.mktemp("sd1_run")
    toml = with_dataset_multiplier(dataset_toml(root, extra="validation_split = 0.25\nvalidation_seed = 5"),
                                   DATASET_MULTIPLIER)
    prompts = root / "prompts.txt"
    prompts.write_text("tkshape, a red circle --w 64 --h 64 --s 1 --d 3\n")
    argv = base_argv(tiny_models.path("sd1"), toml, root / "out", "--max_train_steps", "2",
                     "--optimizer_type", RECORDING_OPTIMIZER, "--network_multiplier", str(NETWORK_MULTIPLIER),
                     "--save_every_n_steps", "1", "--sample_prompts", str(prompts), "--sample_every_n_steps", "1",
                     "--validate_every_n_steps", "2", "--max_data_loader_n_workers", "1",
                     "--logging_dir", str(root / "logs"), "--log_with", "tensorboard",
                     "--log_tracker_name", TRACKER_NAME, "--highvram", "--cache_latents",
                     "--cache_text_encoder_outputs", "--network_train_unet_only")
    return run_recorded(root, argv)


def ordered_argv(tiny_models, root: Path, *extra: str) -> list[str]:
    """batch size 1, 8 steps per epoch; cached latents and text-encoder outputs (without --highvram)."""
    return base_argv(tiny_models.path("sd1"), dataset_toml(root, batch_size=1), root / "out",
                     "--max_train_steps", "10", "--max_data_loader_n_workers", "0", "--cache_latents",
                     "--cache_text_encoder_outputs", "--network_train_unet_only", *extra)


@pytest.fixture(scope="module")
def sd1_uninterrupted(tiny_models, tmp_path_factory) -> Run:
    root = tmp_path_factory.mktemp("sd1_uninterrupted")
    return run_recorded(root, ordered_argv(tiny_models, root))


@pytest.fixture(scope="module")
def sdxl_run(tiny_models, tmp_path_factory) -> Run:
    """SDXL, 1 step: v-prediction, --clip_skip 2, fp8 base in bf16, text-encoder outputs cached to disk only
    (no --cache_text_encoder_outputs, no --network_train_unet_only), AdamWScheduleFree, --lowram."""
    root = tmp_path_factory.mktemp("sdxl_run")
    argv = base_argv(tiny_models.path("sdxl"), dataset_toml(root), root / "out", "--max_train_steps", "1",
                     "--v_parameterization", "--clip_skip", "2", "--fp8_base", "--mixed_precision", "bf16",
                     "--cache_text_encoder_outputs_to_disk", "--optimizer_type", "AdamWScheduleFree", "--lowram")
    return run_recorded(root, argv, sdxl=True)


# ---------------------------------------------------------------------------------------------- 1. dataset reports

@pytest.fixture()
def no_model_load(monkeypatch):
    import library.models.load as load

    def must_not_load(*args, **kwargs):
        raise AssertionError("a model was loaded")

    monkeypatch.setattr(load, "load_target_model", must_not_load)


@pytest.mark.parametrize("flag", ["--lint_dataset", "--debug_dataset"])
def test_dataset_report_flags_report_and_do_not_train(tiny_models, tmp_path, capsys, caplog, no_model_load, flag):
    out = tmp_path / "out"
    argv = [arg for arg in base_argv(tiny_models.path("sd1"), dataset_toml(tmp_path), out, flag)
            if arg != "--skip_dataset_lint"]
    with caplog.at_level(logging.INFO):
        trainer, final = run_sd(argv)
    assert final is None
    assert not out.exists() or not any(out.iterdir())
    assert not hasattr(trainer, "_models")
    if flag == "--lint_dataset":
        assert "dataset lint: 8 images scanned" in caplog.text
        assert "--lint_dataset: the dataset was scanned (report above); not training" in caplog.text
    else:
        listing = capsys.readouterr().out
        assert all(f"{index:02d}_" in listing for index in range(8)), listing  # every image of epoch 1
        assert "--debug_dataset: batches listed; not training" in caplog.text


# ---------------------------------------------------------------------------------------------- 2-5, 6b: SDXL run

def test_cache_text_encoder_outputs_to_disk_alone_caches_and_freezes_the_text_encoders(sdxl_run):
    images = sorted((sdxl_run.root / "images").glob("*.png"))
    assert len(images) == 8
    for image in images:
        assert image.with_name(image.stem + "_te_outputs.npz").is_file(), image
    assert sdxl_run.trainer._trainable.train_text_encoder is False
    weights = load_file(sdxl_run.final)
    assert weights and not any(key.startswith("lora_te") for key in weights)
    assert any(key.startswith("lora_unet_") for key in weights)


def test_v_parameterization_on_sdxl_trains_and_records_v_prediction(sdxl_run):
    assert sdxl_run.trainer._models.noise_scheduler.config.prediction_type == "v_prediction"
    # kohya writes no ss_v_parameterization key for networks; the modelspec key carries it
    assert metadata_of(sdxl_run.final)["modelspec.prediction_type"] == "v"


def test_clip_skip_on_sdxl_warns_and_is_not_recorded(sdxl_run):
    warnings = messages(sdxl_run.logs, logging.WARNING)
    assert any("--clip_skip 2 has no effect on SDXL" in message for message in warnings), warnings
    metadata = metadata_of(sdxl_run.final)
    assert metadata["ss_clip_skip"] == "None"  # kohya's value for an unset flag
    assert "modelspec.encoder_layer" not in metadata


def test_fp8_base_stores_unet_linear_weights_in_float8(sdxl_run):
    unet = sdxl_run.trainer._models.unet
    linears = [module for module in unet.modules() if isinstance(module, torch.nn.Linear)]
    assert linears and all(module.weight.dtype == torch.float8_e4m3fn for module in linears)
    assert all(math.isfinite(loss) for loss in sdxl_run.trainer.loss_history)
    assert metadata_of(sdxl_run.final)["ss_fp8_base"] == "True"


def test_schedule_free_adamw_trains_a_step(sdxl_run):
    import schedulefree

    assert isinstance(inner_optimizer(sdxl_run.trainer), schedulefree.AdamWScheduleFree)
    assert len(sdxl_run.trainer.loss_history) == 1 and math.isfinite(sdxl_run.trainer.loss_history[0])
    assert metadata_of(sdxl_run.final)["ss_optimizer"].startswith("schedulefree.")
    ups = [tensor for key, tensor in load_file(sdxl_run.final).items() if key.endswith("lora_up.weight")]
    assert any(float(tensor.abs().max()) > 0 for tensor in ups)  # the step changed the network


def test_lowram_warns_that_it_has_no_effect(sdxl_run):
    warnings = messages(sdxl_run.logs, logging.WARNING)
    assert any(message.startswith("--lowram has no effect here") for message in warnings), warnings


# ---------------------------------------------------------------------------------------------- 6-10: SD1 run

def test_schedule_free_optimizer_is_in_eval_mode_for_saves_samples_and_validation(sd1_run):
    steps, saves = sd1_run.trainer.of_kind("step"), sd1_run.trainer.of_kind("save")
    samples, validations = sd1_run.trainer.of_kind("sample"), sd1_run.trainer.of_kind("validation")
    assert len(steps) == 2 and len(samples) == 2 and validations
    assert len(list((sd1_run.out / "sample").glob("*.png"))) == 2  # the samples were really generated
    assert [save["name"] for save in saves] == ["lora-step00000001.safetensors", "lora-step00000002.safetensors",
                                                "lora.safetensors"]
    assert {step["mode"] for step in steps} == {"train"}
    assert {event["mode"] for event in saves + samples + validations} == {"eval"}
    optimizer = inner_optimizer(sd1_run.trainer)
    assert type(optimizer).__name__ == "RecordingSGD" and optimizer.mode == "train"  # back after the final save


def test_log_tracker_name_names_the_tensorboard_folder(sd1_run):
    logs = sd1_run.root / "logs"
    # kohya's layout: <logging_dir>/<time>/<tracker name>/events...
    folders = {path.parent.relative_to(logs).parts for path in logs.rglob("events.out.tfevents.*")}
    assert len(folders) == 1
    (run_folder, tracker_folder), = folders
    assert tracker_folder == TRACKER_NAME and re.fullmatch(r"\d{14}", run_folder)


def test_dataset_network_multiplier_scales_the_network_during_steps_only(sd1_run):
    steps, samples = sd1_run.trainer.of_kind("step"), sd1_run.trainer.of_kind("sample")
    assert {step["multiplier"] for step in steps} == {NETWORK_MULTIPLIER * DATASET_MULTIPLIER}
    assert {sample["multiplier"] for sample in samples} == {NETWORK_MULTIPLIER}
    # samples and saves happen after every step: the next step scales the network again
    assert len(steps) == 2


@pytest.mark.skipif((os.cpu_count() or 1) < 2, reason="one CPU core: no thread is left out for the loader worker")
def test_loader_workers_take_compute_threads_except_while_sampling(sd1_run):
    full = sd1_run.threads_before
    if full < 2:
        pytest.skip(f"torch used {full} thread before the run: nothing to reduce")
    expected = max(1, os.cpu_count() - 1)  # --max_data_loader_n_workers 1
    steps, samples = sd1_run.trainer.of_kind("step"), sd1_run.trainer.of_kind("sample")
    assert {step["threads"] for step in steps} == {min(full, expected)} and expected < full
    assert {sample["threads"] for sample in samples} == {full}
    assert sd1_run.threads_after == full  # train() gives them back when it returns


def test_highvram_keeps_vae_and_text_encoders_where_they_are_after_caching(sd1_run, sd1_uninterrupted):
    assert sd1_run.trainer.moved_to_cpu() == set()
    assert sd1_uninterrupted.trainer.moved_to_cpu() == {"vae", "text_encoder0"}  # without --highvram


# ---------------------------------------------------------------------------------------------- 11. start position

def test_initial_epoch_without_skip_trains_the_remaining_epochs(tiny_models, tmp_path):
    # batch size 4: 2 steps per epoch, 3 epochs; starting at epoch 2 trains epochs 2 and 3 (the step count starts
    # at 0, as in kohya)
    argv = base_argv(tiny_models.path("sd1"), dataset_toml(tmp_path, batch_size=4), tmp_path / "out",
                     "--max_train_epochs", "3", "--save_every_n_epochs", "1", "--initial_epoch", "2",
                     "--max_data_loader_n_workers", "0", "--network_train_unet_only")
    run = run_recorded(tmp_path, argv)
    steps = run.trainer.of_kind("step")
    assert [step["epoch"] for step in steps] == [2, 2, 3, 3]
    assert sorted(path.name for path in run.out.iterdir()) == ["lora-000002.safetensors", "lora.safetensors"]
    epoch_file = metadata_of(run.out / "lora-000002.safetensors")
    assert (epoch_file["ss_epoch"], epoch_file["ss_steps"]) == ("2", "2")
    assert metadata_of(run.final)["ss_epoch"] == "3"


def test_skip_until_initial_step_trains_the_batches_of_the_later_steps(tiny_models, tmp_path, sd1_uninterrupted):
    # 8 steps per epoch: steps 8, 9 and 10 of the uninterrupted run, across the epoch boundary
    run = run_recorded(tmp_path, ordered_argv(tiny_models, tmp_path, "--initial_step", "7",
                                              "--skip_until_initial_step"))
    expected = [step["keys"] for step in sd1_uninterrupted.trainer.of_kind("step")]
    assert len(expected) == 10
    steps = run.trainer.of_kind("step")
    assert [step["keys"] for step in steps] == expected[7:]
    assert [step["epoch"] for step in steps] == [1, 2, 2]
    assert metadata_of(run.final)["ss_steps"] == "10"


def test_initial_step_at_the_end_fails_before_models_load(tiny_models, tmp_path, no_model_load):
    with pytest.raises(FlagError, match="--initial_step 4"):
        run_sd(base_argv(tiny_models.path("sd1"), dataset_toml(tmp_path), tmp_path / "out", "--initial_step", "4",
                         "--max_train_steps", "4"))
