"""Blocks and regions of a distributed array as boxes of global indices; values by step."""

from __future__ import annotations

import bisect
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

#: a box of global indices: ((start, stop), ...) per dimension, stop exclusive
Box = tuple[tuple[int, int], ...]


@dataclass(frozen=True)
class Block:
    """Where one rank's block lies in a distributed array.

    ``Block(global_shape=(512, 512), start=(0, 256), shape=(256, 256))`` is
    the top-right quarter. Every rank describes its own block; together the
    blocks should tile the array, and a region is only ever assembled from
    the blocks that overlap it.
    """

    global_shape: tuple[int, ...]
    start: tuple[int, ...]
    shape: tuple[int, ...]

    def __post_init__(self) -> None:
        g, s, n = (tuple(int(x) for x in v) for v in (self.global_shape, self.start, self.shape))
        if not (len(g) == len(s) == len(n)):
            raise ValueError(f"a block needs one start and one size per dimension of "
                             f"{g}: got start {s}, shape {n}")
        for d, (gd, sd, nd) in enumerate(zip(g, s, n, strict=True)):
            if gd < 0 or sd < 0 or nd < 0 or sd + nd > gd:
                raise ValueError(
                    f"block dimension {d}: start {sd} + size {nd} must lie within 0..{gd}"
                )
        object.__setattr__(self, "global_shape", g)
        object.__setattr__(self, "start", s)
        object.__setattr__(self, "shape", n)

    @property
    def box(self) -> Box:
        """The block as a box of global indices."""
        return tuple((s, s + n) for s, n in zip(self.start, self.shape, strict=True))


def full_box(shape: Sequence[int]) -> Box:
    """The box covering a whole array of ``shape``."""
    return tuple((0, int(n)) for n in shape)


def normalize_region(region: Any, global_shape: tuple[int, ...]) -> Box:
    """``region`` (None, slices, or (start, stop) pairs) as a box within ``global_shape``.

    Raises:
        ValueError: the region has the wrong number of dimensions, a step, or
            reaches outside the array; the message names the dimension and value.
    """
    if region is None:
        return full_box(global_shape)
    if not isinstance(region, tuple | list):
        region = (region,)
    if len(region) > len(global_shape):
        raise ValueError(f"region {region!r} has {len(region)} dimensions; "
                         f"the array has {len(global_shape)}")
    out = []
    for d, n in enumerate(global_shape):
        r = region[d] if d < len(region) else slice(None)
        if isinstance(r, slice):
            if r.step not in (None, 1):
                raise ValueError(f"region dimension {d}: steps are not supported, got {r!r}")
            lo = 0 if r.start is None else int(r.start)
            hi = n if r.stop is None else int(r.stop)
        else:
            try:
                lo, hi = (int(x) for x in r)
            except (TypeError, ValueError):
                raise ValueError(f"region dimension {d}: expected a slice or a (start, stop) "
                                 f"pair, got {r!r}") from None
        if not 0 <= lo < hi <= n:
            raise ValueError(f"region dimension {d}: {lo}:{hi} must be a non-empty range "
                             f"within 0:{n}")
        out.append((lo, hi))
    return tuple(out)


def intersect(a: Box, b: Box) -> Box | None:
    """The common part of two boxes, or None when they do not overlap."""
    out = []
    for (a0, a1), (b0, b1) in zip(a, b, strict=True):
        lo, hi = max(a0, b0), min(a1, b1)
        if lo >= hi:
            return None
        out.append((lo, hi))
    return tuple(out)


def local_slices(box: Box, origin: Sequence[int]) -> tuple[slice, ...]:
    """Slices selecting ``box`` in an array whose element 0 is at global ``origin``."""
    return tuple(slice(lo - o, hi - o) for (lo, hi), o in zip(box, origin, strict=True))


def box_shape(box: Box) -> tuple[int, ...]:
    """The shape of the array a box selects."""
    return tuple(hi - lo for lo, hi in box)


class StepMap:
    """Values that hold from a step on: ``add(5, x)`` makes ``at(s)`` give x for s >= 5.

    The shared shape of a subscription's selections (on the hub and on each
    rank) and of a steering key's values. A value added at a step that
    already has one holds after it: the later change wins.
    """

    __slots__ = ("steps", "values")

    def __init__(self) -> None:
        self.steps: list[int] = []
        self.values: list[Any] = []

    def add(self, step: int, value: Any) -> None:
        """Let ``value`` hold from ``step`` on (until a later step's value)."""
        i = bisect.bisect_right(self.steps, step)
        self.steps.insert(i, step)
        self.values.insert(i, value)

    def index(self, step: int) -> int:
        """The position of the value in effect at ``step``; -1 before the first."""
        return bisect.bisect_right(self.steps, step) - 1

    def at(self, step: int, default: Any = None) -> Any:
        """The value in effect at ``step``, or ``default`` before the first."""
        i = self.index(step)
        return self.values[i] if i >= 0 else default
