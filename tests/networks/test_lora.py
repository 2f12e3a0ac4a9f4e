"""LoRA behaviour on tiny models: zero init, merge == dynamic forward, save/load, LR groups, args, dropout, max norm."""
from __future__ import annotations

import copy
import hashlib
import logging

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import save_file

from library.errors import FlagError, ModelFormatError
from networks import lora, naming


def text_encoder_arg(bundle):
    return bundle.text_encoders if len(bundle.text_encoders) > 1 else bundle.text_encoders[0]


def fresh_copy(tiny_models, family, dtype=torch.float32):
    """A private copy of the session's tiny model (applying a LoRA patches it)."""
    return copy.deepcopy(tiny_models.bundle(family)).to(dtype=dtype)


def make_network(bundle, dim=4, alpha=2.0, **network_args):
    return lora.create_network(1.0, dim, alpha, bundle.vae, text_encoder_arg(bundle), bundle.unet, **network_args)


def randomize_up_weights(network, seed=1):
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for lora_module in network.text_encoder_loras + network.unet_loras:
            weight = lora_module.lora_up.weight
            weight.copy_(torch.randn(weight.shape, generator=generator, dtype=weight.dtype) * 0.1)


def model_outputs(bundle) -> list[torch.Tensor]:
    """UNet noise prediction and the text encoders' last hidden states on fixed random inputs."""
    generator = torch.Generator().manual_seed(0)
    dtype = bundle.unet.dtype
    config = bundle.unet.config
    sample = torch.randn(1, 4, 8, 8, generator=generator).to(dtype)
    context = torch.randn(1, 5, config.cross_attention_dim, generator=generator).to(dtype)
    extra = {}
    if config.addition_embed_type == "text_time":
        pooled_dim = config.projection_class_embeddings_input_dim - 6 * config.addition_time_embed_dim
        extra["added_cond_kwargs"] = {"text_embeds": torch.randn(1, pooled_dim, generator=generator).to(dtype),
                                      "time_ids": torch.tensor([[64.0, 64, 0, 0, 64, 64]], dtype=dtype)}
    ids = torch.randint(0, 49406, (1, 8), generator=generator)
    with torch.no_grad():
        outputs = [bundle.unet(sample, torch.tensor([500]), context, **extra).sample]
        outputs += [encoder(ids).last_hidden_state for encoder in bundle.text_encoders]
    return outputs


def assert_outputs_close(actual, expected, atol):
    for got, want in zip(actual, expected):
        torch.testing.assert_close(got, want, atol=atol, rtol=0)


def outputs_differ(actual, expected) -> bool:
    return all(not torch.allclose(got, want) for got, want in zip(actual, expected))


@pytest.mark.parametrize("family", ["sd1", "sdxl"])
def test_zero_initialised_up_keeps_the_model_output(tiny_models, family):
    bundle = fresh_copy(tiny_models, family)
    base = model_outputs(bundle)
    network = make_network(bundle, conv_dim="2")
    network.apply_to(text_encoder_arg(bundle), bundle.unet)
    assert all(not module.lora_up.weight.detach().any() for module in network.unet_loras)
    assert_outputs_close(model_outputs(bundle), base, atol=0)
    randomize_up_weights(network)
    assert outputs_differ(model_outputs(bundle), base)
    network.set_multiplier(0.0)
    assert_outputs_close(model_outputs(bundle), base, atol=0)
    network.set_multiplier(1.0)
    for module in network.text_encoder_loras + network.unet_loras:
        module.restore()
    assert_outputs_close(model_outputs(bundle), base, atol=0)


@pytest.mark.parametrize("family, network_args", [("sd1", {"conv_dim": "3", "conv_alpha": "1.5"}),
                                                  ("sd2-v", {}), ("sdxl", {"conv_dim": "2"})])
def test_merge_to_equals_dynamic_forward(tiny_models, tmp_path, family, network_args):
    dynamic = fresh_copy(tiny_models, family, torch.float64)
    network = make_network(dynamic, **network_args).to(torch.float64)
    network.apply_to(text_encoder_arg(dynamic), dynamic.unet)
    randomize_up_weights(network)
    network.set_multiplier(0.7)
    expected = model_outputs(dynamic)
    path = tmp_path / "trained.safetensors"
    network.save_weights(path, None, {})
    merged = fresh_copy(tiny_models, family, torch.float64)
    inference, weights = lora.create_network_from_weights(0.7, str(path), merged.vae, text_encoder_arg(merged),
                                                          merged.unet, for_inference=True)
    inference.merge_to(text_encoder_arg(merged), merged.unet, weights, torch.float64, "cpu")
    assert_outputs_close(model_outputs(merged), expected, atol=1e-10)


@pytest.mark.parametrize("suffix", [".safetensors", ".pt"])
def test_save_then_load_reproduces_outputs(tiny_models, tmp_path, suffix):
    trained = fresh_copy(tiny_models, "sd2-v")
    network = make_network(trained, dim=3, alpha=1.0)
    network.apply_to(trained.text_encoders[0], trained.unet)
    randomize_up_weights(network)
    expected = model_outputs(trained)
    path = tmp_path / f"lora{suffix}"
    network.save_weights(path, None, {"ss_network_dim": "3"})
    assert sorted(p.name for p in tmp_path.iterdir()) == [path.name]  # no temp file left behind

    reloaded = fresh_copy(tiny_models, "sd2-v")
    same_args = make_network(reloaded, dim=3, alpha=1.0)
    same_args.apply_to(reloaded.text_encoders[0], reloaded.unet)
    info = same_args.load_weights(path)
    assert info.missing_keys == [] and info.unexpected_keys == []
    assert_outputs_close(model_outputs(reloaded), expected, atol=1e-6)

    from_file = fresh_copy(tiny_models, "sd2-v")
    rebuilt, _ = lora.create_network_from_weights(1.0, str(path), from_file.vae, from_file.text_encoders[0],
                                                  from_file.unet)
    rebuilt.apply_to(from_file.text_encoders[0], from_file.unet)
    rebuilt.load_weights(path)
    assert_outputs_close(model_outputs(from_file), expected, atol=1e-6)


def test_network_weights_with_another_alpha_use_the_file_alpha(tiny_models, tmp_path):
    trained = fresh_copy(tiny_models, "sd1")
    network = make_network(trained, alpha=4.0)
    network.apply_to(trained.text_encoders[0], trained.unet)
    randomize_up_weights(network)
    expected = model_outputs(trained)
    network.save_weights(tmp_path / "a.safetensors", None, None)
    other = fresh_copy(tiny_models, "sd1")
    created_with_alpha_1 = make_network(other, alpha=1.0)
    created_with_alpha_1.apply_to(other.text_encoders[0], other.unet)
    created_with_alpha_1.load_weights(tmp_path / "a.safetensors")
    assert created_with_alpha_1.unet_loras[0].scale == 1.0  # 4 / 4
    assert_outputs_close(model_outputs(other), expected, atol=1e-6)


def test_metadata_is_stored_as_given_plus_kohya_hashes(tiny_models, tmp_path):
    path = tmp_path / "lora.safetensors"
    metadata = {"ss_network_dim": "4", "modelspec.title": "demo"}
    make_network(tiny_models.bundle("sd1")).save_weights(path, torch.float16, metadata)
    with safe_open(str(path), framework="pt") as handle:
        stored = handle.metadata()
    assert metadata == {"ss_network_dim": "4", "modelspec.title": "demo"}  # the caller's dict is not changed
    assert {key: stored[key] for key in metadata} == metadata
    raw = path.read_bytes()
    header_length = int.from_bytes(raw[:8], "little")
    assert stored["sshs_model_hash"] == hashlib.sha256(raw[8 + header_length:]).hexdigest()
    assert stored["sshs_legacy_hash"] == hashlib.sha256(b"").hexdigest()[:8]  # file smaller than 1 MiB


def test_only_lora_parameters_are_trained(tiny_models):
    bundle = fresh_copy(tiny_models, "sd1")
    network = make_network(bundle)
    network.apply_to(bundle.text_encoders[0], bundle.unet)
    network.prepare_grad_etc(bundle.text_encoders[0], bundle.unet)
    groups, descriptions = network.prepare_optimizer_params(1e-5, 1e-4, 1e-3)
    assert descriptions == ["textencoder", "unet"]
    assert [group["lr"] for group in groups] == [1e-5, 1e-4]
    grouped = {id(p) for group in groups for p in group["params"]}
    assert grouped == {id(p) for p in network.parameters()} == {id(p) for p in network.get_trainable_params()}
    assert all(p.requires_grad for p in network.parameters())
    assert not any(p.requires_grad for model in bundle.models() for p in model.parameters())
    assert len(groups[0]["params"]) == 2 * len(network.text_encoder_loras)


def test_sdxl_two_text_encoder_lrs_and_loraplus(tiny_models):
    bundle = tiny_models.bundle("sdxl")
    network = make_network(bundle, loraplus_lr_ratio="16", loraplus_text_encoder_lr_ratio="4")
    groups, descriptions = network.prepare_optimizer_params([1e-5, 2e-5], 1e-4, 1e-3)
    assert descriptions == ["textencoder 1", "textencoder 1 plus", "textencoder 2", "textencoder 2 plus",
                            "unet", "unet plus"]
    assert [group["lr"] for group in groups] == pytest.approx([1e-5, 4e-5, 2e-5, 8e-5, 1e-4, 1.6e-3])
    up_weights = {id(m.lora_up.weight) for m in network.unet_loras}
    assert {id(p) for p in groups[5]["params"]} == up_weights
    single_lr, _ = network.prepare_optimizer_params([3e-5], None, 1e-3)
    assert [group["lr"] for group in single_lr] == pytest.approx([3e-5, 1.2e-4, 3e-5, 1.2e-4, 1e-3, 1.6e-2])


def test_block_lr_weights_make_block_groups_and_drop_zero_blocks(tiny_models):
    bundle = tiny_models.bundle("sd1")
    up = ["1"] * 12
    up[11] = "0"  # up_blocks_3 layer 2 -> slot 24
    network = make_network(bundle, down_lr_weight="zeros+0.5", mid_lr_weight="2", up_lr_weight=",".join(up))
    names = {m.lora_name for m in network.unet_loras}
    assert not any(name.startswith("lora_unet_up_blocks_3_attentions_2") for name in names)
    assert "lora_unet_up_blocks_3_attentions_1_proj_in" in names
    groups, descriptions = network.prepare_optimizer_params(None, 1e-4, 1e-3)
    lrs = dict(zip(descriptions, (group["lr"] for group in groups)))
    assert lrs["textencoder"] == 1e-3  # default_lr when no text-encoder lr is given
    assert lrs["unet_block1"] == pytest.approx(5e-5) and lrs["unet_block12"] == pytest.approx(2e-4)
    assert lrs["unet_block23"] == pytest.approx(1e-4) and "unet_block24" not in lrs


def test_sdxl_lr_weight_preset_is_padded_to_23_slots(tiny_models):
    network = make_network(tiny_models.bundle("sdxl"), down_lr_weight="linear", up_lr_weight="reverse_linear")
    assert len(network.block_lr_weight) == 23
    assert network.block_lr_weight[:3] == [1.0, 0.0, 0.125] and network.block_lr_weight[-2:] == [0.0, 1.0]
    assert "lora_unet_input_blocks_4_1_proj_in" in {m.lora_name for m in network.unet_loras}


@pytest.mark.parametrize("network_args, message", [
    ({"conv_dim": "x"}, "--network_args conv_dim: expected an integer, got 'x'"),
    ({"rank_dropout": "1.5"}, "--network_args rank_dropout: expected a number in [0, 1), got '1.5'"),
    ({"down_lr_weight": "sinus"}, ("--network_args down_lr_weight: expected a comma list of numbers or a "
                                   "preset[+base], got 'sinus'; did you mean sine?")),
    ({"loraplus_lr_ratio": "abc"}, "--network_args loraplus_lr_ratio: expected a number, got 'abc'"),
])
def test_network_args_errors_name_the_key(tiny_models, network_args, message):
    with pytest.raises(FlagError) as error:
        make_network(tiny_models.bundle("sd1"), **network_args)
    assert str(error.value) == message


def test_unknown_network_arg_warns_with_nearest(tiny_models, caplog):
    with caplog.at_level(logging.WARNING, logger="networks.lora"):
        make_network(tiny_models.bundle("sd1"), conv_dims="4")
    assert "--network_args conv_dims: not an option of networks.lora, ignored; did you mean conv_dim?" in caplog.text


def test_dropouts_act_only_in_training():
    torch.manual_seed(0)
    layer = torch.nn.Linear(16, 16)
    plain = lora.LoRAModule("lora_te_x", layer, lora_dim=8, alpha=8)
    plain.apply_to()
    torch.nn.init.normal_(plain.lora_up.weight)
    x = torch.randn(4, 3, 16)
    expected = layer(x).detach()
    for kwargs in ({"dropout": 0.5}, {"rank_dropout": 0.5}, {"module_dropout": 0.5}):
        plain.dropout = plain.rank_dropout = plain.module_dropout = None
        for key, value in kwargs.items():
            setattr(plain, key, value)
        plain.eval()
        torch.testing.assert_close(layer(x), expected, atol=0, rtol=0)
        plain.train()
        assert any(not torch.allclose(layer(x), expected) for _ in range(8)), kwargs


def test_rank_dropout_rescales_kept_ranks():
    """Each draw keeps a subset of ranks and doubles what is kept (scale × 1/(1-p) with p = 0.5, COMPAT §1.6)."""
    layer = torch.nn.Linear(4, 4, bias=False)
    module = lora.LoRAModule("lora_te_x", layer, lora_dim=2, alpha=1, rank_dropout=0.5)
    module.apply_to()
    torch.nn.init.ones_(module.lora_up.weight)
    x = torch.randn(1, 4)
    per_rank = (x @ module.lora_down.weight.T).detach()[0] * module.scale  # each rank's contribution
    allowed = [torch.zeros(4), torch.full((4,), 2 * per_rank[0]), torch.full((4,), 2 * per_rank[1]),
               torch.full((4,), 2 * per_rank.sum())]
    module.train()
    torch.manual_seed(0)
    seen = set()
    for _ in range(40):
        delta = (module(x) - layer.weight @ x[0]).detach()[0]
        matches = [index for index, value in enumerate(allowed) if torch.allclose(delta, value, atol=1e-6)]
        assert len(matches) == 1
        seen.add(matches[0])
    assert seen == {0, 1, 2, 3}


def test_max_norm_regularization_scales_a_large_pair(tiny_models):
    network = make_network(tiny_models.bundle("sd1"))
    target = network.unet_loras[0]
    with torch.no_grad():
        target.lora_up.weight.fill_(1.0)
    before = lora.lora_weight_delta(target.lora_down.weight, target.lora_up.weight, target.scale).norm().item()
    assert before > 1.0
    scaled, mean_norm, max_norm = network.apply_max_norm_regularization(1.0, "cpu")
    after = lora.lora_weight_delta(target.lora_down.weight, target.lora_up.weight, target.scale).norm().item()
    count = len(network.unet_loras) + len(network.text_encoder_loras)
    assert scaled == 1
    assert after == pytest.approx(1.0, rel=1e-5) and max_norm == pytest.approx(1.0, rel=1e-5)
    assert mean_norm == pytest.approx(1.0 / count, rel=1e-5)


def test_lora_for_another_family_is_refused_naming_the_file(tiny_models, tmp_path):
    sd1_file = tmp_path / "sd1_lora.safetensors"
    make_network(tiny_models.bundle("sd1")).save_weights(sd1_file, None, None)
    sdxl = tiny_models.bundle("sdxl")
    with pytest.raises(ModelFormatError) as error:
        lora.create_network_from_weights(1.0, str(sd1_file), sdxl.vae, sdxl.text_encoders, sdxl.unet)
    message = str(error.value)
    assert message.startswith(f"{sd1_file}: ") and "match no module of this sdxl model" in message
    assert "lora_te_* keys (an SD1/SD2 LoRA)" in message
    with pytest.raises(ModelFormatError, match=r"sd1_lora.safetensors: .*is the LoRA for another model family"):
        make_network(sdxl).load_weights(sd1_file)
    sd2_file = tmp_path / "sd2_lora.safetensors"  # same names as SD1 (the tiny SD2 has fewer TE layers), wider
    make_network(tiny_models.bundle("sd2-v")).save_weights(sd2_file, None, None)
    sd1 = tiny_models.bundle("sd1")
    with pytest.raises(ModelFormatError) as error:
        lora.create_network_from_weights(1.0, str(sd2_file), sd1.vae, sd1.text_encoders[0], sd1.unet)
    assert str(error.value) == (f"{sd2_file}: lora_te_text_model_encoder_layers_0_mlp_fc1.lora_down.weight "
                                "has shape [4, 64] but this sd1/sd2 model needs [4, 32]; is the LoRA for another "
                                "model family?")


def test_not_a_lora_file(tiny_models, tmp_path):
    path = tmp_path / "loha.safetensors"
    save_file({"lora_unet_x.hada_w1_a": torch.zeros(2, 2)}, str(path))
    sd1 = tiny_models.bundle("sd1")
    with pytest.raises(ModelFormatError, match="loha.safetensors: no \\*.lora_down.weight tensors"):
        lora.create_network_from_weights(1.0, str(path), sd1.vae, sd1.text_encoders[0], sd1.unet)


def test_reader_accepts_old_and_foreign_layouts(tiny_models, tmp_path):
    """No `.alpha` (alpha = rank), 2-D SD2 projections, and diffusers-named SDXL keys all load."""
    sd2 = tiny_models.bundle("sd2-v")
    state_dict = make_network(sd2, dim=2).file_state_dict()
    old = {k: v.flatten(1) if v.dim() == 4 else v for k, v in state_dict.items() if not k.endswith(".alpha")}
    network, _ = lora.create_network_from_weights(1.0, None, sd2.vae, sd2.text_encoders[0], sd2.unet, old)
    assert {m.scale for m in network.unet_loras} == {1.0}
    assert network.to_model_layout(old, "old")["lora_unet_mid_block_attentions_0_proj_in.lora_down.weight"].dim() == 2

    sdxl = tiny_models.bundle("sdxl")
    sgm_names = make_network(sdxl).file_state_dict()
    to_diffusers = {sgm: diffusers for diffusers, sgm in naming.diffusers_unet_name_aliases(sdxl.unet,
                                                                                            naming.SDXL_SCHEME).items()}
    diffusers_named = {}
    for key, tensor in sgm_names.items():
        name, tensor_name = naming.split_lora_key(key)
        diffusers_named[f"{to_diffusers.get(name, name)}.{tensor_name}"] = tensor
    assert "lora_unet_down_blocks_1_attentions_0_proj_in.alpha" in diffusers_named
    network, _ = lora.create_network_from_weights(1.0, None, sdxl.vae, sdxl.text_encoders, sdxl.unet, diffusers_named)
    assert {m.lora_name for m in network.unet_loras} == {naming.split_lora_key(k)[0] for k in sgm_names
                                                         if k.startswith("lora_unet")}


def test_train_unet_only_writes_only_unet_keys(tiny_models, tmp_path):
    bundle = fresh_copy(tiny_models, "sdxl")
    network = make_network(bundle)
    network.apply_to(bundle.text_encoders, bundle.unet, apply_text_encoder=False, apply_unet=True)
    assert all(key.startswith("lora_unet_") for key in network.file_state_dict())
    _, descriptions = network.prepare_optimizer_params([1e-5, 1e-5], 1e-4, 1e-4)
    assert descriptions == ["unet"]
