"""A kohya_ss GUI style --config_file runs unchanged on the tiny SD1 model: GUI-only keys ignored with one warning
(also in --console_log_file), two text-encoder learning rates for one encoder, false / "" meaning not set, 1 for a
switch, and --save_n_epoch_ratio choosing which epochs are saved."""
from __future__ import annotations

import logging
from pathlib import Path
from string import Template

from safetensors import safe_open

import train_network
from tests.scripts.test_train_network import dataset_toml

CONFIGS = Path(__file__).parent / "kohya_configs"


def test_gui_style_config_trains_as_kohya_reads_it(tiny_models, tmp_path):
    from library.train.network_trainer import NetworkTrainer

    out, log_file = tmp_path / "out", tmp_path / "train.log"
    config = tmp_path / "args.toml"
    config.write_text(Template((CONFIGS / "gui_lora_sd15.toml").read_text(encoding="utf-8")).substitute(
        model=tiny_models.path("sd1").as_posix(), dataset=dataset_toml(tmp_path, batch_size=8).as_posix(),
        output_dir=out.as_posix(), log_file=log_file.as_posix()), encoding="utf-8")
    root = logging.getLogger()
    level, handlers = root.level, list(root.handlers)
    try:
        args = train_network.parse_args(train_network.setup_parser(), ["--config_file", str(config)])
        trainer = NetworkTrainer()
        final = trainer.train(args)
    finally:
        for handler in [h for h in root.handlers if h not in handlers]:
            root.removeHandler(handler)
            handler.close()
        root.setLevel(level)

    used = trainer._run.args
    assert (used.resume, used.vae, used.save_last_n_epochs_state, used.sample_prompts, used.log_with) == (
        None, None, None, None, None), "false and empty strings leave the flag unset"
    assert used.persistent_data_loader_workers is True and used.network_args is None
    assert used.text_encoder_lr == [5e-05], "the first of the two GUI values, for SD1's one encoder"
    assert 5e-05 in [group["lr"] for group in trainer._trainable.optimizer.param_groups]
    # 4 epochs, --save_n_epoch_ratio 2 replaces --save_every_n_epochs 1: a save at epoch 2, then the final file
    assert sorted(path.name for path in out.iterdir()) == ["gui_lora-000002.safetensors", "gui_lora.safetensors"]
    with safe_open(final, "pt") as handle:
        metadata = handle.metadata()
    assert (metadata["ss_epoch"], metadata["ss_text_encoder_lr"]) == ("4", "[5e-05]")
    log = log_file.read_text(encoding="utf-8")
    assert log.count("ignored keys in") == 1
    assert (f"ignored keys in {config}: epoch, noise_offset_type (did you mean noise_offset?) (kohya ignores "
            "unknown keys too; --strict_config makes them errors)") in log
    assert "--text_encoder_lr got 2 values but this model has 1 text encoder(s); using 5e-05" in log
    assert "--save_n_epoch_ratio 2: saving every 2 epoch(s) of 4" in log


def test_logging_flags_inside_a_config_file_reach_the_script(tmp_path):
    import subprocess
    import sys

    from tests.conftest import ROOT

    log_file = tmp_path / "run.log"
    config = tmp_path / "args.toml"
    config.write_text(f'console_log_level = "DEBUG"\nconsole_log_simple = true\nconsole_log_file = '
                      f'"{log_file.as_posix()}"\nepoch = 3\noutput_dir = "{tmp_path.as_posix()}"\n', encoding="utf-8")
    result = subprocess.run([sys.executable, "train_network.py", "--config_file", str(config)], cwd=ROOT,
                            capture_output=True, text=True, timeout=120)
    assert result.returncode == 2
    warning = (f"ignored keys in {config}: epoch (kohya ignores unknown keys too; --strict_config makes them "
               "errors)")
    assert warning in result.stderr.splitlines(), "--console_log_simple: the message alone on its line"
    assert "traceback" in result.stderr.splitlines(), "--console_log_level DEBUG from the file shows the traceback"
    assert result.stderr.strip().splitlines()[-1] == (
        "error: --pretrained_model_name_or_path is required (the base model: a .safetensors/.ckpt file or a "
        "diffusers folder)")
    logged = log_file.read_text(encoding="utf-8").splitlines()
    assert warning in logged and "traceback" in logged
