"""The operator's ``flwr`` CLI on one connection: run the app, read runs and nodes.

Every call runs the real ``flwr`` command with ``FLWR_HOME`` (in ``env``)
pointing at the connection's ``config.toml``; what it prints is parsed by
:mod:`deploy.commands`. Used by :class:`deploy.cluster.Cluster`.
"""

from __future__ import annotations

import shlex
import subprocess
from collections.abc import Mapping
from pathlib import Path

from deploy.procs import start_copied, terminate

from .commands import CONNECTION, AppRun, json_out, run_command, run_id_of


class FlwrCli:
    """``flwr`` against ``connection``, run in ``cwd``, logs in ``logs_dir``.

    ``flwr run`` k writes ``logs_dir/run-k.log``; :meth:`check_call` writes
    ``logs_dir/<name>.log``.
    """

    def __init__(
        self,
        env: Mapping[str, str],
        cwd: Path,
        logs_dir: Path,
        connection: str = CONNECTION,
    ) -> None:
        self.env = dict(env)
        self.cwd = cwd
        self.logs_dir = logs_dir
        self.connection = connection
        self.runs = 0

    def call(
        self, cmd: list[str], timeout: float = 120.0
    ) -> subprocess.CompletedProcess:
        return subprocess.run(
            cmd,
            env=self.env,
            cwd=self.cwd,
            capture_output=True,
            text=True,
            timeout=timeout,
        )

    def check_call(self, cmd: list[str], name: str) -> subprocess.CompletedProcess:
        """Run ``cmd``, its output to ``<name>.log``; ``RuntimeError`` if it fails."""
        res = self.call(cmd)
        self.write_log(name, cmd, res)
        if res.returncode != 0:
            raise RuntimeError(
                f"`{shlex.join(cmd)}` exited with {res.returncode}:\n"
                f"{(res.stdout + res.stderr)[-2000:]}"
            )
        return res

    def write_log(
        self, name: str, cmd: list[str], res: subprocess.CompletedProcess
    ) -> None:
        (self.logs_dir / f"{name}.log").write_text(
            "$ " + shlex.join(cmd) + "\n" + res.stdout + res.stderr
        )

    def run_app(
        self,
        project_root: Path,
        run_config: str = "",
        timeout: float = 900.0,
        echo: bool = False,
    ) -> AppRun:
        """``flwr run <project> <connection> --stream``; wait; read the run's status.

        Raises ``subprocess.TimeoutExpired`` after stopping the run (``flwr stop``)
        if it takes longer than ``timeout`` seconds.
        """
        self.runs += 1
        log_path = self.logs_dir / f"run-{self.runs}.log"
        cmd = run_command(project_root, self.connection, run_config)
        lines: list[str] = []
        with open(log_path, "w") as log:
            proc, reader = start_copied(
                cmd,
                log,
                env=self.env,
                cwd=self.cwd,
                echo=echo,
                lines=lines,
                new_session=True,
            )
            try:
                rc = proc.wait(timeout=timeout)
            except BaseException:  # timeout or Ctrl-C: stop the CLI and the run
                terminate([proc], 5)
                reader.join(timeout=5)
                run_id = run_id_of("".join(lines))
                if run_id is not None:
                    self.call(["flwr", "stop", str(run_id), self.connection])
                raise
            finally:
                reader.join(timeout=10)
        out = "".join(lines)
        run_id = run_id_of(out)
        status = self.run_status(run_id) if run_id is not None else None
        return AppRun(cmd, rc, out, run_id, status, log_path)

    def submit_app(self, project_root: Path, run_config: str = "") -> int:
        """``flwr run <project> <connection>`` without ``--stream``: start the run
        and return its id at once (follow it with :meth:`run_status`)."""
        cmd = run_command(project_root, self.connection, run_config)
        cmd.remove("--stream")
        self.runs += 1
        res = self.check_call(cmd, f"run-{self.runs}")
        run_id = run_id_of(res.stdout + res.stderr)
        if run_id is None:
            raise RuntimeError(
                f"`{shlex.join(cmd)}` printed no run id:\n"
                f"{(res.stdout + res.stderr)[-2000:]}"
            )
        return run_id

    def run_status(self, run_id: int) -> str | None:
        """The run's status from ``flwr ls --run-id``, e.g. ``finished:completed``."""
        res = self.call(
            ["flwr", "ls", self.connection, "--run-id", str(run_id), "--format", "json"]
        )
        runs = json_out(res.stdout).get("runs") or []
        return runs[0].get("status") if runs else None

    def node_list(self) -> list[tuple[int, str]]:
        """``(node id, status)`` of every node the SuperLink knows, in the order
        they were registered."""
        res = self.call(
            ["flwr", "supernode", "ls", self.connection, "--format", "json"]
        )
        return [
            (int(n.get("node-id", 0)), n.get("status", ""))
            for n in json_out(res.stdout).get("nodes") or []
        ]
