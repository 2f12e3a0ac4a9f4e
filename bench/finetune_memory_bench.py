"""Memory of one full-fine-tune optimizer step of the SDXL U-Net, with and without `--fused_backward_pass`
(issue 14), for Adafactor and AdamW8bit.

    python bench/finetune_memory_bench.py [--device cpu|cuda] [--tiny] [--resolution N]
                                          [--configs adafactor,adafactor-fused,adamw8bit,adamw8bit-fused]

Each configuration runs in a fresh process (so peaks never mix): a random-weight U-Net in bf16 (full size, built on
meta and filled in place; --tiny: the tiny test U-Net), gradient checkpointing on, one forward/backward on a random
latent with random text conditioning (77 tokens of 2048-wide context, 1280-wide pooled embedding, time ids; the tiny
model's own widths with --tiny), then the optimizer step. Unfused: `get_optimizer(...).step()` on the bf16 weights, as
the trainer does with --full_bf16; fused: `FusedOptimizer` (library/train/fused_backward.py) steps each tensor inside
backward, as the trainer does with --fused_backward_pass. Adafactor: scale_parameter=False relative_step=False
warmup_init=False, lr 1e-5; AdamW8bit: bitsandbytes' defaults, lr 1e-5.

CPU (default resolution 128, a 16x16 latent): peak RSS of the process (VmHWM) against weights + optimizer state +
the RSS after imports. Targets: fused peak <= 1.15 x (weights + state + baseline RSS); unfused peak - fused peak
about one gradient set (ratio 0.8 to 1.2). CUDA (default resolution 1024, a 128x128 latent):
torch.cuda.max_memory_allocated and s/step (after --warmup steps). Targets at 1024 on full size: Adafactor fused
<= 10 GiB, AdamW8bit fused <= 14 GiB.

On CPU the children run with MALLOC_MMAP_THRESHOLD_=1048576: with glibc's defaults freed heap memory stays
resident, and a fused step's per-tensor gradients add up to about one gradient set of RSS although at most one is
alive (--default_malloc measures that way; measured: fused peak 11.1 instead of 6.5 GiB for Adafactor).

Prints a table and a `results {json}` line. Full size on CPU needs RAM for the weights (4.8 GiB), a gradient set
(4.8 GiB) and the state (Adafactor 0.9 GiB, AdamW8bit 4.9 GiB) plus about 0.5 GiB of imports, up to 15.5 GiB for
unfused AdamW8bit, and one to two minutes per configuration on two cores; --tiny is the smoke test, and
--jobs 2 runs its configurations two at a time.
"""
from __future__ import annotations

import argparse
import functools
import json
import os
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

GIB = 1024 ** 3
LEARNING_RATE = 1e-5
OPTIMIZERS = {  # config prefix -> (--optimizer_type, --optimizer_args)
    "adafactor": ("AdaFactor", {"scale_parameter": False, "relative_step": False, "warmup_init": False}),
    "adamw8bit": ("AdamW8bit", {}),
}
ALL_CONFIGS = ("adafactor", "adafactor-fused", "adamw8bit", "adamw8bit-fused")
TOKENS = 77
CPU_RESOLUTION, CUDA_RESOLUTION = 128, 1024  # latents 16x16 and 128x128
FUSED_PEAK_TARGET = 1.15  # fused peak <= 1.15 x (weights + optimizer state + baseline RSS), CPU
SAVED_GRADIENT_RANGE = (0.8, 1.2)  # (unfused peak - fused peak) / one gradient set, CPU
CUDA_FUSED_TARGET_GIB = {"adafactor-fused": 10.0, "adamw8bit-fused": 14.0}  # full size, 1024 px, bs 1
# glibc's default mmap threshold grows (up to 32 MiB) after large frees, and freed heap memory stays resident, so
# the per-tensor gradients of a fused step pile up in RSS although only one is alive at a time; a fixed threshold
# makes RSS follow the live tensors (MALLOC_MMAP_THRESHOLD_ also switches the dynamic threshold off)
MMAP_THRESHOLD = 1024 * 1024
# rough full-size sizes, to warn before running out of memory
FULL_WEIGHTS_GIB = 4.8


# ----------------------------------------------------------------------------------------------- options


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", choices=("cpu", "cuda"), default=None, help="default cuda when available")
    parser.add_argument("--tiny", action="store_true", help="the tiny test U-Net instead of full size (smoke test)")
    parser.add_argument("--resolution", type=int, default=None,
                        help=f"square image side in pixels, latent = 1/8 (default {CPU_RESOLUTION} on CPU, "
                             f"{CUDA_RESOLUTION} on CUDA)")
    parser.add_argument("--configs", default=",".join(ALL_CONFIGS),
                        help=f"comma-separated, from {', '.join(ALL_CONFIGS)} (default all)")
    parser.add_argument("--warmup", type=int, default=None,
                        help="untimed steps before the measured one (default 0 on CPU, 1 on CUDA)")
    parser.add_argument("--default_malloc", action="store_true",
                        help="leave glibc malloc as it is (by default the children allocate blocks of "
                             f"{MMAP_THRESHOLD // 1024} KiB and more with mmap, so freed memory leaves RSS)")
    parser.add_argument("--child", default=None, help=argparse.SUPPRESS)  # internal: run one configuration
    parser.add_argument("--jobs", type=int, default=1,
                        help="configurations run at once (default 1); peaks stay per process but times interfere "
                             "and memory adds up, so more than 1 only for --tiny smoke tests")
    options = parser.parse_args(argv)
    if options.device != "cpu":  # torch's import is skipped in the parent when the device is given as cpu
        import torch

        if options.device is None:
            options.device = "cuda" if torch.cuda.is_available() else "cpu"
        if options.device == "cuda" and not torch.cuda.is_available():
            parser.error("--device cuda: no CUDA device is visible to torch")
    if options.jobs < 1:
        parser.error(f"--jobs: expected >= 1, got {options.jobs}")
    if options.resolution is None:
        options.resolution = CUDA_RESOLUTION if options.device == "cuda" else CPU_RESOLUTION
    if options.resolution < 64 or options.resolution % 64:
        parser.error(f"--resolution: expected a multiple of 64, got {options.resolution}")
    if options.warmup is None:
        options.warmup = 1 if options.device == "cuda" else 0
    if options.warmup < 0:
        parser.error(f"--warmup: expected >= 0, got {options.warmup}")
    options.configs = [name.strip() for name in options.configs.split(",") if name.strip()]
    unknown = [name for name in options.configs if name not in ALL_CONFIGS]
    if unknown or not options.configs:
        parser.error(f"--configs: expected names from {', '.join(ALL_CONFIGS)}, got {unknown or 'none'}")
    return options


# ----------------------------------------------------------------------------------------------- child process


def _proc_status(key: str) -> int:
    """VmHWM (peak RSS) or VmRSS of this process in bytes."""
    try:
        with open("/proc/self/status") as status:
            for line in status:
                if line.startswith(key + ":"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    import resource

    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # no /proc: peak only


def build_unet(tiny: bool, device, dtype):
    """Random-weight SDXL U-Net in `dtype` on `device`. Full size is built on meta and filled in place with a cheap
    uniform init of torch's default scale (+-1/sqrt(fan_in)); norms get weight 1 and bias 0."""
    import torch

    if tiny:
        from library.models.tiny import build_tiny_bundle

        return build_tiny_bundle("sdxl").unet.to(device, dtype=dtype)
    from diffusers import UNet2DConditionModel

    from library.models.reference_configs import SDXL_UNET

    with torch.device("meta"):
        unet = UNet2DConditionModel(**SDXL_UNET).to(dtype=dtype)
    unet.to_empty(device=device)
    generator = torch.Generator(device=device).manual_seed(0)
    with torch.no_grad():
        for name, param in unet.named_parameters():
            if param.dim() >= 2:
                bound = param[0].numel() ** -0.5
                param.uniform_(-bound, bound, generator=generator)
            elif name.endswith("bias"):
                param.zero_()
            else:  # GroupNorm / LayerNorm weights
                param.fill_(1.0)
    for buffer in unet.buffers():  # none in this model; keep to_empty's garbage out if a version adds one
        buffer.zero_()
    return unet


def conditioning(unet, batch: int, device, dtype, resolution: int, generator) -> dict:
    """Random noisy latent, timestep and SDXL text conditioning matching the U-Net's widths."""
    import torch

    config = unet.config
    side = resolution // 8
    pooled_width = config.projection_class_embeddings_input_dim - 6 * config.addition_time_embed_dim

    def randn(*shape):
        return torch.randn(*shape, generator=generator, device=device, dtype=torch.float32).to(dtype)

    time_ids = torch.tensor([[resolution, resolution, 0, 0, resolution, resolution]] * batch, device=device,
                            dtype=dtype)
    return dict(sample=randn(batch, config.in_channels, side, side),
                timestep=torch.randint(0, 1000, (batch,), generator=generator, device=device),
                encoder_hidden_states=randn(batch, TOKENS, config.cross_attention_dim),
                added_cond_kwargs={"text_embeds": randn(batch, pooled_width), "time_ids": time_ids})


def state_tensors(optimizer) -> list:
    """Every tensor in the optimizer state (inner optimizers' states for a FusedOptimizer), each storage once."""
    import torch

    optimizers = getattr(optimizer, "inner_optimizers", None) or [optimizer]
    seen, tensors = set(), []
    for inner in optimizers:
        for state in inner.state.values():
            for value in state.values():
                if isinstance(value, torch.Tensor) and value.numel():
                    key = (value.untyped_storage().data_ptr(), value.device)
                    if key not in seen:
                        seen.add(key)
                        tensors.append(value)
    return tensors


def run_child(options: argparse.Namespace) -> dict:
    """One configuration in this process; returns its figures."""
    config = options.child
    optimizer_type, optimizer_args = OPTIMIZERS[config.split("-")[0]]
    fused = config.endswith("-fused")
    import torch
    from diffusers import UNet2DConditionModel  # noqa: F401 (diffusers' lazy model import is part of the baseline)

    from library.train.fused_backward import FusedOptimizer, OptimizerFactory
    from library.train.optimizers import get_optimizer

    if optimizer_type == "AdamW8bit":
        import bitsandbytes

        backend = f"bitsandbytes {bitsandbytes.__version__}"
    else:
        import transformers
        import transformers.optimization  # noqa: F401

        backend = f"transformers {transformers.__version__}"
    device = torch.device(options.device)
    cuda = device.type == "cuda"
    if cuda:
        torch.cuda.init()
        torch.cuda.reset_peak_memory_stats(device)
    baseline_rss = _proc_status("VmHWM")
    baseline_cuda = torch.cuda.memory_allocated(device) if cuda else 0

    start = time.perf_counter()
    unet = build_unet(options.tiny, device, torch.bfloat16)
    unet.enable_gradient_checkpointing()
    unet.train().requires_grad_(True)
    build_seconds = time.perf_counter() - start
    params = list(unet.parameters())
    weights_bytes = sum(p.numel() * p.element_size() for p in params)
    rss_after_build = _proc_status("VmRSS")

    groups = [{"params": params, "lr": LEARNING_RATE}]
    if fused:
        factory = OptimizerFactory(optimizer_type, LEARNING_RATE, dict(optimizer_args))
        optimizer = FusedOptimizer(groups, factory, max_grad_norm=0.0)
        class_path = factory.class_path
    else:
        class_path, _, optimizer = get_optimizer(optimizer_type, groups, LEARNING_RATE, dict(optimizer_args))

    generator = torch.Generator(device=device).manual_seed(1)
    probe = params[0]  # conv_in.weight: checks that the step changed the weights
    before = probe.detach().clone()

    def step() -> tuple[float, float, float]:
        if cuda:
            torch.cuda.synchronize(device)
        begin = time.perf_counter()
        inputs = conditioning(unet, 1, device, torch.bfloat16, options.resolution, generator)
        target = torch.randn(inputs["sample"].shape, generator=generator, device=device)
        prediction = unet(**inputs).sample
        loss = torch.nn.functional.mse_loss(prediction.float(), target)
        loss.backward()
        if cuda:
            torch.cuda.synchronize(device)
        middle = time.perf_counter()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        if cuda:
            torch.cuda.synchronize(device)
        end = time.perf_counter()
        return end - begin, middle - begin, float(loss.detach())

    for _ in range(options.warmup):
        step()
    seconds, backward_seconds, loss = step()
    updated = not torch.equal(before, probe.detach())

    state = state_tensors(optimizer)
    state_bytes = sum(t.numel() * t.element_size() for t in state)
    state_by_dtype: dict[str, int] = {}
    for tensor in state:
        key = str(tensor.dtype).replace("torch.", "")
        state_by_dtype[key] = state_by_dtype.get(key, 0) + tensor.numel() * tensor.element_size()
    result = dict(
        config=config, optimizer=class_path, backend=backend, fused=fused, device=options.device,
        parameters=sum(p.numel() for p in params), weights_bytes=weights_bytes, gradient_set_bytes=weights_bytes,
        state_bytes=state_bytes, state_bytes_by_dtype=state_by_dtype,
        inner_optimizers=len(getattr(optimizer, "inner_optimizers", [optimizer])),
        build_seconds=build_seconds, step_seconds=seconds, forward_backward_seconds=backward_seconds,
        optimizer_step_seconds=seconds - backward_seconds, loss=loss, weights_updated=updated,
        baseline_rss_bytes=baseline_rss, rss_after_build_bytes=rss_after_build, peak_rss_bytes=_proc_status("VmHWM"),
        torch_threads=torch.get_num_threads(),
    )
    if cuda:
        result.update(baseline_bytes=baseline_cuda, peak_bytes=torch.cuda.max_memory_allocated(device),
                      peak_reserved_bytes=torch.cuda.max_memory_reserved(device), peak_measure="cuda max allocated")
    else:
        result.update(baseline_bytes=baseline_rss, peak_bytes=result["peak_rss_bytes"], peak_measure="peak RSS")
    return result


# ----------------------------------------------------------------------------------------------- parent


def run_config(options: argparse.Namespace, config: str) -> dict:
    """Run one configuration in a fresh interpreter; its figures."""
    command = [sys.executable, str(Path(__file__).resolve()), "--child", config, "--device", options.device,
               "--resolution", str(options.resolution), "--warmup", str(options.warmup)]
    if options.tiny:
        command.append("--tiny")
    print(f"running {config} ...", flush=True)
    env = dict(os.environ)
    if not options.default_malloc:
        env.setdefault("MALLOC_MMAP_THRESHOLD_", str(MMAP_THRESHOLD))
    if options.jobs > 1:  # share the cores instead of oversubscribing them
        env.setdefault("OMP_NUM_THREADS", str(max(1, (os.cpu_count() or 1) // options.jobs)))
    result = subprocess.run(command, capture_output=True, text=True, check=False, cwd=ROOT, env=env)
    lines = [line for line in result.stdout.splitlines() if line.startswith("child ")]
    if result.returncode != 0 or not lines:
        raise SystemExit(f"{config} failed (exit {result.returncode}):\n{result.stderr[-4000:]}")
    return json.loads(lines[-1][len("child "):])


def available_memory() -> int | None:
    try:
        with open("/proc/meminfo") as meminfo:
            for line in meminfo:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return None


def analyse(options: argparse.Namespace, runs: dict[str, dict]) -> dict:
    """Ratios and target verdicts."""
    cuda = options.device == "cuda"
    for run in runs.values():
        expected = run["weights_bytes"] + run["state_bytes"] + run["baseline_bytes"]
        run["expected_bytes"] = expected
        run["peak_over_expected"] = run["peak_bytes"] / expected
    targets: dict[str, dict] = {}
    for name in OPTIMIZERS:
        unfused, fused = runs.get(name), runs.get(f"{name}-fused")
        if fused is not None and not cuda:
            targets[f"{name}-fused peak / (weights + state + baseline)"] = dict(
                value=fused["peak_over_expected"], target=f"<= {FUSED_PEAK_TARGET}",
                met=None if options.tiny else fused["peak_over_expected"] <= FUSED_PEAK_TARGET)
        if unfused is not None and fused is not None:
            saved = unfused["peak_bytes"] - fused["peak_bytes"]
            ratio = saved / fused["gradient_set_bytes"]
            low, high = SAVED_GRADIENT_RANGE
            targets[f"{name}: (unfused - fused peak) / one gradient set"] = dict(
                value=ratio, saved_bytes=saved, target=f"about 1 ({low} to {high})",
                met=None if options.tiny else low <= ratio <= high)
        if fused is not None and cuda:
            limit = CUDA_FUSED_TARGET_GIB[f"{name}-fused"]
            applies = not options.tiny and options.resolution == CUDA_RESOLUTION
            targets[f"{name}-fused peak GiB at 1024 px"] = dict(
                value=fused["peak_bytes"] / GIB, target=f"<= {limit}",
                met=(fused["peak_bytes"] / GIB <= limit) if applies else None)
    return targets


def report(options: argparse.Namespace, runs: dict[str, dict], targets: dict[str, dict]) -> None:
    cuda = options.device == "cuda"
    model = "tiny SDXL U-Net" if options.tiny else "full-size SDXL U-Net (random weights)"
    side = options.resolution // 8
    print(f"{model}, bf16, gradient checkpointing, batch 1, {options.resolution} px ({side}x{side} latent), "
          f"{options.device}, lr {LEARNING_RATE}; one step" + (f" after {options.warmup} warm-up" if options.warmup
                                                              else ""))
    measure = "cuda peak" if cuda else "peak RSS"
    header = (f"{'config':<16} {'s/step':>8} {'fwd+bwd s':>9} {'opt s':>7} {measure + ' GiB':>13} "
              f"{'baseline':>9} {'weights':>8} {'state':>7} {'grads':>7} {'peak/(w+s+base)':>16}")
    print(header)
    for name, run in runs.items():
        print(f"{name:<16} {run['step_seconds']:>8.2f} {run['forward_backward_seconds']:>9.2f} "
              f"{run['optimizer_step_seconds']:>7.2f} {run['peak_bytes'] / GIB:>13.3f} "
              f"{run['baseline_bytes'] / GIB:>9.3f} {run['weights_bytes'] / GIB:>8.3f} "
              f"{run['state_bytes'] / GIB:>7.3f} {run['gradient_set_bytes'] / GIB:>7.3f} "
              f"{run['peak_over_expected']:>16.3f}")
    print("(GiB; baseline = " + ("cuda memory allocated before the model"
                                 if cuda else "peak RSS after imports") + "; grads = one gradient set = weights; "
          "'fwd+bwd s' includes the fused updates)")
    for name, run in runs.items():
        dtypes = ", ".join(f"{key} {value / GIB:.3f}" for key, value in sorted(run["state_bytes_by_dtype"].items()))
        print(f"  {name}: {run['optimizer']} x{run['inner_optimizers']} ({run['backend']}), state GiB by dtype: "
              f"{dtypes or 'none'}; weights updated: {run['weights_updated']}; loss {run['loss']:.4f}")
    if any(run["optimizer"].startswith("bitsandbytes") for run in runs.values()):
        eight_bit = all(run["state_bytes_by_dtype"].get("uint8", 0) > 0
                        for run in runs.values() if run["optimizer"].startswith("bitsandbytes"))
        print(f"  AdamW8bit on {options.device}: " + ("8-bit (uint8) state, as on GPU" if eight_bit else
                                                       "no uint8 state: bitsandbytes fell back to 32-bit state"))
    print("targets:")
    for name, target in targets.items():
        verdict = {True: "met", False: "NOT met", None: "not judged"}[target["met"]]
        extra = f" (saved {target['saved_bytes'] / GIB:.3f} GiB)" if "saved_bytes" in target else ""
        print(f"  {name}: {target['value']:.3f}{extra}, target {target['target']}: {verdict}")
    if options.tiny:
        print("tiny mode: memory is dominated by the Python/torch baseline; ratios are not judged")
    elif cuda and options.resolution != CUDA_RESOLUTION:
        print(f"the GiB targets are for {CUDA_RESOLUTION} px; not judged at {options.resolution}")
    if not cuda:
        print("malloc: " + ("glibc defaults (freed heap memory can stay in RSS)" if options.default_malloc else
                            f"MALLOC_MMAP_THRESHOLD_={os.environ.get('MALLOC_MMAP_THRESHOLD_', MMAP_THRESHOLD)} "
                            "in the children (RSS follows live tensors; --default_malloc to compare)"))
    results = dict(model=model, device=options.device, resolution=options.resolution, warmup=options.warmup,
                   tiny=options.tiny, default_malloc=options.default_malloc, configs=runs, targets=targets)
    print("results " + json.dumps(results))


def main(argv: list[str] | None = None) -> dict | None:
    options = parse_args(argv)
    if options.child:
        result = run_child(options)
        print("child " + json.dumps(result), flush=True)
        return result
    free = available_memory()
    if not options.tiny and options.device == "cpu" and free is not None:
        needed = FULL_WEIGHTS_GIB * (3 if "adamw8bit" in options.configs else 2) + 1.5
        if free / GIB < needed:
            print(f"warning: {free / GIB:.1f} GiB available, the largest configuration needs about {needed:.0f} GiB",
                  flush=True)
    start = time.perf_counter()
    if options.jobs == 1:
        runs = {config: run_config(options, config) for config in options.configs}
    else:
        from concurrent.futures import ThreadPoolExecutor

        with ThreadPoolExecutor(options.jobs) as pool:
            runs = dict(zip(options.configs, pool.map(functools.partial(run_config, options), options.configs)))
    targets = analyse(options, runs)
    report(options, runs, targets)
    print(f"total {time.perf_counter() - start:.1f} s" + (f" ({options.jobs} at once)" if options.jobs > 1 else ""))
    return dict(configs=runs, targets=targets)


if __name__ == "__main__":
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    main()
