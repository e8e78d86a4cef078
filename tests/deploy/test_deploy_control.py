"""The Control API off the fleet's path (issue 27): devices reach the Fleet API only.

Flower 1.41 serves the Fleet, Control and runtime APIs on the SuperLink's one
port, and open-source Flower has no account authentication on the Control API.
``deploy.fleet_front`` is what devices dial instead: it forwards Flower's Fleet
API routes to a SuperLink that listens on 127.0.0.1 and refuses everything else.

The fast tests check the front's allow-list against Flower's own Fleet router.
The slow test starts a TLS + node-auth SuperLink behind the front with two
registered SuperNodes (``deploy.cluster``, ``front=True``) and, as a device
would, points the ``flwr`` CLI at the front: ``flwr supernode register`` of a new
key and ``flwr run`` are both refused there, a Fleet self-registration signed by
a new key is refused by the SuperLink, and the same devices' SuperNodes still
complete a round through the front (~90 s on 2 cores).
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path
from typing import Any

import pytest
from flwr.supercore.error import ApiErrorCode, FlowerError

from deploy import cluster as C
from deploy import fleet_front as F
from deploy.commands import connection_toml
from deploy.node_keys import generate_node_key

NEEDS_FLOWER = pytest.mark.skipif(
    shutil.which("flower-superlink") is None or shutil.which("openssl") is None,
    reason="needs flower-superlink and openssl on PATH",
)
REFUSED = "serves devices the Flower Fleet API only"


def test_the_allow_list_is_flowers_fleet_router():
    from flwr.superlink.routers.fleet.router import router

    fleet = {(m, r.path) for r in router.routes for m in r.methods}  # type: ignore[attr-defined]
    assert fleet == set(F.FLEET_ROUTES), "flwr's Fleet API changed: update FLEET_ROUTES"
    assert all(path.startswith("/v1/fleet/") for _, path in F.FLEET_ROUTES)


@pytest.mark.parametrize(
    "method,path,query,ok",
    [
        ("POST", b"/v1/fleet/pull-messages", b"", True),
        ("GET", b"/health", b"", True),
        ("POST", b"/v1/control/start-run", b"", False),
        ("POST", b"/v1/control/register-node", b"", False),
        ("POST", b"/v1/runtime/pull-messages", b"", False),
        ("GET", b"/docs", b"", False),
        ("GET", b"/v1/fleet/pull-messages", b"", False),  # wrong method
        ("POST", b"/v1/fleet/pull-messages", b"x=1", False),
        ("POST", b"/v1/fleet/../control/start-run", b"", False),
        ("POST", b"/v1/fleet/%70ull-messages", b"", False),
        ("POST", b"/v1/fleet/pull-messages/", b"", False),
    ],
)
def test_only_exact_fleet_routes_pass(method, path, query, ok):
    assert (F.allowed(method, path, query) is not None) == ok


# ---------------------------------------------------------------- slow


def _device_cli(cl: C.Cluster, home: Path) -> dict[str, str]:
    """The environment of a ``flwr`` CLI on a device: its one connection is the
    address its SuperNode dials (the front), with the CA it trusts."""
    home.mkdir(parents=True, exist_ok=True)
    (home / "config.toml").write_text(
        connection_toml(cl.fleet_address, cl.root_cert, "device")
    )
    return cl.env | {"FLWR_HOME": str(home)}


def _flwr(cl: C.Cluster, env: dict[str, str], cmd: list[str]) -> tuple[int, str]:
    import subprocess

    res = subprocess.run(
        cmd, env=env, cwd=cl.workdir, capture_output=True, text=True, timeout=180
    )
    return res.returncode, res.stdout + res.stderr


def _self_register(cl: C.Cluster, key: Path) -> Any:
    """Fleet API self-registration through the front, signed by ``key``: what a
    device could try instead of the Control API. The error, or None."""
    import httpx
    from cryptography.hazmat.primitives.serialization import load_ssh_private_key
    from flwr.proto.fleet_pb2 import RegisterNodeFleetRequest
    from flwr.supercore.primitives.asymmetric import public_key_to_bytes
    from flwr.supernode.fleet_http_client import FleetHttpClient
    from flwr.supernode.node_auth_http_interceptor import NodeAuthHttpInterceptor

    private = load_ssh_private_key(key.read_bytes(), None)
    public = private.public_key()
    client = FleetHttpClient.from_server_address(
        cl.fleet_address,
        False,
        cl.root_cert.read_bytes(),
        [NodeAuthHttpInterceptor(private, public)],  # type: ignore[arg-type]
    )
    with client:
        try:
            client.RegisterNode(
                RegisterNodeFleetRequest(public_key=public_key_to_bytes(public))  # type: ignore[arg-type]
            )
        except httpx.HTTPStatusError as e:
            return e
    return None


@NEEDS_FLOWER
@pytest.mark.slow
@pytest.mark.timeout(480)
def test_a_device_can_neither_register_a_key_nor_start_a_run(tmp_path):
    out = tmp_path / "out"
    with C.start_cluster(tmp_path / "cluster", nodes=2, front=True) as cl:
        # The SuperLink is on loopback; the nodes dial the front
        link = cl.superlink_cmd()
        assert link[link.index("--host") + 1] == "127.0.0.1"
        assert cl.fleet_address != cl.address
        for i in range(2):
            node = cl.supernode_cmd(i)
            assert node[node.index("--superlink") + 1] == cl.fleet_address
        nodes_before = cl.node_list()
        assert [s for _, s in nodes_before] == ["online", "online"]

        # 1. `flwr supernode register` of a new key, from the device: refused
        env = _device_cli(cl, tmp_path / "device-flwr-home")
        new_key = tmp_path / "stolen" / "new-key"
        generate_node_key(new_key)
        rc, text = _flwr(
            cl, env, ["flwr", "supernode", "register", f"{new_key}.pub", "device"]
        )
        assert rc != 0 and REFUSED in text, text

        # 2. `flwr run` from the device: refused, no run exists
        rc, text = _flwr(cl, env, ["flwr", "run", str(cl.project_root), "device"])
        assert rc != 0 and REFUSED in text, text
        assert "Successfully started run" not in text
        runs = cl.cli.call(["flwr", "ls", "deploy", "--format", "json"])
        assert json.loads(runs.stdout[runs.stdout.find("{") :])["runs"] == []

        # 3. Fleet self-registration with a new key: the SuperLink refuses it
        # (--enable-supernode-auth), though the front forwards the route
        err = _self_register(cl, new_key)
        assert err is not None, "Fleet self-registration went through"
        code = FlowerError.from_json(err.response.text)
        assert code is not None, err.response.text
        assert code.code == ApiErrorCode.FLEET_SUPERNODE_REGISTRATION_DISABLED, code

        assert cl.node_list() == nodes_before  # no key was added
        front_log = (cl.logs_dir / "fleet-front.log").read_text()
        assert "refused POST /v1/control/register-node" in front_log
        assert "refused POST /v1/control/start-run" in front_log

        # 4. The same devices still complete a round through the front
        run = cl.run_app(
            f'method="local" max-examples-per-client=120 local-epochs=1 '
            f"global-test-per-class=20 "
            f'collect-quiet-s=0.0 target-clients=2 output-dir="{out}"',
            timeout=300,
        )
        assert run.ok, f"status {run.status}:\n{run.stdout[-3000:]}"
        res = json.loads(next(out.rglob("results.json")).read_text())
        ids = sorted(n for n, _ in nodes_before)
        assert res["fleet"]["valid"] == ids and res["num_clients"] == 2
        assert sorted(c["partition_id"] for c in res["clients"]) == [0, 1]
