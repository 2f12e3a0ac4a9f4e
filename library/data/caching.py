"""Fill the latent and text-encoder-output caches of a dataset group (memory or disk), batched and sharded.

File names, keys and validity rules are in `latent_cache.py` / `text_cache.py`; this module decides what
must be computed, runs the VAE or text encoders in batches, and records where each image's cache lives.
Under several processes each one computes its own shard (image i -> process i % N, COMPAT §7.3) and never
waits for the others here; callers that need every file afterwards synchronise once, at the end.
"""
from __future__ import annotations

import logging
import random
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from tqdm import tqdm

from library.data.captions import process_caption
from library.data.datasets import caption_options
from library.data.group import DatasetGroup
from library.data.images import alpha_mask_from, flip_horizontal, load_image, resize_and_crop, to_model_tensor
from library.data.latent_cache import (
    CacheFingerprint,
    LatentCacheEntry,
    check_latent_cache,
    existing_cache_path,
    latents_npz_path,
    legacy_npz_path,
    save_latent_cache,
    shard_for_process,
)
from library.data.sources import ImageInfo
from library.data.text_cache import (
    TextEncoderOutputs,
    caption_fingerprint,
    check_text_encoder_outputs,
    save_text_encoder_outputs,
    te_outputs_npz_path,
)
from library.errors import UserInputError

logger = logging.getLogger(__name__)


@dataclass
class CacheStats:
    """What a caching pass did: reused valid caches, computed new ones, and why old ones were redone."""

    reused: int = 0
    computed: int = 0
    skipped_other_process: int = 0
    invalid_reasons: dict[str, int] | None = None

    def note_invalid(self, reason: str) -> None:
        self.invalid_reasons = self.invalid_reasons or {}
        self.invalid_reasons[reason] = self.invalid_reasons.get(reason, 0) + 1

    def describe(self) -> str:
        text = f"{self.reused} reused, {self.computed} computed"
        if self.skipped_other_process:
            text += f", {self.skipped_other_process} left to other processes"
        if self.invalid_reasons:
            text += "; redone because: " + ", ".join(f"{reason} ({count})"
                                                      for reason, count in sorted(self.invalid_reasons.items()))
        return text


def _records(group: DatasetGroup) -> list[tuple[ImageInfo, object]]:
    """Every (image, subset) once, in a fixed order (the same in every process), duplicates across datasets kept."""
    return [(info, dataset.subsets[info.subset_index]) for dataset in group.datasets for info in dataset.images]


# ---- latents ---------------------------------------------------------------------------------------------------

def cache_latents(group: DatasetGroup, vae, *, to_disk: bool, latent_suffix: str, vae_batch_size: int = 1,
                  skip_check: bool = False, process_index: int = 0, num_processes: int = 1,
                  vae_id: str | None = None, seed: int = 0, show_progress: bool = True,
                  legacy_names: bool = False) -> CacheStats:
    """Encode every image once with `vae` (bucket-sized, centre crop) and remember the result.

    to_disk: write `<stem>_<W>x<H>_<suffix>.npz` next to each image (kohya's names and keys) and reuse valid
        ones; otherwise keep the latents in memory (every process computes all of them).
    legacy_names: write `<stem>.npz` instead (finetune/prepare_buckets_latents.py, kohya v0.9.1).
    """
    from library.models.fingerprint import module_fingerprint

    group.check_latents_cacheable()
    vae_id = vae_id or module_fingerprint(vae)
    dtype = next(vae.parameters()).dtype
    stats, todo = CacheStats(), []
    records = _records(group)
    mine = _own_positions(len(records), process_index, num_processes) if to_disk else set()
    for position, (info, subset) in enumerate(records):
        need_flipped, need_alpha = bool(subset.flip_aug), bool(subset.alpha_mask)
        if not to_disk:
            todo.append((info, subset, None))
            continue
        path = _latents_path(info, latent_suffix, legacy_names)
        info.latents_npz = path
        if position not in mine:
            stats.skipped_other_process += 1
            continue
        fingerprint = CacheFingerprint(vae_id=vae_id, dtype=str(dtype).replace("torch.", ""),
                                       bucket_reso=tuple(info.bucket.bucket_reso), crop="center")
        valid, reason = check_latent_cache(path, tuple(info.bucket.bucket_reso), need_flipped, need_alpha,
                                           fingerprint, skip_check)
        if valid:
            stats.reused += 1
            continue
        stats.note_invalid(reason)
        todo.append((info, subset, fingerprint))
    _encode_latents(todo, vae, vae_batch_size, to_disk, seed + process_index, stats, show_progress)
    logger.info("latent cache: %s", stats.describe())
    return stats


def _own_positions(count: int, process_index: int, num_processes: int) -> set[int]:
    """Positions (in `_records` order) this process checks and caches: i -> process i % N (COMPAT §7.3).

    The split is made over every image before any file is checked, as kohya does. Splitting only the images
    still to do would race: the processes start at different times (only the main one lints), so one would
    already see files the other wrote, the lists would differ, and some images would be cached by nobody.
    """
    return set(shard_for_process(list(range(count)), process_index, num_processes))


def _latents_path(info: ImageInfo, latent_suffix: str, legacy_names: bool) -> Path:
    if legacy_names:
        return legacy_npz_path(info.absolute_path)
    return existing_cache_path(info.absolute_path, info.image_size, latent_suffix) or \
        latents_npz_path(info.absolute_path, info.image_size, latent_suffix)


def _encode_latents(todo: list, vae, vae_batch_size: int, to_disk: bool, seed: int, stats: CacheStats,
                    show_progress: bool) -> None:
    per_bucket: dict[tuple[int, int], list] = {}
    for item in todo:
        per_bucket.setdefault(tuple(item[0].bucket.bucket_reso), []).append(item)
    generator = torch.Generator(device="cpu").manual_seed(seed)
    device, dtype = next(vae.parameters()).device, next(vae.parameters()).dtype
    with tqdm(total=len(todo), desc="caching latents", unit="img", disable=not show_progress or not todo) as bar:
        for bucket_reso in sorted(per_bucket):
            items = per_bucket[bucket_reso]
            for start in range(0, len(items), max(1, vae_batch_size)):
                batch = items[start:start + max(1, vae_batch_size)]
                _encode_batch(batch, vae, device, dtype, generator, to_disk, stats)
                bar.update(len(batch))


def _encode_batch(batch: list, vae, device, dtype, generator, to_disk: bool, stats: CacheStats) -> None:
    pixels, alphas = [], []
    for info, subset, _ in batch:
        image = load_image(info.absolute_path, with_alpha=bool(subset.alpha_mask))
        image, _ = resize_and_crop(image, info.bucket, False, None, interpolation=subset.resize_interpolation)
        alphas.append(alpha_mask_from(image) if subset.alpha_mask else None)
        pixels.append(np.ascontiguousarray(image[..., :3]))
    latents = _vae_encode(vae, [to_model_tensor(p) for p in pixels], device, dtype, generator)
    flipped = None
    if any(subset.flip_aug for _, subset, _ in batch):
        flipped = _vae_encode(vae, [to_model_tensor(flip_horizontal(p)) for p in pixels], device, dtype, generator)
    _refuse_non_finite([info for info, _, _ in batch], latents, flipped, dtype)
    for position, (info, subset, fingerprint) in enumerate(batch):
        entry = LatentCacheEntry(latents=latents[position], original_size=tuple(info.image_size),
                                 crop_ltrb=tuple(info.bucket.crop_ltrb),
                                 latents_flipped=flipped[position] if subset.flip_aug else None,
                                 alpha_mask=alphas[position])
        if to_disk:
            save_latent_cache(info.latents_npz, entry, fingerprint)
        else:
            info.latents = entry
        stats.computed += 1


def _refuse_non_finite(infos: list[ImageInfo], latents: np.ndarray, flipped: np.ndarray | None,
                       dtype: torch.dtype) -> None:
    """Stop before a NaN/inf encoding is cached: training on it would end in a NaN loss blamed on the lr."""
    finite = np.isfinite(latents).reshape(len(infos), -1).all(axis=1)
    if flipped is not None:
        finite &= np.isfinite(flipped).reshape(len(infos), -1).all(axis=1)
    bad = [str(info.absolute_path) for info, ok in zip(infos, finite) if not ok]
    if not bad:
        return
    if dtype in (torch.float16, torch.bfloat16):
        hint = (f"the VAE runs in {str(dtype).replace('torch.', '')}, which overflows on some images; pass "
                "--no_half_vae to encode in float32")
    else:
        hint = "the VAE runs in float32, so its weights are probably damaged; check the VAE or model file"
    raise UserInputError(f"{', '.join(bad)}: the VAE encoded {'this image' if len(bad) == 1 else 'these images'} "
                         f"to NaN/inf latents; {hint} (no cache was written for {'it' if len(bad) == 1 else 'them'})")


@torch.no_grad()
def _vae_encode(vae, tensors: list[torch.Tensor], device, dtype, generator) -> np.ndarray:
    """kohya caches `latent_dist.sample()` unscaled (COMPAT §7.1); float32 on disk."""
    batch = torch.stack(tensors).to(device=device, dtype=dtype)
    distribution = vae.encode(batch).latent_dist
    noise = torch.randn(distribution.mean.shape, generator=generator, dtype=torch.float32)
    latents = distribution.mean.float().cpu() + distribution.std.float().cpu() * noise
    return latents.numpy()


# ---- text-encoder outputs --------------------------------------------------------------------------------------

def cache_text_encoder_outputs(group: DatasetGroup, caption_encoder, *, to_disk: bool, batch_size: int = 1,
                               skip_check: bool = False, process_index: int = 0, num_processes: int = 1,
                               show_progress: bool = True) -> CacheStats:
    """Encode every caption once; the disk cache records a fingerprint of caption, tokenizers and encoders."""
    group.check_text_encoder_outputs_cacheable()
    identity = caption_encoder.identity()
    n_encoders = len(caption_encoder.text_encoders)
    expected_length = 77 if not caption_encoder.max_token_length else caption_encoder.max_token_length + 2
    for dataset in group.datasets:
        dataset.n_text_encoders = n_encoders
    stats, todo = CacheStats(), []
    records = _records(group)
    mine = _own_positions(len(records), process_index, num_processes) if to_disk else set()
    for position, (info, subset) in enumerate(records):
        if to_disk:
            info.text_encoder_outputs_npz = te_outputs_npz_path(info.absolute_path)
            if position not in mine:
                stats.skipped_other_process += 1
                continue
        caption = fixed_caption(info.caption, subset)
        fingerprint = caption_fingerprint(caption, identity, caption_encoder.max_token_length)
        if to_disk:
            valid, reason = check_text_encoder_outputs(info.text_encoder_outputs_npz, fingerprint, n_encoders,
                                                       expected_length, skip_check)
            if valid:
                stats.reused += 1
                continue
            stats.note_invalid(reason)
        todo.append((info, caption, fingerprint))
    bar = tqdm(total=len(todo), desc="caching text encoder outputs", unit="caption",
               disable=not show_progress or not todo)
    for start in range(0, len(todo), max(1, batch_size)):
        batch = todo[start:start + max(1, batch_size)]
        with torch.no_grad():
            conds = caption_encoder.encode([caption for _, caption, _ in batch])
        for (info, _, fingerprint), (hidden, pooled) in zip(batch, caption_encoder.split_for_cache(conds), strict=True):
            outputs = TextEncoderOutputs(hidden_states=hidden, pooled=pooled)
            if to_disk:
                save_text_encoder_outputs(info.text_encoder_outputs_npz, outputs, fingerprint)
            else:
                info.text_encoder_outputs = outputs
            stats.computed += 1
        bar.update(len(batch))
    bar.close()
    logger.info("text encoder output cache: %s", stats.describe())
    return stats


def fixed_caption(raw_caption: str, subset) -> str:
    """The caption as training will see it when captions are deterministic (prefix/suffix, separators)."""
    return process_caption(raw_caption, caption_options(subset), epoch=1, step=0, max_steps=None,
                           rng=random.Random(0))


def attach_existing_caches(group: DatasetGroup, *, latent_suffix: str | None, text_outputs: bool) -> None:
    """Point each image at the cache files other processes wrote (after a shard-wise caching pass)."""
    for info, _ in _records(group):
        if latent_suffix is not None:
            info.latents_npz = _latents_path(info, latent_suffix, legacy_names=False)
        if text_outputs:
            info.text_encoder_outputs_npz = te_outputs_npz_path(info.absolute_path)
