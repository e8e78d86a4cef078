"""Make SuperNode authentication key pairs in the format Flower 1.41 reads.

A SuperNode proves its identity with an elliptic-curve key on a NIST curve
(Flower's docs and CLI use P-384):

- the private key stays on the node, as an unencrypted **OpenSSH private key**
  file, passed as ``flower-supernode --auth-supernode-private-key <file>``
  (Flower loads it with ``cryptography``'s ``load_ssh_private_key``);
- the public key, one **OpenSSH line** (``ecdsa-sha2-nistp384 AAAA...``), goes to
  whoever runs the SuperLink, who registers it with
  ``flwr supernode register <file>.pub <connection>``.

This writes the same two files as ``ssh-keygen -t ecdsa -b 384 -N "" -C ""
-f <file>``, without needing OpenSSH (handy on slim edge images)::

    python -m deploy.node_keys keys/ node-0 node-1 node-2
"""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec


def generate_node_key(private_path: str | Path, overwrite: bool = False) -> Path:
    """Write a P-384 key pair to ``private_path`` and ``private_path + ".pub"``.

    Parameters
    ----------
    private_path
        The private key file (OpenSSH format, mode 0600). The public key is
        written next to it with the suffix ``.pub``.
    overwrite
        Replace existing files. Off by default: a registered node's key must
        not change under it, or the SuperLink refuses the node.

    Returns
    -------
    Path
        The public key file (the one to register).
    """
    private_path = Path(private_path)
    public_path = private_path.with_name(private_path.name + ".pub")
    if not overwrite and (private_path.exists() or public_path.exists()):
        raise FileExistsError(
            f"{private_path} or {public_path} exists; a node keeps its key once "
            "registered. Delete both files or pass overwrite=True (--overwrite)."
        )
    key = ec.generate_private_key(ec.SECP384R1())
    private_pem = key.private_bytes(
        serialization.Encoding.PEM,
        serialization.PrivateFormat.OpenSSH,
        serialization.NoEncryption(),
    )
    public_line = key.public_key().public_bytes(
        serialization.Encoding.OpenSSH, serialization.PublicFormat.OpenSSH
    )
    private_path.parent.mkdir(parents=True, exist_ok=True)
    # Create the private key with mode 0600 from the start.
    fd = os.open(private_path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "wb") as f:
        f.write(private_pem)
    public_path.write_bytes(public_line + b"\n")
    return public_path


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m deploy.node_keys",
        description="Make SuperNode key pairs (P-384, OpenSSH format) for "
        "Flower SuperNode authentication.",
    )
    parser.add_argument("out_dir", type=Path, help="folder for the key files")
    parser.add_argument(
        "names", nargs="+", help="one name per node, e.g. node-0 node-1"
    )
    parser.add_argument("--overwrite", action="store_true", help="replace keys")
    args = parser.parse_args(argv)
    for name in args.names:
        try:
            pub = generate_node_key(args.out_dir / name, overwrite=args.overwrite)
        except FileExistsError as e:
            print(f"error: {e}", file=sys.stderr)
            return 1
        print(f"{args.out_dir / name}  (private, stays on the node)")
        print(f"{pub}  (public, register with `flwr supernode register`)")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
