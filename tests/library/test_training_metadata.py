"""Training metadata: the `ss_*` keys kohya writes (COMPAT §2.1) from flags and a real dataset group, the
base-model hashes (§2.2), `--no_metadata`, and the `modelspec.*` keys per family (§2.3).
"""
from __future__ import annotations

import argparse
import base64
import hashlib
import json
import time

import pytest

from library.data.prepare import dataset_group_from_args
from library.errors import FlagError
from library.families import SD1, SD2_V, SDXL
from library.options.dataset import add_dataset_arguments
from library.options.metadata import add_metadata_arguments, check_metadata_arguments
from library.options.model import add_model_arguments, add_text_encoding_arguments
from library.options.network import add_network_arguments
from library.options.noise_loss import add_noise_and_loss_arguments
from library.options.optimizer import add_optimizer_arguments
from library.options.training import add_output_arguments, add_training_arguments, add_training_loop_arguments
from library.train.metadata import file_model_hashes, metadata_for_save, modelspec_metadata, training_metadata
from tests.data_fixtures import write_dataset_config, write_images

STARTED_AT = 1700000000.25
COMMIT = "0123456789abcdef0123456789abcdef01234567"

# COMPAT §2.1 "Always (training)", copied by hand (the model hashes need an existing file, given below)
ALWAYS_KEYS = (
    "ss_session_id", "ss_training_started_at", "ss_training_finished_at", "ss_output_name", "ss_learning_rate",
    "ss_text_encoder_lr", "ss_unet_lr", "ss_num_train_images", "ss_num_validation_images", "ss_num_reg_images",
    "ss_num_batches_per_epoch", "ss_num_epochs", "ss_max_train_steps", "ss_gradient_checkpointing",
    "ss_gradient_accumulation_steps", "ss_lr_warmup_steps", "ss_lr_scheduler", "ss_network_module", "ss_network_dim",
    "ss_network_alpha", "ss_network_dropout", "ss_mixed_precision", "ss_full_fp16", "ss_v2", "ss_base_model_version",
    "ss_clip_skip", "ss_max_token_length", "ss_cache_latents", "ss_seed", "ss_lowram", "ss_noise_offset",
    "ss_multires_noise_iterations", "ss_multires_noise_discount", "ss_adaptive_noise_scale", "ss_zero_terminal_snr",
    "ss_noise_offset_random_strength", "ss_ip_noise_gamma", "ss_ip_noise_gamma_random_strength",
    "ss_training_comment", "ss_sd_scripts_commit_hash", "ss_optimizer", "ss_max_grad_norm", "ss_caption_dropout_rate",
    "ss_caption_dropout_every_n_epochs", "ss_caption_tag_dropout_rate", "ss_face_crop_aug_range",
    "ss_prior_loss_weight", "ss_min_snr_gamma", "ss_scale_weight_norms", "ss_debiased_estimation", "ss_loss_type",
    "ss_huber_schedule", "ss_huber_scale", "ss_huber_c", "ss_fp8_base", "ss_fp8_base_unet", "ss_validation_seed",
    "ss_validation_split", "ss_max_validation_steps", "ss_validate_every_n_epochs", "ss_validate_every_n_steps",
    "ss_resize_interpolation", "ss_sd_model_name", "ss_sd_model_hash", "ss_new_sd_model_hash", "ss_vae_name",
    "ss_vae_hash", "ss_new_vae_hash", "ss_steps", "ss_epoch",
)
CONFIG_ONLY_KEYS = {"ss_datasets"}
FLAG_ONLY_KEYS = {"ss_batch_size_per_device", "ss_total_batch_size", "ss_resolution", "ss_color_aug", "ss_flip_aug",
                  "ss_random_crop", "ss_shuffle_caption", "ss_enable_bucket", "ss_bucket_no_upscale",
                  "ss_min_bucket_reso", "ss_max_bucket_reso", "ss_keep_tokens", "ss_reg_dataset_dirs",
                  "ss_bucket_info"}
MINIMUM_KEYS = {"ss_v2", "ss_base_model_version", "ss_network_module", "ss_network_dim", "ss_network_alpha"}


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser()
    for add in (add_metadata_arguments, add_dataset_arguments, add_model_arguments, add_text_encoding_arguments,
                add_training_arguments, add_training_loop_arguments, add_output_arguments,
                add_noise_and_loss_arguments, add_optimizer_arguments, add_network_arguments):
        add(parser)
    return parser


def _dog_images(folder):
    """img0 64x64 "A Dog, grass", img1 96x32 "a dog, Sky", img2 100x34 without caption (class tokens)."""
    write_images(folder, [(64, 64), (96, 32), (100, 34)])
    (folder / "img0.caption").write_text("A Dog, grass", encoding="utf-8")
    (folder / "img1.caption").write_text("a dog, Sky", encoding="utf-8")


def _config_run(tmp_path, *argv: str):
    """Two datasets sharing the `dogs` folder; the first also has 2 regularisation images of `reg`."""
    _dog_images(tmp_path / "dogs")
    write_images(tmp_path / "reg", [(64, 64)] * 2, seed=5)
    config = {"datasets": [
        {"resolution": 64, "batch_size": 2, "subsets": [
            {"image_dir": str(tmp_path / "dogs"), "num_repeats": 2, "class_tokens": "sks dog"},
            {"image_dir": str(tmp_path / "reg"), "is_reg": True, "class_tokens": "dog"}]},
        {"resolution": 64, "enable_bucket": True, "min_bucket_reso": 32, "max_bucket_reso": 128,
         "bucket_reso_steps": 32, "subsets": [
             {"image_dir": str(tmp_path / "dogs"), "num_repeats": 3, "class_tokens": "sks dog", "flip_aug": True}]},
    ]}
    path = write_dataset_config(tmp_path / "dataset.toml", config)
    args = _parser().parse_args(["--dataset_config", str(path), *argv])
    return args, dataset_group_from_args(args, SD1, lint=False)


def _metadata(args, group, family=SD1, network_args=None, **overrides) -> dict[str, str]:
    keywords = {"session_id": 1234, "started_at": STARTED_AT, "train_group": group, "val_group": None,
                "num_batches_per_epoch": 9, "num_epochs": 4, "max_train_steps": 36,
                "optimizer_description": "torch.optim.adamw.AdamW(weight_decay=0.1)",
                "network_module": "networks.lora", "network_args": network_args, "lr_warmup_steps": 5,
                "commit": COMMIT}
    keywords.update(overrides)
    return training_metadata(args, family, **keywords)


# ---- ss_* keys with a dataset config ----------------------------------------------------------------------------

def test_counts_flags_and_family_keys(tmp_path):
    args, group = _config_run(tmp_path, "--learning_rate", "1e-4", "--text_encoder_lr", "1e-4", "5e-5",
                              "--face_crop_aug_range", "2.0,4.0", "--seed", "42")
    metadata = _metadata(args, group)
    # train: 3 images x 2 + 3 images x 3; reg: 2 images balanced round-robin to the first dataset's 6 samples
    assert metadata["ss_num_train_images"] == "15"
    assert metadata["ss_num_reg_images"] == "6"
    assert metadata["ss_num_validation_images"] == "0"
    assert metadata["ss_network_dim"] == "None" and metadata["ss_network_alpha"] == "None"
    assert "ss_network_args" not in metadata
    assert metadata["ss_v2"] == "False" and metadata["ss_base_model_version"] == "sd_v1"
    assert metadata["ss_learning_rate"] == "0.0001"
    assert metadata["ss_text_encoder_lr"] == "[0.0001, 5e-05]"
    assert metadata["ss_face_crop_aug_range"] == "(2.0, 4.0)"
    assert metadata["ss_full_fp16"] == "False" and metadata["ss_seed"] == "42"
    assert metadata["ss_training_started_at"] == "1700000000.25"
    assert metadata["ss_optimizer"] == "torch.optim.adamw.AdamW(weight_decay=0.1)"
    assert metadata["ss_sd_scripts_commit_hash"] == COMMIT
    assert metadata["ss_lr_warmup_steps"] == "5" and metadata["ss_max_train_steps"] == "36"
    assert all(isinstance(value, str) for value in metadata.values())
    assert not FLAG_ONLY_KEYS & set(metadata)


@pytest.mark.parametrize("family, v2, version", [(SD1, "False", "sd_v1"), (SD2_V, "True", "sd_v2_v"),
                                                 (SDXL, "False", "sdxl_base_v1-0")])
def test_base_model_version_per_family(tmp_path, family, v2, version):
    args, group = _config_run(tmp_path)
    metadata = _metadata(args, group, family=family)
    assert (metadata["ss_v2"], metadata["ss_base_model_version"]) == (v2, version)


def test_tag_frequency_and_dataset_dirs(tmp_path):
    args, group = _config_run(tmp_path)
    metadata = _metadata(args, group)
    # comma-split, stripped, lower-cased; the reg folder is left out; `dogs` is counted once for both datasets
    assert json.loads(metadata["ss_tag_frequency"]) == {"dogs": {"a dog": 2, "grass": 1, "sky": 1, "sks dog": 1}}
    assert json.loads(metadata["ss_dataset_dirs"]) == {"dogs": {"n_repeats": 2, "img_count": 3},
                                                       "dogs (2)": {"n_repeats": 3, "img_count": 3}}


def test_datasets_json_structure(tmp_path):
    args, group = _config_run(tmp_path)
    first, second = json.loads(_metadata(args, group)["ss_datasets"])
    assert {key: first[key] for key in ("is_dreambooth", "batch_size_per_device", "num_train_images",
                                         "num_reg_images", "resolution", "enable_bucket", "min_bucket_reso",
                                         "max_bucket_reso", "bucket_info", "resize_interpolation")} == {
        "is_dreambooth": True, "batch_size_per_device": 2, "num_train_images": 6, "num_reg_images": 6,
        "resolution": [64, 64], "enable_bucket": False, "min_bucket_reso": None, "max_bucket_reso": None,
        "bucket_info": None, "resize_interpolation": None}
    dogs, reg = first["subsets"]
    assert dogs == {"img_count": 3, "num_repeats": 2, "color_aug": False, "flip_aug": False, "random_crop": False,
                    "shuffle_caption": False, "keep_tokens": 0, "keep_tokens_separator": "",
                    "secondary_separator": None, "enable_wildcard": False, "caption_prefix": None,
                    "caption_suffix": None, "resize_interpolation": None, "image_dir": "dogs",
                    "class_tokens": "sks dog", "is_reg": False}
    assert (reg["image_dir"], reg["is_reg"], reg["class_tokens"], reg["img_count"]) == ("reg", True, "dog", 2)
    assert first["tag_frequency"] == {"dogs": {"a dog": 2, "grass": 1, "sky": 1, "sks dog": 1}}
    assert (second["enable_bucket"], second["min_bucket_reso"], second["max_bucket_reso"]) == (True, 32, 128)
    assert second["subsets"][0]["flip_aug"] is True and second["num_reg_images"] == 0
    # buckets (32,96) (32,128) (64,64) (96,32) (128,32): 64x64 -> index 2; 96x32 and 100x34 -> index 3, x3 repeats
    assert second["bucket_info"]["buckets"] == {"2": {"resolution": [64, 64], "count": 3},
                                                "3": {"resolution": [96, 32], "count": 6}}
    assert second["bucket_info"]["mean_img_ar_error"] == pytest.approx(abs(3 - 100 / 34) / 3)


def test_network_args_model_names_and_hashes(tmp_path):
    model = tmp_path / "models" / "base_model.safetensors"
    model.parent.mkdir()
    model.write_bytes(bytes(range(256)) * 4500)
    args, group = _config_run(tmp_path, "--pretrained_model_name_or_path", str(model),
                              "--vae", "stabilityai/sd-vae-ft-mse", "--network_dim", "16", "--network_alpha", "8")
    metadata = _metadata(args, group, network_args={"conv_dim": "4", "dropout": None})
    assert metadata["ss_network_args"] == '{"conv_dim": "4", "dropout": null}'
    assert (metadata["ss_network_dim"], metadata["ss_network_alpha"]) == ("16", "8.0")
    assert metadata["ss_sd_model_name"] == "base_model.safetensors"
    data = model.read_bytes()
    assert metadata["ss_new_sd_model_hash"] == hashlib.sha256(data).hexdigest()
    assert metadata["ss_sd_model_hash"] == hashlib.sha256(data[0x100000:0x110000]).hexdigest()[:8]
    # a hub id is kept whole and has no hashes
    assert metadata["ss_vae_name"] == "stabilityai/sd-vae-ft-mse"
    assert "ss_vae_hash" not in metadata and "ss_new_vae_hash" not in metadata


# ---- ss_* keys from flags only -----------------------------------------------------------------------------------

def test_flag_only_dataset_keys(tmp_path):
    _dog_images(tmp_path / "train" / "2_sks dog")
    write_images(tmp_path / "reg" / "1_dog", [(64, 64)] * 2, seed=5)
    args = _parser().parse_args(["--train_data_dir", str(tmp_path / "train"), "--reg_data_dir", str(tmp_path / "reg"),
                                 "--resolution", "64", "--train_batch_size", "2", "--gradient_accumulation_steps",
                                 "3", "--flip_aug", "--keep_tokens", "1"])
    group = dataset_group_from_args(args, SD1, lint=False)
    metadata = _metadata(args, group, num_processes=2)
    assert {key: metadata[key] for key in ("ss_batch_size_per_device", "ss_total_batch_size", "ss_resolution",
                                           "ss_flip_aug", "ss_color_aug", "ss_enable_bucket", "ss_min_bucket_reso",
                                           "ss_keep_tokens", "ss_bucket_info")} == {
        "ss_batch_size_per_device": "2", "ss_total_batch_size": "12", "ss_resolution": "(64, 64)",
        "ss_flip_aug": "True", "ss_color_aug": "False", "ss_enable_bucket": "False", "ss_min_bucket_reso": "None",
        "ss_keep_tokens": "1", "ss_bucket_info": "null"}
    assert json.loads(metadata["ss_dataset_dirs"]) == {"2_sks dog": {"n_repeats": 2, "img_count": 3}}
    assert json.loads(metadata["ss_reg_dataset_dirs"]) == {"1_dog": {"n_repeats": 1, "img_count": 2}}
    assert json.loads(metadata["ss_tag_frequency"]) == {"2_sks dog": {"a dog": 2, "grass": 1, "sky": 1,
                                                                      "sks dog": 1}}
    assert "ss_datasets" not in metadata


# ---- per save, --no_metadata -------------------------------------------------------------------------------------

def _saved(tmp_path, no_metadata: bool, network_args=None):
    model = tmp_path / "base.safetensors"
    model.write_bytes(b"\0" * 4096)
    vae = tmp_path / "vae.safetensors"
    vae.write_bytes(b"\1" * 4096)
    args, group = _config_run(tmp_path, "--pretrained_model_name_or_path", str(model), "--vae", str(vae))
    training = _metadata(args, group, network_args=network_args)
    modelspec = modelspec_metadata(args, SD1, started_at=STARTED_AT, commit=COMMIT)
    return metadata_for_save(training, modelspec, steps=120, epoch=3, finished_at=1700000999.5,
                             no_metadata=no_metadata), modelspec


def test_saved_metadata_has_every_always_key_as_text(tmp_path):
    saved, modelspec = _saved(tmp_path, no_metadata=False)
    assert set(ALWAYS_KEYS) - set(saved) == set()
    assert CONFIG_ONLY_KEYS <= set(saved)
    assert all(isinstance(value, str) for value in saved.values())
    assert (saved["ss_steps"], saved["ss_epoch"], saved["ss_training_finished_at"]) == ("120", "3", "1700000999.5")
    assert modelspec.items() <= saved.items()


@pytest.mark.parametrize("network_args, expected_extra", [(None, set()), ({"conv_dim": "4"}, {"ss_network_args"})])
def test_no_metadata_keeps_the_minimum_and_modelspec(tmp_path, network_args, expected_extra):
    saved, modelspec = _saved(tmp_path, no_metadata=True, network_args=network_args)
    assert set(saved) == MINIMUM_KEYS | expected_extra | set(modelspec)
    assert modelspec["modelspec.architecture"] == "stable-diffusion-v1/lora"


# ---- modelspec.* --------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("family, architecture, implementation, resolution, prediction", [
    (SD1, "stable-diffusion-v1/lora", "diffusers", "512x512", "epsilon"),
    (SD2_V, "stable-diffusion-v2-768-v/lora", "diffusers", "768x768", "v"),
    (SDXL, "stable-diffusion-xl-v1-base/lora", "https://github.com/Stability-AI/generative-models", "1024x1024",
     "epsilon"),
])
def test_modelspec_per_family(family, architecture, implementation, resolution, prediction):
    spec = modelspec_metadata(_parser().parse_args([]), family, started_at=STARTED_AT, commit=COMMIT)
    assert spec == {
        "modelspec.sai_model_spec": "1.0.1", "modelspec.architecture": architecture,
        "modelspec.implementation": implementation, "modelspec.title": "LoRA@1700000000",
        "modelspec.resolution": resolution,
        "modelspec.date": time.strftime("%Y-%m-%dT%H:%M:%S", time.localtime(1700000000)),
        "modelspec.prediction_type": prediction, "modelspec.implementation_version": f"sd-scripts/{COMMIT}"}


def test_modelspec_kinds_title_and_optional_keys():
    parser = _parser()
    args = parser.parse_args(["--output_name", "my_lora", "--clip_skip", "2", "--min_timestep", "100",
                              "--metadata_author", "me", "--metadata_tags", "style,anime",
                              "--metadata_trigger_phrase", "sks", "--metadata_is_negative_embedding", "Yes"])
    spec = modelspec_metadata(args, SD1, kind="textual-inversion", resolution=(768, 512), commit=COMMIT)
    assert spec["modelspec.architecture"] == "stable-diffusion-v1/textual-inversion"
    assert spec["modelspec.implementation"] == "https://github.com/Stability-AI/generative-models"
    assert spec["modelspec.title"] == "my_lora" and spec["modelspec.resolution"] == "768x512"
    assert spec["modelspec.timestep_range"] == "100,1000" and spec["modelspec.encoder_layer"] == "2"
    assert (spec["modelspec.author"], spec["modelspec.tags"], spec["modelspec.trigger_phrase"]) == (
        "me", "style,anime", "sks")
    assert spec["modelspec.is_negative_embedding"] == "true"
    assert "modelspec.license" not in spec and "modelspec.hash_sha256" not in spec
    titled = parser.parse_args(["--output_name", "my_lora", "--metadata_title", "My LoRA", "--resolution", "640,448"])
    checkpoint = modelspec_metadata(titled, SDXL, kind="checkpoint", commit=COMMIT)
    assert (checkpoint["modelspec.architecture"], checkpoint["modelspec.title"]) == (
        "stable-diffusion-xl-v1-base", "My LoRA")
    assert checkpoint["modelspec.resolution"] == "640x448"


def test_thumbnail_file_becomes_a_data_url(tmp_path):
    image = tmp_path / "thumb.PNG"
    image.write_bytes(b"\x89PNG\r\n\x1a\nfake")
    args = _parser().parse_args(["--metadata_thumbnail", str(image)])
    check_metadata_arguments(args)
    spec = modelspec_metadata(args, SD1, started_at=STARTED_AT, commit=COMMIT)
    assert spec["modelspec.thumbnail"] == "data:image/png;base64," + base64.b64encode(image.read_bytes()).decode()
    url_args = _parser().parse_args(["--metadata_thumbnail", "data:image/jpeg;base64,AAAA"])
    assert modelspec_metadata(url_args, SD1, commit=COMMIT)["modelspec.thumbnail"] == "data:image/jpeg;base64,AAAA"


@pytest.mark.parametrize("flags, message", [
    (["--metadata_thumbnail", "{tmp}/missing.png"], "--metadata_thumbnail {tmp}/missing.png: file not found"),
    (["--metadata_thumbnail", "{tmp}/notes.txt"], "--metadata_thumbnail {tmp}/notes.txt: expected an image file"),
    (["--metadata_is_negative_embedding", "maybe"], "--metadata_is_negative_embedding 'maybe': expected true or false"),
])
def test_bad_metadata_flags_fail_before_training(tmp_path, flags, message):
    (tmp_path / "notes.txt").write_text("not an image", encoding="utf-8")
    args = _parser().parse_args([flag.format(tmp=tmp_path) for flag in flags])
    with pytest.raises(FlagError) as raised:
        check_metadata_arguments(args)
    assert str(raised.value).startswith(message.format(tmp=tmp_path))
    with pytest.raises(FlagError):
        modelspec_metadata(args, SD1, commit=COMMIT)


# ---- base-model file hashes ---------------------------------------------------------------------------------------

def test_file_model_hashes_match_hashlib(tmp_path):
    data = (bytes(range(251)) * 4800)[:1_200_000]  # 251 is prime, so every 1 MiB-offset block differs
    model = tmp_path / "model.ckpt"
    model.write_bytes(data)
    assert file_model_hashes(model) == (hashlib.sha256(data[0x100000:0x110000]).hexdigest()[:8],
                                        hashlib.sha256(data).hexdigest())
    small = tmp_path / "small.safetensors"
    small.write_bytes(b"tiny")  # shorter than 1 MiB: the legacy hash covers no bytes
    assert file_model_hashes(small) == (hashlib.sha256(b"").hexdigest()[:8], hashlib.sha256(b"tiny").hexdigest())
    assert file_model_hashes(tmp_path) == (None, None)
    assert file_model_hashes(tmp_path / "missing.safetensors") == (None, None)
    assert file_model_hashes(None) == (None, None)
