"""The one bisection every 'fewest that fit' and 'most that fit' question goes through."""

from __future__ import annotations

from hypothesis import given
from hypothesis import strategies as st

from placetune.monotone import first_true, last_true


@given(st.integers(0, 40), st.integers(0, 40), st.integers(-5, 50))
def test_the_edge_is_the_one_a_scan_finds(low: int, width: int, edge: int) -> None:
    high = low + width
    scan_first = next((k for k in range(low, high + 1) if k >= edge), None)
    scan_last = next((k for k in range(high, low - 1, -1) if k <= edge), None)
    assert first_true(lambda k: k >= edge, low, high) == scan_first
    assert last_true(lambda k: k <= edge, low, high) == scan_last


def test_it_asks_log2_n_times() -> None:
    asked: list[int] = []
    assert first_true(lambda k: asked.append(k) or k >= 700, 0, 1023) == 700
    assert len(asked) <= 11
