"""Per-layer sparsity distributions of the RigL paper: uniform, ER and ERK.

Pure functions over ``{weight name: shape}``; no Keras involved.

* uniform: every weight gets the target sparsity, except the first one,
  which stays dense (the paper's convention for uniform; the total sparsity
  is then a little below the target).
* Erdős–Rényi (ER): density proportional to (n_in + n_out) / (n_in * n_out),
  with n_in, n_out the last two dimensions of the weight (input and output
  channels / units).
* Erdős–Rényi-Kernel (ERK): density proportional to sum(shape) / prod(shape),
  so kernel sizes count too.

For ER/ERK the scale factor is solved so that the total number of active
weights equals the target; a weight whose density would exceed 1 is made
dense and the scale is solved again for the rest, until no density exceeds 1.
Weights with an explicit sparsity (``per_layer``) keep it and the others make
up the difference, so that the total equals the target for every
distribution: with uniform, the first weight stays dense (unless fixed) and
the remaining ones share what is left equally. What cannot be made up (the
others would need a density above 1 or at most 0, or ``per_layer`` fixes
every weight at another total) is refused with the numbers.

Structured weights (:mod:`keras_rigl.structure`) add two things. A cap
(``max_densities``, N/M for "N:M"): ER/ERK treat it as they treat 1, i.e. a
weight whose density would exceed its cap is fixed at the cap and the rest
is solved again (the total stays exact); uniform and ``per_layer`` refuse a
density above the cap. And a unit (``units`` of :func:`active_counts`, k for
"1xk"): each count is a whole number of units, rounded as whole units by the
same largest-remainder rule, and the total is the achievable count nearest
to the target (for one structure everywhere: the target rounded to whole
blocks). A "1xk" weight whose inputs are not a multiple of k has blocks of
two sizes (k, and the r < k inputs left at the end of every row): its counts
are steps (``steps`` of :func:`active_counts`, :class:`BlockSteps`) that
split its blocks between the two sizes in proportion to their numbers, and
are rounded by the same rule, step by step, so each count is within one
block of its share and the total within half a block of the target.
"""

from __future__ import annotations

import math

from keras_rigl import validation

DISTRIBUTIONS = ("erk", "er", "uniform")


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


def layer_densities(shapes, sparsity, distribution="erk", per_layer=None, max_densities=None):
    """Density (fraction kept) of every weight in ``shapes``.

    Args:
        shapes: ordered ``{name: shape}`` of the weights to mask.
        sparsity: target overall sparsity in [0, 1) over all of them.
        distribution: ``"erk"``, ``"er"`` or ``"uniform"``.
        per_layer: ``{name: sparsity}`` fixed for those weights; the others
            make up the difference (see the module docstring), or a
            ValueError says why they cannot.
        max_densities: ``{name: cap}`` for structured weights (see the
            module docstring); missing names are capped at 1.

    Returns:
        ``{name: density}`` in the order of ``shapes``.
    """
    sparsity = validation.check_sparsity(sparsity)
    validation.check_choice("distribution", distribution, DISTRIBUTIONS)
    per_layer = validation.check_per_layer(per_layer)
    unknown = set(per_layer) - set(shapes)
    if unknown:
        raise ValueError(f"per_layer names {sorted(unknown)} are not among the masked weights {list(shapes)}.")
    fixed = {name: 1.0 - float(s) for name, s in per_layer.items()}
    caps = {name: float((max_densities or {}).get(name, 1.0)) for name in shapes}
    _check_caps(fixed, caps, "per_layer fixes")
    if distribution == "uniform":
        densities = _uniform_densities(shapes, sparsity, fixed)
        first = next(iter(shapes))
        if first not in fixed and per_layer == {} and densities[first] > caps[first]:
            densities[first] = caps[first]  # uniform's dense first weight: as dense as its structure allows
        _check_caps({n: d for n, d in densities.items() if n not in fixed}, caps, "uniform gives")
        return densities
    _check_fully_fixed(shapes, sparsity, fixed)
    return erk_densities(shapes, sparsity, fixed, kernel=(distribution == "erk"), max_densities=caps)


def _check_caps(densities, caps, what):
    over = {n: d for n, d in densities.items() if d > caps[n] + 1e-12}
    if over:
        name = next(iter(over))
        raise ValueError(
            f"{what} {name!r} a density of {over[name]:.4g}, above the {caps[name]:.4g} its structure allows; "
            f"use a sparsity of at least {1 - caps[name]:.4g} there."
        )


def _sizes(shapes):
    return {name: math.prod(int(d) for d in shape) for name, shape in shapes.items()}


def _check_fully_fixed(shapes, sparsity, densities, why="per_layer fixes every masked weight"):
    """Refuse densities fixed for every weight whose total is not the target (rounded to whole weights)."""
    if len(densities) < len(shapes):
        return
    sizes = _sizes(shapes)
    total = sum(sizes.values())
    kept = sum(densities[n] * sizes[n] for n in shapes)
    if round(kept) != round((1.0 - sparsity) * total):
        actual = 1.0 - kept / total
        raise ValueError(
            f"{why}, which gives an overall sparsity of {actual:.4g}, not sparsity={sparsity:g}; "
            f"pass sparsity={actual:.4g}, or leave a weight out of per_layer to make up the difference."
        )


def _uniform_densities(shapes, sparsity, fixed):
    """Uniform: the first weight dense (unless fixed), the others share the rest equally.

    Without ``fixed`` that is the paper's convention (every other weight at
    ``sparsity``); with it, the shares are solved so that the total is the target.
    """
    names = list(shapes)
    if not fixed:
        if len(names) == 1 and sparsity > 0:
            raise ValueError(
                f"uniform keeps the first masked weight dense, and {names[0]!r} is the only masked weight: "
                f"nothing would be sparse. Use distribution='erk', or per_layer={{{names[0]!r}: {sparsity:g}}}."
            )
        return {name: 1.0 if i == 0 else 1.0 - sparsity for i, name in enumerate(names)}
    densities = dict(fixed)
    densities.setdefault(names[0], 1.0)
    free = [n for n in names if n not in densities]
    if not free:
        why = "per_layer fixes every masked weight"
        if names[0] not in fixed:
            why += f" but the first ({names[0]!r}), which uniform keeps dense"
        _check_fully_fixed(shapes, sparsity, densities, why)
        return {n: densities[n] for n in names}
    sizes = _sizes(shapes)
    target = (1.0 - sparsity) * sum(sizes.values())
    kept = sum(densities[n] * sizes[n] for n in densities)
    share = (target - kept) / sum(sizes[n] for n in free)
    first_note = "" if names[0] in fixed else f" (with the first, {names[0]!r}, kept dense by uniform)"
    if share <= 0:
        raise ValueError(
            f"The per_layer sparsities{first_note} keep {kept:.0f} weights active, more than the "
            f"{target:.0f} that sparsity={sparsity:g} allows in total; lower them or raise sparsity."
        )
    if share > 1.0 + 1e-12:
        raise ValueError(
            f"The per_layer sparsities{first_note} leave fewer weights active than sparsity={sparsity:g} "
            "asks for, even with every other layer dense; lower the per_layer sparsities or raise sparsity."
        )
    densities.update({n: min(1.0, share) for n in free})
    return {n: densities[n] for n in names}


def erk_densities(shapes, sparsity, fixed_densities=None, kernel=True, max_densities=None):
    """Solve the ER(K) scale so that the active total hits the target.

    Args:
        shapes: ``{name: shape}``.
        sparsity: overall target sparsity.
        fixed_densities: ``{name: density}`` that are not solved for.
        kernel: ERK (True) or ER (False).
        max_densities: ``{name: cap}`` (default 1); a weight whose density
            would exceed its cap gets the cap and the others are solved again.
    """
    fixed = dict(fixed_densities or {})
    caps = {n: float((max_densities or {}).get(n, 1.0)) for n in shapes}
    sizes = _sizes(shapes)
    target_active = (1.0 - sparsity) * sum(sizes.values())
    free = [n for n in shapes if n not in fixed]
    remaining = target_active - sum(fixed[n] * sizes[n] for n in fixed)
    if free and remaining <= 0:
        raise ValueError(
            f"The per_layer sparsities keep {target_active - remaining:.0f} weights active, more than "
            f"the {target_active:.0f} that sparsity={sparsity:g} allows in total; lower them or raise sparsity."
        )
    raw = {n: raw_density(shapes[n], "erk" if kernel else "er") for n in free}
    dense = set()
    while True:
        solving = [n for n in free if n not in dense]
        if not solving:
            break
        rhs = remaining - sum(caps[n] * sizes[n] for n in dense)
        divisor = sum(raw[n] * sizes[n] for n in solving)
        eps = rhs / divisor
        # With all caps 1 this is the paper's rule: the largest raw density goes dense first.
        max_ratio = max(raw[n] / caps[n] for n in solving)
        if eps * max_ratio > 1.0:
            dense.update(n for n in solving if raw[n] / caps[n] == max_ratio)
            continue
        break
    densities = {}
    for n in shapes:
        if n in fixed:
            densities[n] = fixed[n]
        elif n in dense:
            densities[n] = caps[n]  # "dense": as dense as its structure allows
        else:
            densities[n] = eps * raw[n]
    if free and not [n for n in free if n not in dense] and remaining > sum(caps[n] * sizes[n] for n in free) + 1e-9:
        if any(caps[n] < 1.0 for n in free):
            most = 1.0 - (sum(caps[n] * sizes[n] for n in free) + target_active - remaining) / sum(sizes.values())
            raise ValueError(
                f"sparsity={sparsity:g} needs more active weights than the structures allow even with every "
                f"layer at its largest density (N/M for 'N:M'); use sparsity >= {most:.4g}."
            )
        raise ValueError(
            "The per_layer sparsities leave fewer weights active than the target even with every "
            "other layer dense; raise the per_layer densities or the overall sparsity."
        )
    return densities


class UnitSteps:
    """The achievable active counts of a weight: the multiples of ``unit`` up to ``capacity``."""

    def __init__(self, unit, capacity):
        self.unit, self.capacity = int(unit), int(capacity)

    def floor(self, exact):
        """The largest achievable count not above ``exact`` (within 1e-9 of a unit)."""
        return min(self.capacity, int(math.floor(exact / self.unit + 1e-9)) * self.unit)

    def next(self, count):
        """The achievable count after ``count`` (an achievable one), or None at the top."""
        return count + self.unit if count + self.unit <= self.capacity else None

    def step(self, count):
        """The size of the step after ``count`` (the unit)."""
        return self.unit

    def __repr__(self):
        return f"UnitSteps({self.unit}, {self.capacity})"


class BlockSteps:
    """The achievable counts of a weight with two pools of blocks, filled in proportion to their sizes.

    ``whole`` blocks of ``k`` entries and ``last`` blocks of ``r`` entries (the
    "1xk" structure over inputs that are not a multiple of k: every row has
    ``q`` whole blocks and one last block of ``r < k``). ``b`` blocks in all
    are split as ``round(b * whole / (whole + last))`` (halves up) whole blocks
    and the rest last ones, so both pools have (nearly) the same density and
    each step adds one block of either kind: the counts run from 0 to the
    whole weight in steps of ``k`` or ``r``, never more than one block apart.
    """

    def __init__(self, k, whole, r, last):
        self.k, self.whole, self.r, self.last = int(k), int(whole), int(r), int(last)
        self.blocks = self.whole + self.last

    def split(self, blocks):
        """``(whole blocks, last blocks)`` of ``blocks`` blocks in all."""
        blocks = int(blocks)
        if not 0 <= blocks <= self.blocks:
            raise ValueError(f"{blocks} blocks: there are {self.blocks}.")
        if self.blocks == 0:
            return 0, 0
        whole = (2 * blocks * self.whole + self.blocks) // (2 * self.blocks)
        return whole, blocks - whole

    def count(self, blocks):
        """The active entries of ``blocks`` blocks in all."""
        whole, last = self.split(blocks)
        return whole * self.k + last * self.r

    def blocks_of(self, count):
        """The number of blocks whose count is ``count``, or None if no step is exactly ``count``."""
        low, high = 0, self.blocks  # the largest b with count(b) <= count: count() is strictly increasing
        if count < 0:
            return None
        while low < high:
            middle = (low + high + 1) // 2
            if self.count(middle) <= count:
                low = middle
            else:
                high = middle - 1
        return low if self.count(low) == count else None

    def floor(self, exact):
        low, high = 0, self.blocks
        limit = exact + 1e-9 * self.k
        while low < high:
            middle = (low + high + 1) // 2
            if self.count(middle) <= limit:
                low = middle
            else:
                high = middle - 1
        return self.count(low)

    def next(self, count):
        blocks = self.blocks_of(count)
        if blocks is None:
            raise ValueError(f"{count} is not one of the counts of {self!r}.")
        return None if blocks == self.blocks else self.count(blocks + 1)

    def step(self, count):
        after = self.next(count)
        return self.k if after is None else after - count

    def __repr__(self):
        return f"BlockSteps(k={self.k}, whole={self.whole}, r={self.r}, last={self.last})"


def active_counts(shapes, densities, units=None, capacities=None, steps=None):
    """Number of active weights per name, summing exactly to the rounded target.

    Each weight gets floor(density * size) and the remaining units go to the
    largest fractional parts (largest-remainder rounding), so every count is
    within one of density * size and the total is round(sum density * size).

    ``units`` (``{name: entries}``, default 1): counts in whole units (blocks
    of k for "1xk"): each weight gets the floor in units, and the units left
    go to the largest remainders while a unit brings the total closer to the
    target (a tie rounds up), so with one unit k everywhere the total is the
    target rounded to whole blocks and every count is within one block of
    density * size. ``capacities`` (``{name: most active}``, default the size)
    are never exceeded.

    ``steps`` (``{name: steps}``, e.g. :class:`BlockSteps`; they replace
    ``units`` and ``capacities`` for those names): the achievable counts of a
    weight whose steps are not all the same size ("1xk" over inputs that are
    not a multiple of k: steps of k and of the last block's r). The same rule
    in steps: the largest achievable count not above density * size, then one
    more step for the largest remainders (in units of the next step) while it
    brings the total closer to the target (a tie rounds up). With
    :class:`UnitSteps` this is the rule above, step for step.
    """
    sizes = {n: math.prod(int(d) for d in shapes[n]) for n in shapes}
    ladders = {}
    for n in shapes:
        if steps is not None and n in steps:
            ladders[n] = steps[n]
        else:
            ladders[n] = UnitSteps(int((units or {}).get(n, 1)), int((capacities or {}).get(n, sizes[n])))
    exact = {n: densities[n] * sizes[n] for n in shapes}
    counts = {n: ladders[n].floor(exact[n]) for n in shapes}
    missing = int(round(sum(exact.values()))) - sum(counts.values())
    by_remainder = sorted(shapes, key=lambda n: (exact[n] - counts[n]) / ladders[n].step(counts[n]), reverse=True)
    for n in by_remainder:
        if missing <= 0:
            break
        after = ladders[n].next(counts[n])
        if after is not None and 2 * missing >= after - counts[n]:
            missing -= after - counts[n]
            counts[n] = after
    return counts
