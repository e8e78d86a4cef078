"""The three rounds of one fleet size: with the budget, killed and resumed,
without the budget."""

from __future__ import annotations

import json
import shutil
import signal
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from bench.report import num, pct, say

from .plan import CLOCK_START, RESTART_S, FleetPlan, plan_fleet
from .process import Proc, _log_tail, play_round, spawn


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
    spec: dict[str, Any] = {
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
    twice: set[int] = set()
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
