"""vlmtta: test-time adaptation for CLIP-style vision-language models.

>>> import vlmtta
>>> vlmtta.list_methods()                                            # doctest: +SKIP
>>> vlmtta.predict("dog.jpg", ["cat", "dog"], method="zeroshot")     # doctest: +SKIP
"""
from .api import Adapter, Prediction, predict
from .backbone import FrozenCLIP, load_backbone
from .methods import Method, Need, list_methods, register
from .version import __version__

__all__ = ["Adapter", "FrozenCLIP", "Method", "Need", "Prediction", "__version__", "list_methods", "load_backbone",
           "predict", "register"]
