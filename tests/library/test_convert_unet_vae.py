"""UNet / VAE conversion diffusers <-> LDM/SGM: round trips, diffusers' own converter as the oracle, full-size key
names on the meta device, configs derived from the keys, and errors that name the bad key."""
from __future__ import annotations

import pytest
import torch

from library.errors import ModelFormatError
from library.families import FAMILIES
from library.models import convert_unet, convert_vae
from library.models.reference_configs import SD15_UNET, SD21_UNET, SD_VAE, SDXL_UNET, SDXL_VAE
from library.models.tiny import TINY_TE2_PROJECTION, tiny_unet_config, tiny_vae_config

UNET_PREFIX = "model.diffusion_model."
VAE_PREFIX = "first_stage_model."
TINY_FAMILIES = ("sd1", "sd2-v", "sdxl")

# name -> (family, config, tensor count of the released single file's UNet, golden LDM keys with shapes)
FULL_SIZE_UNETS = {
    "sd15": ("sd1", SD15_UNET, 686, {
        "input_blocks.1.1.transformer_blocks.0.attn1.to_q.weight": (320, 320),
        "input_blocks.1.1.proj_in.weight": (320, 320, 1, 1),
        "middle_block.1.proj_in.weight": (1280, 1280, 1, 1),
        "middle_block.1.transformer_blocks.0.attn2.to_k.weight": (1280, 768),
        "output_blocks.2.1.conv.weight": (1280, 1280, 3, 3),  # up block 0 has no attention: upsampler at .1
        "output_blocks.5.2.conv.weight": (1280, 1280, 3, 3),
        "output_blocks.3.1.proj_out.weight": (1280, 1280, 1, 1),
        "input_blocks.3.0.op.weight": (320, 320, 3, 3),
        "input_blocks.4.0.skip_connection.weight": (640, 320, 1, 1),
        "time_embed.0.weight": (1280, 320),
        "out.0.weight": (320,),
        "out.2.weight": (4, 320, 3, 3),
    }),
    "sd21": ("sd2-v", SD21_UNET, 686, {
        "input_blocks.1.1.proj_in.weight": (320, 320),
        "input_blocks.1.1.transformer_blocks.0.attn2.to_k.weight": (320, 1024),
        "middle_block.1.proj_in.weight": (1280, 1280),
        "output_blocks.11.1.proj_out.weight": (320, 320),
    }),
    "sdxl": ("sdxl", SDXL_UNET, 1680, {
        "input_blocks.1.0.in_layers.2.weight": (320, 320, 3, 3),
        "input_blocks.4.1.transformer_blocks.1.ff.net.2.weight": (640, 2560),
        "input_blocks.7.1.transformer_blocks.9.attn2.to_k.weight": (1280, 2048),
        "middle_block.1.proj_in.weight": (1280, 1280),
        "middle_block.1.transformer_blocks.9.attn1.to_out.0.weight": (1280, 1280),
        "output_blocks.2.2.conv.weight": (1280, 1280, 3, 3),
        "output_blocks.5.2.conv.weight": (640, 640, 3, 3),
        "output_blocks.3.0.skip_connection.weight": (640, 1920, 1, 1),
        "input_blocks.3.0.op.weight": (320, 320, 3, 3),
        "label_emb.0.0.weight": (1280, 2816),
        "label_emb.0.2.weight": (1280, 1280),
        "out.2.weight": (4, 320, 3, 3),
    }),
}
FULL_SIZE_VAES = {"sd": SD_VAE, "sdxl": SDXL_VAE}
VAE_COUNT = 248
VAE_GOLDEN = {
    "encoder.mid.attn_1.q.weight": (512, 512, 1, 1),
    "encoder.mid.attn_1.proj_out.weight": (512, 512, 1, 1),
    "decoder.mid.attn_1.norm.weight": (512,),
    "decoder.up.3.block.0.conv1.weight": (512, 512, 3, 3),
    "decoder.up.0.block.0.conv1.weight": (128, 256, 3, 3),
    "decoder.up.0.block.0.nin_shortcut.weight": (128, 256, 1, 1),
    "decoder.up.1.upsample.conv.weight": (256, 256, 3, 3),
    "encoder.down.1.block.0.nin_shortcut.weight": (256, 128, 1, 1),
    "encoder.down.0.downsample.conv.weight": (128, 128, 3, 3),
    "encoder.conv_out.weight": (8, 512, 3, 3),
    "quant_conv.weight": (8, 8, 1, 1),
    "post_quant_conv.weight": (4, 4, 1, 1),
}
# A VAE whose channels change at every level, so every shortcut/ordering rule is exercised with real tensors.
UNEVEN_VAE = dict(in_channels=3, out_channels=3, down_block_types=("DownEncoderBlock2D",) * 3,
                  up_block_types=("UpDecoderBlock2D",) * 3, block_out_channels=(32, 64, 96), layers_per_block=1,
                  latent_channels=4, norm_num_groups=32)

UNET_FIELDS = ("in_channels", "out_channels", "down_block_types", "up_block_types", "block_out_channels",
               "layers_per_block", "transformer_layers_per_block", "attention_head_dim", "cross_attention_dim",
               "use_linear_projection", "upcast_attention", "norm_num_groups", "addition_embed_type",
               "addition_time_embed_dim", "projection_class_embeddings_input_dim")
VAE_FIELDS = ("in_channels", "out_channels", "down_block_types", "up_block_types", "block_out_channels",
              "layers_per_block", "latent_channels", "norm_num_groups", "scaling_factor")


# ----------------------------------------------------------------------------------------------- helpers


def _shapes(state_dict) -> dict:
    return {key: tuple(value.shape) for key, value in state_dict.items()}


def _normalized(config, fields, defaults) -> dict:
    """The fields that decide the architecture, with diffusers' defaults filled in and ints spread per block."""
    levels = len(config["block_out_channels"])
    result = {}
    for field in fields:
        value = config.get(field, defaults.get(field))
        if field == "transformer_layers_per_block" and isinstance(value, int):
            value = (value,) * levels
        result[field] = tuple(value) if isinstance(value, (list, tuple)) else value
    return result


def _unet_defaults() -> dict:
    return convert_unet._unet_defaults()


def _vae_defaults() -> dict:
    return convert_vae._vae_defaults()


def _meta_unet(config):
    from accelerate import init_empty_weights
    from diffusers import UNet2DConditionModel

    with init_empty_weights():
        return UNet2DConditionModel(**config)


def _meta_vae(config):
    from accelerate import init_empty_weights
    from diffusers import AutoencoderKL

    with init_empty_weights():
        return AutoencoderKL(**config)


def _pooled_dim(family_name: str):
    return TINY_TE2_PROJECTION if family_name == "sdxl" else None


# ----------------------------------------------------------------------------------------------- fixtures


@pytest.fixture(scope="module")
def tiny(tiny_models) -> dict:
    """family name -> tiny ModelBundle (built once per session by conftest's `tiny_models`)."""
    return {name: tiny_models.bundle(name) for name in TINY_FAMILIES}


@pytest.fixture(scope="module")
def full_unets() -> dict:
    """name -> full-size UNet on the meta device; built on first use."""
    cache: dict = {}

    def get(name):
        if name not in cache:
            cache[name] = _meta_unet(FULL_SIZE_UNETS[name][1])
        return cache[name]

    return get


@pytest.fixture(scope="module")
def uneven_vae():
    from diffusers import AutoencoderKL

    torch.manual_seed(0)
    return AutoencoderKL(**UNEVEN_VAE).eval()


# ----------------------------------------------------------------------------------------------- round trips


@pytest.mark.parametrize("family", TINY_FAMILIES)
def test_unet_round_trip_keeps_tensor_objects(tiny, family):
    unet = tiny[family].unet
    state_dict = unet.state_dict()
    ldm = convert_unet.unet_diffusers_to_ldm(state_dict, unet.config)
    assert len(ldm) == len(state_dict)
    assert set(ldm) == convert_unet.unet_ldm_keys(unet.config)
    assert {id(t) for t in ldm.values()} == {id(t) for t in state_dict.values()}
    back = convert_unet.unet_ldm_to_diffusers(ldm, unet.config)
    assert list(back) == list(state_dict)
    assert all(back[key] is state_dict[key] for key in state_dict)


@pytest.mark.parametrize("family", TINY_FAMILIES)
def test_vae_round_trip_renames_and_views(tiny, family):
    vae = tiny[family].vae
    state_dict = vae.state_dict()
    ldm = convert_vae.vae_diffusers_to_ldm(state_dict, vae.config)
    assert set(ldm) == convert_vae.vae_ldm_keys(vae.config)
    q = ldm["encoder.mid.attn_1.q.weight"]
    assert q.shape == (32, 32, 1, 1)
    assert q.data_ptr() == state_dict["encoder.mid_block.attentions.0.to_q.weight"].data_ptr()  # a view
    assert ldm["encoder.mid.attn_1.q.bias"] is state_dict["encoder.mid_block.attentions.0.to_q.bias"]
    assert ldm["decoder.up.3.block.0.conv1.weight"] is state_dict["decoder.up_blocks.0.resnets.0.conv1.weight"]
    back = convert_vae.vae_ldm_to_diffusers(ldm, vae.config)
    assert set(back) == set(state_dict)
    reshaped = 0
    for key, tensor in state_dict.items():
        assert torch.equal(back[key], tensor), key
        if back[key] is not tensor:
            assert ".mid_block.attentions.0.to_" in key and key.endswith(".weight"), key
            assert back[key].data_ptr() == tensor.data_ptr()
            reshaped += 1
    assert reshaped == 8  # q, k, v, out of the encoder and the decoder


# ----------------------------------------------------------------------------------------------- diffusers oracle


def _assert_same_tensors(converted: dict, expected: dict) -> None:
    assert set(converted) == set(expected), sorted(set(converted) ^ set(expected))[:5]
    for key, tensor in expected.items():
        assert torch.equal(converted[key], tensor), key


@pytest.mark.parametrize("family", TINY_FAMILIES)
def test_diffusers_converter_reads_our_unet(tiny, family):
    from diffusers.loaders.single_file_utils import convert_ldm_unet_checkpoint

    unet = tiny[family].unet
    state_dict = unet.state_dict()
    ldm = convert_unet.unet_diffusers_to_ldm(state_dict, unet.config)
    checkpoint = {UNET_PREFIX + key: value for key, value in ldm.items()}
    _assert_same_tensors(convert_ldm_unet_checkpoint(checkpoint, dict(unet.config)), state_dict)


@pytest.mark.parametrize("which", [*TINY_FAMILIES, "uneven"])
def test_diffusers_converter_reads_our_vae(tiny, uneven_vae, which):
    from diffusers.loaders.single_file_utils import convert_ldm_vae_checkpoint

    vae = uneven_vae if which == "uneven" else tiny[which].vae
    state_dict = vae.state_dict()
    ldm = convert_vae.vae_diffusers_to_ldm(state_dict, vae.config)
    checkpoint = {VAE_PREFIX + key: value for key, value in ldm.items()}
    _assert_same_tensors(convert_ldm_vae_checkpoint(checkpoint, dict(vae.config)), state_dict)
    back = convert_vae.vae_ldm_to_diffusers(ldm, vae.config)
    _assert_same_tensors(back, state_dict)


# ----------------------------------------------------------------------------------------------- full size (meta)


@pytest.mark.parametrize("name", FULL_SIZE_UNETS)
def test_full_size_unet_keys(full_unets, name):
    from diffusers.loaders.single_file_utils import convert_ldm_unet_checkpoint

    _, config, count, golden = FULL_SIZE_UNETS[name]
    unet = full_unets(name)
    state_dict = unet.state_dict()
    assert len(state_dict) == count
    ldm = convert_unet.unet_diffusers_to_ldm(state_dict, unet.config)
    assert len(ldm) == count
    assert set(ldm) == convert_unet.unet_ldm_keys(config)
    for key, shape in golden.items():
        assert tuple(ldm[key].shape) == shape, key
    assert all(ldm[ldm_key] is state_dict[key] for key, ldm_key in convert_unet.unet_key_pairs(config))
    oracle = convert_ldm_unet_checkpoint({UNET_PREFIX + k: v for k, v in ldm.items()}, dict(unet.config))
    assert _shapes(oracle) == _shapes(state_dict)
    back = convert_unet.unet_ldm_to_diffusers(ldm, config)
    assert all(back[key] is state_dict[key] for key in state_dict)


@pytest.mark.parametrize("name", FULL_SIZE_VAES)
def test_full_size_vae_keys(name):
    from diffusers.loaders.single_file_utils import convert_ldm_vae_checkpoint

    config = FULL_SIZE_VAES[name]
    state_dict = _meta_vae(config).state_dict()
    assert len(state_dict) == VAE_COUNT
    ldm = convert_vae.vae_diffusers_to_ldm(state_dict, config)
    assert len(ldm) == VAE_COUNT
    assert set(ldm) == convert_vae.vae_ldm_keys(config)
    for key, shape in VAE_GOLDEN.items():
        assert tuple(ldm[key].shape) == shape, key
    oracle = convert_ldm_vae_checkpoint({VAE_PREFIX + k: v for k, v in ldm.items()}, dict(config))
    assert _shapes(oracle) == _shapes(state_dict)
    assert _shapes(convert_vae.vae_ldm_to_diffusers(ldm, config)) == _shapes(state_dict)


def test_vae_conversion_accepts_a_config_with_placeholder_channels():
    """A caller that only knows the number of levels and layers (a diffusers VAE file without config) converts."""
    state_dict = _meta_vae(SD_VAE).state_dict()
    guessed = dict(block_out_channels=[0] * 4, layers_per_block=2)
    ldm = convert_vae.vae_diffusers_to_ldm(state_dict, guessed)
    assert set(ldm) == convert_vae.vae_ldm_keys(SD_VAE)
    assert convert_vae.vae_config_from_ldm(ldm, 0.18215)["block_out_channels"] == (128, 256, 512, 512)


# ----------------------------------------------------------------------------------------------- derived configs


def _check_derived_unet(derived: dict, expected_config: dict, state_dict) -> None:
    assert _normalized(derived, UNET_FIELDS, _unet_defaults()) == \
        _normalized(expected_config, UNET_FIELDS, _unet_defaults())
    assert _shapes(_meta_unet(derived).state_dict()) == _shapes(state_dict)


@pytest.mark.parametrize("family", TINY_FAMILIES)
def test_unet_config_from_tiny_ldm(tiny, family):
    unet = tiny[family].unet
    ldm = convert_unet.unet_diffusers_to_ldm(unet.state_dict(), unet.config)
    derived = convert_unet.unet_config_from_ldm(ldm, FAMILIES[family], pooled_dim=_pooled_dim(family))
    assert derived["sample_size"] == FAMILIES[family].default_resolution // 8
    expected = dict(tiny_unet_config(FAMILIES[family]), upcast_attention=FAMILIES[family].upcast_attention)
    _check_derived_unet(derived, expected, unet.state_dict())


@pytest.mark.parametrize("name", FULL_SIZE_UNETS)
def test_unet_config_from_full_size_ldm(full_unets, name):
    family, config, _, _ = FULL_SIZE_UNETS[name]
    state_dict = full_unets(name).state_dict()
    ldm = convert_unet.unet_diffusers_to_ldm(state_dict, config)
    derived = convert_unet.unet_config_from_ldm(ldm, FAMILIES[family], pooled_dim=1280 if family == "sdxl" else None)
    assert derived["sample_size"] == config["sample_size"]
    _check_derived_unet(derived, config, state_dict)
    if family == "sdxl":  # the pooled width defaults to bigG's 1280 for the released 2816-feature label_emb
        assert convert_unet.unet_config_from_ldm(ldm, FAMILIES[family]) == derived


@pytest.mark.parametrize("which", ["tiny", "uneven", "sd", "sdxl"])
def test_vae_config_from_ldm(uneven_vae, which):
    config = {"tiny": tiny_vae_config(FAMILIES["sd1"]), "uneven": dict(UNEVEN_VAE, scaling_factor=0.5),
              "sd": SD_VAE, "sdxl": SDXL_VAE}[which]
    state_dict = uneven_vae.state_dict() if which == "uneven" else _meta_vae(config).state_dict()
    ldm = convert_vae.vae_diffusers_to_ldm(state_dict, config)
    derived = convert_vae.vae_config_from_ldm(ldm, config["scaling_factor"])
    assert _normalized(derived, VAE_FIELDS, _vae_defaults()) == _normalized(config, VAE_FIELDS, _vae_defaults())
    assert _shapes(_meta_vae(derived).state_dict()) == _shapes(state_dict)


# ----------------------------------------------------------------------------------------------- errors


def test_unet_config_needs_input_blocks():
    with pytest.raises(ModelFormatError, match="input_blocks") as error:
        convert_unet.unet_config_from_ldm({"out.2.weight": torch.zeros(4, 8, 3, 3)}, FAMILIES["sd1"], path="x.ckpt")
    assert str(error.value).startswith("x.ckpt: ")


def test_unet_config_names_a_missing_key(tiny):
    unet = tiny["sd1"].unet
    ldm = convert_unet.unet_diffusers_to_ldm(unet.state_dict(), unet.config)
    del ldm["middle_block.1.proj_in.weight"]
    with pytest.raises(ModelFormatError, match=r"middle_block\.1\.proj_in\.weight"):
        convert_unet.unet_config_from_ldm(ldm, FAMILIES["sd1"])


def test_sdxl_config_needs_pooled_width_for_unknown_label_emb(tiny):
    unet = tiny["sdxl"].unet
    ldm = convert_unet.unet_diffusers_to_ldm(unet.state_dict(), unet.config)
    with pytest.raises(ModelFormatError, match="pooled"):
        convert_unet.unet_config_from_ldm(ldm, FAMILIES["sdxl"], path="tiny.safetensors")


def test_unet_unknown_and_missing_keys_are_named(tiny):
    unet = tiny["sd1"].unet
    ldm = convert_unet.unet_diffusers_to_ldm(unet.state_dict(), unet.config)
    with pytest.raises(ValueError, match=r"'input_blocks\.99\.0\.foo\.weight'"):
        convert_unet.unet_ldm_to_diffusers({**ldm, "input_blocks.99.0.foo.weight": torch.zeros(1)}, unet.config)
    partial = dict(ldm)
    del partial["output_blocks.5.2.conv.bias"]
    with pytest.raises(ValueError, match=r"'output_blocks\.5\.2\.conv\.bias' is missing"):
        convert_unet.unet_ldm_to_diffusers(partial, unet.config)
    with pytest.raises(ValueError, match=r"'label_emb\.0\.0\.weight'"):
        convert_unet.unet_ldm_to_diffusers({**ldm, "label_emb.0.0.weight": torch.zeros(1)}, unet.config)
    with pytest.raises(ValueError, match=r"'add_embedding\.linear_1\.weight'"):
        convert_unet.unet_diffusers_to_ldm({**unet.state_dict(), "add_embedding.linear_1.weight": torch.zeros(1)},
                                           unet.config)


def test_unet_unsupported_config_is_refused():
    with pytest.raises(ValueError, match="class_embed_type"):
        convert_unet.unet_ldm_keys(dict(SD15_UNET, class_embed_type="timestep"))


def test_vae_errors_name_the_key(tiny):
    vae = tiny["sd1"].vae
    ldm = convert_vae.vae_diffusers_to_ldm(vae.state_dict(), vae.config)
    with pytest.raises(ValueError, match=r"'encoder\.down\.7\.block\.0\.conv1\.weight'"):
        convert_vae.vae_ldm_to_diffusers({**ldm, "encoder.down.7.block.0.conv1.weight": torch.zeros(1)}, vae.config)
    partial = dict(ldm)
    del partial["decoder.up.0.block.2.norm2.bias"]
    with pytest.raises(ValueError, match=r"'decoder\.up\.0\.block\.2\.norm2\.bias' is missing"):
        convert_vae.vae_ldm_to_diffusers(partial, vae.config)
    with pytest.raises(ModelFormatError, match=r"encoder\.down"):
        convert_vae.vae_config_from_ldm({"decoder.conv_out.weight": torch.zeros(3, 32, 3, 3)}, 0.18215, path="v.pt")
