"""Full-size SD1.5 / SD2.1 / SDXL architectures on the meta device write exactly the keys real checkpoints have."""
from __future__ import annotations

import pytest

from library.families import FAMILIES
from library.models.reference_configs import FULL_SIZE

# Tensor counts of the released single files (v1-5-pruned-emaonly: 1131; sd_xl_base_1.0: 2515):
# UNet 686 / 1680, VAE 248, CLIP-L 197 (with position_ids), OpenCLIP-H 24 layers 294, OpenCLIP-bigG 390.
EXPECTED_COUNTS = {"sd1": 1131, "sd2-v": 686 + 248 + 294, "sdxl": 2515}

GOLDEN_KEYS = {
    "sd1": {
        "model.diffusion_model.input_blocks.1.1.transformer_blocks.0.attn1.to_q.weight": (320, 320),
        "model.diffusion_model.input_blocks.1.1.proj_in.weight": (320, 320, 1, 1),
        "model.diffusion_model.middle_block.1.transformer_blocks.0.attn2.to_k.weight": (1280, 768),
        "model.diffusion_model.output_blocks.2.1.conv.weight": (1280, 1280, 3, 3),
        "model.diffusion_model.output_blocks.5.2.conv.weight": (1280, 1280, 3, 3),
        "model.diffusion_model.input_blocks.3.0.op.weight": (320, 320, 3, 3),
        "model.diffusion_model.time_embed.0.weight": (1280, 320),
        "model.diffusion_model.out.2.weight": (4, 320, 3, 3),
        "first_stage_model.encoder.mid.attn_1.q.weight": (512, 512, 1, 1),
        "first_stage_model.decoder.up.3.block.0.conv1.weight": (512, 512, 3, 3),
        "first_stage_model.decoder.up.0.block.0.conv1.weight": (128, 256, 3, 3),
        "first_stage_model.quant_conv.weight": (8, 8, 1, 1),
        "cond_stage_model.transformer.text_model.embeddings.position_ids": (1, 77),
        "cond_stage_model.transformer.text_model.encoder.layers.11.mlp.fc2.bias": (768,),
        "cond_stage_model.transformer.text_model.final_layer_norm.weight": (768,),
    },
    "sd2-v": {
        "model.diffusion_model.input_blocks.1.1.proj_in.weight": (320, 320),
        "model.diffusion_model.input_blocks.1.1.transformer_blocks.0.attn2.to_k.weight": (320, 1024),
        "cond_stage_model.model.transformer.resblocks.23.attn.in_proj_weight": (3072, 1024),
        "cond_stage_model.model.positional_embedding": (77, 1024),
        "cond_stage_model.model.token_embedding.weight": (49408, 1024),
        "cond_stage_model.model.ln_final.weight": (1024,),
        "cond_stage_model.model.text_projection": (1024, 1024),
        "cond_stage_model.model.logit_scale": (),
    },
    "sdxl": {
        "model.diffusion_model.input_blocks.4.1.transformer_blocks.1.ff.net.2.weight": (640, 2560),
        "model.diffusion_model.input_blocks.7.1.transformer_blocks.9.attn2.to_k.weight": (1280, 2048),
        "model.diffusion_model.middle_block.1.transformer_blocks.9.attn1.to_out.0.weight": (1280, 1280),
        "model.diffusion_model.output_blocks.2.2.conv.weight": (1280, 1280, 3, 3),
        "model.diffusion_model.output_blocks.5.2.conv.weight": (640, 640, 3, 3),
        "model.diffusion_model.input_blocks.3.0.op.weight": (320, 320, 3, 3),
        "model.diffusion_model.label_emb.0.0.weight": (1280, 2816),
        "model.diffusion_model.input_blocks.1.0.in_layers.2.weight": (320, 320, 3, 3),
        "model.diffusion_model.output_blocks.3.0.skip_connection.weight": (640, 1920, 1, 1),
        "conditioner.embedders.0.transformer.text_model.encoder.layers.11.self_attn.q_proj.weight": (768, 768),
        "conditioner.embedders.0.transformer.text_model.embeddings.position_ids": (1, 77),
        "conditioner.embedders.1.model.transformer.resblocks.31.attn.in_proj_weight": (3840, 1280),
        "conditioner.embedders.1.model.text_projection": (1280, 1280),
        "conditioner.embedders.1.model.logit_scale": (),
        "first_stage_model.encoder.mid.attn_1.proj_out.weight": (512, 512, 1, 1),
    },
}


def full_size_state_dict(family_name: str) -> dict:
    from accelerate import init_empty_weights
    from diffusers import AutoencoderKL, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection

    from library.models.bundle import ModelBundle
    from library.models.save import single_file_state_dict

    family = FAMILIES[family_name]
    configs = FULL_SIZE[family_name]
    with init_empty_weights():
        text_encoders = [
            (CLIPTextModelWithProjection if spec.with_projection else CLIPTextModel)(CLIPTextConfig(**config))
            for spec, config in zip(family.text_encoders, configs["text"])
        ]
        bundle = ModelBundle(family=family, unet=UNet2DConditionModel(**configs["unet"]),
                             vae=AutoencoderKL(**configs["vae"]), text_encoders=text_encoders)
    return single_file_state_dict(bundle)


@pytest.fixture(scope="module", params=sorted(EXPECTED_COUNTS))
def family_and_state_dict(request):
    return request.param, full_size_state_dict(request.param)


def test_full_size_key_counts_and_golden_names(family_and_state_dict):
    family, state_dict = family_and_state_dict
    assert len(state_dict) == EXPECTED_COUNTS[family]
    for key, shape in GOLDEN_KEYS[family].items():
        assert key in state_dict, key
        assert tuple(state_dict[key].shape) == shape, key


def test_diffusers_recognises_the_full_size_layout(family_and_state_dict):
    from diffusers.loaders.single_file_utils import infer_diffusers_model_type

    family, state_dict = family_and_state_dict
    expected = {"sd1": "v1", "sd2-v": "v2", "sdxl": "xl_base"}[family]
    assert infer_diffusers_model_type(state_dict) == expected


def test_family_detection_on_full_size_keys(family_and_state_dict):
    from library.families import detect_family_from_keys

    family, state_dict = family_and_state_dict
    detected = detect_family_from_keys(state_dict.keys(), "<meta>", v_parameterization=family == "sd2-v")
    assert detected.name == family
