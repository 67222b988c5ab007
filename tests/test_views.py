"""Tests for vlmtta.views: batched TPT-style test views (RRC + flip, AugMix)."""
from __future__ import annotations

import dataclasses
import time

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from PIL import Image, ImageOps
from torchvision.transforms import RandomResizedCrop
from torchvision.transforms.v2 import functional as TF

from vlmtta import views as V
from vlmtta.views import VIEW_POLICIES, ViewConfig, make_views, original_view, view_seed

MEAN, STD = ViewConfig().mean, ViewConfig().std


def _smooth_image(h: int, w: int, seed: int = 0) -> torch.Tensor:
    """A smooth random uint8 [3,h,w] image (upsampled noise), so resampling filters agree."""
    g = torch.Generator().manual_seed(seed)
    low = torch.rand(1, 3, max(2, h // 8), max(2, w // 8), generator=g) * 255
    return F.interpolate(low, size=(h, w), mode="bilinear").round().clamp(0, 255).to(torch.uint8)[0]


def _noise_image(h: int, w: int, seed: int = 0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.randint(0, 256, (3, h, w), generator=g, dtype=torch.uint8)


def _norm(x: torch.Tensor) -> torch.Tensor:
    """uint8 [...,3,H,W] -> normalised float like the views."""
    return V._normalize(x.float().reshape(-1, *x.shape[-3:]) / 255, MEAN, STD)


def _small(policy: str, n: int = 8, size: int = 32, **kw) -> ViewConfig:
    return ViewConfig(n_views=n, policy=policy, image_size=size, **kw)


# ---------------------------------------------------------------------------------------------
# public API


@pytest.mark.parametrize("policy", ["rrc_flip", "augmix"])
def test_shape_dtype_device_and_original_first(policy):
    img = _smooth_image(45, 60)
    out = make_views(img, _small(policy), seed=3)
    assert out.shape == (8, 3, 32, 32) and out.dtype == torch.float32 and out.device == img.device
    assert torch.isfinite(out).all()
    assert torch.equal(out[:1], original_view(img, 32, MEAN, STD))


@pytest.mark.parametrize("policy", ["rrc_flip", "augmix"])
def test_seed_determinism(policy):
    img = _noise_image(40, 50)
    cfg = _small(policy)
    a, b, c = (make_views(img, cfg, s) for s in (1, 1, 2))
    assert torch.equal(a, b)
    assert torch.equal(a[0], c[0])  # the original does not depend on the seed
    assert all(not torch.equal(a[i], c[i]) for i in range(1, 8))


def test_policy_none_gives_only_the_original():
    img = _noise_image(20, 30)
    out = make_views(img, ViewConfig(n_views=1, policy="none", image_size=16), seed=0)
    assert out.shape == (1, 3, 16, 16)
    assert torch.equal(out, original_view(img, 16, MEAN, STD))


def test_original_view_of_constant_image_is_normalised_constant():
    img = torch.full((3, 37, 81), 100, dtype=torch.uint8)
    out = original_view(img, 24, MEAN, STD)
    expected = ((100 / 255 - torch.tensor(MEAN)) / torch.tensor(STD)).view(1, 3, 1, 1).expand(1, 3, 24, 24)
    assert out.shape == (1, 3, 24, 24)
    torch.testing.assert_close(out, expected, atol=1e-6, rtol=0)


def test_original_view_matches_pil_pipeline():
    """Bicubic shorter-side resize + center crop, as TPT/CLIP preprocess does on PIL images."""
    img = _noise_image(50, 70)
    pil = Image.fromarray(img.permute(1, 2, 0).numpy())
    pil = pil.resize((44, 32), Image.BICUBIC)  # shorter side 50 -> 32, longer int(32*70/50) = 44
    ref = torch.from_numpy(np.array(pil)).permute(2, 0, 1)[:, :, 6:38]
    ours = original_view(img, 32, (0, 0, 0), (1, 1, 1))[0] * 255
    assert (ours - ref.float()).abs().max() <= 1.0 + 1e-4


def test_rrc_flip_full_crop_gives_original_or_mirror():
    img = _noise_image(24, 24)
    cfg = ViewConfig(n_views=17, image_size=24, scale=(1.0, 1.0), ratio=(1.0, 1.0))
    out = make_views(img, cfg, seed=5)
    plain, mirror = _norm(img)[0], _norm(img.flip(-1))[0]
    flipped = []
    for v in out[1:]:
        d_plain, d_mirror = (v - plain).abs().max(), (v - mirror).abs().max()
        assert min(d_plain, d_mirror) < 1e-5
        flipped.append(bool(d_mirror < d_plain))
    assert 0 < sum(flipped) < 16  # both outcomes occur


def test_rrc_full_crop_with_resize_is_close_to_resized_original():
    img = _smooth_image(64, 64)
    cfg = ViewConfig(n_views=9, image_size=32, scale=(1.0, 1.0), ratio=(1.0, 1.0))
    out = make_views(img, cfg, seed=0)
    ref = out[0]
    for v in out[1:]:
        err = min((v - ref).abs().mean(), (v - ref.flip(-1)).abs().mean())
        assert err < 0.02  # ~1 grey level: box-filtered roi_align vs bicubic


@pytest.mark.parametrize("shape", [(1, 1), (7, 300), (300, 7), (2, 3)])
@pytest.mark.parametrize("policy", ["rrc_flip", "augmix"])
def test_tiny_and_very_non_square_images(shape, policy):
    img = _noise_image(*shape)
    out = make_views(img, _small(policy, n=4, size=16), seed=0)
    assert out.shape == (4, 3, 16, 16) and torch.isfinite(out).all()


def test_one_by_one_image_views_are_constant():
    img = torch.tensor([10, 120, 250], dtype=torch.uint8).view(3, 1, 1)
    out = make_views(img, _small("rrc_flip", n=4, size=8), seed=0)
    torch.testing.assert_close(out, _norm(img.expand(3, 8, 8)).expand(4, 3, 8, 8), atol=1e-5, rtol=0)


@pytest.mark.parametrize(
    "bad",
    [
        torch.zeros(3, 8, 8),  # float
        torch.zeros(1, 8, 8, dtype=torch.uint8),  # 1 channel
        torch.zeros(8, 8, 3, dtype=torch.uint8),  # HWC
        torch.zeros(1, 3, 8, 8, dtype=torch.uint8),  # batched
        torch.zeros(3, 0, 8, dtype=torch.uint8),  # empty
        np.zeros((3, 8, 8), dtype=np.uint8),  # not a tensor
    ],
)
def test_bad_image_raises(bad):
    with pytest.raises(ValueError, match="image"):
        make_views(bad, _small("rrc_flip"), seed=0)
    with pytest.raises(ValueError, match="image"):
        original_view(bad, 8, MEAN, STD)


@pytest.mark.parametrize(
    "kwargs, field",
    [
        (dict(policy="autoaugment"), "policy"),
        (dict(policy="none"), "n_views"),  # default n_views=64 with policy none
        (dict(n_views=0), "n_views"),
        (dict(n_views=True), "n_views"),
        (dict(n_views=4.0), "n_views"),
        (dict(image_size=0), "image_size"),
        (dict(severity=0), "severity"),
        (dict(severity=11), "severity"),
        (dict(mean=(0.5, 0.5)), "mean"),
        (dict(std=(0.5, 0.0, 0.5)), "std"),
        (dict(scale=(0.5, 0.1)), "scale"),
        (dict(scale=(0.0, 1.0)), "scale"),
        (dict(scale=(0.5, 1.5)), "scale"),
        (dict(ratio=(2.0, 1.0)), "ratio"),
        (dict(ratio=(-1.0, 1.0)), "ratio"),
    ],
)
def test_bad_config_raises_naming_the_field(kwargs, field):
    with pytest.raises(ValueError, match=f"ViewConfig.{field}"):
        ViewConfig(**kwargs)


def test_config_coerces_sequences_and_defaults():
    cfg = ViewConfig(mean=[0.5, 0.5, 0.5], scale=[0.5, 1])
    assert cfg.mean == (0.5, 0.5, 0.5) and cfg.scale == (0.5, 1.0)
    assert ViewConfig().n_views == 64 and ViewConfig().policy in VIEW_POLICIES
    hash(cfg)  # frozen and hashable


def test_bad_seed_raises():
    with pytest.raises(ValueError, match="seed"):
        make_views(_noise_image(8, 8), _small("rrc_flip"), seed=1.5)  # type: ignore[arg-type]


def test_view_seed_is_stable_and_distinguishes_parts():
    s = view_seed(0, "imagenet_a", 17)
    assert s == view_seed(0, "imagenet_a", 17)
    assert 0 <= s < 2**63
    assert s == 2539512146239708544  # pinned: must not change across runs or Python versions
    others = {view_seed(0, "imagenet_a", 18), view_seed(1, "imagenet_a", 17), view_seed("0", "imagenet_a", 17),
              view_seed(0, "imagenet_a17"), view_seed(17, "imagenet_a", 0), view_seed()}
    assert s not in others and len(others) == 6
    with pytest.raises(ValueError):
        view_seed(1.0)  # type: ignore[arg-type]


# ---------------------------------------------------------------------------------------------
# random resized crop


def test_box_sampler_respects_bounds():
    h, w, scale, ratio = 375, 500, (0.08, 1.0), (3 / 4, 4 / 3)
    boxes = V._sample_boxes(4000, h, w, scale, ratio, torch.Generator().manual_seed(0))
    top, left, bh, bw = boxes.T.double()
    assert boxes.dtype == torch.int64
    assert (top >= 0).all() and (left >= 0).all() and (bh >= 1).all() and (bw >= 1).all()
    assert (top + bh <= h).all() and (left + bw <= w).all()
    area = bh * bw / (h * w)
    # w, h are rounded to integers, which moves area and ratio slightly past the bounds
    assert area.min() >= scale[0] * 0.95 and area.max() <= scale[1]
    r = bw / bh
    assert r.min() >= ratio[0] * 0.98 and r.max() <= ratio[1] * 1.02
    assert top.max() > 100 and left.max() > 100  # positions are spread, not always centred


def test_box_sampler_matches_torchvision_distribution():
    h, w = 375, 500
    ours = V._sample_boxes(3000, h, w, (0.08, 1.0), (3 / 4, 4 / 3), torch.Generator().manual_seed(0)).double()
    torch.manual_seed(0)
    ref = torch.tensor(
        [RandomResizedCrop.get_params(torch.empty(1, h, w), [0.08, 1.0], [3 / 4, 4 / 3]) for _ in range(3000)]
    ).double()
    for col in range(4):  # top, left, h, w
        assert abs(ours[:, col].mean() - ref[:, col].mean()) < 0.06 * ref[:, col].mean()
        assert abs(ours[:, col].std() - ref[:, col].std()) < 0.1 * ref[:, col].std()


def test_box_sampler_fallback_is_torchvision_center_crop():
    # area >= 0.9 * 10 * 1000 with ratio <= 4/3 needs h >= 82 > 10: every try fails
    boxes = V._sample_boxes(5, 10, 1000, (0.9, 1.0), (3 / 4, 4 / 3), torch.Generator().manual_seed(0))
    assert boxes.tolist() == [[0, 493, 10, 13]] * 5
    tall = V._sample_boxes(3, 1000, 10, (0.9, 1.0), (3 / 4, 4 / 3), torch.Generator().manual_seed(0))
    assert tall.tolist() == [[493, 0, 13, 10]] * 3


def test_crop_resize_matches_torchvision_resized_crop_on_smooth_image():
    img = _smooth_image(120, 160)
    boxes = torch.tensor([[0, 0, 120, 160], [10, 20, 40, 30], [50, 60, 70, 90], [100, 150, 20, 10]])
    ours = V._crop_resize(img, boxes, 48).float()
    for k, (t, l, bh, bw) in enumerate(boxes.tolist()):
        ref = TF.resized_crop(img, t, l, bh, bw, [48, 48], antialias=True).float()
        assert (ours[k] - ref).abs().mean() < 1.5  # box (roi_align) vs triangle filter; ~8 grey/px gradients


# ---------------------------------------------------------------------------------------------
# AugMix ops


def test_batched_equalize_matches_per_image_torchvision():
    x = torch.stack([_noise_image(16, 16, s) for s in range(4)] + [_smooth_image(16, 16, 9)])
    x[1] = 7  # constant image: identity
    x[2] = torch.where(x[2] > 128, 200, 50).to(torch.uint8)  # two grey levels
    ours = V._equalize(x, torch.zeros(5))
    assert torch.equal(ours, torch.stack([TF.equalize(xi) for xi in x]))


def _pil_op(img: torch.Tensor, name: str, level: float, sign: int) -> torch.Tensor:
    """The AugMix op as TPT's data/augmix_ops.py semantics define it, on a PIL image."""
    size = img.shape[-1]
    pil = Image.fromarray(img.permute(1, 2, 0).numpy())
    affine = {
        "shear_x": (1, level * 0.3 / 10 * sign, 0, 0, 1, 0),
        "shear_y": (1, 0, 0, level * 0.3 / 10 * sign, 1, 0),
        "translate_x": (1, 0, int(level * size / 3 / 10) * sign, 0, 1, 0),
        "translate_y": (1, 0, 0, 0, 1, int(level * size / 3 / 10) * sign),
    }
    if name in affine:
        out = pil.transform((size, size), Image.AFFINE, affine[name], resample=Image.BILINEAR)
    elif name == "rotate":
        out = pil.rotate(int(level * 30 / 10) * sign, resample=Image.BILINEAR)
    elif name == "posterize":
        out = ImageOps.posterize(pil, 4 - int(level * 4 / 10))
    elif name == "solarize":
        out = ImageOps.solarize(pil, 256 - int(level * 256 / 10))
    else:
        out = getattr(ImageOps, name)(pil)
    return torch.from_numpy(np.array(out)).permute(2, 0, 1)


def test_chain_step_ops_match_pil_semantics():
    """Every op, batched in one chain step, matches the PIL reference within 1 grey level."""
    img = _smooth_image(40, 40)
    cases = [(name, level, sign) for name in V.AUGMIX_OPS for level, sign in ((0.6, 1), (0.95, -1), (7.5, 1))]
    ops = torch.tensor([V._OP[name] for name, _, _ in cases])
    levels = torch.tensor([c[1] for c in cases], dtype=torch.float64)
    signs = torch.tensor([float(c[2]) for c in cases], dtype=torch.float64)
    x = img.expand(len(cases), 3, 40, 40).contiguous()
    out = V._chain_step(x, ops, levels, signs, torch.ones(len(cases), dtype=torch.bool))
    for k, (name, level, sign) in enumerate(cases):
        diff = (out[k].int() - _pil_op(img, name, level, sign).int()).abs()
        assert diff.max() <= 1, (name, level, sign, diff.max())
        if name in ("rotate", "shear_x", "translate_y") and level > 5:
            assert not torch.equal(out[k], img)  # the op actually did something


def test_chain_step_leaves_inactive_rows_unchanged():
    x = torch.stack([_noise_image(16, 16, s) for s in range(6)])
    ops = torch.tensor([V._OP["solarize"], V._OP["rotate"], V._OP["equalize"]] * 2)
    active = torch.tensor([True, True, True, False, False, False])
    out = V._chain_step(x, ops, torch.full((6,), 9.0, dtype=torch.float64), torch.ones(6, dtype=torch.float64), active)
    assert torch.equal(out[3:], x[3:])
    assert all(not torch.equal(out[i], x[i]) for i in range(3))


def test_mix_is_linear_with_forced_weights():
    g = torch.Generator().manual_seed(0)
    x = torch.randint(0, 256, (2, 3, 8, 8), generator=g, dtype=torch.uint8)
    chains = torch.randint(0, 256, (2, 3, 3, 8, 8), generator=g, dtype=torch.uint8)
    w = torch.tensor([[1.0, 0.0, 0.0], [0.0, 1.0, 0.0]])
    torch.testing.assert_close(V._mix(x, chains, w, torch.ones(2)), x.float() / 255)
    torch.testing.assert_close(V._mix(x, chains, w, torch.zeros(2)), torch.stack([chains[0, 0], chains[1, 1]]) / 255.0)
    w = torch.tensor([[0.2, 0.3, 0.5], [1 / 3, 1 / 3, 1 / 3]])
    m = torch.tensor([0.25, 0.5])
    expected = m.view(2, 1, 1, 1) * x + (1 - m.view(2, 1, 1, 1)) * (w[:, :, None, None, None] * chains).sum(1)
    torch.testing.assert_close(V._mix(x, chains, w, m), expected / 255)
    # a convex mix stays within the per-pixel range of its inputs
    out = V._mix(x, chains, w, m) * 255
    stacked = torch.cat([x[:, None], chains], 1).float()
    assert (out >= stacked.amin(1) - 1e-3).all() and (out <= stacked.amax(1) + 1e-3).all()


def test_augmix_params_distribution():
    p = V._sample_augmix(3000, 1, torch.Generator().manual_seed(0))
    torch.testing.assert_close(p.weights.sum(1), torch.ones(3000))
    assert (p.weights >= 0).all() and abs(p.weights.mean() - 1 / 3) < 0.01
    assert 0 <= p.mix.min() and p.mix.max() < 1 and abs(p.mix.mean() - 0.5) < 0.02
    assert set(p.depth.unique().tolist()) == {1, 2, 3}
    assert set(p.ops.unique().tolist()) == set(range(len(V.AUGMIX_OPS)))
    assert p.levels.min() >= 0.1 and p.levels.max() < 1.0
    assert set(p.signs.unique().tolist()) == {-1.0, 1.0}


def test_make_views_composes_crops_then_augmix():
    """Same seed: both policies use the same crops; AugMix is drawn afterwards from the generator."""
    img = _smooth_image(60, 80)
    rrc = make_views(img, _small("rrc_flip"), seed=4)
    aug = make_views(img, _small("augmix"), seed=4)
    g = torch.Generator().manual_seed(4)
    crops = V._rrc_flip(img, 7, _small("rrc_flip"), g)
    params = V._sample_augmix(7, 1, g)
    torch.testing.assert_close(rrc[1:], _norm(crops), atol=1e-6, rtol=0)
    torch.testing.assert_close(aug[1:], _norm(V._augmix(crops, params) * 255), atol=1e-5, rtol=0)
    assert not torch.allclose(aug[1:], rrc[1:])
    # with m forced to 1 AugMix returns the crop itself, whatever the chains did
    keep = dataclasses.replace(params, mix=torch.ones(7))
    torch.testing.assert_close(V._augmix(crops, keep), crops.float() / 255)


# ---------------------------------------------------------------------------------------------
# devices and speed


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
@pytest.mark.parametrize("policy", ["rrc_flip", "augmix"])
def test_cuda_matches_cpu_and_is_deterministic(policy):
    img = _smooth_image(90, 120)
    cfg = _small(policy, n=16, size=64)
    a, b = make_views(img.cuda(), cfg, 3), make_views(img.cuda(), cfg, 3)
    assert a.is_cuda and torch.equal(a, b)
    # same random parameters; only float rounding at uint8 boundaries may differ
    assert (a.cpu() - make_views(img, cfg, 3)).abs().mean() < 1e-2


def test_timing_64_views_of_500x375_on_cpu():
    """Prints (does not assert) the time to make 64 views of a 500x375 image at S=224."""
    img = _noise_image(375, 500)
    for policy in ("rrc_flip", "augmix"):
        cfg = ViewConfig(policy=policy)
        t0 = time.perf_counter()
        out = make_views(img, cfg, 1)
        dt = time.perf_counter() - t0
        print(f"\n64 {policy} views of 500x375 at 224 on CPU ({torch.get_num_threads()} threads): {dt:.3f} s")
        assert out.shape == (64, 3, 224, 224)
