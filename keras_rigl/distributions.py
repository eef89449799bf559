"""Per-layer sparsity distributions of the RigL paper: uniform, ER and ERK.

Pure functions over ``{weight name: shape}``; no Keras involved.

* uniform: every weight gets the target sparsity, except the first one,
  which stays dense (the paper's convention for uniform).
* Erdős–Rényi (ER): density proportional to (n_in + n_out) / (n_in * n_out),
  with n_in, n_out the last two dimensions of the weight (input and output
  channels / units).
* Erdős–Rényi-Kernel (ERK): density proportional to sum(shape) / prod(shape),
  so kernel sizes count too.

For ER/ERK the scale factor is solved so that the total number of active
weights equals the target; a weight whose density would exceed 1 is made
dense and the scale is solved again for the rest, until no density exceeds 1.
Weights with an explicit sparsity (``per_layer``) keep it and the others make
up the difference.
"""

from __future__ import annotations

import math

DISTRIBUTIONS = ("erk", "er", "uniform")


def check_sparsity(sparsity, what="sparsity"):
    try:
        value = float(sparsity)
    except (TypeError, ValueError):
        raise ValueError(f"{what} must be a number in [0, 1), got {sparsity!r}.") from None
    if not 0.0 <= value < 1.0 or math.isnan(value):
        raise ValueError(
            f"{what} must be in [0, 1) (the fraction of weights set to zero; 0.9 keeps 10%), "
            f"got {sparsity!r}."
        )
    return value


def raw_density(shape, distribution):
    """Unscaled density of ER/ERK for a weight of ``shape``."""
    shape = [int(d) for d in shape]
    if distribution == "erk":
        return sum(shape) / math.prod(shape)
    if distribution == "er":
        if len(shape) < 2:
            return 1.0
        n_in, n_out = shape[-2], shape[-1]
        return (n_in + n_out) / (n_in * n_out)
    raise ValueError(f"raw_density is defined for 'er' and 'erk', not {distribution!r}.")


def layer_densities(shapes, sparsity, distribution="erk", per_layer=None):
    """Density (fraction kept) of every weight in ``shapes``.

    Args:
        shapes: ordered ``{name: shape}`` of the weights to mask.
        sparsity: target overall sparsity in [0, 1) over all of them.
        distribution: ``"erk"``, ``"er"`` or ``"uniform"``.
        per_layer: ``{name: sparsity}`` fixed for those weights.

    Returns:
        ``{name: density}`` in the order of ``shapes``.
    """
    sparsity = check_sparsity(sparsity)
    if distribution not in DISTRIBUTIONS:
        raise ValueError(
            f"Unknown distribution {distribution!r}; use one of {', '.join(DISTRIBUTIONS)}."
        )
    per_layer = dict(per_layer or {})
    unknown = set(per_layer) - set(shapes)
    if unknown:
        raise ValueError(f"per_layer names {sorted(unknown)} are not among the masked weights {list(shapes)}.")
    fixed = {name: 1.0 - check_sparsity(s, f"per_layer[{name!r}]") for name, s in per_layer.items()}
    names = list(shapes)
    if distribution == "uniform":
        densities = {}
        for i, name in enumerate(names):
            if name in fixed:
                densities[name] = fixed[name]
            elif i == 0:
                densities[name] = 1.0
            else:
                densities[name] = 1.0 - sparsity
        return densities
    return erk_densities(shapes, sparsity, fixed, kernel=(distribution == "erk"))


def erk_densities(shapes, sparsity, fixed_densities=None, kernel=True):
    """Solve the ER(K) scale so that the active total hits the target.

    Args:
        shapes: ``{name: shape}``.
        sparsity: overall target sparsity.
        fixed_densities: ``{name: density}`` that are not solved for.
        kernel: ERK (True) or ER (False).
    """
    fixed = dict(fixed_densities or {})
    sizes = {name: math.prod(int(d) for d in shape) for name, shape in shapes.items()}
    target_active = (1.0 - sparsity) * sum(sizes.values())
    free = [n for n in shapes if n not in fixed]
    remaining = target_active - sum(fixed[n] * sizes[n] for n in fixed)
    if free and remaining <= 0:
        raise ValueError(
            f"The per_layer sparsities keep {target_active - remaining:.0f} weights active, more than "
            f"the {target_active:.0f} that sparsity={sparsity} allows in total; lower them or raise sparsity."
        )
    raw = {n: raw_density(shapes[n], "erk" if kernel else "er") for n in free}
    dense = set()
    while True:
        solving = [n for n in free if n not in dense]
        if not solving:
            break
        rhs = remaining - sum(sizes[n] for n in dense)
        divisor = sum(raw[n] * sizes[n] for n in solving)
        eps = rhs / divisor
        max_raw = max(raw[n] for n in solving)
        if eps * max_raw > 1.0:
            dense.update(n for n in solving if raw[n] == max_raw)
            continue
        break
    densities = {}
    for n in shapes:
        if n in fixed:
            densities[n] = fixed[n]
        elif n in dense:
            densities[n] = 1.0
        else:
            densities[n] = eps * raw[n]
    if free and not [n for n in free if n not in dense] and remaining > sum(sizes[n] for n in free) + 1e-9:
        raise ValueError(
            "The per_layer sparsities leave fewer weights active than the target even with every "
            "other layer dense; raise the per_layer densities or the overall sparsity."
        )
    return densities


def active_counts(shapes, densities):
    """Number of active weights per name, summing exactly to the rounded target.

    Each weight gets floor(density * size) and the remaining units go to the
    largest fractional parts (largest-remainder rounding), so every count is
    within one of density * size and the total is round(sum density * size).
    """
    sizes = {n: math.prod(int(d) for d in shapes[n]) for n in shapes}
    exact = {n: densities[n] * sizes[n] for n in shapes}
    counts = {n: int(math.floor(exact[n] + 1e-9)) for n in shapes}
    missing = int(round(sum(exact.values()))) - sum(counts.values())
    by_remainder = sorted(shapes, key=lambda n: exact[n] - counts[n], reverse=True)
    for n in by_remainder:
        if missing <= 0:
            break
        if counts[n] < sizes[n]:
            counts[n] += 1
            missing -= 1
    return counts
