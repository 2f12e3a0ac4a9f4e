"""The trainer's side of kohya's `--network_module` protocol (COMPAT §16): import, create, param groups, base weights.

Works with any module that has kohya's `create_network` (networks.lora, lycoris.kohya, ...); owns the LoRA+ flags
and the family check of LoRA files. LyCORIS' presets and names: lycoris_presets.py; the networks: networks/.
"""
from __future__ import annotations

import contextlib
import difflib
import importlib
import logging
import os
from collections.abc import Iterator, Sequence
from pathlib import Path
from types import ModuleType
from typing import Any

import torch
from tqdm import tqdm

from library.errors import FlagError
from library.families import file_kind
from library.models.state_dict_io import TensorFile, read_state_dict
from library.train import lycoris_presets
from networks import naming

logger = logging.getLogger(__name__)

OUR_NETWORK_MODULES = ("networks.lora", "networks.dylora", "networks.lora_fa")
LYCORIS_PACKAGE = "lycoris"
LORAPLUS_FLAGS = ("loraplus_lr_ratio", "loraplus_unet_lr_ratio", "loraplus_text_encoder_lr_ratio")


# ----------------------------------------------------------------------------------------------- arguments


def parse_network_args(strings: list[str] | None) -> dict[str, str]:
    """`--network_args key=value ...` -> {key: value} (strings), split at the first "=" (COMPAT §6)."""
    kwargs: dict[str, str] = {}
    for item in strings or []:
        key, separator, value = str(item).partition("=")
        if not separator or not key.strip():
            found = "no key before '='" if separator else "no '='"
            raise FlagError(f"--network_args {item!r}: expected key=value (e.g. conv_dim=4), got {found}")
        kwargs[key.strip()] = value.strip()
    return kwargs


def network_kwargs(args_strings: list[str] | None, network_dropout: float | None) -> dict[str, Any]:
    """The kwargs handed to create_network: `--network_args` plus `dropout` from `--network_dropout`.

    kohya adds `dropout` when the args lack it, as a workaround for LyCORIS (COMPAT §6).
    """
    kwargs: dict[str, Any] = parse_network_args(args_strings)
    kwargs.setdefault("dropout", network_dropout)
    return kwargs


# ----------------------------------------------------------------------------------------------- import


def import_network_module(name: str) -> ModuleType:
    """Import `--network_module` (repo root and installed packages, as kohya); FlagError when it cannot work."""
    if not name or not name.strip():
        raise FlagError(f"--network_module: expected a module name such as {OUR_NETWORK_MODULES[0]}, got {name!r}")
    try:
        module = importlib.import_module(name)
    except ModuleNotFoundError as error:
        raise FlagError(_missing_module_message(name, error)) from None
    if not callable(getattr(module, "create_network", None)):
        raise FlagError(f"--network_module {name}: the module has no create_network(); expected a network module "
                        f"with kohya's interface such as {', '.join(OUR_NETWORK_MODULES)} or lycoris.kohya")
    return module


def _missing_module_message(name: str, error: ModuleNotFoundError) -> str:
    missing = error.name or name
    if not (name == missing or name.startswith(missing + ".")):
        # the module exists but one of its own imports does not
        return f"--network_module {name}: importing it failed: {error}"
    if missing == LYCORIS_PACKAGE:
        return f"--network_module {name}: module not found; install LyCORIS with `pip install lycoris-lora`"
    candidates = OUR_NETWORK_MODULES + ("lycoris.kohya",)
    close = difflib.get_close_matches(name, candidates, n=1, cutoff=0.6)
    hint = f"did you mean {close[0]}?" if close else f"available: {', '.join(OUR_NETWORK_MODULES)}"
    return f"--network_module {name}: module not found; {hint}"


# ----------------------------------------------------------------------------------------------- creation


def _text_encoder_argument(text_encoders: Sequence[torch.nn.Module] | None) -> Any:
    """kohya passes one encoder as itself and SDXL's two as a list; the prefix lora_te vs te1/te2 follows (§1.3)."""
    encoders = list(text_encoders or [])
    return encoders[0] if len(encoders) == 1 else encoders


def create_network(module: ModuleType, *, multiplier: float, network_dim: int | None, network_alpha: float | None,
                   vae: Any, text_encoders: list, unet: torch.nn.Module, kwargs: dict[str, Any],
                   output_dir: str | os.PathLike | None = None, network_dropout: float | None = None) -> Any:
    """`module.create_network(...)` as kohya calls it; None when the module returns None (nothing to train).

    lycoris.kohya sees our models with kohya's module paths and class names, and its preset (LyCORIS' default
    `full` when none is given) without duplicate targets: see library/train/lycoris_presets.py. The preset goes
    to it as a toml in a temp folder (under output_dir when it exists).
    """
    kwargs = dict(kwargs)
    with _lycoris_call(module, kwargs, text_encoders, unet, output_dir) as (call_kwargs, encoder_argument,
                                                                            unet_argument), \
            lycoris_presets.translated_errors(kwargs):
        network = module.create_network(multiplier, network_dim, network_alpha, vae, encoder_argument, unet_argument,
                                        neuron_dropout=network_dropout, **call_kwargs)
    if network is None:
        logger.info("%s.create_network returned None", module.__name__)
    return network


def create_network_from_weights(module: ModuleType, multiplier: float, file: str | os.PathLike, vae: Any,
                                text_encoders: list, unet: torch.nn.Module, for_inference: bool = False,
                                flag: str = "--network_weights", **kwargs: Any) -> tuple[Any, Any]:
    """`module.create_network_from_weights(...)` -> (network, weights_sd); LyCORIS finds the file's kohya names
    in the same kohya views of the models (names our earlier versions wrote are renamed to kohya's first).

    `flag` names the option the file came from in errors (--network_weights, --base_weights).
    """
    if file is None or not Path(file).is_file():
        raise FlagError(f"{flag} {file}: file not found")
    lycoris_class = lycoris_presets.lycoris_network_class(module)
    if lycoris_class is None:
        return module.create_network_from_weights(multiplier, str(file), vae, _text_encoder_argument(text_encoders),
                                                  unet, for_inference=for_inference, **kwargs)
    unet_view = lycoris_presets.kohya_unet_view(unet)
    # LyCORIS builds a throwaway network with the class's current preset first (LIBRARIES §4)
    lycoris_class.apply_preset(lycoris_presets.preset_for_unet(module, kwargs.get("preset"), unet_view))
    weights_sd = naming.rename_unet_aliases(read_state_dict(file),
                                            lycoris_presets.name_aliases(list(text_encoders), unet))
    with lycoris_presets.translated_errors(kwargs):
        return module.create_network_from_weights(
            multiplier, str(file), vae, lycoris_presets.kohya_text_encoder_argument(list(text_encoders)), unet_view,
            weights_sd=weights_sd, for_inference=for_inference, **kwargs)


@contextlib.contextmanager
def _lycoris_call(module: ModuleType, kwargs: dict[str, Any], text_encoders: list, unet: torch.nn.Module,
                  output_dir: str | os.PathLike | None) -> Iterator[tuple[dict[str, Any], Any, Any]]:
    """(kwargs, text-encoder argument, U-Net argument) for create_network: as given, or for LyCORIS the prepared
    preset and kohya's views of the models."""
    if lycoris_presets.lycoris_network_class(module) is None:
        yield kwargs, _text_encoder_argument(text_encoders), unet
        return
    with lycoris_presets.prepared_call(module, kwargs, unet, output_dir) as (call_kwargs, unet_view):
        yield call_kwargs, lycoris_presets.kohya_text_encoder_argument(list(text_encoders or [])), unet_view


# ----------------------------------------------------------------------------------------------- optimizer groups


def apply_loraplus_flags(network: Any, network_module: str, loraplus_lr_ratio: float | None = None,
                         loraplus_unet_lr_ratio: float | None = None,
                         loraplus_text_encoder_lr_ratio: float | None = None) -> None:
    """`--loraplus_lr_ratio` / `--loraplus_unet_lr_ratio` / `--loraplus_text_encoder_lr_ratio` on a created network.

    kohya's networks take the ratios through `set_loraplus_lr_ratio` (networks.lora, networks.dylora and LyCORIS
    have it); prepare_optimizer_params then puts lora_up weights in " plus" groups at lr × ratio. A ratio given
    only in --network_args stays; a flag wins over the same key there (logged). A network without LoRA+ support
    is an error, as in kohya, rather than a run that silently trains without it.
    """
    flags = dict(zip(LORAPLUS_FLAGS, (loraplus_lr_ratio, loraplus_unet_lr_ratio, loraplus_text_encoder_lr_ratio)))
    given = {key: float(value) for key, value in flags.items() if value is not None}
    if not given:
        return
    for key, value in given.items():
        if value <= 0:
            raise FlagError(f"--{key}: expected a ratio > 0 (lora_up trains at lr × ratio, e.g. 16), got {value:g}")
    if not callable(getattr(network, "set_loraplus_lr_ratio", None)):
        raise FlagError(f"--{next(iter(given))}: the network of --network_module {network_module} "
                        f"({type(network).__name__}) has no LoRA+ support (no set_loraplus_lr_ratio); use "
                        f"networks.lora, networks.dylora or lycoris.kohya, or leave the LoRA+ flags out")
    ratios = {}
    for key in LORAPLUS_FLAGS:
        from_args = getattr(network, key, None)
        if key in given and from_args is not None and float(from_args) != given[key]:
            logger.info("--%s %g replaces %s=%g of --network_args", key, given[key], key, from_args)
        ratios[key] = given.get(key, from_args)
    network.set_loraplus_lr_ratio(*ratios.values())
    logger.info("LoRA+: lora_up learning-rate ratio %s for the U-Net, %s for the text encoder(s)",
                ratios["loraplus_unet_lr_ratio"] or ratios["loraplus_lr_ratio"],
                ratios["loraplus_text_encoder_lr_ratio"] or ratios["loraplus_lr_ratio"])


def optimizer_param_groups(network: Any, *, text_encoder_lrs: list[float] | float | None, unet_lr: float | None,
                           learning_rate: float) -> tuple[list[dict], list[str]]:
    """(param groups, descriptions) from the network, the way kohya's trainer asks for them (COMPAT §16).

    `prepare_optimizer_params_with_multiple_te_lrs` gets the list; otherwise `prepare_optimizer_params` gets one
    scalar TE lr (LyCORIS would turn a list into a group whose lr *is* the list), and the 2-argument legacy
    signature is tried on TypeError. Groups without "lr" get learning_rate.
    """
    if isinstance(text_encoder_lrs, (int, float)):
        text_encoder_lrs = [float(text_encoder_lrs)]  # a TOML config may give a single number
    if hasattr(network, "prepare_optimizer_params_with_multiple_te_lrs"):
        result = network.prepare_optimizer_params_with_multiple_te_lrs(text_encoder_lrs, unet_lr, learning_rate)
    else:
        text_encoder_lr = text_encoder_lrs[0] if text_encoder_lrs else None
        try:
            result = network.prepare_optimizer_params(text_encoder_lr, unet_lr, learning_rate)
        except TypeError:
            logger.info("%s.prepare_optimizer_params takes no default lr; using the 2-argument form",
                        type(network).__name__)
            result = network.prepare_optimizer_params(text_encoder_lr, unet_lr)
    groups, descriptions = result if isinstance(result, tuple) else (result, None)
    groups = [dict(group) if isinstance(group, dict) else {"params": group} for group in groups]
    for group in groups:
        group["params"] = list(group["params"])
        if group.get("lr") is None:
            group["lr"] = learning_rate
    if descriptions is None or len(descriptions) != len(groups):
        descriptions = [f"group{index}" for index in range(len(groups))]
    return groups, list(descriptions)


# ----------------------------------------------------------------------------------------------- family check

FAMILY_LABELS = {"sd1": "SD1.x", "sd2": "SD2.x", "sdxl": "SDXL"}
SGM_UNET_STEMS = tuple(f"{naming.LORA_PREFIX_UNET}_{stem}_" for stem in ("input_blocks", "output_blocks",
                                                                           "middle_block"))
# In-features that only one family has (real model sizes; tiny test models match none, so they never decide):
# the cross-attention key projection sees the text width, a lora_te_ query projection the single encoder's.
CONTEXT_WIDTH_FAMILIES = {768: "sd1", 1024: "sd2", 2048: "sdxl"}
SINGLE_ENCODER_WIDTH_FAMILIES = {768: "sd1", 1024: "sd2"}
# (key prefix, key suffix, in-features -> family, what the width is)
WIDTH_EVIDENCE = (
    (naming.LORA_PREFIX_UNET + "_", "attn2_to_k." + naming.LORA_DOWN, CONTEXT_WIDTH_FAMILIES, "cross-attention width"),
    (naming.LORA_PREFIX_TEXT_ENCODER + "_", "self_attn_q_proj." + naming.LORA_DOWN, SINGLE_ENCODER_WIDTH_FAMILIES,
     "text-encoder width"),
)


def _family_group(family_name: str) -> str:
    """sd1 / sd1-v -> sd1, sd2 / sd2-v -> sd2, sdxl -> sdxl: the groups a LoRA file can be told apart by."""
    return family_name.split("-")[0]


def _families_from_prefixes(keys: list[str]) -> tuple[set[str] | None, str]:
    """Candidate families by key prefixes (TE prefixes first, then U-Net naming) and the evidence."""
    te_single = naming.LORA_PREFIX_TEXT_ENCODER + "_"
    if any(key.startswith(tuple(p + "_" for p in naming.LORA_PREFIX_TEXT_ENCODERS)) for key in keys):
        return {"sdxl"}, "lora_te1_*/lora_te2_* keys"
    has_single_te = any(key.startswith(te_single) for key in keys)
    has_sgm_unet = any(key.startswith(SGM_UNET_STEMS) for key in keys)
    if has_single_te and has_sgm_unet:
        return None, ""  # kohya's SDXL DyLoRA writes lora_te_ for both encoders (COMPAT §1.3): let shapes decide
    if has_single_te:
        return {"sd1", "sd2"}, "lora_te_* keys"
    if has_sgm_unet:
        return {"sdxl"}, "SGM U-Net names (lora_unet_input_blocks_*)"
    return None, ""


def _family_from_shapes(tensor_file: TensorFile, keys: list[str]) -> tuple[str | None, str]:
    """The family whose real text width matches a cross-attention / text-encoder LoRA input width."""
    for prefix, suffix, table, what in WIDTH_EVIDENCE:
        key = next((key for key in keys if key.startswith(prefix) and key.endswith(suffix)), None)
        if key is None:
            continue
        shape = tensor_file.shape(key)
        if len(shape) >= 2 and shape[1] in table:
            return table[shape[1]], f"{what} {shape[1]}"
    return None, ""


def check_network_weights_family(path: str | os.PathLike, family_name: str, flag: str = "--network_weights"
                                 ) -> str | None:
    """Refuse a LoRA file made for another model family, reading only its keys (and a shape or two).

    Returns the family group the file was recognised as ("sd1", "sd2", "sdxl") or None when it cannot be told.
    Raises FlagError naming the flag and the file when the file is missing or for another family.
    """
    if not Path(path).is_file():
        raise FlagError(f"{flag} {path}: file not found")
    tensor_file = TensorFile(path)
    try:
        keys = tensor_file.keys()
        kind = file_kind(keys)
        if keys and all(key.startswith("lllite_unet_") for key in keys):
            raise FlagError(f"{flag} {path}: is a ControlNet-LLLite file, not a LoRA; the generators take it as "
                            "--control_net_lllite_models, sdxl_train_control_net_lllite.py as --network_weights")
        if kind in ("checkpoint", "embedding", "vae", "bare-unet"):
            what = {"checkpoint": "a full model checkpoint", "embedding": "a textual-inversion embedding",
                    "vae": "a VAE", "bare-unet": "a U-Net state dict"}[kind]
            raise FlagError(f"{flag} {path}: is {what}, not a network (LoRA) file"
                            + ("; a base model goes in --pretrained_model_name_or_path" if kind == "checkpoint"
                               else ""))
        candidates, evidence = _families_from_prefixes(keys)
        if candidates is None or len(candidates) > 1:
            by_shape, shape_evidence = _family_from_shapes(tensor_file, keys)
            if by_shape is not None and (candidates is None or by_shape in candidates):
                candidates, evidence = {by_shape}, shape_evidence
    finally:
        tensor_file.close()
    model_group = _family_group(family_name)
    if candidates is None or model_group in candidates:
        return next(iter(candidates)) if candidates and len(candidates) == 1 else None
    found = "/".join(FAMILY_LABELS.get(group, group) for group in sorted(candidates))
    model_label = FAMILY_LABELS.get(model_group, family_name)
    raise FlagError(f"{flag} {path}: expected a network for {model_label}, got one for {found} ({evidence}); "
                    f"use a file trained on an {model_label} model")


# ----------------------------------------------------------------------------------------------- base weights


def apply_base_weights(module_name_or_module: str | ModuleType, files: list[str], multipliers: list[float] | None,
                       vae: Any, text_encoders: list, unet: torch.nn.Module, dtype: torch.dtype | None,
                       device: torch.device | str | None) -> None:
    """kohya's --base_weights: merge each file (× its --base_weights_multiplier, default 1.0) into the models."""
    if multipliers and len(multipliers) != len(files):
        raise FlagError(f"--base_weights_multiplier: expected one value per --base_weights file ({len(files)}), "
                        f"got {len(multipliers)}")
    module = (import_network_module(module_name_or_module) if isinstance(module_name_or_module, str)
              else module_name_or_module)
    multipliers = list(multipliers) if multipliers else [1.0] * len(files)
    encoder_argument = _text_encoder_argument(text_encoders)
    for file, multiplier in tqdm(list(zip(files, multipliers)), desc="base weights", leave=False):
        network, weights_sd = create_network_from_weights(module, multiplier, file, vae, text_encoders, unet,
                                                          for_inference=True, flag="--base_weights")
        network.merge_to(encoder_argument, unet, weights_sd, dtype, device)
        logger.info("merged --base_weights %s with multiplier %s", file, multiplier)


# ----------------------------------------------------------------------------------------------- network facts

_warned_max_norm: set[str] = set()


def max_norm_supported(network: Any) -> bool:
    """Whether --scale_weight_norms can work; kohya disables it with a warning when the network lacks it."""
    if callable(getattr(network, "apply_max_norm_regularization", None)):
        return True
    name = type(network).__name__
    if name not in _warned_max_norm:
        _warned_max_norm.add(name)
        logger.warning("--scale_weight_norms: %s has no apply_max_norm_regularization(); max-norm regularization "
                       "is disabled", name)
    return False


def describe_network(network: Any) -> str:
    """One line for the start-of-training summary: module counts and trainable parameters.

    All of the network's parameters count: LyCORIS switches requires_grad on only in prepare_optimizer_params.
    """
    text_encoder_loras = list(getattr(network, "text_encoder_loras", []) or [])
    unet_loras = list(getattr(network, "unet_loras", []) or [])
    if text_encoder_loras or unet_loras:
        modules = f"{len(text_encoder_loras)} text-encoder modules, {len(unet_loras)} U-Net modules"
    else:
        modules = f"{len(list(network.children()))} modules"
    parameter_count = sum(parameter.numel() for parameter in network.parameters())
    return f"network {type(network).__name__}: {modules}, {parameter_count:,} trainable parameters"
