"""networks/control_net_lllite.py: kohya's module set, key names, shapes and counts (full-size SDXL U-Net on the
meta device, and the tiny one), initialisation, the forward (input changed, multiplier 0 exact, CFG repeat), and
the file round trip with its refusals."""
from __future__ import annotations

import copy
import re

import pytest
import torch

from library.errors import FlagError, ModelFormatError
from networks import control_net_lllite as lllite


@pytest.fixture(scope="module")
def full_unet():
    from diffusers import UNet2DConditionModel

    from library.models.reference_configs import SDXL_UNET

    with torch.device("meta"):
        return UNet2DConditionModel(**SDXL_UNET)


def _network_on_meta(unet, cond_emb_dim: int, mlp_dim: int) -> lllite.ControlNetLLLite:
    with torch.device("meta"):
        return lllite.ControlNetLLLite(unet, cond_emb_dim, mlp_dim)


def test_full_size_sdxl_gets_kohyas_136_modules_and_1600_tensors(full_unet):
    network = _network_on_meta(full_unet, 32, 64)
    tensors = {key: value.shape for key, value in network.state_dict().items()}
    names = [module.lllite_name for module in network.unet_modules]
    assert (len(names), len(tensors)) == (136, 1600)
    pattern = re.compile(r"^lllite_unet_(input_blocks_[4578]_1|middle_block_1)_transformer_blocks_\d_"
                         r"(attn1_to_[qkv]|attn2_to_q)$")
    assert all(pattern.match(name) for name in names)
    blocks = {name.rsplit("_transformer_blocks_", 1)[0] for name in names}
    assert blocks == {f"lllite_unet_input_blocks_{i}_1" for i in (4, 5, 7, 8)} | {"lllite_unet_middle_block_1"}
    params = sum(value.numel() for value in network.state_dict().values())
    assert params == pytest.approx(23.0e6, rel=0.01)  # TRAINERS §4.1: cond 32 / dim 64 ~ 23.0 M
    small = sum(value.numel() for value in _network_on_meta(full_unet, 16, 16).state_dict().values())
    assert small == pytest.approx(5.75e6, rel=0.01)


def test_shapes_per_depth_are_kohyas(full_unet):
    network = _network_on_meta(full_unet, 32, 64)
    shapes = {f"{module.lllite_name}.{key}": tuple(value.shape) for module in network.unet_modules
              for key, value in module.state_dict().items()}
    depth2 = "lllite_unet_input_blocks_4_1_transformer_blocks_0_attn1_to_q"
    depth3 = "lllite_unet_middle_block_1_transformer_blocks_9_attn2_to_q"
    assert shapes[f"{depth2}.conditioning1.0.weight"] == (16, 3, 4, 4)
    assert shapes[f"{depth2}.conditioning1.2.weight"] == (32, 16, 4, 4)
    assert f"{depth2}.conditioning1.4.weight" not in shapes
    assert shapes[f"{depth3}.conditioning1.2.weight"] == (16, 16, 4, 4)
    assert shapes[f"{depth3}.conditioning1.4.weight"] == (32, 16, 2, 2)
    assert (shapes[f"{depth2}.down.0.weight"], shapes[f"{depth2}.mid.0.weight"], shapes[f"{depth2}.up.0.weight"]) \
        == ((64, 640), (64, 96), (640, 64))
    assert (shapes[f"{depth3}.down.0.weight"], shapes[f"{depth3}.up.0.weight"]) == ((64, 1280), (1280, 64))


def test_depth_rule():
    assert [lllite.module_depth(f"input_blocks.{index}.1.x") for index in (1, 2, 4, 5, 7, 8)] == [1, 1, 2, 2, 3, 3]
    assert lllite.module_depth("middle_block.1.x") == 3
    with pytest.raises(ValueError, match="not placed in output blocks"):
        lllite.module_depth("output_blocks.0.1.x")


@pytest.fixture()
def tiny_unet(tiny_models):
    return copy.deepcopy(tiny_models.bundle("sdxl").unet).eval()


def _random_network(unet, cond_emb_dim=8, mlp_dim=8, seed=0):
    torch.manual_seed(seed)
    network = lllite.ControlNetLLLite(unet, cond_emb_dim, mlp_dim)
    with torch.no_grad():
        for parameter in network.parameters():
            parameter.normal_(0, 0.1)
    return network


def _unet_output(unet, latents, cond=None):
    torch.manual_seed(0)
    context = torch.randn(latents.shape[0], 77, unet.config.cross_attention_dim)
    pooled = unet.config.projection_class_embeddings_input_dim - 6 * unet.config.addition_time_embed_dim
    added = {"text_embeds": torch.randn(latents.shape[0], pooled),
             "time_ids": torch.tensor([[64.0, 64.0, 0.0, 0.0, 64.0, 64.0]]).repeat(latents.shape[0], 1)}
    with torch.no_grad():
        return unet(latents, torch.tensor([500] * latents.shape[0]), encoder_hidden_states=context,
                    added_cond_kwargs=added).sample


def test_initialisation_zero_up_weight_default_bias(tiny_unet):
    network = lllite.ControlNetLLLite(tiny_unet, 8, 8)
    for module in network.unet_modules:
        assert torch.count_nonzero(module.up[0].weight) == 0
        assert torch.count_nonzero(module.up[0].bias) > 0, "kohya keeps PyTorch's default bias init"


def test_forward_changes_the_layer_input_and_multiplier_zero_is_exact(tiny_unet):
    latents = torch.randn(1, 4, 8, 8)
    plain = _unet_output(tiny_unet, latents)
    network = _random_network(tiny_unet)
    network.apply_to()
    network.set_cond_image(torch.rand(1, 3, 64, 64) * 2 - 1)
    controlled = _unet_output(tiny_unet, latents)
    assert not torch.allclose(controlled, plain)
    network.set_multiplier(0.0)
    assert torch.equal(_unet_output(tiny_unet, latents), plain)
    network.set_multiplier(1.0)
    network.set_enabled(False)
    assert torch.equal(_unet_output(tiny_unet, latents), plain)
    network.set_enabled(True)
    network.restore()
    assert torch.equal(_unet_output(tiny_unet, latents), plain)


def test_a_doubled_batch_repeats_the_conditioning(tiny_unet):
    """Classifier-free guidance runs the batch twice with one conditioning image per image."""
    network = _random_network(tiny_unet)
    network.apply_to()
    cond = torch.rand(1, 3, 64, 64) * 2 - 1
    latents = torch.randn(1, 4, 8, 8).repeat(2, 1, 1, 1)
    network.set_cond_image(cond)
    once = _unet_output(tiny_unet, latents)
    network.set_cond_image(cond.repeat(2, 1, 1, 1))
    assert torch.allclose(_unet_output(tiny_unet, latents), once, atol=1e-6)


def test_a_wrong_sized_conditioning_image_is_named(tiny_unet):
    network = _random_network(tiny_unet)
    network.apply_to()
    network.set_cond_image(torch.zeros(1, 3, 32, 32))
    with pytest.raises(ValueError, match="must have the size of the generated/trained image"):
        _unet_output(tiny_unet, torch.randn(1, 4, 8, 8))


@pytest.mark.parametrize("suffix", [".safetensors", ".pt"])
def test_file_round_trip_and_dims_from_the_file(tiny_unet, tmp_path, suffix):
    network = _random_network(tiny_unet, cond_emb_dim=12, mlp_dim=6)
    path = tmp_path / f"lllite{suffix}"
    network.save_weights(path, torch.float16, {"modelspec.architecture": lllite.ARCHITECTURE})
    loaded = lllite.create_network_from_weights(tiny_unet, path)
    assert (loaded.cond_emb_dim, loaded.mlp_dim) == (12, 6)
    expected = network.file_state_dict(torch.float16)
    assert all(torch.equal(value.half(), expected[key]) for key, value in loaded.file_state_dict().items())


def test_refusals(tiny_unet, tiny_models, tmp_path):
    network = _random_network(tiny_unet, 8, 8)
    path = tmp_path / "lllite.safetensors"
    network.save_weights(path, None, {})
    other = lllite.ControlNetLLLite(tiny_unet, 8, 4)
    with pytest.raises(ModelFormatError, match="network_dim 4\\) expects"):
        other.load_weights(path)
    lora = tmp_path / "lora.safetensors"
    from safetensors.torch import save_file

    save_file({"lora_unet_x.lora_down.weight": torch.zeros(1, 1)}, str(lora))
    with pytest.raises(ModelFormatError, match="not a ControlNet-LLLite file \\(a LoRA file\\?\\)"):
        lllite.read_lllite_file(lora)
    with pytest.raises(FlagError, match="for SDXL models"):
        lllite.ControlNetLLLite(copy.deepcopy(tiny_models.bundle("sd1").unet), 8, 8)
    with pytest.raises(FlagError, match="--cond_emb_dim 7: expected an even width"):
        lllite.check_dims(7, 8)
    with pytest.raises(FlagError, match="--network_dim None"):
        lllite.check_dims(8, None)
