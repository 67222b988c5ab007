"""DynaPrompt: dynamic test-time prompt tuning (Xiao et al., ICLR 2025; official code ``zzzx1224/DynaPrompt``)."""
from __future__ import annotations

import torch

from ..entropy import confident_count, marginal_entropy, shannon_entropy
from ..prompt_learner import DEFAULT_CTX_INIT, PromptLearner, init_context, load_context
from .base import Context, Method, Need, register
from .tpt import FINE_GRAINED, GRAD_SCALER_INIT


def prompt_metrics(logits: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """DynaPrompt's per-prompt selection metrics from logits [N, S, C] (view 0 = original) of ``S`` prompts.

    Returns the prediction entropy (per-view entropy averaged over the views) [S] and the probability difference
    (the original view's top logit minus each augmented view's, averaged over the augmented views) [S]."""
    entropy = shannon_entropy(logits).mean(dim=0)
    top = logits.max(dim=-1).values  # [N, S]
    difference = (top[:1] - top[1:]).mean(dim=0) if logits.shape[0] > 1 else torch.zeros_like(entropy)
    return entropy, difference


def dynaprompt_loss(logits: torch.Tensor, ratio: float) -> torch.Tensor:
    """Mean over the selected prompts of the marginal entropy of the confident views, from logits [N, S, C]; the
    views are ranked by their entropy averaged over the prompts."""
    keep = torch.argsort(shannon_entropy(logits.detach()).mean(dim=1), stable=True)[: confident_count(logits.shape[0], ratio)]
    return marginal_entropy(logits[keep]).mean()


@register
class DynaPrompt(Method):
    """An online buffer of prompt contexts; per test image the relevant ones are selected, tuned and predict.

    State (online): up to ``buffer_size`` = 12 contexts, each TPT's "a photo of a" context plus its own learned
    offset, with the time each was last selected.  Per test image:

    1. If every slot is taken, the least recently selected prompt is deleted (its slot is freed).
    2. The candidates are the stored prompts and one fresh initial prompt; all class text features of all
       candidates come from one pass of the text tower (truncated context), the views are encoded once.
    3. Selection: a stored prompt is selected when its prediction entropy is lower AND its probability difference
       is higher than the initial prompt's (``prompt_metrics``); the initial prompt is always selected too (and so
       appended to the buffer).
    4. One AdamW step (lr 5e-3, weight decay 0.01, fresh moments, as the official code resets its optimizer per
       sample) on the selected prompts' offsets: the mean over them of the marginal entropy of the
       ``confidence_ratio`` = 10 % most confident views (``dynaprompt_loss``).
    5. Prediction: the original view's logits under the tuned selected prompts, averaged over them, softmax.

    Deviations from the official code, documented: its selection ranks prompts by entropy and by probability
    difference and intersects "lower entropy than the initial prompt" with the first ``k`` prompts by probability
    difference, ``k`` = the initial prompt's entropy rank (then indexes the entropy ranking with the result
    again); vlmtta compares both metrics with the initial prompt's, as the paper describes the rule.  The code's
    single optimizer over the whole buffer also decays unselected offsets; vlmtta decays only the tuned ones.
    The probability difference is on logits, as in the code.  fp16 autocast with a gradient scaler on CUDA (as
    TPT); fp32 on CPU.
    """

    name = "dynaprompt"
    summary = "DynaPrompt: an online buffer of prompts; per image the relevant ones are selected, tuned and vote."
    paper = "Xiao et al., DynaPrompt: Dynamic Test-Time Prompt Tuning, ICLR 2025"
    episodic = False
    needs = frozenset({Need.TEXT_GRAD})
    dataset_defaults = {name: {"augmentation": "augmix"} for name in FINE_GRAINED}  # as TPT (the code's views)

    def __init__(self, n_views: int = 64, augmentation: str = "rrc_flip", lr: float = 5e-3,
                 confidence_ratio: float = 0.1, buffer_size: int = 12, n_ctx: int = 4,
                 ctx_init: str | None = DEFAULT_CTX_INIT, coop_ctx: str | None = None, init_seed: int = 0):
        super().__init__(n_views=n_views, augmentation=augmentation)
        confident_count(self.n_views, confidence_ratio)
        if not lr > 0 or int(buffer_size) < 1 or int(n_ctx) < 1:
            raise ValueError(f"{self.name}: need lr > 0, buffer_size >= 1 and n_ctx >= 1; got {lr}, {buffer_size}, {n_ctx}.")
        self.lr, self.confidence_ratio, self.buffer_size = float(lr), float(confidence_ratio), int(buffer_size)
        self.n_ctx, self.ctx_init, self.coop_ctx, self.init_seed = int(n_ctx), ctx_init, coop_ctx, int(init_seed)
        self.learner: PromptLearner | None = None

    # ---- lifecycle ----------------------------------------------------------------------------
    def bind(self, context: Context) -> None:
        backbone = context.require_backbone(self.name)
        ctx = load_context(self.coop_ctx, backbone.device) if self.coop_ctx else \
            init_context(backbone, self.n_ctx, self.ctx_init, self.init_seed)
        self.learner = PromptLearner(backbone, context.classnames, ctx)
        self.learner.ctx.requires_grad_(False)  # the prompts are the initial context plus per-slot offsets
        self._scaler = torch.amp.GradScaler(backbone.device.type, init_scale=GRAD_SCALER_INIT,
                                            enabled=backbone.device.type == "cuda")
        super().bind(context)

    def reset(self) -> None:
        if self.learner is None:
            return
        device = self.learner.ctx.device
        self.offsets = torch.zeros(self.buffer_size, *self.learner.ctx.shape, device=device)
        self.last_used = torch.full((self.buffer_size,), -1, dtype=torch.long, device=device)  # -1: free slot
        self.clock = 0

    # ---- prediction -----------------------------------------------------------------------------
    def predict_views(self, views: torch.Tensor) -> torch.Tensor:
        backbone = self.context.require_backbone(self.name)
        features = backbone.encode_images(views).clone()
        if bool((self.last_used >= 0).all()):  # buffer full: delete the least recently selected prompt
            oldest = int(self.last_used.argmin())
            self.offsets[oldest], self.last_used[oldest] = 0.0, -1
        stored = torch.nonzero(self.last_used >= 0).flatten()
        fresh = torch.nonzero(self.last_used < 0).flatten()[:1]
        slots = torch.cat([stored, fresh])  # the initial prompt is the last candidate
        selected = self.tune(features, slots)
        self.last_used[selected] = self.clock
        self.clock += 1
        with torch.no_grad(), backbone.autocast():
            text = self.learner.forward_many(self.learner.ctx + self.offsets[selected])
        return torch.stack([self.logits(features[:1], t)[0] for t in text]).mean(dim=0).softmax(dim=-1)

    @torch.enable_grad()
    def tune(self, features: torch.Tensor, slots: torch.Tensor) -> torch.Tensor:
        """Select among the candidate ``slots`` (the last = the initial prompt), take one step on the selected
        offsets, and return the selected slots."""
        offsets = self.offsets[slots].clone().requires_grad_(True)
        with self.context.backbone.autocast():
            text = self.learner.forward_many(self.learner.ctx + offsets)  # [S, C, D]
            logits = torch.stack([self.logits(features, t) for t in text], dim=1)  # [N, S, C]
        entropy, difference = prompt_metrics(logits.detach().float())
        chosen = (entropy < entropy[-1]) & (difference > difference[-1])
        chosen[-1] = True
        index = torch.nonzero(chosen).flatten()
        loss = dynaprompt_loss(logits[:, index].float(), self.confidence_ratio)
        (grad,) = torch.autograd.grad(self._scaler.scale(loss), offsets)
        tuned = offsets.detach()[index].clone().requires_grad_(True)
        tuned.grad = grad[index]
        optimizer = torch.optim.AdamW([tuned], lr=self.lr)
        self._scaler.step(optimizer)
        self._scaler.update()
        self.offsets[slots[index]] = tuned.detach()
        return slots[index]
