"""``--resume``: keep the finished runs of an earlier report with the same setup.

A long bench (18 methods x 10 seeds is hours on a 2-core CPU) is written
after every run; resuming it, or extending it with more seeds, reruns only the
(method, seed) pairs that have no successful record yet.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

# What must match for an earlier run to count as a run of this bench.
SAME_SETUP = ("quick", "world", "num_clients", "overrides", "embedded_checksums")


def load_previous(out: Path) -> dict[str, Any] | None:
    """The report in ``out/accuracy.json``, or None if there is none.

    Raises
    ------
    ValueError
        If the file is there but is not a JSON accuracy report.
    """
    path = out / "accuracy.json"
    if not path.exists():
        return None
    try:
        prev = json.loads(path.read_text())
    except json.JSONDecodeError as e:
        raise ValueError(f"--resume: {path} is not JSON ({e})") from e
    if not isinstance(prev, dict) or prev.get("benchmark") != "accuracy":
        raise ValueError(f"--resume: {path} is not an accuracy report")
    return prev


def kept_runs(
    previous: dict[str, Any],
    current: dict[str, Any],
    methods: list[str],
    seeds: list[int],
    rerun: tuple[str, ...] = (),
) -> list[dict[str, Any]]:
    """The earlier successful runs this bench would repeat, to keep.

    Parameters
    ----------
    previous
        The earlier report (``accuracy.json``).
    current
        This bench's report header (same keys).
    methods, seeds
        What this bench runs; earlier runs outside them are dropped.
    rerun
        Methods whose earlier runs are dropped too (run again: their code or
        meaning changed since).

    Raises
    ------
    ValueError
        Naming the first setup key whose value differs: the earlier runs
        measured something else and cannot be mixed with these.
    """
    for key in SAME_SETUP:
        if previous.get(key) != current.get(key):
            raise ValueError(
                f"--resume: the earlier report's {key!r} is {previous.get(key)!r}, "
                f"this bench's is {current.get(key)!r}; use another --out or drop "
                "--resume"
            )
    wanted = {(m, s) for m in methods for s in seeds}
    kept: dict[tuple[str, int], dict[str, Any]] = {}
    for rec in previous.get("runs", []):
        if not rec.get("ok"):
            continue
        pair = (str(rec["method"]), int(rec["seed"]))
        if pair in wanted and pair[0] not in rerun:
            kept[pair] = rec  # a later record of the same pair wins
    return list(kept.values())


def done_pairs(runs: list[dict[str, Any]]) -> set[tuple[str, int]]:
    """(method, seed) of every successful record."""
    return {(r["method"], r["seed"]) for r in runs if r.get("ok")}
