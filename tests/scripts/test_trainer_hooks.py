"""Third-party `NetworkTrainer` subclasses written for kohya's sd-scripts work unchanged (COMPAT §15): every hook
the loop routes through is called with kohya's arguments, in kohya's order, and what an override returns changes
the run (loss, saved file, logs).

A few short runs on the tiny models, shared by module-scoped fixtures:
- `recording`: SD1 with a validation split; nearly every hook overridden (calling super) to record its arguments;
- `target_run`: get_noise_pred_and_target / post_process_loss change the loss; the U-Net loads lazily; cached
  latents and text-encoder outputs;
- `kohya_style`: bf16, cast_unet False, kohya's call_unet / encode_images_to_latents bodies, a wrapped U-Net and
  a text encoding strategy of the subclass;
- `sdxl_run`: one step of an SdxlNetworkTrainer subclass.
"""
from __future__ import annotations

import argparse
from collections import defaultdict
from dataclasses import dataclass, field

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file

import sdxl_train_network
from library.train import strategies
from library.train.network_trainer import NetworkTrainer
from tests.scripts.test_train_network import base_argv, dataset_toml, run_sd

# the hooks the loop calls for one training step, in kohya's order (COMPAT §15)
TRAIN_STEP_HOOKS = ["on_step_start", "process_batch", "encode_images_to_latents", "shift_scale_latents",
                    "get_models_for_text_encoding", "get_text_cond", "get_noise_pred_and_target", "call_unet",
                    "post_process_loss", "all_reduce_network", "generate_step_logs", "step_logging",
                    "accelerator_logging"]
CHANGED_CAPTION = "tkshape, a caption no image of the dataset has"


class CountingEncoder(torch.nn.Module):
    """A text encoder wrapper that counts its forward passes (what get_models_for_text_encoding returns)."""

    def __init__(self, inner):
        super().__init__()
        self.inner = inner
        self.forwards = 0

    def forward(self, *args, **kwargs):
        self.forwards += 1
        return self.inner(*args, **kwargs)


class RecordingTrainer(NetworkTrainer):
    """A kohya-style subclass: the hooks overridden with kohya's signatures, each calling super and recording what
    it got (`seen[name]`: one dict per call) and the order of the calls (`events`)."""

    def __init__(self):
        super().__init__()
        self.events: list[str] = []
        self.seen: dict[str, list[dict]] = defaultdict(list)
        self.counting_encoders: list[CountingEncoder] | None = None

    def _record(self, name: str, **arguments) -> dict:
        self.events.append(name)
        self.seen[name].append(arguments)
        return arguments

    # ---------------------------------------------------------------------------------------------- setup

    def assert_extra_args(self, args, train_dataset_group, val_dataset_group):
        self._record("assert_extra_args", args=args, train=train_dataset_group, val=val_dataset_group)
        super().assert_extra_args(args, train_dataset_group, val_dataset_group)

    def load_target_model(self, args, weight_dtype, accelerator):
        call = self._record("load_target_model", args=args, weight_dtype=weight_dtype, accelerator=accelerator)
        call["result"] = super().load_target_model(args, weight_dtype, accelerator)
        return call["result"]

    def get_tokenize_strategy(self, args):
        call = self._record("get_tokenize_strategy", args=args)
        call["result"] = super().get_tokenize_strategy(args)
        return call["result"]

    def get_tokenizers(self, tokenize_strategy):
        call = self._record("get_tokenizers", tokenize_strategy=tokenize_strategy)
        call["result"] = super().get_tokenizers(tokenize_strategy)
        return call["result"]

    def get_latents_caching_strategy(self, args):
        call = self._record("get_latents_caching_strategy", args=args)
        call["result"] = super().get_latents_caching_strategy(args)
        return call["result"]

    def get_text_encoding_strategy(self, args):
        call = self._record("get_text_encoding_strategy", args=args)
        call["result"] = super().get_text_encoding_strategy(args)
        return call["result"]

    def get_text_encoder_outputs_caching_strategy(self, args):
        call = self._record("get_text_encoder_outputs_caching_strategy", args=args)
        call["result"] = super().get_text_encoder_outputs_caching_strategy(args)
        return call["result"]

    def get_text_encoders_train_flags(self, args, text_encoders):
        call = self._record("get_text_encoders_train_flags", args=args, text_encoders=text_encoders)
        call["result"] = super().get_text_encoders_train_flags(args, text_encoders)
        return call["result"]

    def is_train_text_encoder(self, args):
        call = self._record("is_train_text_encoder", args=args)
        call["result"] = super().is_train_text_encoder(args)
        return call["result"]

    def cache_text_encoder_outputs_if_needed(self, args, accelerator, unet, vae, text_encoders, dataset,
                                             weight_dtype):
        self._record("cache_text_encoder_outputs_if_needed", args=args, accelerator=accelerator, unet=unet, vae=vae,
                     text_encoders=text_encoders, dataset=dataset, weight_dtype=weight_dtype)
        super().cache_text_encoder_outputs_if_needed(args, accelerator, unet, vae, text_encoders, dataset,
                                                     weight_dtype)

    def is_text_encoder_not_needed_for_training(self, args):
        call = self._record("is_text_encoder_not_needed_for_training", args=args)
        call["result"] = super().is_text_encoder_not_needed_for_training(args)
        return call["result"]

    def post_process_network(self, args, accelerator, network, text_encoders, unet):
        self._record("post_process_network", args=args, accelerator=accelerator, network=network,
                     text_encoders=text_encoders, unet=unet)
        super().post_process_network(args, accelerator, network, text_encoders, unet)

    def prepare_unet_with_accelerator(self, args, accelerator, unet):
        call = self._record("prepare_unet_with_accelerator", args=args, accelerator=accelerator, unet=unet)
        call["result"] = super().prepare_unet_with_accelerator(args, accelerator, unet)
        return call["result"]

    def cast_text_encoder(self, args):
        self._record("cast_text_encoder", args=args)
        return super().cast_text_encoder(args)

    def cast_vae(self, args):
        self._record("cast_vae", args=args)
        return super().cast_vae(args)

    def cast_unet(self, args):
        self._record("cast_unet", args=args)
        return super().cast_unet(args)

    def get_noise_scheduler(self, args, device):
        call = self._record("get_noise_scheduler", args=args, device=device)
        call["result"] = super().get_noise_scheduler(args, device)
        return call["result"]

    def get_sai_model_spec(self, args):
        call = self._record("get_sai_model_spec", args=args)
        spec = super().get_sai_model_spec(args)
        spec["modelspec.title"] = "title from get_sai_model_spec"
        call["result"] = spec
        return spec

    def update_metadata(self, metadata, args):
        self._record("update_metadata", metadata=metadata, args=args)
        super().update_metadata(metadata, args)
        metadata["ss_hook_test"] = "added by update_metadata"

    # ---------------------------------------------------------------------------------------------- per batch

    def on_step_start(self, args, accelerator, network, text_encoders, unet, batch, weight_dtype, is_train=True):
        self._record("on_step_start", args=args, accelerator=accelerator, network=network,
                     text_encoders=text_encoders, unet=unet, batch=batch, weight_dtype=weight_dtype, is_train=is_train)
        super().on_step_start(args, accelerator, network, text_encoders, unet, batch, weight_dtype, is_train=is_train)

    def process_batch(self, batch, text_encoders, unet, network, vae, noise_scheduler, vae_dtype, weight_dtype,
                      accelerator, args, text_encoding_strategy, tokenize_strategy, is_train=True,
                      train_text_encoder=True, train_unet=True):
        call = self._record("process_batch", batch=batch, text_encoders=text_encoders, unet=unet, network=network,
                            vae=vae, noise_scheduler=noise_scheduler, vae_dtype=vae_dtype,
                            weight_dtype=weight_dtype, accelerator=accelerator, args=args,
                            text_encoding_strategy=text_encoding_strategy, tokenize_strategy=tokenize_strategy,
                            is_train=is_train, train_text_encoder=train_text_encoder, train_unet=train_unet)
        call["result"] = super().process_batch(batch, text_encoders, unet, network, vae, noise_scheduler, vae_dtype,
                                               weight_dtype, accelerator, args, text_encoding_strategy,
                                               tokenize_strategy, is_train, train_text_encoder, train_unet)
        return call["result"]

    def encode_images_to_latents(self, args, vae, images):  # kohya's signature: no generators
        call = self._record("encode_images_to_latents", args=args, vae=vae, images=images)
        call["result"] = super().encode_images_to_latents(args, vae, images)
        return call["result"]

    def shift_scale_latents(self, args, latents):
        call = self._record("shift_scale_latents", args=args, latents=latents)
        call["result"] = super().shift_scale_latents(args, latents)
        return call["result"]

    def get_models_for_text_encoding(self, args, accelerator, text_encoders):
        call = self._record("get_models_for_text_encoding", args=args, accelerator=accelerator,
                            text_encoders=text_encoders)
        if self.counting_encoders is None:
            self.counting_encoders = [CountingEncoder(encoder) for encoder in
                                      super().get_models_for_text_encoding(args, accelerator, text_encoders)]
        call["result"] = self.counting_encoders
        return call["result"]

    def get_text_cond(self, args, accelerator, batch, tokenizers, text_encoders, weight_dtype):
        """kohya v0.9.1's hook: conditions on a changed caption; also records the original caption's conds."""
        call = self._record("get_text_cond", args=args, accelerator=accelerator, batch=batch, tokenizers=tokenizers,
                            text_encoders=text_encoders, weight_dtype=weight_dtype)
        changed = {**batch, "captions": [CHANGED_CAPTION] * len(batch["captions"])}
        with torch.no_grad():  # both captions' conditioning from the run's own encoder, for the test to compare
            for key, captions in (("original", batch["captions"]), ("expected", changed["captions"])):
                call[key] = self._models.caption_encoder.encode(captions).hidden_states.detach().clone()
        call["result"] = super().get_text_cond(args, accelerator, changed, tokenizers, text_encoders, weight_dtype)
        return call["result"]

    def get_noise_pred_and_target(self, args, accelerator, noise_scheduler, latents, batch, text_encoder_conds,
                                  unet, network, weight_dtype, train_unet, is_train=True):
        call = self._record("get_noise_pred_and_target", args=args, accelerator=accelerator,
                            noise_scheduler=noise_scheduler, latents=latents, batch=batch,
                            text_encoder_conds=text_encoder_conds, unet=unet, network=network,
                            weight_dtype=weight_dtype, train_unet=train_unet, is_train=is_train)
        call["result"] = super().get_noise_pred_and_target(args, accelerator, noise_scheduler, latents, batch,
                                                           text_encoder_conds, unet, network, weight_dtype,
                                                           train_unet, is_train=is_train)
        return call["result"]

    def call_unet(self, args, accelerator, unet, noisy_latents, timesteps, text_conds, batch, weight_dtype,
                  indices=None):
        call = self._record("call_unet", args=args, accelerator=accelerator, unet=unet, noisy_latents=noisy_latents,
                            timesteps=timesteps, text_conds=text_conds, batch=batch, weight_dtype=weight_dtype)
        call["result"] = super().call_unet(args, accelerator, unet, noisy_latents, timesteps, text_conds, batch,
                                           weight_dtype)
        return call["result"]

    def post_process_loss(self, loss, args, timesteps, noise_scheduler):
        call = self._record("post_process_loss", loss=loss.detach().clone(), args=args, timesteps=timesteps,
                            noise_scheduler=noise_scheduler)
        call["result"] = super().post_process_loss(loss, args, timesteps, noise_scheduler)
        return call["result"]

    def all_reduce_network(self, accelerator, network):
        self._record("all_reduce_network", accelerator=accelerator, network=network)
        super().all_reduce_network(accelerator, network)

    def on_validation_step_end(self, args, accelerator, network, text_encoders, unet, batch, weight_dtype):
        self._record("on_validation_step_end", args=args, accelerator=accelerator, network=network,
                     text_encoders=text_encoders, unet=unet, batch=batch, weight_dtype=weight_dtype)
        super().on_validation_step_end(args, accelerator, network, text_encoders, unet, batch, weight_dtype)

    # ---------------------------------------------------------------------------------------------- logging

    def generate_step_logs(self, args, current_loss, avr_loss, lr_scheduler, lr_descriptions, optimizer=None,
                           keys_scaled=None, mean_norm=None, maximum_norm=None, mean_grad_norm=None,
                           mean_combined_norm=None):
        call = self._record("generate_step_logs", args=args, current_loss=current_loss, avr_loss=avr_loss,
                            lr_scheduler=lr_scheduler, lr_descriptions=lr_descriptions, optimizer=optimizer,
                            keys_scaled=keys_scaled)
        logs = super().generate_step_logs(args, current_loss, avr_loss, lr_scheduler, lr_descriptions, optimizer,
                                          keys_scaled, mean_norm, maximum_norm, mean_grad_norm, mean_combined_norm)
        logs["hook/extra"] = 2.5 * current_loss
        call["result"] = logs
        return logs

    def step_logging(self, accelerator, logs, global_step, epoch):
        self._record("step_logging", accelerator=accelerator, logs=dict(logs), global_step=global_step, epoch=epoch)
        super().step_logging(accelerator, logs, global_step, epoch)

    def epoch_logging(self, accelerator, logs, global_step, epoch):
        self._record("epoch_logging", accelerator=accelerator, logs=dict(logs), global_step=global_step, epoch=epoch)
        super().epoch_logging(accelerator, logs, global_step, epoch)

    def val_logging(self, accelerator, logs, global_step, epoch, val_step=None):
        self._record("val_logging", accelerator=accelerator, logs=dict(logs), global_step=global_step, epoch=epoch,
                     val_step=val_step)
        super().val_logging(accelerator, logs, global_step, epoch, val_step)

    def accelerator_logging(self, accelerator, logs, step_value, global_step, epoch, val_step=None):
        self._record("accelerator_logging", accelerator=accelerator, logs=dict(logs), step_value=step_value,
                     global_step=global_step, epoch=epoch, val_step=val_step)
        super().accelerator_logging(accelerator, logs, step_value, global_step, epoch, val_step)


@dataclass
class Run:
    trainer: NetworkTrainer
    final: object

    def one(self, name: str) -> dict:
        calls = self.trainer.seen[name]
        assert len(calls) == 1, (name, len(calls))
        return calls[0]

    def train_calls(self, name: str) -> list[dict]:
        return [call for call in self.trainer.seen[name] if call.get("is_train", True)]


def _trained_ups(path, prefix: str) -> list[torch.Tensor]:
    weights = load_file(path)
    ups = [tensor for key, tensor in weights.items() if key.startswith(prefix) and key.endswith("lora_up.weight")]
    assert ups, f"no {prefix} modules in {sorted(weights)[:5]}"
    return ups


def _moved_from_zero(path, prefix: str) -> bool:
    return any(float(tensor.float().abs().max()) > 0 for tensor in _trained_ups(path, prefix))


# ------------------------------------------------------------------------------------------------ the recording run


@pytest.fixture(scope="module")
def recording(tiny_models, tmp_path_factory) -> Run:
    # 8 images: 6 train (2 steps of 3 = one epoch, so epoch logging and epoch validation run), 2 validation
    tmp = tmp_path_factory.mktemp("recording")
    toml = dataset_toml(tmp, batch_size=3, extra="validation_split = 0.25\nvalidation_seed = 3")
    trainer, final = run_sd(base_argv(tiny_models.path("sd1"), toml, tmp / "out", "--max_train_steps", "2",
                                      "--max_data_loader_n_workers", "0"), RecordingTrainer)
    return Run(trainer, final)


def test_setup_hooks_get_kohyas_arguments(recording):
    from accelerate import Accelerator
    from diffusers import UNet2DConditionModel
    from transformers import CLIPTextModel

    trainer, models, trainable = recording.trainer, recording.trainer._models, recording.trainer._trainable
    extra = recording.one("assert_extra_args")
    assert isinstance(extra["args"], argparse.Namespace) and extra["args"].network_dim == 4
    assert extra["train"].num_train_images == 6 and extra["val"].num_train_images == 2

    loaded = recording.one("load_target_model")
    assert loaded["weight_dtype"] == torch.float32 and isinstance(loaded["accelerator"], Accelerator)
    version, text_encoders, vae, unet = loaded["result"]
    assert isinstance(version, str) and isinstance(unet, UNet2DConditionModel)
    assert [type(encoder) for encoder in text_encoders] == [CLIPTextModel]
    assert models.text_encoders == list(text_encoders) and models.vae is vae

    tokenize_strategy = recording.one("get_tokenize_strategy")["result"]
    tokenizers = recording.one("get_tokenizers")
    assert tokenizers["tokenize_strategy"] is tokenize_strategy and models.tokenizers is tokenizers["result"]
    encoding_strategy = recording.one("get_text_encoding_strategy")["result"]
    for call in trainer.seen["process_batch"]:  # the strategies reach process_batch
        assert call["text_encoding_strategy"] is encoding_strategy and call["tokenize_strategy"] is tokenize_strategy
    caching_strategies = trainer.seen["get_text_encoder_outputs_caching_strategy"]  # once per dataset group
    assert len(caching_strategies) == 2 and all(call["result"] is None for call in caching_strategies)  # not cached

    flags = recording.one("get_text_encoders_train_flags")
    assert flags["text_encoders"] == models.text_encoders and flags["result"] == [True]
    train_te = trainer.seen["is_train_text_encoder"]
    assert train_te and all(call["result"] is True for call in train_te)
    assert trainable.train_text_encoder and any(key.startswith("lora_te_") for key in load_file(recording.final))

    # kohya calls it once per dataset group: training, then validation
    assert [call["dataset"] for call in trainer.seen["cache_text_encoder_outputs_if_needed"]] == \
        [extra["train"], extra["val"]]
    caching = trainer.seen["cache_text_encoder_outputs_if_needed"][0]
    assert recording.one("get_latents_caching_strategy")["args"] is extra["args"]  # asked for without caching too
    assert caching["unet"] is models.unet and caching["vae"] is models.vae
    assert caching["text_encoders"] == models.text_encoders and caching["dataset"] is extra["train"]
    assert caching["weight_dtype"] == torch.float32 and caching["accelerator"] is loaded["accelerator"]

    post = recording.one("post_process_network")
    assert post["network"] is trainable.network and post["unet"] is models.unet
    assert post["text_encoders"] == models.text_encoders
    prepared = recording.one("prepare_unet_with_accelerator")
    assert prepared["unet"] is models.unet and prepared["result"] is models.prepared_unet
    for name in ("cast_text_encoder", "cast_vae", "cast_unet"):
        assert trainer.seen[name] and all(call["args"] is extra["args"] for call in trainer.seen[name])

    scheduler = recording.one("get_noise_scheduler")
    assert scheduler["device"] == loaded["accelerator"].device
    assert all(call["noise_scheduler"] is scheduler["result"] for call in trainer.seen["process_batch"])
    assert all(call["noise_scheduler"] is scheduler["result"] for call in trainer.seen["post_process_loss"])

    # setup order: flags checked before models load; the network exists before its train flags are read
    events = trainer.events
    first_step = events.index("on_step_start")
    order = ["assert_extra_args", "load_target_model", "get_tokenize_strategy", "get_tokenizers",
             "get_noise_scheduler", "get_text_encoding_strategy", "cache_text_encoder_outputs_if_needed",
             "post_process_network", "get_text_encoders_train_flags", "prepare_unet_with_accelerator",
             "update_metadata", "get_sai_model_spec"]
    positions = [events.index(name) for name in order]
    assert positions == sorted(positions) and positions[-1] < first_step, list(zip(order, positions))
    assert events.index("cast_unet") < events.index("prepare_unet_with_accelerator")


def test_train_step_hooks_run_in_kohyas_order_with_kohyas_arguments(recording):
    trainer, models, trainable = recording.trainer, recording.trainer._models, recording.trainer._trainable
    # one training step's hooks, in order (validation runs only after the epoch)
    step_names = [name for name in trainer.events if name in TRAIN_STEP_HOOKS]
    assert step_names[:2 * len(TRAIN_STEP_HOOKS)] == TRAIN_STEP_HOOKS * 2

    starts, batches = recording.train_calls("on_step_start"), recording.train_calls("process_batch")
    assert len(starts) == len(batches) == 2 == len(trainer.loss_history)
    for start, batch_call, loss in zip(starts, batches, trainer.loss_history):
        assert start["batch"] is batch_call["batch"] and start["is_train"] is True
        assert start["network"] is trainable.network and start["unet"] is models.unet
        assert start["text_encoders"] == models.text_encoders and start["weight_dtype"] == torch.float32
        assert batch_call["vae"] is models.vae and batch_call["unet"] is models.unet
        assert batch_call["network"] is trainable.network and batch_call["vae_dtype"] == torch.float32
        assert batch_call["train_text_encoder"] is True and batch_call["train_unet"] is True
        assert batch_call["args"] is start["args"] and batch_call["accelerator"] is start["accelerator"]
        # the step's loss is what process_batch returned
        assert float(batch_call["result"].detach()) == pytest.approx(loss, rel=1e-6)

    encodes = trainer.seen["encode_images_to_latents"]
    shifts = trainer.seen["shift_scale_latents"]
    targets = recording.train_calls("get_noise_pred_and_target")
    unet_calls = trainer.seen["call_unet"]
    post = trainer.seen["post_process_loss"]
    for index, batch_call in enumerate(batches):
        images = batch_call["batch"]["images"]
        encode = encodes[index]
        assert encode["vae"] is models.vae and encode["images"].shape == images.shape == (3, 3, 64, 64)
        torch.testing.assert_close(encode["images"], images)
        shift = shifts[index]
        torch.testing.assert_close(shift["latents"], encode["result"].float())
        torch.testing.assert_close(shift["result"], shift["latents"] * 0.18215)
        target = targets[index]
        torch.testing.assert_close(target["latents"], shift["result"])  # what shift_scale_latents returned
        assert target["batch"] is batch_call["batch"] and target["unet"] is models.unet
        assert target["network"] is trainable.network and target["train_unet"] is True
        prediction, _, timesteps, weighting = target["result"]
        unet_call = unet_calls[index]
        assert unet_call["unet"] is models.unet and unet_call["batch"] is batch_call["batch"]
        assert unet_call["text_conds"] is target["text_encoder_conds"] and unet_call["timesteps"] is timesteps
        assert unet_call["noisy_latents"].shape == target["latents"].shape
        assert unet_call["result"] is prediction
        assert post[index]["timesteps"] is timesteps and post[index]["loss"].shape == (3,)  # per sample
    reduces = trainer.seen["all_reduce_network"]
    assert len(reduces) == 2 and all(call["network"] is trainable.network for call in reduces)


def test_text_conditioning_hooks_use_their_arguments_and_return_values(recording):
    trainer, models = recording.trainer, recording.trainer._models
    encoders = recording.trainer.counting_encoders
    cond_calls = trainer.seen["get_text_cond"]
    assert len(trainer.seen["get_models_for_text_encoding"]) == len(cond_calls) == len(trainer.seen["process_batch"])
    for call in trainer.seen["get_models_for_text_encoding"]:
        assert call["text_encoders"] == models.text_encoders
    for call in cond_calls:
        assert call["text_encoders"] is encoders  # what get_models_for_text_encoding returned
        assert call["tokenizers"] is models.tokenizers and call["weight_dtype"] == torch.float32
    # the returned encoders did the encoding: one forward per get_text_cond call
    assert encoders[0].forwards == len(cond_calls)
    # the conditioning U-Net got is what get_text_cond returned (from the changed caption), not the batch's own
    for call, target in zip(cond_calls, trainer.seen["get_noise_pred_and_target"]):
        conds = target["text_encoder_conds"]
        assert conds is call["result"]
        torch.testing.assert_close(conds[0].detach(), call["expected"])
        assert not torch.allclose(conds[0].detach(), call["original"], atol=1e-3)


def test_validation_hooks(recording):
    trainer, models, trainable = recording.trainer, recording.trainer._models, recording.trainer._trainable
    validation_starts = [call for call in trainer.seen["on_step_start"] if call["is_train"] is False]
    ends = trainer.seen["on_validation_step_end"]
    assert len(ends) == 1 and len(validation_starts) == 5  # one batch of 2 images at 5 fixed timesteps
    assert all(call["batch"]["images"].shape[0] == 2 for call in validation_starts)
    assert all(call["is_train"] is False for call in trainer.seen["process_batch"][2:])
    assert all(call["is_train"] is False for call in trainer.seen["get_noise_pred_and_target"][2:])
    end = ends[0]
    assert end["network"] is trainable.network and end["unet"] is models.unet
    assert end["text_encoders"] == models.text_encoders and end["weight_dtype"] == torch.float32
    assert set(end["batch"]["image_keys"]) == set(validation_starts[0]["batch"]["image_keys"])
    events = trainer.events
    last_validation_start = len(events) - 1 - events[::-1].index("on_step_start")
    assert last_validation_start < events.index("on_validation_step_end") < events.index("val_logging")
    logged = recording.one("val_logging")
    training_average = sum(trainer.loss_history) / len(trainer.loss_history)  # the epoch's 2 steps
    assert logged["logs"] == pytest.approx({"loss/validation/epoch_average": trainer.validation_history[-1],
                                            "loss/validation/epoch_divergence":
                                                trainer.validation_history[-1] - training_average})
    assert logged["global_step"] == 2 and logged["epoch"] == 1  # the epoch that just finished
    forwarded = [call for call in trainer.seen["accelerator_logging"] if call["logs"] == logged["logs"]]
    assert len(forwarded) == 1 and forwarded[0]["step_value"] == 2 and forwarded[0]["global_step"] == 2


def test_generate_step_logs_keys_reach_step_and_accelerator_logging(recording):
    trainer, trainable = recording.trainer, recording.trainer._trainable
    generated = trainer.seen["generate_step_logs"]
    assert [call["current_loss"] for call in generated] == trainer.loss_history
    for call in generated:
        assert call["lr_scheduler"] is trainable.lr_scheduler and call["optimizer"] is trainable.optimizer
        assert call["lr_descriptions"] == trainable.group_names and call["keys_scaled"] is None
    steps = trainer.seen["step_logging"]
    assert [call["global_step"] for call in steps] == [1, 2] and [call["epoch"] for call in steps] == [1, 1]
    for call, loss in zip(steps, trainer.loss_history):
        assert call["logs"]["hook/extra"] == 2.5 * loss and call["logs"]["loss/current"] == loss
    forwarded = [call for call in trainer.seen["accelerator_logging"] if "hook/extra" in call["logs"]]
    assert [(call["step_value"], call["global_step"], call["epoch"]) for call in forwarded] == [(1, 1, 1), (2, 2, 1)]
    assert [call["logs"]["hook/extra"] for call in forwarded] == [2.5 * loss for loss in trainer.loss_history]
    # epoch line: loss/epoch_average, at the epoch as the tracker's step
    epoch = recording.one("epoch_logging")
    assert set(epoch["logs"]) == {"loss/epoch_average"} and epoch["epoch"] == 1 and epoch["global_step"] == 2
    assert epoch["logs"]["loss/epoch_average"] == pytest.approx(sum(trainer.loss_history) / 2)
    epoch_forwarded = [call for call in trainer.seen["accelerator_logging"] if "loss/epoch_average" in call["logs"]]
    assert [(call["step_value"], call["global_step"], call["epoch"]) for call in epoch_forwarded] == [(1, 2, 1)]


def test_metadata_hooks_reach_the_saved_file(recording):
    update = recording.one("update_metadata")
    assert update["metadata"]["ss_network_module"] == "networks.lora" and update["args"].network_dim == 4
    assert isinstance(recording.one("get_sai_model_spec")["args"], argparse.Namespace)
    with safe_open(recording.final, "pt") as handle:
        metadata = handle.metadata()
    assert metadata["ss_hook_test"] == "added by update_metadata"
    assert metadata["modelspec.title"] == "title from get_sai_model_spec"
    assert metadata["modelspec.architecture"] == "stable-diffusion-v1/lora"


# ------------------------------------------------------------------------ target, loss, lazy U-Net, cached conditioning


class TargetTrainer(NetworkTrainer):
    """Changes the target (prediction + 1: l2 loss 1 per element) and triples the loss; loads the U-Net lazily."""

    def __init__(self):
        super().__init__()
        self.lazy_calls: list[tuple] = []
        self.unets_called: list = []
        self.logged: list[dict] = []
        self.strategies: dict = {}

    def load_target_model(self, args, weight_dtype, accelerator):
        version, text_encoders, vae, unet = super().load_target_model(args, weight_dtype, accelerator)
        self.loaded_text_encoders, self.lazy_unet = text_encoders, unet
        return version, text_encoders, vae, None

    def load_unet_lazily(self, args, weight_dtype, accelerator, text_encoders):
        self.lazy_calls.append((args, weight_dtype, accelerator, text_encoders))
        # kohya calls it after caching: every caption's outputs are cached by now
        self.cached_before_lazy = all(info.text_encoder_outputs is not None or info.text_encoder_outputs_npz
                                      for info in self._run.train_group.images)
        return self.lazy_unet, text_encoders  # kohya's (unet, text_encoders)

    def get_latents_caching_strategy(self, args):
        self.strategies["latents"] = super().get_latents_caching_strategy(args)
        return self.strategies["latents"]

    def get_text_encoder_outputs_caching_strategy(self, args):
        self.strategies["text"] = super().get_text_encoder_outputs_caching_strategy(args)
        return self.strategies["text"]

    def is_text_encoder_not_needed_for_training(self, args):
        self.strategies["not_needed"] = super().is_text_encoder_not_needed_for_training(args)
        return self.strategies["not_needed"]

    def get_noise_pred_and_target(self, args, accelerator, noise_scheduler, latents, batch, text_encoder_conds,
                                  unet, network, weight_dtype, train_unet, is_train=True):
        self.unets_called.append(unet)
        noise_pred, target, timesteps, weighting = super().get_noise_pred_and_target(
            args, accelerator, noise_scheduler, latents, batch, text_encoder_conds, unet, network, weight_dtype,
            train_unet, is_train)
        return noise_pred, noise_pred.detach() + 1.0, timesteps, weighting

    def post_process_loss(self, loss, args, timesteps, noise_scheduler):
        return super().post_process_loss(loss, args, timesteps, noise_scheduler) * 3

    def step_logging(self, accelerator, logs, global_step, epoch):
        self.logged.append(dict(logs))
        super().step_logging(accelerator, logs, global_step, epoch)


@pytest.fixture(scope="module")
def target_run(tiny_models, tmp_path_factory) -> Run:
    tmp = tmp_path_factory.mktemp("target")
    trainer, final = run_sd(base_argv(tiny_models.path("sd1"), dataset_toml(tmp), tmp / "out", "--max_train_steps",
                                      "2", "--cache_latents", "--cache_text_encoder_outputs",
                                      "--network_train_unet_only", "--max_data_loader_n_workers", "0"), TargetTrainer)
    return Run(trainer, final)


def test_changed_target_and_post_process_loss_set_the_loss(target_run):
    trainer = target_run.trainer
    # (prediction - (prediction + 1))^2 = 1 per element (to rounding of the + 1), times 3
    assert trainer.loss_history == pytest.approx([3.0, 3.0], abs=1e-6)  # 3.0 exactly here
    assert [logs["loss/current"] for logs in trainer.logged] == trainer.loss_history
    assert _moved_from_zero(target_run.final, "lora_unet_")  # the constant gradient trained the network


def test_lazily_loaded_unet_is_the_one_trained(target_run):
    from accelerate import Accelerator
    from transformers import CLIPTextModel

    trainer = target_run.trainer
    assert len(trainer.lazy_calls) == 1
    args, weight_dtype, accelerator, text_encoders = trainer.lazy_calls[0]
    assert isinstance(args, argparse.Namespace) and weight_dtype == torch.float32
    assert isinstance(accelerator, Accelerator)
    assert list(text_encoders) == list(trainer.loaded_text_encoders)
    assert [type(encoder) for encoder in text_encoders] == [CLIPTextModel]
    assert trainer._models.unet is trainer.lazy_unet and trainer.cached_before_lazy
    assert trainer.unets_called and all(unet is trainer.lazy_unet for unet in trainer.unets_called)


def test_caching_strategies_and_text_encoder_not_needed(target_run):
    found = target_run.trainer.strategies
    assert found["latents"].cache_suffix == "sd" and found["latents"].cache_to_disk is False
    assert found["text"] is not None and found["text"].cache_to_disk is False
    assert found["not_needed"] is True  # outputs cached, encoders frozen: they may leave the device
    assert not any(key.startswith("lora_te") for key in load_file(target_run.final))


# ------------------------------------------------------------------------------------------ kohya-style bodies, bf16


class CountingUNet:
    """What prepare_unet_with_accelerator returns: a stand-in for the U-Net that counts its calls and passes every
    attribute through (like accelerate's wrappers do for the methods the network and loop use)."""

    def __init__(self, unet):
        self.__dict__["unet"] = unet
        self.__dict__["forwards"] = 0

    def __call__(self, *args, **kwargs):
        self.__dict__["forwards"] += 1
        return self.unet(*args, **kwargs)

    def __getattr__(self, name):
        return getattr(self.__dict__["unet"], name)


@dataclass
class RecordingEncodingStrategy(strategies.TextEncodingStrategy):
    """A subclass's own text encoding strategy (kohya v0.10): records its calls and returns kohya's list."""

    calls: list = field(default_factory=list)

    def encode_tokens(self, tokenize_strategy, models, tokens):
        conds = super().encode_tokens(tokenize_strategy, models, tokens)
        result = [conds.hidden_states]  # kohya's SD1 text_encoder_conds
        self.calls.append((tokenize_strategy, models, tokens, result))
        return result


class KohyaStyleTrainer(NetworkTrainer):
    """Bodies copied from kohya's SD1 trainer (call_unet, encode_images_to_latents), U-Net not cast, wrapped."""

    def __init__(self):
        super().__init__()
        self.unet_dtypes: list[torch.dtype] = []
        self.image_dtypes: list[torch.dtype] = []
        self.unet_calls: list = []

    def cast_unet(self, args):
        return False

    def prepare_unet_with_accelerator(self, args, accelerator, unet):
        self.unet_dtypes.append(next(unet.parameters()).dtype)
        self.counting_unet = CountingUNet(super().prepare_unet_with_accelerator(args, accelerator, unet))
        return self.counting_unet

    def get_text_encoding_strategy(self, args):
        self.encoding_strategy = RecordingEncodingStrategy(super().get_text_encoding_strategy(args).caption_encoder)
        return self.encoding_strategy

    def encode_images_to_latents(self, args, vae, images):
        self.image_dtypes.append(images.dtype)
        return vae.encode(images).latent_dist.sample()

    def call_unet(self, args, accelerator, unet, noisy_latents, timesteps, text_conds, batch, weight_dtype):
        self.unet_calls.append((unet, text_conds))
        noise_pred = unet(noisy_latents, timesteps, text_conds[0]).sample
        return noise_pred


@pytest.fixture(scope="module")
def kohya_style(tiny_models, tmp_path_factory) -> Run:
    tmp = tmp_path_factory.mktemp("kohya_style")
    trainer, final = run_sd(base_argv(tiny_models.path("sd1"), dataset_toml(tmp), tmp / "out", "--max_train_steps",
                                      "2", "--mixed_precision", "bf16", "--max_data_loader_n_workers", "0"),
                            KohyaStyleTrainer)
    return Run(trainer, final)


def test_kohya_call_unet_and_encode_images_to_latents_train(kohya_style):
    trainer = kohya_style.trainer
    assert len(trainer.loss_history) == 2 and all(0 < loss < 10 for loss in trainer.loss_history)
    assert trainer.image_dtypes == [torch.bfloat16] * 2  # images in the VAE's dtype, as kohya passes them
    weights = load_file(kohya_style.final)
    assert any(key.startswith("lora_unet_down_blocks_0_attentions_0_") for key in weights)  # kohya's key names
    assert _moved_from_zero(kohya_style.final, "lora_unet_") and _moved_from_zero(kohya_style.final, "lora_te_")


def test_cast_unet_false_keeps_the_unet_dtype(kohya_style):
    trainer = kohya_style.trainer
    unet = trainer.counting_unet.unet
    assert trainer.unet_dtypes == [torch.float32]
    assert {parameter.dtype for parameter in unet.parameters()} == {torch.float32}
    assert next(trainer._models.vae.parameters()).dtype == torch.bfloat16  # cast_vae (not overridden) did cast


def test_prepared_unet_is_what_the_loop_calls(kohya_style):
    trainer = kohya_style.trainer
    assert trainer._models.prepared_unet is trainer.counting_unet
    assert trainer._models.unet is trainer.counting_unet.unet  # sampling and saving keep the plain U-Net
    assert len(trainer.unet_calls) == 2 and all(unet is trainer.counting_unet for unet, _ in trainer.unet_calls)
    assert trainer.counting_unet.forwards == 2


def test_own_text_encoding_strategy_encodes_the_captions(kohya_style):
    trainer = kohya_style.trainer
    calls = trainer.encoding_strategy.calls
    assert len(calls) == 2
    for (tokenize_strategy, models, tokens, result), (_, text_conds) in zip(calls, trainer.unet_calls):
        assert tokenize_strategy is trainer._models.tokenize_strategy
        assert list(models) == trainer._models.text_encoders
        assert len(tokens) == 1 and tokens[0].shape == (2, 1, 77)
        assert text_conds[0] is result[0]  # call_unet conditions on what the strategy returned


# ------------------------------------------------------------------------------------------------------------ SDXL


@pytest.fixture(scope="module")
def sdxl_run(tiny_models, tmp_path_factory) -> Run:
    import train_network

    class RecordingSdxlTrainer(sdxl_train_network.SdxlNetworkTrainer):
        def __init__(self):
            super().__init__()
            self.text_encoding_calls: list[tuple] = []

        def get_models_for_text_encoding(self, args, accelerator, text_encoders):
            models = super().get_models_for_text_encoding(args, accelerator, text_encoders)
            self.text_encoding_calls.append((args, accelerator, list(text_encoders), models))
            return models

    tmp = tmp_path_factory.mktemp("sdxl")
    args = train_network.parse_args(sdxl_train_network.setup_parser(), base_argv(
        tiny_models.path("sdxl"), dataset_toml(tmp), tmp / "out", "--max_train_steps", "1",
        "--max_data_loader_n_workers", "0"))
    trainer = RecordingSdxlTrainer()
    return Run(trainer, trainer.train(args))


def test_sdxl_subclass_override_is_routed_and_trains(sdxl_run):
    from transformers import CLIPTextModel, CLIPTextModelWithProjection

    trainer = sdxl_run.trainer
    assert trainer.is_sdxl and len(trainer.loss_history) == 1
    assert len(trainer.text_encoding_calls) == 1
    args, accelerator, text_encoders, models = trainer.text_encoding_calls[0]
    assert isinstance(args, argparse.Namespace) and accelerator is trainer._run.accelerator
    assert [type(encoder) for encoder in text_encoders] == [CLIPTextModel, CLIPTextModelWithProjection]
    assert text_encoders == trainer._models.text_encoders and list(models) == text_encoders
    for prefix in ("lora_te1_", "lora_te2_", "lora_unet_"):
        assert _moved_from_zero(sdxl_run.final, prefix), prefix


# ------------------------------------------------------------------------- known gaps (network_trainer / training_loop)


class ModuleWrapper(torch.nn.Module):
    """What accelerate's DDP wrapper is to the loop: an nn.Module holding the U-Net."""

    def __init__(self, unet):
        super().__init__()
        self.inner = unet

    def forward(self, *args, **kwargs):
        return self.inner(*args, **kwargs)


def test_network_keys_do_not_depend_on_a_wrapping_prepare_unet_with_accelerator(tiny_models, tmp_path):
    class WrappingTrainer(NetworkTrainer):
        def prepare_unet_with_accelerator(self, args, accelerator, unet):
            return ModuleWrapper(super().prepare_unet_with_accelerator(args, accelerator, unet))

    _, final = run_sd(base_argv(tiny_models.path("sd1"), dataset_toml(tmp_path), tmp_path / "out",
                                "--max_train_steps", "1", "--network_train_unet_only",
                                "--max_data_loader_n_workers", "0"), WrappingTrainer)
    assert any(key.startswith("lora_unet_down_blocks_0_attentions_0_") for key in load_file(final))


def test_kohya_encode_images_to_latents_in_bf16_validation(tiny_models, tmp_path):
    class KohyaEncodeTrainer(NetworkTrainer):
        def encode_images_to_latents(self, args, vae, images):
            return vae.encode(images).latent_dist.sample()

    toml = dataset_toml(tmp_path, batch_size=3, extra="validation_split = 0.25")
    trainer, _ = run_sd(base_argv(tiny_models.path("sd1"), toml, tmp_path / "out", "--max_train_steps", "2",
                                  "--mixed_precision", "bf16", "--network_train_unet_only",
                                  "--max_data_loader_n_workers", "0"), KohyaEncodeTrainer)
    assert trainer.validation_history
