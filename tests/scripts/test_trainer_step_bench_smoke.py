"""Smoke test of bench/sdxl_trainer_step_bench.py on CPU with the tiny SDXL: every configuration (TI, LoRA,
LLLite) reports figures, and the TI optimizer state is O(vectors) (AdamW's two buffers per trained value), far
below LoRA's and the token tables."""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]


def test_tiny_cpu_bench_reports_ti_and_lllite_next_to_lora():
    command = [sys.executable, "bench/sdxl_trainer_step_bench.py", "--steps", "3"]
    result = subprocess.run(command, cwd=ROOT, capture_output=True, text=True, timeout=300, check=False,
                            env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert result.returncode == 0, result.stderr[-3000:]
    line = next(line for line in result.stdout.splitlines() if line.startswith("results "))
    results = json.loads(line[len("results "):])
    ti, lora, lllite = (results["configs"][name] for name in ("ti", "lora", "lllite"))
    for figures in (ti, lora, lllite):
        assert figures["step_seconds"] > 0 and figures["peak_bytes"] > 0 and figures["steps"] == 3
    assert results["ti_state_is_o_vectors"] is True
    assert ti["trained_parameters"] == 4 * sum(  # 4 vectors per encoder
        width for width in (32, 64))  # the tiny SDXL's encoder widths
    assert ti["optimizer_state_bytes"] < lora["optimizer_state_bytes"] / 100
    assert ti["optimizer_state_bytes"] < ti["token_table_parameters"]
