"""FrozenCLIP: one frozen open_clip model with its tokenizer, preprocessing facts, device and caches.

Encoders are frozen (``requires_grad=False``, eval mode).  Image features come from
``encode_images`` under inference mode (fp16 autocast on CUDA); class text embeddings from
``class_embeddings``, cached in memory on the model's device and optionally on disk.
"""
from __future__ import annotations

import contextlib
import difflib
import hashlib
import logging
import os
import pickle
import re
import socket
import threading
import warnings
import zipfile
from collections import Counter
from pathlib import Path
from typing import Any, Iterator, Sequence
from urllib.parse import urlparse

import open_clip
import torch
import torch.nn.functional as F
from open_clip.transformer import QuickGELU

from .cache import CorruptFileError, EmbeddingCache, cache_key, one_line
from .prompts import resolve_templates
from .text import TextTower, encode_tokens

log = logging.getLogger(__name__)

RANDOM_WEIGHTS = (None, "", "none", "random")
AUTO_WEIGHTS = "auto"  # the default ``pretrained``: see ``resolve_weights``
DEFAULT_TAG = "openai"  # what ``auto`` means for an open_clip architecture name
# Shipped models: name -> (local-dir spec, weights label); they carry their own weights.
MODEL_ALIASES = {"vlmtta-testbed": (f"local-dir:{Path(__file__).resolve().parent / 'testbed' / 'model'}", "testbed")}
WEIGHT_SUFFIXES = ("*.safetensors", "*.bin", "*.pth")
OFFLINE_HINT = ("pass a local checkpoint file as pretrained (--pretrained /path/open_clip_pytorch_model.bin), a "
                "'local-dir:/folder' model, or the bundled offline model 'vlmtta-testbed' (--model vlmtta-testbed)")
DEVICE_CHOICES = "auto, cpu, cuda, cuda:N, mps"


def resolve_device(device: str | torch.device = "auto") -> torch.device:
    """Map ``auto|cpu|cuda|cuda:N|mps`` to a ``torch.device`` that exists on this machine."""
    name = str(device).strip().lower()
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name == "cpu":
        return torch.device("cpu")
    if re.fullmatch(r"cuda(:\d+)?", name):
        if not torch.cuda.is_available():
            raise ValueError(f"Device {device!r} requested but CUDA is not available here; use 'cpu' or 'auto'.")
        index = int(name.split(":")[1]) if ":" in name else 0
        if index >= torch.cuda.device_count():
            raise ValueError(f"Device {device!r} does not exist: {torch.cuda.device_count()} CUDA device(s) visible.")
        return torch.device(name)
    if name == "mps":
        if not torch.backends.mps.is_available():
            raise ValueError("Device 'mps' requested but MPS is not available here; use 'cpu' or 'auto'.")
        return torch.device("mps")
    raise ValueError(f"Unknown device {device!r}; accepted: {DEVICE_CHOICES}.")


class QuickGELUWarning(UserWarning):
    """Weights that may have been trained with QuickGELU are being loaded into a GELU model."""


# Keys of OpenAI's CLIP state dict (and of open_clip's CLIP class, which kept that layout) at the top level.
_OPENAI_LAYOUT_KEYS = ("token_embedding.weight", "positional_embedding", "text_projection", "logit_scale")


def _is_torchscript_archive(path: str) -> bool:
    """OpenAI's released ``.pt`` files are TorchScript archives (they hold a ``code/`` folder)."""
    try:
        with zipfile.ZipFile(path) as archive:
            return any("/code/" in name for name in archive.namelist()[:200])
    except (zipfile.BadZipFile, OSError):
        return False


def _checkpoint_keys(path: str) -> list[str] | None:
    """Top-level keys of a plain state-dict file (memory-mapped, tensors not read); ``None`` when the file is
    not a plain mapping of tensors (e.g. an open_clip training checkpoint, which wraps it in ``state_dict``)."""
    if path.endswith(".safetensors"):
        from safetensors import safe_open

        with safe_open(path, framework="pt") as handle:
            return list(handle.keys())
    for mmap in (True, False):  # mmap needs the zip format; legacy files are read whole
        try:
            state = torch.load(path, map_location="cpu", weights_only=True, mmap=mmap)
            break
        except Exception:
            state = None
    if not isinstance(state, dict) or not all(isinstance(v, torch.Tensor) for v in state.values()):
        return None
    return [str(key) for key in state]


def is_openai_layout_state_dict(path: str) -> bool:
    """Whether ``path`` is a plain state dict in OpenAI's CLIP layout (top-level ``token_embedding.weight``,
    ``positional_embedding``, ``text_projection``, ``logit_scale`` and ``visual.*``; no ``module.`` prefix, no
    training-checkpoint wrapper): what ``torch.save(clip.load(..., jit=False)[0].state_dict())`` writes, and also
    what a plain open_clip ``CLIP`` writes, so the file alone cannot tell whether QuickGELU is needed."""
    if _is_torchscript_archive(path):
        return False
    keys = _checkpoint_keys(path)
    return bool(keys) and all(key in keys for key in _OPENAI_LAYOUT_KEYS) and any(k.startswith("visual.") for k in keys)


def wants_quick_gelu(model: str, pretrained: str | None) -> bool:
    """Whether the weights were trained with QuickGELU but ``model`` would build plain GELU.

    True for OpenAI tags (and every tag whose open_clip metadata says so) on a non ``-quickgelu``
    architecture, and for OpenAI TorchScript checkpoint files.  Loading such weights into a GELU
    model silently costs accuracy.
    """
    if pretrained in RANDOM_WEIGHTS or model.endswith("-quickgelu") or ":" in model:
        return False
    tag_cfg = open_clip.get_pretrained_cfg(model, pretrained)
    if tag_cfg:
        return bool(tag_cfg.get("quick_gelu", False))
    return Path(pretrained).is_file() and _is_torchscript_archive(pretrained)


def resolve_weights(model: str, pretrained: str | None = AUTO_WEIGHTS) -> tuple[str, str | None, str | None]:
    """(open_clip model name, open_clip ``pretrained``, label of the weights) for a user's ``model``/``pretrained``.

    ``pretrained`` applies to open_clip architecture names: a tag, a checkpoint file, ``none`` for random
    weights, or ``auto`` (the default) for ``openai``.  ``local-dir:``, ``hf-hub:`` and ``vlmtta-testbed``
    carry their own weights: ``pretrained`` must stay ``auto`` or ``none`` (anything else is an error, not
    ignored), and a ``local-dir:`` folder without a weights file is an error unless ``pretrained`` is
    ``none`` (then it runs on random weights).  The label is what results report: the tag or file, the
    weights file of a ``local-dir:`` folder, ``testbed``, ``hf-hub``, or ``None`` for random weights.
    """
    random = pretrained in RANDOM_WEIGHTS or str(pretrained).lower() in ("none", "random")
    source, label = MODEL_ALIASES.get(model, (model, None))
    if ":" not in source:  # an open_clip architecture name
        tag = None if random else DEFAULT_TAG if pretrained == AUTO_WEIGHTS else str(pretrained)
        return source, tag, tag
    if not random and pretrained != AUTO_WEIGHTS:
        raise ValueError(f"pretrained={pretrained!r} does not apply to {model!r}: it carries its own weights. Leave "
                         "pretrained at 'auto' (the default), or pass 'none'.")
    if source.startswith("hf-hub:"):
        return source, None, "hf-hub"
    if source.startswith("local-dir:"):
        folder = Path(source.split(":", 1)[1]).expanduser()
        if not (folder / "open_clip_config.json").is_file():
            raise FileNotFoundError(f"'{source}': expected a folder holding open_clip_config.json (and a weights file).")
        weights = sorted(path.name for pattern in WEIGHT_SUFFIXES for path in folder.glob(pattern))
        if not weights and not random:
            raise FileNotFoundError(f"'{source}' holds no weights file ({', '.join(WEIGHT_SUFFIXES)}); add one, or "
                                    "pass pretrained='none' to run it on random weights.")
        return source, None, label or (_chosen_weights(folder) if weights else None)
    return source, None, label


def _chosen_weights(folder: Path) -> str:
    """The name of the weights file open_clip loads from a ``local-dir:`` folder."""
    find = getattr(open_clip.factory, "_find_checkpoint_in_dir", None)
    chosen = find(folder) if find is not None else None
    return Path(chosen).name if chosen else sorted(p.name for s in WEIGHT_SUFFIXES for p in folder.glob(s))[0]


def _reachable(url: str, timeout: float = 3.0) -> bool:
    parsed = urlparse(url)
    try:
        socket.create_connection((parsed.hostname, parsed.port or 443), timeout=timeout).close()
        return True
    except OSError:
        return False


def _offline() -> bool:
    """True when huggingface_hub is set offline (``HF_HUB_OFFLINE``) or its endpoint cannot be reached at once."""
    import huggingface_hub.constants as hub

    if hub.HF_HUB_OFFLINE or os.environ.get("HF_HUB_OFFLINE", "").strip().lower() in ("1", "true", "yes", "on"):
        return True
    return not _reachable(os.environ.get("HF_ENDPOINT", hub.ENDPOINT or "https://huggingface.co"))


@contextlib.contextmanager
def _hub_access(model: str, pretrained: str | None) -> Iterator[None]:
    """Fetch weights from the hub; offline, use its cache only and fail at once with what to do instead.

    Without this, huggingface_hub retries an unreachable hub for about a minute before failing.
    """
    needs_hub = model.startswith("hf-hub:") or (
        ":" not in model and pretrained is not None and not Path(pretrained).expanduser().is_file())
    if not needs_hub or not _offline():
        yield
        return
    import huggingface_hub.constants as hub

    root, quiet = logging.getLogger(), _DropOpenClipRecords()  # open_clip logs its own error; ours replaces it
    previous, hub.HF_HUB_OFFLINE = hub.HF_HUB_OFFLINE, True
    root.addFilter(quiet)
    try:
        yield
    except (OSError, RuntimeError, ValueError) as error:
        if _is_damaged_file_error(error):
            raise  # a damaged cached download, not a missing one: _checkpoint_errors says so
        weights = model if pretrained is None else f"{pretrained!r} for {model}"
        raise WeightsUnavailable(f"Cannot load weights {weights}: no network (or HF_HUB_OFFLINE is set) and they are "
                                 f"not in the local cache; {OFFLINE_HINT}.") from error
    finally:
        hub.HF_HUB_OFFLINE = previous
        root.removeFilter(quiet)


class WeightsUnavailable(RuntimeError):
    """Pretrained weights cannot be had here (offline and not cached)."""


class _DropOpenClipRecords(logging.Filter):
    def filter(self, record: logging.LogRecord) -> bool:
        return "open_clip" not in record.pathname


def _validate_source(model: str, pretrained: str | None) -> None:
    if model.startswith("local-dir:"):
        return  # checked by resolve_weights
    if model.startswith("hf-hub:"):
        return
    if model not in open_clip.list_models():
        close = difflib.get_close_matches(model, open_clip.list_models(), n=5)
        raise ValueError(f"Unknown model architecture {model!r}." + (f" Close matches: {', '.join(close)}." if close else "")
                         + " See open_clip.list_models(), or use 'local-dir:/path' / 'hf-hub:org/repo'.")
    if pretrained in RANDOM_WEIGHTS or Path(str(pretrained)).expanduser().is_file():
        return
    tags = open_clip.list_pretrained_tags_by_model(model)
    if pretrained not in tags:
        raise ValueError(f"Unknown pretrained weights {pretrained!r} for {model}: give one of {', '.join(tags) or 'no tags'}, "
                         "a path to a local checkpoint file, or None for random weights.")


def _local_weights(model: str, pretrained: str | None) -> Path | None:
    """The local file (or ``local-dir:`` folder) the weights come from, if any."""
    if model.startswith("local-dir:"):
        return Path(model.split(":", 1)[1]).expanduser()
    if pretrained not in RANDOM_WEIGHTS and Path(str(pretrained)).expanduser().is_file():
        return Path(str(pretrained)).expanduser()
    return None


def _is_damaged_file_error(error: Exception) -> bool:
    """Whether ``error`` is what ``torch.load`` raises on a damaged, truncated or unsafe file."""
    return isinstance(error, (pickle.UnpicklingError, EOFError, zipfile.BadZipFile)) or (
        isinstance(error, RuntimeError) and "PytorchStreamReader" in str(error))


@contextlib.contextmanager
def _checkpoint_errors(model: str, pretrained: str | None) -> Iterator[None]:
    """Turn a failure to load a checkpoint file (damaged, truncated, unsafe pickle, wrong model) into one line."""
    try:
        yield
    except FileNotFoundError:
        raise
    except Exception as error:  # noqa: BLE001 - unpickling damaged bytes raises errors of many types
        local = _local_weights(model, pretrained)
        if local is not None:
            raise CorruptFileError(f"Cannot load weights for {model} from {local}: {one_line(error)}") from error
        if _is_damaged_file_error(error):
            raise CorruptFileError(f"Cannot load the downloaded weights {pretrained!r} for {model}: {one_line(error)}; "
                                   "the cached download looks damaged: delete it (weights_dir, or the Hugging Face "
                                   "cache) and run again.") from error
        raise


_AUTOCAST_CAST_MODULES = (torch.nn.Linear, torch.nn.Conv1d, torch.nn.Conv2d, torch.nn.Conv3d)


def precast_autocast_weights(model: torch.nn.Module, dtype: torch.dtype = torch.float16) -> int:
    """Store once, in ``dtype``, the frozen weights that autocast would cast to ``dtype`` on every call.

    Autocast caches casts only for weights that require grad, so a frozen model under autocast
    copies every Linear/Conv weight (and MultiheadAttention input projection) to fp16 at every
    forward: one extra kernel and a full read + write per weight.  Storing them in ``dtype``
    beforehand gives bit-identical outputs under ``torch.autocast(dtype=dtype)`` (the cast of an
    fp32 weight is exactly the stored value), halves their memory and removes those kernels.
    Norm layers, embeddings and projections stay as they are.  Only for models that always run
    under that autocast (``FrozenCLIP`` on CUDA).  open_clip's ``get_cast_dtype`` keeps reporting
    the original dtype (through its ``int8_original_dtype`` hook), so token embeddings and the
    residual stream keep their precision.  Returns the number of tensors converted.
    """
    converted = 0
    for module in model.modules():
        if isinstance(module, _AUTOCAST_CAST_MODULES):
            names = ("weight", "bias")
        elif isinstance(module, torch.nn.MultiheadAttention) and module.in_proj_weight is not None:
            names = ("in_proj_weight", "in_proj_bias")
        else:
            continue
        if isinstance(module, torch.nn.Linear) and not hasattr(module, "int8_original_dtype"):
            module.int8_original_dtype = module.weight.dtype  # read by open_clip's get_cast_dtype
        for name in names:
            tensor = getattr(module, name, None)
            if tensor is not None and tensor.is_floating_point() and tensor.dtype != dtype:
                tensor.data = tensor.data.to(dtype)
                converted += 1
    return converted


def _weights_fingerprint(model: torch.nn.Module, skip_prefix: str = "visual.") -> str:
    """Cheap digest of the text-side weights (strided samples of every tensor) for cache keys."""
    digest = hashlib.sha256()
    for name, tensor in sorted(model.state_dict().items()):
        if name.startswith(skip_prefix) or not tensor.is_floating_point():
            continue
        flat = tensor.detach().flatten()
        digest.update(name.encode())
        digest.update(flat[:: max(1, flat.numel() // 512)].float().cpu().numpy().tobytes())
    return digest.hexdigest()[:20]


def _warn_if_openai_state_dict(name: str, source: str, pretrained: str | None) -> None:
    """Warn loudly, with the fix, when a GELU model gets a plain state dict in OpenAI's layout."""
    if pretrained is None or ":" in source or not Path(pretrained).is_file() or not is_openai_layout_state_dict(pretrained):
        return
    arch = f" or the '{source}-quickgelu' architecture (CLI: --model {source}-quickgelu)" \
        if f"{source}-quickgelu" in open_clip.list_models() else ""
    message = (f"{pretrained} is a plain state dict in OpenAI's CLIP layout, loaded into {name} with GELU activations. "
               f"OpenAI's CLIP weights were trained with QuickGELU and silently lose accuracy under GELU, and the file "
               f"cannot say which it needs. If these are OpenAI's weights, pass quick_gelu=True{arch}; if they were "
               f"trained with GELU, pass quick_gelu=False to silence this warning.")
    warnings.warn(message, QuickGELUWarning, stacklevel=3)


class FrozenCLIP:
    """A frozen open_clip model plus tokenizer, preprocessing constants, device and embedding caches.

    Args:
        model: open_clip architecture (``ViT-B-16``), ``local-dir:/folder``, ``hf-hub:org/repo`` or
            ``vlmtta-testbed``.
        pretrained: ``auto`` (``openai`` for architecture names; the model's own weights otherwise), a
            weights tag (``openai``, ``laion2b_s34b_b88k``, ...), a local checkpoint file, or ``None`` /
            ``"none"`` for random weights (benchmarks and tests); see ``resolve_weights``.
        device: ``auto`` (CUDA when available), ``cpu``, ``cuda``, ``cuda:N`` or ``mps``.
        quick_gelu: force QuickGELU on/off; ``None`` infers it from the weights (OpenAI weights need it):
            on for OpenAI tags and OpenAI TorchScript files; a plain state dict in OpenAI's layout loaded
            into a GELU model emits a ``QuickGELUWarning`` that says how to choose.
        cache_dir: folder for the on-disk text-embedding cache (memory only when ``None``).
        weights_dir: open_clip download cache for pretrained tags.
        init_seed: seed of the random initialisation when ``pretrained`` is ``None``.
    """

    def __init__(
        self,
        model: str = "ViT-B-16",
        pretrained: str | None = AUTO_WEIGHTS,
        device: str | torch.device = "auto",
        *,
        quick_gelu: bool | None = None,
        cache_dir: str | Path | None = None,
        weights_dir: str | None = None,
        init_seed: int = 0,
    ):
        source, pretrained, self.pretrained = resolve_weights(model, pretrained)
        self.model_name = model
        self.device = resolve_device(device)
        _validate_source(source, pretrained)
        force_quick_gelu = wants_quick_gelu(source, pretrained) if quick_gelu is None else quick_gelu
        with _checkpoint_errors(source, pretrained):
            self.model = self._create(source, pretrained, force_quick_gelu, weights_dir, init_seed)
        if quick_gelu is None and not self.quick_gelu:
            _warn_if_openai_state_dict(model, source, pretrained)
        self.tokenizer = open_clip.get_tokenizer(source)
        self.preprocess_cfg = open_clip.get_model_preprocess_cfg(self.model)
        self.text_tower = TextTower.of(self.model)
        self.text_cache = EmbeddingCache(cache_dir)
        self.counters: Counter[str] = Counter()
        self.identity = cache_key(model, self.pretrained, self.quick_gelu, self.precision,
                                  _weights_fingerprint(self.model))[:24]
        if self.device.type == "cuda":
            precast_autocast_weights(self.model, torch.float16)
        self._lock = threading.RLock()

    def _create(self, model: str, pretrained: str | None, quick_gelu: bool, weights_dir: str | None,
                init_seed: int) -> torch.nn.Module:
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(init_seed)
            try:
                with _hub_access(model, pretrained):
                    clip = open_clip.create_model(model, pretrained=pretrained, force_quick_gelu=quick_gelu,
                                                  cache_dir=weights_dir)
            except WeightsUnavailable:
                raise
            except RuntimeError as error:
                if "download" in str(error).lower() or "hub" in str(error).lower():
                    raise RuntimeError(f"Could not fetch weights {pretrained!r} for {model} ({error}). Offline? "
                                       f"{OFFLINE_HINT[0].upper()}{OFFLINE_HINT[1:]}.") from error
                raise
        clip.requires_grad_(False)
        return clip.eval().to(self.device)

    # ---- facts about the model -------------------------------------------------------------
    @property
    def quick_gelu(self) -> bool:
        """Whether the model actually runs QuickGELU activations."""
        return any(isinstance(module, QuickGELU) for module in self.model.modules())

    @property
    def precision(self) -> str:
        return "fp16-autocast" if self.device.type == "cuda" else "fp32"

    @property
    def image_size(self) -> int:
        size = self.preprocess_cfg.get("size", 224)
        return int(size if isinstance(size, int) else size[0])

    @property
    def mean(self) -> tuple[float, float, float]:
        return tuple(self.preprocess_cfg.get("mean", open_clip.OPENAI_DATASET_MEAN))

    @property
    def std(self) -> tuple[float, float, float]:
        return tuple(self.preprocess_cfg.get("std", open_clip.OPENAI_DATASET_STD))

    @property
    def logit_scale(self) -> float:
        return float(self.model.logit_scale.exp())

    @property
    def embed_dim(self) -> int:
        return int(self.model.visual.output_dim)

    def describe(self) -> dict[str, Any]:
        """The protocol facts every reported number carries."""
        return {"model": self.model_name, "pretrained": self.pretrained, "quick_gelu": self.quick_gelu,
                "device": str(self.device), "precision": self.precision, "image_size": self.image_size,
                "text_context_truncation": bool(self.text_tower and self.text_tower.causal)}

    def autocast(self) -> contextlib.AbstractContextManager:
        """fp16 autocast on CUDA, nothing elsewhere."""
        if self.device.type == "cuda":
            return torch.autocast("cuda", dtype=torch.float16)
        return contextlib.nullcontext()

    # ---- images -----------------------------------------------------------------------------
    def encode_images(self, images: torch.Tensor, batch_size: int = 256) -> torch.Tensor:
        """L2-normalised float32 features [B, D] of preprocessed images [B, 3, S, S]."""
        chunks = []
        with torch.inference_mode(), self.autocast():
            for start in range(0, images.shape[0], batch_size):
                batch = images[start:start + batch_size].to(self.device, non_blocking=True)
                chunks.append(self.model.encode_image(batch).float())
        self.counters["image_batches"] += len(chunks)
        self.counters["images_encoded"] += images.shape[0]
        return F.normalize(torch.cat(chunks), dim=-1)

    # ---- text -------------------------------------------------------------------------------
    def tokenize(self, texts: Sequence[str]) -> torch.Tensor:
        """Token ids [N, context] on the model's device; warns about prompts longer than the context."""
        tokens = self.tokenizer(list(texts))
        self._warn_truncated(texts, tokens)
        return tokens.to(self.device)

    def _warn_truncated(self, texts: Sequence[str], tokens: torch.Tensor) -> None:
        if self.text_tower is None or not hasattr(self.tokenizer, "encode"):
            return
        at_limit = (self.text_tower.pool_positions(tokens) == tokens.shape[1] - 1).nonzero().flatten().tolist()
        long = [texts[i] for i in at_limit if len(self.tokenizer.encode(texts[i])) + 2 > tokens.shape[1]]
        if long:
            shown = ", ".join(repr(text) for text in long[:3]) + (f" and {len(long) - 3} more" if len(long) > 3 else "")
            warnings.warn(f"{len(long)} prompt(s) exceed the {tokens.shape[1]}-token text context and were truncated: "
                          f"{shown}.", stacklevel=3)

    def encode_text(self, texts: Sequence[str], batch_size: int = 1000, truncate: bool = True) -> torch.Tensor:
        """L2-normalised float32 features [N, D]; on the truncated causal context when exact."""
        tokens = self.tokenize(texts)
        return self.encode_tokens(tokens, batch_size=batch_size, truncate=truncate)

    def encode_tokens(self, tokens: torch.Tensor, batch_size: int = 1000, truncate: bool = True) -> torch.Tensor:
        """Features of token ids; rows are grouped by length so every batch is cut to its own longest prompt."""
        order = self._length_order(tokens) if truncate else torch.arange(tokens.shape[0], device=tokens.device)
        features = None
        with torch.inference_mode(), self.autocast():
            for start in range(0, tokens.shape[0], batch_size):
                rows = order[start:start + batch_size]
                out = encode_tokens(self.model, tokens[rows], truncate=truncate).float()
                if features is None:
                    features = out.new_empty(tokens.shape[0], out.shape[1])
                features[rows] = out
                self.counters["text_batches"] += 1
        self.counters["texts_encoded"] += tokens.shape[0]
        return F.normalize(features, dim=-1)

    def _length_order(self, tokens: torch.Tensor) -> torch.Tensor:
        if self.text_tower is None:
            return torch.arange(tokens.shape[0], device=tokens.device)
        return torch.argsort(self.text_tower.pool_positions(tokens), stable=True)

    def class_embeddings(self, classnames: Sequence[str], templates: str | Sequence[str] | None = None) -> torch.Tensor:
        """Class text embeddings [C, D]: per-template normalised, averaged over templates, renormalised.

        Cached in memory on the model's device (and on disk when ``cache_dir`` was given), keyed
        by model identity, templates and class names.
        """
        classnames, templates = list(classnames), resolve_templates(templates)
        key = cache_key("class_embeddings", self.identity, templates, classnames)
        with self._lock:
            return self.text_cache.get_or_compute(key, lambda: self._build_class_embeddings(classnames, templates),
                                                  self.device)

    def _build_class_embeddings(self, classnames: list[str], templates: list[str]) -> torch.Tensor:
        texts = [template.replace("{}", name) for name in classnames for template in templates]
        features = self.encode_text(texts).view(len(classnames), len(templates), -1)
        return F.normalize(features.mean(dim=1), dim=-1)


_BACKBONES: dict[tuple, FrozenCLIP] = {}
_BACKBONES_LOCK = threading.Lock()


def load_backbone(model: str = "ViT-B-16", pretrained: str | None = AUTO_WEIGHTS, device: str | torch.device = "auto",
                  **options: Any) -> FrozenCLIP:
    """A shared ``FrozenCLIP``: built once per (model, weights, device, options) and reused."""
    key = (model, resolve_weights(model, pretrained)[2], str(resolve_device(device)), tuple(sorted(options.items())))
    with _BACKBONES_LOCK:
        if key not in _BACKBONES:
            _BACKBONES[key] = FrozenCLIP(model, pretrained, device, **options)
        return _BACKBONES[key]
