"""Flags shared by training and caching scripts: seed, precision, length and saving of a run, DeepSpeed, the Hugging
Face Hub and logging (kohya spelling and defaults). What the flags do lives in library/train."""
from __future__ import annotations

import argparse
from typing import TYPE_CHECKING

from library.options.value_types import non_negative_int, positive_int

if TYPE_CHECKING:
    import torch

# --mixed_precision name -> torch dtype name (looked up after parsing, so --help does not load torch)
PRECISIONS = {"no": "float32", "fp16": "float16", "bf16": "bfloat16"}


def add_ema_arguments(parser: argparse.ArgumentParser) -> None:
    """EMA of the trained weights (kohya has none; library/train/ema.py)."""
    group = parser.add_argument_group("EMA (exponential moving average of the trained weights)")
    group.add_argument("--use_ema", action="store_true",
                       help="keep an fp32 EMA of the trained weights, updated after every optimizer step; every "
                            "saved file and sample image then uses the EMA weights (validation and the "
                            "training itself use the live ones); the EMA is part of --save_state")
    group.add_argument("--ema_decay", type=float, default=0.9999,
                       help="EMA decay, between 0 and 1 exclusive (default 0.9999)")
    group.add_argument("--no_ema_warmup", action="store_true",
                       help="use --ema_decay from the first step; by default the decay warms up as in diffusers' "
                            "EMAModel: 0 at step 1, then min(decay, step / (step + 9))")
    group.add_argument("--ema_device", type=str, default=None, choices=(None, "cpu"),
                       help="cpu: keep the EMA copy in system RAM instead of beside the weights (saves GPU memory)")


def add_training_arguments(parser: argparse.ArgumentParser) -> None:
    add_ema_arguments(parser)
    group = parser.add_argument_group("training")
    group.add_argument("--seed", type=int, default=None,
                       help="random seed for batch order, augmentation and noise (default: none, 0 for data order)")
    group.add_argument("--mixed_precision", type=str, default="no", choices=tuple(PRECISIONS),
                       help="compute dtype of the frozen models: no (float32), fp16 or bf16")
    group.add_argument("--no_half_vae", action="store_true",
                       help="keep the VAE in float32 even with --mixed_precision fp16/bf16 (the SDXL VAE overflows "
                            "in fp16)")


def weight_dtype(mixed_precision: str | None) -> torch.dtype:
    """dtype of the frozen weights for `--mixed_precision`."""
    import torch

    return getattr(torch, PRECISIONS.get(mixed_precision or "no", "float32"))


def vae_dtype(mixed_precision: str | None, no_half_vae: bool) -> torch.dtype:
    import torch

    return torch.float32 if no_half_vae else weight_dtype(mixed_precision)



def add_output_arguments(parser: argparse.ArgumentParser) -> None:
    """Where a training run writes, and how often (kohya's flags, COMPAT §17)."""
    group = parser.add_argument_group("output and saving")
    group.add_argument("--output_dir", type=str, default=None,
                       help="folder for the trained files, samples and states (checked at start: it must be writable, "
                            "with room for the saves the flags ask for)")
    group.add_argument("--output_name", type=str, default=None,
                       help="base name of the saved files, a file name without folders (default: 'last' for the "
                            "final file, 'epoch'/'at' for intermediate ones, as kohya)")
    group.add_argument("--save_every_n_epochs", type=positive_int, default=None, help="save every N epochs")
    group.add_argument("--save_every_n_steps", type=positive_int, default=None, help="save every N optimizer steps")
    group.add_argument("--save_last_n_epochs", type=positive_int, default=None,
                       help="keep only the files of the last N epoch saves (older ones are deleted)")
    group.add_argument("--save_last_n_epochs_state", type=positive_int, default=None,
                       help="keep only the last N epoch states (default: --save_last_n_epochs)")
    group.add_argument("--save_last_n_steps", type=positive_int, default=None,
                       help="keep only the step saves of the last N steps (older ones are deleted)")
    group.add_argument("--save_last_n_steps_state", type=positive_int, default=None,
                       help="keep only the step states of the last N steps (default: --save_last_n_steps)")
    group.add_argument("--save_state", action="store_true",
                       help="with every save, also save the training state (network, optimizer, scheduler, RNG, "
                            "data position) to a '-state' folder for --resume (accelerate's layout, as kohya)")
    group.add_argument("--save_state_on_train_end", action="store_true",
                       help="save the training state once at the end of training")
    group.add_argument("--resume", type=str, default=None,
                       help="resume from a '-state' folder: the run continues exactly where it stopped. Every file "
                            "is checked against this run first and read without unpickling code (a file that would "
                            "need it is refused)")
    group.add_argument("--overwrite_output", action="store_true",
                       help="allow replacing files and '-state' folders of the same name already in --output_dir "
                            "(default: refuse)")
    group.add_argument("--save_n_epoch_ratio", type=positive_int, default=None,
                       help="save about R times over the run: every max(1, floor(epochs / R)) epochs (replaces "
                            "--save_every_n_epochs, as kohya)")
    _add_huggingface_arguments(parser)


def _add_huggingface_arguments(parser: argparse.ArgumentParser) -> None:
    """kohya's Hugging Face Hub flags (library/train/hub.py uploads and downloads)."""
    group = parser.add_argument_group("Hugging Face Hub")
    group.add_argument("--huggingface_repo_id", type=str, default=None,
                       help="upload every saved network file to this Hub repository (owner/name; created when "
                            "missing)")
    group.add_argument("--huggingface_repo_type", type=str, default=None, choices=(None, "model", "dataset", "space"),
                       help="type of the Hub repository (default model)")
    group.add_argument("--huggingface_path_in_repo", type=str, default=None,
                       help="folder inside the Hub repository for the uploads (default: its top level)")
    group.add_argument("--huggingface_token", type=str, default=None,
                       help="Hub access token (default: the one `huggingface-cli login` stored; never written by "
                            "--output_config)")
    group.add_argument("--huggingface_repo_visibility", type=str, default=None, choices=(None, "public", "private"),
                       help="visibility of a repository created for the uploads: public, or private (default)")
    group.add_argument("--save_state_to_huggingface", action="store_true",
                       help="also upload every saved '-state' folder to --huggingface_repo_id")
    group.add_argument("--resume_from_huggingface", action="store_true",
                       help="--resume names a state folder on the Hub: owner/name/path/in/repo[:revision[:repo_type]]; "
                            "it is downloaded to the Hub cache first")
    group.add_argument("--async_upload", action="store_true",
                       help="upload in a background thread while training goes on (the final file is always "
                            "uploaded before the run ends)")


def add_training_loop_arguments(parser: argparse.ArgumentParser) -> None:
    """Length of training, precision and memory/speed switches (kohya spelling and defaults)."""
    group = parser.add_argument_group("training loop")
    group.add_argument("--max_train_steps", type=positive_int, default=1600, help="optimizer steps (default 1600)")
    group.add_argument("--max_train_epochs", type=positive_int, default=None,
                       help="train this many epochs (overrides --max_train_steps)")
    group.add_argument("--gradient_accumulation_steps", type=positive_int, default=1,
                       help="batches whose gradients are summed before each optimizer step (default 1)")
    group.add_argument("--gradient_checkpointing", action="store_true",
                       help="recompute activations in the backward pass: much less memory, about 20%% slower")
    group.add_argument("--full_fp16", action="store_true",
                       help="keep the trained weights and gradients in fp16 too (needs --mixed_precision fp16)")
    group.add_argument("--full_bf16", action="store_true",
                       help="keep the trained weights and gradients in bf16 too (needs --mixed_precision bf16)")
    group.add_argument("--fp8_base", action="store_true",
                       help="store the frozen U-Net (and text encoders) in float8 and compute in the mixed precision "
                            "dtype (needs --mixed_precision fp16/bf16)")
    group.add_argument("--fp8_base_unet", action="store_true", help="like --fp8_base, for the U-Net only")
    group.add_argument("--sdpa", action="store_true", help="use PyTorch scaled-dot-product attention (the default)")
    group.add_argument("--xformers", action="store_true", help="use xformers memory-efficient attention (GPU)")
    group.add_argument("--mem_eff_attn", action="store_true",
                       help="kohya's memory-efficient attention; served by PyTorch SDPA here")
    group.add_argument("--lowram", action="store_true",
                       help="no effect here (warned at start): models are already read tensor by tensor, so system "
                            "RAM never holds two copies")
    group.add_argument("--highvram", action="store_true",
                       help="keep the VAE and frozen text encoders on the GPU after caching latents/text-encoder "
                            "outputs instead of moving them to system RAM (faster sampling, more VRAM)")
    group.add_argument("--ddp_timeout", type=int, default=None,
                       help="minutes before a distributed collective times out")
    group.add_argument("--ddp_gradient_as_bucket_view", action="store_true",
                       help="no effect here (warned at start): the network is not wrapped in DDP; its gradients are "
                            "averaged once per step")
    group.add_argument("--ddp_static_graph", action="store_true",
                       help="no effect here (warned at start): the network is not wrapped in DDP; its gradients are "
                            "averaged once per step")
    group.add_argument("--max_validation_steps", type=positive_int, default=None,
                       help="validation batches per validation run (default: all)")
    group.add_argument("--validate_every_n_steps", type=positive_int, default=None,
                       help="compute the validation loss every N steps (needs validation_split)")
    group.add_argument("--validate_every_n_epochs", type=positive_int, default=None,
                       help="compute the validation loss every N epochs (default: every epoch with validation_split)")
    _add_start_position_arguments(group)
    _add_compile_arguments(group)
    _add_deepspeed_arguments(parser)


def _add_start_position_arguments(group: argparse._ArgumentGroup) -> None:
    """kohya's --initial_epoch / --initial_step / --skip_until_initial_step (train_network.py)."""
    group.add_argument("--initial_epoch", type=positive_int, default=None,
                       help="start at epoch N (1, the default, is the first): without --skip_until_initial_step only "
                            "the epoch numbering (file names, epoch saves) starts there and the run ends after the "
                            "last epoch; the learning-rate schedule starts at 0 unless --resume restores it")
    group.add_argument("--initial_step", type=non_negative_int, default=None,
                       help="start at optimizer step N over all epochs (0, the default, is the first); overrides "
                            "--initial_epoch; without --skip_until_initial_step only the epoch that holds step N "
                            "sets the epoch numbering")
    group.add_argument("--skip_until_initial_step", action="store_true",
                       help="continue at --initial_step (or --initial_epoch) on the batches the run would see "
                            "there, skipping the earlier ones; the step count starts there too")


def _add_compile_arguments(group: argparse._ArgumentGroup) -> None:
    group.add_argument("--torch_compile", action="store_true", help="compile the U-Net with torch.compile")
    group.add_argument("--dynamo_backend", type=str, default="inductor",
                       help="torch.compile backend (default inductor)")
    group.add_argument("--dynamo_mode", type=str, default=None, choices=(None, "default", "reduce-overhead",
                                                                       "max-autotune"),
                       help="torch.compile mode (default: torch's default)")
    group.add_argument("--dynamo_fullgraph", action="store_true",
                       help="torch.compile with fullgraph=True (fail instead of splitting the graph)")
    group.add_argument("--dynamo_dynamic", action="store_true",
                       help="torch.compile with dynamic=True (shapes may change without recompiling)")


def _add_deepspeed_arguments(parser: argparse.ArgumentParser) -> None:
    """kohya's DeepSpeed flags (library/deepspeed_utils.py), passed to accelerate's DeepSpeedPlugin."""
    group = parser.add_argument_group("DeepSpeed (needs the deepspeed package and `accelerate launch`)")
    group.add_argument("--deepspeed", action="store_true", help="train with DeepSpeed ZeRO through accelerate")
    group.add_argument("--zero_stage", type=int, default=2, choices=(0, 1, 2, 3),
                       help="ZeRO stage: 0, 1, 2 (default: shard optimizer state and gradients) or 3 (also weights)")
    group.add_argument("--offload_optimizer_device", type=str, default=None, choices=(None, "cpu", "nvme"),
                       help="keep the optimizer state on cpu or nvme (ZeRO stages 2 and 3)")
    group.add_argument("--offload_optimizer_nvme_path", type=str, default=None,
                       help="folder on an NVMe drive for --offload_optimizer_device nvme")
    group.add_argument("--offload_param_device", type=str, default=None, choices=(None, "cpu", "nvme"),
                       help="keep the weights on cpu or nvme (ZeRO stage 3)")
    group.add_argument("--offload_param_nvme_path", type=str, default=None,
                       help="folder on an NVMe drive for --offload_param_device nvme")
    group.add_argument("--zero3_init_flag", action="store_true",
                       help="build the models with deepspeed.zero.Init (ZeRO stage 3, for models larger than memory)")
    group.add_argument("--zero3_save_16bit_model", action="store_true",
                       help="gather 16-bit weights when saving under ZeRO stage 3")
    group.add_argument("--fp16_master_weights_and_gradients", action="store_true",
                       help="keep fp16 master weights and gradients with fp32 optimizer state (DeepSpeed's CPU Adam: "
                            "--offload_optimizer_device cpu and --zero_stage 2 only)")


def add_logging_arguments(parser: argparse.ArgumentParser) -> None:
    group = parser.add_argument_group("logging")
    group.add_argument("--logging_dir", type=str, default=None,
                       help="write TensorBoard logs under this folder (one sub-folder per run)")
    group.add_argument("--log_with", type=str, default=None, choices=(None, "tensorboard", "wandb", "all"),
                       help="tracker: tensorboard (default when --logging_dir is given), wandb or all")
    group.add_argument("--log_prefix", type=str, default=None, help="prefix of the run folder name under --logging_dir (<logging_dir>/<prefix><time>/<tracker name>)")
    group.add_argument("--log_tracker_name", type=str, default=None, help="tracker project name (default network_train): with TensorBoard, the folder inside the run "
                            "folder under --logging_dir")
    group.add_argument("--log_tracker_config", type=str, default=None, help="TOML of extra tracker init arguments")
    group.add_argument("--wandb_run_name", type=str, default=None, help="W&B run name")
    group.add_argument("--wandb_api_key", type=str, default=None,
                       help="W&B API key (better: `wandb login` once; the key is never written to configs)")
    group.add_argument("--log_config", action="store_true", help="log the arguments to the tracker")
    group.add_argument("--console_log_level", type=str.upper, default=None,
                       choices=(None, "DEBUG", "INFO", "WARNING", "ERROR", "CRITICAL"),
                       help="console logging level: DEBUG (also shows tracebacks), INFO (default), WARNING, ERROR, "
                            "CRITICAL")
    group.add_argument("--console_log_file", type=str, default=None,
                       help="also write the log lines to this file (overwritten at start)")
    group.add_argument("--console_log_simple", action="store_true",
                       help="log plain message lines, without time, level and module")
