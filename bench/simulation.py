"""``python -m bench simulation``: the real ``flwr run`` simulation at fleet size.

Runs the app exactly as a user would (``flwr run . local --stream
--federation-config "num-supernodes=N"``, the default run config unless
``--run-config`` adds keys) for each N, in a private ``FLWR_HOME`` with its own
ports (``bench.flower_runs.LocalSimulation``), and samples once a second the
resident memory of every Flower process of that home: the ``flwr`` command, the
SuperLink and everything under it (the ServerApp, the simulation, its Ray
workers). Resident sizes are summed over processes (shared pages count once per
process, so the sum is an upper bound).

Writes ``<out>/simulation.json`` and ``<out>/simulation.md``: per N the wall
time, the round's own timings (results.json ``timings_s``), the peak memory, the
uploads used, and the global accuracy; or, for a run that failed, where.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import threading
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from bench.flower_runs import LocalSimulation, parse_run_config_string
from bench.report import say


class MemorySampler(threading.Thread):
    """Peak of the summed resident memory of a process set, sampled each second."""

    def __init__(self, processes: Any, interval_s: float = 1.0) -> None:
        super().__init__(daemon=True)
        self.processes = processes  # () -> list[psutil.Process]
        self.interval_s = interval_s
        self.peak = 0
        self.peak_count = 0
        self._halt = threading.Event()

    def run(self) -> None:
        import psutil

        while not self._halt.is_set():
            total, count = 0, 0
            for p in self.processes():
                try:
                    total += p.memory_info().rss
                    count += 1
                except psutil.Error:
                    pass
            if total > self.peak:
                self.peak, self.peak_count = total, count
            self._halt.wait(self.interval_s)

    def stop(self) -> None:
        self._halt.set()
        self.join(timeout=5)


def flower_processes(sim: LocalSimulation) -> Any:
    """Every process of ``sim``'s home: its SuperLinks' trees and ``flwr`` itself."""
    from deploy import procs
    from deploy.local_superlink import superlink_processes

    me = os.getpid()

    def found() -> list[Any]:
        out = []
        for link in superlink_processes(sim.flwr_home):
            out += procs.process_tree(link.pid)
        for p in procs.process_tree(me)[1:]:  # the flwr command and its children
            out.append(p)
        seen: dict[int, Any] = {p.pid: p for p in out}
        return list(seen.values())

    return found


def run_size(work: Path, n: int, overrides: dict[str, Any], timeout_s: float) -> dict:
    say(f"flwr run with {n} SuperNodes ...")
    with LocalSimulation(work / f"n{n}", num_supernodes=n) as sim:
        sampler = MemorySampler(flower_processes(sim))
        sampler.start()
        try:
            run = sim.run(f"n{n}", overrides, timeout_s=timeout_s)
        finally:
            sampler.stop()
    row: dict[str, Any] = {
        "num_supernodes": n,
        "wall_s": round(run.wall_s, 1),
        "peak_rss_gb": round(sampler.peak / 2**30, 2),
        "processes_at_peak": sampler.peak_count,
        "ok": run.ok,
        "error": run.error,
        "log": str(run.log_path),
    }
    if run.results is not None:
        res = run.results
        row |= {
            "num_clients": res["num_clients"],
            "asked": len(res.get("fleet", {}).get("asked", [])),
            "missing": len(res.get("fleet", {}).get("missing", [])),
            "global_accuracy": res.get("global_accuracy"),
            "mean_accuracy": res.get("mean_accuracy"),
            "num_synthetic": res.get("num_synthetic"),
            "synth_budget": res.get("synth_budget"),
            "timings_s": res.get("timings_s"),
        }
    say(
        f"N={n}: {'ok' if run.ok else 'FAILED: ' + str(run.error)}, "
        f"{row['wall_s']} s, peak {row['peak_rss_gb']} GB"
    )
    return row


def table(rows: list[dict[str, Any]]) -> str:
    head = (
        "| SuperNodes | result | wall s | collect s | synthesize s | train s | "
        "evaluate s | peak RSS GB (sum) | uploads used | synthetic images | "
        "global acc |"
    )
    lines = [head, "|---:|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|"]
    for r in rows:
        t = r.get("timings_s") or {}

        def s(k: str, t: dict = t) -> str:
            return f"{t[k]:.0f}" if k in t else "-"

        acc = r.get("global_accuracy")
        lines.append(
            f"| {r['num_supernodes']} | {'ok' if r['ok'] else 'failed'} | "
            f"{r['wall_s']:.0f} | {s('collect')} | {s('synthesize')} | {s('train')} | "
            f"{s('evaluate')} | {r['peak_rss_gb']:.2f} | {r.get('num_clients', '-')} | "
            f"{r.get('num_synthetic', '-')} | "
            f"{f'{100 * acc:.1f}%' if isinstance(acc, float) else '-'} |"
        )
    return "\n".join(lines)


def main(argv: Sequence[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m bench simulation")
    ap.add_argument("--supernodes", default="100", help="comma-separated N")
    ap.add_argument("--run-config", default="", help="extra keys, flwr's syntax")
    ap.add_argument("--out", type=Path, default=Path("bench-results"))
    ap.add_argument("--work", type=Path, default=Path("/tmp/oneshot-bench-sim"))
    ap.add_argument("--timeout-s", type=float, default=5400.0)
    args = ap.parse_args(argv)
    sizes = [int(x) for x in args.supernodes.split(",") if x.strip()]
    overrides = parse_run_config_string(args.run_config) if args.run_config else {}
    rows = [run_size(args.work, n, overrides, args.timeout_s) for n in sizes]
    report: dict[str, Any] = {
        "command": "python -m bench simulation " + " ".join(argv or []),
        "machine": {
            "processor": platform.processor() or platform.machine(),
            "cpus": os.cpu_count(),
        },
        "run_config": overrides,
        "rows": rows,
        "finished": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()),
    }
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "simulation.json").write_text(json.dumps(report, indent=2))
    md = (
        f"# `flwr run` simulation at fleet size\n\n{table(rows)}\n\n"
        f"Machine: {report['machine']['cpus']} CPUs ({report['machine']['processor']}); "
        f"run config: defaults{' + ' + args.run_config if args.run_config else ''}. "
        "Peak RSS: the largest sum, over one-second samples, of the resident memory "
        "of every Flower process of the run's home (flwr, SuperLink, ServerApp, "
        "simulation, Ray workers).\n"
    )
    (args.out / "simulation.md").write_text(md)
    print(md)
    return 0 if all(r["ok"] for r in rows) else 1


if __name__ == "__main__":
    raise SystemExit(main())
