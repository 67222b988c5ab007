"""Entropies over class logits and confident-view selection, shared by every view-based method.

Views are ranked by a pluggable confidence criterion (lower score = more confident):
``shannon`` (TPT, Zero, STS), ``tsallis`` with a fixed ``q`` (TE, Wu et al., ICLR 2026) and
``adte`` with one ``q_l`` per class (ADTE, same paper).  ``confidence_scores`` dispatches on the
name; ``select_confident(logits, ratio, scores)`` keeps the lowest-scoring views.
"""
from __future__ import annotations

import math

import torch

CONFIDENCE_CRITERIA = ("shannon", "tsallis", "adte")
ADTE_FORMS = ("tsallis", "code")  # class-wise Tsallis: the Tsallis-consistent form, the official code's form


def shannon_entropy(logits: torch.Tensor, dim: int = -1) -> torch.Tensor:
    """Entropy (nats) of ``softmax(logits)`` along ``dim``, computed stably from log-probabilities."""
    log_probs = logits.log_softmax(dim=dim)
    return -(log_probs.exp() * log_probs).sum(dim=dim)


def marginal_log_probs(logits: torch.Tensor) -> torch.Tensor:
    """log of the mean probability over views (rows): ``logsumexp(log_softmax) - log N`` -> [C] (or [..., C])."""
    return torch.logsumexp(logits.log_softmax(dim=-1), dim=0) - math.log(logits.shape[0])


def marginal_entropy(logits: torch.Tensor) -> torch.Tensor:
    """Entropy of the view-averaged prediction (TPT's loss), from logits [N, C]; from [N, S, C], one per S."""
    log_probs = marginal_log_probs(logits)
    return -(log_probs.exp() * log_probs).sum(dim=-1)


def mean_probs(logits: torch.Tensor) -> torch.Tensor:
    """Softmax of each row of ``logits`` [N, C] averaged over the rows -> [C] (one row: its softmax, which is its mean)."""
    probs = logits.softmax(dim=-1)
    return probs[0] if probs.shape[0] == 1 else probs.mean(dim=0)


def confident_count(n_views: int, ratio: float) -> int:
    """How many of ``n_views`` a confidence ratio keeps: ``int(n * ratio)`` as in TPT, at least one."""
    if not 0 < ratio <= 1:
        raise ValueError(f"The confidence ratio must lie in (0, 1], got {ratio}.")
    return max(1, int(n_views * ratio))


def select_confident(logits: torch.Tensor, ratio: float, scores: torch.Tensor | None = None) -> torch.Tensor:
    """Indices of the ``ratio`` most confident views, lowest score first: [K] from ``logits`` [N, C], or [B, K]
    (one selection per image) from [B, N, C].

    ``scores`` ([N] or [B, N]) defaults to the Shannon entropy of each row of ``logits``; any other
    per-view uncertainty (e.g. a Tsallis entropy) can be passed instead.
    """
    scores = shannon_entropy(logits) if scores is None else scores
    return torch.argsort(scores, dim=-1, stable=True)[..., : confident_count(logits.shape[-2], ratio)]


def take_views(values: torch.Tensor, indices: torch.Tensor) -> torch.Tensor:
    """Rows ``indices`` of each image's views: ``values`` [N, ...] with [K] -> [K, ...], or [B, N, ...] with
    [B, K] -> [B, K, ...] (``select_confident``'s output: ``values[b, indices[b]]``)."""
    indices = indices.to(values.device)
    if indices.ndim == 1:
        return values[indices]
    return values[torch.arange(values.shape[0], device=values.device)[:, None], indices]


def tsallis_entropy(logits: torch.Tensor, q: float | torch.Tensor, dim: int = -1) -> torch.Tensor:
    """Tsallis entropy ``sum_l (p_l - p_l^q_l) / (q_l - 1)`` of ``softmax(logits)`` along ``dim``.

    ``q`` is a float (TE: ``(1 - sum p^q) / (q - 1)``) or one value per class (broadcast along
    ``dim``; ADTE's class-wise form).  ``q -> 1`` gives the Shannon entropy: terms with
    ``p^q`` close to ``p`` are computed as ``-p log p expm1(z) / z`` with ``z = (q - 1) log p``,
    which avoids the cancellation of ``p - p^q`` (exactly Shannon at ``q == 1``).
    """
    log_p = logits.log_softmax(dim=dim)
    q = torch.as_tensor(q, dtype=log_p.dtype, device=log_p.device)
    if q.ndim and dim not in (-1, log_p.ndim - 1):
        raise ValueError("A per-class q needs the classes on the last dimension.")
    p, d = log_p.exp(), q - 1
    z = d * log_p  # log(p^q / p)
    near = z.abs() < 1  # p^q close to p: -p log p expm1(z)/z has no cancellation (and is -p log p at q == 1)
    safe_d = torch.where(d == 0, 1.0, d) if q.ndim else d  # far terms are used where |z| >= 1, so d != 0
    if torch.is_grad_enabled() and logits.requires_grad:
        z_near = torch.where(near, z, 1.0)
        zero = z_near == 0
        phi = torch.where(zero, 1.0, torch.expm1(z_near) / torch.where(zero, 1.0, z_near))
        return torch.where(near, -p * log_p * phi, (p - torch.exp(q * log_p)) / safe_d).sum(dim=dim)
    # the same operations in place (the same values, bit for bit; about half the time on CPU)
    z_near = z.masked_fill_(near.logical_not(), 1.0)
    zero = z_near == 0
    phi = torch.expm1(z_near).div_(z_near.masked_fill_(zero, 1.0)).masked_fill_(zero, 1.0)
    far = torch.exp(log_p * q).neg_().add_(p).div_(safe_d)
    return torch.where(near, (p * log_p).neg_().mul_(phi), far).sum(dim=dim)


def adte_entropy(logits: torch.Tensor, q: torch.Tensor, form: str = "tsallis") -> torch.Tensor:
    """ADTE's class-wise Tsallis score of each row of ``logits`` [N, C] with ``q`` [C].

    ``form="tsallis"``: ``sum_l (p_l - p_l^q_l) / (q_l - 1)``, which is exactly the Tsallis
    entropy when all ``q_l`` are equal.  ``form="code"``: the official code's
    ``sum_l p_l^q_l / (1 - q_l)``, which differs from it by ``sum_l p_l / (1 - q_l)`` (a constant
    only when ``q`` is constant, so both rank views identically then).
    """
    if form == "tsallis":
        return tsallis_entropy(logits, q)
    if form == "code":
        return (torch.exp(q * logits.log_softmax(dim=-1)) / (1 - q)).sum(dim=-1)
    raise ValueError(f"Unknown ADTE entropy form {form!r}; accepted: {', '.join(ADTE_FORMS)}.")


def confidence_scores(logits: torch.Tensor, criterion: str = "shannon", q: float | torch.Tensor = 1.0,
                      form: str = "tsallis") -> torch.Tensor:
    """Per-view uncertainty [N] of ``logits`` [N, C] under ``criterion`` (lower = more confident).

    ``shannon``: Shannon entropy; ``tsallis``: Tsallis entropy with a scalar ``q``; ``adte``:
    class-wise Tsallis with ``q`` [C] (see ``adte_entropy``; ``form`` picks its variant).
    """
    if criterion == "shannon":
        return shannon_entropy(logits)
    if criterion == "tsallis":
        if torch.as_tensor(q).ndim:
            raise ValueError("criterion 'tsallis' takes a scalar q; use 'adte' for one q per class.")
        return tsallis_entropy(logits, float(q))
    if criterion == "adte":
        q = torch.as_tensor(q, dtype=logits.dtype, device=logits.device)
        if q.shape != logits.shape[-1:]:
            raise ValueError(f"criterion 'adte' needs one q per class ({logits.shape[-1]}), got shape {tuple(q.shape)}.")
        return adte_entropy(logits, q, form)
    raise ValueError(f"Unknown confidence criterion {criterion!r}; accepted: {', '.join(CONFIDENCE_CRITERIA)}.")


def check_confidence(criterion: str, q: float, allowed: tuple[str, ...] = ("shannon", "tsallis")) -> None:
    """Validate a method's ``confidence``/``q`` options (scalar criteria only, q > 0)."""
    if criterion not in allowed:
        raise ValueError(f"Unknown confidence criterion {criterion!r}; accepted here: {', '.join(allowed)}.")
    if not float(q) > 0:
        raise ValueError(f"The Tsallis q must be positive, got {q}.")
