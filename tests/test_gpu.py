"""The CUDA path (fp16 autocast, device-resident caches) agrees with the CPU path. Skipped without CUDA."""
from __future__ import annotations

import pytest
import torch

import vlmtta
from vlmtta.backbone import FrozenCLIP
from vlmtta.methods import method_names

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
CLASSES = ["cat", "dog", "car", "tree", "boat"]


@pytest.fixture(scope="module")
def pair(tiny_model_dir):
    return FrozenCLIP(tiny_model_dir, None, "cpu"), FrozenCLIP(tiny_model_dir, None, "cuda")


def test_cuda_backbone_uses_fp16_autocast(pair):
    cpu, gpu = pair
    assert gpu.precision == "fp16-autocast" and gpu.identity != cpu.identity  # fp16 embeddings cached apart
    text = gpu.class_embeddings(CLASSES, "ensemble7")
    assert text.device.type == "cuda" and text.dtype == torch.float32
    assert gpu.class_embeddings(CLASSES, "ensemble7") is text  # cached on the device
    assert (text.cpu() - cpu.class_embeddings(CLASSES, "ensemble7")).abs().max() < 5e-3


def test_cuda_images_and_predict_match_cpu(pair, rgb_image):
    cpu, gpu = pair
    views = torch.randn(8, 3, 32, 32)
    assert (gpu.encode_images(views).cpu() - cpu.encode_images(views)).abs().max() < 5e-3
    on_cpu = vlmtta.Adapter(CLASSES, "zeroshot", backbone=cpu, n_views=16).step(rgb_image)
    on_gpu = vlmtta.Adapter(CLASSES, "zeroshot", backbone=gpu, n_views=16).step(rgb_image)
    assert on_gpu.label == on_cpu.label
    assert on_gpu.probabilities == pytest.approx(on_cpu.probabilities, abs=1e-2)


@pytest.mark.parametrize("name", [m for m in method_names() if m != "difftpt"])
def test_every_method_runs_on_cuda_and_agrees_with_cpu(pair, rgb_image, tiny_model_dir, name):
    """Each method's CUDA path (fp16 autocast, device-resident state) gives the CPU prediction."""
    cpu, gpu = pair
    options = {"layers": (1,)} if name == "tca" else {"n_views": 8}  # the tiny ViT has 2 blocks
    if name == "rlcf":  # the reward model: the tiny CLIP too (no hub here)
        options |= {"reward_model": tiny_model_dir, "reward_pretrained": None}
    results = [vlmtta.Adapter(CLASSES, name, backbone=b, **options).step(rgb_image) for b in (cpu, gpu)]
    assert results[1].probabilities == pytest.approx(results[0].probabilities, abs=2e-2)
