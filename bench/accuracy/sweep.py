"""``--sweep KEY=V1,V2,...``: the accuracy bench once per value, one table and
one plot.

``KEY`` is ``clients`` (the number of simulated clients) or any run-config key
(``dirichlet-alpha``, ``images-per-class``, ...). Each value's bench is a whole
accuracy bench of its own in ``<out>/sweep-<KEY>/<KEY>=<V>/`` (``--resume``
works per value); the sweep writes ``<out>/sweep-<KEY>.{json,md,png}``: per
method and value, the mean global accuracy over seeds with its 95% t interval,
and, on a world with unseen domains, the same on the unseen domains alone.
"""

from __future__ import annotations

import json
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

from bench.report import md_table, pyplot, save_figure, write_json

from ..stats import paired_t
from .records import seed_accuracies
from .report import seen_unseen

CLIENTS = "clients"  # the one sweep key that is an option, not a run-config key


def parse_sweep(text: str) -> tuple[str, list[str]]:
    """``"clients=4,10,50"`` -> ``("clients", ["4", "10", "50"])``.

    Raises
    ------
    ValueError
        Naming the bad ``--sweep`` value: no ``=``, no key, fewer than two
        values, a repeated value, or a non-integer number of clients.
    """
    key, sep, values = text.partition("=")
    key = key.strip()
    vals = [v.strip() for v in values.split(",") if v.strip()]
    if not sep or not key or len(vals) < 2:
        raise ValueError(
            f"--sweep {text!r}: give KEY=V1,V2,... with at least two values, e.g. "
            "clients=4,10,50 or dirichlet-alpha=0.1,0.5,1.0"
        )
    if len(set(vals)) != len(vals):
        raise ValueError(f"--sweep {text!r}: a value is repeated")
    if key == CLIENTS and not all(v.isdigit() and int(v) >= 1 for v in vals):
        raise ValueError(f"--sweep {text!r}: clients must be integers >= 1")
    return key, vals


def value_argv(argv: Sequence[str], key: str, value: str, out: Path) -> list[str]:
    """The bench's options for one value: ``argv`` without ``--sweep`` and
    ``--out``, then the value's folder and the value itself."""
    rest, skip = [], False
    for a in argv:
        if skip:
            skip = False
            continue
        if a in ("--sweep", "--out"):
            skip = True
            continue
        if a.startswith(("--sweep=", "--out=")):
            continue
        rest.append(a)
    folder = out / f"sweep-{key}" / f"{key}={value}"
    extra = ["--clients", value] if key == CLIENTS else ["--set", f"{key}={value}"]
    return [*rest, "--out", str(folder), *extra]


def _interval(per_seed: dict[int, float]) -> dict[str, Any] | None:
    if not per_seed:
        return None
    t = paired_t(list(per_seed.values()))
    return {k: t[k] for k in ("n", "mean", "low", "high")}


def sweep_rows(
    key: str, reports: dict[str, dict[str, Any]]
) -> dict[str, dict[str, dict[str, Any]]]:
    """Per method, per value: ``{"global": interval, "unseen": interval}``
    (mean and 95% t interval over seeds; ``unseen`` only on a world that has
    unseen domains)."""
    rows: dict[str, dict[str, dict[str, Any]]] = {}
    for value, rep in reports.items():
        runs = rep.get("runs", [])
        unseen = seen_unseen(runs)[1] or None
        for m in rep.get("methods", []):
            cell = {"global": _interval(seed_accuracies(runs, m))}
            if unseen:
                cell["unseen"] = _interval(seed_accuracies(runs, m, unseen))
            rows.setdefault(m, {})[value] = cell
    return rows


def _fmt(iv: dict[str, Any] | None) -> str:
    if iv is None:
        return "n/a"
    if iv["low"] is None:
        return f"{100 * iv['mean']:.1f} (n={iv['n']})"
    return f"{100 * iv['mean']:.1f} [{100 * iv['low']:.1f}, {100 * iv['high']:.1f}]"


def write_sweep(
    out: Path, key: str, values: list[str], reports: dict[str, Any]
) -> Path:
    """``<out>/sweep-<key>.{json,md,png}``; returns the markdown's path."""
    rows = sweep_rows(key, reports)
    parts = [
        p
        for p in ("global", "unseen")
        if any(p in c for r in rows.values() for c in r.values())
    ]
    write_json(out / f"sweep-{key}.json", {"key": key, "values": values, "rows": rows})
    lines = [
        f"# Accuracy over `{key}`",
        "",
        "Mean global accuracy (%) over seeds with its 95% t interval; each value's "
        f"whole bench is in `sweep-{key}/{key}=<value>/`.",
    ]
    for part in parts:
        title = "global test set" if part == "global" else "unseen domains only"
        lines += ["", f"## {title}", ""]
        lines.append(
            md_table(
                ["method", *[f"{key}={v}" for v in values]],
                [
                    [m, *[_fmt(rows[m].get(v, {}).get(part)) for v in values]]
                    for m in rows
                ],
            )
        )
    md = out / f"sweep-{key}.md"
    md.write_text("\n".join(lines) + "\n")
    _plot(out / f"sweep-{key}.png", key, values, rows, parts)
    return md


def _plot(
    path: Path, key: str, values: list[str], rows: dict[str, Any], parts: list[str]
) -> None:
    plt = pyplot()
    fig, axes = plt.subplots(1, len(parts), figsize=(6 * len(parts), 4), squeeze=False)
    for ax, part in zip(axes[0], parts, strict=True):
        for m, cells in rows.items():
            pts = [
                (i, cells[v][part])
                for i, v in enumerate(values)
                if cells.get(v, {}).get(part)
            ]
            if not pts:
                continue
            xs = [i for i, _ in pts]
            ys = [100 * iv["mean"] for _, iv in pts]
            err = [
                [
                    100 * (iv["mean"] - iv["low"]) if iv["low"] is not None else 0
                    for _, iv in pts
                ],
                [
                    100 * (iv["high"] - iv["mean"]) if iv["high"] is not None else 0
                    for _, iv in pts
                ],
            ]
            ax.errorbar(xs, ys, yerr=err, marker="o", capsize=3, label=m)
        ax.set_xticks(range(len(values)), values)
        ax.set_xlabel(key)
        ax.set_ylabel("accuracy (%)")
        ax.set_title("global test set" if part == "global" else "unseen domains")
        ax.grid(alpha=0.3)
    axes[0][0].legend(fontsize=7)
    save_figure(fig, path)


def run_sweep(
    argv: Sequence[str],
    text: str,
    out: Path,
    bench: Callable[[list[str]], int],
) -> int:
    """Run ``bench`` once per value of ``--sweep text`` and write the sweep.

    Returns the worst exit code of the values' benches (2 on a bad ``--sweep``).
    """
    try:
        key, values = parse_sweep(text)
    except ValueError as e:
        print(f"error: {e}")
        return 2
    codes, reports = [], {}
    for v in values:
        sub = value_argv(argv, key, v, out)
        codes.append(bench(sub))
        path = Path(sub[sub.index("--out") + 1]) / "accuracy.json"
        if path.exists():
            reports[v] = json.loads(path.read_text())
    if reports:
        print(f"wrote {write_sweep(out, key, values, reports)}")
    return max(codes)
