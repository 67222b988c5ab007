"""CoOp-style learnable prompt context on CLIP's text tower, encoded on the truncated causal context.

Every class prompt is ``[SOT] ctx_1 .. ctx_M <class name> . [EOT]``: the M context vectors are
shared by all classes (class-agnostic, TPT/CoOp) and are the only trainable tensor; the encoders
stay frozen.  The token embeddings of the start token and of the class-name suffixes are computed
once per class set.  On causal towers that pool at the end-of-text token, the suffixes are cut
to the longest tokenised prompt, so the transformer runs on that length instead of the full
77-token context (identical pooled outputs; see ``vlmtta.text``).
"""
from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING, Sequence

import torch
from torch import nn

from .cache import load_torch_file

if TYPE_CHECKING:
    from .backbone import FrozenCLIP

DEFAULT_CTX_INIT = "a photo of a"
_RANDOM_INIT_STD = 0.02  # CoOp's generic-context initialisation


def init_context(backbone: "FrozenCLIP", n_ctx: int, ctx_init: str | None, seed: int = 0) -> torch.Tensor:
    """Initial context [M, W]: the token embeddings of ``ctx_init``, or N(0, 0.02) when it is ``None``/empty."""
    tower = _tower(backbone)
    if not ctx_init:
        generator = torch.Generator().manual_seed(seed)
        return (torch.randn(n_ctx, tower.width, generator=generator) * _RANDOM_INIT_STD).to(backbone.device)
    tokens = backbone.tokenize([ctx_init.replace("_", " ")])
    n_tokens = int(tower.pool_positions(tokens)[0]) - 1  # between SOT and EOT
    if n_tokens != n_ctx:
        raise ValueError(f"ctx_init {ctx_init!r} is {n_tokens} token(s) but n_ctx={n_ctx}: set n_ctx={n_tokens}, "
                         "or ctx_init=None for a random context of n_ctx tokens.")
    with torch.no_grad():
        return tower.embed(tokens)[0, 1:1 + n_ctx].float().clone()


def load_context(path: str | Path, device: torch.device | str = "cpu") -> torch.Tensor:
    """A learned context [M, W] from a CoOp checkpoint (``{'state_dict': {'ctx': ...}}``), a state dict or a tensor."""
    obj = load_torch_file(Path(path).expanduser(), "learned context")
    if isinstance(obj, dict):
        obj = obj.get("state_dict", obj)
        keys = [k for k in obj if k == "ctx" or k.endswith(".ctx")]
        if len(keys) != 1:
            raise ValueError(f"{path}: expected one 'ctx' tensor (CoOp's prompt learner), found keys {sorted(obj)[:8]}.")
        obj = obj[keys[0]]
    if not isinstance(obj, torch.Tensor) or obj.ndim != 2:
        raise ValueError(f"{path}: expected a class-agnostic context of shape [n_ctx, width], got "
                         f"{getattr(obj, 'shape', type(obj).__name__)}.")
    return obj.float().to(device)


def _tower(backbone: "FrozenCLIP"):
    if backbone.text_tower is None:
        raise ValueError(f"{backbone.model_name}: prompt tuning needs an open_clip text tower with token embeddings "
                         "(this tower cannot be taken apart).")
    return backbone.text_tower


class PromptLearner(nn.Module):
    """Learnable context ``ctx`` [M, W] and the frozen per-class token pieces of one class set.

    Args:
        backbone: the frozen CLIP model.
        classnames: the class set (``_`` is read as a space, as in TPT).
        ctx: initial context [M, W] (see ``init_context`` / ``load_context``); copied.
        truncate: encode on the context cut to the longest prompt (exact on causal towers);
            ``False`` keeps all 77 positions (the straightforward reference formulation).
    """

    def __init__(self, backbone: "FrozenCLIP", classnames: Sequence[str], ctx: torch.Tensor, truncate: bool = True):
        super().__init__()
        self.tower = _tower(backbone)
        n_ctx = ctx.shape[0]
        placeholder = " ".join(["X"] * n_ctx)
        tokens = backbone.tokenize([f"{placeholder} {name.replace('_', ' ')}." for name in classnames])
        length = self.tower.needed_length(tokens) if truncate else tokens.shape[1]
        with torch.no_grad():
            embedded = self.tower.embed(tokens[:, :length])
        self.register_buffer("prefix", embedded[:, :1].clone(), persistent=False)  # SOT
        self.register_buffer("suffix", embedded[:, 1 + n_ctx:].clone(), persistent=False)  # name . EOT (pad)
        self.register_buffer("positions", self.tower.pool_positions(tokens), persistent=False)
        self.ctx = nn.Parameter(ctx.detach().clone().float().to(embedded.device))
        self.length = length

    @property
    def n_classes(self) -> int:
        return self.prefix.shape[0]

    def prompts(self, ctx: torch.Tensor | None = None) -> torch.Tensor:
        """Prompt token embeddings [C, L, W] with context ``ctx`` (default: the learnable one)."""
        ctx = self.ctx if ctx is None else ctx
        ctx = ctx.to(self.prefix.dtype).unsqueeze(0).expand(self.n_classes, -1, -1)
        return torch.cat([self.prefix, ctx, self.suffix], dim=1)

    def forward(self, ctx: torch.Tensor | None = None) -> torch.Tensor:
        """L2-normalised class text features [C, D] (float32), differentiable w.r.t. the context only."""
        features = self.tower.forward_embeddings(self.prompts(ctx), self.positions)
        return nn.functional.normalize(features.float(), dim=-1)

    def forward_many(self, contexts: torch.Tensor) -> torch.Tensor:
        """Class text features [S, C, D] of ``S`` contexts [S, M, W] in one pass of the tower (S x C prompts)."""
        n_contexts = contexts.shape[0]
        ctx = contexts.to(self.prefix.dtype).unsqueeze(1).expand(-1, self.n_classes, -1, -1)
        prompts = torch.cat([self.prefix.expand(n_contexts, -1, -1, -1), ctx,
                             self.suffix.expand(n_contexts, -1, -1, -1)], dim=2).flatten(0, 1)
        features = self.tower.forward_embeddings(prompts, self.positions.repeat(n_contexts))
        return nn.functional.normalize(features.float(), dim=-1).view(n_contexts, self.n_classes, -1)
