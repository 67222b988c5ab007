"""Image inputs: every accepted type and PIL mode converts; bad input fails with a clear message."""
from __future__ import annotations

import numpy as np
import pytest
import torch
from PIL import Image

from vlmtta.images import ImageLoadError, load_image


def test_types_agree(rgb_image, tmp_path):
    expected = torch.from_numpy(np.asarray(rgb_image).copy()).permute(2, 0, 1)
    path = tmp_path / "x.png"
    rgb_image.save(path)
    array = np.asarray(rgb_image)
    for image in (path, str(path), rgb_image, array, array.astype(np.float32) / 255,
                  expected, expected.float() / 255, expected[None]):
        out = load_image(image)
        assert out.dtype == torch.uint8 and out.shape == (3, 40, 52)
        assert torch.equal(out, expected), type(image)


@pytest.mark.parametrize("mode", ["L", "LA", "P", "RGBA", "CMYK", "I;16", "I", "F", "1", "YCbCr"])
def test_every_mode_converts(rgb_image, mode):
    out = load_image(rgb_image.convert(mode))
    assert out.shape == (3, 40, 52) and out.dtype == torch.uint8


def test_alpha_is_composited_on_white():
    transparent = Image.new("RGBA", (4, 4), (0, 0, 0, 0))
    assert load_image(transparent).eq(255).all()
    half = Image.new("RGBA", (2, 2), (0, 0, 0, 128))
    assert load_image(half).unique().tolist() == [127]


def _sixteen_bit(array: np.ndarray) -> Image.Image:
    image = Image.frombytes("I;16", (array.shape[1], array.shape[0]), array.astype("<u2").tobytes())
    assert image.mode == "I;16"
    return image


def test_sixteen_bit_is_rescaled():
    array = np.full((3, 3), 65535, dtype=np.uint16)
    array[0, 0] = 0
    out = load_image(_sixteen_bit(array))
    assert out[:, 0, 0].tolist() == [0, 0, 0] and out[:, 1, 1].tolist() == [255, 255, 255]
    dark = _sixteen_bit(np.full((2, 2), 257, dtype=np.uint16))
    assert load_image(dark).unique().tolist() == [1]  # 257 / 65535 * 255 = 1, not 257 / 255


def test_grayscale_array_and_one_pixel():
    assert load_image(np.zeros((1, 1), dtype=np.uint8)).shape == (3, 1, 1)
    assert load_image(Image.new("RGB", (1, 1), (10, 20, 30)))[:, 0, 0].tolist() == [10, 20, 30]


def test_missing_file(tmp_path):
    with pytest.raises(ImageLoadError, match="not found"):
        load_image(tmp_path / "nope.jpg")


def test_not_an_image(tmp_path):
    path = tmp_path / "notes.jpg"
    path.write_text("hello, I am text")
    with pytest.raises(ImageLoadError, match="not an image file"):
        load_image(path)


def test_truncated_image(rgb_image, tmp_path):
    path = tmp_path / "broken.jpg"
    rgb_image.resize((200, 200)).save(path, quality=95)
    path.write_bytes(path.read_bytes()[:600])
    with pytest.raises(ImageLoadError, match="corrupt or truncated"):
        load_image(path)


def test_directory_is_refused(tmp_path):
    with pytest.raises(ImageLoadError, match="Not a file"):
        load_image(tmp_path)


@pytest.mark.parametrize("bad, message", [
    (np.zeros((4, 4, 2), dtype=np.uint8), "1, 3 or 4 channels"),
    (np.zeros((2, 2, 2, 2, 2)), "2 or 3 dimensions"),
    (np.zeros((0, 5, 3), dtype=np.uint8), "empty"),
    (np.full((2, 2), -3.0), "Cannot interpret pixel values"),
    (np.full((2, 2), np.nan), "NaN"),
    (torch.zeros(3, 0, 4, dtype=torch.uint8), "empty"),
    (42, "Cannot use an object of type int"),
])
def test_bad_arrays(bad, message):
    with pytest.raises(ImageLoadError, match=message):
        load_image(bad)
