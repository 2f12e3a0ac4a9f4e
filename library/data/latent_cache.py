"""Latent cache `.npz` files: names, keys, validity checks, reading and writing (COMPAT §7).

Owns the file format only; running the VAE and deciding what to cache live in `library/data/caching.py`.
"""
from __future__ import annotations

import json
import logging
import os
import re
import zipfile
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Literal, TypeVar

import numpy as np

from library.errors import UserInputError
from library.models.state_dict_io import atomic_output

logger = logging.getLogger(__name__)

T = TypeVar("T")

FAMILY_SUFFIXES = ("sd", "sdxl")
VAE_DOWNSCALE = 8  # SD/SDXL VAEs map 8x8 pixels to one latent (COMPAT §7.1)
ENTRY_KEYS = ("latents", "original_size", "crop_ltrb", "latents_flipped", "alpha_mask")
REQUIRED_KEYS = ("latents", "original_size", "crop_ltrb")
# Our own key; kohya ignores keys it does not know, so files stay readable by kohya and vice versa.
FINGERPRINT_KEY = "sdtk_fingerprint"
SKIP_CHECK_HINT = "run without --skip_cache_check so stale caches are made again, or delete the file"


class CacheError(UserInputError):
    """A cache file that cannot be used: names the file and the problem."""

    def __init__(self, path: object, problem: str, hint: str | None = None):
        self.path, self.problem = str(path), problem
        super().__init__(f"{self.path}: {problem}" + (f"; {hint}" if hint else ""))


@dataclass
class LatentCacheEntry:
    """The cached encoding of one image at one bucket resolution."""

    latents: np.ndarray  # float32 [4, H/8, W/8], unscaled VAE sample
    original_size: tuple[int, int]  # (W, H) of the image before resizing
    crop_ltrb: tuple[float, float, float, float]
    latents_flipped: np.ndarray | None = None
    alpha_mask: np.ndarray | None = None  # float32 [H, W] in bucket pixels, 0..1


@dataclass(frozen=True)
class CacheFingerprint:
    """What the latents depend on besides the image; stored so a cache from another VAE/dtype/crop is redone."""

    vae_id: str
    dtype: str
    bucket_reso: tuple[int, int]  # (W, H)
    crop: str

    def to_string(self) -> str:
        fields = asdict(self)
        fields["bucket_reso"] = list(self.bucket_reso)
        return json.dumps(fields, sort_keys=True)

    @classmethod
    def from_string(cls, text: str) -> CacheFingerprint:
        """Parse `to_string()` output; raises ValueError on anything else."""
        fields = json.loads(text)
        if not isinstance(fields, dict) or set(fields) != {"vae_id", "dtype", "bucket_reso", "crop"}:
            raise ValueError(f"not a latent cache fingerprint: {text[:80]!r}")
        return cls(vae_id=str(fields["vae_id"]), dtype=str(fields["dtype"]),
                   bucket_reso=tuple(int(value) for value in fields["bucket_reso"]), crop=str(fields["crop"]))

    def differences(self, other: CacheFingerprint) -> list[str]:
        """Names of the fields that differ, in declaration order."""
        return [name for name in ("vae_id", "dtype", "bucket_reso", "crop")
                if getattr(self, name) != getattr(other, name)]


# ---- names ------------------------------------------------------------------------------------------------------

def _check_family_suffix(family_suffix: str) -> None:
    if family_suffix not in FAMILY_SUFFIXES:
        raise ValueError(f"latent cache family suffix {family_suffix!r}: expected one of {FAMILY_SUFFIXES}")


def _without_extension(image_path: str | os.PathLike) -> Path:
    return Path(image_path).with_suffix("")


def latents_npz_path(image_path: str | os.PathLike, original_size: tuple[int, int],
                     family_suffix: Literal["sd", "sdxl"]) -> Path:
    """`<image path without ext>_<WWWW>x<HHHH>_<suffix>.npz`, original size zero-padded to 4 digits (COMPAT §7.2)."""
    _check_family_suffix(family_suffix)
    width, height = original_size
    base = _without_extension(image_path)
    return base.with_name(f"{base.name}_{int(width):04d}x{int(height):04d}_{family_suffix}.npz")


def legacy_npz_path(image_path: str | os.PathLike) -> Path:
    """`<image path without ext>.npz`, as written by kohya v0.9.1 and prepare_buckets_latents.py (COMPAT §7.2)."""
    base = _without_extension(image_path)
    return base.with_name(base.name + ".npz")


def existing_cache_path(image_path: str | os.PathLike, original_size: tuple[int, int],
                        family_suffix: Literal["sd", "sdxl"]) -> Path | None:
    """The cache file to use for an image, or None when there is none yet.

    A legacy `<stem>.npz` wins over the sized name when both exist. kohya does the same (COMPAT §7.2), and
    since kohya never writes the sized name while a legacy file exists, both can only exist when the legacy one
    was made later on purpose (prepare_buckets_latents.py); following kohya also means both tools read, check
    and refresh the same file.
    """
    legacy = legacy_npz_path(image_path)
    if legacy.is_file():
        return legacy
    current = latents_npz_path(image_path, original_size, family_suffix)
    return current if current.is_file() else None


def sizes_from_cache_names(folder: str | os.PathLike,
                           family_suffix: Literal["sd", "sdxl"]) -> dict[str, tuple[int, int]]:
    """Map `str(<image path without ext>)` to the (W, H) encoded in the cache file names of `folder`.

    kohya reads image sizes this way so cached images need not be opened (COMPAT §7.2). Sizes above 9999
    simply have more digits.
    """
    _check_family_suffix(family_suffix)
    pattern = re.compile(rf"^(?P<stem>.+)_(?P<width>\d{{4,}})x(?P<height>\d{{4,}})_{family_suffix}\.npz$")
    folder = Path(folder)
    sizes: dict[str, tuple[int, int]] = {}
    if not folder.is_dir():
        return sizes
    for path in folder.glob(f"*_{family_suffix}.npz"):
        match = pattern.match(path.name)
        if match:
            sizes[str(folder / match["stem"])] = (int(match["width"]), int(match["height"]))
    return sizes


def resolution_suffix(bucket_reso: tuple[int, int]) -> str:
    """`_<H/8>x<W/8>`: the key suffix of the multi-resolution form (COMPAT §7.3), in latent units, height first."""
    width, height = bucket_reso
    return f"_{height // VAE_DOWNSCALE}x{width // VAE_DOWNSCALE}"


# ---- reading ----------------------------------------------------------------------------------------------------

def read_npz_header(path: str | os.PathLike) -> dict[str, tuple[tuple[int, ...], np.dtype]]:
    """Shape and dtype of every array in an `.npz`, reading only the array headers (fast for big datasets).

    Raises CacheError when the file is not a readable npz archive (garbage, truncated, a bare .npy).
    """
    try:
        with zipfile.ZipFile(path) as archive:
            header = {}
            for member in archive.infolist():
                if not member.filename.endswith(".npy"):
                    continue
                with archive.open(member) as stream:
                    version = np.lib.format.read_magic(stream)
                    read = np.lib.format.read_array_header_1_0 if version == (1, 0) \
                        else np.lib.format.read_array_header_2_0
                    shape, _, dtype = read(stream)
                header[member.filename[:-len(".npy")]] = (tuple(shape), dtype)
            return header
    except (OSError, zipfile.BadZipFile, ValueError, EOFError) as error:
        raise CacheError(path, f"not a readable npz file (truncated or corrupt?): {error}") from None


def read_npz_arrays(path: str | os.PathLike, keys: list[str]) -> dict[str, np.ndarray]:
    """Load the named arrays (never unpickling); raises CacheError for unreadable files or missing keys."""
    try:
        with np.load(path, allow_pickle=False) as archive:
            missing = [key for key in keys if key not in archive.files]
            if missing:
                raise CacheError(path, f"missing key(s) {', '.join(missing)}")
            return {key: archive[key] for key in keys}
    except (OSError, zipfile.BadZipFile, ValueError, EOFError, AttributeError, TypeError) as error:
        # AttributeError/TypeError: np.load returned a bare array (a .npy renamed to .npz), not an archive
        raise CacheError(path, f"not a readable npz file (truncated or corrupt?): {error}") from None


@dataclass(frozen=True)
class _Problem:
    reason: str  # short and the same for every file, so a caller can count reasons
    detail: str  # for the error message of one file


def _stored_form(keys: set[str] | dict, bucket_reso: tuple[int, int]) -> str:
    """The key suffix to read: empty for kohya's snapshot keys, this bucket's suffix for the multi-resolution form."""
    suffix = resolution_suffix(bucket_reso)
    return suffix if "latents" + suffix in keys else ""


def _find_problem(header: dict, suffix: str, bucket_reso: tuple[int, int], need_flipped: bool, need_alpha: bool,
                  reject_unwanted_alpha: bool = True) -> _Problem | None:
    """The first reason the arrays described by `header` do not fit this bucket and these options."""
    wanted = list(REQUIRED_KEYS) + (["latents_flipped"] if need_flipped else []) + \
        (["alpha_mask"] if need_alpha else [])
    for key in wanted:
        if key + suffix not in header:
            return _Problem(f"missing {key}", f"has no {key + suffix!r} array")
    width, height = bucket_reso
    expected = (height // VAE_DOWNSCALE, width // VAE_DOWNSCALE)
    for key in ("latents", "latents_flipped"):
        shape = header.get(key + suffix, (None,))[0]
        if shape is not None and (len(shape) != 3 or tuple(shape[1:]) != expected):
            found = "x".join(str(size) for size in shape[1:]) if len(shape) == 3 else f"of shape {list(shape)}"
            return _Problem("latent size differs from bucket",
                            f"{key} are {found} but bucket {width}x{height} (WxH) needs {expected[0]}x{expected[1]} "
                            "(height x width in latents)")
    if "alpha_mask" + suffix in header and not need_alpha and reject_unwanted_alpha:
        # v0.9.1 rejects such files: they were made for a masked-loss run and their latents may differ
        return _Problem("alpha_mask present but not wanted", "holds an alpha_mask but alpha_mask is off")
    if need_alpha and tuple(header["alpha_mask" + suffix][0]) != (height, width):
        return _Problem("alpha_mask size differs from bucket",
                        f"alpha_mask is {list(header['alpha_mask' + suffix][0])} but bucket needs [{height}, {width}]")
    return None


def _fingerprint_problem(stored_array: np.ndarray, fingerprint: CacheFingerprint) -> _Problem | None:
    try:
        stored = CacheFingerprint.from_string(str(stored_array.item()))
    except ValueError:
        return _Problem("unreadable fingerprint", "its sdtk_fingerprint cannot be parsed")
    changed = stored.differences(fingerprint)
    if changed:
        names = {"vae_id": "VAE", "bucket_reso": "bucket"}
        return _Problem("made with another " + "/".join(names.get(name, name) for name in changed),
                        "was made with other settings: " + ", ".join(changed))
    return None


NOT_FINITE = "latents not finite (NaN/inf)"


def _non_finite_keys(arrays: dict[str, np.ndarray], keys: list[str]) -> list[str]:
    """The latent arrays holding NaN or inf: a half-precision VAE that overflowed wrote them, and training on
    them only ends in a NaN loss."""
    return [key for key in keys if key in arrays and not np.isfinite(arrays[key]).all()]


def check_latent_cache(path: str | os.PathLike, bucket_reso: tuple[int, int], need_flipped: bool, need_alpha: bool,
                       fingerprint: CacheFingerprint | None, skip_check: bool) -> tuple[bool, str]:
    """Whether a cache file can be reused as is; returns (valid, short reason for a log line).

    skip_check: only test that the file exists (kohya's --skip_cache_check). A file without our fingerprint
    (written by kohya) is valid when its keys and shapes fit, so existing caches are reused.
    """
    path = Path(path)
    if not path.is_file():
        return False, "no cache file"
    if skip_check:
        return True, "exists (not checked)"
    try:
        header = read_npz_header(path)
    except CacheError:
        return False, "unreadable npz"
    suffix = _stored_form(header, bucket_reso)
    problem = _find_problem(header, suffix, bucket_reso, need_flipped, need_alpha)
    if problem is None:
        problem = _content_problem(path, header, suffix, need_flipped, fingerprint)
    if problem is not None:
        logger.debug("%s: cache invalid: %s", path, problem.detail)
        return False, problem.reason
    return True, "ok"


def _content_problem(path: Path, header: dict, suffix: str, need_flipped: bool,
                     fingerprint: CacheFingerprint | None) -> _Problem | None:
    """Fingerprint and finite-latents checks, reading the few arrays they need in one pass over the file."""
    latent_keys = ["latents" + suffix] + (["latents_flipped" + suffix] if need_flipped else [])
    # our fingerprint describes the un-suffixed arrays only; suffixed ones come from newer kohya versions
    check_fingerprint = fingerprint is not None and not suffix and FINGERPRINT_KEY in header
    try:
        arrays = read_npz_arrays(path, latent_keys + ([FINGERPRINT_KEY] if check_fingerprint else []))
    except CacheError:
        return _Problem("unreadable npz", "an array cannot be read")
    if check_fingerprint:
        # a file without our fingerprint was written by kohya: reused when shapes and keys fit, as kohya does
        problem = _fingerprint_problem(arrays[FINGERPRINT_KEY], fingerprint)
        if problem is not None:
            return problem
    bad = _non_finite_keys(arrays, latent_keys)
    if bad:
        logger.warning("%s: cached %s contain NaN/inf values; encoding the image again", path, " and ".join(bad))
        return _Problem(NOT_FINITE, f"{' and '.join(bad)} contain NaN/inf values")
    return None


def load_latent_cache(path: str | os.PathLike, bucket_reso: tuple[int, int], need_flipped: bool,
                      need_alpha: bool) -> LatentCacheEntry:
    """Read the entry for `bucket_reso`, from kohya's snapshot keys or the suffixed multi-resolution keys.

    Raises CacheError naming the file and the problem (missing file or key, wrong size, corrupt archive,
    NaN/inf latents).
    """
    path = Path(path)
    if not path.is_file():
        raise CacheError(path, "latent cache file not found", SKIP_CHECK_HINT)
    header = read_npz_header(path)
    suffix = _stored_form(header, bucket_reso)
    # an unwanted alpha_mask only makes the check redo the file; reading simply ignores it
    problem = _find_problem(header, suffix, bucket_reso, need_flipped, need_alpha, reject_unwanted_alpha=False)
    if problem is not None:
        raise CacheError(path, problem.detail, SKIP_CHECK_HINT)
    keys = list(REQUIRED_KEYS) + [key for key in ("latents_flipped", "alpha_mask")
                                  if key + suffix in header and (key != "alpha_mask" or need_alpha)]
    arrays = read_npz_arrays(path, [key + suffix for key in keys])
    value = {key: arrays[key + suffix] for key in keys}
    bad = _non_finite_keys(value, ["latents", "latents_flipped"])
    if bad:
        raise CacheError(path, f"{' and '.join(bad)} contain NaN/inf values", SKIP_CHECK_HINT)
    return LatentCacheEntry(
        latents=value["latents"].astype(np.float32, copy=False),
        original_size=tuple(int(size) for size in value["original_size"].tolist()),
        crop_ltrb=tuple(value["crop_ltrb"].tolist()),
        latents_flipped=value["latents_flipped"].astype(np.float32, copy=False) if "latents_flipped" in value else None,
        alpha_mask=value["alpha_mask"].astype(np.float32, copy=False) if "alpha_mask" in value else None)


# ---- writing ----------------------------------------------------------------------------------------------------

def _kept_keys(path: Path, bucket_reso: tuple[int, int]) -> dict[str, np.ndarray]:
    """Arrays of an existing file that the new entry does not replace (kohya merges on write, COMPAT §7.1).

    Our un-suffixed entry keys are all dropped, not only those rewritten: a stale `alpha_mask` or
    `latents_flipped` from an earlier run would describe another encoding. Suffixed keys of this bucket are
    dropped too, because a reader prefers them over the new un-suffixed ones.
    """
    if not path.is_file():
        return {}
    suffix = resolution_suffix(bucket_reso)
    replaced = set(ENTRY_KEYS) | {FINGERPRINT_KEY} | {key + suffix for key in ENTRY_KEYS}
    try:
        header = read_npz_header(path)
        return read_npz_arrays(path, [key for key in header if key not in replaced])
    except CacheError as error:
        logger.warning("%s; overwriting it", error)
        return {}


def save_latent_cache(path: str | os.PathLike, entry: LatentCacheEntry, fingerprint: CacheFingerprint | None) -> None:
    """Write kohya's snapshot keys (un-suffixed) plus our fingerprint, merged into an existing file, atomically."""
    path = Path(path)
    latent_height, latent_width = entry.latents.shape[-2:]
    bucket_reso = (latent_width * VAE_DOWNSCALE, latent_height * VAE_DOWNSCALE)
    arrays = _kept_keys(path, bucket_reso)
    arrays["latents"] = np.asarray(entry.latents, dtype=np.float32)
    arrays["original_size"] = np.asarray([int(size) for size in entry.original_size])
    arrays["crop_ltrb"] = np.asarray(entry.crop_ltrb)
    if entry.latents_flipped is not None:
        arrays["latents_flipped"] = np.asarray(entry.latents_flipped, dtype=np.float32)
    if entry.alpha_mask is not None:
        arrays["alpha_mask"] = np.asarray(entry.alpha_mask, dtype=np.float32)
    if fingerprint is not None:
        # a 0-d unicode array loads with allow_pickle=False, unlike an object array
        arrays[FINGERPRINT_KEY] = np.array(fingerprint.to_string())
    # np.savez appends ".npz" to a path not ending in it (our temp name), so write through a file object
    with atomic_output(path, overwrite=True) as temp, open(temp, "wb") as stream:
        np.savez(stream, **arrays)


def shard_for_process(items: list[T], process_index: int, num_processes: int) -> list[T]:
    """The items one process caches: item i goes to process i % num_processes, like kohya (COMPAT §7.3)."""
    if num_processes < 1 or not 0 <= process_index < num_processes:
        raise ValueError(f"process_index {process_index} must be in [0, {num_processes}) with num_processes >= 1")
    return items[process_index::num_processes]
