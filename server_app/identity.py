"""Who a device is: the registry of device keys, and the check of what it claims.

With SuperNode authentication every node proves, on every Fleet API call, that
it holds the private key whose public key was registered (``flwr supernode
register``). Flower binds the node id to that key and stamps each reply with it
(``message.metadata.src_node_id``), so the node a reply came from is the one
thing about it a device cannot forge. What the upload says (its
``partition-id``, copied by the ClientApp from the node's own ``--node-config``)
is the device's word only.

The deploy tooling records, per registered key, the device's name and, where a
benchmark split is used, its partition: a registry file (``devices.json``), named
to the round by the run-config key ``device-registry``. The round then maps the
node a reply came from to its registered device and checks the upload's claims
against it (:meth:`DeviceRegistry.check`): a claim that disagrees is rejected
for that node alone, so a node claiming another device's partition cannot push
the honest device out of the round. Without a registry (simulation) a node's
partition is what its node config says, as before.

The file (``write_registry`` writes it; keys kebab-case like the run config)::

    {"format": "oneshot-device-registry/1",
     "devices": [
       {"device": "node-0", "fingerprint": "SHA256:7Ju0...", "node-id": 4391...,
        "partition-id": 0, "num-partitions": 3},
       {"device": "cam-7", "fingerprint": "SHA256:Qx1b...", "node-id": 8812...}]}

``fingerprint`` is OpenSSH's (``ssh-keygen -lf node-key.pub`` prints it);
``node-id`` is what ``flwr supernode register`` answered for that key. A device
without ``partition-id`` holds its own data (node config ``data-path``). Where
the SuperLink still lists a node when the round screens the uploads, the round
also checks that the node's registered key has the registry's fingerprint (a
registry left over from an earlier registration is caught).
"""

from __future__ import annotations

import base64
import hashlib
import json
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from common import contract as C
from common.contract import PayloadError, Reply

FORMAT = "oneshot-device-registry/1"


class RegistryError(ValueError):
    """The registry file cannot be used; the message names it and the fix."""


def fingerprint(public_key: bytes | str) -> str:
    """OpenSSH's SHA-256 fingerprint (``SHA256:<base64>``) of a public key.

    ``public_key``: one OpenSSH line (``ecdsa-sha2-nistp384 AAAA...``, a ``.pub``
    file) or PEM (how the SuperLink stores a registered key). Both forms of one
    key give the same fingerprint, the one ``ssh-keygen -lf`` prints.
    """
    from cryptography.hazmat.primitives import serialization

    data = public_key.encode() if isinstance(public_key, str) else bytes(public_key)
    if data.lstrip().startswith(b"-----BEGIN"):
        key: Any = serialization.load_pem_public_key(data)
    else:
        key = serialization.load_ssh_public_key(data.strip())
    line = key.public_bytes(
        serialization.Encoding.OpenSSH, serialization.PublicFormat.OpenSSH
    )
    blob = base64.b64decode(line.split()[1])
    digest = base64.b64encode(hashlib.sha256(blob).digest()).decode()
    return "SHA256:" + digest.rstrip("=")


@dataclass(frozen=True)
class RegisteredDevice:
    """One registered key: the device it belongs to and, if any, its partition."""

    device: str
    fingerprint: str
    node_id: int | None = None
    partition_id: int | None = None
    num_partitions: int | None = None

    def to_json(self) -> dict[str, Any]:
        entry: dict[str, Any] = {"device": self.device, "fingerprint": self.fingerprint}
        if self.node_id is not None:
            entry["node-id"] = self.node_id
        if self.partition_id is not None:
            entry["partition-id"] = self.partition_id
            entry["num-partitions"] = self.num_partitions
        return entry

    def describe(self) -> str:
        where = (
            f"partition-id {self.partition_id} of {self.num_partitions}"
            if self.partition_id is not None
            else "its own data (no partition)"
        )
        return f"device {self.device!r} (key {self.fingerprint}) with {where}"


def _entry(raw: Any, i: int) -> RegisteredDevice:
    if not isinstance(raw, dict):
        raise ValueError(f"devices[{i}] is not an object")
    unknown = set(raw) - {
        "device",
        "fingerprint",
        "node-id",
        "partition-id",
        "num-partitions",
    }
    if unknown:
        raise ValueError(f"devices[{i}] has unknown keys {sorted(unknown)}")
    device, fp = raw.get("device"), raw.get("fingerprint")
    if not isinstance(device, str) or not device:
        raise ValueError(f"devices[{i}].device={device!r} is not a non-empty string")
    if not isinstance(fp, str) or not fp.startswith("SHA256:"):
        raise ValueError(
            f"devices[{i}].fingerprint={fp!r} is not an OpenSSH SHA256 fingerprint "
            "(`ssh-keygen -lf <key>.pub`)"
        )
    ints = {}
    for key in ("node-id", "partition-id", "num-partitions"):
        v = raw.get(key)
        if v is not None and (not isinstance(v, int) or isinstance(v, bool) or v < 0):
            raise ValueError(f"devices[{i}].{key}={v!r} is not an integer >= 0")
        ints[key] = v
    pid, num = ints["partition-id"], ints["num-partitions"]
    if (pid is None) != (num is None) or (
        pid is not None and num is not None and not pid < num
    ):
        raise ValueError(
            f"devices[{i}]: partition-id={pid!r}, num-partitions={num!r}: give both, "
            "with 0 <= partition-id < num-partitions, or neither (own data)"
        )
    return RegisteredDevice(device, fp, ints["node-id"], pid, num)


def _unique(devices: list[RegisteredDevice], what: str, values: list[Any]) -> None:
    seen: dict[Any, str] = {}
    for d, v in zip(devices, values, strict=True):
        if v is None:
            continue
        if v in seen:
            raise ValueError(
                f"{what} {v!r} is registered twice ({seen[v]!r}, {d.device!r})"
            )
        seen[v] = d.device


class DeviceRegistry:
    """The registered devices, by node id and by key fingerprint."""

    def __init__(self, devices: Iterable[RegisteredDevice], source: str = "") -> None:
        self.devices = list(devices)
        self.source = source
        _unique(self.devices, "device", [d.device for d in self.devices])
        _unique(self.devices, "fingerprint", [d.fingerprint for d in self.devices])
        _unique(self.devices, "node-id", [d.node_id for d in self.devices])
        _unique(
            self.devices,
            "partition-id",
            [d.partition_id for d in self.devices],
        )
        self.by_node = {d.node_id: d for d in self.devices if d.node_id is not None}
        self.by_fingerprint = {d.fingerprint: d for d in self.devices}

    @classmethod
    def load(cls, path: str | Path) -> DeviceRegistry:
        """Read and validate a registry file; ``RegistryError`` names what is wrong."""
        fix = (
            "write it with the deploy tooling (`python -m deploy.cluster` writes "
            "<workdir>/devices.json when it registers the nodes) or fix the entry"
        )
        try:
            raw = json.loads(Path(path).read_text())
            if not isinstance(raw, dict) or raw.get("format") != FORMAT:
                raise ValueError(f"not a device registry (format is not {FORMAT!r})")
            if not isinstance(raw.get("devices"), list):
                raise ValueError("'devices' is not a list")
            return cls([_entry(e, i) for i, e in enumerate(raw["devices"])], str(path))
        except (OSError, ValueError) as e:
            raise RegistryError(f"device-registry={str(path)!r}: {e}; {fix}") from None

    def identify(
        self, node_id: int, key_fingerprint: str | None = None
    ) -> RegisteredDevice:
        """The device registered for ``node_id``, or ``PayloadError`` with the reason.

        ``key_fingerprint``: the fingerprint of the key the SuperLink holds for the
        node, where it is known; it must be the registry's.
        """
        dev = self.by_node.get(node_id)
        if dev is None and key_fingerprint is not None:
            dev = self.by_fingerprint.get(key_fingerprint)
        if dev is None:
            raise PayloadError(
                f"node {node_id} (key {key_fingerprint or 'not listed'}) is not in "
                f"the device registry {self.source}: register the device's key with "
                "the deploy tooling"
            )
        if key_fingerprint is not None and key_fingerprint != dev.fingerprint:
            raise PayloadError(
                f"node {node_id} is registered with key {key_fingerprint}, but the "
                f"device registry lists {dev.describe()} for it: the registry is "
                "stale; register the nodes again"
            )
        return dev

    def check(self, r: Reply, key_fingerprint: str | None = None) -> RegisteredDevice:
        """The registered device of reply ``r``'s node, if the upload agrees with it.

        Raises ``PayloadError`` when the node is not registered, or when the
        upload claims a partition (or none) other than its device's.
        """
        dev = self.identify(r.node_id, key_fingerprint)
        claimed_pid = None if r.partition_id == C.NO_PARTITION else r.partition_id
        claimed_num = r.meta.get("num-partitions") if claimed_pid is not None else None
        if claimed_pid != dev.partition_id or (
            claimed_pid is not None and claimed_num != dev.num_partitions
        ):
            claim = (
                f"partition-id {claimed_pid} of {C.safe_text(claimed_num, 20)}"
                if claimed_pid is not None
                else "no partition (own data)"
            )
            raise PayloadError(
                f"node {r.node_id} is registered as {dev.describe()}, but its upload "
                f"claims {claim}: an identity comes from the node's key, not from "
                "its payload or node config"
            )
        return dev


def write_registry(path: str | Path, devices: Iterable[RegisteredDevice]) -> Path:
    """Write ``devices`` as a registry file (validated as the round will read it)."""
    registry = DeviceRegistry(devices, str(path))
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    body = {"format": FORMAT, "devices": [d.to_json() for d in registry.devices]}
    path.write_text(json.dumps(body, indent=2) + "\n")
    return path


def node_fingerprints(grid: Any) -> dict[int, str]:
    """``{node id: key fingerprint}`` of the nodes the SuperLink lists now.

    From ``Grid.get_nodes()`` (Flower's ``NodeInfo.public_key``, PEM); nodes
    without a key, or a Grid that lists none, give nothing (the round then
    relies on the registered node ids alone).
    """
    out: dict[int, str] = {}
    for info in grid.get_nodes() or []:
        key = bytes(getattr(info, "public_key", b"") or b"")
        if not key:
            continue
        try:
            out[int(info.node_id)] = fingerprint(key)
        except Exception:  # a key we cannot read: no cross-check for that node
            continue
    return out
