"""The --network_module adapter on tiny SD1/SDXL: args, import errors, param groups, LyCORIS, family check,
base weights."""
from __future__ import annotations

import copy
import logging
import re
import types

import pytest
import torch
from safetensors.torch import load_file, save_file

from library.errors import FlagError
from library.train import network_module
from networks import lora


def fresh_copy(tiny_models, family):
    """A private copy of the session's tiny model (networks patch the layers they wrap)."""
    return copy.deepcopy(tiny_models.bundle(family))


def encoder_argument(bundle):
    return bundle.text_encoders[0] if len(bundle.text_encoders) == 1 else bundle.text_encoders


def our_lora(bundle, network_args=None, network_dim=4, network_alpha=2.0):
    module = network_module.import_network_module("networks.lora")
    return network_module.create_network(
        module, multiplier=1.0, network_dim=network_dim, network_alpha=network_alpha, vae=bundle.vae,
        text_encoders=bundle.text_encoders, unet=bundle.unet,
        kwargs=network_module.network_kwargs(network_args, None))


def saved_lora(tiny_models, family, path, seed=1):
    """A LoRA file of our networks.lora for the family, with random (non-zero) up weights."""
    network = our_lora(tiny_models.bundle(family))
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for module in network.text_encoder_loras + network.unet_loras:
            module.lora_up.weight.copy_(torch.randn(module.lora_up.weight.shape, generator=generator) * 0.1)
    network.save_weights(path, None, {})
    return path


def unet_inputs(bundle):
    generator = torch.Generator().manual_seed(0)
    config = bundle.unet.config
    inputs = {"sample": torch.randn(1, 4, 8, 8, generator=generator), "timestep": torch.tensor([500]),
              "encoder_hidden_states": torch.randn(1, 5, config.cross_attention_dim, generator=generator)}
    if config.addition_embed_type == "text_time":
        pooled_dim = config.projection_class_embeddings_input_dim - 6 * config.addition_time_embed_dim
        inputs["added_cond_kwargs"] = {"text_embeds": torch.randn(1, pooled_dim, generator=generator),
                                       "time_ids": torch.tensor([[64.0, 64, 0, 0, 64, 64]])}
    return inputs


def applied_lycoris(tiny_models, family, kwargs):
    """(network, its private model copy): lycoris.kohya created through our adapter and applied to both parts."""
    pytest.importorskip("lycoris.kohya")
    module = network_module.import_network_module("lycoris.kohya")
    bundle = fresh_copy(tiny_models, family)
    network = network_module.create_network(module, multiplier=1.0, network_dim=4, network_alpha=1.0,
                                            vae=bundle.vae, text_encoders=bundle.text_encoders, unet=bundle.unet,
                                            kwargs=kwargs)
    network.apply_to(encoder_argument(bundle), bundle.unet, True, True)
    return network, bundle


# ----------------------------------------------------------------------------------------------- arguments


def test_network_args_split_at_the_first_equals_sign():
    parsed = network_module.parse_network_args(["conv_dim=4", "preset=a=b.toml", " algo = loha ", "empty="])
    assert parsed == {"conv_dim": "4", "preset": "a=b.toml", "algo": "loha", "empty": ""}
    assert network_module.parse_network_args(None) == {}


@pytest.mark.parametrize("item, message", [
    ("conv_dim", "--network_args 'conv_dim': expected key=value (e.g. conv_dim=4), got no '='"),
    ("=4", "--network_args '=4': expected key=value (e.g. conv_dim=4), got no key before '='"),
])
def test_network_args_without_key_value_name_the_item(item, message):
    with pytest.raises(FlagError) as error:
        network_module.parse_network_args(["algo=lora", item])
    assert str(error.value) == message


def test_network_dropout_is_added_unless_the_args_give_dropout():
    assert network_module.network_kwargs(["conv_dim=4"], 0.1) == {"conv_dim": "4", "dropout": 0.1}
    assert network_module.network_kwargs(["dropout=0.3"], 0.1) == {"dropout": "0.3"}
    assert network_module.network_kwargs(None, None) == {"dropout": None}  # kohya passes dropout=None too


# ----------------------------------------------------------------------------------------------- import


def test_unknown_module_suggests_the_nearest_of_ours():
    with pytest.raises(FlagError) as error:
        network_module.import_network_module("networks.lorra")
    assert str(error.value) == "--network_module networks.lorra: module not found; did you mean networks.lora?"


def test_missing_lycoris_says_how_to_install_it(monkeypatch):
    def missing(name):
        raise ModuleNotFoundError("No module named 'lycoris'", name="lycoris")

    monkeypatch.setattr(network_module.importlib, "import_module", missing)
    with pytest.raises(FlagError, match=r"^--network_module lycoris\.kohya: module not found; install LyCORIS with "
                                        r"`pip install lycoris-lora`$"):
        network_module.import_network_module("lycoris.kohya")


def test_module_without_create_network_is_refused():
    with pytest.raises(FlagError, match=r"^--network_module json: the module has no create_network\(\)"):
        network_module.import_network_module("json")


def test_one_encoder_is_passed_alone_two_as_a_list_and_none_stops(tiny_models):
    received = []

    def create_network(multiplier, network_dim, network_alpha, vae, text_encoder, unet, neuron_dropout=None,
                       **kwargs):
        received.append((text_encoder, neuron_dropout, kwargs))

    module = types.ModuleType("fake_network")
    module.create_network = create_network
    for family in ("sd1", "sdxl"):
        bundle = tiny_models.bundle(family)
        result = network_module.create_network(module, multiplier=1.0, network_dim=4, network_alpha=1.0,
                                               vae=bundle.vae, text_encoders=bundle.text_encoders, unet=bundle.unet,
                                               kwargs={"algo": "x", "dropout": None}, network_dropout=0.25)
        assert result is None
    (sd1_encoder, dropout, kwargs), (sdxl_encoders, _, _) = received
    assert sd1_encoder is tiny_models.bundle("sd1").text_encoders[0]
    assert sdxl_encoders == tiny_models.bundle("sdxl").text_encoders and isinstance(sdxl_encoders, list)
    assert dropout == 0.25 and kwargs == {"algo": "x", "dropout": None}


# ----------------------------------------------------------------------------------------------- param groups


def test_our_lora_groups_and_learning_rates_sd1(tiny_models):
    network = our_lora(tiny_models.bundle("sd1"))
    groups, descriptions = network_module.optimizer_param_groups(network, text_encoder_lrs=[1e-4], unet_lr=1e-3,
                                                                 learning_rate=5e-4)
    assert descriptions == ["textencoder", "unet"]
    assert [group["lr"] for group in groups] == [1e-4, 1e-3]
    assert len(groups[0]["params"]) == 2 * len(network.text_encoder_loras)  # lora_down + lora_up each
    groups, _ = network_module.optimizer_param_groups(network, text_encoder_lrs=None, unet_lr=None,
                                                      learning_rate=5e-4)
    assert [group["lr"] for group in groups] == [5e-4, 5e-4]


def test_sdxl_two_text_encoder_lrs_go_to_te1_and_te2(tiny_models):
    network = our_lora(tiny_models.bundle("sdxl"))
    groups, descriptions = network_module.optimizer_param_groups(network, text_encoder_lrs=[1e-4, 2e-4],
                                                                 unet_lr=1e-3, learning_rate=5e-4)
    assert descriptions == ["textencoder 1", "textencoder 2", "unet"]
    assert [group["lr"] for group in groups] == [1e-4, 2e-4, 1e-3]
    te1_params = {id(p) for m in network.text_encoder_loras if m.lora_name.startswith("lora_te1_")
                  for p in m.parameters()}
    assert {id(p) for p in groups[0]["params"]} == te1_params


def up_params(loras):
    return {id(module.lora_up.weight) for module in loras}


@pytest.mark.parametrize("family", ["sd1", "sdxl"])
def test_loraplus_flags_make_plus_groups_at_the_multiplied_lr(tiny_models, family):
    network = our_lora(tiny_models.bundle(family))
    network_module.apply_loraplus_flags(network, "networks.lora", loraplus_lr_ratio=16,
                                        loraplus_text_encoder_lr_ratio=4)
    groups, descriptions = network_module.optimizer_param_groups(network, text_encoder_lrs=[1e-4], unet_lr=1e-3,
                                                                 learning_rate=5e-4)
    te_labels = ["textencoder"] if family == "sd1" else ["textencoder 1", "textencoder 2"]
    assert descriptions == [f"{label}{plus}" for label in te_labels for plus in ("", " plus")] + ["unet", "unet plus"]
    lrs = dict(zip(descriptions, (group["lr"] for group in groups)))
    assert lrs[te_labels[0]] == 1e-4 and lrs[te_labels[0] + " plus"] == pytest.approx(4e-4)
    assert lrs["unet"] == 1e-3 and lrs["unet plus"] == pytest.approx(1.6e-2)
    unet_plus = {id(param) for param in groups[descriptions.index("unet plus")]["params"]}
    assert unet_plus == up_params(network.unet_loras)
    assert not unet_plus & {id(param) for param in groups[descriptions.index("unet")]["params"]}


def test_loraplus_flag_wins_over_the_same_network_arg_and_keeps_the_others(tiny_models):
    network = our_lora(tiny_models.bundle("sd1"), ["loraplus_unet_lr_ratio=8", "loraplus_lr_ratio=3"])
    network_module.apply_loraplus_flags(network, "networks.lora", loraplus_lr_ratio=2)
    groups, descriptions = network_module.optimizer_param_groups(network, text_encoder_lrs=None, unet_lr=None,
                                                                 learning_rate=1e-3)
    lrs = dict(zip(descriptions, (group["lr"] for group in groups)))
    assert lrs == {"textencoder": 1e-3, "textencoder plus": pytest.approx(2e-3), "unet": 1e-3,
                   "unet plus": pytest.approx(8e-3)}


def test_no_loraplus_flags_leave_the_groups_alone(tiny_models):
    network = our_lora(tiny_models.bundle("sd1"), ["loraplus_unet_lr_ratio=8"])
    network_module.apply_loraplus_flags(network, "networks.lora")
    _, descriptions = network_module.optimizer_param_groups(network, text_encoder_lrs=None, unet_lr=None,
                                                            learning_rate=1e-3)
    assert descriptions == ["textencoder", "unet", "unet plus"]


def test_loraplus_flags_reach_lycoris(tiny_models):
    network, _ = applied_lycoris(tiny_models, "sd1", {"preset": "attn-only"})
    network_module.apply_loraplus_flags(network, "lycoris.kohya", loraplus_unet_lr_ratio=16)
    groups, descriptions = network_module.optimizer_param_groups(network, text_encoder_lrs=None, unet_lr=1e-4,
                                                                 learning_rate=1e-3)
    assert descriptions == ["textencoder", "unet", "unet plus"]
    assert [group["lr"] for group in groups] == [1e-3, 1e-4, pytest.approx(1.6e-3)]
    assert {id(param) for param in groups[2]["params"]} == up_params(network.unet_loras)


def test_loraplus_flags_on_a_network_without_loraplus_are_refused():
    with pytest.raises(FlagError) as error:
        network_module.apply_loraplus_flags(LegacyNetwork(), "my.network", loraplus_unet_lr_ratio=16)
    assert str(error.value) == ("--loraplus_unet_lr_ratio: the network of --network_module my.network "
                                "(LegacyNetwork) has no LoRA+ support (no set_loraplus_lr_ratio); use networks.lora, "
                                "networks.dylora or lycoris.kohya, or leave the LoRA+ flags out")
    with pytest.raises(FlagError, match=r"^--loraplus_lr_ratio: expected a ratio > 0 .* got 0$"):
        network_module.apply_loraplus_flags(LegacyNetwork(), "my.network", loraplus_lr_ratio=0)


class LegacyNetwork(torch.nn.Module):
    """A network with kohya's old 2-argument prepare_optimizer_params that returns a bare list."""

    def __init__(self):
        super().__init__()
        self.text_encoder_part, self.unet_part = torch.nn.Linear(2, 3), torch.nn.Linear(3, 2)
        self.calls = []

    def prepare_optimizer_params(self, text_encoder_lr, unet_lr):
        self.calls.append((text_encoder_lr, unet_lr))
        return [{"params": self.text_encoder_part.parameters(), "lr": text_encoder_lr},
                {"params": self.unet_part.parameters()}]


def test_legacy_signature_and_bare_list_get_default_lr_and_names():
    network = LegacyNetwork()
    groups, descriptions = network_module.optimizer_param_groups(network, text_encoder_lrs=[1e-4, 2e-4],
                                                                 unet_lr=None, learning_rate=5e-4)
    assert network.calls == [(1e-4, None)]  # a scalar TE lr: the first of the list
    assert descriptions == ["group0", "group1"]
    assert [group["lr"] for group in groups] == [1e-4, 5e-4]
    assert [len(group["params"]) for group in groups] == [2, 2]  # generators turned into lists
    torch.optim.AdamW(groups)  # usable as is


# ----------------------------------------------------------------------------------------------- LyCORIS


def one_training_step(network, bundle, groups):
    """One AdamW step on a dummy loss; returns the network's state dict before it."""
    before = {key: tensor.clone() for key, tensor in network.state_dict().items()}
    optimizer = torch.optim.AdamW(groups)
    network.prepare_grad_etc(encoder_argument(bundle), bundle.unet)
    network.on_epoch_start(encoder_argument(bundle), bundle.unet)
    prediction = bundle.unet(**unet_inputs(bundle)).sample
    torch.nn.functional.mse_loss(prediction, torch.ones_like(prediction)).backward()
    optimizer.step()
    return before


@pytest.mark.parametrize("family, network_args", [
    ("sd1", ["algo=locon", "conv_dim=4", "conv_alpha=1"]),
    ("sd1", ["algo=loha"]),
    ("sdxl", ["algo=locon", "conv_dim=4", "conv_alpha=1"]),
])
def test_lycoris_trains_and_round_trips_without_a_preset(tiny_models, tmp_path, family, network_args):
    lycoris = pytest.importorskip("lycoris.kohya")
    module = network_module.import_network_module("lycoris.kohya")
    lycoris.LycorisNetworkKohya.apply_preset(lycoris.PRESET["full"])  # the default, which LyCORIS refuses as is
    bundle = fresh_copy(tiny_models, family)
    output_dir = tmp_path / "out"
    output_dir.mkdir()
    network = network_module.create_network(
        module, multiplier=1.0, network_dim=4, network_alpha=1.0, vae=bundle.vae,
        text_encoders=bundle.text_encoders, unet=bundle.unet,
        kwargs=network_module.network_kwargs(network_args, None), output_dir=output_dir)
    assert list(output_dir.iterdir()) == []  # the preset toml was temporary
    assert network.unet_loras and network.text_encoder_loras
    network.apply_to(encoder_argument(bundle), bundle.unet, True, True)
    groups, descriptions = network_module.optimizer_param_groups(network, text_encoder_lrs=[1e-3, 2e-3],
                                                                 unet_lr=1e-3, learning_rate=5e-4)
    assert descriptions == ["textencoder", "unet"] and [group["lr"] for group in groups] == [1e-3, 1e-3]
    before = one_training_step(network, bundle, groups)
    after = network.state_dict()
    assert any(not torch.equal(after[key], before[key]) for key in after if "unet" in key)

    path = tmp_path / "lycoris.safetensors"
    network.save_weights(str(path), None, {})
    lycoris.LycorisNetworkKohya.apply_preset(lycoris.PRESET["full"])  # as in a fresh process
    # building from a file only reads the model's module names, so the trained copy serves (nothing is applied)
    rebuilt, _ = network_module.create_network_from_weights(module, 1.0, path, bundle.vae, bundle.text_encoders,
                                                            bundle.unet)
    file_tensors = load_file(path)
    rebuilt_tensors = {f"{part.lora_name}.{key}": tensor for part in rebuilt.text_encoder_loras + rebuilt.unet_loras
                       for key, tensor in part.state_dict().items()}
    assert set(rebuilt_tensors) == set(file_tensors) == set(after)
    assert all(torch.equal(rebuilt_tensors[key], file_tensors[key]) for key in file_tensors)


GUI_PRESETS = ("full", "full-lin", "attn-mlp", "attn-only", "unet-transformer-only", "unet-convblock-only")
SGM_UNET_STEMS = ("lora_unet_input_blocks_", "lora_unet_middle_block_", "lora_unet_output_blocks_")


def kohya_lora_names(bundle, network_args):
    """The U-Net and text-encoder names our networks.lora gives (kohya's names, COMPAT §1.5)."""
    network = our_lora(bundle, network_args)
    return ({m.lora_name for m in network.unet_loras}, {m.lora_name for m in network.text_encoder_loras})


@pytest.mark.parametrize("family", ["sd1", "sdxl"])
@pytest.mark.parametrize("preset", GUI_PRESETS)
def test_every_gui_preset_trains_with_kohya_names_and_loads_in_the_generator(tiny_models, tmp_path, family, preset):
    from library.generation.networks import NetworkSpec, load_networks

    # what the kohya_ss GUI writes for a LyCORIS/LoCon run
    network, bundle = applied_lycoris(tiny_models, family, network_module.network_kwargs(
        [f"preset={preset}", "algo=locon", "conv_dim=4", "conv_alpha=1"], None))
    groups, _ = network_module.optimizer_param_groups(network, text_encoder_lrs=None, unet_lr=None,
                                                      learning_rate=1e-2)
    before = one_training_step(network, bundle, groups)
    assert any(not torch.equal(tensor, before[key]) for key, tensor in network.state_dict().items())
    path = tmp_path / f"{preset}.safetensors"
    network.save_weights(str(path), None, {})

    names = [part.lora_name for part in network.text_encoder_loras + network.unet_loras]
    assert len(names) == len(set(names)) and network.unet_loras
    unet_names = {name for name in names if name.startswith("lora_unet_")}
    text_names = set(names) - unet_names
    file_names = {key.split(".")[0] for key in load_file(path)}
    assert file_names == set(names)
    kohya_unet, kohya_text = kohya_lora_names(bundle, ["conv_dim=4"])
    # the layers kohya's U-Net has under the preset's classes, by kohya's names; SD1 adds kohya's conv_in,
    # conv_out and time_embedding, which SDXL's SGM U-Net does not have under those names
    extra = {"lora_unet_conv_in", "lora_unet_conv_out", "lora_unet_time_embedding_linear_1",
             "lora_unet_time_embedding_linear_2"} if family == "sd1" else set()
    assert unet_names <= kohya_unet | extra
    assert text_names <= kohya_text
    if family == "sdxl":
        assert all(name.startswith(SGM_UNET_STEMS) for name in unet_names)
        assert all(name.startswith(("lora_te1_text_model_", "lora_te2_text_model_")) for name in text_names)
    else:
        assert all(name.startswith("lora_te_text_model_") for name in text_names)
    if preset == "full":  # every U-Net layer kohya's LoRA with conv_dim wraps, by the same names
        assert unet_names == kohya_unet | extra and text_names == kohya_text

    # the generator's loader puts every tensor of the file back (and, checked once, changes the U-Net's output)
    target = fresh_copy(tiny_models, family)
    baseline = target.unet(**unet_inputs(target)).sample if preset == "full" else None
    applied = load_networks([NetworkSpec("lycoris.kohya", path, 1.0)], family=target.family,
                            text_encoders=target.text_encoders, vae=target.vae, unet=target.unet, merge=False,
                            device=torch.device("cpu"), dtype=torch.float32)
    loaded = applied.networks[0].state_dict()
    file_tensors = load_file(path)
    assert set(loaded) == set(file_tensors)
    assert all(torch.equal(loaded[key], file_tensors[key]) for key in file_tensors)
    if baseline is not None:
        assert not torch.allclose(target.unet(**unet_inputs(target)).sample, baseline)


def test_lycoris_file_with_our_old_diffusers_names_loads_under_kohya_names(tiny_models, tmp_path):
    network, bundle = applied_lycoris(tiny_models, "sdxl", {"preset": "attn-mlp"})
    module = network_module.import_network_module("lycoris.kohya")
    kohya_file = tmp_path / "kohya.safetensors"
    network.save_weights(str(kohya_file), None, {})
    kohya_tensors = load_file(kohya_file)
    # the names earlier versions wrote: diffusers U-Net paths, CLIP paths without text_model_
    old_names = {new: old for old, new in network_module.lycoris_presets.name_aliases(bundle.text_encoders,
                                                                                      bundle.unet).items()}
    old_tensors = {f"{old_names.get(k.split('.')[0], k.split('.')[0])}.{k.split('.', 1)[1]}": v
                   for k, v in kohya_tensors.items()}
    assert any(key.startswith("lora_unet_down_blocks_") for key in old_tensors)
    old_file = tmp_path / "old.safetensors"
    save_file(old_tensors, old_file)
    rebuilt, weights = network_module.create_network_from_weights(module, 1.0, old_file, bundle.vae,
                                                                  bundle.text_encoders, bundle.unet)
    assert set(weights) == set(kohya_tensors)
    assert {m.lora_name for m in rebuilt.unet_loras + rebuilt.text_encoder_loras} == {
        key.split(".")[0] for key in kohya_tensors}


def test_lycoris_preset_errors_name_the_preset(tiny_models, tmp_path):
    pytest.importorskip("lycoris.kohya")
    module = network_module.import_network_module("lycoris.kohya")
    bundle = fresh_copy(tiny_models, "sd1")
    create = {"multiplier": 1.0, "network_dim": 4, "network_alpha": 1.0, "vae": bundle.vae,
              "text_encoders": bundle.text_encoders, "unet": bundle.unet}
    twice = tmp_path / "twice.toml"  # kohya's CrossAttention sits inside Transformer2DModel: every layer twice
    twice.write_text('unet_target_module = ["Transformer2DModel", "CrossAttention"]\n', encoding="utf-8")
    with pytest.raises(FlagError, match=rf"^--network_args preset={re.escape(str(twice))}: duplicated lora name: "
                                        r"lora_unet_down_blocks_0_attentions_0_transformer_blocks_0_attn1_to_q; "
                                        r"this LyCORIS preset targets one layer twice"):
        network_module.create_network(module, kwargs={"preset": str(twice)}, **create)
    with pytest.raises(FlagError, match=r"^--network_args preset=fulll: expected a LyCORIS preset name .* or a "
                                        r"preset \.toml file, got neither; did you mean full\?$"):
        network_module.create_network(module, kwargs={"preset": "fulll"}, **create)


def test_full_preset_loses_only_the_names_its_classes_cover(tiny_models):
    lycoris = pytest.importorskip("lycoris.kohya")
    before = copy.deepcopy(lycoris.PRESET)
    from library.train import lycoris_presets

    view = lycoris_presets.kohya_unet_view(tiny_models.bundle("sd1").unet)
    preset = lycoris_presets.preset_for_unet(lycoris, "full", view)
    assert "time_embedding.linear_1" not in preset["unet_target_name"] and "conv_in" in preset["unet_target_name"]
    assert lycoris.PRESET == before


# ----------------------------------------------------------------------------------------------- family check


def test_lora_for_another_family_is_refused_naming_flag_and_file(tiny_models, tmp_path):
    sd1_file = saved_lora(tiny_models, "sd1", tmp_path / "sd1_lora.safetensors")
    sdxl_file = saved_lora(tiny_models, "sdxl", tmp_path / "sdxl_lora.pt")
    with pytest.raises(FlagError) as error:
        network_module.check_network_weights_family(sd1_file, "sdxl")
    assert str(error.value) == (f"--network_weights {sd1_file}: expected a network for SDXL, got one for "
                                "SD1.x/SD2.x (lora_te_* keys); use a file trained on an SDXL model")
    with pytest.raises(FlagError) as error:
        network_module.check_network_weights_family(sdxl_file, "sd1", flag="--base_weights")
    assert str(error.value) == (f"--base_weights {sdxl_file}: expected a network for SD1.x, got one for SDXL "
                                "(lora_te1_*/lora_te2_* keys); use a file trained on an SD1.x model")
    assert network_module.check_network_weights_family(sdxl_file, "sdxl") == "sdxl"
    assert network_module.check_network_weights_family(sd1_file, "sd1") is None  # SD1 or SD2: tiny widths tell none


def test_an_lllite_file_as_network_weights_is_named_before_models_load(tmp_path):
    from safetensors.torch import save_file

    from networks.lora_file import read_lora

    path = tmp_path / "canny_lllite.safetensors"
    save_file({"lllite_unet_input_blocks_4_1_transformer_blocks_0_attn1_to_q.down.0.weight": torch.zeros(2, 2)},
              str(path))
    with pytest.raises(FlagError, match="is a ControlNet-LLLite file, not a LoRA; the generators take it as "
                                        "--control_net_lllite_models"):
        network_module.check_network_weights_family(path, "sdxl")
    with pytest.raises(Exception, match="is a ControlNet-LLLite file, not a LoRA"):
        read_lora(path)


def unet_only_file(path, unet_name, context_width):
    """A U-Net-only LoRA with one cross-attention key projection of a real model's text width."""
    save_file({f"{unet_name}.lora_down.weight": torch.zeros(1, context_width),
               f"{unet_name}.lora_up.weight": torch.zeros(4, 1), f"{unet_name}.alpha": torch.tensor(1.0)}, path)
    return path


def test_prefixes_undecided_the_real_text_width_decides(tmp_path):
    diffusers_name = "lora_unet_down_blocks_1_attentions_0_transformer_blocks_0_attn2_to_k"
    sdxl_file = unet_only_file(tmp_path / "sdxl_diffusers.safetensors", diffusers_name, 2048)
    with pytest.raises(FlagError, match=r"expected a network for SD1\.x, got one for SDXL \(cross-attention width "
                                        r"2048\)"):
        network_module.check_network_weights_family(sdxl_file, "sd1")
    assert network_module.check_network_weights_family(sdxl_file, "sdxl") == "sdxl"
    sd2_file = unet_only_file(tmp_path / "sd2.safetensors", diffusers_name, 1024)
    with pytest.raises(FlagError, match=r"expected a network for SD1\.x, got one for SD2\.x"):
        network_module.check_network_weights_family(sd2_file, "sd1-v")
    assert network_module.check_network_weights_family(sd2_file, "sd2-v") == "sd2"
    sgm_file = unet_only_file(tmp_path / "sgm.safetensors",
                              "lora_unet_input_blocks_4_1_transformer_blocks_0_attn2_to_k", 32)
    with pytest.raises(FlagError, match=r"got one for SDXL \(SGM U-Net names"):
        network_module.check_network_weights_family(sgm_file, "sd2")
    dylora_sdxl = tmp_path / "dylora_sdxl.safetensors"  # kohya's SDXL DyLoRA: lora_te_ with SGM U-Net names
    save_file({**load_file(unet_only_file(tmp_path / "sgm_2048.safetensors",
                                          "lora_unet_input_blocks_4_1_transformer_blocks_0_attn2_to_k", 2048)),
               "lora_te_text_model_encoder_layers_0_mlp_fc1.lora_down.weight": torch.zeros(1, 768)}, dylora_sdxl)
    assert network_module.check_network_weights_family(dylora_sdxl, "sdxl") == "sdxl"
    with pytest.raises(FlagError, match=r"got one for SDXL \(cross-attention width 2048\)"):
        network_module.check_network_weights_family(dylora_sdxl, "sd1")


def test_missing_weights_file_names_the_flag(tmp_path):
    missing = tmp_path / "nope.safetensors"
    with pytest.raises(FlagError, match=rf"^--dim_from_weights {missing}: file not found$"):
        network_module.check_network_weights_family(missing, "sd1", flag="--dim_from_weights")


# ----------------------------------------------------------------------------------------------- base weights


def test_base_weights_add_exactly_the_merged_delta(tiny_models, tmp_path):
    path = saved_lora(tiny_models, "sd1", tmp_path / "base.safetensors")
    bundle = fresh_copy(tiny_models, "sd1")
    reference, weights = lora.create_network_from_weights(1.0, str(path), bundle.vae, bundle.text_encoders[0],
                                                          bundle.unet)
    expected = {}
    for module in reference.text_encoder_loras + reference.unet_loras:
        weight = module.original_module.weight
        down, up = weights[f"{module.lora_name}.lora_down.weight"], weights[f"{module.lora_name}.lora_up.weight"]
        scale = float(weights[f"{module.lora_name}.alpha"]) / down.shape[0]
        expected[id(weight)] = weight.detach() + 0.5 * lora.lora_weight_delta(down, up, scale).reshape(weight.shape)
    models = (bundle.unet, *bundle.text_encoders)
    before = {(index, name): p.detach().clone() for index, model in enumerate(models)
              for name, p in model.named_parameters()}
    network_module.apply_base_weights("networks.lora", [str(path)], [0.5], bundle.vae, bundle.text_encoders,
                                      bundle.unet, torch.float32, "cpu")
    changed = 0
    for index, model in enumerate(models):
        for name, parameter in model.named_parameters():
            if id(parameter) in expected:
                torch.testing.assert_close(parameter.detach(), expected[id(parameter)], atol=1e-6, rtol=0)
                changed += not torch.equal(parameter.detach(), before[(index, name)])
            else:
                assert torch.equal(parameter.detach(), before[(index, name)]), name
    assert changed == len(expected) > 0


def test_base_weights_multiplier_count_must_match(tiny_models, tmp_path):
    bundle = tiny_models.bundle("sd1")
    with pytest.raises(FlagError) as error:
        network_module.apply_base_weights("networks.lora", ["a.safetensors", "b.safetensors"], [0.5], bundle.vae,
                                          bundle.text_encoders, bundle.unet, torch.float32, "cpu")
    assert str(error.value) == ("--base_weights_multiplier: expected one value per --base_weights file (2), got 1")
    with pytest.raises(FlagError, match=r"^--base_weights .*missing\.safetensors: file not found$"):
        network_module.apply_base_weights("networks.lora", [str(tmp_path / "missing.safetensors")], None,
                                          bundle.vae, bundle.text_encoders, bundle.unet, torch.float32, "cpu")


# ----------------------------------------------------------------------------------------------- network facts


def test_describe_network_counts_modules_and_parameters():
    network = torch.nn.Module()
    network.text_encoder_loras = [torch.nn.Linear(2, 3, bias=False)]
    network.unet_loras = [torch.nn.Linear(2, 3, bias=False), torch.nn.Linear(3, 2, bias=False)]
    for index, layer in enumerate(network.text_encoder_loras + network.unet_loras):
        network.add_module(f"layer{index}", layer)
    assert network_module.describe_network(network) == (
        "network Module: 1 text-encoder modules, 2 U-Net modules, 18 trainable parameters")


def test_max_norm_support_warns_once_per_network_type(tiny_models, caplog):
    assert network_module.max_norm_supported(our_lora(tiny_models.bundle("sd1")))
    with caplog.at_level(logging.WARNING, logger=network_module.__name__):
        assert not network_module.max_norm_supported(LegacyNetwork())
        assert not network_module.max_norm_supported(LegacyNetwork())
    assert caplog.text.count("LegacyNetwork has no apply_max_norm_regularization()") == 1
