"""The batch protocol shared by methods that adapt the image encoder's normalisation parameters.

``predict_batch(images [B, 3, S, S]) -> probabilities [B, C]`` adapts on a batch of test images (the
papers' protocol: batch 64, ``Adapter.step_batch`` / ``vlmtta bench --batch-size``); ``predict_views``
runs one image's views as the batch (streaming mode for ``Adapter.step``).

Reset policy (``reset`` option), i.e. when the adapted parameters go back to the pre-trained ones:

* ``batch``: before every batch (episodic per batch; WATT and CLIPArTT do this);
* ``domain``: only when the runner calls ``reset()``, which runners do at every domain shift
  (each dataset or corruption is a domain; ``reset_each_shift`` in the corruption benchmarks);
* ``continual``: never, not even at domain shifts (continual TTA; runners do not call ``reset()``
  between domains, only before the first).

``reset()`` itself always restores the parameters bit-exactly and clears the optimiser state.
"""
from __future__ import annotations

from typing import Any

import torch

from ..norms import TrainableNorms, norm_parameters, step_if_finite
from .base import Method, Need

RESET_POLICIES = ("batch", "domain", "continual")


def norms_below_top(visual: torch.nn.Module, frozen_top: float) -> dict[str, torch.Tensor]:
    """Norm affines of the image tower without the top ``frozen_top`` share of its transformer blocks and
    without the final norm (SAR / DeYO: blocks 9-11 and ``norm`` of ViT-B; ``layer4`` of a ResNet)."""
    blocks = getattr(getattr(visual, "transformer", None), "resblocks", None)
    first_frozen = len(blocks) - round(len(blocks) * frozen_top) if blocks is not None else None

    def keep(name: str) -> bool:
        parts = name.split(".")
        if name in ("ln_post", "norm") or parts[0] == "layer4":
            return False
        if first_frozen is not None and parts[:2] == ["transformer", "resblocks"]:
            return int(parts[2]) < first_frozen
        return True

    return norm_parameters(visual, keep)


class NormAdaptation(Method):
    """Base of the batch methods that tune the image encoder's normalisation parameters.

    Subclasses implement ``adapt(images) -> probabilities [B, C]`` and ``make_optimizer(params)``;
    they may override ``trainable(visual)`` to select fewer parameters (SAR leaves the top blocks out).
    """

    episodic = False
    needs = frozenset({Need.TRAINABLE_NORMS})

    def __init__(self, reset: str = "domain", n_views: int = 64, augmentation: str = "rrc_flip"):
        super().__init__(n_views=n_views, augmentation=augmentation)
        if reset not in RESET_POLICIES:
            raise ValueError(f"{self.name}: reset must be one of {RESET_POLICIES}, got {reset!r}.")
        self.reset_policy = reset
        self.norms: TrainableNorms | None = None
        self.last: dict[str, Any] = {}

    # ---- description ------------------------------------------------------------------------------
    @property
    def protocol(self) -> str:
        return f"batch (reset: {self.reset_policy})"

    @classmethod
    def info(cls) -> dict[str, Any]:
        return {**super().info(), "protocol": "batch"}

    def hyperparameters(self) -> dict[str, Any]:
        return {name: (self.reset_policy if name == "reset" else getattr(self, name)) for name in self.defaults()}

    @property
    def params(self) -> dict[str, torch.Tensor]:
        """The adapted parameters, by name (relative to the image tower unless a method adapts more)."""
        return self.norms.params

    @property
    def original(self) -> dict[str, torch.Tensor]:
        """The pre-trained values of ``params`` (restored on ``reset``)."""
        return self.norms.original

    # ---- state --------------------------------------------------------------------------------------
    def trainable(self, visual: torch.nn.Module) -> dict[str, torch.Tensor]:
        """The image tower's parameters this method adapts (default: every normalisation layer's affine)."""
        return norm_parameters(visual)

    def build_norms(self, backbone) -> TrainableNorms:
        visual = backbone.model.visual
        params = self.trainable(visual)
        if not params:
            raise TypeError(f"{self.name}: the image tower {type(visual).__name__} has no normalisation layers to adapt.")
        return TrainableNorms(visual, params)

    def bind(self, context) -> None:
        self.norms = self.build_norms(context.require_backbone(self.name))
        super().bind(context)

    def make_optimizer(self, params: list[torch.Tensor]) -> torch.optim.Optimizer:
        raise NotImplementedError

    def reset(self) -> None:
        """Restore the pre-trained parameters (bit-exact) and start a fresh optimiser."""
        self.norms.restore()
        self.optimizer = self.make_optimizer(self.norms.values())
        self.last = {}

    # ---- pieces ---------------------------------------------------------------------------------------
    def encode(self, images: torch.Tensor, grad: bool = False) -> torch.Tensor:
        """Unnormalised float image features [B, D] with the adapted parameters."""
        backbone = self.context.require_backbone(self.name)
        with backbone.autocast():
            features = self.norms(lambda visual, x: visual(x), images.to(backbone.device), grad=grad)
        return features.float()

    def step(self, loss: torch.Tensor) -> bool:
        """One optimiser step on ``loss``; skipped when it has no gradient or a non-finite one."""
        return step_if_finite(self.optimizer, loss, self.norms.values())

    # ---- prediction -------------------------------------------------------------------------------------
    def adapt(self, images: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError

    def predict_batch(self, images: torch.Tensor) -> torch.Tensor:
        """Adapt on a batch of preprocessed test images [B, 3, S, S]; class probabilities [B, C]."""
        if self.reset_policy == "batch":
            self.reset()
        return self.adapt(images)

    def predict_views(self, views: torch.Tensor) -> torch.Tensor:
        """Streaming mode: the views of one image form the batch; probabilities [C] of the original view."""
        return self.predict_batch(views)[0]


class SGDNormAdaptation(NormAdaptation):
    """Norm adaptation stepped by SGD with momentum (``self.lr``, ``self.momentum``): Tent, SAR, DeYO.  A
    ``frozen_top`` share (SAR, DeYO) leaves the top transformer blocks and the final norm out."""

    frozen_top: float | None = None

    def trainable(self, visual: torch.nn.Module) -> dict[str, torch.Tensor]:
        return super().trainable(visual) if self.frozen_top is None else norms_below_top(visual, self.frozen_top)

    def make_optimizer(self, params: list[torch.Tensor]) -> torch.optim.Optimizer:
        return torch.optim.SGD(params, lr=self.lr, momentum=self.momentum)
