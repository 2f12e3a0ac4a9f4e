"""`NetworkTrainer`: LoRA-style network training for SD1.x/2.x; SDXL subclasses it and overrides hooks.

Hook names and arguments are kohya's (COMPAT §15) so third-party subclasses keep working. `train()` runs named
phases: prepare_run (flags, datasets, accelerator — before any model loads), load_models, prepare_conditioning
(latent / text-encoder caches), build_trainable (network), build_optimizer (optimizer, scheduler, resume),
loop, finish.
"""
from __future__ import annotations

import argparse
import logging
import random
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from library.errors import FlagError, TrainingStopped
from library.families import ModelFamily
from library.models.state_dict_io import DiskFullError
from library.train import checkpoints, network_module, run_setup, state_folder
from library.train.checkpoints import OutputNames, TrainProgress
from library.train.model_hooks import ModelHooks, cast_to_fp8
from library.train.step_hooks import StepHooks
from library.train.run_setup import TrainingSchedule

logger = logging.getLogger(__name__)

SD_FAMILIES = ("sd1", "sd1-v", "sd2", "sd2-v")


@dataclass
class TrainingRun:
    """What the phases share: flags, family, accelerator, data, schedule and where the run is."""

    args: argparse.Namespace
    family: ModelFamily
    accelerator: Any
    weight_dtype: torch.dtype
    train_group: Any
    val_group: Any
    schedule: TrainingSchedule | None = None
    names: OutputNames | None = None
    progress: TrainProgress = field(default_factory=TrainProgress)
    sample_prompts: list = field(default_factory=list)


@dataclass
class LoadedModels:
    unet: Any
    vae: Any
    text_encoders: list
    tokenizers: list
    caption_encoder: Any
    noise_scheduler: Any
    tokenize_strategy: Any = None
    text_encoding_strategy: Any = None
    # what prepare_unet_with_accelerator returned (kohya: after the network is applied); the loop calls it, while
    # the network, sampling and saving use the plain `unet`
    prepared_unet: Any = None

    def unet_for_training(self):
        return self.unet if self.prepared_unet is None else self.prepared_unet


@dataclass
class Trainable:
    network: Any
    train_unet: bool
    train_text_encoder: bool
    optimizer: Any = None
    lr_scheduler: Any = None
    group_names: list = field(default_factory=list)
    optimizer_description: str = ""
    metadata: dict = field(default_factory=dict)
    modelspec: dict = field(default_factory=dict)
    last_norm_logs: dict = field(default_factory=dict)  # --scale_weight_norms figures of the last step
    engine: Any = None  # DeepSpeed's wrapper of the network, when accelerate runs DeepSpeed
    ema: Any = None  # --use_ema: library.train.ema.ParameterEMA of the trained weights

    def ema_weights(self):
        """A context in which the trained weights are the EMA's (saves, samples); a no-op without --use_ema."""
        import contextlib

        return self.ema.swapped_in() if self.ema is not None else contextlib.nullcontext()


class NetworkTrainer(ModelHooks, StepHooks):
    """Trains a network module (LoRA, DyLoRA, LyCORIS, ...) on a frozen SD1.x/2.x model. kohya's hooks: the
    model/text ones in library/train/model_hooks.py, the per-batch and logging ones in step_hooks.py."""

    supported_families: tuple[str, ...] = SD_FAMILIES
    # ControlNet-style datasets (conditioning_data_dir): None = only as masks with --masked_loss (the default)
    controlnet_datasets: bool | None = None

    def __init__(self):
        self.vae_scale_factor = 0.18215
        self.is_sdxl = False
        self.loss_history: list[float] = []  # loss of every optimizer step of this process
        self.validation_history: list[float] = []

    # ------------------------------------------------------------------------------------------------ hooks

    def assert_extra_args(self, args: argparse.Namespace, train_dataset_group, val_dataset_group=None) -> None:
        """Family-specific flag checks; called before models load."""

    def all_reduce_network(self, accelerator, network) -> None:
        """Average the network's gradients over processes in one collective (the network is not DDP-wrapped:
        its forward runs inside the frozen models, so DDP's reducer would never see it)."""
        if accelerator.num_processes == 1 or _uses_deepspeed(accelerator):
            return
        grads = [param.grad for param in network.parameters() if param.grad is not None]
        if not grads:
            return
        flat = torch.cat([grad.reshape(-1) for grad in grads])
        flat = accelerator.reduce(flat, reduction="mean")
        offset = 0
        for grad in grads:
            grad.copy_(flat[offset:offset + grad.numel()].view_as(grad))
            offset += grad.numel()

    def sample_control_for_prompt(self, prompt):
        """(control, guide images) conditioning a sample prompt's image (ControlNet-LLLite); none here."""
        return None, ()

    def sample_images(self, accelerator, args, epoch, global_step, device, vae, tokenizers, text_encoder, unet):
        if not self._run.sample_prompts:
            return
        from library.train.sample_during_training import sample_images

        encoders_were = [next(encoder.parameters()).device for encoder in self._models.text_encoders]
        for encoder in self._models.text_encoders:
            encoder.to(device)
        vae_was = next(vae.parameters()).device
        vae.to(device)
        network = self._trainable.network
        network.eval()  # no network dropout while sampling
        try:
            sample_images(args, family=self.family, unet=unet, vae=vae, caption_encoder=self._models.caption_encoder,
                          prompts=self._run.sample_prompts, epoch=epoch, global_step=global_step, device=device,
                          dtype=self._run.weight_dtype, default_size=self.default_sample_size(args),
                          process_index=accelerator.process_index, num_processes=accelerator.num_processes,
                          control_for_prompt=self.sample_control_for_prompt)
        finally:
            network.train()
            vae.to(vae_was)
            for encoder, was in zip(self._models.text_encoders, encoders_were):
                encoder.to(was)

    def default_sample_size(self, args) -> tuple[int, int]:
        """kohya samples at 512x512 unless the prompt says otherwise (COMPAT §12)."""
        return (512, 512)

    def training_resolution(self) -> tuple[int, int]:
        """(width, height) of the first dataset (what --resolution or the dataset config gave)."""
        return tuple(self._run.train_group.datasets[0].params.resolution)

    def get_sai_model_spec(self, args) -> dict[str, str]:
        from library.train.metadata import modelspec_metadata

        return modelspec_metadata(args, self.family, kind="lora", started_at=self._run.progress.started_at,
                                  resolution=self.training_resolution())

    def check_network_arguments(self, args) -> None:
        """The network flags: combinations, --network_weights/--base_weights of this family, the module exists."""
        run_setup.check_network_flags(args, len(self.family.text_encoders))
        for flag, paths in (("--network_weights", [args.network_weights]), ("--base_weights", args.base_weights)):
            for path in paths or []:
                if path:
                    network_module.check_network_weights_family(path, self.family.name, flag)
        network_module.import_network_module(args.network_module)

    def output_extension(self, args) -> str:
        """The suffix of saved files ("" for folders)."""
        return "." + args.save_model_as

    def update_metadata(self, metadata: dict, args) -> None:
        """Add family-specific `ss_*` keys (none for SD1/2)."""

    # ------------------------------------------------------------------------------------------------ phases

    def train(self, args: argparse.Namespace) -> Path | None:
        """Run the whole training; returns the path of the final network file (None for --lint_dataset /
        --debug_dataset, which only report on the dataset)."""
        self._run = run = self.prepare_run(args)
        if args.lint_dataset or args.debug_dataset:
            self.report_dataset(run)
            return None
        self._models = models = self.load_models(run)
        self.prepare_conditioning(run, models)
        self._trainable = trainable = self.build_trainable(run, models)
        self.build_optimizer(run, models, trainable)
        self.loop(run, models, trainable)
        return self.finish(run, models, trainable)

    def prepare_run(self, args: argparse.Namespace) -> TrainingRun:
        """Everything that can fail on bad input, before any model weight is read."""
        from library.data.prepare import dataset_group_from_args
        from library.models.load import detect_family
        from library.options.metadata import check_metadata_arguments
        from library.options.noise_loss import check_noise_and_loss_flags
        from library.options.training import weight_dtype

        run_setup.check_output_flags(args)
        run_setup.warn_inert_flags(args)
        run_setup.check_ema_flags(args)
        run_setup.check_precision_flags(args)
        check_noise_and_loss_flags(args)
        check_metadata_arguments(args)
        self.family = detect_family(args.pretrained_model_name_or_path, args.v_parameterization, v2=args.v2,
                                    expected_families=self.supported_families)
        args.v_parameterization = self.family.v_parameterization
        self.check_network_arguments(args)
        sample_prompts = self._load_sample_prompts(args)
        accelerator = run_setup.make_accelerator(args)
        run_setup.check_device_precision(args, accelerator.device)
        if args.seed is not None:
            from accelerate.utils import set_seed

            set_seed(args.seed)
        train_group = dataset_group_from_args(args, self.family, lint=accelerator.is_main_process,
                                              supports_controlnet=self.controlnet_datasets)
        val_group = dataset_group_from_args(args, self.family, validation=True, lint=False,
                                            supports_controlnet=self.controlnet_datasets)
        if args.cache_latents or args.cache_latents_to_disk:
            train_group.check_latents_cacheable()
        if self.is_text_encoder_outputs_cached(args):
            train_group.check_text_encoder_outputs_cacheable()
        self.assert_extra_args(args, train_group, val_group)
        run = TrainingRun(args, self.family, accelerator, weight_dtype(args.mixed_precision), train_group, val_group,
                          sample_prompts=sample_prompts)
        run.schedule = run_setup.training_schedule(args, len(train_group), accelerator.num_processes)
        run_setup.initial_step(args, run.schedule)  # a start past the end fails before models load
        run.names = OutputNames(args.output_dir, args.output_name, self.output_extension(args))
        checkpoints.check_output_folder(run.names, resuming=bool(args.resume), overwrite=args.overwrite_output)
        if accelerator.is_main_process:
            checkpoints.remove_stale_temp_outputs(run.names)
        train_group.set_max_steps(run.schedule.max_train_steps)
        run.progress = TrainProgress(session_id=random.randint(0, 2**32), started_at=time.time())
        return run

    def report_dataset(self, run: TrainingRun) -> None:
        """--lint_dataset: the lint report; --debug_dataset: every batch of the first epoch. No model loads."""
        from library.data.debug import describe_batches

        args = run.args
        if args.lint_dataset and args.skip_dataset_lint:
            raise FlagError("--lint_dataset and --skip_dataset_lint contradict each other; give one of them")
        if args.lint_dataset:
            # the report was logged while the dataset was built (prepare_run); fatal problems stopped it there
            logger.info("--lint_dataset: the dataset was scanned (report above); not training")
        if args.debug_dataset and run.accelerator.is_main_process:
            # the listing is this flag's product, so it goes to stdout
            print("\n".join(describe_batches(run.train_group, epoch=1)))
            logger.info("--debug_dataset: batches listed; not training")

    def _load_sample_prompts(self, args) -> list:
        if not args.sample_prompts:
            return []
        from library.sampling.prompts import load_sample_prompts

        return load_sample_prompts(args.sample_prompts)

    def load_models(self, run: TrainingRun) -> LoadedModels:
        from library.options.training import vae_dtype
        from library.text.conditioning import CaptionEncoder

        args, accelerator = run.args, run.accelerator
        _, text_encoders, vae, unet = self.load_target_model(args, run.weight_dtype, accelerator)
        text_encoders = list(text_encoders) if isinstance(text_encoders, (list, tuple)) else [text_encoders]
        tokenize_strategy = self.get_tokenize_strategy(args)
        tokenizers = self.get_tokenizers(tokenize_strategy)
        for model in (vae, *text_encoders):
            model.requires_grad_(False)
            model.eval()
        if unet is not None:  # None: load_unet_lazily gives it after text-encoder caching (prepare_conditioning)
            self._prepare_frozen_unet(run, unet, vae, text_encoders)
        if self.cast_vae(args):
            vae.to(dtype=vae_dtype(args.mixed_precision, args.no_half_vae))
        caption_encoder = CaptionEncoder(self.family, tokenizers, text_encoders,
                                         max_token_length=args.max_token_length, clip_skip=args.clip_skip,
                                         weighted=args.weighted_captions)
        models = LoadedModels(unet, vae, text_encoders, tokenizers, caption_encoder,
                              self.get_noise_scheduler(args, accelerator.device), tokenize_strategy)
        self._models = models
        models.text_encoding_strategy = self.get_text_encoding_strategy(args)
        return models

    def _prepare_frozen_unet(self, run: TrainingRun, unet, vae, text_encoders) -> None:
        """Freeze the U-Net, merge --base_weights, set attention, cast (cast_unet) and store fp8 (--fp8_base)."""
        args = run.args
        unet.requires_grad_(False)
        unet.eval()
        if args.base_weights:
            network_module.apply_base_weights(args.network_module, args.base_weights, args.base_weights_multiplier,
                                              vae, text_encoders, unet, torch.float32, "cpu")
        self._set_attention(args, unet)
        if self.cast_unet(args):
            unet.to(dtype=run.weight_dtype)
        if args.fp8_base or args.fp8_base_unet:
            cast_to_fp8(unet)

    def _load_unet_lazily(self, run: TrainingRun, models: LoadedModels) -> None:
        """kohya's order: after text-encoder caching, `load_unet_lazily` returns (unet, text_encoders); the
        encoders may come back freed or replaced (their outputs are cached by then)."""
        from library.text.conditioning import CaptionEncoder

        unet, text_encoders = self.load_unet_lazily(run.args, run.weight_dtype, run.accelerator, models.text_encoders)
        text_encoders = list(text_encoders) if isinstance(text_encoders, (list, tuple)) else [text_encoders]
        if text_encoders != models.text_encoders:
            old = models.caption_encoder
            models.caption_encoder = CaptionEncoder(old.family, old.tokenizers, text_encoders,
                                                    max_token_length=old.max_token_length, clip_skip=old.clip_skip,
                                                    weighted=old.weighted)
            models.text_encoders = text_encoders
        self._prepare_frozen_unet(run, unet, models.vae, models.text_encoders)
        models.unet = unet

    def _set_attention(self, args, unet) -> None:
        if args.xformers:
            unet.enable_xformers_memory_efficient_attention()
            logger.info("attention: xformers")
        else:
            from diffusers.models.attention_processor import AttnProcessor2_0

            unet.set_attn_processor(AttnProcessor2_0())  # PyTorch SDPA (also serves --mem_eff_attn)

    def prepare_conditioning(self, run: TrainingRun, models: LoadedModels) -> None:
        """Latent cache (--cache_latents[_to_disk]) and text-encoder output cache; the VAE leaves the GPU after."""
        args, accelerator = run.args, run.accelerator
        caching = self.get_latents_caching_strategy(args)  # kohya asks for it at every start
        if args.cache_latents or args.cache_latents_to_disk:
            from library.data.caching import attach_existing_caches, cache_latents

            models.vae.to(accelerator.device)
            for group in (run.train_group, run.val_group):
                if group is None:
                    continue
                cache_latents(group, models.vae, to_disk=caching.cache_to_disk, latent_suffix=caching.cache_suffix,
                              vae_batch_size=caching.batch_size, skip_check=caching.skip_disk_cache_validity_check,
                              process_index=accelerator.process_index, num_processes=accelerator.num_processes,
                              seed=args.seed or 0, show_progress=accelerator.is_main_process)
                if caching.cache_to_disk:
                    accelerator.wait_for_everyone()
                    attach_existing_caches(group, latent_suffix=caching.cache_suffix, text_outputs=False)
            if not args.highvram:  # kohya's --highvram keeps models on the GPU after caching
                models.vae.to("cpu")
        else:
            models.vae.to(accelerator.device)
        for group in (run.train_group, run.val_group):
            if group is not None:
                self.cache_text_encoder_outputs_if_needed(args, accelerator, models.unet, models.vae,
                                                          models.text_encoders, group, run.weight_dtype)
        if models.unet is None:
            self._load_unet_lazily(run, models)
        offloaded = self.is_text_encoder_not_needed_for_training(args) and not args.highvram
        if args.fp8_base and not args.fp8_base_unet and not offloaded:
            # kohya: after caching (which encodes in the mixed dtype), --fp8_base stores the encoders in fp8 too
            for index, encoder in enumerate(models.text_encoders):
                self.prepare_text_encoder_fp8(index, encoder, torch.float8_e4m3fn, run.weight_dtype)

    def build_trainable(self, run: TrainingRun, models: LoadedModels) -> Trainable:
        """Create the network, hook it into the models and load --network_weights."""
        args = run.args
        network = self.make_network(run, models)
        self.post_process_network(args, run.accelerator, network, models.text_encoders, models.unet)
        return self._apply_network(run, models, network)

    def make_network(self, run: TrainingRun, models: LoadedModels):
        """The network of --network_module, created for the loaded models (not yet applied to them)."""
        args = run.args
        module = network_module.import_network_module(args.network_module)
        kwargs = network_module.network_kwargs(args.network_args, args.network_dropout)
        if args.dim_from_weights:
            network, _ = network_module.create_network_from_weights(
                module, args.network_multiplier, args.network_weights, models.vae, models.text_encoders, models.unet,
                **kwargs)
        else:
            network = network_module.create_network(
                module, multiplier=args.network_multiplier, network_dim=args.network_dim,
                network_alpha=args.network_alpha, vae=models.vae, text_encoders=models.text_encoders,
                unet=models.unet, kwargs=kwargs, output_dir=args.output_dir, network_dropout=args.network_dropout)
        if network is None:
            raise TrainingStopped(f"--network_module {args.network_module} created no network; nothing to train")
        if hasattr(network, "prepare_network"):
            network.prepare_network(args)
        network_module.apply_loraplus_flags(network, args.network_module, args.loraplus_lr_ratio,
                                            args.loraplus_unet_lr_ratio, args.loraplus_text_encoder_lr_ratio)
        return network

    def _apply_network(self, run: TrainingRun, models: LoadedModels, network) -> Trainable:
        args = run.args
        train_unet = not args.network_train_text_encoder_only
        encoder_flags = self.get_text_encoders_train_flags(args, models.text_encoders)
        train_text_encoder = any(encoder_flags)
        encoders = models.text_encoders[0] if len(models.text_encoders) == 1 else models.text_encoders
        network.apply_to(encoders, models.unet, train_text_encoder, train_unet)
        if args.torch_compile:
            # after apply_to, so the compiled graph includes the network's patched forwards
            models.unet = torch.compile(models.unet, **run_setup.torch_compile_kwargs(args))
        if args.network_weights:
            info = network.load_weights(args.network_weights)
            logger.info("loaded network weights from %s: %s", args.network_weights, info)
        trained_encoders = [(index, encoder) for index, (encoder, flag) in
                            enumerate(zip(models.text_encoders, encoder_flags)) if flag]
        if args.gradient_checkpointing:
            models.unet.enable_gradient_checkpointing()
            for index, encoder in trained_encoders:
                encoder.gradient_checkpointing_enable()
                self.prepare_text_encoder_grad_ckpt_workaround(index, encoder)
            network.enable_gradient_checkpointing()
        for _, encoder in trained_encoders:
            encoder.train()
        network_dtype = {True: torch.float16}.get(args.full_fp16) or {True: torch.bfloat16}.get(args.full_bf16)
        network.to(run.accelerator.device, dtype=network_dtype)
        if train_unet:  # kohya: after the network is applied, so its modules are built on the plain U-Net
            models.prepared_unet = self.prepare_unet_with_accelerator(args, run.accelerator, models.unet)
        else:
            models.unet.to(run.accelerator.device)
        logger.info("%s", network_module.describe_network(network))
        self.check_disk_space(run, network)
        trainable = Trainable(network, train_unet, train_text_encoder)
        if args.use_ema:
            from library.train.ema import ParameterEMA, trainable_parameters

            trainable.ema = ParameterEMA(trainable_parameters(network), decay=args.ema_decay,
                                         warmup=not args.no_ema_warmup, device=args.ema_device)
            logger.info("EMA of %d trained tensors, decay %g%s, kept on %s", len(trainable.ema.shadows),
                        args.ema_decay, "" if args.no_ema_warmup else " (warm-up)", args.ema_device or "their device")
        return trainable

    def check_disk_space(self, run: TrainingRun, network) -> None:
        """Before the loop: is there room in --output_dir for the saves the flags ask for?"""
        from library.models.save import precision_dtype
        from library.output_folders import check_free_space

        args = run.args
        save_dtype = precision_dtype(args.save_precision)
        tensors = list(network.state_dict().values())
        file_size = sum(t.numel() * (t.element_size() if save_dtype is None or not t.is_floating_point()
                                     else save_dtype.itemsize) for t in tensors)
        parameter_bytes = sum(p.numel() * p.element_size() for p in network.parameters() if p.requires_grad)
        # a state holds the network and the optimizer's buffers (two per parameter for the Adam family)
        state_size = sum(t.numel() * t.element_size() for t in tensors) + 2 * parameter_bytes
        saves = checkpoints.planned_saves(args, run.schedule.num_epochs, run.schedule.max_train_steps)
        planned = saves.files_kept * file_size + saves.states_kept * state_size
        minimum = file_size + (state_size if saves.states_written else 0)
        check_free_space(args.output_dir, minimum=minimum, planned=planned, flag="--output_dir",
                         minimum_what="the final network" + (" and its state" if saves.states_written else ""),
                         planned_what=f"the {saves.files_written} network file(s)"
                                      + (f" and {saves.states_written} state folder(s)" if saves.states_written
                                         else "") + " the flags ask for")

    def build_optimizer(self, run: TrainingRun, models: LoadedModels, trainable: Trainable) -> None:
        from library.train.lr_schedulers import get_scheduler
        from library.train.metadata import training_metadata
        from library.train.optimizers import parse_optimizer_args, resolve_optimizer_type

        args, accelerator, schedule = run.args, run.accelerator, run.schedule
        groups, trainable.group_names = network_module.optimizer_param_groups(
            trainable.network, text_encoder_lrs=args.text_encoder_lr, unet_lr=args.unet_lr,
            learning_rate=args.learning_rate)
        if not any(group["params"] and group.get("lr", 0) > 0 for group in groups):
            raise FlagError(f"--network_module {args.network_module}: no parameter would train (the network has "
                            "no modules for the parts being trained, or their learning rates are 0)")
        optimizer_type = resolve_optimizer_type(args.optimizer_type, args.use_8bit_adam, args.use_lion_optimizer)
        class_path, arguments, optimizer = self.create_optimizer(args, optimizer_type, groups,
                                                                 parse_optimizer_args(args.optimizer_args))
        trainable.optimizer_description = class_path + (f"({arguments})" if arguments else "")
        lr_scheduler = get_scheduler(
            args.lr_scheduler, optimizer, num_warmup_steps=args.lr_warmup_steps,
            num_training_steps=schedule.max_train_steps, num_decay_steps=args.lr_decay_steps,
            num_cycles=args.lr_scheduler_num_cycles, power=args.lr_scheduler_power,
            timescale=args.lr_scheduler_timescale, min_lr_ratio=args.lr_scheduler_min_lr_ratio,
            scheduler_type=args.lr_scheduler_type, scheduler_args=args.lr_scheduler_args,
            num_processes=accelerator.num_processes)
        if args.full_fp16:
            _allow_fp16_gradient_unscaling(accelerator)
        if _uses_deepspeed(accelerator):
            # DeepSpeed's engine owns the network's gradients (reduction, clipping) and its optimizer step; the
            # hooks keep calling the plain network; the engine only has to exist for accelerator.backward
            trainable.engine, trainable.optimizer, trainable.lr_scheduler = accelerator.prepare(
                trainable.network, optimizer, lr_scheduler)
        else:
            # the network is not DDP-wrapped: its forward runs inside the frozen models (see all_reduce_network)
            trainable.optimizer, trainable.lr_scheduler = accelerator.prepare(optimizer, lr_scheduler)
        if args.resume:
            from library.train import hub

            run.progress = self.load_state(run, trainable, hub.resume_folder(args)).position_from_step(
                schedule.steps_per_epoch, schedule.accumulation)
        run.progress = run_setup.start_position(args, schedule, run.progress)
        warmup = getattr(lr_scheduler, "warmup_steps", None) or 0
        trainable.metadata = training_metadata(
            args, self.family, session_id=run.progress.session_id or 0, started_at=run.progress.started_at or 0.0,
            train_group=run.train_group, val_group=run.val_group,
            num_batches_per_epoch=schedule.batches_per_epoch, num_epochs=schedule.num_epochs,
            max_train_steps=schedule.max_train_steps, optimizer_description=trainable.optimizer_description,
            network_module=args.network_module, network_args=network_module.network_kwargs(
                args.network_args, args.network_dropout) if args.network_args else None,
            lr_warmup_steps=warmup, num_processes=accelerator.num_processes)
        self.update_metadata(trainable.metadata, args)
        trainable.modelspec = self.get_sai_model_spec(args)

    def create_optimizer(self, args, optimizer_type: str, groups: list[dict], optimizer_args: dict):
        """(class path, arguments, optimizer) of --optimizer_type over the param groups."""
        from library.train.optimizers import get_optimizer

        return get_optimizer(optimizer_type, groups, args.learning_rate, optimizer_args)

    def loop(self, run: TrainingRun, models: LoadedModels, trainable: Trainable) -> None:
        from library.train.training_loop import run_training_loop

        run_training_loop(self, run, models, trainable)

    def finish(self, run: TrainingRun, models: LoadedModels, trainable: Trainable) -> Path:
        accelerator, args = run.accelerator, run.args
        accelerator.wait_for_everyone()
        final = run.names.last_file()
        from library.train import hub
        from library.train.training_loop import optimizer_eval_mode

        with optimizer_eval_mode(trainable.optimizer), trainable.ema_weights():
            self.save_network_file(run, trainable, final, epoch=run.schedule.num_epochs)
        if accelerator.is_main_process:
            hub.upload_saved(args, final, force_sync=True)  # kohya uploads the last file synchronously
        if args.save_state or args.save_state_on_train_end:
            self.save_state(run, trainable, run.names.last_state())
            if accelerator.is_main_process:
                hub.upload_saved(args, run.names.last_state())
        if accelerator.is_main_process:
            hub.wait_for_uploads()
        accelerator.end_training()
        if accelerator.is_main_process:
            logger.info("training finished: %s (%d steps)", final, run.progress.global_step)
        return final

    # --------------------------------------------------------------------------------------------- saving

    def save_network(self, run: TrainingRun, trainable: Trainable, path: Path, epoch: int) -> None:
        """Write the network file (main process). Through a temp file: a network module's own save_weights
        (LyCORIS') may not write atomically."""
        from library.models.save import precision_dtype
        from library.models.state_dict_io import atomic_output
        from library.train.metadata import metadata_for_save

        metadata = metadata_for_save(trainable.metadata, trainable.modelspec, steps=run.progress.global_step,
                                     epoch=epoch, finished_at=time.time(), no_metadata=run.args.no_metadata)
        with atomic_output(path) as temp:
            trainable.network.save_weights(str(temp), precision_dtype(run.args.save_precision), metadata)
        logger.info("saved %s", path)

    def save_network_file(self, run: TrainingRun, trainable: Trainable, path: Path, epoch: int) -> None:
        """`save_network` on the main process, agreed by all. On a full disk the network is written to the
        system's temp folder instead and the run stops, saying where it is: the training is never lost."""
        accelerator = run.accelerator
        failure: Exception | None = None
        if accelerator.is_main_process:
            try:
                self.save_network(run, trainable, path, epoch)
            except DiskFullError as error:
                failure = self._rescue_network(run, trainable, path, epoch, error)
        if not state_folder.all_processes_ok(accelerator, failure is None):
            raise failure or TrainingStopped(f"saving {path} failed on the main process; see its message")

    def _rescue_network(self, run: TrainingRun, trainable: Trainable, path: Path, epoch: int,
                        error: DiskFullError) -> TrainingStopped:
        import tempfile

        rescue = Path(tempfile.gettempdir()) / path.name
        if rescue.exists():
            rescue = rescue.with_name(f"{path.stem}-{run.progress.session_id}-{run.progress.global_step}{path.suffix}")
        try:
            self.save_network(run, trainable, rescue, epoch)
        except Exception as second:  # noqa: BLE001 - reported in the one line below
            return TrainingStopped(f"{error}. Saving the network to {rescue} instead failed too ({second}); the "
                                   f"network of step {run.progress.global_step} could not be kept")
        return TrainingStopped(f"{error}. The network of step {run.progress.global_step} was saved to {rescue} "
                               "instead; move it where you want it")

    def save_state(self, run: TrainingRun, trainable: Trainable, folder: Path) -> None:
        """`--save_state`: every process writes its part (see library/train/state_folder.py)."""
        if _uses_deepspeed(run.accelerator):
            state_folder.save_engine_state(run.accelerator, folder, run.progress, ema=trainable.ema)
            return
        state_folder.save_state(run.accelerator, folder, run.progress, trainable.network, trainable.optimizer,
                                trainable.lr_scheduler, ema=trainable.ema)

    def load_state(self, run: TrainingRun, trainable: Trainable, folder: Path) -> TrainProgress:
        """`--resume`: check every file of the state against this run, then restore it."""
        if _uses_deepspeed(run.accelerator):
            return state_folder.load_engine_state(run.accelerator, folder, ema=trainable.ema)
        return state_folder.load_state(run.accelerator, folder, trainable.network, trainable.optimizer,
                                       trainable.lr_scheduler, ema=trainable.ema)


def _uses_deepspeed(accelerator) -> bool:
    return str(accelerator.distributed_type).endswith("DEEPSPEED")


def _allow_fp16_gradient_unscaling(accelerator) -> None:
    """--full_fp16: torch's GradScaler refuses fp16 gradients; unscale them anyway (kohya does the same)."""
    scaler = getattr(accelerator, "scaler", None)
    if scaler is None:
        raise FlagError("--full_fp16 needs a GPU with fp16 mixed precision (no gradient scaler is active)")
    original = scaler._unscale_grads_

    def unscale_allowing_fp16(optimizer, inv_scale, found_inf, allow_fp16):
        return original(optimizer, inv_scale, found_inf, True)

    scaler._unscale_grads_ = unscale_allowing_fp16
