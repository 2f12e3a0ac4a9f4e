"""Sample images during training: when to sample (kohya's schedule), file names, and writing the PNGs without
perturbing the training RNG (COMPAT §12). The image generation itself is `library.sampling.pipeline`."""
from __future__ import annotations

import argparse
import logging
import random
from collections.abc import Iterator
from contextlib import contextmanager
from datetime import datetime
from pathlib import Path

import numpy as np
import torch
from tqdm import tqdm

from library.families import ModelFamily
from library.models.state_dict_io import atomic_output
from library.sampling.pipeline import generate
from library.sampling.prompts import SamplePrompt

logger = logging.getLogger(__name__)

SAMPLE_FOLDER = "sample"
DEFAULT_SAMPLER = "ddim"


def should_sample(args: argparse.Namespace, *, epoch: int | None, global_step: int, at_first: bool = False) -> bool:
    """kohya's rule (train_util.py: sample_images_common): step 0 samples only with --sample_at_first; with
    --sample_every_n_epochs only epoch ends whose number it divides (it wins over --sample_every_n_steps);
    otherwise only step-level calls (epoch None) whose step --sample_every_n_steps divides."""
    if not getattr(args, "sample_prompts", None):
        return False
    if at_first or global_step == 0:
        return bool(getattr(args, "sample_at_first", False))
    every_n_epochs = getattr(args, "sample_every_n_epochs", None)
    every_n_steps = getattr(args, "sample_every_n_steps", None)
    if every_n_epochs:
        return epoch is not None and epoch % every_n_epochs == 0
    if every_n_steps:
        return epoch is None and global_step % every_n_steps == 0
    return False


def sample_file_name(output_name: str | None, *, epoch: int | None, step: int, index: int, seed: int | None,
                     when: datetime | None = None) -> str:
    """`<output_name>_<e%06d epoch | %06d step>_<index %02d>_<YYYYmmddHHMMSS>[_<seed>].png` (COMPAT §12).

    Without --output_name kohya writes no name and no underscore before the epoch/step part.
    """
    prefix = f"{output_name}_" if output_name else ""
    number = f"e{epoch:06d}" if epoch is not None else f"{step:06d}"
    stamp = (when or datetime.now()).strftime("%Y%m%d%H%M%S")
    seed_suffix = "" if seed is None else f"_{seed}"
    return f"{prefix}{number}_{index:02d}_{stamp}{seed_suffix}.png"


@contextmanager
def preserved_rng_states() -> Iterator[None]:
    """Save Python, NumPy, torch CPU (and CUDA) generator states and put them back afterwards, so sampling
    leaves training's random stream untouched (kohya does the same around sampling)."""
    python_state, numpy_state, torch_state = random.getstate(), np.random.get_state(), torch.random.get_rng_state()
    cuda_states = torch.cuda.get_rng_state_all() if torch.cuda.is_available() and torch.cuda.is_initialized() else None
    try:
        yield
    finally:
        random.setstate(python_state)
        np.random.set_state(numpy_state)
        torch.random.set_rng_state(torch_state)
        if cuda_states is not None:
            torch.cuda.set_rng_state_all(cuda_states)


def prompts_for_process(prompts: list[SamplePrompt], process_index: int, num_processes: int) -> list[SamplePrompt]:
    """Prompts are dealt round-robin over processes by their index (COMPAT §12)."""
    return [prompt for prompt in prompts if prompt.index % num_processes == process_index]


def sample_images(args: argparse.Namespace, *, family: ModelFamily, unet, vae, caption_encoder,
                  prompts: list[SamplePrompt], epoch: int | None, global_step: int, device, dtype: torch.dtype,
                  default_size: tuple[int, int], process_index: int = 0, num_processes: int = 1,
                  control_for_prompt=None) -> list[Path]:
    """Generate this process's share of the sample prompts into `<output_dir>/sample/` and return the paths.

    `default_size` is (width, height) for prompts without --w/--h. `control_for_prompt(prompt)` gives the
    (control, guide images) of a prompt (ControlNet-LLLite's `--cn` image), or is None.
    """
    own_prompts = prompts_for_process(prompts, process_index, num_processes)
    if not own_prompts:
        return []
    folder = Path(args.output_dir) / SAMPLE_FOLDER
    folder.mkdir(parents=True, exist_ok=True)
    is_main = process_index == 0
    where = f"epoch {epoch}" if epoch is not None else f"step {global_step}"
    logger.log(logging.INFO if is_main else logging.DEBUG, "generating %d sample image(s) at %s", len(own_prompts),
               where)
    written = []
    with preserved_rng_states():
        for prompt in tqdm(own_prompts, desc="sample images", leave=False, disable=not is_main):
            control, guide_images = control_for_prompt(prompt) if control_for_prompt else (None, ())
            image = generate(prompt, family=family, unet=unet, vae=vae, caption_encoder=caption_encoder,
                             sampler_name=getattr(args, "sample_sampler", None) or DEFAULT_SAMPLER, device=device,
                             dtype=dtype, default_size=default_size, generator_seed=None,
                             zero_terminal_snr=bool(getattr(args, "zero_terminal_snr", False)), show_progress=is_main,
                             control=control, guide_images=guide_images)
            name = sample_file_name(getattr(args, "output_name", None), epoch=epoch, step=global_step,
                                    index=prompt.index, seed=prompt.seed)
            path = folder / name
            with atomic_output(path) as temp:
                image.save(temp, format="PNG")
            written.append(path)
    logger.log(logging.INFO if is_main else logging.DEBUG, "wrote %d sample image(s) to %s", len(written), folder)
    return written
