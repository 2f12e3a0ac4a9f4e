"""`--deepspeed` and its ZeRO flags turned into accelerate's DeepSpeedPlugin, as kohya's
library/deepspeed_utils.prepare_deepspeed_plugin does. Wrapping the models is the trainer's business."""
from __future__ import annotations

import argparse
import importlib
import importlib.util
import logging
import os

from library.errors import FlagError

logger = logging.getLogger(__name__)

_ONLY_WITH_DEEPSPEED = ("offload_optimizer_device", "offload_optimizer_nvme_path", "offload_param_device",
                        "offload_param_nvme_path", "zero3_init_flag", "zero3_save_16bit_model",
                        "fp16_master_weights_and_gradients")


def check_deepspeed_flags(args: argparse.Namespace) -> None:
    """The package is there, and an nvme offload has its folder; ZeRO flags without --deepspeed are warned.

    Raises:
        FlagError: --deepspeed without the deepspeed package, or an nvme offload without its path.
    """
    if not getattr(args, "deepspeed", False):
        given = [key for key in _ONLY_WITH_DEEPSPEED if getattr(args, key, None)]
        given += ["zero_stage"] if getattr(args, "zero_stage", 2) != 2 else []
        if given:
            logger.warning("%s ha%s no effect without --deepspeed; ignored", ", ".join(f"--{key}" for key in given),
                           "ve" if len(given) > 1 else "s")
        return
    if importlib.util.find_spec("deepspeed") is None:
        raise FlagError("--deepspeed needs the deepspeed package: pip install deepspeed")
    for kind in ("optimizer", "param"):
        if getattr(args, f"offload_{kind}_device", None) == "nvme" and not getattr(args, f"offload_{kind}_nvme_path"):
            raise FlagError(f"--offload_{kind}_device nvme needs --offload_{kind}_nvme_path (a folder on the NVMe "
                            "drive)")


def deepspeed_plugin(args: argparse.Namespace):
    """accelerate's DeepSpeedPlugin for the flags, or None without --deepspeed (kohya's values and fixes:
    micro batch = --train_batch_size, fp16 loss scale starting at 2^0, fp16 master weights only with ZeRO-2
    and CPU-offloaded Adam)."""
    check_deepspeed_flags(args)
    if not getattr(args, "deepspeed", False):
        return None
    from accelerate.utils import DeepSpeedPlugin

    plugin = DeepSpeedPlugin(
        zero_stage=args.zero_stage, gradient_accumulation_steps=args.gradient_accumulation_steps,
        gradient_clipping=args.max_grad_norm, offload_optimizer_device=args.offload_optimizer_device,
        offload_optimizer_nvme_path=args.offload_optimizer_nvme_path, offload_param_device=args.offload_param_device,
        offload_param_nvme_path=args.offload_param_nvme_path, zero3_init_flag=args.zero3_init_flag,
        zero3_save_16bit_model=args.zero3_save_16bit_model)
    batch_size = getattr(args, "train_batch_size", 1) or 1
    plugin.deepspeed_config["train_micro_batch_size_per_gpu"] = batch_size
    plugin.deepspeed_config["train_batch_size"] = (batch_size * args.gradient_accumulation_steps
                                                   * int(os.environ.get("WORLD_SIZE", "1")))
    plugin.set_mixed_precision(args.mixed_precision)
    if args.mixed_precision == "fp16":
        plugin.deepspeed_config["fp16"]["initial_scale_power"] = 0  # kohya: a 2^16 start overflows at once
    if args.full_fp16 or args.fp16_master_weights_and_gradients:
        if args.offload_optimizer_device == "cpu" and args.zero_stage == 2:
            plugin.deepspeed_config["fp16"]["fp16_master_weights_and_grads"] = True
            logger.info("DeepSpeed: fp16 master weights and gradients")
        else:
            logger.warning("DeepSpeed: fp16 master weights and gradients need --offload_optimizer_device cpu and "
                           "--zero_stage 2 (DeepSpeed's CPU Adam); not used")
    if args.offload_optimizer_device is not None:
        # kohya builds DeepSpeed's CPU Adam kernel up front, so a missing compiler fails here and not mid-run
        importlib.import_module("deepspeed.ops.op_builder").CPUAdamBuilder().load()
    return plugin
