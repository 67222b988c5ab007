"""Method options parsed by their declared types: one rule for ``-o key=value`` strings and Python keywords.

Every method constructor argument carries a type hint; ``parse_options`` converts and validates the options given
to a constructor against those hints, so ``label_adjust="false"`` is ``False``, ``n_views="2.7"`` is an error (not
2) and ``lr="x"`` is a one-line error rather than a traceback.  Strings (from the command line) are parsed;
other values (from Python) are checked and normalised (``1`` for a float option is ``1.0``).

Accepted forms, by hint:

* ``bool``: ``True``/``False``, the integers 0 and 1, or the words true/false, yes/no, 1/0 in any case;
* ``int``: an integer (not a bool, not a float, even an integral one) or a string that parses as one;
* ``float``: any real number (not a bool) or a string that ``float()`` parses;
* ``str``: a string, unchanged;
* ``None`` in an optional hint (``X | None``): ``None`` or the words none/null in any case;
* ``Literal[...]``: one of the listed values (strings converted to the values' types);
* ``tuple[X, ...]``, ``tuple[X, Y]``, ``list[X]``: a sequence, or a comma-separated string, optionally in
  brackets (``3,6,9``, ``(3, 6, 9)``, ``[]``); each item by its own hint, fixed-length tuples by length;
* ``X | Y``: for a string, unchanged when ``str`` is one of the types, else the first type that parses it;
  for other values, the first type that accepts it;
* other classes: an instance, or a string the class can be built from (``Path``, enums);
* no hint, ``Any`` and hints this module does not know: the value as given.

A run of several methods takes one options dict: a plain ``key`` applies to every method, ``method.key`` to that
method only (and wins over a plain ``key``), e.g. ``-o n_views=16 -o rlcf.reward_model=vlmtta-testbed``.
"""
from __future__ import annotations

import enum
import inspect
import numbers
import types
import typing
from typing import Any, Callable, Literal, Union

TRUE_WORDS = frozenset({"true", "yes", "1"})
FALSE_WORDS = frozenset({"false", "no", "0"})
NONE_WORDS = frozenset({"none", "null"})


def scoped_options(method: str, options: dict[str, Any]) -> dict[str, Any]:
    """The options ``method`` gets from a run's ``options``: the plain keys, then its own ``method.key`` ones."""
    plain = {key: value for key, value in options.items() if "." not in key}
    own = {key.partition(".")[2]: value for key, value in options.items() if key.partition(".")[0] == method}
    return plain | own


def narrow_options(options: dict[str, Any], methods: list[str]) -> dict[str, Any]:
    """``options`` without the ``method.key`` entries of methods not in ``methods`` (a sub-run's options)."""
    return {key: value for key, value in options.items() if "." not in key or key.partition(".")[0] in methods}


def check_option_scopes(options: dict[str, Any], methods: list[str]) -> None:
    """A ``method.key`` option must name one of the run's ``methods`` (else it would silently apply to none)."""
    for key in options:
        scope, dot, name = key.partition(".")
        if dot and (scope not in methods or not name):
            raise ValueError(f"Option {key!r} is scoped to {scope!r}, which is not among the methods run "
                             f"({', '.join(methods)}); write method.key=value with one of them, or key=value for all.")


class OptionTypeError(ValueError):
    """A value that does not fit its option's declared type (``expected`` describes the type)."""

    def __init__(self, expected: str):
        super().__init__(expected)
        self.expected = expected


def option_hints(func: Callable[..., Any]) -> dict[str, Any]:
    """Type hints of ``func``'s parameters; ``Any`` for those without a hint or whose hint cannot be resolved."""
    params = [p for p in inspect.signature(func).parameters.values() if p.name != "self"]
    try:
        resolved = typing.get_type_hints(func)
    except Exception:  # an annotation naming something unavailable at run time: resolve them one by one
        resolved = {p.name: _resolve(p.annotation, getattr(func, "__globals__", {})) for p in params}
    return {p.name: resolved.get(p.name, Any) for p in params}


def _resolve(annotation: Any, namespace: dict[str, Any]) -> Any:
    if not isinstance(annotation, str):
        return annotation
    try:
        return eval(annotation, dict(namespace))  # what typing.get_type_hints does, one annotation at a time
    except Exception:
        return Any


def parse_options(owner: str, func: Callable[..., Any], options: dict[str, Any]) -> dict[str, Any]:
    """``options`` converted to the types ``func`` declares; a one-line ``ValueError`` naming ``owner``, the
    option, the value and the expected type on the first that does not fit."""
    hints = option_hints(func)
    parsed = {}
    for key, value in options.items():
        try:
            parsed[key] = parse_value(value, hints.get(key, Any))
        except OptionTypeError as error:
            raise ValueError(f"Method {owner!r}: option {key}={value!r} is not valid: expected {error.expected}.") from None
    return parsed


def parse_value(value: Any, hint: Any) -> Any:
    """``value`` converted to ``hint`` (see the module docstring); ``OptionTypeError`` if it does not fit."""
    if hint is Any or hint is inspect.Parameter.empty or isinstance(hint, (str, typing.ForwardRef)):
        return value
    origin = typing.get_origin(hint)
    if origin is Union or origin is types.UnionType:
        return _parse_union(value, typing.get_args(hint))
    if origin is Literal:
        return _parse_literal(value, typing.get_args(hint))
    if origin in (tuple, list):
        return _parse_sequence(value, origin, typing.get_args(hint))
    if hint is type(None):
        if value is None or (isinstance(value, str) and value.strip().lower() in NONE_WORDS):
            return None
        raise OptionTypeError("none")
    if hint in _SCALARS:
        return _SCALARS[hint](value)
    if isinstance(hint, type):
        return _parse_instance(value, hint)
    return value  # a hint this module does not know (Callable, TypeVar, ...): as given


def describe(hint: Any) -> str:
    """A short human description of ``hint`` for error messages."""
    origin, args = typing.get_origin(hint), typing.get_args(hint)
    if origin is Union or origin is types.UnionType:
        return " or ".join(describe(arg) for arg in args)
    if origin is Literal:
        return "one of " + ", ".join(repr(arg) for arg in args)
    if origin in (tuple, list):
        if not args or (len(args) == 2 and args[1] is Ellipsis):
            item = describe(args[0]) if args else "value"
            return f"a comma-separated list of {item} items"
        return f"{len(args)} comma-separated values ({', '.join(describe(arg) for arg in args)})"
    if hint is type(None):
        return "none"
    return _NAMES.get(hint, getattr(hint, "__name__", str(hint)))


def _parse_bool(value: Any) -> bool:
    if isinstance(value, bool):
        return value
    if isinstance(value, numbers.Integral) and value in (0, 1):
        return bool(value)
    if type(value).__name__ == "bool_":  # numpy.bool_
        return bool(value)
    if isinstance(value, str):
        word = value.strip().lower()
        if word in TRUE_WORDS:
            return True
        if word in FALSE_WORDS:
            return False
    raise OptionTypeError(describe(bool))


def _parse_int(value: Any) -> int:
    if isinstance(value, numbers.Integral) and not isinstance(value, bool):
        return int(value)
    if isinstance(value, str):
        try:
            return int(value.strip())
        except ValueError:
            pass
    raise OptionTypeError(describe(int))


def _parse_float(value: Any) -> float:
    if isinstance(value, numbers.Real) and not isinstance(value, bool):
        return float(value)
    if isinstance(value, str):
        try:
            return float(value.strip())
        except ValueError:
            pass
    raise OptionTypeError(describe(float))


def _parse_str(value: Any) -> str:
    if isinstance(value, str):
        return value
    raise OptionTypeError(describe(str))


_SCALARS: dict[type, Callable[[Any], Any]] = {bool: _parse_bool, int: _parse_int, float: _parse_float, str: _parse_str}
_NAMES = {bool: "a boolean (true/false, yes/no, 1/0)", int: "an integer", float: "a number", str: "a string"}


def _parse_union(value: Any, args: tuple[Any, ...]) -> Any:
    if type(None) in args and (value is None or (isinstance(value, str) and value.strip().lower() in NONE_WORDS)):
        return None
    if isinstance(value, str) and str in args:
        return value
    for arg in args:
        if arg is type(None):
            continue
        try:
            return parse_value(value, arg)
        except OptionTypeError:
            continue
    raise OptionTypeError(describe(Union[args]))


def _parse_literal(value: Any, allowed: tuple[Any, ...]) -> Any:
    for choice in allowed:
        try:
            if parse_value(value, type(choice)) == choice:
                return choice
        except OptionTypeError:
            continue
    raise OptionTypeError(describe(Literal[allowed]))


def _parse_sequence(value: Any, origin: type, args: tuple[Any, ...]) -> tuple[Any, ...] | list[Any]:
    if isinstance(value, str):
        text = value.strip()
        if text[:1] + text[-1:] in ("()", "[]"):
            text = text[1:-1]
        items: list[Any] = [item.strip() for item in text.split(",")] if text.strip() else []
        if items and items[-1] == "":  # a trailing comma: "3," is a one-item list
            items.pop()
    elif isinstance(value, (tuple, list)):
        items = list(value)
    else:
        raise OptionTypeError(describe(origin[args] if args else origin))
    if origin is list or not args or (len(args) == 2 and args[1] is Ellipsis):
        item_hint = args[0] if args else Any
        hints = [item_hint] * len(items)
    else:
        if len(items) != len(args):
            raise OptionTypeError(describe(tuple[args]))
        hints = list(args)
    try:
        converted = [parse_value(item, hint) for item, hint in zip(items, hints)]
    except OptionTypeError:
        raise OptionTypeError(describe(origin[args] if args else origin)) from None
    return tuple(converted) if origin is tuple else converted


def _parse_instance(value: Any, cls: type) -> Any:
    if isinstance(value, cls):
        return value
    if isinstance(value, str):
        if issubclass(cls, enum.Enum) and value in cls.__members__:
            return cls[value]
        try:
            return cls(value)
        except Exception:
            pass
    raise OptionTypeError(describe(cls))
