"""Inspect a LoRA file's weights, as kohya's networks/check_lora_weights.py does: per-module rank, alpha and the
size of its ΔW, with damaged modules flagged.

    python networks/check_lora_weights.py my_lora.safetensors [--show_all | --top 20] [--json]

Some modules can never learn and stay all-zero in every healthy file: SDXL conditions on text encoder 1's
penultimate layer, so TE1's last layer gets no gradient; an SD1/SD2 LoRA trained with --clip_skip N (its
ss_clip_skip) never uses the last N-1 text-encoder layers. Those are listed as "never trained (not used by this
model family)" and are not damage.

Exit codes:
  0  the file is healthy (modules that cannot learn may be all-zero)
  1  real damage: NaN/inf values, an all-zero module that could have learned, a module missing its up or down
     tensor, or up/down shapes that do not fit
  2  the file cannot be read as a LoRA (missing, truncated, a checkpoint or embedding), or a bad flag
"""
from __future__ import annotations

import argparse
import json
import logging
import math
import re
import sys
from dataclasses import asdict, dataclass
from pathlib import Path

if __package__ in (None, ""):
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from library.cli import run_cli
from library.errors import FlagError

logger = logging.getLogger(__name__)

NEVER_TRAINED = "never trained (not used by this model family)"
TEXT_LAYER = re.compile(r"^(lora_te[12]?)_text_model_encoder_layers_(\d+)_")


@dataclass
class ModuleStats:
    """One module: ‖ΔW‖ Frobenius and max |ΔW| include the alpha/rank scale. `problem` is "" when fine;
    `note` says why an all-zero module is expected (NEVER_TRAINED)."""

    name: str
    rank: int | None
    alpha: float | None
    delta_norm: float
    delta_max: float
    up_mean_abs: float
    down_mean_abs: float
    problem: str = ""
    note: str = ""


@dataclass
class Report:
    path: str
    modules: list[ModuleStats]

    @property
    def flagged(self) -> list[ModuleStats]:
        return [stats for stats in self.modules if stats.problem]

    @property
    def never_trained(self) -> list[ModuleStats]:
        return [stats for stats in self.modules if stats.note == NEVER_TRAINED]

    @property
    def exit_code(self) -> int:
        return 1 if self.flagged else 0


def setup_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("file", help="LoRA file (.safetensors/.pt/.ckpt)")
    parser.add_argument("-s", "--show_all", action="store_true", help="list every module, not only the largest")
    parser.add_argument("--top", type=int, default=20, help="how many of the largest modules (by ‖ΔW‖) to list")
    parser.add_argument("--json", action="store_true", help="print one JSON object instead of a table")
    return parser


def module_stats(name: str, pair, can_learn: bool) -> ModuleStats:
    import torch

    tensors_finite = bool(torch.isfinite(pair.down).all() and torch.isfinite(pair.up).all())
    finite_alpha = math.isfinite(pair.alpha)
    delta = pair.delta() if tensors_finite and finite_alpha else None
    stats = ModuleStats(name=name, rank=pair.rank, alpha=pair.alpha,
                        delta_norm=float(torch.linalg.vector_norm(delta)) if delta is not None else math.nan,
                        delta_max=float(delta.abs().max()) if delta is not None else math.nan,
                        up_mean_abs=float(pair.up.abs().mean()), down_mean_abs=float(pair.down.abs().mean()))
    if not tensors_finite or not finite_alpha:
        stats.problem = "non-finite (NaN/inf) values"
    elif stats.delta_max == 0.0:
        if can_learn:
            stats.problem = "all zero (no effect)"
        else:
            stats.note = NEVER_TRAINED
    return stats


def unlearnable_modules(names: list[str], family_hint: str | None, metadata: dict[str, str]) -> set[str]:
    """Modules whose layer's output never reaches the U-Net, so they get no gradient and stay zero.

    The layer count of each encoder is taken from the file (its highest layer index + 1), so tiny test models
    and full-size ones are judged alike.
    """
    from library.text.sdxl_cond import SDXL_LAYER

    layers: dict[str, dict[int, list[str]]] = {}
    for name in names:
        match = TEXT_LAYER.match(name)
        if match:
            layers.setdefault(match.group(1), {}).setdefault(int(match.group(2)), []).append(name)
    unused_counts: dict[str, int] = {}
    if family_hint == "sdxl":
        unused_counts["lora_te1"] = -SDXL_LAYER - 1  # TE2's last layer feeds the pooled embedding: it learns
    else:
        clip_skip = _clip_skip(metadata.get("ss_clip_skip"))
        if clip_skip > 1:
            unused_counts["lora_te"] = clip_skip - 1
    unused: set[str] = set()
    for prefix, count in unused_counts.items():
        by_layer = layers.get(prefix, {})
        if by_layer and count > 0:
            last = max(by_layer)
            for index in range(last - count + 1, last + 1):
                unused.update(by_layer.get(index, []))
    return unused


def _clip_skip(value: str | None) -> int:
    try:
        return int(value) if value not in (None, "", "None") else 1
    except ValueError:
        return 1


def check_file(path: str | Path) -> Report:
    """Statistics of every module of a LoRA file (refuses checkpoints and other non-LoRA files)."""
    import torch
    from tqdm import tqdm

    from networks.lora_file import read_lora

    lora = read_lora(path, "file", dtype=torch.float32, strict=False)
    unlearnable = unlearnable_modules(list(lora.modules), lora.family_hint, lora.metadata)
    modules = [module_stats(name, lora.modules[name], name not in unlearnable)
               for name in tqdm(sorted(lora.modules), desc="checking", unit="module")]
    modules += [ModuleStats(name, None, None, math.nan, math.nan, math.nan, math.nan, problem=f"damaged: {problem}")
                for name, problem in lora.damaged.items()]
    return Report(str(path), sorted(modules, key=lambda stats: stats.name))


def _format_row(stats: ModuleStats, name_width: int) -> str:
    flag = f"  <- {stats.problem}" if stats.problem else (f"  ({stats.note})" if stats.note else "")
    rank = "?" if stats.rank is None else stats.rank
    alpha = "?" if stats.alpha is None else f"{stats.alpha:g}"
    return (f"{stats.name:<{name_width}} {rank:>5} {alpha:>8} {stats.delta_norm:>11.4g} "
            f"{stats.delta_max:>11.4g} {stats.up_mean_abs:>11.4g} {stats.down_mean_abs:>11.4g}{flag}")


def table_lines(report: Report, show_all: bool, top: int) -> list[str]:
    """Header, the modules to show (all, or the `top` largest by ‖ΔW‖ plus every flagged one), and a summary."""
    if show_all:
        shown = report.modules
    else:
        largest = sorted(report.modules, key=lambda s: -s.delta_norm if math.isfinite(s.delta_norm) else 0.0)
        chosen = {stats.name for stats in largest[:top]} | {stats.name for stats in report.flagged}
        shown = [stats for stats in report.modules if stats.name in chosen]
    name_width = max([len("module")] + [len(stats.name) for stats in shown])
    header = (f"{'module':<{name_width}} {'rank':>5} {'alpha':>8} {'|dW|_F':>11} {'max|dW|':>11} "
              f"{'mean|up|':>11} {'mean|down|':>11}")
    lines = [header]
    lines += [_format_row(stats, name_width) for stats in shown]
    if not show_all and len(shown) < len(report.modules):
        lines.append(f"({len(report.modules) - len(shown)} smaller modules not shown; --show_all lists them)")
    lines.append(summary_line(report))
    lines += [f"  {stats.name}: {stats.problem}" for stats in report.flagged]
    if report.never_trained:
        lines.append(f"  {NEVER_TRAINED}: " + ", ".join(stats.name for stats in report.never_trained))
    return lines


def summary_line(report: Report) -> str:
    text_encoder = sum(1 for stats in report.modules if stats.name.startswith("lora_te"))
    ranks = sorted({stats.rank for stats in report.modules if stats.rank is not None})
    never = f"{len(report.never_trained)} never trained (not used by this model family), " \
        if report.never_trained else ""
    return (f"{report.path}: {len(report.modules)} modules ({text_encoder} text encoder, "
            f"{len(report.modules) - text_encoder} U-Net), ranks {', '.join(map(str, ranks))}; "
            f"{never}{len(report.flagged)} flagged")


def report_json(report: Report) -> str:
    def clean(value):  # JSON has no NaN
        return None if isinstance(value, float) and not math.isfinite(value) else value

    modules = [{key: clean(value) for key, value in asdict(stats).items()} for stats in report.modules]
    return json.dumps({"file": report.path, "modules": modules, "flagged": [s.name for s in report.flagged],
                       "never_trained": [s.name for s in report.never_trained], "exit_code": report.exit_code},
                      indent=2)


def main(argv: list[str] | None = None) -> Report:
    args = setup_parser().parse_args(argv)
    if args.top < 0:
        raise FlagError(f"--top {args.top}: expected a count of 0 or more")
    report = check_file(args.file)
    # the printed table is this tool's product, so it goes to stdout rather than the log
    print(report_json(report) if args.json else "\n".join(table_lines(report, args.show_all, args.top)))
    return report


def command_line(argv: list[str] | None = None) -> None:
    """main() with the exit code scripts test: 1 when any module is flagged."""
    report = main(argv)
    if report.exit_code:
        sys.exit(report.exit_code)


if __name__ == "__main__":
    run_cli(command_line)
