"""Flower's deployment commands, built as argument lists, and their output parsed.

Pure functions: :class:`deploy.cluster.Cluster` runs these commands and
``--print-commands`` prints them, so the README (which quotes
``--print-commands``) and the code cannot drift apart.
"""

from __future__ import annotations

import json
import re
import subprocess
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from deploy.procs import HOST

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


def front_command(
    listen: str, upstream: str, certs_dir: Path, *, python: str = "python"
) -> list[str]:
    """``deploy.fleet_front``: devices' HTTPS entry, the Fleet API routes only.

    ``listen``: where devices dial (``HOST:PORT``); ``upstream``: the SuperLink's
    loopback ``HOST:PORT`` (Control and runtime API reachable only there).
    """
    return [
        python,
        "-m",
        "deploy.fleet_front",
        "--listen",
        listen,
        "--upstream",
        upstream,
        "--ssl-certfile",
        str(certs_dir / "server.pem"),
        "--ssl-keyfile",
        str(certs_dir / "server.key"),
        "--ssl-ca-certfile",
        str(certs_dir / "ca.crt"),
    ]


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
        node_config = partition_node_config(partition_id, num_partitions)
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


def partition_node_config(partition_id: int, num_partitions: int) -> str:
    return f"partition-id={partition_id} num-partitions={num_partitions}"


def register_command(
    public_key: Path, connection: str = CONNECTION, *, as_json: bool = False
) -> list[str]:
    """``flwr supernode register``; ``as_json``: it prints ``{"node-id": ...}``."""
    cmd = ["flwr", "supernode", "register", str(public_key), connection]
    return cmd + ["--format", "json"] if as_json else cmd


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


def node_exit(returncode: int | None, log_path: Path) -> NodeExit:
    """A SuperNode's end, with the Flower exit code its log names."""
    text = log_path.read_text(errors="replace")
    m = FLOWER_EXIT_CODE_RE.search(text)
    return NodeExit(returncode, int(m.group(1)) if m else None, log_path, text)


def run_id_of(text: str) -> int | None:
    """The run id ``flwr run`` printed, if any."""
    m = RUN_ID_RE.search(text)
    return int(m.group(1)) if m else None


def json_out(stdout: str) -> dict[str, Any]:
    """The JSON object a ``flwr ... --format json`` command printed."""
    start = stdout.find("{")
    if start < 0:
        return {}
    try:
        out = json.loads(stdout[start:])
    except json.JSONDecodeError:
        return {}
    return out if isinstance(out, dict) else {}


def shown(path: Path) -> str:
    """``path`` relative to the current folder if it lies inside it (for docs)."""
    try:
        rel = path.resolve().relative_to(Path.cwd().resolve())
    except ValueError:
        return str(path)
    return str(rel) if str(rel) != "." else "."


# ---------------------------------------------------------------- versions


def _flower_version(executable: str) -> tuple[int, int] | None:
    try:
        out = subprocess.run(
            [executable, "--version"], capture_output=True, text=True, timeout=60
        )
    except (OSError, subprocess.TimeoutExpired):
        return None
    m = VERSION_RE.search(out.stdout + out.stderr)
    return (int(m.group(1)), int(m.group(2))) if m else None


def check_supernode_transport(transport: str, supernode_bin: str) -> None:
    """gRPC-rere needs a SuperNode of flwr <= 1.39 (1.40 removed ``--grpc-rere``)."""
    if transport != "grpc-rere":
        return
    version = _flower_version(supernode_bin)
    if version is None or version >= (1, 40):
        shown_v = "unknown" if version is None else f"{version[0]}.{version[1]}"
        raise ValueError(
            f"--transport grpc-rere needs a flower-supernode from flwr <= 1.39, but "
            f"{supernode_bin!r} is flwr {shown_v} (HTTP Fleet API only). Install one "
            "beside this flwr: `python -m venv --system-site-packages /opt/flwr139 && "
            "/opt/flwr139/bin/pip install flwr==1.39.0`, then pass "
            "--supernode-bin /opt/flwr139/bin/flower-supernode."
        )
