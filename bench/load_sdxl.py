"""Benchmark: load a full-size SDXL single file vs a bare `safetensors.torch.load_file` of the same file.

Builds a full-size random-weight SDXL base checkpoint (SGM layout, fp16 by default, about 6.9 GB) once under
`bench/_work/`, then runs each loader in a fresh process and prints seconds and peak RSS.
Targets (issue 2): our loader's peak RSS <= 1.3x the file size, time <= 1.5x the bare load.

    python bench/load_sdxl.py [--dtype fp16|bf16|float] [--repeats 2] [--work bench/_work]
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))


def build_full_size_file(path: Path, dtype_name: str) -> None:
    """Random full-size SDXL in SGM layout, built tensor by tensor from the meta-device architecture."""
    import torch
    from accelerate import init_empty_weights
    from diffusers import AutoencoderKL, UNet2DConditionModel
    from safetensors.torch import save_file
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection

    from library.families import SDXL
    from library.models.bundle import ModelBundle
    from library.models.reference_configs import CLIP_L_TEXT, OPEN_CLIP_BIGG_TEXT, SDXL_UNET, SDXL_VAE
    from library.models.save import single_file_state_dict

    dtype = {"fp16": torch.float16, "bf16": torch.bfloat16, "float": torch.float32}[dtype_name]
    with init_empty_weights():
        bundle = ModelBundle(
            family=SDXL, unet=UNet2DConditionModel(**SDXL_UNET), vae=AutoencoderKL(**SDXL_VAE),
            text_encoders=[CLIPTextModel(CLIPTextConfig(**CLIP_L_TEXT)),
                           CLIPTextModelWithProjection(CLIPTextConfig(**OPEN_CLIP_BIGG_TEXT))])
    meta = single_file_state_dict(bundle)
    generator = torch.Generator().manual_seed(0)
    tensors = {}
    for key, tensor in meta.items():
        if tensor.is_floating_point():
            tensors[key] = (torch.randn(tensor.shape, generator=generator, dtype=torch.float32) * 0.02).to(dtype)
        else:
            tensors[key] = torch.arange(tensor.numel(), dtype=tensor.dtype).reshape(tensor.shape)
    path.parent.mkdir(parents=True, exist_ok=True)
    temp = path.with_suffix(".tmp")
    save_file(tensors, str(temp), metadata={"modelspec.architecture": SDXL.architecture})
    os.replace(temp, path)


CHILD = r"""
import json, resource, sys, time
sys.path.insert(0, {root!r})
mode, path = sys.argv[1], sys.argv[2]
import torch, diffusers, transformers, safetensors.torch  # imports are not part of the timing
from library.models import load
baseline = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
start = time.perf_counter()
if mode == "bare":
    state_dict = safetensors.torch.load_file(path)
    count = len(state_dict)
else:
    bundle = load.load_target_model(path)
    count = sum(1 for model in bundle.models() for _ in model.state_dict())
seconds = time.perf_counter() - start
peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
print(json.dumps(dict(mode=mode, seconds=seconds, peak_rss=peak, baseline_rss=baseline, tensors=count)))
"""


def run_child(mode: str, path: Path) -> dict:
    script = CHILD.format(root=str(ROOT))
    output = subprocess.run([sys.executable, "-c", script, mode, str(path)], check=True, capture_output=True, text=True)
    return json.loads(output.stdout.strip().splitlines()[-1])


def warm_page_cache(path: Path) -> None:
    with open(path, "rb") as handle:
        while handle.read(64 << 20):
            pass


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--dtype", default="fp16", choices=("fp16", "bf16", "float"))
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--work", type=Path, default=ROOT / "bench" / "_work")
    args = parser.parse_args()

    path = args.work / f"sdxl_full_random_{args.dtype}.safetensors"
    if not path.exists():
        print(f"building {path} ...", flush=True)
        start = time.perf_counter()
        build_full_size_file(path, args.dtype)
        print(f"built in {time.perf_counter() - start:.1f} s", flush=True)
    size = path.stat().st_size
    print(f"file: {path} ({size / 2**30:.2f} GiB)")
    warm_page_cache(path)
    results = {"bare": [], "ours": []}
    for _ in range(args.repeats):
        for mode in ("bare", "ours"):
            results[mode].append(run_child(mode, path))
    print(f"{'loader':<8} {'seconds (best)':>15} {'peak RSS GiB':>13} {'RSS - imports':>14} {'RSS / file':>11}")
    best = {}
    for mode, runs in results.items():
        run = min(runs, key=lambda item: item["seconds"])
        best[mode] = run
        print(f"{mode:<8} {run['seconds']:>15.2f} {run['peak_rss'] / 2**30:>13.2f} "
              f"{(run['peak_rss'] - run['baseline_rss']) / 2**30:>14.2f} {run['peak_rss'] / size:>11.2f}")
    time_ratio = best["ours"]["seconds"] / best["bare"]["seconds"]
    rss_ratio = best["ours"]["peak_rss"] / size
    print(f"ours/bare time: {time_ratio:.2f}x (target <= 1.5x)  ours peak RSS/file: {rss_ratio:.2f}x (target <= 1.3x)")


if __name__ == "__main__":
    main()
