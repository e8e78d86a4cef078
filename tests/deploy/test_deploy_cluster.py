"""The deployment helpers, and one real deployment: SuperLink + 3 SuperNodes, TLS + auth.

The fast tests check what ``deploy.cluster`` would run and the file formats it
writes, against Flower's own loaders. The slow tests start real
``flower-superlink`` / ``flower-supernode`` processes on 127.0.0.1 (one cluster
for the module, ~20 s to start on 2 cores), check that an unregistered node is
refused, and run the app end to end (~60 s).
"""

from __future__ import annotations

import json
import os
import shutil
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
import tomllib

from deploy import cluster as C
from deploy import procs as P
from deploy.node_keys import generate_node_key

NEEDS_FLOWER = pytest.mark.skipif(
    shutil.which("flower-superlink") is None or shutil.which("openssl") is None,
    reason="needs flower-superlink and openssl on PATH",
)

# ---------------------------------------------------------------- fast


def test_node_key_is_read_by_flower(tmp_path):
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.hazmat.primitives.serialization import load_ssh_private_key
    from flwr.cli.supernode.register import try_load_public_key

    pub = generate_node_key(tmp_path / "node-0")
    assert pub == tmp_path / "node-0.pub"
    assert pub.read_text().startswith("ecdsa-sha2-nistp384 ")
    assert (tmp_path / "node-0").stat().st_mode & 0o777 == 0o600
    # What flower-supernode --auth-supernode-private-key and flwr supernode
    # register do with the two files.
    key = load_ssh_private_key((tmp_path / "node-0").read_bytes(), None)
    assert isinstance(key, ec.EllipticCurvePrivateKey) and key.curve.name == "secp384r1"
    assert try_load_public_key(pub)
    with pytest.raises(FileExistsError, match="overwrite"):
        generate_node_key(tmp_path / "node-0")


def test_commands_carry_tls_auth_and_partitions(tmp_path):
    cl = C.Cluster(tmp_path, 3, port=9100)
    link = cl.superlink_cmd()
    assert link[0] == "flower-superlink" and "--insecure" not in link
    assert "--enable-supernode-auth" in link
    assert link[link.index("--port") + 1] == "9100"
    assert link[link.index("--ssl-certfile") + 1] == str(tmp_path / "certs/server.pem")
    node = cl.supernode_cmd(2)
    assert node[node.index("--superlink") + 1] == "127.0.0.1:9100"
    assert node[node.index("--node-config") + 1] == "partition-id=2 num-partitions=3"
    assert node[node.index("--auth-supernode-private-key") + 1] == str(
        tmp_path / "keys/node-2"
    )
    assert node[node.index("--port") + 1] == "9103"  # runtime API: port + 1 + i
    assert "--grpc-rere" not in node

    text = cl.commands_text('method="local"')
    for cmd in (link, cl.supernode_cmd(0)):
        assert " ".join(cmd[:3]) in text
    # keys registered and recorded in the device registry; runs read it
    assert (
        f"python -m deploy.devices register --registry {tmp_path}/devices.json "
        f"--connection deploy node-0={tmp_path}/keys/node-0.pub@0/3" in text
    )
    assert "flwr run" in text and '--run-config \'method="local" ' in text
    assert f'device-registry="{tmp_path}/devices.json"' in text
    assert "fleet_front" not in text


def test_front_commands_keep_the_superlink_on_loopback(tmp_path):
    cl = C.Cluster(tmp_path, 2, port=9100, front=True)
    link = cl.superlink_cmd()
    assert link[link.index("--host") + 1] == "127.0.0.1"
    assert link[link.index("--port") + 1] == "9099"  # the port below the front's
    front = cl.front_cmd()
    assert front[1:3] == ["-m", "deploy.fleet_front"]
    assert front[front.index("--listen") + 1] == "127.0.0.1:9100"
    assert front[front.index("--upstream") + 1] == "127.0.0.1:9099"
    node = cl.supernode_cmd(1)
    assert node[node.index("--superlink") + 1] == "127.0.0.1:9100"  # the front
    assert cl.address == "127.0.0.1:9099"  # the operator's flwr CLI: the SuperLink
    assert 'address = "127.0.0.1:9099"' in cl.connection_toml()
    text = cl.commands_text()
    assert "python -m deploy.fleet_front --listen 127.0.0.1:9100" in text
    with pytest.raises(ValueError, match="transport='rest'"):
        C.Cluster(tmp_path, 2, front=True, transport="grpc-rere")
    # the registry names each node's partition, or none for its own data
    cl = C.Cluster(tmp_path, 2, node_configs={1: 'data-path="/d"'})
    specs = cl.device_specs()
    assert [(s.name, s.partition_id, s.num_partitions) for s in specs] == [
        ("node-0", 0, 2),
        ("node-1", None, None),
    ]
    assert C.Cluster(tmp_path, 2, auth=False).run_config("x=1") == (
        f'x=1 output-dir="{tmp_path / "outputs"}"'
    )


def test_readme_quotes_print_commands(monkeypatch):
    """deploy/README.md shows --print-commands' output verbatim: docs match code."""
    root = Path(C.__file__).resolve().parents[1]
    monkeypatch.chdir(root)  # the README's command is run from the repository root
    cl = C.Cluster("/srv/flower", 3, port=9093, front=True)
    text = cl.commands_text('method="oscar" output-dir="/srv/flower/outputs"')
    assert text in (root / "deploy" / "README.md").read_text(), (
        "deploy/README.md is out of date: paste the output of `python -m "
        "deploy.cluster --nodes 3 --workdir /srv/flower --port 9093 --front "
        '--run-config \'method="oscar" output-dir="/srv/flower/outputs"\' '
        "--print-commands`"
    )


def test_no_auth_and_grpc_rere_commands(tmp_path):
    cl = C.Cluster(tmp_path, 2, auth=False, transport="grpc-rere", port=9200)
    link = cl.superlink_cmd()
    assert "--enable-supernode-auth" not in link
    assert link[link.index("--fleet-api-address") + 1] == "127.0.0.1:9203"
    assert cl.superlink_env() == {"FLWR_INTERNAL_GRPC_FLEET_API": "1"}
    node = cl.supernode_cmd(0)
    assert node[1] == "--grpc-rere" and "--auth-supernode-private-key" not in node
    assert node[node.index("--superlink") + 1] == "127.0.0.1:9203"
    with pytest.raises(ValueError, match="flwr <= 1.39"):
        C.check_supernode_transport("grpc-rere", "flower-supernode")
    with pytest.raises(ValueError, match="transport"):
        C.Cluster(tmp_path, 2, transport="grpc")


def test_connection_toml_is_what_the_flwr_cli_reads(tmp_path, monkeypatch):
    from flwr.cli.flower_config import read_superlink_connection

    ca = tmp_path / "certs" / "ca.crt"
    (tmp_path / "config.toml").write_text(C.connection_toml("127.0.0.1:9100", ca))
    assert (
        tomllib.loads((tmp_path / "config.toml").read_text())["superlink"]["default"]
        == "deploy"
    )
    monkeypatch.setenv("FLWR_HOME", str(tmp_path))
    conn = read_superlink_connection("deploy")
    assert conn.address == "127.0.0.1:9100"
    assert conn.root_certificates == str(ca) and conn.insecure is False


@pytest.mark.skipif(shutil.which("openssl") is None, reason="needs openssl")
def test_certs_have_loopback_and_extra_names(tmp_path):
    subprocess.run(
        ["bash", str(C.CERTS_SH), str(tmp_path), "fl.example.org"],
        check=True,
        capture_output=True,
    )
    text = subprocess.run(
        ["openssl", "x509", "-in", str(tmp_path / "server.pem"), "-noout", "-text"],
        check=True,
        capture_output=True,
        text=True,
    ).stdout
    assert "IP Address:127.0.0.1" in text and "DNS:fl.example.org" in text
    verify = subprocess.run(
        [
            "openssl",
            "verify",
            "-CAfile",
            str(tmp_path / "ca.crt"),
            str(tmp_path / "server.pem"),
        ],
        capture_output=True,
        text=True,
    )
    assert verify.returncode == 0, verify.stderr


# ---------------------------------------------------------------- deploy.procs


def _gone(pid: int) -> bool:
    import psutil

    try:
        return psutil.Process(pid).status() == psutil.STATUS_ZOMBIE
    except psutil.NoSuchProcess:
        return True


def test_log_tail_and_check_running(tmp_path):
    log = tmp_path / "x.log"
    log.write_text("".join(f"line {i}\n" for i in range(30)))
    assert P.log_tail(log, 2) == "line 28\nline 29"
    assert len(P.log_tail(log).splitlines()) == 20
    assert P.log_tail(tmp_path / "missing.log") == ""
    done = subprocess.Popen(["true"])
    done.wait()
    with pytest.raises(RuntimeError, match=r"(?s)true exited with 0; .*\nline 29"):
        P.check_running("true", done, log)


def test_ports_and_wait_until():
    port = P.free_port()
    assert not P.port_open(P.HOST, port) and not P.http_ok(f"http://{P.HOST}:{port}/")
    with socket.create_server((P.HOST, 0)) as srv:
        assert P.port_open(P.HOST, srv.getsockname()[1])
    calls = []
    assert P.wait_until(lambda: calls.append(1) or len(calls) == 3, 10, 0.01)
    assert len(calls) == 3
    assert not P.wait_until(lambda: False, 0.05, 0.01)


def test_start_copied_keeps_every_line(tmp_path):
    lines: list[str] = []
    with open(tmp_path / "x.log", "w") as log:
        proc, reader = P.start_copied(
            ["printf", "a\\nb c\\n"], log, env=os.environ, cwd=tmp_path, lines=lines
        )
        assert proc.wait(timeout=10) == 0
        reader.join(timeout=10)
    assert lines == ["a\n", "b c\n"]
    assert (tmp_path / "x.log").read_text() == "$ printf 'a\\nb c\\n'\na\nb c\n"


def test_terminate_stops_the_group_and_a_child_in_its_own_session(tmp_path):
    # Like a SuperNode: one helper in its process group, one (SuperExec) not.
    code = (
        "import subprocess, time\n"
        "a = subprocess.Popen(['sleep', '60'])\n"
        "b = subprocess.Popen(['sleep', '60'], start_new_session=True)\n"
        "print(a.pid, b.pid, flush=True)\n"
        "time.sleep(60)\n"
    )

    def helpers() -> list[int]:
        last = P.log_tail(tmp_path / "p.log", 1).split()
        return [int(x) for x in last] if all(x.isdigit() for x in last) else []

    with open(tmp_path / "p.log", "w") as log:
        proc = P.spawn([sys.executable, "-c", code], log, env=os.environ, cwd=tmp_path)
        assert P.wait_until(lambda: len(helpers()) == 2, 10, 0.05)
        P.terminate([proc], timeout_s=5)
    assert proc.returncode is not None
    assert all(_gone(pid) for pid in helpers())


def test_find_and_stop_processes():
    mark = "61.2345"  # an argument no other process has
    proc = subprocess.Popen(["sleep", mark])
    # under load the new process can be missing from one scan of /proc: look
    # again for up to 5 s (seen once in a fresh-clone CI)
    deadline = time.monotonic() + 5
    while not (found := P.find_processes(lambda cmd: cmd == ["sleep", mark])):
        if time.monotonic() > deadline:
            break
        time.sleep(0.1)
    assert [p.pid for p in found] == [proc.pid]
    P.stop_processes(found, timeout_s=5)
    assert proc.wait(timeout=5) is not None and not P.find_processes(
        lambda cmd: cmd == ["sleep", mark]
    )


def test_start_stop_stops_also_on_errors():
    calls = []

    class Thing(P.StartStop):
        def start(self) -> None:
            calls.append("start")

        def stop(self) -> None:
            calls.append("stop")

    with pytest.raises(ValueError), Thing() as thing:
        assert isinstance(thing, Thing)
        raise ValueError
    assert calls == ["start", "stop"]


# ---------------------------------------------------------------- slow: real processes


# The tests on the module's cluster run on one xdist worker (``--dist
# loadgroup``), so the cluster is started once, not once per worker.
ON_THE_CLUSTER = pytest.mark.xdist_group("deploy-cluster")


@pytest.fixture(scope="module")
def cluster(tmp_path_factory):
    """SuperLink (TLS, --enable-supernode-auth) + 3 registered SuperNodes."""
    if shutil.which("flower-superlink") is None or shutil.which("openssl") is None:
        pytest.skip("needs flower-superlink and openssl on PATH")
    with C.start_cluster(tmp_path_factory.mktemp("cluster"), nodes=3) as cl:
        yield cl
    # Every process the cluster started is gone.
    assert not cl._procs


@ON_THE_CLUSTER
@NEEDS_FLOWER
@pytest.mark.slow
@pytest.mark.timeout(240)
def test_registered_nodes_online_and_unregistered_node_refused(cluster):
    assert cluster.node_statuses().count("online") == 3
    link_log = (cluster.logs_dir / "superlink.log").read_text()
    assert "Uvicorn running on https://127.0.0.1" in link_log  # TLS

    refused = cluster.start_unregistered_node(timeout=90)
    # Flower logs its own code 305 (SUPERNODE_CONNECTION_ERROR); the process exits 1.
    assert refused.returncode == 1, refused.log[-2000:]
    assert refused.flower_exit_code == 305
    assert "Failed to activate SuperNode" in refused.log
    assert refused.refused
    assert cluster.node_statuses().count("online") == 3  # the others are unaffected


@ON_THE_CLUSTER
@NEEDS_FLOWER
@pytest.mark.slow
@pytest.mark.timeout(400)
def test_app_runs_end_to_end_on_the_deployment(cluster, tmp_path):
    out = tmp_path / "out"
    run = cluster.run_app(
        f'method="local" max-examples-per-client=200 global-test-per-class=20 '
        f'output-dir="{out}"',
        timeout=300,
    )
    assert run.ok, (
        f"status {run.status}, flwr exit {run.returncode}:\n{run.stdout[-3000:]}"
    )
    found = list(out.rglob("results.json"))
    assert len(found) == 1, f"no results.json under {out}:\n{run.stdout[-3000:]}"
    results = json.loads(found[0].read_text())
    assert results["method"] == "local" and results["num_clients"] == 3
    # One partition per SuperNode, as its --node-config says.
    assert sorted(c["partition_id"] for c in results["clients"]) == [0, 1, 2]
    assert Path(run.log_path).is_file()
