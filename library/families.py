"""Model families (SD1.x, SD2.x 512/768-v, SDXL base) as data, and detection from checkpoint keys.

Everything that differs between the families *as data* lives here. Behaviour that only SDXL has (two
encoders, pooled vector, size conditioning) lives in `library/text/sdxl_cond.py`.
"""
from __future__ import annotations

from dataclasses import dataclass, replace
from typing import Iterable

from library.errors import ModelFormatError

# Single-file (LDM / SGM) top-level prefixes.
UNET_PREFIX = "model.diffusion_model."
VAE_PREFIX = "first_stage_model."
SD1_TE_PREFIX = "cond_stage_model.transformer."
SD2_TE_PREFIX = "cond_stage_model.model."
SDXL_TE1_PREFIX = "conditioner.embedders.0.transformer."
SDXL_TE2_PREFIX = "conditioner.embedders.1.model."
EMA_PREFIX = "model_ema."


@dataclass(frozen=True)
class TextEncoderSpec:
    """One text encoder of a family.

    kind: "clip_l" (transformers naming inside the single file) or "open_clip" (OpenCLIP naming).
    single_file_prefix: where its keys live in an LDM/SGM file.
    with_projection: built as CLIPTextModelWithProjection (SDXL TE2) rather than CLIPTextModel.
    hidden_act: activation of the MLPs (not stored in the weights).
    drop_last_layer: the in-memory model has one layer fewer than the file (SD2 uses the penultimate layer).
    pad_token: the tokenizer's padding token ("<|endoftext|>" for CLIP-L, "!" for OpenCLIP ones).
    diffusers_subfolder / tokenizer_subfolder: folder names in a diffusers pipeline folder.
    tokenizer_id: the hub id kohya uses; only a name here (for --tokenizer_cache_dir), nothing is downloaded.
    """

    kind: str
    single_file_prefix: str
    with_projection: bool
    hidden_act: str
    drop_last_layer: bool
    pad_token: str
    diffusers_subfolder: str
    tokenizer_subfolder: str
    tokenizer_id: str


CLIP_L_ID = "openai/clip-vit-large-patch14"
SD2_TOKENIZER_ID = "stabilityai/stable-diffusion-2"
BIGG_ID = "laion/CLIP-ViT-bigG-14-laion2B-39B-b160k"

SD1_TE = TextEncoderSpec("clip_l", SD1_TE_PREFIX, False, "quick_gelu", False, "<|endoftext|>",
                         "text_encoder", "tokenizer", CLIP_L_ID)
SD2_TE = TextEncoderSpec("open_clip", SD2_TE_PREFIX, False, "gelu", True, "!",
                         "text_encoder", "tokenizer", SD2_TOKENIZER_ID)
SDXL_TE1 = TextEncoderSpec("clip_l", SDXL_TE1_PREFIX, False, "quick_gelu", False, "<|endoftext|>",
                           "text_encoder", "tokenizer", CLIP_L_ID)
SDXL_TE2 = TextEncoderSpec("open_clip", SDXL_TE2_PREFIX, True, "gelu", False, "!",
                           "text_encoder_2", "tokenizer_2", BIGG_ID)


@dataclass(frozen=True)
class ModelFamily:
    """Constant facts about one model family.

    unet_heads_rule: "fixed8" (SD1: 8 heads in every attention block) or "head_dim64" (SD2/SDXL: channels/64
    heads, at least one): the head count is not stored in the weights, so it is derived by this rule.
    upcast_attention: diffusers' flag for SD2 (fp16 attention overflows otherwise).
    """

    name: str
    text_encoders: tuple[TextEncoderSpec, ...]
    v_parameterization: bool
    vae_scale_factor: float
    default_resolution: int
    unet_heads_rule: str
    upcast_attention: bool
    model_version: str  # kohya's ss_base_model_version
    architecture: str  # modelspec.architecture
    pipeline_class: str  # diffusers pipeline class written to model_index.json
    latent_cache_suffix: str = "sd"  # kohya's latent cache names end in _sd.npz / _sdxl.npz (COMPAT §7.2)
    bucket_reso_multiple: int = 64  # bucket_reso_steps should be a multiple of this (kohya warns otherwise)

    @property
    def is_sd2(self) -> bool:
        return self.name in ("sd2", "sd2-v")


SD1 = ModelFamily("sd1", (SD1_TE,), False, 0.18215, 512, "fixed8", False, "sd_v1", "stable-diffusion-v1",
                  "StableDiffusionPipeline")
SD1_V = ModelFamily("sd1-v", (SD1_TE,), True, 0.18215, 512, "fixed8", False, "sd_v1_v", "stable-diffusion-v1",
                    "StableDiffusionPipeline")
SD2 = ModelFamily("sd2", (SD2_TE,), False, 0.18215, 512, "head_dim64", False, "sd_v2", "stable-diffusion-v2-512",
                  "StableDiffusionPipeline")
SD2_V = ModelFamily("sd2-v", (SD2_TE,), True, 0.18215, 768, "head_dim64", True, "sd_v2_v",
                    "stable-diffusion-v2-768-v", "StableDiffusionPipeline")
SDXL = ModelFamily("sdxl", (SDXL_TE1, SDXL_TE2), False, 0.13025, 1024, "head_dim64", False, "sdxl_base_v1-0",
                   "stable-diffusion-xl-v1-base", "StableDiffusionXLPipeline", latent_cache_suffix="sdxl",
                   bucket_reso_multiple=32)

SDXL_V = replace(SDXL, v_parameterization=True)

FAMILIES: dict[str, ModelFamily] = {family.name: family for family in (SD1, SD1_V, SD2, SD2_V, SDXL)}


def family_by_name(name: str) -> ModelFamily:
    try:
        return FAMILIES[name]
    except KeyError:
        raise ValueError(f"unknown model family {name!r}; expected one of {sorted(FAMILIES)}") from None


def sd2_family(v_parameterization: bool) -> ModelFamily:
    return SD2_V if v_parameterization else SD2


def detect_family_from_keys(keys: Iterable[str], path: object, v_parameterization: bool = False) -> ModelFamily:
    """Tell the family of an LDM/SGM single-file state dict from its key names.

    Raises ModelFormatError naming the file when the keys are not a full SD1/SD2/SDXL checkpoint.
    """
    keys = list(keys)
    has_unet = any(key.startswith(UNET_PREFIX) for key in keys)
    if not has_unet:
        raise ModelFormatError(path, _describe_missing_unet(keys))
    has_label_emb = any(key.startswith(UNET_PREFIX + "label_emb.") for key in keys)
    if any(key.startswith(SDXL_TE2_PREFIX) for key in keys):
        if not any(key.startswith(SDXL_TE1_PREFIX) for key in keys):
            raise ModelFormatError(path, "has an OpenCLIP-bigG encoder but no CLIP-L encoder "
                                         f"({SDXL_TE1_PREFIX}*); SDXL refiner checkpoints are not supported")
        return SDXL
    if has_label_emb:
        raise ModelFormatError(path, "SDXL UNet keys found but no text encoders "
                                     f"({SDXL_TE1_PREFIX}* / {SDXL_TE2_PREFIX}*); a full SDXL checkpoint is expected")
    if any(key.startswith(SD2_TE_PREFIX) for key in keys):
        return sd2_family(v_parameterization)
    if any(key.startswith(SD1_TE_PREFIX) for key in keys):
        return SD1
    raise ModelFormatError(path, "UNet keys found but no text encoder keys (cond_stage_model.* or conditioner.*); "
                                 "expected a full SD1.x/SD2.x/SDXL checkpoint")


NETWORK_KEY_PREFIXES = ("lora_unet_", "lora_te", "lllite_unet", "oft_unet")
EMBEDDING_KEYS = ("emb_params", "clip_l", "clip_g", "string_to_param")
CHECKPOINT_KEY_PREFIXES = (UNET_PREFIX, VAE_PREFIX, "cond_stage_model.", "conditioner.")


def file_kind(keys: Iterable[str]) -> str | None:
    """What a tensor file holds, told from its key names: "network" (LoRA, LyCORIS, LLLite), "embedding",
    "checkpoint" (a full LDM/SGM model), "vae", "bare-unet", or None when the layout is unknown."""
    keys = list(keys)
    if any(key.startswith(NETWORK_KEY_PREFIXES) for key in keys):
        return "network"
    if any(key in EMBEDDING_KEYS for key in keys):
        return "embedding"
    if any(key.startswith(CHECKPOINT_KEY_PREFIXES) for key in keys):
        return "checkpoint"
    if any(key.startswith(("encoder.down.", "decoder.up.", "encoder.down_blocks.", "decoder.up_blocks.")) for key in keys):
        return "vae"
    if any(key.startswith(("down_blocks.", "input_blocks.", "conv_in.")) for key in keys):
        return "bare-unet"
    return None


def _describe_missing_unet(keys: list[str]) -> str:
    if not keys:
        return "contains no tensors; expected a Stable Diffusion checkpoint"
    kind = file_kind(keys)
    if kind == "network":
        return "no UNet keys found; is this a LoRA file? expected a full Stable Diffusion checkpoint"
    if kind == "embedding":
        return "no UNet keys found; is this a textual-inversion embedding? expected a full checkpoint"
    if kind == "vae":
        return "no UNet keys found; this looks like a VAE file (pass it with --vae)"
    if kind == "bare-unet":
        return ("no model.diffusion_model.* keys; this looks like a bare UNet state dict, "
                "expected a full LDM/SGM checkpoint or a diffusers folder")
    sample = ", ".join(keys[:3])
    return f"unknown key layout (first keys: {sample}); expected a Stable Diffusion LDM/SGM checkpoint"


def with_v_parameterization(family: ModelFamily, v_parameterization: bool) -> ModelFamily:
    """The family record for kohya's `--v_parameterization` flag (SD2 -> SD2-v, SD1 -> kohya's `sd_v1_v`)."""
    if family.v_parameterization == v_parameterization:
        return family
    if family.name == "sdxl":
        # v-prediction SDXL fine-tunes exist (and are popular): same architecture and name, v targets and samplers
        return SDXL_V if v_parameterization else SDXL
    if family.is_sd2:
        return sd2_family(v_parameterization)
    return SD1_V if v_parameterization else SD1
