"""``python -m bench fleet``: the real one-shot round at 10, 100 and 1,000 clients.

Issue 22's scale benchmark. Per fleet size N, the real round (``server_app``)
runs in process over ``deploy.inprocess``'s Grid on a virtual clock, each round
in a fresh subprocess whose peak resident memory is the server's:

1. **the pool.** One subprocess runs the real ClientApp's collect for the P
   partitions of a P-way split of the run's dataset (default P = 10, the
   default Dirichlet partition of ``mnist-domains``) and records the replies.
   Every round replays them (``ReplayClient``): the device on partition ``p``
   answers with the recorded reply of partition ``p mod P``, its partition id
   and fleet size rewritten. Why a pool: flwr-datasets' Dirichlet partitioner
   (``min_partition_size=10``) gives up at 1,000 partitions of the 30,000-image
   client pool ("max number of attempts (10) was reached"); ``iid`` and
   ``domain`` split it, but 1,000 genuine clients cost 1,000 partition
   computations (~1 s each) and captioning passes on the server's CPU, and
   their memory would count as the server's. With P a multiple of the five
   domains, a replayed device keeps its partition's domain. The push-back
   evaluation is not replayed (it depends on the pushed model): a device
   answers it with its envelope and no accuracy; accuracy here is the
   server's, on the global test set.
2. **the fleet.** Devices connect uniformly over the first 70% of
   ``collect-window-s``; 10% never reply (silent), 5% reply 2-20 s after the
   window closes (late), the others 1 s to 20% of the window after they are
   asked. Every device takes 30-90 s to evaluate the pushed model, so the push
   phase outlasts the late replies: the round records late replies after its
   server work and again after the push phase, and on the virtual clock no
   time passes during the server work. ``collect-quiet-s=0`` and
   ``target-clients=0``: the window runs its full length.
3. **three rounds per N.** (a) uninterrupted, with ``synth-budget``: the costs
   (collect seconds per upload, server work, peak RSS), the fleet (late,
   missing) and the accuracy with the budget; (b) the same fleet, the server
   SIGKILLed once the journal holds about half the eventual uploads, then run
   again with the same ``run-name`` on a clock 30 s past the kill: uploads
   received (persisted by either process, counted in each), kept in the
   final journal, lost, and devices asked twice; (c) ``synth-budget=0`` where the
   requested images fit ``--max-unbudgeted``, else an estimate from (a)'s
   rates.

The budget is chosen so that N=10 already exceeds it: the server work is then
bounded by the same number of synthetic images at every N. ``--quick`` sets
``QUICK_KEYS`` (fewer examples per pool client, 5 sampler steps) and runs
``synth-budget=0`` up to 5,000 requested images (N=10 only). The bench exits 1
when a check fails: 0 uploads lost; no device asked twice; server work at the
largest N within 2x of the smallest; peak RSS at the largest N below 4 GB;
late and missing devices listed as such.

Writes ``<out>/fleet.json``, ``fleet.md`` and ``fleet.png``.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import tomllib
from flwr.app import Context, Message

from deploy.inprocess import FIRST_NODE_ID, Device

from .report import md_table, num, pct, write_json

REPO_ROOT = Path(__file__).resolve().parents[1]
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


def say(msg: str) -> None:
    print(f"[bench] {msg}", flush=True)


def default_run_config() -> dict[str, Any]:
    with open(REPO_ROOT / "pyproject.toml", "rb") as f:
        return dict(tomllib.load(f)["tool"]["flwr"]["app"]["config"])


def bench_config(quick: bool, over: dict[str, Any] | None = None) -> dict[str, Any]:
    """The run config of every round: defaults, the bench's keys, --quick's."""
    return (
        default_run_config() | BENCH_KEYS | (QUICK_KEYS if quick else {}) | (over or {})
    )


# ---------------------------------------------------------------- the fleet


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


# ---------------------------------------------------------------- the pool


def record_pool(
    run_config: dict[str, Any], pool: int, pool_dir: Path
) -> dict[str, Any]:
    """The real ClientApp's collect on partitions ``0..pool-1`` of a ``pool``-way
    split, through the in-process Grid; each reply's content saved as Flower's
    wire format (``partition-<p>.pb``) with ``pool.json``."""
    from flwr.common.serde import recorddict_to_proto

    from client_app.app import app
    from common.datasets import dataset_info
    from deploy.inprocess import InProcessGrid, partition_fleet
    from methods import build_config, get_method
    from methods.base import ServerContext

    cfg = build_config(run_config)
    method = get_method(cfg.method)
    pool_dir.mkdir(parents=True, exist_ok=True)
    ctx = ServerContext(cfg=cfg, run_dir=pool_dir, info=dataset_info(cfg.data_args()))
    content = method.collect_content(ctx)
    grid = InProcessGrid(app, partition_fleet(pool), dict(run_config))
    client_s, upload_bytes = [], []
    for p, node in enumerate(grid.nodes):
        t0 = time.perf_counter()
        msg = Message(content, dst_node_id=node, message_type=method.collect_type)
        (reply,) = grid.pull_messages(grid.push_messages([msg]))
        client_s.append(round(time.perf_counter() - t0, 3))
        if reply.has_error():
            raise RuntimeError(f"partition {p}: the ClientApp failed: {reply.error}")
        data = recorddict_to_proto(reply.content).SerializeToString()
        (pool_dir / f"partition-{p}.pb").write_bytes(data)
        upload_bytes.append(len(data))
    info = {
        "pool": pool,
        "method": cfg.method,
        "collect_type": method.collect_type,
        "evaluate_type": method.evaluate_type,
        "client_s": client_s,
        "reply_bytes": upload_bytes,
    }
    write_json(pool_dir / "pool.json", info)
    return info


class ReplayClient:
    """A ClientApp stand-in that answers with recorded genuine replies.

    The device on partition ``p`` of an ``n``-way fleet answers the collect
    message with the recorded reply of partition ``p mod P`` (a fresh copy), its
    ``partition-id`` and ``num-partitions`` set to ``p`` and ``n``, as a reply
    to the message (``reply_to``). The evaluation of the pushed model is not
    replayed: the device answers with its envelope and ``num-examples`` only.
    """

    def __init__(
        self, pool: Sequence[bytes], collect_type: str, evaluate_type: str | None
    ) -> None:
        if not pool:
            raise ValueError("an empty pool: record at least one reply")
        self.pool = list(pool)
        self.collect_type = collect_type
        self.evaluate_type = evaluate_type

    @classmethod
    def load(cls, pool_dir: Path) -> ReplayClient:
        info = json.loads((pool_dir / "pool.json").read_text())
        pool = [
            (pool_dir / f"partition-{p}.pb").read_bytes() for p in range(info["pool"])
        ]
        return cls(pool, info["collect_type"], info["evaluate_type"])

    def reply_content(self, partition_id: int, num_partitions: int) -> Any:
        """The recorded reply of ``partition_id mod P``, as that device's."""
        from flwr.common.serde import ProtoRecordDict, recorddict_from_proto

        from common import contract as C

        raw = self.pool[partition_id % len(self.pool)]
        content = recorddict_from_proto(ProtoRecordDict.FromString(raw))
        meta = content.config_records[C.KEY_META]
        meta["partition-id"] = partition_id
        meta["num-partitions"] = num_partitions
        return content

    def __call__(self, msg: Message, context: Context) -> Message:
        from common import contract as C

        pid = int(context.node_config["partition-id"])
        n = int(context.node_config["num-partitions"])
        content = self.reply_content(pid, n)
        kind = msg.metadata.message_type
        if kind == self.collect_type:
            return Message(content, reply_to=msg)
        if kind == self.evaluate_type:
            meta = dict(content.config_records[C.KEY_META])
            meta.pop("schema", None)
            metrics = content.metric_records[C.KEY_METRICS]
            return Message(
                C.pack_reply(meta, {"num-examples": metrics["num-examples"]}),
                reply_to=msg,
            )
        raise ValueError(
            f"message type {kind!r} is neither the pool's collect "
            f"({self.collect_type!r}) nor its evaluate ({self.evaluate_type!r})"
        )


# ---------------------------------------------------------------- one round


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


# ---------------------------------------------------------------- per size


@dataclass
class Bench:
    """What every size shares."""

    run_config: dict[str, Any]
    work: Path
    pool_dir: Path
    pool: int
    isolate: bool  # each round in its own process (False: in this one, no RSS)
    max_unbudgeted: int
    timeout_s: float
    seed: int = 0

    @property
    def runs(self) -> Path:
        return self.work / "runs"


def _journal(run_dir: Path) -> list[dict[str, Any]]:
    path = run_dir / "uploads" / "journal.jsonl"
    return [json.loads(line) for line in path.read_text().splitlines() if line]


def _round(
    bench: Bench,
    name: str,
    plan: FleetPlan,
    over: dict[str, Any] | None = None,
    clock_start: float = CLOCK_START,
    kill_after: int = 0,
    fresh: bool = True,
) -> tuple[dict[str, Any], Proc | None]:
    """One round (process) of run ``name``; ``(its report, the process)``."""
    if fresh:
        shutil.rmtree(bench.runs / name, ignore_errors=True)
    rc = (
        bench.run_config
        | (over or {})
        | {
            "output-dir": str(bench.runs),
            "run-name": name,
        }
    )
    tag = f"{name}-{'killed' if kill_after else 'run'}-{clock_start - CLOCK_START:.0f}"
    spec = {
        "name": tag,
        "plan": plan.__dict__,
        "run_config": rc,
        "pool_dir": str(bench.pool_dir),
        "clock_start": clock_start,
        "kill_after": kill_after,
        "report": str(bench.work / "reports" / f"{tag}.json"),
    }
    Path(spec["report"]).parent.mkdir(parents=True, exist_ok=True)
    if not bench.isolate and not kill_after:
        return play_round(spec), None
    proc = spawn("round", spec, bench.work, bench.timeout_s)
    expected = -signal.SIGKILL if kill_after else 0
    if proc.returncode != expected:
        raise RuntimeError(
            f"round {tag} exited with {proc.returncode} (expected {expected}); "
            f"log {proc.log}:\n{_log_tail(proc.log)}"
        )
    return json.loads(Path(spec["report"]).read_text()), proc


def _results(bench: Bench, name: str) -> dict[str, Any]:
    return json.loads((bench.runs / name / "results.json").read_text())


def _server_work(res: dict[str, Any]) -> float:
    t = res["timings_s"]
    return float(t.get("synthesize", 0.0)) + float(t.get("train", 0.0))


def _images(res: dict[str, Any]) -> tuple[int | None, int | None]:
    """(requested, used) synthetic images of a round."""
    b = res.get("synth_budget") or {}
    return b.get("requested"), b.get("used", res.get("num_synthetic"))


def run_size(bench: Bench, n: int) -> dict[str, Any]:
    """The three rounds of fleet size ``n``; one row of the report."""
    plan = plan_fleet(n, float(bench.run_config["collect-window-s"]), bench.seed)
    collect_type = json.loads((bench.pool_dir / "pool.json").read_text())[
        "collect_type"
    ]
    row: dict[str, Any] = {
        "n": n,
        "replayed_from_pool": bench.pool,
        "genuine_clients": min(n, bench.pool),
        "designed": {
            "silent": list(plan.silent),
            "late": list(plan.late),
            "on_time": len(plan.on_time),
        },
    }

    # 1. Uninterrupted, with the budget: costs, fleet, accuracy
    name = f"n{n}-budget"
    say(f"N={n}: the round with synth-budget={bench.run_config['synth-budget']} ...")
    rep, proc = _round(bench, name, plan)
    res = _results(bench, name)
    fleet = res["fleet"]
    uploads = sum(e["event"] == "upload" for e in _journal(bench.runs / name))
    requested, used = _images(res)
    collect_s = float(res["timings_s"]["collect"])
    row |= {
        "uploads_used": res["num_clients"],
        "uploads_received": uploads,
        "uploads_counted": rep["uploads_received"],
        "late": fleet["late"],
        "missing": fleet["missing"],
        "rejected": fleet["rejected"],
        "lost_contact": fleet["lost_contact"],
        "times_asked": fleet["times_asked"],
        "asked": len(fleet["asked"]),
        "asked_twice_uninterrupted": _asked_twice(rep["sent"], collect_type),
        "closed_reason": fleet["closed_reason"],
        "window_s": fleet["window_s"],
        "collect_s": collect_s,
        "collect_s_per_upload": collect_s / uploads if uploads else None,
        "synthesize_s": float(res["timings_s"].get("synthesize", 0.0)),
        "train_s": float(res["timings_s"].get("train", 0.0)),
        "server_work_s": _server_work(res),
        "round_s": float(res["timings_s"].get("total", 0.0)),
        "peak_rss_mb": proc.peak_rss_mb if proc else None,
        "process_wall_s": round(proc.wall_s, 1) if proc else None,
        "process_cpu_s": round(proc.cpu_s, 1) if proc else None,
        "images_requested": requested,
        "images_used": used,
        "budget_binds": requested is not None and used is not None and used < requested,
        "global_accuracy_budget": res.get("global_accuracy"),
        "global_accuracy_per_domain_budget": res.get("global_accuracy_per_domain"),
    }
    say(
        f"N={n}: {row['uploads_used']} used, {len(row['late'])} late, "
        f"{len(row['missing'])} missing; collect {collect_s:.1f} s, server work "
        f"{row['server_work_s']:.1f} s, peak RSS {num(row['peak_rss_mb'], '{:.0f}')} "
        f"MB, global acc {pct(row['global_accuracy_budget'])}%"
    )

    # 2. Killed in mid-window, resumed with the same run-name
    row["kill"] = kill_and_resume(bench, n, plan, collect_type)

    # 3. Without the budget, where it fits
    row["no_budget"] = no_budget(bench, n, plan, row)
    return row


def _asked_twice(sent: list[Any], collect_type: str) -> list[int]:
    seen: set[int] = set()
    twice = set()
    for node, kind in sent:
        if kind == collect_type:
            (twice if node in seen else seen).add(int(node))
    return sorted(twice)


def kill_and_resume(
    bench: Bench, n: int, plan: FleetPlan, collect_type: str
) -> dict[str, Any]:
    """SIGKILL the server once the journal holds about half the eventual uploads;
    run it again (same run-name) on a clock ``RESTART_S`` past the kill."""
    name = f"n{n}-kill"
    k = max(1, len(plan.on_time) // 2)
    say(f"N={n}: kill after {k} uploads, then resume ...")
    first, p1 = _round(bench, name, plan, kill_after=k)
    before = _journal(bench.runs / name)
    heard_1 = {
        int(e["node_id"]) for e in before if e["event"] in ("upload", "rejected")
    }
    uploads_1 = sum(e["event"] == "upload" for e in before)
    killed_at = float(first["killed_at"])
    again = killed_at + RESTART_S
    second, p2 = _round(bench, name, plan, clock_start=again, fresh=False)
    after = _journal(bench.runs / name)
    res = _results(bench, name)
    in_journal = sum(e["event"] == "upload" for e in after)
    received = int(first["uploads_received"]) + int(second["uploads_received"])
    asked_2 = [int(node) for node, kind in second["sent"] if kind == collect_type]
    upload_nodes = [int(e["node_id"]) for e in after if e["event"] == "upload"]
    return {
        "kill_after": k,
        "killed_at_s": round(killed_at - CLOCK_START, 1),
        "resumed_at_s": round(again - CLOCK_START, 1),
        "received_before_kill": uploads_1,
        "received": received,
        "in_final_journal": in_journal,
        "lost": received - in_journal,
        "journal_prefix_kept": after[: len(before)] == before,
        "asked_twice": sorted(heard_1 & set(asked_2)),
        "uploaded_twice": sorted(
            {x for x in upload_nodes if upload_nodes.count(x) > 1}
        ),
        "asked_again": sorted(set(asked_2) - heard_1),
        "uploads_used": res["num_clients"],
        "late": res["fleet"]["late"],
        "missing": res["fleet"]["missing"],
        "window_s": res["fleet"]["window_s"],
        "global_accuracy": res.get("global_accuracy"),
        "peak_rss_mb": max(
            (p.peak_rss_mb or 0.0 for p in (p1, p2) if p is not None), default=None
        ),
        "process_wall_s": [round(p.wall_s, 1) for p in (p1, p2) if p is not None],
        "process_cpu_s": [round(p.cpu_s, 1) for p in (p1, p2) if p is not None],
    }


def no_budget(
    bench: Bench, n: int, plan: FleetPlan, row: dict[str, Any]
) -> dict[str, Any]:
    """``synth-budget=0`` if the requested images fit ``max_unbudgeted``, else
    the seconds it would take at the budget round's rates (this CPU)."""
    requested = row["images_requested"]
    used = row["images_used"] or 0
    est = None
    if requested and used:
        est = requested * (row["synthesize_s"] + row["train_s"]) / used
    if requested is None or requested > bench.max_unbudgeted:
        say(
            f"N={n}: synth-budget=0 not run ({requested} images, ~{num(est, '{:.0f}')}"
            " s on this CPU)"
        )
        return {
            "run": False,
            "images_requested": requested,
            "estimated_s": round(est, 1) if est is not None else None,
            "reason": f"not run: {requested} images requested "
            f"(> --max-unbudgeted {bench.max_unbudgeted}), "
            f"~{num(est, '{:.0f}')} s on this CPU",
        }
    name = f"n{n}-nobudget"
    say(f"N={n}: synth-budget=0 ({requested} images, ~{num(est, '{:.0f}')} s) ...")
    _, proc = _round(bench, name, plan, over={"synth-budget": 0})
    res = _results(bench, name)
    _, images = _images(res)
    return {
        "run": True,
        "images": images,
        "estimated_s": round(est, 1) if est is not None else None,
        "server_work_s": _server_work(res),
        "peak_rss_mb": proc.peak_rss_mb if proc else None,
        "process_wall_s": round(proc.wall_s, 1) if proc else None,
        "process_cpu_s": round(proc.cpu_s, 1) if proc else None,
        "global_accuracy": res.get("global_accuracy"),
        "global_accuracy_per_domain": res.get("global_accuracy_per_domain"),
    }


# ---------------------------------------------------------------- the bench


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


# ---------------------------------------------------------------- report files


def _ms(x: float | None) -> str:
    return num(None if x is None else 1000 * x, "{:.1f}")


def _acc_cell(nb: dict[str, Any]) -> str:
    return pct(nb["global_accuracy"]) if nb["run"] else nb["reason"]


def format_table(report: dict[str, Any]) -> str:
    rows = []
    for r in report["rows"]:
        k = r["kill"]
        rows.append(
            [
                f"{r['n']:,}",
                str(r["genuine_clients"]),
                f"{r['uploads_used']} / {r['uploads_received']}",
                f"{k['received']} / {k['in_final_journal']} / {k['lost']}",
                str(len(k["asked_twice"]) + len(r["asked_twice_uninterrupted"])),
                str(len(r["late"])),
                str(len(r["missing"])),
                _ms(r["collect_s_per_upload"]),
                num(r["server_work_s"], "{:.1f}"),
                num(r["peak_rss_mb"], "{:,.0f}"),
                f"{r['images_requested']:,} -> {r['images_used']:,}",
                pct(r["global_accuracy_budget"]),
                _acc_cell(r["no_budget"]),
            ]
        )
    return md_table(
        [
            "N",
            "genuine clients",
            "uploads used / received",
            "kill+resume: received / in journal / lost",
            "asked twice",
            "late",
            "missing",
            "collect ms / upload",
            "server work s",
            "peak RSS MB",
            "synthetic images requested -> used",
            "global acc % (budget)",
            "global acc % (no budget)",
        ],
        rows,
    )


def _ws(wall: Any, cpu: Any) -> str:
    return f"{num(wall, '{:.0f}')} / {num(cpu, '{:.0f}')}"


def format_time_table(report: dict[str, Any]) -> str:
    pool = report["pool"]
    rows = [["pool", _ws(pool.get("wall_s"), pool.get("cpu_s")), "", ""]]
    for r in report["rows"]:
        k, nb = r["kill"], r["no_budget"]
        kill = " + ".join(
            _ws(w, c)
            for w, c in zip(k["process_wall_s"], k["process_cpu_s"], strict=True)
        )
        rows.append(
            [
                f"N={r['n']:,}",
                _ws(r["process_wall_s"], r["process_cpu_s"]),
                kill,
                _ws(nb.get("process_wall_s"), nb.get("process_cpu_s"))
                if nb["run"]
                else "not run",
            ]
        )
    return md_table(["", "with the budget", "killed + resumed", "synth-budget=0"], rows)


def write_outputs(out: Path, report: dict[str, Any]) -> None:
    out.mkdir(parents=True, exist_ok=True)
    write_json(out / "fleet.json", report)
    rc = report["run_config"]
    pool = report["pool"]
    m = report["machine"]
    design = report["fleet_design"]
    quick = report.get("quick")
    md = [
        "# Fleet scale benchmark (issue 22)",
        "",
        "`" + " ".join(["python -m bench fleet", *report.get("argv", [])]) + "`",
        "",
        f"* mode: **{'quick' if quick else 'full'}**; method `{rc['method']}`, "
        f"dataset `{rc['dataset']}`; machine: {m['processor'] or m['machine']}, "
        f"{m['cpu_count']} CPU cores; wall time {report['wall_s']:.0f} s",
        f"* --quick changes only: `{QUICK_KEYS}`, and synth-budget=0 runs up to "
        f"{report['max_unbudgeted']:,} requested images"
        if quick
        else f"* full default config (--quick would set `{QUICK_KEYS}`); "
        f"synth-budget=0 runs up to {report['max_unbudgeted']:,} requested images",
        f"* every round: `{ {k: rc[k] for k in BENCH_KEYS} }`",
        f"* **replayed from a pool of {pool['pool']} genuine replies**: one process "
        f"ran the real ClientApp's collect on the {pool['pool']} partitions of a "
        f"{pool['pool']}-way `{pool['partition']}` split "
        f"({sum(pool['client_s']):.1f} s of client work); in every round the "
        f"device on partition p answers with the reply of partition p mod "
        f"{pool['pool']} (partition id and fleet size rewritten). flwr-datasets' "
        "Dirichlet partitioner fails at 1,000 partitions of the 30,000-image client "
        "pool (min_partition_size=10: 'max number of attempts (10) was reached'), "
        "and 1,000 genuine clients on this CPU would cost ~1 s of partitioning "
        "each plus their captioning, inside the server's process. The push-back "
        "evaluation is not replayed (no per-client accuracy): the accuracy is the "
        "server's global model on the global test set.",
        f"* the fleet: devices connect uniformly over the first "
        f"{design['arrive_share']:.0%} of the {design['window_s']:.0f} s window; "
        f"{design['silent_share']:.0%} never reply, {design['late_share']:.0%} "
        f"reply {design['late_s'][0]:.0f}-{design['late_s'][1]:.0f} s after the "
        f"close (at least one of each); evaluations take "
        f"{design['evaluate_s'][0]:.0f}-{design['evaluate_s'][1]:.0f} s. The "
        "window runs on a virtual clock (waiting costs nothing), so collect time "
        "is the server's own work per upload (screening, checksumming, fsyncing "
        "the journal); it includes loading the models the first upload's "
        "validation needs (a one-off, so small N show a higher cost per upload).",
        f"* synth-budget {rc['synth-budget']} images with images-per-class "
        f"{rc['images-per-class']}: N={report['rows'][0]['n']} already requests "
        "more, so the server work is bounded by the same number of synthetic "
        "images at every N (per class, weighted k-means representatives of the "
        "clients' vectors).",
        f"* kill + resume: the server is SIGKILLed once the journal holds about "
        f"half the eventual uploads and run again with the same run-name on a clock "
        f"{design['restart_s']:.0f} s past the kill; received = uploads persisted "
        "by either process (counted in the processes), lost = received - uploads "
        "in the final journal; asked twice = nodes heard from (upload or "
        "rejection) before the kill that were sent the collect message again.",
        "* peak RSS: `wait4`'s ru_maxrss of the round's own process (the server; "
        "devices are replayed in it at microseconds per reply).",
        "",
        format_table(report),
        "",
        "## Checks",
        "",
        *[
            f"- [{'x' if c['ok'] else ' '}] {c['check']}: {c['detail']}"
            for c in report["checks"]
        ],
        "",
        "## Time of each process (wall s / CPU s)",
        "",
        format_time_table(report),
        "",
        "## Late and missing devices (node ids)",
        "",
        *[
            f"- N={r['n']}: late {r['late']}; missing {r['missing']}"
            for r in report["rows"]
        ],
        "",
    ]
    (out / "fleet.md").write_text("\n".join(md))
    plot(report, out / "fleet.png")


def plot(report: dict[str, Any], path: Path) -> Path:
    """Cost against N (log-x): collect ms per upload, server work, peak RSS;
    and the global accuracy with and without the budget."""
    from .report import pyplot, save_figure

    plt = pyplot()
    rows = report["rows"]
    ns = [r["n"] for r in rows]
    fig, axes = plt.subplots(1, 4, figsize=(15, 3.6))
    panels = [
        (
            "collect ms per upload",
            {"": [1000 * (r["collect_s_per_upload"] or 0) for r in rows]},
        ),
        ("server work s (synth-budget)", {"": [r["server_work_s"] for r in rows]}),
        (
            "peak RSS of the server round, MB",
            {
                "uninterrupted": [r["peak_rss_mb"] or 0 for r in rows],
                "kill + resume": [r["kill"]["peak_rss_mb"] or 0 for r in rows],
            },
        ),
    ]
    for ax, (title, series) in zip(axes, panels, strict=False):
        for label, ys in series.items():
            ax.plot(ns, ys, "o-", label=label or None)
        if len(series) > 1:
            ax.legend(fontsize=8)
        ax.set_xscale("log")
        ax.set_xlabel("clients N")
        ax.set_title(title, fontsize=10)
        ax.set_ylim(bottom=0)
        ax.set_xticks(ns, [f"{n:,}" for n in ns])
        ax.minorticks_off()
    ax = axes[3]
    ax.plot(ns, [r["global_accuracy_budget"] for r in rows], "o-", label="budget")
    nb = [
        (r["n"], r["no_budget"]["global_accuracy"])
        for r in rows
        if r["no_budget"]["run"]
    ]
    if nb:
        ax.plot(*zip(*nb, strict=True), "s--", label="no budget")
    ax.set_xscale("log")
    ax.set_xticks(ns, [f"{n:,}" for n in ns])
    ax.minorticks_off()
    ax.set_ylim(0, 1)
    ax.set_xlabel("clients N")
    ax.set_title("global accuracy", fontsize=10)
    ax.legend(fontsize=8)
    return save_figure(fig, path)


def print_summary(report: dict[str, Any]) -> None:
    print()
    print(format_table(report))
    print()
    for r in report["rows"]:
        print(f"N={r['n']}: late {r['late']}; missing {r['missing']}")
    print()
    for c in report["checks"]:
        print(f"[{'ok' if c['ok'] else 'FAILED'}] {c['check']}: {c['detail']}")


# ---------------------------------------------------------------- entry points


def parse_sizes(text: str) -> list[int]:
    try:
        sizes = [int(s) for s in text.split(",") if s.strip()]
    except ValueError:
        raise ValueError(f"--sizes {text!r}: use comma-separated integers") from None
    if not sizes or sizes != sorted(set(sizes)):
        raise ValueError(f"--sizes {text!r}: use distinct sizes in increasing order")
    return sizes


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="python -m bench fleet",
        description="The real round at fleet scale: costs, kill + resume, budget.",
    )
    p.add_argument(
        "--quick",
        action="store_true",
        help=f"the smallest settings that show every size: {QUICK_KEYS}",
    )
    p.add_argument(
        "--sizes",
        default=",".join(map(str, DEFAULT_SIZES)),
        help="fleet sizes N (default 10,100,1000)",
    )
    p.add_argument("--out", default="bench-results", help="where fleet.* go")
    p.add_argument(
        "--pool",
        type=int,
        default=DEFAULT_POOL,
        help="genuine client runs replayed to the fleet (default 10)",
    )
    p.add_argument(
        "--max-unbudgeted",
        type=int,
        default=None,
        help="run synth-budget=0 up to this many images (default "
        f"{QUICK_MAX_UNBUDGETED} with --quick, else {FULL_MAX_UNBUDGETED})",
    )
    p.add_argument(
        "--work",
        default=None,
        help="scratch folder for run folders and logs (default: a new "
        "temporary one, removed at the end)",
    )
    p.add_argument(
        "--timeout-s", type=float, default=3600.0, help="limit per round process"
    )
    return p


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv[:1] == ["--_round"]:  # a round's own process
        play_round(json.loads(Path(argv[1]).read_text()))
        return 0
    if argv[:1] == ["--_record"]:  # the pool's process
        spec = json.loads(Path(argv[1]).read_text())
        record_pool(spec["run_config"], int(spec["pool"]), Path(spec["pool_dir"]))
        return 0
    args = build_parser().parse_args(argv)
    try:
        sizes = parse_sizes(args.sizes)
        run_config = bench_config(args.quick)
        for n in sizes:
            plan_fleet(n)
    except ValueError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    max_unbudgeted = args.max_unbudgeted
    if max_unbudgeted is None:
        max_unbudgeted = QUICK_MAX_UNBUDGETED if args.quick else FULL_MAX_UNBUDGETED
    out = Path(args.out).expanduser().resolve()
    work = (
        Path(args.work).resolve()
        if args.work
        else Path(tempfile.mkdtemp(prefix="fleet-"))
    )
    say(
        f"fleet: {'quick' if args.quick else 'full'}, sizes {sizes}, pool "
        f"{args.pool}, work {work} -> {out}"
    )
    report = run_fleet(
        sizes, run_config, work, args.pool, True, max_unbudgeted, args.timeout_s
    )
    if not args.work:  # kept when a round failed: its log is there
        shutil.rmtree(work, ignore_errors=True)
    report |= {"argv": argv, "quick": args.quick}
    write_outputs(out, report)
    print_summary(report)
    say(f"wrote {out / 'fleet.json'}, fleet.md, fleet.png")
    return 0 if all(c["ok"] for c in report["checks"]) else 1


if __name__ == "__main__":
    raise SystemExit(main())
