"""A real Flower deployment on this machine: SuperLink + N SuperNodes, TLS + node auth.

The same processes and flags as a deployment on separate machines, every one on
127.0.0.1 (``deploy/README.md``): certificates, node keys, the SuperLink (and,
with ``front=True``, the Fleet front the nodes dial instead), the ``flwr`` CLI's
connection, the nodes' keys registered and recorded in the device registry
(``<workdir>/devices.json``), the SuperNodes, ``flwr run``; every process
started here is stopped on exit, also on Ctrl-C or an error. The steps are
numbered in :meth:`Cluster.start`; :mod:`deploy.commands` builds the commands,
:mod:`deploy.flwr_cli` drives the ``flwr`` CLI, :mod:`deploy.cluster_cli` is
``python -m deploy.cluster``.

From Python (tests)::

    with start_cluster(tmp_path, nodes=3) as cluster:
        run = cluster.run_app('method="local"', timeout=300)
        assert run.ok, run.stdout
        refused = cluster.start_unregistered_node()
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from deploy.node_keys import generate_node_key
from deploy.procs import (
    FLWR_ENV,
    HOST,
    Proc,
    Processes,
    StartStop,
    check_running,
    free_port,
    port_open,
    refuse_alive,
    terminate,
    wait_health,
    wait_until,
)

from .commands import (
    CERTS_SH,
    CONNECTION,
    GRPC_FLEET_ENV,
    REPO_ROOT,
    TRANSPORTS,
    AppRun,
    NodeExit,
    check_supernode_transport,
    connection_toml,
    front_command,
    node_exit,
    partition_node_config,
    superlink_command,
    supernode_command,
)
from .devices import DeviceSpec, register_devices, specs_for
from .flwr_cli import FlwrCli


class Cluster(StartStop):
    """SuperLink + ``nodes`` SuperNodes on 127.0.0.1, with TLS and node auth.

    Parameters
    ----------
    workdir
        Holds ``certs/``, ``keys/``, ``flwr-home/`` (``FLWR_HOME``),
        ``logs/*.log``, ``superlink.db``, ``devices.json`` and, for ``--keep``,
        ``stop.sh``. The SuperLink runs here. A deployed ServerApp refuses a
        relative ``output-dir``: runs started here get
        ``output-dir=<workdir>/outputs`` unless their run config names one.
    nodes
        Number of SuperNodes; node i gets ``partition-id=i num-partitions=nodes``.
    transport
        ``"rest"`` (HTTPS Fleet API) or ``"grpc-rere"`` (needs ``supernode_bin``
        from flwr <= 1.39).
    auth
        Start the SuperLink with ``--enable-supernode-auth``, register each
        node's public key and keep the device registry; runs get
        ``device-registry``. TLS is on either way.
    front
        Start the Fleet front (``deploy.fleet_front``, rest only): the nodes
        dial it; the Control and runtime API stay on the SuperLink's address.
    project_root
        The Flower app passed to ``flwr run``.
    env
        Extra environment for every process (e.g. ``ONESHOT_EMBEDDED_DIR``).
    port
        0 picks free ports for everything. A fixed port is the SuperLink's, or
        with ``front`` the front's (the SuperLink then takes ``port - 1``);
        SuperNode i's runtime API on ``port + 1 + i``, the gRPC Fleet API on
        ``port + nodes + 1``.
    supernode_bin
        The ``flower-supernode`` to start. Its folder is put first on the
        nodes' ``PATH`` so that its SuperExec and ClientApp are the same flwr.
    extra_node_config
        Appended to every node's ``--node-config`` (e.g. ``data-path="/data"``).
    node_configs
        Node i's own ``--node-config`` instead of its partition, for the i given
        (e.g. ``{3: 'data-path="/data"'}``: a device with its own data). The
        registry records the partition it names, or none.
    """

    def __init__(
        self,
        workdir: str | Path,
        nodes: int = 3,
        *,
        transport: str = "rest",
        auth: bool = True,
        front: bool = False,
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
        if front and transport != "rest":
            raise ValueError(
                "front=True forwards the HTTP Fleet API: use transport='rest'"
            )
        if not (0 <= port <= 65535 - nodes - 1 and port != 1):
            raise ValueError(f"port={port} must be 0 (pick free ports) or a free port")
        self.workdir = Path(workdir).resolve()
        self.nodes = nodes
        self.transport = transport
        self.auth = auth
        self.front = front
        self.project_root = Path(project_root).resolve()
        self.supernode_bin = supernode_bin
        self.extra_node_config = extra_node_config
        self.node_configs = dict(node_configs or {})

        self.certs_dir = self.workdir / "certs"
        self.keys_dir = self.workdir / "keys"
        self.logs_dir = self.workdir / "logs"
        self.flwr_home = self.workdir / "flwr-home"
        self.database = self.workdir / "superlink.db"
        self.registry = self.workdir / "devices.json"
        self.root_cert = self.certs_dir / "ca.crt"

        if port:
            self.port = port - 1 if front else port
            self.node_ports = [port + 1 + i for i in range(nodes)]
            grpc_port = port + nodes + 1
            front_port = port
        else:
            self.port = free_port()
            self.node_ports = [free_port() for _ in range(nodes)]
            grpc_port = free_port()
            front_port = free_port()
        self.grpc_fleet_port = grpc_port if transport == "grpc-rere" else None
        self.front_port = front_port if front else None
        self.address = f"{HOST}:{self.port}"  # Control API (flwr CLI)
        self.fleet_address = (
            f"{HOST}:{self.front_port or self.grpc_fleet_port or self.port}"
        )

        self.env = os.environ.copy() | FLWR_ENV | dict(env or {})
        self.env["FLWR_HOME"] = str(self.flwr_home)
        self.cli = FlwrCli(self.env, self.workdir, self.logs_dir)
        self._procs = Processes(self.logs_dir, self.workdir)

    # -- the commands, in order (``deploy.script`` prints them)

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

    def front_cmd(self, python: str = sys.executable) -> list[str]:
        return front_command(
            self.fleet_address, self.address, self.certs_dir, python=python
        )

    def connection_toml(self) -> str:
        return connection_toml(self.address, self.root_cert)

    def device_specs(self) -> list[DeviceSpec]:
        """The devices to register: node i's key, and the partition its registered
        node config names (none for a device with its own data)."""
        return specs_for(
            [f"node-{i}" for i in range(self.nodes)],
            [self.node_key(i).with_suffix(".pub") for i in range(self.nodes)],
            [
                self.node_configs.get(i, partition_node_config(i, self.nodes))
                for i in range(self.nodes)
            ],
        )

    def supernode_cmd(
        self,
        i: int,
        num_partitions: int | None = None,
        key: Path | None = None,
        port: int | None = None,
        node_config: str | None = None,
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
            node_config=node_config or self.node_configs.get(i),
        )

    def supernode_env(self) -> dict[str, str]:
        env = dict(self.env)
        bin_dir = Path(self.supernode_bin).parent
        if str(bin_dir) not in ("", "."):
            env["PATH"] = f"{bin_dir}{os.pathsep}{env.get('PATH', '')}"
        return env

    def run_config(self, run_config: str = "") -> str:
        """``run_config`` with an absolute ``output-dir`` (a deployed ServerApp
        refuses a relative one; ``<workdir>/outputs`` unless it names one) and,
        with auth, ``device-registry`` (unless it names one)."""
        extra = []
        if "output-dir" not in run_config:
            extra.append(f'output-dir="{self.workdir / "outputs"}"')
        if self.auth and "device-registry" not in run_config:
            extra.append(f'device-registry="{self.registry}"')
        return " ".join([run_config, *extra]).strip()

    def commands_text(self, run_config: str = "") -> str:
        """Every command :meth:`start` and :meth:`run_app` run, as a shell script."""
        from .script import commands_text

        return commands_text(self, run_config)

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
        # not beside a cluster that --keep left running here
        refuse_alive(
            self.workdir / "cluster.json",
            f"a cluster started with --keep still runs in {self.workdir}; stop it "
            f"with `bash {self.workdir / 'stop.sh'}`",
        )
        for d in (self.certs_dir, self.keys_dir, self.logs_dir, self.flwr_home):
            d.mkdir(parents=True, exist_ok=True)
        try:
            # 1. TLS certificates (kept across starts, like a real deployment's).
            if not all(
                (self.certs_dir / f).is_file()
                for f in ("ca.crt", "server.pem", "server.key")
            ):
                self.cli.check_call(
                    ["bash", str(CERTS_SH), str(self.certs_dir)], "certs"
                )
            # 2. Node keys: made once, re-registered on every start.
            if self.auth:
                for i in range(self.nodes):
                    if not self.node_key(i).is_file():
                        generate_node_key(self.node_key(i), overwrite=True)
            # 3. The SuperLink, with a fresh database (no stale registrations),
            # and the Fleet front where asked for.
            for suffix in ("", "-wal", "-shm", "-journal"):
                Path(f"{self.database}{suffix}").unlink(missing_ok=True)
            self._start_superlink(timeout_s)
            if self.front:
                front = self._procs.start("fleet-front", self.front_cmd(), self.env)
                self._wait_health(
                    front.popen, "fleet-front", self.fleet_address, timeout_s
                )
            # 4. The flwr CLI's connection.
            (self.flwr_home / "config.toml").write_text(self.connection_toml())
            # 5. Register the nodes' public keys; a fresh device registry.
            if self.auth:
                self.registry.unlink(missing_ok=True)
                register_devices(
                    self.device_specs(),
                    self.registry,
                    CONNECTION,
                    run=self.cli.call,
                    log=lambda s, cmd, res: self.cli.write_log(
                        f"register-{s.name}", cmd, res
                    ),
                )
            # 6. The SuperNodes; wait until the SuperLink lists all of them online.
            env = self.supernode_env()
            for i in range(online):
                self._procs.start(f"supernode-{i}", self.supernode_cmd(i), env)
            self._wait_nodes_online(timeout_s, online)
        except BaseException:
            self.stop()
            raise

    def start_node(
        self, i: int, timeout_s: float = 120.0, node_config: str | None = None
    ) -> None:
        """Start SuperNode ``i`` (one :meth:`start` left out); wait until it is online.

        ``node_config``: what the node is started with, if not what it was
        registered with (e.g. a node claiming another device's partition).
        """
        name = f"supernode-{i}"
        if not 0 <= i < self.nodes or any(p.name == name for p in self._procs):
            raise ValueError(
                f"node={i}: must be in [0, nodes={self.nodes}) and not running yet"
            )
        cmd = self.supernode_cmd(i, node_config=node_config)
        self._procs.start(name, cmd, self.supernode_env())
        self._wait_nodes_online(timeout_s, self._running_nodes())

    def kill_superlink(self) -> int:
        """SIGKILL the SuperLink (by its pid) and reap it, as its parent (a shell,
        systemd) would; returns the pid. Its SuperExec and ServerApps are left to
        themselves: they watch the SuperLink's pid, which stays taken until it
        is reaped, so an unreaped SuperLink keeps them running."""
        link = self._procs.get("superlink")
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
        old = self._procs.get("superlink")
        if old is not None:
            try:
                old.popen.wait(timeout=10)  # reap it (it was just killed)
            except subprocess.TimeoutExpired:
                raise RuntimeError(
                    f"the SuperLink (pid {old.popen.pid}) still runs; stop it first"
                ) from None
            self._procs.forget(old)
        n = 1
        while (self.logs_dir / f"superlink.{n}.log").exists():
            n += 1
        log = self.logs_dir / "superlink.log"
        if log.exists():
            log.rename(self.logs_dir / f"superlink.{n}.log")
        return self._start_superlink(timeout_s)  # stop() ends it on a timeout

    @property
    def superlink_pid(self) -> int | None:
        """The SuperLink's pid (its SuperExec and the ServerApps are descendants)."""
        link = self._procs.get("superlink")
        return link.popen.pid if link is not None else None

    def stop(self, timeout_s: float = 15.0) -> None:
        """Stop every process started here: SuperNodes first, then the SuperLink."""
        self._procs.stop(timeout_s, last=("superlink",))

    def release(self) -> list[Proc]:
        """Stop watching the processes: they keep running (``--keep``); returns them."""
        return self._procs.release()

    # -- using it (the operator's flwr CLI, :class:`deploy.flwr_cli.FlwrCli`)

    def run_app(
        self, run_config: str = "", timeout: float = 900.0, echo: bool = False
    ) -> AppRun:
        """``flwr run <project> deploy --stream`` with :meth:`run_config`; its status."""
        return self.cli.run_app(
            self.project_root, self.run_config(run_config), timeout, echo
        )

    def submit_app(self, run_config: str = "") -> int:
        """``flwr run`` without ``--stream``: start the run, return its id at once."""
        return self.cli.submit_app(self.project_root, self.run_config(run_config))

    def run_status(self, run_id: int) -> str | None:
        """The run's status from ``flwr ls --run-id``, e.g. ``finished:completed``."""
        return self.cli.run_status(run_id)

    def node_statuses(self) -> list[str]:
        """Status of every node the SuperLink knows (``flwr supernode ls``)."""
        return [status for _, status in self.node_list()]

    def node_list(self) -> list[tuple[int, str]]:
        """``(node id, status)`` of every node the SuperLink knows, in the order
        they were registered (with auth: entry i is ``keys/node-i``)."""
        return self.cli.node_list()

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
        proc = self._procs.start(name, cmd, self.supernode_env())
        try:
            rc: int | None = proc.popen.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            rc = None
        finally:
            terminate([proc.popen], 10)
            self._procs.forget(proc)
        return node_exit(rc, self.logs_dir / f"{name}.log")

    # -- internals

    def _running_nodes(self) -> int:
        return sum(p.name.startswith("supernode-") for p in self._procs)

    def _start_superlink(self, timeout_s: float) -> int:
        env = self.env | self.superlink_env()
        link = self._procs.start("superlink", self.superlink_cmd(), env)
        self._wait_health(link.popen, "superlink", self.address, timeout_s)
        return link.popen.pid

    def _wait_health(
        self, proc: subprocess.Popen, name: str, address: str, timeout_s: float
    ) -> None:
        """Until ``GET https://<address>/health`` answers (and the gRPC port)."""
        grpc = self.grpc_fleet_port if name == "superlink" else None
        wait_health(
            proc,
            name,
            f"https://{address}/health",
            self.root_cert,
            self.logs_dir / f"{name}.log",
            timeout_s,
            also=(lambda: port_open(HOST, grpc)) if grpc is not None else None,
        )

    def _wait_nodes_online(self, timeout_s: float, expected: int | None = None) -> None:
        """Until the SuperLink lists ``expected`` nodes online (``flwr supernode
        ls``). Each ``flwr`` call is a Python process (about a CPU-second), so
        the SuperLink is asked once every started node has logged its activation
        (``SuperNode ID: ...``; again at most every ``NODES_ASK_AGAIN_S``), and
        otherwise every ``NODES_ASK_EVERY_S``, the first time that long after the
        start (a SuperNode of another Flower version may log something else)."""
        expected = self.nodes if expected is None else expected
        online = 0
        start = time.monotonic()
        asked: float | None = None  # when the SuperLink was last asked

        def ready() -> bool:
            nonlocal online, asked
            nodes = [p for p in self._procs if p.name.startswith("supernode-")]
            for p in nodes:
                check_running(p.name, p.popen, self.logs_dir / f"{p.name}.log")
            activated = all(
                ACTIVATED in _read(self.logs_dir / f"{p.name}.log") for p in nodes
            )
            now = time.monotonic()
            if activated:  # at once, then again at most every NODES_ASK_AGAIN_S
                due = asked is None or now - asked >= NODES_ASK_AGAIN_S
            else:
                due = now - (start if asked is None else asked) >= NODES_ASK_EVERY_S
            if not due:
                return False
            asked = now
            online = self.node_statuses().count("online")
            return online >= expected

        if not wait_until(ready, timeout_s, 0.5):
            raise TimeoutError(
                f"{online}/{expected} SuperNodes online after {timeout_s:.0f} s; "
                f"see {self.logs_dir}/supernode-*.log"
            )


# What a SuperNode logs once the SuperLink activated it (flwr 1.41)
ACTIVATED = "SuperNode ID:"
NODES_ASK_EVERY_S = 10.0
NODES_ASK_AGAIN_S = 2.0


def _read(path: Path) -> str:
    try:
        return path.read_text(errors="replace")
    except OSError:
        return ""


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


if __name__ == "__main__":
    from deploy.cluster_cli import main

    raise SystemExit(main())
