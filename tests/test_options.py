"""Method options parsed by their declared types (``vlmtta.options``), for every registered method and the CLI."""
from __future__ import annotations

import enum
import inspect
import json
import math
from pathlib import Path
from typing import Any, Callable, Literal

import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st

from vlmtta.cli import main
from vlmtta.methods import check_options, create_method, get_method_class, method_names
from vlmtta.options import FALSE_WORDS, NONE_WORDS, TRUE_WORDS, OptionTypeError, option_hints, parse_options, parse_value

REGISTERED = method_names()


def as_text(value: Any) -> str:
    """How a user writes ``value`` after ``-o key=``."""
    if value is None:
        return "none"
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, (tuple, list)):
        return ",".join(as_text(item) for item in value)
    return str(value)


def wrong_text(hint: Any) -> str | None:
    """A string of the wrong type for ``hint`` (None when every string fits, e.g. ``str``)."""
    return {int: "2.7", bool: "maybe", float: "x"}.get(hint)


# ---- every registered method --------------------------------------------------------------------------
@pytest.mark.parametrize("name", REGISTERED)
def test_every_option_is_typed_and_its_default_parses_from_text(name):
    cls = get_method_class(name)
    params = {p.name: p for p in inspect.signature(cls.__init__).parameters.values() if p.name != "self"}
    hints = option_hints(cls.__init__)
    for key, default in cls.defaults().items():
        assert params[key].annotation is not inspect.Parameter.empty, f"{name}.{key} has no type hint"
        assert parse_value(default, hints[key]) == default, f"{name}.{key}: the default does not fit its hint"
        parsed = check_options(name, **{key: as_text(default)})[key]
        assert parsed == default and type(parsed) is type(default), f"{name}.{key}: {as_text(default)!r} -> {parsed!r}"


@pytest.mark.parametrize("name", REGISTERED)
def test_every_option_rejects_a_wrong_type_in_one_line(name):
    cls = get_method_class(name)
    hints = option_hints(cls.__init__)
    checked = 0
    for key in cls.defaults():
        bad = wrong_text(hints[key])
        if bad is None:
            continue
        with pytest.raises(ValueError) as caught:
            check_options(name, **{key: bad})
        message = str(caught.value)
        assert "\n" not in message and f"'{name}'" in message and f"{key}='{bad}'" in message and "expected" in message
        checked += 1
    assert checked or not any(h in (int, bool, float) for h in hints.values())


def test_false_is_false_and_integers_stay_integers():
    adte = create_method("adte", label_adjust="false", n_views="4", q_range="(0.1, 0.5)")
    assert adte.label_adjust is False and adte.n_views == 4 and adte.q_range == (0.1, 0.5)
    assert create_method("adte", label_adjust="YES").label_adjust is True
    assert create_method("tca", layers="3,6", code_drop_rate="None").layers == (3, 6)
    assert create_method("tca", code_drop_rate="0.035").code_drop_rate == 0.035
    with pytest.raises(ValueError, match=r"Method 'tpt': option lr='x' is not valid: expected a number"):
        create_method("tpt", lr="x")
    with pytest.raises(ValueError, match=r"option n_views=2.7 is not valid: expected an integer"):
        create_method("zero", n_views=2.7)  # a Python float is not silently truncated either
    with pytest.raises(ValueError, match="expected 2 comma-separated values"):
        create_method("adte", q_range="0.1,0.2,0.3")


# ---- the parser's rules -----------------------------------------------------------------------------
@given(st.integers(), st.sampled_from(["{}", " {} ", "+{}"]))
def test_integers_parse_from_their_text(value, form):
    text = form.format(value) if value >= 0 or "+" not in form else str(value)
    assert parse_value(text, int) == value and parse_value(value, int) == value


@given(st.floats(allow_nan=False))
def test_floats_parse_from_their_repr_and_ints_are_floats(value):
    assert parse_value(repr(value), float) == value and parse_value(value, float) == value
    assert type(parse_value(3, float)) is float


@given(st.floats(allow_nan=False))
def test_no_float_is_an_integer(value):
    with pytest.raises(OptionTypeError):
        parse_value(value, int)
    if not value.is_integer():
        with pytest.raises(OptionTypeError):
            parse_value(repr(value), int)


@given(st.sampled_from(sorted(TRUE_WORDS | FALSE_WORDS)), st.lists(st.booleans(), min_size=5, max_size=5),
       st.sampled_from(["", " ", "\t"]))
def test_boolean_words_in_any_case(word, upper, pad):
    cased = "".join(c.upper() if up else c for c, up in zip(word, upper + [False] * len(word)))
    assert parse_value(pad + cased + pad, bool) is (word in TRUE_WORDS)


@given(st.text())
def test_other_text_is_not_a_boolean(text):
    if text.strip().lower() in TRUE_WORDS | FALSE_WORDS:
        return
    with pytest.raises(OptionTypeError, match="boolean"):
        parse_value(text, bool)


@given(st.one_of(st.integers().filter(lambda v: v not in (0, 1)), st.floats(), st.none()))
def test_only_zero_and_one_are_boolean_numbers(value):
    with pytest.raises(OptionTypeError):
        parse_value(value, bool)
    assert parse_value(1, bool) is True and parse_value(0, bool) is False


@given(st.text())
def test_text_that_float_rejects_is_an_error(text):
    try:
        expected = float(text.strip())
    except ValueError:
        with pytest.raises(OptionTypeError, match="a number"):
            parse_value(text, float)
    else:
        got = parse_value(text, float)
        assert got == expected or (math.isnan(got) and math.isnan(expected))


@given(st.text())
def test_strings_stay_strings_and_optional_strings_read_none(text):
    assert parse_value(text, str) == text
    expected = None if text.strip().lower() in NONE_WORDS else text
    assert parse_value(text, str | None) == expected


@given(st.lists(st.integers(), max_size=6), st.sampled_from(["{}", "({})", "[{}]", " ( {} ) "]),
       st.sampled_from([",", ", ", " ,"]))
def test_integer_tuples_from_comma_lists(values, brackets, sep):
    text = brackets.format(sep.join(map(str, values)))
    assert parse_value(text, tuple[int, ...]) == tuple(values)
    assert parse_value(list(values), tuple[int, ...]) == tuple(values)
    assert parse_value(text, list[int]) == list(values)


@given(st.floats(allow_nan=False, allow_infinity=False), st.floats(allow_nan=False, allow_infinity=False))
def test_fixed_length_tuples(a, b):
    assert parse_value(f"{a!r},{b!r}", tuple[float, float]) == (a, b)
    with pytest.raises(OptionTypeError):
        parse_value(f"{a!r}", tuple[float, float])
    with pytest.raises(OptionTypeError):
        parse_value(f"{a!r},{b!r},{a!r}", tuple[float, float])


@given(st.one_of(st.integers(), st.none()))
def test_optional_integers(value):
    assert parse_value(as_text(value), int | None) == value
    assert parse_value(value, int | None) == value


class Colour(enum.Enum):
    RED = "red"


def _typed(mode: Literal["a", "b"] = "a", k: Literal[1, 2] = 1, path: Path | None = None,
           colour: Colour = Colour.RED, hook: Callable[[int], int] | None = None, free: Any = None, bare=None):
    """A function with the hint forms methods may use."""


def test_literal_class_and_unknown_hints():
    parsed = parse_options("demo", _typed, {"mode": "b", "k": "2", "path": "/tmp/x", "colour": "red",
                                            "hook": abs, "free": "3", "bare": "4"})
    assert parsed == {"mode": "b", "k": 2, "path": Path("/tmp/x"), "colour": Colour.RED, "hook": abs,
                      "free": "3", "bare": "4"}
    with pytest.raises(ValueError, match=r"Method 'demo': option mode='c' is not valid: expected one of 'a', 'b'"):
        parse_options("demo", _typed, {"mode": "c"})
    with pytest.raises(ValueError, match="expected one of 1, 2"):
        parse_options("demo", _typed, {"k": "3"})


# ---- the command line --------------------------------------------------------------------------------
@pytest.fixture
def features_file(tmp_path):
    g = torch.Generator().manual_seed(0)
    text = torch.nn.functional.normalize(torch.randn(3, 8, generator=g), dim=-1)
    images = torch.nn.functional.normalize(text[torch.arange(12) % 3] + 0.3 * torch.randn(12, 8, generator=g), dim=-1)
    path = tmp_path / "stream.pt"
    torch.save({"image_features": images, "labels": torch.arange(12) % 3, "text_features": text,
                "classnames": ["a", "b", "c"]}, path)
    return path


def test_cli_options_are_typed(features_file, tmp_path, capsys):
    results = tmp_path / "results"
    args = ["bench", "--features", str(features_file), "--methods", "adte", "--results", str(results), "--no-progress"]
    assert main(args + ["-o", "n_views=1", "-o", "label_adjust=FALSE"]) == 0
    saved = json.loads(next(results.glob("*adte*.json")).read_text())
    assert saved["protocol"]["hyperparameters"]["label_adjust"] is False
    capsys.readouterr()
    for bad in ("label_adjust=maybe", "n_views=2.7", "ratio=x"):
        assert main(args + ["--force", "-o", bad]) == 2
        err = capsys.readouterr().err
        assert err.count("\n") == 1 and "Method 'adte'" in err and bad.split("=")[0] in err, err


def test_cli_checks_every_method_before_running_any(features_file, tmp_path, capsys):
    results = tmp_path / "results"
    code = main(["bench", "--features", str(features_file), "--methods", "zeroshot,adte", "--results", str(results),
                 "--no-progress", "-o", "n_views=1.5"])
    assert code == 2 and "Method 'zeroshot'" in capsys.readouterr().err
    assert not list(results.glob("*.json"))  # nothing ran


# ---- options of a run of several methods: key for all, method.key for one ------------------------------------------
def test_scoped_options_reach_their_method_only():
    from vlmtta.options import check_option_scopes, narrow_options, scoped_options

    given = {"n_views": "16", "rlcf.reward_model": "vlmtta-testbed", "tpt.n_views": "8", "tpt.lr": "0.01"}
    assert scoped_options("rlcf", given) == {"n_views": "16", "reward_model": "vlmtta-testbed"}
    assert scoped_options("tpt", given) == {"n_views": "8", "lr": "0.01"}  # its own key wins over the plain one
    assert scoped_options("zero", given) == {"n_views": "16"}
    assert narrow_options(given, ["tpt"]) == {"n_views": "16", "tpt.n_views": "8", "tpt.lr": "0.01"}
    check_option_scopes(given, ["rlcf", "tpt", "zero"])
    for bad, methods in (({"rlfc.reward_model": "x"}, ["rlcf"]), ({"tpt.": "1"}, ["tpt"])):
        with pytest.raises(ValueError, match="scoped to"):
            check_option_scopes(bad, methods)


def test_cli_scoped_option_applies_to_one_method_of_a_testbed_run(tmp_path, capsys):
    common = ["bench", "--suite", "testbed", "--n-per-corruption", "2", "--results", str(tmp_path), "--no-progress"]
    assert main([*common, "--methods", "zeroshot,ensemble", "-o", "ensemble.n_views=2"]) == 0
    names = [p.name for p in (tmp_path / "testbed").glob("*.json")]
    assert sum("__ensemble+n-views-2__" in n for n in names) == 11 and sum("__zeroshot__" in n for n in names) == 11
    assert main([*common, "--methods", "zeroshot", "-o", "ensembel.n_views=2"]) == 2
    assert "scoped to 'ensembel'" in capsys.readouterr().err


def test_scoped_options_in_a_features_run_and_its_grid(tmp_path, features_file):
    """The sequential runner and the grid's cells give each method only its own options; a stray scope is refused."""
    from vlmtta.bench import BenchSpec, run_bench
    from vlmtta.grid import plan

    path = features_file
    spec = BenchSpec(methods=["zeroshot", "tda"], results_dir=tmp_path / "r", features=path, progress=False,
                     options={"tda.shot_capacity": "2"})
    results = {r["method"]: r for r in run_bench(spec)}
    assert results["tda"]["protocol"]["hyperparameters"]["shot_capacity"] == 2
    assert "shot_capacity" not in results["zeroshot"]["protocol"]["hyperparameters"]
    cells = plan([spec]).cells
    assert [c.spec.options for c in cells] == [{}, {"tda.shot_capacity": "2"}]
    stray = BenchSpec(methods=["zeroshot"], results_dir=tmp_path / "r2", features=path, progress=False,
                      options={"tda.shot_capacity": "2"})
    with pytest.raises(ValueError, match="scoped to 'tda'"):
        run_bench(stray)
    with pytest.raises(ValueError, match="scoped to 'tda'"):
        plan([stray])
