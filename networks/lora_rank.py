"""Shared helpers of the rank-changing LoRA tools (resize, SVD merge, DyLoRA split): rank selection from singular
values, batched SVD re-factoring of many ΔW matrices on one device, and the checks their command lines share.
"""
from __future__ import annotations

import logging
import os
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass
from pathlib import Path

import torch
from tqdm import tqdm

from library.errors import FlagError
from library.options.choices import DYNAMIC_METHODS
from networks.lora_file import LoRAPair, pair_from_factors, svd_factorize

logger = logging.getLogger(__name__)

# one batched SVD call handles at most this many matrix elements, so big groups do not exhaust memory
SVD_CHUNK_ELEMENTS = 1 << 25


@dataclass
class RankChoice:
    """What a module keeps: the rank, and the fractions of sum(S), of the Frobenius norm and max(S)/min kept S."""

    rank: int
    sum_fraction: float
    fro_fraction: float
    max_ratio: float


@dataclass
class Refactored:
    """One module re-factored: its new LoRAPair and how much of the original ΔW it keeps."""

    pair: LoRAPair
    choice: RankChoice


def choose_rank(singular_values: torch.Tensor, max_rank: int, method: str | None = None,
                param: float | None = None) -> int:
    """The rank to keep for descending singular values: `max_rank`, or fewer with a dynamic method (never above
    max_rank, at least 1). kohya's resize methods (COMPAT §2.1, networks/resize_lora.py):
    sv_ratio keeps S >= S_max / param; sv_fro the smallest k with sqrt(Σ_k S²/Σ S²) >= param; sv_cumulative the
    smallest k with Σ_k S / Σ S >= param.
    """
    values = singular_values.double()
    count = int(values.shape[0])
    rank = min(max_rank, count)
    if method is not None and float(values.sum()) > 0:
        rank = min(rank, _dynamic_rank(values, method, float(param)))
    return max(1, rank)


def _dynamic_rank(values: torch.Tensor, method: str, param: float) -> int:
    # float32 SVDs are exact to ~1e-7, so a fraction that reaches the target exactly (0.8 == 12/15) counts
    tolerance = 1e-6
    if method == "sv_ratio":
        return int((values >= values[0] / param - tolerance * values[0]).sum())
    if method == "sv_fro":
        fractions = (values.pow(2).cumsum(0) / values.pow(2).sum()).sqrt()
    elif method == "sv_cumulative":
        fractions = values.cumsum(0) / values.sum()
    else:
        raise FlagError(f"--dynamic_method {method}: unknown; expected one of {', '.join(DYNAMIC_METHODS)}")
    reached = (fractions >= param - tolerance).nonzero()
    return int(reached[0]) + 1 if len(reached) else int(values.shape[0])


def describe_choice(singular_values: torch.Tensor, rank: int) -> RankChoice:
    values = singular_values.double()
    total, total_squared = float(values.sum()), float(values.pow(2).sum())
    kept = values[:rank]
    smallest_kept = float(kept[-1]) if rank else 0.0
    return RankChoice(rank=rank,
                      sum_fraction=float(kept.sum()) / total if total else 1.0,
                      fro_fraction=(float(kept.pow(2).sum()) / total_squared) ** 0.5 if total_squared else 1.0,
                      max_ratio=float(values[0]) / smallest_kept if smallest_kept else float("inf"))


@dataclass
class LowRankDelta:
    """ΔW = up @ down in a layer of `weight_shape`: up `[out, R]`, down `[R, in·k·k]` (scale already applied)."""

    up: torch.Tensor
    down: torch.Tensor
    weight_shape: tuple[int, ...]

    @classmethod
    def of_pairs(cls, pairs: list[LoRAPair], weights: list[float], weight_shape: tuple[int, ...] | None = None
                 ) -> LowRankDelta:
        """Σ weight_i × ΔW_i of several pairs of one layer, kept factored: their ups and downs side by side."""
        ups = [pair.up.flatten(1) * (weight * pair.scale) for pair, weight in zip(pairs, weights)]
        downs = [pair.down.flatten(1) for pair in pairs]
        shape = weight_shape or _weight_shape(pairs[0])
        return cls(torch.cat(ups, dim=1), torch.cat(downs, dim=0), tuple(shape))

    def matrix_shape(self) -> tuple[int, int, int]:
        return int(self.up.shape[0]), int(self.up.shape[1]), int(self.down.shape[1])


def _weight_shape(pair: LoRAPair) -> tuple[int, ...]:
    if pair.is_conv:
        return (pair.up.shape[0], *pair.down.shape[1:])
    return (pair.up.shape[0], pair.down.shape[1])


def refactor_deltas(deltas: Mapping[str, LowRankDelta], rank_for: Callable[[str, torch.Tensor], int],
                    alpha_for: Callable[[str, int], float | None], device: torch.device | str = "cpu",
                    description: str = "SVD") -> dict[str, Refactored]:
    """Re-factor every ΔW into a LoRAPair of the rank `rank_for(name, S)` chooses from ΔW's singular values S.

    ΔW = up @ down is never built: with up = Qu·Ru and downᵀ = Qd·Rd (QR), ΔW = Qu (Ru Rdᵀ) Qdᵀ, so only the small
    R×R core needs an SVD. Deltas of one shape go through one batched call (chunked to SVD_CHUNK_ELEMENTS) on
    `device`. `alpha_for(name, rank)` gives the new alpha (None: alpha = rank); ΔW is the same whatever the alpha.
    """
    groups: dict[tuple[int, int, int], list[str]] = {}
    for name, delta in deltas.items():
        groups.setdefault(delta.matrix_shape(), []).append(name)
    results: dict[str, Refactored] = {}
    with tqdm(total=len(deltas), desc=description, unit="module") as progress:
        for (out_size, inner, in_size), names in groups.items():
            chunk_size = max(1, SVD_CHUNK_ELEMENTS // ((out_size + in_size) * inner))
            for chunk in _chunks(names, chunk_size):
                results.update(_refactor_chunk({name: deltas[name] for name in chunk}, rank_for, alpha_for, device))
                progress.update(len(chunk))
    return {name: results[name] for name in deltas}


def _refactor_chunk(deltas: Mapping[str, LowRankDelta], rank_for: Callable[[str, torch.Tensor], int],
                    alpha_for: Callable[[str, int], float | None], device: torch.device | str
                    ) -> dict[str, Refactored]:
    ups = torch.stack([delta.up.float() for delta in deltas.values()]).to(device)
    downs = torch.stack([delta.down.float() for delta in deltas.values()]).to(device)
    up_basis, up_core = torch.linalg.qr(ups)
    down_basis, down_core = torch.linalg.qr(downs.transpose(1, 2))
    core = up_core @ down_core.transpose(1, 2)
    core_ups, core_downs, singular_values = svd_factorize(core, min(core.shape[1:]))
    full_ups, full_downs = up_basis @ core_ups, core_downs @ down_basis.transpose(1, 2)
    results = {}
    for index, (name, delta) in enumerate(deltas.items()):
        values = singular_values[index].cpu()
        rank = rank_for(name, values)
        up, down = full_ups[index, :, :rank].cpu(), full_downs[index, :rank].cpu()
        results[name] = Refactored(pair_from_factors(up, down, delta.weight_shape, alpha_for(name, rank)),
                                   describe_choice(values, rank))
    return results


def _chunks(items: list[str], size: int) -> Iterable[list[str]]:
    for start in range(0, len(items), size):
        yield items[start:start + size]


def resolve_device(name: str) -> torch.device:
    """`--device cpu|cuda[:N]`; cuda without a GPU is a flag error rather than a crash deep inside torch."""
    if not name.startswith(("cpu", "cuda")):
        raise FlagError(f"--device {name}: unknown; expected cpu or cuda")
    if name.startswith("cuda") and not torch.cuda.is_available():
        raise FlagError(f"--device {name}: no CUDA GPU is available here; use --device cpu")
    return torch.device(name)


def refuse_output_over_inputs(output: str | os.PathLike, inputs: Iterable[str | os.PathLike],
                              input_flag: str, output_flag: str = "--save_to") -> None:
    """The output must not be one of the input files (it would be replaced before a failure could be seen)."""
    output_path = Path(output).resolve()
    for source in inputs:
        if Path(source).resolve() == output_path:
            raise FlagError(f"{output_flag} {output} is also an input ({input_flag}); "
                            "choose another output file so the input stays unchanged")


def positive_rank(flag: str, value: int | None) -> int | None:
    if value is not None and value < 1:
        raise FlagError(f"{flag} {value}: expected a rank of at least 1")
    return value
