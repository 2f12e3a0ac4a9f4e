"""kohya's sampler names (`--sample_sampler`, `--ss`) and the diffusers schedulers they stand for (COMPAT §12).

Every scheduler gets SD's training schedule (DDPM, scaled_linear betas 0.00085 -> 0.012, 1000 steps, COMPAT
§14.5) from a plain config dict, so nothing is downloaded.
"""
from __future__ import annotations

import difflib
import inspect
import logging
import warnings

import torch

from library.errors import FlagError
from library.options.choices import SAMPLER_NAMES

logger = logging.getLogger(__name__)

# name -> (diffusers class name, extra config)
_SCHEDULERS: dict[str, tuple[str, dict]] = {
    "ddim": ("DDIMScheduler", {}),
    # SD's own PNDM config skips the Runge-Kutta warm-up (PLMS); with it, fewer than ~5 steps fail in diffusers.
    "pndm": ("PNDMScheduler", {"skip_prk_steps": True}),
    "lms": ("LMSDiscreteScheduler", {}),
    "euler": ("EulerDiscreteScheduler", {}),
    "euler_a": ("EulerAncestralDiscreteScheduler", {}),
    "heun": ("HeunDiscreteScheduler", {}),
    "dpm_2": ("KDPM2DiscreteScheduler", {}),
    "dpm_2_a": ("KDPM2AncestralDiscreteScheduler", {}),
    # diffusers refuses a final sigma of zero for first-order "dpmsolver"; sigma_min is its supported ending.
    "dpmsolver": ("DPMSolverMultistepScheduler", {"algorithm_type": "dpmsolver", "final_sigmas_type": "sigma_min"}),
    "dpmsolver++": ("DPMSolverMultistepScheduler", {"algorithm_type": "dpmsolver++"}),
    "dpmsingle": ("DPMSolverSinglestepScheduler", {}),
}

SD_SCHEDULE = {
    "num_train_timesteps": 1000,
    "beta_start": 0.00085,
    "beta_end": 0.012,
    "beta_schedule": "scaled_linear",
}
# diffusers keeps the last cumulative alpha of a zero-terminal-SNR schedule at this value instead of 0, so that
# sigma-based (k-diffusion style) schedulers get a finite sigma at t=999.
_ZERO_SNR_LAST_ALPHA_CUMPROD = 2.0**-24


def canonical_sampler_name(name: str) -> str:
    """The scheduler key of a sampler name: `k_euler` -> `euler`; unknown names raise FlagError."""
    lowered = str(name).lower()
    if lowered not in SAMPLER_NAMES:
        raise unknown_sampler_error(name)
    return lowered.removeprefix("k_")


def unknown_sampler_error(name: str, flag: str = "--sample_sampler") -> FlagError:
    """FlagError naming the flag, the bad name, the valid names and the nearest one."""
    message = f"{flag} {name}: unknown sampler; expected one of {', '.join(SAMPLER_NAMES)}"
    nearest = difflib.get_close_matches(str(name).lower(), SAMPLER_NAMES, n=1)
    if nearest:
        message += f"; did you mean {nearest[0]}?"
    return FlagError(message)


def sampler_config(name: str, v_parameterization: bool, zero_terminal_snr: bool = False) -> tuple[str, dict]:
    """The diffusers class name and config dict for a sampler name."""
    class_name, extra = _SCHEDULERS[canonical_sampler_name(name)]
    config = {**SD_SCHEDULE, **extra}
    if v_parameterization:
        config["prediction_type"] = "v_prediction"
    # DDIMScheduler's default clip_sample=True is kept: kohya forces clip_sample on for the sample scheduler.
    if zero_terminal_snr:
        # Lin et al. 2023 sample from the last timestep ("trailing") of the rescaled schedule.
        config.update(rescale_betas_zero_snr=True, timestep_spacing="trailing")
    return class_name, config


def make_sampler(name: str, v_parameterization: bool, zero_terminal_snr: bool = False):
    """A fresh diffusers scheduler for kohya's sampler `name`, with SD's training noise schedule.

    Raises:
        FlagError: unknown name (with the nearest valid one), or a sampler whose optional package is missing.
    """
    import diffusers
    from diffusers.utils import is_scipy_available

    class_name, config = sampler_config(name, v_parameterization, zero_terminal_snr)
    if class_name == "LMSDiscreteScheduler" and not is_scipy_available():
        raise FlagError(f"sampler {name}: diffusers' LMS scheduler needs scipy; install it with "
                        "`pip install scipy`, or choose another sampler (e.g. euler)")
    scheduler_class = getattr(diffusers, class_name)
    accepted = inspect.signature(scheduler_class.__init__).parameters
    if config.pop("rescale_betas_zero_snr", False) and "rescale_betas_zero_snr" not in accepted:
        config["trained_betas"] = zero_terminal_snr_betas().tolist()
    elif zero_terminal_snr:
        config["rescale_betas_zero_snr"] = True
    config = {key: value for key, value in config.items() if key in accepted}
    with warnings.catch_warnings():
        # diffusers deprecates algorithm_type "dpmsolver", but it is what kohya's name "dpmsolver" means.
        warnings.filterwarnings("ignore", message=".*algorithm_type dpmsolver.*", category=FutureWarning)
        return scheduler_class.from_config(config)


def zero_terminal_snr_betas() -> torch.Tensor:
    """SD's betas rescaled to zero terminal SNR, with the last cumulative alpha kept just above 0 (as diffusers)."""
    from library.train.noise import rescale_zero_terminal_snr

    betas = torch.linspace(SD_SCHEDULE["beta_start"] ** 0.5, SD_SCHEDULE["beta_end"] ** 0.5,
                           SD_SCHEDULE["num_train_timesteps"], dtype=torch.float64) ** 2
    alphas_cumprod = torch.cumprod(1.0 - rescale_zero_terminal_snr(betas), dim=0)
    alphas_cumprod[-1] = _ZERO_SNR_LAST_ALPHA_CUMPROD
    alphas = torch.cat([alphas_cumprod[:1], alphas_cumprod[1:] / alphas_cumprod[:-1]])
    return (1.0 - alphas).float()
