"""Benchmark our SDXL text-to-image pipeline against diffusers' StableDiffusionXLPipeline on the same weights.

Settings of issue 5: random-weight SDXL, 1024x1024, 30 steps, euler_a, guidance 7, bf16, SDPA. Per batch size:
ours without LoRA, ours with a rank-32 LoRA applied dynamically, ours with that LoRA merged, and diffusers without
LoRA, all in one process. Prints s/image (median of timed runs after a warm-up), peak memory and the ratios.

    python bench/gen_img_bench.py [--batch_sizes 1 4] [--steps 30] [--runs 3] [--skip_diffusers] [--json]
    python bench/gen_img_bench.py --tiny --device cpu --steps 2 --runs 1 --batch_sizes 1 2   # CPU smoke test
"""
from __future__ import annotations

import argparse
import json
import logging
import statistics
import sys
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
from PIL import Image
from tqdm import tqdm

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from library.errors import FlagError  # noqa: E402 (after the sys.path insert)

logger = logging.getLogger(__name__)

PLAIN, DYNAMIC, MERGED, DIFFUSERS = "ours", "ours + dynamic LoRA", "ours + merged LoRA", "diffusers"
CONFIGURATIONS = (PLAIN, DYNAMIC, MERGED, DIFFUSERS)
# ratio name -> (numerator configuration, denominator configuration, lowest, highest allowed value) (issue 5)
RATIO_TARGETS = {
    "ours / diffusers": (PLAIN, DIFFUSERS, None, 1.00),
    "dynamic LoRA / no LoRA": (DYNAMIC, PLAIN, None, 1.05),
    "merged LoRA / no LoRA": (MERGED, PLAIN, 0.97, 1.03),  # "about 1.00": within timing noise of 3%
}
# image difference name -> the two configurations compared (fairness checks: the same work, a LoRA that acts)
IMAGE_DIFFERENCES = {
    "ours vs diffusers": (PLAIN, DIFFUSERS),
    "no LoRA vs dynamic LoRA": (PLAIN, DYNAMIC),
    "dynamic vs merged LoRA": (DYNAMIC, MERGED),
}
LORA_RANK, LORA_ALPHA = 32, 16
LORA_UP_STD = 0.01  # a fresh LoRA's up weights are zero (a no-op); random ones make the LoRA change the image
FULL_RESOLUTION, TINY_RESOLUTION = 1024, 64
GUIDANCE_SCALE, SAMPLER = 7.0, "euler_a"
PROMPT = "a photograph of a lighthouse on a cliff at sunset, detailed, sharp focus"
GIB = 1024 ** 3


@dataclass
class SdxlModels:
    """The four SDXL models (on the device, in `dtype`) and the two tokenizers, shared by every configuration."""

    unet: torch.nn.Module
    vae: torch.nn.Module
    text_encoders: list[torch.nn.Module]
    tokenizers: list
    device: torch.device
    dtype: torch.dtype


@dataclass
class Measurement:
    """One configuration at one batch size: seconds per timed run, peak memory, the last run's images."""

    seconds_per_run: list[float]
    peak_memory_gib: float
    images: list[Image.Image] = field(repr=False)


# ----------------------------------------------------------------------------------------------- options


def parse_bench_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--batch_sizes", type=int, nargs="+", default=[1, 4], help="images per call (default 1 4)")
    parser.add_argument("--steps", type=int, default=30, help="sampling steps per image (default 30)")
    parser.add_argument("--runs", type=int, default=3, help="timed runs per configuration after one warm-up run "
                        "(default 3)")
    parser.add_argument("--resolution", type=int, default=None, help="square image side in pixels "
                        f"(default {FULL_RESOLUTION}, {TINY_RESOLUTION} with --tiny)")
    parser.add_argument("--tiny", action="store_true", help="the tiny SDXL instead of the full-size one")
    parser.add_argument("--device", choices=("cuda", "cpu"), default="cuda", help="default cuda")
    parser.add_argument("--skip_diffusers", action="store_true", help="leave out the diffusers pipeline")
    parser.add_argument("--json", action="store_true", help="print one JSON line instead of the table")
    options = parser.parse_args(argv)
    _check_bench_args(options)
    return options


def _check_bench_args(options: argparse.Namespace) -> None:
    for flag, value in (("--steps", options.steps), ("--runs", options.runs),
                        *(("--batch_sizes", size) for size in options.batch_sizes)):
        if value < 1:
            raise FlagError(f"{flag}: expected an integer >= 1, got {value}")
    if options.resolution is None:
        options.resolution = TINY_RESOLUTION if options.tiny else FULL_RESOLUTION
    if options.resolution < 64 or options.resolution % 64:
        # the SDXL U-Net halves the latent twice, and latents are 1/8 of the image
        raise FlagError(f"--resolution: expected a multiple of 64 (e.g. {FULL_RESOLUTION}), got {options.resolution}")
    if options.device == "cuda" and not torch.cuda.is_available():
        raise FlagError("--device cuda: no CUDA device is visible to torch; run on a GPU machine, or use "
                        "--device cpu --tiny for a smoke test")
    if options.device == "cpu" and not options.tiny:
        logger.warning("full-size SDXL on CPU: about 14 GiB of fp32 weights and minutes per image; --tiny is the "
                       "CPU smoke test")


def model_dtype(device: torch.device) -> torch.dtype:
    """bf16 on CUDA (issue 5); float32 on CPU, where bf16 kernels are slow and the smoke test compares images."""
    return torch.bfloat16 if device.type == "cuda" else torch.float32


# ----------------------------------------------------------------------------------------------- models


def random_module_on_device(build: Callable[[], torch.nn.Module], device: torch.device, dtype: torch.dtype,
                            seed: int) -> torch.nn.Module:
    """A module built on meta, allocated on `device` in `dtype` and initialized in place with torch's default
    init: the full-size weights never pass through host memory or fp32."""
    with torch.device("meta"):
        module = build().to(dtype=dtype)
    module.to_empty(device=device)
    with torch.no_grad():
        torch.manual_seed(seed)
        for submodule in module.modules():
            if hasattr(submodule, "reset_parameters"):
                submodule.reset_parameters()
        _fill_buffers(module)
    return module.eval().requires_grad_(False)


def _fill_buffers(module: torch.nn.Module) -> None:
    """to_empty leaves buffers uninitialized; CLIP's `position_ids` (0..76) is the only one these models have."""
    for name, buffer in module.named_buffers():
        if name.rsplit(".", 1)[-1] != "position_ids":
            raise RuntimeError(f"{type(module).__name__}.{name}: a buffer this benchmark does not know how to fill")
        buffer.copy_(torch.arange(buffer.shape[-1], device=buffer.device).expand_as(buffer))


def build_models(tiny: bool, device: torch.device, dtype: torch.dtype) -> SdxlModels:
    """Random-weight SDXL on `device`: the tiny test model, or the full-size one from the reference configs."""
    from diffusers import AutoencoderKL, UNet2DConditionModel
    from diffusers.models.attention_processor import AttnProcessor2_0
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection

    from library.families import SDXL
    from library.text.tokenize import load_tokenizers

    if tiny:
        from library.models.tiny import build_tiny_bundle

        bundle = build_tiny_bundle("sdxl")
        unet, vae = bundle.unet.to(device, dtype), bundle.vae.to(device, dtype)
        text_encoders = [encoder.to(device, dtype) for encoder in bundle.text_encoders]
    else:
        from library.models.reference_configs import CLIP_L_TEXT, OPEN_CLIP_BIGG_TEXT, SDXL_UNET, SDXL_VAE

        builders = [lambda: UNet2DConditionModel(**SDXL_UNET), lambda: AutoencoderKL(**SDXL_VAE),
                    lambda: CLIPTextModel(CLIPTextConfig(**CLIP_L_TEXT, attn_implementation="sdpa")),
                    lambda: CLIPTextModelWithProjection(CLIPTextConfig(**OPEN_CLIP_BIGG_TEXT,
                                                                       attn_implementation="sdpa"))]
        unet, vae, *text_encoders = [random_module_on_device(build, device, dtype, seed)
                                     for seed, build in enumerate(tqdm(builders, desc="building SDXL", leave=False))]
    for model in (unet, vae):
        model.set_attn_processor(AttnProcessor2_0())  # PyTorch SDPA, for ours and diffusers alike
    return SdxlModels(unet, vae, text_encoders, load_tokenizers(SDXL), device, dtype)


# ----------------------------------------------------------------------------------------------- the renderers


def image_seeds(batch_size: int) -> list[int]:
    return list(range(batch_size))


def ours_renderer(models: SdxlModels, options: argparse.Namespace) -> Callable[[int], list[Image.Image]]:
    """generate_batch as gen_img.py calls it: one U-Net batch, weighted prompts in one 75-token window."""
    from library.families import SDXL
    from library.sampling.pipeline import ImageJob, RenderSettings, generate_batch
    from library.text.conditioning import CaptionEncoder

    caption_encoder = CaptionEncoder(SDXL, models.tokenizers, models.text_encoders)
    settings = RenderSettings(device=models.device, dtype=models.dtype, max_chunks=1, show_progress=False)

    def render(batch_size: int) -> list[Image.Image]:
        jobs = [ImageJob(prompt=PROMPT, negative_prompt="", seed=seed, width=options.resolution,
                         height=options.resolution, steps=options.steps, scale=GUIDANCE_SCALE, sampler=SAMPLER)
                for seed in image_seeds(batch_size)]
        return generate_batch(jobs, unet=models.unet, vae=models.vae, caption_encoder=caption_encoder,
                              vae_scale_factor=SDXL.vae_scale_factor, settings=settings)

    return render


def diffusers_renderer(models: SdxlModels, options: argparse.Namespace) -> Callable[[int], list[Image.Image]]:
    """StableDiffusionXLPipeline over the same models, with the same scheduler config as our euler_a."""
    from diffusers import EulerAncestralDiscreteScheduler, StableDiffusionXLPipeline

    from library.sampling.samplers import make_sampler

    scheduler = EulerAncestralDiscreteScheduler.from_config(make_sampler(SAMPLER, False).config)
    pipeline = StableDiffusionXLPipeline(
        vae=models.vae, text_encoder=models.text_encoders[0], text_encoder_2=models.text_encoders[1],
        tokenizer=models.tokenizers[0], tokenizer_2=models.tokenizers[1], unet=models.unet, scheduler=scheduler,
        add_watermarker=False)  # ours does not watermark
    pipeline.set_progress_bar_config(disable=True)

    def render(batch_size: int) -> list[Image.Image]:
        # An explicit "" negative prompt is encoded like ours (None would give diffusers' zeroed negatives);
        # per-image CPU generators, as ours draws its noise.
        return pipeline(prompt=[PROMPT] * batch_size, negative_prompt=[""] * batch_size,
                        height=options.resolution, width=options.resolution, num_inference_steps=options.steps,
                        guidance_scale=GUIDANCE_SCALE, output_type="pil",
                        generator=[torch.Generator("cpu").manual_seed(seed) for seed in image_seeds(batch_size)]
                        ).images

    return render


# ----------------------------------------------------------------------------------------------- the LoRA


def build_lora(models: SdxlModels, seed: int = 0):
    """A rank-32 / alpha-16 networks.lora LoRA on both text encoders and the U-Net, with random up weights."""
    from networks.lora import create_network

    network = create_network(1.0, LORA_RANK, LORA_ALPHA, models.vae, models.text_encoders, models.unet)
    generator = torch.Generator("cpu").manual_seed(seed)
    with torch.no_grad():
        for lora in network.text_encoder_loras + network.unet_loras:
            weight = lora.lora_up.weight
            weight.copy_(torch.randn(weight.shape, generator=generator) * LORA_UP_STD)
    return network.eval().requires_grad_(False)


@contextmanager
def lora_applied_dynamically(network, models: SdxlModels) -> Iterator[None]:
    """The LoRA hooked into the layers' forward (gen_img.py without --network_merge), unhooked afterwards."""
    network.apply_to(models.text_encoders, models.unet)
    network.to(models.device, models.dtype)
    try:
        yield
    finally:
        for lora in network.text_encoder_loras + network.unet_loras:
            lora.restore()
        network.to("cpu")  # off the device, so later configurations' peak memory does not count it


@contextmanager
def lora_merged(network, models: SdxlModels) -> Iterator[None]:
    """The LoRA's file tensors merged into the weights (gen_img.py --network_merge); the original weights are
    kept on the CPU (not to count them in peak memory) and copied back afterwards."""
    loras = network.text_encoder_loras + network.unet_loras
    originals = [lora.original_module.weight.detach().to("cpu", copy=True) for lora in loras]
    network.merge_to(models.text_encoders, models.unet, network.file_state_dict(), models.dtype, models.device)
    try:
        yield
    finally:
        with torch.no_grad():
            for lora, original in zip(loras, originals):
                lora.original_module.weight.copy_(original)


# ----------------------------------------------------------------------------------------------- measuring


def _synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def reset_peak_memory(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)


def peak_memory_gib(device: torch.device) -> float:
    """CUDA max allocated since the last reset, or the process's peak RSS on CPU."""
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / GIB
    import resource

    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024 / GIB  # ru_maxrss is in KiB on Linux


def peak_memory_measure(device: torch.device) -> str:
    if device.type == "cuda":
        return "cuda max_memory_allocated over the timed runs, reset per configuration"
    return "process peak RSS (covers the whole process, not one configuration)"


def measure(render: Callable[[int], list[Image.Image]], batch_size: int, runs: int, device: torch.device,
            description: str) -> Measurement:
    """One untimed warm-up call, then `runs` calls each timed between device synchronizations."""
    render(batch_size)
    reset_peak_memory(device)
    seconds, images = [], []
    for _ in tqdm(range(runs), desc=description, leave=False):
        _synchronize(device)
        start = time.perf_counter()
        images = render(batch_size)
        _synchronize(device)
        seconds.append(time.perf_counter() - start)
    return Measurement(seconds, peak_memory_gib(device), images)


def measure_batch_size(models: SdxlModels, network, renderers: dict, batch_size: int, runs: int
                       ) -> dict[str, Measurement]:
    """Every configuration at one batch size; the models are back to their own weights afterwards."""
    def timed(configuration: str) -> Measurement:
        return measure(renderers[configuration], batch_size, runs, models.device,
                       f"{configuration}, batch {batch_size}")

    measurements = {PLAIN: timed(PLAIN)}
    with lora_applied_dynamically(network, models):
        measurements[DYNAMIC] = timed(DYNAMIC)
    with lora_merged(network, models):
        measurements[MERGED] = timed(MERGED)
    if DIFFUSERS in renderers:
        measurements[DIFFUSERS] = timed(DIFFUSERS)
    return measurements


def run_benchmark(options: argparse.Namespace) -> tuple[dict, dict[int, dict[str, Measurement]]]:
    """Build the models once, measure every batch size; returns (results, measurements by batch size)."""
    device = torch.device(options.device)
    models = build_models(options.tiny, device, model_dtype(device))
    network = build_lora(models)
    ours = ours_renderer(models, options)
    renderers = {PLAIN: ours, DYNAMIC: ours, MERGED: ours}
    if not options.skip_diffusers:
        renderers[DIFFUSERS] = diffusers_renderer(models, options)
    measurements = {batch_size: measure_batch_size(models, network, renderers, batch_size, options.runs)
                    for batch_size in options.batch_sizes}
    return summarize(options, models, measurements), measurements


# ----------------------------------------------------------------------------------------------- report


def ratio_entry(name: str, seconds_per_image: dict[str, float]) -> dict:
    """One ratio of s/image with its target; value and verdict are None when a side was not measured."""
    numerator, denominator, lowest, highest = RATIO_TARGETS[name]
    if numerator not in seconds_per_image or denominator not in seconds_per_image:
        return {"value": None, "lowest": lowest, "highest": highest, "met": None}
    value = seconds_per_image[numerator] / seconds_per_image[denominator]
    met = (lowest is None or value >= lowest) and (highest is None or value <= highest)
    return {"value": value, "lowest": lowest, "highest": highest, "met": met}


def mean_pixel_difference(first: list[Image.Image], second: list[Image.Image]) -> float:
    """Mean absolute difference of two renders of the same seeds, in 8-bit levels (0..255)."""
    def pixels(images: list[Image.Image]) -> np.ndarray:
        return np.stack([np.asarray(image.convert("RGB"), dtype=np.float32) for image in images])

    return float(np.abs(pixels(first) - pixels(second)).mean())


def image_differences(by_configuration: dict[str, Measurement]) -> dict[str, float | None]:
    return {name: mean_pixel_difference(by_configuration[first].images, by_configuration[second].images)
            if first in by_configuration and second in by_configuration else None
            for name, (first, second) in IMAGE_DIFFERENCES.items()}


def summarize(options: argparse.Namespace, models: SdxlModels, measurements: dict[int, dict[str, Measurement]]
              ) -> dict:
    batches = []
    for batch_size, by_configuration in measurements.items():
        configurations = {
            name: {"s_per_image": statistics.median(m.seconds_per_run) / batch_size,
                   "median_s_per_batch": statistics.median(m.seconds_per_run),
                   "peak_memory_gib": m.peak_memory_gib}
            for name, m in by_configuration.items()}
        seconds_per_image = {name: entry["s_per_image"] for name, entry in configurations.items()}
        batches.append({"batch_size": batch_size, "configurations": configurations,
                        "ratios": {name: ratio_entry(name, seconds_per_image) for name in RATIO_TARGETS},
                        "mean_pixel_difference": image_differences(by_configuration)})
    vae_dtype = next(models.vae.parameters()).dtype
    return {
        "model": "tiny SDXL" if options.tiny else "full-size SDXL (random weights)",
        "device": options.device, "dtype": str(models.dtype).removeprefix("torch."),
        # diffusers upcasts the VAE to float32 only for a float16 one with force_upcast, so both decode in this
        "vae_dtype": str(vae_dtype).removeprefix("torch."),
        "attention": "sdpa", "resolution": options.resolution, "steps": options.steps, "sampler": SAMPLER,
        "guidance_scale": GUIDANCE_SCALE, "lora_rank": LORA_RANK, "lora_alpha": LORA_ALPHA,
        "warmup_runs": 1, "timed_runs": options.runs, "peak_memory_measure": peak_memory_measure(models.device),
        "batches": batches,
    }


def _target_text(entry: dict) -> str:
    lowest, highest = entry["lowest"], entry["highest"]
    return f"<= {highest:.2f}" if lowest is None else f"{lowest:.2f} .. {highest:.2f}"


def report_lines(results: dict) -> list[str]:
    side = results["resolution"]
    title = (f"{results['model']} text-to-image on {results['device']}: {side}x{side}, {results['steps']} steps, "
             f"{results['sampler']}, guidance {results['guidance_scale']:g}, {results['dtype']} "
             f"(VAE {results['vae_dtype']}), {results['attention']}; LoRA rank {results['lora_rank']}, "
             f"alpha {results['lora_alpha']}")
    method = (f"median of {results['timed_runs']} timed run(s) after {results['warmup_runs']} warm-up; "
              f"memory: {results['peak_memory_measure']}")
    lines = [title, method, f"  {'batch':>5}  {'configuration':<22} {'s/image':>9} {'s/batch':>9} {'peak GiB':>9}"]
    for batch in results["batches"]:
        for name, entry in batch["configurations"].items():
            lines.append(f"  {batch['batch_size']:>5}  {name:<22} {entry['s_per_image']:>9.4f} "
                         f"{entry['median_s_per_batch']:>9.4f} {entry['peak_memory_gib']:>9.2f}")
    lines.append("ratios of s/image (target):")
    for batch in results["batches"]:
        for name, entry in batch["ratios"].items():
            if entry["value"] is None:
                verdict = "not measured"
            else:
                verdict = f"{entry['value']:.3f}  {'met' if entry['met'] else 'NOT met'}"
            target = f"({_target_text(entry)})"
            lines.append(f"  batch {batch['batch_size']:<3} {name:<24} {target:<15} {verdict}")
    lines.append("mean |pixel difference| of the same seeds, 0..255 (fairness checks):")
    for batch in results["batches"]:
        differences = ", ".join(f"{name} {'-' if value is None else f'{value:.2f}'}"
                                for name, value in batch["mean_pixel_difference"].items())
        lines.append(f"  batch {batch['batch_size']:<3} {differences}")
    return lines


def format_results(results: dict, as_json: bool) -> str:
    return json.dumps(results) if as_json else "\n".join(report_lines(results))


def main(argv: list[str] | None = None) -> dict:
    """Run the benchmark; prints the table (or one JSON line) and returns the results."""
    options = parse_bench_args(argv)
    results, _ = run_benchmark(options)
    print(format_results(results, options.json))
    return results


if __name__ == "__main__":
    from library.cli import run_cli

    run_cli(main)
