"""Training loss: kohya's element-wise losses (L2/L1/Huber/smooth-L1), the masked loss, and the per-sample
weightings (Min-SNR, v-pred scaling, v-pred-like loss, debiased estimation). Noise and targets: `train.noise`."""
from __future__ import annotations

import logging
import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from diffusers import DDPMScheduler

from library.options.choices import HUBER_LOSS_TYPES, HUBER_SCHEDULES, LOSS_TYPES, unknown_choice_error
from library.train.noise import snr_for_timesteps

logger = logging.getLogger(__name__)

# kohya caps the SNR at 1000 in its v-pred scale and debiased weight: at t=0 the SNR is about 1175
# (custom_train_functions.py: get_snr_scale, apply_debiased_estimation).
MAX_SNR_FOR_SCALING = 1000.0


@dataclass(frozen=True)
class LossSettings:
    """The loss flag values (kohya spelling and defaults); None or False means the weighting is off."""

    v_parameterization: bool = False
    loss_type: str = "l2"
    huber_schedule: str = "snr"
    huber_c: float = 0.1
    huber_scale: float = 1.0
    min_snr_gamma: float | None = None
    scale_v_pred_loss_like_noise_pred: bool = False
    v_pred_like_loss: float | None = None
    debiased_estimation_loss: bool = False
    masked_loss: bool = False


def conditional_loss(prediction: torch.Tensor, target: torch.Tensor, loss_type: str,
                     huber_c: torch.Tensor | float | None = None) -> torch.Tensor:
    """Element-wise loss, no reduction: L2, L1, pseudo-Huber 2c(sqrt(d²+c²)-c) or kohya's smooth-L1 2(sqrt(d²+c²)-c)."""
    difference = prediction - target
    if loss_type == "l2":
        return difference**2
    if loss_type == "l1":
        return difference.abs()
    if loss_type not in HUBER_LOSS_TYPES:
        raise unknown_choice_error("--loss_type", loss_type, LOSS_TYPES)
    if huber_c is None:
        raise ValueError(f"loss_type {loss_type} needs huber_c (see huber_c_for_timesteps)")
    c = torch.as_tensor(huber_c, dtype=difference.dtype, device=difference.device)
    if c.ndim == 1:
        # One c per sample (kohya's schedules depend on the timestep), broadcast over C, H, W.
        c = c.view(-1, *([1] * (difference.ndim - 1)))
    pseudo_huber = torch.sqrt(difference**2 + c**2) - c
    return 2 * c * pseudo_huber if loss_type == "huber" else 2 * pseudo_huber


def huber_c_for_timesteps(timesteps: torch.Tensor, scheduler: DDPMScheduler, huber_schedule: str, huber_c: float,
                          huber_scale: float) -> torch.Tensor:
    """Per-sample Huber c for kohya's --huber_schedule (Khrapov & Popov 2024, "Improving diffusion models' data
    corruption resistance using scheduled pseudo-Huber loss")."""
    if huber_schedule == "constant":
        return torch.full(timesteps.shape, huber_c * huber_scale, dtype=torch.float32, device=timesteps.device)
    if huber_schedule == "exponential":
        # c decays from huber_scale at t=0 to huber_c·huber_scale at t=T.
        decay = -math.log(huber_c) / scheduler.config.num_train_timesteps
        return torch.exp(-decay * timesteps.float()) * huber_scale
    if huber_schedule == "snr":
        # kohya ignores huber_scale here: c = (1-c0)/(1+sigma)² + c0 with sigma = sqrt((1-a)/a).
        alphas_cumprod = scheduler.alphas_cumprod.to(timesteps.device)[timesteps.long()].float()
        sigmas = ((1.0 - alphas_cumprod) / alphas_cumprod) ** 0.5
        return (1 - huber_c) / (1 + sigmas) ** 2 + huber_c
    raise unknown_choice_error("--huber_schedule", huber_schedule, HUBER_SCHEDULES)


def _capped_snr(timesteps: torch.Tensor, scheduler: DDPMScheduler) -> torch.Tensor:
    return torch.clamp(snr_for_timesteps(scheduler, timesteps), max=MAX_SNR_FOR_SCALING)


def apply_snr_weight(loss: torch.Tensor, timesteps: torch.Tensor, scheduler: DDPMScheduler, gamma: float,
                     v_prediction: bool = False) -> torch.Tensor:
    """Min-SNR weighting (Hang et al. 2023): × min(snr, γ)/snr, or × min(snr, γ)/(snr+1) for v-prediction."""
    snr = snr_for_timesteps(scheduler, timesteps)
    clipped_snr = torch.clamp(snr, max=gamma)
    weight = clipped_snr / (snr + 1) if v_prediction else clipped_snr / snr
    return loss * weight.float().to(loss.device)


def scale_v_prediction_loss_like_noise_prediction(loss: torch.Tensor, timesteps: torch.Tensor,
                                                  scheduler: DDPMScheduler) -> torch.Tensor:
    """Scale a v-prediction loss to an ε-prediction loss's magnitude: × snr/(snr+1), snr capped at 1000 (kohya)."""
    snr = _capped_snr(timesteps, scheduler)
    return loss * (snr / (snr + 1)).float().to(loss.device)


def add_v_prediction_like_loss(loss: torch.Tensor, timesteps: torch.Tensor, scheduler: DDPMScheduler,
                               v_pred_like_loss: float) -> torch.Tensor:
    """Add a v-prediction-like term to an ε loss: loss + loss·(snr+1)/snr·k, snr capped at 1000 (kohya)."""
    snr = _capped_snr(timesteps, scheduler)
    scale = (snr / (snr + 1)).float().to(loss.device)
    return loss + loss / scale * v_pred_like_loss


def apply_debiased_estimation(loss: torch.Tensor, timesteps: torch.Tensor, scheduler: DDPMScheduler,
                              v_prediction: bool = False) -> torch.Tensor:
    """Debiased estimation (Yu et al. 2024): × 1/sqrt(snr), or × 1/(snr+1) for v-prediction; snr capped at 1000."""
    snr = _capped_snr(timesteps, scheduler)
    weight = 1 / (snr + 1) if v_prediction else 1 / torch.sqrt(snr)
    return loss * weight.float().to(loss.device)


def mask_from_conditioning_images(conditioning_images: torch.Tensor) -> torch.Tensor:
    """Loss mask [B, H, W] from a ControlNet conditioning image: R channel, -1..1 mapped to 0..1 (COMPAT §14.5)."""
    return conditioning_images[:, 0] / 2 + 0.5


def apply_masked_loss(loss: torch.Tensor, alpha_masks: torch.Tensor) -> torch.Tensor:
    """Multiply the element-wise loss by a 0..1 mask, area-resized to the latent size (COMPAT §14.5)."""
    mask = alpha_masks.to(dtype=loss.dtype, device=loss.device)
    if mask.ndim == loss.ndim - 1:
        mask = mask.unsqueeze(1)  # [B, H, W] -> [B, 1, H, W], broadcast over latent channels
    mask = F.interpolate(mask, size=tuple(loss.shape[2:]), mode="area")
    return loss * mask


def weight_per_sample_loss(settings: LossSettings, loss: torch.Tensor, timesteps: torch.Tensor,
                           scheduler: DDPMScheduler) -> torch.Tensor:
    """The SNR-type weightings of a per-sample loss [B], in kohya's order (train_network.py: post_process_loss)."""
    if settings.min_snr_gamma:
        loss = apply_snr_weight(loss, timesteps, scheduler, settings.min_snr_gamma, settings.v_parameterization)
    if settings.scale_v_pred_loss_like_noise_pred:
        loss = scale_v_prediction_loss_like_noise_prediction(loss, timesteps, scheduler)
    if settings.v_pred_like_loss:
        loss = add_v_prediction_like_loss(loss, timesteps, scheduler, settings.v_pred_like_loss)
    if settings.debiased_estimation_loss:
        loss = apply_debiased_estimation(loss, timesteps, scheduler, settings.v_parameterization)
    return loss


def training_loss(settings: LossSettings, prediction: torch.Tensor, target: torch.Tensor, timesteps: torch.Tensor,
                  scheduler: DDPMScheduler, loss_weights: torch.Tensor,
                  alpha_masks: torch.Tensor | None = None) -> torch.Tensor:
    """The scalar training loss, in kohya's order (COMPAT §14.5):

    1. element-wise loss in float32 (L2/L1/Huber/smooth-L1, Huber c per sample from its timestep);
    2. × mask, when masks are given (masked-out pixels still count in the mean, as in kohya);
    3. mean over every axis but the batch;
    4. × loss_weights per sample (prior_loss_weight for regularisation images);
    5. Min-SNR, v-pred scaling, v-pred-like loss, debiased weighting (`weight_per_sample_loss`);
    6. mean over the batch.
    """
    loss = per_sample_loss(settings, prediction, target, timesteps, scheduler, loss_weights, alpha_masks)
    return weight_per_sample_loss(settings, loss, timesteps, scheduler).mean()


def per_sample_loss(settings: LossSettings, prediction: torch.Tensor, target: torch.Tensor, timesteps: torch.Tensor,
                    scheduler: DDPMScheduler, loss_weights: torch.Tensor, alpha_masks: torch.Tensor | None = None,
                    weighting: torch.Tensor | None = None) -> torch.Tensor:
    """Steps 1-4 of `training_loss`: one loss per sample, before the timestep weightings. `weighting` (from a
    trainer's get_noise_pred_and_target hook) multiplies the element-wise loss, as in kohya."""
    huber_c = None
    if settings.loss_type in HUBER_LOSS_TYPES:
        huber_c = huber_c_for_timesteps(timesteps, scheduler, settings.huber_schedule, settings.huber_c,
                                        settings.huber_scale)
    loss = conditional_loss(prediction.float(), target.float(), settings.loss_type, huber_c)
    if weighting is not None:
        loss = loss * weighting
    if alpha_masks is not None:
        loss = apply_masked_loss(loss, alpha_masks)
    loss = loss.mean(dim=tuple(range(1, loss.ndim)))
    return loss * loss_weights.to(device=loss.device, dtype=loss.dtype)
