"""``python -m bench synth``: the synthesis engine against diffusers, side by side."""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path
from typing import Any

import torch

from .cpu_batch import compare_cpu_batches
from .pipeline import H100_FLOOR_IMG_S, compare_pipeline, say
from .quality import QUALITY_SETTINGS, quality_seed, summarize_quality
from .report import write_report
from .workers import compare_workers


def build_parser() -> argparse.ArgumentParser:
    """The command's options (``python -m bench synth --help``)."""
    p = argparse.ArgumentParser(
        prog="python -m bench synth", description=__doc__.split("\n")[0]
    )
    p.add_argument("--parts", default="pipeline,workers,quality")
    p.add_argument("--device", default="cpu", choices=("cpu", "cuda"))
    p.add_argument(
        "--compile", action="store_true", help="also the compiled UNet (cuda)"
    )
    p.add_argument("--reps", type=int, default=3)
    p.add_argument("--workers", default="1,2")
    p.add_argument(
        "--batches",
        default="256,128,64,32",
        help="cpu-batch: the batch sizes, the first the reference of the ratio",
    )
    p.add_argument("--images", type=int, default=384, help="cpu-batch: images a run")
    p.add_argument("--seeds", default="0,1,2")
    p.add_argument("--settings", default=",".join(QUALITY_SETTINGS))
    p.add_argument("--clients", type=int, default=4)
    p.add_argument(
        "--quick", action="store_true", help="the accuracy bench's quick world"
    )
    p.add_argument("--out", default="bench-results")
    return p


def main(argv: list[str] | None = None) -> int:
    """Run the parts of ``--parts``; parts not run keep their numbers from the
    last ``synth.json``."""
    import os
    import platform

    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    args = build_parser().parse_args(argv)
    parts = [p.strip() for p in args.parts.split(",") if p.strip()]
    known = ("pipeline", "workers", "quality", "cpu-batch")
    bad = sorted(set(parts) - set(known))
    settings = {
        s: QUALITY_SETTINGS[s]
        for s in args.settings.split(",")
        if s in QUALITY_SETTINGS
    }
    if bad or not settings:
        raise SystemExit(
            f"--parts must be among {', '.join(known)} (got {bad}); "
            f"--settings among {', '.join(QUALITY_SETTINGS)}"
        )
    device = torch.device(args.device)
    machine = (
        torch.cuda.get_device_name(device)
        if device.type == "cuda"
        else f"{platform.processor() or platform.machine()}, "
        f"{os.cpu_count()} CPU cores, torch {torch.__version__}"
    )
    out = Path(args.out)
    # parts not run this time keep their numbers from the last report
    previous = out / "synth.json"
    report: dict[str, Any] = (
        json.loads(previous.read_text()) if previous.is_file() else {}
    )
    # notes per part: a part run now replaces its own, the others' stay
    notes = report.get("notes") or {}
    if isinstance(notes, list):  # a report from before notes were kept per part
        notes = {"earlier": [n for n in notes if not n.startswith("wall time")]}
    notes = {k: v for k, v in notes.items() if k not in parts}
    report |= {"machine": machine, "args": vars(args), "notes": notes}
    t_all = time.perf_counter()
    if "pipeline" in parts:
        runs = (
            [("sd15", 512, 32, 25, 7.5, torch.bfloat16, False)]
            + (
                [("sd15", 512, 32, 25, 7.5, torch.bfloat16, True)]
                if args.compile
                else []
            )
            if device.type == "cuda"
            else [
                ("tiny", 32, 16, 20, 7.5, torch.float32, False),
                ("sd15", 64, 4, 8, 7.5, torch.float32, False),
            ]
        )
        report["pipeline"] = []
        for kind, px, batch, steps, w, dtype, comp in runs:
            say(f"pipeline: {kind} {px}px batch {batch}, {steps} steps")
            report["pipeline"].append(
                compare_pipeline(
                    kind, px, batch, steps, w, args.reps, device, dtype, comp
                )
            )
            r = report["pipeline"][-1]
            say(
                f"  engine {r['engine_img_s']:.2f} img/s, diffusers {r['diffusers_img_s']:.2f} "
                f"img/s, ratio {r['ratio']:.3f}, max abs diff {r['max_abs_diff']:.1e}"
            )
            write_report(out, report)
        if device.type == "cuda":
            notes["pipeline"] = [
                f"H100 compute floor at this setting: {H100_FLOOR_IMG_S} img/s"
            ]
        else:
            notes["pipeline"] = ["peak memory is measured on CUDA only"]
    if "workers" in parts:
        ws = [int(w) for w in args.workers.split(",")]
        say(f"workers: {ws}")
        report["workers"] = compare_workers(ws, n=64, steps=20)
        write_report(out, report)
    if "cpu-batch" in parts:
        sizes = [int(b) for b in args.batches.split(",")]
        say(f"cpu-batch: {sizes}, {args.images} images, {args.reps} reps")
        report["cpu_batch"] = compare_cpu_batches(sizes, args.images, args.reps)
        notes["cpu-batch"] = [
            "cpu-batch: the fastest size is machine-dependent (caches, threads); "
            "every size gives the same images (max abs diff)"
        ]
        write_report(out, report)
    if "quality" in parts:
        from bench.accuracy.config import QUICK

        over = (dict(QUICK) if args.quick else {}) | {"min-clients": args.clients}
        seeds = [int(x) for x in args.seeds.split(",")]
        # earlier seeds of the same settings are kept; the seeds run now replace theirs
        rows: list[dict[str, Any]] = [
            r
            for r in report.get("quality_runs", [])
            if r["seed"] not in seeds and r["setting"] in settings
        ]
        for s in seeds:
            rows += quality_seed(s, settings, args.clients, over)
            report["quality_runs"] = rows
            report["quality"] = summarize_quality(rows)
            write_report(out, report)
        notes["quality"] = [
            "quality: the same client uploads per seed for every setting; global acc: the "
            "global classifier on the global test set (MNIST test digits in every "
            "client's domain); client acc: on every client's held-out split (mean); "
            "FID-proxy: judge features of each client's synthetic images against its "
            "held-out images (mean over clients); within seed noise: |paired Δacc| and "
            "ΔFID-proxy no larger than the default's std over seeds"
        ]
    report["wall_s"] = time.perf_counter() - t_all
    notes["run"] = [
        f"last run: parts {', '.join(parts)}, wall time {report['wall_s']:.0f} s "
        f"on {machine}"
    ]
    write_report(out, report)
    print(
        json.dumps(
            {
                k: report[k]
                for k in ("pipeline", "workers", "cpu_batch", "quality")
                if k in report
            },
            indent=1,
            default=str,
        )[:4000]
    )
    return 0
