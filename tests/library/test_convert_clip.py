"""Text-encoder conversion (transformers <-> CLIP-L / OpenCLIP single-file layouts), checked against diffusers.

The external oracle is diffusers' own single-file loader (`convert_ldm_clip_checkpoint`,
`convert_open_clip_checkpoint`): applied to our output it must reproduce the model's weights exactly.
"""
from __future__ import annotations

import math

import pytest
import torch

from library.errors import ModelFormatError
from library.families import FAMILIES
from library.models import convert_clip as cc
from library.models.reference_configs import CLIP_L_TEXT, OPEN_CLIP_BIGG_TEXT, OPEN_CLIP_H_TEXT
from library.models.tiny import tiny_text_config

# (family, text encoder index) of every tiny text encoder.
CASES = [("sd1", 0), ("sd2-v", 0), ("sdxl", 0), ("sdxl", 1)]
CASE_IDS = ["sd1", "sd2", "sdxl-te1", "sdxl-te2"]


def _spec(family: str, index: int):
    return FAMILIES[family].text_encoders[index]


def _model_class(spec):
    from transformers import CLIPTextModel, CLIPTextModelWithProjection

    return CLIPTextModelWithProjection if spec.with_projection else CLIPTextModel


def _to_ldm(spec, state_dict, config):
    if spec.kind == "clip_l":
        return cc.clip_l_to_ldm(state_dict, config)
    return cc.open_clip_to_ldm(state_dict, config, drop_last_layer=spec.drop_last_layer)


def _from_ldm(spec, ldm, model):
    if spec.kind == "clip_l":
        return cc.clip_l_from_ldm(ldm, model)
    return cc.open_clip_from_ldm(ldm, model, drop_last_layer=spec.drop_last_layer)


def _fresh_model(spec, ldm):
    """A new model of the architecture derived from the single-file shapes, loaded with the converted weights."""
    model = _model_class(spec)(cc.text_config_from_ldm(ldm, spec)).eval()
    weights, _ = _from_ldm(spec, ldm, model)
    model.load_state_dict(weights, strict=True)
    return model


@pytest.fixture(scope="module")
def encoders(tiny_models):
    """(family, index) -> (spec, tiny model, its single-file state dict)."""
    result = {}
    for family, index in CASES:
        spec = _spec(family, index)
        model = tiny_models.bundle(family).text_encoders[index]
        result[(family, index)] = (spec, model, _to_ldm(spec, model.state_dict(), model.config))
    return result


@pytest.fixture(scope="module")
def tokens():
    generator = torch.Generator().manual_seed(0)
    ids = torch.randint(0, 49406, (2, 77), generator=generator)
    ids[:, 0] = 49406
    ids[0, 10:] = 49407
    ids[1, 40:] = 49407
    return ids


# ------------------------------------------------------------------------------------------- round trips


@pytest.mark.parametrize("case", CASES, ids=CASE_IDS)
def test_round_trip_gives_identical_tensors(encoders, case):
    spec, model, ldm = encoders[case]
    state_dict = model.state_dict()
    weights, extras = _from_ldm(spec, ldm, model)
    assert set(weights) == set(state_dict)
    for key, value in state_dict.items():
        assert torch.equal(weights[key], value), key
        assert weights[key].dtype == value.dtype
    expected_extras = {"clip_l": {"text_model.embeddings.position_ids"},
                       "open_clip": {"logit_scale"} if spec.with_projection else None}[spec.kind]
    if expected_extras is not None:
        assert set(extras) == expected_extras


@pytest.mark.parametrize("case", CASES, ids=CASE_IDS)
def test_derived_config_matches_the_built_model(encoders, case):
    spec, model, ldm = encoders[case]
    derived = cc.text_config_from_ldm(ldm, spec)
    built = tiny_text_config(FAMILIES[case[0]], case[1])
    for name in ("vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads",
                 "max_position_embeddings", "hidden_act", "projection_dim", "bos_token_id", "eos_token_id",
                 "pad_token_id"):
        assert getattr(derived, name) == getattr(built, name), name


@pytest.mark.parametrize("case", CASES, ids=CASE_IDS)
def test_converted_model_gives_the_same_outputs(encoders, tokens, case):
    spec, model, ldm = encoders[case]
    fresh = _fresh_model(spec, ldm)
    with torch.no_grad():
        expected = model(tokens, output_hidden_states=True)
        got = fresh(tokens, output_hidden_states=True)
    assert torch.equal(got.last_hidden_state, expected.last_hidden_state)
    assert torch.equal(got.hidden_states[-2], expected.hidden_states[-2])
    if spec.with_projection:
        assert torch.equal(got.text_embeds, expected.text_embeds)
    else:
        assert torch.equal(got.pooler_output, expected.pooler_output)


def test_sd2_file_has_one_layer_more_than_the_model(encoders):
    spec, model, ldm = encoders[("sd2-v", 0)]
    layers = model.config.num_hidden_layers
    assert layers == 3
    for key in ldm:
        if key.startswith(f"transformer.resblocks.{layers}."):
            source = ldm[key.replace(f".{layers}.", f".{layers - 1}.", 1)]
            assert torch.equal(ldm[key], source) and ldm[key].data_ptr() != source.data_ptr()
    assert f"transformer.resblocks.{layers}.attn.in_proj_weight" in ldm
    assert f"transformer.resblocks.{layers + 1}.attn.in_proj_weight" not in ldm
    assert torch.equal(ldm["text_projection"], torch.eye(64))
    assert ldm["logit_scale"].shape == () and ldm["logit_scale"].item() == pytest.approx(math.log(100))
    assert sorted(ldm) == sorted(cc.open_clip_ldm_keys(model.config, drop_last_layer=True))


def test_in_proj_split_returns_views(encoders):
    spec, model, ldm = encoders[("sdxl", 1)]
    weights, _ = cc.open_clip_from_ldm(ldm, model, drop_last_layer=False)
    fused = ldm["transformer.resblocks.0.attn.in_proj_weight"]
    hidden = model.config.hidden_size
    for offset, name in enumerate(("q_proj", "k_proj", "v_proj")):
        part = weights[f"text_model.encoder.layers.0.self_attn.{name}.weight"]
        assert part.untyped_storage().data_ptr() == fused.untyped_storage().data_ptr()
        assert part.data_ptr() == fused[offset * hidden].data_ptr()
        assert part.is_contiguous()


# ------------------------------------------------------------------------------------- diffusers oracle


@pytest.mark.parametrize("case", [("sd1", 0), ("sdxl", 0)], ids=["sd1", "sdxl-te1"])
def test_diffusers_clip_converter_reproduces_the_weights(encoders, case):
    from diffusers.loaders.single_file_utils import convert_ldm_clip_checkpoint

    spec, model, ldm = encoders[case]
    checkpoint = {spec.single_file_prefix + key: value for key, value in ldm.items()}
    converted = convert_ldm_clip_checkpoint(checkpoint, remove_prefix=spec.single_file_prefix)
    expected = cc.hf_keys_with_text_model_prefix(model.state_dict())
    assert set(converted) == set(expected) | {"text_model.embeddings.position_ids"}
    for key, value in expected.items():
        assert torch.equal(converted[key], value), key
    assert torch.equal(converted["text_model.embeddings.position_ids"], torch.arange(77).unsqueeze(0))


@pytest.mark.parametrize("case", [("sd2-v", 0), ("sdxl", 1)], ids=["sd2", "sdxl-te2"])
def test_diffusers_open_clip_converter_reproduces_the_weights(encoders, case):
    from diffusers.loaders.single_file_utils import convert_open_clip_checkpoint

    spec, model, ldm = encoders[case]
    checkpoint = {spec.single_file_prefix + key: value for key, value in ldm.items()}
    converted = convert_open_clip_checkpoint(model, checkpoint, prefix=spec.single_file_prefix)
    expected = cc.hf_keys_with_text_model_prefix(model.state_dict())
    for key, value in expected.items():
        assert torch.equal(converted[key], value), key
    # diffusers ignores SD2's unused last layer by hard-coded full-size names (resblocks.23); the tiny file's
    # dummy layer 3 is the only thing it returns beyond the model.
    leftover = set(converted) - set(expected)
    dropped = model.config.num_hidden_layers
    assert all(key.startswith(f"text_model.encoder.layers.{dropped}.") for key in leftover)
    assert bool(leftover) == spec.drop_last_layer


# ------------------------------------------------------------------------------ full size, meta device


def _meta_model(config_kwargs: dict, with_projection: bool):
    from accelerate import init_empty_weights
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection

    model_class = CLIPTextModelWithProjection if with_projection else CLIPTextModel
    with init_empty_weights():
        return model_class(CLIPTextConfig(**config_kwargs))


@pytest.fixture(scope="module")
def full_size():
    """name -> (spec, meta model, single-file state dict on meta)."""
    result = {}
    for name, kwargs, spec in (("clip-l", CLIP_L_TEXT, _spec("sd1", 0)),
                               ("open-clip-h", OPEN_CLIP_H_TEXT, _spec("sd2-v", 0)),
                               ("bigg", OPEN_CLIP_BIGG_TEXT, _spec("sdxl", 1))):
        model = _meta_model(kwargs, spec.with_projection)
        result[name] = (spec, model, _to_ldm(spec, model.state_dict(), model.config))
    return result


# Tensor counts of released files: CLIP-L 12 layers x 16 + 4 + position_ids; OpenCLIP 12 per resblock + 6.
FULL_SIZE_GOLDEN = {
    "clip-l": (197, {
        "text_model.embeddings.position_ids": (1, 77),
        "text_model.embeddings.token_embedding.weight": (49408, 768),
        "text_model.embeddings.position_embedding.weight": (77, 768),
        "text_model.encoder.layers.11.mlp.fc2.bias": (768,),
        "text_model.encoder.layers.11.self_attn.q_proj.weight": (768, 768),
        "text_model.final_layer_norm.weight": (768,),
    }),
    "open-clip-h": (24 * 12 + 6, {
        "token_embedding.weight": (49408, 1024),
        "positional_embedding": (77, 1024),
        "transformer.resblocks.23.attn.in_proj_weight": (3072, 1024),
        "transformer.resblocks.23.mlp.c_fc.weight": (4096, 1024),
        "ln_final.weight": (1024,),
        "text_projection": (1024, 1024),
        "logit_scale": (),
    }),
    "bigg": (32 * 12 + 6, {
        "transformer.resblocks.31.attn.in_proj_weight": (3840, 1280),
        "transformer.resblocks.31.attn.in_proj_bias": (3840,),
        "transformer.resblocks.31.mlp.c_proj.weight": (1280, 5120),
        "ln_final.bias": (1280,),
        "text_projection": (1280, 1280),
        "logit_scale": (),
    }),
}


@pytest.mark.parametrize("name", list(FULL_SIZE_GOLDEN))
def test_full_size_golden_keys(full_size, name):
    spec, model, ldm = full_size[name]
    count, golden = FULL_SIZE_GOLDEN[name]
    assert len(ldm) == count
    for key, shape in golden.items():
        assert tuple(ldm[key].shape) == shape, key
    assert all(value.is_meta for value in ldm.values())
    assert ldm.get("text_model.embeddings.position_ids", torch.empty(0, dtype=torch.int64)).dtype == torch.int64
    file_layers = model.config.num_hidden_layers + (1 if spec.drop_last_layer else 0)
    assert not any(f"layers.{file_layers}." in key or f"resblocks.{file_layers}." in key for key in ldm)
    if spec.kind == "clip_l":
        assert sorted(ldm) == sorted(cc.clip_ldm_keys(model.config))
    else:
        assert sorted(ldm) == sorted(cc.open_clip_ldm_keys(model.config, spec.drop_last_layer))


@pytest.mark.parametrize("name, reference", [("clip-l", CLIP_L_TEXT), ("open-clip-h", OPEN_CLIP_H_TEXT),
                                             ("bigg", OPEN_CLIP_BIGG_TEXT)])
def test_full_size_config_and_reverse_on_meta(full_size, name, reference):
    spec, model, ldm = full_size[name]
    derived = cc.text_config_from_ldm(ldm, spec)
    for field in ("vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads",
                  "max_position_embeddings", "hidden_act"):
        assert getattr(derived, field) == reference[field], field
    if spec.with_projection:
        assert derived.projection_dim == reference["projection_dim"]
    weights, extras = _from_ldm(spec, ldm, model)
    expected = model.state_dict()
    assert set(weights) == set(expected)
    assert all(tuple(weights[key].shape) == tuple(value.shape) for key, value in expected.items())
    if name == "open-clip-h":
        assert len(extras) == 12 + 2 and "transformer.resblocks.23.attn.in_proj_weight" in extras


@pytest.mark.parametrize("name", ["open-clip-h", "bigg"])
def test_full_size_diffusers_open_clip_oracle_keys(full_size, name):
    """With real sizes diffusers' ignore list (SD2 resblocks.23, text_projection) matches our file exactly."""
    from diffusers.loaders.single_file_utils import convert_open_clip_checkpoint

    spec, model, ldm = full_size[name]
    checkpoint = {spec.single_file_prefix + key: value for key, value in ldm.items()}
    converted = convert_open_clip_checkpoint(model, checkpoint, prefix=spec.single_file_prefix)
    expected = cc.hf_keys_with_text_model_prefix(model.state_dict())
    assert set(converted) == set(expected)
    assert all(tuple(converted[key].shape) == tuple(value.shape) for key, value in expected.items())


# ------------------------------------------------------------------------------------ dtypes and extras


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=["fp16", "bf16"])
@pytest.mark.parametrize("case", CASES, ids=CASE_IDS)
def test_dtype_is_preserved(encoders, case, dtype):
    spec, model, _ = encoders[case]
    state_dict = {key: value.to(dtype) for key, value in model.state_dict().items()}
    ldm = _to_ldm(spec, state_dict, model.config)
    for key, value in ldm.items():
        assert value.dtype == (torch.int64 if key.endswith("position_ids") else dtype), key
    weights, extras = _from_ldm(spec, ldm, model)
    for key, value in state_dict.items():
        assert weights[key].dtype == dtype and torch.equal(weights[key], value), key


def _real_like_file(ldm: dict, keys: list[str], seed: int) -> dict:
    """A copy of `ldm` whose `keys` hold different values, as a real file's unused tensors would."""
    generator = torch.Generator().manual_seed(seed)
    real = dict(ldm)
    for key in keys:
        value = ldm[key]
        if value.is_floating_point():
            real[key] = torch.randn(value.shape, generator=generator).to(value.dtype)
        else:
            real[key] = value.clone()
    return real


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16], ids=["fp32", "fp16", "bf16"])
def test_sd2_extras_come_back_and_restore_the_file_exactly(encoders, dtype):
    spec, model, ldm = encoders[("sd2-v", 0)]
    ldm = {key: value.to(dtype) for key, value in ldm.items()}
    dropped = [key for key in ldm if key.startswith("transformer.resblocks.3.")]
    assert len(dropped) == 12
    real = _real_like_file(ldm, dropped + ["text_projection", "logit_scale"], seed=1)
    fresh = _model_class(spec)(cc.text_config_from_ldm(real, spec)).to(dtype)
    weights, extras = cc.open_clip_from_ldm(real, fresh, drop_last_layer=True)
    assert set(extras) == set(dropped) | {"text_projection", "logit_scale"}
    assert all(extras[key] is real[key] for key in extras)
    fresh.load_state_dict(weights, strict=True)
    written = cc.open_clip_to_ldm(fresh.state_dict(), fresh.config, drop_last_layer=True)
    assert not torch.equal(written["transformer.resblocks.3.ln_1.weight"], real["transformer.resblocks.3.ln_1.weight"])
    written.update(extras)
    assert set(written) == set(real)
    for key, value in real.items():
        assert written[key].dtype == value.dtype and torch.equal(written[key], value), key


def test_sdxl_te2_logit_scale_is_carried(encoders):
    spec, model, ldm = encoders[("sdxl", 1)]
    real = _real_like_file(ldm, ["logit_scale"], seed=2)
    weights, extras = cc.open_clip_from_ldm(real, model, drop_last_layer=False)
    assert set(extras) == {"logit_scale"} and extras["logit_scale"] is real["logit_scale"]
    written = cc.open_clip_to_ldm(weights, model.config, drop_last_layer=False)
    assert torch.equal(written["text_projection"], real["text_projection"])
    written.update(extras)
    assert set(written) == set(real) and all(torch.equal(written[key], real[key]) for key in real)


def test_clip_l_position_ids_from_the_file_are_carried(encoders):
    spec, model, ldm = encoders[("sd1", 0)]
    real = dict(ldm)
    # Some old files store float position_ids; they must survive a round trip untouched.
    real["text_model.embeddings.position_ids"] = torch.arange(77, dtype=torch.float32).unsqueeze(0)
    real["text_model.some_unknown_buffer"] = torch.ones(3)
    weights, extras = cc.clip_l_from_ldm(real, model)
    assert set(extras) == {"text_model.embeddings.position_ids", "text_model.some_unknown_buffer"}
    written = cc.clip_l_to_ldm(weights, model.config)
    assert written["text_model.embeddings.position_ids"].dtype == torch.int64
    written.update(extras)
    assert set(written) == set(real) and all(torch.equal(written[key], real[key]) for key in real)


# ------------------------------------------------------------------------------------------ key naming


def test_text_model_prefix_both_ways(encoders):
    _, flat_model, _ = encoders[("sd1", 0)]
    _, projection_model, _ = encoders[("sdxl", 1)]
    flat = flat_model.state_dict()
    assert not any(key.startswith("text_model.") for key in flat)
    prefixed = cc.hf_keys_with_text_model_prefix(flat)
    assert set(prefixed) == {"text_model." + key for key in flat}
    assert all(prefixed["text_model." + key] is value for key, value in flat.items())
    with_projection = cc.hf_keys_with_text_model_prefix(projection_model.state_dict())
    assert set(with_projection) == set(projection_model.state_dict())
    assert "text_projection.weight" in with_projection
    # Either form maps onto each model's own naming; a saved position_ids buffer is dropped.
    for model in (flat_model, projection_model):
        own = model.state_dict()
        for form in (own, cc.hf_keys_with_text_model_prefix(own)):
            mapped = cc.hf_keys_for_model({**form, "text_model.embeddings.position_ids": torch.arange(77)[None]},
                                          model)
            assert set(mapped) == set(own)
            assert all(mapped[key] is own[key] for key in own)
    flat_form = {key.removeprefix("text_model."): value for key, value in projection_model.state_dict().items()}
    assert set(cc.hf_keys_for_model(flat_form, projection_model)) == set(projection_model.state_dict())
    assert "encoder.unknown" in cc.hf_keys_for_model({"text_model.encoder.unknown": torch.ones(1)}, flat_model)


# ------------------------------------------------------------------------------------------------ errors


@pytest.mark.parametrize("case, key", [
    (("sd2-v", 0), "transformer.resblocks.1.attn.in_proj_weight"),
    (("sd2-v", 0), "ln_final.bias"),
    (("sdxl", 1), "text_projection"),
    (("sdxl", 1), "positional_embedding"),
    (("sd1", 0), "text_model.encoder.layers.2.mlp.fc1.weight"),
    (("sdxl", 0), "text_model.final_layer_norm.weight"),
], ids=["in-proj", "ln-final", "projection", "positions", "clip-fc1", "clip-final-ln"])
def test_missing_key_is_named(encoders, case, key):
    spec, model, ldm = encoders[case]
    broken = {name: value for name, value in ldm.items() if name != key}
    with pytest.raises(ValueError, match=key.replace(".", r"\.")):
        _from_ldm(spec, broken, model)


def test_missing_hf_key_on_write_is_named(encoders):
    spec, model, _ = encoders[("sdxl", 1)]
    state_dict = {key: value for key, value in model.state_dict().items()
                  if key != "text_model.encoder.layers.1.self_attn.k_proj.bias"}
    with pytest.raises(ValueError, match=r"layers\.1\.self_attn\.k_proj\.bias"):
        cc.open_clip_to_ldm(state_dict, model.config, drop_last_layer=False)


@pytest.mark.parametrize("case, key", [(("sd1", 0), "text_model.embeddings.token_embedding.weight"),
                                       (("sd2-v", 0), "positional_embedding"),
                                       (("sdxl", 1), "text_projection"),
                                       (("sdxl", 1), "transformer.resblocks.0.mlp.c_fc.weight")])
def test_config_from_ldm_names_the_missing_key(encoders, case, key):
    spec, _, ldm = encoders[case]
    broken = {name: value for name, value in ldm.items() if name != key}
    with pytest.raises(ModelFormatError, match=r"model\.ckpt: .*" + (spec.single_file_prefix + key).replace(".", r"\.")):
        cc.text_config_from_ldm(broken, spec, path="model.ckpt")


def test_config_from_ldm_rejects_gaps_in_layers(encoders):
    spec, _, ldm = encoders[("sdxl", 1)]
    broken = {key: value for key, value in ldm.items() if not key.startswith("transformer.resblocks.1.")}
    with pytest.raises(ModelFormatError, match="layers not numbered"):
        cc.text_config_from_ldm(broken, spec, path="model.ckpt")


def test_layer_the_model_lacks_is_rejected(encoders):
    spec, model, ldm = encoders[("sdxl", 1)]
    extra = dict(ldm, **{"transformer.resblocks.4.ln_1.weight": torch.ones(64)})
    with pytest.raises(ValueError, match=r"resblocks\.4\.ln_1\.weight"):
        cc.open_clip_from_ldm(extra, model, drop_last_layer=False)
    spec, model, ldm = encoders[("sd1", 0)]
    extra = dict(ldm, **{"text_model.encoder.layers.4.layer_norm1.weight": torch.ones(32)})
    with pytest.raises(ValueError, match=r"layers\.4\.layer_norm1\.weight"):
        cc.clip_l_from_ldm(extra, model)


def test_bad_in_proj_shape_is_named(encoders):
    spec, model, ldm = encoders[("sdxl", 1)]
    key = "transformer.resblocks.2.attn.in_proj_weight"
    broken = dict(ldm, **{key: ldm[key][:-1]})
    with pytest.raises(ValueError, match=r"resblocks\.2\.attn\.in_proj_weight.*shape"):
        cc.open_clip_from_ldm(broken, model, drop_last_layer=False)
