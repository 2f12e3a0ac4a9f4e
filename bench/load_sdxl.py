"""Benchmark: load a full-size SDXL single file vs a bare `safetensors.torch.load_file` of the same file.

Builds a full-size random-weight SDXL base checkpoint (SGM layout, fp16 by default, about 6.9 GB) once under
`bench/_work/`, then runs each loader in a fresh process and prints seconds and peak RSS.
Targets (issue 2): our loader's peak RSS <= 1.3x the file size, time <= 1.5x the bare load.

    python bench/load_sdxl.py [--dtype fp16|bf16|float] [--repeats 2] [--cold] [--work bench/_work]
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
import json, sys, time
sys.path.insert(0, {root!r})
mode, path = sys.argv[1], sys.argv[2]
# Imports (including diffusers' lazily imported model classes) are not part of the timing.
import torch, safetensors.torch
from diffusers import AutoencoderKL, UNet2DConditionModel
from transformers import CLIPTextModel, CLIPTextModelWithProjection
import accelerate
from library.models import load

def high_water_mark():  # VmHWM: peak resident memory of this process (reset at exec, unlike ru_maxrss)
    for line in open("/proc/self/status"):
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) * 1024

def touch(tensors):  # read one element per 4 KiB page, so every byte of the weights is resident
    total = 0.0
    for tensor in tensors:
        flat = tensor.detach().reshape(-1)
        total += float(flat[:: max(1, 4096 // flat.element_size())].float().sum())
    return total

baseline = high_water_mark()
start = time.perf_counter()
if mode == "bare":
    state_dict = safetensors.torch.load_file(path)
    tensors = list(state_dict.values())
else:
    bundle = load.load_target_model(path)
    tensors = [tensor for model in bundle.models() for tensor in model.state_dict().values()]
loaded = time.perf_counter() - start
touch(tensors)
materialised = time.perf_counter() - start
print(json.dumps(dict(mode=mode, loaded=loaded, materialised=materialised, peak_rss=high_water_mark(),
                      baseline_rss=baseline, tensors=len(tensors))))
"""


def run_child(mode: str, path: Path) -> dict:
    script = CHILD.format(root=str(ROOT))
    output = subprocess.run([sys.executable, "-c", script, mode, str(path)], check=True, capture_output=True, text=True)
    return json.loads(output.stdout.strip().splitlines()[-1])


def warm_page_cache(path: Path) -> None:
    with open(path, "rb") as handle:
        while handle.read(64 << 20):
            pass


def drop_page_cache() -> None:
    os.sync()
    try:
        Path("/proc/sys/vm/drop_caches").write_text("3\n")
    except OSError as error:
        raise SystemExit(f"--cold needs root to write /proc/sys/vm/drop_caches: {error}") from None


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--dtype", default="fp16", choices=("fp16", "bf16", "float"))
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--work", type=Path, default=ROOT / "bench" / "_work")
    parser.add_argument("--cold", action="store_true",
                        help="drop the page cache before each run (needs root), so the file is read from disk")
    args = parser.parse_args()

    path = args.work / f"sdxl_full_random_{args.dtype}.safetensors"
    if not path.exists():
        print(f"building {path} ...", flush=True)
        start = time.perf_counter()
        build_full_size_file(path, args.dtype)
        print(f"built in {time.perf_counter() - start:.1f} s", flush=True)
    size = path.stat().st_size
    print(f"file: {path} ({size / 2**30:.2f} GiB)")
    if not args.cold:
        warm_page_cache(path)
    print(f"page cache: {'dropped before each run (file read from disk)' if args.cold else 'warm'}")
    results = {"bare": [], "ours": []}
    for _ in range(args.repeats):
        for mode in ("bare", "ours"):
            if args.cold:
                drop_page_cache()
            results[mode].append(run_child(mode, path))
    best = {mode: min(runs, key=lambda item: item["materialised"]) for mode, runs in results.items()}
    print(f"{'loader':<6} {'load s':>8} {'load+read all s':>16} {'peak RSS GiB':>13} {'RSS after imports':>18} "
          f"{'peak RSS / file':>16}")
    for mode, run in best.items():
        print(f"{mode:<6} {run['loaded']:>8.2f} {run['materialised']:>16.2f} {run['peak_rss'] / 2**30:>13.2f} "
              f"{run['baseline_rss'] / 2**30:>18.2f} {run['peak_rss'] / size:>16.2f}")
    time_ratio = best["ours"]["materialised"] / best["bare"]["materialised"]
    rss_ratio = best["ours"]["peak_rss"] / size
    print(f"ours/bare, load + read every weight: {time_ratio:.2f}x (target <= 1.5x); "
          f"ours peak RSS / file size: {rss_ratio:.2f}x (target <= 1.3x)")
    print("note: both loaders map the file (safetensors mmap); 'load s' alone only measures the mapping and, "
          "for ours, building the models and converting keys.")

if __name__ == "__main__":
    main()
