"""Turn user images (paths, PIL images, numpy arrays, tensors) into uint8 RGB tensors [3, H, W].

Every PIL mode is converted rather than refused: alpha is composited on white, palettes are
expanded, CMYK is converted to RGB, and the EXIF orientation of photos is applied.

The value range is decided by the type, never guessed from the values:

* ``uint8``: 0..255; ``uint16``: 0..65535; ``bool``: 0/1;
* other integer dtypes (int8/16/32/64, uint32/64): 0..255 (8-bit); values outside are an error;
* floating point (float16/32/64, bfloat16): [0, 1]; values out by at most ``FLOAT_TOLERANCE`` are
  clipped with a warning, values further out (e.g. 0..255 floats, mean/std-normalised images), NaN
  and infinity are an error;
* PIL images follow PIL's conventions: ``I;16*`` modes are 0..65535, ``I`` and ``F`` are on the
  0..255 scale of ``L`` (as ``Image.convert("L")`` reads them).

Images with more than ``max_pixels`` pixels (default ``DEFAULT_MAX_PIXELS``, 4096 x 4096) are
downscaled, keeping their aspect ratio, before any view is made (JPEG files are decoded at reduced
size).  Files over Pillow's decompression-bomb limit (``2 * PIL.Image.MAX_IMAGE_PIXELS``) are
refused like any unreadable image.
"""
from __future__ import annotations

import math
import warnings
from pathlib import Path
from typing import Union

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image, ImageOps, UnidentifiedImageError

ImageInput = Union[str, Path, Image.Image, np.ndarray, torch.Tensor]
ACCEPTED = "a file path, a PIL image, a numpy array (HxW, HxWx1/3/4) or a tensor (CxHxW or 1xCxHxW, C in 1/3/4)"
DEFAULT_MAX_PIXELS = 4096 * 4096  # larger images are downscaled to this many pixels before making views
ORIENTATION_TAG = 0x0112  # EXIF orientation
FLOAT_TOLERANCE = 0.05  # float pixels within [-tol, 1 + tol] are clipped to [0, 1] (with a warning)


class ImageLoadError(ValueError):
    """An image could not be read or understood."""


def load_image(image: ImageInput, max_pixels: int | None = DEFAULT_MAX_PIXELS) -> torch.Tensor:
    """Read ``image`` as a uint8 RGB tensor [3, H, W] (on the CPU, or where a uint8 RGB tensor already is).

    Images over ``max_pixels`` pixels are downscaled to at most that many (aspect ratio kept);
    ``None`` keeps every image at full size.
    """
    if max_pixels is not None and max_pixels < 1:
        raise ValueError(f"max_pixels must be a positive number of pixels or None, got {max_pixels}.")
    if isinstance(image, torch.Tensor) and image.dtype == torch.uint8 and image.ndim == 3 and image.shape[0] == 3:
        if min(image.shape[1:]) < 1:
            raise ImageLoadError(f"The image is empty ({image.shape[2]}x{image.shape[1]}).")
        return _shrink_tensor(image, max_pixels)
    if isinstance(image, (str, Path)):
        image = _open(Path(image), max_pixels)
    if isinstance(image, Image.Image):
        return _from_pil(image, max_pixels)
    if isinstance(image, (np.ndarray, torch.Tensor)):
        channels_last = isinstance(image, np.ndarray)
        pixels, full_scale = _numpy_pixels(image) if channels_last else _torch_pixels(image)
        return _shrink_tensor(_from_array(pixels, channels_last, full_scale), max_pixels)
    raise ImageLoadError(f"Cannot use an object of type {type(image).__name__} as an image; accepted: {ACCEPTED}.")


def capped_size(width: int, height: int, max_pixels: int | None) -> tuple[int, int]:
    """(width, height) scaled down, aspect ratio kept, to at most ``max_pixels`` pixels (unchanged if within)."""
    if max_pixels is None or width * height <= max_pixels:
        return width, height
    scale = math.sqrt(max_pixels / (width * height))
    new_w, new_h = max(1, math.floor(width * scale)), max(1, math.floor(height * scale))
    while new_w * new_h > max_pixels:  # only when one side was lifted to 1 pixel
        new_w, new_h = max(1, new_w - (new_w >= new_h)), max(1, new_h - (new_h > new_w))
    return new_w, new_h


def _open(path: Path, max_pixels: int | None) -> Image.Image:
    if not path.exists():
        raise ImageLoadError(f"Image file not found: {path}")
    if not path.is_file():
        raise ImageLoadError(f"Not a file: {path}")
    try:
        with Image.open(path) as handle:
            if handle.format == "JPEG":  # decode at a reduced scale (still >= the capped size) when it is huge
                handle.draft(handle.mode, capped_size(*handle.size, max_pixels))
            handle.load()  # the decoded pixels stay usable once the file is closed
            return handle if handle.mode != "P" else handle.convert("RGBA")
    except UnidentifiedImageError:
        raise ImageLoadError(f"{path} is not an image file PIL can read (JPEG, PNG, WebP, BMP, TIFF, GIF, ...).") from None
    except Image.DecompressionBombError as error:
        raise ImageLoadError(f"{path} is refused as a possible decompression bomb ({error}).") from None
    except (OSError, SyntaxError, ValueError) as error:
        raise ImageLoadError(f"{path} is corrupt or truncated and cannot be decoded: {error}") from None


def _from_pil(image: Image.Image, max_pixels: int | None) -> torch.Tensor:
    if image.width < 1 or image.height < 1:
        raise ImageLoadError(f"The image is empty ({image.width}x{image.height}).")
    image = _upright(image)
    if image.mode.startswith("I;16"):
        pixels = torch.from_numpy(np.asarray(image).astype(np.float32))
        return _shrink_tensor(_from_array(pixels, channels_last=True, full_scale=65535.0), max_pixels)
    if image.mode in ("I", "F"):
        pixels = torch.from_numpy(np.asarray(image).astype(np.float64))
        return _shrink_tensor(_from_array(pixels, channels_last=True, full_scale=255.0), max_pixels)
    if image.mode == "P":
        image = image.convert("RGBA")
    if image.mode in ("RGBA", "LA", "PA", "RGBa", "La"):
        image = _on_white(image.convert("RGBA"))
    image = image if image.mode == "RGB" else image.convert("RGB")
    size = capped_size(*image.size, max_pixels)
    if size != image.size:
        image = image.resize(size, Image.Resampling.BICUBIC, reducing_gap=3.0)
    return torch.from_numpy(np.asarray(image).copy()).permute(2, 0, 1).contiguous()


def _upright(image: Image.Image) -> Image.Image:
    """The image turned as its EXIF orientation tag says (photos from cameras and phones); never a needless copy."""
    try:
        if image.getexif().get(ORIENTATION_TAG, 1) == 1:
            return image
        return ImageOps.exif_transpose(image)
    except (OSError, SyntaxError, ValueError, KeyError, TypeError):  # unreadable EXIF: keep the pixels as stored
        return image


def _on_white(image: Image.Image) -> Image.Image:
    background = Image.new("RGBA", image.size, (255, 255, 255, 255))
    return Image.alpha_composite(background, image).convert("RGB")


def _numpy_pixels(array: np.ndarray) -> tuple[torch.Tensor, float | None]:
    """A numpy image as a tensor torch can do arithmetic on, and its full scale when the dtype fixes it."""
    kind, size = array.dtype.kind, array.dtype.itemsize
    if kind not in "buif":
        raise ImageLoadError(f"Cannot use a numpy array of dtype {array.dtype} as an image; pixels must be uint8, "
                             f"uint16, bool, integer or float (accepted: {ACCEPTED}).")
    if kind == "u" and size == 2:
        return torch.from_numpy(array.astype(np.int32)), 65535.0
    if kind == "u" and size > 2:  # uint32/64 (no torch arithmetic): 8-bit rules, checked here
        if array.size and array.max() > 255:
            raise ImageLoadError(_range_message(str(array.dtype), int(array.min()), int(array.max()), 255.0, False))
        return torch.from_numpy(array.astype(np.int64)), None
    native = np.float64 if kind == "f" and size > 8 else array.dtype.newbyteorder("=")
    return torch.from_numpy(np.array(array, dtype=native, copy=True)), None


def _torch_pixels(tensor: torch.Tensor) -> tuple[torch.Tensor, float | None]:
    """Like ``_numpy_pixels`` for tensors (torch's unsigned 16/32/64-bit types have little arithmetic)."""
    tensor = tensor.detach().cpu()
    if tensor.is_complex():
        raise ImageLoadError(f"Cannot use a tensor of dtype {tensor.dtype} as an image; pixels must be real numbers.")
    if tensor.dtype == getattr(torch, "uint16", None):
        return tensor.to(torch.int32), 65535.0
    if tensor.dtype in (getattr(torch, "uint32", None), getattr(torch, "uint64", None)):
        return _numpy_pixels(tensor.numpy())
    return tensor, None


def _from_array(array: torch.Tensor, channels_last: bool, full_scale: float | None = None) -> torch.Tensor:
    """Normalise an array of shape HxW, HxWxC (numpy) or CxHxW / 1xCxHxW (torch) to uint8 [3, H, W].

    ``full_scale``: the value of white when the source type fixes it (16-bit, PIL modes); else the dtype rules.
    """
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
    pixels = _to_unit_range(array, full_scale)
    if channels == 4:
        alpha = pixels[3:]
        pixels = pixels[:3] * alpha + (1 - alpha)
    pixels = pixels.expand(3, -1, -1) if channels == 1 else pixels[:3]
    return (pixels * 255).round().clamp(0, 255).to(torch.uint8).contiguous()


def _to_unit_range(array: torch.Tensor, full_scale: float | None = None) -> torch.Tensor:
    """Pixels as float32 in [0, 1], by the dtype rules of the module docstring."""
    if array.dtype == torch.bool:
        return array.float()
    if array.dtype == torch.uint8 and full_scale is None:
        return array.float() / 255
    is_float = array.is_floating_point()
    values = array.double()
    if is_float and not torch.isfinite(values).all():
        raise ImageLoadError("The image contains NaN or infinite values.")
    full_scale = full_scale or (1.0 if is_float else 255.0)
    low, high = values.min().item(), values.max().item()
    slack = FLOAT_TOLERANCE * full_scale if is_float else 0.0
    if low < -slack or high > full_scale + slack:
        raise ImageLoadError(_range_message(str(array.dtype).replace("torch.", ""), low, high, full_scale, is_float))
    if low < 0 or high > full_scale:
        warnings.warn(f"Pixel values in [{low:g}, {high:g}] lie slightly outside [0, {full_scale:g}]; clipped.",
                      stacklevel=4)
    return (values / full_scale).clamp(0, 1).float()


def _range_message(dtype: str, low: float, high: float, full_scale: float, is_float: bool) -> str:
    found = f"{dtype} pixel values in [{low:g}, {high:g}]"
    if full_scale == 1.0:
        hint = " (divide 0..255 values by 255, or pass uint8)" if high <= 255 and low >= 0 else \
            " (undo any mean/std normalisation first)"
        return f"{found}: float images must lie in [0, 1]{hint}."
    if full_scale == 255.0 and not is_float:
        return (f"{found}: integer images other than uint16 must lie in 0..255; pass 16-bit images as uint16 "
                "(0..65535), or floats in [0, 1].")
    return f"{found} lie outside the 0..{full_scale:g} range of this image type."


def _shrink_tensor(image: torch.Tensor, max_pixels: int | None) -> torch.Tensor:
    """A uint8 [3, H, W] image downscaled (bicubic, antialiased) to at most ``max_pixels`` pixels."""
    height, width = image.shape[1:]
    new_w, new_h = capped_size(width, height, max_pixels)
    if (new_w, new_h) == (width, height):
        return image
    small = F.interpolate(image[None].float(), size=(new_h, new_w), mode="bicubic", antialias=True, align_corners=False)
    return small[0].round().clamp(0, 255).to(torch.uint8)
