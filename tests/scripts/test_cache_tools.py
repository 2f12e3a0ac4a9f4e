"""The caching tools end to end on tiny single-file models: cache_latents, cache_text_encoder_outputs,
finetune/prepare_buckets_latents, one-line errors, and cache_latents sharded over two CPU processes.
"""
from __future__ import annotations

import json
import logging
import os
import re
import socket
import subprocess
import sys

import pytest

from finetune import prepare_buckets_latents
from library.cli import run_cli
from tests.cache_fixtures import BUCKET_FLAGS, SIZES, make_dreambooth_dir, npz_names, read_npz, write_image
from tests.conftest import ROOT
from tools import cache_latents, cache_text_encoder_outputs

SDXL_NAMES = ["small_0048x0080_sdxl.npz", "square_0064x0064_sdxl.npz", "tall_0064x0096_sdxl.npz",
              "wide_0096x0064_sdxl.npz"]
# with BUCKET_FLAGS (64-px base, 32-px steps): the bucket each image of SIZES goes to (COMPAT §10.2)
EXPECTED_BUCKETS = {"square": [64, 64], "wide": [64, 64], "tall": [32, 96], "small": [32, 96]}


def test_cache_latents_tool_second_run_computes_nothing(tmp_path, tiny_models):
    image_dir = make_dreambooth_dir(tmp_path)
    argv = ["--pretrained_model_name_or_path", str(tiny_models.path("sdxl")), "--sdxl",
            "--train_data_dir", str(tmp_path), *BUCKET_FLAGS, "--vae_batch_size", "2"]
    first = cache_latents.main(argv)
    assert (first.computed, first.reused, first.invalid_reasons) == (4, 0, {"no cache file": 4})
    assert npz_names(image_dir) == SDXL_NAMES
    assert read_npz(image_dir / "tall_0064x0096_sdxl.npz")["latents"].shape == (4, 12, 4)
    second = cache_latents.main(argv)
    assert (second.computed, second.reused, second.invalid_reasons) == (0, 4, None)


def test_cache_text_encoder_outputs_tool_writes_sdxl_keys(tmp_path, tiny_models):
    captions = {name: f"a photo of the {name} thing" for name in SIZES}
    image_dir = make_dreambooth_dir(tmp_path, captions=captions)
    argv = ["--pretrained_model_name_or_path", str(tiny_models.path("sdxl")), "--train_data_dir", str(tmp_path),
            "--resolution", "64", "--max_token_length", "225"]
    stats = cache_text_encoder_outputs.main(argv)
    assert (stats.computed, stats.reused) == (4, 0)
    arrays = read_npz(image_dir / "wide_te_outputs.npz")
    assert (arrays["hidden_state1"].shape, arrays["hidden_state2"].shape, arrays["pool2"].shape) == \
        ((227, 32), (227, 64), (32,))  # tiny widths; 1 + 3 x 75 + 1 tokens (COMPAT §8)
    assert cache_text_encoder_outputs.main(argv).reused == 4


def test_prepare_buckets_latents_writes_stem_npz_and_train_resolution(tmp_path, tiny_models):
    image_dir = tmp_path / "images"
    for seed, (name, size) in enumerate(SIZES.items()):
        write_image(image_dir / f"{name}.png", size, seed)
    in_json, out_json = tmp_path / "meta.json", tmp_path / "meta_lat.json"
    in_json.write_text(json.dumps({name: {"caption": f"{name} photo"} for name in SIZES}), encoding="utf-8")
    stats = prepare_buckets_latents.main([str(image_dir), str(in_json), str(out_json), str(tiny_models.path("sdxl")),
                                          "--max_resolution", "64,64", "--min_bucket_reso", "32",
                                          "--max_bucket_reso", "128", "--bucket_reso_steps", "32"])
    assert stats.computed == 4
    metadata = json.loads(out_json.read_text(encoding="utf-8"))
    assert metadata == {name: {"caption": f"{name} photo", "train_resolution": EXPECTED_BUCKETS[name],
                               "image_size": list(SIZES[name])} for name in SIZES}
    # kohya v0.9.1 naming (COMPAT §7.2)
    assert npz_names(image_dir) == ["small.npz", "square.npz", "tall.npz", "wide.npz"]
    assert read_npz(image_dir / "small.npz")["latents"].shape == (4, 12, 4)
    # training with the same bucket flags reads these files as legacy caches instead of encoding again
    reuse = cache_latents.main(["--pretrained_model_name_or_path", str(tiny_models.path("sdxl")),
                                "--in_json", str(out_json), "--train_data_dir", str(image_dir), *BUCKET_FLAGS])
    assert (reuse.computed, reuse.reused) == (0, 4)
    assert npz_names(image_dir) == ["small.npz", "square.npz", "tall.npz", "wide.npz"]


@pytest.mark.parametrize("tool", ["cache_latents", "prepare_buckets_latents"])
def test_missing_model_path_is_one_line_error(tmp_path, capsys, tool):
    make_dreambooth_dir(tmp_path, {"square": SIZES["square"]})
    missing = tmp_path / "no_such_model.safetensors"
    if tool == "cache_latents":
        main = cache_latents.main
        argv = ["--pretrained_model_name_or_path", str(missing), "--train_data_dir", str(tmp_path),
                "--resolution", "64"]
    else:
        main = prepare_buckets_latents.main
        (tmp_path / "meta.json").write_text('{"square": {"caption": "x"}}', encoding="utf-8")
        argv = [str(tmp_path / "2_sks dog"), str(tmp_path / "meta.json"), str(tmp_path / "out.json"), str(missing)]
    root_level = logging.getLogger().level
    try:
        with pytest.raises(SystemExit) as raised:
            run_cli(main, argv)
    finally:
        logging.getLogger().setLevel(root_level)
    assert raised.value.code == 2
    stderr = capsys.readouterr().err.strip().splitlines()
    assert len(stderr) == 1 and stderr[0].startswith(f"error: {missing}: model not found")
    assert not (tmp_path / "out.json").exists()


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def test_cache_latents_under_two_cpu_processes_splits_the_work(tmp_path, tiny_models):
    sizes = {f"img{index}": (64 + 32 * (index % 3), 64 + 32 * (index % 2)) for index in range(8)}
    image_dir = make_dreambooth_dir(tmp_path / "data", sizes)
    # the only launch that really runs 2 CPU processes here (LIBRARIES.md §5); --cpu would silently run one
    command = [sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu", "--num_processes", "2",
               "--num_machines", "1", "--mixed_precision", "no", "--dynamo_backend", "no",
               "--main_process_port", str(free_port()), "tools/cache_latents.py",
               "--pretrained_model_name_or_path", str(tiny_models.path("sdxl")),
               "--train_data_dir", str(tmp_path / "data"), *BUCKET_FLAGS]
    env = {**os.environ, "ACCELERATE_USE_CPU": "true", "OMP_NUM_THREADS": "1"}
    result = subprocess.run(command, cwd=ROOT, env=env, capture_output=True, text=True, timeout=240, check=False)
    output = result.stdout + result.stderr
    assert result.returncode == 0, output[-3000:]
    assert len(npz_names(image_dir)) == 8
    expected = {f"{name}_{width:04d}x{height:04d}_sdxl.npz" for name, (width, height) in sizes.items()}
    assert set(npz_names(image_dir)) == expected
    # process_info() saw 2 processes, and each one encoded only its own half
    per_process = dict(re.findall(r"process (\d)/2: (.*)", output))
    assert per_process == {"0": "0 reused, 4 computed, 4 left to other processes; redone because: no cache file (4)",
                           "1": "0 reused, 4 computed, 4 left to other processes; redone because: no cache file (4)"}
