"""SDXL textual-inversion and ControlNet-LLLite steps next to the SDXL LoRA step of the same settings (issues 15,
16): s/step, peak memory, and the optimizer state, which must be O(vectors) for TI, not O(vocabulary).

    python bench/sdxl_trainer_step_bench.py [--model sdxl.safetensors] [--device cpu|cuda] [--resolution N]
                                            [--steps N] [--configs ti,lora,lllite]

Each configuration runs the real trainer (sdxl_train_textual_inversion.py's, sdxl_train_network.py's,
sdxl_train_control_net_lllite.py's) in a fresh process on the bundled tiny dataset: batch 1, AdamW lr 1e-3, cached
latents, text encoders run every step (TI trains through them; LoRA and LLLite train the U-Net side with no
text-encoder caching, so all do the same encoder work). TI: 4 vectors, init word "shape"; LoRA: rank 16, alpha 8;
LLLite: cond_emb_dim 32, network_dim 64 (kohya's Canny sample), the images' inverted colours as conditioning
images. Without --model a tiny random SDXL is built (CPU smoke run); on a GPU pass the full-size model, --device
cuda --resolution 1024 (bf16 mixed precision, gradient checkpointing with --gradient_checkpointing).

s/step: median over the steps after the first (--steps, default 8). Peak: VmHWM of the process on CPU,
torch.cuda.max_memory_allocated on CUDA. Prints a table and a `results {json}` line.
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

DATASET = ROOT / "examples" / "tiny_dataset" / "images"
TOKEN = "tkshape"  # the bundled captions name it
CONFIGS = ("ti", "lora", "lllite")


def peak_rss_bytes() -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) * 1024
    return 0


def _argv(config: str, options: argparse.Namespace, toml: Path, out: Path) -> list[str]:
    common = ["--pretrained_model_name_or_path", options.model, "--dataset_config", str(toml), "--output_dir",
              str(out), "--max_train_steps", str(options.steps), "--learning_rate", "1e-3", "--optimizer_type",
              "AdamW", "--cache_latents", "--seed", "1", "--skip_dataset_lint", "--max_data_loader_n_workers", "0",
              "--mixed_precision", "bf16" if options.device == "cuda" else "no"]
    if options.gradient_checkpointing:
        common.append("--gradient_checkpointing")
    if config == "ti":
        return [*common, "--token_string", TOKEN, "--num_vectors_per_token", "4", "--init_word", "shape"]
    if config == "lllite":
        return [*common, "--cond_emb_dim", "32", "--network_dim", "64", "--output_name", "lllite"]
    return [*common, "--network_module", "networks.lora", "--network_dim", "16", "--network_alpha", "8",
            "--network_train_unet_only", "--output_name", "lora"]


def _write_dataset(work: Path, resolution: int, with_conditioning: bool) -> Path:
    """The bundled tiny dataset as one subset; for LLLite with conditioning images (inverted colours)."""
    import numpy as np
    from PIL import Image

    lines = ["[general]", "caption_extension = '.txt'", "[[datasets]]", f"resolution = {resolution}",
             "batch_size = 1", "[[datasets.subsets]]", f"image_dir = '{DATASET.as_posix()}'"]
    if with_conditioning:
        conditions = work / "conditioning"
        conditions.mkdir()
        for path in sorted(DATASET.glob("*.png")):
            with Image.open(path) as image:
                Image.fromarray(255 - np.asarray(image.convert("RGB"))).save(conditions / path.name)
        lines.append(f"conditioning_data_dir = '{conditions.as_posix()}'")
    toml = work / "dataset.toml"
    toml.write_text("\n".join(lines) + "\n", encoding="utf-8")
    return toml


def run_child(config: str, options: argparse.Namespace) -> dict:
    """One configuration in this process: the trainer with step timestamps; returns its figures."""
    import torch

    from library.config_file import parse_args_with_config

    if config == "ti":
        import sdxl_train_textual_inversion as script
        import train_textual_inversion

        base = train_textual_inversion.trainer_class(sdxl=True)
    elif config == "lllite":
        import sdxl_train_control_net_lllite as script

        base = script.trainer_class()
    else:
        import sdxl_train_network as script

        base = script._sdxl_trainer_class()
    stamps: list[float] = []

    class Timed(base):
        def on_step_start(self, args, accelerator, network, text_encoders, unet, batch, weight_dtype, is_train=True):
            if is_train:
                if options.device == "cuda":
                    torch.cuda.synchronize()
                stamps.append(time.perf_counter())
            super().on_step_start(args, accelerator, network, text_encoders, unet, batch, weight_dtype, is_train)

    work = Path(tempfile.mkdtemp(prefix=f"trainer-bench-{config}-"))
    toml = _write_dataset(work, options.resolution, with_conditioning=config == "lllite")
    args = parse_args_with_config(script.setup_parser(), _argv(config, options, toml, work / "out"))
    trainer = Timed()
    trainer.train(args)
    if options.device == "cuda":
        torch.cuda.synchronize()
    stamps.append(time.perf_counter())
    optimizer = trainer._trainable.optimizer
    state_bytes = sum(value.numel() * value.element_size() for state in optimizer.state.values()
                      for value in state.values() if torch.is_tensor(value))
    trained = sum(parameter.numel() for parameter in trainer._trainable.network.get_trainable_params())
    vocabulary = sum(encoder.get_input_embeddings().weight.numel() for encoder in trainer._models.text_encoders)
    intervals = [later - earlier for earlier, later in zip(stamps, stamps[1:])][1:]  # the first step warms up
    peak = torch.cuda.max_memory_allocated() if options.device == "cuda" else peak_rss_bytes()
    return {"step_seconds": statistics.median(intervals) if intervals else float("nan"), "peak_bytes": peak,
            "optimizer_state_bytes": state_bytes, "trained_parameters": trained,
            "token_table_parameters": vocabulary, "steps": len(stamps) - 1}


def build_tiny_model(folder: Path) -> str:
    from library.models.save import save_model
    from library.models.tiny import build_tiny_bundle

    path = folder / "tiny-sdxl.safetensors"
    save_model(build_tiny_bundle("sdxl", seed=0), path, save_model_as="safetensors")
    return str(path)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default=None, help="SDXL checkpoint (default: a tiny random one, built here)")
    parser.add_argument("--device", choices=("cpu", "cuda"), default="cpu")
    parser.add_argument("--resolution", type=int, default=None, help="default 64 on CPU, 1024 on CUDA")
    parser.add_argument("--steps", type=int, default=8)
    parser.add_argument("--gradient_checkpointing", action="store_true")
    parser.add_argument("--configs", default=",".join(CONFIGS))
    parser.add_argument("--child", choices=CONFIGS, default=None, help=argparse.SUPPRESS)
    options = parser.parse_args(argv)
    options.resolution = options.resolution or (1024 if options.device == "cuda" else 64)
    if options.child:
        print("child-result " + json.dumps(run_child(options.child, options)))
        return 0
    tiny = options.model is None
    if tiny:
        options.model = build_tiny_model(Path(tempfile.mkdtemp(prefix="trainer-bench-model-")))
    results = {"device": options.device, "resolution": options.resolution, "tiny": tiny, "configs": {}}
    for config in options.configs.split(","):
        command = [sys.executable, __file__, "--child", config, "--model", options.model, "--device", options.device,
                   "--resolution", str(options.resolution), "--steps", str(options.steps)]
        if options.gradient_checkpointing:
            command.append("--gradient_checkpointing")
        done = subprocess.run(command, capture_output=True, text=True, env={**os.environ, "PYTHONUNBUFFERED": "1"},
                              check=False)
        if done.returncode != 0:
            print(done.stdout[-2000:] + done.stderr[-4000:], file=sys.stderr)
            return done.returncode
        line = next(line for line in done.stdout.splitlines() if line.startswith("child-result "))
        results["configs"][config] = json.loads(line[len("child-result "):])
    print(f"{'config':8} {'s/step':>9} {'peak GiB':>9} {'optimizer state':>16} {'trained params':>15}")
    for config, figures in results["configs"].items():
        print(f"{config:8} {figures['step_seconds']:9.4f} {figures['peak_bytes'] / 2**30:9.3f} "
              f"{figures['optimizer_state_bytes']:>14,} B {figures['trained_parameters']:>15,}")
    ti_figures = results["configs"].get("ti")
    if ti_figures:
        # AdamW keeps two fp32 buffers per trained value (plus a step counter per tensor)
        bound = 2 * 4 * ti_figures["trained_parameters"] + 64 * 2
        results["ti_state_is_o_vectors"] = ti_figures["optimizer_state_bytes"] <= bound
        print(f"TI optimizer state {ti_figures['optimizer_state_bytes']:,} B for {ti_figures['trained_parameters']:,} "
              f"trained values (token tables: {ti_figures['token_table_parameters']:,} values): "
              f"{'O(vectors)' if results['ti_state_is_o_vectors'] else 'NOT O(vectors)'}")
    print("results " + json.dumps(results))
    return 0


if __name__ == "__main__":
    sys.exit(main())
