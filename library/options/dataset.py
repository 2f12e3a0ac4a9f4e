"""Dataset flags (kohya spelling and defaults): where the images are, captions, augmentation, buckets, caching;
and the flag-only dataset modes (DreamBooth `N_class` folders, --in_json) as raw config tables.

`library.dataset_config.build_blueprint` resolves these, with a `--dataset_config` file overriding them (COMPAT §9.1).
"""
from __future__ import annotations

import argparse
import logging
from pathlib import Path

from library.errors import FlagError, UserInputError
from library.options.choices import RESIZE_INTERPOLATIONS

logger = logging.getLogger(__name__)

IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".webp", ".bmp")  # only used to word a hint about misplaced images


class _DeprecatedAlias(argparse.Action):
    """Stores into the real flag's destination and warns; kohya still accepts its misspelled flags."""

    def __init__(self, option_strings: list[str], dest: str, replacement: str, **kwargs):
        self.replacement = replacement
        super().__init__(option_strings, dest, **kwargs)

    def __call__(self, parser, namespace, values, option_string=None) -> None:
        logger.warning("%s is deprecated; use %s", option_string, self.replacement)
        setattr(namespace, self.dest, values)


def add_dataset_arguments(parser: argparse.ArgumentParser) -> None:
    """Declare every dataset flag, in groups: source, buckets, captions, augmentation, loading, validation."""
    _add_source_arguments(parser)
    _add_bucket_arguments(parser)
    _add_caption_arguments(parser)
    _add_augmentation_arguments(parser)
    _add_loading_arguments(parser)
    _add_validation_arguments(parser)


def _add_source_arguments(parser: argparse.ArgumentParser) -> None:
    group = parser.add_argument_group("dataset source")
    group.add_argument("--train_data_dir", type=str, default=None,
                       help="DreamBooth: parent of folders named like '10_sks dog' (10 repeats, class tokens "
                            "'sks dog'); fine-tuning (with --in_json): the folder the metadata keys are relative to")
    group.add_argument("--reg_data_dir", type=str, default=None,
                       help="regularisation images, in folders named like --train_data_dir's (DreamBooth only)")
    group.add_argument("--in_json", type=str, default=None,
                       help="fine-tuning metadata file (.json or .jsonl with captions and tags); switches to the "
                            "fine-tuning dataset")
    group.add_argument("--dataset_config", type=str, default=None,
                       help="dataset config (.toml or .json); its values override these flags, and "
                            "--train_data_dir/--reg_data_dir/--in_json are then ignored")
    group.add_argument("--dataset_repeats", type=int, default=1,
                       help="times each image is seen per epoch when the config or metadata gives no num_repeats")
    group.add_argument("--resolution", type=str, default=None,
                       help="training size in pixels: 'size' for a square or 'width,height' (e.g. 512 or 768,512)")
    group.add_argument("--train_batch_size", type=int, default=1,
                       help="images per batch on each device (config key: batch_size)")
    group.add_argument("--prior_loss_weight", type=float, default=1.0,
                       help="loss multiplier for regularisation images (command line only)")
    group.add_argument("--conditioning_data_dir", type=str, default=None,
                       help="ControlNet-style datasets: folder of conditioning images with the same file stems as "
                            "the training images (only for scripts that support it)")
    group.add_argument("--lint_dataset", action="store_true",
                       help="scan the dataset, report every problem, and exit")
    group.add_argument("--dataset_class", type=str, default=None,
                       help="kohya's package.module.Class for an arbitrary dataset class; not supported here (its "
                            "classes are built on kohya's dataset internals): refused with a message. Describe the "
                            "data with --dataset_config instead")
    group.add_argument("--skip_dataset_lint", action="store_true",
                       help="do not scan images before training (a corrupt image then fails mid-run)")


def _add_bucket_arguments(parser: argparse.ArgumentParser) -> None:
    group = parser.add_argument_group("aspect-ratio buckets")
    group.add_argument("--enable_bucket", action="store_true",
                       help="train non-square images at the bucket closest to their aspect ratio instead of cropping "
                            "them to --resolution")
    group.add_argument("--min_bucket_reso", type=int, default=256,
                       help="smallest bucket side in pixels")
    group.add_argument("--max_bucket_reso", type=int, default=1024,
                       help="largest bucket side in pixels (raise it, e.g. to 2048, so SDXL buckets keep the full "
                            "area)")
    group.add_argument("--bucket_reso_steps", type=int, default=64,
                       help="bucket sides are multiples of this many pixels (divisible by 64 for SD1/2, by 32 for "
                            "SDXL)")
    group.add_argument("--bucket_no_upscale", action="store_true",
                       help="never enlarge images; each image gets a bucket from its own size (min/max ignored)")


def _add_caption_arguments(parser: argparse.ArgumentParser) -> None:
    group = parser.add_argument_group("captions")
    group.add_argument("--caption_extension", type=str, default=".caption",
                       help="extension of caption files next to the images (a leading dot is added if missing)")
    group.add_argument("--caption_extention", type=str, dest="caption_extension", default=argparse.SUPPRESS,
                       action=_DeprecatedAlias, replacement="--caption_extension", help=argparse.SUPPRESS)
    group.add_argument("--shuffle_caption", action="store_true",
                       help="shuffle the tags of each caption every time it is used (the first --keep_tokens stay)")
    group.add_argument("--caption_separator", type=str, default=",",
                       help="separator between tags, for shuffling, dropout and --keep_tokens")
    group.add_argument("--keep_tokens", type=int, default=0,
                       help="number of leading tags that are never shuffled or dropped")
    group.add_argument("--keep_tokens_separator", type=str, default="",
                       help="text before this marker is never shuffled or dropped (overrides --keep_tokens); a "
                            "second marker starts a fixed suffix")
    group.add_argument("--secondary_separator", type=str, default=None,
                       help="joins words into one tag for shuffling; replaced by --caption_separator afterwards")
    group.add_argument("--enable_wildcard", action="store_true",
                       help="pick one line of multi-line captions and one choice of each {a|b|c}, at random")
    group.add_argument("--caption_prefix", type=str, default=None,
                       help="text put before every caption (joined with a space)")
    group.add_argument("--caption_suffix", type=str, default=None,
                       help="text put after every caption (joined with a space)")
    group.add_argument("--caption_dropout_rate", type=float, default=0.0,
                       help="probability (0-1) that a sample is trained with an empty caption")
    group.add_argument("--caption_dropout_every_n_epochs", type=int, default=0,
                       help="train every Nth epoch with empty captions (0 = never)")
    group.add_argument("--caption_tag_dropout_rate", type=float, default=0.0,
                       help="probability (0-1) that each non-kept tag is dropped")
    group.add_argument("--token_warmup_min", type=int, default=1,
                       help="number of tags used at step 0 when token warm-up is on")
    group.add_argument("--token_warmup_step", type=float, default=0,
                       help="step at which all tags are used (below 1: a fraction of the total steps; 0 = off)")
    group.add_argument("--weighted_captions", action="store_true",
                       help="read (word:1.2) weights in captions and scale the text embeddings accordingly")


def _add_augmentation_arguments(parser: argparse.ArgumentParser) -> None:
    group = parser.add_argument_group("augmentation and image processing")
    group.add_argument("--color_aug", action="store_true",
                       help="random hue or gamma shift (prevents latent caching)")
    group.add_argument("--flip_aug", action="store_true",
                       help="flip half of the samples horizontally (cached latents store both sides)")
    group.add_argument("--face_crop_aug_range", type=str, default=None,
                       help="'low,high' scale range (e.g. 2.0,4.0) for a crop centred on the face given in the file "
                            "name name_cx_cy_w_h.ext")
    group.add_argument("--random_crop", action="store_true",
                       help="crop at a random offset instead of the centre (prevents latent caching)")
    group.add_argument("--alpha_mask", action="store_true",
                       help="use the image's alpha channel as a per-pixel loss weight")
    group.add_argument("--resize_interpolation", type=str, default=None, choices=RESIZE_INTERPOLATIONS,
                       help="resampling filter for resizing (default: area when shrinking, Lanczos when enlarging)")


def _add_loading_arguments(parser: argparse.ArgumentParser) -> None:
    group = parser.add_argument_group("loading and caching")
    group.add_argument("--debug_dataset", action="store_true",
                       help="show the processed samples and captions instead of training (command line only)")
    group.add_argument("--max_data_loader_n_workers", type=int, default=8,
                       help="data-loader worker processes (at most the CPU count; 0 loads in the main process)")
    group.add_argument("--persistent_data_loader_workers", action="store_true",
                       help="keep the data-loader workers alive between epochs (faster epoch start, more memory)")
    group.add_argument("--cache_info", action="store_true",
                       help="keep image sizes and captions of DreamBooth subsets in <image_dir>/metadata_cache.json "
                            "and read them from there next time (config key cache_info; faster start on big "
                            "datasets; delete the file after changing images or captions)")
    group.add_argument("--cache_latents", action="store_true",
                       help="encode every image with the VAE once before training and keep the latents in memory")
    group.add_argument("--cache_latents_to_disk", action="store_true",
                       help="like --cache_latents, and also save them as .npz next to the images for later runs")
    group.add_argument("--vae_batch_size", type=int, default=1,
                       help="images encoded at once while caching latents")
    group.add_argument("--skip_cache_check", action="store_true",
                       help="trust existing cache files without checking their size and content")
    group.add_argument("--cache_text_encoder_outputs", action="store_true",
                       help="encode every caption once before training (needs fixed captions: no shuffle/dropout)")
    group.add_argument("--cache_text_encoder_outputs_to_disk", action="store_true",
                       help="like --cache_text_encoder_outputs, and also save them as .npz next to the images")


def _add_validation_arguments(parser: argparse.ArgumentParser) -> None:
    group = parser.add_argument_group("validation")
    group.add_argument("--validation_split", type=float, default=0.0,
                       help="fraction (0-1) of each non-regularisation DreamBooth subset held out for validation loss")
    group.add_argument("--validation_seed", type=int, default=None,
                       help="seed for choosing the held-out images (default: --seed)")


# ---- flag values -> typed values and raw dataset tables (kohya's flag-only modes, COMPAT §9.3) ----

def _is_int(value: object) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def parse_resolution(value: object, flag: str = "--resolution") -> tuple[int, int]:
    """'512' -> (512, 512); '768,512' -> (768, 512) as (width, height); an int or a pair is taken as is."""
    numbers: list = []
    if isinstance(value, str):
        try:
            numbers = [int(part) for part in value.split(",")]
        except ValueError:
            numbers = []
    elif _is_int(value):
        numbers = [value]
    elif isinstance(value, (list, tuple)) and all(_is_int(part) for part in value):
        numbers = list(value)
    if len(numbers) == 1:
        numbers *= 2
    if len(numbers) != 2 or min(numbers) <= 0:
        raise FlagError(f"{flag} {value!r}: expected a size in pixels like 512 or 768,512 (width,height)")
    return numbers[0], numbers[1]


def parse_face_crop_aug_range(value: object, flag: str = "--face_crop_aug_range") -> tuple[float, float]:
    """'2.0,4.0' -> (2.0, 4.0); a pair is taken as is."""
    try:
        numbers = [float(part) for part in (value.split(",") if isinstance(value, str) else value)]
    except (TypeError, ValueError):
        numbers = []
    if len(numbers) != 2 or numbers[0] > numbers[1]:
        raise FlagError(f"{flag} {value!r}: expected two numbers 'low,high' with low <= high, e.g. 2.0,4.0")
    return float(numbers[0]), float(numbers[1])


def dreambooth_subsets_from_folder(folder: str, flag: str, is_reg: bool) -> list[dict]:
    """Raw subset tables for each `N_class tokens` sub-folder (COMPAT §9.3); other folders are skipped."""
    parent = Path(folder)
    if not parent.is_dir():
        raise UserInputError(f"{flag} {folder}: folder not found")
    subsets = []
    for child in sorted(path for path in parent.iterdir() if path.is_dir()):
        repeats_text, _, class_tokens = child.name.partition("_")
        try:
            repeats = int(repeats_text)
        except ValueError:
            logger.warning("%s: skipping folder %r: its name does not start with a repeat count like 10_", flag,
                           child.name)
            continue
        if repeats < 1:
            logger.warning("%s: skipping folder %r: repeat count %d is below 1", flag, child.name, repeats)
            continue
        subset = {"image_dir": str(child), "num_repeats": repeats, "is_reg": is_reg}
        if class_tokens:
            subset["class_tokens"] = class_tokens
        subsets.append(subset)
    return subsets


def _no_usable_folders_error(folder: str) -> UserInputError:
    message = (f"--train_data_dir {folder}: no usable sub-folders; train_data_dir must be the parent of folders "
               "named like 10_sks dog (10 repeats, class tokens 'sks dog')")
    if any(path.suffix.lower() in IMAGE_SUFFIXES for path in Path(folder).iterdir()):
        message += "; the images are directly in this folder: move them into such a sub-folder"
    return UserInputError(message)


def datasets_from_flags(args: argparse.Namespace, supports_controlnet: bool) -> list[dict]:
    """Raw dataset tables equivalent to kohya's flag-only modes (DreamBooth folders, --in_json, ControlNet)."""
    train_dir, reg_dir = getattr(args, "train_data_dir", None), getattr(args, "reg_data_dir", None)
    in_json, conditioning_dir = getattr(args, "in_json", None), getattr(args, "conditioning_data_dir", None)
    if in_json:
        if reg_dir:
            logger.warning("--reg_data_dir is ignored with --in_json (fine-tuning has no regularisation images)")
        return [{"subsets": [{"metadata_file": in_json, "image_dir": train_dir}]}]
    if not train_dir:
        raise FlagError("no dataset given: pass --dataset_config, --train_data_dir (DreamBooth folders) or --in_json "
                        "(fine-tuning metadata)")
    if conditioning_dir:
        if not supports_controlnet:
            raise FlagError("--conditioning_data_dir: this script does not train on ControlNet-style datasets")
        # kohya's ControlNet flags: the images sit directly in --train_data_dir, one subset
        return [{"subsets": [{"image_dir": train_dir, "conditioning_data_dir": conditioning_dir}]}]
    subsets = dreambooth_subsets_from_folder(train_dir, "--train_data_dir", is_reg=False)
    if not subsets:
        raise _no_usable_folders_error(train_dir)
    if reg_dir:
        reg_subsets = dreambooth_subsets_from_folder(reg_dir, "--reg_data_dir", is_reg=True)
        if not reg_subsets:
            logger.warning("--reg_data_dir %s: no usable sub-folders (named like 1_dog); no regularisation images",
                           reg_dir)
        subsets += reg_subsets
    return [{"subsets": subsets}]
