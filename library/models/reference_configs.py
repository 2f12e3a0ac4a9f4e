"""Configs of the full-size released models (SD1.5, SD2.1-768-v, SDXL base 1.0).

Used for key-name checks on the meta device and by the benchmarks; loading never needs them (configs are
derived from the weights). diffusers' UNet `attention_head_dim` holds the *number of heads* for these models.
"""
from __future__ import annotations

SD15_UNET = dict(
    sample_size=64, in_channels=4, out_channels=4,
    down_block_types=("CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "DownBlock2D"),
    up_block_types=("UpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D"),
    block_out_channels=(320, 640, 1280, 1280), layers_per_block=2, cross_attention_dim=768,
    attention_head_dim=8, norm_num_groups=32,
)

SD21_UNET = dict(
    SD15_UNET, sample_size=96, attention_head_dim=(5, 10, 20, 20), cross_attention_dim=1024,
    use_linear_projection=True, upcast_attention=True,
)

SDXL_UNET = dict(
    sample_size=128, in_channels=4, out_channels=4,
    down_block_types=("DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"),
    up_block_types=("CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"),
    block_out_channels=(320, 640, 1280), layers_per_block=2, transformer_layers_per_block=(1, 2, 10),
    attention_head_dim=(5, 10, 20), use_linear_projection=True, cross_attention_dim=2048,
    addition_embed_type="text_time", addition_time_embed_dim=256, projection_class_embeddings_input_dim=2816,
    norm_num_groups=32,
)

SD_VAE = dict(
    in_channels=3, out_channels=3, down_block_types=("DownEncoderBlock2D",) * 4,
    up_block_types=("UpDecoderBlock2D",) * 4, block_out_channels=(128, 256, 512, 512), layers_per_block=2,
    latent_channels=4, norm_num_groups=32, sample_size=512, scaling_factor=0.18215,
)
SDXL_VAE = dict(SD_VAE, sample_size=1024, scaling_factor=0.13025)

# transformers CLIPTextConfig kwargs.
CLIP_L_TEXT = dict(vocab_size=49408, hidden_size=768, intermediate_size=3072, num_hidden_layers=12,
                   num_attention_heads=12, max_position_embeddings=77, hidden_act="quick_gelu", projection_dim=768)
# SD2's OpenCLIP ViT-H text tower has 24 layers in the file; the in-memory model drops the unused last one.
OPEN_CLIP_H_TEXT = dict(vocab_size=49408, hidden_size=1024, intermediate_size=4096, num_hidden_layers=23,
                        num_attention_heads=16, max_position_embeddings=77, hidden_act="gelu", projection_dim=512)
OPEN_CLIP_BIGG_TEXT = dict(vocab_size=49408, hidden_size=1280, intermediate_size=5120, num_hidden_layers=32,
                           num_attention_heads=20, max_position_embeddings=77, hidden_act="gelu",
                           projection_dim=1280)

FULL_SIZE = {
    "sd1": dict(unet=SD15_UNET, vae=SD_VAE, text=[CLIP_L_TEXT]),
    "sd2-v": dict(unet=SD21_UNET, vae=SD_VAE, text=[OPEN_CLIP_H_TEXT]),
    "sdxl": dict(unet=SDXL_UNET, vae=SDXL_VAE, text=[CLIP_L_TEXT, OPEN_CLIP_BIGG_TEXT]),
}
