"""Registered test-time adaptation methods (importing this package registers them all)."""
from .base import Context, Method, Need, create_method, get_method_class, list_methods, method_names, register
from . import adte, boostadapter, deyo, difftpt, dmn, mta, sar, sts, subtta, tca, tda, tent, tpt, zero, zeroshot  # noqa: F401

__all__ = ["Context", "Method", "Need", "create_method", "get_method_class", "list_methods", "method_names", "register"]
