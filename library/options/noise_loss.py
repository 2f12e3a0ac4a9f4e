"""Noise, timestep and loss flags (kohya spelling and defaults), the settings built from them, and their checks.
`--v_parameterization` (options.model) and `--prior_loss_weight` (options.dataset) are declared elsewhere."""
from __future__ import annotations

import argparse
import logging
from typing import TYPE_CHECKING

from library.errors import FlagError
from library.options.choices import (HUBER_LOSS_TYPES, HUBER_SCHEDULES, LOSS_TYPES, NUM_TRAIN_TIMESTEPS,
                                     unknown_choice_error)

if TYPE_CHECKING:
    from library.train.loss import LossSettings
    from library.train.noise import NoiseSettings

logger = logging.getLogger(__name__)


def _add_noise_arguments(group: argparse._ArgumentGroup) -> None:
    group.add_argument("--noise_offset", type=float, default=None,
                       help="add offset·N(0,1) per sample and channel to the noise (about 0.1 helps very dark/bright "
                            "images; default: off)")
    group.add_argument("--noise_offset_random_strength", action="store_true",
                       help="draw the noise offset uniformly from 0..--noise_offset for each sample (kohya: once "
                            "per batch)")
    group.add_argument("--adaptive_noise_scale", type=float, default=None,
                       help="also add this × |mean latent| per channel to the noise offset (needs --noise_offset)")
    group.add_argument("--multires_noise_iterations", type=int, default=None,
                       help="levels of multi-resolution (pyramid) noise, about 6-10 (default: off)")
    group.add_argument("--multires_noise_discount", type=float, default=0.3,
                       help="weight of each coarser multires noise level is discount**level (default 0.3)")
    group.add_argument("--ip_noise_gamma", type=float, default=None,
                       help="input-perturbation noise strength added to the noisy UNet input only, about 0.1 "
                            "(default: off)")
    group.add_argument("--ip_noise_gamma_random_strength", action="store_true",
                       help="draw the input-perturbation strength uniformly from 0..--ip_noise_gamma for each "
                            "sample (kohya: once per batch)")
    group.add_argument("--zero_terminal_snr", action="store_true",
                       help="rescale the noise schedule so the last timestep is pure noise (use with "
                            "--v_parameterization)")
    group.add_argument("--min_timestep", type=int, default=None,
                       help="smallest training timestep, inclusive (default 0)")
    group.add_argument("--max_timestep", type=int, default=None,
                       help="largest training timestep, exclusive (default 1000)")


def _add_loss_arguments(group: argparse._ArgumentGroup) -> None:
    group.add_argument("--loss_type", type=str, default="l2", choices=LOSS_TYPES,
                       help="element-wise loss: l2 (default), l1, huber (pseudo-Huber) or smooth_l1")
    group.add_argument("--huber_schedule", type=str, default="snr", choices=HUBER_SCHEDULES,
                       help="how the Huber c changes with the timestep: constant, exponential or snr (default)")
    group.add_argument("--huber_c", type=float, default=0.1,
                       help="Huber c: the constant value, or the value at high noise for exponential/snr "
                            "(default 0.1)")
    group.add_argument("--huber_scale", type=float, default=1.0,
                       help="multiplier of the Huber c for the constant and exponential schedules (default 1.0)")
    group.add_argument("--min_snr_gamma", type=float, default=None,
                       help="Min-SNR weighting gamma, 5 is the paper's value (default: off)")
    group.add_argument("--scale_v_pred_loss_like_noise_pred", action="store_true",
                       help="scale a v-prediction loss to an epsilon loss's magnitude (needs --v_parameterization)")
    group.add_argument("--v_pred_like_loss", type=float, default=None,
                       help="add a v-prediction-like loss with this weight to an epsilon loss (default: off)")
    group.add_argument("--debiased_estimation_loss", action="store_true",
                       help="weight the loss by 1/sqrt(SNR) (debiased estimation)")
    group.add_argument("--masked_loss", action="store_true",
                       help="mask the loss with the images' alpha channel (or the conditioning images' R channel)")


def add_noise_and_loss_arguments(parser: argparse.ArgumentParser) -> None:
    _add_noise_arguments(parser.add_argument_group("noise and timesteps"))
    _add_loss_arguments(parser.add_argument_group("loss"))


def noise_settings_from_args(args: argparse.Namespace) -> NoiseSettings:
    """NoiseSettings from the parsed flags."""
    from library.train.noise import NoiseSettings

    return NoiseSettings(
        v_parameterization=bool(getattr(args, "v_parameterization", False)),
        zero_terminal_snr=args.zero_terminal_snr,
        noise_offset=args.noise_offset,
        noise_offset_random_strength=args.noise_offset_random_strength,
        adaptive_noise_scale=args.adaptive_noise_scale,
        multires_noise_iterations=args.multires_noise_iterations,
        multires_noise_discount=args.multires_noise_discount,
        ip_noise_gamma=args.ip_noise_gamma,
        ip_noise_gamma_random_strength=args.ip_noise_gamma_random_strength,
        min_timestep=args.min_timestep,
        max_timestep=args.max_timestep,
    )


def loss_settings_from_args(args: argparse.Namespace) -> LossSettings:
    """LossSettings from the parsed flags."""
    from library.train.loss import LossSettings

    return LossSettings(
        v_parameterization=bool(getattr(args, "v_parameterization", False)),
        loss_type=args.loss_type,
        huber_schedule=args.huber_schedule,
        huber_c=args.huber_c,
        huber_scale=args.huber_scale,
        min_snr_gamma=args.min_snr_gamma,
        scale_v_pred_loss_like_noise_pred=args.scale_v_pred_loss_like_noise_pred,
        v_pred_like_loss=args.v_pred_like_loss,
        debiased_estimation_loss=args.debiased_estimation_loss,
        masked_loss=args.masked_loss,
    )


def _check_not_negative(args: argparse.Namespace, names: tuple[str, ...]) -> None:
    for name in names:
        value = getattr(args, name)
        if value is not None and value < 0:
            raise FlagError(f"--{name} {value}: expected a value >= 0")


def _check_timestep_range(args: argparse.Namespace) -> None:
    for name in ("min_timestep", "max_timestep"):
        value = getattr(args, name)
        if value is not None and not 0 <= value <= NUM_TRAIN_TIMESTEPS:
            raise FlagError(f"--{name} {value}: expected a timestep from 0 to {NUM_TRAIN_TIMESTEPS}")
    min_timestep = 0 if args.min_timestep is None else args.min_timestep
    max_timestep = NUM_TRAIN_TIMESTEPS if args.max_timestep is None else args.max_timestep
    if min_timestep >= max_timestep:
        raise FlagError(f"--min_timestep {min_timestep} / --max_timestep {max_timestep}: expected min_timestep < "
                        f"max_timestep (timesteps are drawn from [min, max), max is exclusive)")


def _check_noise_flags(args: argparse.Namespace) -> None:
    _check_not_negative(args, ("noise_offset", "multires_noise_iterations", "multires_noise_discount",
                               "ip_noise_gamma"))
    _check_timestep_range(args)
    # kohya: "adaptive_noise_scale requires noise_offset" (train_util.py: verify_training_args).
    if args.adaptive_noise_scale is not None and args.noise_offset is None:
        raise FlagError(f"--adaptive_noise_scale {args.adaptive_noise_scale}: needs --noise_offset (the adaptive part "
                        "is added to the offset)")
    if args.noise_offset_random_strength and not args.noise_offset:
        logger.warning("--noise_offset_random_strength has no effect without --noise_offset")
    if args.ip_noise_gamma_random_strength and not args.ip_noise_gamma:
        logger.warning("--ip_noise_gamma_random_strength has no effect without --ip_noise_gamma")
    if args.zero_terminal_snr and not getattr(args, "v_parameterization", False):
        logger.warning("--zero_terminal_snr without --v_parameterization: an epsilon model cannot predict the "
                       "noise at zero SNR, training will behave unexpectedly")


def _check_loss_flags(args: argparse.Namespace) -> None:
    # --config_file values bypass argparse's `choices` (COMPAT §11), so check the names here too.
    if args.loss_type not in LOSS_TYPES:
        raise unknown_choice_error("--loss_type", args.loss_type, LOSS_TYPES)
    if args.huber_schedule not in HUBER_SCHEDULES:
        raise unknown_choice_error("--huber_schedule", args.huber_schedule, HUBER_SCHEDULES)
    if args.loss_type in HUBER_LOSS_TYPES and not args.huber_c > 0:
        raise FlagError(f"--huber_c {args.huber_c}: expected a value > 0 for --loss_type {args.loss_type}")
    if args.min_snr_gamma is not None and not args.min_snr_gamma > 0:
        raise FlagError(f"--min_snr_gamma {args.min_snr_gamma}: expected a value > 0 (5 is the paper's value)")
    _check_not_negative(args, ("huber_scale", "v_pred_like_loss"))
    v_parameterization = getattr(args, "v_parameterization", False)
    # kohya refuses both combinations (train_util.py: verify_training_args).
    if args.scale_v_pred_loss_like_noise_pred and not v_parameterization:
        raise FlagError("--scale_v_pred_loss_like_noise_pred: needs --v_parameterization (it rescales a "
                        "v-prediction loss)")
    if args.v_pred_like_loss and v_parameterization:
        raise FlagError(f"--v_pred_like_loss {args.v_pred_like_loss}: cannot be used with --v_parameterization "
                        "(it adds a v-prediction-like term to an epsilon loss)")


def check_noise_and_loss_flags(args: argparse.Namespace) -> None:
    """Raise FlagError for flag values or combinations that cannot work; warn for ones that do nothing."""
    _check_noise_flags(args)
    _check_loss_flags(args)
