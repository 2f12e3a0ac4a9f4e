"""The epoch/step loop of network training: micro-batches, accumulation, optimizer steps, saves, samples,
validation and logging. What happens inside a batch and a log line are kohya's `NetworkTrainer` hooks
(library/train/step_hooks.py): the loop calls on_step_start, process_batch, on_validation_step_end and the
logging hooks.

Noise and timesteps of each sample come from a generator seeded by (seed, step, sample slot), where the slot
is the sample's place in the global batch (the loop tells the hooks through `trainer.noise_plan`). So a run gives
the same result on one process with gradient accumulation as on several processes, and a resumed run continues
exactly as an uninterrupted one.
"""
from __future__ import annotations

import contextlib
import logging
import math
import os
import time

import torch
from tqdm import tqdm

from library.errors import TrainingStopped
from library.train import checkpoints
from library.train.noise import VALIDATION_TIMESTEPS

logger = logging.getLogger(__name__)


class StepLogger:
    """Moving average of the loss for the progress bar; the log lines go through the trainer's logging hooks."""

    def __init__(self, trainer, run, trainable, window: int):
        self.trainer, self.run, self.trainable, self.window, self.losses = trainer, run, trainable, window, []

    def add(self, loss: float) -> float:
        self.losses = (self.losses + [loss])[-self.window:]
        return sum(self.losses) / len(self.losses)

    def log_step(self, loss: float, average: float, global_step: int, epoch: int, norms: dict | None = None) -> None:
        norms = norms or {}
        trainable = self.trainable
        logs = self.trainer.generate_step_logs(
            self.run.args, loss, average, trainable.lr_scheduler, trainable.group_names, trainable.optimizer,
            norms.get("max_norm/keys_scaled"), norms.get("max_norm/average_key_norm"),
            norms.get("max_norm/max_key_norm"))
        self.trainer.step_logging(self.run.accelerator, logs, global_step, epoch)


def run_training_loop(trainer, run, models, trainable) -> None:
    compute_threads = torch.get_num_threads()
    try:
        _run_training_loop(trainer, run, models, trainable)
    finally:
        # _leave_cores_for_workers lowered them for the loader; the caller's process (a notebook, tests) gets them back
        torch.set_num_threads(compute_threads)


def _run_training_loop(trainer, run, models, trainable) -> None:
    from library.data.order import EpochOrderSampler, epoch_data_loader

    args, accelerator, schedule, progress = run.args, run.accelerator, run.schedule, run.progress
    sampler = EpochOrderSampler(len(run.train_group), args.seed or 0, accelerator.process_index,
                                accelerator.num_processes)
    workers = max(0, min(args.max_data_loader_n_workers, os.cpu_count() or 1))  # kohya caps at the CPU count
    _leave_cores_for_workers(accelerator, workers)
    loader = epoch_data_loader(run.train_group, sampler, workers, args.persistent_data_loader_workers)
    _init_trackers(run)
    step_logger = StepLogger(trainer, run, trainable, window=max(schedule.steps_per_epoch, 1))
    bar = tqdm(total=schedule.max_train_steps, initial=progress.global_step, desc="steps", smoothing=0,
               disable=not accelerator.is_local_main_process)
    if accelerator.is_main_process:
        for line in run.train_group.summary_lines(schedule.batches_per_epoch * accelerator.num_processes):
            logger.info("%s", line)
        logger.info("training: %d epochs, %d steps (%d per epoch), batch accumulation %d, %d process(es)",
                    schedule.num_epochs, schedule.max_train_steps, schedule.steps_per_epoch, schedule.accumulation,
                    accelerator.num_processes)
    inner_optimizer = getattr(trainable.optimizer, "optimizer", trainable.optimizer)
    if callable(getattr(inner_optimizer, "train", None)):
        inner_optimizer.train()  # schedule-free optimizers start in train mode
    if args.sample_at_first and progress.global_step == 0:
        _sample(trainer, run, models, epoch=0, step=0)
    while progress.global_step < schedule.max_train_steps and progress.epoch <= schedule.num_epochs:
        run_epoch(trainer, run, models, trainable, loader, sampler, step_logger, bar)
    bar.close()


def _leave_cores_for_workers(accelerator, workers: int) -> None:
    """On CPU, torch's intra-op threads spin while waiting; sharing cores with loader workers then slows every
    small op many times over (measured: 12 s -> 98 s for 12 tiny steps on 2 cores). Keep them apart."""
    if accelerator.device.type != "cpu" or not workers:
        return
    threads = max(1, (os.cpu_count() or 1) - workers)
    accelerator.compute_threads = torch.get_num_threads()  # sampling (no loader running) gets them all back
    if torch.get_num_threads() > threads:
        logger.info("CPU training with %d loader workers: using %d compute thread(s)", workers, threads)
        torch.set_num_threads(threads)


def run_epoch(trainer, run, models, trainable, loader, sampler, step_logger, bar) -> None:
    schedule, progress = run.schedule, run.progress
    epoch = progress.epoch
    run.train_group.set_current_epoch(epoch)
    run.train_group.set_current_step(progress.global_step)
    sampler.set_epoch(epoch, progress.batch_in_epoch)
    _network_epoch_start(trainable, models)
    batches = schedule.batches_per_epoch
    window: list[dict] = []
    for batch in loader:
        window.append(batch)
        position = progress.batch_in_epoch + len(window)
        if len(window) < schedule.accumulation and position < batches:
            continue
        loss = optimizer_step(trainer, run, models, trainable, window)
        progress.batch_in_epoch = position
        progress.global_step += 1
        run.train_group.set_current_step(progress.global_step)  # token warmup (workers read it from shared memory)
        window = []
        trainer.loss_history.append(loss)
        average = step_logger.add(loss)
        bar.update(1)
        bar.set_postfix(avr_loss=f"{average:.4f}", epoch=epoch)
        step_logger.log_step(loss, average, progress.global_step, epoch, trainable.last_norm_logs)
        after_step(trainer, run, models, trainable)
        if progress.global_step >= schedule.max_train_steps:
            break
    finished_epoch = progress.batch_in_epoch >= batches
    if finished_epoch:
        progress.epoch, progress.batch_in_epoch = epoch + 1, 0
        after_epoch(trainer, run, models, trainable, epoch, step_logger)


def optimizer_step(trainer, run, models, trainable, window: list[dict]) -> float:
    """Forward/backward over the micro-batches of one step, then one optimizer step; returns the step's loss."""
    from library.train.step_hooks import NoisePlan

    args, accelerator, progress = run.args, run.accelerator, run.progress
    network = trainable.network
    total = torch.zeros((), device=accelerator.device)
    for micro, batch in enumerate(window):
        first_slot = (micro * accelerator.num_processes + accelerator.process_index) * len(batch["captions"])
        trainer.noise_plan = NoisePlan(seed=args.seed or 0, global_step=progress.global_step, first_slot=first_slot)
        loss = _micro_batch_loss(trainer, run, models, trainable, batch, is_train=True)
        accelerator.backward(loss / len(window))
        total += loss.detach() / len(window)
    if accelerator.num_processes > 1:
        total = accelerator.reduce(total, reduction="mean")
    # one host sync per step (the GPU runs ahead until here); a bad loss stops before the update is applied
    if not torch.isfinite(total):
        trainable.optimizer.zero_grad(set_to_none=True)
        _stop_on_bad_loss(run, float(total), fused=_steps_in_backward(trainable.optimizer))
    trainer.all_reduce_network(accelerator, network)
    if args.max_grad_norm and not _steps_in_backward(trainable.optimizer):
        accelerator.clip_grad_norm_(network.get_trainable_params(), args.max_grad_norm)
    trainable.optimizer.step()
    trainable.lr_scheduler.step()
    trainable.optimizer.zero_grad(set_to_none=True)
    if trainable.ema is not None:
        trainable.ema.update(progress.global_step + 1)  # the step just taken (the loop counts it after this)
    trainable.last_norm_logs = _max_norm_regularization(run, trainable)
    return float(total)


def _steps_in_backward(optimizer) -> bool:
    """--fused_backward_pass / --fused_optimizer_groups: the weights were updated (and each tensor's gradient
    clipped and freed) inside backward; step() only finishes what is left."""
    from library.train.fused_backward import FusedOptimizer

    return isinstance(getattr(optimizer, "optimizer", optimizer), FusedOptimizer)


def _micro_batch_loss(trainer, run, models, trainable, batch: dict, is_train: bool) -> torch.Tensor:
    """kohya's per-batch sequence: the network's and the trainer's on_step_start, then process_batch."""
    from library.options.training import vae_dtype

    args, accelerator, network = run.args, run.accelerator, trainable.network
    _apply_dataset_multiplier(run, network, batch)
    if hasattr(network, "on_step_start"):
        network.on_step_start(_encoder_arg(models), models.unet)
    unet = models.unet_for_training()
    trainer.on_step_start(args, accelerator, network, models.text_encoders, unet, batch, run.weight_dtype,
                          is_train=is_train)
    return trainer.process_batch(
        batch, models.text_encoders, unet, network, models.vae, models.noise_scheduler,
        vae_dtype(args.mixed_precision, args.no_half_vae), run.weight_dtype, accelerator, args,
        models.text_encoding_strategy, models.tokenize_strategy, is_train=is_train,
        train_text_encoder=trainable.train_text_encoder, train_unet=trainable.train_unet)


def _apply_dataset_multiplier(run, network, batch: dict) -> None:
    """The dataset key network_multiplier scales --network_multiplier for that dataset's batches (a batch holds
    one dataset's samples). set_multiplier is only called when the value changes."""
    multipliers = batch.get("network_multipliers")
    if multipliers is None or not hasattr(network, "set_multiplier"):
        return
    value = float(run.args.network_multiplier) * float(multipliers[0])
    if getattr(network, "_dataset_multiplier", None) != value:
        network.set_multiplier(value)
        network._dataset_multiplier = value


def _encoder_arg(models):
    return models.text_encoders[0] if len(models.text_encoders) == 1 else models.text_encoders


def _network_epoch_start(trainable, models) -> None:
    trainable.network.on_epoch_start(_encoder_arg(models), models.unet)


def _max_norm_regularization(run, trainable) -> dict:
    if run.args.scale_weight_norms is None:
        return {}
    from library.train.network_module import max_norm_supported

    if not max_norm_supported(trainable.network):
        return {}
    keys_scaled, mean_norm, maximum = trainable.network.apply_max_norm_regularization(run.args.scale_weight_norms,
                                                                                       run.accelerator.device)
    return {"max_norm/keys_scaled": keys_scaled, "max_norm/average_key_norm": mean_norm,
            "max_norm/max_key_norm": maximum}


def _stop_on_bad_loss(run, value: float, fused: bool = False) -> None:
    last = "the last save in " + str(run.args.output_dir) if run.args.output_dir else "no file"
    applied = "its update was already applied inside backward (fused), nothing more is saved" if fused else \
        "the weights of this step were not applied"
    raise TrainingStopped(f"loss became {value} at step {run.progress.global_step + 1} (epoch {run.progress.epoch}); "
                          f"training stopped and {applied} ({last} is intact). "
                          "Try a lower --learning_rate, --no_half_vae, or --mixed_precision bf16 instead of fp16")


def after_step(trainer, run, models, trainable) -> None:
    """Step-level saves, samples and validation."""
    args, progress = run.args, run.progress
    if checkpoints.step_save_due(args, progress.global_step):
        save_progress(trainer, run, trainable, run.names.step_file(progress.global_step),
                      run.names.step_state(progress.global_step))
        if run.accelerator.is_main_process:
            checkpoints.prune_step_saves(run.names, args, progress.global_step)
    if _sampling_due(run, epoch=None):
        _sample(trainer, run, models, epoch=None, step=progress.global_step)
    if run.val_group is not None and args.validate_every_n_steps and \
            progress.global_step % args.validate_every_n_steps == 0:
        with optimizer_eval_mode(trainable.optimizer):
            validate(trainer, run, models, trainable, "step")


def after_epoch(trainer, run, models, trainable, epoch: int, step_logger) -> None:
    args, schedule = run.args, run.schedule
    trainer.epoch_logging(run.accelerator, {"loss/epoch_average": sum(step_logger.losses) /
                                            max(len(step_logger.losses), 1)}, run.progress.global_step, epoch)
    if checkpoints.epoch_save_due(args, epoch, schedule.num_epochs):
        save_progress(trainer, run, trainable, run.names.epoch_file(epoch), run.names.epoch_state(epoch), epoch)
        if run.accelerator.is_main_process:
            checkpoints.prune_epoch_saves(run.names, args, epoch)
    if _sampling_due(run, epoch=epoch):
        _sample(trainer, run, models, epoch=epoch, step=run.progress.global_step)
    every = args.validate_every_n_epochs or (None if args.validate_every_n_steps else 1)
    if run.val_group is not None and every and epoch % every == 0:
        with optimizer_eval_mode(trainable.optimizer):
            validate(trainer, run, models, trainable, "epoch")


def save_progress(trainer, run, trainable, file, state_folder, epoch: int | None = None) -> None:
    run.accelerator.wait_for_everyone()
    from library.train import hub

    with optimizer_eval_mode(trainable.optimizer), trainable.ema_weights():
        trainer.save_network_file(run, trainable, file, epoch if epoch is not None else run.progress.epoch)
    if run.accelerator.is_main_process:
        hub.upload_saved(run.args, file)
    if run.args.save_state:
        trainer.save_state(run, trainable, state_folder)  # the optimizer's own (train-mode) state
        if run.accelerator.is_main_process:
            hub.upload_saved(run.args, state_folder)


def _sampling_due(run, epoch: int | None) -> bool:
    if not run.sample_prompts:
        return False
    from library.train.sample_during_training import should_sample

    return should_sample(run.args, epoch=epoch, global_step=run.progress.global_step)


def _sample(trainer, run, models, epoch, step) -> None:
    network = trainer._trainable.network
    if getattr(network, "_dataset_multiplier", None) not in (None, float(run.args.network_multiplier)):
        network.set_multiplier(float(run.args.network_multiplier))  # samples show the network at --network_multiplier
        network._dataset_multiplier = float(run.args.network_multiplier)
    threads = torch.get_num_threads()
    torch.set_num_threads(getattr(run.accelerator, "compute_threads", threads))
    try:
        with optimizer_eval_mode(trainer._trainable.optimizer), trainer._trainable.ema_weights():
            trainer.sample_images(run.accelerator, run.args, epoch, step, run.accelerator.device, models.vae,
                                  models.tokenizers, _encoder_arg(models), models.unet)
    finally:
        torch.set_num_threads(threads)


@contextlib.contextmanager
def optimizer_eval_mode(optimizer):
    """Schedule-free optimizers (optimizer.eval()/train()) hold the weights to evaluate only in eval mode:
    sampling, validation and saving happen there, as in kohya. Other optimizers have no such methods."""
    inner = getattr(optimizer, "optimizer", optimizer)  # accelerate's wrapper
    switch = callable(getattr(inner, "eval", None)) and callable(getattr(inner, "train", None))
    if switch:
        inner.eval()
    try:
        yield
    finally:
        if switch:
            inner.train()


@torch.no_grad()
def validate(trainer, run, models, trainable, when: str) -> float:
    """Mean loss over the validation set at fixed timesteps and fixed noise (comparable across steps)."""
    from library.data.order import EpochOrderSampler, epoch_data_loader
    from library.options.training import vae_dtype
    from library.train.step_hooks import NoisePlan

    args, accelerator = run.args, run.accelerator
    sampler = EpochOrderSampler(len(run.val_group), args.validation_seed or args.seed or 0,
                                accelerator.process_index, accelerator.num_processes, shuffle=False)
    run.val_group.set_current_epoch(1)
    trainable.network.eval()
    losses = []
    started = time.time()
    for index, batch in enumerate(epoch_data_loader(run.val_group, sampler, 0, False)):
        if args.max_validation_steps and index >= args.max_validation_steps:
            break
        if batch.get("latents") is None:  # encode once for all the timesteps (cached latents need nothing)
            images = batch["images"].to(accelerator.device, dtype=vae_dtype(args.mixed_precision, args.no_half_vae))
            batch = {**batch, "latents": trainer.encode_images_to_latents(args, models.vae, images)}
        for timestep in VALIDATION_TIMESTEPS:
            trainer.noise_plan = NoisePlan(seed=args.seed or 0, validation_timestep=timestep,
                                           validation_seed=(args.validation_seed or 0) + index)
            losses.append(float(_micro_batch_loss(trainer, run, models, trainable, batch, is_train=False)))
        trainer.on_validation_step_end(args, accelerator, trainable.network, models.text_encoders,
                                       models.unet_for_training(), batch, run.weight_dtype)
    trainable.network.train()
    local = torch.tensor([sum(losses), len(losses)], dtype=torch.float64, device=accelerator.device)
    total = accelerator.reduce(local, reduction="sum") if accelerator.num_processes > 1 else local
    value = float(total[0] / max(float(total[1]), 1.0))
    trainer.validation_history.append(value)
    # kohya's keys; divergence: validation minus the training loss' moving average (over one epoch of steps)
    recent = trainer.loss_history[-max(run.schedule.steps_per_epoch, 1):]
    epoch = run.progress.epoch - 1 if when == "epoch" else run.progress.epoch  # the epoch just finished / running
    if math.isfinite(value):
        logs = {f"loss/validation/{when}_average": value}
        if recent:
            logs[f"loss/validation/{when}_divergence"] = value - sum(recent) / len(recent)
        trainer.val_logging(accelerator, logs, run.progress.global_step, epoch)
    if accelerator.is_main_process:
        logger.info("validation loss (%s %d): %.5f over %d batches x %d timesteps (%.1f s)", when,
                    run.progress.global_step if when == "step" else epoch, value,
                    len(losses) // max(len(VALIDATION_TIMESTEPS), 1), len(VALIDATION_TIMESTEPS), time.time() - started)
    return value


def _init_trackers(run) -> None:
    args, accelerator = run.args, run.accelerator
    if not accelerator.log_with:
        return
    import toml

    init_kwargs = toml.load(args.log_tracker_config) if args.log_tracker_config else {}
    if args.wandb_run_name:
        init_kwargs.setdefault("wandb", {})["name"] = args.wandb_run_name
    # kohya's layout: <logging_dir>/<log_prefix><time>/<tracker name> (run_setup.run_logging_dir)
    name = args.log_tracker_name or "network_train"
    accelerator.init_trackers(name,
                              config=_tracker_config(args) if args.log_config else None, init_kwargs=init_kwargs)


def _tracker_config(args) -> dict:
    hidden = {"wandb_api_key"}
    return {key: (value if isinstance(value, (int, float, str, bool)) else str(value))
            for key, value in vars(args).items() if key not in hidden and value is not None}
