"""open_clip's ViT image tower, run block by block over the model's own modules, with hooks.

``forward_vit`` re-implements ``VisionTransformer.forward`` (open_clip 3.x: ``_embeds`` ->
``transformer.resblocks`` -> ``_pool`` -> ``proj``) without patching anything: the weights and
modules are the model's, the loop is ours.  At the ``hook_layers`` it runs the block's attention
itself so that it can

* return the CLS-row attention weights of every head (``need_weights`` is off in open_clip),
* let an extra *anchor* token [B, W] take part in the attention as key/value (TCA's domain anchor;
  it is layer-normed like the tokens and its own output is dropped), and
* hand the tokens to a ``reduce`` callback between attention and MLP (EViT-style token reduction,
  TCA's condensation), which may return fewer tokens.

The CLS token after every block is returned too (TCA's layer-wise CLS tokens).  With no hooks the
result equals ``model.encode_image`` (tested to 1e-5).
"""
from __future__ import annotations

import math
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from open_clip.transformer import ResidualAttentionBlock, VisionTransformer

AnchorFn = Callable[[int, torch.Tensor], "torch.Tensor | None"]  # (layer, cls [B, W]) -> anchor [B, W] or None
ReduceFn = Callable[[int, torch.Tensor, torch.Tensor], torch.Tensor]  # (layer, x [B, N, W], cls_attn [B, H, N-1]) -> x'


@dataclass
class ViTOutput:
    """What one hooked pass returns."""

    features: torch.Tensor  # [B, D] projected image features, not normalised (== encode_image)
    cls_tokens: torch.Tensor  # [B, L, W] CLS token after every block (residual stream, before ln_post)
    cls_attn: dict[int, torch.Tensor] = field(default_factory=dict)  # layer -> [B, H, N-1] CLS -> other tokens
    n_tokens: list[int] = field(default_factory=list)  # sequence length after every block (CLS included)


def vision_tower(model: torch.nn.Module, *, need_cls: bool = True) -> VisionTransformer:
    """The model's open_clip ``VisionTransformer``, or a clear error for towers the hooks cannot run."""
    visual = getattr(model, "visual", model)
    if not isinstance(visual, VisionTransformer):
        raise TypeError(f"This needs an open_clip ViT image tower (VisionTransformer); this model has "
                        f"{type(visual).__name__} (ResNet / timm / other towers are not supported).")
    blocks = visual.transformer.resblocks
    if not all(type(block) is ResidualAttentionBlock for block in blocks):
        raise TypeError("The ViT's blocks are not open_clip's standard ResidualAttentionBlock "
                        "(custom blocks: qk-norm / scaled attention); token hooks do not support them.")
    if not getattr(visual.transformer, "batch_first", True):
        raise TypeError("The ViT transformer is not batch-first; token hooks need open_clip >= 2.26.")
    if need_cls and (visual.attn_pool is not None or visual.pool_type != "tok"):
        raise TypeError(f"Token condensation needs a CLS-token ViT (pool_type 'tok', no attentional pooler); "
                        f"this tower pools with {visual.pool_type!r}"
                        f"{' and an attentional pooler' if visual.attn_pool is not None else ''}.")
    return visual


def attend(block: ResidualAttentionBlock, x: torch.Tensor, anchor: torch.Tensor | None = None
           ) -> tuple[torch.Tensor, torch.Tensor]:
    """``block.attention(block.ln_1(x))`` computed by hand, and the CLS-row attention weights.

    ``anchor`` [B, W] (optional) is prepended as an extra key/value.  Returns the attention output
    [B, N, W] (before ``ls_1``) and the CLS row's weights over the other real tokens [B, H, N-1]
    (softmax over all keys, anchor included, so not renormalised; as MHA's ``need_weights``).
    """
    attn = block.attn
    batch, n, width = x.shape
    heads = attn.num_heads
    head_dim = width // heads
    h = block.ln_1(x)
    kv_in = h if anchor is None else torch.cat([block.ln_1(anchor[:, None].to(x.dtype)), h], dim=1)
    w, b = attn.in_proj_weight, attn.in_proj_bias
    q = F.linear(h, w[:width], None if b is None else b[:width])
    k, v = F.linear(kv_in, w[width:], None if b is None else b[width:]).chunk(2, dim=-1)
    q, k, v = (t.view(batch, -1, heads, head_dim).transpose(1, 2) for t in (q, k, v))  # [B, H, *, d]
    out = F.scaled_dot_product_attention(q, k, v)
    out = attn.out_proj(out.transpose(1, 2).reshape(batch, n, width))
    cls_logits = (q[:, :, :1] @ k.transpose(-1, -2)).squeeze(2) / math.sqrt(head_dim)  # [B, H, n (+1)]
    cls_attn = cls_logits.float().softmax(dim=-1)[..., -(n - 1):]
    return out, cls_attn


def _hooked_block(block: ResidualAttentionBlock, x: torch.Tensor, layer: int, anchor_fn: AnchorFn | None,
                  reduce_fn: ReduceFn | None) -> tuple[torch.Tensor, torch.Tensor]:
    anchor = anchor_fn(layer, x[:, 0]) if anchor_fn is not None else None
    out, cls_attn = attend(block, x, anchor)
    x = x + block.ls_1(out)
    if reduce_fn is not None:
        x = reduce_fn(layer, x, cls_attn)
    return x + block.ls_2(block.mlp(block.ln_2(x))), cls_attn


def forward_vit(model: torch.nn.Module, images: torch.Tensor, *, hook_layers: Iterable[int] = (),
                anchor_fn: AnchorFn | None = None, reduce_fn: ReduceFn | None = None) -> ViTOutput:
    """Run the ViT image tower of ``model`` on ``images`` [B, 3, S, S], with hooks at ``hook_layers``.

    Gradients flow as usual (call it under ``torch.no_grad`` / ``inference_mode`` when adapting
    nothing).  Autocast, if any, is the caller's.
    """
    hooks = set(hook_layers)
    visual = vision_tower(model, need_cls=bool(hooks))
    blocks = visual.transformer.resblocks
    bad = sorted(layer for layer in hooks if not 0 <= layer < len(blocks))
    if bad:
        raise ValueError(f"Hook layers {bad} out of range: this ViT has {len(blocks)} blocks (0-based).")
    x = visual._embeds(images.to(visual.conv1.weight.dtype))
    cls_tokens, cls_attn, n_tokens = [], {}, []
    for layer, block in enumerate(blocks):
        if layer in hooks:
            x, cls_attn[layer] = _hooked_block(block, x, layer, anchor_fn, reduce_fn)
        else:
            x = block(x)
        cls_tokens.append(x[:, 0])
        n_tokens.append(x.shape[1])
    pooled, _ = visual._pool(x)
    if visual.proj is not None:
        pooled = pooled @ visual.proj
    return ViTOutput(pooled, torch.stack(cls_tokens, dim=1), cls_attn, n_tokens)
