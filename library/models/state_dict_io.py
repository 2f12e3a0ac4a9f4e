"""Reading and writing flat tensor files (.safetensors, .ckpt/.pt/.bin) safely and atomically.

Reading is lazy (one tensor at a time, so a loader never holds two copies of a checkpoint); `.ckpt` files are
read with `torch.load(weights_only=True)` and never unpickle arbitrary code. Writing goes to a temp file in the
destination folder, then `os.replace`, so a crash never leaves a half-written file under the user's name.
"""
from __future__ import annotations

import contextlib
import os
import tempfile
import warnings
from pathlib import Path
from typing import Iterator, Mapping

import torch

from library.errors import ModelFormatError, UserInputError

SAFETENSORS_SUFFIXES = (".safetensors", ".sft")
TORCH_SUFFIXES = (".ckpt", ".pt", ".pth", ".bin")


class TensorFile:
    """Lazy read access to the tensors of one file: `keys()`, `get(key)`, `shape(key)`, `metadata`."""

    def __init__(self, path: str | os.PathLike):
        self.path = Path(path)
        self.metadata: dict[str, str] = {}
        self._safe = None
        self._tensors: Mapping[str, torch.Tensor] | None = None
        self.container: dict = {}  # the non-tensor entries of a .ckpt (epoch, global_step, ...)
        if not self.path.exists():
            raise ModelFormatError(self.path, "file not found")
        if self.path.is_dir():
            raise ModelFormatError(self.path, "is a folder; expected a .safetensors or .ckpt file")
        suffix = self.path.suffix.lower()
        if suffix in SAFETENSORS_SUFFIXES:
            self._open_safetensors()
        elif suffix in TORCH_SUFFIXES:
            self._open_torch()
        else:
            raise ModelFormatError(self.path, f"unknown file type {suffix!r}; expected one of "
                                              f"{', '.join(SAFETENSORS_SUFFIXES + TORCH_SUFFIXES)}")

    def _open_safetensors(self) -> None:
        from safetensors import safe_open

        try:
            self._safe = safe_open(str(self.path), framework="pt", device="cpu")
        except Exception as error:  # safetensors raises its own error types for corrupt headers
            raise ModelFormatError(self.path, f"not a readable safetensors file (truncated or corrupt?): {error}") from None
        self.metadata = dict(self._safe.metadata() or {})
        self._check_safetensors_size()

    def _check_safetensors_size(self) -> None:
        """A truncated file is caught here, before any tensor is read."""
        import json
        import struct

        with open(self.path, "rb") as handle:
            header_length = struct.unpack("<Q", handle.read(8))[0]
            header = json.loads(handle.read(header_length))
        data_end = max((entry["data_offsets"][1] for key, entry in header.items() if key != "__metadata__"), default=0)
        expected = 8 + header_length + data_end
        actual = self.path.stat().st_size
        if actual < expected:
            raise ModelFormatError(self.path, f"truncated safetensors file: {actual} bytes, the header needs {expected}")

    def _open_torch(self) -> None:
        with warnings.catch_warnings():
            # torch warns about pickle protocols right before refusing a file; our one-line error says it all
            warnings.simplefilter("ignore", UserWarning)
            loaded = self._torch_load()
        if not isinstance(loaded, dict):
            raise ModelFormatError(self.path, f"holds a {type(loaded).__name__}; expected a dict of tensors")
        state_dict = loaded.get("state_dict", loaded)
        if not isinstance(state_dict, dict):
            raise ModelFormatError(self.path, "its 'state_dict' entry is not a dict of tensors")
        if state_dict is not loaded:
            self.container = {key: value for key, value in loaded.items() if key != "state_dict"}
        self._tensors = {key: value for key, value in state_dict.items() if isinstance(value, torch.Tensor)}

    def _torch_load(self):
        try:
            try:
                return torch.load(str(self.path), map_location="cpu", weights_only=True, mmap=True)
            except RuntimeError as error:
                if "mmap" not in str(error):
                    raise
                return torch.load(str(self.path), map_location="cpu", weights_only=True)
        except Exception as error:
            text = str(error)
            if "Weights only load failed" in text or "Unsupported global" in text:
                raise ModelFormatError(self.path, "contains Python objects other than tensors; refusing to unpickle "
                                                  "it (only plain tensor checkpoints are read)") from None
            first_line = text.splitlines()[0] if text else type(error).__name__
            raise ModelFormatError(self.path, f"not a readable torch checkpoint (truncated or corrupt?): "
                                              f"{first_line}") from None

    def keys(self) -> list[str]:
        if self._safe is not None:
            return list(self._safe.keys())
        return list(self._tensors)

    def __contains__(self, key: str) -> bool:
        return key in set(self.keys())

    def get(self, key: str) -> torch.Tensor:
        if self._safe is not None:
            try:
                return self._safe.get_tensor(key)
            except Exception as error:
                raise ModelFormatError(self.path, f"cannot read tensor {key!r}: {error}") from None
        return self._tensors[key]

    def shape(self, key: str) -> tuple[int, ...]:
        if self._safe is not None:
            return tuple(self._safe.get_slice(key).get_shape())
        return tuple(self._tensors[key].shape)

    def read(self, keys: list[str] | None = None, dtype: torch.dtype | None = None) -> dict[str, torch.Tensor]:
        """Read tensors (all, or the given keys), casting floating-point ones to `dtype` one at a time."""
        result = {}
        for key in self.keys() if keys is None else keys:
            tensor = self.get(key)
            if dtype is not None and tensor.is_floating_point() and tensor.dtype != dtype:
                tensor = tensor.to(dtype)
            result[key] = tensor
        return result

    def close(self) -> None:
        self._safe = None
        self._tensors = None


def read_state_dict(path: str | os.PathLike, dtype: torch.dtype | None = None) -> dict[str, torch.Tensor]:
    """Read every tensor of a file (see TensorFile)."""
    return TensorFile(path).read(dtype=dtype)


@contextlib.contextmanager
def atomic_output(path: str | os.PathLike, overwrite: bool = True) -> Iterator[Path]:
    """Yield a temp path in the destination folder; on success it is renamed to `path`, else removed."""
    path = Path(path)
    if path.exists() and not overwrite:
        raise UserInputError(f"{path}: already exists; refusing to overwrite it")
    path.parent.mkdir(parents=True, exist_ok=True)
    handle, temp_name = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    os.close(handle)
    temp = Path(temp_name)
    try:
        yield temp
        os.replace(temp, path)
    finally:
        if temp.exists():
            temp.unlink()


def write_state_dict(path: str | os.PathLike, state_dict: Mapping[str, torch.Tensor],
                     metadata: Mapping[str, str] | None = None, container: Mapping | None = None,
                     overwrite: bool = True) -> None:
    """Write a flat tensor dict atomically: safetensors (with string metadata) or torch format by suffix.

    For `.ckpt` the dict is wrapped as `{"state_dict": ..., **container}` like the original checkpoints.
    """
    path = Path(path)
    suffix = path.suffix.lower()
    with atomic_output(path, overwrite=overwrite) as temp:
        if suffix in SAFETENSORS_SUFFIXES:
            from safetensors.torch import save_file

            tensors = {key: _contiguous(value) for key, value in state_dict.items()}
            save_file(tensors, str(temp), metadata=dict(metadata or {}))
        elif suffix in (".ckpt",):
            torch.save({"state_dict": dict(state_dict), **dict(container or {})}, str(temp))
        elif suffix in TORCH_SUFFIXES:
            torch.save(dict(state_dict), str(temp))
        else:
            raise UserInputError(f"{path}: unknown file type {suffix!r}; expected .safetensors or .ckpt")


def _contiguous(tensor: torch.Tensor) -> torch.Tensor:
    return tensor if tensor.is_contiguous() else tensor.contiguous()
