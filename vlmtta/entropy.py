"""Entropies over class logits and confident-view selection, shared by every view-based method."""
from __future__ import annotations

import math

import torch


def shannon_entropy(logits: torch.Tensor, dim: int = -1) -> torch.Tensor:
    """Entropy (nats) of ``softmax(logits)`` along ``dim``, computed stably from log-probabilities."""
    log_probs = logits.log_softmax(dim=dim)
    return -(log_probs.exp() * log_probs).sum(dim=dim)


def marginal_log_probs(logits: torch.Tensor) -> torch.Tensor:
    """log of the mean probability over views (rows): ``logsumexp(log_softmax) - log N`` -> [C]."""
    return torch.logsumexp(logits.log_softmax(dim=-1), dim=0) - math.log(logits.shape[0])


def marginal_entropy(logits: torch.Tensor) -> torch.Tensor:
    """Entropy of the view-averaged prediction (TPT's loss), from logits [N, C]."""
    log_probs = marginal_log_probs(logits)
    return -(log_probs.exp() * log_probs).sum()


def confident_count(n_views: int, ratio: float) -> int:
    """How many of ``n_views`` a confidence ratio keeps: ``int(n * ratio)`` as in TPT, at least one."""
    if not 0 < ratio <= 1:
        raise ValueError(f"The confidence ratio must lie in (0, 1], got {ratio}.")
    return max(1, int(n_views * ratio))


def select_confident(logits: torch.Tensor, ratio: float, scores: torch.Tensor | None = None) -> torch.Tensor:
    """Indices of the ``ratio`` most confident views, lowest score first.

    ``scores`` defaults to the Shannon entropy of each row of ``logits`` [N, C]; any other
    per-view uncertainty (e.g. a Tsallis entropy) can be passed instead.
    """
    scores = shannon_entropy(logits) if scores is None else scores
    return torch.argsort(scores, stable=True)[: confident_count(logits.shape[0], ratio)]
