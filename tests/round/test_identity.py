"""A device is who its registered key says (issue 27): the device registry and the
round's screening by it, in process (``deploy.inprocess``: the real round and the
real ClientApp over devices whose node configs can lie).

The end-to-end check through a real TLS + node-auth SuperLink is
``tests/deploy/test_deploy_identity.py``.
"""

from __future__ import annotations

import base64
import hashlib
import json
import shutil
import subprocess
from pathlib import Path

import pytest
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec

from deploy.devices import DeviceSpec, register_devices, specs_for
from deploy.inprocess import FIRST_NODE_ID, Device, run_round
from server_app.identity import (
    DeviceRegistry,
    RegisteredDevice,
    RegistryError,
    fingerprint,
    write_registry,
)


def _key() -> tuple[bytes, str]:
    """A P-384 public key as PEM (how the SuperLink stores it) and its fingerprint."""
    pub = ec.generate_private_key(ec.SECP384R1()).public_key()
    pem = pub.public_bytes(
        serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo
    )
    return pem, fingerprint(pem)


def _fleet(n: int) -> tuple[list[Device], list[RegisteredDevice]]:
    """``n`` devices on partitions 0..n-1, each with a key, and their registry."""
    devices, registered = [], []
    for p in range(n):
        pem, fp = _key()
        node = FIRST_NODE_ID + p
        devices.append(
            Device(node, {"partition-id": p, "num-partitions": n}, public_key=pem)
        )
        registered.append(RegisteredDevice(f"dev-{p}", fp, node, p, n))
    return devices, registered


def _config(fast_config: dict, tmp_path: Path, registered: list | None) -> dict:
    rc = fast_config | {"method": "oscar", "collect-quiet-s": 0.0}
    rc |= {"collect-window-s": 30.0, "min-clients": 2}
    if registered is not None:
        rc["device-registry"] = str(
            write_registry(tmp_path / "devices.json", registered)
        )
    return rc


# ---------------------------------------------------------------- the registry


def test_fingerprint_is_openssh_and_the_same_for_both_key_forms(tmp_path):
    key = ec.generate_private_key(ec.SECP384R1()).public_key()
    line = key.public_bytes(
        serialization.Encoding.OpenSSH, serialization.PublicFormat.OpenSSH
    )
    pem = key.public_bytes(
        serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo
    )
    blob = base64.b64decode(line.split()[1])
    want = "SHA256:" + base64.b64encode(hashlib.sha256(blob).digest()).decode().rstrip(
        "="
    )
    assert fingerprint(line) == fingerprint(pem) == want
    if shutil.which("ssh-keygen"):  # what an operator sees
        (tmp_path / "k.pub").write_bytes(line + b"\n")
        out = subprocess.run(
            ["ssh-keygen", "-lf", str(tmp_path / "k.pub")],
            capture_output=True,
            text=True,
            check=True,
        ).stdout
        assert want in out


def test_registry_round_trip_and_refusals(tmp_path):
    _, fp0 = _key()
    _, fp1 = _key()
    devs = [
        RegisteredDevice("a", fp0, 7, 0, 2),
        RegisteredDevice("cam", fp1, 9),  # own data
    ]
    path = write_registry(tmp_path / "devices.json", devs)
    reg = DeviceRegistry.load(path)
    assert reg.devices == devs and reg.by_node[9].partition_id is None
    assert reg.by_fingerprint[fp0].device == "a"

    def bad(body: object, needle: str) -> None:
        p = tmp_path / "bad.json"
        p.write_text(json.dumps(body))
        with pytest.raises(RegistryError, match=needle) as e:
            DeviceRegistry.load(p)
        assert str(p) in str(e.value) and "deploy.cluster" in str(e.value)

    ok = json.loads(path.read_text())
    bad({"devices": []}, "format")
    twice = ok | {"devices": [ok["devices"][0], ok["devices"][0] | {"device": "b"}]}
    bad(twice, "registered twice")
    same_part = dict(ok["devices"][1]) | {"partition-id": 0, "num-partitions": 2}
    bad(
        ok | {"devices": [ok["devices"][0], same_part]},
        "partition-id 0 is registered twice",
    )
    bad(ok | {"devices": [ok["devices"][0] | {"partition-id": 2}]}, "partition-id=2")
    bad(ok | {"devices": [ok["devices"][0] | {"fingerprint": "MD5:x"}]}, "fingerprint")
    with pytest.raises(RegistryError, match="No such file"):
        DeviceRegistry.load(tmp_path / "missing.json")


def test_register_devices_records_node_ids_and_specs_parse(tmp_path):
    keys = []
    for i in range(2):
        pem, _ = _key()
        pub = serialization.load_pem_public_key(pem).public_bytes(
            serialization.Encoding.OpenSSH, serialization.PublicFormat.OpenSSH
        )
        keys.append(tmp_path / f"k{i}.pub")
        keys[-1].write_bytes(pub + b"\n")
    specs = specs_for(
        ["n0", "n1"], keys, ["partition-id=1 num-partitions=2", 'data-path="/d"']
    )
    assert specs == [DeviceSpec("n0", keys[0], 1, 2), DeviceSpec("n1", keys[1])]
    assert DeviceSpec.parse(specs[0].arg()) == specs[0]
    assert DeviceSpec.parse(specs[1].arg()) == specs[1]
    with pytest.raises(ValueError, match="NAME=KEY.pub"):
        DeviceSpec.parse("n0")

    calls = []

    def fake_flwr(cmd: list[str]) -> subprocess.CompletedProcess:
        calls.append(cmd)
        out = json.dumps({"success": True, "node-id": 1000 + len(calls)})
        return subprocess.CompletedProcess(cmd, 0, "✅ registered\n" + out, "")

    got = register_devices(specs, tmp_path / "devices.json", "prod", run=fake_flwr)
    assert calls[0][:5] == ["flwr", "supernode", "register", str(keys[0]), "prod"]
    assert calls[0][5:] == ["--format", "json"]
    reg = DeviceRegistry.load(tmp_path / "devices.json")
    assert [(d.device, d.node_id, d.partition_id) for d in reg.devices] == [
        ("n0", 1001, 1),
        ("n1", 1002, None),
    ]
    assert got[0].fingerprint == fingerprint(keys[0].read_bytes())

    def refused(cmd: list[str]) -> subprocess.CompletedProcess:
        return subprocess.CompletedProcess(cmd, 1, "", "Public key already in use")

    with pytest.raises(RuntimeError, match="already in use"):
        register_devices(specs[:1], tmp_path / "devices.json", run=refused)


# ---------------------------------------------------------------- the round


def test_a_node_claiming_another_devices_partition_is_rejected_alone(
    tiny_stack, fast_config, tmp_path
):
    """Node 103 is registered as partition 2 but its node config says 0: it is
    rejected with the reason, and node 101 (partition 0) keeps its upload."""
    devices, registered = _fleet(3)
    devices[2].node_config = {"partition-id": 0, "num-partitions": 3}
    res, _ = run_round(devices, _config(fast_config, tmp_path, registered))
    assert res["fleet"]["valid"] == [101, 102] and res["fleet"]["rejected"] == [103]
    [rej] = res["rejected"]
    assert rej["node_id"] == 103 and rej["partition_id"] == 2  # its registered id
    assert "registered as device 'dev-2'" in rej["reason"]
    assert "claims partition-id 0 of 3" in rej["reason"]
    by_node = {c["node_id"]: c for c in res["clients"]}
    assert by_node[101]["partition_id"] == 0 and by_node[101]["status"] == "ok"
    assert by_node[103]["status"].startswith("excluded: node 103 is registered")


def test_without_a_registry_both_claims_are_rejected_as_before(
    tiny_stack, fast_config, tmp_path
):
    devices, _ = _fleet(3)
    devices[2].node_config = {"partition-id": 0, "num-partitions": 3}
    rc = _config(fast_config, tmp_path, None) | {"min-clients": 1}
    res, _ = run_round(devices, rc)
    assert res["fleet"]["valid"] == [102] and res["fleet"]["rejected"] == [101, 103]
    assert sorted(r["node_id"] for r in res["rejected"]) == [101, 103]
    assert all("claimed by nodes [101, 103]" in r["reason"] for r in res["rejected"])


def test_unregistered_stale_and_own_data_devices(tiny_stack, fast_config, tmp_path):
    """Node 104 is not in the registry; node 103's key is not the registered one
    (a stale registry); node 105 holds its own data, registered without a
    partition, and is kept with a client id after the accepted partitions."""
    from tiny_stack import make_image_folder

    devices, registered = _fleet(3)
    devices[2].public_key = _key()[0]  # re-keyed since the registry was written
    devices.append(Device(104, {"partition-id": 1, "num-partitions": 3}))
    shared = make_image_folder(tmp_path / "shared", 20)
    own = make_image_folder(tmp_path / "own", 8)
    pem, fp = _key()
    devices.append(Device(105, {"data-path": str(own)}, public_key=pem))
    registered.append(RegisteredDevice("cam", fp, 105))
    rc = _config(fast_config, tmp_path, registered) | {"dataset": str(shared)}
    rc |= {"partition": "iid"}
    res, _ = run_round(devices, rc)
    reasons = {r["node_id"]: r["reason"] for r in res["rejected"]}
    assert sorted(reasons) == [103, 104], reasons
    assert "not in the device registry" in reasons[104]
    assert "the registry is stale" in reasons[103]
    assert res["fleet"]["valid"] == [101, 102, 105]
    by_node = {c["node_id"]: c for c in res["clients"]}
    # its client id comes after the accepted partitions (0 and 1)
    assert by_node[105]["partition_id"] == 2
