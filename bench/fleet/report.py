"""The fleet bench's files (fleet.json, fleet.md, fleet.png) and summary."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from bench.report import md_table, num, pct, pyplot, save_figure, write_json

from .plan import BENCH_KEYS, QUICK_KEYS


def _ms(x: float | None) -> str:
    return num(None if x is None else 1000 * x, "{:.1f}")


def _acc_cell(nb: dict[str, Any]) -> str:
    return pct(nb["global_accuracy"]) if nb["run"] else nb["reason"]


def format_table(report: dict[str, Any]) -> str:
    """Markdown: one row per fleet size (uploads, kill + resume, costs, accuracy)."""
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
    """Markdown: wall and CPU seconds of every process of the bench."""
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
    """Write ``fleet.json``, ``fleet.md`` and ``fleet.png`` to ``out``."""
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
    """Print the table, the late and missing devices and the checks."""
    print()
    print(format_table(report))
    print()
    for r in report["rows"]:
        print(f"N={r['n']}: late {r['late']}; missing {r['missing']}")
    print()
    for c in report["checks"]:
        print(f"[{'ok' if c['ok'] else 'FAILED'}] {c['check']}: {c['detail']}")
