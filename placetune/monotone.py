"""The edge of a monotone condition: the fewest expert layers in RAM that fit, the most layers that fit.

Accelerator memory only shrinks as more experts go to RAM or fewer layers to the card, so the edge takes
log2(n) feasibility checks; the standard library's bisect does the halving.
"""

from __future__ import annotations

from bisect import bisect_left
from collections.abc import Callable


def first_true(holds: Callable[[int], bool], low: int, high: int) -> int | None:
    """The smallest k in low..high with holds(k), for a condition that stays true once it is; None if never."""
    k = low + bisect_left(range(low, high + 1), True, key=holds)
    return k if k <= high else None


def last_true(holds: Callable[[int], bool], low: int, high: int) -> int | None:
    """The largest k in low..high with holds(k), for a condition that stays false once it is; None if never."""
    k = low + bisect_left(range(low, high + 1), True, key=lambda i: not holds(i)) - 1
    return k if k >= low else None
