"""The accuracy bench's files: accuracy.json, accuracy.md and accuracy.png."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from bench.report import md_table, pct, pyplot, save_figure, write_json

from .config import NOTES, ORACLE, floor_pairs
from .records import paired_differences, reference_rows, seed_accuracies
from .tables import (
    format_domain_table,
    format_fid_table,
    format_global_domain_table,
    format_global_table,
    format_paired_table,
    format_table,
)


def write_report(out: Path, report: dict[str, Any]) -> None:
    """Write ``accuracy.json``, ``accuracy.md`` and ``accuracy.png`` to ``out``
    (rewritten after every run, so a report is there before all runs are)."""
    out.mkdir(parents=True, exist_ok=True)
    write_json(out / "accuracy.json", report, indent=2)
    summary = report["summary"]
    wall = report["wall_time_s"]
    md = [
        "# One-shot FL accuracy benchmark",
        "",
        "`" + " ".join(["python -m bench accuracy", *report["argv"]]) + "`",
        "",
        f"* mode: **{'quick' if report['quick'] else 'full default config'}**, "
        f"world `{report.get('world', 'default')}`; "
        f"{report['num_clients']} clients; seeds {report['seeds']}; dataset "
        f"`{report['config']['dataset']}`, partition `{report['config']['partition']}`"
        f" (alpha {report['config']['dirichlet-alpha']}), domains `{report['config']['domains']}`",
        f"* overrides of the default run config: `{report['overrides']}`",
        f"* embedded stack: `{report['embedded_dir']}`; server device(s): "
        f"{', '.join(sorted({str(r.get('device', 'cpu')) for r in report['runs']})) or 'n/a'}"
        f"; machine: {report.get('cpu_count', '?')} CPU cores",
        f"* wall time: {wall.get('total', 0):.0f} s in total ({wall.get('flower_runs', 0):.0f} s "
        f"Flower runs, {wall.get('centralized', 0):.0f} s centralized oracle, "
        f"{wall.get('fid_proxy', 0):.0f} s FID-proxy)",
        "",
        "## Accuracy on the global test set",
        "",
        "The dataset's test split in the domain of every client, balanced over "
        "classes: the global model (for `local`, each client's own model, mean "
        f"over clients; for `{ORACLE}`, the model trained on the union).",
        "",
        format_global_table(summary),
        "",
        "### Paired per-seed differences (global accuracy)",
        "",
        format_paired_table(paired_differences(report["runs"])),
        "",
        *floor_section(report),
        *domain_split_section(report),
        *(
            [
                "### References computed inside the runs (global accuracy %)",
                "",
                md_table(
                    ["reference", "global acc (%)", "std (%)", "seeds"],
                    reference_rows(report["runs"]),
                ),
                "",
            ]
            if reference_rows(report["runs"])
            else []
        ),
        "### Per domain (global accuracy %)",
        "",
        format_global_domain_table(summary),
        "",
        "## Per-client accuracy (each client's own held-out split)",
        "",
        format_table(summary),
        "",
        "### Per client domain (accuracy %)",
        "",
        format_domain_table(summary),
        "",
    ]
    failed = [r for r in report["runs"] if not r.get("ok")]
    if failed:
        md += ["### Failed runs", ""]
        md += [f"* {r['method']} seed {r['seed']}: {r.get('error')}" for r in failed]
        md.append("")
    fid = report.get("fid_proxy")
    if fid:
        md += [
            "## Generator quality per domain (FID-proxy, lower is better)",
            "",
            f"Fréchet distance in the judge classifier's feature space; "
            f"{fid['samples_per_class']} samples per class vs {fid['real_images_per_domain']} "
            f"real client-pool images of the domain; OSCAR uploads computed from "
            f"{fid['client_images_per_domain']} images of the domain; guidance "
            f"{fid['guidance_scale']}, {fid['num_inference_steps']} steps; class-name prompts "
            "are plain-style samples (no domain). `real vs real` is the floor at this "
            "sample size. Judge accuracy: the judge classifier recognises the "
            "conditioned class in the samples.",
            "",
            format_fid_table(fid),
            "",
            f"Judge accuracy of the class-name-prompt samples: "
            f"{pct(fid.get('class_names_judge_accuracy'))} %; FID-proxy wall time "
            f"{fid.get('wall_s', 0):.0f} s.",
            "",
        ]
    md += ["## Notes", ""] + [f"* {n}" for n in NOTES] + [""]
    (out / "accuracy.md").write_text("\n".join(md))
    plot_summary(
        summary,
        out / "accuracy.png",
        f"{'quick' if report['quick'] else 'full'}: {report['num_clients']} clients, "
        f"{len(report['seeds'])} seeds",
    )


def floor_section(report: dict[str, Any]) -> list[str]:
    """Markdown lines: every method against what the server knows without any
    client (``FLOORS``), paired over seeds, Holm-corrected as one family; empty
    when no floor ran."""
    summary = report["summary"]
    pairs = floor_pairs([m for m in report.get("methods", summary) if m in summary])
    paired = paired_differences(report["runs"], pairs)
    if not paired:
        return []
    below = sorted({p["a"] for p in paired if p["mean_diff"] <= 0})
    return [
        "### Against the floors: what the server knows without any client",
        "",
        "`public-only`: the global classifier trained on the server's public data "
        "alone; `zero-shot`: the stack's image and text encoders with class-name "
        "prompts, no training. A method that does not beat a floor adds nothing "
        "the server did not already have.",
        "",
        format_paired_table(paired),
        "",
        "Not above both floors on average: "
        + (", ".join(f"`{m}`" for m in below) if below else "none")
        + ".",
        "",
    ]


def split_domains(domains: list[str]) -> tuple[list[str], list[str]] | None:
    """``(seen, unseen)``: the global test's domains that the embedded stack's
    pretraining rendered, and those it never saw (``seen_in_pretraining``);
    ``None`` when a domain is not one of the ``mnist-domains`` world's."""
    from common.mnist_domains import seen_in_pretraining

    try:
        seen = [d for d in domains if seen_in_pretraining(d)]
    except ValueError:
        return None
    return seen, [d for d in domains if d not in seen]


def seen_unseen(runs: list[dict[str, Any]]) -> tuple[list[str], list[str]]:
    """``(seen, unseen)`` domains of the successful runs' global test sets;
    ``(all, [])`` where no domain is unseen (or they are not the mnist-domains
    world's)."""
    doms = sorted(
        {
            d
            for r in runs
            if r.get("ok")
            for d in r.get("global_accuracy_per_domain") or {}
        }
    )
    split = split_domains(doms) if doms else None
    return (split[0], split[1]) if split and split[0] and split[1] else (doms, [])


def domain_split_section(report: dict[str, Any]) -> list[str]:
    """Markdown lines: accuracy on the seen and the unseen domains apart, and
    every method against the floors on the unseen domains alone (paired over
    seeds, Holm-corrected as one family); empty without an unseen domain."""
    summary, runs = report["summary"], report["runs"]
    doms = list(
        dict.fromkeys(d for s in summary.values() for d in s["global_per_domain"])
    )
    split = split_domains(doms)
    if split is None or not split[0] or not split[1]:
        return []
    seen, unseen = split

    def acc(m: str, part: list[str]) -> str:
        v = list(seed_accuracies(runs, m, part).values())
        return pct(sum(v) / len(v)) if v else "-"

    rows = [[m, acc(m, seen), acc(m, unseen)] for m in summary]
    out = [
        "### Seen and unseen domains",
        "",
        f"Seen: {', '.join(f'`{d}`' for d in seen)} (styles the embedded stack was "
        f"pretrained on); unseen: {', '.join(f'`{d}`' for d in unseen)} (no image "
        "or caption word of them reached any part of its pretraining: "
        "`tests/unit/test_embedded_stack.py`). Global accuracy on each part, mean over "
        "its domains and over seeds.",
        "",
        md_table(["method", "seen domains", "unseen domains"], rows),
        "",
    ]
    pairs = floor_pairs([m for m in report.get("methods", summary) if m in summary])
    paired = paired_differences(runs, pairs, domains=unseen)
    if paired:
        below = sorted({p["a"] for p in paired if p["mean_diff"] <= 0})
        out += [
            "Against the floors on the unseen domains alone (what the federation "
            "adds where the server's own models never looked):",
            "",
            format_paired_table(paired),
            "",
            "Not above both floors on the unseen domains: "
            + (", ".join(f"`{m}`" for m in below) if below else "none")
            + ".",
            "",
        ]
    return out


def plot_summary(
    summary: dict[str, dict[str, Any]], path: Path, title: str = ""
) -> Path | None:
    """Global accuracy with std error bars per method; global accuracy per domain
    as grouped bars (the global test set's domains)."""
    import numpy as np

    plt = pyplot()

    names = [m for m, s in summary.items() if s["global_accuracy"] is not None]
    if not names:
        return None
    doms = list(
        dict.fromkeys(d for m in names for d in summary[m]["global_per_domain"])
    )
    fig, (ax, bx) = plt.subplots(
        1,
        2,
        figsize=(6 + 0.9 * len(names) + 1.2 * len(doms), 3.8),
        gridspec_kw={"width_ratios": [len(names) + 1, max(1, len(doms)) + 1]},
    )
    colors = plt.get_cmap("tab10")(np.arange(len(names)) % 10)
    means = [summary[m]["global_accuracy"] for m in names]
    stds = [summary[m]["global_std"] or 0.0 for m in names]
    bars = ax.bar(names, means, yerr=stds, capsize=4, color=colors)
    ax.bar_label(
        bars,
        labels=[f"{m:.3f}" for m in means],
        fontsize=8,
        label_type="center",
        color="white",
    )
    ax.set_ylim(0, 1.08)
    ax.set_ylabel("accuracy on the global test set")
    ax.set_title(title or "global accuracy over seeds (mean ± std)")
    ax.tick_params(axis="x", rotation=30)
    if ORACLE in names:
        ax.axhline(summary[ORACLE]["global_accuracy"], color="k", ls="--", lw=1)
    width = 0.8 / len(names)
    x = np.arange(len(doms))
    for i, m in enumerate(names):
        vals = [summary[m]["global_per_domain"].get(d, np.nan) for d in doms]
        bx.bar(
            x + (i - (len(names) - 1) / 2) * width,
            vals,
            width,
            label=m,
            color=colors[i],
        )
    bx.set_xticks(x, doms)
    bx.set_ylim(0, 1.08)
    bx.set_ylabel("global accuracy")
    bx.set_title("per domain of the global test set")
    bx.legend(fontsize=7, loc="upper left", bbox_to_anchor=(1.01, 1.0), frameon=False)
    return save_figure(fig, path)
