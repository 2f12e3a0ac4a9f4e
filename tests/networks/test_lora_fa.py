"""LoRA-FA on tiny SD1/SDXL models: LoRA-identical files, lora_down frozen and out of the optimizer, lora_up trains."""
from __future__ import annotations

import pytest
import torch
from safetensors.torch import load_file

from networks import lora, lora_fa
from tests.networks.test_lora import assert_outputs_close, fresh_copy, model_outputs, text_encoder_arg


def make_lora_fa(bundle, dim=4, alpha=2.0, **network_args):
    return lora_fa.create_network(1.0, dim, alpha, bundle.vae, text_encoder_arg(bundle), bundle.unet, **network_args)


def down_weights(network):
    return {id(module.lora_down.weight) for module in network.text_encoder_loras + network.unet_loras}


@pytest.mark.parametrize("family, network_args", [("sd1", {"conv_dim": "2"}), ("sdxl", {})])
def test_file_keys_and_shapes_equal_a_plain_lora(tiny_models, tmp_path, family, network_args):
    bundle = tiny_models.bundle(family)
    path = tmp_path / "lora_fa.safetensors"
    make_lora_fa(bundle, **network_args).save_weights(path, None, {})
    plain = lora.create_network(1.0, 4, 2.0, bundle.vae, text_encoder_arg(bundle), bundle.unet, **network_args)
    written = load_file(str(path))
    assert {k: tuple(v.shape) for k, v in written.items()} == {k: tuple(v.shape)
                                                              for k, v in plain.file_state_dict().items()}


@pytest.mark.parametrize("family", ["sd1", "sdxl"])
def test_optimizer_groups_hold_no_lora_down(tiny_models, family):
    bundle = tiny_models.bundle(family)
    network = make_lora_fa(bundle, loraplus_lr_ratio="4")
    network.prepare_grad_etc(text_encoder_arg(bundle), bundle.unet)  # calls requires_grad_(True)
    groups, descriptions = network.prepare_optimizer_params_with_multiple_te_lrs([1e-5], 1e-4, 1e-3)
    # with LoRA+ every trainable tensor is a lora_up, so only the " plus" groups are left
    expected = ["textencoder plus"] if family == "sd1" else ["textencoder 1 plus", "textencoder 2 plus"]
    assert descriptions == expected + ["unet plus"]
    grouped = {id(p) for group in groups for p in group["params"]}
    assert not grouped & down_weights(network)
    assert grouped == {id(p) for p in network.get_trainable_params()}
    ups = {id(m.lora_up.weight) for m in network.text_encoder_loras + network.unet_loras}
    assert grouped == ups
    assert not any(module.lora_down.weight.requires_grad for module in network.unet_loras)


def test_optimizer_step_trains_only_lora_up(tiny_models):
    bundle = fresh_copy(tiny_models, "sd1")
    network = make_lora_fa(bundle)
    network.apply_to(bundle.text_encoders[0], bundle.unet)
    network.prepare_grad_etc(bundle.text_encoders[0], bundle.unet)
    groups, descriptions = network.prepare_optimizer_params(1e-3, 1e-3, 1e-3)
    assert descriptions == ["textencoder", "unet"]
    optimizer = torch.optim.AdamW(groups, weight_decay=0.1)
    modules = network.text_encoder_loras + network.unet_loras
    downs = [module.lora_down.weight.detach().clone() for module in modules]
    generator = torch.Generator().manual_seed(0)
    context = bundle.text_encoders[0](torch.randint(0, 49406, (1, 8), generator=generator)).last_hidden_state
    # 16x16 latents: at 8x8 the mid block attends over a single token, so attn1 to_q/to_k get exactly zero gradient
    output = bundle.unet(torch.randn(1, 4, 16, 16, generator=generator), torch.tensor([500]), context).sample
    output.square().mean().backward()
    optimizer.step()
    assert all(torch.equal(module.lora_down.weight, down) for module, down in zip(modules, downs))
    assert all(module.lora_down.weight.grad is None for module in modules)
    assert all(module.lora_up.weight.detach().abs().sum() > 0 for module in modules)  # moved away from zero init


def test_file_loads_back_as_lora_fa_and_as_plain_lora(tiny_models, tmp_path):
    trained = fresh_copy(tiny_models, "sd1")
    network = make_lora_fa(trained, conv_dim="2")
    network.apply_to(trained.text_encoders[0], trained.unet)
    with torch.no_grad():
        for module in network.unet_loras + network.text_encoder_loras:
            module.lora_up.weight.normal_(std=0.1)
    expected = model_outputs(trained)
    path = tmp_path / "lora_fa.safetensors"
    network.save_weights(path, None, {})
    for create in (lora_fa.create_network_from_weights, lora.create_network_from_weights):
        reloaded = fresh_copy(tiny_models, "sd1")
        rebuilt, _ = create(1.0, str(path), None, reloaded.text_encoders[0], reloaded.unet)
        rebuilt.apply_to(reloaded.text_encoders[0], reloaded.unet)
        rebuilt.load_weights(path)
        assert_outputs_close(model_outputs(reloaded), expected, atol=1e-6)
        frozen = not any(module.lora_down.weight.requires_grad for module in rebuilt.unet_loras)
        assert frozen == (create is lora_fa.create_network_from_weights)
