"""Turn user images (paths, PIL images, numpy arrays, tensors) into uint8 RGB tensors [3, H, W].

Every PIL mode is converted rather than refused: alpha is composited on white, palettes are
expanded, 16-bit and float images are rescaled to 8 bits, CMYK is converted to RGB.
"""
from __future__ import annotations

from pathlib import Path
from typing import Union

import numpy as np
import torch
from PIL import Image, UnidentifiedImageError

ImageInput = Union[str, Path, Image.Image, np.ndarray, torch.Tensor]
ACCEPTED = "a file path, a PIL image, a numpy array (HxW, HxWx1/3/4) or a tensor (CxHxW or 1xCxHxW, C in 1/3/4)"


class ImageLoadError(ValueError):
    """An image could not be read or understood."""


def load_image(image: ImageInput) -> torch.Tensor:
    """Read ``image`` as a uint8 RGB tensor [3, H, W] (on the CPU, or where a uint8 RGB tensor already is)."""
    if isinstance(image, torch.Tensor) and image.dtype == torch.uint8 and image.ndim == 3 and image.shape[0] == 3:
        if min(image.shape[1:]) < 1:
            raise ImageLoadError(f"The image is empty ({image.shape[2]}x{image.shape[1]}).")
        return image
    if isinstance(image, (str, Path)):
        image = _open(Path(image))
    if isinstance(image, Image.Image):
        return _from_pil(image)
    if isinstance(image, np.ndarray):
        return _from_array(torch.from_numpy(np.array(image, copy=True)), channels_last=True)
    if isinstance(image, torch.Tensor):
        return _from_array(image.detach().cpu(), channels_last=False)
    raise ImageLoadError(f"Cannot use an object of type {type(image).__name__} as an image; accepted: {ACCEPTED}.")


def _open(path: Path) -> Image.Image:
    if not path.exists():
        raise ImageLoadError(f"Image file not found: {path}")
    if not path.is_file():
        raise ImageLoadError(f"Not a file: {path}")
    try:
        with Image.open(path) as handle:
            handle.load()
            return handle.copy() if handle.mode != "P" else handle.convert("RGBA")
    except UnidentifiedImageError:
        raise ImageLoadError(f"{path} is not an image file PIL can read (JPEG, PNG, WebP, BMP, TIFF, GIF, ...).") from None
    except (OSError, SyntaxError, ValueError) as error:
        raise ImageLoadError(f"{path} is corrupt or truncated and cannot be decoded: {error}") from None


def _from_pil(image: Image.Image) -> torch.Tensor:
    if image.width < 1 or image.height < 1:
        raise ImageLoadError(f"The image is empty ({image.width}x{image.height}).")
    if image.mode.startswith("I;16"):
        pixels = torch.from_numpy(np.asarray(image).astype(np.float32))
        return _from_array(pixels, channels_last=True, full_scale=65535.0)
    if image.mode in ("I", "F"):
        return _from_array(torch.from_numpy(np.asarray(image).astype(np.float32)), channels_last=True)
    if image.mode == "P":
        image = image.convert("RGBA")
    if image.mode in ("RGBA", "LA", "PA", "RGBa", "La"):
        image = _on_white(image.convert("RGBA"))
    array = np.asarray(image.convert("RGB"))
    return torch.from_numpy(array.copy()).permute(2, 0, 1).contiguous()


def _on_white(image: Image.Image) -> Image.Image:
    background = Image.new("RGBA", image.size, (255, 255, 255, 255))
    return Image.alpha_composite(background, image).convert("RGB")


def _from_array(array: torch.Tensor, channels_last: bool, full_scale: float | None = None) -> torch.Tensor:
    """Normalise an array of shape HxW, HxWxC (numpy) or CxHxW / 1xCxHxW (torch) to uint8 [3, H, W]."""
    if array.ndim == 4 and array.shape[0] == 1:
        array = array[0]
    if array.ndim == 2:
        array = array.unsqueeze(0 if not channels_last else -1)
    if array.ndim != 3:
        raise ImageLoadError(f"Image arrays must have 2 or 3 dimensions, got shape {tuple(array.shape)}; accepted: {ACCEPTED}.")
    if channels_last:
        array = array.permute(2, 0, 1)
    channels, height, width = array.shape
    if channels not in (1, 3, 4):
        raise ImageLoadError(f"Images need 1, 3 or 4 channels, got shape {tuple(array.shape)}; accepted: {ACCEPTED}.")
    if height < 1 or width < 1:
        raise ImageLoadError(f"The image is empty ({width}x{height}).")
    pixels = array.float() / full_scale if full_scale else _to_unit_range(array)
    if channels == 4:
        alpha = pixels[3:]
        pixels = pixels[:3] * alpha + (1 - alpha)
    pixels = pixels.expand(3, -1, -1) if channels == 1 else pixels[:3]
    return (pixels * 255).round().clamp(0, 255).to(torch.uint8).contiguous()


def _to_unit_range(array: torch.Tensor) -> torch.Tensor:
    if array.dtype == torch.uint8:
        return array.float() / 255
    if array.dtype == torch.bool:
        return array.float()
    is_float = array.dtype.is_floating_point
    array = array.float()
    if not torch.isfinite(array).all():
        raise ImageLoadError("The image contains NaN or infinite values.")
    if is_float and array.min() >= 0 and array.max() <= 1:
        return array
    if array.min() >= 0 and array.max() <= 255:
        return array / 255
    if array.min() >= 0 and array.max() <= 65535:
        return array / 65535
    raise ImageLoadError(
        f"Cannot interpret pixel values in [{array.min().item():g}, {array.max().item():g}]; "
        "use uint8 (0..255), uint16 (0..65535) or floats in [0, 1]."
    )
