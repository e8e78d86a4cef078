"""The accuracy bench's Markdown tables (pure functions of the summary)."""

from __future__ import annotations

from typing import Any

from bench.report import md_table, nbytes, num, pct

from .config import ORACLE


def _accuracy_table(
    summary: dict[str, dict[str, Any]],
    oracle: str,
    label: str,
    acc: str,
    sd: str,
    gap_key: str,
    seeds_key: str | None,
) -> str:
    """method | <label> | std | gap to oracle | upload B/client | wall s/run."""
    header = [
        "method",
        label,
        "std (%)",
        "gap to oracle (pp)",
        "upload B/client",
        "client s/image",
        "wall s/run",
    ]
    rows = []
    for m, s in summary.items():
        name = f"{m} (oracle, in-process)" if m == oracle else m
        gap = (
            "0 (reference)"
            if m == oracle and s[acc] is not None
            else pct(s[gap_key], True)
        )
        up = "n/a (raw data)" if m == oracle else nbytes(s["upload_bytes_per_client"])
        wall = "n/a" if s["wall_s_per_run"] is None else f"{s['wall_s_per_run']:.1f}"
        failed = f" ({len(s['failed_seeds'])} failed)" if s["failed_seeds"] else ""
        missing = len(s["seeds"]) - s[seeds_key] if seeds_key else 0
        if missing:  # a run without a global test set (e.g. an image folder)
            failed += f" ({missing} without global acc)"
        cps = s.get("client_s_per_image")
        cost = "n/a" if cps is None else f"{cps:.2g}"
        rows.append([f"{name}{failed}", pct(s[acc]), pct(s[sd]), gap, up, cost, wall])
    return md_table(header, rows)


def format_global_table(
    summary: dict[str, dict[str, Any]], oracle: str = ORACLE
) -> str:
    """The headline, Markdown: method | global acc | std | gap to oracle | upload
    B/client | wall s/run (global acc: on the global test set)."""
    return _accuracy_table(
        summary,
        oracle,
        "global acc (%)",
        "global_accuracy",
        "global_std",
        "global_gap_to_oracle",
        "global_seeds",
    )


def format_global_domain_table(summary: dict[str, dict[str, Any]]) -> str:
    """Markdown: global accuracy (%) per method and domain of the global test set."""
    doms = list(
        dict.fromkeys(d for s in summary.values() for d in s["global_per_domain"])
    )
    rows = [
        [m, *(pct(s["global_per_domain"].get(d)) for d in doms)]
        for m, s in summary.items()
    ]
    return md_table(["method", *doms], rows)


def format_table(summary: dict[str, dict[str, Any]], oracle: str = ORACLE) -> str:
    """Per-client accuracy (each client's held-out split), Markdown: method | mean
    acc | std | gap to oracle | upload B/client | wall s/run."""
    return _accuracy_table(
        summary, oracle, "mean acc (%)", "mean_accuracy", "std", "gap_to_oracle", None
    )


def domains_of(summary: dict[str, dict[str, Any]]) -> list[str]:
    """The client domains of every method's per-client rows, in order of appearance."""
    seen: dict[str, None] = {}
    for s in summary.values():
        for c in s["per_client"]:
            seen.setdefault(str(c["domain"]), None)
    return list(seen)


def format_domain_table(summary: dict[str, dict[str, Any]]) -> str:
    """Markdown: mean held-out accuracy (%) per method and client domain."""
    doms = domains_of(summary)
    rows = [
        [m, *(pct(s["per_domain"].get(d)) for d in doms)] for m, s in summary.items()
    ]
    return md_table(["method", *doms], rows)


def format_paired_table(paired: list[dict[str, Any]]) -> str:
    """Markdown: A vs B | mean A - B [95% interval] (pp) | per seed (pp) | A above
    B (seeds) | Holm p | ordering holds."""

    def interval(p: dict[str, Any]) -> str:
        lo, hi = p.get("ci95") or (None, None)
        if lo is None or hi is None:
            return pct(p["mean_diff"], True)
        return f"{pct(p['mean_diff'], True)} [{100 * lo:+.1f}, {100 * hi:+.1f}]"

    def holds(p: dict[str, Any]) -> str:
        if p.get("p_holm") is None:
            return "n/a (one seed)"
        return "yes" if p["holds"] else "no"

    rows = [
        [
            f"{p['a']} vs {p['b']}",
            interval(p),
            ", ".join(
                f"{s}: {100 * d:+.1f}"
                for s, d in zip(p["seeds"], p["diffs"], strict=True)
            ),
            f"{p['wins']}/{len(p['seeds'])}",
            "n/a" if p.get("p_holm") is None else f"{p['p_holm']:.3f}",
            holds(p),
        ]
        for p in paired
    ]
    return md_table(
        [
            "pair",
            "mean diff [95% CI] (pp)",
            "per seed (pp)",
            "A above B",
            "Holm p",
            "A > B holds",
        ],
        rows,
    )


def format_fid_table(fid: dict[str, Any]) -> str:
    """Markdown: the FID-proxy per domain (``generator_fid``'s result) and the mean."""
    rows = fid.get("per_domain", {})
    lines = [
        "| domain | real vs real (floor) | OSCAR, retrieval captions | OSCAR, oracle captions "
        "| class-name prompts | judge acc of OSCAR samples (%) | example retrieval caption |",
        "|---|---:|---:|---:|---:|---:|---|",
    ]
    for d, r in rows.items():
        lines.append(
            f"| {d} | {num(r.get('real_vs_real'))} | {num(r.get('oscar'))} | "
            f"{num(r.get('oscar_oracle'))} | {num(r.get('class_names'))} | "
            f"{pct(r.get('oscar_judge_accuracy'))} | {r.get('example_caption', '')} |"
        )
    means = fid.get("mean", {})
    if means:
        lines.append(
            f"| **mean** | {num(means.get('real_vs_real'))} | {num(means.get('oscar'))} | "
            f"{num(means.get('oscar_oracle'))} | {num(means.get('class_names'))} | "
            f"{pct(means.get('oscar_judge_accuracy'))} | |"
        )
    return "\n".join(lines)
