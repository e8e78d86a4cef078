"""One round of the fleet bench, in this process or a fresh one (peak RSS)."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from bench.replay import ReplayClient
from bench.report import write_json

from .plan import CLOCK_START, FleetPlan


def play_round(spec: dict[str, Any]) -> dict[str, Any]:
    """One round as ``spec`` says (in this process); returns what the parent
    needs besides results.json. ``kill_after > 0``: SIGKILL this process right
    after the journal persisted that many uploads (a report is written first).

    Every upload the journal persists is counted here (``Journal.upload``
    wrapped), independently of the journal's own lines.
    """
    from deploy.inprocess import VirtualClock, run_round
    from server_app import persist

    plan = FleetPlan(**{k: _tuple(v) for k, v in spec["plan"].items()})
    shift = float(spec["clock_start"]) - CLOCK_START
    client = ReplayClient.load(Path(spec["pool_dir"]))
    report_path = Path(spec["report"])
    kill_after = int(spec.get("kill_after", 0))
    t0 = time.perf_counter()
    received = {"n": 0}
    real_upload = persist.Journal.upload

    def counted_upload(self: Any, r: Any, at: float) -> None:
        real_upload(self, r, at)
        received["n"] += 1
        if received["n"] == kill_after:
            write_json(
                report_path,
                {
                    "killed": True,
                    "uploads_received": received["n"],
                    "killed_at": at,
                    "seconds": time.perf_counter() - t0,
                },
            )
            os.kill(os.getpid(), signal.SIGKILL)

    persist.Journal.upload = counted_upload  # type: ignore[method-assign]
    try:
        clock = VirtualClock(float(spec["clock_start"]))
        _, grid = run_round(
            plan.devices(shift), spec["run_config"], "fleet", clock, client
        )
    finally:
        persist.Journal.upload = real_upload  # type: ignore[method-assign]
    out = {
        "killed": False,
        "uploads_received": received["n"],
        "sent": grid.sent,
        "seconds": time.perf_counter() - t0,
    }
    write_json(report_path, out)
    return out


def _tuple(v: Any) -> Any:
    return tuple(v) if isinstance(v, list) else v


@dataclass
class Proc:
    """A finished child: exit code, peak RSS (MB), wall and CPU seconds."""

    returncode: int
    peak_rss_mb: float | None
    wall_s: float
    cpu_s: float
    log: Path


def spawn(kind: str, spec: dict[str, Any], work: Path, timeout_s: float) -> Proc:
    """``python -m bench.fleet --_<kind> spec.json`` in a fresh process; its peak
    RSS is ``wait4``'s ``ru_maxrss`` (the child and any children it waited for),
    measured whether it exits or is killed."""
    name = spec["name"]
    spec_path = work / "specs" / f"{name}.json"
    spec_path.parent.mkdir(parents=True, exist_ok=True)
    write_json(spec_path, spec)
    log_path = work / "logs" / f"{name}.log"
    log_path.parent.mkdir(parents=True, exist_ok=True)
    env = os.environ | {
        "PYTHONUNBUFFERED": "1",
        "FLWR_TELEMETRY_ENABLED": "0",
        "FLWR_DISABLE_UPDATE_CHECK": "1",
        "HF_HUB_OFFLINE": "1",
    }
    t0 = time.perf_counter()
    with open(log_path, "wb") as log:
        proc = subprocess.Popen(
            [sys.executable, "-m", "bench.fleet", f"--_{kind}", str(spec_path)],
            cwd=work,
            env=env,
            stdout=log,
            stderr=subprocess.STDOUT,
        )
        watchdog = threading.Timer(timeout_s, proc.kill)
        watchdog.start()
        try:
            _, status, usage = os.wait4(proc.pid, 0)
        finally:
            watchdog.cancel()
    proc.returncode = os.waitstatus_to_exitcode(status)  # reaped: Popen must not wait
    if time.perf_counter() - t0 >= timeout_s:  # the watchdog's SIGKILL
        raise RuntimeError(
            f"{name} ran past --timeout-s {timeout_s:g}; log {log_path}:\n{_log_tail(log_path)}"
        )
    # ru_maxrss is in KiB on Linux, bytes on macOS
    scale = 2**20 if sys.platform == "darwin" else 2**10
    return Proc(
        proc.returncode,
        round(usage.ru_maxrss / scale, 1),
        time.perf_counter() - t0,
        usage.ru_utime + usage.ru_stime,
        log_path,
    )


def _log_tail(path: Path, lines: int = 25) -> str:
    try:
        return "\n".join(path.read_text(errors="replace").splitlines()[-lines:])
    except OSError:
        return ""
