"""Short, cheap identities of loaded models, stored in cache files so a cache made with another model is redone."""
from __future__ import annotations

import hashlib

import torch

SAMPLED_VALUES = 4096  # per tensor: enough to tell checkpoints apart, cheap for a 2.6B-parameter UNet


def module_fingerprint(module: torch.nn.Module, tensors: int = 4) -> str:
    """sha256 (16 hex digits) over the config, every parameter name/shape/dtype and a sample of the values.

    Values are sampled from the first and last `tensors` parameters (spread evenly over each tensor), so two
    checkpoints of the same architecture almost surely differ while hashing costs milliseconds.
    """
    digest = hashlib.sha256()
    config = getattr(module, "config", None)
    if config is not None:
        # private entries such as diffusers' `_use_default_values` come from sets: their order varies per process
        # (and a transformers config's `_name_or_path` says where it was read from, not what it is)
        entries = config.to_dict() if hasattr(config, "to_dict") else dict(config)
        items = sorted((key, repr(value)) for key, value in entries.items()
                       if not str(key).startswith("_") and key != "transformers_version")
        digest.update(repr(items).encode())
    named = list(module.named_parameters())
    for name, parameter in named:
        digest.update(f"{name}:{tuple(parameter.shape)}:{parameter.dtype}".encode())
    for _, parameter in named[:tensors] + named[-tensors:]:
        flat = parameter.detach().reshape(-1)
        step = max(1, flat.numel() // SAMPLED_VALUES)
        sample = flat[::step][:SAMPLED_VALUES].to(device="cpu", dtype=torch.float32)
        digest.update(sample.numpy().tobytes())
    return digest.hexdigest()[:16]
