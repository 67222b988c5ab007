"""Augmented test-time views (TPT-style), made in batch as tensors on the image's device.

A test image becomes ``n_views`` inputs: view 0 is the original (shorter side resized to S with
bicubic + center crop S), the rest are random-resized crops of the full-resolution image with a
random horizontal flip ("rrc_flip", TPT's ImageNet setting), optionally followed by AugMix
("augmix", TPT's fine-grained setting). All views are made with batched tensor ops, never one PIL
image at a time. Random parameters are drawn from a CPU ``torch.Generator`` seeded by ``seed`` and
then moved to the device, so CPU and CUDA use identical parameters.

Intermediate images are kept as uint8, like the 8-bit PIL images of the reference code, so that
AugMix's integer ops (equalize, posterize, solarize, autocontrast) see the same kind of input.
"""

from __future__ import annotations

import hashlib
import math
from dataclasses import dataclass
from typing import Sequence

import torch
import torch.nn.functional as F
from torchvision.ops import roi_align
from torchvision.transforms import InterpolationMode
from torchvision.transforms.v2 import functional as TF

__all__ = ["VIEW_POLICIES", "AUGMIX_OPS", "ViewConfig", "make_views", "original_view", "view_seed"]

VIEW_POLICIES = ("none", "rrc_flip", "augmix")
AUGMIX_OPS = (
    "autocontrast", "equalize", "posterize", "rotate", "solarize",
    "shear_x", "shear_y", "translate_x", "translate_y",
)  # the AugMix list without ImageNet-C overlaps (color, contrast, brightness, sharpness)
_OP = {name: k for k, name in enumerate(AUGMIX_OPS)}
_GEOMETRIC_OPS = ("rotate", "shear_x", "shear_y", "translate_x", "translate_y")
_N_CHAINS = 3  # AugMix width
_MAX_DEPTH = 3  # chain depth is uniform in {1, 2, 3}
_RRC_TRIES = 10  # torchvision RandomResizedCrop attempts before the center-crop fallback


@dataclass(frozen=True)
class ViewConfig:
    """How to make the test views of one image."""

    n_views: int = 64  # total inputs including the original
    policy: str = "rrc_flip"  # one of VIEW_POLICIES; "none" => only the original
    image_size: int = 224
    mean: tuple[float, float, float] = (0.48145466, 0.4578275, 0.40821073)  # CLIP
    std: tuple[float, float, float] = (0.26862954, 0.26130258, 0.27577711)
    scale: tuple[float, float] = (0.08, 1.0)
    ratio: tuple[float, float] = (3 / 4, 4 / 3)
    severity: int = 1  # AugMix severity

    def __post_init__(self) -> None:
        """Validate fields and coerce sequences to float tuples."""
        _check_int("n_views", self.n_views, 1)
        if self.policy not in VIEW_POLICIES:
            raise ValueError(f"ViewConfig.policy must be one of {VIEW_POLICIES}, got {self.policy!r}")
        if self.policy == "none" and self.n_views != 1:
            raise ValueError(f"ViewConfig.n_views must be 1 when policy='none', got {self.n_views}")
        _check_int("image_size", self.image_size, 1)
        _check_int("severity", self.severity, 1, 10)
        object.__setattr__(self, "mean", _float_tuple("mean", self.mean, 3))
        object.__setattr__(self, "std", _float_tuple("std", self.std, 3, positive=True))
        scale = _float_tuple("scale", self.scale, 2, positive=True)
        if not scale[0] <= scale[1] <= 1.0:
            raise ValueError(f"ViewConfig.scale must satisfy 0 < lo <= hi <= 1, got {scale}")
        ratio = _float_tuple("ratio", self.ratio, 2, positive=True)
        if not ratio[0] <= ratio[1]:
            raise ValueError(f"ViewConfig.ratio must satisfy 0 < lo <= hi, got {ratio}")
        object.__setattr__(self, "scale", scale)
        object.__setattr__(self, "ratio", ratio)


def _check_int(name: str, value: object, lo: int, hi: int | None = None) -> None:
    """Raise ValueError unless value is an int in [lo, hi]."""
    ok = isinstance(value, int) and not isinstance(value, bool) and value >= lo
    if not ok or (hi is not None and value > hi):
        bound = f">= {lo}" if hi is None else f"in [{lo}, {hi}]"
        raise ValueError(f"ViewConfig.{name} must be an int {bound}, got {value!r}")


def _float_tuple(name: str, value: object, n: int, positive: bool = False) -> tuple[float, ...]:
    """Coerce a length-n sequence of finite (optionally positive) numbers to a float tuple."""
    try:
        out = tuple(float(v) for v in value)  # type: ignore[union-attr]
    except (TypeError, ValueError):
        out = ()
    if len(out) != n or not all(math.isfinite(v) and (v > 0 or not positive) for v in out):
        kind = "positive finite numbers" if positive else "finite numbers"
        raise ValueError(f"ViewConfig.{name} must be {n} {kind}, got {value!r}")
    return out


def _check_image(image: object) -> None:
    """Raise ValueError unless image is a uint8 tensor [3, H, W] with H, W >= 1."""
    if not isinstance(image, torch.Tensor):
        raise ValueError(f"image must be a torch.Tensor, got {type(image).__name__}")
    if image.dtype != torch.uint8 or image.ndim != 3 or image.shape[0] != 3 or image.numel() == 0:
        raise ValueError(
            f"image must be a uint8 tensor of shape [3, H, W] with H, W >= 1, "
            f"got dtype={image.dtype}, shape={tuple(image.shape)}"
        )


def view_seed(*parts: int | str) -> int:
    """Stable 63-bit seed derived from parts (e.g. seed, dataset, index) via SHA-256."""
    tokens = []
    for p in parts:
        if isinstance(p, bool) or not isinstance(p, (int, str)):
            raise ValueError(f"view_seed parts must be int or str, got {type(p).__name__}: {p!r}")
        tokens.append(f"{'i' if isinstance(p, int) else 's'}{len(str(p))}:{p}")
    digest = hashlib.sha256("|".join(tokens).encode("utf-8")).digest()
    return int.from_bytes(digest[:8], "big") & ((1 << 63) - 1)


def _generator(seed: int) -> torch.Generator:
    """CPU generator seeded with seed (any Python int, reduced mod 2**64)."""
    if isinstance(seed, bool) or not isinstance(seed, int):
        raise ValueError(f"seed must be an int, got {type(seed).__name__}: {seed!r}")
    return torch.Generator(device="cpu").manual_seed(seed % (1 << 64))


def _to_device(t: torch.Tensor, device: torch.device) -> torch.Tensor:
    """Copy a small CPU tensor to device; on CUDA via pinned memory, so the host does not sync."""
    if device.type != "cuda":
        return t.to(device)
    return t.pin_memory().to(device, non_blocking=True)


def _normalize(x: torch.Tensor, mean: Sequence[float], std: Sequence[float]) -> torch.Tensor:
    """Normalise float [N,3,S,S] images in [0,1] per channel."""
    m, s = _to_device(torch.tensor([mean, std], dtype=torch.float32), x.device).view(2, 1, 3, 1, 1)
    return (x - m) / s


def _resize_center_crop(image: torch.Tensor, size: int) -> torch.Tensor:
    """uint8 [3,H,W] -> uint8 [3,S,S]: shorter side to S (bicubic, antialias), center crop S."""
    resized = TF.resize(image, [size], interpolation=InterpolationMode.BICUBIC, antialias=True)
    return TF.center_crop(resized, [size, size])


def original_view(
    image: torch.Tensor, image_size: int, mean: Sequence[float], std: Sequence[float]
) -> torch.Tensor:
    """The unaugmented view: bicubic resize + center crop + normalise, float32 [1,3,S,S]."""
    _check_image(image)
    _check_int("image_size", image_size, 1)
    x = _resize_center_crop(image, image_size)[None].float().div_(255.0)
    return _normalize(x, _float_tuple("mean", mean, 3), _float_tuple("std", std, 3, positive=True))


# ----------------------------------------------------------------------------------------------
# Random resized crop + flip


def _sample_boxes(
    n: int, height: int, width: int, scale: Sequence[float], ratio: Sequence[float],
    gen: torch.Generator,
) -> torch.Tensor:
    """torchvision RandomResizedCrop boxes for n views at once: int64 [n,4] = (top, left, h, w)."""
    area = float(height * width)
    f64 = dict(dtype=torch.float64)
    target = torch.empty(n, _RRC_TRIES, **f64).uniform_(scale[0], scale[1], generator=gen) * area
    log_r = torch.empty(n, _RRC_TRIES, **f64).uniform_(
        math.log(ratio[0]), math.log(ratio[1]), generator=gen
    )
    aspect = log_r.exp()
    w = torch.round(torch.sqrt(target * aspect))  # round-half-even, like Python's round()
    h = torch.round(torch.sqrt(target / aspect))
    ok = (w > 0) & (w <= width) & (h > 0) & (h <= height)
    first = ok.to(torch.uint8).argmax(dim=1, keepdim=True)  # first successful try
    found = ok.any(dim=1)
    fb_h, fb_w = _fallback_hw(height, width, ratio)
    h = torch.where(found, h.gather(1, first).squeeze(1), float(fb_h))
    w = torch.where(found, w.gather(1, first).squeeze(1), float(fb_w))
    u = torch.rand(n, 2, generator=gen, **f64)
    top = torch.where(found, (u[:, 0] * (height - h + 1)).floor(), float((height - fb_h) // 2))
    left = torch.where(found, (u[:, 1] * (width - w + 1)).floor(), float((width - fb_w) // 2))
    return torch.stack([top, left, h, w], dim=1).long()


def _fallback_hw(height: int, width: int, ratio: Sequence[float]) -> tuple[int, int]:
    """torchvision's fallback: central crop with the aspect ratio clamped into ratio."""
    in_ratio = width / height
    if in_ratio < min(ratio):
        return max(1, int(round(width / min(ratio)))), width
    if in_ratio > max(ratio):
        return height, max(1, int(round(height * max(ratio))))
    return height, width


def _crop_resize(image: torch.Tensor, boxes: torch.Tensor, size: int) -> torch.Tensor:
    """Crop all boxes (top, left, h, w) of uint8 [3,H,W] and resize each to S x S, uint8 [n,3,S,S].

    Uses torchvision.ops.roi_align (aligned=True, adaptive sampling_ratio) rather than
    grid_sample: each output pixel averages ceil(crop/S)^2 bilinear samples over its footprint,
    so large crops are box-filtered (antialiased, close to PIL's antialiased bilinear resize used
    by torchvision's RandomResizedCrop on PIL images) instead of aliased, while upscaled small
    crops reduce to plain bilinear interpolation at pixel centres. One call handles all boxes.
    """
    b = boxes.to(device=image.device, dtype=torch.float32)
    top, left, h, w = b.unbind(dim=1)
    rois = torch.stack([torch.zeros_like(top), left, top, left + w, top + h], dim=1)
    out = roi_align(
        image[None].float(), rois, output_size=(size, size), spatial_scale=1.0,
        sampling_ratio=-1, aligned=True,
    )
    return out.round_().clamp_(0, 255).to(torch.uint8)


def _rrc_flip(image: torch.Tensor, n: int, config: ViewConfig, gen: torch.Generator) -> torch.Tensor:
    """n random-resized crops of the full image, each flipped with probability 1/2, uint8."""
    boxes = _sample_boxes(n, image.shape[1], image.shape[2], config.scale, config.ratio, gen)
    flip = torch.rand(n, generator=gen) < 0.5
    params = _to_device(torch.cat([boxes, flip[:, None].long()], dim=1), image.device)
    x = _crop_resize(image, params[:, :4], config.image_size)
    return torch.where(params[:, 4].bool().view(n, 1, 1, 1), x.flip(-1), x)


# ----------------------------------------------------------------------------------------------
# AugMix


@dataclass(frozen=True)
class _AugMixParams:
    """Random AugMix parameters for n views (all on the CPU)."""

    weights: torch.Tensor  # [n, 3] float32, Dirichlet(1, 1, 1) chain weights
    mix: torch.Tensor  # [n] float32, Beta(1, 1) weight of the un-augmented crop
    depth: torch.Tensor  # [n, 3] int64 in {1, 2, 3}
    ops: torch.Tensor  # [n, 3, 3] int64 index into AUGMIX_OPS (view, chain, step)
    levels: torch.Tensor  # [n, 3, 3] float64, uniform in [0.1, severity)
    signs: torch.Tensor  # [n, 3, 3] float64 in {-1, +1}


def _sample_augmix(n: int, severity: int, gen: torch.Generator) -> _AugMixParams:
    """Draw the AugMix parameters of n views from gen."""
    shape = (n, _N_CHAINS, _MAX_DEPTH)
    gamma = torch.empty(n, _N_CHAINS, dtype=torch.float64).exponential_(generator=gen)
    weights = (gamma / gamma.sum(dim=1, keepdim=True)).float()  # Dirichlet(1,1,1)
    mix = torch.rand(n, generator=gen)  # Beta(1, 1) == Uniform(0, 1)
    depth = torch.randint(1, _MAX_DEPTH + 1, (n, _N_CHAINS), generator=gen)
    ops = torch.randint(0, len(AUGMIX_OPS), shape, generator=gen)
    levels = torch.empty(shape, dtype=torch.float64).uniform_(0.1, float(severity), generator=gen)
    signs = torch.where(torch.rand(shape, generator=gen) < 0.5, 1.0, -1.0).double()
    return _AugMixParams(weights, mix, depth, ops, levels, signs)


def _augmix(x: torch.Tensor, p: _AugMixParams) -> torch.Tensor:
    """AugMix on uint8 crops [n,3,S,S] -> float [n,3,S,S] in [0,1]."""
    n = x.shape[0]
    chains = x.repeat_interleave(_N_CHAINS, dim=0)  # [n*3, 3, S, S], view-major
    ops, levels, signs = (t.reshape(n * _N_CHAINS, _MAX_DEPTH) for t in (p.ops, p.levels, p.signs))
    depth = p.depth.reshape(n * _N_CHAINS)
    for step in range(_MAX_DEPTH):
        chains = _chain_step(chains, ops[:, step], levels[:, step], signs[:, step], depth > step)
    chains = chains.view(n, _N_CHAINS, *x.shape[1:])
    wm = _to_device(torch.cat([p.weights, p.mix[:, None]], dim=1), x.device)
    return _mix(x, chains, wm[:, :_N_CHAINS], wm[:, _N_CHAINS])


def _mix(x: torch.Tensor, chains: torch.Tensor, weights: torch.Tensor, m: torch.Tensor) -> torch.Tensor:
    """m * x + (1 - m) * sum_i w_i * chain_i on [0,1] floats; x uint8 [n,C,S,S], chains [n,k,C,S,S]."""
    mixed = torch.zeros(x.shape, dtype=torch.float32, device=x.device)
    for i in range(chains.shape[1]):
        mixed.add_(chains[:, i].float() * weights[:, i].view(-1, 1, 1, 1))
    m = m.view(-1, 1, 1, 1)
    return (m * x.float() + (1 - m) * mixed).div_(255.0)


def _chain_step(
    x: torch.Tensor, ops: torch.Tensor, levels: torch.Tensor, signs: torch.Tensor,
    active: torch.Tensor,
) -> torch.Tensor:
    """Apply one chain step to uint8 images [B,3,S,S]: row b gets AUGMIX_OPS[ops[b]] if active[b].

    ops/levels/signs/active are CPU tensors of length B. Each op runs once, batched, on the rows
    that drew it (all geometric ops share one grid_sample). Row indices and op parameters are
    worked out on the CPU and sent to the device in two transfers.
    """
    groups = []
    for fn, mask, param in _step_groups(ops, levels, signs, active, x.shape[-1]):
        if mask.any():
            groups.append((fn, mask.nonzero().squeeze(1), param[mask].float()))
    if not groups:
        return x
    rows = _to_device(torch.cat([g[1] for g in groups]), x.device).split([len(g[1]) for g in groups])
    flat = _to_device(torch.cat([g[2].reshape(-1) for g in groups]), x.device)
    params = flat.split([g[2].numel() for g in groups])
    out = x.clone()
    for (fn, _, cpu_param), r, q in zip(groups, rows, params):
        out[r] = fn(x[r], q.view(cpu_param.shape))
    return out


def _step_groups(
    ops: torch.Tensor, levels: torch.Tensor, signs: torch.Tensor, active: torch.Tensor, size: int
) -> list[tuple]:
    """(batched op, CPU row mask, CPU per-row parameter) for each op kind of one chain step."""
    is_geo = torch.zeros_like(active)
    for name in _GEOMETRIC_OPS:
        is_geo |= ops == _OP[name]
    groups = [(_affine, active & is_geo, _affine_theta(ops, levels, signs, size))]
    for name, (fn, param) in _POINT_OPS.items():
        groups.append((fn, active & (ops == _OP[name]), param(levels)))
    return groups


def _affine_theta(ops: torch.Tensor, levels: torch.Tensor, signs: torch.Tensor, size: int) -> torch.Tensor:
    """Per-row output->input affine matrices [B,2,3] (normalised coords) of the geometric ops.

    Matches PIL semantics of the AugMix ops on an S x S image: rotate turns counter-clockwise
    about the centre by int(3 * level) degrees; shear/translate use PIL's AFFINE data
    (1, s, 0, 0, 1, 0) etc., i.e. shear about the top-left corner and translate by
    int(level * S / 30) pixels, with a random sign. Assumes the square S x S canvas of the views.
    """
    def only(name: str, value: torch.Tensor) -> torch.Tensor:
        return torch.where(ops == _OP[name], value, 0.0)

    phi = only("rotate", -torch.deg2rad((levels * 30 / 10).floor() * signs))
    cos, sin = phi.cos(), phi.sin()
    shear = levels * 0.3 / 10 * signs  # x_in = x + s * y in pixel coords (shear_x)
    shx, shy = only("shear_x", shear), only("shear_y", shear)
    shift = (levels * (size / 3) / 10).floor() * signs * (2.0 / size)
    tx, ty = only("translate_x", shift), only("translate_y", shift)
    rows = [torch.stack([cos, sin + shx, shx + tx], 1), torch.stack([-sin + shy, cos, shy + ty], 1)]
    return torch.stack(rows, 1).float()


def _affine_grid(theta: torch.Tensor, height: int, width: int) -> torch.Tensor:
    """F.affine_grid(align_corners=False) by broadcasting (about 2x faster than its bmm on CPU)."""
    def lin(n: int) -> torch.Tensor:
        return (torch.arange(n, dtype=torch.float32, device=theta.device) * 2 + 1) / n - 1

    gx, gy = lin(width).view(1, 1, width), lin(height).view(1, height, 1)
    t = theta[:, :, :, None, None]  # [B, 2, 3, 1, 1]
    return torch.stack([t[:, i, 0] * gx + t[:, i, 1] * gy + t[:, i, 2] for i in (0, 1)], dim=-1)


def _affine(x: torch.Tensor, theta: torch.Tensor) -> torch.Tensor:
    """Batched bilinear affine warp of uint8 [B,3,S,S] with per-image theta, zero fill, uint8.

    Like PIL's BILINEAR transform: a sample point inside the image is interpolated with edge
    clamping; one outside it gives 0 (hard edge, no half-pixel fade); the result is truncated.
    """
    grid = _affine_grid(theta, x.shape[-2], x.shape[-1])
    out = F.grid_sample(x.float(), grid, mode="bilinear", padding_mode="border", align_corners=False)
    inside = ((grid >= -1) & (grid < 1)).all(dim=-1).unsqueeze(1)
    # PIL truncates its bilinear result to 8 bits; the epsilon absorbs float32 error (e.g. 99.99998
    # for an integer shift that should give exactly 100).
    return out.mul_(inside).add_(1e-3).floor_().clamp_(0, 255).to(torch.uint8)


def _autocontrast(x: torch.Tensor, unused: torch.Tensor) -> torch.Tensor:
    """Per-image, per-channel min/max stretch (PIL ImageOps.autocontrast, cutoff 0)."""
    return TF.autocontrast(x)


def _equalize(x: torch.Tensor, unused: torch.Tensor) -> torch.Tensor:
    """Per-image, per-channel histogram equalisation with PIL's LUT rule, batched.

    torchvision's v2 kernel is already vectorised over leading dims (one scatter_add histogram
    per image-channel, cumsum LUT, gather), so the whole batch is a single call.
    """
    return TF.equalize(x)


def _posterize(x: torch.Tensor, keep_mask: torch.Tensor) -> torch.Tensor:
    """AND each image with its bit mask (per-row values in 0..255)."""
    return x & keep_mask.to(torch.uint8).view(-1, 1, 1, 1)


def _solarize(x: torch.Tensor, threshold: torch.Tensor) -> torch.Tensor:
    """Invert the pixels >= each image's threshold."""
    return torch.where(x >= threshold.view(-1, 1, 1, 1), 255 - x, x)


def _posterize_mask(levels: torch.Tensor) -> torch.Tensor:
    """AugMix posterize keeps the top 4 - int(0.4 * level) bits."""
    bits = 4 - (levels * 4 / 10).floor().long()
    return (0xFF << (8 - bits)) & 0xFF


def _solarize_threshold(levels: torch.Tensor) -> torch.Tensor:
    """AugMix solarize inverts pixels >= 256 - int(25.6 * level)."""
    return 256 - (levels * 256 / 10).floor()


_POINT_OPS = {  # op name -> (batched op, per-row parameter from level)
    "autocontrast": (_autocontrast, torch.zeros_like),
    "equalize": (_equalize, torch.zeros_like),
    "posterize": (_posterize, _posterize_mask),
    "solarize": (_solarize, _solarize_threshold),
}


# ----------------------------------------------------------------------------------------------


def make_views(image: torch.Tensor, config: ViewConfig, seed: int) -> torch.Tensor:
    """All test views of one uint8 [3,H,W] image: float32 [n_views,3,S,S], view 0 = original."""
    _check_image(image)
    if not isinstance(config, ViewConfig):
        raise ValueError(f"config must be a ViewConfig, got {type(config).__name__}")
    gen = _generator(seed)
    orig = _resize_center_crop(image, config.image_size)[None].float().div_(255.0)
    n_aug = config.n_views - 1
    if n_aug == 0:
        return _normalize(orig, config.mean, config.std)
    crops = _rrc_flip(image, n_aug, config, gen)
    if config.policy == "augmix":
        views = _augmix(crops, _sample_augmix(n_aug, config.severity, gen))
    else:
        views = crops.float().div_(255.0)
    return _normalize(torch.cat([orig, views]), config.mean, config.std)
