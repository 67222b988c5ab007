"""Registered test-time adaptation methods (importing this package registers them all)."""
from .base import Context, Method, Need, create_method, get_method_class, list_methods, method_names, register
from . import boostadapter, difftpt, dmn, subtta, tca, tda, tpt, zeroshot  # noqa: F401  (importing registers each)

__all__ = ["Context", "Method", "Need", "create_method", "get_method_class", "list_methods", "method_names", "register"]
