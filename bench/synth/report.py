"""The synthesis bench's files: synth.json and synth.md."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from bench.report import md_table, num, write_json


def write_report(out: Path, report: dict[str, Any]) -> None:
    """Write ``synth.json`` and ``synth.md`` (the parts present) to ``out``."""
    out.mkdir(parents=True, exist_ok=True)
    write_json(out / "synth.json", report)
    lines = ["# Synthesis engine benchmark", "", f"Machine: {report['machine']}.", ""]
    if report.get("pipeline"):
        lines += [
            "## Engine vs diffusers' StableDiffusionPipeline (same modules, same initial latents)",
            "",
        ]
        lines.append(
            md_table(
                [
                    "model",
                    "px",
                    "batch",
                    "steps",
                    "CFG",
                    "device",
                    "dtype",
                    "compiled",
                    "engine img/s",
                    "diffusers img/s",
                    "ratio",
                    "engine peak GB",
                    "diffusers peak GB",
                    "max abs diff",
                ],
                [
                    [
                        r["model"],
                        str(r["px"]),
                        str(r["batch"]),
                        str(r["steps"]),
                        num(r["guidance"], "{:.1f}"),
                        r["device"],
                        r["dtype"],
                        str(r["compiled"]),
                        num(r["engine_img_s"]),
                        num(r["diffusers_img_s"]),
                        num(r["ratio"], "{:.3f}"),
                        num(r["engine_peak_gb"]),
                        num(r["diffusers_peak_gb"]),
                        num(r["max_abs_diff"], "{:.1e}"),
                    ]
                    for r in report["pipeline"]
                ],
            )
        )
        lines.append("")
    if report.get("workers"):
        lines += ["## Ray workers (embedded generator)", ""]
        lines.append(
            md_table(
                ["workers", "img/s", "max abs diff to one process"],
                [
                    [
                        str(r["workers"]),
                        num(r["img_s"]),
                        num(r["max_abs_diff"], "{:.1e}"),
                    ]
                    for r in report["workers"]
                ],
            )
        )
        lines.append("")
    if report.get("cpu_batch"):
        first = report["cpu_batch"][0]
        lines += [
            "## CPU denoising batch (embedded generator, default sampler settings)",
            "",
            f"{first['n']} images a run, {first['threads']} torch threads, batch "
            "sizes alternated; ratio: img/s over the first size's (medians). "
            "`CPU_AUTO_BATCH` in `common/synthesis.py` is the auto batch on a CPU.",
            "",
        ]
        lines.append(
            md_table(
                ["batch", "median s", "img/s", "ratio", "max abs diff"],
                [
                    [
                        str(r["batch"]),
                        num(r["median_s"]),
                        num(r["img_s"], "{:.1f}"),
                        num(r["ratio"], "{:.2f}x"),
                        num(r["max_abs_diff"], "{:.1e}"),
                    ]
                    for r in report["cpu_batch"]
                ],
            )
        )
        lines.append("")
    if report.get("quality"):
        lines += ["## Quality-matched speed (embedded stack, paired seeds)", ""]
        lines.append(
            md_table(
                [
                    "setting",
                    "img/s",
                    "speed-up",
                    "global acc %",
                    "client acc %",
                    "FID-proxy",
                    "Δglobal (points)",
                    "Δclient (points)",
                    "ΔFID-proxy",
                    "within seed noise",
                ],
                [
                    [
                        q["setting"],
                        num(q["img_s"]),
                        num(q["speedup"], "{:.2f}x"),
                        f"{100 * (q['global_accuracy'] or 0):.1f} ± "
                        f"{100 * (q['global_accuracy_std'] or 0):.1f}",
                        f"{100 * q['accuracy']:.1f} ± {100 * (q['accuracy_std'] or 0):.1f}",
                        f"{q['fid_proxy']:.2f} ± {q['fid_proxy_std'] or 0:.2f}",
                        num(100 * (q["d_global_accuracy"] or 0), "{:+.1f}"),
                        num(100 * (q["d_accuracy"] or 0), "{:+.1f}"),
                        num(q["d_fid_proxy"], "{:+.2f}"),
                        "yes" if q["within_noise"] else "no",
                    ]
                    for q in report["quality"]
                ],
            )
        )
        lines.append("")
    notes = report.get("notes") or {}
    if isinstance(notes, list):
        notes = {"": notes}
    lines += [f"- {n}" for part in notes.values() for n in part]
    (out / "synth.md").write_text("\n".join(lines) + "\n")
