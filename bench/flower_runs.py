"""Run the real Flower app in local simulation from a benchmark script.

Every run goes through ``flwr run <repo> local --stream`` exactly as a user
would type it, so a benchmark measures the app, not a re-implementation of it.

``flwr run . local`` starts a *detached* simulation SuperLink that outlives the
command and keeps the environment it was started with (for instance
``ONESHOT_EMBEDDED_DIR``). :class:`LocalSimulation` therefore gives the
benchmark its own ``FLWR_HOME`` and its own ports, stops a SuperLink left over
in that home before the first run, reuses one SuperLink across the runs, and
stops it after the last one (also on an error or Ctrl-C). SuperLinks of other
users (another ``FLWR_HOME``, e.g. ``~/.flwr`` on port 39091) are left alone.

Usage::

    with LocalSimulation(work_dir, num_supernodes=4) as sim:
        run = sim.run("oscar-s0", {"method": "oscar", "seed": 0})
        print(run.results["mean_accuracy"], run.wall_s)
"""

from __future__ import annotations

import json
import math
import os
import shutil
import subprocess
import time
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from deploy import local_superlink, procs

from .run_config import REPO_ROOT

# Ports of the benchmark's own SuperLink (flwr's defaults are 39091 / 39093).
SUPERLINK_PORT = 39191
CONTROL_PORT = 39193

FLWR_ENV = procs.FLWR_ENV | {"HF_HUB_OFFLINE": "1"}


# ---------------------------------------------------------------- --run-config


def toml_value(value: Any) -> str:
    """One value in Flower's ``--run-config`` syntax (a TOML scalar).

    Flower splits ``--run-config`` on spaces outside quotes and reads each
    ``key=value`` as a TOML line, so strings go in double quotes and must not
    contain a double quote or a newline.
    """
    if isinstance(value, bool):  # before int: bool is an int
        return "true" if value else "false"
    if isinstance(value, int):
        return str(value)
    if isinstance(value, float):
        if not math.isfinite(value):
            raise ValueError(
                f"run-config value {value!r} is not finite; TOML needs a number"
            )
        return repr(value)
    if isinstance(value, Path):
        value = str(value)
    if isinstance(value, str):
        if '"' in value or "\n" in value or "\r" in value:
            raise ValueError(
                f"run-config string {value!r} contains a double quote or a newline, "
                "which Flower's --run-config parser cannot carry; remove it"
            )
        return '"' + value.replace("\\", "\\\\") + '"'
    raise TypeError(
        f"run-config value {value!r} has type {type(value).__name__}; use bool, int, float or str"
    )


def run_config_string(overrides: Mapping[str, Any]) -> str:
    """``{"method": "oscar", "seed": 1}`` -> ``'method="oscar" seed=1'``."""
    parts = []
    for key, value in overrides.items():
        if not key or any(c.isspace() or c in "=\"'" for c in key):
            raise ValueError(
                f"run-config key {key!r} must be a non-empty word without '='"
            )
        parts.append(f"{key}={toml_value(value)}")
    return " ".join(parts)


def parse_run_config_string(text: str) -> dict[str, Any]:
    """Parse ``text`` the way ``flwr run --run-config`` does (for tests)."""
    from flwr.common.config import parse_config_args

    return parse_config_args([text])


# ---------------------------------------------------------------- SuperLink processes


_superlink_processes = local_superlink.superlink_processes
stop_superlinks = local_superlink.stop_superlinks


# ---------------------------------------------------------------- runs


@dataclass
class FlowerRun:
    """One finished ``flwr run``: its results.json (``None`` if it failed)."""

    name: str
    overrides: dict[str, Any]
    results: dict[str, Any] | None
    wall_s: float
    returncode: int | None
    run_dir: Path
    log_path: Path
    error: str | None = None

    @property
    def ok(self) -> bool:
        return self.results is not None


class LocalSimulation(procs.StartStop):
    """Runs of the app in one private local simulation federation.

    Parameters
    ----------
    work_dir
        Folder for ``flwr-home/`` (the private ``FLWR_HOME``), ``runs/<name>/``
        (each run's output-dir/run-name) and ``logs/<name>.log``.
    num_supernodes
        Simulated SuperNodes (clients).
    app_dir
        The Flower app (this repository by default).
    env
        Extra environment for ``flwr`` and hence the SuperLink it starts
        (e.g. ``ONESHOT_EMBEDDED_DIR``); the current environment is inherited.
    port, control_port
        The SuperLink's ports; chosen apart from flwr's defaults so that a
        SuperLink of another user is neither reused nor stopped.
    echo
        Print each run's Flower log lines as they arrive.
    """

    def __init__(
        self,
        work_dir: str | Path,
        num_supernodes: int,
        *,
        app_dir: str | Path = REPO_ROOT,
        env: Mapping[str, str] | None = None,
        port: int = SUPERLINK_PORT,
        control_port: int = CONTROL_PORT,
        echo: bool = False,
    ) -> None:
        if num_supernodes < 1:
            raise ValueError(f"num_supernodes={num_supernodes} must be >= 1")
        self.work_dir = Path(work_dir).resolve()
        self.flwr_home = self.work_dir / "flwr-home"
        self.num_supernodes = num_supernodes
        self.app_dir = Path(app_dir).resolve()
        self.port, self.control_port = port, control_port
        self.echo = echo
        self.env = os.environ.copy() | FLWR_ENV | dict(env or {})
        self.env |= {
            "FLWR_HOME": str(self.flwr_home),
            "FLWR_LOCAL_SUPERLINK_HTTP_API_PORT": str(port),
            "FLWR_LOCAL_CONTROL_API_PORT": str(control_port),
        }

    # -- lifecycle

    def start(self) -> None:
        """Stop a SuperLink left in this home; refuse a foreign one on our port."""
        self.flwr_home.mkdir(parents=True, exist_ok=True)
        stop_superlinks(self.flwr_home)
        if procs.http_ok(f"http://{procs.HOST}:{self.port}/health"):
            raise RuntimeError(
                f"a SuperLink not started from {self.flwr_home} answers on "
                f"127.0.0.1:{self.port}; it would be reused with its own environment. "
                "Stop it, or pass another port to LocalSimulation(port=...)."
            )

    def stop(self) -> None:
        stopped = stop_superlinks(self.flwr_home)
        if stopped:
            print(
                f"[flower] stopped the benchmark SuperLink (pids {stopped})", flush=True
            )

    # -- one run

    def command(self, overrides: Mapping[str, Any]) -> list[str]:
        return [
            "flwr",
            "run",
            str(self.app_dir),
            "local",
            "--stream",
            "--federation-config",
            f"num-supernodes={self.num_supernodes}",
            "--run-config",
            run_config_string(overrides),
        ]

    def run(
        self, name: str, overrides: Mapping[str, Any], timeout_s: float = 3600.0
    ) -> FlowerRun:
        """Run the app once with ``overrides`` and read its results.json.

        ``output-dir`` and ``run-name`` are set here; an old run folder of the
        same name is removed first, or the app would resume from its uploads.
        """
        runs_dir = self.work_dir / "runs"
        run_dir = runs_dir / name
        log_path = self.work_dir / "logs" / f"{name}.log"
        log_path.parent.mkdir(parents=True, exist_ok=True)
        shutil.rmtree(run_dir, ignore_errors=True)
        full = dict(overrides) | {"output-dir": str(runs_dir), "run-name": name}
        cmd = self.command(full)

        t0 = time.perf_counter()
        rc: int | None = None
        error: str | None = None
        with open(log_path, "w") as log:
            proc, reader = procs.start_copied(
                cmd, log, env=self.env, cwd=self.work_dir, echo=self.echo
            )
            try:
                rc = proc.wait(timeout=timeout_s)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()
                # The SuperLink may still run it and block the next run: restart it.
                stop_superlinks(self.flwr_home)
                error = f"timed out after {timeout_s:.0f} s"
            except BaseException:  # Ctrl-C: the caller's finally stops the SuperLink
                proc.kill()
                proc.wait()
                raise
            finally:
                reader.join(timeout=10)
        wall = time.perf_counter() - t0

        results = None
        res_path = run_dir / "results.json"
        if res_path.is_file():
            results = json.loads(res_path.read_text())
        elif error is None:
            error = f"flwr run exited with {rc} and wrote no {res_path}; see {log_path}"
        return FlowerRun(
            name, dict(overrides), results, wall, rc, run_dir, log_path, error
        )
