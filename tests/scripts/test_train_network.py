"""train_network.py / sdxl_train_network.py end to end on tiny models and the bundled tiny dataset:
frozen base weights, falling loss, saved keys and metadata, exact resume, samples, flag conflicts, NaN stop,
LyCORIS through our trainer."""
from __future__ import annotations

import json
import math
import shutil
from pathlib import Path

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file

import sdxl_train_network
import train_network
from library.errors import FlagError, TrainingStopped
from tests.conftest import ROOT

DATASET = ROOT / "examples" / "tiny_dataset" / "images"


def dataset_toml(tmp_path: Path, batch_size: int = 2, repeats: int = 1, extra: str = "") -> Path:
    images = tmp_path / "images"
    if not images.exists():
        shutil.copytree(DATASET, images)
    path = tmp_path / "dataset.toml"
    path.write_text(f"""
[general]
caption_extension = ".txt"
{extra}
[[datasets]]
resolution = 64
batch_size = {batch_size}
[[datasets.subsets]]
image_dir = '{images.as_posix()}'
num_repeats = {repeats}
""")
    return path


def base_argv(model: Path, toml: Path, out: Path, *extra: str) -> list[str]:
    return ["--pretrained_model_name_or_path", str(model), "--dataset_config", str(toml), "--output_dir", str(out),
            "--output_name", "lora", "--network_dim", "4", "--network_alpha", "2", "--learning_rate", "1e-3",
            "--seed", "1", "--max_train_steps", "4", "--skip_dataset_lint", *extra]


def run_sd(argv: list[str], trainer_class=None):
    from library.train.network_trainer import NetworkTrainer

    args = train_network.parse_args(train_network.setup_parser(), argv)
    trainer = (trainer_class or NetworkTrainer)()
    return trainer, trainer.train(args)


def test_sd1_training_changes_only_the_network_and_writes_kohya_keys(tiny_models, tmp_path):
    from library.train.network_trainer import NetworkTrainer

    snapshots = {}

    class SnapshotTrainer(NetworkTrainer):
        def load_target_model(self, args, weight_dtype, accelerator):
            loaded = super().load_target_model(args, weight_dtype, accelerator)
            snapshots["unet"] = {k: v.clone() for k, v in loaded[3].state_dict().items()}
            snapshots["te"] = {k: v.clone() for k, v in loaded[1][0].state_dict().items()}
            return loaded

    out = tmp_path / "out"
    trainer, final = run_sd(base_argv(tiny_models.path("sd1"), dataset_toml(tmp_path), out), SnapshotTrainer)
    assert final == out / "lora.safetensors" and final.exists()
    unet_after = trainer._models.unet.state_dict()
    assert unet_after.keys() == snapshots["unet"].keys()
    assert all(torch.equal(unet_after[k].cpu(), v) for k, v in snapshots["unet"].items())
    te_after = trainer._models.text_encoders[0].state_dict()
    assert all(torch.equal(te_after[k].cpu(), v) for k, v in snapshots["te"].items())
    weights = load_file(final)
    assert any(key.startswith("lora_te_text_model_encoder_layers_0_") for key in weights)
    assert any(key.startswith("lora_unet_down_blocks_0_attentions_0_") for key in weights)
    ups = [tensor for key, tensor in weights.items() if key.endswith("lora_up.weight")]
    assert any(float(tensor.abs().max()) > 0 for tensor in ups)  # trained away from the zero init
    with safe_open(final, "pt") as handle:
        metadata = handle.metadata()
    assert metadata["ss_network_module"] == "networks.lora"
    assert metadata["ss_network_dim"] == "4" and metadata["ss_network_alpha"] == "2.0"
    assert metadata["ss_steps"] == "4" and metadata["ss_base_model_version"] == "sd_v1"
    assert metadata["ss_num_train_images"] == "8"
    assert metadata["modelspec.architecture"] == "stable-diffusion-v1/lora"
    assert len(metadata["sshs_model_hash"]) == 64


def test_loss_falls_over_a_short_run(tiny_models, tmp_path):
    trainer, _ = run_sd(base_argv(tiny_models.path("sd1"), dataset_toml(tmp_path, repeats=2), tmp_path / "out",
                                  "--max_train_steps", "40", "--learning_rate", "5e-3", "--network_dim", "8",
                                  "--network_alpha", "8", "--network_train_unet_only"))
    losses = trainer.loss_history
    assert len(losses) == 40
    first, last = sum(losses[:8]) / 8, sum(losses[-8:]) / 8
    assert last < first * 0.9, (first, last)


def _final_tensors(path: Path) -> dict:
    return load_file(path)


def test_resume_twice_equals_an_uninterrupted_run(tiny_models, tmp_path):
    model, toml = tiny_models.path("sd1"), dataset_toml(tmp_path, batch_size=3)
    common = ["--max_train_steps", "7", "--save_every_n_steps", "2", "--save_state", "--optimizer_type", "AdamW",
              "--lr_scheduler", "cosine", "--lr_warmup_steps", "2", "--network_dropout", "0.1",
              "--noise_offset", "0.05", "--shuffle_caption", "--caption_dropout_rate", "0.2"]
    full_out = tmp_path / "full"
    run_sd(base_argv(model, toml, full_out, *common))
    first_out = tmp_path / "first"
    shutil.copytree(full_out / "lora-step00000002-state", first_out / "lora-step00000002-state")
    run_sd(base_argv(model, toml, first_out, *common, "--resume", str(first_out / "lora-step00000002-state")))
    second_out = tmp_path / "second"
    shutil.copytree(first_out / "lora-step00000004-state", second_out / "lora-step00000004-state")
    run_sd(base_argv(model, toml, second_out, *common, "--resume", str(second_out / "lora-step00000004-state")))
    expected = _final_tensors(full_out / "lora.safetensors")
    for resumed in (first_out / "lora.safetensors", second_out / "lora.safetensors"):
        got = _final_tensors(resumed)
        assert got.keys() == expected.keys()
        assert all(torch.equal(got[key], expected[key]) for key in expected), resumed
    state = json.loads((full_out / "lora-step00000006-state" / "train_state.json").read_text())
    assert state["current_step"] == 6 and state["global_step"] == 6


def test_saves_every_n_steps_keep_only_the_last_ones(tiny_models, tmp_path):
    out = tmp_path / "out"
    run_sd(base_argv(tiny_models.path("sd1"), dataset_toml(tmp_path), out, "--max_train_steps", "8",
                     "--save_every_n_steps", "2", "--save_last_n_steps", "3", "--network_train_unet_only"))
    # kohya's rule: at step s, the save of step s - N - 1 rounded down to the save interval goes
    assert sorted(path.name for path in out.iterdir()) == ["lora-step00000006.safetensors",
                                                          "lora-step00000008.safetensors", "lora.safetensors"]


def test_existing_output_is_not_overwritten(tiny_models, tmp_path):
    out = tmp_path / "out"
    out.mkdir()
    (out / "lora.safetensors").write_bytes(b"precious")
    with pytest.raises(FlagError, match="already holds lora.safetensors.*--overwrite_output"):
        run_sd(base_argv(tiny_models.path("sd1"), dataset_toml(tmp_path), out))
    assert (out / "lora.safetensors").read_bytes() == b"precious"


@pytest.mark.parametrize("extra, message", [
    (["--network_train_unet_only", "--network_train_text_encoder_only"],
     "--network_train_unet_only and --network_train_text_encoder_only"),
    (["--cache_text_encoder_outputs"], "--cache_text_encoder_outputs needs --network_train_unet_only"),
    (["--full_bf16"], "--full_bf16 needs --mixed_precision bf16"),
    (["--dim_from_weights"], "--dim_from_weights needs --network_weights"),
    (["--network_module", "networks.lorra"], "--network_module"),
])
def test_conflicting_flags_fail_before_models_load(tiny_models, tmp_path, monkeypatch, extra, message):
    import library.models.load as load

    def must_not_load(*args, **kwargs):
        raise AssertionError("a model was loaded")

    monkeypatch.setattr(load, "load_target_model", must_not_load)
    with pytest.raises(FlagError, match=message):
        run_sd(base_argv(tiny_models.path("sd1"), dataset_toml(tmp_path), tmp_path / "out", *extra))


def test_sd1_lora_passed_to_sdxl_training_is_refused(tiny_models, tmp_path):
    sd1_out = tmp_path / "sd1"
    _, sd1_lora = run_sd(base_argv(tiny_models.path("sd1"), dataset_toml(tmp_path), sd1_out,
                                   "--max_train_steps", "1"))
    argv = base_argv(tiny_models.path("sdxl"), dataset_toml(tmp_path), tmp_path / "xl", "--network_weights",
                     str(sd1_lora))
    with pytest.raises(FlagError, match=f"--network_weights.*{sd1_lora.name}"):
        sdxl_train_network.main(argv)


def test_nan_loss_stops_and_keeps_the_last_save(tiny_models, tmp_path):
    from library.train.network_trainer import NetworkTrainer

    class PoisonedTrainer(NetworkTrainer):
        calls = 0

        def call_unet(self, *args, **kwargs):
            PoisonedTrainer.calls += 1
            prediction = super().call_unet(*args, **kwargs)
            return prediction * float("nan") if PoisonedTrainer.calls > 3 else prediction

    out = tmp_path / "out"
    with pytest.raises(TrainingStopped, match="loss became nan at step 4"):
        run_sd(base_argv(tiny_models.path("sd1"), dataset_toml(tmp_path), out, "--max_train_steps", "6",
                         "--save_every_n_steps", "2"), PoisonedTrainer)
    saved = load_file(out / "lora-step00000002.safetensors")
    assert all(torch.isfinite(tensor).all() for tensor in saved.values())
    assert not (out / "lora.safetensors").exists()


def test_sdxl_unet_only_with_cached_outputs_samples_and_validation(tiny_models, tmp_path):
    prompts = tmp_path / "prompts.txt"
    prompts.write_text("tkshape, a red circle --n blurry --d 3 --s 2\n# comment\ntkshape, a blue square --d 4 --s 2\n")
    toml = dataset_toml(tmp_path, extra="validation_split = 0.25\nvalidation_seed = 5")
    out = tmp_path / "out"
    trainer = sdxl_train_network.SdxlNetworkTrainer()
    args = train_network.parse_args(sdxl_train_network.setup_parser(), base_argv(
        tiny_models.path("sdxl"), toml, out, "--network_train_unet_only", "--cache_latents",
        "--cache_text_encoder_outputs", "--sample_prompts", str(prompts), "--sample_every_n_steps", "2",
        "--sample_sampler", "euler_a", "--network_args", "conv_dim=4", "conv_alpha=1"))
    final = trainer.train(args)
    weights = load_file(final)
    assert not any(key.startswith("lora_te") for key in weights)
    assert any(key.startswith("lora_unet_input_blocks_4_1_transformer_blocks_0_attn1_to_q") for key in weights)
    assert any(key.startswith("lora_unet_input_blocks_1_0_in_layers_2") for key in weights)  # 3x3 conv
    samples = sorted(path.name for path in (out / "sample").iterdir())
    assert len(samples) == 4 and all(name.startswith("lora_") and name.endswith(".png") for name in samples)
    assert trainer.validation_history, "validation loss was not computed"
    with safe_open(final, "pt") as handle:
        metadata = handle.metadata()
    assert metadata["ss_base_model_version"] == "sdxl_base_v1-0"
    assert metadata["modelspec.architecture"] == "stable-diffusion-xl-v1-base/lora"
    assert metadata["modelspec.resolution"] == "64x64"


@pytest.mark.parametrize("algo, key", [("locon", "lora_down.weight"), ("loha", "hada_w1_a")])
def test_lycoris_trains_and_saves_through_our_trainer(tiny_models, tmp_path, algo, key):
    out = tmp_path / "out"
    _, final = run_sd(base_argv(tiny_models.path("sd1"), dataset_toml(tmp_path), out, "--max_train_steps", "2",
                                "--network_module", "lycoris.kohya", "--network_args", f"algo={algo}",
                                "conv_dim=4", "conv_alpha=1"))
    weights = load_file(final)
    assert any(name.endswith(key) for name in weights)
    with safe_open(final, "pt") as handle:
        assert handle.metadata()["ss_network_module"] == "lycoris.kohya"


def test_two_cpu_processes_match_one_process_with_the_same_global_batch(tiny_models, tmp_path):
    import os
    import subprocess
    import sys

    from tests.scripts.test_cache_tools import free_port

    model, toml = tiny_models.path("sd1"), dataset_toml(tmp_path, batch_size=1)
    # SGD: Adam's normalisation turns rounding noise in exactly-zero gradients (self-attention over one token at
    # the 1x1 mid block) into full-size updates, which would hide what is compared here
    common = ["--max_train_steps", "5", "--max_data_loader_n_workers", "0", "--noise_offset", "0.05",
              "--optimizer_type", "SGD", "--learning_rate", "0.05", "--save_every_n_steps", "3", "--save_state"]
    single_out = tmp_path / "single"
    run_sd(base_argv(model, toml, single_out, *common, "--gradient_accumulation_steps", "2"))
    ddp_out = tmp_path / "ddp"
    command = [sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu", "--num_processes", "2",
               "--num_machines", "1", "--mixed_precision", "no", "--dynamo_backend", "no",
               "--main_process_port", str(free_port()), "train_network.py", *base_argv(model, toml, ddp_out, *common)]
    env = {**os.environ, "ACCELERATE_USE_CPU": "true", "OMP_NUM_THREADS": "1"}
    result = subprocess.run(command, cwd=ROOT, env=env, capture_output=True, text=True, timeout=300, check=False)
    output = result.stdout + result.stderr
    assert result.returncode == 0, output[-3000:]
    assert "batch accumulation 1, 2 process(es)" in output  # really distributed (LIBRARIES.md §5)
    # every process wrote its random states into the one state folder (the save's parts are agreed collectively)
    assert sorted(path.name for path in (ddp_out / "lora-step00000003-state").iterdir()) == [
        "model.safetensors", "optimizer.bin", "random_states_0.pkl", "random_states_1.pkl", "scheduler.bin",
        "train_state.json"]
    single, ddp = load_file(single_out / "lora.safetensors"), load_file(ddp_out / "lora.safetensors")
    assert single.keys() == ddp.keys()
    scale = max(float(tensor.abs().max()) for key, tensor in single.items() if "lora_up" in key)
    assert scale > 1e-3  # trained
    # Same images, captions, VAE draws and noise per sample; only the summation order differs. The random tiny
    # model amplifies rounding: one process run twice with 1 vs 2 torch threads already differs by ~1% of the
    # scale after 4 steps (measured), while a different image or noise draw differs by 3-200% per module.
    worst = max(float((ddp[key] - single[key]).abs().max()) for key in single)
    assert worst < 0.05 * scale, (worst, scale)


@pytest.mark.parametrize("module", ["networks.dylora", "networks.lora_fa"])
def test_dylora_and_lora_fa_train_through_our_trainer(tiny_models, tmp_path, module):
    out = tmp_path / "out"
    _, final = run_sd(base_argv(tiny_models.path("sd1"), dataset_toml(tmp_path), out, "--max_train_steps", "2",
                                "--network_module", module, "--network_dim", "4", "--network_args", "unit=2"
                                if module == "networks.dylora" else "conv_dim=2", "--network_train_unet_only"))
    weights = load_file(final)
    assert weights["lora_unet_down_blocks_0_attentions_0_proj_in.lora_down.weight"].shape[0] == 4
    with safe_open(final, "pt") as handle:
        assert handle.metadata()["ss_network_module"] == module


def test_config_file_supplies_flags_and_the_command_line_wins(tiny_models, tmp_path):
    config = tmp_path / "args.toml"
    config.write_text(f"""
[model]
pretrained_model_name_or_path = '{tiny_models.path("sd1").as_posix()}'
[training]
max_train_steps = 3
network_dim = 8
network_args = ["conv_dim=2", "conv_alpha=1"]
""")
    out = tmp_path / "out"
    argv = ["--config_file", str(config), "--dataset_config", str(dataset_toml(tmp_path)), "--output_dir", str(out),
            "--network_dim", "4", "--skip_dataset_lint", "--network_train_unet_only"]
    trainer, final = run_sd(argv)
    assert len(trainer.loss_history) == 3
    weights = load_file(final)
    assert weights["lora_unet_down_blocks_0_attentions_0_proj_in.lora_down.weight"].shape[0] == 4
    assert any("resnets_0_conv1" in key for key in weights)  # conv_dim from the file
    assert final.name == "last.safetensors"  # kohya's default name without --output_name


def test_sd2_v_training_and_continuing_from_network_weights(tiny_models, tmp_path):
    first_out = tmp_path / "first"
    _, first = run_sd(base_argv(tiny_models.path("sd2-v"), dataset_toml(tmp_path), first_out, "--max_train_steps",
                                "2", "--network_dim", "6", "--network_alpha", "3"))
    with safe_open(first, "pt") as handle:
        metadata = handle.metadata()
    assert metadata["ss_base_model_version"] == "sd_v2_v" and metadata["modelspec.prediction_type"] == "v"
    # --dim_from_weights takes rank 6 / alpha 3 from the file even though --network_dim says 4
    trainer, second = run_sd(base_argv(tiny_models.path("sd2-v"), dataset_toml(tmp_path), tmp_path / "second",
                                       "--max_train_steps", "1", "--network_weights", str(first),
                                       "--dim_from_weights", "--learning_rate", "1e-12"))
    before, after = load_file(first), load_file(second)
    assert before.keys() == after.keys()
    key = "lora_unet_down_blocks_0_attentions_0_proj_in.lora_down.weight"
    assert after[key].shape[0] == 6
    torch.testing.assert_close(after[key], before[key], atol=1e-9, rtol=0)  # started from the file


def test_bf16_with_fp8_base_trains_on_cpu(tiny_models, tmp_path):
    trainer, final = run_sd(base_argv(tiny_models.path("sd1"), dataset_toml(tmp_path), tmp_path / "out",
                                      "--max_train_steps", "2", "--mixed_precision", "bf16", "--fp8_base",
                                      "--save_precision", "fp16"))
    linear = trainer._models.unet.down_blocks[0].attentions[0].proj_in
    assert linear.weight.dtype == torch.float8_e4m3fn
    # the text encoders (trained through the LoRA here) are stored in fp8 too, their embeddings in bf16
    encoder = trainer._models.text_encoders[0]
    linears = [module for module in encoder.modules() if isinstance(module, torch.nn.Linear)]
    assert linears and all(module.weight.dtype == torch.float8_e4m3fn for module in linears)
    assert getattr(encoder, "text_model", encoder).embeddings.token_embedding.weight.dtype == torch.bfloat16
    assert any(key.startswith("lora_te_") for key in load_file(final))
    assert all(math.isfinite(loss) for loss in trainer.loss_history)
    assert {tensor.dtype for tensor in load_file(final).values()} == {torch.float16}


def test_wandb_without_the_package_is_a_clear_error(tiny_models, tmp_path, monkeypatch):
    import importlib.util

    real_find_spec = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "wandb" else
                        real_find_spec(name, *a))
    with pytest.raises(FlagError, match="--log_with wandb needs the wandb package: pip install wandb"):
        run_sd(base_argv(tiny_models.path("sd1"), dataset_toml(tmp_path), tmp_path / "out", "--log_with", "wandb"))


def test_script_help_and_one_line_error_with_exit_code_2(tiny_models, tmp_path):
    import subprocess
    import sys

    help_text = subprocess.run([sys.executable, "sdxl_train_network.py", "--help"], cwd=ROOT, capture_output=True,
                               text=True, check=True).stdout
    for flag in ("--network_module", "--save_every_n_steps", "--sample_prompts", "--resume", "--config_file"):
        assert flag in help_text
    result = subprocess.run([sys.executable, "sdxl_train_network.py", *base_argv(
        tiny_models.path("sdxl"), dataset_toml(tmp_path), tmp_path / "out", "--network_train_unet_only",
        "--network_train_text_encoder_only")], cwd=ROOT, capture_output=True, text=True, check=False)
    assert result.returncode == 2
    assert result.stderr.strip().splitlines()[-1].startswith(
        "error: --network_train_unet_only and --network_train_text_encoder_only cannot be used together")
    assert "Traceback" not in result.stderr
