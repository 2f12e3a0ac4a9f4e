"""Benchmark one optimizer step of our SDXL LoRA training (training_loop.optimizer_step) on a random-weight SDXL.

Settings of issue 4: rank 32, alpha 16, U-Net only, 1024x1024, bf16, SDPA, cached latents and text-encoder
outputs, AdamW. Prints median / p10 / p90 s/step after warm-up, images/s, peak memory and MFU (step FLOPs from
torch.utils.flop_counter over a measured bf16 matmul rate), next to kohya's figures and our targets.

    python bench/sdxl_lora_step_bench.py [--batch_size 1] [--gradient_checkpointing] [--compile] [--json]
    python bench/sdxl_lora_step_bench.py --tiny --device cpu --steps 2 --warmup 1      # CPU smoke test
"""
from __future__ import annotations

import argparse
import json
import logging
import statistics
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from tqdm import tqdm

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from library.errors import FlagError  # noqa: E402 (after the sys.path insert)

logger = logging.getLogger(__name__)

# kohya sd-scripts on one H100 with the same settings (issue 4): (s/step, peak GiB) per configuration
KOHYA_REFERENCE = {
    "batch 1": {"s_per_step": 0.83, "peak_gib": 14.2},
    "batch 1, gradient checkpointing": {"s_per_step": 0.92, "peak_gib": 6.7},
    "batch 4": {"s_per_step": 0.73, "peak_gib": 38.8},
}
TARGETS = {
    "batch 1": {"max_s_per_step": 0.50},
    "batch 1, gradient checkpointing": {"max_s_per_step": 0.60},
    "batch 4": {"min_images_per_s": 8.0},
}
LORA_RANK, LORA_ALPHA = 32, 16
FULL_RESOLUTION, TINY_RESOLUTION = 1024, 64
CUDA_MATMUL_SIZE, CPU_MATMUL_SIZE = 8192, 512
TOKENS_PER_CAPTION = 77  # one 75-token chunk plus BOS/EOS, as the text-encoder cache stores it
GIB = 1024 ** 3


@dataclass
class BenchSetup:
    """Our trainer and the four objects optimizer_step takes, built as a real run builds them."""

    trainer: object
    run: object
    models: object
    trainable: object


# ----------------------------------------------------------------------------------------------- options


def parse_bench_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--batch_size", type=int, default=1, help="images per step (default 1)")
    parser.add_argument("--gradient_checkpointing", action="store_true", help="checkpoint the U-Net's blocks")
    parser.add_argument("--steps", type=int, default=20, help="timed steps after warm-up (default 20)")
    parser.add_argument("--warmup", type=int, default=5, help="untimed steps first (default 5)")
    parser.add_argument("--tiny", action="store_true", help="the tiny SDXL at 64x64 instead of full size at 1024")
    parser.add_argument("--resolution", type=int, default=None, help="square image side in pixels "
                        f"(default {FULL_RESOLUTION}, {TINY_RESOLUTION} with --tiny)")
    parser.add_argument("--device", choices=("cuda", "cpu"), default=None, help="default cuda when available")
    parser.add_argument("--compile", action="store_true",
                        help="torch.compile the U-Net (the trainer's --torch_compile)")
    parser.add_argument("--json", action="store_true", help="print one JSON line instead of the report")
    options = parser.parse_args(argv)
    _check_bench_args(options)
    return options


def _check_bench_args(options: argparse.Namespace) -> None:
    for flag, value, least in (("--batch_size", options.batch_size, 1), ("--steps", options.steps, 1),
                               ("--warmup", options.warmup, 0)):
        if value < least:
            raise FlagError(f"{flag}: expected an integer >= {least}, got {value}")
    if options.resolution is None:
        options.resolution = TINY_RESOLUTION if options.tiny else FULL_RESOLUTION
    if options.resolution < 64 or options.resolution % 64:
        # the SDXL U-Net halves the latent twice, and latents are 1/8 of the image
        raise FlagError(f"--resolution: expected a multiple of 64 (e.g. {FULL_RESOLUTION}), got {options.resolution}")
    if options.device is None:
        options.device = "cuda" if torch.cuda.is_available() else "cpu"
    if options.device == "cuda" and not torch.cuda.is_available():
        raise FlagError("--device cuda: no CUDA device is visible to torch; use --device cpu --tiny for a smoke test")
    if options.device == "cpu" and not options.tiny:
        logger.warning("full-size SDXL on CPU: about 10 GiB of fp32 weights and minutes per step; --tiny is the "
                       "CPU smoke test")


def training_args(options: argparse.Namespace, output_dir: str) -> argparse.Namespace:
    """The Namespace a user's sdxl_train_network.py run with these settings would get."""
    import sdxl_train_network
    import train_network

    precision = "bf16" if options.device == "cuda" else "no"
    flags = ["--pretrained_model_name_or_path", "random-weight-sdxl", "--output_dir", output_dir,
             "--network_module", "networks.lora", "--network_dim", str(LORA_RANK),
             "--network_alpha", str(LORA_ALPHA), "--network_train_unet_only", "--cache_text_encoder_outputs",
             "--mixed_precision", precision, "--sdpa", "--optimizer_type", "AdamW", "--learning_rate", "1e-4",
             "--lr_scheduler", "constant", "--train_batch_size", str(options.batch_size), "--seed", "0",
             "--max_train_steps", str(options.warmup + options.steps + 1)]
    if options.gradient_checkpointing:
        flags.append("--gradient_checkpointing")
    if options.compile:
        flags.append("--torch_compile")
    return train_network.parse_args(sdxl_train_network.setup_parser(), flags)


# ----------------------------------------------------------------------------------------------- models and batch


def build_unet(tiny: bool, device: torch.device, dtype: torch.dtype) -> torch.nn.Module:
    """Random-weight SDXL U-Net on `device` in `dtype`: the tiny test model, or full size built on meta and
    initialized in place (torch's default init, as a freshly constructed model; the 2.6e9 parameters never pass
    through host memory or fp32)."""
    if tiny:
        from library.models.tiny import build_tiny_bundle

        return build_tiny_bundle("sdxl").unet.to(device, dtype=dtype)
    from diffusers import UNet2DConditionModel

    from library.models.reference_configs import SDXL_UNET

    with torch.device("meta"):
        unet = UNet2DConditionModel(**SDXL_UNET).to(dtype=dtype)
    unet.to_empty(device=device)
    with torch.no_grad():
        torch.manual_seed(0)
        for module in unet.modules():
            if hasattr(module, "reset_parameters"):
                module.reset_parameters()
    return unet


def text_widths(tiny: bool) -> tuple[int, int, int]:
    """(TE1 hidden, TE2 hidden, pooled) widths of the cached text-encoder outputs."""
    if tiny:
        from library.models.tiny import TINY_TE2_PROJECTION, TINY_TEXT_HIDDEN

        return TINY_TEXT_HIDDEN["clip_l"], TINY_TEXT_HIDDEN["open_clip"], TINY_TE2_PROJECTION
    from library.models.reference_configs import CLIP_L_TEXT, OPEN_CLIP_BIGG_TEXT

    return CLIP_L_TEXT["hidden_size"], OPEN_CLIP_BIGG_TEXT["hidden_size"], OPEN_CLIP_BIGG_TEXT["projection_dim"]


def make_batch(batch_size: int, resolution: int, widths: tuple[int, int, int], seed: int = 0) -> dict:
    """A batch as the data loader yields it with cached latents and text-encoder outputs (CPU tensors)."""
    from library.data.datasets import Sample, stack_samples
    from library.data.text_cache import TextEncoderOutputs

    generator = np.random.default_rng(seed)
    latent_side = resolution // 8
    te1_width, te2_width, pooled_width = widths
    samples = []
    for index in range(batch_size):
        outputs = TextEncoderOutputs(
            hidden_states=[generator.standard_normal((TOKENS_PER_CAPTION, te1_width), dtype=np.float32),
                           generator.standard_normal((TOKENS_PER_CAPTION, te2_width), dtype=np.float32)],
            pooled=generator.standard_normal(pooled_width, dtype=np.float32))
        latents = torch.from_numpy(generator.standard_normal((4, latent_side, latent_side), dtype=np.float32))
        samples.append(Sample(
            pixels_or_latents=latents, is_latent=True, caption="a benchmark image", loss_weight=1.0,
            original_size_hw=(resolution, resolution), crop_top_left=(0, 0), target_size_hw=(resolution, resolution),
            flipped=False, alpha_mask=None, conditioning_image=None, text_encoder_outputs=outputs,
            image_key=f"bench_{index}", custom_attributes={}))
    return stack_samples(samples)


# ----------------------------------------------------------------------------------------------- trainer objects


def build_setup(options: argparse.Namespace, args: argparse.Namespace) -> BenchSetup:
    """Trainer, run, models and network the way NetworkTrainer.train() builds them, minus the data set and the
    VAE / text encoders (the batches carry cached latents and text-encoder outputs)."""
    from accelerate import Accelerator

    from library.families import family_by_name
    from library.options.training import weight_dtype
    from library.train.checkpoints import TrainProgress
    from library.train.network_trainer import LoadedModels, TrainingRun
    from library.train.run_setup import TrainingSchedule
    from sdxl_train_network import SdxlNetworkTrainer

    trainer = SdxlNetworkTrainer()
    trainer.family = family_by_name("sdxl")
    accelerator = Accelerator(mixed_precision=args.mixed_precision, cpu=options.device == "cpu")
    run = TrainingRun(args, trainer.family, accelerator, weight_dtype(args.mixed_precision), train_group=None,
                      val_group=None, progress=TrainProgress(session_id=0, started_at=time.time()))
    run.schedule = TrainingSchedule(batches_per_epoch=args.max_train_steps, steps_per_epoch=args.max_train_steps,
                                    num_epochs=1, max_train_steps=args.max_train_steps, accumulation=1)
    unet = build_unet(options.tiny, accelerator.device, run.weight_dtype)
    unet.requires_grad_(False).eval()
    trainer._set_attention(args, unet)  # the trainer's own attention choice: SDPA unless --xformers
    unet.to(accelerator.device, dtype=run.weight_dtype)
    models = LoadedModels(unet=unet, vae=None, text_encoders=[], tokenizers=[], caption_encoder=None,
                          noise_scheduler=trainer.get_noise_scheduler(args, accelerator.device))
    trainer._run, trainer._models = run, models
    trainable = trainer.build_trainable(run, models)  # LoRA, apply_to, --torch_compile, --gradient_checkpointing
    trainer._trainable = trainable
    _build_optimizer(run, trainable)
    trainable.network.on_epoch_start(models.text_encoders, models.unet)
    return BenchSetup(trainer, run, models, trainable)


def _build_optimizer(run, trainable) -> None:
    """The optimizer part of NetworkTrainer.build_optimizer (the rest writes metadata about the data set)."""
    from library.train import network_module
    from library.train.lr_schedulers import get_scheduler
    from library.train.optimizers import get_optimizer, parse_optimizer_args

    args, accelerator = run.args, run.accelerator
    groups, trainable.group_names = network_module.optimizer_param_groups(
        trainable.network, text_encoder_lrs=args.text_encoder_lr, unet_lr=args.unet_lr,
        learning_rate=args.learning_rate)
    _, _, optimizer = get_optimizer(args.optimizer_type, groups, args.learning_rate,
                                    parse_optimizer_args(args.optimizer_args))
    scheduler = get_scheduler(args.lr_scheduler, optimizer, num_warmup_steps=args.lr_warmup_steps,
                              num_training_steps=args.max_train_steps)
    trainable.optimizer, trainable.lr_scheduler = accelerator.prepare(optimizer, scheduler)


# ----------------------------------------------------------------------------------------------- measuring


def run_step(setup: BenchSetup, batch: dict) -> float:
    """One optimizer step through our training loop's own function; returns the loss."""
    from library.train.training_loop import optimizer_step

    loss = optimizer_step(setup.trainer, setup.run, setup.models, setup.trainable, [batch])
    setup.run.progress.global_step += 1  # each step draws its own noise and timesteps, as in training
    return loss


def _synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def timed_steps(setup: BenchSetup, batch: dict, count: int, description: str) -> tuple[list[float], list[float]]:
    """(seconds, loss) of `count` steps, each timed between device synchronizations."""
    device = setup.run.accelerator.device
    seconds, losses = [], []
    for _ in tqdm(range(count), desc=description, leave=False):
        _synchronize(device)
        start = time.perf_counter()
        losses.append(run_step(setup, batch))
        _synchronize(device)
        seconds.append(time.perf_counter() - start)
    return seconds, losses


def count_step_flops(setup: BenchSetup, single_batch: dict, batch_size: int) -> int:
    """FLOPs of one step (forward + backward + optimizer), counted at batch 1 and scaled by the batch size.

    Every counted op (matmul, conv, attention) is per-sample, so the count is linear in the batch. Counted in
    eager mode and without gradient checkpointing: MFU credits model FLOPs, not recomputation. torch's counter
    has formulas for the CUDA attention kernels only, so on CPU attention is left out of the count.
    """
    from torch.utils.flop_counter import FlopCounterMode

    models = setup.models
    configured_unet = models.unet
    eager_unet = getattr(configured_unet, "_orig_mod", configured_unet)
    checkpointing = bool(getattr(eager_unet, "is_gradient_checkpointing", False))
    models.unet = eager_unet
    if checkpointing:
        eager_unet.disable_gradient_checkpointing()
    try:
        counter = FlopCounterMode(display=False)
        with counter:
            run_step(setup, single_batch)
    finally:
        if checkpointing:
            eager_unet.enable_gradient_checkpointing()
        models.unet = configured_unet
    return int(counter.get_total_flops()) * batch_size


def matmul_flops_per_second(device: torch.device, dtype: torch.dtype, iterations: int = 50) -> float:
    """Measured dense matmul rate: 8192^2 on CUDA in the step's dtype; a small fp32 one on CPU."""
    size = CUDA_MATMUL_SIZE if device.type == "cuda" else CPU_MATMUL_SIZE
    if device.type != "cuda":
        iterations = 10
    generator = torch.Generator(device=device).manual_seed(0)
    left = torch.randn(size, size, device=device, dtype=dtype, generator=generator)
    right = torch.randn(size, size, device=device, dtype=dtype, generator=generator)
    product = torch.empty_like(left)
    for _ in range(3):
        torch.mm(left, right, out=product)
    _synchronize(device)
    start = time.perf_counter()
    for _ in range(iterations):
        torch.mm(left, right, out=product)
    _synchronize(device)
    return 2 * size ** 3 * iterations / (time.perf_counter() - start)


def reset_peak_memory(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)


def peak_memory(device: torch.device) -> tuple[float, str]:
    """(GiB, what it measures): CUDA max allocated since the reset, or the process's peak RSS on CPU."""
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / GIB, "cuda max_memory_allocated after warm-up"
    import resource

    # ru_maxrss is in KiB on Linux; it covers the whole process, warm-up and model building included
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024 / GIB, "process peak RSS"


# ----------------------------------------------------------------------------------------------- report


def reference_setting(options: argparse.Namespace) -> str | None:
    """The KOHYA_REFERENCE / TARGETS entry comparable with these settings: full size at 1024 px only. --compile
    does not change the entry: it is our way of running the same step."""
    if options.tiny or options.resolution != FULL_RESOLUTION:
        return None
    if options.batch_size == 1:
        return "batch 1, gradient checkpointing" if options.gradient_checkpointing else "batch 1"
    if options.batch_size == 4 and not options.gradient_checkpointing:
        return "batch 4"
    return None


def meets_target(setting: str | None, median_seconds: float, images_per_second: float) -> bool | None:
    if setting is None:
        return None
    target = TARGETS[setting]
    if "max_s_per_step" in target:
        return median_seconds <= target["max_s_per_step"]
    return images_per_second >= target["min_images_per_s"]


def summarize(options: argparse.Namespace, seconds: list[float], losses: list[float], step_flops: int,
              matmul_rate: float, memory: tuple[float, str]) -> dict:
    median = statistics.median(seconds)
    deciles = statistics.quantiles(seconds, n=10, method="inclusive") if len(seconds) > 1 else seconds * 9
    setting = reference_setting(options)
    return {
        "model": "tiny SDXL" if options.tiny else "full-size SDXL (random weights)",
        "device": options.device, "resolution": options.resolution, "batch_size": options.batch_size,
        "gradient_checkpointing": options.gradient_checkpointing, "compile": options.compile,
        "warmup_steps": options.warmup, "timed_steps": len(seconds),
        "median_s_per_step": median, "p10_s_per_step": deciles[0], "p90_s_per_step": deciles[-1],
        "images_per_s": options.batch_size / median,
        "peak_memory_gib": memory[0], "peak_memory_measure": memory[1],
        "step_tflop": step_flops / 1e12, "matmul_tflops": matmul_rate / 1e12,
        "mfu": step_flops / median / matmul_rate,
        "last_loss": losses[-1],
        "reference_setting": setting,
        "kohya_reference": KOHYA_REFERENCE.get(setting), "target": TARGETS.get(setting),
        "meets_target": meets_target(setting, median, options.batch_size / median),
    }


def report_lines(results: dict) -> list[str]:
    switches = (f"gradient checkpointing {'on' if results['gradient_checkpointing'] else 'off'}, "
                f"compile {'on' if results['compile'] else 'off'}")
    side = results["resolution"]
    steps = f"({results['timed_steps']} steps after {results['warmup_steps']} warm-up)"
    mfu_source = (f"{results['step_tflop']:.4g} TFLOP/step over a measured {results['matmul_tflops']:.4g} "
                  "TFLOP/s matmul")
    title = (f"{results['model']} LoRA step on {results['device']}: rank {LORA_RANK}, alpha {LORA_ALPHA}, "
             f"U-Net only, {side}x{side}, batch {results['batch_size']}, {switches}")
    spread = (f"median {results['median_s_per_step']:.4f}   p10 {results['p10_s_per_step']:.4f}   "
              f"p90 {results['p90_s_per_step']:.4f}")
    lines = [
        title,
        f"  s/step      {spread}   {steps}",
        f"  images/s    {results['images_per_s']:.2f}",
        f"  peak memory {results['peak_memory_gib']:.2f} GiB ({results['peak_memory_measure']})",
        f"  MFU         {results['mfu'] * 100:.1f}%  ({mfu_source})",
        "kohya sd-scripts, one H100, same settings (issue 4) -> our targets:",
    ]
    for setting, reference in KOHYA_REFERENCE.items():
        target = ", ".join(f"{key} {value}" for key, value in TARGETS[setting].items())
        marker = "  <- these settings" if setting == results["reference_setting"] else ""
        lines.append(f"  {setting:<32} {reference['s_per_step']:.2f} s/step, {reference['peak_gib']:.1f} GiB"
                     f" -> {target}{marker}")
    if results["meets_target"] is None:
        lines.append("  (no kohya figure for these settings: not compared)")
    else:
        lines.append(f"  target {'met' if results['meets_target'] else 'NOT met'}")
    return lines


def main(argv: list[str] | None = None) -> dict:
    """Run the benchmark; prints the report (or one JSON line) and returns the results."""
    options = parse_bench_args(argv)
    with tempfile.TemporaryDirectory(prefix="sdxl-lora-bench-") as output_dir:
        args = training_args(options, output_dir)
        setup = build_setup(options, args)
        device = setup.run.accelerator.device
        widths = text_widths(options.tiny)
        batch = make_batch(options.batch_size, options.resolution, widths)
        step_flops = count_step_flops(setup, make_batch(1, options.resolution, widths, seed=1), options.batch_size)
        timed_steps(setup, batch, options.warmup, "warm-up")
        reset_peak_memory(device)
        seconds, losses = timed_steps(setup, batch, options.steps, "timed steps")
        memory = peak_memory(device)
        matmul_rate = matmul_flops_per_second(device, setup.run.weight_dtype)
    results = summarize(options, seconds, losses, step_flops, matmul_rate, memory)
    print(json.dumps(results) if options.json else "\n".join(report_lines(results)))
    return results


if __name__ == "__main__":
    from library.cli import run_cli

    run_cli(main)
