"""``python -m bench ablation``: OSCAR's ablations in the embedded world.

Accuracy of the global classifier against synthetic images per (client, class)
(5, 10, 20, 30, 50), guidance scale (1, 2, 3, 5, 7.5) and sampler steps (5, 10,
20, 40), the other settings at the run defaults. The clients' uploads are made
once per seed and replayed to every variant's real round (``bench.inprocess``). The OSCAR paper
finds accuracy levelling off near 30 images per class (guidance 7.5, 50 steps);
``levels_off`` checks that here: the gain from 30 to 50 images per class against
the gain from 5 to 30.

``--quick``: the accuracy bench's quick world (600 examples per client), 3 seeds
(about 14 minutes on the 2-core CPU); without it: the default world, 3 seeds.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path
from typing import Any

from bench.report import (
    md_table,
    mean,
    num,
    pyplot,
    save_figure,
    say,
    std,
    write_json,
)

# Attempts at closing the gap to the centralized model, each measured by itself
# against the defaults on the same seeds (a new federation each: some change what
# the clients upload).
ATTEMPTS: dict[str, dict[str, Any]] = {
    "defaults": {},
    "prototypes-per-class=3": {"prototypes-per-class": 3},
    "images-per-class=50": {"images-per-class": 50},
    "prototypes-per-class=3, images-per-class=50": {
        "prototypes-per-class": 3,
        "images-per-class": 50,
    },
}

SWEEPS: dict[str, tuple[str, tuple[float, ...]]] = {
    "images per class": ("images-per-class", (5, 10, 20, 30, 50)),
    "guidance scale": ("guidance-scale", (1.0, 2.0, 3.0, 5.0, 7.5)),
    "sampler steps": ("num-inference-steps", (5, 10, 20, 40)),
}


def variants() -> dict[str, dict[str, Any]]:
    """Every (sweep, value) as run-config overrides; the defaults' point is shared."""
    out: dict[str, dict[str, Any]] = {}
    for _, (key, values) in SWEEPS.items():
        for v in values:
            value = int(v) if key != "guidance-scale" else float(v)
            out[f"{key}={value}"] = {key: value}
    return out


def summarize(rows: list[dict[str, Any]]) -> dict[str, list[dict[str, Any]]]:
    """Per sweep, per value: mean and std over seeds of each metric."""
    out: dict[str, list[dict[str, Any]]] = {}
    for sweep, (key, values) in SWEEPS.items():
        out[sweep] = []
        for v in values:
            value = int(v) if key != "guidance-scale" else float(v)
            mine = [r for r in rows if r["variant"] == f"{key}={value}"]
            if not mine:
                continue
            out[sweep].append(
                {
                    "value": value,
                    "seeds": len(mine),
                    **{
                        m: mean(r[m] for r in mine)
                        for m in ("global_accuracy", "accuracy", "fid_proxy", "img_s")
                    },
                    **{
                        f"{m}_std": std([r[m] for r in mine if r[m] is not None])
                        for m in ("global_accuracy", "accuracy", "fid_proxy")
                    },
                }
            )
    return out


def levels_off(
    points: list[dict[str, Any]], metric: str = "global_accuracy"
) -> dict[str, Any]:
    """Gain 5 -> 30 and 30 -> 50 images per class; levels off if the second is under
    a fifth of the first (or negative)."""
    at = {p["value"]: p[metric] for p in points if p[metric] is not None}
    if not {5, 30, 50} <= set(at):
        return {"checked": False}
    early, late = at[30] - at[5], at[50] - at[30]
    return {
        "checked": True,
        "gain_5_to_30": early,
        "gain_30_to_50": late,
        "levels_off": late < 0.2 * early if early > 0 else None,
    }


def plot(out: Path, summary: dict[str, list[dict[str, Any]]]) -> Path:
    """``ablation.png``: both accuracies against each sweep's value (± std)."""
    plt = pyplot()
    fig, axes = plt.subplots(1, len(summary), figsize=(4.2 * len(summary), 3.4))
    for ax, (sweep, points) in zip(axes, summary.items(), strict=True):
        xs = [p["value"] for p in points]
        for metric, label, color in (
            ("global_accuracy", "global test set", "#C44E52"),
            ("accuracy", "clients' held-out", "#4C72B0"),
        ):
            ys = [100 * (p[metric] or 0) for p in points]
            err = [100 * (p[f"{metric}_std"] or 0) for p in points]
            ax.errorbar(
                xs, ys, yerr=err, marker="o", capsize=3, label=label, color=color
            )
        ax.set_xlabel(sweep)
        ax.set_ylabel("accuracy (%)")
        ax.grid(alpha=0.3)
    axes[0].legend(fontsize=8)
    fig.suptitle(
        "OSCAR ablations in the embedded world (mean ± std over seeds)", fontsize=10
    )
    fig.tight_layout()
    return save_figure(fig, out / "ablation.png")


def write_report(out: Path, report: dict[str, Any]) -> None:
    """Write ``ablation.json``, ``ablation.md`` and ``ablation.png`` to ``out``."""
    out.mkdir(parents=True, exist_ok=True)
    write_json(out / "ablation.json", report)
    summary = report["summary"]
    lines = [
        "# OSCAR ablations (embedded stack)",
        "",
        f"Machine: {report['machine']}; "
        f"seeds {report['seeds']}; wall {report.get('wall_s', 0):.0f} s.",
        "",
    ]
    for sweep, points in summary.items():
        lines += [f"## Accuracy against {sweep}", ""]
        lines.append(
            md_table(
                [sweep, "global acc %", "client acc %", "FID-proxy", "img/s"],
                [
                    [
                        str(p["value"]),
                        f"{100 * (p['global_accuracy'] or 0):.1f} ± {100 * (p['global_accuracy_std'] or 0):.1f}",
                        f"{100 * (p['accuracy'] or 0):.1f} ± {100 * (p['accuracy_std'] or 0):.1f}",
                        num(p["fid_proxy"]),
                        num(p["img_s"], "{:.1f}"),
                    ]
                    for p in points
                ],
            )
        )
        lines.append("")
    lo = report.get("levels_off", {})
    if lo.get("checked"):
        lines.append(
            f"Levelling off (paper: near 30 images per class): global accuracy gains "
            f"{100 * lo['gain_5_to_30']:+.1f} points from 5 to 30 and "
            f"{100 * lo['gain_30_to_50']:+.1f} from 30 to 50: "
            f"{'levels off' if lo['levels_off'] else 'does not level off'}."
        )
    lines += ["", "![ablations](ablation.png)", ""] + [
        f"- {n}" for n in report["notes"]
    ]
    (out / "ablation.md").write_text("\n".join(lines) + "\n")
    if any(summary.values()):
        plot(out, summary)


def main(argv: list[str] | None = None) -> int:
    """Run the sweeps (or ``--attempts``) over seeds; 0 when done."""
    import os
    import platform

    from bench.accuracy.config import QUICK_WORLD
    from bench.inprocess import federation, run_variant
    from bench.run_config import default_run_config, parse_seeds

    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    p = argparse.ArgumentParser(prog="python -m bench ablation")
    p.add_argument("--quick", action="store_true")
    p.add_argument("--seeds", default="0,1,2")
    p.add_argument("--clients", type=int, default=4)
    p.add_argument("--out", default="bench-results")
    p.add_argument(
        "--attempts",
        action="store_true",
        help="only the gap-closing attempts (ATTEMPTS), not the sweeps",
    )
    args = p.parse_args(argv)
    seeds = parse_seeds(args.seeds)
    over = (dict(QUICK_WORLD) if args.quick else {}) | {"min-clients": args.clients}
    machine = f"{platform.machine()}, {os.cpu_count()} CPU cores"
    report: dict[str, Any] = {
        "machine": machine,
        "seeds": seeds,
        "quick": args.quick,
        "overrides": over,
        "runs": [],
        "notes": [
            "global acc: the global classifier on the MNIST test digits rendered in every "
            "client's domain (100 per class and domain); client acc: mean over clients of "
            "their held-out splits; FID-proxy: each client's synthetic images against its "
            "held-out images (judge features), mean over clients",
            "the clients' uploads are computed once per seed and shared by every variant",
        ],
    }
    t0 = time.perf_counter()
    out = Path(args.out)
    if args.attempts:
        return run_attempts(args, seeds, over, machine, out)
    # runs of seeds not run now are kept from the last report
    previous = out / "ablation.json"
    if previous.is_file():
        old = json.loads(previous.read_text()).get("runs", [])
        report["runs"] = [r for r in old if r["seed"] not in seeds]
        report["seeds"] = sorted({r["seed"] for r in report["runs"]} | set(seeds))
    for seed in seeds:
        base = default_run_config() | over | {"seed": seed}
        fed = federation(base, args.clients)
        ran: dict[tuple, dict[str, Any]] = {}  # the defaults' point runs once
        for label, v in variants().items():
            key = tuple(sorted((base | v).items()))
            row = ran.get(key) or run_variant(fed, v, label)
            ran[key] = row
            report["runs"].append(row | {"variant": label})
            report["summary"] = summarize(report["runs"])
            report["levels_off"] = levels_off(report["summary"]["images per class"])
            report["wall_s"] = time.perf_counter() - t0
            write_report(out, report)
    say(f"ablation done in {time.perf_counter() - t0:.0f} s; {out / 'ablation.md'}")
    return 0


def summarize_attempts(
    rows: list[dict[str, Any]], oracle: dict[int, float]
) -> list[dict[str, Any]]:
    """Per attempt: mean ± std, paired difference to the defaults, gap to the oracle."""
    out = []
    seeds = sorted({r["seed"] for r in rows})
    by = {(r["variant"], r["seed"]): r for r in rows}
    for name in dict.fromkeys(r["variant"] for r in rows):
        mine = [by[(name, s)] for s in seeds if (name, s) in by]
        paired = [
            by[(name, s)]["global_accuracy"] - by[("defaults", s)]["global_accuracy"]
            for s in seeds
            if (name, s) in by and ("defaults", s) in by
        ]
        gaps = [
            by[(name, s)]["global_accuracy"] - oracle[s]
            for s in seeds
            if (name, s) in by and s in oracle
        ]
        out.append(
            {
                "attempt": name,
                "seeds": len(mine),
                "global_accuracy": mean(r["global_accuracy"] for r in mine),
                "global_accuracy_std": std([r["global_accuracy"] for r in mine]),
                "d_vs_defaults": mean(paired),
                "d_per_seed": paired,
                "better_in": sum(d > 0 for d in paired),
                "gap_to_centralized": mean(gaps),
                "upload_bytes_per_class": mean(
                    r.get("upload_bytes_per_class") for r in mine
                ),
            }
        )
    return out


def run_attempts(
    args: Any, seeds: list[int], over: dict[str, Any], machine: str, out: Path
) -> int:
    """Each attempt with its own uploads, on the same seeds, against the centralized
    model of the accuracy bench (``run_centralized``: the same global test set)."""
    from bench.accuracy.oracle import run_centralized
    from bench.inprocess import federation, run_variant
    from bench.run_config import build_cfg, default_run_config

    t0 = time.perf_counter()
    rows: list[dict[str, Any]] = []
    oracle: dict[int, float] = {}
    for seed in seeds:
        base = default_run_config() | over | {"seed": seed}
        central, _ = run_centralized(build_cfg(base), args.clients)
        oracle[seed] = central["global_accuracy"]
        for name, a in ATTEMPTS.items():
            fed = federation(base | a, args.clients)
            row = run_variant(fed, {}, name) | {
                "upload_bytes_per_class": fed.vector_bytes_per_class()
            }
            rows.append(row)
            report: dict[str, Any] = {
                "machine": machine,
                "seeds": seeds,
                "overrides": over,
                "runs": rows,
                "centralized": oracle,
                "wall_s": time.perf_counter() - t0,
                "summary": summarize_attempts(rows, oracle),
            }
            write_json(out / "gap_attempts.json", report)
            lines = [
                "# Closing the gap to the centralized model (global test set)",
                "",
                f"Machine: {machine}; seeds {seeds}; overrides {over}; "
                f"wall {report['wall_s']:.0f} s.",
                "",
            ]
            lines.append(
                md_table(
                    [
                        "attempt",
                        "global acc %",
                        "Δ vs defaults (points)",
                        "better in",
                        "gap to centralized (points)",
                        "vector bytes per (client, class)",
                    ],
                    [
                        [
                            a["attempt"],
                            f"{100 * (a['global_accuracy'] or 0):.1f} ± {100 * (a['global_accuracy_std'] or 0):.1f}",
                            num(100 * (a["d_vs_defaults"] or 0), "{:+.1f}"),
                            f"{a['better_in']}/{len(a['d_per_seed'])}",
                            num(100 * (a["gap_to_centralized"] or 0), "{:+.1f}"),
                            num(a["upload_bytes_per_class"], "{:.0f}"),
                        ]
                        for a in report["summary"]
                    ],
                )
            )
            (out / "gap_attempts.md").write_text("\n".join(lines) + "\n")
    say(f"attempts done in {time.perf_counter() - t0:.0f} s; {out / 'gap_attempts.md'}")
    return 0
