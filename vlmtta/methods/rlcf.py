"""RLCF: test-time prompt tuning with CLIP feedback (Zhao et al., ICLR 2024; official code ``mzhaoshuai/RLCF``)."""
from __future__ import annotations

import torch
import torch.nn.functional as F

from ..backbone import FrozenCLIP, load_backbone
from ..entropy import take_views
from ..prompt_learner import DEFAULT_CTX_INIT
from .base import Context, register
from .tpt import PROMPTS_PER_PASS, TPT

REWARD_WEIGHT = 2.5  # CLIPScore's w: reward = 2.5 * max(cos, 0)


def clip_rewards(image_features: torch.Tensor, text_features: torch.Tensor, sampled: torch.Tensor,
                 weight: float = REWARD_WEIGHT) -> torch.Tensor:
    """Baselined CLIPScore rewards [N, K] of the classes ``sampled`` [N, K] for each view.

    ``weight * max(cos(image_i, text_k), 0)`` from the reward model's L2-normalised image features [N, D] and
    class text features [C, D], minus its mean over the K samples of the same view.  Leading image dimensions
    are kept: [B, N, K] from [B, N, D] and [B, N, K]."""
    scores = weight * torch.einsum("...nd,...nkd->...nk", image_features, text_features[sampled]).clamp(min=0)
    return scores - scores.mean(dim=-1, keepdim=True)


def reward_loss(logits: torch.Tensor, rewards: torch.Tensor, sampled: torch.Tensor) -> torch.Tensor:
    """Reward-weighted cross-entropy: ``mean_{i,k} rewards_ik * -log softmax(logits_i)[sampled_ik]`` (one per image
    [B] from [B, N, C], [B, N, K])."""
    return -(rewards * logits.log_softmax(dim=-1).gather(-1, sampled)).mean(dim=(-2, -1))


@register
class RLCF(TPT):
    """RLCF (prompt variant): tune TPT's prompt context with rewards from a second, frozen CLIP.

    Per image (episodic): 64 views (AugMix on the fine-grained sets, as TPT), the 10 % lowest-entropy ones
    kept (selected once, at the first step); at each of ``steps`` = 3 AdamW steps (lr 7e-3, weight decay 5e-4)
    each kept view's ``sample_k`` = 3 top classes under the current context are scored by the reward model,
    ``2.5 * max(cos, 0)`` between its image feature of the view and its text feature of the class, minus the
    view's mean score (the baseline), and the loss is the reward-weighted cross-entropy of the policy's logits
    on those classes.  Then the tuned context predicts the original view, as TPT.

    The reward model is any open_clip backbone (``reward_model`` / ``reward_pretrained``; the paper's is
    ViT-L/14 with OpenAI weights, which ``"auto"`` picks for an architecture name; a ``local-dir:`` model or
    ``vlmtta-testbed`` brings its own weights), loaded once and shared; it encodes the kept views (resized to its input
    size, bicubic, and renormalised with its mean/std) once per image and the class names with the method's
    templates once per class set.  The paper's policy starts from a 16-shot CoOp context (``coop_ctx``); the
    default starts from "a photo of a" like TPT.  The policy runs TPT's fast path (truncated text context,
    views encoded once, ``reference_impl`` for the straightforward version).  Many images at once as TPT (see
    its docstring); the reward model encodes the B images' kept views in one batch.
    """

    name = "rlcf"
    summary = "RLCF: TPT-style prompt tuning with a reward from a larger frozen CLIP (reward-weighted cross-entropy)."
    paper = "Zhao et al., Test-Time Adaptation with CLIP Reward for Zero-Shot Generalization in Vision-Language Models, ICLR 2024"

    def __init__(self, n_views: int = 64, augmentation: str = "rrc_flip", steps: int = 3, lr: float = 7e-3,
                 weight_decay: float = 5e-4, confidence_ratio: float = 0.1, sample_k: int = 3,
                 reward_model: str = "ViT-L-14", reward_pretrained: str | None = "auto",
                 n_ctx: int = 4, ctx_init: str | None = DEFAULT_CTX_INIT, coop_ctx: str | None = None,
                 reference_impl: bool = False, cache_init_graph: bool = True, init_seed: int = 0,
                 prompts_per_pass: int = PROMPTS_PER_PASS):
        super().__init__(n_views=n_views, augmentation=augmentation, steps=steps, lr=lr,
                         confidence_ratio=confidence_ratio, n_ctx=n_ctx, ctx_init=ctx_init, coop_ctx=coop_ctx,
                         reference_impl=reference_impl, cache_init_graph=cache_init_graph, init_seed=init_seed,
                         prompts_per_pass=prompts_per_pass)
        if int(sample_k) < 1 or weight_decay < 0:
            raise ValueError(f"{self.name}: need sample_k >= 1 and weight_decay >= 0, got {sample_k}, {weight_decay}.")
        self.weight_decay, self.sample_k = float(weight_decay), int(sample_k)
        self.reward_model, self.reward_pretrained = reward_model, reward_pretrained
        self.reward: FrozenCLIP | None = None

    def bind(self, context: Context) -> None:
        backbone = context.require_backbone(self.name)
        self.reward = load_backbone(self.reward_model, self.reward_pretrained, backbone.device)
        self.reward_text = self.reward.class_embeddings(context.classnames, context.templates).float()
        if self.sample_k > len(context.classnames):
            raise ValueError(f"{self.name}: sample_k={self.sample_k} exceeds the {len(context.classnames)} classes.")
        super().bind(context)

    def predict_views(self, views: torch.Tensor) -> torch.Tensor:
        self._views = views
        try:
            return super().predict_views(views)
        finally:
            self._views = None

    def adapt_many(self, features: torch.Tensor, views: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        self._views = views
        try:
            return super().adapt_many(features, views)
        finally:
            self._views = None

    def select(self, logits: torch.Tensor, features: torch.Tensor) -> torch.Tensor:
        """TPT's confident views (per image [B, K] from [B, N, C]); the reward model encodes them once here."""
        selected = super().select(logits, features)
        kept = take_views(self._views, selected).flatten(0, selected.ndim - 1)
        self._reward_images = self.reward.encode_images(self.for_reward(kept)).view(*selected.shape, -1)
        return selected

    def loss(self, logits: torch.Tensor, text: torch.Tensor) -> torch.Tensor:
        """Reward-weighted cross-entropy of the selected views on their top ``sample_k`` classes."""
        sampled = logits.detach().topk(self.sample_k, dim=-1).indices
        rewards = clip_rewards(self._reward_images, self.reward_text, sampled.to(self.reward_text.device))
        return reward_loss(logits.float(), rewards.to(logits.device), sampled)

    def for_reward(self, views: torch.Tensor) -> torch.Tensor:
        """Views preprocessed for the policy, re-preprocessed for the reward model (size, mean and std)."""
        policy = self.context.backbone
        mean, std = (torch.tensor(v, device=views.device).view(1, 3, 1, 1) for v in (policy.mean, policy.std))
        pixels = views.float() * std + mean
        if self.reward.image_size != policy.image_size:
            pixels = F.interpolate(pixels, size=self.reward.image_size, mode="bicubic", align_corners=True)
        mean, std = (torch.tensor(v, device=views.device).view(1, 3, 1, 1) for v in (self.reward.mean, self.reward.std))
        return (pixels - mean) / std
