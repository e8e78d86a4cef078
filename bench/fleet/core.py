"""The fleet bench's core: the pool, every size, and the bench's own checks."""

from __future__ import annotations

import json
import os
import platform
import shutil
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from bench.replay import record_pool
from bench.report import say

from .plan import (
    ARRIVE_SHARE,
    DEFAULT_POOL,
    EVALUATE_S,
    LATE_S,
    LATE_SHARE,
    QUICK_MAX_UNBUDGETED,
    REPLY_SHARE,
    RESTART_S,
    RSS_LIMIT_MB,
    SILENT_SHARE,
    WORK_RATIO_LIMIT,
    plan_fleet,
)
from .process import _log_tail, spawn
from .rounds import Bench, run_size


def run_fleet(
    sizes: Sequence[int],
    run_config: dict[str, Any],
    work: Path,
    pool: int = DEFAULT_POOL,
    isolate: bool = True,
    max_unbudgeted: int = QUICK_MAX_UNBUDGETED,
    timeout_s: float = 3600.0,
) -> dict[str, Any]:
    """The bench's core: the pool, then each size; the report (no files)."""
    from methods import build_config

    build_config(run_config)  # 0. fail on a bad config before any work
    for n in sizes:
        plan_fleet(n)
    if pool < 1:
        raise ValueError(f"--pool {pool} must be >= 1")
    work.mkdir(parents=True, exist_ok=True)
    t_start = time.perf_counter()

    # 1. The pool of genuine replies (its own process: not the server's memory)
    bench = Bench(
        run_config, work, work / "pool", pool, isolate, max_unbudgeted, timeout_s
    )
    shutil.rmtree(bench.pool_dir, ignore_errors=True)
    say(f"recording {pool} genuine ClientApp replies (a {pool}-way split) ...")
    rc = run_config | {"output-dir": str(work / "pool-run")}
    spec = {
        "name": "pool",
        "run_config": rc,
        "pool": pool,
        "pool_dir": str(bench.pool_dir),
    }
    pool_proc = None
    if isolate:
        pool_proc = spawn("record", spec, work, timeout_s)
        if pool_proc.returncode != 0:
            raise RuntimeError(
                f"recording the pool failed ({pool_proc.returncode}); log "
                f"{pool_proc.log}:\n{_log_tail(pool_proc.log)}"
            )
        pool_info = json.loads((bench.pool_dir / "pool.json").read_text())
    else:
        pool_info = record_pool(rc, pool, bench.pool_dir)
    pool_info |= {
        "wall_s": round(pool_proc.wall_s, 1) if pool_proc else None,
        "cpu_s": round(pool_proc.cpu_s, 1) if pool_proc else None,
        "peak_rss_mb": pool_proc.peak_rss_mb if pool_proc else None,
        "num_partitions": pool,
        "partition": run_config["partition"],
    }
    say(
        f"pool: {sum(pool_info['client_s']):.1f} s of client work, {pool_info['wall_s']} s wall"
    )

    # 2. Each size: uninterrupted, killed and resumed, without the budget
    rows = [run_size(bench, n) for n in sizes]
    report: dict[str, Any] = {
        "benchmark": "fleet",
        "sizes": list(sizes),
        "pool": pool_info,
        "replayed_from_pool": pool,
        "run_config": run_config,
        "fleet_design": {
            "window_s": float(run_config["collect-window-s"]),
            "arrive_share": ARRIVE_SHARE,
            "reply_share": REPLY_SHARE,
            "silent_share": SILENT_SHARE,
            "late_share": LATE_SHARE,
            "late_s": list(LATE_S),
            "evaluate_s": list(EVALUATE_S),
            "restart_s": RESTART_S,
            "seed": 0,
        },
        "max_unbudgeted": max_unbudgeted,
        "rows": rows,
        "machine": {
            "processor": platform.processor(),
            "machine": platform.machine(),
            "cpu_count": os.cpu_count(),
            "python": platform.python_version(),
        },
        "wall_s": round(time.perf_counter() - t_start, 1),
    }
    report["checks"] = check(report)
    return report


def check(report: dict[str, Any]) -> list[dict[str, Any]]:
    """The bench's own assertions: ``[{"check", "ok", "detail"}]``."""
    rows = report["rows"]
    out = []

    def add(name: str, ok: bool, detail: str) -> None:
        out.append({"check": name, "ok": bool(ok), "detail": detail})

    lost = {r["n"]: r["kill"]["lost"] for r in rows}
    add(
        "0 uploads lost at every N (kill + resume)",
        all(v == 0 for v in lost.values()),
        f"lost per N: {lost}",
    )
    twice = {
        r["n"]: sorted(
            set(r["kill"]["asked_twice"]) | set(r["asked_twice_uninterrupted"])
        )
        for r in rows
    }
    dup = {r["n"]: r["kill"]["uploaded_twice"] for r in rows}
    add(
        "no device asked twice",
        all(not v for v in twice.values()) and all(not v for v in dup.values()),
        f"asked twice per N: {twice}; uploaded twice: {dup}",
    )
    kept = {r["n"]: r["kill"]["journal_prefix_kept"] for r in rows}
    add(
        "the resumed journal keeps every line of the killed one",
        all(kept.values()),
        f"{kept}",
    )
    same = {r["n"]: (r["kill"]["uploads_used"], r["uploads_used"]) for r in rows}
    add(
        "kill + resume used every upload the uninterrupted round did",
        all(a == b for a, b in same.values()),
        f"(resumed, uninterrupted) per N: {same}",
    )
    listed = {}
    for r in rows:
        d = r["designed"]
        listed[r["n"]] = (
            r["late"] == d["late"]
            and r["missing"] == d["silent"]
            and sorted(r["kill"]["late"] + r["kill"]["missing"])
            == sorted(d["late"] + d["silent"])
            and r["uploads_used"] == d["on_time"]
        )
    add(
        "late and missing devices listed (as designed)",
        all(listed.values()),
        "; ".join(
            f"N={r['n']}: late {len(r['late'])}/{len(r['designed']['late'])}, "
            f"missing {len(r['missing'])}/{len(r['designed']['silent'])}"
            for r in rows
        ),
    )
    small, big = rows[0], rows[-1]
    if len(rows) > 1:
        ratio = big["server_work_s"] / max(small["server_work_s"], 1e-9)
        add(
            f"server work at N={big['n']} within {WORK_RATIO_LIMIT:g}x of "
            f"N={small['n']} (synth-budget)",
            ratio <= WORK_RATIO_LIMIT,
            f"{big['server_work_s']:.1f} s / {small['server_work_s']:.1f} s = {ratio:.2f}x",
        )
    rss = max(
        [v for v in (big["peak_rss_mb"], big["kill"]["peak_rss_mb"]) if v] or [0.0]
    )
    add(
        f"peak RSS at N={big['n']} below {RSS_LIMIT_MB / 1024:g} GB",
        0 < rss < RSS_LIMIT_MB if big["peak_rss_mb"] is not None else True,
        f"{rss:.0f} MB"
        if big["peak_rss_mb"] is not None
        else "not measured (rounds ran in the bench's own process)",
    )
    binds = {r["n"]: r["budget_binds"] for r in rows}
    add(
        "the budget binds at every N (server work bounded alike)",
        all(binds.values()),
        f"{binds}",
    )
    return out
