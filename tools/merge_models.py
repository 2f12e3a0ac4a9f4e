"""Weighted merge of single-file checkpoints of one family: every tensor becomes Σ ratio_i × W_i.

    python tools/merge_models.py --models a.safetensors b.safetensors --ratios 0.25 0.75 \\
        --output merged.safetensors --saving_precision fp16

The ratios are used as given (not normalized: 0.5 0.5 averages, 1 1 adds); the default is an equal share
(1/N each). --unet_only merges the U-Net only and copies the text encoders and VAE from the first model.
Models are read one at a time, tensor by tensor, so memory holds the accumulator plus one reader. The output is a
.safetensors file with the first model's keys, written atomically.
"""
from __future__ import annotations

import argparse
import logging
import sys
from pathlib import Path
from typing import TYPE_CHECKING

if __package__ in (None, ""):
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from tqdm import tqdm

from library.cli import run_cli
from library.errors import FlagError, ModelFormatError
from library.families import UNET_PREFIX, ModelFamily
from library.options.output_file import add_overwrite_argument, refuse_existing_output

if TYPE_CHECKING:  # the model modules import torch: loaded where used, so --help stays fast
    import torch

    from library.models.state_dict_io import TensorFile

logger = logging.getLogger(__name__)

PRECISION_CHOICES = ("float", "fp16", "bf16")


def setup_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--models", nargs="+", required=True, help="two or more single-file checkpoints")
    parser.add_argument("--ratios", nargs="+", type=float, default=None,
                        help="one weight per model, used as given (not normalized); default 1/N each")
    parser.add_argument("--output", "--save_to", dest="output", required=True, help="output .safetensors file")
    parser.add_argument("--saving_precision", "--save_precision", dest="saving_precision", choices=PRECISION_CHOICES,
                        default="float", help="dtype of the saved tensors; default float")
    parser.add_argument("--unet_only", action="store_true",
                        help="merge only the U-Net; text encoders and VAE come from the first model")
    parser.add_argument("--device", default="cpu", help="where the sums are computed: cpu or cuda")
    add_overwrite_argument(parser)
    return parser


def check_inputs(models: list[str], ratios: list[float] | None, output: str) -> list[float]:
    if len(models) < 2:
        raise FlagError(f"--models: expected at least two checkpoints, got {len(models)}")
    if ratios is None:
        ratios = [1.0 / len(models)] * len(models)
    if len(ratios) != len(models):
        raise FlagError(f"--ratios: expected one ratio per model ({len(models)} for --models), got {len(ratios)}")
    if Path(output).suffix.lower() != ".safetensors":
        raise FlagError(f"--output {output}: expected a .safetensors file")
    output_path = Path(output).resolve()
    for model in models:
        if Path(model).resolve() == output_path:
            raise FlagError(f"--output {output} is also an input (--models); choose another output file so the "
                            "input stays unchanged")
        if Path(model).is_dir():
            raise FlagError(f"--models {model}: is a folder; merge_models takes single-file checkpoints")
    return list(ratios)


def check_one_family(models: list[str]) -> ModelFamily:
    """All models must share the architecture (SD1.x, SD2.x, SDXL); v-prediction variants may be mixed."""
    from library.models.load import describe_family, detect_family

    families = [detect_family(model, flag="--models") for model in models]
    first = families[0]
    for model, family in zip(models[1:], families[1:]):
        if family.name.split("-")[0] != first.name.split("-")[0]:
            raise FlagError(f"--models: {models[0]} is {describe_family(first)} but {model} is "
                            f"{describe_family(family)}; merge checkpoints of one model family only")
    return first


def is_merged(key: str, tensor: torch.Tensor, unet_only: bool) -> bool:
    """Integer buffers (position ids) are copied; with --unet_only only `model.diffusion_model.*` is merged."""
    return tensor.is_floating_point() and (not unet_only or key.startswith(UNET_PREFIX))


def merge_checkpoints(models: list[str], ratios: list[float], unet_only: bool = False,
                      device: torch.device | str = "cpu") -> dict[str, torch.Tensor]:
    """Σ ratio_i × W_i per tensor in float32 on `device`, reading one model at a time; keys of the first model."""
    from library.models.state_dict_io import TensorFile

    merged: dict[str, torch.Tensor] = {}
    for index, (model, ratio) in enumerate(zip(models, ratios)):
        reader = TensorFile(model)
        try:
            keys = reader.keys() if index == 0 else list(merged)
            for key in tqdm(keys, desc=f"merging {Path(model).name}", unit="tensor"):
                add_tensor(merged, key, reader, model, ratio, index == 0, unet_only, device)
        finally:
            reader.close()
    return merged


def add_tensor(merged: dict[str, torch.Tensor], key: str, reader: TensorFile, model: str, ratio: float,
               first: bool, unet_only: bool, device: torch.device | str) -> None:
    import torch

    if first:
        tensor = reader.get(key)
        merged[key] = tensor.to(device, torch.float32) * ratio if is_merged(key, tensor, unet_only) else tensor
        return
    current = merged[key]
    if not is_merged(key, current, unet_only):
        return
    if key not in reader:
        raise ModelFormatError(model, f"has no tensor {key} (present in the first model); the checkpoints do not "
                                      "match")
    tensor = reader.get(key)
    if tuple(tensor.shape) != tuple(current.shape):
        raise ModelFormatError(model, f"{key} has shape {list(tensor.shape)} but the first model's is "
                                      f"{list(current.shape)}; the checkpoints do not match")
    current.add_(tensor.to(device, torch.float32), alpha=ratio)


def main(argv: list[str] | None = None) -> Path:
    args = setup_parser().parse_args(argv)
    import torch

    from library.models.save import checkpoint_metadata, precision_dtype
    from library.models.state_dict_io import write_state_dict

    ratios = check_inputs(args.models, args.ratios, args.output)
    refuse_existing_output(args.output, args.overwrite, "--output")
    family = check_one_family(args.models)
    device = torch.device(args.device)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise FlagError(f"--device {args.device}: no CUDA GPU is available here; use --device cpu")
    merged = merge_checkpoints(args.models, ratios, args.unet_only, device)
    save_dtype = precision_dtype(args.saving_precision)
    state = {key: (tensor.to("cpu", save_dtype) if tensor.is_floating_point() else tensor.cpu())
             for key, tensor in merged.items()}
    metadata = checkpoint_metadata(family, title=Path(args.output).stem)
    metadata["merged_from"] = ", ".join(f"{Path(model).name}×{ratio:g}" for model, ratio in zip(args.models, ratios))
    write_state_dict(args.output, state, metadata, overwrite=args.overwrite)
    logger.info("saved %s (%d tensors)", args.output, len(state))
    return Path(args.output)


if __name__ == "__main__":
    run_cli(main)
