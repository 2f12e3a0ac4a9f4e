"""The metadata of trained files: kohya's `ss_*` training keys (COMPAT §2.1), the base-model hashes (§2.2) and
the `modelspec.*` keys (§2.3). Every value is a string. The `sshs_*` hashes of the saved tensors are computed
by the network's `save_weights`, not here.
"""
from __future__ import annotations

import argparse
import base64
import datetime
import functools
import hashlib
import json
import logging
import os
import subprocess
import time
from pathlib import Path

from tqdm import tqdm

from library.data.buckets import mean_aspect_error
from library.errors import FlagError
from library.families import ModelFamily
from library.options.dataset import parse_face_crop_aug_range, parse_resolution

logger = logging.getLogger(__name__)

# kohya's old A1111 "model hash": SHA-256 of the 64 KiB at offset 1 MiB, first 8 hex digits (COMPAT §2.2)
LEGACY_HASH_OFFSET = 0x100000
LEGACY_HASH_LENGTH = 0x10000
HASH_BLOCK_SIZE = 1 << 20
HASH_PROGRESS_MIN_BYTES = 256 << 20  # show a progress bar when hashing files from this size on
UNKNOWN_COMMIT = "(unknown)"

# what `--no_metadata` keeps [library/train_util.py: SS_METADATA_MINIMUM_KEYS] (COMPAT §2.1)
SS_METADATA_MINIMUM_KEYS = ("ss_v2", "ss_base_model_version", "ss_network_module", "ss_network_dim",
                            "ss_network_alpha", "ss_network_args")

# ss key = "ss_" + flag name; written as given (None -> "None")
FLAGS_AS_GIVEN = (
    "output_name", "learning_rate", "text_encoder_lr", "unet_lr", "gradient_checkpointing",
    "gradient_accumulation_steps", "lr_scheduler", "network_dim", "network_alpha", "network_dropout",
    "mixed_precision", "clip_skip", "max_token_length", "seed", "lowram", "noise_offset",
    "multires_noise_iterations", "multires_noise_discount", "adaptive_noise_scale", "zero_terminal_snr",
    "training_comment", "max_grad_norm", "caption_dropout_rate", "caption_dropout_every_n_epochs",
    "caption_tag_dropout_rate", "prior_loss_weight", "min_snr_gamma", "scale_weight_norms", "ip_noise_gamma",
    "noise_offset_random_strength", "ip_noise_gamma_random_strength", "loss_type", "huber_schedule", "huber_scale",
    "huber_c", "validation_seed", "validation_split", "max_validation_steps", "validate_every_n_epochs",
    "validate_every_n_steps", "resize_interpolation",
)
# kohya wraps these flags in bool(), so a missing one reads "False" (train_network.py: metadata dict)
FLAGS_AS_BOOL = {"ss_full_fp16": ("full_fp16",), "ss_cache_latents": ("cache_latents", "cache_latents_to_disk"),
                 "ss_debiased_estimation": ("debiased_estimation_loss",), "ss_fp8_base": ("fp8_base",),
                 "ss_fp8_base_unet": ("fp8_base_unet",)}

MODELSPEC_VERSION = "1.0.1"
IMPLEMENTATION_STABILITY_AI = "https://github.com/Stability-AI/generative-models"
IMPLEMENTATION_DIFFUSERS = "diffusers"
# kind -> (architecture suffix, default title prefix)
MODELSPEC_KINDS = {"lora": ("/lora", "LoRA"), "textual-inversion": ("/textual-inversion", "TextualInversion"),
                   "checkpoint": ("", "Checkpoint"), "diffusers": ("", "Checkpoint"),
                   # kohya builds LLLite's as an SDXL LoRA's (title LoRA@<time>), then names the architecture
                   "control-net-lllite": ("/control-net-lllite", "LoRA")}
# modelspec key -> flag, copied when given
MODELSPEC_TEXT_FLAGS = {"author": "metadata_author", "description": "metadata_description",
                        "license": "metadata_license", "tags": "metadata_tags", "usage_hint": "metadata_usage_hint",
                        "merged_from": "metadata_merged_from", "trigger_phrase": "metadata_trigger_phrase",
                        "preprocessor": "metadata_preprocessor"}
THUMBNAIL_MIME_TYPES = {".png": "image/png", ".jpg": "image/jpeg", ".jpeg": "image/jpeg", ".webp": "image/webp",
                        ".gif": "image/gif", ".bmp": "image/bmp", ".avif": "image/avif"}
TRUE_TEXTS, FALSE_TEXTS = ("true", "yes", "1"), ("false", "no", "0")


# ---- hashes and provenance -----------------------------------------------------------------------------------

def file_model_hashes(path: str | os.PathLike | None) -> tuple[str | None, str | None]:
    """(old A1111 hash, full SHA-256) of a model file; (None, None) for a folder or a missing path."""
    if path is None or not Path(path).is_file():
        return None, None
    path = Path(path)
    size = path.stat().st_size
    full = hashlib.sha256()
    with open(path, "rb") as file:
        file.seek(LEGACY_HASH_OFFSET)
        legacy = hashlib.sha256(file.read(LEGACY_HASH_LENGTH)).hexdigest()[:8]
        file.seek(0)
        with tqdm(total=size, unit="B", unit_scale=True, desc=f"hashing {path.name}", leave=False,
                  disable=size < HASH_PROGRESS_MIN_BYTES) as progress:
            for block in iter(lambda: file.read(HASH_BLOCK_SIZE), b""):
                full.update(block)
                progress.update(len(block))
    return legacy, full.hexdigest()


@functools.lru_cache(maxsize=1)
def trainer_commit() -> str:
    """git HEAD of this repository, or "(unknown)" (kohya's get_git_revision_hash)."""
    repo_root = Path(__file__).resolve().parents[2]
    try:
        result = subprocess.run(["git", "rev-parse", "HEAD"], cwd=repo_root, capture_output=True, text=True,
                                timeout=10, check=False)
    except (OSError, subprocess.SubprocessError):
        return UNKNOWN_COMMIT
    commit = result.stdout.strip()
    return commit if result.returncode == 0 and commit else UNKNOWN_COMMIT


def _text(value: object) -> str:
    """kohya stores str(value): None -> "None", True -> "True", (1024, 1024) -> "(1024, 1024)"."""
    return str(value)


# ---- ss_* keys -----------------------------------------------------------------------------------------------

def training_metadata(args: argparse.Namespace, family: ModelFamily, *, session_id: int, started_at: float,
                      train_group, val_group, num_batches_per_epoch: int, num_epochs: int, max_train_steps: int,
                      optimizer_description: str, network_module: str, network_args: dict | None,
                      lr_warmup_steps: int, commit: str | None = None, num_processes: int = 1) -> dict[str, str]:
    """kohya's `ss_*` keys of one run, as strings (COMPAT §2.1); ss_steps/ss_epoch are added per save.

    Reads the flags from `args` with getattr, so a flag the script does not declare reads "None".
    network_args: the parsed --network_args dict (None when the flag was not given: no ss_network_args).
    num_processes: for ss_total_batch_size (batch size x processes x gradient accumulation).
    """
    values: dict[str, object] = {
        "ss_session_id": session_id,
        "ss_training_started_at": started_at,
        "ss_num_train_images": train_group.num_train_images,
        "ss_num_validation_images": val_group.num_train_images if val_group is not None else 0,
        "ss_num_reg_images": train_group.num_reg_images,
        "ss_num_batches_per_epoch": num_batches_per_epoch,
        "ss_num_epochs": num_epochs,
        "ss_max_train_steps": max_train_steps,
        "ss_lr_warmup_steps": lr_warmup_steps,
        "ss_network_module": network_module,
        "ss_v2": family.is_sd2,
        "ss_base_model_version": family.model_version,
        "ss_sd_scripts_commit_hash": commit or trainer_commit(),
        "ss_optimizer": optimizer_description,
    }
    values.update({f"ss_{name}": getattr(args, name, None) for name in FLAGS_AS_GIVEN})
    values.update({key: any(getattr(args, name, None) for name in names) for key, names in FLAGS_AS_BOOL.items()})
    face_crop = getattr(args, "face_crop_aug_range", None)
    # kohya parses the flag into a tuple before it is stored: "(2.0, 4.0)"
    values["ss_face_crop_aug_range"] = parse_face_crop_aug_range(face_crop) if isinstance(face_crop, str) else face_crop
    if network_args is not None:
        # the caller passes kohya's dict, which already holds the "dropout" kohya adds (COMPAT §2.1)
        values["ss_network_args"] = json.dumps(network_args)
    values.update(_model_file_keys(getattr(args, "pretrained_model_name_or_path", None), "sd_model"))
    values.update(_model_file_keys(getattr(args, "vae", None), "vae"))
    if getattr(args, "dataset_config", None):
        values.update(_config_dataset_keys(train_group.datasets))
    else:
        values.update(_flag_dataset_keys(args, train_group.datasets, num_processes))
    return {key: _text(value) for key, value in values.items()}


def _model_file_keys(name_or_path: str | None, what: str) -> dict[str, object]:
    """ss_<what>_name (basename when the path exists, else the hub id) and, for files, the two hashes."""
    if name_or_path is None:
        return {}
    name = name_or_path
    keys: dict[str, object] = {}
    if os.path.exists(name_or_path):
        name = Path(name_or_path).name
        legacy, full = file_model_hashes(name_or_path)
        if legacy is not None:  # a diffusers folder has no single file to hash
            keys[f"ss_{what}_hash"], keys[f"ss_new_{what}_hash"] = legacy, full
    keys[f"ss_{what}_name"] = name
    return keys


# ---- dataset keys --------------------------------------------------------------------------------------------

def _subset_name(dataset, subset) -> str | None:
    """The folder (or, for fine-tuning, metadata file) basename a subset is listed under."""
    if dataset.kind != "dreambooth" and subset.metadata_file:
        return Path(subset.metadata_file).name
    return Path(subset.image_dir).name if subset.image_dir else None


def _subset_image_count(dataset, subset_index: int) -> int:
    return sum(1 for info in dataset.images if info.subset_index == subset_index)


def _repeated_count(dataset, is_reg: bool) -> int:
    return sum(info.num_repeats for info in dataset.images if info.is_reg == is_reg)


def dataset_tag_frequency(dataset) -> dict[str, dict[str, int]]:
    """{dir basename: {tag: images whose caption has it}}; tags are comma-split, stripped, lower-cased captions.

    Regularisation subsets are left out and a folder listed twice counts once per image (COMPAT §2.1).
    """
    frequency: dict[str, dict[str, int]] = {}
    for index, subset in enumerate(dataset.subsets):
        name = _subset_name(dataset, subset)
        if subset.is_reg or name is None:
            continue
        counts = frequency.setdefault(name, {})
        for info in dataset.images:
            if info.subset_index != index:
                continue
            for tag in info.caption.split(","):
                tag = tag.strip().lower()
                if tag:
                    counts[tag] = counts.get(tag, 0) + 1
    return frequency


def dataset_bucket_info(dataset) -> dict | None:
    """kohya's bucket_info: used buckets by index in the sorted bucket list, and the mean |aspect error|.

    None without enable_bucket, as in kohya. The error is the mean over images (not repeats) of
    |bucket aspect - image aspect|.
    """
    settings = dataset.assigner.settings
    if not settings.enable_bucket:
        return None
    counts = dataset.bucket_counts()
    # predefined buckets keep their index in the full sorted list; bucket_no_upscale lists only the used ones
    resolutions = list(dataset.assigner.predefined) or sorted(counts)
    buckets = {index: {"resolution": list(reso), "count": counts[reso]}
               for index, reso in enumerate(resolutions) if counts.get(reso)}
    return {"buckets": buckets, "mean_img_ar_error": mean_aspect_error(info.bucket for info in dataset.images)}


def _bucket_range(dataset) -> tuple[int | None, int | None]:
    """min/max bucket sides as used (rounded to the step); kohya stores None without enable_bucket."""
    settings = dataset.assigner.settings
    if not settings.enable_bucket:
        return None, None
    return settings.min_bucket_reso, settings.max_bucket_reso


def _subset_entry(dataset, index: int, subset) -> dict:
    entry = {
        "img_count": _subset_image_count(dataset, index), "num_repeats": subset.num_repeats,
        "color_aug": bool(subset.color_aug), "flip_aug": bool(subset.flip_aug),
        "random_crop": bool(subset.random_crop), "shuffle_caption": bool(subset.shuffle_caption),
        "keep_tokens": subset.keep_tokens, "keep_tokens_separator": subset.keep_tokens_separator,
        "secondary_separator": subset.secondary_separator, "enable_wildcard": bool(subset.enable_wildcard),
        "caption_prefix": subset.caption_prefix, "caption_suffix": subset.caption_suffix,
        "resize_interpolation": subset.resize_interpolation,
    }
    if subset.image_dir:
        entry["image_dir"] = Path(subset.image_dir).name
    if dataset.kind == "dreambooth":
        entry["class_tokens"], entry["is_reg"] = subset.class_tokens, bool(subset.is_reg)
    elif subset.metadata_file:
        entry["metadata_file"] = Path(subset.metadata_file).name
    return entry


def _dataset_entry(dataset) -> dict:
    params = dataset.params
    min_reso, max_reso = _bucket_range(dataset)
    return {
        "is_dreambooth": dataset.kind == "dreambooth", "batch_size_per_device": params.batch_size,
        "num_train_images": _repeated_count(dataset, is_reg=False),
        "num_reg_images": _repeated_count(dataset, is_reg=True),
        "resolution": list(params.resolution), "enable_bucket": bool(dataset.assigner.settings.enable_bucket),
        "min_bucket_reso": min_reso, "max_bucket_reso": max_reso,
        "tag_frequency": dataset_tag_frequency(dataset), "bucket_info": dataset_bucket_info(dataset),
        "resize_interpolation": params.resize_interpolation,
        "subsets": [_subset_entry(dataset, index, subset) for index, subset in enumerate(dataset.subsets)],
    }


def _config_dataset_keys(datasets: list) -> dict[str, str]:
    """ss_datasets, ss_tag_frequency, ss_dataset_dirs for a --dataset_config run (COMPAT §2.1)."""
    tag_frequency: dict[str, dict[str, int]] = {}
    dataset_dirs: dict[str, dict[str, int]] = {}
    for dataset in datasets:
        for name, counts in dataset_tag_frequency(dataset).items():
            tag_frequency.setdefault(name, counts)  # a folder used by two datasets counts once
        for index, subset in enumerate(dataset.subsets):
            name = _subset_name(dataset, subset)
            if subset.is_reg or name is None:
                continue
            unique, number = name, 2
            while unique in dataset_dirs:  # kohya lists a folder used twice as "name (2)", "name (3)", ...
                unique, number = f"{name} ({number})", number + 1
            dataset_dirs[unique] = {"n_repeats": subset.num_repeats, "img_count": _subset_image_count(dataset, index)}
    return {"ss_datasets": json.dumps([_dataset_entry(dataset) for dataset in datasets]),
            "ss_tag_frequency": json.dumps(tag_frequency), "ss_dataset_dirs": json.dumps(dataset_dirs)}


def _flag_dataset_keys(args: argparse.Namespace, datasets: list, num_processes: int) -> dict[str, object]:
    """The per-flag dataset keys kohya writes when no --dataset_config is used (one dataset)."""
    dataset = datasets[0]
    dataset_dirs: dict[str, dict[str, int]] = {}
    reg_dataset_dirs: dict[str, dict[str, int]] = {}
    for dataset_item in datasets:
        for index, subset in enumerate(dataset_item.subsets):
            name = _subset_name(dataset_item, subset)
            target = reg_dataset_dirs if subset.is_reg else dataset_dirs
            target[name] = {"n_repeats": subset.num_repeats, "img_count": _subset_image_count(dataset_item, index)}
    batch_size = getattr(args, "train_batch_size", None) or dataset.params.batch_size
    accumulation = getattr(args, "gradient_accumulation_steps", None) or 1
    settings = dataset.assigner.settings
    min_reso, max_reso = _bucket_range(dataset)
    return {
        "ss_batch_size_per_device": batch_size, "ss_total_batch_size": batch_size * num_processes * accumulation,
        "ss_resolution": tuple(dataset.params.resolution),
        **{f"ss_{name}": bool(getattr(args, name, None))
           for name in ("color_aug", "flip_aug", "random_crop", "shuffle_caption")},
        "ss_enable_bucket": bool(settings.enable_bucket), "ss_bucket_no_upscale": bool(settings.bucket_no_upscale),
        "ss_min_bucket_reso": min_reso, "ss_max_bucket_reso": max_reso,
        "ss_keep_tokens": getattr(args, "keep_tokens", None),
        "ss_dataset_dirs": json.dumps(dataset_dirs), "ss_reg_dataset_dirs": json.dumps(reg_dataset_dirs),
        "ss_tag_frequency": json.dumps(dataset_tag_frequency(dataset)),
        "ss_bucket_info": json.dumps(dataset_bucket_info(dataset)),
    }


# ---- modelspec.* keys ----------------------------------------------------------------------------------------

def thumbnail_url(value: str) -> str:
    """A data:/http(s) URL as is; an image file as a base64 data: URL (kohya converts paths, COMPAT §2.3)."""
    if value.startswith(("data:", "http://", "https://")):
        return value
    path = Path(value).expanduser()
    if not path.is_file():
        raise FlagError(f"--metadata_thumbnail {value}: file not found; expected an image file "
                        f"({', '.join(THUMBNAIL_MIME_TYPES)}) or a data: URL")
    mime_type = THUMBNAIL_MIME_TYPES.get(path.suffix.lower())
    if mime_type is None:
        raise FlagError(f"--metadata_thumbnail {value}: expected an image file ({', '.join(THUMBNAIL_MIME_TYPES)}), "
                        f"got {path.suffix or 'a name without extension'}")
    try:
        data = path.read_bytes()
    except OSError as error:
        raise FlagError(f"--metadata_thumbnail {value}: cannot read the file: {error}") from error
    return f"data:{mime_type};base64,{base64.b64encode(data).decode('ascii')}"


def negative_embedding_text(value: object) -> str:
    """--metadata_is_negative_embedding as the modelspec's "true"/"false"."""
    text = str(value).strip().lower()
    if text in TRUE_TEXTS:
        return "true"
    if text in FALSE_TEXTS:
        return "false"
    raise FlagError(f"--metadata_is_negative_embedding {value!r}: expected true or false")


def _implementation(family: ModelFamily, kind: str) -> str:
    # kohya: SDXL LoRA, every embedding and single-file checkpoint follow Stability AI's reference code; SD1/2
    # LoRA and diffusers-folder saves name diffusers (sai_model_spec.build_metadata, COMPAT §2.3)
    if kind == "diffusers" or (kind == "lora" and family.name != "sdxl"):
        return IMPLEMENTATION_DIFFUSERS
    return IMPLEMENTATION_STABILITY_AI


def _timestep_range(args: argparse.Namespace) -> str | None:
    low, high = getattr(args, "min_timestep", None), getattr(args, "max_timestep", None)
    if low is None and high is None:
        return None
    return f"{0 if low is None else low},{1000 if high is None else high}"


def modelspec_metadata(args: argparse.Namespace, family: ModelFamily, *, kind: str = "lora",
                       started_at: float | None = None, resolution: tuple[int, int] | None = None,
                       commit: str | None = None) -> dict[str, str]:
    """The `modelspec.*` keys (SAI model spec 1.0.1, COMPAT §2.3); keys without a value are left out.

    kind: "lora", "textual-inversion", "checkpoint" (single file) or "diffusers" (pipeline folder).
    resolution: (width, height) trained at; default --resolution, else the family's native size.
    Raises FlagError for a --metadata_thumbnail file that is missing or not an image.
    """
    if kind not in MODELSPEC_KINDS:
        raise ValueError(f"unknown modelspec kind {kind!r}; expected one of {sorted(MODELSPEC_KINDS)}")
    suffix, title_prefix = MODELSPEC_KINDS[kind]
    timestamp = int(time.time() if started_at is None else started_at)
    title = getattr(args, "metadata_title", None)
    if title is None:
        title = getattr(args, "output_name", None)
    if resolution is None and getattr(args, "resolution", None) is not None:
        resolution = parse_resolution(args.resolution)
    width, height = resolution or (family.default_resolution, family.default_resolution)
    clip_skip = getattr(args, "clip_skip", None)
    thumbnail = getattr(args, "metadata_thumbnail", None)
    negative = getattr(args, "metadata_is_negative_embedding", None)
    values: dict[str, str | None] = {
        "sai_model_spec": MODELSPEC_VERSION,
        "architecture": family.architecture + suffix,
        "implementation": _implementation(family, kind),
        "title": title if title is not None else f"{title_prefix}@{timestamp}",
        "resolution": f"{width}x{height}",
        "date": datetime.datetime.fromtimestamp(timestamp).isoformat(),
        "prediction_type": "v" if family.v_parameterization else "epsilon",
        "timestep_range": _timestep_range(args),
        "encoder_layer": None if clip_skip is None else str(clip_skip),
        **{key: getattr(args, flag, None) for key, flag in MODELSPEC_TEXT_FLAGS.items()},
        "thumbnail": None if thumbnail is None else thumbnail_url(thumbnail),
        "is_negative_embedding": None if negative is None else negative_embedding_text(negative),
        "implementation_version": f"sd-scripts/{commit or trainer_commit()}",
    }
    return {f"modelspec.{key}": str(value) for key, value in values.items() if value is not None}


# ---- per save ------------------------------------------------------------------------------------------------

def metadata_for_save(training: dict[str, str], modelspec: dict[str, str], *, steps: int, epoch: int,
                      finished_at: float, no_metadata: bool) -> dict[str, str]:
    """The metadata of one saved file: the run's keys with this save's step, epoch and time, then modelspec.

    With no_metadata only kohya's minimum `ss_*` keys stay; the modelspec keys are always added (COMPAT §2.1).
    """
    metadata = dict(training)
    metadata.update({"ss_training_finished_at": str(finished_at), "ss_steps": str(steps), "ss_epoch": str(epoch)})
    if no_metadata:
        metadata = {key: metadata[key] for key in SS_METADATA_MINIMUM_KEYS if key in metadata}
    metadata.update(modelspec)
    return metadata
