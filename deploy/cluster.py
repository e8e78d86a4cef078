"""A real Flower deployment on this machine: SuperLink + N SuperNodes, TLS + node auth.

Runs the app through Flower 1.41's Deployment Engine exactly as on separate
machines, only with every process on 127.0.0.1:

1. ``deploy/certs.sh`` makes a CA and the SuperLink's certificate (SAN 127.0.0.1);
2. ``deploy.node_keys`` makes one P-384 key pair per SuperNode;
3. ``flower-superlink`` starts with TLS and ``--enable-supernode-auth``; we poll
   ``GET /health`` until it answers;
4. ``$FLWR_HOME/config.toml`` gets a connection to it (``FLWR_HOME`` is
   ``<workdir>/flwr-home``, set for every child process);
5. ``flwr supernode register <key>.pub <connection>`` registers each node;
6. N ``flower-supernode`` processes start with ``--node-config
   "partition-id=i num-partitions=N"``; we wait until all are online;
7. ``flwr run <project> <connection> --stream --run-config ...`` runs the app;
8. every process started here is stopped (also on Ctrl-C or an error).

Transports (``--transport``):

- ``rest`` (default): Flower's Fleet API as protobuf over HTTPS on the
  SuperLink's one port, shared with the Control API (``flwr`` CLI) and the
  ServerApp runtime API. The only transport a flwr 1.40+ SuperNode speaks.
- ``grpc-rere``: the legacy gRPC request-response Fleet API. Flower 1.41 still
  serves it when the SuperLink has ``FLWR_INTERNAL_GRPC_FLEET_API=1`` and
  ``--fleet-api-address``, but only SuperNodes of flwr <= 1.39 can dial it
  (``flower-supernode --grpc-rere``): pass one with ``--supernode-bin``.

Usage::

    python -m deploy.cluster --nodes 3 --workdir /tmp/fl \\
        --run-config 'method="local" max-examples-per-client=200'
    python -m deploy.cluster --nodes 3 --workdir /tmp/fl --print-commands
    python -m deploy.cluster --nodes 3 --workdir /tmp/fl --keep --no-run

From Python (tests)::

    with start_cluster(tmp_path, nodes=3) as cluster:
        run = cluster.run_app('method="local"', timeout=300)
        assert run.ok, run.stdout
        refused = cluster.start_unregistered_node()
"""

from __future__ import annotations

import argparse
import json
import os
import re
import shlex
import shutil
import signal
import ssl
import subprocess
import sys
from collections.abc import Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import IO, Any

from deploy.node_keys import generate_node_key
from deploy.procs import (
    FLWR_ENV,
    HOST,
    StartStop,
    check_running,
    free_port,
    http_ok,
    port_open,
    spawn,
    start_copied,
    terminate,
    wait_until,
)

REPO_ROOT = Path(__file__).resolve().parents[1]
CERTS_SH = Path(__file__).resolve().with_name("certs.sh")

CONNECTION = "deploy"
TRANSPORTS = ("rest", "grpc-rere")

# Flower 1.41 serves the gRPC-rere Fleet API only behind this internal switch.
GRPC_FLEET_ENV = {"FLWR_INTERNAL_GRPC_FLEET_API": "1"}

# `flwr_exit` logs "Exit Code: 305" but the process itself exits with status 1.
FLOWER_EXIT_CODE_RE = re.compile(r"Exit Code: (\d+)")
RUN_ID_RE = re.compile(r"Successfully started run (\d+)")
VERSION_RE = re.compile(r"Flower version: (\d+)\.(\d+)")


# ---------------------------------------------------------------- commands
# Pure functions: the cluster runs them and --print-commands prints them, so the
# README (which quotes --print-commands) and the code cannot drift apart.


def superlink_command(
    port: int,
    certs_dir: Path,
    database: Path,
    *,
    auth: bool = True,
    grpc_fleet_port: int | None = None,
    host: str = HOST,
) -> list[str]:
    """``flower-superlink`` with TLS; Fleet, Control and runtime API on ``port``."""
    cmd = [
        "flower-superlink",
        "--ssl-ca-certfile",
        str(certs_dir / "ca.crt"),
        "--ssl-certfile",
        str(certs_dir / "server.pem"),
        "--ssl-keyfile",
        str(certs_dir / "server.key"),
        "--host",
        host,
        "--port",
        str(port),
        "--database",
        str(database),
        "--isolation",
        "subprocess",
        "--disable-runtime-dependency-installation",
    ]
    if auth:
        cmd.append("--enable-supernode-auth")
    if grpc_fleet_port is not None:
        # Deprecated flag, still honoured with FLWR_INTERNAL_GRPC_FLEET_API=1.
        cmd += ["--fleet-api-address", f"{host}:{grpc_fleet_port}"]
    return cmd


def supernode_command(
    superlink: str,
    root_cert: Path,
    partition_id: int,
    num_partitions: int,
    runtime_port: int,
    *,
    private_key: Path | None = None,
    transport: str = "rest",
    supernode_bin: str = "flower-supernode",
    extra_node_config: str = "",
    node_config: str | None = None,
) -> list[str]:
    """``flower-supernode`` dialing ``superlink`` over TLS, with its partition.

    ``node_config``, if given, replaces the partition's node config (e.g.
    ``data-path="/data"``: a device with its own data and no partition).
    """
    cmd = [supernode_bin]
    if transport == "grpc-rere":
        cmd.append("--grpc-rere")  # flwr <= 1.39 only
    cmd += ["--superlink", superlink, "--root-certificates", str(root_cert)]
    if private_key is not None:
        cmd += ["--auth-supernode-private-key", str(private_key)]
    if node_config is None:
        node_config = f"partition-id={partition_id} num-partitions={num_partitions}"
    if extra_node_config:
        node_config += " " + extra_node_config
    cmd += [
        "--node-config",
        node_config,
        "--isolation",
        "subprocess",
        # The node's own ClientApp runtime API; loopback only, one port per node.
        "--host",
        HOST,
        "--port",
        str(runtime_port),
    ]
    return cmd


def register_command(public_key: Path, connection: str = CONNECTION) -> list[str]:
    return ["flwr", "supernode", "register", str(public_key), connection]


def run_command(
    project_root: Path, connection: str = CONNECTION, run_config: str = ""
) -> list[str]:
    cmd = ["flwr", "run", str(project_root), connection, "--stream"]
    if run_config:
        cmd += ["--run-config", run_config]
    return cmd


def connection_toml(address: str, root_cert: Path, name: str = CONNECTION) -> str:
    """``$FLWR_HOME/config.toml`` with one TLS connection, made the default."""
    import tomli_w  # a flwr dependency

    return tomli_w.dumps(
        {
            "superlink": {
                "default": name,
                name: {"address": address, "root-certificates": str(root_cert)},
            }
        }
    )


# ---------------------------------------------------------------- results


class AppRun(subprocess.CompletedProcess):
    """A finished ``flwr run``.

    ``returncode`` is the CLI's: it is 0 even when the ServerApp failed, so
    ``status`` (from ``flwr ls --run-id``) says how the run itself ended, e.g.
    ``finished:completed`` or ``finished:failed``.
    """

    def __init__(
        self,
        args: list[str],
        returncode: int,
        stdout: str,
        run_id: int | None,
        status: str | None,
        log_path: Path,
    ) -> None:
        super().__init__(args, returncode, stdout, None)
        self.run_id = run_id
        self.status = status
        self.log_path = log_path

    @property
    def ok(self) -> bool:
        return self.returncode == 0 and self.status == "finished:completed"


@dataclass
class NodeExit:
    """How a SuperNode ended: ``returncode`` is None if it was still running."""

    returncode: int | None
    flower_exit_code: int | None  # the "Exit Code: N" Flower logged, e.g. 305
    log_path: Path
    log: str

    @property
    def refused(self) -> bool:
        """The SuperLink turned the node away (Flower's SUPERNODE_CONNECTION_ERROR)."""
        return self.returncode not in (None, 0) and self.flower_exit_code == 305


# ---------------------------------------------------------------- helpers


def _flower_version(executable: str) -> tuple[int, int] | None:
    try:
        out = subprocess.run(
            [executable, "--version"], capture_output=True, text=True, timeout=60
        )
    except (OSError, subprocess.TimeoutExpired):
        return None
    m = VERSION_RE.search(out.stdout + out.stderr)
    return (int(m.group(1)), int(m.group(2))) if m else None


# ---------------------------------------------------------------- the cluster


@dataclass
class _Proc:
    name: str
    popen: subprocess.Popen
    log: IO[str]


class Cluster(StartStop):
    """SuperLink + ``nodes`` SuperNodes on 127.0.0.1, with TLS and node auth.

    Parameters
    ----------
    workdir
        Holds ``certs/``, ``keys/``, ``flwr-home/`` (``FLWR_HOME``),
        ``logs/*.log``, ``superlink.db`` and, for ``--keep``, ``stop.sh``. The
        SuperLink runs here. A deployed ServerApp refuses a relative
        ``output-dir``: runs started here get ``output-dir=<workdir>/outputs``
        unless their run config names one.
    nodes
        Number of SuperNodes; node i gets ``partition-id=i num-partitions=nodes``.
    transport
        ``"rest"`` (HTTPS Fleet API) or ``"grpc-rere"`` (needs ``supernode_bin``
        from flwr <= 1.39).
    auth
        Start the SuperLink with ``--enable-supernode-auth`` and register each
        node's public key. TLS is on either way.
    project_root
        The Flower app passed to ``flwr run``.
    env
        Extra environment for every process (e.g. ``ONESHOT_EMBEDDED_DIR``).
    port
        The SuperLink's port; 0 picks free ports for everything. With a fixed
        port the other ports follow it: SuperNode i's runtime API on
        ``port + 1 + i``, the gRPC Fleet API on ``port + nodes + 1``.
    supernode_bin
        The ``flower-supernode`` to start. Its folder is put first on the
        nodes' ``PATH`` so that its SuperExec and ClientApp are the same flwr.
    extra_node_config
        Appended to every node's ``--node-config`` (e.g. ``data-path="/data"``).
    node_configs
        Node i's own ``--node-config`` instead of its partition, for the i given
        (e.g. ``{3: 'data-path="/data"'}``: a device with its own data).
    """

    def __init__(
        self,
        workdir: str | Path,
        nodes: int = 3,
        *,
        transport: str = "rest",
        auth: bool = True,
        project_root: str | Path = REPO_ROOT,
        env: Mapping[str, str] | None = None,
        port: int = 0,
        supernode_bin: str = "flower-supernode",
        extra_node_config: str = "",
        node_configs: Mapping[int, str] | None = None,
    ) -> None:
        if nodes < 1:
            raise ValueError(f"nodes={nodes} must be >= 1")
        if transport not in TRANSPORTS:
            raise ValueError(f"transport={transport!r} must be one of {TRANSPORTS}")
        if not 0 <= port <= 65535 - nodes - 1:
            raise ValueError(f"port={port} must be 0 (pick free ports) or a free port")
        self.workdir = Path(workdir).resolve()
        self.nodes = nodes
        self.transport = transport
        self.auth = auth
        self.project_root = Path(project_root).resolve()
        self.supernode_bin = supernode_bin
        self.extra_node_config = extra_node_config
        self.node_configs = dict(node_configs or {})

        self.certs_dir = self.workdir / "certs"
        self.keys_dir = self.workdir / "keys"
        self.logs_dir = self.workdir / "logs"
        self.flwr_home = self.workdir / "flwr-home"
        self.database = self.workdir / "superlink.db"
        self.root_cert = self.certs_dir / "ca.crt"

        if port:
            self.port = port
            self.node_ports = [port + 1 + i for i in range(nodes)]
            grpc_port = port + nodes + 1
        else:
            self.port = free_port()
            self.node_ports = [free_port() for _ in range(nodes)]
            grpc_port = free_port()
        self.grpc_fleet_port = grpc_port if transport == "grpc-rere" else None
        self.fleet_address = f"{HOST}:{self.grpc_fleet_port or self.port}"
        self.address = f"{HOST}:{self.port}"  # Control API (flwr CLI)

        self.env = os.environ.copy() | FLWR_ENV | dict(env or {})
        self.env["FLWR_HOME"] = str(self.flwr_home)
        self._procs: list[_Proc] = []
        self._runs = 0

    # -- the commands, in order

    def node_key(self, i: int) -> Path:
        return self.keys_dir / f"node-{i}"

    def superlink_cmd(self) -> list[str]:
        return superlink_command(
            self.port,
            self.certs_dir,
            self.database,
            auth=self.auth,
            grpc_fleet_port=self.grpc_fleet_port,
        )

    def superlink_env(self) -> dict[str, str]:
        return dict(GRPC_FLEET_ENV) if self.transport == "grpc-rere" else {}

    def supernode_cmd(
        self,
        i: int,
        num_partitions: int | None = None,
        key: Path | None = None,
        port: int | None = None,
    ) -> list[str]:
        return supernode_command(
            self.fleet_address,
            self.root_cert,
            i,
            num_partitions or self.nodes,
            port or self.node_ports[i],
            private_key=(key or self.node_key(i)) if self.auth else None,
            transport=self.transport,
            supernode_bin=self.supernode_bin,
            extra_node_config=self.extra_node_config,
            node_config=self.node_configs.get(i),
        )

    def supernode_env(self) -> dict[str, str]:
        env = dict(self.env)
        bin_dir = Path(self.supernode_bin).parent
        if str(bin_dir) not in ("", "."):
            env["PATH"] = f"{bin_dir}{os.pathsep}{env.get('PATH', '')}"
        return env

    def commands_text(self, run_config: str = "") -> str:
        """Every command :meth:`start` and :meth:`run_app` run, as a shell script."""
        q = shlex.join
        lines = ["# Environment of every process below"]
        lines += [f"export {k}={shlex.quote(v)}" for k, v in FLWR_ENV.items()]
        lines.append(f"export FLWR_HOME={shlex.quote(str(self.flwr_home))}")
        lines += [
            "",
            "# 1. TLS: a CA and the SuperLink certificate (SAN 127.0.0.1, localhost)",
            q(["bash", _shown(CERTS_SH), str(self.certs_dir)]),
        ]
        if self.auth:
            lines += [
                "",
                "# 2. One key pair per SuperNode (P-384, OpenSSH format)",
                q(
                    [
                        "python",
                        "-m",
                        "deploy.node_keys",
                        str(self.keys_dir),
                        *[f"node-{i}" for i in range(self.nodes)],
                    ]
                ),
            ]
        env_prefix = "".join(f"{k}={v} " for k, v in self.superlink_env().items())
        lines += [
            "",
            "# 3. The SuperLink (Fleet + Control + ServerApp runtime API on one port),",
            "#    started in the workdir: the ServerApp's relative paths land there",
            f"(cd {shlex.quote(str(self.workdir))} && "
            + env_prefix
            + q(self.superlink_cmd())
            + ") &",
            "until curl -sf --cacert "
            + shlex.quote(str(self.root_cert))
            + f" https://{self.address}/health >/dev/null; do sleep 1; done",
            "",
            "# 4. The connection for the flwr CLI: $FLWR_HOME/config.toml",
            f"mkdir -p {shlex.quote(str(self.flwr_home))}",
            f"cat > {shlex.quote(str(self.flwr_home / 'config.toml'))} <<'EOF'",
            connection_toml(self.address, self.root_cert).rstrip(),
            "EOF",
        ]
        if self.auth:
            lines += ["", "# 5. Register each SuperNode's public key"]
            lines += [
                q(register_command(self.node_key(i).with_suffix(".pub")))
                for i in range(self.nodes)
            ]
        lines += ["", "# 6. The SuperNodes (on the edge devices)"]
        lines += [q(self.supernode_cmd(i)) + " &" for i in range(self.nodes)]
        lines.append(
            f"sleep 10  # until `flwr supernode ls {CONNECTION}` lists them online"
        )
        lines += [
            "",
            "# 7. Run the app",
            q(run_command(Path(_shown(self.project_root)), CONNECTION, run_config)),
        ]
        return "\n".join(lines) + "\n"

    # -- lifecycle

    def start(self, timeout_s: float = 120.0, online: int | None = None) -> None:
        """Make certs and keys, start the SuperLink, register and start the nodes.

        ``online``: start only SuperNodes ``0 .. online-1`` now; every node is
        registered, the others join later with :meth:`start_node`.
        """
        online = self.nodes if online is None else online
        if not 0 <= online <= self.nodes:
            raise ValueError(f"online={online} must be in [0, nodes={self.nodes}]")
        check_supernode_transport(self.transport, self.supernode_bin)
        self._refuse_running_keep()
        for d in (self.certs_dir, self.keys_dir, self.logs_dir, self.flwr_home):
            d.mkdir(parents=True, exist_ok=True)
        try:
            # 1. TLS certificates (kept across starts, like a real deployment's).
            if not all(
                (self.certs_dir / f).is_file()
                for f in ("ca.crt", "server.pem", "server.key")
            ):
                self._check_call(["bash", str(CERTS_SH), str(self.certs_dir)], "certs")
            # 2. Node keys: made once, re-registered on every start.
            if self.auth:
                for i in range(self.nodes):
                    if not self.node_key(i).is_file():
                        generate_node_key(self.node_key(i), overwrite=True)
            # 3. The SuperLink, with a fresh database (no stale registrations).
            for suffix in ("", "-wal", "-shm", "-journal"):
                Path(f"{self.database}{suffix}").unlink(missing_ok=True)
            link = self._spawn(
                "superlink", self.superlink_cmd(), self.env | self.superlink_env()
            )
            self._wait_superlink(link.popen, timeout_s)
            # 4. The flwr CLI's connection.
            (self.flwr_home / "config.toml").write_text(
                connection_toml(self.address, self.root_cert)
            )
            # 5. Register the nodes' public keys.
            if self.auth:
                for i in range(self.nodes):
                    pub = self.node_key(i).with_suffix(".pub")
                    self._check_call(register_command(pub), f"register-node-{i}")
            # 6. The SuperNodes; wait until the SuperLink lists all of them online.
            env = self.supernode_env()
            for i in range(online):
                self._spawn(f"supernode-{i}", self.supernode_cmd(i), env)
            self._wait_nodes_online(timeout_s, online)
        except BaseException:
            self.stop()
            raise

    def start_node(self, i: int, timeout_s: float = 120.0) -> None:
        """Start SuperNode ``i`` (one :meth:`start` left out); wait until it is online."""
        name = f"supernode-{i}"
        if not 0 <= i < self.nodes or any(p.name == name for p in self._procs):
            raise ValueError(
                f"node={i}: must be in [0, nodes={self.nodes}) and not running yet"
            )
        self._spawn(name, self.supernode_cmd(i), self.supernode_env())
        self._wait_nodes_online(timeout_s, self._running_nodes())

    def kill_superlink(self) -> int:
        """SIGKILL the SuperLink (by its pid) and reap it, as its parent (a shell,
        systemd) would; returns the pid. Its SuperExec and ServerApps are left to
        themselves: they watch the SuperLink's pid, which stays taken until it
        is reaped, so an unreaped SuperLink keeps them running."""
        link = next((p for p in self._procs if p.name == "superlink"), None)
        if link is None or link.popen.poll() is not None:
            raise RuntimeError("no SuperLink started here is running")
        link.popen.send_signal(signal.SIGKILL)
        link.popen.wait(timeout=10)
        return link.popen.pid

    def restart_superlink(self, timeout_s: float = 120.0) -> int:
        """Start the SuperLink again after it died: same ``--database``, port,
        certificates and auth; no node is registered again. Returns its pid.

        The dead SuperLink's log is kept as ``logs/superlink.<n>.log``
        (n = 1, 2, ...); the new one logs to ``logs/superlink.log``. Raises
        ``RuntimeError`` if the SuperLink started here is still running.
        """
        old = next((p for p in self._procs if p.name == "superlink"), None)
        if old is not None:
            try:
                old.popen.wait(timeout=10)  # reap it (it was just killed)
            except subprocess.TimeoutExpired:
                raise RuntimeError(
                    f"the SuperLink (pid {old.popen.pid}) still runs; stop it first"
                ) from None
            old.log.close()
            self._procs.remove(old)
        n = 1
        while (self.logs_dir / f"superlink.{n}.log").exists():
            n += 1
        log = self.logs_dir / "superlink.log"
        if log.exists():
            log.rename(self.logs_dir / f"superlink.{n}.log")
        link = self._spawn(
            "superlink", self.superlink_cmd(), self.env | self.superlink_env()
        )
        self._wait_superlink(link.popen, timeout_s)  # stop() ends it on a timeout
        return link.popen.pid

    def _running_nodes(self) -> int:
        return sum(p.name.startswith("supernode-") for p in self._procs)

    @property
    def superlink_pid(self) -> int | None:
        """The SuperLink's pid (its SuperExec and the ServerApps are descendants)."""
        return next((p.popen.pid for p in self._procs if p.name == "superlink"), None)

    def stop(self, timeout_s: float = 15.0) -> None:
        """Stop every process started here: SuperNodes first, then the SuperLink."""
        terminate([p.popen for p in self._procs if p.name != "superlink"], timeout_s)
        terminate([p.popen for p in self._procs if p.name == "superlink"], timeout_s)
        for p in self._procs:
            p.log.close()
        self._procs.clear()

    def keep(self) -> str:
        """Leave the cluster running: write ``stop.sh`` and return how to use it."""
        # bash, not sh: dash's kill cannot signal a process group (-PGID).
        lines = [
            "#!/usr/bin/env bash",
            "# Stops the cluster deploy.cluster --keep left.",
        ]
        for p in reversed(self._procs):
            lines.append(f"kill -TERM -- -{p.popen.pid} 2>/dev/null  # {p.name}")
        lines.append(f"rm -f {shlex.quote(str(self.workdir / 'cluster.json'))}")
        stop_sh = self.workdir / "stop.sh"
        stop_sh.write_text("\n".join(lines) + "\n")
        stop_sh.chmod(0o755)
        info = {p.name: p.popen.pid for p in self._procs}
        (self.workdir / "cluster.json").write_text(json.dumps(info, indent=2))
        for p in self._procs:
            p.log.close()  # the processes keep their own handles
        self._procs.clear()  # nothing to stop on exit any more
        return (
            f"The cluster keeps running (SuperLink on {self.address}).\n"
            f"Use it:   export FLWR_HOME={shlex.quote(str(self.flwr_home))}\n"
            f"          {shlex.join(run_command(self.project_root))}\n"
            f"Stop it:  bash {shlex.quote(str(stop_sh))}\n" + "\n".join(lines[2:-1])
        )

    # -- using it

    def run_app(
        self, run_config: str = "", timeout: float = 900.0, echo: bool = False
    ) -> AppRun:
        """``flwr run <project> <connection> --stream``; wait; read the run's status.

        Raises ``subprocess.TimeoutExpired`` after stopping the run (``flwr stop``)
        if it takes longer than ``timeout`` seconds.
        """
        self._runs += 1
        log_path = self.logs_dir / f"run-{self._runs}.log"
        cmd = run_command(self.project_root, CONNECTION, self._with_output(run_config))
        lines: list[str] = []
        with open(log_path, "w") as log:
            proc, reader = start_copied(
                cmd,
                log,
                env=self.env,
                cwd=self.workdir,
                echo=echo,
                lines=lines,
                new_session=True,
            )
            try:
                rc = proc.wait(timeout=timeout)
            except BaseException:  # timeout or Ctrl-C: stop the CLI and the run
                terminate([proc], 5)
                reader.join(timeout=5)
                run_id = _run_id("".join(lines))
                if run_id is not None:
                    self._cli(["flwr", "stop", str(run_id), CONNECTION])
                raise
            finally:
                reader.join(timeout=10)
        out = "".join(lines)
        run_id = _run_id(out)
        status = self.run_status(run_id) if run_id is not None else None
        return AppRun(cmd, rc, out, run_id, status, log_path)

    def _with_output(self, run_config: str) -> str:
        """``run_config`` with an absolute ``output-dir`` (a deployed ServerApp
        refuses a relative one): ``<workdir>/outputs`` unless it names one."""
        if "output-dir" in run_config:
            return run_config
        out = f'output-dir="{self.workdir.resolve() / "outputs"}"'
        return f"{run_config} {out}".strip()

    def submit_app(self, run_config: str = "") -> int:
        """``flwr run <project> <connection>`` without ``--stream``: start the run
        and return its id at once (follow it with :meth:`run_status`)."""
        cmd = run_command(self.project_root, CONNECTION, self._with_output(run_config))
        cmd.remove("--stream")
        self._runs += 1
        self._check_call(cmd, f"run-{self._runs}")
        log = (self.logs_dir / f"run-{self._runs}.log").read_text()
        run_id = _run_id(log)
        if run_id is None:
            raise RuntimeError(f"`{shlex.join(cmd)}` printed no run id:\n{log[-2000:]}")
        return run_id

    def run_status(self, run_id: int) -> str | None:
        """The run's status from ``flwr ls --run-id``, e.g. ``finished:completed``."""
        res = self._cli(
            ["flwr", "ls", CONNECTION, "--run-id", str(run_id), "--format", "json"]
        )
        runs = _json_out(res.stdout).get("runs") or []
        return runs[0].get("status") if runs else None

    def node_statuses(self) -> list[str]:
        """Status of every node the SuperLink knows (``flwr supernode ls``)."""
        return [status for _, status in self.node_list()]

    def node_list(self) -> list[tuple[int, str]]:
        """``(node id, status)`` of every node the SuperLink knows, in the order
        they were registered (with auth: entry i is ``keys/node-i``)."""
        res = self._cli(["flwr", "supernode", "ls", CONNECTION, "--format", "json"])
        return [
            (int(n.get("node-id", 0)), n.get("status", ""))
            for n in _json_out(res.stdout).get("nodes") or []
        ]

    def start_unregistered_node(self, timeout: float = 60.0) -> NodeExit:
        """Start one more SuperNode whose key was never registered; report its end.

        With auth on, the SuperLink refuses it: Flower logs "Exit Code: 305"
        (SUPERNODE_CONNECTION_ERROR) and the process exits with status 1. A node
        still running after ``timeout`` s (auth off) is stopped; returncode None.
        """
        key = self.keys_dir / "unregistered"
        generate_node_key(key, overwrite=True)
        name = "unregistered-node"
        cmd = self.supernode_cmd(self.nodes, self.nodes + 1, key=key, port=free_port())
        proc = self._spawn(name, cmd, self.supernode_env())
        try:
            rc: int | None = proc.popen.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            rc = None
        finally:
            terminate([proc.popen], 10)
            proc.log.close()
            self._procs.remove(proc)
        log_path = self.logs_dir / f"{name}.log"
        text = log_path.read_text(errors="replace")
        m = FLOWER_EXIT_CODE_RE.search(text)
        return NodeExit(rc, int(m.group(1)) if m else None, log_path, text)

    # -- internals

    def _spawn(self, name: str, cmd: list[str], env: Mapping[str, str]) -> _Proc:
        log = open(self.logs_dir / f"{name}.log", "w")  # noqa: SIM115 - closed in stop()
        popen = spawn(cmd, log, env=env, cwd=self.workdir)
        proc = _Proc(name, popen, log)
        self._procs.append(proc)
        return proc

    def _cli(
        self, cmd: list[str], timeout: float = 120.0
    ) -> subprocess.CompletedProcess:
        return subprocess.run(
            cmd,
            env=self.env,
            cwd=self.workdir,
            capture_output=True,
            text=True,
            timeout=timeout,
        )

    def _check_call(self, cmd: list[str], name: str) -> None:
        res = self._cli(cmd)
        (self.logs_dir / f"{name}.log").write_text(
            "$ " + shlex.join(cmd) + "\n" + res.stdout + res.stderr
        )
        if res.returncode != 0:
            raise RuntimeError(
                f"`{shlex.join(cmd)}` exited with {res.returncode}:\n"
                f"{(res.stdout + res.stderr)[-2000:]}"
            )

    def _wait_superlink(self, link: subprocess.Popen, timeout_s: float) -> None:
        """Poll ``GET https://127.0.0.1:<port>/health`` (and the gRPC port)."""
        ctx = ssl.create_default_context(cafile=str(self.root_cert))

        def ready() -> bool:
            check_running("flower-superlink", link, self.logs_dir / "superlink.log")
            ok = http_ok(f"https://{self.address}/health", verify=ctx, timeout_s=2)
            if ok and self.grpc_fleet_port is not None:
                ok = port_open(HOST, self.grpc_fleet_port)
            return ok

        if not wait_until(ready, timeout_s, 0.5):
            raise TimeoutError(
                f"the SuperLink did not answer on https://{self.address}/health "
                f"within {timeout_s:.0f} s; see {self.logs_dir / 'superlink.log'}"
            )

    def _wait_nodes_online(self, timeout_s: float, expected: int | None = None) -> None:
        expected = self.nodes if expected is None else expected
        online = 0

        def ready() -> bool:
            nonlocal online
            for p in self._procs:
                if p.name.startswith("supernode-"):
                    check_running(p.name, p.popen, self.logs_dir / f"{p.name}.log")
            online = self.node_statuses().count("online")
            return online >= expected

        if not wait_until(ready, timeout_s, 2.0):
            raise TimeoutError(
                f"{online}/{expected} SuperNodes online after {timeout_s:.0f} s; "
                f"see {self.logs_dir}/supernode-*.log"
            )

    def _refuse_running_keep(self) -> None:
        """Do not start beside a cluster that ``--keep`` left running here."""
        info = self.workdir / "cluster.json"
        if not info.is_file():
            return
        alive = []
        for name, pid in json.loads(info.read_text()).items():
            try:
                os.kill(pid, 0)
                alive.append(f"{name} (pid {pid})")
            except ProcessLookupError:
                pass
            except PermissionError:
                alive.append(f"{name} (pid {pid})")
        if alive:
            raise RuntimeError(
                f"a cluster started with --keep still runs in {self.workdir}: "
                f"{', '.join(alive)}. Stop it with `bash {self.workdir / 'stop.sh'}`."
            )
        info.unlink()


def _shown(path: Path) -> str:
    """``path`` relative to the current folder if it lies inside it (for docs)."""
    try:
        rel = path.resolve().relative_to(Path.cwd().resolve())
    except ValueError:
        return str(path)
    return str(rel) if str(rel) != "." else "."


def _run_id(text: str) -> int | None:
    m = RUN_ID_RE.search(text)
    return int(m.group(1)) if m else None


def _json_out(stdout: str) -> dict[str, Any]:
    """The JSON object a ``flwr ... --format json`` command printed."""
    start = stdout.find("{")
    if start < 0:
        return {}
    try:
        return json.loads(stdout[start:])
    except json.JSONDecodeError:
        return {}


def check_supernode_transport(transport: str, supernode_bin: str) -> None:
    """gRPC-rere needs a SuperNode of flwr <= 1.39 (1.40 removed ``--grpc-rere``)."""
    if transport != "grpc-rere":
        return
    version = _flower_version(supernode_bin)
    if version is None or version >= (1, 40):
        shown = "unknown" if version is None else f"{version[0]}.{version[1]}"
        raise ValueError(
            f"--transport grpc-rere needs a flower-supernode from flwr <= 1.39, but "
            f"{supernode_bin!r} is flwr {shown} (HTTP Fleet API only). Install one "
            "beside this flwr: `python -m venv --system-site-packages /opt/flwr139 && "
            "/opt/flwr139/bin/pip install flwr==1.39.0`, then pass "
            "--supernode-bin /opt/flwr139/bin/flower-supernode."
        )


@contextmanager
def start_cluster(
    workdir: str | Path, nodes: int = 3, **kwargs: Any
) -> Iterator[Cluster]:
    """Start a :class:`Cluster`; stop all its processes on exit (also on errors)."""
    cluster = Cluster(workdir, nodes, **kwargs)
    try:
        cluster.start()
        yield cluster
    finally:
        cluster.stop()


# ---------------------------------------------------------------- CLI


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
    p.add_argument("--port", type=int, default=0, help="SuperLink port (0: free ports)")
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


def main(argv: Sequence[str] | None = None) -> int:
    args = _parse_args(argv)
    cluster = Cluster(
        args.workdir,
        args.nodes,
        transport=args.transport,
        auth=not args.no_auth,
        project_root=args.project_root,
        port=args.port,
        supernode_bin=args.supernode_bin,
        extra_node_config=args.node_config,
    )
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
    keep = False
    try:
        print(
            f"[cluster] starting SuperLink on {cluster.address} + {args.nodes} "
            f"SuperNodes ({args.transport}, auth {'off' if args.no_auth else 'on'}); "
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
            print(cluster.keep(), flush=True)
            keep = True
        return code
    except KeyboardInterrupt:
        print("[cluster] interrupted; stopping", file=sys.stderr, flush=True)
        return 130
    except (RuntimeError, TimeoutError, ValueError, subprocess.TimeoutExpired) as e:
        print(f"[cluster] error: {e}", file=sys.stderr, flush=True)
        return 1
    finally:
        if not keep:
            cluster.stop()
            print("[cluster] stopped", flush=True)


if __name__ == "__main__":
    raise SystemExit(main())
