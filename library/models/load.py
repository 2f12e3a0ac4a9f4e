"""Load a Stable Diffusion model (SD1.x, SD2.x, SDXL) from a single file or a diffusers folder.

Single files (LDM/SGM `.safetensors` or `.ckpt`) are converted by our own key maps, with configs derived
from the weights; tensors are read one at a time and assigned into models built on the meta device, so
loading never holds two copies of the weights. Diffusers folders are read by diffusers/transformers.
"""
from __future__ import annotations

import contextlib
import json
import logging
import os
from pathlib import Path
from typing import Callable

import torch

from library.errors import FlagError, ModelFormatError
from library.families import (EMA_PREFIX, UNET_PREFIX, VAE_PREFIX, ModelFamily, TextEncoderSpec,
                              detect_family_from_keys, sd2_family, with_v_parameterization, SD1, SDXL)
from library.models import convert_clip, convert_unet, convert_vae
from library.models.bundle import ModelBundle
from library.models.state_dict_io import TensorFile

logger = logging.getLogger(__name__)


def load_target_model(path: str | os.PathLike, *, v2: bool | None = None, v_parameterization: bool = False,
                      vae_path: str | os.PathLike | None = None, dtype: torch.dtype | None = None,
                      use_ema: bool = False, expected_families: tuple[str, ...] | None = None) -> ModelBundle:
    """Load the model a training or generation script works on.

    Args:
        path: single-file checkpoint (`.safetensors`, `.ckpt`) or diffusers folder.
        v2: kohya's `--v2`; None or False means "detect". True on a file that is not SD2.x is an error.
        v_parameterization: kohya's `--v_parameterization` (SD2-768-v and friends).
        vae_path: a separate VAE (`--vae`): LDM or diffusers VAE file, or a diffusers (VAE or pipeline) folder.
        dtype: cast floating-point weights to this dtype while reading (None keeps the file's dtype).
        use_ema: take the UNet weights from the file's EMA copy (`model_ema.*`) when it has one.
        expected_families: family names the calling script supports (e.g. ("sdxl",)).
    """
    path = Path(path)
    if not path.exists():
        raise ModelFormatError(path, "not found; expected a .safetensors/.ckpt checkpoint or a diffusers folder")
    if path.is_dir():
        bundle = load_diffusers_folder(path, v_parameterization, dtype, v2, expected_families)
    else:
        bundle = load_single_file(path, v_parameterization, dtype, use_ema, v2, expected_families)
    if vae_path is not None:
        bundle.vae = load_vae(vae_path, bundle.family, dtype=dtype)
    logger.info("loaded %s (%s)", path, describe_family(bundle.family))
    return bundle


def describe_family_name(name: str) -> str:
    return {"sd1": "SD1.x", "sd1-v": "SD1.x (v-prediction)", "sd2": "SD2.x", "sd2-v": "SD2.x (v-prediction)",
            "sdxl": "SDXL"}.get(name, name)


def describe_family(family: ModelFamily) -> str:
    return describe_family_name(family.name)


def check_family(family: ModelFamily, v2: bool | None, expected_families: tuple[str, ...] | None,
                 path: object) -> None:
    """Checked before any weights are read: kohya's `--v2` asserts SD2.x; scripts name the families they support."""
    if v2 and not family.is_sd2:
        raise FlagError(f"--v2 was given but {path} is a {describe_family(family)} checkpoint; "
                        "remove --v2 (the family is detected from the file)")
    if expected_families is not None and family.name not in expected_families:
        raise ModelFormatError(path, f"is a {describe_family(family)} model; this script expects "
                                     f"{' or '.join(describe_family_name(name) for name in expected_families)}")


# --------------------------------------------------------------------------------------------- single file


def detect_family(path: str | os.PathLike, v_parameterization: bool = False, v2: bool | None = None,
                  expected_families: tuple[str, ...] | None = None,
                  flag: str = "--pretrained_model_name_or_path") -> ModelFamily:
    """The family of a checkpoint file or diffusers folder without building any model (reads keys/configs only)."""
    path = Path(path)
    if not path.exists():
        raise ModelFormatError(path, f"model not found ({flag})")
    if path.is_dir():
        if not (path / "unet" / "config.json").exists():
            raise ModelFormatError(path, "is a folder without unet/config.json; expected a diffusers pipeline folder "
                                         "or a single-file checkpoint")
        family = _family_of_diffusers_folder(path, v_parameterization)
    else:
        source = TensorFile(path)
        family = with_v_parameterization(detect_family_from_keys(source.keys(), path, v_parameterization),
                                         v_parameterization)
        family = _prediction_type_from_metadata(family, source.metadata, v_parameterization)
        source.close()
    check_family(family, v2, expected_families, path)
    return family


def text_encoder_widths(path: str | os.PathLike, family: ModelFamily) -> list[int]:
    """The token-embedding width of each text encoder of a checkpoint or pipeline folder, from the file header or
    the configs (no weights are read): e.g. [768] for SD1.x, [1024] for SD2.x, [768, 1280] for SDXL."""
    path = Path(path)
    if path.is_dir():
        import json

        widths = []
        for spec in family.text_encoders:
            config_path = path / spec.diffusers_subfolder / "config.json"
            try:
                widths.append(int(json.loads(config_path.read_text(encoding="utf-8"))["hidden_size"]))
            except (OSError, ValueError, KeyError, TypeError) as error:
                raise ModelFormatError(config_path, f"cannot read the text encoder's hidden_size ({error})") from None
        return widths
    source = TensorFile(path)
    try:
        widths = []
        for spec in family.text_encoders:
            keys = [key for key in source.keys()
                    if key.startswith(spec.single_file_prefix) and key.endswith("token_embedding.weight")]
            if not keys:
                raise ModelFormatError(path, f"no token embedding under {spec.single_file_prefix!r}")
            widths.append(int(source.shape(keys[0])[-1]))
        return widths
    finally:
        source.close()


def load_text_encoders(path: str | os.PathLike, family: ModelFamily, dtype: torch.dtype | None = None) -> list:
    """Only the text encoder(s) of a checkpoint or pipeline folder (for caching their outputs)."""
    path = Path(path)
    if path.is_dir():
        encoders = [_load_hf_text_encoder(path / spec.diffusers_subfolder, spec, dtype) for spec in family.text_encoders]
    else:
        source = TensorFile(path)
        read = _reader(source, dtype)
        encoders = [_load_text_encoder(source, spec, read, path)[0] for spec in family.text_encoders]
    return [encoder.eval() for encoder in encoders]


def load_single_file(path: str | os.PathLike, v_parameterization: bool = False, dtype: torch.dtype | None = None,
                     use_ema: bool = False, v2: bool | None = None,
                     expected_families: tuple[str, ...] | None = None) -> ModelBundle:
    source = TensorFile(path)
    keys = source.keys()
    family = with_v_parameterization(detect_family_from_keys(keys, path, v_parameterization), v_parameterization)
    family = _prediction_type_from_metadata(family, source.metadata, v_parameterization)
    check_family(family, v2, expected_families, path)
    read = _reader(source, dtype)
    consumed: set[str] = set()

    text_encoders = []
    extras: dict[str, torch.Tensor] = {}
    for spec in family.text_encoders:
        model, used, te_extras = _load_text_encoder(source, spec, read, path)
        text_encoders.append(model)
        consumed |= used
        extras.update(te_extras)

    pooled_dim = _pooled_dim(text_encoders)
    unet, used = _load_unet(source, family, read, path, pooled_dim, use_ema)
    consumed |= used
    vae, used = _load_vae_from_prefixed(source, family, read, path, VAE_PREFIX)
    consumed |= used

    for key in keys:
        if key not in consumed and key not in extras:
            extras[key] = read(key)
    return ModelBundle(family=family, unet=unet, vae=vae, text_encoders=text_encoders, extras=extras,
                       source=str(path))


def _prediction_type_from_metadata(family: ModelFamily, metadata: dict, flag: bool) -> ModelFamily:
    """Files we (and kohya) write record `modelspec.prediction_type`; honour 'v' when no flag was given."""
    if not flag and metadata.get("modelspec.prediction_type") == "v":
        return with_v_parameterization(family, True)
    return family


def _reader(source: TensorFile, dtype: torch.dtype | None) -> Callable[[str], torch.Tensor]:
    def read(key: str) -> torch.Tensor:
        tensor = source.get(key)
        if dtype is not None and tensor.is_floating_point() and tensor.dtype != dtype:
            tensor = tensor.to(dtype)
        return tensor

    return read


def _sub_dict(source: TensorFile, prefix: str, read: Callable[[str], torch.Tensor]) -> dict[str, torch.Tensor]:
    return {key[len(prefix):]: read(key) for key in source.keys() if key.startswith(prefix)}


_INIT_FUNCTIONS = ("uniform_", "normal_", "trunc_normal_", "kaiming_uniform_", "kaiming_normal_", "xavier_uniform_",
                   "xavier_normal_", "constant_", "zeros_", "ones_", "orthogonal_")


@contextlib.contextmanager
def _skip_weight_init():
    """Random init of parameters that are about to be replaced is wasted work (a third of the build time)."""
    saved = {name: getattr(torch.nn.init, name) for name in _INIT_FUNCTIONS}
    try:
        for name in _INIT_FUNCTIONS:
            setattr(torch.nn.init, name, lambda tensor, *args, **kwargs: tensor)
        yield
    finally:
        for name, function in saved.items():
            setattr(torch.nn.init, name, function)


def _build_on_meta(factory: Callable[[], torch.nn.Module]) -> torch.nn.Module:
    """Parameters on the meta device (no memory), buffers real; weights are assigned afterwards."""
    from accelerate import init_empty_weights

    with init_empty_weights(include_buffers=False), _skip_weight_init():
        return factory()


def _assign(model: torch.nn.Module, state_dict: dict[str, torch.Tensor], path: object, what: str) -> None:
    own = model.state_dict()
    expected = set(own)
    missing = sorted(expected - set(state_dict))
    unexpected = sorted(set(state_dict) - expected)
    if missing or unexpected:
        detail = f"missing {missing[:3]}" if missing else f"unexpected {unexpected[:3]}"
        raise ModelFormatError(path, f"{what} weights do not match the architecture derived from the file ({detail})")
    for name, tensor in own.items():
        if tuple(tensor.shape) != tuple(state_dict[name].shape):
            raise ModelFormatError(path, f"{what} tensor {name}: shape {tuple(state_dict[name].shape)}, "
                                         f"the architecture needs {tuple(tensor.shape)}")
    model.load_state_dict(state_dict, strict=True, assign=True)
    left = [name for name, parameter in model.named_parameters() if parameter.is_meta]
    if left:
        raise ModelFormatError(path, f"{what}: parameters left unloaded ({left[:3]})")
    model.eval()


def _load_text_encoder(source: TensorFile, spec: TextEncoderSpec, read, path):
    from transformers import CLIPTextModel, CLIPTextModelWithProjection

    file_keys = [key for key in source.keys() if key.startswith(spec.single_file_prefix)]
    if not file_keys:
        raise ModelFormatError(path, f"no text encoder keys under {spec.single_file_prefix!r}")
    ldm = {key[len(spec.single_file_prefix):]: read(key) for key in file_keys}
    config = convert_clip.text_config_from_ldm(ldm, spec, path=path)
    model_class = CLIPTextModelWithProjection if spec.with_projection else CLIPTextModel
    model = _build_on_meta(lambda: model_class(config))
    try:
        if spec.kind == "clip_l":
            weights, te_extras = convert_clip.clip_l_from_ldm(ldm, model)
        else:
            weights, te_extras = convert_clip.open_clip_from_ldm(ldm, model, drop_last_layer=spec.drop_last_layer)
    except (KeyError, ValueError) as error:
        raise ModelFormatError(path, f"text encoder under {spec.single_file_prefix!r}: {error}") from None
    _assign(model, weights, path, f"text encoder ({spec.single_file_prefix})")
    extras = {spec.single_file_prefix + key: value for key, value in te_extras.items()}
    return model, set(file_keys), extras


def _pooled_dim(text_encoders: list) -> int | None:
    for model in text_encoders:
        if hasattr(model, "text_projection"):
            return model.text_projection.weight.shape[0]
    return None


def _ema_key(key: str) -> str:
    """LDM's EMA copy stores `model.diffusion_model.a.b` as `model_ema.diffusion_modelab`."""
    return EMA_PREFIX + ("diffusion_model." + key).replace(".", "")


def _load_unet(source: TensorFile, family: ModelFamily, read, path, pooled_dim, use_ema):
    from diffusers import UNet2DConditionModel

    ldm = _sub_dict(source, UNET_PREFIX, read)
    config = convert_unet.unet_config_from_ldm(ldm, family, pooled_dim=pooled_dim, path=path)
    wanted = convert_unet.unet_ldm_keys(config)
    missing = sorted(wanted - set(ldm))
    if missing:
        raise ModelFormatError(path, f"UNet key {UNET_PREFIX + missing[0]} is missing "
                                     f"({len(missing)} missing in all); is the file truncated or incomplete?")
    ldm = {key: value for key, value in ldm.items() if key in wanted}
    used = {UNET_PREFIX + key for key in ldm}
    if use_ema:
        ldm = _swap_in_ema(source, ldm, read, path)
    model = _build_on_meta(lambda: UNet2DConditionModel(**config))
    try:
        weights = convert_unet.unet_ldm_to_diffusers(ldm, config)
    except (KeyError, ValueError) as error:
        raise ModelFormatError(path, f"UNet: {error}") from None
    _assign(model, weights, path, "UNet")
    return model, used


def _swap_in_ema(source: TensorFile, ldm: dict, read, path) -> dict:
    keys = set(source.keys())
    if not any(key.startswith(EMA_PREFIX) for key in keys):
        logger.warning("%s has no EMA weights (model_ema.*); using the regular UNet weights", path)
        return ldm
    swapped = {}
    for key, value in ldm.items():
        ema_key = _ema_key(key)
        if ema_key not in keys:
            raise ModelFormatError(path, f"EMA weights are incomplete: {ema_key} is missing")
        swapped[key] = read(ema_key)
    logger.info("using the EMA UNet weights of %s", path)
    return swapped


def _load_vae_from_prefixed(source: TensorFile, family: ModelFamily, read, path, prefix: str):
    from diffusers import AutoencoderKL

    ldm = _sub_dict(source, prefix, read)
    if not ldm:
        raise ModelFormatError(path, f"no VAE keys ({prefix}*) found")
    config = convert_vae.vae_config_from_ldm(ldm, family.vae_scale_factor, path=path,
                                            sample_size=family.default_resolution)
    wanted = convert_vae.vae_ldm_keys(config)
    missing = sorted(wanted - set(ldm))
    if missing:
        raise ModelFormatError(path, f"VAE key {prefix + missing[0]} is missing ({len(missing)} missing in all)")
    ldm = {key: value for key, value in ldm.items() if key in wanted}
    model = _build_on_meta(lambda: AutoencoderKL(**config))
    _assign(model, convert_vae.vae_ldm_to_diffusers(ldm, config), path, "VAE")
    return model, {prefix + key for key in ldm}


# --------------------------------------------------------------------------------------------- separate VAE


def load_vae(path: str | os.PathLike, family: ModelFamily, dtype: torch.dtype | None = None):
    """Load a VAE for `--vae`: an LDM VAE file (bare or inside a full checkpoint), a diffusers VAE file,
    a diffusers VAE folder or a pipeline folder with `vae/`."""
    from diffusers import AutoencoderKL

    path = Path(path)
    if not path.exists():
        raise ModelFormatError(path, "--vae file not found")
    if path.is_dir():
        folder = path / "vae" if (path / "vae" / "config.json").exists() else path
        if not (folder / "config.json").exists():
            raise ModelFormatError(path, "folder has no config.json (nor vae/config.json); expected a diffusers VAE")
        vae = AutoencoderKL.from_pretrained(str(folder), torch_dtype=dtype)
        vae.config.scaling_factor = family.vae_scale_factor  # the family decides, as kohya does
        return vae.eval()
    source = TensorFile(path)
    read = _reader(source, dtype)
    keys = source.keys()
    if any(key.startswith(VAE_PREFIX) for key in keys):
        vae, _ = _load_vae_from_prefixed(source, family, read, path, VAE_PREFIX)
        return vae
    if any(key.startswith("encoder.down.") for key in keys):
        vae, _ = _load_vae_from_prefixed(source, family, read, path, "")
        return vae
    if any(key.startswith("encoder.down_blocks.") for key in keys):
        state_dict = {key: read(key) for key in keys}
        config = _diffusers_vae_config(state_dict, family.vae_scale_factor, path)
        model = _build_on_meta(lambda: AutoencoderKL(**config))
        _assign(model, state_dict, path, "VAE")
        return model
    raise ModelFormatError(path, "no VAE keys found (encoder.down.* / first_stage_model.* / encoder.down_blocks.*); "
                                 "expected a VAE file")


def _diffusers_vae_config(state_dict: dict, scaling_factor: float, path: object) -> dict:
    """AutoencoderKL kwargs from the shapes of a diffusers-named VAE state dict."""
    try:
        levels = 1 + max(int(key.split(".")[2]) for key in state_dict if key.startswith("encoder.down_blocks."))
        channels = tuple(state_dict[f"encoder.down_blocks.{level}.resnets.0.conv1.weight"].shape[0]
                         for level in range(levels))
        layers = 1 + max(int(key.split(".")[4]) for key in state_dict
                         if key.startswith("encoder.down_blocks.0.resnets."))
        return dict(in_channels=state_dict["encoder.conv_in.weight"].shape[1],
                    out_channels=state_dict["decoder.conv_out.weight"].shape[0],
                    down_block_types=("DownEncoderBlock2D",) * levels, up_block_types=("UpDecoderBlock2D",) * levels,
                    block_out_channels=channels, layers_per_block=layers,
                    latent_channels=state_dict["decoder.conv_in.weight"].shape[1], norm_num_groups=32,
                    scaling_factor=scaling_factor)
    except (KeyError, ValueError) as error:
        raise ModelFormatError(path, f"incomplete diffusers VAE ({error})") from None


# --------------------------------------------------------------------------------------------- diffusers folder


def load_diffusers_folder(path: Path, v_parameterization: bool = False, dtype: torch.dtype | None = None,
                          v2: bool | None = None, expected_families: tuple[str, ...] | None = None) -> ModelBundle:
    from diffusers import AutoencoderKL, UNet2DConditionModel

    if not (path / "unet" / "config.json").exists():
        raise ModelFormatError(path, "is a folder without unet/config.json; expected a diffusers pipeline folder "
                                     "or a single-file checkpoint")
    family = _family_of_diffusers_folder(path, v_parameterization)
    check_family(family, v2, expected_families, path)
    unet = UNet2DConditionModel.from_pretrained(str(path), subfolder="unet", torch_dtype=dtype)
    vae = AutoencoderKL.from_pretrained(str(path), subfolder="vae", torch_dtype=dtype)
    text_encoders = [_load_hf_text_encoder(path / spec.diffusers_subfolder, spec, dtype) for spec in family.text_encoders]
    for model in [unet, vae]:
        model.eval()
    return ModelBundle(family=family, unet=unet, vae=vae, text_encoders=text_encoders, source=str(path))


def _family_of_diffusers_folder(path: Path, v_parameterization: bool) -> ModelFamily:
    """The family of a pipeline folder; v-prediction from the flag or the scheduler's prediction_type."""
    unet_config = json.loads((path / "unet" / "config.json").read_text())
    scheduler_config_path = path / "scheduler" / "scheduler_config.json"
    if scheduler_config_path.exists():
        scheduler_config = json.loads(scheduler_config_path.read_text())
        v_parameterization = v_parameterization or scheduler_config.get("prediction_type") == "v_prediction"
    if unet_config.get("addition_embed_type") == "text_time":
        if not (path / "text_encoder_2" / "config.json").exists():
            raise ModelFormatError(path, "SDXL UNet but no text_encoder_2/; a full SDXL base pipeline folder is expected")
        return with_v_parameterization(SDXL, v_parameterization)
    te_config_path = path / "text_encoder" / "config.json"
    if not te_config_path.exists():
        raise ModelFormatError(path, "no text_encoder/config.json; a full pipeline folder is expected")
    te_config = json.loads(te_config_path.read_text())
    if te_config.get("hidden_act") == "gelu":  # OpenCLIP-H (SD2); CLIP-L (SD1) uses quick_gelu
        return sd2_family(v_parameterization)
    return with_v_parameterization(SD1, v_parameterization)


def _load_hf_text_encoder(folder: Path, spec: TextEncoderSpec, dtype: torch.dtype | None):
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection

    if not (folder / "config.json").exists():
        raise ModelFormatError(folder, "missing text encoder config.json")
    model_class = CLIPTextModelWithProjection if spec.with_projection else CLIPTextModel
    config = CLIPTextConfig.from_pretrained(str(folder))
    weights_path = next((folder / name for name in ("model.safetensors", "pytorch_model.bin") if (folder / name).exists()), None)
    if weights_path is None:
        raise ModelFormatError(folder, "no model.safetensors or pytorch_model.bin")
    source = TensorFile(weights_path)
    state_dict = source.read(dtype=dtype)
    model = _build_on_meta(lambda: model_class(config))
    # Files written by transformers 5 lack the `text_model.` prefix, ours and older ones have it: accept both.
    _assign(model, convert_clip.hf_keys_for_model(state_dict, model), weights_path, "text encoder")
    return model
