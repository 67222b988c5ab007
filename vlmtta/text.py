"""Text-tower access for open_clip models, with encoding on a truncated causal context.

CLIP's text transformer is causal and pools the output at the end-of-text (EOT) token, so the
pooled feature depends only on positions up to the EOT token.  Encoding on a context cut to the
longest tokenised prompt of the batch therefore gives the same result as the full 77-token
context, at a fraction of the cost.  This holds only for towers with a causal mask that pool at
the EOT (``argmax``/``eos``) or first token and have no appended class token; other towers
(SigLIP, CoCa, Hugging Face text encoders) are encoded on their full context.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

_TRUNCATABLE_POOLS = ("argmax", "eos", "first")


@dataclass
class TextTower:
    """The parts of an open_clip text tower, whether it sits on ``CLIP`` or in ``CustomTextCLIP.text``."""

    token_embedding: nn.Embedding
    positional_embedding: torch.Tensor
    transformer: nn.Module
    ln_final: nn.Module
    text_projection: nn.Module | torch.Tensor | None
    attn_mask: torch.Tensor | None
    pool_type: str
    eos_id: int | None
    context_length: int

    @classmethod
    def of(cls, model: nn.Module) -> "TextTower | None":
        """Wrap ``model``'s text tower; ``None`` for towers this module cannot take apart (e.g. HF)."""
        tower = getattr(model, "text", None)
        if tower is None:  # classic CLIP: the text parts are attributes of the model itself
            return cls(model.token_embedding, model.positional_embedding, model.transformer, model.ln_final,
                       model.text_projection, model.attn_mask, model.text_pool_type,
                       getattr(model, "text_eos_id", None), model.positional_embedding.shape[0])
        if getattr(tower, "cls_emb", "missing") is not None or getattr(tower, "use_pad_mask", True):
            return None  # CoCa-style class token, bidirectional padding masks or a non-open_clip tower
        return cls(tower.token_embedding, tower.positional_embedding, tower.transformer, tower.ln_final,
                   tower.text_projection, tower.attn_mask, tower.pool_type, getattr(tower, "eos_id", None),
                   tower.positional_embedding.shape[0])

    @property
    def causal(self) -> bool:
        """Whether pooled outputs are unchanged when the context is cut after the pooled position."""
        return self.attn_mask is not None and self.pool_type in _TRUNCATABLE_POOLS

    @property
    def width(self) -> int:
        return self.token_embedding.weight.shape[1]

    def pool_positions(self, tokens: torch.Tensor) -> torch.Tensor:
        """Index of the pooled token in each row of ``tokens`` [N, L]."""
        if self.pool_type == "argmax":
            return tokens.argmax(dim=-1)
        if self.pool_type == "eos":
            return (tokens == self.eos_id).int().argmax(dim=-1)
        if self.pool_type == "first":
            return torch.zeros(tokens.shape[0], dtype=torch.long, device=tokens.device)
        return torch.full((tokens.shape[0],), tokens.shape[1] - 1, dtype=torch.long, device=tokens.device)

    def needed_length(self, tokens: torch.Tensor) -> int:
        """Shortest context that leaves every pooled output unchanged."""
        if not self.causal:
            return tokens.shape[1]
        return int(self.pool_positions(tokens).max()) + 1

    def embed(self, tokens: torch.Tensor) -> torch.Tensor:
        """Token embeddings [N, L, W] in the transformer's compute dtype (no positions added)."""
        return self.token_embedding(tokens).to(self.transformer.get_cast_dtype())

    def forward_embeddings(self, x: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
        """Run the tower on token embeddings ``x`` [N, L, W] and pool at ``positions`` [N] -> [N, D]."""
        length = x.shape[1]
        x = x + self.positional_embedding[:length].to(x.dtype)
        mask = None if self.attn_mask is None else self.attn_mask[:length, :length]
        x = self.ln_final(self.transformer(x, attn_mask=mask))
        x = x[torch.arange(x.shape[0], device=x.device), positions]
        if isinstance(self.text_projection, nn.Linear):
            return self.text_projection(x)
        return x if self.text_projection is None else x @ self.text_projection

    def encode(self, tokens: torch.Tensor, truncate: bool = True) -> torch.Tensor:
        """Unnormalised text features of ``tokens`` [N, L]; on the truncated context when exact."""
        positions = self.pool_positions(tokens)
        if truncate:
            tokens = tokens[:, : self.needed_length(tokens)]
        return self.forward_embeddings(self.embed(tokens), positions)


def encode_tokens(model: nn.Module, tokens: torch.Tensor, truncate: bool = True) -> torch.Tensor:
    """Unnormalised text features; falls back to ``model.encode_text`` for opaque towers."""
    tower = TextTower.of(model)
    if tower is None:
        return model.encode_text(tokens)
    return tower.encode(tokens, truncate=truncate)
