"""Argument parsing shared by scripts/train.py and scripts/compare.py."""

from __future__ import annotations

import argparse


def ranged(kind, lo=None, hi=None, lo_open=False, hi_open=False, what=""):
    def parse(text):
        try:
            value = kind(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"{text!r} is not a valid {kind.__name__}{what}") from None
        if lo is not None and (value < lo or (lo_open and value == lo)):
            raise argparse.ArgumentTypeError(f"{text} is out of range{what}")
        if hi is not None and (value > hi or (hi_open and value == hi)):
            raise argparse.ArgumentTypeError(f"{text} is out of range{what}")
        return value

    return parse


class HelpFormatter(argparse.RawDescriptionHelpFormatter, argparse.ArgumentDefaultsHelpFormatter):
    """The script's docstring as written, and every flag's default in --help."""


def structure_arg(text):
    """``--structure``: the library's spelling of a structure ("none" for unstructured), or exit 2 naming the forms."""
    from rigl_harness.runner import canonical_structure

    try:
        return canonical_structure(text)
    except ValueError as err:
        raise argparse.ArgumentTypeError(str(err)) from None


def structures_arg(text):
    """``--structures``: a comma-separated list of :func:`structure_arg` values, each once, in order."""
    values = [structure_arg(v) for v in text.split(",") if v.strip()]
    if not values:
        raise argparse.ArgumentTypeError("empty list of structures; use e.g. none,1x4,2:4,fan_in")
    return list(dict.fromkeys(values))


def layer_names_arg(text):
    """``--unstructured-layers``: comma-separated layer names, each once, in order (empty: none)."""
    return tuple(dict.fromkeys(name.strip() for name in text.split(",") if name.strip()))
