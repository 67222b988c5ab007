"""Registered test-time adaptation methods (importing this package registers them all)."""
from .base import Context, Method, Need, check_options, create_method, get_method_class, list_methods, method_names, register
from . import adte, boostadapter, difftpt, dmn, dpe, dynaprompt, mta, otpt, rlcf, rtpt, sts, subtta, tca, tda, tps, tpt, zero, zeroshot  # noqa: F401

__all__ = ["Context", "Method", "Need", "check_options", "create_method", "get_method_class", "list_methods", "method_names", "register"]
