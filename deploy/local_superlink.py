"""Stop the local simulation SuperLink that ``flwr run . local`` leaves running.

``flwr run <app> local`` starts a detached ``flower-superlink --simulation`` (its
database in ``$FLWR_HOME/local-superlink/``, ``FLWR_HOME`` defaulting to
``~/.flwr``) and never stops it. This stops that SuperLink and every process
under it (the simulation and its Ray workers), by process id, and nothing else:
a SuperLink is only touched when its command line names this home's database,
so another user's SuperLink, or a production one, is left alone.

Usage::

    python -m deploy.local_superlink stop [--flwr-home DIR]
"""

from __future__ import annotations

import argparse
import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from deploy import procs


def default_flwr_home() -> Path:
    return Path(os.environ.get("FLWR_HOME") or Path.home() / ".flwr")


def superlink_processes(flwr_home: Path) -> list[Any]:
    """Simulation SuperLinks started from ``flwr_home`` (found by their database
    path on their command line)."""
    home = str(Path(flwr_home).expanduser().resolve())

    def match(cmd: list[str]) -> bool:
        line = " ".join(cmd)
        return "flower-superlink" in line and "--simulation" in cmd and home in line

    return procs.find_processes(match)


def stop_superlinks(flwr_home: Path, timeout_s: float = 10.0) -> list[int]:
    """Stop the simulation SuperLinks of ``flwr_home`` and all their children.

    Returns the stopped process ids (SuperLinks first)."""
    trees = [procs.process_tree(link.pid) for link in superlink_processes(flwr_home)]
    found = [p for tree in trees for p in tree]
    procs.stop_processes(found, timeout_s)
    return [p.pid for p in found]


def main(argv: Sequence[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m deploy.local_superlink")
    ap.add_argument("action", choices=["stop"])
    ap.add_argument("--flwr-home", type=Path, default=default_flwr_home())
    args = ap.parse_args(argv)
    stopped = stop_superlinks(args.flwr_home)
    print(
        f"stopped {len(stopped)} process(es) of the local SuperLink of {args.flwr_home}: {stopped}"
        if stopped
        else f"no local SuperLink of {args.flwr_home} is running"
    )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
