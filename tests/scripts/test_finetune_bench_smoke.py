"""Smoke test of bench/finetune_memory_bench.py in --tiny mode on CPU: each configuration runs in its own process
and reports positive figures, and a fused step keeps no more memory than the unfused one.

Every configuration is a fresh interpreter (about 8 s of imports on a shared CPU): all four, two at a time, took
17-27 s, so only the Adafactor pair runs (--jobs 2, one thread each: about 10 s). The AdamW8bit configurations take
the same code path with another optimizer name.
"""
from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
CONFIGS = ("adafactor", "adafactor-fused")
ALLOCATOR_NOISE = 16 * 2 ** 20  # tiny mode: RSS differences of a few MiB are allocator noise


def test_tiny_cpu_bench_reports_each_config():
    command = [sys.executable, "bench/finetune_memory_bench.py", "--tiny", "--device", "cpu",
               "--configs", ",".join(CONFIGS), "--jobs", "2"]
    result = subprocess.run(command, cwd=ROOT, capture_output=True, text=True, timeout=180, check=False)
    assert result.returncode == 0, result.stderr[-3000:]
    lines = result.stdout.splitlines()
    for config in CONFIGS:
        assert any(line.split()[:1] == [config] for line in lines), f"no table row for {config}"
    results = json.loads(next(line for line in lines if line.startswith("results "))[len("results "):])
    assert results["tiny"] is True and results["device"] == "cpu"
    runs = results["configs"]
    assert set(runs) == set(CONFIGS)
    for config, run in runs.items():
        for key in ("step_seconds", "peak_bytes", "baseline_bytes", "weights_bytes", "state_bytes",
                    "gradient_set_bytes", "peak_over_expected"):
            assert run[key] > 0, f"{config}: {key} = {run[key]}"
        assert run["peak_bytes"] >= run["baseline_bytes"]
        assert run["gradient_set_bytes"] == run["weights_bytes"]
        assert run["weights_updated"], f"{config}: the step left the weights unchanged"
    for name in {config.removesuffix("-fused") for config in CONFIGS}:
        unfused, fused = runs[name], runs[f"{name}-fused"]
        assert unfused["inner_optimizers"] == 1 and fused["inner_optimizers"] > 1
        assert fused["weights_bytes"] == unfused["weights_bytes"]
        # the baseline dominates tiny mode: only check that fusing saves at most one gradient set, and does not
        # cost memory beyond noise
        saved = unfused["peak_bytes"] - fused["peak_bytes"]
        assert -ALLOCATOR_NOISE <= saved <= unfused["gradient_set_bytes"] + ALLOCATOR_NOISE, (name, saved)
        assert results["targets"][f"{name}: (unfused - fused peak) / one gradient set"]["met"] is None
