"""Registered test-time adaptation methods (importing this package registers them all)."""
from .base import Context, Method, Need, create_method, get_method_class, list_methods, method_names, register
from . import adte, bca, boostadapter, difftpt, dmn, dota, ecalp, mta, onzeta, sts, subtta, tca, tda, tpt, zero, zeroshot  # noqa: F401

__all__ = ["Context", "Method", "Need", "create_method", "get_method_class", "list_methods", "method_names", "register"]
