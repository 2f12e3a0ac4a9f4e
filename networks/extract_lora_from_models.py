"""Extract a LoRA from the difference of two checkpoints (an original and a fine-tuned one), as kohya's
networks/extract_lora_from_models.py does: ΔW = W_tuned - W_org of every layer kohya's LoRA wraps, factored by SVD.

    python networks/extract_lora_from_models.py --model_org base.safetensors --model_tuned tuned.safetensors \
        --save_to extracted.safetensors --dim 64 --conv_dim 32 --device cuda

Differences from kohya, on purpose: a module whose largest |ΔW| is below --min_diff is left out of the file, in the
text encoders and in the U-Net alike (kohya drops the whole text encoder when every one of its differences is below
--min_diff and always writes every U-Net module); a skipped module would only carry noise. Each module's alpha is
its rank, so the scale is 1 and `up @ down` is ΔW (COMPAT §1.6, §2.1: kohya writes alpha = dim).
"""
from __future__ import annotations

import argparse
import json
import logging
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

if __package__ in (None, ""):
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from tqdm import tqdm

from library.cli import run_cli
from library.errors import FlagError, ModelFormatError
from library.families import ModelFamily
from library.options.output_file import add_overwrite_argument, refuse_existing_output
from library.train.metadata import modelspec_metadata

if TYPE_CHECKING:  # the tensor and model modules import torch: loaded where used, so --help stays fast
    import torch

    from networks.lora_file import LoRAPair

logger = logging.getLogger(__name__)

NETWORK_MODULE = "networks.lora"


@dataclass
class LayerPair:
    """One layer kohya's LoRA would wrap, in both models; `file_shape` is the shape the LoRA is written for
    (an SD2 Linear projection written with 1x1-conv shapes has `[out, in, 1, 1]`)."""

    name: str
    org: torch.nn.Module
    tuned: torch.nn.Module
    file_shape: tuple[int, ...]

    def delta(self, device: torch.device | str = "cpu") -> torch.Tensor:
        import torch

        tuned = self.tuned.weight.detach().to(device=device, dtype=torch.float32)
        return tuned - self.org.weight.detach().to(device=device, dtype=torch.float32)


def setup_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model_org", required=True, help="original model: .safetensors/.ckpt or diffusers folder")
    parser.add_argument("--model_tuned", required=True, help="fine-tuned model of the same family")
    parser.add_argument("--save_to", required=True, help="output LoRA file (.safetensors keeps metadata)")
    parser.add_argument("--dim", type=int, default=4, help="rank of Linear/1x1 modules; default 4")
    parser.add_argument("--conv_dim", type=int, default=None,
                        help="rank of 3x3 conv modules (LoCon); default: no 3x3 modules")
    parser.add_argument("--clamp_quantile", type=float, default=0.99,
                        help="clip the factors' entries to this quantile of their magnitudes (1 = no clipping)")
    parser.add_argument("--min_diff", type=float, default=0.01,
                        help="leave out modules whose largest |W_tuned - W_org| is below this; default 0.01")
    parser.add_argument("--v2", action="store_true", help="the models are SD2.x (checked; detected anyway)")
    parser.add_argument("--sdxl", action="store_true", help="the models are SDXL (checked; detected anyway)")
    parser.add_argument("--v_parameterization", action="store_true", help="the models predict v")
    parser.add_argument("--device", default="cpu", help="where the differences and SVDs are computed: cpu or cuda")
    parser.add_argument("--save_precision", choices=["float", "fp16", "bf16"], default=None,
                        help="dtype of the saved tensors; default float")
    parser.add_argument("--load_precision", choices=["float", "fp16", "bf16"], default=None,
                        help="dtype the models are loaded in (fp16/bf16 halve the memory); default: the file's")
    parser.add_argument("--no_metadata", action="store_true",
                        help="write only kohya's minimum ss_* keys (no modelspec.* keys)")
    add_overwrite_argument(parser)
    return parser


def refuse_lora_file(path: str, flag: str) -> None:
    """A LoRA passed where a checkpoint is expected gets its own message, not a key-layout error."""
    from library.models.state_dict_io import TensorFile

    if Path(path).is_dir() or not Path(path).is_file():
        return
    source = TensorFile(path)
    try:
        keys = source.keys()
        is_lora = any(key.endswith(".lora_down.weight") for key in keys)
    finally:
        source.close()
    if is_lora:
        raise ModelFormatError(path, f"is a LoRA file, not a model checkpoint; {flag} takes a full checkpoint "
                                     "(.safetensors/.ckpt) or a diffusers folder")


def check_families(args: argparse.Namespace) -> ModelFamily:
    """Both models must be one family (SD1 / SD2 / SDXL); --sdxl and --v2 must agree with the files."""
    from library.models.load import describe_family, detect_family

    families = {}
    for flag in ("--model_org", "--model_tuned"):
        path = getattr(args, flag[2:])
        refuse_lora_file(path, flag)
        families[flag] = detect_family(path, args.v_parameterization, args.v2 or None, flag=flag)
    org, tuned = families["--model_org"], families["--model_tuned"]
    if org.name != tuned.name:
        raise ModelFormatError(args.model_tuned, f"is an {describe_family(tuned)} model but --model_org "
                                                 f"{args.model_org} is {describe_family(org)}; "
                                                 "both models must be of the same family")
    if args.sdxl and org.name != "sdxl":
        raise FlagError(f"--sdxl was given but {args.model_org} is an {describe_family(org)} model; remove --sdxl "
                        "(the family is detected from the file)")
    return org


def target_layers(org_bundle, tuned_bundle, conv_dim: int | None) -> list[LayerPair]:
    """The layers kohya's LoRA wraps, enumerated by building the network over the original model.

    The network is built with rank 1: its names and targets do not depend on the rank, and a rank-`dim` network
    of a full-size model would cost memory for nothing.
    """
    from networks import lora as lora_network

    text_encoders = org_bundle.text_encoders
    network_args = {"conv_dim": 1, "conv_alpha": 1} if conv_dim else {}
    network = lora_network.create_network(1.0, 1, 1, org_bundle.vae,
                                          text_encoders if len(text_encoders) > 1 else text_encoders[0],
                                          org_bundle.unet, **network_args)
    org_models = [*org_bundle.text_encoders, org_bundle.unet]
    tuned_models = [*tuned_bundle.text_encoders, tuned_bundle.unet]
    paths = {}
    for index, model in enumerate(org_models):
        for path, module in model.named_modules():
            paths[id(module)] = (index, path)
    layers = []
    for module in network.text_encoder_loras + network.unet_loras:
        index, path = paths[id(module.original_module)]
        tuned = tuned_models[index].get_submodule(path)
        shape = tuple(module.original_module.weight.shape)
        if module.lora_name in network.written_as_conv and len(shape) == 2:
            shape = (*shape, 1, 1)
        layers.append(LayerPair(module.lora_name, module.original_module, tuned, shape))
    return layers


def changed_layers(layers: list[LayerPair], min_diff: float, device: torch.device) -> list[LayerPair]:
    kept = []
    for layer in tqdm(layers, desc="comparing", unit="module"):
        if float(layer.delta(device).abs().max()) >= min_diff:
            kept.append(layer)
    logger.info("%d of %d modules differ by at least --min_diff %g", len(kept), len(layers), min_diff)
    return kept


def rank_for(layer: LayerPair, dim: int, conv_dim: int | None) -> int:
    is_conv3x3 = len(layer.file_shape) == 4 and tuple(layer.file_shape[2:]) != (1, 1)
    return conv_dim if is_conv3x3 else dim


def clamp_factors(up: torch.Tensor, down: torch.Tensor, quantile: float) -> tuple[torch.Tensor, torch.Tensor]:
    """kohya clips each module's factors to the `quantile` of their entries' magnitudes (per module, not per batch)."""
    import torch

    if quantile >= 1.0:
        return up, down
    limit = torch.quantile(torch.cat([up.flatten(), down.flatten()]).abs().float(), quantile)
    return up.clamp(-limit, limit), down.clamp(-limit, limit)


def factorize_layers(layers: list[LayerPair], dim: int, conv_dim: int | None, clamp_quantile: float,
                     device: torch.device) -> dict[str, LoRAPair]:
    """SVD of every ΔW, batched over layers of one (matrix shape, rank); chunks keep the stacked ΔWs bounded."""
    import torch

    from networks.lora_file import as_matrix, pair_from_factors, svd_factorize
    from networks.lora_rank import SVD_CHUNK_ELEMENTS

    groups: dict[tuple, list[LayerPair]] = {}
    for layer in layers:
        matrix_shape = (layer.file_shape[0], int(torch.Size(layer.file_shape[1:]).numel()))
        groups.setdefault((matrix_shape, rank_for(layer, dim, conv_dim)), []).append(layer)
    pairs: dict[str, LoRAPair] = {}
    with tqdm(total=len(layers), desc="SVD", unit="module") as progress:
        for ((out_size, in_size), rank), members in groups.items():
            chunk_size = max(1, SVD_CHUNK_ELEMENTS // (out_size * in_size))
            for start in range(0, len(members), chunk_size):
                chunk = members[start:start + chunk_size]
                matrices = torch.stack([as_matrix(layer.delta(device)) for layer in chunk])
                ups, downs, _ = svd_factorize(matrices, rank)
                del matrices
                for layer, up, down in zip(chunk, ups, downs):
                    up, down = clamp_factors(up, down, clamp_quantile)
                    pairs[layer.name] = pair_from_factors(up.cpu(), down.cpu(), layer.file_shape)
                progress.update(len(chunk))
    return {layer.name: pairs[layer.name] for layer in layers}


def extraction_metadata(family: ModelFamily, dim: int, conv_dim: int | None, no_metadata: bool) -> dict[str, str]:
    """kohya's minimum keys with alpha = dim (COMPAT §2.1), plus modelspec.* unless --no_metadata."""
    network_args = {"conv_dim": conv_dim, "conv_alpha": conv_dim} if conv_dim else {}
    metadata = {"ss_v2": str(family.is_sd2), "ss_base_model_version": family.model_version,
                "ss_network_module": NETWORK_MODULE, "ss_network_dim": str(dim), "ss_network_alpha": str(dim),
                "ss_network_args": json.dumps(network_args)}
    if not no_metadata:
        metadata.update(modelspec_metadata(argparse.Namespace(), family, kind="lora"))
    return metadata


def check_flags(args: argparse.Namespace) -> None:
    from networks.lora_rank import positive_rank, refuse_output_over_inputs

    positive_rank("--dim", args.dim)
    positive_rank("--conv_dim", args.conv_dim)
    if not 0.0 < args.clamp_quantile <= 1.0:
        raise FlagError(f"--clamp_quantile {args.clamp_quantile}: expected a number in (0, 1]; kohya uses 0.99")
    if args.min_diff < 0:
        raise FlagError(f"--min_diff {args.min_diff}: expected a number >= 0")
    refuse_output_over_inputs(args.save_to, [args.model_org], "--model_org")
    refuse_output_over_inputs(args.save_to, [args.model_tuned], "--model_tuned")
    refuse_existing_output(args.save_to, args.overwrite, "--save_to")


def main(argv: list[str] | None = None) -> dict[str, LoRAPair]:
    args = setup_parser().parse_args(argv)
    import torch

    from library.models.load import load_target_model
    from library.models.save import precision_dtype
    from networks.lora_file import write_lora
    from networks.lora_rank import resolve_device

    check_flags(args)
    device = resolve_device(args.device)
    family = check_families(args)
    load_dtype = precision_dtype(args.load_precision)
    org = load_target_model(args.model_org, v_parameterization=args.v_parameterization, dtype=load_dtype)
    tuned = load_target_model(args.model_tuned, v_parameterization=args.v_parameterization, dtype=load_dtype)
    layers = changed_layers(target_layers(org, tuned, args.conv_dim), args.min_diff, device)
    if not layers:
        raise ModelFormatError(args.model_tuned, f"no module differs from --model_org by --min_diff {args.min_diff} "
                                                 "or more; nothing to extract (lower --min_diff?)")
    modules = factorize_layers(layers, args.dim, args.conv_dim, args.clamp_quantile, device)
    metadata = extraction_metadata(family, args.dim, args.conv_dim, args.no_metadata)
    write_lora(args.save_to, modules, metadata, precision_dtype(args.save_precision) or torch.float32,
               overwrite=args.overwrite)
    logger.info("saved %s: %d modules", args.save_to, len(modules))
    return modules


if __name__ == "__main__":
    run_cli(main)
