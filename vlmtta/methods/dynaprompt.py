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

    1. Candidates: the stored prompts and the initial prompt (offset zero); all class text features of all
       candidates come from one pass of the text tower (truncated context), the views are encoded once.
    2. Selection (``prompt_metrics``): a stored prompt is selected when its prediction entropy is lower AND its
       probability difference is higher than the initial prompt's (the initial prompt's values are the adaptive
       thresholds).
    3. Appending: when no stored prompt is selected, the initial prompt is selected instead and appended to the
       buffer; if the buffer is full, the least recently selected prompt is deleted to make room.
    4. One AdamW step (lr 5e-3, weight decay 0.01, fresh moments, as the official code resets its optimizer per
       sample) on the selected prompts' offsets: the mean over them of the marginal entropy of the
       ``confidence_ratio`` = 10 % most confident views (``dynaprompt_loss``).
    5. Prediction: the original view's logits under the tuned selected prompts, averaged over them, softmax.

    Paper and official code.  The paper's text could not be read here; steps 2-3 follow its abstract ("append
    new prompts and delete the inactive ones") and its reviewers' reading (the buffer starts with one initial
    prompt; a new initial prompt is appended only when the selection criteria are not met, otherwise the
    selected past prompts are optimised; the least active prompts are removed).  The official code differs:
    (a) it selects and tunes the initial prompt at every image on top of the selected ones, so every image
    appends (deleting the least recently used prompt first when the buffer is full): ``always_append=True``;
    (b) its selection ranks the prompts by entropy and by probability difference and intersects "lower
    entropy than the initial prompt" with the first ``k`` by probability difference, ``k`` = the initial
    prompt's entropy rank, then indexes the entropy ranking with the resulting prompt ids again (an indexing
    bug): not offered, the thresholds above are its evident intent; (c) its single optimizer over the whole
    buffer also decays unselected offsets (by ``1 - lr * 0.01`` per image); vlmtta decays only the tuned ones.
    The probability difference is the original view's top logit minus each augmented view's, averaged, on
    logits as in the code.  fp16 autocast with a gradient scaler on CUDA (as TPT); fp32 on CPU.
    """

    name = "dynaprompt"
    summary = "DynaPrompt: an online buffer of prompts; per image the relevant ones are selected, tuned and vote."
    paper = "Xiao et al., DynaPrompt: Dynamic Test-Time Prompt Tuning, ICLR 2025"
    episodic = False
    needs = frozenset({Need.TEXT_GRAD})
    dataset_defaults = {name: {"augmentation": "augmix"} for name in FINE_GRAINED}  # as TPT (the code's views)

    def __init__(self, n_views: int = 64, augmentation: str = "rrc_flip", lr: float = 5e-3,
                 confidence_ratio: float = 0.1, buffer_size: int = 12, n_ctx: int = 4,
                 ctx_init: str | None = DEFAULT_CTX_INIT, coop_ctx: str | None = None, always_append: bool = False,
                 init_seed: int = 0):
        super().__init__(n_views=n_views, augmentation=augmentation)
        confident_count(self.n_views, confidence_ratio)
        if not lr > 0 or int(buffer_size) < 1 or int(n_ctx) < 1:
            raise ValueError(f"{self.name}: need lr > 0, buffer_size >= 1 and n_ctx >= 1; got {lr}, {buffer_size}, {n_ctx}.")
        self.lr, self.confidence_ratio, self.buffer_size = float(lr), float(confidence_ratio), int(buffer_size)
        self.n_ctx, self.ctx_init, self.coop_ctx, self.init_seed = int(n_ctx), ctx_init, coop_ctx, int(init_seed)
        self.always_append = bool(always_append)
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
        if self.always_append and bool((self.last_used >= 0).all()):
            self._delete_least_recent()  # the code frees a slot before it looks at the prompts
        stored = torch.nonzero(self.last_used >= 0).flatten()
        chosen, tuned = self.tune(features, stored)
        slots = [int(stored[i]) if i < len(stored) else self._free_slot() for i in chosen.tolist()]
        self.offsets[slots] = tuned
        self.last_used[slots] = self.clock
        self.clock += 1
        with torch.no_grad(), backbone.autocast():
            text = self.learner.forward_many(self.learner.ctx + tuned)
        return torch.stack([self.logits(features[:1], t)[0] for t in text]).mean(dim=0).softmax(dim=-1)

    @torch.enable_grad()
    def tune(self, features: torch.Tensor, stored: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Select among the ``stored`` slots' prompts and the initial prompt (candidate ``len(stored)``), take one
        AdamW step on the selected offsets; returns the selected candidates and their tuned offsets."""
        offsets = torch.cat([self.offsets[stored], torch.zeros_like(self.offsets[:1])]).requires_grad_(True)
        with self.context.backbone.autocast():
            text = self.learner.forward_many(self.learner.ctx + offsets)  # [S, C, D]
            logits = torch.stack([self.logits(features, t) for t in text], dim=1)  # [N, S, C]
        entropy, difference = prompt_metrics(logits.detach().float())
        chosen = (entropy < entropy[-1]) & (difference > difference[-1])
        chosen[-1] = self.always_append or not bool(chosen[:-1].any())
        index = torch.nonzero(chosen).flatten()
        loss = dynaprompt_loss(logits[:, index].float(), self.confidence_ratio)
        (grad,) = torch.autograd.grad(self._scaler.scale(loss), offsets)
        tuned = offsets.detach()[index].clone().requires_grad_(True)
        tuned.grad = grad[index]
        optimizer = torch.optim.AdamW([tuned], lr=self.lr)
        self._scaler.step(optimizer)
        self._scaler.update()
        return index, tuned.detach()

    def _free_slot(self) -> int:
        """A free slot for an appended prompt, deleting the least recently selected prompt if none is free."""
        if bool((self.last_used >= 0).all()):
            self._delete_least_recent()
        return int(torch.nonzero(self.last_used < 0).flatten()[0])

    def _delete_least_recent(self) -> None:
        oldest = int(self.last_used.argmin())
        self.offsets[oldest], self.last_used[oldest] = 0.0, -1
