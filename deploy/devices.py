"""Register devices' keys with the SuperLink and keep the device registry.

With ``--enable-supernode-auth`` a SuperNode joins only with a key the operator
registered (``flwr supernode register <key>.pub <connection>``, which answers
the node id Flower binds to that key). This runs that command for each device
and records, per key, the device's name, the key's OpenSSH fingerprint, the
node id and (for a benchmark split) the partition the device holds, in the
registry file the round reads (run-config ``device-registry``; format in
``server_app.identity``). The round then takes a device's identity from the node
its upload came from, never from what the upload claims.

Usage (operator, with the ``flwr`` CLI's connection to the SuperLink)::

    python -m deploy.devices register --registry /srv/flower/devices.json \\
        --connection production \\
        node-0=keys/node-0.pub@0/3 node-1=keys/node-1.pub@1/3 cam-7=keys/cam-7.pub

``NAME=KEY.pub@P/N``: device ``NAME`` holds partition ``P`` of ``N``;
``NAME=KEY.pub``: a device with its own data (node config ``data-path``).
Registering a device again (a new key, a re-created SuperLink database)
replaces its entry.
"""

from __future__ import annotations

import argparse
import re
import shlex
import subprocess
import sys
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

from server_app.identity import (
    DeviceRegistry,
    RegisteredDevice,
    RegistryError,
    fingerprint,
    write_registry,
)

from .commands import CONNECTION, json_out, register_command

SPEC_RE = re.compile(
    r"(?P<name>[^=@\s]+)=(?P<key>[^@]+)(?:@(?P<pid>\d+)/(?P<num>\d+))?"
)

Runner = Callable[[list[str]], subprocess.CompletedProcess]


@dataclass(frozen=True)
class DeviceSpec:
    """A device to register: its name, public key file and partition (or none)."""

    name: str
    public_key: Path
    partition_id: int | None = None
    num_partitions: int | None = None

    @classmethod
    def parse(cls, text: str) -> DeviceSpec:
        m = SPEC_RE.fullmatch(text)
        if m is None:
            raise ValueError(
                f"device {text!r}: write NAME=KEY.pub@PARTITION/NUM (a benchmark "
                "partition) or NAME=KEY.pub (a device with its own data)"
            )
        pid, num = m.group("pid"), m.group("num")
        return cls(
            m.group("name"),
            Path(m.group("key")),
            int(pid) if pid is not None else None,
            int(num) if num is not None else None,
        )

    def arg(self) -> str:
        """This spec as a command-line argument of ``register``."""
        part = (
            f"@{self.partition_id}/{self.num_partitions}"
            if self.partition_id is not None
            else ""
        )
        return f"{self.name}={self.public_key}{part}"


def specs_for(
    names: Sequence[str], public_keys: Sequence[Path], node_configs: Sequence[str]
) -> list[DeviceSpec]:
    """Device ``names[i]`` with key ``public_keys[i]`` and the partition its
    registered ``--node-config`` names (none: a device with its own data)."""
    from flwr.common.config import parse_config_args

    specs = []
    for name, key, text in zip(names, public_keys, node_configs, strict=True):
        conf = parse_config_args([text])
        pid, num = conf.get("partition-id"), conf.get("num-partitions")
        if isinstance(pid, int) and isinstance(num, int):
            specs.append(DeviceSpec(name, key, pid, num))
        else:
            specs.append(DeviceSpec(name, key))
    return specs


def _run(cmd: list[str]) -> subprocess.CompletedProcess:
    return subprocess.run(cmd, capture_output=True, text=True, timeout=120)


def register_devices(
    specs: Sequence[DeviceSpec],
    registry: str | Path,
    connection: str = CONNECTION,
    run: Runner = _run,
    log: Callable[[DeviceSpec, list[str], subprocess.CompletedProcess], None]
    | None = None,
) -> list[RegisteredDevice]:
    """Register each device's key (``flwr supernode register``); update the registry.

    Entries of other devices already in ``registry`` are kept; a device
    registered again replaces its entry. Raises ``RuntimeError`` with the CLI's
    output when a registration fails (e.g. the key is in use already).
    """
    path = Path(registry)
    kept = (
        {d.device: d for d in DeviceRegistry.load(path).devices}
        if path.is_file()
        else {}
    )
    new = []
    for spec in specs:
        # the fingerprint first: a key that cannot be read fails before registering
        fp = fingerprint(spec.public_key.read_bytes())
        cmd = register_command(spec.public_key, connection, as_json=True)
        res = run(cmd)
        if log is not None:
            log(spec, cmd, res)
        node_id = json_out(res.stdout).get("node-id")
        if res.returncode != 0 or not isinstance(node_id, int):
            raise RuntimeError(
                f"`{shlex.join(cmd)}` exited with {res.returncode} and no node id:\n"
                f"{(res.stdout + res.stderr)[-2000:]}"
            )
        dev = RegisteredDevice(
            spec.name, fp, node_id, spec.partition_id, spec.num_partitions
        )
        kept.pop(spec.name, None)
        new.append(dev)
    # a key registered under another name before now belongs to this device
    fps = {d.fingerprint for d in new}
    devices = [d for d in kept.values() if d.fingerprint not in fps] + new
    write_registry(path, devices)
    return new


def main(argv: Sequence[str] | None = None) -> int:
    p = argparse.ArgumentParser(
        prog="python -m deploy.devices",
        description="Register SuperNode keys and record them in the device registry.",
    )
    sub = p.add_subparsers(dest="action", required=True)
    reg = sub.add_parser("register", help="register keys, update the registry")
    reg.add_argument("--registry", type=Path, required=True, help="devices.json")
    reg.add_argument("--connection", default=CONNECTION, help="flwr CLI connection")
    reg.add_argument("devices", nargs="+", help="NAME=KEY.pub[@PARTITION/NUM]")
    show = sub.add_parser("show", help="print the registry")
    show.add_argument("--registry", type=Path, required=True, help="devices.json")
    args = p.parse_args(argv)
    try:
        if args.action == "show":
            for d in DeviceRegistry.load(args.registry).devices:
                print(f"{d.node_id}  {d.describe()}")
            return 0
        specs = [DeviceSpec.parse(s) for s in args.devices]
        for d in register_devices(specs, args.registry, args.connection):
            print(f"registered node {d.node_id}: {d.describe()}")
    except (ValueError, RegistryError, RuntimeError, OSError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    print(f"device registry: {args.registry.resolve()}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
