"""Full fine-tuning on the one training loop: `FineTuning` turns a `NetworkTrainer` (SD1/2 or SDXL) into
kohya's sdxl_train.py / fine_tune.py / train_db.py. Only what differs from LoRA training is here (TRAINERS §1, §2):
which weights train and at which rates (a `FullModel` stands where the network would), the checks of the scripts'
flags and datasets, and saving the whole model in --save_model_as. Phases, loop, noise/loss, sampling,
validation, logging, states and exact resume are NetworkTrainer's.
"""
from __future__ import annotations

import argparse
import logging
from pathlib import Path

from library.errors import FlagError, UserInputError
from library.train.full_model import FullModel, TrainPlan

logger = logging.getLogger(__name__)

SOURCE_FORMATS = {".safetensors": "safetensors", ".ckpt": "ckpt"}


class FineTuning:
    """Mixin over NetworkTrainer / SdxlNetworkTrainer. `dataset_kinds`: the dataset kinds the script trains on;
    `dreambooth`: train_db.py's text encoder trains unless --stop_text_encoder_training says otherwise."""

    script_name = "fine_tune.py"
    dataset_kinds: tuple[str, ...] = ("finetune",)
    dreambooth = False
    tracker_name = "finetuning"

    # ------------------------------------------------------------------------------------------ flags

    def prepare_run(self, args: argparse.Namespace):
        from library.train.run_setup import fill_network_flags

        fill_network_flags(args, "full model")
        args.log_tracker_name = args.log_tracker_name or self.tracker_name
        plan = self.train_plan(args)
        args.network_train_text_encoder_only = not plan.trains_unet
        args.network_train_unet_only = not any(plan.text_encoder_flags)
        self._plan = plan
        self._check_finetune_flags(args, plan)
        run = super().prepare_run(args)
        self._check_dataset_kinds(args)
        return run

    def train_plan(self, args: argparse.Namespace) -> TrainPlan:
        """Rates of the U-Net and each text encoder from the script's flags (0 or None: frozen)."""
        te_trains = (args.stop_text_encoder_training is None or args.stop_text_encoder_training >= 0) \
            if self.dreambooth else args.train_text_encoder
        if hasattr(args, "learning_rate_te1"):
            rates = (args.learning_rate_te1, args.learning_rate_te2)
        else:
            rates = (args.learning_rate_te,)
        te_lrs = tuple((args.learning_rate if rate is None else rate) if te_trains else None for rate in rates)
        block_lrs = tuple(args.block_lr) if isinstance(getattr(args, "block_lr", None), list) else None
        return TrainPlan(unet_lr=args.learning_rate, text_encoder_lrs=te_lrs, block_lrs=block_lrs,
                         freeze_te1_last_layer=len(rates) == 2)

    def _check_finetune_flags(self, args: argparse.Namespace, plan: TrainPlan) -> None:
        if isinstance(getattr(args, "block_lr", None), str):
            raise FlagError(f"--block_lr: per-block learning rates number SDXL's U-Net blocks; use sdxl_train.py "
                            f"(for {self.script_name}, --learning_rate sets the U-Net's rate)")
        if getattr(args, "v2", False) and len(plan.text_encoder_lrs) == 2:
            raise FlagError("--v2: sdxl_train.py trains SDXL models; SD2 models are fine-tuned with fine_tune.py or "
                            "train_db.py")
        if any(plan.text_encoder_flags) and (args.cache_text_encoder_outputs or
                                             args.cache_text_encoder_outputs_to_disk):
            raise FlagError("--cache_text_encoder_outputs cannot be used while a text encoder trains (its outputs "
                            "change every step); leave it out, or freeze the encoders"
                            + ("" if self.dreambooth else " (no --train_text_encoder)"))
        if not plan.trains_unet and not any(plan.text_encoder_flags):
            raise FlagError("--learning_rate 0 freezes the U-Net and no text encoder trains: nothing to train")
        for name in ("learning_rate", "learning_rate_te", "learning_rate_te1", "learning_rate_te2"):
            value = getattr(args, name, None)
            if value is not None and not 0.0 <= value <= 100.0:
                raise FlagError(f"--{name} {value}: expected a learning rate from 0 to 100")
        if args.fused_backward_pass and args.fused_optimizer_groups:
            raise FlagError("--fused_backward_pass and --fused_optimizer_groups are two ways of stepping during "
                            "backward; give one of them")
        fused = "--fused_backward_pass" if args.fused_backward_pass else (
            "--fused_optimizer_groups" if args.fused_optimizer_groups else None)
        if args.fused_optimizer_groups is not None and args.fused_optimizer_groups < 1:
            raise FlagError(f"--fused_optimizer_groups {args.fused_optimizer_groups}: expected a number of groups "
                            "of at least 1")
        if fused and args.gradient_accumulation_steps > 1:
            raise FlagError(f"{fused} updates the weights during each backward pass, so it cannot accumulate "
                            f"gradients (--gradient_accumulation_steps {args.gradient_accumulation_steps}); use "
                            "a larger batch or leave it out")
        if fused and getattr(args, "deepspeed", False):
            raise FlagError(f"{fused} and --deepspeed both own the optimizer step (DeepSpeed's engine steps after "
                            "backward); give one of them")
        if fused and args.mixed_precision == "fp16":
            raise FlagError(f"{fused} with --mixed_precision fp16: the loss scaler's gradients would be applied "
                            "unscaled; use bf16 or no")
        if args.diffusers_xformers:
            import importlib.util

            if importlib.util.find_spec("xformers") is None:
                raise FlagError("--diffusers_xformers needs the xformers package (install the build for your "
                                "torch/CUDA), or leave it out for PyTorch SDPA")
            args.xformers = True  # the U-Net's attention; the VAE's is set in _prepare_frozen_unet
        if getattr(args, "no_token_padding", False):
            logger.warning("--no_token_padding has no effect (kohya's v0.10 does not read it either)")
        if args.save_model_as is None:
            source = Path(args.pretrained_model_name_or_path)
            args.save_model_as = SOURCE_FORMATS.get(source.suffix.lower()) or (
                "diffusers_safetensors" if args.use_safetensors else "diffusers")
            if args.use_safetensors and args.save_model_as == "ckpt":
                args.save_model_as = "safetensors"

    def create_optimizer(self, args, optimizer_type: str, groups: list[dict], optimizer_args: dict):
        """With --fused_backward_pass / --fused_optimizer_groups: optimizers that step inside backward."""
        if not (args.fused_backward_pass or args.fused_optimizer_groups):
            return super().create_optimizer(args, optimizer_type, groups, optimizer_args)
        from library.train.fused_backward import FusedOptimizer, OptimizerFactory
        from library.train.optimizers import uses_relative_step

        if self._run.accelerator.num_processes > 1:
            raise FlagError("--fused_backward_pass / --fused_optimizer_groups run on one process (each weight is "
                            "updated before gradients could be averaged across processes)")
        factory = OptimizerFactory(optimizer_type, args.learning_rate, optimizer_args)
        optimizer = FusedOptimizer(groups, factory, max_grad_norm=args.max_grad_norm or 0.0,
                                   num_groups=args.fused_optimizer_groups)
        if uses_relative_step(optimizer.inner_optimizers[0]):
            raise FlagError("--fused_backward_pass with a relative-step AdaFactor: give explicit rates, e.g. "
                            "--optimizer_args scale_parameter=False relative_step=False warmup_init=False")
        how = "per tensor" if args.fused_backward_pass else f"in {len(optimizer.inner_optimizers)} groups"
        logger.info("fused backward pass: %s stepped inside backward %s; --max_grad_norm clips each tensor",
                    factory.class_path, how)
        return factory.class_path, factory.description, optimizer

    def check_network_arguments(self, args) -> None:
        """No network here: the rates were checked with the train plan (_check_finetune_flags)."""

    def _check_dataset_kinds(self, args: argparse.Namespace) -> None:
        """fine_tune.py takes fine-tuning (metadata) datasets, train_db.py DreamBooth ones (TRAINERS §2.1)."""
        from library.data.prepare import blueprint_from_args
        from library.dataset_config import KIND_NAMES

        blueprint = blueprint_from_args(args)
        for number, dataset in enumerate(blueprint.datasets):
            if dataset.kind in self.dataset_kinds or (dataset.kind == "controlnet" and args.masked_loss):
                continue
            subset = dataset.subsets[0]
            where = subset.metadata_file or subset.image_dir
            wanted = " or ".join(KIND_NAMES[kind] for kind in self.dataset_kinds)
            other = "train_db.py" if dataset.kind == "dreambooth" else "fine_tune.py"
            raise UserInputError(f"{blueprint.source}: datasets[{number}] ({where}) is a {KIND_NAMES[dataset.kind]} "
                                 f"dataset; {self.script_name} trains on {wanted} datasets (use {other})")

    # ------------------------------------------------------------------------------------------ models

    def load_target_model(self, args, weight_dtype, accelerator):
        from library.models.load import load_target_model

        bundle = load_target_model(args.pretrained_model_name_or_path, v2=args.v2,
                                   v_parameterization=args.v_parameterization, vae_path=args.vae,
                                   expected_families=self.supported_families)
        self.family, self._bundle = bundle.family, bundle
        return bundle.family.model_version, bundle.text_encoders, bundle.vae, bundle.unet

    def cast_unet(self, args) -> bool:
        return not self._plan.trains_unet  # a trained U-Net keeps fp32 weights under autocast (or --full_*)

    def cast_text_encoder(self, args) -> bool:
        return not any(self._plan.text_encoder_flags)

    def is_train_text_encoder(self, args) -> bool:
        return any(self._plan.text_encoder_flags)

    def _prepare_frozen_unet(self, run, unet, vae, text_encoders) -> None:
        super()._prepare_frozen_unet(run, unet, vae, text_encoders)
        if run.args.diffusers_xformers:
            vae.enable_xformers_memory_efficient_attention()
            logger.info("--diffusers_xformers: xformers attention in the U-Net and the VAE")

    def get_text_encoders_train_flags(self, args, text_encoders) -> list[bool]:
        return list(self._plan.text_encoder_flags)

    def make_network(self, run, models) -> FullModel:
        names = ("unet", "text_encoder1", "text_encoder2") if len(models.text_encoders) == 2 else \
            ("unet", "text_encoder")
        return FullModel(self._plan, names)

    def on_step_start(self, args, accelerator, network, text_encoders, unet, batch, weight_dtype,
                      is_train: bool = True) -> None:
        super().on_step_start(args, accelerator, network, text_encoders, unet, batch, weight_dtype, is_train)
        stop = getattr(args, "stop_text_encoder_training", None)
        if is_train and stop is not None and self._run.progress.global_step >= stop and network.text_encoders:
            logger.info("--stop_text_encoder_training %d: the text encoder is not trained from step %d on", stop,
                        self._run.progress.global_step + 1)
            network.stop_text_encoder_training()
            self._trainable.train_text_encoder = False

    def generate_step_logs(self, args, current_loss, avr_loss, lr_scheduler, lr_descriptions, *rest,
                           **named) -> dict:
        """The LoRA trainer's keys plus `loss`, the per-step key of kohya's fine-tuning scripts (TRAINERS §1),
        so their dashboards keep working."""
        logs = super().generate_step_logs(args, current_loss, avr_loss, lr_scheduler, lr_descriptions, *rest,
                                          **named)
        return {"loss": current_loss, **logs}

    # ------------------------------------------------------------------------------------------ saving

    def output_extension(self, args) -> str:
        return {"ckpt": ".ckpt", "safetensors": ".safetensors"}.get(args.save_model_as, "")

    def get_sai_model_spec(self, args) -> dict[str, str]:
        from library.train.metadata import modelspec_metadata

        kind = "checkpoint" if args.save_model_as in ("ckpt", "safetensors") else "diffusers"
        return modelspec_metadata(args, self.family, kind=kind, started_at=self._run.progress.started_at,
                                  resolution=self.training_resolution())

    def save_network(self, run, trainable, path: Path, epoch: int) -> None:
        """The whole model (U-Net, text encoders, VAE) in --save_model_as, with modelspec metadata only (kohya);
        single files keep the source file's other tensors. Written through a temp file or folder."""
        from library.models.save import save_model

        metadata = dict(trainable.modelspec)  # already modelspec.* keys; no ss_* in checkpoints (kohya)
        save_model(self._bundle, path, save_model_as=run.args.save_model_as, precision=run.args.save_precision,
                   overwrite=True, metadata=metadata, epoch=epoch, global_step=run.progress.global_step)
        logger.info("saved %s", path)
