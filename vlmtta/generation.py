"""Diffusion-generated image variations for DiffTPT, cached on disk and reusable across runs and methods.

A ``VariationGenerator`` wraps any diffusers image-variation pipeline (default: Stable Diffusion
Image Variations, ``lambdalabs/sd-image-variations-diffusers`` revision ``v2.0``, guidance 3, as
DiffTPT).  ``DiffusionViews`` keeps the generated images on disk under

    <cache_dir>/<pipeline id digest>/seed<seed>/<content hash[:2]>/<content hash>/<k>.png

where the content hash is the SHA-256 of the image the pipeline is given: the original test view
(shorter side resized + center crop to the CLIP input size, 8-bit), the same pixels whatever
the device.  Image ``k`` is drawn with its own seed ``view_seed(seed, k)``, so asking for
``count`` images reads the first ``count`` files and generates only the missing ones (resume),
and a larger ``count`` later extends the set.  ``generate_dataset`` is the pre-generation pass
over a list of image files (progress bar, resumable); the ``vlmtta generate`` command calls it.
"""
from __future__ import annotations

import hashlib
import json
import os
import warnings
from collections import Counter
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterable, Sequence

import numpy as np
import torch
from PIL import Image

from .cache import CorruptFileError
from .views import original_view, view_seed

DEFAULT_PIPELINE = "lambdalabs/sd-image-variations-diffusers"
DEFAULT_REVISION = "v2.0"
DEFAULT_GUIDANCE = 3.0  # DiffTPT's image_generator_R.py
DEFAULT_STEPS = 50  # the pipeline's default number of denoising steps
CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
CLIP_STD = (0.26862954, 0.26130258, 0.27577711)


def default_cache_dir() -> Path:
    """``$VLMTTA_CACHE/diffusion``, else ``~/.cache/vlmtta/diffusion``."""
    root = os.environ.get("VLMTTA_CACHE") or Path.home() / ".cache" / "vlmtta"
    return Path(root) / "diffusion"


def view_pixels(view: torch.Tensor, mean: Sequence[float], std: Sequence[float]) -> torch.Tensor:
    """Undo the normalisation of one view [3, S, S]: uint8 pixels on the CPU (exact for views made by vlmtta)."""
    m = torch.tensor(mean, dtype=torch.float32).view(3, 1, 1)
    s = torch.tensor(std, dtype=torch.float32).view(3, 1, 1)
    return ((view.detach().float().cpu() * s + m) * 255).round_().clamp_(0, 255).to(torch.uint8)


def source_pixels(image: torch.Tensor, image_size: int = 224, mean: Sequence[float] = CLIP_MEAN,
                  std: Sequence[float] = CLIP_STD) -> torch.Tensor:
    """The pixels generation starts from for a uint8 image [3, H, W]: its original test view, uint8 [3, S, S]."""
    return view_pixels(original_view(image, image_size, mean, std)[0], mean, std)


def content_hash(pixels: torch.Tensor) -> str:
    """SHA-256 of a uint8 image tensor's shape and bytes."""
    pixels = pixels.contiguous().cpu()
    return hashlib.sha256(str(tuple(pixels.shape)).encode() + pixels.numpy().tobytes()).hexdigest()


def _to_pil(pixels: torch.Tensor) -> Image.Image:
    return Image.fromarray(pixels.permute(1, 2, 0).numpy())


def _from_pil(image: Image.Image) -> torch.Tensor:
    return torch.from_numpy(np.asarray(image.convert("RGB")).copy()).permute(2, 0, 1)


def _read_png(path: Path) -> torch.Tensor | None:
    """The uint8 pixels [3, H, W] of a cached variation, or ``None`` when it is missing or not a complete PNG."""
    try:
        with Image.open(path) as image:
            image.load()  # decodes every byte: a damaged zlib stream or a truncated file raises here
            return _from_pil(image) if image.format == "PNG" else None
    except Exception:  # noqa: BLE001 - PIL raises many types for damaged files; all mean "generate again"
        return None


def _damaged(images: Sequence[torch.Tensor | None]) -> list[int]:
    """Indices of the unreadable images and of those whose shape differs from the most frequent one."""
    shapes = Counter(tuple(image.shape) for image in images if image is not None)
    common = shapes.most_common(1)[0][0] if shapes else None
    return [k for k, image in enumerate(images) if image is None or tuple(image.shape) != common]


@dataclass
class VariationGenerator:
    """Any diffusers image-variation pipeline: ``pipeline(image=PIL, num_images_per_prompt=n, generator=[...])``.

    Args:
        pipeline: a Hugging Face id or local folder (loaded lazily with ``DiffusionPipeline``), or
            an already built pipeline object.
        revision: the hub revision (``v2.0`` for the default pipeline, as DiffTPT).
        guidance_scale, num_inference_steps: sampling settings (3 and 50, as DiffTPT).
        device: where the pipeline runs (``auto``: CUDA when available, in fp16).
        batch_size: images generated per pipeline call.
        call_kwargs: extra keyword arguments of the pipeline call (e.g. ``height``/``width``).
        name: what identifies the pipeline in cache keys (default: ``pipeline@revision``).
    """

    pipeline: Any = DEFAULT_PIPELINE
    revision: str | None = DEFAULT_REVISION
    guidance_scale: float = DEFAULT_GUIDANCE
    num_inference_steps: int = DEFAULT_STEPS
    device: str = "auto"
    batch_size: int = 8
    call_kwargs: dict[str, Any] = field(default_factory=dict)
    name: str | None = None
    _pipe: Any = field(default=None, init=False, repr=False)

    @property
    def pipeline_id(self) -> str:
        """Everything that changes the generated pixels for a given input image and seed."""
        name = self.name or (self.pipeline if isinstance(self.pipeline, str) else type(self.pipeline).__name__)
        extra = json.dumps(self.call_kwargs, sort_keys=True, default=str)
        return f"{name}@{self.revision}|guidance={self.guidance_scale}|steps={self.num_inference_steps}|{extra}"

    def load(self) -> Any:
        """The pipeline, loaded on first use; a clear error when it is not available offline."""
        if self._pipe is None:
            self._pipe = self.pipeline if not isinstance(self.pipeline, str) else _load_pipeline(
                self.pipeline, self.revision, self._device())
            if hasattr(self._pipe, "set_progress_bar_config"):
                self._pipe.set_progress_bar_config(disable=True)
        return self._pipe

    def _device(self) -> torch.device:
        from .backbone import resolve_device

        return resolve_device(self.device)

    @torch.no_grad()
    def __call__(self, pixels: torch.Tensor, seeds: Sequence[int]) -> list[Image.Image]:
        """One variation of the uint8 image ``pixels`` [3, H, W] per seed (each seed its own CPU generator)."""
        pipe, source, out = self.load(), _to_pil(pixels), []
        for start in range(0, len(seeds), self.batch_size):
            chunk = seeds[start:start + self.batch_size]
            generators = [torch.Generator().manual_seed(int(seed)) for seed in chunk]
            result = pipe(image=source, num_images_per_prompt=len(chunk), generator=generators,
                          guidance_scale=self.guidance_scale, num_inference_steps=self.num_inference_steps,
                          **self.call_kwargs)
            out.extend(result.images)
        return out


def _load_pipeline(name: str, revision: str | None, device: torch.device) -> Any:
    try:
        from diffusers import DiffusionPipeline
    except ImportError as error:
        raise ImportError("DiffTPT's generated views need diffusers: pip install 'vlmtta[diffusion]'.") from error
    dtype = torch.float16 if device.type == "cuda" else torch.float32
    try:
        pipe = DiffusionPipeline.from_pretrained(name, revision=revision, torch_dtype=dtype)
    except Exception as error:  # hub/network errors come in many types
        raise RuntimeError(
            f"Could not load the diffusion pipeline {name!r} (revision {revision!r}): {type(error).__name__}: {error}. "
            "It is neither in the local Hugging Face cache nor downloadable here (offline?). Download it once on a "
            "machine with network (`huggingface-cli download lambdalabs/sd-image-variations-diffusers --revision v2.0`) "
            "or pass a local folder or a pipeline object; images already in the vlmtta cache need no pipeline."
        ) from error
    if getattr(pipe, "safety_checker", None) is not None:
        pipe.safety_checker = None  # DiffTPT disables it: it blacks out images it flags
    return pipe.to(device)


class DiffusionViews:
    """Generated variations of test images, cached on disk, generated only when missing.

    ``generator`` is needed only for images not in the cache: a fully pre-generated cache runs
    without diffusers or network.  ``generated`` counts the images this object generated.
    """

    def __init__(self, generator: VariationGenerator | None = None, cache_dir: str | Path | None = None):
        self.generator = generator or VariationGenerator()
        self.cache_dir = Path(cache_dir).expanduser() if cache_dir else default_cache_dir()
        self.generated = 0

    def folder(self, pixels: torch.Tensor, seed: int) -> Path:
        """Cache folder of one source image: pipeline id digest / seed / content hash."""
        pipe = hashlib.sha256(self.generator.pipeline_id.encode()).hexdigest()[:16]
        digest = content_hash(pixels)
        return self.cache_dir / pipe / f"seed{seed}" / digest[:2] / digest

    def missing(self, pixels: torch.Tensor, count: int, seed: int = 0) -> list[int]:
        """Indices among the first ``count`` variations that are not cached yet."""
        folder = self.folder(pixels, seed)
        return [k for k in range(count) if not (folder / f"{k:04d}.png").is_file()]

    def get(self, pixels: torch.Tensor, count: int, seed: int = 0) -> torch.Tensor:
        """The first ``count`` variations of uint8 ``pixels`` [3, H, W] as uint8 [count, 3, h, w], made if missing.

        A cached file that does not decode as a complete PNG (PNG's zlib checksum catches damaged bytes) or
        differs in size from the others is deleted and generated again, with a warning; never used.
        """
        if count == 0:
            return torch.empty(0, *pixels.shape, dtype=torch.uint8)
        folder = self.folder(pixels, seed)
        self.ensure(pixels, count, seed)
        images = self._read(folder, count)
        damaged = _damaged(images)
        if damaged:
            warnings.warn(f"Diffusion cache {folder}: {len(damaged)} damaged variation(s) {damaged[:5]}; generating "
                          "them again.", stacklevel=2)
            for k in damaged:
                (folder / f"{k:04d}.png").unlink(missing_ok=True)
            self.ensure(pixels, count, seed)
            images = self._read(folder, count)
            if _damaged(images):
                raise CorruptFileError(f"Diffusion cache {folder}: variation(s) {_damaged(images)[:5]} are still "
                                       "unreadable after being generated again.")
        return torch.stack(images)

    @staticmethod
    def _read(folder: Path, count: int) -> list[torch.Tensor | None]:
        with ThreadPoolExecutor(min(count, os.cpu_count() or 1)) as pool:  # PNG decoding releases the GIL
            return list(pool.map(lambda k: _read_png(folder / f"{k:04d}.png"), range(count)))

    def ensure(self, pixels: torch.Tensor, count: int, seed: int = 0) -> int:
        """Generate and store the missing ones of the first ``count`` variations; returns how many were made."""
        todo = self.missing(pixels, count, seed)
        if not todo:
            return 0
        folder = self.folder(pixels, seed)
        folder.mkdir(parents=True, exist_ok=True)
        images = self.generator(pixels, [view_seed(seed, k) for k in todo])
        for k, image in zip(todo, images):
            tmp = folder / f".{k:04d}.{os.getpid()}.tmp.png"
            image.convert("RGB").save(tmp)
            tmp.replace(folder / f"{k:04d}.png")  # atomic: an interrupted run leaves no partial file
        self.generated += len(todo)
        return len(todo)


def generate_dataset(
    images: Iterable[str | Path],
    count: int = 63,
    seed: int = 0,
    cache_dir: str | Path | None = None,
    generator: VariationGenerator | None = None,
    image_size: int = 224,
    mean: Sequence[float] = CLIP_MEAN,
    std: Sequence[float] = CLIP_STD,
    progress: bool = True,
    on_error: Callable[[str, Exception], None] | None = None,
) -> dict[str, int]:
    """Pre-generate ``count`` variations of every image file (resumable: cached images are skipped).

    ``image_size``, ``mean`` and ``std`` must match the backbone DiffTPT will run with (224 and
    CLIP's for ViT-B/16), since the cache is keyed by the original test view's pixels.
    Returns counts of images seen, already complete, generated variations and failures.
    """
    from tqdm.auto import tqdm

    from .images import load_image

    views = DiffusionViews(generator, cache_dir)
    paths = list(images)
    stats = {"images": len(paths), "complete": 0, "generated": 0, "failed": 0}
    bar = tqdm(paths, desc="generating variations", unit="img", disable=not progress)
    for path in bar:
        try:
            pixels = source_pixels(load_image(path), image_size, mean, std)
            made = views.ensure(pixels, count, seed)
        except Exception as error:  # keep going: one unreadable image must not stop a long pass
            stats["failed"] += 1
            if on_error is None:
                raise
            on_error(str(path), error)
            continue
        stats["complete"] += made == 0
        stats["generated"] += made
        bar.set_postfix(generated=stats["generated"], cached=stats["complete"])
    return stats
