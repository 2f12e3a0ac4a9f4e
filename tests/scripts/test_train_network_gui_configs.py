"""Runs the kohya_ss GUI makes, end to end on tiny models: a LyCORIS preset on SDXL, the LoRA+ flags, and masked
loss from mask images (conditioning_data_dir + --masked_loss)."""
from __future__ import annotations

import numpy as np
import pytest
from PIL import Image
from safetensors.torch import load_file

import sdxl_train_network
import train_network
from tests.data_fixtures import write_image
from tests.scripts.test_train_network import base_argv, dataset_toml, run_sd


def test_lycoris_gui_preset_full_trains_sdxl_with_sgm_names(tiny_models, tmp_path):
    pytest.importorskip("lycoris.kohya")
    argv = base_argv(tiny_models.path("sdxl"), dataset_toml(tmp_path), tmp_path / "out", "--max_train_steps", "1",
                     "--network_module", "lycoris.kohya", "--network_args", "preset=full", "algo=locon",
                     "conv_dim=4", "conv_alpha=1")
    args = train_network.parse_args(sdxl_train_network.setup_parser(), argv)
    final = sdxl_train_network.SdxlNetworkTrainer().train(args)
    names = {key.split(".")[0] for key in load_file(final)}
    unet_names = {name for name in names if name.startswith("lora_unet_")}
    assert "lora_unet_input_blocks_1_0_in_layers_2" in unet_names  # a 3x3 conv of a ResNet, by kohya's SGM name
    assert "lora_unet_middle_block_1_transformer_blocks_0_attn1_to_q" in unet_names
    assert all(name.startswith(("lora_unet_input_blocks_", "lora_unet_middle_block_", "lora_unet_output_blocks_"))
               for name in unet_names)
    assert all(name.startswith(("lora_te1_text_model_", "lora_te2_text_model_")) for name in names - unet_names)


def test_loraplus_flags_make_plus_groups_in_the_trainers_optimizer(tiny_models, tmp_path):
    trainer, _ = run_sd(base_argv(tiny_models.path("sd1"), dataset_toml(tmp_path), tmp_path / "out",
                                  "--max_train_steps", "1", "--unet_lr", "1e-3", "--text_encoder_lr", "1e-4",
                                  "--loraplus_lr_ratio", "16", "--loraplus_text_encoder_lr_ratio", "4"))
    names = trainer._trainable.group_names
    assert names == ["textencoder", "textencoder plus", "unet", "unet plus"]
    lrs = [group["lr"] for group in trainer._trainable.optimizer.param_groups]
    assert lrs == pytest.approx([1e-4, 4e-4, 1e-3, 1.6e-2])


def mask_dataset_toml(tmp_path, mask_value: int):
    """The bundled tiny dataset's images with one-colour masks of the same stems (kohya_ss' masked-loss layout)."""
    toml = dataset_toml(tmp_path)
    images = tmp_path / "images"
    for image in images.glob("*.png"):
        width, height = Image.open(image).size
        write_image(tmp_path / "masks" / image.name, pixels=np.full((height, width), mask_value, dtype=np.uint8))
    text = toml.read_text()
    toml.write_text(text.replace(f"image_dir = '{images.as_posix()}'",
                                 f"image_dir = '{images.as_posix()}'\n"
                                 f"conditioning_data_dir = '{(tmp_path / 'masks').as_posix()}'"))
    return toml


def test_black_masks_zero_the_loss_and_white_masks_keep_it(tiny_models, tmp_path):
    losses = {}
    for value in (0, 255):
        folder = tmp_path / str(value)
        trainer, _ = run_sd(base_argv(tiny_models.path("sd1"), mask_dataset_toml(folder, value), folder / "out",
                                      "--max_train_steps", "2", "--masked_loss"))
        losses[value] = trainer.loss_history
    assert losses[0] == [0.0, 0.0]  # every pixel masked out
    assert all(loss > 0 for loss in losses[255])
