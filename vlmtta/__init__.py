"""vlmtta: test-time adaptation for CLIP-style vision-language models.

>>> import vlmtta
>>> vlmtta.list_methods()                                            # doctest: +SKIP
>>> vlmtta.predict("dog.jpg", ["cat", "dog"], method="zeroshot")     # doctest: +SKIP

The public names are imported on first use, so ``import vlmtta`` (and ``vlmtta --version``)
does not pay for importing torch and open_clip until something needs them.
"""
from __future__ import annotations

import importlib
from typing import Any

from .version import __version__

_EXPORTS = {
    "Adapter": ".api", "Prediction": ".api", "predict": ".api",
    "FrozenCLIP": ".backbone", "load_backbone": ".backbone",
    "Method": ".methods", "Need": ".methods", "list_methods": ".methods", "register": ".methods",
}
__all__ = sorted([*_EXPORTS, "__version__"])


def __getattr__(name: str) -> Any:
    if name in _EXPORTS:
        value = getattr(importlib.import_module(_EXPORTS[name], __name__), name)
        globals()[name] = value
        return value
    raise AttributeError(f"module 'vlmtta' has no attribute {name!r}")


def __dir__() -> list[str]:
    return sorted([*globals(), *_EXPORTS])
