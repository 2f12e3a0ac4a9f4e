"""ControlNet-LLLite training on the one training loop: `LLLiteTraining` turns the SDXL network trainer into
kohya's sdxl_train_control_net_lllite.py (TRAINERS §4.2). What differs from LoRA training is here: the network
(networks/control_net_lllite.py), the conditioning image handed to it before every U-Net call, the dataset checks
(ControlNet subsets, each conditioning image exactly the size of its image), the `--cn` image of each sample
prompt, and the file (modelspec only). Phases, loop, noise/loss, sampling, validation, logging, states and exact
resume are NetworkTrainer's.
"""
from __future__ import annotations

import argparse
import logging
from pathlib import Path

from library.errors import FlagError, UserInputError

logger = logging.getLogger(__name__)

MISMATCHES_SHOWN = 3


class LLLiteTraining:
    """Mixin over SdxlNetworkTrainer."""

    script_name = "sdxl_train_control_net_lllite.py"
    tracker_name = "lllite_control_net_train"
    controlnet_datasets = True

    # ------------------------------------------------------------------------------------------ flags

    def prepare_run(self, args: argparse.Namespace):
        from library.train.run_setup import fill_network_flags
        from networks.control_net_lllite import check_dims

        fill_network_flags(args, "networks.control_net_lllite", network_train_unet_only=True,
                           network_train_text_encoder_only=False)
        args.log_tracker_name = args.log_tracker_name or self.tracker_name
        check_dims(args.cond_emb_dim, args.network_dim)
        if getattr(args, "masked_loss", False):
            raise FlagError("--masked_loss cannot be used with ControlNet-LLLite: the conditioning images are the "
                            "control input, not loss masks")
        if args.network_weights:
            _check_lllite_file(args.network_weights, "--network_weights")
        run = super().prepare_run(args)
        self._check_datasets(run.train_group)
        return run

    def check_network_arguments(self, args) -> None:
        from library.train import run_setup

        if args.network_dropout is not None and not 0.0 <= args.network_dropout < 1.0:
            raise FlagError(f"--network_dropout {args.network_dropout}: expected a probability from 0 to below 1")
        run_setup.check_learning_rates(args)

    def _check_datasets(self, group) -> None:
        """Every dataset is a ControlNet one (each image with its conditioning image), no random crop, and each
        conditioning image has exactly its image's size (kohya asserts it; a stretched one would misalign)."""
        from library.data.images import read_image_size

        mismatched = []
        for number, dataset in enumerate(group.datasets):
            if dataset.kind != "controlnet":
                raise UserInputError(f"datasets[{number}] is a {dataset.kind} dataset; ControlNet-LLLite trains on "
                                     "ControlNet datasets (subsets with conditioning_data_dir)")
            for subset_number, subset in enumerate(dataset.subsets):
                if subset.random_crop:
                    raise UserInputError(f"datasets[{number}].subsets[{subset_number}]: random_crop cannot be used "
                                         "with ControlNet-LLLite (the conditioning image must match the crop)")
            for info in dataset.images:
                size = read_image_size(info.conditioning_image_path)
                if tuple(size) != tuple(info.image_size):
                    mismatched.append(f"{info.absolute_path} is {info.image_size[0]}x{info.image_size[1]} but "
                                      f"{info.conditioning_image_path} is {size[0]}x{size[1]}")
        if mismatched:
            more = f" (and {len(mismatched) - MISMATCHES_SHOWN} more)" if len(mismatched) > MISMATCHES_SHOWN else ""
            raise UserInputError("conditioning images must have their image's size: "
                                 + "; ".join(mismatched[:MISMATCHES_SHOWN]) + more)

    def _load_sample_prompts(self, args) -> list:
        prompts = super()._load_sample_prompts(args)
        for prompt in prompts:
            if prompt.controlnet_image is None:
                logger.warning("%s: sample prompt without --cn (a conditioning image); its sample is drawn without "
                               "LLLite", prompt.source or "sample prompt")
            elif not Path(prompt.controlnet_image).is_file():
                raise FlagError(f"--sample_prompts {prompt.source}: --cn {prompt.controlnet_image}: file not found")
        return prompts

    # ------------------------------------------------------------------------------------------ models

    def is_train_text_encoder(self, args) -> bool:
        return False

    def make_network(self, run, models):
        from networks.control_net_lllite import ControlNetLLLite

        args = run.args
        return ControlNetLLLite(models.unet, args.cond_emb_dim, args.network_dim, dropout=args.network_dropout)

    def call_unet(self, args, accelerator, unet, noisy_latents, timesteps, text_conds, batch, weight_dtype,
                  **kwargs):
        """The batch's conditioning images go to the LLLite modules before the U-Net runs (every call: the
        embedding is part of the graph that trains)."""
        cond = batch["conditioning_images"].to(noisy_latents.device)
        self._trainable.network.set_cond_image(cond)
        return super().call_unet(args, accelerator, unet, noisy_latents, timesteps, text_conds, batch, weight_dtype,
                                 **kwargs)

    def sample_control_for_prompt(self, prompt):
        """Each sample prompt's `--cn` image conditions its sample (kohya's LLLite script samples nothing)."""
        from PIL import Image

        from library.data.images import load_image
        from library.sampling.control import ControlledNetwork, LLLiteControl

        control = LLLiteControl([ControlledNetwork(self._trainable.network)])
        if prompt.controlnet_image is None:
            return control, ()  # prepare() clears the training batch's conditioning image
        return control, (Image.fromarray(load_image(prompt.controlnet_image)),)

    # ------------------------------------------------------------------------------------------ logging

    def generate_step_logs(self, args, current_loss, avr_loss, lr_scheduler, lr_descriptions, *rest,
                           **named) -> dict:
        """The LoRA trainer's keys plus kohya's `lr` (TRAINERS §4.2)."""
        logs = super().generate_step_logs(args, current_loss, avr_loss, lr_scheduler, lr_descriptions, *rest,
                                          **named)
        return {**logs, "lr": float(lr_scheduler.get_last_lr()[0])}

    # ------------------------------------------------------------------------------------------ saving

    def output_extension(self, args) -> str:
        return "." + args.save_model_as

    def get_sai_model_spec(self, args) -> dict[str, str]:
        from library.train.metadata import modelspec_metadata

        return modelspec_metadata(args, self.family, kind="control-net-lllite",
                                  started_at=self._run.progress.started_at, resolution=self.training_resolution())

    def save_network(self, run, trainable, path: Path, epoch: int) -> None:
        """kohya's file: the modules' tensors, `modelspec.*` only (no ss_* keys); through a temp file."""
        from library.models.save import precision_dtype
        from library.models.state_dict_io import atomic_output

        with atomic_output(path) as temp:
            trainable.network.save_weights(temp, precision_dtype(run.args.save_precision), dict(trainable.modelspec))
        logger.info("saved %s", path)


def _check_lllite_file(path: str, flag: str) -> None:
    from library.errors import ModelFormatError
    from library.models.state_dict_io import TensorFile
    from networks.control_net_lllite import LLLITE_PREFIX, is_lllite_state_dict

    if not Path(path).is_file():
        raise FlagError(f"{flag} {path}: file not found")
    try:
        source = TensorFile(path)
        keys = source.keys()
        source.close()
    except ModelFormatError as error:
        raise FlagError(f"{flag} {error}") from None
    if not is_lllite_state_dict(keys):
        hint = " (a LoRA file)" if any(key.startswith(("lora_unet_", "lora_te")) for key in keys) else ""
        raise FlagError(f"{flag} {path}: not a ControlNet-LLLite file{hint}; its keys do not start with "
                        f"{LLLITE_PREFIX}_")
