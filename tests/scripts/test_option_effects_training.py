"""Training flags (train_network.py on the tiny SD1 model) observed on what they change: the saved file's metadata
and tensors, the state folders, the latent cache files, the validation passes, the learning-rate schedule the run
built and stepped, the tracker it started (TensorBoard on disk, a stand-in wandb module), the models' dtypes and
attention processors, the conditioning the U-Net received. Two shared runs carry flags whose effects do not
interfere; the flags a CPU cannot serve show their one-line refusal before any model loads."""
from __future__ import annotations

import importlib.machinery
import logging
import os
import re
import sys
import types
from dataclasses import dataclass, field
from datetime import timedelta
from pathlib import Path

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file

import train_network
from library.errors import FlagError
from tests.cli_helpers import captured_logs, run_error
from tests.scripts.test_train_network import base_argv, dataset_toml, run_sd

WEIGHTED_CAPTION = "(red:1.5) boot"
MAX_NORM = 1e-6  # --scale_weight_norms: far below what one step gives, so every module is capped
WANDB_KEY = "test-key-not-a-secret"
METADATA_FLAGS = {"--training_comment": "trained by a test", "--metadata_description": "a tiny test LoRA",
                  "--metadata_license": "CC-BY-4.0", "--metadata_merged_from": "model_a, model_b",
                  "--metadata_preprocessor": "canny", "--metadata_usage_hint": "use at weight 0.8"}


# ---------------------------------------------------------------------------------------------- helpers


def metadata_of(path: Path) -> dict:
    with safe_open(path, "pt") as handle:
        return handle.metadata()


def recording_trainer():
    """A NetworkTrainer that records each step's log line, each validation batch and the first U-Net
    conditioning (captions and hidden states)."""
    from library.train.network_trainer import NetworkTrainer

    class RecordingTrainer(NetworkTrainer):
        def __init__(self):
            super().__init__()
            self.step_logs: list[dict] = []
            self.validation_batches = 0
            self.first_conds: tuple[list[str], torch.Tensor] | None = None
            self._captions: list[str] = []

        def on_step_start(self, args, accelerator, network, text_encoders, unet, batch, weight_dtype,
                          is_train=True):
            super().on_step_start(args, accelerator, network, text_encoders, unet, batch, weight_dtype,
                                  is_train=is_train)
            self._captions = list(batch["captions"])

        def call_unet(self, args, accelerator, unet, noisy_latents, timesteps, text_conds, batch, weight_dtype,
                      **kwargs):
            if self.first_conds is None:
                from library.text.encode import as_text_conds

                self.first_conds = (self._captions, as_text_conds(text_conds).hidden_states.detach().float().clone())
            return super().call_unet(args, accelerator, unet, noisy_latents, timesteps, text_conds, batch,
                                     weight_dtype, **kwargs)

        def step_logging(self, accelerator, logs, global_step, epoch):
            self.step_logs.append(dict(logs))
            super().step_logging(accelerator, logs, global_step, epoch)

        def on_validation_step_end(self, args, accelerator, network, text_encoders, unet, batch, weight_dtype):
            self.validation_batches += 1
            super().on_validation_step_end(args, accelerator, network, text_encoders, unet, batch, weight_dtype)

    return RecordingTrainer


@dataclass
class Run:
    trainer: object
    final: Path
    out: Path
    root: Path
    logs: list = field(default_factory=list)
    wandb: dict = field(default_factory=dict)
    cache_mtimes: dict = field(default_factory=dict)  # latent cache file -> st_mtime_ns right after the run

    def messages(self, level=logging.INFO) -> list[str]:
        return [record.getMessage() for record in self.logs if record.levelno >= level]


def fake_wandb(monkeypatch) -> dict:
    """A stand-in `wandb` module that accelerate's WandBTracker drives; returns what it was given."""
    import accelerate.tracking
    from accelerate.utils import LoggerType

    seen: dict = {"init": None, "config": {}, "logged": [], "finished": False}

    class FakeRun:
        def log(self, values, step=None, **kwargs):
            seen["logged"].append((step, dict(values)))

        def finish(self):
            seen["finished"] = True

    class FakeConfig:
        def update(self, values, allow_val_change=False):
            seen["config"].update(values)

    def init(**kwargs):
        seen["init"] = {**kwargs, "env_api_key": os.environ.get("WANDB_API_KEY")}
        return FakeRun()

    module = types.ModuleType("wandb")
    module.__spec__ = importlib.machinery.ModuleSpec("wandb", None)
    module.init, module.config = init, FakeConfig()
    monkeypatch.setitem(sys.modules, "wandb", module)
    monkeypatch.setattr(accelerate.tracking, "_available_trackers",
                        [*accelerate.tracking._available_trackers, LoggerType.WANDB])
    return seen


# ---------------------------------------------------------------------------------------------- shared runs

@pytest.fixture(scope="module")
def run_a(tiny_models, tmp_path_factory) -> Run:
    """fp32, 2 epochs of 2 steps (half the images are the validation set): weighted captions, latents cached to
    disk, validation every 2nd epoch on at most 1 batch, max-norm regularization, warmup-stable-decay schedule,
    a state every step keeping the last 1, DDP timeout, --mem_eff_attn, TensorBoard with a run prefix and a
    tracker config, every metadata flag."""
    root = tmp_path_factory.mktemp("run_a")
    toml = dataset_toml(root, extra="validation_split = 0.5\nvalidation_seed = 3")
    for caption in (root / "images").glob("*.txt"):
        caption.write_text(WEIGHTED_CAPTION)
    tracker_config = root / "trackers.toml"
    tracker_config.write_text("[tensorboard]\nflush_secs = 7\n")
    metadata = [item for pair in METADATA_FLAGS.items() for item in pair]
    argv = base_argv(tiny_models.path("sd1"), toml, root / "out", "--max_train_epochs", "2",
                     "--max_data_loader_n_workers", "0", "--network_train_unet_only", "--weighted_captions",
                     "--cache_latents_to_disk", "--validate_every_n_epochs", "2", "--max_validation_steps", "1",
                     "--scale_weight_norms", str(MAX_NORM), "--lr_scheduler", "warmup_stable_decay",
                     "--lr_warmup_steps", "1", "--lr_decay_steps", "2", "--save_every_n_steps", "1", "--save_state",
                     "--save_last_n_steps_state", "1", "--ddp_timeout", "7", "--mem_eff_attn",
                     "--logging_dir", str(root / "logs"), "--log_with", "tensorboard", "--log_prefix", "pre_",
                     "--log_tracker_config", str(tracker_config), "--log_config", *metadata)
    with captured_logs() as records:
        trainer, final = run_sd(argv, recording_trainer())
    mtimes = {path: path.stat().st_mtime_ns for path in (root / "images").glob("*.npz")}
    return Run(trainer, final, root / "out", root, records, cache_mtimes=mtimes)


@pytest.fixture(scope="module")
def run_b(run_a, tiny_models, tmp_path_factory) -> Run:
    """bf16 with --no_half_vae, 2 steps on run A's images (all 8): fp8 U-Net only, the latent cache of run A, a
    stand-in wandb tracker with a run name, an API key and the config, a sample before the first step, an
    inverse-sqrt schedule with a timescale, a step file every step and a state only at the end."""
    root = tmp_path_factory.mktemp("run_b")
    toml = root / "dataset.toml"
    toml.write_text(f"""
[general]
caption_extension = ".txt"
[[datasets]]
resolution = 64
batch_size = 2
[[datasets.subsets]]
image_dir = '{(run_a.root / "images").as_posix()}'
""")
    prompts = root / "prompts.txt"
    prompts.write_text("tkshape, a red circle --w 64 --h 64 --s 1 --d 3\n")
    argv = base_argv(tiny_models.path("sd1"), toml, root / "out", "--max_train_steps", "2",
                     "--max_data_loader_n_workers", "0", "--mixed_precision", "bf16", "--no_half_vae",
                     "--fp8_base_unet", "--cache_latents_to_disk", "--log_with", "wandb", "--wandb_run_name",
                     "my-wandb-run", "--wandb_api_key", WANDB_KEY, "--log_config", "--sample_prompts", str(prompts),
                     "--sample_at_first", "--lr_scheduler", "inverse_sqrt", "--lr_scheduler_timescale", "4",
                     "--save_every_n_steps", "1", "--save_state_on_train_end")
    previous_key = os.environ.pop("WANDB_API_KEY", None)
    try:
        with pytest.MonkeyPatch.context() as monkeypatch, captured_logs() as records:
            seen = fake_wandb(monkeypatch)
            trainer, final = run_sd(argv, recording_trainer())
    finally:  # make_accelerator sets it for wandb (os.environ.setdefault)
        os.environ.pop("WANDB_API_KEY", None)
        if previous_key is not None:
            os.environ["WANDB_API_KEY"] = previous_key
    return Run(trainer, final, root / "out", root, records, seen)


def inner_scheduler(trainer):
    scheduler = trainer._trainable.lr_scheduler
    return getattr(scheduler, "scheduler", scheduler)  # accelerate's wrapper


def step_lrs(run: Run) -> list[float]:
    values = []
    for logs in run.trainer.step_logs:
        rates = {value for key, value in logs.items() if key.startswith("lr/") and not key.startswith("lr/d*lr")}
        assert len(rates) == 1, logs
        values.append(rates.pop())
    return values


# ---------------------------------------------------------------------------------------------- metadata

def test_metadata_flags_are_written_into_the_saved_lora(run_a):
    metadata = metadata_of(run_a.final)
    assert metadata["ss_training_comment"] == "trained by a test"
    assert metadata["modelspec.description"] == "a tiny test LoRA"
    assert metadata["modelspec.license"] == "CC-BY-4.0"
    assert metadata["modelspec.merged_from"] == "model_a, model_b"
    assert metadata["modelspec.preprocessor"] == "canny"
    assert metadata["modelspec.usage_hint"] == "use at weight 0.8"
    # every step file carries them too
    assert metadata_of(run_a.out / "lora-step00000001.safetensors")["modelspec.usage_hint"] == "use at weight 0.8"


# ---------------------------------------------------------------------------------------------- dataset

def test_weighted_captions_scale_the_weighted_token_of_the_conditioning(run_a):
    from library.text.conditioning import CaptionEncoder

    captions, hidden = run_a.trainer.first_conds
    assert captions and set(captions) == {WEIGHTED_CAPTION}
    models = run_a.trainer._models
    assert models.caption_encoder.weighted is True
    plain = CaptionEncoder(models.caption_encoder.family, models.tokenizers, models.text_encoders)
    with torch.no_grad():
        unweighted_red_boot = plain.encode(["red boot"]).hidden_states.float()[0]
        literal = plain.encode([WEIGHTED_CAPTION]).hidden_states.float()[0]
    got = hidden[0]
    assert got.shape == unweighted_red_boot.shape
    # "(red:1.5) boot" is "red boot" with the states of the "red" token multiplied by 1.5 (kohya, no re-normalising)
    differs = [index for index in range(got.shape[0])
               if not torch.allclose(got[index], unweighted_red_boot[index], rtol=1e-5, atol=1e-6)]
    assert len(differs) == 1, differs
    torch.testing.assert_close(got[differs[0]], 1.5 * unweighted_red_boot[differs[0]], rtol=1e-5, atol=1e-6)
    # without the flag the brackets and the number are ordinary caption text
    assert not torch.allclose(got, literal, atol=1e-3)


def test_cache_latents_to_disk_writes_npz_files_that_a_second_run_reuses(run_a, run_b):
    images = sorted((run_a.root / "images").glob("*.png"))
    assert len(images) == 8
    caches = {image: list(image.parent.glob(f"{image.stem}_*_sd.npz")) for image in images}
    assert all(len(found) == 1 for found in caches.values()), caches  # training and validation images
    a_messages = [message for message in run_a.messages() if message.startswith("latent cache:")]
    assert len(a_messages) == 2 and all(message.startswith("latent cache: 0 reused, 4 computed")
                                        for message in a_messages)  # the training and the validation images
    b_messages = [message for message in run_b.messages() if message.startswith("latent cache:")]
    assert b_messages == ["latent cache: 8 reused, 0 computed"]
    # run B read the files run A wrote, and did not rewrite them
    b_files = {Path(info.latents_npz) for dataset in run_b.trainer._run.train_group.datasets
               for info in dataset.images}
    assert b_files == {found[0] for found in caches.values()} == set(run_a.cache_mtimes)
    assert {path: path.stat().st_mtime_ns for path in b_files} == run_a.cache_mtimes


# ---------------------------------------------------------------------------------------------- validation

def test_validate_every_n_epochs_and_max_validation_steps_limit_the_validation(run_a):
    assert len(run_a.trainer.loss_history) == 4  # 2 epochs of 2 steps
    # validation after epoch 2 only (not after epoch 1, as without the flag), on 1 of the 2 validation batches
    assert len(run_a.trainer.validation_history) == 1
    assert run_a.trainer.validation_batches == 1
    lines = [message for message in run_a.messages() if message.startswith("validation loss")]
    assert len(lines) == 1 and lines[0].startswith("validation loss (epoch 2):") and "over 1 batches" in lines[0]
    assert len(run_a.trainer._run.val_group) == 2  # there were 2 batches to validate


# ---------------------------------------------------------------------------------------------- network

def test_scale_weight_norms_caps_every_module_and_logs_the_norms(run_a):
    logs = run_a.trainer.step_logs
    assert len(logs) == 4
    # the first step runs at the warmup's learning rate of 0: nothing grows past the cap; every later step scales
    assert [entry["max_norm/keys_scaled"] > 0 for entry in logs] == [False, True, True, True]
    assert all(entry["max_norm/max_key_norm"] <= MAX_NORM * 1.001 for entry in logs)
    weights = load_file(run_a.final)
    downs = [key for key in weights if key.endswith(".lora_down.weight")]
    assert downs
    for key in downs:
        name = key[:-len(".lora_down.weight")]
        down, up = weights[key].float(), weights[f"{name}.lora_up.weight"].float()
        scale = float(weights[f"{name}.alpha"]) / down.shape[0]
        delta = up.reshape(up.shape[0], -1) @ down.reshape(down.shape[0], -1) * scale
        assert float(delta.norm()) <= MAX_NORM * 1.001, name


# ---------------------------------------------------------------------------------------------- schedules

def test_lr_decay_steps_shape_the_warmup_stable_decay_schedule(run_a):
    scheduler = inner_scheduler(run_a.trainer)
    # 1 warmup step, 2 decay steps of the 4: stable at step 2, half at step 3 (cosine), 0 at the end; without
    # --lr_decay_steps the rate stays at 1 until the last step
    assert [scheduler.lr_lambdas[0](step) for step in range(5)] == pytest.approx([0.0, 1.0, 1.0, 0.5, 0.0])
    assert step_lrs(run_a) == pytest.approx([1e-3, 1e-3, 5e-4, 0.0], abs=1e-12)  # logged after each step


def test_lr_scheduler_timescale_sets_the_inverse_sqrt_decay(run_b):
    scheduler = inner_scheduler(run_b.trainer)
    # lr = 1 / sqrt((step + timescale) / timescale): half at step 12 with timescale 4 (the default timescale of
    # 10000 would give 0.9994)
    assert scheduler.lr_lambdas[0](12) == pytest.approx(0.5)
    assert step_lrs(run_b) == pytest.approx([1e-3 / (5 / 4) ** 0.5, 1e-3 / (6 / 4) ** 0.5])


# ---------------------------------------------------------------------------------------------- saves

def test_save_last_n_steps_state_keeps_only_the_last_step_states(run_a):
    names = sorted(path.name for path in run_a.out.iterdir())
    states = [name for name in names if name.endswith("-state")]
    # kohya's rule: at step s the state of step s - N - 1 goes (N = 1: steps 3 and 4 stay); the step files all stay
    assert states == ["lora-state", "lora-step00000003-state", "lora-step00000004-state"]
    assert [name for name in names if name.startswith("lora-step") and name.endswith(".safetensors")] == [
        f"lora-step{step:08d}.safetensors" for step in range(1, 5)]


def test_save_state_on_train_end_saves_one_state_at_the_end(run_b):
    names = sorted(path.name for path in run_b.out.iterdir() if path.name != "sample")
    assert names == ["lora-state", "lora-step00000001.safetensors", "lora-step00000002.safetensors",
                     "lora.safetensors"]  # no step states without --save_state
    state = run_b.out / "lora-state"
    assert (state / "train_state.json").is_file() and (state / "optimizer.bin").is_file()


# ---------------------------------------------------------------------------------------------- sampling

def test_sample_at_first_writes_a_sample_before_the_first_step(run_b):
    samples = sorted(path.name for path in (run_b.out / "sample").iterdir())
    # kohya samples at first as "epoch 0" (train_network.py: sample_images(..., 0, global_step, ...))
    assert len(samples) == 1 and re.fullmatch(r"lora_e000000_00_\d{14}_3\.png", samples[0]), samples
    messages = run_b.messages()
    assert "generating 1 sample image(s) at epoch 0" in messages
    assert messages.index("generating 1 sample image(s) at epoch 0") < messages.index(
        f"saved {run_b.out / 'lora-step00000001.safetensors'}")  # before the first step


# ---------------------------------------------------------------------------------------------- trackers

def test_log_prefix_and_log_tracker_config_shape_the_tensorboard_run(run_a):
    logs = run_a.root / "logs"
    runs = [path.name for path in logs.iterdir()]
    assert len(runs) == 1 and re.fullmatch(r"pre_\d{14}", runs[0]), runs  # one folder per run, named by the prefix
    assert list((logs / runs[0] / "network_train").glob("events.out.tfevents.*"))  # kohya's default tracker name
    tracker = run_a.trainer._run.accelerator.trackers[0]
    assert tracker.writer.flush_secs == 7  # from the --log_tracker_config file's [tensorboard] table


def test_log_prefix_names_the_run_folder_also_with_a_log_tracker_name(tmp_path):
    from types import SimpleNamespace

    from library.train import run_setup
    from library.train.training_loop import _init_trackers

    logs = tmp_path / "logs"
    args = train_network.setup_parser().parse_args(["--logging_dir", str(logs), "--log_with", "tensorboard",
                                                    "--log_prefix", "pre_", "--log_tracker_name", "tracker"])
    accelerator = run_setup.make_accelerator(args)
    _init_trackers(SimpleNamespace(args=args, accelerator=accelerator))  # what the training loop calls first
    accelerator.end_training()
    folders = [path.parent.relative_to(logs).parts for path in logs.rglob("events.out.tfevents.*")]
    assert folders, "no TensorBoard events were written"
    assert len(folders) == 1 and re.fullmatch(r"pre_\d{14}", folders[0][0]) and folders[0][1:] == ("tracker",), folders


def test_log_config_stores_the_flags_with_the_tracker(run_a, run_b):
    import yaml

    hparams = list((run_a.root / "logs").rglob("hparams.yml"))
    assert len(hparams) == 1
    stored = yaml.safe_load(hparams[0].read_text())
    assert stored["max_validation_steps"] == 1 and stored["log_prefix"] == "pre_"
    assert stored["training_comment"] == "trained by a test"
    config = run_b.wandb["config"]
    assert config["wandb_run_name"] == "my-wandb-run" and config["lr_scheduler_timescale"] == 4
    assert "wandb_api_key" not in config  # the key is never stored with the run


def test_wandb_run_name_and_api_key_reach_wandb(run_b):
    init = run_b.wandb["init"]
    assert init["name"] == "my-wandb-run" and init["project"] == "network_train"
    assert init["env_api_key"] == WANDB_KEY  # wandb reads WANDB_API_KEY when it starts
    assert [step for step, values in run_b.wandb["logged"] if "loss/current" in values] == [1, 2]
    assert run_b.wandb["finished"]


def test_ddp_timeout_reaches_accelerates_process_group_settings(run_a, run_b):
    handler = run_a.trainer._run.accelerator.init_handler
    assert handler is not None and handler.timeout == timedelta(minutes=7)
    assert run_b.trainer._run.accelerator.init_handler is None  # accelerate's default without the flag


# ---------------------------------------------------------------------------------------------- models

def test_mem_eff_attn_is_served_by_pytorch_sdpa(run_a):
    from diffusers.models.attention_processor import AttnProcessor2_0

    processors = run_a.trainer._models.unet.attn_processors
    assert processors and all(isinstance(processor, AttnProcessor2_0) for processor in processors.values())


def test_fp8_base_unet_stores_only_the_unet_in_float8(run_b):
    models = run_b.trainer._models
    unet_linears = [module for module in models.unet.modules() if isinstance(module, torch.nn.Linear)]
    assert unet_linears and all(module.weight.dtype == torch.float8_e4m3fn for module in unet_linears)
    encoder_linears = [module for module in models.text_encoders[0].modules() if isinstance(module, torch.nn.Linear)]
    assert encoder_linears and all(module.weight.dtype == torch.bfloat16 for module in encoder_linears)
    metadata = metadata_of(run_b.final)
    assert (metadata["ss_fp8_base_unet"], metadata["ss_fp8_base"]) == ("True", "False")
    assert all(torch.isfinite(torch.tensor(run_b.trainer.loss_history)))


# ---------------------------------------------------------------------------------------------- refused on CPU

@pytest.fixture()
def no_model_load(monkeypatch):
    import library.models.load as load

    def must_not_load(*args, **kwargs):
        raise AssertionError("a model was loaded")

    monkeypatch.setattr(load, "load_target_model", must_not_load)


@pytest.mark.parametrize("extra, message", [
    (["--full_fp16"], "error: --full_fp16 needs --mixed_precision fp16"),
    (["--full_fp16", "--mixed_precision", "fp16"], "error: --mixed_precision fp16 needs a GPU, and this run has none"),
])
def test_full_fp16_is_refused_in_one_line_on_cpu(tiny_models, tmp_path, capsys, no_model_load, extra, message):
    if torch.cuda.is_available():
        pytest.skip("a GPU can run --full_fp16")
    argv = base_argv(tiny_models.path("sd1"), dataset_toml(tmp_path), tmp_path / "out", *extra)
    assert run_error(train_network.main, argv, capsys).startswith(message)


def test_xformers_without_the_package_is_refused_in_one_line(tiny_models, tmp_path, capsys, no_model_load):
    import importlib.util

    if importlib.util.find_spec("xformers") is not None:
        pytest.skip("xformers is installed here")
    argv = base_argv(tiny_models.path("sd1"), dataset_toml(tmp_path), tmp_path / "out", "--xformers")
    line = run_error(train_network.main, argv, capsys)
    assert line.startswith("error: --xformers: xformers could not be imported") and "--sdpa" in line
    with pytest.raises(FlagError, match="--xformers"):  # the trainer's own check, as a library call
        run_sd(argv)
