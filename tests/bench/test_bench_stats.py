"""bench.stats by hand: the paired t interval and Holm's adjustment."""

from __future__ import annotations

import math

import pytest

from bench.stats import holm, paired_t


def test_paired_t_by_hand():
    # diffs 1, 2, 3: mean 2, sd 1, se 1/sqrt(3); t_{0.975, 2} = 4.302653
    r = paired_t([1.0, 2.0, 3.0])
    half = 4.302653 / math.sqrt(3)
    assert r["mean"] == pytest.approx(2.0)
    assert r["low"] == pytest.approx(2.0 - half, abs=1e-5)
    assert r["high"] == pytest.approx(2.0 + half, abs=1e-5)
    # t = 2 / (1 / sqrt 3) = 3.4641; two-sided p with 2 df = 1 - t / sqrt(t^2 + 2)
    t = 2 * math.sqrt(3)
    assert r["p"] == pytest.approx(1 - t / math.sqrt(t * t + 2), rel=1e-6)


def test_paired_t_edges():
    assert paired_t([0.5])["low"] is None and paired_t([0.5])["p"] is None
    same = paired_t([0.25, 0.25, 0.25])
    assert same["low"] == same["high"] == 0.25 and same["p"] == 0.0
    assert paired_t([0.0, 0.0])["p"] == 1.0
    with pytest.raises(ValueError, match="at least one"):
        paired_t([])
    with pytest.raises(ValueError, match="level=1.5"):
        paired_t([1.0, 2.0], level=1.5)


def test_holm_by_hand():
    # m = 3 tests: sorted 0.01, 0.02, 0.04 -> 0.03, 0.04, 0.04 (monotone); None kept
    assert holm([0.04, None, 0.01, 0.02]) == pytest.approx([0.04, None, 0.03, 0.04])
    # cap at 1, and a step-down that would decrease is held up
    assert holm([0.6, 0.3]) == pytest.approx([0.6, 0.6])
    assert holm([0.9, 0.8, 0.7]) == pytest.approx([1.0, 1.0, 1.0])
    assert holm([]) == []
    with pytest.raises(ValueError, match="position 1"):
        holm([0.1, 1.5])
