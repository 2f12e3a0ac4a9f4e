"""kohya flags settled before models load: --save_n_epoch_ratio (save schedule, pruning, planned saves), more
--text_encoder_lr values than encoders, --fused_backward_pass, and --deepspeed passed to accelerate's
DeepSpeedPlugin (accelerate's Accelerator is replaced by a recorder; deepspeed itself is faked or absent)."""
from __future__ import annotations

import importlib.machinery
import importlib.util
import logging
import sys
import types

import pytest

import train_network
from library.errors import FlagError
from library.train import checkpoints, run_setup
from library.train.checkpoints import OutputNames


def _args(*flags: str):
    return train_network.setup_parser().parse_args(list(flags))


@pytest.mark.parametrize(("flags", "num_epochs", "due"), [
    (["--save_n_epoch_ratio", "3"], 10, [3, 6, 9]),
    (["--save_n_epoch_ratio", "3", "--save_every_n_epochs", "5"], 10, [3, 6, 9]),  # the ratio replaces it
    (["--save_n_epoch_ratio", "20"], 4, [1, 2, 3]),  # at least every epoch
    (["--save_every_n_epochs", "4"], 10, [4, 8]),
])
def test_save_n_epoch_ratio_sets_the_epoch_saves(flags, num_epochs, due):
    args = _args(*flags)
    assert [epoch for epoch in range(1, num_epochs + 1) if checkpoints.epoch_save_due(args, epoch, num_epochs)] == due
    saves = checkpoints.planned_saves(args, num_epochs, num_epochs * 5)
    assert saves.files_written == len(due) + 1, "the epoch saves and the final file"


def test_training_schedule_resolves_the_ratio_for_pruning(tmp_path, caplog):
    args = _args("--save_n_epoch_ratio", "2", "--max_train_epochs", "6", "--save_last_n_epochs", "1")
    with caplog.at_level(logging.INFO, logger="library.train.run_setup"):
        schedule = run_setup.training_schedule(args, total_batches=4, num_processes=1)
    assert (schedule.num_epochs, args.save_every_n_epochs) == (6, 3)
    assert "--save_n_epoch_ratio 2: saving every 3 epoch(s) of 6" in caplog.text
    names = OutputNames(tmp_path, "lora", ".safetensors")
    names.epoch_file(3).write_bytes(b"x")
    checkpoints.prune_epoch_saves(names, args, 6)  # the trainer's call: the epoch-3 save falls out of the window
    assert not names.epoch_file(3).exists()


def test_more_text_encoder_lrs_than_encoders_uses_the_first_and_warns(caplog):
    args = _args("--text_encoder_lr", "5e-05", "1e-05", "--network_dim", "4", "--fused_backward_pass")
    with caplog.at_level(logging.WARNING, logger="library.train.run_setup"):
        run_setup.check_network_flags(args, text_encoder_count=1)
    assert args.text_encoder_lr == [5e-05]
    assert "--text_encoder_lr got 2 values but this model has 1 text encoder(s); using 5e-05" in caplog.text
    assert "--fused_backward_pass has no effect on network training" in caplog.text


class _RecordingAccelerator:
    received: dict = {}

    def __init__(self, **kwargs):
        type(self).received = kwargs
        self.distributed_type = "DistributedType.DEEPSPEED" if kwargs.get("deepspeed_plugin") else "DistributedType.NO"


def _fake_deepspeed(monkeypatch) -> list[str]:
    built: list[str] = []

    class CPUAdamBuilder:
        def load(self):
            built.append("cpu_adam")

    for name in ("deepspeed", "deepspeed.ops", "deepspeed.ops.op_builder"):
        module = types.ModuleType(name)
        module.__spec__ = importlib.machinery.ModuleSpec(name, None)
        monkeypatch.setitem(sys.modules, name, module)
    sys.modules["deepspeed.ops.op_builder"].CPUAdamBuilder = CPUAdamBuilder
    return built


def test_deepspeed_flags_reach_the_plugin_given_to_the_accelerator(monkeypatch):
    import accelerate

    built = _fake_deepspeed(monkeypatch)
    monkeypatch.setattr(accelerate, "Accelerator", _RecordingAccelerator)
    monkeypatch.setenv("WORLD_SIZE", "2")
    args = _args("--deepspeed", "--zero_stage", "2", "--offload_optimizer_device", "cpu",
                 "--offload_param_device", "nvme", "--offload_param_nvme_path", "/nvme/params",
                 "--zero3_save_16bit_model", "--fp16_master_weights_and_gradients", "--mixed_precision", "fp16",
                 "--gradient_accumulation_steps", "4", "--max_grad_norm", "0.5", "--train_batch_size", "3")
    run_setup.make_accelerator(args)
    plugin = _RecordingAccelerator.received["deepspeed_plugin"]
    assert (plugin.zero_stage, plugin.offload_optimizer_device, plugin.offload_param_device,
            plugin.offload_param_nvme_path, plugin.zero3_save_16bit_model) == (2, "cpu", "nvme", "/nvme/params", True)
    config = plugin.deepspeed_config
    assert config["zero_optimization"]["offload_param"] == {"device": "nvme", "nvme_path": "/nvme/params"}
    assert (config["gradient_accumulation_steps"], config["gradient_clipping"]) == (4, 0.5)
    assert (config["train_micro_batch_size_per_gpu"], config["train_batch_size"]) == (3, 3 * 4 * 2)
    assert config["fp16"]["enabled"] is True and config["fp16"]["initial_scale_power"] == 0
    assert config["fp16"]["fp16_master_weights_and_grads"] is True
    assert built == ["cpu_adam"], "kohya builds DeepSpeed's CPU Adam before training"


def test_zero3_init_flag_reaches_the_plugin(monkeypatch):
    import accelerate

    _fake_deepspeed(monkeypatch)
    monkeypatch.setattr(accelerate, "Accelerator", _RecordingAccelerator)
    run_setup.make_accelerator(_args("--deepspeed", "--zero_stage", "3", "--zero3_init_flag", "--mixed_precision",
                                     "bf16", "--offload_optimizer_device", "nvme", "--offload_optimizer_nvme_path",
                                     "/nvme/opt"))
    plugin = _RecordingAccelerator.received["deepspeed_plugin"]
    assert (plugin.zero_stage, plugin.zero3_init_flag) == (3, True)
    assert plugin.deepspeed_config["zero_optimization"]["offload_optimizer"] == {"device": "nvme",
                                                                                "nvme_path": "/nvme/opt"}
    assert plugin.deepspeed_config["bf16"] == {"enabled": True}


def test_no_deepspeed_flag_means_no_plugin(monkeypatch):
    import accelerate

    monkeypatch.setattr(accelerate, "Accelerator", _RecordingAccelerator)
    run_setup.make_accelerator(_args())
    assert _RecordingAccelerator.received["deepspeed_plugin"] is None


def test_deepspeed_without_the_package_is_one_line(monkeypatch):
    real_find_spec = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec",
                        lambda name, *rest: None if name == "deepspeed" else real_find_spec(name, *rest))
    with pytest.raises(FlagError) as caught:
        run_setup.make_accelerator(_args("--deepspeed"))
    assert str(caught.value) == "--deepspeed needs the deepspeed package: pip install deepspeed"


def test_nvme_offload_needs_its_folder(monkeypatch):
    _fake_deepspeed(monkeypatch)
    with pytest.raises(FlagError, match=r"^--offload_optimizer_device nvme needs --offload_optimizer_nvme_path"):
        run_setup.make_accelerator(_args("--deepspeed", "--offload_optimizer_device", "nvme"))


def test_zero_flags_without_deepspeed_are_warned(monkeypatch, caplog):
    import accelerate

    monkeypatch.setattr(accelerate, "Accelerator", _RecordingAccelerator)
    with caplog.at_level(logging.WARNING, logger="library.train.deepspeed_plugin"):
        run_setup.make_accelerator(_args("--zero_stage", "3", "--zero3_init_flag"))
    assert "--zero3_init_flag, --zero_stage have no effect without --deepspeed; ignored" in caplog.text


def test_dynamo_flags_become_torch_compile_arguments():
    assert run_setup.torch_compile_kwargs(_args("--torch_compile")) == {"backend": "inductor"}
    assert run_setup.torch_compile_kwargs(_args("--torch_compile", "--dynamo_backend", "eager", "--dynamo_mode",
                                                "max-autotune", "--dynamo_fullgraph", "--dynamo_dynamic")) == {
        "backend": "eager", "mode": "max-autotune", "fullgraph": True, "dynamic": True}


def test_flags_without_effect_here_are_warned_once_each(caplog):
    args = train_network.setup_parser().parse_args(["--lowram", "--ddp_static_graph", "--ddp_gradient_as_bucket_view"])
    with caplog.at_level(logging.WARNING, logger="library.train.run_setup"):
        run_setup.warn_inert_flags(args)
    lines = [record.getMessage() for record in caplog.records]
    assert [line.split(" ")[0] for line in lines] == ["--lowram", "--ddp_gradient_as_bucket_view",
                                                      "--ddp_static_graph"]
    assert all("has no effect here" in line for line in lines)
    caplog.clear()
    run_setup.warn_inert_flags(train_network.setup_parser().parse_args([]))
    assert not caplog.records
    import sdxl_train_network

    run_setup.warn_inert_flags(sdxl_train_network.setup_parser().parse_args(["--disable_mmap_load_safetensors"]))
    assert [record.getMessage().split(" ")[0] for record in caplog.records] == ["--disable_mmap_load_safetensors"]


def test_an_fsdp_accelerate_config_is_refused_in_one_line():
    from types import SimpleNamespace

    from accelerate.utils import DistributedType

    with pytest.raises(FlagError, match="FSDP is not supported by this trainer yet"):
        run_setup.check_distributed_type(SimpleNamespace(distributed_type=DistributedType.FSDP))
    run_setup.check_distributed_type(SimpleNamespace(distributed_type=DistributedType.MULTI_CPU))


def test_deepspeed_dropped_by_accelerate_is_refused_in_one_line():
    """accelerate drops the DeepSpeed plugin when told to use the CPU (ACCELERATE_USE_CPU): training would go on
    as plain DDP while the user believes ZeRO is on."""
    from types import SimpleNamespace

    from accelerate.utils import DistributedType

    with pytest.raises(FlagError, match="--deepspeed: accelerate set up a MULTI_CPU run instead of DeepSpeed"):
        run_setup.check_distributed_type(SimpleNamespace(distributed_type=DistributedType.MULTI_CPU,
                                                         num_processes=2), deepspeed_wanted=True)
    run_setup.check_distributed_type(SimpleNamespace(distributed_type=DistributedType.DEEPSPEED, num_processes=1),
                                     deepspeed_wanted=True)


def test_processes_launched_into_one_process_runs_are_refused(monkeypatch):
    """Measured with accelerate 1.15 on a CPU-only machine: `accelerate launch --use_deepspeed --num_processes 2`
    (or an FSDP2 config) starts 2 processes that each get a one-process run, training the same batches twice."""
    from types import SimpleNamespace

    from accelerate.utils import DistributedType

    monkeypatch.setenv("WORLD_SIZE", "2")
    with pytest.raises(FlagError, match="2 processes were launched .* one-process NO run in each"):
        run_setup.check_distributed_type(SimpleNamespace(distributed_type=DistributedType.NO, num_processes=1))
    run_setup.check_distributed_type(SimpleNamespace(distributed_type=DistributedType.MULTI_CPU, num_processes=2))
    monkeypatch.setenv("WORLD_SIZE", "1")
    run_setup.check_distributed_type(SimpleNamespace(distributed_type=DistributedType.NO, num_processes=1))
