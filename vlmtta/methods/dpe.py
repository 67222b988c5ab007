"""DPE: dual prototype evolving (Zhang, Stepputtis, Sycara & Xie, NeurIPS 2024; official code ``zhangce01/DPE-CLIP``)."""
from __future__ import annotations

import math
from typing import Any, ClassVar

import torch
import torch.nn.functional as F

from ..entropy import confident_count, shannon_entropy
from ..memory import ClassCache
from .base import Context, Method, register
from .tda import summarise_views

ENTROPY_NORMS = ("log2", "log")
PREDICT_FROM = ("original", "confident")
# The official ViT-B/16 configs: (alpha, beta, learning rate of both residuals, alignment weight).
_CONFIGS = {
    "imagenet": (6.0, 5.0, 6e-4, 0.5), "imagenet_a": (6.0, 5.0, 3e-4, 2.5), "imagenet_v2": (3.0, 8.0, 5e-4, 0.5),
    "imagenet_r": (3.0, 8.0, 6e-4, 0.0), "imagenet_sketch": (7.0, 7.45, 6e-4, 0.2),
    "caltech101": (15.0, 5.0, 6e-4, 0.2), "dtd": (6.0, 3.0, 6e-4, 0.2), "eurosat": (3.0, 8.0, 5e-5, 0.2),
    "fgvc_aircraft": (6.0, 2.0, 6e-4, 0.2), "food101": (3.0, 1.0, 2e-4, 0.2), "oxford_flowers": (2.5, 5.0, 1e-4, 0.2),
    "oxford_pets": (4.0, 7.0, 5e-5, 0.2), "stanford_cars": (3.0, 7.0, 1e-4, 1.5), "sun397": (6.0, 3.0, 2e-4, 0.2),
    "ucf101": (9.0, 8.0, 4e-4, 0.2),
}
_IMAGENET_FAMILY = ("imagenet", "imagenet_a", "imagenet_v2", "imagenet_r", "imagenet_sketch")


def info_nce(queries: torch.Tensor, keys: torch.Tensor, temperature: float) -> torch.Tensor:
    """InfoNCE with in-batch negatives: cross-entropy of ``normalize(q_i) . normalize(k_j) / temperature`` over
    ``j`` with target ``i`` (row ``i`` of ``queries`` [K, D] and ``keys`` [K, D] is a positive pair), averaged."""
    logits = F.normalize(queries, dim=-1) @ F.normalize(keys, dim=-1).t() / temperature
    return F.cross_entropy(logits, torch.arange(logits.shape[0], device=logits.device))


@register
class DPE(Method):
    """Textual and visual class prototypes that evolve over the stream, refined per image by learnable residuals.

    State (online, kept until ``reset``): the textual prototypes ``T`` [C, D] (initially the class text
    embeddings) and a priority queue of ``shot_capacity`` = 3 lowest-entropy test features per pseudo-class
    (``vlmtta.memory.ClassCache``); a class's visual prototype ``V_c`` is the mean of its queue.

    Per test image:

    1. CLIP logits of the views under ``normalize(T)``; with several views the ``confident_ratio`` = 10 %
       lowest-entropy views are averaged (mean feature ``f``, mean logits, entropy of their mean probability;
       as TDA).  ``f`` enters its pseudo-class's queue if the class has a free slot or ``f`` beats its worst
       entropy.
    2. Zero-initialised residuals ``r_T`` [C, D] and ``r_V`` (one per filled class) define
       ``T' = normalize(T + r_T)`` and ``V' = normalize(V + r_V)``; the logits are
       ``100 f . T' + alpha * exp(-beta (1 - f . V'))`` (visual term on the classes with a prototype).
       Loss: entropy of their softmax + ``align_weight`` * InfoNCE(``V'_c``, ``T'_c``) over the filled classes
       (temperature 0.01, the other classes' pairs as negatives).  ``steps`` = 1 AdamW step, learning rates
       ``lr_text`` / ``lr_image``, eps 1e-3, weight decay 0.1.
    3. Prediction: the same logits with the refined prototypes, for the original view (``predict="original"``;
       ``"confident"`` re-averages the confident views under ``T'``, the official code's rule on ImageNet-A).
    4. Evolution: when the prediction's entropy divided by ``log2(C)`` is below ``evolve_threshold`` = 0.1,
       ``T`` becomes the cumulative average ``T <- (n T + T') / (n + 1)`` (``n`` counts the updates, from 1).

    Defaults are the official ImageNet config (64 AugMix views, alpha 6, beta 5, lr 6e-4, align 0.5);
    ``dataset_defaults`` holds every dataset's (one plain view on the ten cross-domain sets).  The paper's
    prototypes average CLIP's templates with CuPL descriptions, which are not shipped: pass ``templates``.

    Differences from the official code, documented:

    * ``entropy_norm="log2"`` (default) divides entropies in nats by ``log2(C)``, as the code's normalised
      entropy does (and the 0.1 threshold was set with it); ``"log"`` divides by ``ln(C)`` (onto [0, 1]).
    * The code builds a fresh optimizer inside each step; with ``steps > 1`` vlmtta keeps one optimizer for the
      image's steps (the same thing at the default single step).  It runs in float32 (the code under fp16
      autocast), with tensors for the queues (the code keeps Python lists, on the CPU path that made it slow).
    """

    name = "dpe"
    summary = "DPE: online textual + visual class prototypes, refined per image by residuals (entropy + alignment)."
    paper = "Zhang et al., Dual Prototype Evolving for Test-Time Generalization of Vision-Language Models, NeurIPS 2024"
    episodic = False
    dataset_defaults: ClassVar[dict[str, dict[str, Any]]] = {
        key: {"alpha": a, "beta": b, "lr_text": lr, "lr_image": lr, "align_weight": w,
              **({"n_views": 64, "augmentation": "augmix"} if key in _IMAGENET_FAMILY else {"n_views": 1}),
              **({"predict": "confident"} if key == "imagenet_a" else {})}
        for key, (a, b, lr, w) in _CONFIGS.items()
    }

    def __init__(self, n_views: int = 64, augmentation: str = "augmix", confident_ratio: float = 0.1,
                 shot_capacity: int = 3, alpha: float = 6.0, beta: float = 5.0, lr_text: float = 6e-4,
                 lr_image: float = 6e-4, align_weight: float = 0.5, temperature: float = 0.01, steps: int = 1,
                 weight_decay: float = 0.1, eps: float = 1e-3, evolve_threshold: float = 0.1,
                 entropy_norm: str = "log2", predict: str = "original"):
        super().__init__(n_views=n_views, augmentation=augmentation)
        confident_count(self.n_views, confident_ratio)
        if entropy_norm not in ENTROPY_NORMS or predict not in PREDICT_FROM:
            raise ValueError(f"{self.name}: entropy_norm must be one of {ENTROPY_NORMS} and predict one of "
                             f"{PREDICT_FROM}; got {entropy_norm!r}, {predict!r}.")
        if int(shot_capacity) < 1 or int(steps) < 1 or min(lr_text, lr_image, temperature) <= 0 \
                or min(align_weight, weight_decay, eps) < 0:
            raise ValueError(f"{self.name}: need shot_capacity, steps >= 1, positive learning rates and temperature, "
                             "non-negative align_weight, weight_decay and eps.")
        self.confident_ratio, self.shot_capacity = float(confident_ratio), int(shot_capacity)
        self.alpha, self.beta, self.lr_text, self.lr_image = float(alpha), float(beta), float(lr_text), float(lr_image)
        self.align_weight, self.temperature, self.steps = float(align_weight), float(temperature), int(steps)
        self.weight_decay, self.eps, self.evolve_threshold = float(weight_decay), float(eps), float(evolve_threshold)
        self.entropy_norm, self.predict = entropy_norm, predict
        self.cache: ClassCache | None = None

    # ---- lifecycle ----------------------------------------------------------------------------
    def bind(self, context: Context) -> None:
        n_classes, dim = context.text_features.shape
        self.cache = ClassCache(n_classes, self.shot_capacity, dim, device=context.text_features.device)
        super().bind(context)

    def reset(self) -> None:
        if self.context is None:
            return
        self.cache.reset()
        self.text = self.context.text_features.float().clone()  # the evolving textual prototypes T
        self.n_evolved = 0

    # ---- prediction -----------------------------------------------------------------------------
    def predict_features(self, features: torch.Tensor) -> torch.Tensor:
        with torch.inference_mode(False):
            features = features.float().clone()
            seen = summarise_views(features, self.logits(features, F.normalize(self.text, dim=-1)), self.confident_ratio)
            self.cache.insert(seen.logits.argmax(), seen.feature, seen.entropy)
            visual, filled = self.visual_prototypes()
            text_residual, visual_residual = self.adapt(seen.feature, visual, filled)
            with torch.no_grad():
                text = F.normalize(self.text + text_residual, dim=-1)
                visual = F.normalize(visual + visual_residual, dim=-1)
                if self.predict == "confident" and features.shape[0] > 1:
                    query = summarise_views(features, self.logits(features, text), self.confident_ratio).feature
                else:
                    query = features[0]
                final = self.final_logits(query, text, visual, filled)
                self.evolve(final, text)
                return final.softmax(dim=-1)

    def visual_prototypes(self) -> tuple[torch.Tensor, torch.Tensor]:
        """Mean of each class's queued features [C, D] (zero where empty) and which classes have one [C]."""
        filled = self.cache.filled
        counts = filled.sum(dim=1)
        total = (self.cache.keys.float() * filled.unsqueeze(-1)).sum(dim=1)
        return total / counts.clamp(min=1).unsqueeze(-1), counts > 0

    def final_logits(self, query: torch.Tensor, text: torch.Tensor, visual: torch.Tensor,
                     filled: torch.Tensor) -> torch.Tensor:
        """``logit_scale q . T' + alpha exp(-beta (1 - q . V'))`` [C] for a query feature [D] (visual term on
        the classes with a prototype)."""
        cache = torch.exp(-self.beta * (1.0 - visual @ query)) * filled
        return self.logits(query.unsqueeze(0), text)[0] + self.alpha * cache

    def loss(self, query: torch.Tensor, text: torch.Tensor, visual: torch.Tensor, filled: torch.Tensor) -> torch.Tensor:
        """Entropy of the prototype logits + ``align_weight`` x InfoNCE between the filled classes' prototypes."""
        loss = shannon_entropy(self.final_logits(query, text, visual, filled))
        if self.align_weight:
            loss = loss + self.align_weight * info_nce(visual[filled], text[filled], self.temperature)
        return loss

    def adapt(self, query: torch.Tensor, visual: torch.Tensor, filled: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """The residuals (textual [C, D], visual [C, D]) after ``steps`` AdamW steps for this image."""
        text_residual = torch.zeros_like(self.text, requires_grad=True)
        visual_residual = torch.zeros_like(visual, requires_grad=True)
        optimizer = torch.optim.AdamW([{"params": [text_residual], "lr": self.lr_text},
                                       {"params": [visual_residual], "lr": self.lr_image}],
                                      eps=self.eps, weight_decay=self.weight_decay)
        with torch.enable_grad():
            for _ in range(self.steps):
                loss = self.loss(query, F.normalize(self.text + text_residual, dim=-1),
                                 F.normalize(visual + visual_residual, dim=-1), filled)
                optimizer.zero_grad(set_to_none=True)
                loss.backward()
                optimizer.step()
        return text_residual.detach(), visual_residual.detach()

    def evolve(self, final: torch.Tensor, text: torch.Tensor) -> None:
        """Fold the refined textual prototypes into ``T`` when the prediction is confident (cumulative average)."""
        scale = math.log2(final.shape[-1]) if self.entropy_norm == "log2" else math.log(final.shape[-1])
        if float(shannon_entropy(final)) / scale < self.evolve_threshold:
            self.n_evolved += 1
            self.text = self.text * (self.n_evolved / (self.n_evolved + 1)) + text / (self.n_evolved + 1)
