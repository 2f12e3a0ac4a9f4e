"""Benchmark the LoRA tools on full-size SDXL: (1) extracting a rank-64 LoRA from two random checkpoints,
(2) resizing a random rank-128 LoRA to rank 32. Each run is a fresh process; prints seconds and peak RSS (VmHWM).

    python bench/lora_tools_bench.py [--device cpu|cuda|all] [--work bench/_work] [--tiny]

Full size builds (once, under --work) a random fp16 SDXL checkpoint (about 6.9 GB, as bench/load_sdxl.py), a tuned
copy with noise on every fourth weight, and a rank-128 LoRA. Target: the extract's peak RSS <= 2.3x one checkpoint
(two copies in memory plus overhead). --tiny uses the tiny SDXL test model (ranks 8 -> 4 -> 2) for a smoke test.
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

EXTRACT_RSS_TARGET = 2.3
NOISE_EVERY = 4  # every 4th weight of the tuned copy differs from the original

CHILD = r"""
import json, sys, time
sys.path.insert(0, {root!r})
module_name, argv = sys.argv[1], sys.argv[2:]
import importlib, torch
# imports (including diffusers' and transformers' lazily imported model classes) are not part of the timing
if "extract" in module_name:
    from diffusers import AutoencoderKL, UNet2DConditionModel
    from transformers import CLIPTextModel, CLIPTextModelWithProjection
tool = importlib.import_module(module_name)

def high_water_mark():  # VmHWM: this process's peak resident memory
    for line in open("/proc/self/status"):
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) * 1024

baseline = high_water_mark()
start = time.perf_counter()
tool.main(argv)
if torch.cuda.is_available():
    torch.cuda.synchronize()
print(json.dumps(dict(seconds=time.perf_counter() - start, peak_rss=high_water_mark(), baseline_rss=baseline)))
"""


def run_tool(module_name: str, argv: list[str]) -> dict:
    """Run `module_name.main(argv)` in a fresh process; its time and VmHWM."""
    script = CHILD.format(root=str(ROOT))
    result = subprocess.run([sys.executable, "-c", script, module_name, *argv], capture_output=True, text=True,
                            check=False, cwd=ROOT)
    if result.returncode != 0:
        raise SystemExit(f"{module_name} failed (exit {result.returncode}):\n{result.stderr[-3000:]}")
    return json.loads(result.stdout.strip().splitlines()[-1])


def build_checkpoints(work: Path, tiny: bool) -> tuple[Path, Path]:
    """The original SDXL checkpoint and a tuned copy (noise of std 0.05 on every NOISE_EVERY-th weight)."""
    import torch
    from safetensors.torch import load_file, save_file

    org = work / ("sdxl_tiny_org.safetensors" if tiny else "sdxl_full_random_fp16.safetensors")
    tuned = work / ("sdxl_tiny_tuned.safetensors" if tiny else "sdxl_full_random_fp16_tuned.safetensors")
    if not org.exists():
        print(f"building {org} ...", flush=True)
        if tiny:
            from library.models.save import save_model
            from library.models.tiny import build_tiny_bundle

            save_model(build_tiny_bundle("sdxl", seed=0), org)
        else:
            from bench.load_sdxl import build_full_size_file

            build_full_size_file(org, "fp16")
    if not tuned.exists():
        print(f"building {tuned} ...", flush=True)
        tensors = load_file(str(org))
        generator = torch.Generator().manual_seed(1)
        weights = [key for key, value in tensors.items() if value.dim() >= 2 and value.is_floating_point()]
        for key in weights[::NOISE_EVERY]:
            noise = torch.randn(tensors[key].shape, generator=generator) * 0.05
            tensors[key] = (tensors[key].float() + noise).to(tensors[key].dtype)
        save_file(tensors, str(tuned.with_suffix(".tmp")))
        os.replace(tuned.with_suffix(".tmp"), tuned)
    return org, tuned


def build_lora(work: Path, tiny: bool, rank: int) -> Path:
    """A random rank-`rank` LoRA with every SDXL LoRA layer (text encoders and U-Net, 3x3 convs included)."""
    import torch

    from library.models.tiny import build_tiny_bundle
    from networks import lora as lora_network
    from networks.lora_file import LoRAPair, write_lora

    path = work / f"sdxl_{'tiny' if tiny else 'full'}_lora_rank{rank}.safetensors"
    if path.exists():
        return path
    print(f"building {path} ...", flush=True)
    bundle = build_tiny_bundle("sdxl", seed=0) if tiny else empty_sdxl_bundle()
    network = lora_network.create_network(1.0, 1, 1, None, bundle.text_encoders, bundle.unet, conv_dim=1)
    generator = torch.Generator().manual_seed(2)
    modules = {}
    for module in network.text_encoder_loras + network.unet_loras:
        shape = module.original_module.weight.shape
        in_size = int(torch.Size(shape[1:]).numel())
        down = torch.randn(rank, in_size, generator=generator) * 0.01
        up = torch.randn(shape[0], rank, generator=generator) * 0.01
        if len(shape) == 4:
            down, up = down.reshape(rank, *shape[1:]), up.reshape(shape[0], rank, 1, 1)
        modules[module.lora_name] = LoRAPair(down.half(), up.half(), float(rank))
    write_lora(path, modules, {"ss_network_module": "networks.lora", "ss_network_dim": str(rank),
                               "ss_network_alpha": str(rank)}, torch.float16)
    return path


def empty_sdxl_bundle():
    """Full-size SDXL models on the meta device: layer shapes only, no memory."""
    from accelerate import init_empty_weights
    from diffusers import AutoencoderKL, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection

    from library.families import SDXL
    from library.models.bundle import ModelBundle
    from library.models.reference_configs import CLIP_L_TEXT, OPEN_CLIP_BIGG_TEXT, SDXL_UNET, SDXL_VAE

    with init_empty_weights():
        return ModelBundle(family=SDXL, unet=UNet2DConditionModel(**SDXL_UNET), vae=AutoencoderKL(**SDXL_VAE),
                           text_encoders=[CLIPTextModel(CLIPTextConfig(**CLIP_L_TEXT)),
                                          CLIPTextModelWithProjection(CLIPTextConfig(**OPEN_CLIP_BIGG_TEXT))])


def devices(choice: str) -> list[str]:
    import torch

    if choice == "all":
        return ["cpu", "cuda"] if torch.cuda.is_available() else ["cpu"]
    return [choice]


def resize_available() -> bool:
    return (ROOT / "networks" / "resize_lora.py").exists()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", default="all", choices=("cpu", "cuda", "all"))
    parser.add_argument("--work", type=Path, default=ROOT / "bench" / "_work")
    parser.add_argument("--tiny", action="store_true", help="tiny SDXL model and ranks, for a smoke test")
    args = parser.parse_args()
    args.work.mkdir(parents=True, exist_ok=True)
    extract_rank, lora_rank, resize_rank = (4, 8, 2) if args.tiny else (64, 128, 32)

    org, tuned = build_checkpoints(args.work, args.tiny)
    size = org.stat().st_size
    lora = build_lora(args.work, args.tiny, lora_rank)
    print(f"checkpoint: {org.name} ({size / 2**30:.2f} GiB); LoRA: {lora.name} ({lora.stat().st_size / 2**20:.1f} MiB)")
    rows = []
    for device in devices(args.device):
        output = args.work / f"bench_extracted_{device}.safetensors"
        run = run_tool("networks.extract_lora_from_models", [
            "--model_org", str(org), "--model_tuned", str(tuned), "--save_to", str(output), "--overwrite", "--sdxl",
            "--dim", str(extract_rank), "--conv_dim", str(extract_rank), "--device", device])
        rows.append((f"extract rank {extract_rank}", device, run))
        if resize_available():
            output = args.work / f"bench_resized_{device}.safetensors"
            run = run_tool("networks.resize_lora", ["--model", str(lora), "--save_to", str(output), "--overwrite",
                                                    "--new_rank", str(resize_rank), "--device", device])
            rows.append((f"resize {lora_rank} -> {resize_rank}", device, run))
        else:
            print("resize: skipped, networks/resize_lora.py is not in this tree yet")
    report(rows, size, args.tiny)


def report(rows: list[tuple[str, str, dict]], size: int, tiny: bool) -> None:
    print(f"{'task':<18} {'device':<6} {'seconds':>8} {'peak RSS GiB':>13} {'RSS after imports':>18} "
          f"{'peak / checkpoint':>18}")
    for task, device, run in rows:
        print(f"{task:<18} {device:<6} {run['seconds']:>8.2f} {run['peak_rss'] / 2**30:>13.2f} "
              f"{run['baseline_rss'] / 2**30:>18.2f} {run['peak_rss'] / size:>18.2f}")
    for task, device, run in rows:
        if task.startswith("extract") and not tiny:
            ratio = run["peak_rss"] / size
            verdict = "ok" if ratio <= EXTRACT_RSS_TARGET else "OVER TARGET"
            print(f"extract on {device}: peak RSS {ratio:.2f}x one checkpoint (target <= {EXTRACT_RSS_TARGET}x): "
                  f"{verdict}")
    if tiny:
        print("tiny mode: memory ratios are dominated by the Python/torch baseline and not meaningful")
    print("results " + json.dumps({f"{task} [{device}]": run for task, device, run in rows}))


if __name__ == "__main__":
    main()
