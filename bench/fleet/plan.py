"""The fleet bench's settings and its fleet: who arrives when, who is silent or late."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np

from bench.run_config import default_run_config
from deploy.inprocess import FIRST_NODE_ID, Device

DEFAULT_SIZES = (10, 100, 1000)

DEFAULT_POOL = 10

CLOCK_START = 1.0e9  # the virtual clock of every first process

WINDOW_S = 600.0

ARRIVE_SHARE = 0.70  # devices connect over this share of the window

REPLY_SHARE = 0.20  # on-time devices answer within this share of the window

SILENT_SHARE = 0.10

LATE_SHARE = 0.05

LATE_S = (2.0, 20.0)  # late replies arrive this long after the window's end

EVALUATE_S = (30.0, 90.0)  # a device's evaluation of the pushed model

RESTART_S = 30.0  # the killed server is back this long (virtual) after dying

RSS_LIMIT_MB = 4096.0

WORK_RATIO_LIMIT = 2.0

# The bench's settings over the default run config (both modes).
BENCH_KEYS: dict[str, Any] = {
    "method": "oscar",
    "collect-window-s": WINDOW_S,
    "collect-quiet-s": 0.0,
    "target-clients": 0,
    "min-clients": 2,
    "synth-budget": 1000,
    "images-per-class": 50,
    "evaluate-timeout-s": 600.0,
}

# --quick: what changes (the rest is the full default config).
QUICK_KEYS: dict[str, Any] = {
    "max-examples-per-client": 200,  # the pool's clients caption fewer images
    "num-inference-steps": 5,  # synthesis is the server work's cost
}

QUICK_MAX_UNBUDGETED = 5_000  # images: synth-budget=0 runs up to this many

FULL_MAX_UNBUDGETED = 40_000


def bench_config(quick: bool, over: dict[str, Any] | None = None) -> dict[str, Any]:
    """The run config of every round: defaults, the bench's keys, --quick's."""
    return (
        default_run_config() | BENCH_KEYS | (QUICK_KEYS if quick else {}) | (over or {})
    )


@dataclass(frozen=True)
class FleetPlan:
    """Who does what in a fleet of ``n`` (node ids), and each device's times."""

    n: int
    window_s: float
    arrive_s: tuple[float, ...]
    reply_s: tuple[float, ...]
    evaluate_s: tuple[float, ...]
    silent: tuple[int, ...]
    late: tuple[int, ...]

    @property
    def on_time(self) -> list[int]:
        off = set(self.silent) | set(self.late)
        return [
            FIRST_NODE_ID + p for p in range(self.n) if FIRST_NODE_ID + p not in off
        ]

    def devices(self, shift_s: float = 0.0) -> list[Device]:
        """The devices for a grid whose clock starts ``shift_s`` after the first
        one's (a resumed server): arrival times keep their absolute moment."""
        silent = set(self.silent)
        return [
            Device(
                FIRST_NODE_ID + p,
                {"partition-id": p, "num-partitions": self.n},
                arrive_s=self.arrive_s[p] - shift_s,
                reply_s=self.reply_s[p],
                evaluate_s=self.evaluate_s[p],
                silent=FIRST_NODE_ID + p in silent,
            )
            for p in range(self.n)
        ]


def plan_fleet(n: int, window_s: float = WINDOW_S, seed: int = 0) -> FleetPlan:
    """Arrivals uniform over the first 70% of the window; 10% silent, 5% late
    (at least one of each); the rest answer within 20% of the window."""
    if n < 4:
        raise ValueError(
            f"fleet size {n} < 4: with one silent and one late device at least, "
            "fewer than min-clients=2 would reply; use sizes of 4 or more"
        )
    rng = np.random.default_rng(seed)
    arrive = rng.uniform(0.0, ARRIVE_SHARE * window_s, n)
    reply = rng.uniform(1.0, REPLY_SHARE * window_s, n)
    evaluate = rng.uniform(*EVALUATE_S, n)
    order = rng.permutation(n)
    n_silent = max(1, round(SILENT_SHARE * n))
    n_late = max(1, round(LATE_SHARE * n))
    silent = sorted(int(p) for p in order[:n_silent])
    late = sorted(int(p) for p in order[n_silent : n_silent + n_late])
    for p in late:  # the reply reaches the server 2-20 s after the window's end
        reply[p] = window_s - arrive[p] + rng.uniform(*LATE_S)
    return FleetPlan(
        n,
        window_s,
        tuple(float(x) for x in arrive),
        tuple(float(x) for x in reply),
        tuple(float(x) for x in evaluate),
        tuple(FIRST_NODE_ID + p for p in silent),
        tuple(FIRST_NODE_ID + p for p in late),
    )
