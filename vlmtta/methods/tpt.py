"""TPT: test-time prompt tuning (Shu et al., NeurIPS 2022), with C-TPT's calibration term (Yoon et al., ICLR 2024)."""
from __future__ import annotations

from typing import ClassVar

import torch

from ..entropy import check_confidence, confidence_scores, take_views, marginal_entropy, select_confident
from ..prompt_learner import DEFAULT_CTX_INIT, PromptLearner, init_context, load_context
from .base import Context, Method, Need, register

FINE_GRAINED = ("caltech101", "dtd", "eurosat", "fgvc_aircraft", "food101", "oxford_flowers", "oxford_pets",
                "stanford_cars", "sun397", "ucf101")
NATURAL_SHIFT = ("imagenet", "imagenet_a", "imagenet_v2", "imagenet_r", "imagenet_sketch")
GRAD_SCALER_INIT = 1000.0  # TPT's GradScaler(init_scale=1000)
# Many-image path: at most this many prompts (images x classes) through the text tower with gradients at once.
# Measured on ViT-B-16's tower (fp32, CPU, 18-token truncated context): 4.6 GB for 1000 prompts, i.e. what one image
# at 1000 classes costs; fp16 autocast on CUDA needs about half.
PROMPTS_PER_PASS = 1024


def text_feature_dispersion(text_features: torch.Tensor) -> torch.Tensor:
    """C-TPT's ATFD: mean L2 distance of the normalised class text features [C, D] to their centroid
    (one per image from [B, C, D])."""
    return (text_features - text_features.mean(dim=-2, keepdim=True)).norm(dim=-1).mean(dim=-1)


@register
class TPT(Method):
    """Test-time prompt tuning: tune a class-agnostic prompt context on one image, then predict it.

    Per image (episodic): encode the ``n_views`` views once (view 0 = original), keep the
    ``confidence_ratio`` lowest-entropy views, minimise the entropy of their averaged prediction
    (minus ``ctpt_lambda`` x ATFD for C-TPT) with ``steps`` AdamW steps on the context (views
    selected at the first step are reused), and predict the original view with the tuned
    context.  ``reset()`` restores the context and the optimizer state.  On CUDA the steps run
    under fp16 autocast with a gradient scaler (``init_scale`` 1000); on CPU in fp32.

    Args:
        n_views, augmentation: test views (64, random-resized-crop + flip; AugMix on the
            fine-grained sets, see ``dataset_defaults``).
        steps, lr: AdamW steps (1) and learning rate (5e-3); weight decay is torch's default 0.01.
        confidence_ratio: share of views kept by entropy (0.1: 6 of 64).
        confidence, q: the per-view uncertainty that ranks them (``shannon``, TPT; or ``tsallis``
            with ``q``, see ``vlmtta.entropy``).
        n_ctx, ctx_init: context length and its initial words ("a photo of a", 4 tokens); with
            ``ctx_init=None`` the context is N(0, 0.02) (CoOp's generic init, seed ``init_seed``).
        coop_ctx: path to a learned CoOp context (``{'state_dict': {'ctx': [M, W]}}``, TPT+CoOp);
            overrides ``n_ctx``/``ctx_init``.
        ctpt_lambda: C-TPT's weight on the text-feature dispersion (0 = plain TPT).
        reference_impl: the straightforward formulation (benchmark reference): text on the full
            77-token context, the first step's text forward recomputed, views re-encoded at every
            step and the original image re-encoded for the final prediction.  Same outputs.
        cache_init_graph: keep the autograd graph of the text features at the initial context
            (image-independent) across images, so the first step of each image needs only the
            backward pass; costs that graph's memory between images.
        prompts_per_pass: the many-image path's chunk size in prompts (images x classes), see below.

    Many images at once (``predict_views_many``, ``Adapter.step_many``, ``bench --batch-images``): the B x N
    views are encoded in one batch and B contexts [B, M, W] are tuned together, with independent state: the
    text tower runs on B x C prompts (truncated context), each image keeps its own confident views, the
    per-image losses are summed (so each context receives its own image's gradient) and one AdamW over the
    [B, M, W] tensor updates each image's context with its own moments (AdamW is elementwise, weight decay
    included, and every image takes the same number of steps).  The outputs equal one image at a time up to
    float rounding; the tuned contexts are left in ``tuned_contexts``.  Images are processed in chunks of
    ``prompts_per_pass // C`` (at least one) so that 1000 classes do not exhaust memory (``prompts_per_pass``
    changes memory and speed, never the outputs; raise it on a large GPU).  On CUDA the batch
    shares one gradient-scaler step: an fp16 overflow in any image's gradient skips that step for the whole
    chunk (one image at a time it skips only that image's step), and the scale grows per chunk step.  With
    ``cache_init_graph`` the first step reuses the text graph at the initial context for every image: the B
    per-image gradients go back through it in one batched (vmapped) backward pass, no text forward pass.
    ``reference_impl`` runs one image at a time.

    Deviation from the official code (documented, not optional): TPT keeps one ``GradScaler``
    for the whole run; vlmtta does too (``reset`` does not touch it), so only fp16 overflows,
    which skip a step and lower the scale, carry over between images, as in the original.
    ``ctx_init`` must tokenise to ``n_ctx`` tokens (TPT silently takes the word count).
    """

    name = "tpt"
    summary = "Test-time prompt tuning: entropy-minimise a prompt context on confident views of each image."
    paper = "Shu et al., Test-Time Prompt Tuning for Zero-Shot Generalization in Vision-Language Models, NeurIPS 2022"
    needs = frozenset({Need.TEXT_GRAD})
    dataset_defaults = {name: {"augmentation": "augmix"} for name in FINE_GRAINED}
    weight_decay: float = 0.01  # AdamW's (torch's default, as TPT); RLCF makes it an option
    predicts_from_all_views: ClassVar[bool] = False  # whether predict_after_tuning reads every view (R-TPT)
    vectorised: ClassVar[bool] = True  # whether predict_views_many tunes B images in one step

    def __init__(self, n_views: int = 64, augmentation: str = "rrc_flip", steps: int = 1, lr: float = 5e-3,
                 confidence_ratio: float = 0.1, confidence: str = "shannon", q: float = 1.0, n_ctx: int = 4,
                 ctx_init: str | None = DEFAULT_CTX_INIT,
                 coop_ctx: str | None = None, ctpt_lambda: float = 0.0, reference_impl: bool = False,
                 cache_init_graph: bool = True, init_seed: int = 0,
                 prompts_per_pass: int = PROMPTS_PER_PASS):
        super().__init__(n_views=n_views, augmentation=augmentation)
        if int(steps) < 1 or lr <= 0 or not 0 < confidence_ratio <= 1 or int(n_ctx) < 1 or ctpt_lambda < 0:
            raise ValueError(f"{self.name}: need steps >= 1, lr > 0, 0 < confidence_ratio <= 1, n_ctx >= 1 and "
                             f"ctpt_lambda >= 0; got {steps}, {lr}, {confidence_ratio}, {n_ctx}, {ctpt_lambda}.")
        check_confidence(confidence, q)
        self.steps, self.lr, self.confidence_ratio = int(steps), float(lr), float(confidence_ratio)
        self.confidence, self.q = confidence, float(q)
        self.n_ctx, self.ctx_init, self.coop_ctx = int(n_ctx), ctx_init, coop_ctx
        self.ctpt_lambda, self.reference_impl = float(ctpt_lambda), bool(reference_impl)
        self.cache_init_graph, self.init_seed = bool(cache_init_graph), int(init_seed)
        if int(prompts_per_pass) < 1:
            raise ValueError(f"{self.name}: prompts_per_pass must be at least 1, got {prompts_per_pass}.")
        self.prompts_per_pass = int(prompts_per_pass)
        self.learner: PromptLearner | None = None
        self.tuned_contexts: torch.Tensor | None = None  # [B, M, W] after predict_views_many

    # ---- lifecycle ----------------------------------------------------------------------------
    def bind(self, context: Context) -> None:
        backbone = context.require_backbone(self.name)
        if self.coop_ctx:
            ctx = load_context(self.coop_ctx, backbone.device)
        else:
            ctx = init_context(backbone, self.n_ctx, self.ctx_init, self.init_seed)
        self.learner = PromptLearner(backbone, context.classnames, ctx, truncate=not self.reference_impl)
        self._init_ctx = self.learner.ctx.detach().clone()
        self._scaler = torch.amp.GradScaler(backbone.device.type, init_scale=GRAD_SCALER_INIT,
                                            enabled=backbone.device.type == "cuda")
        self._init_graph: tuple[torch.Tensor, torch.Tensor] | None = None
        super().bind(context)

    def reset(self) -> None:
        if self.learner is None:
            return
        with torch.no_grad():
            self.learner.ctx.copy_(self._init_ctx)
        self.learner.ctx.grad = None
        self.optimizer = torch.optim.AdamW([self.learner.ctx], lr=self.lr, weight_decay=self.weight_decay)
        self._at_init = True

    # ---- prediction ---------------------------------------------------------------------------
    def predict_views(self, views: torch.Tensor) -> torch.Tensor:
        backbone = self.context.require_backbone(self.name)
        if self.reference_impl:
            return self._predict_reference(views)
        features = backbone.encode_images(views).clone()  # a normal tensor: it enters the autograd graph
        self.tune(features)
        return self.predict_after_tuning(features)

    @torch.enable_grad()
    def tune(self, features: torch.Tensor) -> None:
        """``steps`` optimisation steps of the context on the L2-normalised view features [N, D]."""
        selected = None
        for _ in range(self.steps):
            leaf, text, cached = self._text_with_grad()
            with self.context.backbone.autocast():
                logits = self.logits(features, text)
                if selected is None:
                    selected = self.select(logits.detach(), features)
                loss = self.loss(logits[selected], text)
            self._step(loss, leaf, retain=cached)

    def select(self, logits: torch.Tensor, features: torch.Tensor) -> torch.Tensor:
        """Indices of the views the loss uses (TPT: the ``confidence_ratio`` lowest-entropy ones)."""
        return select_confident(logits, self.confidence_ratio, self.view_scores(logits))

    def view_scores(self, logits: torch.Tensor) -> torch.Tensor:
        """Per-view uncertainty under the ``confidence`` criterion (Shannon entropy in TPT)."""
        return confidence_scores(logits.float(), self.confidence, self.q)

    def loss(self, logits: torch.Tensor, text: torch.Tensor) -> torch.Tensor:
        """Marginal entropy of the selected views' logits [K, C], minus ``ctpt_lambda`` x ATFD (C-TPT) of the
        text features [C, D]; one loss per image [B] from [B, K, C] and [B, C, D]."""
        loss = marginal_entropy(logits.float().movedim(-2, 0))
        if self.ctpt_lambda:
            loss = loss - self.ctpt_lambda * text_feature_dispersion(text.float())
        return loss

    def predict_after_tuning(self, features: torch.Tensor) -> torch.Tensor:
        """The prediction [C] from the views' features [N, D] once the context is tuned (TPT: the original view)."""
        return self.predict_tuned(features[:1])

    @torch.no_grad()
    def predict_tuned(self, features: torch.Tensor) -> torch.Tensor:
        """Class probabilities [C] of the original view's features [1, D] under the current context."""
        with self.context.backbone.autocast():
            text = self.learner()
        return self.logits(features, text).float().softmax(dim=-1)[0]

    # ---- many images at once ------------------------------------------------------------------
    def predict_views_many(self, views: torch.Tensor, sources: list[torch.Tensor] | None = None) -> torch.Tensor:
        """Probabilities [B, C] of B images from their views [B, N, 3, S, S]: all views encoded in one batch, the B
        contexts tuned together in chunks of ``images_per_pass`` images (see the class docstring)."""
        if self.reference_impl or not self.vectorised:
            return super().predict_views_many(views, sources)
        backbone = self.context.require_backbone(self.name)
        b, n = views.shape[:2]
        encoded = backbone.encode_images(views.flatten(0, 1)).reshape(b, n, -1)
        probs, contexts = [], []
        with torch.inference_mode(False):
            for start in range(0, b, self.images_per_pass()):
                chunk = slice(start, start + self.images_per_pass())
                p, ctx = self.adapt_many(encoded[chunk].clone(), views[chunk])  # clone: a normal tensor
                probs.append(p)
                contexts.append(ctx)
        self.reset()
        self.tuned_contexts = torch.cat(contexts)
        return torch.cat(probs)

    def images_per_pass(self) -> int:
        """How many images one pass of the text tower serves: ``prompts_per_pass // C``, at least one."""
        return max(1, int(self.prompts_per_pass) // self.learner.n_classes)

    def adapt_many(self, features: torch.Tensor, views: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(probabilities [B, C], tuned contexts [B, M, W]) of B images from their views' features [B, N, D]
        (``views`` [B, N, 3, S, S]: for methods that look at the pixels again, e.g. RLCF's reward model)."""
        contexts = self.tune_many(features)
        with torch.no_grad(), self.context.backbone.autocast():
            text = self.learner.forward_many(contexts)
        with torch.no_grad():
            return self.predict_many(features, text).float(), contexts

    @torch.enable_grad()
    def tune_many(self, features: torch.Tensor) -> torch.Tensor:
        """``steps`` AdamW steps of B independent contexts on the views' features [B, N, D] -> contexts [B, M, W]."""
        contexts = self._init_ctx.expand(features.shape[0], -1, -1).clone().requires_grad_(True)
        optimizer = torch.optim.AdamW([contexts], lr=self.lr, weight_decay=self.weight_decay)
        selected = None
        for step in range(self.steps):
            initial = self._initial_graph() if step == 0 and self.cache_init_graph else None
            with self.context.backbone.autocast():
                if initial is None:
                    text = self.learner.forward_many(contexts)
                else:  # every image starts from the same text features: a copy per image, a leaf of its own
                    text = initial[1].detach().expand(features.shape[0], -1, -1).clone().requires_grad_(True)
                logits = self.logits(features, text)
                if selected is None:
                    selected = self.select(logits.detach(), features)
                loss = self.loss(take_views(logits, selected), text).sum()  # d(sum)/d(ctx_b) = image b's gradient
            if initial is None:
                (grad,) = torch.autograd.grad(self._scaler.scale(loss), contexts)
            else:  # B backward passes through the cached initial graph, batched (vmap)
                (text_grad,) = torch.autograd.grad(self._scaler.scale(loss), text)
                (grad,) = torch.autograd.grad(initial[1], initial[0], grad_outputs=text_grad, retain_graph=True,
                                              is_grads_batched=True)
            contexts.grad = grad.to(contexts.dtype)
            self._scaler.step(optimizer)
            self._scaler.update()
            optimizer.zero_grad(set_to_none=True)
        return contexts.detach()

    def predict_many(self, features: torch.Tensor, text: torch.Tensor) -> torch.Tensor:
        """Probabilities [B, C] from the views' features [B, N, D] and each image's tuned text features [B, C, D]
        (TPT: the original view's)."""
        return self.logits(features[:, :1], text).float().softmax(dim=-1)[:, 0]

    # ---- internals ----------------------------------------------------------------------------
    def _text_with_grad(self) -> tuple[torch.Tensor, torch.Tensor, bool]:
        """(leaf the gradient is taken for, text features [C, D], whether the graph is kept for later images)."""
        cached = self.cache_init_graph and self._at_init and not self.reference_impl
        self._at_init = False
        if not cached:
            with self.context.backbone.autocast():
                return self.learner.ctx, self.learner(), False
        return (*self._initial_graph(), True)

    def _initial_graph(self) -> tuple[torch.Tensor, torch.Tensor]:
        """(leaf, text features [C, D]) at the initial context with their autograd graph, built once: it does not
        depend on the image."""
        if self._init_graph is None:
            leaf = self._init_ctx.clone().requires_grad_(True)
            with torch.enable_grad(), self.context.backbone.autocast():
                self._init_graph = (leaf, self.learner(leaf))
        return self._init_graph

    def _step(self, loss: torch.Tensor, leaf: torch.Tensor, retain: bool) -> None:
        """One (scaled) AdamW step on the context, with the gradient taken w.r.t. ``leaf``."""
        (grad,) = torch.autograd.grad(self._scaler.scale(loss), leaf, retain_graph=retain)
        self.learner.ctx.grad = grad.to(self.learner.ctx.dtype)
        self._scaler.step(self.optimizer)
        self._scaler.update()
        self.optimizer.zero_grad(set_to_none=True)

    @torch.enable_grad()
    def _predict_reference(self, views: torch.Tensor) -> torch.Tensor:
        """The published algorithm, straightforwardly: every forward encodes its images and all 77 text positions."""
        backbone = self.context.backbone
        selected = None
        for _ in range(self.steps):
            features = backbone.encode_images(views).clone()
            with backbone.autocast():
                text = self.learner()
                logits = self.logits(features, text)
                if selected is None:
                    selected = self.select(logits.detach(), features)
                loss = self.loss(logits[selected], text)
            self._step(loss, self.learner.ctx, retain=False)
        return self.predict_after_tuning(backbone.encode_images(views if self.predicts_from_all_views else views[:1]))


@register
class CTPT(TPT):
    """C-TPT: TPT whose loss subtracts ``ctpt_lambda`` x ATFD, the dispersion of the class text features.

    Defaults follow C-TPT's scripts: AugMix views on every set (``--I_augmix`` on the ImageNet
    family too), lambda 50 on the fine-grained sets and 20 on natural shift (``dataset_defaults``);
    everything else as TPT (64 views, ratio 0.1, lr 5e-3, one step).
    """

    name = "ctpt"
    summary = "Calibrated TPT: TPT plus a term that spreads the class text features (better calibration)."
    paper = "Yoon et al., C-TPT: Calibrated Test-Time Prompt Tuning for Vision-Language Models via Text Feature Dispersion, ICLR 2024"
    dataset_defaults = {**{name: {"ctpt_lambda": 50.0} for name in FINE_GRAINED},
                        **{name: {"ctpt_lambda": 20.0} for name in NATURAL_SHIFT}}

    def __init__(self, n_views: int = 64, augmentation: str = "augmix", steps: int = 1, lr: float = 5e-3,
                 confidence_ratio: float = 0.1, confidence: str = "shannon", q: float = 1.0, n_ctx: int = 4,
                 ctx_init: str | None = DEFAULT_CTX_INIT,
                 coop_ctx: str | None = None, ctpt_lambda: float = 50.0, reference_impl: bool = False,
                 cache_init_graph: bool = True, init_seed: int = 0,
                 prompts_per_pass: int = PROMPTS_PER_PASS):
        super().__init__(n_views=n_views, augmentation=augmentation, steps=steps, lr=lr,
                         confidence_ratio=confidence_ratio, confidence=confidence, q=q, n_ctx=n_ctx,
                         ctx_init=ctx_init, coop_ctx=coop_ctx,
                         ctpt_lambda=ctpt_lambda, reference_impl=reference_impl,
                         cache_init_graph=cache_init_graph, init_seed=init_seed,
                         prompts_per_pass=prompts_per_pass)
