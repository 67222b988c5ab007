"""The on-disk cache of diffusion variations and the pre-generation pass (a fake pipeline: no diffusers needed)."""
from __future__ import annotations

from types import SimpleNamespace

import numpy as np
import pytest
import torch
from PIL import Image

from vlmtta.generation import (DiffusionViews, VariationGenerator, content_hash, generate_dataset, source_pixels,
                               view_pixels)
from vlmtta.views import original_view


class FakePipeline:
    """Solid-colour 12x12 images whose colour comes from each generator: deterministic per seed."""

    def __init__(self):
        self.generated = 0

    def __call__(self, image, num_images_per_prompt, generator, guidance_scale, num_inference_steps):
        assert isinstance(image, Image.Image) and len(generator) == num_images_per_prompt
        self.generated += num_images_per_prompt
        colours = [torch.randint(0, 256, (3,), generator=g).to(torch.uint8).numpy() for g in generator]
        return SimpleNamespace(images=[Image.fromarray(np.broadcast_to(c, (12, 12, 3)).copy()) for c in colours])


def pixels(seed: int = 0) -> torch.Tensor:
    return torch.randint(0, 256, (3, 20, 20), dtype=torch.uint8, generator=torch.Generator().manual_seed(seed))


def test_cache_generates_once_and_extends(tmp_path):
    pipe = FakePipeline()
    views = DiffusionViews(VariationGenerator(pipe, batch_size=2, name="fake"), tmp_path)
    first = views.get(pixels(), 3, seed=1)
    assert first.shape == (3, 3, 12, 12) and first.dtype == torch.uint8 and pipe.generated == 3
    assert torch.equal(views.get(pixels(), 3, seed=1), first) and pipe.generated == 3  # second call: all cached
    more = views.get(pixels(), 5, seed=1)  # only the two missing ones are made
    assert pipe.generated == 5 and torch.equal(more[:3], first)
    fresh = DiffusionViews(VariationGenerator(FakePipeline(), batch_size=5, name="fake"), tmp_path / "other")
    assert torch.equal(fresh.get(pixels(), 5, seed=1), more)  # image k depends on (seed, k) only, not on batching


def test_cache_key_separates_images_seeds_and_pipelines(tmp_path):
    a = DiffusionViews(VariationGenerator(FakePipeline(), name="fake"), tmp_path)
    b = DiffusionViews(VariationGenerator(FakePipeline(), name="fake", guidance_scale=7.5), tmp_path)
    folders = {a.folder(pixels(0), 0), a.folder(pixels(1), 0), a.folder(pixels(0), 1), b.folder(pixels(0), 0)}
    assert len(folders) == 4
    assert content_hash(pixels(0)) == content_hash(pixels(0).clone())


def test_source_pixels_survive_normalisation():
    image = pixels(3)
    view = original_view(image, 16, (0.48, 0.45, 0.40), (0.26, 0.26, 0.27))[0]
    assert torch.equal(view_pixels(view, (0.48, 0.45, 0.40), (0.26, 0.26, 0.27)),
                       source_pixels(image, 16, (0.48, 0.45, 0.40), (0.26, 0.26, 0.27)))


def test_pregeneration_resumes_and_reports_failures(tmp_path, rgb_image):
    files = []
    for i in range(3):
        files.append(tmp_path / f"img{i}.png")
        rgb_image.rotate(90 * i).save(files[-1])
    pipe = FakePipeline()
    generator = VariationGenerator(pipe, name="fake")
    stats = generate_dataset(files[:2], count=4, cache_dir=tmp_path / "cache", generator=generator, progress=False)
    assert stats == {"images": 2, "complete": 0, "generated": 8, "failed": 0}
    errors = []
    (tmp_path / "broken.png").write_bytes(b"not an image")
    stats = generate_dataset(files + [tmp_path / "broken.png"], count=4, cache_dir=tmp_path / "cache",
                             generator=generator, progress=False, on_error=lambda path, e: errors.append(path))
    assert stats == {"images": 4, "complete": 2, "generated": 4, "failed": 1} and pipe.generated == 12
    assert errors == [str(tmp_path / "broken.png")]


@pytest.mark.slow  # importing diffusers takes seconds
def test_missing_pipeline_gives_a_clear_error(tmp_path, monkeypatch):
    pytest.importorskip("diffusers")
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    views = DiffusionViews(VariationGenerator("not-a-user/not-a-pipeline", device="cpu"), tmp_path)
    with pytest.raises(RuntimeError, match="offline"):
        views.get(pixels(), 1)
