"""The LoRA bench's files: lora.json, lora.md and lora.png."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from bench.report import (
    md_table,
    mean_std,
    nbytes,
    num,
    pct,
    pyplot,
    save_figure,
    write_json,
)

from .summary import paired_diffs


def format_checks(chk: dict[str, Any]) -> list[str]:
    """One Markdown bullet per challenger: does it beat fedavg, on the means and per seed."""
    lines = []
    for name, c in chk.items():
        m, p = c["means"], c["per_seed"]
        verdict = "beats" if m["fid_proxy"] and m["accuracy"] else "does NOT beat"
        lines.append(
            f"* {name}: {verdict} fedavg on the means (FID-proxy "
            f"{'lower' if m['fid_proxy'] else 'not lower'}, accuracy "
            f"{'higher' if m['accuracy'] else 'not higher'}); seed by seed: lower "
            f"FID-proxy in {p['fid_proxy_wins']}/{p['seeds']}, higher accuracy in "
            f"{p['accuracy_wins']}/{p['seeds']}; mean paired difference "
            f"{p['mean_fid_proxy_diff']:+.2f} FID-proxy, "
            f"{100 * p['mean_accuracy_diff']:+.1f} accuracy points"
        )
    return lines


def format_table(summary: dict[str, dict[str, Any]]) -> str:
    """Markdown: per variant, FID-proxy and accuracy (mean ± std over seeds), bytes, rank."""
    header = [
        "variant",
        "FID-proxy (lower is better)",
        "downstream acc (%)",
        "upload B/client",
        "download B/client",
        "merged rank",
        "energy kept",
        "merge s",
    ]
    rows = [
        [
            v,
            mean_std(s["mean_fid_proxy"], s["std_fid_proxy"]),
            mean_std(s["mean_accuracy"], s["std_accuracy"], 100, "{:.1f}"),
            nbytes(s["upload_bytes_per_client"]),
            nbytes(s["download_bytes_per_client"]),
            num(s["merged_rank"], "{}"),
            num(s["energy_kept"], "{:.3f}"),
            num(s["merge_s"]),
        ]
        for v, s in summary.items()
    ]
    return md_table(header, rows)


def format_domain_table(summary: dict[str, dict[str, Any]]) -> str:
    """Markdown: per variant and client domain, FID-proxy / accuracy (mean over seeds)."""
    doms = sorted({d for s in summary.values() for d in s["per_domain"]})
    rows = []
    for v, s in summary.items():
        cells = []
        for d in doms:
            x = s["per_domain"].get(d)
            cells.append(
                "n/a" if x is None else f"{num(x['fid_proxy'])} / {pct(x['accuracy'])}"
            )
        rows.append([v, *cells])
    return md_table(["variant", *(f"{d} FID / acc%" for d in doms)], rows)


def plot(
    out: Path, summary: dict[str, dict[str, Any]], records: list[dict[str, Any]]
) -> Path | None:
    """Top: each variant's mean ± std over seeds. Bottom: paired differences to
    fedavg, one dot per seed and the mean as a bar (below 0 / above 0 is better)."""
    if not summary:
        return None
    plt = pyplot()
    names = list(summary)
    colors = ["#999999" if n in ("none", "own") else "#4C72B0" for n in names]
    fig, axes = plt.subplots(2, 2, figsize=(11, 6.6))
    for ax, key, std_key, scale, label in (
        (
            axes[0, 0],
            "mean_fid_proxy",
            "std_fid_proxy",
            1.0,
            "FID-proxy (lower is better)",
        ),
        (axes[0, 1], "mean_accuracy", "std_accuracy", 100.0, "downstream accuracy (%)"),
    ):
        vals = [(summary[n][key] or 0.0) * scale for n in names]
        errs = [(summary[n][std_key] or 0.0) * scale for n in names]
        bars = ax.bar(names, vals, yerr=errs, capsize=3, color=colors)
        ax.bar_label(bars, labels=[f"{x:.1f}" for x in vals], fontsize=7)
        ax.set_ylabel(label)
        ax.tick_params(axis="x", rotation=30)
    diffs = paired_diffs(records)
    others = [n for n in names if n in diffs]
    for ax, j, scale, label in (
        (axes[1, 0], 0, 1.0, "FID-proxy - fedavg's (same seed)"),
        (axes[1, 1], 1, 100.0, "accuracy - fedavg's (points, same seed)"),
    ):
        means = [scale * sum(d[j] for d in diffs[n]) / len(diffs[n]) for n in others]
        shade = ["#999999" if n in ("none", "own") else "#4C72B0" for n in others]
        ax.bar(others, means, color=shade, alpha=0.5)
        for i, n in enumerate(others):
            ax.scatter(
                [i] * len(diffs[n]),
                [scale * d[j] for d in diffs[n]],
                color="black",
                s=10,
                zorder=3,
            )
        ax.axhline(0.0, color="black", linewidth=0.8)
        ax.set_ylabel(label)
        ax.tick_params(axis="x", rotation=30)
    fig.suptitle(
        "one-shot federated LoRA on unseen concepts (grey: references; bottom: dots = seeds)"
    )
    return save_figure(fig, out / "lora.png")


def write_report(out: Path, report: dict[str, Any]) -> None:
    """Write ``lora.json``, ``lora.md`` and ``lora.png`` to ``out``."""
    out.mkdir(parents=True, exist_ok=True)
    summary = report["summary"]
    write_json(out / "lora.json", report, indent=1)
    cfg = report["config"]
    md = [
        "# One-shot federated LoRA: merges on unseen concepts",
        "",
        f"`{report['command']}`",
        "",
        f"* mode: **{report['mode']}**; world **{report['world']}**; "
        f"{report['num_clients']} clients; seeds {report['seeds']}; domains "
        f"`{cfg['domains']}` (a rare style + a transform the base generator never "
        f"saw), Dirichlet {cfg['dirichlet-alpha']}, {cfg['max-examples-per-client']} "
        f"examples per client ({cfg['test-fraction']:.0%} held out)",
        f"* client LoRA: rank {cfg['lora-rank']}, alpha {cfg['lora-alpha']}, targets "
        f"`{cfg['lora-targets']}`, init `{cfg['lora-init']}`, {cfg['lora-steps']} "
        f"steps of batch {cfg['lora-batch-size']}; svd merge rank "
        f"{cfg['lora-merge-rank']}; {cfg['images-per-class']} samples per (client, "
        f"class), {cfg['num-inference-steps']} steps, guidance {cfg['guidance-scale']}",
        f"* machine: {report['machine']}; wall time {report['wall_s']:.0f} s",
        "",
        "## Mean over clients, then over seeds (± std over seeds)",
        "",
        format_table(summary),
        "",
        "## Per client domain (mean over seeds)",
        "",
        format_domain_table(summary),
        "",
        "## Checks",
        "",
        *format_checks(report.get("checks", {})),
        "",
        "## Notes",
        "",
        "* `none`: the base generator conditioned on each client's caption embeddings "
        "(OSCAR with this world); `own`: each client's own adapter for its own samples "
        "(what a merge tries to keep, not a federated result).",
        "* FID-proxy: Fréchet distance in the judge classifier's features between a "
        "client's samples and its held-out real images; downstream accuracy: the "
        "classifier trained on all clients' samples, on each client's held-out split "
        f"(mean over {report.get('probes', 1)} classifier inits); `generative` = the "
        "`svd` merge corrected on samples of every client's adapter (FedDDPM).",
        "* paired: every variant samples with the same noise, captions and classifier "
        "seeds, so per-seed differences between variants are paired comparisons.",
        "* upload: one client's adapter + per-class embeddings in fp16; download: the "
        "merged adapter in fp16.",
    ]
    (out / "lora.md").write_text("\n".join(md) + "\n")
    plot(out, summary, report["records"])
