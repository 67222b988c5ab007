"""Property-based tests of image loading: every dtype, shape, range and PIL mode, against reference formulas."""
from __future__ import annotations

import math
import warnings

import numpy as np
import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from hypothesis.extra.numpy import arrays
from PIL import Image

from vlmtta.images import FLOAT_TOLERANCE, ImageLoadError, capped_size, load_image

SETTINGS = settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.too_slow])
sides = st.integers(1, 12)
shapes = st.one_of(st.tuples(sides, sides), st.tuples(sides, sides, st.sampled_from([1, 3, 4])))


def reference(unit: np.ndarray) -> np.ndarray:
    """uint8 [3, H, W] from values in [0, 1] of shape HxW or HxWxC: alpha on white, grey replicated."""
    unit = unit.astype(np.float64)
    if unit.ndim == 2:
        unit = unit[..., None]
    if unit.shape[2] == 4:
        unit = unit[..., :3] * unit[..., 3:] + (1 - unit[..., 3:])
    unit = np.broadcast_to(unit, unit.shape[:2] + (3,)) if unit.shape[2] == 1 else unit
    return np.clip(np.round(unit * 255), 0, 255).astype(np.uint8).transpose(2, 0, 1)


def check(image, expected: np.ndarray) -> None:
    out = load_image(image, max_pixels=None)
    assert out.dtype == torch.uint8 and tuple(out.shape) == expected.shape
    assert np.abs(out.numpy().astype(int) - expected.astype(int)).max() <= 1  # float32 vs float64 rounding


@SETTINGS
@given(arrays(np.uint8, shapes))
def test_uint8_arrays_and_tensors(array):
    expected = reference(array / 255)
    assert np.array_equal(load_image(array).numpy(), expected)
    if array.ndim == 3:
        assert np.array_equal(load_image(torch.from_numpy(array).permute(2, 0, 1)).numpy(), expected)


@SETTINGS
@given(st.sampled_from([np.float16, np.float32, np.float64]), shapes, st.data())
def test_floats_in_unit_range(dtype, shape, data):
    array = data.draw(arrays(dtype, shape, elements=st.floats(0, 1, width=np.finfo(dtype).bits)))
    check(array, reference(array))


@SETTINGS
@given(shapes, st.floats(FLOAT_TOLERANCE / 100, FLOAT_TOLERANCE), st.booleans())
def test_floats_slightly_out_are_clipped_with_a_warning(shape, excess, above):
    array = np.full(shape, 0.25)
    array.flat[0] = 1 + excess if above else -excess
    with pytest.warns(UserWarning, match="slightly outside"):
        out = load_image(array)
    assert np.array_equal(out.numpy(), reference(np.clip(array, 0, 1)))


@SETTINGS
@given(shapes, st.floats(FLOAT_TOLERANCE * 1.01, 1e6), st.booleans())
def test_floats_further_out_are_refused(shape, excess, above):
    array = np.full(shape, 0.25, dtype=np.float32)
    array.flat[0] = 1 + excess if above else -excess
    with pytest.raises(ImageLoadError, match="must lie in \\[0, 1\\]"):
        load_image(array)


@SETTINGS
@given(st.sampled_from([np.int8, np.int16, np.int32, np.int64, np.uint32, np.uint64]), shapes, st.data())
def test_other_integers_are_eight_bit(dtype, shape, data):
    array = data.draw(arrays(dtype, shape, elements=st.integers(0, min(255, np.iinfo(dtype).max))))
    assert np.array_equal(load_image(array).numpy(), reference(array / 255))
    bad = array.copy()
    bad.flat[0] = np.iinfo(dtype).min if np.iinfo(dtype).min < 0 else 256
    if np.iinfo(dtype).max > 255 or np.iinfo(dtype).min < 0:
        with pytest.raises(ImageLoadError, match="0..255"):
            load_image(bad)


@SETTINGS
@given(arrays(np.uint16, shapes))
def test_uint16_is_sixteen_bit(array):
    check(array, reference(array / 65535))


@SETTINGS
@given(arrays(np.bool_, shapes))
def test_bool_is_black_and_white(array):
    assert np.array_equal(load_image(array).numpy(), reference(array.astype(float)))


@SETTINGS
@given(st.sampled_from(["1", "L", "LA", "P", "RGB", "RGBA", "CMYK", "YCbCr", "I", "F", "I;16", "HSV"]),
       st.tuples(sides, sides), st.integers(0, 2**32 - 1))
def test_every_pil_mode(mode, size, seed):
    rgb = Image.fromarray(np.random.default_rng(seed).integers(0, 256, size + (3,), dtype=np.uint8))
    image = rgb.convert(mode) if mode != "HSV" else rgb.convert("HSV")
    out = load_image(image)
    assert out.dtype == torch.uint8 and tuple(out.shape) == (3,) + size
    if mode == "RGB":
        assert np.array_equal(out.numpy(), np.asarray(rgb).transpose(2, 0, 1))
    if mode in ("L", "I", "F"):  # the 0..255 scale of L (F holds unrounded luminance: within one level)
        grey = np.asarray(rgb.convert("L")).astype(int)
        assert all(np.abs(channel - grey).max() <= (mode == "F") for channel in out.numpy().astype(int))


@SETTINGS
@given(st.integers(1, 5000), st.integers(1, 5000), st.integers(1, 10**7))
def test_capped_size(width, height, max_pixels):
    new_w, new_h = capped_size(width, height, max_pixels)
    assert new_w * new_h <= max(max_pixels, 1) and 1 <= new_w <= width and 1 <= new_h <= height
    if width * height <= max_pixels:
        assert (new_w, new_h) == (width, height)
    elif min(new_w, new_h) > 1:  # aspect ratio kept up to the flooring of each side
        assert abs(new_w / new_h - width / height) <= width / height * (1 / new_w + 1 / new_h) + 1e-9
        assert (new_w + 1) * (new_h + 1) > max_pixels  # and not smaller than needed


@SETTINGS
@given(st.tuples(st.integers(2, 40), st.integers(2, 40)), st.integers(1, 800))
def test_load_image_respects_the_cap(size, max_pixels):
    array = np.full(size + (3,), 77, dtype=np.uint8)
    for image in (array, Image.fromarray(array)):
        with warnings.catch_warnings():
            warnings.simplefilter("error")
            out = load_image(image, max_pixels=max_pixels)
        width, height = capped_size(size[1], size[0], max_pixels)
        assert tuple(out.shape) == (3, height, width) and out.unique().tolist() == [77]
        assert out.shape[1] * out.shape[2] <= max_pixels or math.prod(size) <= max_pixels
