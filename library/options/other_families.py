"""Flags of kohya's trainers for other model families (FLUX, SD3, Lumina), which these SD1.x/2.x/SDXL scripts
refuse with one line saying where they belong instead of argparse's bare "unrecognized arguments"."""
from __future__ import annotations

FLUX_SD3 = "FLUX/SD3"
LUMINA = "Lumina"

# flag name (without --) -> family; from kohya's flux_train_utils.add_flux_train_arguments,
# sd3_train_utils.add_sd3_training_arguments, train_util.add_dit_training_arguments and lumina_train_util
OTHER_FAMILY_FLAGS: dict[str, str] = {
    **dict.fromkeys((
        # FLUX.1 (flux_train_network.py, flux_train.py)
        "ae", "t5xxl", "clip_l", "controlnet_model_name_or_path", "t5xxl_max_token_length", "apply_t5_attn_mask",
        "guidance_scale", "timestep_sampling", "sigmoid_scale", "model_prediction_type", "discrete_flow_shift",
        "split_mode", "bypass_flux_guidance", "model_type", "blockwise_fused_optimizers",
        # SD3 (sd3_train_network.py, sd3_train.py)
        "clip_g", "save_clip", "save_t5xxl", "t5xxl_device", "t5xxl_dtype", "apply_lg_attn_mask",
        "clip_l_dropout_rate", "clip_g_dropout_rate", "t5_dropout_rate", "pos_emb_random_crop_rate",
        "enable_scaled_pos_embed", "training_shift", "use_t5xxl_cache_only", "num_last_block_to_freeze",
        "train_t5xxl",
        # DiT training options shared by FLUX and SD3 (train_util.add_dit_training_arguments)
        "weighting_scheme", "logit_mean", "logit_std", "mode_scale", "blocks_to_swap", "text_encoder_batch_size",
        "cpu_offload_checkpointing",
    ), FLUX_SD3),
    **dict.fromkeys(("gemma2", "gemma2_max_token_length", "system_prompt", "use_flash_attn"), LUMINA),
}


def other_family_message(name: str) -> str:
    """One line for a flag of another family's trainer, e.g. `--t5xxl belongs to FLUX/SD3 training ...`."""
    family = OTHER_FAMILY_FLAGS[name]
    return (f"--{name} belongs to {family} training (kohya's {family} scripts); this script trains SD1.x/2.x and "
            "SDXL models, where it has no meaning")
