"""Argument checks shared by every public function: one place, one wording.

Each check returns the value converted to a plain Python type, or raises a
one-line ``ValueError`` that names the argument, what was given, and what
to pass instead. NumPy scalars are accepted wherever a Python number is.
"""

from __future__ import annotations

import math
import numbers
from collections.abc import Mapping


def check_int(name, value, minimum=None, maximum=None, hint=""):
    """A whole number (``int`` or NumPy integer, never ``bool``) within the bounds."""
    if isinstance(value, bool) or not isinstance(value, numbers.Integral):
        raise ValueError(f"{name} must be an integer{_bounds(minimum, maximum)}{hint}, got {value!r}.")
    value = int(value)
    if (minimum is not None and value < minimum) or (maximum is not None and value > maximum):
        raise ValueError(f"{name} must be an integer{_bounds(minimum, maximum)}{hint}, got {value!r}.")
    return value


def check_optional_int(name, value, minimum=None, maximum=None, hint=""):
    return None if value is None else check_int(name, value, minimum, maximum, hint)


def check_number(name, value, low=None, high=None, low_open=False, high_open=False, hint=""):
    """A finite real number (int, float or NumPy scalar) in the given interval."""
    interval = _interval(low, high, low_open, high_open)
    if isinstance(value, bool) or not isinstance(value, numbers.Real):
        raise ValueError(f"{name} must be a number{interval}{hint}, got {value!r}.")
    value = float(value)
    bad = math.isnan(value) or math.isinf(value)
    if low is not None:
        bad = bad or value < low or (low_open and value == low)
    if high is not None:
        bad = bad or value > high or (high_open and value == high)
    if bad:
        raise ValueError(f"{name} must be a number{interval}{hint}, got {value!r}.")
    return value


def check_sparsity(value, name="sparsity"):
    """A sparsity: the fraction of weights set to zero, in [0, 1)."""
    return check_number(name, value, 0.0, 1.0, high_open=True, hint=" (the fraction of weights set to zero; 0.9 keeps 10%)")


def check_seed(value, name="seed"):
    """``None`` or a non-negative integer (NumPy's seeding rules)."""
    if value is None:
        return None
    return check_int(name, value, 0, hint=" (or None)")


def check_choice(name, value, choices):
    """One of ``choices`` (strings)."""
    if not isinstance(value, str) or value not in choices:
        raise ValueError(f"Unknown {name} {value!r}; use one of {', '.join(repr(c) for c in choices)}.")
    return value


def check_bool(name, value):
    if not isinstance(value, (bool,)) and not (hasattr(value, "dtype") and getattr(value.dtype, "kind", "") == "b"):
        raise ValueError(f"{name} must be True or False, got {value!r}.")
    return bool(value)


def check_per_layer(value, name="per_layer"):
    """``None`` or a mapping ``{layer or "layer/weight" name: sparsity}``; returns a plain dict."""
    if value is None:
        return {}
    if not isinstance(value, Mapping):
        example = next((v for v in value if isinstance(v, str)), "dense") if isinstance(value, (list, tuple, set)) else "dense"
        raise ValueError(
            f"{name} must be a dict of {{layer name: sparsity}}, e.g. {{{example!r}: 0.5}}; "
            f"got {type(value).__name__} {value!r}."
        )
    for key, sparsity in value.items():
        if not isinstance(key, str):
            raise ValueError(f"{name} keys must be layer names (str), e.g. {{'dense': 0.5}}; got {key!r}.")
        check_sparsity(sparsity, f"{name}[{key!r}]")
    return dict(value)


def _bounds(minimum, maximum):
    if minimum is not None and maximum is not None:
        return f" in [{minimum}, {maximum}]"
    if minimum is not None:
        return f" >= {minimum}"
    if maximum is not None:
        return f" <= {maximum}"
    return ""


def _interval(low, high, low_open, high_open):
    if low is None and high is None:
        return ""
    left = "(" if low_open else "["
    right = ")" if high_open else "]"
    low_text = "-inf" if low is None else f"{low:g}"
    high_text = "inf" if high is None else f"{high:g}"
    return f" in {left}{low_text}, {high_text}{right}"
