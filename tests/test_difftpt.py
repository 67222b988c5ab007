"""DiffTPT: filtering counts, paper/code variants, and the end-to-end call with a tiny random diffusers pipeline."""
from __future__ import annotations

import pytest
import torch

import vlmtta
import vlmtta.methods.difftpt  # noqa: F401
from vlmtta.methods import Context, create_method

CLASSES = ["cat", "dog", "car", "airliner"]


def designed(n_conventional: int = 8, n_generated: int = 5):
    """Features and logits where the generated view least like the original is the most confident one."""
    n = n_conventional + n_generated
    features = torch.nn.functional.normalize(torch.randn(n, 16, generator=torch.Generator().manual_seed(0)), dim=-1)
    features[n_conventional] = -features[0]  # a generated view opposite to the original ...
    logits = torch.zeros(n, len(CLASSES))
    logits[:, 0] = torch.linspace(1, 2, n)
    logits[n_conventional, 0] = 50.0  # ... and the most confident one
    return features, logits


@pytest.mark.parametrize("scope, kept", [("generated", 3), ("all", 3)])
def test_cosine_then_entropy_counts(scope, kept):
    method = create_method("difftpt", cosine_scope=scope)
    method._n_conventional = 8
    features, logits = designed()
    chosen = method.select(logits, features).tolist()
    # generated: 5 -> int(0.8*5)=4 kept, pool 8+4=12 -> int(0.3*12)=3; all: 12 -> 9 kept, pool 10 -> 3
    assert len(chosen) == kept and 8 not in chosen
    no_filter = create_method("difftpt", cosine_scope=scope, cosine_ratio=1.0)
    no_filter._n_conventional = 8
    assert 8 in no_filter.select(logits, features).tolist()


def test_cosine_on_logits_is_the_code_variant():
    method = create_method("difftpt", cosine_on="logits", cosine_scope="all")
    method._n_conventional = 8
    features, logits = designed()
    logits[0] = logits[8]  # the original now agrees with the confident generated view in logit space
    assert 8 in method.select(logits, features).tolist()
    with pytest.raises(ValueError):
        create_method("difftpt", cosine_on="pixels")


@pytest.fixture(scope="module")
def tiny_pipeline():
    pytest.importorskip("diffusers")
    from diffusers import AutoencoderKL, PNDMScheduler, StableDiffusionImageVariationPipeline, UNet2DConditionModel
    from transformers import CLIPImageProcessor, CLIPVisionConfig, CLIPVisionModelWithProjection

    torch.manual_seed(0)
    unet = UNet2DConditionModel(block_out_channels=(8, 16), layers_per_block=1, sample_size=8, in_channels=4,
                                out_channels=4, down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"),
                                up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"), cross_attention_dim=8,
                                attention_head_dim=2, norm_num_groups=4)
    vae = AutoencoderKL(block_out_channels=(8,), down_block_types=("DownEncoderBlock2D",),
                        up_block_types=("UpDecoderBlock2D",), latent_channels=4, norm_num_groups=4, sample_size=8)
    encoder = CLIPVisionModelWithProjection(CLIPVisionConfig(
        hidden_size=8, projection_dim=8, num_hidden_layers=1, num_attention_heads=2, intermediate_size=16,
        image_size=16, patch_size=8))
    processor = CLIPImageProcessor(size={"shortest_edge": 16}, crop_size={"height": 16, "width": 16})
    return StableDiffusionImageVariationPipeline(vae, encoder, unet, PNDMScheduler(skip_prk_steps=True), None,
                                                 processor, requires_safety_checker=False)


@pytest.mark.slow  # importing diffusers takes seconds
def test_end_to_end_with_a_tiny_diffusers_pipeline(tiny_backbone, tiny_pipeline, rgb_image, tmp_path):
    options = dict(n_views=8, n_generated=5, pipeline=tiny_pipeline, inference_steps=2, cache_dir=tmp_path)
    adapter = vlmtta.Adapter(CLASSES, "difftpt", backbone=tiny_backbone, **options)
    first = adapter.step(rgb_image)
    diffusion = adapter.method.diffusion
    assert diffusion.generated == 5 and len(list(tmp_path.rglob("*.png"))) == 5
    again = vlmtta.Adapter(CLASSES, "difftpt", backbone=tiny_backbone, **options)
    second = again.step(rgb_image)  # a new run: the variations come from the disk cache
    assert again.method.diffusion.generated == 0
    assert second.probabilities == pytest.approx(first.probabilities, abs=1e-6)
    assert sum(first.probabilities.values()) == pytest.approx(1.0, abs=1e-5)


def test_difftpt_fast_path_equals_reference(tiny_backbone, tmp_path):
    from test_generation import FakePipeline
    from vlmtta.generation import VariationGenerator

    views = torch.randn(8, 3, 32, 32, generator=torch.Generator().manual_seed(1))
    out = []
    for reference in (False, True):
        method = create_method("difftpt", n_views=8, n_generated=4, steps=2, reference_impl=reference, cache_dir=tmp_path,
                               pipeline=VariationGenerator(FakePipeline(), name="fake"))
        text = tiny_backbone.class_embeddings(CLASSES, "a photo of a {}.")
        method.bind(Context(CLASSES, [], text, tiny_backbone.logit_scale, tiny_backbone))
        out.append((method.predict_views(views), method.learner.ctx.detach().clone()))
    torch.testing.assert_close(out[0][1], out[1][1], atol=1e-5, rtol=1e-4)
    torch.testing.assert_close(out[0][0], out[1][0], atol=1e-5, rtol=1e-4)


def test_cache_key_comes_from_the_image_not_the_device_made_views(tiny_backbone, rgb_image, tmp_path):
    """A cache pre-generated from the image (as ``vlmtta generate`` does, on the CPU) serves a run whose
    views differ by a grey level (as GPU-made views can): the key is the CPU-made original view."""
    from test_generation import FakePipeline
    from vlmtta.generation import DiffusionViews, VariationGenerator, source_pixels
    from vlmtta.images import load_image
    from vlmtta.views import make_views

    generator = VariationGenerator(FakePipeline(), name="fake")
    pixels = load_image(rgb_image)
    b = tiny_backbone
    DiffusionViews(generator, tmp_path).ensure(source_pixels(pixels, b.image_size, b.mean, b.std), 4)
    adapter = vlmtta.Adapter(CLASSES, "difftpt", backbone=b, n_views=8, n_generated=4, pipeline=generator,
                             cache_dir=tmp_path)
    views = make_views(pixels, adapter.view_config, seed=0)
    shifted = views.clone()
    shifted[0] += 1 / 255 / torch.tensor(b.std).view(3, 1, 1)  # one grey level brighter: another key from view 0
    adapter.adapt_views(shifted, pixels)
    assert adapter.method.diffusion.generated == 0  # served from the cache
    adapter.adapt_views(shifted)  # views alone: keyed by view 0, which is not cached
    assert adapter.method.diffusion.generated == 4
