"""A :class:`deploy.cluster.Cluster` as the shell script of its commands.

``python -m deploy.cluster --print-commands`` prints it and ``deploy/README.md``
quotes it (a test checks the quote), so the documented deployment is the one
the cluster runs.
"""

from __future__ import annotations

import shlex
from pathlib import Path
from typing import TYPE_CHECKING

from deploy.procs import FLWR_ENV

from .commands import CERTS_SH, CONNECTION, run_command, shown

if TYPE_CHECKING:
    from .cluster import Cluster


def commands_text(cl: Cluster, run_config: str = "") -> str:
    """Every command ``cl.start()`` and ``cl.run_app(run_config)`` run, in order."""
    q = shlex.join
    lines = ["# Environment of every process below"]
    lines += [f"export {k}={shlex.quote(v)}" for k, v in FLWR_ENV.items()]
    lines.append(f"export FLWR_HOME={shlex.quote(str(cl.flwr_home))}")
    lines += [
        "",
        "# 1. TLS: a CA and the SuperLink certificate (SAN 127.0.0.1, localhost)",
        q(["bash", shown(CERTS_SH), str(cl.certs_dir)]),
    ]
    if cl.auth:
        names = [f"node-{i}" for i in range(cl.nodes)]
        lines += [
            "",
            "# 2. One key pair per SuperNode (P-384, OpenSSH format)",
            q(["python", "-m", "deploy.node_keys", str(cl.keys_dir), *names]),
        ]
    env_prefix = "".join(f"{k}={v} " for k, v in cl.superlink_env().items())
    what = (
        "Control + ServerApp runtime API"
        if cl.front
        else "Fleet + Control + ServerApp runtime API"
    )
    lines += [
        "",
        f"# 3. The SuperLink ({what} on one port),",
        "#    started in the workdir: the ServerApp's relative paths land there",
        f"(cd {shlex.quote(str(cl.workdir))} && {env_prefix}{q(cl.superlink_cmd())}) &",
        _wait_health(cl.root_cert, cl.address),
    ]
    if cl.front:
        lines += [
            "",
            "# 3b. The Fleet front: where devices dial; it forwards the Fleet API",
            "#     routes only, the SuperLink itself stays on 127.0.0.1",
            q(cl.front_cmd(python="python")) + " &",
            _wait_health(cl.root_cert, cl.fleet_address),
        ]
    lines += [
        "",
        "# 4. The connection for the flwr CLI: $FLWR_HOME/config.toml",
        f"mkdir -p {shlex.quote(str(cl.flwr_home))}",
        f"cat > {shlex.quote(str(cl.flwr_home / 'config.toml'))} <<'EOF'",
        cl.connection_toml().rstrip(),
        "EOF",
    ]
    if cl.auth:
        lines += [
            "",
            "# 5. Register each SuperNode's public key and record it in the device",
            "#    registry (key fingerprint -> device, partition, node id)",
            q(
                [
                    "python",
                    "-m",
                    "deploy.devices",
                    "register",
                    "--registry",
                    str(cl.registry),
                    "--connection",
                    CONNECTION,
                    *[spec.arg() for spec in cl.device_specs()],
                ]
            ),
        ]
    lines += ["", "# 6. The SuperNodes (on the edge devices)"]
    lines += [q(cl.supernode_cmd(i)) + " &" for i in range(cl.nodes)]
    lines.append(
        f"sleep 10  # until `flwr supernode ls {CONNECTION}` lists them online"
    )
    lines += [
        "",
        "# 7. Run the app",
        q(
            run_command(
                Path(shown(cl.project_root)), CONNECTION, cl.run_config(run_config)
            )
        ),
    ]
    return "\n".join(lines) + "\n"


def _wait_health(root_cert: Path, address: str) -> str:
    return (
        f"until curl -sf --cacert {shlex.quote(str(root_cert))} "
        f"https://{address}/health >/dev/null; do sleep 1; done"
    )
