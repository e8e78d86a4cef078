"""Nothing lost on a crash: every upload is written atomically, with a SHA-256
checksum, the moment it arrives (``Journal``), and the server's output before the
push. Re-running with the same ``run-name`` resumes: the collection window goes
on where it was (nodes already heard from are not asked again), and a finished
server work is not redone.

The journal's lines are chained by checksums, so an edited, dropped or reordered
line is detected; upload file names are the server's own
(``upload-<seq>.safetensors``) and must stay inside ``uploads/``. Resumed uploads
are validated again by the method before use (``round.screen``).
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import tempfile
from logging import WARNING
from pathlib import Path
from typing import Any

import torch
from flwr.common.logger import log
from safetensors.torch import load_file, save_file

from common.contract import Reply
from methods.base import ServerOutput

JOURNAL = "journal.jsonl"
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


_LOCKS: dict[str, int] = {}  # folder -> the open, locked file of this process


def lock_run(folder: Path) -> None:
    """Hold an exclusive lock on ``folder`` for the life of this process.

    Two ServerApps on one run-name (a killed one that survived, and its
    re-run) would both write the journal and ask nodes twice: the second is
    refused. The kernel drops the lock when the holder dies, however it dies.
    """
    import fcntl

    key = str(folder.resolve())
    if key in _LOCKS:
        return
    path = folder / "lock"
    fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        holder = os.read(fd, 32).decode(errors="replace").strip() or "?"
        os.close(fd)
        raise ResumeError(
            f"{folder} is in use by another ServerApp (pid {holder}): a run with "
            "this run-name is still running. Stop it (`flwr stop <run-id>`) or wait "
            "for it to end, or use another run-name"
        ) from None
    os.ftruncate(fd, 0)
    os.write(fd, str(os.getpid()).encode())
    _LOCKS[key] = fd


class Journal:
    """The collection window's append-only journal: ``uploads/journal.jsonl``.

    One JSON line per event, each with the SHA-256 of its own body and of the
    line before it (a chain: an edited, dropped or reordered line is detected).
    Lines are appended and fsynced one at a time, so a crash loses at most the
    event being written; a torn last line is dropped on reading (that upload
    was never acknowledged: its node is asked again). An upload's tensors are
    written atomically to ``upload-<seq>.safetensors`` (checksummed) before its
    line. Events:

    * ``open``: ``method``, ``window_start`` (wall-clock seconds);
    * ``asked``: ``node_id`` (the collect message went to that node);
    * ``upload``: ``node_id``, ``file``, ``sha256`` and the envelope;
    * ``rejected``: ``node_id``, ``reason`` (client error, bad envelope);
    * ``lost``: ``node_id``, ``reason`` (the node went away: it may be asked again);
    * ``late``: ``node_id``, ``upload_bytes`` (a reply after the close, not used);
    * ``closed``: ``reason`` (no event of the window follows).
    """

    def __init__(self, run_dir: Path, method: str, resume: bool = True) -> None:
        """``resume=False``: a run without a ``run-name`` starts a new journal
        (its folder is named by Flower's run id, new for every run)."""
        self.dir = run_dir / "uploads"
        self.path = self.dir / JOURNAL
        self.method = method
        self.events: list[dict[str, Any]] = []
        self._last = ""  # the checksum of the last line (the chain)
        self.dir.mkdir(parents=True, exist_ok=True)
        lock_run(self.dir)
        if not resume:
            self.path.unlink(missing_ok=True)
        if self.path.is_file():
            self._read()

    # ---- reading
    @property
    def fix(self) -> str:
        return (
            f"start a new run-name, or delete {self.dir} to collect the uploads again"
        )

    def _read(self) -> None:
        raw = self.path.read_bytes()
        lines = raw.split(b"\n")
        complete, tail = lines[:-1], lines[-1]
        if tail:  # a torn write: the line was never finished
            log(
                WARNING,
                "%s: dropping an unfinished last line (%d bytes)",
                self.path,
                len(tail),
            )
        prev = ""
        for i, line in enumerate(complete):
            try:
                e = json.loads(line)
                checksum = e.pop("checksum")
            except (ValueError, KeyError, TypeError, AttributeError) as err:
                raise ResumeError(
                    f"{self.path}: line {i + 1} is not a journal entry ({err}); {self.fix}"
                ) from None
            if e.get("prev") != prev or checksum != _digest(e):
                raise ResumeError(
                    f"{self.path}: line {i + 1} does not match its checksum: the "
                    f"journal was altered; {self.fix}"
                )
            prev = checksum
            self.events.append(e)
        self._last = prev
        if tail:  # rewrite without the torn line, so appends stay whole lines
            atomic_write_bytes(self.path, b"".join(x + b"\n" for x in complete))
        opened = self.opened
        if opened is not None and opened.get("method") != self.method:
            raise ResumeError(
                f"{self.path} holds uploads of method={opened.get('method')!r}, this "
                f"run is method={self.method!r}; start a new run-name"
            )

    @property
    def opened(self) -> dict[str, Any] | None:
        return next((e for e in self.events if e["event"] == "open"), None)

    @property
    def closed(self) -> bool:
        return any(e["event"] == "closed" for e in self.events)

    def of(self, kind: str) -> list[dict[str, Any]]:
        return [e for e in self.events if e["event"] == kind]

    # ---- writing
    def append(self, event: str, **fields: Any) -> dict[str, Any]:
        body = {"seq": len(self.events), "event": event, **fields, "prev": self._last}
        checksum = _digest(body)
        line = json.dumps(body | {"checksum": checksum}, default=str) + "\n"
        with open(self.path, "ab") as f:
            f.write(line.encode())
            f.flush()
            os.fsync(f.fileno())
        self._last = checksum
        body = json.loads(json.dumps(body, default=str))  # as it reads back
        self.events.append(body)
        return body

    def open(self, window_start: float) -> None:
        if self.opened is None:
            self.append("open", method=self.method, window_start=window_start)

    def upload(self, r: Reply, at: float) -> None:
        """Persist one accepted envelope: its tensors first, then its line."""
        seq = len(self.events)
        name = f"upload-{seq}.safetensors" if r.tensors else ""
        digest = _save_tensors(self.dir / name, r.tensors) if r.tensors else ""
        self.append(
            "upload",
            node_id=r.node_id,
            file=name,
            sha256=digest,
            partition_id=r.partition_id,
            num_examples=r.num_examples,
            upload_bytes=r.upload_bytes,
            meta=r.meta,
            metrics=r.metrics,
            at=at,
        )

    def replies(self) -> list[Reply]:
        """Every persisted upload, its file checked against its checksum."""
        out = []
        for e in self.of("upload"):
            try:
                name = str(e["file"])
                tensors: dict[str, torch.Tensor] = {}
                if name:
                    path = (self.dir / name).resolve()
                    if (
                        not UPLOAD_FILE.fullmatch(name)
                        or path.parent != self.dir.resolve()
                    ):
                        raise ResumeError(
                            f"{self.path} names a file outside {self.dir}: {name!r}"
                        )
                    tensors = _load_tensors(path, e["sha256"], self.fix)
                out.append(
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
                    f"{self.path}: entry {e.get('seq')} is malformed ({err!r}); {self.fix}"
                ) from None
        return out


def load_uploads(
    run_dir: Path, method: str
) -> tuple[list[Reply], list[dict], list[dict]] | None:
    """The uploads of a closed collection window, or ``None`` if there is none:
    ``(replies, rejected, missing)`` as the journal recorded them (before the
    round's cross-checks). Raises ``ResumeError`` naming the file when anything
    does not check out."""
    if not (run_dir / "uploads" / JOURNAL).is_file():
        return None
    j = Journal(run_dir, method)
    if not j.closed:
        return None
    rejected = [
        {k: e[k] for k in ("node_id", "reason", "partition_id") if k in e}
        for e in j.of("rejected")
    ]
    return j.replies(), rejected, [dict(e) for e in j.of("missing")]


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
