"""The accuracy bench's headline table: README's results block, generated.

One row per method: global accuracy on the seen and on the unseen domains
(mean and 95% t interval over seeds), the paired gain over each floor
(``public-only``, ``zero-shot``) on the unseen domains with its interval and
Holm's correction, and a verdict that says where a method does not beat a
floor. Then the papers' claimed orderings with their intervals. On a world
without unseen domains the columns are the global test set's.

``python -m bench readme`` writes it into README.md between
``<!-- generated:results -->`` and ``<!-- /generated:results -->`` from the
committed report (``HEADLINE``); ``--check`` fails on drift (a test runs it).
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Any

from bench.report import md_table, nbytes

from ..stats import paired_t
from .config import FLOORS, ORACLE, floor_pairs
from .records import paired_differences, seed_accuracies
from .report import seen_unseen
from .tables import format_paired_table

ROOT = Path(__file__).resolve().parents[2]
HEADLINE = Path("bench-results/held-out/accuracy.json")  # the report README quotes
BEGIN, END = "<!-- generated:results -->", "<!-- /generated:results -->"


def _iv(values: list[float]) -> str:
    if not values:
        return "-"
    t = paired_t(values)
    mean, low, high = t["mean"], t["low"], t["high"]
    assert mean is not None
    if low is None or high is None or low == high:  # one seed, or no spread
        return f"{100 * mean:.1f}"
    return f"{100 * mean:.1f} [{100 * low:.1f}, {100 * high:.1f}]"


def _gain(p: dict[str, Any] | None) -> str:
    if p is None:
        return "-"
    lo, hi = p["ci95"]
    mark = "**" if p["holds"] else ""
    if lo is None:
        return f"{100 * p['mean_diff']:+.1f}"
    return f"{mark}{100 * p['mean_diff']:+.1f} [{100 * lo:+.1f}, {100 * hi:+.1f}]{mark}"


def _verdict(gains: dict[str, dict[str, Any] | None]) -> str:
    """Where the method stands against each floor, in words."""
    parts = []
    for floor, p in gains.items():
        if p is None:
            continue
        if p["holds"]:
            parts.append(f"above {floor}")
        elif p["mean_diff"] > 0:
            parts.append(f"not shown above {floor}")
        else:
            parts.append(f"**not above {floor}**")
    return "; ".join(parts) or "-"


def headline(report: dict[str, Any]) -> list[str]:
    """Markdown lines of the headline block for ``report`` (an accuracy.json)."""
    runs, methods = report["runs"], list(report["methods"])
    seen, unseen = seen_unseen(runs)
    part = unseen or None  # what the floors are compared on
    paired = {
        (p["a"], p["b"]): p
        for p in paired_differences(runs, floor_pairs(methods), domains=part)
    }
    uploads: dict[str, list[float]] = {}
    for r in runs:
        if r.get("ok") and r.get("upload_bytes_per_client") is not None:
            uploads.setdefault(r["method"], []).append(r["upload_bytes_per_client"])
    where = "unseen domains" if unseen else "global test set"
    head = ["method", "seen domains %" if unseen else "global %"]
    head += ["unseen domains %"] if unseen else []
    head += [f"vs {f} on the {where} (pp)" for f in FLOORS]
    head += ["verdict", "upload B/client"]

    def key(m: str) -> tuple[int, float]:  # floors, then by accuracy, the oracle last
        accs = list(seed_accuracies(runs, m, unseen or seen or None).values())
        rank = 0 if m in FLOORS else 2 if m == ORACLE else 1
        return rank, -(sum(accs) / len(accs) if accs else 0.0)

    rows = []
    for m in sorted(methods, key=key):
        row = [f"**{m}**" if m in FLOORS else m]
        row.append(_iv(list(seed_accuracies(runs, m, seen or None).values())))
        if unseen:
            row.append(_iv(list(seed_accuracies(runs, m, unseen).values())))
        gains = {f: paired.get((m, f)) for f in FLOORS}
        floor_row = m in FLOORS or m == ORACLE
        row += ["" if floor_row else _gain(g) for g in gains.values()]
        row.append(
            "floor" if m in FLOORS else "oracle" if m == ORACLE else _verdict(gains)
        )
        up = uploads.get(m)
        row.append(
            "raw data" if m == ORACLE else nbytes(sum(up) / len(up)) if up else "-"
        )
        rows.append(row)
    n_seeds = len(report["seeds"])
    lines = [
        f"World `{report.get('world', 'default')}`, {report['num_clients']} clients, "
        f"{n_seeds} seeds ({', '.join(map(str, report['seeds']))}), "
        f"{'quick' if report['quick'] else 'full'} settings; "
        f"{report['wall_time_s'].get('total', 0) / 3600:.1f} h on "
        f"{report.get('machine', str(report.get('cpu_count', '?')) + ' CPU cores')}. "
        "Accuracy: mean [95% t interval] over seeds. "
        + (
            f"Seen: {', '.join(seen)} (styles the stack was pretrained on); unseen: "
            f"{', '.join(unseen)} (never seen by any part of it). "
            if unseen
            else ""
        )
        + f"Gains over the floors: paired per seed on the {where}, 95% t interval, "
        "**bold** where it holds after Holm's correction over all these pairs "
        "(family-wise 5%).",
        "",
        md_table(head, rows),
        "",
        "The orderings the papers claim, and what the public start adds "
        "(`*-public-init` against the same method from a random start); global test "
        "set, paired per seed, Holm over these pairs:",
        "",
        format_paired_table(paired_differences(runs)),
    ]
    return lines


def plot_headline(report: dict[str, Any], path: Path) -> Path:
    """Bars of every method's accuracy on the seen and the unseen domains with
    their 95% t intervals; the floors as dashed lines (the global test set's
    accuracy where no domain is unseen)."""
    from bench.report import pyplot, save_figure

    runs, methods = report["runs"], list(report["methods"])
    seen, unseen = seen_unseen(runs)
    parts = (
        [("seen domains", seen), ("unseen domains", unseen)]
        if unseen
        else [("global test set", None)]
    )
    plt = pyplot()
    fig, axes = plt.subplots(
        1, len(parts), figsize=(7 * len(parts), 4.5), squeeze=False, sharey=True
    )
    for ax, (title, part) in zip(axes[0], parts, strict=True):
        means, errs = [], []
        for m in methods:
            t = paired_t(list(seed_accuracies(runs, m, part).values()) or [0.0])
            mean = float(t["mean"] or 0.0)
            lo = mean if t["low"] is None else float(t["low"])
            means.append(100 * mean)
            errs.append(100 * (mean - lo))
        colors = ["0.6" if m in FLOORS or m == ORACLE else "C0" for m in methods]
        ax.bar(range(len(methods)), means, yerr=errs, capsize=3, color=colors)
        for f, style in zip(FLOORS, ("--", ":"), strict=False):
            if f in methods:
                ax.axhline(means[methods.index(f)], ls=style, c="k", lw=1, label=f)
        ax.set_xticks(range(len(methods)), methods, rotation=60, ha="right", fontsize=8)
        ax.set_title(title)
        ax.set_ylabel("accuracy (%), mean and 95% interval over seeds")
        ax.grid(axis="y", alpha=0.3)
        ax.legend(fontsize=8)
    fig.suptitle(
        f"world {report.get('world', 'default')}: {len(report['seeds'])} seeds, "
        f"{report['num_clients']} clients"
    )
    return save_figure(fig, path)


def splice(text: str, block: list[str]) -> str:
    """``text`` with the generated results block replaced by ``block``."""
    if BEGIN not in text or END not in text:
        raise ValueError(f"README.md has no {BEGIN} ... {END} block")
    head, rest = text.split(BEGIN, 1)
    _, tail = rest.split(END, 1)
    note = (
        f"<!-- generated by `python -m bench readme` from {HEADLINE}: do not edit -->"
    )
    return head + BEGIN + "\n" + note + "\n" + "\n".join(block) + "\n" + END + tail


def main(argv: list[str] | None = None, root: Path = ROOT) -> int:
    """Write README's results block (0), or with ``--check`` report drift (1)."""
    p = argparse.ArgumentParser(
        prog="python -m bench readme", description=__doc__.split("\n")[0]
    )
    p.add_argument("--check", action="store_true", help="fail if README.md drifted")
    p.add_argument("--report", default=str(root / HEADLINE), help="the accuracy.json")
    args = p.parse_args(argv)
    report = json.loads(Path(args.report).read_text())
    readme = root / "README.md"
    text = readme.read_text()
    new = splice(text, headline(report))
    if args.check:
        if new != text:
            print(
                "README.md's results block drifted: run `python -m bench readme`",
                file=sys.stderr,
            )
            return 1
        return 0
    readme.write_text(new)
    png = plot_headline(report, Path(args.report).with_name("headline.png"))
    print(f"wrote {readme}, {png}")
    return 0
