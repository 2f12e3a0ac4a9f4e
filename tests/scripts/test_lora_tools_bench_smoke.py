"""Smoke test of bench/lora_tools_bench.py in --tiny mode on CPU: it runs, extracts, resizes and reports."""
from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]


def test_tiny_bench_runs_and_reports(tmp_path):
    result = subprocess.run([sys.executable, "bench/lora_tools_bench.py", "--tiny", "--device", "cpu",
                             "--work", str(tmp_path)], cwd=ROOT, capture_output=True, text=True, timeout=180,
                            check=False)
    assert result.returncode == 0, result.stderr[-2000:]
    lines = result.stdout.splitlines()
    assert any(line.startswith("extract rank 4     cpu") for line in lines)
    results = json.loads(next(line for line in lines if line.startswith("results "))[len("results "):])
    assert results["extract rank 4 [cpu]"]["peak_rss"] >= results["extract rank 4 [cpu]"]["baseline_rss"] > 0
    if (ROOT / "networks" / "resize_lora.py").exists():
        assert "resize 8 -> 2 [cpu]" in results
    extracted = tmp_path / "bench_extracted_cpu.safetensors"
    assert extracted.stat().st_size > 0
