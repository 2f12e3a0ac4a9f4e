"""Save a model bundle as a single file (LDM/SGM `.safetensors`/`.ckpt`) or a diffusers folder, atomically.

`--save_model_as`: ckpt, safetensors, diffusers, diffusers_safetensors. `--save_precision`: float, fp16, bf16
(None keeps each tensor's dtype). Text-encoder weights in diffusers folders keep the `text_model.` prefix so
that transformers 4.x (what kohya users run) reads them too.
"""
from __future__ import annotations

import datetime
import json
import logging
import os
import time
from pathlib import Path

import torch

from library.errors import FlagError
from library.families import UNET_PREFIX, VAE_PREFIX, ModelFamily
from library.models import convert_clip, convert_unet, convert_vae
from library.models.bundle import ModelBundle
from library.models.state_dict_io import atomic_output, write_state_dict
from library.options.choices import SAVE_FORMATS

logger = logging.getLogger(__name__)

PRECISIONS = {"float": torch.float32, "fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}


def precision_dtype(name: str | None) -> torch.dtype | None:
    """`--save_precision` name -> dtype (None keeps the tensors' own dtype)."""
    if name is None:
        return None
    try:
        return PRECISIONS[name]
    except KeyError:
        raise FlagError(f"--save_precision {name}: unknown; expected one of float, fp16, bf16") from None


def format_from_path(path: str | os.PathLike) -> str:
    """The save format a path implies: a .safetensors/.ckpt file, else a diffusers folder."""
    suffix = Path(path).suffix.lower()
    if suffix in (".safetensors", ".sft"):
        return "safetensors"
    if suffix in (".ckpt", ".pt", ".pth"):
        return "ckpt"
    return "diffusers_safetensors"


def save_model(bundle: ModelBundle, path: str | os.PathLike, save_model_as: str | None = None,
               precision: str | None = None, overwrite: bool = False, metadata: dict[str, str] | None = None,
               epoch: int = 0, global_step: int = 0) -> Path:
    """Save in the format `save_model_as` (default: from the path's suffix). Returns the written path."""
    path = Path(path)
    save_model_as = save_model_as or format_from_path(path)
    if save_model_as not in SAVE_FORMATS:
        raise FlagError(f"--save_model_as {save_model_as}: unknown; expected one of {', '.join(SAVE_FORMATS)}")
    dtype = precision_dtype(precision)
    if save_model_as in ("ckpt", "safetensors"):
        save_single_file(bundle, path, dtype=dtype, overwrite=overwrite, metadata=metadata,
                         epoch=epoch, global_step=global_step)
    else:
        save_diffusers_folder(bundle, path, dtype=dtype, safe_serialization=save_model_as == "diffusers_safetensors",
                              overwrite=overwrite)
    return path


# --------------------------------------------------------------------------------------------- single file


def single_file_state_dict(bundle: ModelBundle, dtype: torch.dtype | None = None) -> dict[str, torch.Tensor]:
    """The LDM/SGM state dict of a bundle; extras carried from the source file are written back verbatim."""
    state_dict: dict[str, torch.Tensor] = {}
    unet = bundle.unet
    for key, value in convert_unet.unet_diffusers_to_ldm(unet.state_dict(), unet.config).items():
        state_dict[UNET_PREFIX + key] = value
    vae = bundle.vae
    for key, value in convert_vae.vae_diffusers_to_ldm(vae.state_dict(), vae.config).items():
        state_dict[VAE_PREFIX + key] = value
    for spec, model in zip(bundle.family.text_encoders, bundle.text_encoders):
        if spec.kind == "clip_l":
            converted = convert_clip.clip_l_to_ldm(model.state_dict(), model.config)
        else:
            converted = convert_clip.open_clip_to_ldm(model.state_dict(), model.config,
                                                      drop_last_layer=spec.drop_last_layer)
        for key, value in converted.items():
            state_dict[spec.single_file_prefix + key] = value
    state_dict.update(bundle.extras)
    if dtype is not None:
        state_dict = {key: _cast(value, dtype) for key, value in state_dict.items()}
    return state_dict


def _cast(tensor: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    return tensor.to(dtype) if tensor.is_floating_point() and tensor.dtype != dtype else tensor


def checkpoint_metadata(family: ModelFamily, title: str | None = None) -> dict[str, str]:
    """The `modelspec.*` keys kohya writes into single-file checkpoints (COMPAT §2.3)."""
    resolution = family.default_resolution
    return {
        "modelspec.sai_model_spec": "1.0.1",
        "modelspec.architecture": family.architecture,
        "modelspec.implementation": "https://github.com/Stability-AI/generative-models",
        "modelspec.title": title or f"Checkpoint@{int(time.time())}",
        "modelspec.resolution": f"{resolution}x{resolution}",
        "modelspec.prediction_type": "v" if family.v_parameterization else "epsilon",
        "modelspec.date": datetime.datetime.now().replace(microsecond=0).isoformat(),
    }


def save_single_file(bundle: ModelBundle, path: str | os.PathLike, dtype: torch.dtype | None = None,
                     overwrite: bool = False, metadata: dict[str, str] | None = None, epoch: int = 0,
                     global_step: int = 0) -> None:
    path = Path(path)
    state_dict = single_file_state_dict(bundle, dtype)
    full_metadata = checkpoint_metadata(bundle.family, title=path.stem)
    full_metadata.update(metadata or {})
    write_state_dict(path, state_dict, metadata=full_metadata, container={"epoch": epoch, "global_step": global_step},
                     overwrite=overwrite)
    logger.info("saved %s (%d tensors)", path, len(state_dict))


# --------------------------------------------------------------------------------------------- diffusers folder


def save_diffusers_folder(bundle: ModelBundle, path: str | os.PathLike, dtype: torch.dtype | None = None,
                          safe_serialization: bool = True, overwrite: bool = False) -> None:
    """Write a diffusers pipeline folder into a temp folder beside `path`, then rename it into place."""
    with atomic_output(path, overwrite=overwrite, folder=True) as temp:
        _write_diffusers_folder(bundle, temp, dtype, safe_serialization)
    logger.info("saved diffusers folder %s", path)


def _write_diffusers_folder(bundle: ModelBundle, folder: Path, dtype: torch.dtype | None, safe: bool) -> None:
    from library.text.tokenize import load_tokenizer, save_tokenizer

    family = bundle.family
    for name, model in (("unet", bundle.unet), ("vae", bundle.vae)):
        _save_diffusers_model(model, folder / name, dtype, safe)
    for spec, model in zip(family.text_encoders, bundle.text_encoders):
        _save_text_encoder(model, folder / spec.diffusers_subfolder, dtype, safe)
        save_tokenizer(load_tokenizer(spec), folder / spec.tokenizer_subfolder)
    _write_scheduler(folder / "scheduler", family)
    _write_model_index(folder, bundle)


def _save_diffusers_model(model, folder: Path, dtype: torch.dtype | None, safe: bool) -> None:
    folder.mkdir(parents=True)
    model.save_config(str(folder))
    state_dict = model.state_dict()
    if dtype is not None:
        state_dict = {key: _cast(value, dtype) for key, value in state_dict.items()}
    name = "diffusion_pytorch_model.safetensors" if safe else "diffusion_pytorch_model.bin"
    write_state_dict(folder / name, state_dict, metadata={"format": "pt"})


def _save_text_encoder(model, folder: Path, dtype: torch.dtype | None, safe: bool) -> None:
    folder.mkdir(parents=True)
    model.config.save_pretrained(str(folder))
    state_dict = convert_clip.hf_keys_with_text_model_prefix(model.state_dict())
    if dtype is not None:
        state_dict = {key: _cast(value, dtype) for key, value in state_dict.items()}
    name = "model.safetensors" if safe else "pytorch_model.bin"
    write_state_dict(folder / name, state_dict, metadata={"format": "pt"})


def _write_scheduler(folder: Path, family: ModelFamily) -> None:
    from diffusers import EulerDiscreteScheduler

    scheduler = EulerDiscreteScheduler(
        num_train_timesteps=1000, beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear",
        prediction_type="v_prediction" if family.v_parameterization else "epsilon",
        timestep_spacing="leading", steps_offset=1,
    )
    scheduler.save_config(str(folder))


def _write_model_index(folder: Path, bundle: ModelBundle) -> None:
    import diffusers

    family = bundle.family
    index: dict = {"_class_name": family.pipeline_class, "_diffusers_version": diffusers.__version__,
                   "scheduler": ["diffusers", "EulerDiscreteScheduler"],
                   "unet": ["diffusers", "UNet2DConditionModel"], "vae": ["diffusers", "AutoencoderKL"]}
    for spec, model in zip(family.text_encoders, bundle.text_encoders):
        index[spec.diffusers_subfolder] = ["transformers", type(model).__name__]
        index[spec.tokenizer_subfolder] = ["transformers", "CLIPTokenizer"]
    if family.pipeline_class == "StableDiffusionPipeline":
        index.update(safety_checker=[None, None], feature_extractor=[None, None], requires_safety_checker=False)
    else:
        index.update(force_zeros_for_empty_prompt=True)
    (folder / "model_index.json").write_text(json.dumps(index, indent=2) + "\n")
