"""Model load/save: exact round trips for family x format x dtype, diffusers reading our files, extras, EMA, VAE."""
from __future__ import annotations

import json

import pytest
import torch

from library.families import UNET_PREFIX
from library.models.load import load_target_model
from library.models.save import save_model
from library.models.state_dict_io import TensorFile, read_state_dict, write_state_dict

FAMILIES = ("sd1", "sd2-v", "sdxl")
DTYPES = {None: torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}


def assert_same_tensors(first: dict, second: dict) -> None:
    assert set(first) == set(second), sorted(set(first) ^ set(second))[:5]
    for key, tensor in first.items():
        other = second[key]
        assert tensor.dtype == other.dtype, key
        assert tensor.shape == other.shape, key
        assert torch.equal(tensor, other), key


def assert_same_models(bundle, other) -> None:
    assert bundle.family.name == other.family.name
    assert len(bundle.text_encoders) == len(other.text_encoders)
    for model, other_model in zip(bundle.models(), other.models()):
        assert type(model) is type(other_model)
        assert_same_tensors(model.state_dict(), other_model.state_dict())


@pytest.mark.parametrize("precision", [None, "fp16", "bf16"])
@pytest.mark.parametrize("save_as", ["safetensors", "ckpt"])
@pytest.mark.parametrize("family", FAMILIES)
def test_single_file_round_trip_is_bit_exact(tiny_models, tmp_path, family, save_as, precision):
    original = tiny_models.path(family, save_as, precision)
    # .ckpt files carry no metadata, so v-prediction needs the flag there (as with kohya)
    bundle = load_target_model(original, v_parameterization=family == "sd2-v" and save_as == "ckpt")
    assert bundle.family.name == family
    assert all(parameter.dtype == DTYPES[precision] for model in bundle.models() for parameter in model.parameters())
    again = tmp_path / original.name
    save_model(bundle, again, save_model_as=save_as)
    assert_same_tensors(read_state_dict(original), read_state_dict(again))


@pytest.mark.parametrize("save_as", ["diffusers", "diffusers_safetensors"])
@pytest.mark.parametrize("family", FAMILIES)
def test_diffusers_folder_round_trip(tiny_models, tmp_path, family, save_as):
    folder = tiny_models.path(family, save_as)
    loaded = load_target_model(folder)
    assert_same_models(tiny_models.bundle(family), loaded)
    # diffusers folder -> single file gives exactly the single file written from the original models
    single = tmp_path / "from_folder.safetensors"
    save_model(loaded, single)
    assert_same_tensors(read_state_dict(tiny_models.path(family, "safetensors")), read_state_dict(single))


@pytest.mark.parametrize("family", FAMILIES)
def test_loaded_single_file_equals_the_models_it_was_written_from(tiny_models, family):
    loaded = load_target_model(tiny_models.path(family, "safetensors"))
    assert_same_models(tiny_models.bundle(family), loaded)


@pytest.mark.parametrize("family", FAMILIES)
def test_text_encoders_are_written_with_text_model_prefix(tiny_models, family):
    folder = tiny_models.path(family, "diffusers_safetensors")
    bundle = tiny_models.bundle(family)
    for spec in bundle.family.text_encoders:
        keys = TensorFile(folder / spec.diffusers_subfolder / "model.safetensors").keys()
        assert keys and all(key.startswith("text_model.") or key == "text_projection.weight" for key in keys)
    index = json.loads((folder / "model_index.json").read_text())
    assert index["_class_name"] == bundle.family.pipeline_class


@pytest.mark.parametrize("family", FAMILIES)
def test_diffusers_single_file_loader_reads_our_file_bit_exactly(tiny_models, family):
    import diffusers

    pipeline_class = getattr(diffusers, tiny_models.bundle(family).family.pipeline_class)
    pipeline = pipeline_class.from_single_file(str(tiny_models.path(family, "safetensors")),
                                               config=str(tiny_models.path(family, "diffusers_safetensors")),
                                               local_files_only=True)
    bundle = tiny_models.bundle(family)
    theirs = [pipeline.unet, pipeline.vae, pipeline.text_encoder]
    if family == "sdxl":
        theirs.append(pipeline.text_encoder_2)
    for model, their_model in zip(bundle.models(), theirs):
        assert not any(parameter.is_meta for parameter in their_model.parameters())
        assert_same_tensors(model.state_dict(), their_model.state_dict())


def test_extras_and_ema_are_carried_and_ema_can_be_loaded(tiny_models, tmp_path):
    state_dict = read_state_dict(tiny_models.path("sd1", "safetensors"))
    state_dict["betas"] = torch.linspace(0.00085, 0.012, 1000)
    state_dict["model_ema.decay"] = torch.tensor(0.9999)
    unet_keys = [key for key in state_dict if key.startswith(UNET_PREFIX)]
    for key in unet_keys:
        ema_key = "model_ema." + key[len("model."):].replace(".", "")
        state_dict[ema_key] = state_dict[key] + 1
    path = tmp_path / "with_ema.safetensors"
    write_state_dict(path, state_dict)

    regular = load_target_model(path)
    ema = load_target_model(path, use_ema=True)
    base = tiny_models.bundle("sd1").unet.state_dict()
    assert_same_tensors(base, regular.unet.state_dict())
    for key, tensor in ema.unet.state_dict().items():
        assert torch.equal(tensor, base[key] + 1), key

    again = tmp_path / "again.safetensors"
    save_model(regular, again)
    assert_same_tensors(state_dict, read_state_dict(again))


def test_separate_vae_file_replaces_the_checkpoint_vae(tmp_path, tiny_models):
    from library.families import VAE_PREFIX
    from library.models.tiny import build_tiny_bundle

    other = build_tiny_bundle("sd1", seed=1)
    other_file = tmp_path / "other.safetensors"
    save_model(other, other_file)
    vae_only = {key[len(VAE_PREFIX):]: value for key, value in read_state_dict(other_file).items()
                if key.startswith(VAE_PREFIX)}
    for name, weights in (("ldm_vae.safetensors", vae_only), ("full.safetensors", read_state_dict(other_file)),
                          ("diffusers_vae.safetensors", other.vae.state_dict())):
        write_state_dict(tmp_path / name, weights)
        bundle = load_target_model(tiny_models.path("sd1"), vae_path=tmp_path / name)
        assert_same_tensors(other.vae.state_dict(), bundle.vae.state_dict())
    save_model(other, tmp_path / "other_folder")
    bundle = load_target_model(tiny_models.path("sd1"), vae_path=tmp_path / "other_folder")
    assert_same_tensors(other.vae.state_dict(), bundle.vae.state_dict())


def test_load_dtype_casts_while_reading(tiny_models):
    bundle = load_target_model(tiny_models.path("sdxl"), dtype=torch.bfloat16)
    assert all(parameter.dtype == torch.bfloat16 for model in bundle.models() for parameter in model.parameters())


def test_v_parameterization_is_recorded_and_detected(tiny_models, tmp_path):
    path = tiny_models.path("sd2-v")
    assert TensorFile(path).metadata["modelspec.prediction_type"] == "v"
    assert load_target_model(path).family.name == "sd2-v"
    assert load_target_model(tiny_models.path("sd2-v", "diffusers_safetensors")).family.name == "sd2-v"
    sd1_v = load_target_model(tiny_models.path("sd1"), v_parameterization=True)
    assert sd1_v.family.model_version == "sd_v1_v"



def test_sdxl_diffusers_folder_v_prediction_from_its_scheduler_or_the_flag(tiny_models, tmp_path):
    import json
    import shutil

    folder = tmp_path / "sdxl-v"
    shutil.copytree(tiny_models.path("sdxl", "diffusers_safetensors"), folder)
    assert load_target_model(folder).family.name == "sdxl"
    assert load_target_model(folder, v_parameterization=True).family.v_parameterization
    config_path = folder / "scheduler" / "scheduler_config.json"
    config = json.loads(config_path.read_text()) if config_path.exists() else {}
    config_path.parent.mkdir(exist_ok=True)
    config_path.write_text(json.dumps({**config, "prediction_type": "v_prediction"}))
    family = load_target_model(folder).family
    assert family.name == "sdxl" and family.v_parameterization

def test_sd2_text_encoder_drops_the_files_last_layer(tiny_models):
    bundle = load_target_model(tiny_models.path("sd2-v"))
    file_keys = TensorFile(tiny_models.path("sd2-v")).keys()
    layers_in_file = {key.split(".")[4] for key in file_keys if ".transformer.resblocks." in key}
    assert bundle.text_encoders[0].config.num_hidden_layers == len(layers_in_file) - 1
