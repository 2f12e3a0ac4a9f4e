"""What only SDXL has: the dual-encoder context, the pooled vector and the size conditioning (COMPAT §14.3–14.4).

- context: TE1 (CLIP-L) and TE2 (OpenCLIP bigG) penultimate layers, no final LayerNorm, concatenated on the
  feature axis (768 + 1280 = 2048 for the real model);
- pooled: TE2 final-LN state at the first EOS of window 0, times `text_projection` (1280);
- vector (`label_emb` input): pooled + six sinusoidal size embeddings (original h/w, crop top/left, target h/w).
"""
from __future__ import annotations

import math
from typing import Sequence

import torch

from library.text.encode import TextConds, encode_chunks

SDXL_LAYER = -2  # penultimate hidden state (hidden_states[11] of the 12-layer CLIP-L), no final LayerNorm
SDXL_SIZE_EMBED_DIM = 256  # addition_time_embed_dim of the real SDXL U-Net (the tiny test model uses 8)


def sinusoidal_embedding(values: torch.Tensor, dim: int, max_period: float = 10000.0) -> torch.Tensor:
    """`[N]` numbers → `[N, dim]`: `[cos(x·f_i), sin(x·f_i)]` with `f_i = exp(−ln(max_period)·i/(dim/2))`.

    Cosines come first (as in SDXL's timestep embedding). An odd `dim` gets one trailing zero.
    """
    half = dim // 2
    exponents = torch.arange(half, dtype=torch.float32, device=values.device) / half
    frequencies = torch.exp(-math.log(max_period) * exponents)
    angles = values.to(torch.float32)[:, None] * frequencies[None, :]
    embedding = torch.cat([torch.cos(angles), torch.sin(angles)], dim=-1)
    if dim % 2:
        embedding = torch.cat([embedding, torch.zeros_like(embedding[:, :1])], dim=-1)
    return embedding


def _as_pairs(values, name: str) -> torch.Tensor:
    """(h, w)-style input → float `[B, 2]`; accepts one pair, a list of pairs or a tensor."""
    tensor = torch.as_tensor(values, dtype=torch.float32) if not isinstance(values, torch.Tensor) else values
    if tensor.dim() == 1:
        tensor = tensor.unsqueeze(0)
    if tensor.dim() != 2 or tensor.shape[1] != 2:
        raise ValueError(f"{name} must be pairs [B, 2], got shape {tuple(tensor.shape)}")
    return tensor.to(torch.float32)


def size_embeddings(original_size_hw, crop_top_left, target_size_hw, dim: int = SDXL_SIZE_EMBED_DIM) -> torch.Tensor:
    """SDXL size conditioning `[B, 6·dim]`: embeddings of original-h, original-w, crop-top, crop-left, target-h,
    target-w, in that order. `dim` is the U-Net's `addition_time_embed_dim`."""
    parts = [_as_pairs(original_size_hw, "original_size_hw"), _as_pairs(crop_top_left, "crop_top_left"),
             _as_pairs(target_size_hw, "target_size_hw")]
    batch = max(part.shape[0] for part in parts)
    device = parts[0].device
    parts = [part.to(device).expand(batch, 2) if part.shape[0] == 1 else part.to(device) for part in parts]
    if any(part.shape[0] != batch for part in parts):
        raise ValueError(f"size conditioning batch sizes differ: {[part.shape[0] for part in parts]}")
    values = torch.cat(parts, dim=1)  # [B, 6]
    return sinusoidal_embedding(values.reshape(-1), dim).reshape(batch, 6 * dim)


def sdxl_vector(pooled: torch.Tensor, size_emb: torch.Tensor) -> torch.Tensor:
    """The U-Net's `label_emb` input: pooled vector then size embeddings (1280 + 1536 = 2816 for real SDXL)."""
    if pooled.shape[0] != size_emb.shape[0]:
        raise ValueError(f"pooled batch {pooled.shape[0]} != size embedding batch {size_emb.shape[0]}")
    return torch.cat([pooled, size_emb.to(device=pooled.device, dtype=pooled.dtype)], dim=1)


def encode_sdxl(text_encoders: Sequence, ids_te1: torch.Tensor, ids_te2: torch.Tensor, *,
                weights_te1: torch.Tensor | None = None, weights_te2: torch.Tensor | None = None,
                normalize_mean: bool = False) -> TextConds:
    """SDXL text conditioning from `[B, n, 77]` windows of each tokenizer.

    Returns hidden_states `[B, 1+75n+1, D1+D2]` (TE1 then TE2 features) and pooled `[B, P]` (from TE2). Optional
    per-token weights scale each encoder's content positions (see `encode_chunks`); the pooled vector is not
    weighted. `--clip_skip` does not apply to SDXL.
    """
    te1, te2 = text_encoders
    cond1 = encode_chunks(te1, ids_te1, layer=SDXL_LAYER, final_layer_norm=False, weights=weights_te1,
                          normalize_mean=normalize_mean)
    cond2 = encode_chunks(te2, ids_te2, layer=SDXL_LAYER, final_layer_norm=False, weights=weights_te2,
                          normalize_mean=normalize_mean, return_pooled=True)
    if cond1.hidden_states.shape[:2] != cond2.hidden_states.shape[:2]:
        raise ValueError(f"TE1 and TE2 token windows differ: {tuple(ids_te1.shape)} vs {tuple(ids_te2.shape)}")
    hidden = torch.cat([cond1.hidden_states, cond2.hidden_states.to(cond1.hidden_states)], dim=-1)
    return TextConds(hidden_states=hidden, pooled=cond2.pooled,
                     widths=(cond1.hidden_states.shape[-1], cond2.hidden_states.shape[-1]))


def sdxl_time_ids(original_size_hw, crop_top_left, target_size_hw) -> torch.Tensor:
    """`[B, 6]` (original h, w, crop top, left, target h, w): what the diffusers SDXL U-Net embeds into the same
    size embeddings as `size_embeddings` (its `add_time_proj` + `add_embedding`)."""
    parts = [_as_pairs(original_size_hw, "original_size_hw"), _as_pairs(crop_top_left, "crop_top_left"),
             _as_pairs(target_size_hw, "target_size_hw")]
    return torch.cat(parts, dim=1)
