"""The per-batch and logging hooks of kohya's `NetworkTrainer` (COMPAT §15), with kohya's names, arguments and
return values, so a subclass written for kohya (one that changes the target in `get_noise_pred_and_target`,
reweights in `post_process_loss`, adds log keys in `generate_step_logs`, ...) works unchanged. The loop
(library/train/training_loop.py) only calls these.

Our one addition is the noise plan: noise, timesteps and VAE draws of each sample come from a generator seeded by
(seed, step, place in the global batch), or fixed timesteps/noise for validation. kohya's hook arguments carry
no step, so the loop sets `self.noise_plan` before each `process_batch`.
"""
from __future__ import annotations

import inspect
from dataclasses import dataclass

import torch

from library.errors import TrainingStopped
from library.text.encode import TextConds, as_text_conds
from library.train.noise import NoisyBatch, prepare_noisy_latents, prepare_validation_noisy_latents


def noise_generator(seed: int, global_step: int, slot: int, stream: int = 0) -> torch.Generator:
    """Generator of one sample of one step; `stream` separates the VAE draw (1) from the diffusion noise (0)."""
    return torch.Generator().manual_seed(((seed * 1_000_003 + global_step) * 10_007 + slot) * 2 + stream)


@dataclass(frozen=True)
class NoisePlan:
    """Where the next batch's random draws come from: a training step and the batch's first slot in the global
    batch, or (validation) one fixed timestep with fixed noise."""

    seed: int = 0
    global_step: int = 0
    first_slot: int = 0
    validation_timestep: int | None = None
    validation_seed: int = 0


def _own_strategies(text_encoding_strategy, tokenize_strategy) -> bool:
    """Did the trainer supply its own text encoding or tokenize strategy (not our stand-ins)?"""
    from library.train import strategies

    if text_encoding_strategy is None or tokenize_strategy is None:
        return False
    return (type(text_encoding_strategy) is not strategies.TextEncodingStrategy
            or type(tokenize_strategy) is not strategies.TokenizeStrategy)


def _accepts(method, name: str) -> bool:
    """Does an (overridable) hook take the keyword `name`? kohya's signatures lack our extra arguments."""
    try:
        return name in inspect.signature(method).parameters
    except (TypeError, ValueError):
        return False


class StepHooks:
    """Defaults of the hooks the loop calls for every batch and log line; NetworkTrainer inherits them."""

    noise_plan: NoisePlan = NoisePlan()

    # ------------------------------------------------------------------------------------------ per batch

    def on_step_start(self, args, accelerator, network, text_encoders, unet, batch, weight_dtype,
                      is_train: bool = True) -> None:
        """Before each micro-batch (training and validation); kohya's default does nothing."""

    def on_validation_step_end(self, args, accelerator, network, text_encoders, unet, batch, weight_dtype) -> None:
        """After each validation micro-batch; kohya's default does nothing."""

    def get_models_for_text_encoding(self, args, accelerator, text_encoders) -> list:
        """The encoders that turn this batch's captions into conditioning (kohya's SDXL appends TE2 unwrapped)."""
        return list(text_encoders)

    def process_batch(self, batch, text_encoders, unet, network, vae, noise_scheduler, vae_dtype, weight_dtype,
                      accelerator, args, text_encoding_strategy=None, tokenize_strategy=None, is_train: bool = True,
                      train_text_encoder: bool = True, train_unet: bool = True) -> torch.Tensor:
        """The loss of one micro-batch: latents, text conditioning, noise and prediction, loss, weighting."""
        with torch.no_grad():
            latents = self._batch_latents(args, accelerator, vae, batch, weight_dtype, vae_dtype)
        text_conds = self._batch_text_conds(args, accelerator, batch, text_encoders, weight_dtype,
                                            is_train and train_text_encoder, text_encoding_strategy,
                                            tokenize_strategy)
        prediction, target, timesteps, weighting = self.get_noise_pred_and_target(
            args, accelerator, noise_scheduler, latents, batch, text_conds, unet, network, weight_dtype, train_unet,
            is_train=is_train)
        loss = self._per_sample_loss(args, accelerator, noise_scheduler, batch, prediction, target, timesteps,
                                     weighting)
        return self.post_process_loss(loss, args, timesteps, noise_scheduler).mean()

    def get_noise_pred_and_target(self, args, accelerator, noise_scheduler, latents, batch, text_encoder_conds,
                                  unet, network, weight_dtype, train_unet, is_train: bool = True):
        """(prediction, target, timesteps, weighting or None) for one micro-batch, as kohya's hook returns them."""
        noisy = self._noisy_batch(args, noise_scheduler, latents)
        with torch.set_grad_enabled(is_train), accelerator.autocast():
            prediction = self.call_unet(args, accelerator, unet, noisy.noisy_latents, noisy.timesteps,
                                        text_encoder_conds, batch, weight_dtype)
        return prediction, noisy.target, noisy.timesteps, None

    def post_process_loss(self, loss: torch.Tensor, args, timesteps: torch.Tensor, noise_scheduler) -> torch.Tensor:
        """Per-sample weightings after the mean: Min-SNR, v-prediction scaling, v-pred-like loss, debiased."""
        from library.options.noise_loss import loss_settings_from_args
        from library.train.loss import weight_per_sample_loss

        return weight_per_sample_loss(loss_settings_from_args(args), loss, timesteps, noise_scheduler)

    # ------------------------------------------------------------------------------------------ logging

    def generate_step_logs(self, args, current_loss, avr_loss, lr_scheduler, lr_descriptions, optimizer=None,
                           keys_scaled=None, mean_norm=None, maximum_norm=None, mean_grad_norm=None,
                           mean_combined_norm=None) -> dict:
        """kohya's step log keys: loss/current, loss/average, lr/<group> (and lr/d*lr/<group> for D-Adaptation
        and Prodigy), max_norm/* with --scale_weight_norms."""
        logs = {"loss/current": current_loss, "loss/average": avr_loss}
        if keys_scaled is not None:
            logs.update({"max_norm/keys_scaled": keys_scaled, "max_norm/average_key_norm": mean_norm,
                         "max_norm/max_key_norm": maximum_norm})
        for index, lr in enumerate(lr_scheduler.get_last_lr()):
            name = lr_descriptions[index] if lr_descriptions and index < len(lr_descriptions) else f"group{index}"
            logs[f"lr/{name}"] = float(lr)
            group = optimizer.param_groups[index] if optimizer is not None else {}
            if "d" in group:  # D-Adaptation / Prodigy: the effective rate is d * lr
                logs[f"lr/d*lr/{name}"] = float(group["d"]) * float(group["lr"])
        return logs

    def step_logging(self, accelerator, logs: dict, global_step: int, epoch: int) -> None:
        self.accelerator_logging(accelerator, logs, global_step, global_step, epoch)

    def epoch_logging(self, accelerator, logs: dict, global_step: int, epoch: int) -> None:
        self.accelerator_logging(accelerator, logs, epoch, global_step, epoch)

    def val_logging(self, accelerator, logs: dict, global_step: int, epoch: int, val_step: int | None = None) -> None:
        self.accelerator_logging(accelerator, logs, global_step + (val_step or 0), global_step, epoch, val_step)

    def accelerator_logging(self, accelerator, logs: dict, step_value: int, global_step: int, epoch: int,
                            val_step: int | None = None) -> None:
        """Where every log line goes: accelerate's trackers at `step_value` (kohya's arguments: the step for step
        and validation lines, the epoch for epoch lines; global_step, epoch and val_step say where the run is)."""
        accelerator.log(logs, step=step_value)

    # ------------------------------------------------------------------------------------------ internals

    def _batch_latents(self, args, accelerator, vae, batch: dict, weight_dtype, vae_dtype=None) -> torch.Tensor:
        """Scaled latents: cached, or encoded now (per-sample VAE draws during training). The images reach
        encode_images_to_latents in the VAE's dtype, as in kohya (an override may call vae.encode(images))."""
        if batch.get("latents") is not None:
            latents = batch["latents"].to(accelerator.device)
        else:
            images = batch["images"].to(accelerator.device, dtype=vae_dtype)
            plan = self.noise_plan
            if plan.validation_timestep is None and _accepts(self.encode_images_to_latents, "generators"):
                generators = [noise_generator(plan.seed, plan.global_step, plan.first_slot + index, stream=1)
                              for index in range(images.shape[0])]
                latents = self.encode_images_to_latents(args, vae, images, generators=generators)
            else:
                latents = self.encode_images_to_latents(args, vae, images)
            if not torch.isfinite(latents).all():
                raise TrainingStopped(f"the VAE produced NaN/inf latents for {batch.get('image_keys')}; "
                                      "try --no_half_vae")
        return self.shift_scale_latents(args, latents.float()).to(weight_dtype)

    def _batch_text_conds(self, args, accelerator, batch: dict, text_encoders, weight_dtype, with_grad: bool,
                          text_encoding_strategy=None, tokenize_strategy=None) -> TextConds:
        if batch.get("text_encoder_outputs") is not None:
            from library.text.conditioning import CaptionEncoder

            return CaptionEncoder.join_cached(batch["text_encoder_outputs"], accelerator.device, weight_dtype)
        models = self.get_models_for_text_encoding(args, accelerator, text_encoders)
        with torch.set_grad_enabled(with_grad):
            if _own_strategies(text_encoding_strategy, tokenize_strategy):
                # kohya v0.10: strategies a subclass returned from get_text_encoding_strategy /
                # get_tokenize_strategy encode the captions (its get_text_cond is never called then)
                with accelerator.autocast():
                    if args.weighted_captions:
                        tokens, weights = tokenize_strategy.tokenize_with_weights(batch["captions"])
                        conds = text_encoding_strategy.encode_tokens_with_weights(tokenize_strategy, models, tokens,
                                                                                  weights)
                    else:
                        conds = text_encoding_strategy.encode_tokens(tokenize_strategy, models,
                                                                     tokenize_strategy.tokenize(batch["captions"]))
            else:
                conds = self.get_text_cond(args, accelerator, batch, self._models.tokenizers, models, weight_dtype)
        return as_text_conds(conds)

    def _noisy_batch(self, args, noise_scheduler, latents: torch.Tensor) -> NoisyBatch:
        from library.options.noise_loss import noise_settings_from_args

        settings = noise_settings_from_args(args)
        plan = self.noise_plan
        if plan.validation_timestep is not None:
            return prepare_validation_noisy_latents(settings, noise_scheduler, latents, plan.validation_timestep,
                                                    seed=plan.validation_seed)
        parts = [prepare_noisy_latents(settings, noise_scheduler, latents[index:index + 1],
                                       noise_generator(plan.seed, plan.global_step, plan.first_slot + index))
                 for index in range(latents.shape[0])]
        return NoisyBatch(*(torch.cat(tensors) for tensors in zip(*parts)))

    def _per_sample_loss(self, args, accelerator, noise_scheduler, batch: dict, prediction, target, timesteps,
                         weighting) -> torch.Tensor:
        from library.options.noise_loss import loss_settings_from_args
        from library.train.loss import per_sample_loss

        masks = batch.get("alpha_masks")
        if masks is None and args.masked_loss and batch.get("conditioning_images") is not None:
            from library.train.loss import mask_from_conditioning_images

            masks = mask_from_conditioning_images(batch["conditioning_images"])
        return per_sample_loss(loss_settings_from_args(args), prediction, target, timesteps, noise_scheduler,
                               batch["loss_weights"].to(accelerator.device),
                               None if masks is None else masks.to(accelerator.device), weighting)
