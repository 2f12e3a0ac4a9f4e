"""Inspect a LoRA file's weights, as kohya's networks/check_lora_weights.py does: per-module rank, alpha and the
size of its ΔW, with all-zero and non-finite (NaN/inf) modules flagged.

    python networks/check_lora_weights.py my_lora.safetensors [--show_all | --top 20] [--json]

Exit code: 0 when every module is finite and non-zero, 1 when any module is flagged (so scripts can test a file),
2 for a file that cannot be read as a LoRA.
"""
from __future__ import annotations

import argparse
import json
import logging
import math
import sys
from dataclasses import asdict, dataclass
from pathlib import Path

if __package__ in (None, ""):
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch
from tqdm import tqdm

from library.cli import run_cli
from library.errors import FlagError
from networks.lora_file import LoRAPair, read_lora

logger = logging.getLogger(__name__)

COLUMNS = ("rank", "alpha", "delta_norm", "delta_max", "up_mean_abs", "down_mean_abs")


@dataclass
class ModuleStats:
    """One module: ‖ΔW‖ Frobenius and max |ΔW| include the alpha/rank scale; `problem` is "" when fine."""

    name: str
    rank: int
    alpha: float
    delta_norm: float
    delta_max: float
    up_mean_abs: float
    down_mean_abs: float
    problem: str = ""


@dataclass
class Report:
    path: str
    modules: list[ModuleStats]

    @property
    def flagged(self) -> list[ModuleStats]:
        return [stats for stats in self.modules if stats.problem]

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


def module_stats(name: str, pair: LoRAPair) -> ModuleStats:
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
        stats.problem = "all zero (no effect)"
    return stats


def check_file(path: str | Path) -> Report:
    """Statistics of every module of a LoRA file (refuses checkpoints and other non-LoRA files)."""
    lora = read_lora(path, "file", dtype=torch.float32)
    modules = [module_stats(name, lora.modules[name])
               for name in tqdm(sorted(lora.modules), desc="checking", unit="module")]
    return Report(str(path), modules)


def _format_row(stats: ModuleStats, name_width: int) -> str:
    flag = f"  <- {stats.problem}" if stats.problem else ""
    return (f"{stats.name:<{name_width}} {stats.rank:>5} {stats.alpha:>8g} {stats.delta_norm:>11.4g} "
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
    return lines


def summary_line(report: Report) -> str:
    text_encoder = sum(1 for stats in report.modules if stats.name.startswith("lora_te"))
    ranks = sorted({stats.rank for stats in report.modules})
    return (f"{report.path}: {len(report.modules)} modules ({text_encoder} text encoder, "
            f"{len(report.modules) - text_encoder} U-Net), ranks {', '.join(map(str, ranks))}; "
            f"{len(report.flagged)} flagged")


def report_json(report: Report) -> str:
    def clean(value):  # JSON has no NaN
        return None if isinstance(value, float) and not math.isfinite(value) else value

    modules = [{key: clean(value) for key, value in asdict(stats).items()} for stats in report.modules]
    return json.dumps({"file": report.path, "modules": modules, "flagged": [s.name for s in report.flagged],
                       "exit_code": report.exit_code}, indent=2)


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
