import math

import pytest
from hypothesis import given
from hypothesis import strategies as st

from granet.schedules import CosineDecay, CubicSparsity, UpdateCadence


def test_cubic_matches_formula_on_rounds():
    s = CubicSparsity(init=0.5, final=0.9, start=100, end=1100, every=100)
    for step in range(0, 1500, 7):
        k = step // 100
        if k <= 1:
            expected = 0.5
        elif k >= 11:
            expected = 0.9
        else:
            expected = 0.9 + (0.5 - 0.9) * (1 - (k - 1) / 10) ** 3
        assert s(step) == pytest.approx(expected)
    assert s(1100) == 0.9  # the last round reaches the final sparsity exactly
    assert [t for t in range(0, 1500, 100) if s.prunes_at(t)] == list(range(200, 1200, 100))


def test_cubic_window_shorter_than_a_round_jumps_to_final():
    s = CubicSparsity(init=0.0, final=0.8, start=0, end=50, every=100)
    assert s(99) == 0.0 or not s.prunes_at(99)
    assert s.prunes_at(100) and s(100) == 0.8
    assert not s.prunes_at(200)


def test_cubic_without_gradual_phase_never_prunes():
    s = CubicSparsity(init=0.9, final=0.9, start=0, end=1000, every=10)
    assert not any(s.prunes_at(t) for t in range(0, 2000, 10))


@given(st.integers(0, 10_000))
def test_cubic_is_monotone_and_bounded(step):
    s = CubicSparsity(init=0.2, final=0.95, start=500, end=6000, every=250)
    assert 0.2 <= s(step) <= 0.95
    assert s(step) <= s(step + 250)


def test_cosine_decay_values():
    d = CosineDecay(start=0.5, end=0.005, total=1000)
    assert d(0) == pytest.approx(0.5)
    assert d(500) == pytest.approx(0.005 + (0.5 - 0.005) / 2)
    assert d(1000) == pytest.approx(0.005)
    assert d(5000) == pytest.approx(0.005)
    for t in (123, 777):
        assert d(t) == pytest.approx(0.005 + 0.495 * (1 + math.cos(math.pi * t / 1000)) / 2)


def test_update_cadence():
    c = UpdateCadence(every=100, total=1000)
    assert [t for t in range(0, 1200) if c.is_update(t)] == list(range(100, 1000, 100))
    assert c.next_update(0) == 100 and c.next_update(100) == 200
    assert c.next_update(950) is None
