"""LyCORIS (`lycoris.kohya`) on our diffusers models as on kohya's own: its presets, module names and errors.

kohya trains SD1/SD2 on a diffusers-0.10-style U-Net and SDXL on an SGM-layout one, with transformers-4 CLIP paths
(COMPAT §1.5), and LyCORIS picks and names layers by those classes and paths. The views here show our models with
kohya's paths and class names, so every preset (built in or a .toml) selects and names what it would on kohya's
models. The calls themselves are in library/train/network_module.py.
"""
from __future__ import annotations

import contextlib
import difflib
import fnmatch
import functools
import logging
import os
import re
import tempfile
from collections import defaultdict
from collections.abc import Iterator
from pathlib import Path
from types import ModuleType
from typing import Any

import torch

from library.errors import FlagError
from networks import naming

logger = logging.getLogger(__name__)

DEFAULT_PRESET = "full"  # what lycoris.kohya uses without `preset=`
# apply_preset only sets the keys a preset has, and class attributes outlive a network: a preset applied earlier
# in the process would leak into the next one, so every preset is completed with these (LIBRARIES §4).
PRESET_RESET: dict[str, Any] = {"module_algo_map": {}, "name_algo_map": {}, "use_fnmatch": False, "exclude_name": []}
PRESET_FILE = "lycoris_preset.toml"

# Class names of kohya's U-Nets where they differ from diffusers' (library/original_unet.py,
# library/sdxl_original_unet.py). SDXL's time_embed / label_emb are plain nn.Sequential there.
KOHYA_CLASS_NAMES = {"Attention": "CrossAttention"}
SGM_SHARED_CLASSES = ("Transformer2DModel", "BasicTransformerBlock", "Attention", "FeedForward", "GEGLU",
                      "ResnetBlock2D", "Downsample2D", "Upsample2D")
GENERIC_CONTAINER = "ModuleList"


def lycoris_network_class(module: ModuleType) -> Any:
    """LyCORIS' kohya network class when `module` is lycoris.kohya (or alike), else None."""
    network_class = getattr(module, "LycorisNetworkKohya", None)
    return network_class if callable(getattr(network_class, "apply_preset", None)) else None


# ----------------------------------------------------------------------------------------------- kohya's view


class _ViewNode:
    """A container of a view: its children are other nodes or the model's real modules."""

    def __init__(self) -> None:
        self.children_by_name: dict[str, Any] = {}

    def named_modules(self, memo: Any = None, prefix: str = "", remove_duplicate: bool = True
                      ) -> Iterator[tuple[str, Any]]:
        yield prefix, self
        for name, child in self.children_by_name.items():
            yield from child.named_modules(prefix=f"{prefix}.{name}" if prefix else name)


@functools.cache
def _node_class(class_name: str) -> type[_ViewNode]:
    # LyCORIS matches presets against `type(module).__name__`
    return type(class_name, (_ViewNode,), {})


def _leaf_paths(unet: torch.nn.Module) -> dict[str, str]:
    """Our leaf layer path -> kohya's path of the same layer (SGM for SDXL, the same path for SD1/SD2)."""
    leaves = [path for path, module in unet.named_modules() if path and next(module.children(), None) is None]
    if not naming.scheme_for_unet(unet).sgm_unet_names:
        return {path: path for path in leaves}
    sgm_paths = naming.unet_sgm_module_paths(unet)
    # layers without weights (activations, dropout) have no SGM key; LyCORIS never wraps them
    return {path: sgm_paths[path] for path in leaves if path in sgm_paths}


def _container_paths(leaf_paths: dict[str, str]) -> dict[str, str]:
    """Our container path -> kohya's path of the same container, derived from where its layers went.

    A container whose layers keep their relative names (attn1.to_q) sits where those names end; one whose layers
    are renamed (ResNet conv1 -> in_layers.2) is the common prefix of their kohya paths, less the last part when
    that prefix is a layer (a sampler's single conv -> op).
    """
    candidates: dict[str, set[str]] = defaultdict(set)
    members: dict[str, list[str]] = defaultdict(list)
    for path, kohya_path in leaf_paths.items():
        parts = path.split(".")
        for depth in range(1, len(parts)):
            container, relative = ".".join(parts[:depth]), ".".join(parts[depth:])
            members[container].append(kohya_path)
            if kohya_path.endswith("." + relative):
                candidates[container].add(kohya_path[:-len(relative) - 1])
    paths = {}
    for container, kohya_paths in members.items():
        if len(candidates[container]) == 1:
            paths[container] = next(iter(candidates[container]))
            continue
        common = os.path.commonprefix([p.split(".") for p in kohya_paths])
        if ".".join(common) in kohya_paths:
            common = common[:-1]
        if common:
            paths[container] = ".".join(common)
    return paths


def _kohya_class_names(unet: torch.nn.Module, leaf_paths: dict[str, str]) -> dict[str, str]:
    """kohya path -> kohya class name for the containers kohya's U-Net has too."""
    sgm = naming.scheme_for_unet(unet).sgm_unet_names
    container_paths = _container_paths(leaf_paths)
    names: dict[str, str] = {}
    claimed: dict[str, int] = defaultdict(int)
    for path, module in unet.named_modules():
        class_name = type(module).__name__
        if not path or path not in container_paths or (sgm and class_name not in SGM_SHARED_CLASSES):
            continue
        kohya_path = container_paths[path]
        claimed[kohya_path] += 1
        names[kohya_path] = KOHYA_CLASS_NAMES.get(class_name, class_name)
    # a kohya path that two of our containers claim has no single counterpart: it stays a plain container
    return {path: name for path, name in names.items() if claimed[path] == 1}


def kohya_unet_view(unet: torch.nn.Module) -> _ViewNode:
    """Our U-Net as LyCORIS would see kohya's: `named_modules()` gives kohya's paths and class names, and the
    leaves are our real layers (so the modules LyCORIS makes wrap them). Only for selecting and naming."""
    leaf_paths = _leaf_paths(unet)
    class_names = _kohya_class_names(unet, leaf_paths)
    modules = dict(unet.named_modules())
    root = _node_class(type(unet).__name__)()
    nodes: dict[str, _ViewNode] = {"": root}
    for path, kohya_path in leaf_paths.items():
        parent, parts = root, kohya_path.split(".")
        for depth in range(1, len(parts)):
            node_path = ".".join(parts[:depth])
            if node_path not in nodes:
                nodes[node_path] = _node_class(class_names.get(node_path, GENERIC_CONTAINER))()
                parent.children_by_name[parts[depth - 1]] = nodes[node_path]
            parent = nodes[node_path]
        parent.children_by_name[parts[-1]] = modules[path]
    for node in nodes.values():  # kohya's order inside numbered lists (diffusers registers attentions first)
        if node.children_by_name and all(name.isdigit() for name in node.children_by_name):
            node.children_by_name = dict(sorted(node.children_by_name.items(), key=lambda item: int(item[0])))
    return root


def kohya_text_encoder_view(encoder: torch.nn.Module) -> Any:
    """The encoder itself, or for a CLIPTextModel that transformers 5 flattened (no `text_model` child) a view
    with kohya's `text_model.` paths (kohya's names are transformers 4 paths, COMPAT §1.5)."""
    if hasattr(encoder, naming.TEXT_MODEL_PATH):
        return encoder
    transformer = _node_class("CLIPTextTransformer")()
    transformer.children_by_name = dict(encoder.named_children())
    root = _node_class(type(encoder).__name__)()
    root.children_by_name = {naming.TEXT_MODEL_PATH: transformer}
    return root


def kohya_text_encoder_argument(text_encoders: list) -> Any:
    """kohya's text_encoder argument (one encoder alone, SDXL's two as a list), each as kohya's view."""
    views = [kohya_text_encoder_view(encoder) for encoder in text_encoders]
    return views[0] if len(views) == 1 else views


def name_aliases(text_encoders: list, unet: torch.nn.Module) -> dict[str, str]:
    """Our model's lora names -> kohya's, where they differ (diffusers SDXL paths, flattened CLIP encoders):
    LyCORIS files written with those names (ours before kohya's view) load under kohya's."""
    aliases = naming.diffusers_unet_name_aliases(unet, naming.scheme_for_unet(unet))
    for prefix, encoder in zip(naming.text_encoder_prefixes(len(text_encoders)), text_encoders):
        if hasattr(encoder, naming.TEXT_MODEL_PATH):
            continue
        for path, _ in encoder.named_modules():
            if path:
                aliases[naming.lora_name(prefix, path)] = naming.lora_name(prefix, f"{naming.TEXT_MODEL_PATH}.{path}")
    return aliases


# ----------------------------------------------------------------------------------------------- presets


def resolve_preset(module: ModuleType, preset: str | None) -> dict[str, Any]:
    """The complete preset dict for `preset=<name or .toml>` (LyCORIS' default when None)."""
    builtin = getattr(module, "PRESET", {})
    name = preset or DEFAULT_PRESET
    if name in builtin:
        given = builtin[name]
    elif Path(name).is_file():
        given = module.read_preset(name)
        if given is None:
            raise FlagError(f"--network_args preset={name}: not a valid LyCORIS preset toml (see the message above)")
    else:
        hint = f"; did you mean {close[0]}?" if (close := difflib.get_close_matches(name, list(builtin), n=1)) else ""
        raise FlagError(f"--network_args preset={name}: expected a LyCORIS preset name ({', '.join(builtin)}) "
                        f"or a preset .toml file, got neither{hint}")
    # keys a preset leaves out keep LyCORIS' own defaults, as in a fresh process on kohya
    return {**builtin.get(DEFAULT_PRESET, {}), **PRESET_RESET, **given}


def _matches(pattern: str, name: str, use_fnmatch: bool) -> bool:
    """LyCORIS' rule: fnmatch with use_fnmatch, else re.match (a prefix match), or the exact name."""
    if name == pattern:
        return True
    return fnmatch.fnmatch(name, pattern) if use_fnmatch else re.match(pattern, name) is not None


def without_duplicate_targets(preset: dict[str, Any], unet_view: _ViewNode, label: str) -> dict[str, Any]:
    """The preset less the U-Net name targets whose layers a class target already covers.

    LyCORIS 4.1.3's built-in presets target `TimestepEmbedding` by class and `time_embedding.linear_1` by name,
    then refuse the duplicated lora name (on kohya's SD1 U-Net as on ours). A name whose matches lie partly inside
    class targets is narrowed to the exact paths outside them.
    """
    use_fnmatch = bool(preset.get("use_fnmatch"))
    classes = set(preset.get("unet_target_module") or [])
    names = list(preset.get("unet_target_name") or [])
    excluded = list(preset.get("exclude_name") or [])
    paths = [path for path, _ in unet_view.named_modules()
             if path and not any(_matches(pattern, path, use_fnmatch) for pattern in excluded)]
    modules = dict(unet_view.named_modules())
    roots = [path for path in paths if type(modules[path]).__name__ in classes
             and not any(_matches(pattern, path, use_fnmatch) for pattern in names)]
    kept, dropped = [], []
    for pattern in names:
        matched = [path for path in paths if _matches(pattern, path, use_fnmatch)]
        covered = {path for path in matched if any(path.startswith(root + ".") for root in roots)}
        if not covered:
            kept.append(pattern)
            continue
        dropped.append(pattern)
        kept += [path if use_fnmatch else re.escape(path) + "$" for path in matched if path not in covered]
    if dropped:
        logger.info("lycoris.kohya preset=%s: unet_target_name %s dropped, their layers are already targeted by "
                    "class (LyCORIS would refuse the duplicated lora names)", label, ", ".join(dropped))
    return {**preset, "unet_target_name": kept}


def preset_for_unet(module: ModuleType, preset: str | None, unet_view: _ViewNode) -> dict[str, Any]:
    return without_duplicate_targets(resolve_preset(module, preset), unet_view, preset or DEFAULT_PRESET)


@contextlib.contextmanager
def prepared_call(module: ModuleType, kwargs: dict[str, Any], unet: torch.nn.Module,
                  output_dir: str | os.PathLike | None) -> Iterator[tuple[dict[str, Any], _ViewNode]]:
    """(kwargs, U-Net view) for lycoris.kohya's create_network: the preset made complete and free of duplicate
    targets, applied and written to a temp toml passed as `preset` (removed afterwards: LyCORIS reads it during
    create_network)."""
    import toml

    view = kohya_unet_view(unet)
    preset = preset_for_unet(module, kwargs.get("preset"), view)
    temp_parent = str(output_dir) if output_dir and Path(output_dir).is_dir() else None
    with tempfile.TemporaryDirectory(prefix="lycoris-preset-", dir=temp_parent) as temp_dir:
        preset_path = Path(temp_dir) / PRESET_FILE
        preset_path.write_text(toml.dumps(preset), encoding="utf-8")
        # also applied here: LyCORIS' toml reader drops empty maps, so it would not reset a leaked one
        lycoris_network_class(module).apply_preset(preset)
        yield {**kwargs, "preset": str(preset_path)}, view


@contextlib.contextmanager
def translated_errors(kwargs: dict[str, Any]) -> Iterator[None]:
    """Turn LyCORIS' "duplicated lora name" assertion (a preset that hits one layer twice) into a FlagError."""
    try:
        yield
    except AssertionError as error:
        if "duplicated lora name" not in str(error):
            raise
        raise FlagError(f"--network_args preset={kwargs.get('preset') or DEFAULT_PRESET}: {error}; this LyCORIS "
                        "preset targets one layer twice (by two classes, or by a class and a name pattern); "
                        "list each layer once") from None
