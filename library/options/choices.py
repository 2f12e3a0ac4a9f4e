"""Value lists the flags offer as `choices` (and the heavy modules check against), and the error for a value outside
one. Nothing here imports torch or diffusers, so that `--help` and argparse errors stay fast."""
from __future__ import annotations

import difflib

from library.errors import FlagError

# --loss_type and --huber_schedule (kohya's names); the Huber c only applies to the last two loss types
LOSS_TYPES = ("l2", "l1", "huber", "smooth_l1")
HUBER_SCHEDULES = ("constant", "exponential", "snr")
HUBER_LOSS_TYPES = ("huber", "smooth_l1")

# length of SD's DDPM training schedule; --min_timestep/--max_timestep lie in [0, NUM_TRAIN_TIMESTEPS]
NUM_TRAIN_TIMESTEPS = 1000

# --save_model_as
SAVE_FORMATS = ("ckpt", "safetensors", "diffusers", "diffusers_safetensors")

# kohya's `resize_interpolation` names: Lanczos and box through PIL, the rest through OpenCV (COMPAT §9.2)
RESIZE_INTERPOLATIONS = ("lanczos", "nearest", "bilinear", "linear", "bicubic", "cubic", "area", "box")

# --dynamic_method of resize_lora.py: how each module's rank is chosen from its singular values
DYNAMIC_METHODS = ("sv_ratio", "sv_fro", "sv_cumulative")

# kohya's 11 names, then the k-diffusion style aliases it also accepts (library/train_util.py: get_my_scheduler).
SAMPLER_NAMES: tuple[str, ...] = (
    "ddim", "pndm", "lms", "euler", "euler_a", "heun", "dpm_2", "dpm_2_a", "dpmsolver", "dpmsolver++", "dpmsingle",
    "k_lms", "k_euler", "k_euler_a", "k_dpm_2", "k_dpm_2_a",
)


def unknown_choice_error(flag: str, value: str, choices: tuple[str, ...]) -> FlagError:
    """FlagError naming the flag, the bad value, the valid values and the nearest one."""
    message = f"{flag} {value}: unknown; expected one of {', '.join(choices)}"
    nearest = difflib.get_close_matches(str(value), choices, n=1)
    if nearest:
        message += f"; did you mean {nearest[0]}?"
    return FlagError(message)
