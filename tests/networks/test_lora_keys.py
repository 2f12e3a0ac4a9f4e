"""LoRA file keys, shapes and dtypes for tiny SD1 / SD2-v / SDXL models against kohya's naming (COMPAT §1, §6)."""
from __future__ import annotations

import re

import pytest
import torch
from safetensors.torch import load_file

from library.errors import FlagError
from networks import lora, naming

KEY_RULE = re.compile(r"^(lora_unet|lora_te|lora_te1|lora_te2)_[a-z0-9_]+\.(lora_down\.weight|lora_up\.weight|alpha)$")

# Literal examples from COMPAT §1.2/§1.5 that the tiny topology has (the tiny SDXL middle block has 2 transformer
# layers, so COMPAT's `transformer_blocks_9` is checked as `transformer_blocks_1`).
GOLDEN_NAMES = {
    "sd1": [
        "lora_unet_down_blocks_0_attentions_0_transformer_blocks_0_attn1_to_q",
        "lora_unet_down_blocks_1_attentions_0_proj_in",
        "lora_unet_mid_block_attentions_0_transformer_blocks_0_attn2_to_k",
        "lora_unet_up_blocks_3_attentions_2_transformer_blocks_0_ff_net_0_proj",
        "lora_te_text_model_encoder_layers_0_self_attn_q_proj",
        "lora_te_text_model_encoder_layers_3_mlp_fc2",
    ],
    "sd2-v": [
        "lora_unet_down_blocks_1_attentions_0_proj_in",
        "lora_unet_up_blocks_3_attentions_2_transformer_blocks_0_ff_net_0_proj",
        "lora_te_text_model_encoder_layers_2_self_attn_out_proj",
    ],
    "sdxl": [
        "lora_unet_input_blocks_4_1_transformer_blocks_0_attn1_to_q",
        "lora_unet_middle_block_1_transformer_blocks_1_ff_net_2",
        "lora_unet_output_blocks_0_1_proj_out",
        "lora_te1_text_model_encoder_layers_0_self_attn_k_proj",
        "lora_te2_text_model_encoder_layers_3_mlp_fc1",
    ],
}
GOLDEN_CONV_NAMES = {
    "sd1": [
        "lora_unet_down_blocks_0_resnets_0_conv1", "lora_unet_down_blocks_0_resnets_0_time_emb_proj",
        "lora_unet_down_blocks_0_resnets_0_conv2", "lora_unet_down_blocks_2_resnets_0_conv_shortcut",
        "lora_unet_down_blocks_2_downsamplers_0_conv", "lora_unet_up_blocks_0_upsamplers_0_conv",
        "lora_unet_mid_block_resnets_1_conv2",
    ],
    "sdxl": [
        "lora_unet_input_blocks_1_0_in_layers_2", "lora_unet_middle_block_0_emb_layers_1",
        "lora_unet_output_blocks_3_0_skip_connection", "lora_unet_input_blocks_3_0_op",
        "lora_unet_input_blocks_6_0_op", "lora_unet_output_blocks_2_2_conv", "lora_unet_output_blocks_5_2_conv",
        "lora_unet_output_blocks_8_0_out_layers_3",
    ],
}
# transformers x (proj_in + proj_out + 10 per transformer layer), and 6 per text-encoder layer (COMPAT §1.5).
EXPECTED_COUNTS = {"sd1": (16 * 12, 4 * 6), "sd2-v": (16 * 12, 3 * 6), "sdxl": (4 * 22 + 22 + 6 * 22, 48)}


def text_encoder_arg(bundle):
    return bundle.text_encoders if len(bundle.text_encoders) > 1 else bundle.text_encoders[0]


def make_network(bundle, **network_args):
    return lora.create_network(1.0, 4, 2.0, bundle.vae, text_encoder_arg(bundle), bundle.unet, **network_args)


def names_of(state_dict) -> set[str]:
    return {key.split(".")[0] for key in state_dict}


@pytest.mark.parametrize("family", ["sd1", "sd2-v", "sdxl"])
def test_keys_follow_kohya_rule_and_golden_names(tiny_models, family):
    network = make_network(tiny_models.bundle(family))
    state_dict = network.file_state_dict()
    assert all(KEY_RULE.match(key) for key in state_dict), [k for k in state_dict if not KEY_RULE.match(k)][:3]
    names = names_of(state_dict)
    assert {f"{name}.{suffix}" for name in names for suffix in ("lora_down.weight", "lora_up.weight", "alpha")} \
        == set(state_dict)
    assert set(GOLDEN_NAMES[family]) <= names
    assert (len(network.unet_loras), len(network.text_encoder_loras)) == EXPECTED_COUNTS[family]
    # without conv_dim no ResNet / sampler layer and never conv_in, conv_out or the time embedding
    assert not any(re.search(r"resnets|samplers|in_layers|_op$|conv_in|conv_out|time_emb", name) for name in names)


def test_sdxl_uses_sgm_names_only(tiny_models):
    names = names_of(make_network(tiny_models.bundle("sdxl"), conv_dim="2").file_state_dict())
    assert not any(name.startswith(("lora_unet_down_blocks", "lora_unet_up_blocks", "lora_unet_mid_block",
                                    "lora_te_")) for name in names)


@pytest.mark.parametrize("family", ["sd1", "sdxl"])
def test_conv_dim_adds_resnet_and_sampler_layers(tiny_models, family):
    network = make_network(tiny_models.bundle(family), conv_dim="2", conv_alpha="1")
    state_dict = network.file_state_dict()
    assert set(GOLDEN_CONV_NAMES[family]) <= names_of(state_dict)
    conv3x3 = "lora_unet_down_blocks_0_resnets_0_conv1" if family == "sd1" else "lora_unet_input_blocks_1_0_in_layers_2"
    shortcut = ("lora_unet_down_blocks_2_resnets_0_conv_shortcut" if family == "sd1"
                else "lora_unet_output_blocks_3_0_skip_connection")
    # 3x3 convs get conv_dim/conv_alpha; Linear and 1x1 layers under ResNets keep the linear rank (COMPAT §1.4)
    assert state_dict[f"{conv3x3}.lora_down.weight"].shape[0] == 2
    assert state_dict[f"{conv3x3}.alpha"].item() == 1.0
    assert state_dict[f"{shortcut}.lora_down.weight"].shape[0] == 4
    assert state_dict[f"{shortcut}.alpha"].item() == 2.0


@pytest.mark.parametrize("family", ["sd1", "sd2-v", "sdxl"])
def test_shapes_follow_the_wrapped_layer(tiny_models, family):
    bundle = tiny_models.bundle(family)
    network = make_network(bundle, conv_dim="3")
    state_dict = network.file_state_dict()
    layers = {lora_module.lora_name: lora_module.original_module
              for lora_module in network.unet_loras + network.text_encoder_loras}
    for name, layer in layers.items():
        down, up = state_dict[f"{name}.lora_down.weight"], state_dict[f"{name}.lora_up.weight"]
        rank = down.shape[0]
        assert state_dict[f"{name}.alpha"].dim() == 0
        if isinstance(layer, torch.nn.Linear) and name not in network.written_as_conv:
            assert (tuple(down.shape), tuple(up.shape)) == ((rank, layer.in_features), (layer.out_features, rank))
        elif isinstance(layer, torch.nn.Linear):
            assert (tuple(down.shape), tuple(up.shape)) == ((rank, layer.in_features, 1, 1),
                                                            (layer.out_features, rank, 1, 1))
        else:
            assert tuple(down.shape) == (rank, layer.in_channels, *layer.kernel_size)
            assert tuple(up.shape) == (layer.out_channels, rank, 1, 1)


def test_projection_shapes_per_family(tiny_models):
    """SD1 proj_in is a 1x1 conv; SD2's Linear proj_in is written 4-D as kohya's SD2 files; SDXL stays 2-D."""
    expected = {"sd1": (4, 32, 1, 1), "sd2-v": (4, 32, 1, 1), "sdxl": (4, 64)}
    stems = {"sd1": "down_blocks_0_attentions_0", "sd2-v": "down_blocks_0_attentions_0", "sdxl": "input_blocks_4_1"}
    for family, shape in expected.items():
        state_dict = make_network(tiny_models.bundle(family)).file_state_dict()
        assert tuple(state_dict[f"lora_unet_{stems[family]}_proj_in.lora_down.weight"].shape) == shape
        assert state_dict[f"lora_unet_{stems[family]}_proj_out.lora_up.weight"].dim() == len(shape)


@pytest.mark.parametrize("dtype, alpha_dtype", [(None, torch.float32), (torch.float16, torch.float16),
                                                (torch.bfloat16, torch.bfloat16)])
def test_saved_dtypes(tiny_models, tmp_path, dtype, alpha_dtype):
    path = tmp_path / "lora.safetensors"
    make_network(tiny_models.bundle("sd1")).save_weights(path, dtype, {"ss_network_dim": "4"})
    tensors = load_file(str(path))
    dtypes = {tensor.dtype for key, tensor in tensors.items() if not key.endswith("alpha")}
    alpha = tensors["lora_unet_mid_block_attentions_0_proj_in.alpha"]
    assert dtypes == {dtype or torch.float32}
    assert alpha.dtype == alpha_dtype and alpha.item() == 2.0


def test_block_dims_choose_rank_per_block_and_zero_skips(tiny_models):
    dims = ["4"] * 25
    dims[12] = "0"  # mid block
    dims[4] = "8"  # down_blocks_1 layer 0
    network = make_network(tiny_models.bundle("sd1"), block_dims=",".join(dims))
    state_dict = network.file_state_dict()
    assert not any(name.startswith("lora_unet_mid_block") for name in names_of(state_dict))
    assert state_dict["lora_unet_down_blocks_1_attentions_0_proj_in.lora_down.weight"].shape[0] == 8
    assert state_dict["lora_unet_down_blocks_1_attentions_1_proj_in.lora_down.weight"].shape[0] == 4
    assert state_dict["lora_unet_down_blocks_1_attentions_0_proj_in.alpha"].item() == 2.0  # network_alpha


def test_block_dims_wrong_length_names_the_count(tiny_models):
    with pytest.raises(FlagError) as error:
        make_network(tiny_models.bundle("sdxl"), block_dims="4,4,4")
    assert str(error.value) == ("--network_args block_dims: expected 23 comma-separated values (one per U-Net block "
                                "of sdxl), got '3 values'; see COMPAT §6 for the block order")


@pytest.mark.parametrize("name, index", [
    ("lora_unet_down_blocks_0_attentions_0_proj_in", 1),
    ("lora_unet_down_blocks_1_attentions_1_transformer_blocks_0_attn1_to_q", 5),
    ("lora_unet_down_blocks_2_downsamplers_0_conv", 9),
    ("lora_unet_mid_block_attentions_0_proj_out", 12),
    ("lora_unet_up_blocks_0_resnets_2_conv1", 15),
    ("lora_unet_up_blocks_3_attentions_2_proj_in", 24),
    ("lora_te_text_model_encoder_layers_0_mlp_fc1", -1),
])
def test_sd_block_index(name, index):
    assert naming.sd_block_index(name) == index


@pytest.mark.parametrize("name, index", [
    ("lora_unet_input_blocks_1_0_in_layers_2", 2), ("lora_unet_input_blocks_4_1_proj_in", 5),
    ("lora_unet_middle_block_1_proj_out", 11), ("lora_unet_output_blocks_8_0_skip_connection", 21),
    ("lora_unet_time_embed_0", 0), ("lora_unet_out_2", 22), ("lora_te1_text_model_encoder_layers_0_mlp_fc1", -1),
])
def test_sdxl_block_index(name, index):
    assert naming.sdxl_block_index(name) == index


@pytest.mark.parametrize("family", ["sd1", "sdxl"])
def test_diffusers_load_lora_weights_fuses_to_our_merge(tiny_models, tmp_path, family):
    """Our files load in diffusers' kohya converter (COMPAT §1.8) and fuse to the weights our merge_to gives."""
    pytest.importorskip("peft")
    import copy

    from diffusers import DDPMScheduler, StableDiffusionPipeline, StableDiffusionXLPipeline

    network = make_network(tiny_models.bundle(family), conv_dim="2")
    generator = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for module in network.unet_loras + network.text_encoder_loras:
            module.lora_up.weight.copy_(torch.randn(module.lora_up.weight.shape, generator=generator) * 0.1)
    path = tmp_path / "lora.safetensors"
    network.save_weights(path, None, {})
    ours, theirs = copy.deepcopy(tiny_models.bundle(family)), copy.deepcopy(tiny_models.bundle(family))
    merger, weights = lora.create_network_from_weights(1.0, str(path), ours.vae, text_encoder_arg(ours), ours.unet)
    merger.merge_to(text_encoder_arg(ours), ours.unet, weights, torch.float32, "cpu")
    encoders = {"text_encoder": theirs.text_encoders[0], "tokenizer": None}
    if family == "sdxl":
        pipeline = StableDiffusionXLPipeline(vae=theirs.vae, unet=theirs.unet, scheduler=DDPMScheduler(),
                                             text_encoder_2=theirs.text_encoders[1], tokenizer_2=None, **encoders)
    else:
        pipeline = StableDiffusionPipeline(vae=theirs.vae, unet=theirs.unet, scheduler=DDPMScheduler(),
                                           safety_checker=None, feature_extractor=None,
                                           requires_safety_checker=False, **encoders)
    pipeline.load_lora_weights(str(path))
    pipeline.fuse_lora()
    for merged_model, fused_model in zip(ours.models(), [pipeline.unet, pipeline.vae, *theirs.text_encoders]):
        fused = {name.replace(".base_layer", ""): p for name, p in fused_model.named_parameters()}
        for name, parameter in merged_model.named_parameters():
            torch.testing.assert_close(fused[name], parameter, atol=1e-6, rtol=0)
