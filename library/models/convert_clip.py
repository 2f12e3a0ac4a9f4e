"""Text-encoder state-dict conversion between transformers CLIP text models and single-file layouts.

Two single-file layouts exist:

* CLIP-L (SD1, SDXL TE1): the transformers naming with the `text_model.` prefix, plus the int64 buffer
  `text_model.embeddings.position_ids` ([1, N]) that transformers 4.x used to save.
* OpenCLIP (SD2, SDXL TE2): `token_embedding.weight`, `positional_embedding`, `transformer.resblocks.{i}.*`
  with the attention q/k/v projections fused into `attn.in_proj_{weight,bias}` (q, k, v stacked along dim 0),
  `ln_final.*`, `text_projection` ([D, P], the transpose of transformers' `text_projection.weight`) and
  `logit_scale` (a scalar with no transformers counterpart).

Keys are given and returned WITHOUT the single-file prefix (`cond_stage_model.transformer.` etc.); the caller
adds/strips it. transformers 5 flattens `CLIPTextModel.state_dict()` (no `text_model.` prefix) while
`CLIPTextModelWithProjection` keeps it; every function here accepts both forms, and the `*_from_ldm` functions
return the naming of the model they are given. All conversions are renames, slices (views), `cat` or small
transposes, so they work on meta tensors and keep the dtype.
"""
from __future__ import annotations

import math
import re
from typing import TYPE_CHECKING, Callable, Mapping

import torch

from library.errors import ModelFormatError
from library.families import TextEncoderSpec

if TYPE_CHECKING:
    from transformers import CLIPTextConfig

StateDict = dict[str, torch.Tensor]
KeyPairs = list[tuple[str, str]]  # (transformers key with `text_model.` prefix, single-file key)

TEXT_MODEL_PREFIX = "text_model."
HF_PROJECTION = "text_projection.weight"
# Keys of CLIPTextModelWithProjection that live outside `text_model.`.
HF_OUTSIDE_TEXT_MODEL = ("text_projection.",)
HF_LAYER = "text_model.encoder.layers.{}."
HF_POSITION_IDS = "text_model.embeddings.position_ids"
HF_TOKEN_EMBEDDING = "text_model.embeddings.token_embedding.weight"
HF_POSITION_EMBEDDING = "text_model.embeddings.position_embedding.weight"
HF_FC1 = "mlp.fc1.weight"
HF_LAYER_PATTERN = re.compile(r"^text_model\.encoder\.layers\.(\d+)\.")

OPEN_CLIP_LAYER = "transformer.resblocks.{}."
OPEN_CLIP_LAYER_PATTERN = re.compile(r"^transformer\.resblocks\.(\d+)\.")
OPEN_CLIP_TOKEN_EMBEDDING = "token_embedding.weight"
OPEN_CLIP_POSITION_EMBEDDING = "positional_embedding"
OPEN_CLIP_FC1 = "mlp.c_fc.weight"
OPEN_CLIP_PROJECTION = "text_projection"
OPEN_CLIP_LOGIT_SCALE = "logit_scale"
LOGIT_SCALE_INIT = math.log(100.0)  # CLIP's trained value; SD2 files carry it but nothing uses it

# (transformers, OpenCLIP) keys outside the transformer layers.
OPEN_CLIP_TOP_LEVEL: KeyPairs = [
    (HF_TOKEN_EMBEDDING, OPEN_CLIP_TOKEN_EMBEDDING),
    (HF_POSITION_EMBEDDING, OPEN_CLIP_POSITION_EMBEDDING),
    ("text_model.final_layer_norm.weight", "ln_final.weight"),
    ("text_model.final_layer_norm.bias", "ln_final.bias"),
]
# (transformers, OpenCLIP) module names inside one layer that are plain renames (weight and bias each).
OPEN_CLIP_LAYER_MODULES: tuple[tuple[str, str], ...] = (
    ("layer_norm1", "ln_1"),
    ("self_attn.out_proj", "attn.out_proj"),
    ("layer_norm2", "ln_2"),
    ("mlp.fc1", "mlp.c_fc"),
    ("mlp.fc2", "mlp.c_proj"),
)
# The projections fused into OpenCLIP's `attn.in_proj_*`, in their order along dim 0.
OPEN_CLIP_QKV: tuple[str, ...] = ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj")
OPEN_CLIP_IN_PROJ = "attn.in_proj_{}"
PARAMS = ("weight", "bias")

BOS_TOKEN_ID = 49406
EOS_TOKEN_ID = 49407
HEAD_DIM = 64


# ------------------------------------------------------------------------------------------ transformers naming


def _with_prefix(key: str) -> str:
    """A transformers text-encoder key in the `text_model.`-prefixed (transformers 4.x / file) form."""
    if key.startswith(TEXT_MODEL_PREFIX) or key.startswith(HF_OUTSIDE_TEXT_MODEL):
        return key
    return TEXT_MODEL_PREFIX + key


def _model_naming(model: torch.nn.Module) -> tuple[Callable[[str], str], set[str]]:
    """(prefixed key -> the key `model.state_dict()` uses, the model's state-dict keys)."""
    target = set(model.state_dict().keys())
    if any(key.startswith(TEXT_MODEL_PREFIX) for key in target):
        return (lambda key: key), target
    return (lambda key: key[len(TEXT_MODEL_PREFIX):] if key.startswith(TEXT_MODEL_PREFIX) else key), target


def hf_keys_with_text_model_prefix(state_dict: Mapping[str, torch.Tensor]) -> StateDict:
    """Add `text_model.` where a flattened transformers 5 CLIPTextModel dropped it (the on-disk naming).

    `text_projection.weight` (CLIPTextModelWithProjection) stays at the top level. Tensors are not copied.
    """
    return {_with_prefix(key): value for key, value in state_dict.items()}


def hf_keys_for_model(state_dict: Mapping[str, torch.Tensor], model: torch.nn.Module) -> StateDict:
    """Rename a transformers text-encoder state dict (prefixed or flattened) onto `model.state_dict()`'s keys.

    `embeddings.position_ids` saved by old transformers versions is dropped when the model does not persist it;
    any other key the model lacks is kept (renamed) so that a strict load reports it.
    """
    to_model, target = _model_naming(model)
    renamed: StateDict = {}
    for key, value in state_dict.items():
        name = to_model(_with_prefix(key))
        if name not in target and _with_prefix(key) == HF_POSITION_IDS:
            continue
        renamed[name] = value
    return renamed


def _config_value(config: object, name: str):
    """Read a field of a CLIPTextConfig or of a plain kwargs dict."""
    if isinstance(config, Mapping):
        return config[name]
    return getattr(config, name)


def _check_layer_count(keys, pattern: re.Pattern, expected: int, what: str) -> None:
    """ValueError when the file has layers beyond `expected` (the model would silently miss weights)."""
    for key in keys:
        match = pattern.match(key)
        if match and int(match.group(1)) >= expected:
            raise ValueError(f"unexpected key {key!r}: the {what} has {expected} layers")


# -------------------------------------------------------------------------------------------------- CLIP-L


def clip_ldm_keys(model_config: object) -> list[str]:
    """The keys of a CLIP-L text encoder in a single file (without the single-file prefix)."""
    keys = [HF_TOKEN_EMBEDDING, HF_POSITION_EMBEDDING, HF_POSITION_IDS]
    for index in range(_config_value(model_config, "num_hidden_layers")):
        layer = HF_LAYER.format(index)
        modules = [*OPEN_CLIP_QKV, *(hf for hf, _ in OPEN_CLIP_LAYER_MODULES)]
        keys += [f"{layer}{module}.{param}" for module in modules for param in PARAMS]
    keys += ["text_model.final_layer_norm.weight", "text_model.final_layer_norm.bias"]
    return keys


def clip_l_to_ldm(state_dict: Mapping[str, torch.Tensor], model_config: object) -> StateDict:
    """transformers CLIPTextModel weights (either naming) -> the CLIP-L single-file layout.

    The weights keep their transformers names with the `text_model.` prefix; `text_model.embeddings.position_ids`
    (int64 arange, [1, max_position_embeddings]) is added as real checkpoints have it.
    """
    converted = hf_keys_with_text_model_prefix(state_dict)
    if HF_TOKEN_EMBEDDING not in converted:
        raise ValueError(f"missing key {HF_TOKEN_EMBEDDING!r}")
    device = converted[HF_TOKEN_EMBEDDING].device
    length = _config_value(model_config, "max_position_embeddings")
    converted[HF_POSITION_IDS] = torch.arange(length, dtype=torch.int64, device=device).unsqueeze(0)
    return converted


def clip_l_from_ldm(state_dict: Mapping[str, torch.Tensor], model: torch.nn.Module) -> tuple[StateDict, StateDict]:
    """CLIP-L single-file keys -> (weights in `model`'s own key naming, extras).

    Extras are the file's keys that are not model weights (`position_ids`, anything unknown), returned untouched
    under their file names. Raises ValueError naming the first missing weight, or a layer the model lacks.
    """
    to_model, target = _model_naming(model)
    weights: StateDict = {}
    extras: StateDict = {}
    for key, value in state_dict.items():
        name = to_model(_with_prefix(key))
        if name in target:
            weights[name] = value
        else:
            extras[key] = value
    missing = [key for key in target if key not in weights]
    if missing:
        raise ValueError(f"missing key {_with_prefix(missing[0])!r}")
    layers = _config_value(model.config, "num_hidden_layers")
    _check_layer_count((_with_prefix(key) for key in extras), HF_LAYER_PATTERN, layers, "CLIP text model")
    return weights, extras


# ------------------------------------------------------------------------------------------------ OpenCLIP


def _open_clip_layer_pairs(index: int) -> KeyPairs:
    """(transformers, OpenCLIP) pairs of the plain renames of layer `index`."""
    hf, oc = HF_LAYER.format(index), OPEN_CLIP_LAYER.format(index)
    return [(f"{hf}{hf_module}.{param}", f"{oc}{oc_module}.{param}")
            for hf_module, oc_module in OPEN_CLIP_LAYER_MODULES for param in PARAMS]


def _open_clip_qkv_groups(index: int) -> list[tuple[list[str], str]]:
    """([transformers q, k, v keys], fused OpenCLIP key) for the weight and the bias of layer `index`."""
    hf, oc = HF_LAYER.format(index), OPEN_CLIP_LAYER.format(index)
    return [([f"{hf}{module}.{param}" for module in OPEN_CLIP_QKV], oc + OPEN_CLIP_IN_PROJ.format(param))
            for param in PARAMS]


def _open_clip_layer_keys(index: int) -> list[str]:
    keys = [oc for _, oc in _open_clip_layer_pairs(index)]
    return keys + [fused for _, fused in _open_clip_qkv_groups(index)]


def open_clip_ldm_keys(model_config: object, drop_last_layer: bool) -> list[str]:
    """The keys of an OpenCLIP text encoder in a single file (without the single-file prefix)."""
    layers = _config_value(model_config, "num_hidden_layers") + (1 if drop_last_layer else 0)
    keys = [OPEN_CLIP_TOKEN_EMBEDDING, OPEN_CLIP_POSITION_EMBEDDING]
    for index in range(layers):
        keys += _open_clip_layer_keys(index)
    return keys + ["ln_final.weight", "ln_final.bias", OPEN_CLIP_PROJECTION, OPEN_CLIP_LOGIT_SCALE]


def _require(state_dict: Mapping[str, torch.Tensor], key: str) -> torch.Tensor:
    if key not in state_dict:
        raise ValueError(f"missing key {key!r}")
    return state_dict[key]


def open_clip_to_ldm(state_dict: Mapping[str, torch.Tensor], model_config: object,
                     drop_last_layer: bool) -> StateDict:
    """transformers CLIPTextModel(WithProjection) weights (either naming) -> the OpenCLIP single-file layout.

    q/k/v are concatenated into `in_proj`, the projection is transposed. With `drop_last_layer` (SD2) a dummy
    last resblock is written as a clone of the previous one, as real SD2 files have one more layer than the model
    uses. `text_projection` (identity [D, D] when the model has none) and `logit_scale` (ln 100) are always written;
    a caller that loaded a real file overrides these dummies with the file's own tensors.
    """
    hf = hf_keys_with_text_model_prefix(state_dict)
    layers = _config_value(model_config, "num_hidden_layers")
    converted: StateDict = {}
    for hf_key, oc_key in OPEN_CLIP_TOP_LEVEL[:2]:
        converted[oc_key] = _require(hf, hf_key)
    for index in range(layers):
        converted.update(_open_clip_layer_to_ldm(hf, index))
    if drop_last_layer:
        converted.update(_dummy_last_layer(converted, layers))
    for hf_key, oc_key in OPEN_CLIP_TOP_LEVEL[2:]:
        converted[oc_key] = _require(hf, hf_key)
    reference = converted[OPEN_CLIP_TOKEN_EMBEDDING]
    if HF_PROJECTION in hf:
        converted[OPEN_CLIP_PROJECTION] = hf[HF_PROJECTION].T.contiguous()
    else:
        hidden = reference.shape[1]
        converted[OPEN_CLIP_PROJECTION] = torch.eye(hidden, dtype=reference.dtype, device=reference.device)
    converted[OPEN_CLIP_LOGIT_SCALE] = torch.full((), LOGIT_SCALE_INIT, dtype=reference.dtype,
                                                  device=reference.device)
    return converted


def _open_clip_layer_to_ldm(hf: Mapping[str, torch.Tensor], index: int) -> StateDict:
    converted = {oc_key: _require(hf, hf_key) for hf_key, oc_key in _open_clip_layer_pairs(index)}
    for qkv_keys, fused_key in _open_clip_qkv_groups(index):
        converted[fused_key] = torch.cat([_require(hf, key) for key in qkv_keys], dim=0)
    return converted


def _dummy_last_layer(converted: Mapping[str, torch.Tensor], layers: int) -> StateDict:
    """Resblock `layers` as a clone of resblock `layers - 1` (SD2's unused last layer)."""
    if layers < 1:
        raise ValueError("cannot write a dummy last layer for a model without layers")
    source, target = OPEN_CLIP_LAYER.format(layers - 1), OPEN_CLIP_LAYER.format(layers)
    return {target + key[len(source):]: value.clone()
            for key, value in converted.items() if key.startswith(source)}


def open_clip_from_ldm(state_dict: Mapping[str, torch.Tensor], model: torch.nn.Module,
                       drop_last_layer: bool) -> tuple[StateDict, StateDict]:
    """OpenCLIP single-file keys -> (weights in `model`'s own key naming, extras).

    `in_proj` is split into q/k/v views; `text_projection` is transposed when the model has a projection and is
    an extra otherwise. `logit_scale`, SD2's unused last resblock (`drop_last_layer`) and unknown keys are extras,
    returned untouched. Raises ValueError naming a missing key, a bad in_proj shape or an unexpected layer.
    """
    to_model, target = _model_naming(model)
    layers = _config_value(model.config, "num_hidden_layers")
    hidden = _config_value(model.config, "hidden_size")
    used: set[str] = set()

    def take(key: str) -> torch.Tensor:
        used.add(key)
        return _require(state_dict, key)

    weights: StateDict = {}
    for hf_key, oc_key in OPEN_CLIP_TOP_LEVEL:
        weights[to_model(hf_key)] = take(oc_key)
    for index in range(layers):
        for hf_key, oc_key in _open_clip_layer_pairs(index):
            weights[to_model(hf_key)] = take(oc_key)
        for qkv_keys, fused_key in _open_clip_qkv_groups(index):
            for hf_key, part in zip(qkv_keys, _split_in_proj(take(fused_key), fused_key, hidden)):
                weights[to_model(hf_key)] = part
    if to_model(HF_PROJECTION) in target:
        weights[to_model(HF_PROJECTION)] = take(OPEN_CLIP_PROJECTION).T.contiguous()
    missing = sorted(target - set(weights))
    if missing:
        raise ValueError(f"the model has weights this converter does not fill: {missing[:3]}")
    extras = {key: value for key, value in state_dict.items() if key not in used}
    file_layers = layers + (1 if drop_last_layer else 0)
    _check_layer_count(extras, OPEN_CLIP_LAYER_PATTERN, file_layers, "OpenCLIP text model in the file")
    return weights, extras


def _split_in_proj(fused: torch.Tensor, key: str, hidden: int) -> tuple[torch.Tensor, ...]:
    """q, k, v views of a fused `in_proj` tensor ([3D, D] or [3D])."""
    if fused.shape[0] != 3 * hidden:
        raise ValueError(f"{key!r} has shape {tuple(fused.shape)}, expected {3 * hidden} rows (q, k, v of {hidden})")
    return fused.chunk(3, dim=0)


# -------------------------------------------------------------------------------------------------- config


def text_config_from_ldm(state_dict: Mapping[str, torch.Tensor], spec: TextEncoderSpec,
                         path: object = "<state dict>") -> "CLIPTextConfig":
    """Derive the transformers CLIPTextConfig of a single-file text encoder from its tensor shapes.

    The head count is not stored in the weights: CLIP text towers use 64-wide heads (at least one head).
    Raises ModelFormatError naming `path` when a required key is missing or the layers are not numbered 0..n-1.
    """
    from transformers import CLIPTextConfig

    shapes = _text_shapes(state_dict, spec, path)
    layers = shapes["file_layers"] - (1 if spec.drop_last_layer else 0)
    if layers < 1:
        raise ModelFormatError(path, f"text encoder under {spec.single_file_prefix!r} has "
                                     f"{shapes['file_layers']} layers; too few for this model family")
    hidden = shapes["hidden"]
    return CLIPTextConfig(
        vocab_size=shapes["vocab"],
        hidden_size=hidden,
        intermediate_size=shapes["intermediate"],
        num_hidden_layers=layers,
        num_attention_heads=max(1, hidden // HEAD_DIM),
        max_position_embeddings=shapes["positions"],
        hidden_act=spec.hidden_act,
        projection_dim=shapes["projection"] if spec.with_projection else hidden,
        bos_token_id=BOS_TOKEN_ID,
        eos_token_id=EOS_TOKEN_ID,
        pad_token_id=EOS_TOKEN_ID if spec.pad_token == "<|endoftext|>" else 0,
    )


def _text_shapes(state_dict: Mapping[str, torch.Tensor], spec: TextEncoderSpec, path: object) -> dict[str, int]:
    """vocab, hidden, positions, intermediate, file_layers and projection (0 when absent) from the shapes."""
    if spec.kind == "clip_l":
        keys = {_with_prefix(key): key for key in state_dict}
        names = dict(token=HF_TOKEN_EMBEDDING, positions=HF_POSITION_EMBEDDING, fc1=HF_LAYER.format(0) + HF_FC1,
                     projection=HF_PROJECTION, pattern=HF_LAYER_PATTERN)
    else:
        keys = {key: key for key in state_dict}
        names = dict(token=OPEN_CLIP_TOKEN_EMBEDDING, positions=OPEN_CLIP_POSITION_EMBEDDING,
                     fc1=OPEN_CLIP_LAYER.format(0) + OPEN_CLIP_FC1, projection=OPEN_CLIP_PROJECTION,
                     pattern=OPEN_CLIP_LAYER_PATTERN)

    def shape(name: str) -> tuple[int, ...]:
        if name not in keys:
            raise ModelFormatError(path, f"text encoder key {spec.single_file_prefix + name!r} is missing")
        return tuple(state_dict[keys[name]].shape)

    vocab, hidden = shape(names["token"])
    projection = 0
    if spec.with_projection:
        projection_shape = shape(names["projection"])
        # transformers stores [P, D]; OpenCLIP stores the transpose [D, P].
        projection = projection_shape[0] if spec.kind == "clip_l" else projection_shape[-1]
    return dict(vocab=vocab, hidden=hidden, positions=shape(names["positions"])[0],
                intermediate=shape(names["fc1"])[0], file_layers=_count_layers(keys, names["pattern"], spec, path),
                projection=projection)


def _count_layers(keys, pattern: re.Pattern, spec: TextEncoderSpec, path: object) -> int:
    indices = {int(match.group(1)) for match in map(pattern.match, keys) if match}
    if not indices or indices != set(range(max(indices) + 1)):
        raise ModelFormatError(path, f"text encoder under {spec.single_file_prefix!r}: layers not numbered "
                                     f"0..n-1 (found {sorted(indices)[:8]})")
    return len(indices)
