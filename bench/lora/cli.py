"""``python -m bench lora``: one-shot federated LoRA merges side by side."""

from __future__ import annotations

import argparse
import os
import sys
import time
from pathlib import Path
from typing import Any

import torch

from bench.run_config import default_run_config, parse_seeds, parse_sets

from .report import format_checks, format_table, write_report
from .runner import run_seed
from .summary import aggregate, checks
from .world import FULL, QUICK, VARIANTS, WORLD, WORLDS, parse_list, say


def build_parser() -> argparse.ArgumentParser:
    """The command's options (``python -m bench lora --help``)."""
    p = argparse.ArgumentParser(
        prog="python -m bench lora", description=__doc__.split("\n")[0]
    )
    p.add_argument("--quick", action="store_true", help="the <= 20 minute CPU setting")
    p.add_argument(
        "--seeds", default="0,1,2", help="comma-separated seeds (default 0,1,2)"
    )
    p.add_argument(
        "--world",
        choices=sorted(WORLDS),
        default="shared",
        help="shared: one new domain for all clients (default); "
        "disjoint: a different new concept per client",
    )
    p.add_argument("--clients", type=int, default=4, help="clients (default 4)")
    p.add_argument(
        "--variants",
        default=",".join(VARIANTS),
        help=f"comma-separated subset of {','.join(VARIANTS)}",
    )
    p.add_argument(
        "--probes",
        type=int,
        default=3,
        help="downstream classifiers per variant, from different inits; "
        "accuracy is their mean (default 3)",
    )
    p.add_argument("--out", default="bench-results", help="output folder")
    p.add_argument(
        "--set",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="run-config override, e.g. --set lora-steps=300",
    )
    return p


def main(argv: list[str] | None = None) -> int:
    """Run the LoRA bench; 0 when done, 2 on bad options."""
    from methods import build_config

    args = build_parser().parse_args(argv)
    try:
        seeds = parse_seeds(args.seeds)
        variants = parse_list(args.variants, VARIANTS, "variants")
        if args.clients < 2:
            raise ValueError(f"--clients {args.clients} must be >= 2")
        if args.probes < 1:
            raise ValueError(f"--probes {args.probes} must be >= 1")
        overrides = default_run_config() | WORLD | {"domains": WORLDS[args.world]}
        overrides |= (QUICK if args.quick else FULL) | parse_sets(args.set)
        cfg = build_config(overrides)  # fail before any work on a bad --set
    except ValueError as e:
        print(f"python -m bench lora: {e}", file=sys.stderr)
        return 2
    torch.set_num_threads(max(1, min(2, os.cpu_count() or 1)))
    out = Path(args.out)
    work = out / "lora-work"
    report: dict[str, Any] = {
        "command": " ".join(
            ["python -m bench lora", *(sys.argv[1:] if argv is None else argv)]
        ),
        "mode": "quick" if args.quick else "full",
        "world": args.world,
        "seeds": seeds,
        "num_clients": args.clients,
        "probes": args.probes,
        "config": cfg.to_flat(),
        "machine": f"{os.cpu_count()} CPU cores, torch {torch.__version__}",
        "records": [],
        "summary": {},
    }
    t0 = time.perf_counter()
    for seed in seeds:
        report["records"] += run_seed(
            overrides, seed, args.clients, variants, work, args.probes
        )
        report["summary"] = aggregate(report["records"])
        report["wall_s"] = time.perf_counter() - t0
        report["checks"] = checks(report["records"], report["summary"])
        write_report(out, report)
        say(f"seed {seed} done; report in {out / 'lora.md'}")
    print(format_table(report["summary"]))
    print("\n".join(format_checks(report["checks"])))
    return 0
