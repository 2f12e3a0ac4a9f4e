"""The model and text-encoder hooks of kohya's `NetworkTrainer` (COMPAT §15): loading, tokenizers and encoding
strategies, which encoders train, dtype casts, caching of text-encoder outputs, the U-Net call. Names, arguments
and return values are kohya's (v0.10, with the v0.9.1 ones still honoured: `load_tokenizer`, `get_text_cond`),
so subclasses written for kohya work here. SDXL overrides a few (sdxl_train_network.py).
"""
from __future__ import annotations

import argparse
import logging

import torch

from library.text.encode import TextConds, as_text_conds
from library.train import strategies

logger = logging.getLogger(__name__)


def cast_to_fp8(model: torch.nn.Module) -> None:
    """--fp8_base: Linear/Conv weights stored as float8_e4m3fn; autocast computes them in the mixed dtype."""
    for module in model.modules():
        if isinstance(module, (torch.nn.Linear, torch.nn.Conv2d)):
            module.weight.data = module.weight.data.to(torch.float8_e4m3fn)


def _embeddings(text_encoder) -> torch.nn.Module:
    """The token/position embeddings (transformers 5 flattened CLIPTextModel; 4.x nests them in text_model)."""
    return getattr(text_encoder, "text_model", text_encoder).embeddings


class ModelHooks:
    """Defaults for SD1.x/2.x; NetworkTrainer inherits them."""

    supported_families: tuple[str, ...] = ()

    # ------------------------------------------------------------------------------------------ loading

    def load_target_model(self, args: argparse.Namespace, weight_dtype: torch.dtype, accelerator):
        """(model_version, text_encoders, vae, unet) of the base model; unet may be None (see load_unet_lazily)."""
        from library.models.load import load_target_model

        bundle = load_target_model(args.pretrained_model_name_or_path, v2=args.v2,
                                   v_parameterization=args.v_parameterization, vae_path=args.vae,
                                   expected_families=self.supported_families)
        self.family = bundle.family
        return bundle.family.model_version, bundle.text_encoders, bundle.vae, bundle.unet

    def load_unet_lazily(self, args, weight_dtype, accelerator, text_encoders):
        """kohya's hook for models whose denoiser loads after text-encoder caching; called (after caching) when
        load_target_model returned no U-Net. Returns (unet, text_encoders), as kohya's."""
        raise NotImplementedError(f"{type(self).__name__}.load_target_model returned no U-Net and load_unet_lazily "
                                  "is not implemented")

    def load_tokenizer(self, args: argparse.Namespace) -> list:
        """kohya v0.9.1's hook; the default tokenize strategy uses it."""
        from library.text.tokenize import load_tokenizers

        return load_tokenizers(self.family, args.tokenizer_cache_dir)

    def get_tokenize_strategy(self, args) -> strategies.TokenizeStrategy:
        tokenizers = self.load_tokenizer(args)
        tokenizers = list(tokenizers) if isinstance(tokenizers, (list, tuple)) else [tokenizers]
        return strategies.TokenizeStrategy(tokenizers, args.max_token_length)

    def get_tokenizers(self, tokenize_strategy) -> list:
        return list(tokenize_strategy.tokenizers)

    def get_text_encoding_strategy(self, args) -> strategies.TextEncodingStrategy:
        return strategies.TextEncodingStrategy(self._models.caption_encoder)

    def get_latents_caching_strategy(self, args) -> strategies.LatentsCachingStrategy:
        return strategies.LatentsCachingStrategy(self.family.latent_cache_suffix, bool(args.cache_latents_to_disk),
                                                 args.vae_batch_size, bool(args.skip_cache_check))

    def get_text_encoder_outputs_caching_strategy(self, args) -> strategies.TextEncoderOutputsCachingStrategy | None:
        """None when text-encoder outputs are not cached (kohya: None for families that cannot cache)."""
        if not self.is_text_encoder_outputs_cached(args):
            return None
        return strategies.TextEncoderOutputsCachingStrategy(bool(args.cache_text_encoder_outputs_to_disk),
                                                            args.train_batch_size, bool(args.skip_cache_check))

    # ------------------------------------------------------------------------------------------ which parts train

    def is_text_encoder_outputs_cached(self, args: argparse.Namespace) -> bool:
        # kohya: caching to disk implies caching
        return bool(args.cache_text_encoder_outputs or args.cache_text_encoder_outputs_to_disk)

    def is_train_text_encoder(self, args: argparse.Namespace) -> bool:
        return not args.network_train_unet_only and not self.is_text_encoder_outputs_cached(args)

    def get_text_encoders_train_flags(self, args, text_encoders) -> list[bool]:
        return [self.is_train_text_encoder(args)] * len(text_encoders)

    def is_text_encoder_not_needed_for_training(self, args) -> bool:
        """After caching their outputs, frozen encoders leave the GPU (sampling brings them back while it runs)."""
        return self.is_text_encoder_outputs_cached(args) and not self.is_train_text_encoder(args)

    # ------------------------------------------------------------------------------------------ dtypes, devices

    def cast_text_encoder(self, args) -> bool:
        return True

    def cast_vae(self, args) -> bool:
        return True

    def cast_unet(self, args) -> bool:
        return True

    def prepare_unet_with_accelerator(self, args, accelerator, unet):
        """The frozen U-Net on the device (not DDP-wrapped: only the network trains; see all_reduce_network)."""
        return unet.to(accelerator.device)

    def prepare_text_encoder_grad_ckpt_workaround(self, index: int, text_encoder) -> None:
        """With gradient checkpointing, the embeddings' output must require grad for the checkpointed layers'
        network modules to get gradients (kohya's workaround)."""
        _embeddings(text_encoder).requires_grad_(True)

    def prepare_text_encoder_fp8(self, index: int, text_encoder, te_weight_dtype, weight_dtype) -> None:
        """--fp8_base for a text encoder: Linear weights in float8, embeddings (and norms) in the mixed dtype."""
        cast_to_fp8(text_encoder)
        _embeddings(text_encoder).to(dtype=weight_dtype)

    def post_process_network(self, args, accelerator, network, text_encoders, unet) -> None:
        """After the network is created (kohya's default does nothing)."""

    # ------------------------------------------------------------------------------------------ conditioning

    def cache_text_encoder_outputs_if_needed(self, args, accelerator, unet, vae, text_encoders, dataset,
                                             weight_dtype) -> None:
        """Encode every caption of `dataset` once (--cache_text_encoder_outputs[_to_disk]); frozen encoders then
        leave the GPU. Called for the training and then the validation group, as kohya does."""
        for encoder in text_encoders:
            encoder.to(accelerator.device, dtype=weight_dtype if self.cast_text_encoder(args) else None)
        caching = self.get_text_encoder_outputs_caching_strategy(args)
        if caching is None:
            return
        from library.data.caching import attach_existing_caches, cache_text_encoder_outputs

        with accelerator.autocast():  # fp8 weights (--fp8_base) are computed in the mixed dtype
            cache_text_encoder_outputs(dataset, self._models.caption_encoder, to_disk=caching.cache_to_disk,
                                       batch_size=caching.batch_size,
                                       skip_check=caching.skip_disk_cache_validity_check,
                                       process_index=accelerator.process_index,
                                       num_processes=accelerator.num_processes,
                                       show_progress=accelerator.is_main_process)
        if caching.cache_to_disk:
            accelerator.wait_for_everyone()
            attach_existing_caches(dataset, latent_suffix=None, text_outputs=True)
        if self.is_text_encoder_not_needed_for_training(args) and not args.highvram:
            for encoder in text_encoders:
                encoder.to("cpu")

    def get_text_cond(self, args, accelerator, batch: dict, tokenizers, text_encoders, weight_dtype) -> TextConds:
        """Conditioning of a batch's captions, computed with the given tokenizers and encoders (kohya v0.9.1)."""
        from library.text.conditioning import CaptionEncoder

        encoder = self._models.caption_encoder
        if list(tokenizers) != list(encoder.tokenizers) or list(text_encoders) != list(encoder.text_encoders):
            encoder = CaptionEncoder(encoder.family, list(tokenizers), list(text_encoders),
                                     max_token_length=encoder.max_token_length, clip_skip=encoder.clip_skip,
                                     weighted=encoder.weighted)
        with accelerator.autocast():
            return encoder.encode(batch["captions"])

    def call_unet(self, args, accelerator, unet, noisy_latents, timesteps, text_conds, batch: dict, weight_dtype,
                  **kwargs):
        text_conds = as_text_conds(text_conds)
        return unet(noisy_latents, timesteps, encoder_hidden_states=text_conds.hidden_states.to(weight_dtype)).sample

    def get_noise_scheduler(self, args, device):
        from library.train.noise import make_noise_scheduler

        return make_noise_scheduler(self.family.v_parameterization, args.zero_terminal_snr)

    def encode_images_to_latents(self, args, vae, images: torch.Tensor, generators: list | None = None) -> torch.Tensor:
        """A sample of the VAE posterior; with `generators` (one per image) the draw is reproducible per sample."""
        with torch.no_grad():
            posterior = vae.encode(images.to(vae.device, vae.dtype)).latent_dist
            if generators is None:
                return posterior.sample()
            shape = (1, *posterior.mean.shape[1:])
            noise = torch.cat([torch.randn(shape, generator=generator) for generator in generators])
            return posterior.mean + posterior.std * noise.to(posterior.mean.device, posterior.mean.dtype)

    def shift_scale_latents(self, args, latents: torch.Tensor) -> torch.Tensor:
        return latents * self.vae_scale_factor
