"""Statistics of paired per-seed differences: a t interval and Holm's correction.

Pure functions over plain lists, checked by hand in ``tests/bench/test_bench_stats.py``.
A claimed ordering "A above B" is a paired difference over the same seeds (same
partition, same synthesis seed): its mean, a two-sided 95% interval from the
t distribution with ``n - 1`` degrees of freedom, the two-sided p-value of the
paired t-test, and Holm's step-down adjustment across the claims of one table.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

from scipy import stats as _st


def paired_t(diffs: Sequence[float], level: float = 0.95) -> dict[str, float | None]:
    """Mean, ``level`` t interval and two-sided p-value (H0: mean 0) of ``diffs``.

    With fewer than two differences, or all of them equal, the interval and the
    p-value are ``None`` except where they are exact: zero spread with a non-zero
    mean gives a zero-width interval and p = 0.
    """
    if not 0 < level < 1:
        raise ValueError(f"level={level!r}: must be in (0, 1)")
    n = len(diffs)
    if n == 0:
        raise ValueError("paired_t needs at least one difference")
    mean = math.fsum(diffs) / n
    if n < 2:
        return {"n": n, "mean": mean, "low": None, "high": None, "p": None}
    sd = math.sqrt(math.fsum((d - mean) ** 2 for d in diffs) / (n - 1))
    if sd == 0.0:
        p = 1.0 if mean == 0.0 else 0.0
        return {"n": n, "mean": mean, "low": mean, "high": mean, "p": p}
    se = sd / math.sqrt(n)
    half = float(_st.t.ppf(0.5 + level / 2, n - 1)) * se
    p = float(2 * _st.t.sf(abs(mean) / se, n - 1))
    return {"n": n, "mean": mean, "low": mean - half, "high": mean + half, "p": p}


def holm(pvalues: Sequence[float | None]) -> list[float | None]:
    """Holm's step-down adjusted p-values, in the input's order (``None`` stays
    ``None`` and does not count as a test).

    Sorted ascending, the i-th smallest (0-based) of m is multiplied by m - i,
    then made non-decreasing and capped at 1: a claim holds at family-wise level
    alpha when its adjusted p-value is at most alpha.
    """
    tested = sorted((p, i) for i, p in enumerate(pvalues) if p is not None)
    m = len(tested)
    out: list[float | None] = [None] * len(pvalues)
    running = 0.0
    for rank, (p, i) in enumerate(tested):
        if not 0.0 <= p <= 1.0:
            raise ValueError(f"p-value {p!r} at position {i} is not in [0, 1]")
        running = max(running, min(1.0, (m - rank) * p))
        out[i] = running
    return out
