"""Chunked CLIP text encoding (COMPAT §14.3) and per-token prompt weights (COMPAT §13).

`encode_chunks` runs one transformers CLIP text encoder on `[B, n, 77]` token windows (all B·n windows in one
batch) and stitches the states back into one sequence of `1 + 75n + 1` positions: the BOS state of window 0,
the 75 content states of every window in order, the last state of the last window.

Which layer is used is data (`layer`, `final_layer_norm`), not a family branch:
- SD1/SD2: `layer_for_clip_skip(clip_skip)` with the final LayerNorm (clip_skip 1 = `last_hidden_state`);
- SDXL: `layer=-2` without the final LayerNorm for both encoders (see `library/text/sdxl_cond.py`).
"""
from __future__ import annotations

import sys
from dataclasses import dataclass

import torch

from library.errors import FlagError
from library.text.tokenize import CHUNK_CONTENT, CHUNK_LENGTH, EOS_ID


@dataclass
class TextConds:
    """Text conditioning for the U-Net.

    hidden_states: `[B, 1 + 75n + 1, D]` cross-attention context (SDXL: TE1 and TE2 features concatenated).
    pooled: `[B, P]` projected pooled vector (SDXL TE2), else None.
    widths: the feature width each encoder contributed to hidden_states (SDXL: (768, 1280)), when known.

    It also reads as kohya's list of conditioning tensors (`text_encoder_conds`), so trainer subclasses written
    for kohya can index it: SD1/SD2 `[hidden_states]`, SDXL `[hidden_states_te1, hidden_states_te2, pooled]`.
    """

    hidden_states: torch.Tensor
    pooled: torch.Tensor | None = None
    widths: tuple[int, ...] | None = None

    def as_list(self) -> list[torch.Tensor]:
        """kohya's `text_encoder_conds` order."""
        if not self.widths or len(self.widths) == 1:
            return [self.hidden_states] + ([self.pooled] if self.pooled is not None else [])
        return [*torch.split(self.hidden_states, list(self.widths), dim=-1), self.pooled]

    def __iter__(self):
        return iter(self.as_list())

    def __len__(self) -> int:
        return len(self.as_list())

    def __getitem__(self, index):
        return self.as_list()[index]

    def to(self, device=None, dtype=None) -> "TextConds":
        return TextConds(self.hidden_states.to(device=device, dtype=dtype),
                         None if self.pooled is None else self.pooled.to(device=device, dtype=dtype), self.widths)


def as_text_conds(value, widths: tuple[int, ...] | None = None) -> "TextConds":
    """TextConds from what a hook returned: TextConds itself, one tensor, or kohya's list of tensors."""
    if isinstance(value, TextConds):
        return value
    if isinstance(value, torch.Tensor):
        return TextConds(value)
    parts = [part for part in value if part is not None]
    if len(parts) >= 3:  # SDXL: hidden states of TE1, TE2, then the pooled vector
        return TextConds(torch.cat(parts[:-1], dim=-1), parts[-1], tuple(part.shape[-1] for part in parts[:-1]))
    return TextConds(parts[0], parts[1] if len(parts) > 1 else None, widths)


def layer_for_clip_skip(clip_skip: int | None) -> int:
    """`hidden_states` index for `--clip_skip` k (−k; no clip_skip = −1, the last layer)."""
    if clip_skip is None:
        return -1
    if isinstance(clip_skip, bool) or not isinstance(clip_skip, int) or clip_skip < 1:
        raise FlagError(f"--clip_skip must be a positive integer (2 = penultimate layer), got {clip_skip!r}")
    return -clip_skip


def unwrap_encoder(text_encoder) -> torch.nn.Module:
    """The transformers model inside a DistributedDataParallel / torch.compile wrapper (or the model itself)."""
    from torch.nn.parallel import DistributedDataParallel

    # torch.compile's wrapper class lives in a module that takes seconds to import; nothing can be compiled
    # unless it was imported already.
    eval_frame = sys.modules.get("torch._dynamo.eval_frame")
    while True:
        if isinstance(text_encoder, DistributedDataParallel):
            text_encoder = text_encoder.module
        elif eval_frame is not None and isinstance(text_encoder, eval_frame.OptimizedModule):
            text_encoder = text_encoder._orig_mod
        else:
            return text_encoder


def text_transformer(text_encoder) -> torch.nn.Module:
    """The CLIPTextModel inside an encoder: itself, or `.text_model` of a CLIPTextModelWithProjection."""
    from transformers import CLIPTextModelWithProjection

    text_encoder = unwrap_encoder(text_encoder)
    if isinstance(text_encoder, CLIPTextModelWithProjection):
        return text_encoder.text_model
    return text_encoder


def assemble_chunks(per_chunk: torch.Tensor) -> torch.Tensor:
    """`[B, n, 77, ...]` → `[B, 1 + 75n + 1, ...]`: BOS of chunk 0, 75 content positions of each chunk, last
    position of the last chunk. For n = 1 this is the identity."""
    if per_chunk.shape[2] != CHUNK_LENGTH:
        raise ValueError(f"expected windows of {CHUNK_LENGTH} positions, got shape {tuple(per_chunk.shape)}")
    batch, n_chunks = per_chunk.shape[:2]
    rest = per_chunk.shape[3:]
    content = per_chunk[:, :, 1:1 + CHUNK_CONTENT].reshape(batch, n_chunks * CHUNK_CONTENT, *rest)
    return torch.cat([per_chunk[:, 0, :1], content, per_chunk[:, -1, -1:]], dim=1)


def first_eos_positions(input_ids: torch.Tensor, eos_id: int = EOS_ID) -> torch.LongTensor:
    """Index of the first EOS token in each row of `[B, L]` ids (0 for a row without one)."""
    return (input_ids == eos_id).int().argmax(dim=-1)


def encode_chunks(text_encoder, input_ids: torch.Tensor, *, layer: int = -1, final_layer_norm: bool = True,
                  weights: torch.Tensor | None = None, normalize_mean: bool = False,
                  return_pooled: bool = False, eos_id: int = EOS_ID) -> TextConds:
    """Encode `[B, n, 77]` token windows with one CLIP text encoder.

    layer: index into the encoder's `hidden_states` (embeddings first, −1 = last layer); with
        `final_layer_norm` the encoder's final LayerNorm is applied to it (−1 with the norm = `last_hidden_state`).
    weights: optional `[B, n, 77]` per-token weights (see `tokenize_weighted`): the content positions of the
        stitched states are multiplied by them, no re-normalisation (kohya's `--weighted_captions`).
    normalize_mean: after weighting, rescale each sample so its mean equals the unweighted mean (the
        generation pipelines' variant).
    return_pooled: also return the pooled vector: the final-LN `last_hidden_state` at the first EOS of window 0,
        times `text_projection` when the encoder has one (kohya's SDXL pooling, robust to added token ids).
    """
    if input_ids.dim() != 3 or input_ids.shape[-1] != CHUNK_LENGTH:
        raise ValueError(f"input_ids must be [B, n, {CHUNK_LENGTH}], got {tuple(input_ids.shape)}")
    batch, n_chunks = input_ids.shape[:2]
    device = next(text_encoder.parameters()).device
    flat_ids = input_ids.reshape(batch * n_chunks, CHUNK_LENGTH).to(device)
    use_last = layer == -1 and final_layer_norm
    # Call the encoder itself (not an inner module) so wrappers such as DDP see the forward pass.
    output = text_encoder(input_ids=flat_ids, output_hidden_states=not use_last, return_dict=True)
    if use_last:
        states = output.last_hidden_state
    else:
        states = output.hidden_states[layer]
        if final_layer_norm:
            states = text_transformer(text_encoder).final_layer_norm(states)
    hidden = assemble_chunks(states.reshape(batch, n_chunks, CHUNK_LENGTH, -1))
    if weights is not None:
        hidden = apply_token_weights(hidden, weights, normalize_mean=normalize_mean)

    pooled = None
    if return_pooled:
        last = output.last_hidden_state.reshape(batch, n_chunks, CHUNK_LENGTH, -1)[:, 0]
        positions = first_eos_positions(flat_ids.reshape(batch, n_chunks, CHUNK_LENGTH)[:, 0], eos_id)
        pooled = last[torch.arange(batch, device=last.device), positions.to(last.device)]
        pooled = project_pooled(text_encoder, pooled)
    return TextConds(hidden_states=hidden, pooled=pooled)


def project_pooled(text_encoder, pooled: torch.Tensor) -> torch.Tensor:
    """Apply `text_projection` (no bias) of a CLIPTextModelWithProjection; other encoders return `pooled`."""
    from transformers import CLIPTextModelWithProjection

    model = unwrap_encoder(text_encoder)
    if isinstance(model, CLIPTextModelWithProjection):
        return model.text_projection(pooled.to(model.text_projection.weight.dtype))
    return pooled


def apply_token_weights(hidden: torch.Tensor, weights: torch.Tensor, normalize_mean: bool = False) -> torch.Tensor:
    """Multiply the content positions of stitched states `[B, 1+75n+1, D]` by weights `[B, n, 77]`.

    The BOS and final positions keep weight 1. With `normalize_mean` each sample is rescaled afterwards so that
    its mean over positions and features is what it was before weighting.
    """
    batch, length = hidden.shape[:2]
    if weights.dim() != 3 or weights.shape[0] != batch or CHUNK_CONTENT * weights.shape[1] + 2 != length:
        raise ValueError(f"weights {tuple(weights.shape)} do not match hidden states {tuple(hidden.shape)}")
    per_position = assemble_chunks(weights.to(device=hidden.device, dtype=torch.float32))
    per_position[:, 0] = 1.0
    per_position[:, -1] = 1.0
    weighted = hidden.float() * per_position.unsqueeze(-1)
    if normalize_mean:
        before = hidden.float().mean(dim=(1, 2), keepdim=True)
        after = weighted.mean(dim=(1, 2), keepdim=True)
        weighted = weighted * (before / after)
    return weighted.to(hidden.dtype)
