"""Registered test-time adaptation methods (importing this package registers them all)."""
from .base import Context, Method, Need, check_options, create_method, get_method_class, list_methods, method_names, register
from . import (adte, batclip, bca, boostadapter, clipartt, deyo, difftpt, dmn, dota, dpe, dynaprompt, ecalp, freetta,  # noqa: F401
               mta, oga, onzeta, otpt, rlcf, rtpt, sar, sts, subtta, tca, tda, tent, tps, tpt, watt, zero, zeroshot)

__all__ = ["Context", "Method", "Need", "check_options", "create_method", "get_method_class", "list_methods", "method_names", "register"]
