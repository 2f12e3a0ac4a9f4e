"""Everything a training run settles before any model loads: flag conflicts, the accelerator, the schedule.

Conflicting flags fail here with one line naming them, so a user never waits for a model load to learn that
two options cannot go together.
"""
from __future__ import annotations

import argparse
import logging
import math
import os
from dataclasses import dataclass
from datetime import timedelta
from pathlib import Path

from library.errors import FlagError

logger = logging.getLogger(__name__)


# the network-training flags the shared phases read, at the values that mean "no network options": scripts that
# train something else (the whole model, embeddings, LLLite) have no such flags
NO_NETWORK_FLAGS = {
    "network_dim": None, "network_alpha": None, "network_dropout": None, "network_args": None,
    "network_weights": None, "dim_from_weights": False, "unet_lr": None, "text_encoder_lr": None,
    "base_weights": None, "base_weights_multiplier": None, "scale_weight_norms": None, "loraplus_lr_ratio": None,
    "loraplus_unet_lr_ratio": None, "loraplus_text_encoder_lr_ratio": None, "network_multiplier": 1.0,
    "no_metadata": False,
}


def fill_network_flags(args: argparse.Namespace, network_module: str, **fixed) -> None:
    """Give `args` the network flags its script does not declare (NO_NETWORK_FLAGS), `network_module` as the
    name of what trains, and `fixed` values that override whatever was parsed."""
    for key, value in NO_NETWORK_FLAGS.items():
        if not hasattr(args, key):
            setattr(args, key, value)
    args.network_module = network_module
    for key, value in fixed.items():
        setattr(args, key, value)


def check_network_flags(args: argparse.Namespace, text_encoder_count: int) -> None:
    """Flag combinations of network training that cannot work (COMPAT §16; issue: fail before models load)."""
    if args.network_train_unet_only and args.network_train_text_encoder_only:
        raise FlagError("--network_train_unet_only and --network_train_text_encoder_only cannot be used together; "
                        "give one of them (or neither, to train both)")
    if getattr(args, "cache_text_encoder_outputs", False) and not args.network_train_unet_only:
        raise FlagError("--cache_text_encoder_outputs needs --network_train_unet_only: cached text-encoder outputs "
                        "cannot carry gradients into a text-encoder network")
    if args.dim_from_weights and not args.network_weights:
        raise FlagError("--dim_from_weights needs --network_weights (the file to take the ranks from)")
    if args.text_encoder_lr and len(args.text_encoder_lr) > text_encoder_count:
        # kohya_ss writes two values even for SD1.x; kohya's train_network.py uses the first ones
        used = args.text_encoder_lr[:text_encoder_count]
        logger.warning("--text_encoder_lr got %d values but this model has %d text encoder(s); using %s",
                       len(args.text_encoder_lr), text_encoder_count, " ".join(f"{value:g}" for value in used))
        args.text_encoder_lr = used
    for flag in ("fused_backward_pass", "fused_optimizer_groups"):
        if getattr(args, flag, None):
            logger.warning("--%s has no effect on network training (kohya uses it in full fine-tuning only); "
                           "ignored", flag)
    if args.base_weights_multiplier and len(args.base_weights_multiplier) != len(args.base_weights or []):
        raise FlagError(f"--base_weights_multiplier got {len(args.base_weights_multiplier)} values for "
                        f"{len(args.base_weights or [])} --base_weights files; give one per file")
    if args.scale_weight_norms is not None and args.scale_weight_norms <= 0:
        raise FlagError(f"--scale_weight_norms expected a number > 0, got {args.scale_weight_norms}")
    if args.network_dim is not None and args.network_dim < 1:
        raise FlagError(f"--network_dim {args.network_dim}: expected a rank of at least 1")
    check_learning_rates(args)


MAX_LEARNING_RATE = 100.0  # far above any real one (adaptive optimizers such as Prodigy use 1.0)


def check_learning_rates(args: argparse.Namespace) -> None:
    """Learning rates are finite numbers from 0 (that part frozen) to MAX_LEARNING_RATE, and something trains."""
    rates = [("--learning_rate", args.learning_rate), ("--unet_lr", args.unet_lr)]
    rates += [("--text_encoder_lr", value) for value in args.text_encoder_lr or []]
    for flag, value in rates:
        if value is not None and not (math.isfinite(value) and 0.0 <= value <= MAX_LEARNING_RATE):
            raise FlagError(f"{flag} {value}: expected a learning rate from 0 to {MAX_LEARNING_RATE:g}")
    unet = args.unet_lr if args.unet_lr is not None else args.learning_rate
    encoders = [value if value is not None else args.learning_rate for value in (args.text_encoder_lr or [None])]
    trains_unet = not args.network_train_text_encoder_only and unet
    trains_encoders = not args.network_train_unet_only and any(encoders)
    if not trains_unet and not trains_encoders:
        raise FlagError(f"--learning_rate {args.learning_rate:g}"
                        + (f" / --unet_lr {args.unet_lr:g}" if args.unet_lr is not None else "")
                        + (f" / --text_encoder_lr {' '.join(f'{v:g}' for v in args.text_encoder_lr)}"
                           if args.text_encoder_lr else "")
                        + ": every part that would train has a learning rate of 0 (0 freezes a part); nothing "
                          "would train")


def check_precision_flags(args: argparse.Namespace) -> None:
    if args.full_fp16 and args.mixed_precision != "fp16":
        raise FlagError("--full_fp16 needs --mixed_precision fp16")
    if args.full_bf16 and args.mixed_precision != "bf16":
        raise FlagError("--full_bf16 needs --mixed_precision bf16")
    if (args.fp8_base or args.fp8_base_unet) and args.mixed_precision == "no":
        raise FlagError("--fp8_base needs --mixed_precision fp16 or bf16 (float8 weights are computed in that dtype)")
    if args.xformers:
        try:
            import xformers.ops  # noqa: F401
        except ImportError as error:
            raise FlagError(f"--xformers: xformers could not be imported ({error}); install it for your torch/CUDA "
                            "build or use --sdpa") from error


def check_device_precision(args: argparse.Namespace, device) -> None:
    """fp16 autocast is a GPU feature; on a CPU it fails deep inside the first step with a dtype mismatch."""
    if args.mixed_precision == "fp16" and device.type == "cpu":
        raise FlagError("--mixed_precision fp16 needs a GPU, and this run has none (the device is the CPU); use "
                        "--mixed_precision bf16 or no")


def check_output_flags(args: argparse.Namespace) -> None:
    from library.output_folders import check_writable_folder
    from library.train.checkpoints import check_output_name

    if not args.pretrained_model_name_or_path:
        raise FlagError("--pretrained_model_name_or_path is required (the base model: a .safetensors/.ckpt file or "
                        "a diffusers folder)")
    if not args.output_dir:
        raise FlagError("--output_dir is required (the folder for the trained network, samples and states)")
    check_output_name(args.output_name)
    check_writable_folder(args.output_dir, "--output_dir")
    if args.logging_dir:
        check_writable_folder(args.logging_dir, "--logging_dir")
    from library.train.hub import check_hub_flags

    check_hub_flags(args)
    if args.resume and not getattr(args, "resume_from_huggingface", False) and not Path(args.resume).is_dir():
        raise FlagError(f"--resume {args.resume}: no such folder; expected a '-state' folder saved with --save_state")
    if args.sample_prompts and not Path(args.sample_prompts).is_file():
        raise FlagError(f"--sample_prompts {args.sample_prompts}: no such file")


# kohya flags that have nothing to change here, with why; each is warned once at start when given
INERT_TRAINING_FLAGS = {
    "lowram": "models are read tensor by tensor, so system RAM never holds a second copy",
    "ddp_gradient_as_bucket_view": "the network is not wrapped in DistributedDataParallel (its gradients are "
                                   "averaged once per step by all_reduce_network)",
    "ddp_static_graph": "the network is not wrapped in DistributedDataParallel (its gradients are averaged once "
                        "per step by all_reduce_network)",
    "disable_mmap_load_safetensors": "model files are always read tensor by tensor (SDXL scripts' flag)",
}


def check_ema_flags(args: argparse.Namespace) -> None:
    """--ema_decay within (0, 1) with --use_ema; EMA settings without --use_ema are warned (they do nothing)."""
    if getattr(args, "use_ema", False):
        from library.train.ema import check_ema_decay

        check_ema_decay(args.ema_decay)
        return
    given = [flag for flag, on in (("--no_ema_warmup", getattr(args, "no_ema_warmup", False)),
                                   ("--ema_device", getattr(args, "ema_device", None))) if on]
    if given:
        logger.warning("%s ha%s no effect without --use_ema", ", ".join(given), "ve" if len(given) > 1 else "s")


def warn_inert_flags(args: argparse.Namespace) -> None:
    """One warning per kohya flag given that has no effect in this trainer (INERT_TRAINING_FLAGS)."""
    for flag, reason in INERT_TRAINING_FLAGS.items():
        if getattr(args, flag, False):
            logger.warning("--%s has no effect here: %s", flag, reason)


def run_logging_dir(args: argparse.Namespace) -> str | None:
    """kohya's folder of one run's logs: <--logging_dir>/<--log_prefix><YYYYmmddHHMMSS>; each tracker writes in
    a folder named --log_tracker_name (default network_train) inside it."""
    if not args.logging_dir:
        return None
    import time

    return os.path.join(args.logging_dir, (args.log_prefix or "") + time.strftime("%Y%m%d%H%M%S"))


def make_accelerator(args: argparse.Namespace):
    """accelerate's Accelerator for the flags: mixed precision, trackers, DDP timeout, DeepSpeed plugin."""
    from accelerate import Accelerator
    from accelerate.utils import InitProcessGroupKwargs

    from library.train.deepspeed_plugin import deepspeed_plugin

    handlers = []
    if args.ddp_timeout:
        handlers.append(InitProcessGroupKwargs(timeout=timedelta(minutes=args.ddp_timeout)))
    log_with = args.log_with or ("tensorboard" if args.logging_dir else None)
    if log_with in ("tensorboard", "all") and not args.logging_dir:
        raise FlagError(f"--log_with {log_with} needs --logging_dir (where TensorBoard writes)")
    if log_with == "wandb":
        import importlib.util

        if importlib.util.find_spec("wandb") is None:
            raise FlagError("--log_with wandb needs the wandb package: pip install wandb")
        if args.wandb_api_key:
            os.environ.setdefault("WANDB_API_KEY", args.wandb_api_key)  # wandb reads it at init
    plugin = deepspeed_plugin(args)
    _forget_previous_run_settings(args.mixed_precision)
    try:
        accelerator = Accelerator(mixed_precision=args.mixed_precision, log_with=log_with,
                                  project_dir=run_logging_dir(args), kwargs_handlers=handlers, deepspeed_plugin=plugin)
    except ValueError as error:
        raise FlagError(f"--mixed_precision {args.mixed_precision}: {error}") from error
    check_distributed_type(accelerator, deepspeed_wanted=plugin is not None)
    return accelerator


def check_distributed_type(accelerator, deepspeed_wanted: bool = False) -> None:
    """The run accelerate set up is the one the launch and the flags ask for; each mismatch below would
    otherwise train silently in another way than the user believes.

    - FSDP: it needs the trained model wrapped by accelerator.prepare; this trainer averages gradients itself
      (one collective per step), so an FSDP config would train unsharded copies: refused.
    - `--deepspeed` with accelerate running something else (e.g. ACCELERATE_USE_CPU, which drops the plugin).
    - N processes launched but accelerate made a one-process run in each (it does so where it finds no device
      for the requested backend, e.g. DeepSpeed or FSDP on a CPU-only machine): N copies would train the same
      batches and write the same files.
    """
    kind = str(getattr(accelerator, "distributed_type", ""))
    if kind.upper().endswith("FSDP"):
        raise FlagError("accelerate config: FSDP is not supported by this trainer yet (it would train an unsharded "
                        "copy on every GPU); use DeepSpeed ZeRO (--deepspeed --zero_stage 2) or plain multi-GPU")
    if deepspeed_wanted and not kind.upper().endswith("DEEPSPEED"):
        raise FlagError(f"--deepspeed: accelerate set up a {kind.rsplit('.', 1)[-1]} run instead of DeepSpeed (it "
                        "drops DeepSpeed when told to use the CPU, e.g. ACCELERATE_USE_CPU or --cpu); launch with "
                        "`accelerate launch` on a GPU machine, or leave --deepspeed out")
    launched = _launched_processes()
    if launched > 1 and getattr(accelerator, "num_processes", launched) == 1:
        raise FlagError(f"{launched} processes were launched (WORLD_SIZE={launched}) but accelerate set up a "
                        f"one-process {kind.rsplit('.', 1)[-1]} run in each, so every process would train on its "
                        "own; on a CPU-only machine launch with --multi_gpu and ACCELERATE_USE_CPU=true (DDP), "
                        "DeepSpeed and FSDP need GPUs")


def _launched_processes() -> int:
    """WORLD_SIZE as torchrun / accelerate launch set it (1 when not launched as several processes)."""
    try:
        return max(1, int(os.environ.get("WORLD_SIZE", "1")))
    except ValueError:
        return 1


def torch_compile_kwargs(args: argparse.Namespace) -> dict:
    """Keyword arguments of torch.compile for --dynamo_backend/_mode/_fullgraph/_dynamic (kohya's
    TorchDynamoPlugin fields); an unset switch leaves torch's own default."""
    kwargs: dict = {"backend": args.dynamo_backend}
    if getattr(args, "dynamo_mode", None):
        kwargs["mode"] = args.dynamo_mode
    if getattr(args, "dynamo_fullgraph", False):
        kwargs["fullgraph"] = True
    if getattr(args, "dynamo_dynamic", False):
        kwargs["dynamic"] = True
    return kwargs


def _forget_previous_run_settings(mixed_precision: str) -> None:
    """accelerate keeps one process-wide AcceleratorState; a second run in the same Python process (the demo,
    tests, notebooks) with another precision would be refused. Only that state is cleared; the distributed
    PartialState (process group) is kept. accelerate has no public call for this."""
    from accelerate.state import AcceleratorState

    state = AcceleratorState._shared_state
    if state and str(state.get("_mixed_precision", mixed_precision)) != mixed_precision:
        AcceleratorState._reset_state(reset_partial_state=False)


@dataclass(frozen=True)
class TrainingSchedule:
    """Batches and optimizer steps of a run, per process."""

    batches_per_epoch: int  # per process
    steps_per_epoch: int  # optimizer steps per epoch
    num_epochs: int
    max_train_steps: int
    accumulation: int


def training_schedule(args: argparse.Namespace, total_batches: int, num_processes: int) -> TrainingSchedule:
    """kohya's arithmetic: steps per epoch = ceil(batches per process / accumulation); epochs from steps or
    --max_train_epochs (which wins)."""
    batches = math.ceil(total_batches / num_processes)
    accumulation = args.gradient_accumulation_steps
    steps_per_epoch = math.ceil(batches / accumulation)
    if args.max_train_epochs:
        max_steps = args.max_train_epochs * steps_per_epoch
        logger.info("--max_train_epochs %d: %d steps", args.max_train_epochs, max_steps)
    else:
        max_steps = args.max_train_steps
    num_epochs = math.ceil(max_steps / steps_per_epoch)
    _resolve_save_n_epoch_ratio(args, num_epochs)
    return TrainingSchedule(batches, steps_per_epoch, num_epochs, max_steps, accumulation)


def initial_step(args: argparse.Namespace, schedule: TrainingSchedule) -> int | None:
    """The step --initial_step names, or the first step of --initial_epoch (kohya: --initial_step wins); None
    when neither is given.

    Raises:
        FlagError: the step is not before the last step of the run.
    """
    if args.initial_step is not None:
        step, flag = args.initial_step, f"--initial_step {args.initial_step}"
    elif args.initial_epoch is not None:
        step, flag = (args.initial_epoch - 1) * schedule.steps_per_epoch, f"--initial_epoch {args.initial_epoch}"
    else:
        return None
    if step > 0 and step >= schedule.max_train_steps:
        raise FlagError(f"{flag}: the run has only {schedule.max_train_steps} steps "
                        f"({schedule.steps_per_epoch} per epoch); expected a start before the last step")
    return step


def start_position(args: argparse.Namespace, schedule: TrainingSchedule, progress):
    """Where the loop starts with --initial_step / --initial_epoch, as kohya's train_network.py does:

    - with --skip_until_initial_step the run continues at that step, on the batches it would have seen there
      (the batches before it are skipped without being loaded); the step counter starts there too;
    - without it only the epoch number starts at the epoch that holds the step: the step counter starts at 0
      and the run ends after the last epoch, as in kohya.

    Either way the learning-rate schedule is the one --resume restored, or starts at 0. Returns `progress`
    unchanged when neither flag is given."""
    from library.train.checkpoints import TrainProgress

    step = initial_step(args, schedule)
    if step is None:
        return progress
    if args.resume:
        logger.warning("--%s given: the position saved in the --resume state (step %d) is not used",
                       "initial_step" if args.initial_step is not None else "initial_epoch", progress.global_step)
    elif step:
        logger.info("--initial_step/--initial_epoch without --resume: the learning-rate schedule starts at 0")
    if args.skip_until_initial_step:
        position = TrainProgress(0, 0, step).position_from_step(schedule.steps_per_epoch, schedule.accumulation)
        logger.info("skipping the first %d step(s): starting at epoch %d, step %d", step, position.epoch, step)
        return TrainProgress(position.epoch, position.batch_in_epoch, step, progress.session_id, progress.started_at)
    epoch = step // max(schedule.steps_per_epoch, 1) + 1
    if epoch > 1:
        logger.info("starting at epoch %d (numbering only: every batch of it trains, and the step count starts at 0;"
                    " --skip_until_initial_step continues at the step instead)", epoch)
    return TrainProgress(epoch, 0, 0, progress.session_id, progress.started_at)


def _resolve_save_n_epoch_ratio(args: argparse.Namespace, num_epochs: int) -> None:
    """--save_n_epoch_ratio becomes args.save_every_n_epochs once the epochs are known, as kohya's
    train_network.py does, so every later reader of the interval (saves, pruning) agrees."""
    from library.train.checkpoints import epoch_save_interval

    ratio = getattr(args, "save_n_epoch_ratio", None)
    if not ratio:
        return
    every = epoch_save_interval(args, num_epochs)
    if args.save_every_n_epochs and args.save_every_n_epochs != every:
        logger.warning("--save_n_epoch_ratio %d replaces --save_every_n_epochs %d", ratio, args.save_every_n_epochs)
    logger.info("--save_n_epoch_ratio %d: saving every %d epoch(s) of %d", ratio, every, num_epochs)
    args.save_every_n_epochs = every
