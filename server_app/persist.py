"""Nothing lost on a crash: accepted uploads and the server's output are written
atomically, with SHA-256 checksums, before the next step starts. Re-running with
the same ``run-name`` resumes from them without asking any client again.

The manifest (``uploads/manifest.json``) carries its own checksum over every
entry, so an edited or half-written manifest is detected; upload file names are
the server's own (``upload-<i>.safetensors``) and must stay inside ``uploads/``.
Resumed uploads are validated again by the method before use (``round.screen``).
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import tempfile
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file, save_file

from common.contract import Reply
from methods.base import ServerOutput

MANIFEST = "manifest.json"
MANIFEST_VERSION = 2
UPLOAD_FILE = re.compile(r"upload-\d{1,7}\.safetensors")


class ResumeError(RuntimeError):
    """A persisted file cannot be trusted; the message names it and says what to do."""


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


def _digest(obj: Any) -> str:
    return hashlib.sha256(
        json.dumps(obj, sort_keys=True, default=str).encode()
    ).hexdigest()


def _save_tensors(path: Path, tensors: dict[str, torch.Tensor]) -> str:
    path.parent.mkdir(parents=True, exist_ok=True)
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


def _load_tensors(path: Path, sha256: str, fix: str) -> dict[str, torch.Tensor]:
    try:
        data = path.read_bytes()
    except OSError as e:
        raise ResumeError(f"{path} cannot be read ({e}); {fix}") from None
    if hashlib.sha256(data).hexdigest() != sha256:
        raise ResumeError(f"{path} does not match its checksum: it is corrupt; {fix}")
    return load_file(str(path))


def save_uploads(
    run_dir: Path,
    method: str,
    replies: list[Reply],
    rejected: list[dict],
    missing: list[dict],
) -> Path:
    """Persist every accepted reply; the manifest is written last and marks completion."""
    up = run_dir / "uploads"
    up.mkdir(parents=True, exist_ok=True)
    entries = []
    for i, r in enumerate(replies):
        name = f"upload-{i}.safetensors" if r.tensors else ""
        entries.append(
            {
                "file": name,
                "sha256": _save_tensors(up / name, r.tensors) if r.tensors else "",
                "node_id": r.node_id,
                "partition_id": r.partition_id,
                "num_examples": r.num_examples,
                "upload_bytes": r.upload_bytes,
                "meta": r.meta,
                "metrics": r.metrics,
            }
        )
    body = {
        "version": MANIFEST_VERSION,
        "method": method,
        "replies": entries,
        "rejected": rejected,
        "missing": missing,
    }
    manifest = up / MANIFEST
    atomic_write_json(manifest, body | {"checksum": _digest(body)})
    return manifest


def load_uploads(
    run_dir: Path, method: str
) -> tuple[list[Reply], list[dict], list[dict]] | None:
    """The persisted uploads of an interrupted run, or ``None`` if there are none.

    Raises ``ResumeError`` naming the file when anything does not check out.
    """
    up = run_dir / "uploads"
    manifest = up / MANIFEST
    if not manifest.is_file():
        return None
    fix = (
        f"start a new run-name, or delete {up} to collect the uploads again "
        "(drop one client: remove its entry and file, then fix the checksum)"
    )
    try:
        m = json.loads(manifest.read_text())
        body = {
            k: m[k] for k in ("version", "method", "replies", "rejected", "missing")
        }
        checksum = m["checksum"]
    except (OSError, ValueError, KeyError, TypeError) as err:
        raise ResumeError(
            f"{manifest} is not a valid manifest ({err}); {fix}"
        ) from None
    if checksum != _digest(body):
        raise ResumeError(
            f"{manifest} does not match its checksum: it was altered; {fix}"
        )
    if body["method"] != method:
        raise ResumeError(
            f"{manifest} holds uploads of method={body['method']!r}, this run is "
            f"method={method!r}; start a new run-name"
        )
    replies = []
    for i, e in enumerate(body["replies"]):
        try:
            name = str(e["file"])
            tensors: dict[str, torch.Tensor] = {}
            if name:
                path = (up / name).resolve()
                if not UPLOAD_FILE.fullmatch(name) or path.parent != up.resolve():
                    raise ResumeError(f"{manifest} names a file outside {up}: {name!r}")
                tensors = _load_tensors(path, e["sha256"], fix)
            replies.append(
                Reply(
                    node_id=int(e["node_id"]),
                    partition_id=int(e["partition_id"]),
                    num_examples=int(e["num_examples"]),
                    upload_bytes=int(e["upload_bytes"]),
                    meta=dict(e["meta"]),
                    metrics={k: float(v) for k, v in e["metrics"].items()},
                    tensors=tensors,
                )
            )
        except ResumeError:
            raise
        except Exception as err:
            raise ResumeError(
                f"{manifest}: entry {i} is malformed ({err!r}); {fix}"
            ) from None
    return replies, list(body["rejected"]), list(body["missing"])


# ---------------------------------------------------------------- server output


def save_output(run_dir: Path, out: ServerOutput) -> None:
    """Checkpoint everything the push and the report need (model, pushed arrays,
    push config, sample grid, method results, timings)."""
    tensors: dict[str, torch.Tensor] = {}
    for k, v in (out.model_state or {}).items():
        tensors[f"model/{k}"] = v
    for rec, arrays in out.push_arrays.items():
        for k, v in arrays.items():
            tensors[f"push/{rec}/{k}"] = v
    for (owner, cls), v in out.samples.items():
        tensors[f"samples/{owner}/{cls}"] = v
    ck = run_dir / "checkpoints"
    digest = _save_tensors(ck / "output.safetensors", tensors) if tensors else ""
    info = {
        "sha256": digest,
        "has_model": out.model_state is not None,
        "arch": out.arch,
        "timings": out.timings,
        "extra": out.extra,
        "push_config": out.push_config,
    }
    atomic_write_json(ck / "output.json", info | {"checksum": _digest(info)})


def load_output(run_dir: Path) -> ServerOutput | None:
    ck = run_dir / "checkpoints"
    meta = ck / "output.json"
    if not meta.is_file():
        return None
    fix = f"delete {ck} to redo the server work"
    try:
        info = json.loads(meta.read_text())
        checksum = info.pop("checksum")
    except (OSError, ValueError, KeyError) as e:
        raise ResumeError(f"{meta} is not a valid checkpoint ({e}); {fix}") from None
    if checksum != _digest(info):
        raise ResumeError(f"{meta} does not match its checksum; {fix}")
    tensors = (
        _load_tensors(ck / "output.safetensors", info["sha256"], fix)
        if info["sha256"]
        else {}
    )
    out = ServerOutput(
        arch=info["arch"],
        timings=info["timings"],
        extra=info["extra"],
        push_config=info["push_config"],
    )
    if info["has_model"]:
        out.model_state = {
            k[len("model/") :]: v for k, v in tensors.items() if k.startswith("model/")
        }
    for k, v in tensors.items():
        if k.startswith("push/"):
            rec, key = k[len("push/") :].split("/", 1)
            out.push_arrays.setdefault(rec, {})[key] = v
        elif k.startswith("samples/"):
            owner, cls = k[len("samples/") :].split("/")
            out.samples[(int(owner), int(cls))] = v
    return out
