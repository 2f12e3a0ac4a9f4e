"""Smoke test of bench/sdxl_lora_step_bench.py: the tiny SDXL LoRA step on CPU, the report, and its flag checks."""
from __future__ import annotations

import importlib.util
import math
import sys
from pathlib import Path

import pytest
import torch

from library.errors import FlagError

BENCH_PATH = Path(__file__).resolve().parents[2] / "bench" / "sdxl_lora_step_bench.py"


@pytest.fixture(scope="module")
def bench():
    spec = importlib.util.spec_from_file_location("sdxl_lora_step_bench", BENCH_PATH)
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # its dataclass looks its module up while the class is created
    try:
        spec.loader.exec_module(module)
        yield module
    finally:
        sys.modules.pop(spec.name, None)


@pytest.fixture
def one_thread():
    # tiny ops on a shared CPU spend most of their time in thread hand-offs; one thread keeps the test fast
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def test_tiny_cpu_run_times_our_step_and_reports_positive_figures(bench, one_thread, capsys):
    results = bench.main(["--tiny", "--steps", "2", "--warmup", "1", "--device", "cpu"])

    for key in ("median_s_per_step", "p10_s_per_step", "p90_s_per_step", "images_per_s", "peak_memory_gib",
                "step_tflop", "matmul_tflops", "mfu"):
        assert results[key] > 0, key
    assert results["p10_s_per_step"] <= results["median_s_per_step"] <= results["p90_s_per_step"]
    assert results["images_per_s"] == pytest.approx(1 / results["median_s_per_step"])
    assert results["mfu"] == pytest.approx(results["step_tflop"] / results["median_s_per_step"]
                                           / results["matmul_tflops"])
    assert (results["timed_steps"], results["warmup_steps"], results["resolution"]) == (2, 1, 64)
    assert math.isfinite(results["last_loss"])
    # a tiny model is never compared with kohya's full-size figures
    assert results["reference_setting"] is None and results["meets_target"] is None
    report = capsys.readouterr().out
    assert "tiny SDXL LoRA step on cpu: rank 32, alpha 16, U-Net only, 64x64, batch 1" in report
    assert "batch 1, gradient checkpointing  0.92 s/step, 6.7 GiB -> max_s_per_step 0.6" in report
    assert "(no kohya figure for these settings: not compared)" in report


@pytest.mark.parametrize("argv, setting", [
    ([], "batch 1"),
    (["--gradient_checkpointing"], "batch 1, gradient checkpointing"),
    (["--batch_size", "4"], "batch 4"),
    (["--batch_size", "4", "--gradient_checkpointing"], None),
    (["--batch_size", "2"], None),
    (["--resolution", "768"], None),
])
def test_full_size_settings_pick_the_matching_kohya_figure(bench, argv, setting):
    options = bench.parse_bench_args(argv + ["--device", "cpu"])
    assert bench.reference_setting(options) == setting


def test_targets_are_issue_4s(bench):
    # <= 0.50 s/step at batch 1, <= 0.60 s with checkpointing, >= 8 images/s at batch 4
    assert bench.meets_target("batch 1", 0.50, 2.0) is True
    assert bench.meets_target("batch 1", 0.51, 1.96) is False
    assert bench.meets_target("batch 1, gradient checkpointing", 0.59, 1.7) is True
    assert bench.meets_target("batch 4", 0.49, 4 / 0.49) is True
    assert bench.meets_target("batch 4", 0.73, 4 / 0.73) is False


@pytest.mark.parametrize("argv, message", [
    (["--steps", "0"], "--steps: expected an integer >= 1, got 0"),
    (["--batch_size", "0"], "--batch_size: expected an integer >= 1, got 0"),
    (["--resolution", "1000"], "--resolution: expected a multiple of 64 (e.g. 1024), got 1000"),
])
def test_bad_flags_name_the_flag(bench, argv, message):
    with pytest.raises(FlagError) as error:
        bench.parse_bench_args(argv + ["--device", "cpu"])
    assert str(error.value) == message


@pytest.mark.skipif(torch.cuda.is_available(), reason="needs a machine without CUDA")
def test_cuda_without_a_gpu_points_to_the_cpu_smoke_test(bench):
    with pytest.raises(FlagError, match="--device cuda: no CUDA device .* use --device cpu --tiny"):
        bench.parse_bench_args(["--device", "cuda"])
