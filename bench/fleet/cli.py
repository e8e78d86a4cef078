"""``python -m bench fleet``: the real one-shot round at 10, 100 and 1,000 clients.

Also the entry of the bench's child processes: ``--_round SPEC`` plays one
round, ``--_record SPEC`` records the pool (``bench.fleet.process.spawn``).
"""

from __future__ import annotations

import argparse
import json
import shutil
import sys
import tempfile
from pathlib import Path

from bench.replay import record_pool
from bench.report import say

from .core import run_fleet
from .plan import (
    DEFAULT_POOL,
    DEFAULT_SIZES,
    FULL_MAX_UNBUDGETED,
    QUICK_KEYS,
    QUICK_MAX_UNBUDGETED,
    bench_config,
    plan_fleet,
)
from .process import play_round
from .report import print_summary, write_outputs


def parse_sizes(text: str) -> list[int]:
    """``"10,100,1000"`` -> ``[10, 100, 1000]``.

    Raises
    ------
    ValueError
        Unless the sizes are integers, distinct and increasing.
    """
    try:
        sizes = [int(s) for s in text.split(",") if s.strip()]
    except ValueError:
        raise ValueError(f"--sizes {text!r}: use comma-separated integers") from None
    if not sizes or sizes != sorted(set(sizes)):
        raise ValueError(f"--sizes {text!r}: use distinct sizes in increasing order")
    return sizes


def build_parser() -> argparse.ArgumentParser:
    """The command's options (``python -m bench fleet --help``)."""
    p = argparse.ArgumentParser(
        prog="python -m bench fleet",
        description="The real round at fleet scale: costs, kill + resume, budget.",
    )
    p.add_argument(
        "--quick",
        action="store_true",
        help=f"the smallest settings that show every size: {QUICK_KEYS}",
    )
    p.add_argument(
        "--sizes",
        default=",".join(map(str, DEFAULT_SIZES)),
        help="fleet sizes N (default 10,100,1000)",
    )
    p.add_argument("--out", default="bench-results", help="where fleet.* go")
    p.add_argument(
        "--pool",
        type=int,
        default=DEFAULT_POOL,
        help="genuine client runs replayed to the fleet (default 10)",
    )
    p.add_argument(
        "--max-unbudgeted",
        type=int,
        default=None,
        help="run synth-budget=0 up to this many images (default "
        f"{QUICK_MAX_UNBUDGETED} with --quick, else {FULL_MAX_UNBUDGETED})",
    )
    p.add_argument(
        "--work",
        default=None,
        help="scratch folder for run folders and logs (default: a new "
        "temporary one, removed at the end)",
    )
    p.add_argument(
        "--timeout-s", type=float, default=3600.0, help="limit per round process"
    )
    return p


def main(argv: list[str] | None = None) -> int:
    """Run the fleet bench, or one child process of it (``--_round``,
    ``--_record``); 0 if every check passed, 1 if one failed, 2 on bad options."""
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv[:1] == ["--_round"]:  # a round's own process
        play_round(json.loads(Path(argv[1]).read_text()))
        return 0
    if argv[:1] == ["--_record"]:  # the pool's process
        spec = json.loads(Path(argv[1]).read_text())
        record_pool(spec["run_config"], int(spec["pool"]), Path(spec["pool_dir"]))
        return 0
    args = build_parser().parse_args(argv)
    try:
        sizes = parse_sizes(args.sizes)
        run_config = bench_config(args.quick)
        for n in sizes:
            plan_fleet(n)
    except ValueError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    max_unbudgeted = args.max_unbudgeted
    if max_unbudgeted is None:
        max_unbudgeted = QUICK_MAX_UNBUDGETED if args.quick else FULL_MAX_UNBUDGETED
    out = Path(args.out).expanduser().resolve()
    work = (
        Path(args.work).resolve()
        if args.work
        else Path(tempfile.mkdtemp(prefix="fleet-"))
    )
    say(
        f"fleet: {'quick' if args.quick else 'full'}, sizes {sizes}, pool "
        f"{args.pool}, work {work} -> {out}"
    )
    report = run_fleet(
        sizes, run_config, work, args.pool, True, max_unbudgeted, args.timeout_s
    )
    if not args.work:  # kept when a round failed: its log is there
        shutil.rmtree(work, ignore_errors=True)
    report |= {"argv": argv, "quick": args.quick}
    write_outputs(out, report)
    print_summary(report)
    say(f"wrote {out / 'fleet.json'}, fleet.md, fleet.png")
    return 0 if all(c["ok"] for c in report["checks"]) else 1
