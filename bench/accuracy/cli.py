"""``python -m bench accuracy``: accuracy of every one-shot method, over seeds.

The command: check the options, run every federated method through
``flwr run`` (:class:`bench.flower_runs.LocalSimulation`), the centralized
oracle and the FID-proxy in-process, and write the report after every run.
"""

from __future__ import annotations

import argparse
import os
import signal
import sys
import time
from pathlib import Path
from typing import Any

from bench.flower_runs import FlowerRun, LocalSimulation
from bench.report import code_version, machine, nbytes, say
from bench.run_config import build_cfg, parse_seeds, parse_sets
from deploy.procs import log_tail

from .config import (
    DEFAULT_METHODS,
    FULL_FID_PER_CLASS,
    METHODS,
    NOTES,
    ORACLE,
    QUICK,
    QUICK_FID_PER_CLASS,
    WORLDS,
    base_overrides,
    parse_methods,
    run_overrides,
)
from .experiment import load_experiment
from .fid import generator_fid
from .oracle import run_centralized
from .records import aggregate, paired_differences, record_from_results
from .report import write_report
from .resume import done_pairs, kept_runs, load_previous
from .sweep import run_sweep
from .tables import (
    format_domain_table,
    format_fid_table,
    format_global_domain_table,
    format_global_table,
    format_paired_table,
    format_table,
)


def build_parser() -> argparse.ArgumentParser:
    """The command's options (``python -m bench accuracy --help``)."""
    p = argparse.ArgumentParser(
        prog="python -m bench accuracy", description=__doc__.split("\n")[0]
    )
    p.add_argument(
        "--quick",
        action="store_true",
        help=f"smaller runs ({', '.join(f'{k}={v}' for k, v in QUICK.items())})",
    )
    p.add_argument(
        "--seeds",
        default=None,
        help="comma-separated seeds or ranges, e.g. 0-9 (default: 0-4 with --quick, "
        "0-9 without; README's headline is --quick --seeds 0-9); each "
        "run's `seed` (synthesis, training) and, unless `--set partition-seed=N` "
        "holds the clients' data fixed, its partition",
    )
    p.add_argument(
        "--out", default="bench-results", help="output folder (default bench-results)"
    )
    p.add_argument(
        "--methods",
        nargs="+",
        default=None,
        help=f"methods, comma- or space-separated (default {','.join(DEFAULT_METHODS)}; "
        f"also: {','.join(m for m in METHODS if m not in DEFAULT_METHODS)})",
    )
    p.add_argument(
        "--clients", type=int, default=4, help="simulated clients (default 4)"
    )
    p.add_argument(
        "--set",
        dest="sets",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="extra run-config override for every run, e.g. --set train-epochs=3",
    )
    p.add_argument(
        "--world",
        default="held-out",
        help=f"what the clients hold: {', '.join(WORLDS)} (default: held-out, two "
        "of the four client domains are styles the embedded stack never saw, "
        "reported apart; default: every client style seen in pretraining)",
    )
    p.add_argument("--no-fid", action="store_true", help="skip the FID-proxy section")
    p.add_argument(
        "--resume",
        action="store_true",
        help="keep the successful runs of <out>/accuracy.json (same world, quick, "
        "clients, overrides and stack) and run only the missing (method, seed) "
        "pairs: resumes a stopped bench, or extends it with more --seeds",
    )
    p.add_argument(
        "--sweep",
        default=None,
        metavar="KEY=V1,V2,...",
        help="the bench once per value, one table and plot in <out>/sweep-KEY.*: "
        "KEY is clients or a run-config key (dirichlet-alpha, images-per-class, "
        "...); e.g. --sweep clients=4,10,50",
    )
    p.add_argument(
        "--rerun",
        nargs="+",
        default=[],
        metavar="METHOD",
        help="with --resume: run these methods again instead of keeping their runs",
    )
    p.add_argument(
        "--experiment",
        default=None,
        metavar="FILE",
        help="options and run-config overrides from a TOML file (see "
        "bench/experiments/); the command line's win",
    )
    p.add_argument(
        "--fid-per-class",
        type=int,
        default=None,
        help=f"samples per class for the FID-proxy (default {QUICK_FID_PER_CLASS} "
        f"quick, {FULL_FID_PER_CLASS} full)",
    )
    p.add_argument("--timeout-s", type=float, default=3600.0, help="limit per flwr run")
    p.add_argument(
        "--echo", action="store_true", help="print the Flower logs as they arrive"
    )
    return p


def default_seeds(quick: bool) -> str:
    """Five seeds for ``--quick``, ten without (the larger settings). README's
    headline is the quick settings at ten seeds: ``--quick --seeds 0-9``."""
    return "0-4" if quick else "0-9"


def run_flower_methods(
    sim: LocalSimulation,
    methods: list[str],
    seeds: list[int],
    base: dict[str, Any],
    timeout_s: float,
    on_record: Any,
    skip: frozenset[tuple[str, int]] = frozenset(),
) -> None:
    """Every (seed, method) not in ``skip`` through ``flwr run``;
    ``on_record(rec)`` after each."""
    todo = [(s, m) for s in seeds for m in methods if (m, s) not in skip]
    for done, (seed, m) in enumerate(todo, 1):
        say(f"[{done:>2}/{len(todo)}] {m} seed={seed} ...")
        run: FlowerRun = sim.run(
            f"{m}-seed{seed}", run_overrides(m, seed, base), timeout_s
        )
        rec = record_from_results(m, seed, run.results, run.wall_s, error=run.error)
        if rec["ok"]:
            say(
                f"        global acc {_acc(rec['global_accuracy'])}, mean client "
                f"acc {rec['mean_accuracy']:.4f}, upload "
                f"{nbytes(rec['upload_bytes_per_client'])} B/client, "
                f"{run.wall_s:.1f} s"
            )
        else:
            say(f"        FAILED: {rec['error']}\n{log_tail(run.log_path, 15)}")
        on_record(rec)


def _acc(x: float | None) -> str:
    return "n/a" if x is None else f"{x:.4f}"


def stack_checksums(root: Path) -> dict[str, str]:
    """sha256 (12 hex) of every weight file of the embedded stack: which stack ran."""
    import hashlib

    return {
        str(p.relative_to(root)): hashlib.sha256(p.read_bytes()).hexdigest()[:12]
        for p in sorted(root.rglob("*.safetensors"))
    }


def parse_options(argv: list[str] | None) -> tuple[argparse.Namespace, dict[str, Any]]:
    """The command line over the ``--experiment`` file, if any.

    Returns
    -------
    tuple
        ``(args, run_config)``: the options (the command line's, else the
        file's, else the defaults) and the file's ``[run-config]`` table.

    Raises
    ------
    ValueError
        If the experiment file is unreadable or holds a bad key or value.
    """
    parser = build_parser()
    args = parser.parse_args(argv)
    if not args.experiment:
        return args, {}
    defaults, run_config = load_experiment(args.experiment)
    parser.set_defaults(**defaults)
    return parser.parse_args(argv), run_config


def main(argv: list[str] | None = None) -> int:
    """Run the accuracy bench; 0 if every run succeeded, 1 if one failed, 2 on
    bad options.

    Parameters
    ----------
    argv
        The options after ``python -m bench accuracy``.
    """
    t_start = time.perf_counter()
    from common.config import ConfigError
    from common.weights import embedded_dir

    # 0. Check the arguments and the config once, as the app will
    try:
        args, file_config = parse_options(argv)
        if args.sweep:  # one whole bench per value, then the sweep's report
            out_root = Path(args.out).expanduser().resolve()
            return run_sweep(list(argv or []), args.sweep, out_root, main)
        seeds = parse_seeds(args.seeds or default_seeds(args.quick))
        methods = parse_methods(args.methods)
        if args.clients < 1:
            raise ValueError(f"--clients {args.clients} must be >= 1")
        base = base_overrides(
            args.quick, args.clients, file_config | parse_sets(args.sets), args.world
        )
        cfg0 = build_cfg(base | {"seed": seeds[0]})
        emb_dir = str(embedded_dir())
    except (ValueError, ConfigError, FileNotFoundError) as e:
        print(f"error: {e}")
        return 2
    out = Path(args.out).expanduser().resolve()
    say(
        f"accuracy: {'quick' if args.quick else 'full'} config, methods {methods}, "
        f"seeds {seeds}, {args.clients} clients -> {out}"
    )
    say(f"overrides {base}; embedded stack {emb_dir}")
    report: dict[str, Any] = {
        "benchmark": "accuracy",
        "argv": list(argv) if argv is not None else [],
        "quick": args.quick,
        "world": args.world,
        "seeds": seeds,
        "num_clients": args.clients,
        "methods": methods,
        "oracle": ORACLE,
        "overrides": base,
        "config": cfg0.to_flat(),
        "embedded_dir": emb_dir,
        "embedded_checksums": stack_checksums(Path(emb_dir)),
        "cpu_count": os.cpu_count(),
        "machine": machine(),
        "runs": [],
        "summary": {},
        "wall_time_s": {},
        "notes": list(NOTES),
    }
    if args.experiment:
        report["experiment"] = str(args.experiment)
    earlier_s = 0.0
    if args.resume:
        try:
            prev = load_previous(out)
            rerun = tuple(parse_methods(args.rerun)) if args.rerun else ()
            kept = (
                [] if prev is None else kept_runs(prev, report, methods, seeds, rerun)
            )
        except ValueError as e:
            print(f"error: {e}")
            return 2
        if prev is not None:
            earlier_s = float(prev.get("wall_time_s", {}).get("total", 0.0))
            report["runs"] = kept
            report["resumed"] = {"kept_runs": len(kept), "earlier_wall_s": earlier_s}
            if prev.get("fid_proxy"):
                report["fid_proxy"] = prev["fid_proxy"]
            say(f"resume: keeping {len(kept)} finished runs of {out / 'accuracy.json'}")
    skip = frozenset(done_pairs(report["runs"]))

    commit = code_version()

    def add(rec: dict[str, Any]) -> None:  # the report is rewritten after every run
        report["runs"].append(rec | {"commit": commit})
        report["summary"] = aggregate(report["runs"], methods)
        report["wall_time_s"]["total"] = round(
            earlier_s + time.perf_counter() - t_start, 1
        )
        write_report(out, report)

    # 1. Federated methods: the real app through flwr run (one SuperLink for all)
    flower = [m for m in methods if METHODS[m] is not None]
    if any((m, s) not in skip for m in flower for s in seeds):
        t0 = time.perf_counter()
        # On SIGTERM too, unwind through LocalSimulation.__exit__ (stops the SuperLink).
        signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))
        # Scratch (FLWR_HOME, every run folder, the Flower logs) under <out>/flower/.
        with LocalSimulation(out / "flower", args.clients, echo=args.echo) as sim:
            run_flower_methods(sim, flower, seeds, base, args.timeout_s, add, skip)
        report["wall_time_s"]["flower_runs"] = round(time.perf_counter() - t0, 1)

    # 2. The centralized oracle, in-process (not through Flower)
    if ORACLE in methods:
        t0 = time.perf_counter()
        for seed in (s for s in seeds if (ORACLE, s) not in skip):
            res, wall = run_centralized(build_cfg(base | {"seed": seed}), args.clients)
            say(
                f"{ORACLE} (in-process) seed={seed}: global acc "
                f"{_acc(res['global_accuracy'])}, mean client acc "
                f"{res['mean_accuracy']:.4f}, {wall:.1f} s"
            )
            add(record_from_results(ORACLE, seed, res, wall, "in-process"))
        report["wall_time_s"]["centralized"] = round(time.perf_counter() - t0, 1)

    # 3. Generator quality per domain (FID-proxy), in-process
    if not args.no_fid and not report.get("fid_proxy"):
        k = args.fid_per_class or (
            QUICK_FID_PER_CLASS if args.quick else FULL_FID_PER_CLASS
        )
        n_client = cfg0.max_examples_per_client or 2000
        say(f"FID-proxy per domain: {k} samples per class ...")
        report["fid_proxy"] = generator_fid(cfg0, k, seeds[0], n_client)
        report["wall_time_s"]["fid_proxy"] = report["fid_proxy"]["wall_s"]

    # 4. Report
    report["summary"] = aggregate(report["runs"], methods)
    report["wall_time_s"]["total"] = round(earlier_s + time.perf_counter() - t_start, 1)
    write_report(out, report)
    print("\nAccuracy on the global test set")
    print(format_global_table(report["summary"]))
    print("\nPaired per-seed differences (global accuracy)")
    print(format_paired_table(paired_differences(report["runs"])))
    print("\n" + format_global_domain_table(report["summary"]))
    print("\nPer-client accuracy (own held-out splits)")
    print(format_table(report["summary"]))
    print("\n" + format_domain_table(report["summary"]))
    if report.get("fid_proxy"):
        print("\nFID-proxy per domain (lower is better)")
        print(format_fid_table(report["fid_proxy"]))
    say(
        f"total wall time {report['wall_time_s']['total']:.0f} s; wrote "
        f"{out / 'accuracy.json'}, accuracy.md, accuracy.png"
    )
    return 0 if all(r.get("ok") for r in report["runs"]) else 1
