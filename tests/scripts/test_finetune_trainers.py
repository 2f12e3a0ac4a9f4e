"""sdxl_train.py / fine_tune.py / train_db.py on tiny models: the same loop as LoRA training with the model's own
weights training. What trains (frozen parts bit-identical, TE1's last layer, --block_lr zeros,
--stop_text_encoder_training), the saved whole model (loads back, keeps the source's other keys, --save_precision,
modelspec only), exact resume, and the bad inputs that fail before models load."""
from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from safetensors import safe_open

import fine_tune
import sdxl_train
import train_db
from library.errors import FlagError, UserInputError
from library.models.load import load_target_model
from library.models.state_dict_io import TensorFile
from tests.scripts.test_train_network import DATASET, dataset_toml


def ft_argv(model: Path, toml: Path, out: Path, *extra: str) -> list[str]:
    return ["--pretrained_model_name_or_path", str(model), "--dataset_config", str(toml), "--output_dir", str(out),
            "--output_name", "model", "--learning_rate", "1e-3", "--seed", "1", "--max_train_steps", "2",
            "--skip_dataset_lint", "--max_data_loader_n_workers", "0", "--optimizer_type", "AdamW", *extra]


def metadata_toml(root: Path) -> Path:
    """The bundled tiny images as one fine-tuning (metadata_file) dataset."""
    images = sorted(DATASET.glob("*.png"))
    metadata = {image.stem: {"caption": (image.with_suffix(".txt")).read_text(encoding="utf-8").strip()}
                for image in images}
    root.mkdir(parents=True, exist_ok=True)
    (root / "meta.json").write_text(json.dumps(metadata), encoding="utf-8")
    toml = root / "finetune.toml"
    toml.write_text(f"""
[[datasets]]
resolution = 64
batch_size = 2
[[datasets.subsets]]
image_dir = '{DATASET.as_posix()}'
metadata_file = '{(root / "meta.json").as_posix()}'
""")
    return toml


def snapshot(module: torch.nn.Module) -> dict[str, torch.Tensor]:
    return {key: value.detach().clone() for key, value in module.state_dict().items()}


def changed(before: dict, module: torch.nn.Module, prefix: str = "") -> set[str]:
    after = module.state_dict()
    return {key for key, value in before.items() if key.startswith(prefix) and not torch.equal(value, after[key])}


def recording(kind: str):
    """The script's trainer, keeping the models as loaded and the text encoder after each step."""
    base = fine_tune.trainer_class(kind)

    class Recording(base):
        def load_target_model(self, args, weight_dtype, accelerator):
            loaded = super().load_target_model(args, weight_dtype, accelerator)
            self.before = {"unet": snapshot(loaded[3]), "te": [snapshot(encoder) for encoder in loaded[1]]}
            self.te_after_step: list[list[dict]] = []
            return loaded

        def on_step_start(self, args, accelerator, network, text_encoders, unet, batch, weight_dtype, is_train=True):
            if is_train:
                self.te_after_step.append([snapshot(encoder) for encoder in text_encoders])
            super().on_step_start(args, accelerator, network, text_encoders, unet, batch, weight_dtype, is_train)

        def step_logging(self, accelerator, logs, global_step, epoch):
            self.logged = [*getattr(self, "logged", []), dict(logs)]
            super().step_logging(accelerator, logs, global_step, epoch)

    return Recording


def run(script, kind: str, argv: list[str]):
    from library.config_file import parse_args_with_config

    args = parse_args_with_config(script.setup_parser(), argv)
    trainer = recording(kind)()
    return trainer, trainer.train(args)


# ------------------------------------------------------------------------------------------------ train_db.py


@pytest.fixture(scope="module")
def db_run(tiny_models, tmp_path_factory):
    root = tmp_path_factory.mktemp("db")
    return run(train_db, "db", ft_argv(tiny_models.path("sd1"), dataset_toml(root), root / "out",
                                       "--stop_text_encoder_training", "1", "--save_precision", "fp16"))


def test_fine_tuning_logs_kohyas_per_step_loss_key_and_group_rates(db_run):
    trainer, _ = db_run
    assert [logs["loss"] for logs in trainer.logged] == trainer.loss_history
    assert [logs["loss/current"] for logs in trainer.logged] == trainer.loss_history
    assert {"lr/unet", "lr/text_encoder"} <= set(trainer.logged[0])


def test_train_db_trains_unet_and_text_encoder_until_the_stop_step(db_run):
    trainer, final = db_run
    models = trainer._models
    assert changed(trainer.before["unet"], models.unet)
    te_before = trainer.before["te"][0]
    after_step1, at_step2_start = trainer.te_after_step[1][0], models.text_encoders[0].state_dict()
    assert any(not torch.equal(te_before[key], after_step1[key]) for key in te_before), "step 1 trains the TE"
    assert all(torch.equal(after_step1[key], at_step2_start[key]) for key in after_step1), \
        "--stop_text_encoder_training 1: step 2 leaves the text encoder as it was"
    assert [group for group in trainer._trainable.group_names] == ["unet", "text_encoder"]


def test_train_db_saves_the_whole_model_with_the_sources_other_keys(db_run, tiny_models):
    _, final = db_run
    assert final.name == "model.safetensors"
    source = TensorFile(tiny_models.path("sd1"))
    saved = TensorFile(final)
    assert set(saved.keys()) == set(source.keys())  # every key of the source file, nothing lost
    with safe_open(final, "pt") as file:
        metadata = file.metadata()
        assert {file.get_tensor(key).dtype for key in file.keys() if file.get_tensor(key).is_floating_point()} == \
            {torch.float16}
    assert metadata["modelspec.architecture"] == "stable-diffusion-v1"
    assert not any(key.startswith("ss_") for key in metadata), "checkpoints carry modelspec only (kohya)"
    assert load_target_model(final).family.name == "sd1"


def test_train_db_resumed_twice_equals_an_uninterrupted_run(tiny_models, tmp_path):
    """kohya restarts full fine-tuning at step 0 on --resume; here the step, data position, optimizer, scheduler
    and RNG come back, so the whole model ends bit-identical."""
    import shutil

    model, toml = tiny_models.path("sd1"), dataset_toml(tmp_path, batch_size=3)
    common = ["--max_train_steps", "3", "--save_every_n_steps", "1", "--save_state", "--lr_scheduler", "cosine",
              "--noise_offset", "0.05"]
    full = tmp_path / "full"
    run(train_db, "db", ft_argv(model, toml, full, *common))
    previous = full
    for number, step in enumerate((1, 2)):
        out = tmp_path / f"resumed{number}"
        state = f"model-step{step:08d}-state"
        shutil.copytree(previous / state, out / state)
        run(train_db, "db", ft_argv(model, toml, out, *common, "--resume", str(out / state)))
        expected, got = TensorFile(full / "model.safetensors"), TensorFile(out / "model.safetensors")
        assert all(torch.equal(got.get(key), expected.get(key)) for key in expected.keys()), (out, step)
        previous = out


def test_use_safetensors_names_the_output_and_no_token_padding_is_warned(tiny_models, tmp_path, caplog):
    import logging

    from library.config_file import parse_args_with_config

    args = parse_args_with_config(train_db.setup_parser(), ft_argv(
        tiny_models.path("sd1", "ckpt"), dataset_toml(tmp_path), tmp_path / "out", "--use_safetensors",
        "--no_token_padding"))
    with caplog.at_level(logging.WARNING):
        run_ = fine_tune.trainer_class("db")().prepare_run(args)
    assert args.save_model_as == "safetensors"  # a .ckpt source saves as safetensors with --use_safetensors
    assert run_.names.last_file() == tmp_path / "out" / "model.safetensors"
    assert "--no_token_padding has no effect" in caplog.text
    plain = parse_args_with_config(train_db.setup_parser(), ft_argv(
        tiny_models.path("sd1", "ckpt"), dataset_toml(tmp_path), tmp_path / "out2"))
    assert fine_tune.trainer_class("db")().prepare_run(plain).names.last_file().suffix == ".ckpt"


def test_train_db_refuses_a_fine_tuning_dataset(tiny_models, tmp_path):
    with pytest.raises(UserInputError, match=r"datasets\[0\] .* is a fine-tuning dataset; train_db.py trains on "
                                             r"DreamBooth datasets \(use fine_tune.py\)"):
        run(train_db, "db", ft_argv(tiny_models.path("sd1"), metadata_toml(tmp_path), tmp_path / "out"))


# ------------------------------------------------------------------------------------------------ fine_tune.py


def test_fine_tune_trains_the_unet_only_and_saves_a_diffusers_folder(tiny_models, tmp_path):
    trainer, final = run(fine_tune, "sd", ft_argv(tiny_models.path("sd1"), metadata_toml(tmp_path), tmp_path / "out",
                                                  "--save_model_as", "diffusers"))
    assert changed(trainer.before["unet"], trainer._models.unet)
    assert not changed(trainer.before["te"][0], trainer._models.text_encoders[0]), "no --train_text_encoder"
    assert final.is_dir() and (final / "unet" / "config.json").exists()
    reloaded = load_target_model(final)
    unet = trainer._models.unet.state_dict()
    assert all(torch.equal(value, unet[key].cpu()) for key, value in reloaded.unet.state_dict().items())


def test_fine_tune_sd2_v_trains_with_v_prediction(tiny_models, tmp_path):
    trainer, final = run(fine_tune, "sd", ft_argv(tiny_models.path("sd2-v"), metadata_toml(tmp_path), tmp_path / "out",
                                                  "--train_text_encoder", "--learning_rate_te", "1e-4"))
    assert trainer._models.noise_scheduler.config.prediction_type == "v_prediction"
    assert changed(trainer.before["te"][0], trainer._models.text_encoders[0])
    assert [group["lr"] for group in trainer._trainable.optimizer.param_groups] == [1e-3, 1e-4]
    assert load_target_model(final).family.name == "sd2-v"
    extra_source_keys = set(TensorFile(tiny_models.path("sd2-v")).keys())
    assert extra_source_keys == set(TensorFile(final).keys())  # SD2's unused last text layer is kept


def test_block_lr_on_sd1_is_refused(tiny_models, tmp_path):
    with pytest.raises(FlagError, match="--block_lr: per-block learning rates number SDXL's U-Net blocks; use "
                                        "sdxl_train.py"):
        run(fine_tune, "sd", ft_argv(tiny_models.path("sd1"), metadata_toml(tmp_path), tmp_path / "out",
                                     "--block_lr", ",".join(["1e-4"] * 23)))


def test_fine_tune_refuses_dreambooth_folders_and_sdxl_models(tiny_models, tmp_path):
    with pytest.raises(UserInputError, match=r"is a DreamBooth dataset; fine_tune.py trains on fine-tuning "
                                             r"datasets \(use train_db.py\)"):
        run(fine_tune, "sd", ft_argv(tiny_models.path("sd1"), dataset_toml(tmp_path), tmp_path / "out"))
    with pytest.raises(UserInputError, match="sdxl"):
        run(fine_tune, "sd", ft_argv(tiny_models.path("sdxl"), metadata_toml(tmp_path), tmp_path / "out"))


# ------------------------------------------------------------------------------------------------ sdxl_train.py

BLOCK_LRS = ["0"] * 10 + ["1e-3"] * 13  # embeddings and input blocks frozen; middle, output and out train


def test_sdxl_train_block_lr_zero_blocks_and_te1_last_layer_stay_frozen(tiny_models, tmp_path):
    prompts = tmp_path / "prompts.txt"
    prompts.write_text("a red boot --w 64 --h 64 --s 2 --d 1\n", encoding="utf-8")
    toml = dataset_toml(tmp_path, batch_size=3, extra="validation_split = 0.25")
    trainer, final = run(sdxl_train, "sdxl", ft_argv(
        tiny_models.path("sdxl"), toml, tmp_path / "out", "--train_text_encoder",
        "--learning_rate_te1", "5e-4", "--learning_rate_te2", "0", "--block_lr", ",".join(BLOCK_LRS),
        "--max_train_steps", "1",
        "--sample_prompts", str(prompts), "--sample_every_n_steps", "1", "--validate_every_n_steps", "1"))
    assert list((tmp_path / "out" / "sample").glob("*.png")), "sample images as in LoRA training"
    assert trainer.validation_history and all(value == value for value in trainer.validation_history)
    models = trainer._models
    unet_changed = changed(trainer.before["unet"], models.unet)
    frozen_prefixes = ("time_embedding.", "add_embedding.", "conv_in.", "down_blocks.")
    assert unet_changed and not any(key.startswith(frozen_prefixes) for key in unet_changed)
    assert all(not parameter.requires_grad for name, parameter in models.unet.named_parameters()
               if name.startswith(frozen_prefixes)), "a block at 0 computes no gradient"
    te1_changed = changed(trainer.before["te"][0], models.text_encoders[0])
    layers = models.text_encoders[0].config.num_hidden_layers
    assert te1_changed and not any(f"layers.{layers - 1}." in key or "final_layer_norm" in key for key in te1_changed)
    assert not changed(trainer.before["te"][1], models.text_encoders[1]), "--learning_rate_te2 0 freezes TE2"
    names = trainer._trainable.group_names
    assert names[-1] == "text_encoder1" and all(name.startswith("block") for name in names[:-1])
    assert trainer._trainable.optimizer.param_groups[-1]["lr"] == pytest.approx(5e-4)  # --learning_rate_te1
    assert min(int(name[5:]) for name in names[:-1]) == 10
    assert load_target_model(final).family.name == "sdxl"


@pytest.mark.parametrize(("extra", "message"), [
    (["--train_text_encoder", "--cache_text_encoder_outputs"], "--cache_text_encoder_outputs cannot be used while"),
    (["--v2"], "--v2: sdxl_train.py trains SDXL models"),
    (["--learning_rate", "0"], "--learning_rate 0 freezes the U-Net and no text encoder trains"),
])
def test_sdxl_train_bad_flags_fail_before_models_load(tiny_models, tmp_path, monkeypatch, extra, message):
    import library.models.load as load

    monkeypatch.setattr(load, "load_target_model", lambda *a, **k: pytest.fail("a model was loaded"))
    with pytest.raises(FlagError, match=message):
        run(sdxl_train, "sdxl", ft_argv(tiny_models.path("sdxl"), dataset_toml(tmp_path), tmp_path / "out", *extra))


def test_block_lr_needs_23_values_exit_code_2(tmp_path):
    import subprocess
    import sys

    from tests.conftest import ROOT

    result = subprocess.run([sys.executable, "sdxl_train.py", "--block_lr", "1,2,3"], cwd=ROOT, capture_output=True,
                            text=True, timeout=60, check=False)
    assert result.returncode == 2 and "expected exactly 23 comma-separated learning rates" in result.stderr


# ------------------------------------------------------------------------------------------------ fused backward


def _final_model(out: Path) -> dict[str, torch.Tensor]:
    file = TensorFile(out / "model.safetensors")
    return {key: file.get(key) for key in file.keys()}


@pytest.fixture(scope="module")
def unfused_db(tiny_models, tmp_path_factory):
    root = tmp_path_factory.mktemp("unfused")
    run(train_db, "db", ft_argv(tiny_models.path("sd1"), dataset_toml(root), root / "out", "--max_grad_norm", "0"))
    return root


@pytest.mark.parametrize("fused", [["--fused_backward_pass"], ["--fused_optimizer_groups", "3"]])
def test_fused_steps_inside_backward_equal_the_unfused_run(tiny_models, tmp_path, unfused_db, fused):
    trainer, _ = run(train_db, "db", ft_argv(tiny_models.path("sd1"), dataset_toml(tmp_path), tmp_path / "out",
                                              "--max_grad_norm", "0", *fused))
    from library.train.fused_backward import FusedOptimizer

    assert isinstance(trainer._trainable.optimizer.optimizer, FusedOptimizer)
    expected, got = _final_model(unfused_db / "out"), _final_model(tmp_path / "out")
    assert expected.keys() == got.keys()
    for key in expected:
        torch.testing.assert_close(got[key], expected[key], rtol=1e-5, atol=1e-6)
    assert any(not torch.equal(got[key], TensorFile(tiny_models.path("sd1")).get(key)) for key in got)


def test_fused_bf16_weights_train_and_a_fused_state_resumes_exactly(tiny_models, tmp_path):
    import shutil

    model, toml = tiny_models.path("sd1"), dataset_toml(tmp_path)
    common = ["--fused_backward_pass", "--mixed_precision", "bf16", "--full_bf16", "--max_train_steps", "2",
              "--save_every_n_steps", "1", "--save_state", "--optimizer_type", "AdamW8bit",
              "--optimizer_args", "min_8bit_size=16"]
    trainer, final = run(train_db, "db", ft_argv(model, toml, tmp_path / "full", *common))
    assert {p.dtype for p in trainer._trainable.network.get_trainable_params()} == {torch.bfloat16}
    assert all(torch.isfinite(torch.tensor(trainer.loss_history)))
    assert changed(trainer.before["unet"], trainer._models.unet)
    state = "model-step00000001-state"
    shutil.copytree(tmp_path / "full" / state, tmp_path / "resumed" / state)
    run(train_db, "db", ft_argv(model, toml, tmp_path / "resumed", *common, "--resume",
                                str(tmp_path / "resumed" / state)))
    expected, got = _final_model(tmp_path / "full"), _final_model(tmp_path / "resumed")
    assert all(torch.equal(got[key], expected[key]) for key in expected)


@pytest.mark.parametrize(("extra", "message"), [
    (["--fused_backward_pass", "--gradient_accumulation_steps", "2"], "cannot accumulate gradients"),
    (["--fused_backward_pass", "--fused_optimizer_groups", "4"], "two ways of stepping during backward"),
    (["--fused_optimizer_groups", "0"], "expected a number of groups of at least 1"),
    (["--fused_backward_pass", "--deepspeed"], "--fused_backward_pass and --deepspeed both own the optimizer step"),
])
def test_fused_flag_conflicts_fail_before_models_load(tiny_models, tmp_path, monkeypatch, extra, message):
    import library.models.load as load

    monkeypatch.setattr(load, "load_target_model", lambda *a, **k: pytest.fail("a model was loaded"))
    with pytest.raises(FlagError, match=message):
        run(train_db, "db", ft_argv(tiny_models.path("sd1"), dataset_toml(tmp_path), tmp_path / "out", *extra))


def test_two_cpu_processes_match_one_process_with_the_same_global_batch(tiny_models, tmp_path):
    """DDP through accelerate launch: 2 processes × batch 1 = 1 process × batch 1 × accumulation 2."""
    import os
    import subprocess
    import sys

    from tests.conftest import ROOT
    from tests.scripts.test_cache_tools import free_port

    model, toml = tiny_models.path("sd1"), dataset_toml(tmp_path, batch_size=1)
    common = ["--max_train_steps", "1", "--optimizer_type", "SGD", "--learning_rate", "0.05",
              "--stop_text_encoder_training", "-1"]
    run(train_db, "db", ft_argv(model, toml, tmp_path / "single", *common, "--gradient_accumulation_steps", "2"))
    command = [sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu", "--num_processes", "2",
               "--num_machines", "1", "--mixed_precision", "no", "--dynamo_backend", "no",
               "--main_process_port", str(free_port()), "train_db.py", *ft_argv(model, toml, tmp_path / "ddp", *common)]
    env = {**os.environ, "ACCELERATE_USE_CPU": "true", "OMP_NUM_THREADS": "1"}
    result = subprocess.run(command, cwd=ROOT, env=env, capture_output=True, text=True, timeout=300, check=False)
    output = result.stdout + result.stderr
    assert result.returncode == 0, output[-3000:]
    assert "batch accumulation 1, 2 process(es)" in output
    single, ddp = _final_model(tmp_path / "single"), _final_model(tmp_path / "ddp")
    source = TensorFile(model)
    unet_keys = [key for key in single if key.startswith("model.diffusion_model.")]
    moved = max(float((single[key].float() - source.get(key).float()).abs().max()) for key in unet_keys)
    worst = max(float((ddp[key].float() - single[key].float()).abs().max()) for key in unet_keys)
    # one step: the same samples, noise and averaged gradient, so only the summation order differs (measured
    # ~2e-7 against moves of ~1e-3). Over more steps a whole tiny random U-Net at lr 0.05 amplifies that rounding
    # chaotically (measured: differences of 70% of the largest move after 3 steps).
    assert moved > 1e-4 and worst < 1e-3 * moved, (worst, moved)


def test_sdxl_train_with_cached_text_encoder_outputs_saves_a_bf16_pipeline_folder(tiny_models, tmp_path):
    trainer, final = run(sdxl_train, "sdxl", ft_argv(
        tiny_models.path("sdxl"), dataset_toml(tmp_path), tmp_path / "out", "--cache_latents",
        "--cache_text_encoder_outputs", "--save_model_as", "diffusers_safetensors", "--save_precision", "bf16",
        "--max_train_steps", "1"))
    assert trainer._trainable.group_names == ["unet"]
    assert all(not changed(before, encoder) for before, encoder in zip(trainer.before["te"],
                                                                       trainer._models.text_encoders))
    assert final.is_dir() and list((final / "unet").glob("*.safetensors"))
    assert load_target_model(final).family.name == "sdxl"
    unet_file = TensorFile(next((final / "unet").glob("*.safetensors")))
    assert {unet_file.get(key).dtype for key in unet_file.keys()} == {torch.bfloat16}  # --save_precision bf16


def test_diffusers_xformers_sets_xformers_attention_in_the_unet_and_the_vae(tiny_models, tmp_path, monkeypatch):
    """No xformers on CPU: the package is faked and diffusers' switch recorded (the attention itself is
    diffusers')."""
    import importlib.machinery
    import sys
    import types

    from diffusers import AutoencoderKL, UNet2DConditionModel

    for name in ("xformers", "xformers.ops"):
        module = types.ModuleType(name)
        module.__spec__ = importlib.machinery.ModuleSpec(name, None)
        monkeypatch.setitem(sys.modules, name, module)
    switched: list[str] = []
    for cls in (AutoencoderKL, UNet2DConditionModel):
        monkeypatch.setattr(cls, "enable_xformers_memory_efficient_attention",
                            lambda self, *rest, **named: switched.append(type(self).__name__))
    run(fine_tune, "sd", ft_argv(tiny_models.path("sd1"), metadata_toml(tmp_path), tmp_path / "out",
                                 "--diffusers_xformers", "--max_train_steps", "1"))
    assert sorted(switched) == ["AutoencoderKL", "UNet2DConditionModel"]


def test_diffusers_xformers_without_the_package_fails_before_models_load(tiny_models, tmp_path, monkeypatch):
    import importlib.util

    real_find_spec = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec",
                        lambda name, *rest: None if name == "xformers" else real_find_spec(name, *rest))
    monkeypatch.setattr("library.models.load.load_target_model", lambda *a, **k: pytest.fail("a model was loaded"))
    with pytest.raises(FlagError, match="--diffusers_xformers needs the xformers package"):
        run(train_db, "db", ft_argv(tiny_models.path("sd1"), dataset_toml(tmp_path), tmp_path / "out",
                                    "--diffusers_xformers"))


def test_sdxl_train_honours_the_prior_loss_weight_of_regularisation_images(tiny_models, tmp_path):
    """kohya's sdxl_train.py ignores the weights; here a batch of regularisation images at --prior_loss_weight 0
    has a loss of exactly 0, while the training images still train."""
    import shutil

    dataset_toml(tmp_path)  # copies the bundled images
    shutil.copytree(tmp_path / "images", tmp_path / "reg")  # the same folder twice would be one subset (kohya)
    toml = tmp_path / "db_reg.toml"
    toml.write_text(f"""
[general]
caption_extension = ".txt"
[[datasets]]
resolution = 64
batch_size = 1
[[datasets.subsets]]
image_dir = '{(tmp_path / "images").as_posix()}'
[[datasets.subsets]]
image_dir = '{(tmp_path / "reg").as_posix()}'
is_reg = true
""")
    trainer, _ = run(sdxl_train, "sdxl", ft_argv(tiny_models.path("sdxl"), toml, tmp_path / "out",
                                                 "--prior_loss_weight", "0", "--max_train_steps", "16",
                                                 "--cache_latents", "--optimizer_type", "SGD"))
    zero = [loss for loss in trainer.loss_history if loss == 0.0]
    assert len(trainer.loss_history) == 16 and len(zero) == 8, trainer.loss_history  # one epoch: 8 + 8 batches
    assert changed(trainer.before["unet"], trainer._models.unet)
