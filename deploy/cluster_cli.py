"""``python -m deploy.cluster``: start a cluster, run the app once, stop everything.

Usage::

    python -m deploy.cluster --nodes 3 --workdir /tmp/fl \\
        --run-config 'method="local" max-examples-per-client=200'
    python -m deploy.cluster --nodes 3 --workdir /tmp/fl --front --print-commands
    python -m deploy.cluster --nodes 3 --workdir /tmp/fl --keep --no-run
"""

from __future__ import annotations

import argparse
import json
import shlex
import shutil
import signal
import subprocess
import sys
from collections.abc import Sequence
from pathlib import Path

from .cluster import Cluster
from .commands import REPO_ROOT, TRANSPORTS, run_command


def _parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(
        prog="python -m deploy.cluster",
        description="Start a SuperLink and N SuperNodes on 127.0.0.1 with TLS and "
        "SuperNode authentication, run the app once, stop everything.",
    )
    p.add_argument("--nodes", type=int, default=3, help="SuperNodes (default 3)")
    p.add_argument(
        "--workdir", type=Path, required=True, help="certs, keys, logs, FLWR_HOME"
    )
    p.add_argument("--run-config", default="", help="flwr run --run-config overrides")
    p.add_argument("--transport", choices=TRANSPORTS, default="rest")
    p.add_argument("--no-auth", action="store_true", help="no --enable-supernode-auth")
    p.add_argument(
        "--front",
        action="store_true",
        help="nodes dial the Fleet front (Fleet API only); the SuperLink stays "
        "on 127.0.0.1 for the operator",
    )
    p.add_argument(
        "--port",
        type=int,
        default=0,
        help="the port nodes dial (0: free ports); with --front the SuperLink "
        "takes the port below it",
    )
    p.add_argument(
        "--project-root", type=Path, default=REPO_ROOT, help="the Flower app"
    )
    p.add_argument(
        "--supernode-bin",
        default="flower-supernode",
        help="flower-supernode executable (flwr <= 1.39 for grpc-rere)",
    )
    p.add_argument("--node-config", default="", help="extra node config for every node")
    p.add_argument("--timeout", type=float, default=3600.0, help="run timeout (s)")
    p.add_argument(
        "--keep",
        action="store_true",
        help="leave the cluster running and print how to stop it",
    )
    p.add_argument("--no-run", action="store_true", help="start the cluster only")
    p.add_argument(
        "--print-commands",
        action="store_true",
        help="print the commands this would run, and exit",
    )
    return p.parse_args(argv)


def keep(cluster: Cluster) -> str:
    """Leave the cluster running: write ``stop.sh`` and ``cluster.json`` (its pids,
    so that a new start refuses to run beside it); return how to use it."""
    procs = cluster.release()
    # bash, not sh: dash's kill cannot signal a process group (-PGID).
    lines = ["#!/usr/bin/env bash", "# Stops the cluster deploy.cluster --keep left."]
    for p in reversed(procs):
        lines.append(f"kill -TERM -- -{p.popen.pid} 2>/dev/null  # {p.name}")
    lines.append(f"rm -f {shlex.quote(str(cluster.workdir / 'cluster.json'))}")
    stop_sh = cluster.workdir / "stop.sh"
    stop_sh.write_text("\n".join(lines) + "\n")
    stop_sh.chmod(0o755)
    info = {p.name: p.popen.pid for p in procs}
    (cluster.workdir / "cluster.json").write_text(json.dumps(info, indent=2))
    return (
        f"The cluster keeps running (SuperLink on {cluster.address}, nodes dial "
        f"{cluster.fleet_address}).\n"
        f"Use it:   export FLWR_HOME={shlex.quote(str(cluster.flwr_home))}\n"
        f"          {shlex.join(run_command(cluster.project_root))} --run-config "
        f"{shlex.quote(cluster.run_config())}\n"
        f"Stop it:  bash {shlex.quote(str(stop_sh))}\n" + "\n".join(lines[2:-1])
    )


def main(argv: Sequence[str] | None = None) -> int:
    args = _parse_args(argv)
    try:
        cluster = Cluster(
            args.workdir,
            args.nodes,
            transport=args.transport,
            auth=not args.no_auth,
            front=args.front,
            project_root=args.project_root,
            port=args.port,
            supernode_bin=args.supernode_bin,
            extra_node_config=args.node_config,
        )
    except ValueError as e:
        print(f"[cluster] error: {e}", file=sys.stderr)
        return 2
    if args.print_commands:
        print(cluster.commands_text(args.run_config), end="")
        return 0
    if shutil.which("flower-superlink") is None:
        print("flower-superlink is not on PATH; install flwr==1.41.0", file=sys.stderr)
        return 2

    # SIGTERM (e.g. `kill`, a CI timeout) unwinds like Ctrl-C, through stop().
    def on_sigterm(signum: int, frame: object) -> None:
        raise KeyboardInterrupt

    signal.signal(signal.SIGTERM, on_sigterm)
    kept = False
    try:
        print(
            f"[cluster] starting SuperLink on {cluster.address} + {args.nodes} "
            f"SuperNodes dialing {cluster.fleet_address} ({args.transport}, auth "
            f"{'off' if args.no_auth else 'on'}, front {'on' if args.front else 'off'}); "
            f"logs in {cluster.logs_dir}",
            flush=True,
        )
        cluster.start()
        print(f"[cluster] {args.nodes} SuperNodes online", flush=True)
        code = 0
        if not args.no_run:
            run = cluster.run_app(args.run_config, timeout=args.timeout, echo=True)
            print(
                f"[cluster] run {run.run_id}: flwr exit {run.returncode}, "
                f"status {run.status}; log {run.log_path}",
                flush=True,
            )
            code = 0 if run.ok else 1
        if args.keep:
            print(keep(cluster), flush=True)
            kept = True
        return code
    except KeyboardInterrupt:
        print("[cluster] interrupted; stopping", file=sys.stderr, flush=True)
        return 130
    except (RuntimeError, TimeoutError, ValueError, subprocess.TimeoutExpired) as e:
        print(f"[cluster] error: {e}", file=sys.stderr, flush=True)
        return 1
    finally:
        if not kept:
            cluster.stop()
            print("[cluster] stopped", flush=True)


if __name__ == "__main__":
    raise SystemExit(main())
