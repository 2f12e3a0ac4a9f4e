"""--use_ema in LoRA training and full fine-tuning: the saved weights are the hand-computed EMA of the weights
after each optimizer step, training continues on the live weights, the EMA is part of --save_state and resumes
exactly, and bad settings fail before models load."""
from __future__ import annotations

import shutil

import pytest
import torch
from safetensors.torch import load_file

from library.errors import FlagError
from library.train.network_trainer import NetworkTrainer
from tests.cli_helpers import captured_logs
from tests.scripts.test_train_network import base_argv, dataset_toml, run_sd

EMA_FLAGS = ("--use_ema", "--ema_decay", "0.5", "--no_ema_warmup", "--ema_device", "cpu", "--optimizer_type", "AdamW")


class WeightRecorder(NetworkTrainer):
    """The network's trained weights at the start of every training step (= after the previous step)."""

    def on_step_start(self, args, accelerator, network, text_encoders, unet, batch, weight_dtype, is_train=True):
        if is_train:
            if not hasattr(self, "weights"):
                self.weights = []
            self.weights.append({name: p.detach().clone() for name, p in network.named_parameters()
                                 if p.requires_grad})
        super().on_step_start(args, accelerator, network, text_encoders, unet, batch, weight_dtype, is_train)


@pytest.fixture(scope="module")
def lora_ema_run(tiny_models, tmp_path_factory):
    root = tmp_path_factory.mktemp("ema")
    out = root / "out"
    argv = base_argv(tiny_models.path("sd1"), dataset_toml(root, batch_size=2), out, "--max_train_steps", "3",
                     "--save_every_n_steps", "1", "--save_state", *EMA_FLAGS)
    with captured_logs() as records:
        trainer, final = run_sd(argv, WeightRecorder)
    trainer.log_lines = [record.getMessage() for record in records]
    return trainer, final, root, argv


def test_saved_lora_is_the_ema_of_the_weights_after_each_step(lora_ema_run):
    trainer, final, _, _ = lora_ema_run
    live = {name: p.detach() for name, p in trainer._trainable.network.named_parameters() if p.requires_grad}
    steps = trainer.weights[1:] + [live]  # the weights after steps 1, 2, 3
    expected = {name: tensor.float().clone() for name, tensor in trainer.weights[0].items()}  # at construction
    for weights in steps:
        for name in expected:
            expected[name] = 0.5 * expected[name] + 0.5 * weights[name].float()
    saved = load_file(final)
    assert expected.keys() <= saved.keys()
    for name, value in expected.items():
        torch.testing.assert_close(saved[name], value, rtol=0, atol=1e-6)
    assert any("EMA of" in line and "kept on cpu" in line for line in trainer.log_lines)  # --ema_device cpu
    assert all(shadow.device.type == "cpu" and shadow.dtype == torch.float32
               for shadow in trainer._trainable.ema.shadows.values())
    # training went on with the live weights: they are not the EMA
    assert any(not torch.allclose(saved[name], live[name].float()) for name in expected)


def test_the_ema_is_in_the_state_and_a_resume_continues_it_exactly(lora_ema_run):
    _, final, root, argv = lora_ema_run
    state = root / "out" / "lora-step00000001-state"
    assert (state / "ema.safetensors").is_file()
    resumed = root / "resumed"
    shutil.copytree(state, resumed / state.name)
    out_index = argv.index("--output_dir") + 1
    resumed_argv = [*argv[:out_index], str(resumed), *argv[out_index + 1:], "--resume", str(resumed / state.name)]
    _, resumed_final = run_sd(resumed_argv)
    expected, got = load_file(final), load_file(resumed_final)
    assert all(torch.equal(got[key], expected[key]) for key in expected)


def test_resuming_a_state_without_ema_with_use_ema_names_the_file(tiny_models, tmp_path):
    out = tmp_path / "out"
    run_sd(base_argv(tiny_models.path("sd1"), dataset_toml(tmp_path), out, "--max_train_steps", "1", "--save_state"))
    with pytest.raises(FlagError, match=r"ema.safetensors.*saved without --use_ema"):
        run_sd(base_argv(tiny_models.path("sd1"), dataset_toml(tmp_path), tmp_path / "again", "--max_train_steps", "2",
                         "--resume", str(out / "lora-state"), *EMA_FLAGS))


@pytest.mark.parametrize("decay", ["0.0", "1.0", "1.5", "-0.1"])
def test_bad_ema_decay_fails_before_models_load(tiny_models, tmp_path, monkeypatch, decay):
    import library.models.load as load

    monkeypatch.setattr(load, "load_target_model", lambda *a, **k: pytest.fail("a model was loaded"))
    with pytest.raises(FlagError, match=f"--ema_decay {decay}: expected a value between 0 and 1"):
        run_sd(base_argv(tiny_models.path("sd1"), dataset_toml(tmp_path), tmp_path / "out", "--use_ema",
                         "--ema_decay", decay))


def test_full_fine_tune_saves_the_ema_unet(tiny_models, tmp_path):
    from library.config_file import parse_args_with_config
    from library.models.load import load_target_model
    from tests.scripts.test_finetune_trainers import ft_argv

    import fine_tune
    import train_db

    args = parse_args_with_config(train_db.setup_parser(), ft_argv(
        tiny_models.path("sd1"), dataset_toml(tmp_path), tmp_path / "out", "--use_ema", "--ema_decay", "0.9",
        "--stop_text_encoder_training", "-1"))
    trainer = fine_tune.trainer_class("db")()
    final = trainer.train(args)
    shadows = trainer._trainable.ema.shadows
    saved = load_target_model(final).unet.state_dict()
    live = trainer._models.unet.state_dict()
    assert shadows and all(name.startswith("unet.") for name in shadows)
    for name, shadow in shadows.items():
        torch.testing.assert_close(saved[name[len("unet."):]], shadow, rtol=0, atol=0)
    assert any(not torch.equal(saved[key], live[key]) for key in saved)
