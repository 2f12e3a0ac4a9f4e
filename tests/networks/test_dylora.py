"""DyLoRA on tiny SD1/SDXL models: LoRA-identical files, unit checks, one unit trained per step, eval == LoRA."""
from __future__ import annotations

import logging
import math

import pytest
import torch
from safetensors.torch import load_file

from library.errors import FlagError
from networks import dylora, lora
from tests.networks.test_lora import assert_outputs_close, fresh_copy, model_outputs, text_encoder_arg


def make_dylora(bundle, dim=4, alpha=2.0, **network_args):
    return dylora.create_network(1.0, dim, alpha, bundle.vae, text_encoder_arg(bundle), bundle.unet, **network_args)


def randomize_units(network, seed=1):
    """Non-zero lora_up (and fresh lora_down) so every unit changes the output and receives gradients."""
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for module in network.text_encoder_loras + network.unet_loras:
            for parameter in module.down_units() + module.up_units():
                parameter.copy_(torch.randn(parameter.shape, generator=generator) * 0.1)


def seed_drawing(unit_index, unit_count):
    """A torch seed whose first `randint(unit_count)` is unit_index (DyLoRAModule's draw)."""
    for seed in range(1000):
        if torch.randint(unit_count, (1,), generator=torch.Generator().manual_seed(seed)).item() == unit_index:
            return seed
    raise AssertionError("no seed found")


def shapes(state_dict):
    return {key: tuple(tensor.shape) for key, tensor in state_dict.items()}


@pytest.mark.parametrize("family, network_args", [("sd1", {"conv_dim": "4", "conv_alpha": "2"}), ("sdxl", {})])
def test_file_keys_and_shapes_equal_a_plain_lora(tiny_models, tmp_path, family, network_args):
    bundle = tiny_models.bundle(family)
    dynamic = make_dylora(bundle, unit="2", **network_args)
    plain = lora.create_network(1.0, 4, 2.0, bundle.vae, text_encoder_arg(bundle), bundle.unet, **network_args)
    path = tmp_path / "dylora.safetensors"
    dynamic.save_weights(path, torch.float16, {})
    written = load_file(str(path))
    assert shapes(written) == shapes(plain.file_state_dict())
    assert {tensor.dtype for tensor in written.values()} == {torch.float16}
    alphas = {float(tensor) for key, tensor in written.items() if key.endswith(".alpha")}
    assert alphas == {2.0}
    if family == "sd1":
        assert written["lora_unet_down_blocks_0_resnets_0_conv1.lora_down.weight"].shape[1:] == (32, 3, 3)
        assert written["lora_unet_mid_block_attentions_0_proj_in.lora_up.weight"].dim() == 4


def test_parameters_are_one_per_unit():
    module = dylora.DyLoRAModule("lora_te_x", torch.nn.Linear(5, 7), lora_dim=6, alpha=3, unit=2)
    assert [tuple(p.shape) for p in module.down_units()] == [(2, 5)] * 3
    assert [tuple(p.shape) for p in module.up_units()] == [(7, 2)] * 3
    assert sorted(module.state_dict()) == ["alpha", "lora_down.weight", "lora_up.weight"]
    assert not module.up_weight().any()  # zero-initialised as in LoRA


@pytest.mark.parametrize("network_args, message", [
    ({"unit": "4"}, "--network_args unit: expected a divisor of --network_dim (6), got '4'; valid units: 1, 2, 3, 6"),
    ({"unit": "0"}, "--network_args unit: expected an integer >= 1, got '0'"),
    ({"unit": "two"}, "--network_args unit: expected an integer, got 'two'"),
    ({"conv_dim": "3"}, ("--network_args conv_dim: expected the value of --network_dim (6), got '3'; DyLoRA trains "
                         "3x3 convs at the same rank as the other layers")),
])
def test_bad_network_args_name_the_key(tiny_models, network_args, message):
    with pytest.raises(FlagError) as error:
        make_dylora(tiny_models.bundle("sd1"), dim=6, **network_args)
    assert str(error.value) == message


def test_dropouts_and_unknown_args_are_warned_about(tiny_models, caplog):
    sd1 = tiny_models.bundle("sd1")
    with caplog.at_level(logging.WARNING, logger="networks.dylora"):
        # the trainer passes --network_dropout both as neuron_dropout and as the `dropout` arg (COMPAT §6)
        network = dylora.create_network(1.0, 4, 1.0, None, sd1.text_encoders[0], sd1.unet, neuron_dropout=0.1,
                                        dropout=0.1, rank_dropout="0.2", units="2")
    messages = [record.getMessage() for record in caplog.records if record.name == "networks.dylora"]
    assert messages == ["--network_args rank_dropout=0.2: DyLoRA has no dropout (as in kohya); ignored",
                        "--network_args units: not an option of networks.dylora, ignored; did you mean unit?",
                        "--network_dropout 0.1: DyLoRA has no dropout (as in kohya); ignored"]
    assert network.unet_loras[0].unit == 1
    caplog.clear()
    with caplog.at_level(logging.WARNING, logger="networks.dylora"):
        dylora.create_network(1.0, 4, 1.0, None, sd1.text_encoders[0], sd1.unet, neuron_dropout=None, dropout=None)
    assert [record for record in caplog.records if record.name == "networks.dylora"] == []


def test_training_forward_uses_ranks_up_to_the_drawn_unit_with_kohya_scale():
    """b = 2 of r = 6 (unit 2): output uses ranks [0, 4) scaled alpha/r * sqrt(r/4), grads only in ranks [2, 4)."""
    layer = torch.nn.Linear(5, 3, bias=False)
    module = dylora.DyLoRAModule("lora_te_x", layer, lora_dim=6, alpha=3.0, unit=2)
    module.apply_to()
    for parameter in module.up_units():
        torch.nn.init.normal_(parameter)
    x = torch.randn(2, 5)
    torch.manual_seed(seed_drawing(unit_index=1, unit_count=3))
    output = layer(x)
    down, up = module.down_weight().detach(), module.up_weight().detach()
    expected = x @ layer.weight.T + x @ down[:4].T @ up[:, :4].T * (3.0 / 6) * math.sqrt(6 / 4)
    torch.testing.assert_close(output, expected)
    output.sum().backward()
    assert module.lora_down_unit1.grad.abs().sum() > 0 and module.lora_up_unit1.grad.abs().sum() > 0
    for name in ("lora_down_unit0", "lora_up_unit0", "lora_down_unit2", "lora_up_unit2"):
        assert getattr(module, name).grad is None, name  # None: the optimizer skips them entirely
    module.eval()
    torch.testing.assert_close(layer(x), x @ layer.weight.T + x @ down.T @ up.T * 0.5)


def test_optimizer_step_changes_one_unit_per_module(tiny_models):
    bundle = fresh_copy(tiny_models, "sd1")
    network = make_dylora(bundle, dim=4, unit="2", conv_dim="4")
    network.apply_to(bundle.text_encoders[0], bundle.unet)
    randomize_units(network)
    network.prepare_grad_etc(bundle.text_encoders[0], bundle.unet)
    network.on_epoch_start(bundle.text_encoders[0], bundle.unet)
    groups, _ = network.prepare_optimizer_params(1e-3, 1e-3, 1e-3)
    optimizer = torch.optim.AdamW(groups, weight_decay=0.1)
    before = {name: p.detach().clone() for name, p in network.named_parameters()}
    torch.manual_seed(3)
    sum(output.square().mean() for output in _outputs_with_grad(bundle)).backward()
    optimizer.step()
    changed_units = []
    for module in network.text_encoder_loras + network.unet_loras:
        changed = [index for index in range(module.unit_count)
                   if not torch.equal(module.down_units()[index], before[f"{module.lora_name}.lora_down_unit{index}"])]
        with_grad = [index for index, p in enumerate(module.down_units()) if p.grad is not None]
        assert changed == with_grad and len(changed) == 1, module.lora_name
        changed_units.append(changed[0])
    assert set(changed_units) == {0, 1}  # both units get drawn somewhere in the model


def _outputs_with_grad(bundle):
    generator = torch.Generator().manual_seed(0)
    sample = torch.randn(1, 4, 8, 8, generator=generator)
    context = bundle.text_encoders[0](torch.randint(0, 49406, (1, 8), generator=generator)).last_hidden_state
    return [bundle.unet(sample, torch.tensor([500]), context).sample]


@pytest.mark.parametrize("family", ["sd1", "sdxl"])
def test_eval_forward_equals_the_file_loaded_as_plain_lora(tiny_models, tmp_path, family):
    trained = fresh_copy(tiny_models, family, torch.float64)
    network = make_dylora(trained, dim=4, unit="2", **({"conv_dim": "4"} if family == "sd1" else {}))
    network.to(torch.float64).apply_to(text_encoder_arg(trained), trained.unet)
    randomize_units(network)
    network.set_multiplier(0.8)
    network.eval()
    expected = model_outputs(trained)
    path = tmp_path / "dylora.safetensors"
    network.save_weights(path, None, {})
    plain = fresh_copy(tiny_models, family, torch.float64)
    as_lora, _ = lora.create_network_from_weights(0.8, str(path), None, text_encoder_arg(plain), plain.unet)
    as_lora.to(torch.float64).apply_to(text_encoder_arg(plain), plain.unet)
    info = as_lora.load_weights(path)
    assert info.missing_keys == [] and info.unexpected_keys == []
    assert_outputs_close(model_outputs(plain), expected, atol=1e-10)


def test_save_load_round_trip(tiny_models, tmp_path):
    bundle = fresh_copy(tiny_models, "sd1")
    network = make_dylora(bundle, dim=4, unit="2")
    randomize_units(network)
    path = tmp_path / "dylora.safetensors"
    network.save_weights(path, None, {"ss_network_module": "networks.dylora"})
    assert sorted(p.name for p in tmp_path.iterdir()) == [path.name]
    fresh = make_dylora(tiny_models.bundle("sd1"), dim=4, unit="2")
    info = fresh.load_weights(path)
    assert info.missing_keys == [] and info.unexpected_keys == []
    for saved, loaded in zip(network.unet_loras, fresh.unet_loras):
        assert torch.equal(saved.down_weight(), loaded.down_weight())
        assert torch.equal(saved.up_weight(), loaded.up_weight())
    rebuilt, _ = dylora.create_network_from_weights(1.0, str(path), None, bundle.text_encoders[0], bundle.unet,
                                                    unit="2")
    rebuilt.load_weights(path)
    assert [m.unit_count for m in rebuilt.unet_loras] == [2] * len(network.unet_loras)
    assert torch.equal(rebuilt.unet_loras[-1].up_weight(), network.unet_loras[-1].up_weight())
    with pytest.raises(FlagError, match=r"--network_args unit: expected a divisor of the ranks in .*dylora"
                                        r"\.safetensors \(4\), got '3'; valid units: 1, 2, 4"):
        dylora.create_network_from_weights(1.0, str(path), None, bundle.text_encoders[0], bundle.unet, unit="3")


def test_loraplus_groups_hold_every_up_unit(tiny_models):
    network = make_dylora(tiny_models.bundle("sdxl"), dim=4, unit="2", loraplus_unet_lr_ratio="8")
    groups, descriptions = network.prepare_optimizer_params([1e-5, 2e-5], 1e-4, 1e-3)
    assert descriptions == ["textencoder 1", "textencoder 2", "unet", "unet plus"]
    assert [group["lr"] for group in groups] == pytest.approx([1e-5, 2e-5, 1e-4, 8e-4])
    up_units = {id(p) for module in network.unet_loras for p in module.up_units()}
    assert {id(p) for p in groups[3]["params"]} == up_units


def test_max_norm_regularization_scales_the_concatenated_pair(tiny_models):
    network = make_dylora(tiny_models.bundle("sd1"), dim=4, unit="2")
    target = network.unet_loras[0]
    with torch.no_grad():
        for parameter in target.up_units():
            parameter.fill_(1.0)
    scaled, _, max_norm = network.apply_max_norm_regularization(1.0, "cpu")
    after = lora.lora_weight_delta(target.down_weight(), target.up_weight(), target.scale).norm().item()
    assert scaled == 1 and after == pytest.approx(1.0, rel=1e-5) and max_norm == pytest.approx(1.0, rel=1e-5)


def test_gradient_checkpointing_recompute_draws_the_same_rank():
    layer = torch.nn.Linear(6, 6)
    module = dylora.DyLoRAModule("lora_te_x", layer, lora_dim=8, alpha=8, unit=1)
    module.apply_to()
    for parameter in module.up_units():
        torch.nn.init.normal_(parameter)
    x = torch.randn(3, 6)
    torch.manual_seed(5)
    layer(x).square().sum().backward()
    direct = [p.grad.clone() if p.grad is not None else None for p in module.down_units()]
    module.zero_grad(set_to_none=True)
    torch.manual_seed(5)
    torch.utils.checkpoint.checkpoint(layer, x, use_reentrant=False).square().sum().backward()
    for want, parameter in zip(direct, module.down_units()):
        assert (want is None and parameter.grad is None) or torch.allclose(want, parameter.grad)
