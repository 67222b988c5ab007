"""Shared fixtures: tiny random open_clip models (seconds on CPU, no network)."""
from __future__ import annotations

import json
import os
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

os.environ.setdefault("GRADIO_ANALYTICS_ENABLED", "False")
torch.set_num_threads(min(2, torch.get_num_threads()))

TINY_CONFIG = {
    "embed_dim": 32,
    "quick_gelu": True,
    "vision_cfg": {"image_size": 32, "patch_size": 8, "width": 64, "layers": 2, "head_width": 32},
    "text_cfg": {"context_length": 77, "vocab_size": 49408, "width": 64, "heads": 2, "layers": 2},
}
SHARED_DATA = Path(__file__).resolve().parents[2] / "shared" / "data"


def write_model_dir(folder: Path, config: dict = TINY_CONFIG, state_dict: dict | None = None) -> str:
    """An open_clip ``local-dir:`` folder holding ``config`` (and weights when given)."""
    folder.mkdir(parents=True, exist_ok=True)
    preprocess = {"size": config["vision_cfg"]["image_size"], "mean": [0.48145466, 0.4578275, 0.40821073],
                  "std": [0.26862954, 0.26130258, 0.27577711], "interpolation": "bicubic", "resize_mode": "shortest"}
    (folder / "open_clip_config.json").write_text(json.dumps({"model_cfg": config, "preprocess_cfg": preprocess}))
    if state_dict is not None:
        torch.save(state_dict, folder / "open_clip_pytorch_model.bin")
    return f"local-dir:{folder}"


def bound_method(name: str, backbone, classes: list[str], **options):
    """A registered method bound to ``backbone`` and ``classes`` with the template "a photo of a {}."."""
    from vlmtta.methods import Context, create_method

    method = create_method(name, **options)
    templates = ["a photo of a {}."]
    text = backbone.class_embeddings(classes, templates)
    method.bind(Context(list(classes), templates, text, backbone.logit_scale, backbone))
    return method


def random_images(n: int, seed: int = 0, size: int = 32) -> torch.Tensor:
    """``n`` seeded random preprocessed images [n, 3, size, size] (the tiny models take 32 px)."""
    return torch.randn(n, 3, size, size, generator=torch.Generator().manual_seed(seed))


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory) -> str:
    """``local-dir:`` spec of a tiny ViT CLIP with fixed random weights saved to disk."""
    import open_clip

    torch.manual_seed(0)
    model = open_clip.CLIP(**TINY_CONFIG)
    return write_model_dir(tmp_path_factory.mktemp("tiny-clip"), state_dict=model.state_dict())


@pytest.fixture(scope="session")
def tiny_backbone(tiny_model_dir):
    from vlmtta import load_backbone

    return load_backbone(tiny_model_dir, None, "cpu")


@pytest.fixture
def rgb_image() -> Image.Image:
    rng = np.random.default_rng(0)
    return Image.fromarray(rng.integers(0, 256, (40, 52, 3), dtype=np.uint8), "RGB")


def bound_on_text(name: str, text, logit_scale: float = 100.0, **options):
    """A registered method bound to class text features [C, D] alone (no backbone), for feature-level tests."""
    from vlmtta.methods import Context, create_method

    method = create_method(name, **options)
    method.bind(Context([f"c{i}" for i in range(text.shape[0])], [], text, logit_scale))
    return method


def clustered_features(n: int, c: int, d: int, noise: float | None, seed: int = 0):
    """Unit class texts [c, d] and ``n`` unit features, sample ``i`` near text ``i % c`` (``noise`` times a
    Gaussian); ``noise=None``: features independent of the texts.  One seeded generator, texts drawn first."""
    import torch
    import torch.nn.functional as F

    g = torch.Generator().manual_seed(seed)
    text = F.normalize(torch.randn(c, d, generator=g), dim=-1)
    if noise is None:
        return text, F.normalize(torch.randn(n, d, generator=g), dim=-1)
    return text, F.normalize(text[torch.arange(n) % c] + noise * torch.randn(n, d, generator=g), dim=-1)


def run_episodes(method, images):
    """(probabilities, tuned context) of an episodic prompt method on each image's views, reset before each."""
    out = []
    for image in images:
        method.reset()
        out.append((method.predict_views(image), method.learner.ctx.detach().clone()))
    return out
