"""Nothing lost on a crash: accepted uploads (and the trained global model) are
written atomically, with SHA-256 checksums, before the server work starts.
Re-running with the same ``run-name`` resumes from them without asking any
client to redo its work."""

from __future__ import annotations

import hashlib
import json
import os
import tempfile
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file, save_file

from common.contract import Reply

MANIFEST = "manifest.json"


def atomic_write_bytes(path: Path, data: bytes) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.")
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def atomic_write_json(path: Path, obj: Any) -> None:
    atomic_write_bytes(path, json.dumps(obj, indent=2, default=str).encode())


def _save_tensors(path: Path, tensors: dict[str, torch.Tensor]) -> str:
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.")
    os.close(fd)
    try:
        save_file({k: v.contiguous() for k, v in tensors.items()}, tmp)
        digest = hashlib.sha256(Path(tmp).read_bytes()).hexdigest()
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    return digest


def _load_tensors(path: Path, sha256: str) -> dict[str, torch.Tensor]:
    data = path.read_bytes()
    if hashlib.sha256(data).hexdigest() != sha256:
        raise ValueError(
            f"checksum mismatch for {path}: the persisted upload is corrupt"
        )
    return load_file(str(path))


def save_uploads(
    run_dir: Path, replies: list[Reply], rejected: list[dict], missing: list[dict]
) -> Path:
    """Persist every accepted reply; the manifest is written last and marks completion."""
    up = run_dir / "uploads"
    up.mkdir(parents=True, exist_ok=True)
    entries = []
    for r in replies:
        f = up / f"partition-{r.partition_id}-node-{r.node_id}.safetensors"
        digest = _save_tensors(f, r.tensors) if r.tensors else ""
        entries.append(
            {
                "file": f.name if r.tensors else "",
                "sha256": digest,
                "node_id": r.node_id,
                "partition_id": r.partition_id,
                "num_examples": r.num_examples,
                "upload_bytes": r.upload_bytes,
                "meta": r.meta,
                "metrics": r.metrics,
            }
        )
    manifest = up / MANIFEST
    atomic_write_json(
        manifest, {"replies": entries, "rejected": rejected, "missing": missing}
    )
    return manifest


def load_uploads(run_dir: Path) -> tuple[list[Reply], list[dict], list[dict]] | None:
    """The persisted uploads of an interrupted run, or ``None`` if there are none."""
    manifest = run_dir / "uploads" / MANIFEST
    if not manifest.is_file():
        return None
    m = json.loads(manifest.read_text())
    replies = []
    for e in m["replies"]:
        tensors = (
            _load_tensors(run_dir / "uploads" / e["file"], e["sha256"])
            if e["file"]
            else {}
        )
        replies.append(
            Reply(
                node_id=e["node_id"],
                partition_id=e["partition_id"],
                num_examples=e["num_examples"],
                upload_bytes=e["upload_bytes"],
                meta=e["meta"],
                metrics=e["metrics"],
                tensors=tensors,
            )
        )
    return replies, m["rejected"], m["missing"]


def save_checkpoint(
    run_dir: Path, name: str, tensors: dict[str, torch.Tensor], info: dict
) -> None:
    ck = run_dir / "checkpoints"
    ck.mkdir(parents=True, exist_ok=True)
    digest = _save_tensors(ck / f"{name}.safetensors", tensors)
    atomic_write_json(ck / f"{name}.json", {"sha256": digest, **info})


def load_checkpoint(
    run_dir: Path, name: str
) -> tuple[dict[str, torch.Tensor], dict] | None:
    meta = run_dir / "checkpoints" / f"{name}.json"
    if not meta.is_file():
        return None
    info = json.loads(meta.read_text())
    return _load_tensors(
        run_dir / "checkpoints" / f"{name}.safetensors", info["sha256"]
    ), info
