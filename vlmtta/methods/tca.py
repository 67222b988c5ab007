"""TCA: Token Condensation as Adaptation (Wang et al., "Is Less More? Exploring Token Condensation
as Training-free Test-time Adaptation", ICCV 2025; official code ``Jo-wang/TCA``).

Training-free, online, one image at a time, no augmentation.  Inside the ViT image encoder
(``vlmtta.vit.forward_vit``, open_clip's own modules, nothing patched), at the condensation layers:

1. the domain anchor token (the class-wise mean CLS token of the reservoir at that depth) most
   similar to the current CLS token joins the attention as an extra key/value;
2. the other tokens are ranked by CLS attention across heads; the top ones are kept, the next band
   is merged into ``n_centres`` tokens by coreset averaging (k-center greedy, inverse-distance
   weights) and the rest collapse into one CLS-attention-weighted token (EViT's fused token).

A domain-aware token reservoir keeps, per pseudo-label, up to ``reservoir_size`` samples (the CLS
tokens of every layer and the prediction entropy); on overflow it evicts the sample with the
highest entropy + mean cosine similarity to the others (low confidence, low diversity).  Logits are
self-corrected by ``lambd * sum_items exp(-beta (1 - sum_l w_l cos(CLS_l, item_l)))`` per class,
with ``w_l`` proportional to ``exp(l / ((L - 1) scale))``.
"""
from __future__ import annotations

import math
from typing import Any, ClassVar

import torch
import torch.nn.functional as F

from ..entropy import shannon_entropy
from ..vit import forward_vit, vision_tower
from .base import Method, Need, register

__all__ = ["TCA", "TokenReservoir", "condensation_sizes", "condense", "coreset_average", "layer_weights"]

HEAD_REDUCTIONS = ("mean", "rank")
KCENTER_STARTS = ("first", "random")
_OFFICIAL = {  # the official configs/*.yaml (ViT-B/16): reservoir_size, scale, lambd, beta
    "caltech101": (3, 1.0, 7.0, 6.0), "dtd": (3, 1.0, 2.0, 6.0), "eurosat": (2, 5.0, 8.0, 7.0),
    "fgvc_aircraft": (3, 0.02, 2.0, 2.0), "food101": (3, 0.01, 2.0, 5.0), "imagenet": (3, 0.1, 3.0, 5.0),
    "imagenet_a": (3, 0.01, 3.0, 5.0), "imagenet_v2": (3, 0.1, 4.0, 9.0), "imagenet_r": (3, 0.1, 3.0, 8.0),
    "imagenet_sketch": (3, 0.1, 4.0, 8.0), "oxford_flowers": (3, 0.01, 7.0, 7.0), "oxford_pets": (3, 5.5, 2.0, 6.0),
    "stanford_cars": (3, 0.1, 1.5, 8.0), "sun397": (3, 0.01, 4.0, 3.0), "ucf101": (3, 0.01, 6.0, 8.0),
}


def condensation_sizes(n: int, keep_ratio: float, n_centres: int = 4,
                       code_drop_rate: float | None = None) -> tuple[int, int, int]:
    """How many of ``n`` non-CLS tokens are (kept, merged into centres, fused into one token).

    Paper mode: the EViT budget at keep rate R that the paper compares at: EViT keeps ``ceil(R n)``
    tokens and fuses the others into one, so ``ceil(R n) + 1`` non-CLS tokens leave the layer (kept +
    centres + fused; ViT-B/16 at R = 0.9: 1 + 178 = 179 tokens after the first layer, then 163, 148).
    The non-kept tokens split 2:1 into band and rest, the official code's proportion.
    ``code_drop_rate`` reproduces the code's own counting (``Ours-0.035`` is its R = 0.9, ``Ours-0.1``
    its default): ``left = ceil((1 - d) n)``, ``m = n + 1 - left``, keep ``left - 2m``, band ``2m``,
    rest ``n - left``.
    """
    if code_drop_rate is not None:
        if code_drop_rate <= 0:
            return n, 0, 0
        left = math.ceil((1 - code_drop_rate) * n - 1e-9)
        keep = max(left - 2 * (n + 1 - left), 0)
        return keep, left - keep, n - left
    n_out = math.ceil(keep_ratio * n - 1e-9) + 1
    if n_out >= n:
        return n, 0, 0
    keep = max(n_out - n_centres - 1, 0)
    rest = (n - keep) // 3
    return keep, n - keep - rest, rest


def coreset_average(tokens: torch.Tensor, n_centres: int, start: torch.Tensor | None = None) -> torch.Tensor:
    """Coreset averaging of ``tokens`` [B, m, W] into [B, min(k, m), W].

    Centres by k-center greedy (farthest point), starting from token ``start`` [B] (default the first:
    the best-ranked of the band; the official code starts at a random one); every token joins its
    nearest centre; each cluster is averaged with weights 1 / distance to its centre (the centre
    itself weighs 1).
    """
    batch, m, _ = tokens.shape
    k = min(n_centres, m)
    t = tokens.float()
    rows = torch.arange(batch, device=t.device)
    chosen = [torch.zeros(batch, dtype=torch.long, device=t.device) if start is None else start.to(t.device)]
    dist = (t - t[rows, chosen[0]][:, None]).norm(dim=-1)
    for _ in range(k - 1):
        chosen.append(dist.argmax(dim=1))
        dist = torch.minimum(dist, (t - t[rows, chosen[-1]][:, None]).norm(dim=-1))
    centres = t[rows[:, None], torch.stack(chosen, dim=1)]  # [B, k, W]
    d_min, assign = torch.cdist(t, centres, compute_mode="donot_use_mm_for_euclid_dist").min(dim=-1)
    weights = torch.where(d_min > 0, 1 / d_min.clamp_min(1e-12), torch.ones_like(d_min))
    member = F.one_hot(assign, k).to(t.dtype) * weights[..., None]  # [B, m, k]
    member = member / member.sum(dim=1, keepdim=True)
    return (member.transpose(1, 2) @ t).to(tokens.dtype)


def head_scores(cls_attn: torch.Tensor, head_reduce: str = "mean") -> torch.Tensor:
    """Cross-head importance [B, n] from CLS attention [B, H, n]: mean attention, or mean rank."""
    if head_reduce == "rank":
        return cls_attn.argsort(dim=-1).argsort(dim=-1).float().mean(dim=1)
    return cls_attn.mean(dim=1)


def condense(x: torch.Tensor, cls_attn: torch.Tensor, sizes: tuple[int, int, int], n_centres: int = 4,
             head_reduce: str = "mean", generator: torch.Generator | None = None) -> torch.Tensor:
    """Condense tokens ``x`` [B, 1 + n, W] (CLS first) given CLS attention [B, H, n] and (keep, band, rest).

    With a (CPU) ``generator`` the band's k-center greedy starts at a random band token, as the official
    code; without one at the best-ranked band token."""
    keep, band, rest = sizes
    if band + rest == 0:
        return x
    tokens = x[:, 1:]
    width = x.shape[-1]
    order = head_scores(cls_attn, head_reduce).argsort(dim=1, descending=True, stable=True)
    take = lambda idx: tokens.gather(1, idx[..., None].expand(-1, -1, width))
    parts = [x[:, :1], take(order[:, :keep])]
    if band:
        start = None if generator is None else torch.randint(band, (x.shape[0],), generator=generator)
        parts.append(coreset_average(take(order[:, keep:keep + band]), n_centres, start))
    if rest:
        idx = order[:, keep + band:]
        weight = cls_attn.mean(dim=1).gather(1, idx)[..., None].to(x.dtype)
        parts.append((take(idx) * weight).sum(dim=1, keepdim=True))
    return torch.cat(parts, dim=1)


def layer_weights(n_layers: int, scale: float) -> torch.Tensor:
    """Layer weights of the logits correction: ``exp(linspace(0, 1, L) / scale)``, normalised."""
    w = torch.exp(torch.linspace(0, 1, n_layers, dtype=torch.float64) / scale)
    return (w / w.sum()).float()


class TokenReservoir:
    """Per-class queues of (CLS tokens of every layer [L, W], entropy), as preallocated tensors.

    Each class has ``size + 1`` slots: a new sample is written into the free slot, and on overflow
    the sample with the highest entropy + mean cosine similarity (of its layer-averaged CLS token)
    to the other samples of its class is evicted.
    """

    def __init__(self, n_classes: int, size: int, n_layers: int, width: int, device: torch.device | str):
        self.size = int(size)
        self.cls = torch.zeros(n_classes, size + 1, n_layers, width, device=device)
        self.entropy = torch.zeros(n_classes, size + 1, device=device)
        self.count = torch.zeros(n_classes, dtype=torch.long, device=device)
        self.means = torch.zeros(n_classes, n_layers, width, device=device)

    def __len__(self) -> int:
        return int(self.count.sum())

    def add(self, label: int, cls_tokens: torch.Tensor, entropy: float) -> None:
        """Queue one sample under its pseudo-label, evicting one if the queue overflows."""
        n = int(self.count[label])
        self.cls[label, n], self.entropy[label, n] = cls_tokens, entropy
        n += 1
        if n > self.size:
            summary = F.normalize(self.cls[label, :n].mean(dim=1), dim=-1)  # [n, W]
            sim = (summary @ summary.t()).fill_diagonal_(0).sum(dim=1) / (n - 1)
            evict = int(torch.argmax(self.entropy[label, :n] + sim))
            self.cls[label, evict], self.entropy[label, evict] = self.cls[label, n - 1], self.entropy[label, n - 1]
            n -= 1
        self.count[label] = n
        self.means[label] = self.cls[label, :n].mean(dim=0)

    def anchors(self, min_count: int = 2, all_classes: bool = True) -> torch.Tensor | None:
        """Domain anchor tokens [K, L, W]: class-wise mean CLS tokens of the classes holding
        ``min_count`` samples; ``None`` until every class does (``all_classes``, the official code) or
        until any does."""
        ready = self.count >= min_count
        if not bool(ready.all() if all_classes else ready.any()):
            return None
        return self.means[ready]

    def correction(self, cls_tokens: torch.Tensor, weights: torch.Tensor, beta: float) -> torch.Tensor:
        """Per-class ``sum_items exp(-beta (1 - affinity))`` [C], affinity = layer-weighted CLS cosine."""
        out = torch.zeros(self.count.shape[0], device=self.cls.device)
        slots = torch.arange(self.size + 1, device=self.cls.device)
        labels, slot = (slots[None] < self.count[:, None]).nonzero(as_tuple=True)
        if labels.numel() == 0:
            return out
        items = F.normalize(self.cls[labels, slot], dim=-1)  # [I, L, W]
        affinity = torch.einsum("ilw,lw->il", items, F.normalize(cls_tokens, dim=-1)) @ weights.to(items.device)
        return out.index_add_(0, labels, torch.exp(-beta * (1 - affinity)))


@register
class TCA(Method):
    """Token Condensation as Adaptation (training-free, online, ViT image towers only).

    Args:
        keep_ratio: R, the EViT keep rate at each condensation layer (paper: 0.9, and 0.7); see
            ``condensation_sizes``.
        layers: condensation layers, 0-based block indices (paper: 3, 6, 9).
        reservoir_size: samples per class in the reservoir (paper: 3; EuroSAT 2).
        scale, lambd, beta: layer-weight temperature, weight and sharpness of the logits
            self-correction.  The defaults are the official ImageNet config (3, 0.1, 3, 5);
            ``dataset_defaults`` holds every dataset's official ``configs/*.yaml``.  They were tuned
            with the code's token counting (``code_drop_rate``), which condenses less at R = 0.9.
        n_centres: coreset centres the band is merged into (official code: 4).
        head_reduce: cross-head ranking: ``mean`` CLS attention over heads (official code) or ``rank``
            (mean per-head rank: "consistently low across heads").
        code_drop_rate: if set, count tokens as the official code does with this drop rate instead of
            R (``0.035`` is the code's R = 0.9 setting, ``0.1`` its default); see ``condensation_sizes``.
        anchor_min_count: a class contributes an anchor once it holds this many samples (code: 2).
        anchor_all_classes: anchors are used only once every class is ready (official code), else as
            soon as one is.
        kcenter_start: where the band's k-center greedy starts: ``first``, the best-ranked band token
            (default: deterministic, the same on every device; the paper does not say), or ``random``, a
            uniformly drawn band token, as the official code (``torch.randint``), from a generator seeded
            with ``kcenter_seed`` at every ``reset``.

    Order of one step, as the official code: encode with condensation (anchors from the reservoir
    so far), pseudo-label and entropy from the CLIP logits, add the sample to the reservoir, then add
    the correction (which sees the sample just added).
    """

    name = "tca"
    summary = "Token condensation inside the ViT guided by a reservoir of CLS-token anchors, plus logit correction."
    paper = "Wang et al., Is Less More? Exploring Token Condensation as Training-free Test-time Adaptation, ICCV 2025"
    episodic = False
    needs = frozenset({Need.IMAGE_INTERNALS})
    dataset_defaults: ClassVar[dict[str, dict[str, Any]]] = {
        key: {"reservoir_size": size, "scale": scale, "lambd": lambd, "beta": beta}
        for key, (size, scale, lambd, beta) in _OFFICIAL.items()
    }

    def __init__(self, keep_ratio: float = 0.9, layers: tuple[int, ...] = (3, 6, 9), reservoir_size: int = 3,
                 scale: float = 0.1, lambd: float = 3.0, beta: float = 5.0, n_centres: int = 4,
                 head_reduce: str = "mean", code_drop_rate: float | None = None, anchor_min_count: int = 2,
                 anchor_all_classes: bool = True, kcenter_start: str = "first", kcenter_seed: int = 0):
        super().__init__(n_views=1, augmentation="rrc_flip")
        if not 0 < keep_ratio <= 1:
            raise ValueError(f"tca: keep_ratio must lie in (0, 1], got {keep_ratio}.")
        if code_drop_rate is not None and not 0 <= code_drop_rate < 1:
            raise ValueError(f"tca: code_drop_rate must lie in [0, 1), got {code_drop_rate}.")
        if head_reduce not in HEAD_REDUCTIONS:
            raise ValueError(f"tca: head_reduce must be one of {HEAD_REDUCTIONS}, got {head_reduce!r}.")
        if kcenter_start not in KCENTER_STARTS:
            raise ValueError(f"tca: kcenter_start must be one of {KCENTER_STARTS}, got {kcenter_start!r}.")
        if int(reservoir_size) < 1 or int(n_centres) < 1 or scale <= 0:
            raise ValueError("tca: reservoir_size and n_centres must be >= 1 and scale > 0.")
        self.keep_ratio, self.layers = float(keep_ratio), tuple(sorted({int(layer) for layer in layers}))
        self.reservoir_size, self.scale, self.lambd, self.beta = int(reservoir_size), float(scale), float(lambd), float(beta)
        self.n_centres, self.head_reduce, self.code_drop_rate = int(n_centres), head_reduce, code_drop_rate
        self.anchor_min_count, self.anchor_all_classes = int(anchor_min_count), bool(anchor_all_classes)
        self.kcenter_start, self.kcenter_seed = kcenter_start, int(kcenter_seed)
        self._generator: torch.Generator | None = None
        self.reservoir: TokenReservoir | None = None
        self._anchors: torch.Tensor | None = None

    def bind(self, context) -> None:
        backbone = context.require_backbone(self.name)
        blocks = vision_tower(backbone.model).transformer.resblocks
        if self.layers and not 0 <= self.layers[0] <= self.layers[-1] < len(blocks):
            raise ValueError(f"tca: condensation layers {self.layers} out of range for a {len(blocks)}-block ViT.")
        super().bind(context)

    def reset(self) -> None:
        if self.context is None:
            return
        model = self.context.require_backbone(self.name).model
        visual = vision_tower(model)
        self.reservoir = TokenReservoir(len(self.context.classnames), self.reservoir_size,
                                        len(visual.transformer.resblocks), visual.transformer.width,
                                        self.context.text_features.device)
        self.weights = layer_weights(len(visual.transformer.resblocks), self.scale).to(self.context.text_features.device)
        self._anchors = None
        if self.kcenter_start == "random":
            self._generator = torch.Generator().manual_seed(self.kcenter_seed)

    # ---- hooks -------------------------------------------------------------------------------
    def _anchor(self, layer: int, cls: torch.Tensor) -> torch.Tensor | None:
        """The anchor at this depth (reservoir CLS after block ``layer - 1``) closest to ``cls``."""
        if self._anchors is None or layer == 0:
            return None
        anchors = self._anchors[:, layer - 1]  # [K, W]
        best = (F.normalize(cls.float(), dim=-1) @ F.normalize(anchors, dim=-1).t()).argmax(dim=1)
        return anchors[best]

    def _reduce(self, layer: int, x: torch.Tensor, cls_attn: torch.Tensor) -> torch.Tensor:
        sizes = condensation_sizes(x.shape[1] - 1, self.keep_ratio, self.n_centres, self.code_drop_rate)
        return condense(x, cls_attn, sizes, self.n_centres, self.head_reduce, self._generator)

    def encode(self, images: torch.Tensor):
        """The condensed forward (``vlmtta.vit.ViTOutput``) of preprocessed ``images`` [B, 3, S, S]."""
        backbone = self.context.require_backbone(self.name)
        with torch.inference_mode(), backbone.autocast():
            return forward_vit(backbone.model, images.to(backbone.device), hook_layers=self.layers,
                               anchor_fn=self._anchor, reduce_fn=self._reduce)

    # ---- prediction ----------------------------------------------------------------------------
    def predict_views(self, views: torch.Tensor) -> torch.Tensor:
        """Class probabilities [C] of the original view (``views[0]``); updates the reservoir."""
        out = self.encode(views[:1])
        with torch.inference_mode():
            logits = self.logits(F.normalize(out.features.float(), dim=-1))[0]  # [C]
            cls_tokens = out.cls_tokens[0].float()
            label = int(logits.argmax())
            self.reservoir.add(label, cls_tokens, float(shannon_entropy(logits)))
            self._anchors = self.reservoir.anchors(self.anchor_min_count, self.anchor_all_classes)
            final = logits + self.lambd * self.reservoir.correction(cls_tokens, self.weights, self.beta)
            return final.softmax(dim=-1)
