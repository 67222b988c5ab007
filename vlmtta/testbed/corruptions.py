"""Image corruptions in the spirit of CIFAR-10-C (Hendrycks & Dietterich, ICLR 2019), batched on tensors.

Every corruption maps float images [N, C, H, W] in [0, 1] to the same shape and range, with a
strength parameter per severity 1..5 (``SEVERITIES``).  Random corruptions draw from a CPU
``torch.Generator`` seeded by ``seed``, so a (batch, corruption, severity, seed) always gives the
same pixels.  The strengths were chosen for the 28x28 Fashion-MNIST testbed: at severity 3 the
testbed model's zero-shot accuracy falls well below clean but stays above chance (10 %).
"""
from __future__ import annotations

import math
from typing import Callable

import torch
import torch.nn.functional as F
from torchvision.io import decode_jpeg, encode_jpeg

Corruption = Callable[[torch.Tensor, float, torch.Generator], torch.Tensor]


def gaussian_noise(x: torch.Tensor, sigma: float, gen: torch.Generator) -> torch.Tensor:
    """Additive N(0, sigma^2) noise."""
    return x + sigma * torch.randn(x.shape, generator=gen)


def shot_noise(x: torch.Tensor, photons: float, gen: torch.Generator) -> torch.Tensor:
    """Poisson photon noise: ``Poisson(x * photons) / photons`` (fewer photons = stronger)."""
    return torch.poisson(x * photons, generator=gen) / photons


def impulse_noise(x: torch.Tensor, amount: float, gen: torch.Generator) -> torch.Tensor:
    """Salt-and-pepper noise on a share ``amount`` of the pixels (same pixels in every channel)."""
    n, _, h, w = x.shape
    u = torch.rand(n, 1, h, w, generator=gen)
    salt = torch.rand(n, 1, h, w, generator=gen) < 0.5
    return torch.where(u < amount, salt.to(x.dtype), x)


def _conv(x: torch.Tensor, kernels: torch.Tensor) -> torch.Tensor:
    """Convolve each image with its own kernel (``kernels`` [N or 1, k, k]), reflect padding."""
    n, c, h, w = x.shape
    k = kernels.shape[-1]
    kernels = kernels.expand(n, k, k).repeat_interleave(c, dim=0)[:, None]
    padded = F.pad(x.reshape(1, n * c, h, w), [k // 2] * 4, mode="reflect" if k // 2 < min(h, w) else "replicate")
    return F.conv2d(padded, kernels, groups=n * c).reshape(n, c, h, w)


def gaussian_blur(x: torch.Tensor, sigma: float, gen: torch.Generator) -> torch.Tensor:
    """Gaussian blur with standard deviation ``sigma`` pixels."""
    radius = max(1, math.ceil(3 * sigma))
    t = torch.arange(-radius, radius + 1, dtype=torch.float32)
    g = torch.exp(-t ** 2 / (2 * sigma ** 2))
    kernel = g[:, None] * g[None, :]
    return _conv(x, (kernel / kernel.sum())[None])


def defocus_blur(x: torch.Tensor, radius: float, gen: torch.Generator) -> torch.Tensor:
    """Blur with an anti-aliased disk of ``radius`` pixels (an out-of-focus lens)."""
    r = math.ceil(radius)
    t = torch.arange(-r, r + 1, dtype=torch.float32)
    dist = (t[:, None] ** 2 + t[None, :] ** 2).sqrt()
    disk = (radius + 0.5 - dist).clamp(0, 1)
    return _conv(x, (disk / disk.sum())[None])


def motion_blur(x: torch.Tensor, length: float, gen: torch.Generator) -> torch.Tensor:
    """Linear motion blur over ``length`` pixels in a random direction per image."""
    r = math.ceil(length / 2)
    angle = torch.rand(x.shape[0], generator=gen) * math.pi
    t = torch.arange(-r, r + 1, dtype=torch.float32)
    yy, xx = t[:, None], t[None, :]
    dx, dy = angle.cos().view(-1, 1, 1), angle.sin().view(-1, 1, 1)
    along, across = xx * dx + yy * dy, xx * dy - yy * dx  # distance along / across the motion line
    kernel = (1 - across.abs()).clamp(min=0) * (along.abs() <= length / 2)
    return _conv(x, kernel / kernel.sum(dim=(1, 2), keepdim=True))


def contrast(x: torch.Tensor, factor: float, gen: torch.Generator) -> torch.Tensor:
    """Scale the deviation from each image's mean by ``factor`` (< 1 = less contrast)."""
    mean = x.mean(dim=(1, 2, 3), keepdim=True)
    return (x - mean) * factor + mean


def brightness(x: torch.Tensor, shift: float, gen: torch.Generator) -> torch.Tensor:
    """Add ``shift`` to every pixel (the V channel of CIFAR-10-C's HSV brightness, for grey images)."""
    return x + shift


def pixelate(x: torch.Tensor, factor: float, gen: torch.Generator) -> torch.Tensor:
    """Box-downsample to ``factor`` of the size, then nearest-neighbour upsample back."""
    h, w = x.shape[-2:]
    small = F.interpolate(x, size=(max(1, round(h * factor)), max(1, round(w * factor))), mode="area")
    return F.interpolate(small, size=(h, w), mode="nearest")


def jpeg(x: torch.Tensor, quality: float, gen: torch.Generator) -> torch.Tensor:
    """JPEG compression at ``quality`` (1-100), through torchvision's libjpeg."""
    pixels = to_uint8(x)
    grey = pixels.shape[1] == 1
    encoded = [encode_jpeg(image, quality=int(quality)) for image in pixels]
    decoded = torch.stack([decode_jpeg(data) for data in encoded])
    return decoded[:, :1].float().div(255.0) if grey else decoded.float().div(255.0)


def sketch(x: torch.Tensor, weight: float, gen: torch.Generator) -> torch.Tensor:
    """Domain shift to a pencil sketch: blend with dark Sobel edges on a white page (``weight`` = 1: sketch only)."""
    sobel = torch.tensor([[-1.0, 0.0, 1.0], [-2.0, 0.0, 2.0], [-1.0, 0.0, 1.0]])
    gx, gy = _conv(x, sobel[None]), _conv(x, sobel.t()[None])
    edges = (gx ** 2 + gy ** 2).sqrt()
    edges = edges / edges.amax(dim=(1, 2, 3), keepdim=True).clamp(min=1e-6)
    return (1 - weight) * x + weight * (1 - edges)


CORRUPTIONS: dict[str, Corruption] = {
    "gaussian_noise": gaussian_noise, "shot_noise": shot_noise, "impulse_noise": impulse_noise,
    "gaussian_blur": gaussian_blur, "defocus_blur": defocus_blur, "motion_blur": motion_blur,
    "contrast": contrast, "brightness": brightness, "pixelate": pixelate, "jpeg": jpeg, "sketch": sketch,
}
SEVERITIES: dict[str, tuple[float, ...]] = {  # chosen on 500 test images with the shipped model
    "gaussian_noise": (0.05, 0.1, 0.15, 0.2, 0.3),  # sigma
    "shot_noise": (8.0, 4.0, 2.0, 1.0, 0.5),  # photons at white (black backgrounds stay noise-free)
    "impulse_noise": (0.02, 0.05, 0.1, 0.15, 0.2),  # share of pixels
    "gaussian_blur": (1.0, 1.5, 2.0, 2.5, 3.0),  # sigma, pixels
    "defocus_blur": (1.5, 2.0, 3.0, 4.0, 5.0),  # disk radius, pixels
    "motion_blur": (4.0, 6.0, 8.0, 10.0, 14.0),  # length, pixels
    "contrast": (0.6, 0.5, 0.4, 0.3, 0.2),  # factor
    "brightness": (0.1, 0.15, 0.2, 0.3, 0.4),  # shift
    "pixelate": (0.5, 0.4, 0.3, 0.2, 0.15),  # size factor
    "jpeg": (20.0, 10.0, 6.0, 3.0, 1.0),  # quality
    "sketch": (0.05, 0.1, 0.15, 0.2, 0.3),  # weight of the sketch
}


def corruption_names() -> list[str]:
    return list(CORRUPTIONS)


def corrupt(images: torch.Tensor, name: str, severity: int = 3, seed: int = 0) -> torch.Tensor:
    """Corrupt float images [N, C, H, W] in [0, 1] (or one [C, H, W]) with ``name`` at ``severity`` 1..5."""
    if name not in CORRUPTIONS:
        raise ValueError(f"Unknown corruption {name!r}; accepted: {', '.join(CORRUPTIONS)}.")
    if isinstance(severity, bool) or severity not in (1, 2, 3, 4, 5):
        raise ValueError(f"severity must be an int in 1..5, got {severity!r}.")
    return apply(images, name, SEVERITIES[name][severity - 1], seed)


def apply(images: torch.Tensor, name: str, strength: float, seed: int = 0) -> torch.Tensor:
    """Corruption ``name`` at an explicit strength (see ``SEVERITIES`` for the scale of each)."""
    if not images.is_floating_point() or images.ndim not in (3, 4):
        raise ValueError(f"images must be float [N, C, H, W] or [C, H, W] in [0, 1], got {images.dtype} "
                         f"{tuple(images.shape)}.")
    batch = images[None] if images.ndim == 3 else images
    gen = torch.Generator().manual_seed(int(seed))
    out = CORRUPTIONS[name](batch.float().cpu(), float(strength), gen).clamp_(0.0, 1.0)
    return out[0] if images.ndim == 3 else out


def to_uint8(images: torch.Tensor) -> torch.Tensor:
    """float [0, 1] -> uint8 with rounding."""
    return images.mul(255.0).round_().clamp_(0, 255).to(torch.uint8)
