"""vlmtta.vit: the hooked ViT forward equals open_clip's, exposes CLS attention, anchors and reduction."""
from __future__ import annotations

import pytest
import torch

from vlmtta.vit import attend, forward_vit, vision_tower


@pytest.fixture(scope="module")
def model(tiny_backbone):
    return tiny_backbone.model


@pytest.fixture(scope="module")
def images():
    return torch.randn(3, 3, 32, 32, generator=torch.Generator().manual_seed(1))


def test_plain_and_hooked_forward_equal_encode_image(model, images):
    with torch.no_grad():
        reference = model.encode_image(images)
        plain = forward_vit(model, images)
        hooked = forward_vit(model, images, hook_layers=[0, 1], reduce_fn=lambda layer, x, attn: x)
    torch.testing.assert_close(plain.features, reference, atol=1e-5, rtol=0)
    torch.testing.assert_close(hooked.features, reference, atol=1e-5, rtol=0)
    assert hooked.n_tokens == [17, 17] and hooked.cls_tokens.shape == (3, 2, 64)


def test_cls_tokens_match_open_clip_intermediates(model, images):
    with torch.no_grad():
        out = forward_vit(model, images, hook_layers=[1])
        inter = model.forward_intermediates(image=images, image_indices=[0, 1], image_output_fmt="NLC",
                                            image_output_extra_tokens=True)
    prefix = torch.stack([p[:, 0] for p in inter["image_intermediates_prefix"]], dim=1)
    torch.testing.assert_close(out.cls_tokens, prefix, atol=1e-5, rtol=0)


def test_cls_attention_equals_multihead_attention_weights(model, images):
    block = model.visual.transformer.resblocks[1]
    captured = {}
    handle = block.register_forward_pre_hook(lambda module, args: captured.setdefault("x", args[0]))
    with torch.no_grad():
        model.encode_image(images)
        handle.remove()
        h = block.ln_1(captured["x"])
        _, weights = block.attn(h, h, h, need_weights=True, average_attn_weights=False)
        out = forward_vit(model, images, hook_layers=[1])
    torch.testing.assert_close(out.cls_attn[1], weights[:, :, 0, 1:], atol=1e-6, rtol=0)


def test_anchor_is_an_extra_key_value(model, images):
    block = model.visual.transformer.resblocks[0]
    x = model.visual._embeds(images)
    anchor = torch.randn(3, 64)
    with torch.no_grad():
        out, cls_attn = attend(block, x, anchor)
        h = block.ln_1(torch.cat([anchor[:, None], x], dim=1))
        ref, weights = block.attn(h, h, h, need_weights=True, average_attn_weights=False)
    torch.testing.assert_close(out, ref[:, 1:], atol=1e-5, rtol=0)
    torch.testing.assert_close(cls_attn, weights[:, :, 1, 2:], atol=1e-6, rtol=0)
    assert (cls_attn.sum(-1) < 1).all()  # the anchor and CLS take part of the mass


def test_reduce_hook_shortens_the_sequence(model, images):
    with torch.no_grad():
        out = forward_vit(model, images, hook_layers=[0], reduce_fn=lambda layer, x, attn: x[:, :5])
    assert out.n_tokens == [5, 5] and out.features.shape == (3, 32)


def test_refuses_non_vit_towers_and_bad_layers(model, images):
    with pytest.raises(TypeError, match="VisionTransformer"):
        vision_tower(torch.nn.Linear(2, 2))
    with pytest.raises(ValueError, match="out of range"):
        forward_vit(model, images, hook_layers=[5])
