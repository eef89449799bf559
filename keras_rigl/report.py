"""``sparsity_report``: one row per kernel of a model, masked or not, as a pandas DataFrame.

The counting itself is :func:`keras_rigl.counting.kernel_counts`; this module
only lays it out, and prints it within 80 columns.
"""

from __future__ import annotations

import pandas as pd

from keras_rigl import counting

COLUMNS = [
    "layer",
    "weight",
    "shape",
    "params",
    "active",
    "sparsity",
    "masked",
    "dense_flops",
    "sparse_flops",
]
WIDTH = 80  # the printed report fits a standard terminal


class SparsityReport(pd.DataFrame):
    """The report's DataFrame; printing it shows the key columns and a total row within 80 columns.

    Slicing or transforming it gives a plain ``pandas.DataFrame``.
    """

    @property
    def _constructor(self):
        return pd.DataFrame

    def __repr__(self):
        return format_report(self)

    def __str__(self):
        return format_report(self)


def sparsity_report(model):
    """Per kernel of ``model``: shape, whether masked, parameters, active count, sparsity, forward FLOPs.

    Every kernel the maskable registry knows is listed (depthwise kernels and
    the kernels of excluded layers too); the unmasked ones have
    ``masked=False`` and count as dense, so the totals describe the whole
    model. FLOPs are per example (2 per multiply-add, kernels only; see
    :mod:`keras_rigl.counting`) and ``None`` where the layer's output size is
    not known (e.g. a variable-length sequence).

    ``df.attrs`` holds the totals: ``params``, ``active``, ``sparsity`` (all
    kernels listed), ``masked_params``, ``masked_active``, ``masked_sparsity``
    (the masked weights only: what ``sparsify``'s ``sparsity`` aims at),
    ``dense_flops`` and ``sparse_flops`` (kernels of known FLOPs).
    ``print(df)`` shows the key columns and a total row within 80 columns.
    """
    rows = [
        {
            "layer": k.layer,
            "weight": k.weight,
            "shape": k.shape,
            "masked": k.masked,
            "params": k.params,
            "active": k.active,
            "sparsity": 1.0 - k.active / k.params if k.params else 0.0,
            "dense_flops": k.dense_flops,
            "sparse_flops": k.sparse_flops,
        }
        for k in counting.kernel_counts(model)
    ]
    df = SparsityReport(rows, columns=COLUMNS)
    masked = [r for r in rows if r["masked"]]
    known = [r for r in rows if r["dense_flops"] is not None]
    params, active = sum(r["params"] for r in rows), sum(r["active"] for r in rows)
    masked_params, masked_active = sum(r["params"] for r in masked), sum(r["active"] for r in masked)
    df.attrs.update(
        params=params,
        active=active,
        sparsity=1.0 - active / params if params else 0.0,
        masked_params=masked_params,
        masked_active=masked_active,
        masked_sparsity=1.0 - masked_active / masked_params if masked_params else 0.0,
        dense_flops=sum(r["dense_flops"] for r in known),
        sparse_flops=sum(r["sparse_flops"] for r in known),
    )
    return df


def _fit(text, width):
    """``text`` cut to ``width`` characters, keeping both ends (names differ at either), the end more."""
    if len(text) <= width:
        return text
    head = (width - 1) // 3
    return text[:head] + "~" + text[len(text) - (width - 1 - head) :]


def format_report(df, width=WIDTH):
    """The report as text: layer, weight, shape, masked, active/params, sparsity, and a total row.

    Long layer and weight names are shortened in the middle (``~``) so that
    every line fits in ``width`` columns.
    """
    attrs = df.attrs
    body = [
        [
            str(r.layer),
            str(r.weight),
            "x".join(str(d) for d in r.shape),
            "yes" if r.masked else "dense",
            f"{r.active:,}/{r.params:,}",
            f"{100 * r.sparsity:.1f}%",
        ]
        for r in df.itertuples()
    ]
    total = [
        "total",
        "",
        "",
        "",
        f"{attrs.get('active', 0):,}/{attrs.get('params', 0):,}",
        f"{100 * attrs.get('sparsity', 0.0):.1f}%",
    ]
    header = ["layer", "weight", "shape", "masked", "active/params", "sparsity"]
    table = [header, *body, total]
    widths = [max(len(row[i]) for row in table) for i in range(len(header))]
    gaps = 2 * (len(header) - 1)
    # shapes are short; give up layer/weight width first, the longer one first
    while sum(widths) + gaps > width and max(widths[0], widths[1]) > 8:
        i = 0 if widths[0] >= widths[1] else 1
        widths[i] -= 1
    if sum(widths) + gaps > width:
        widths[2] = max(5, width - gaps - sum(widths) + widths[2])
    right = {4, 5}
    lines = []
    for row in table:
        cells = [_fit(cell, w) for cell, w in zip(row, widths)]
        cells = [c.rjust(w) if i in right else c.ljust(w) for i, (c, w) in enumerate(zip(cells, widths))]
        lines.append("  ".join(cells).rstrip())
    lines.insert(1, "-" * min(width, sum(widths) + gaps))
    lines.insert(len(lines) - 1, "-" * min(width, sum(widths) + gaps))
    summary = (
        f"masked weights: {attrs.get('masked_active', 0):,}/{attrs.get('masked_params', 0):,} active "
        f"(sparsity {100 * attrs.get('masked_sparsity', 0.0):.1f}%)"
    )
    flops = (
        f"forward FLOPs/example: {attrs.get('sparse_flops', 0):,} sparse, {attrs.get('dense_flops', 0):,} dense"
    )
    lines += [_fit(summary, width), _fit(flops, width)]
    return "\n".join(lines)
