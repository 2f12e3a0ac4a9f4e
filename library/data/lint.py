"""Dataset lint: one scan that lists every problem of a dataset at once, before any model is loaded.

Reports unreadable images, missing/empty/unreadable captions, captions over the token budget, images that
would be upscaled to reach their bucket, byte-identical duplicates, and how much of each bucket's resized
images is cropped away. Corrupt images and unreadable captions are fatal; the rest are warnings.
"""
from __future__ import annotations

import hashlib
import logging
import os
from collections import defaultdict
from dataclasses import dataclass, field
from pathlib import Path

from tqdm import tqdm

from library.data.buckets import BucketAssigner
from library.data.captions import read_caption_file
from library.data.datasets import bucket_settings
from library.data.images import CorruptImageError, list_image_files, load_image, read_image_sizes
from library.data.metadata import assemble_caption, read_metadata, resolve_image_path
from library.dataset_config import DatasetGroupBlueprint, SubsetParams
from library.errors import UserInputError

logger = logging.getLogger(__name__)

LISTED_PER_PROBLEM = 50  # warnings beyond this many are counted, not listed (fatal ones are always all listed)


@dataclass
class LintReport:
    corrupt_images: dict[Path, str] = field(default_factory=dict)
    caption_errors: dict[Path, str] = field(default_factory=dict)
    missing_captions: list[Path] = field(default_factory=list)
    long_captions: list[tuple[Path, int]] = field(default_factory=list)
    upscaled_images: list[tuple[Path, tuple[int, int], tuple[int, int], float]] = field(default_factory=list)
    duplicates: list[list[Path]] = field(default_factory=list)
    bucket_crop_waste: dict[tuple[int, int], tuple[int, float]] = field(default_factory=dict)
    images_scanned: int = 0
    max_tokens: int = 75
    image_sizes: dict[Path, tuple[int, int]] = field(default_factory=dict)  # reused when building the datasets

    @property
    def fatal(self) -> bool:
        return bool(self.corrupt_images or self.caption_errors)

    def lines(self) -> list[str]:
        out = [f"dataset lint: {self.images_scanned} images scanned"]
        _section(out, "unreadable or corrupt images (fatal)",
                 [f"{path}: {reason}" for path, reason in sorted(self.corrupt_images.items())], limit=None)
        _section(out, "unreadable caption files (fatal)",
                 [f"{path}: {reason}" for path, reason in sorted(self.caption_errors.items())], limit=None)
        _section(out, "images without a caption (no caption file, no class_tokens)",
                 [str(path) for path in self.missing_captions])
        _section(out, f"captions longer than {self.max_tokens} tokens (the rest is cut off; see --max_token_length)",
                 [f"{path}: {tokens} tokens" for path, tokens in self.long_captions])
        _section(out, "images smaller than their bucket (upscaled)",
                 [f"{path}: {w}x{h} -> bucket {bw}x{bh} (x{factor:.2f})"
                  for path, (w, h), (bw, bh), factor in self.upscaled_images])
        _section(out, "duplicate images (identical bytes)",
                 [" = ".join(str(path) for path in group) for group in self.duplicates])
        if self.bucket_crop_waste:
            out.append("crop per bucket (share of the resized image cut away, mean):")
            for (width, height), (count, waste) in sorted(self.bucket_crop_waste.items()):
                out.append(f"  {width}x{height}: {count} images, {waste * 100:.1f}% cropped")
        if not (self.fatal or self.missing_captions or self.long_captions or self.upscaled_images
                or self.duplicates):
            out.append("no problems found")
        return out


def _section(out: list[str], title: str, entries: list[str], limit: int | None = LISTED_PER_PROBLEM) -> None:
    if not entries:
        return
    out.append(f"{title}: {len(entries)}")
    shown = entries if limit is None else entries[:limit]
    out.extend(f"  {entry}" for entry in shown)
    if len(shown) < len(entries):
        out.append(f"  ... and {len(entries) - len(shown)} more")


def lint_dataset(blueprint: DatasetGroupBlueprint, *, tokenizer=None, max_token_length: int | None = None,
                 workers: int = 4, check_duplicates: bool = True) -> LintReport:
    """Scan every subset of `blueprint`; never raises for a bad image or caption (they go into the report)."""
    report = LintReport(max_tokens=max_token_length or 75)
    seen: set[Path] = set()
    for dataset_bp in blueprint.datasets:
        assigner = BucketAssigner(bucket_settings(dataset_bp.params))
        for subset in dataset_bp.subsets:
            captions = _subset_captions(subset, dataset_bp.kind, report)
            sizes = read_image_sizes(list(captions), workers=workers)
            for path, caption in captions.items():
                size = sizes[path]
                if isinstance(size, CorruptImageError):
                    report.corrupt_images[path] = str(size).split(": ", 1)[-1]
                    continue
                problem = truncation_problem(path)
                if problem is not None:
                    report.corrupt_images[path] = problem
                    continue
                report.image_sizes[path] = tuple(size)
                _check_fit(report, assigner, path, tuple(size))
                if caption is not None and tokenizer is not None:
                    _check_length(report, tokenizer, path, caption)
            seen.update(captions)
    report.images_scanned = len(seen)
    if check_duplicates:
        report.duplicates = find_duplicates(sorted(seen - set(report.corrupt_images)))
    report.bucket_crop_waste = {reso: (count, total / count)
                                for reso, (count, total) in report.bucket_crop_waste.items()}
    return report


def _subset_captions(subset: SubsetParams, kind: str, report: LintReport) -> dict[Path, str | None]:
    """Image path -> caption text (None when there is none) for one subset; problems go into the report."""
    result: dict[Path, str | None] = {}
    if kind == "finetune":
        image_dir = Path(subset.image_dir) if subset.image_dir else None
        for entry in read_metadata(subset.metadata_file):
            path = resolve_image_path(image_dir, entry.image_key)
            if path is None:
                report.corrupt_images[Path(entry.image_key)] = f"named in {subset.metadata_file} but not found"
                continue
            caption = assemble_caption(entry, subset.caption_separator, subset.enable_wildcard)
            if not caption:
                report.missing_captions.append(path)
            result[path] = caption or None
        return result
    folder_names = set(os.listdir(subset.image_dir)) if Path(subset.image_dir).is_dir() else None
    for path in list_image_files(subset.image_dir):
        try:
            caption = read_caption_file(path, subset.caption_extension, subset.enable_wildcard, folder_names)
        except UserInputError as error:
            report.caption_errors[path.with_suffix(subset.caption_extension)] = str(error).split(": ", 1)[-1]
            caption = None
        if caption is None:
            caption = subset.class_tokens
            if caption is None and path.with_suffix(subset.caption_extension) not in report.caption_errors:
                report.missing_captions.append(path)
        result[path] = caption
    return result


def _check_fit(report: LintReport, assigner: BucketAssigner, path: Path, size: tuple[int, int]) -> None:
    assignment = assigner.assign(size)
    resized_w, resized_h = assignment.resized_size
    bucket_w, bucket_h = assignment.bucket_reso
    factor = resized_w / size[0]
    if factor > 1.0 + 1e-6:
        report.upscaled_images.append((path, size, (bucket_w, bucket_h), factor))
    waste = 1.0 - (bucket_w * bucket_h) / max(1, resized_w * resized_h)
    count, total = report.bucket_crop_waste.get((bucket_w, bucket_h), (0, 0.0))
    report.bucket_crop_waste[(bucket_w, bucket_h)] = (count + 1, total + waste)


def _check_length(report: LintReport, tokenizer, path: Path, caption: str) -> None:
    longest = 0
    for line in caption.split("\n"):
        longest = max(longest, len(tokenizer(line, truncation=False, verbose=False).input_ids) - 2)
    if longest > report.max_tokens:
        report.long_captions.append((path, longest))


_END_MARKERS = {".png": b"IEND\xaeB`\x82", ".jpg": b"\xff\xd9", ".jpeg": b"\xff\xd9"}
TAIL_BYTES = 64


def truncation_problem(path: Path) -> str | None:
    """Catch files cut short (an interrupted copy or download), which headers alone do not show.

    PNG and JPEG files end with a known marker; when it is not near the end, the image is decoded to tell a
    truly truncated file (error) from one with harmless trailing bytes (fine). Costs one small read per file.
    """
    marker = _END_MARKERS.get(path.suffix.lower())
    if marker is None:
        return None
    try:
        with open(path, "rb") as handle:
            handle.seek(0, 2)
            handle.seek(max(0, handle.tell() - TAIL_BYTES))
            if marker in handle.read():
                return None
    except OSError as error:
        return f"cannot read: {error}"
    try:
        load_image(path)
    except CorruptImageError as error:
        return error.reason if hasattr(error, "reason") else str(error)
    return None


def find_duplicates(paths: list[Path]) -> list[list[Path]]:
    """Groups of byte-identical files (sizes compared first, so most files are never read)."""
    by_size: dict[int, list[Path]] = defaultdict(list)
    for path in paths:
        try:
            by_size[path.stat().st_size].append(path)
        except OSError:
            continue
    candidates = [group for group in by_size.values() if len(group) > 1]
    by_hash: dict[str, list[Path]] = defaultdict(list)
    for group in tqdm(candidates, desc="looking for duplicates", unit="group", disable=len(candidates) < 100):
        for path in group:
            by_hash[hashlib.sha1(path.read_bytes()).hexdigest()].append(path)
    return sorted((sorted(group) for group in by_hash.values() if len(group) > 1), key=lambda group: group[0])


def raise_if_fatal(report: LintReport) -> None:
    """Stop the run with every corrupt image and unreadable caption listed (and nothing else)."""
    if not report.fatal:
        return
    lines: list[str] = []
    _section(lines, "unreadable or corrupt images",
             [f"{path}: {reason}" for path, reason in sorted(report.corrupt_images.items())], limit=None)
    _section(lines, "unreadable caption files",
             [f"{path}: {reason}" for path, reason in sorted(report.caption_errors.items())], limit=None)
    raise UserInputError("the dataset has unreadable files; nothing was trained:\n" + "\n".join(lines))
