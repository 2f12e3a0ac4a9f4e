"""Tiny random-weight models with the real block topology of SD1, SD2(-v) and SDXL.

Only the widths are tiny: block counts, layers per block, which blocks have attention, linear vs conv
projections and SDXL's text_time embedding match the real models, so LDM/SGM indices and kohya LoRA names are
the same as for full-size checkpoints. Head counts follow each family's rule (`ModelFamily.unet_heads_rule`),
so a tiny single file converts back without any side information. Used by the tests and the README demo.
"""
from __future__ import annotations

import copy

import torch

from library.families import ModelFamily, family_by_name
from library.models.bundle import ModelBundle

TINY_TEXT_HIDDEN = {"clip_l": 32, "open_clip": 64}
TINY_TEXT_LAYERS = 4
TINY_TE2_PROJECTION = 32
TINY_SDXL_TIME_EMBED_DIM = 8

_SD_UNET = dict(
    sample_size=8,
    in_channels=4,
    out_channels=4,
    down_block_types=("CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "DownBlock2D"),
    up_block_types=("UpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D"),
    block_out_channels=(32, 32, 64, 64),
    layers_per_block=2,
    norm_num_groups=32,
)

_SDXL_UNET = dict(
    sample_size=8,
    in_channels=4,
    out_channels=4,
    down_block_types=("DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"),
    up_block_types=("CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"),
    block_out_channels=(32, 64, 64),
    layers_per_block=2,
    transformer_layers_per_block=(1, 2, 2),
    attention_head_dim=(1, 1, 1),
    use_linear_projection=True,
    cross_attention_dim=TINY_TEXT_HIDDEN["clip_l"] + TINY_TEXT_HIDDEN["open_clip"],
    addition_embed_type="text_time",
    addition_time_embed_dim=TINY_SDXL_TIME_EMBED_DIM,
    projection_class_embeddings_input_dim=6 * TINY_SDXL_TIME_EMBED_DIM + TINY_TE2_PROJECTION,
    norm_num_groups=32,
)

TINY_VAE = dict(
    in_channels=3,
    out_channels=3,
    down_block_types=("DownEncoderBlock2D",) * 4,
    up_block_types=("UpDecoderBlock2D",) * 4,
    block_out_channels=(32, 32, 32, 32),
    layers_per_block=2,
    latent_channels=4,
    norm_num_groups=32,
    sample_size=64,
)


def tiny_unet_config(family: ModelFamily) -> dict:
    """diffusers UNet2DConditionModel kwargs for the tiny model of a family."""
    if family.name == "sdxl":
        return copy.deepcopy(_SDXL_UNET)
    config = copy.deepcopy(_SD_UNET)
    if family.is_sd2:
        config.update(
            attention_head_dim=(1, 1, 1, 1),  # channels/64, at least 1: the SD2 rule
            use_linear_projection=True,
            cross_attention_dim=TINY_TEXT_HIDDEN["open_clip"],
            upcast_attention=family.upcast_attention,
        )
    else:
        config.update(attention_head_dim=8, cross_attention_dim=TINY_TEXT_HIDDEN["clip_l"])
    return config


def tiny_vae_config(family: ModelFamily) -> dict:
    config = copy.deepcopy(TINY_VAE)
    config["scaling_factor"] = family.vae_scale_factor
    return config


def tiny_text_config(family: ModelFamily, index: int):
    """transformers CLIPTextConfig for text encoder `index` of the tiny model of a family."""
    from transformers import CLIPTextConfig

    spec = family.text_encoders[index]
    hidden = TINY_TEXT_HIDDEN[spec.kind]
    return CLIPTextConfig(
        vocab_size=49408,
        hidden_size=hidden,
        intermediate_size=hidden * 4,
        num_hidden_layers=TINY_TEXT_LAYERS - (1 if spec.drop_last_layer else 0),
        num_attention_heads=max(1, hidden // 64),
        max_position_embeddings=77,
        hidden_act=spec.hidden_act,
        projection_dim=TINY_TE2_PROJECTION if spec.with_projection else hidden,
        bos_token_id=49406,
        eos_token_id=49407,
        pad_token_id=49407 if spec.pad_token == "<|endoftext|>" else 0,
    )


def build_tiny_bundle(family: ModelFamily | str, seed: int = 0) -> ModelBundle:
    """Build a tiny random-weight model of a family; the same seed gives the same weights."""
    from diffusers import AutoencoderKL, UNet2DConditionModel
    from transformers import CLIPTextModel, CLIPTextModelWithProjection

    if isinstance(family, str):
        family = family_by_name(family)
    generator_state = torch.random.get_rng_state()
    try:
        torch.manual_seed(seed)
        unet = UNet2DConditionModel(**tiny_unet_config(family))
        vae = AutoencoderKL(**tiny_vae_config(family))
        text_encoders = []
        for index, spec in enumerate(family.text_encoders):
            model_class = CLIPTextModelWithProjection if spec.with_projection else CLIPTextModel
            text_encoders.append(model_class(tiny_text_config(family, index)))
        # Random init leaves some layers at exactly zero (e.g. conv_out); perturb every tensor slightly so
        # round-trip and conversion tests can tell any two tensors apart.
        with torch.no_grad():
            for model in [unet, vae, *text_encoders]:
                for parameter in model.parameters():
                    parameter.add_(torch.randn_like(parameter) * 1e-3)
    finally:
        torch.random.set_rng_state(generator_state)
    for model in [unet, vae, *text_encoders]:
        model.eval().requires_grad_(False)
    return ModelBundle(family=family, unet=unet, vae=vae, text_encoders=text_encoders)
