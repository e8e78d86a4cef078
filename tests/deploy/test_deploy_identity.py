"""Identity bound to the node's key, through a real deployment (issue 27).

A TLS + node-auth SuperLink (``deploy.cluster``) with three registered
SuperNodes: registering them wrote the device registry (``devices.json``: key
fingerprint -> device, partition, node id) and every run gets
``device-registry``. Node 2 is registered as partition 2 but started with a node
config that claims partition 0, node 0's. The round takes each upload's identity
from the authenticated node it came from (Flower's ``src_node_id``, bound to the
registered key), so node 2 is rejected with the reason and node 0's upload is
used; without a registry both claims of partition 0 would have been rejected
(``tests/round/test_identity.py`` checks that, and the rest, in process). ~100 s on 2
cores.
"""

from __future__ import annotations

import json
import shutil

import pytest

from deploy import cluster as C
from server_app.identity import DeviceRegistry, fingerprint

NEEDS_FLOWER = pytest.mark.skipif(
    shutil.which("flower-superlink") is None or shutil.which("openssl") is None,
    reason="needs flower-superlink and openssl on PATH",
)


@NEEDS_FLOWER
@pytest.mark.slow
@pytest.mark.timeout(480)
def test_a_node_claiming_another_devices_identity_is_rejected(tmp_path):
    out = tmp_path / "out"
    cl = C.Cluster(tmp_path / "cluster", 3, env={"OMP_NUM_THREADS": "1"})
    try:
        # 1. Three keys registered (node-i as partition i); nodes 0 and 1 online
        cl.start(online=2)
        ids = [n for n, _ in cl.node_list()]  # registration order: ids[i] is node-i
        registry = DeviceRegistry.load(cl.registry)
        assert [(d.device, d.node_id, d.partition_id) for d in registry.devices] == [
            ("node-0", ids[0], 0),
            ("node-1", ids[1], 1),
            ("node-2", ids[2], 2),
        ]
        pub = cl.node_key(2).with_suffix(".pub").read_bytes()
        assert registry.by_node[ids[2]].fingerprint == fingerprint(pub)

        # 2. Node 2, with its own registered key, claims node 0's partition
        cl.start_node(2, node_config="partition-id=0 num-partitions=3")
        run = cl.run_app(
            'method="local" max-examples-per-client=120 local-epochs=1 '
            "global-test-per-class=20 collect-quiet-s=5.0 min-clients=2 "
            f'output-dir="{out}"',
            timeout=300,
        )
        assert run.ok, f"status {run.status}:\n{run.stdout[-3000:]}"
        assert f'device-registry="{cl.registry}"' in " ".join(run.args)
    finally:
        cl.stop()
    assert not cl._procs

    # 3. Node 2 rejected with the reason; node 0's upload used as partition 0
    res = json.loads(next(out.rglob("results.json")).read_text())
    fleet = res["fleet"]
    assert fleet["asked"] == sorted(ids)
    assert fleet["rejected"] == [ids[2]], fleet
    assert fleet["valid"] == sorted(ids[:2]), fleet
    [rej] = res["rejected"]
    assert rej["node_id"] == ids[2] and rej["partition_id"] == 2
    assert "registered as device 'node-2'" in rej["reason"], rej
    assert "claims partition-id 0 of 3" in rej["reason"], rej
    clients = {c["node_id"]: c for c in res["clients"]}
    assert clients[ids[0]]["partition_id"] == 0
    assert clients[ids[0]]["num_examples"] > 0 and clients[ids[0]]["upload_bytes"] > 0
    assert clients[ids[2]]["status"].startswith("excluded: node")
    assert res["num_clients"] == 2
