"""The trained part of textual inversion, shaped like a network module so the one training loop drives it.

kohya hands each encoder's whole token-embedding matrix to the optimizer and copies the old rows back after
every step (TRAINERS §3.4), so weight decay, momentum and 8-bit state still run over the whole vocabulary. Here
the new tokens' vectors are their own small parameters (`[n, width]` per text encoder) and the encoders' token
embedding reads them for the new ids: nothing else can change, and the optimizer state is O(vectors).
"""
from __future__ import annotations

import torch

from library.errors import FlagError


class NewTokenEmbedding(torch.nn.Module):
    """An encoder's token embedding whose ids from `first_id` on are read from trained vectors.

    The table keeps its frozen rows and is not resized (no copy of the vocabulary's embeddings); it is never
    indexed with a new id. The vectors are held through their owner, not registered here, so the encoder's own
    parameters, casts and requires_grad switches never touch them.
    """

    def __init__(self, table: torch.nn.Embedding, first_id: int, owner: "TokenVectors", slot: int):
        super().__init__()
        self.table = table
        self.first_id = first_id
        object.__setattr__(self, "_owner", owner)  # not a submodule: see the class docstring
        self.slot = slot

    @property
    def weight(self) -> torch.Tensor:  # what transformers and our code read of an nn.Embedding
        return self.table.weight

    @property
    def num_embeddings(self) -> int:
        return self.table.num_embeddings

    @property
    def embedding_dim(self) -> int:
        return self.table.embedding_dim

    def forward(self, input_ids: torch.Tensor) -> torch.Tensor:
        embedded = self.table(input_ids.clamp(max=self.first_id - 1))
        vectors = self._owner.vectors[self.slot]
        is_new = input_ids >= self.first_id
        index = (input_ids - self.first_id).clamp(0, vectors.shape[0] - 1)
        return torch.where(is_new.unsqueeze(-1), vectors.to(embedded.dtype)[index], embedded)


class TokenVectors(torch.nn.Module):
    """`vectors[i]`: the `[n, width_i]` vectors of the new tokens in text encoder i (ids `first_ids[i]`...)."""

    def __init__(self, initial: list[torch.Tensor], first_ids: list[int]):
        super().__init__()
        self.vectors = torch.nn.ParameterList(torch.nn.Parameter(block.detach().clone().float()) for block in initial)
        self.first_ids = list(first_ids)

    @property
    def num_vectors(self) -> int:
        return int(self.vectors[0].shape[0])

    # ---------------------------------------------------------------------------------- network interface

    def apply_to(self, text_encoders, unet, train_text_encoder: bool, train_unet: bool) -> None:
        encoders = list(text_encoders) if isinstance(text_encoders, (list, tuple)) else [text_encoders]
        if len(encoders) != len(self.vectors):
            raise ValueError(f"{len(self.vectors)} vector block(s) for {len(encoders)} text encoder(s)")
        for slot, (encoder, first_id) in enumerate(zip(encoders, self.first_ids)):
            table = encoder.get_input_embeddings()
            if isinstance(table, NewTokenEmbedding):
                table = table.table
            encoder.set_input_embeddings(NewTokenEmbedding(table, first_id, self, slot))

    def prepare_optimizer_params_with_multiple_te_lrs(self, text_encoder_lrs, unet_lr, default_lr):
        """One group (kohya logs its rate as `lr`)."""
        return [{"params": list(self.vectors), "lr": default_lr}], ["textual_inversion"]

    def get_trainable_params(self):
        return list(self.vectors)

    def enable_gradient_checkpointing(self) -> None:
        """The trainer switches it on for the encoders the vectors pass through."""

    def on_epoch_start(self, text_encoder, unet) -> None:
        """Nothing per epoch."""

    def prepare_grad_etc(self, text_encoder, unet) -> None:
        """The vectors always train (they are the only parameters)."""

    def load_weights(self, file: str):
        raise FlagError(f"--network_weights {file}: textual inversion continues from an embedding file with "
                        "--weights")
