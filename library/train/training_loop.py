"""The epoch/step loop of network training: micro-batches, accumulation, optimizer steps, saves, samples,
validation and logging. The model-specific parts are `NetworkTrainer` hooks.

Noise and timesteps of each sample come from a generator seeded by (seed, step, sample slot), where the slot
is the sample's place in the global batch. So a run gives the same result on one process with gradient
accumulation as on several processes, and a resumed run continues exactly as an uninterrupted one.
"""
from __future__ import annotations

import logging
import math
import os
import time

import torch
from tqdm import tqdm

from library.errors import TrainingStopped
from library.train import checkpoints
from library.train.loss import training_loss
from library.train.noise import VALIDATION_TIMESTEPS, NoisyBatch, prepare_noisy_latents, \
    prepare_validation_noisy_latents

logger = logging.getLogger(__name__)


def noise_generator(seed: int, global_step: int, slot: int, stream: int = 0) -> torch.Generator:
    """Generator of one sample of one step; `stream` separates the VAE draw (1) from the diffusion noise (0)."""
    return torch.Generator().manual_seed(((seed * 1_000_003 + global_step) * 10_007 + slot) * 2 + stream)


def noisy_batch(run, models, latents: torch.Tensor, global_step: int, first_slot: int) -> NoisyBatch:
    """Per-sample noise, timesteps and targets, each sample from its own seeded generator."""
    from library.options.noise_loss import noise_settings_from_args

    settings = noise_settings_from_args(run.args)
    seed = run.args.seed or 0
    parts = [prepare_noisy_latents(settings, models.noise_scheduler, latents[index:index + 1],
                                   noise_generator(seed, global_step, first_slot + index))
             for index in range(latents.shape[0])]
    return NoisyBatch(*(torch.cat(tensors) for tensors in zip(*parts)))


def batch_latents(trainer, run, models, batch: dict, first_slot: int | None = None) -> torch.Tensor:
    """Scaled latents of a batch: cached, or encoded now (per-sample VAE draws when `first_slot` is given)."""
    device, dtype = run.accelerator.device, run.weight_dtype
    if batch.get("latents") is not None:
        latents = batch["latents"].to(device)
    else:
        images = batch["images"].to(device)
        generators = None
        if first_slot is not None:
            generators = [noise_generator(run.args.seed or 0, run.progress.global_step, first_slot + index, stream=1)
                          for index in range(images.shape[0])]
        latents = trainer.encode_images_to_latents(run.args, models.vae, images, generators)
        if not torch.isfinite(latents).all():
            raise TrainingStopped(f"the VAE produced NaN/inf latents for {batch.get('image_keys')}; "
                                  "try --no_half_vae")
    return trainer.shift_scale_latents(run.args, latents.float()).to(dtype)


def batch_loss(trainer, run, models, trainable, batch: dict, noisy: NoisyBatch) -> torch.Tensor:
    """Loss of one micro-batch given its noisy latents (training and validation share this)."""
    from library.options.noise_loss import loss_settings_from_args

    args, accelerator = run.args, run.accelerator
    text_conds = trainer.get_text_cond(args, accelerator, batch, models.tokenizers, models.text_encoders,
                                       run.weight_dtype)
    with accelerator.autocast():
        prediction = trainer.call_unet(args, accelerator, models.unet, noisy.noisy_latents, noisy.timesteps,
                                       text_conds, batch, run.weight_dtype)
    masks = batch.get("alpha_masks")
    if masks is None and args.masked_loss and batch.get("conditioning_images") is not None:
        from library.train.loss import mask_from_conditioning_images

        masks = mask_from_conditioning_images(batch["conditioning_images"])
    return training_loss(loss_settings_from_args(args), prediction, noisy.target, noisy.timesteps,
                         models.noise_scheduler, batch["loss_weights"].to(accelerator.device),
                         None if masks is None else masks.to(accelerator.device))


class StepLogger:
    """Moving average of the loss for the progress bar, and tracker logging."""

    def __init__(self, run, trainable, window: int):
        self.run, self.trainable, self.window, self.losses = run, trainable, window, []

    def add(self, loss: float) -> float:
        self.losses = (self.losses + [loss])[-self.window:]
        return sum(self.losses) / len(self.losses)

    def log_step(self, loss: float, average: float, global_step: int, extra: dict | None = None) -> None:
        values = {"loss/current": loss, "loss/average": average, **(extra or {})}
        scheduler = self.trainable.lr_scheduler
        for index, lr in enumerate(scheduler.get_last_lr()):
            name = self.trainable.group_names[index] if index < len(self.trainable.group_names) else f"group{index}"
            values[f"lr/{name}"] = float(lr)
        self.run.accelerator.log(values, step=global_step)


def run_training_loop(trainer, run, models, trainable) -> None:
    from library.data.order import EpochOrderSampler, epoch_data_loader

    args, accelerator, schedule, progress = run.args, run.accelerator, run.schedule, run.progress
    sampler = EpochOrderSampler(len(run.train_group), args.seed or 0, accelerator.process_index,
                                accelerator.num_processes)
    workers = max(0, min(args.max_data_loader_n_workers, os.cpu_count() or 1))  # kohya caps at the CPU count
    _leave_cores_for_workers(accelerator, workers)
    loader = epoch_data_loader(run.train_group, sampler, workers, args.persistent_data_loader_workers)
    _init_trackers(run)
    step_logger = StepLogger(run, trainable, window=max(schedule.steps_per_epoch, 1))
    bar = tqdm(total=schedule.max_train_steps, initial=progress.global_step, desc="steps", smoothing=0,
               disable=not accelerator.is_local_main_process)
    if accelerator.is_main_process:
        for line in run.train_group.summary_lines(schedule.batches_per_epoch * accelerator.num_processes):
            logger.info("%s", line)
        logger.info("training: %d epochs, %d steps (%d per epoch), batch accumulation %d, %d process(es)",
                    schedule.num_epochs, schedule.max_train_steps, schedule.steps_per_epoch, schedule.accumulation,
                    accelerator.num_processes)
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
        step_logger.log_step(loss, average, progress.global_step, trainable.last_norm_logs)
        after_step(trainer, run, models, trainable)
        if progress.global_step >= schedule.max_train_steps:
            break
    finished_epoch = progress.batch_in_epoch >= batches
    if finished_epoch:
        progress.epoch, progress.batch_in_epoch = epoch + 1, 0
        after_epoch(trainer, run, models, trainable, epoch, step_logger)


def optimizer_step(trainer, run, models, trainable, window: list[dict]) -> float:
    """Forward/backward over the micro-batches of one step, then one optimizer step; returns the step's loss."""
    args, accelerator, progress = run.args, run.accelerator, run.progress
    network = trainable.network
    total = torch.zeros((), device=accelerator.device)
    for micro, batch in enumerate(window):
        first_slot = (micro * accelerator.num_processes + accelerator.process_index) * len(batch["captions"])
        latents = batch_latents(trainer, run, models, batch, first_slot)
        noisy = noisy_batch(run, models, latents, progress.global_step, first_slot)
        if hasattr(network, "on_step_start"):
            network.on_step_start(_encoder_arg(models), models.unet)
        loss = batch_loss(trainer, run, models, trainable, batch, noisy)
        accelerator.backward(loss / len(window))
        total += loss.detach() / len(window)
    if accelerator.num_processes > 1:
        total = accelerator.reduce(total, reduction="mean")
    # one host sync per step (the GPU runs ahead until here); a bad loss stops before the update is applied
    if not torch.isfinite(total):
        trainable.optimizer.zero_grad(set_to_none=True)
        _stop_on_bad_loss(run, float(total))
    trainer.all_reduce_network(accelerator, network)
    if args.max_grad_norm:
        accelerator.clip_grad_norm_(network.get_trainable_params(), args.max_grad_norm)
    trainable.optimizer.step()
    trainable.lr_scheduler.step()
    trainable.optimizer.zero_grad(set_to_none=True)
    trainable.last_norm_logs = _max_norm_regularization(run, trainable)
    return float(total)


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


def _stop_on_bad_loss(run, value: float) -> None:
    last = "the last save in " + str(run.args.output_dir) if run.args.output_dir else "no file"
    raise TrainingStopped(f"loss became {value} at step {run.progress.global_step + 1} (epoch {run.progress.epoch}); "
                          f"training stopped and the weights of this step were not applied ({last} is intact). "
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
        validate(trainer, run, models, trainable, "step")


def after_epoch(trainer, run, models, trainable, epoch: int, step_logger) -> None:
    args, schedule = run.args, run.schedule
    run.accelerator.log({"loss/epoch_average": sum(step_logger.losses) / max(len(step_logger.losses), 1)},
                        step=epoch)
    if checkpoints.epoch_save_due(args, epoch, schedule.num_epochs):
        save_progress(trainer, run, trainable, run.names.epoch_file(epoch), run.names.epoch_state(epoch), epoch)
        if run.accelerator.is_main_process:
            checkpoints.prune_epoch_saves(run.names, args, epoch)
    if _sampling_due(run, epoch=epoch):
        _sample(trainer, run, models, epoch=epoch, step=run.progress.global_step)
    every = args.validate_every_n_epochs or (None if args.validate_every_n_steps else 1)
    if run.val_group is not None and every and epoch % every == 0:
        validate(trainer, run, models, trainable, "epoch")


def save_progress(trainer, run, trainable, file, state_folder, epoch: int | None = None) -> None:
    run.accelerator.wait_for_everyone()
    trainer.save_network_file(run, trainable, file, epoch if epoch is not None else run.progress.epoch)
    if run.args.save_state:
        trainer.save_state(run, trainable, state_folder)


def _sampling_due(run, epoch: int | None) -> bool:
    if not run.sample_prompts:
        return False
    from library.train.sample_during_training import should_sample

    return should_sample(run.args, epoch=epoch, global_step=run.progress.global_step)


def _sample(trainer, run, models, epoch, step) -> None:
    trainer.sample_images(run.accelerator, run.args, epoch, step, run.accelerator.device, models.vae,
                          models.tokenizers, _encoder_arg(models), models.unet)


@torch.no_grad()
def validate(trainer, run, models, trainable, when: str) -> float:
    """Mean loss over the validation set at fixed timesteps and fixed noise (comparable across steps)."""
    from library.data.order import EpochOrderSampler, epoch_data_loader
    from library.options.noise_loss import noise_settings_from_args

    args, accelerator = run.args, run.accelerator
    settings = noise_settings_from_args(args)
    sampler = EpochOrderSampler(len(run.val_group), args.validation_seed or args.seed or 0,
                                accelerator.process_index, accelerator.num_processes, shuffle=False)
    run.val_group.set_current_epoch(1)
    trainable.network.eval()
    losses = []
    started = time.time()
    for index, batch in enumerate(epoch_data_loader(run.val_group, sampler, 0, False)):
        if args.max_validation_steps and index >= args.max_validation_steps:
            break
        latents = batch_latents(trainer, run, models, batch)
        for timestep in VALIDATION_TIMESTEPS:
            noisy = prepare_validation_noisy_latents(settings, models.noise_scheduler, latents, timestep,
                                                     seed=(args.validation_seed or 0) + index)
            losses.append(float(batch_loss(trainer, run, models, trainable, batch, noisy)))
    trainable.network.train()
    local = torch.tensor([sum(losses), len(losses)], dtype=torch.float64, device=accelerator.device)
    total = accelerator.reduce(local, reduction="sum") if accelerator.num_processes > 1 else local
    value = float(total[0] / max(float(total[1]), 1.0))
    trainer.validation_history.append(value)
    if math.isfinite(value):
        accelerator.log({f"loss/validation/{when}_average": value}, step=run.progress.global_step)
    if accelerator.is_main_process:
        logger.info("validation loss (%s %d): %.5f over %d batches x %d timesteps (%.1f s)", when,
                    run.progress.global_step if when == "step" else run.progress.epoch - 1, value,
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
    name = args.log_tracker_name or "network_train"
    run_name = (args.log_prefix or "") + time.strftime("%Y%m%d%H%M%S")
    if args.logging_dir:
        init_kwargs.setdefault("tensorboard", {})
    accelerator.init_trackers(name if not args.logging_dir else run_name,
                              config=_tracker_config(args) if args.log_config else None, init_kwargs=init_kwargs)


def _tracker_config(args) -> dict:
    hidden = {"wandb_api_key"}
    return {key: (value if isinstance(value, (int, float, str, bool)) else str(value))
            for key, value in vars(args).items() if key not in hidden and value is not None}
