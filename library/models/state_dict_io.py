"""Reading and writing flat tensor files (.safetensors, .ckpt/.pt/.bin) safely and atomically.

Reading is lazy (one tensor at a time, so a loader never holds two copies of a checkpoint); `.ckpt` files are
read with `torch.load(weights_only=True)` and never unpickle arbitrary code. Writing goes to a temp file in the
destination folder, then `os.replace`, so a crash never leaves a half-written file under the user's name.
"""
from __future__ import annotations

import contextlib
import errno
import os
import pickle
import secrets
import shutil
import warnings
from pathlib import Path
from typing import Callable, Iterator, Mapping

import torch

from library.errors import ModelFormatError, UserInputError

SAFETENSORS_SUFFIXES = (".safetensors", ".sft")
TORCH_SUFFIXES = (".ckpt", ".pt", ".pth", ".bin")
TEMP_SUFFIX = ".tmp"  # atomic writes go to `.<name>.<random>.tmp` beside the target


class UnsafeFileError(ModelFormatError):
    """A pickle file that needs more than tensors and plain values to load (possibly code); it is not unpickled."""


class DiskFullError(UserInputError):
    """Writing an output failed because its file system is full (or over quota)."""

    def __init__(self, path: object, free_bytes: int | None = None):
        self.path = Path(path)
        free = "" if free_bytes is None else f", {format_size(free_bytes)} free there"
        super().__init__(f"{self.path}: the disk is full (no space left in {self.path.parent}{free}); the file was "
                         "not written and an earlier file of that name is intact. Free some space or choose another "
                         "output folder")


def format_size(size: int) -> str:
    for unit in ("bytes", "KiB", "MiB", "GiB"):
        if size < 1024 or unit == "GiB":
            return f"{size:.0f} {unit}" if unit == "bytes" else f"{size:.1f} {unit}"
        size /= 1024
    return f"{size:.1f} TiB"


def safe_torch_load(path: str | os.PathLike, *, mmap: bool = False, allowed_globals: list | None = None):
    """`torch.load` that never runs code from the file: weights_only=True (tensors, numbers, strings, lists,
    dicts), plus `allowed_globals` where a caller needs a few known-safe types (numpy arrays in RNG states).

    Raises:
        UnsafeFileError: the pickle names other Python objects (or is a corrupt pickle); nothing was run.
        ModelFormatError: not a torch file, truncated or unreadable.
    """
    path = Path(path)
    try:
        with warnings.catch_warnings(), _allowing(allowed_globals or []):
            # torch warns about pickle protocols right before refusing a file; our one-line error says it all
            warnings.simplefilter("ignore", UserWarning)
            try:
                return torch.load(str(path), map_location="cpu", weights_only=True, mmap=mmap)
            except RuntimeError as error:
                if not mmap or "mmap" not in str(error):
                    raise
                return torch.load(str(path), map_location="cpu", weights_only=True)
    except pickle.UnpicklingError:
        # torch raises this type for every weights-only refusal (its wording changes between releases), and also
        # for bytes that are no pickle at all: a torch file is a zip archive or starts with a pickle protocol byte
        if not _looks_like_pickle(path):
            raise ModelFormatError(path, "not a readable torch file (not written by torch.save)") from None
        raise UnsafeFileError(path, "contains Python objects other than tensors and plain values; refusing to "
                                    "unpickle it, so no code in it can run") from None
    except FileNotFoundError:
        raise ModelFormatError(path, "file not found") from None
    except Exception as error:  # zip/EOF/key errors of a truncated or foreign file
        text = str(error)
        first_line = text.splitlines()[0] if text else type(error).__name__
        raise ModelFormatError(path, f"not a readable torch file (truncated or corrupt?): {first_line}") from None


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
        return safe_torch_load(self.path, mmap=True)

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


def _allowing(allowed_globals: list):
    """torch's context for extra safe types (torch >= 2.5); older torch only has the process-wide list."""
    if not allowed_globals:
        return contextlib.nullcontext()
    if hasattr(torch.serialization, "safe_globals"):
        return torch.serialization.safe_globals(allowed_globals)
    torch.serialization.add_safe_globals(allowed_globals)
    return contextlib.nullcontext()


def _looks_like_pickle(path: Path) -> bool:
    with open(path, "rb") as handle:
        start = handle.read(4)
    return start.startswith(b"PK\x03\x04") or start[:1] == b"\x80"


def _create_unique(parent: Path, prefix: str, suffix: str, create: Callable[[Path], None]) -> Path:
    """A new path `parent/<prefix><random><suffix>`, created by `create` (which must fail if it exists)."""
    for _ in range(100):
        candidate = parent / f"{prefix}{secrets.token_hex(4)}{suffix}"
        try:
            create(candidate)
            return candidate
        except FileExistsError:
            continue
    raise UserInputError(f"{parent}: cannot create a temporary file there")


def new_temp_file(path: Path) -> Path:
    """An empty hidden temp file beside `path`, ending in `path`'s suffix (writers that pick the format from
    the suffix still see it). Created with mode 0666 so the umask decides the permissions, as for any file the
    user writes (tempfile.mkstemp would make it 0600, unreadable to a web UI or a ComfyUI service)."""
    return _create_unique(path.parent, f".{path.name}.", TEMP_SUFFIX + path.suffix,
                          lambda candidate: os.close(os.open(candidate, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o666)))


def new_temp_folder(path: Path, suffix: str = TEMP_SUFFIX) -> Path:
    """An empty hidden temp folder beside `path`, mode 0777 minus the umask (mkdtemp would make it 0700)."""
    return _create_unique(path.parent, f".{path.name}.", suffix, lambda candidate: os.mkdir(candidate, 0o777))


def is_disk_full(error: BaseException, folder: Path) -> bool:
    """Did a write fail for lack of space? safetensors and torch.save do not always keep the errno."""
    if isinstance(error, OSError) and error.errno in (errno.ENOSPC, errno.EDQUOT):
        return True
    text = str(error)
    if "No space left" in text or "os error 28" in text or "Disk quota exceeded" in text:
        return True
    if isinstance(error, (OSError, RuntimeError)):  # torch.save: "unexpected pos ..." without the reason
        try:
            return shutil.disk_usage(folder).free < (1 << 20)
        except OSError:
            return False
    return False


def current_umask() -> int:
    mask = os.umask(0o022)  # the only way to read it is to set it; put it back at once
    os.umask(mask)
    return mask


def set_umask_permissions(path: Path) -> None:
    """The permissions a new file/folder gets from the umask. Writers that replace a file we created (safetensors'
    does) leave it 0600, which a web UI or ComfyUI running as another user cannot read."""
    os.chmod(path, (0o777 if path.is_dir() else 0o666) & ~current_umask())


def free_bytes(folder: Path) -> int | None:
    try:
        return shutil.disk_usage(folder).free
    except OSError:
        return None


def remove_path(path: Path) -> None:
    if path.is_dir() and not path.is_symlink():
        shutil.rmtree(path, ignore_errors=True)
    elif path.exists() or path.is_symlink():
        path.unlink(missing_ok=True)


@contextlib.contextmanager
def atomic_output(path: str | os.PathLike, overwrite: bool = True, folder: bool = False) -> Iterator[Path]:
    """Yield a temp path beside `path` (a file, or a folder with `folder=True`); on success it is renamed to
    `path`, else removed, so `path` is either the old content or the complete new one.

    Raises:
        UserInputError: `path` exists and `overwrite` is False.
        DiskFullError: the file system ran out of space while writing (the temp output is removed first).
    """
    path = Path(path)
    if (path.exists() or path.is_symlink()) and not overwrite:
        raise UserInputError(f"{path}: already exists; refusing to overwrite it")
    path.parent.mkdir(parents=True, exist_ok=True)
    temp = new_temp_folder(path) if folder else new_temp_file(path)
    try:
        yield temp
        set_umask_permissions(temp)
        if folder and path.is_dir():
            # a folder cannot be replaced by rename; move the old one aside first, so one of them is always there
            backup = new_temp_folder(path, suffix=".old")
            os.replace(path, backup / path.name)
            os.replace(temp, path)
            shutil.rmtree(backup, ignore_errors=True)
        else:
            os.replace(temp, path)
    except Exception as error:  # noqa: BLE001 - re-raised unless it is a full disk
        # a DiskFullError from a nested atomic write names its temp file; name the user's file instead
        full = isinstance(error, DiskFullError) or (not isinstance(error, UserInputError)
                                                    and is_disk_full(error, path.parent))
        remove_path(temp)
        if full:
            raise DiskFullError(path, free_bytes(path.parent)) from None
        raise
    finally:
        remove_path(temp)


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
