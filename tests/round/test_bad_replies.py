"""A corpus of hand-made bad replies through the real round (in-process grid, the
real ClientApp): two honest clients and one bad one, for every kind of bad reply
an attacker was seen to send. Invariant: the round completes, the bad client is
rejected with a reason, the honest ones are used, nothing is written outside the
run folder. Resume cases tamper with what the round persisted.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from fakegrid import FakeGrid
from flwr.app import Message

from client_app.app import app as client_app
from common import contract as C
from methods import build_config
from server_app.persist import ResumeError
from server_app.round import run_one_shot

BAD = 1  # the partition whose reply is tampered with


def _meta(key, value):
    def hook(reply: Message, msg: Message) -> Message:
        if value is _DROP:
            del reply.content[C.KEY_META][key]
        else:
            reply.content[C.KEY_META][key] = value
        return reply

    return hook


def _metric(key, value):
    def hook(reply: Message, msg: Message) -> Message:
        reply.content[C.KEY_METRICS][key] = value
        return reply

    return hook


def _array(record, fn):
    def hook(reply: Message, msg: Message) -> Message:
        t = C.from_array_record(reply.content.array_records[record])
        reply.content[record] = C.to_array_record(fn(t))
        return reply

    return hook


def _and(*hooks):
    def hook(reply: Message, msg: Message) -> Message:
        for h in hooks:
            reply = h(reply, msg)
        return reply

    return hook


_DROP = object()
_nan_mean = _array("embeddings", lambda t: t | {"mean": t["mean"] * float("nan")})


def _set(key, value):
    return lambda t: t | {key: value}


def _retype(dtype):
    return lambda t: {
        k: v.to(dtype) if v.is_floating_point() else v for k, v in t.items()
    }


def _lora_retype(dtype):
    return lambda t: {
        k: v.to(dtype) if k.startswith("adapter/") else v for k, v in t.items()
    }


# (case id, method, extra run config, hook, text the rejection reason contains)
CORPUS = [
    # a rejected reply whose partition-id is missing (a device with its own data
    # declares none: rejected for its NaN, not its identity), a string or a list
    (
        "pid-missing",
        "oscar",
        {},
        _and(_meta("partition-id", _DROP), _nan_mean),
        "NaN or Inf",
    ),
    ("pid-string", "oscar", {}, _meta("partition-id", "evil"), "is not an integer"),
    ("pid-list", "oscar", {}, _meta("partition-id", [1, 2]), "partition-id"),
    # a partition-id sent as a float (legal on the wire)
    ("pid-huge-float", "oscar", {}, _meta("partition-id", 1e30), "is not an integer"),
    (
        "pid-inf",
        "oscar",
        {},
        _meta("partition-id", float("inf")),
        "'partition-id' is inf",
    ),
    (
        "pid-integral-float",
        "fedavg",
        {},
        _meta("partition-id", 1.0),
        "is not an integer",
    ),
    ("pid-huge-int", "oscar", {}, _meta("partition-id", 2**62), "outside"),
    (
        "pid-spoofed",
        "oscar",
        {"min-clients": 1},
        _meta("partition-id", 0),
        "claimed by nodes",
    ),
    # metric values that are lists, 0-d and 2-d class ids
    (
        "metric-list",
        "oscar",
        {},
        _metric("client-s", [1.0, 2.0]),
        "expected one number",
    ),
    (
        "num-examples-list",
        "fedavg",
        {},
        _metric("num-examples", [1, 2]),
        "expected one number",
    ),
    (
        "class-ids-0d",
        "oscar",
        {},
        _array("embeddings", _set("class_ids", torch.tensor(3))),
        "expected 1-d",
    ),
    (
        "class-ids-2d",
        "oscar",
        {},
        _array("embeddings", lambda t: t | {"class_ids": t["class_ids"][:, None]}),
        "expected 1-d",
    ),
    # integer, boolean or complex weights; NaN after averaging
    (
        "fedavg-int-weights",
        "fedavg",
        {},
        _array("model", _retype(torch.int32)),
        "expected floating point",
    ),
    (
        "fedavg-bool-weights",
        "fedavg",
        {},
        _array("model", _retype(torch.bool)),
        "expected floating point",
    ),
    (
        "fedavg-complex-weights",
        "fedavg",
        {},
        _array("model", _retype(torch.complex64)),
        "expected floating point",
    ),
    (
        "fedavg-fp64-overflow",
        "fedavg",
        {},
        _array(
            "model",
            lambda t: {
                k: v.double() * 1e300 if v.is_floating_point() else v
                for k, v in t.items()
            },
        ),
        "NaN or Inf",
    ),
    (
        "lora-int-adapter",
        "lora",
        {"lora-merge": "stack"},
        _array("lora", _lora_retype(torch.int16)),
        "expected floating point",
    ),
    (
        "lora-negative-examples",
        "lora",
        {"lora-merge": "svd"},
        _metric("num-examples", -5),
        "num-examples",
    ),
    (
        "lora-overflowing-examples",
        "lora",
        {"lora-merge": "svd"},
        _metric("num-examples", 2**70),
        "num-examples",
    ),
    # unbounded client-declared size
    (
        "num-examples-beyond-bound",
        "fedavg",
        {},
        _metric("num-examples", 10**12),
        "num-examples",
    ),
    # a 10 MB string in meta
    (
        "meta-10mb-string",
        "oscar",
        {"max-upload-mb": 64.0},
        _meta("domain", "x" * 10_000_000),
        "characters long",
    ),
    (
        "meta-counts-toward-upload",
        "oscar",
        {"max-upload-mb": 0.05},
        _meta("example-caption", "y" * 60_000),
        "exceeds max-upload-mb",
    ),
    # image folder: the class vote and the envelope of an unvalidated reply
    (
        "folder-no-meta",
        "oscar",
        {"dataset": "FOLDER"},
        lambda r, m: (r.content.config_records.pop(C.KEY_META), r)[1],
        "no 'meta'",
    ),
    (
        "folder-wrong-schema",
        "fedavg",
        {"dataset": "FOLDER"},
        _meta("schema", 1),
        "schema",
    ),
    (
        "folder-nan-metric",
        "oscar",
        {"dataset": "FOLDER"},
        _metric("client-s", float("nan")),
        "is nan",
    ),
    (
        "folder-text-channels",
        "oscar",
        {"dataset": "FOLDER"},
        _meta("channels", "three"),
        "channels",
    ),
    (
        "folder-other-classes",
        "fedavg",
        {"dataset": "FOLDER"},
        _meta("class-names", "cat,dog,bird"),
        "disagree",
    ),
]


def _files(root: Path) -> set[Path]:
    return {p for p in root.rglob("*")}


@pytest.mark.parametrize(
    "case,method,extra,hook,reason", CORPUS, ids=[c[0] for c in CORPUS]
)
def test_one_bad_client_never_ends_the_round(
    case, method, extra, hook, reason, tiny_stack, fast_config, tmp_path
):
    from tiny_stack import make_image_folder

    rc = fast_config | {"method": method, "run-name": "run"} | extra
    if rc["dataset"] == "FOLDER":
        rc |= {
            "dataset": str(make_image_folder(tmp_path / "folder", 20)),
            "partition": "iid",
        }
    before = _files(tmp_path)
    grid = FakeGrid(client_app, 3, rc, tamper={BAD: hook})
    res = run_one_shot(grid, build_config(rc), "unused")
    # the round completed and wrote its report
    run_dir = Path(rc["output-dir"]) / "run"
    on_disk = json.loads((run_dir / "results.json").read_text())
    assert on_disk["num_clients"] == (2 if case != "pid-spoofed" else 1)
    # the bad client is rejected with the reason, the honest ones are used
    assert len(res["rejected"]) >= 1
    reasons = " | ".join(r["reason"] for r in res["rejected"])
    assert reason in reasons, reasons
    assert sorted(c["partition_id"] for c in res["clients"] if c["status"] == "ok") == (
        [0, 2] if case != "pid-spoofed" else [2]
    )
    assert all(len(c["status"]) < 400 for c in res["clients"])
    # nothing written outside the run folder
    new = _files(tmp_path) - before
    assert all(
        run_dir in p.parents or p == run_dir or p == run_dir.parent for p in new
    ), sorted(map(str, new))[:5]


def test_heavy_client_share_is_capped(tiny_stack, fast_config):
    rc = fast_config | {"method": "fedavg", "max-weight-share": 0.5}
    grid = FakeGrid(client_app, 3, rc, tamper={BAD: _metric("num-examples", 10**8)})
    res = run_one_shot(grid, build_config(rc), "cap")
    shares = res["weight_shares"]
    assert res["num_clients"] == 3 and max(shares.values()) == pytest.approx(0.5)
    assert sum(shares.values()) == pytest.approx(1.0)


# ------------------------------------------------------------------ resume


def _persisted(fast_config, name: str) -> tuple[dict, Path]:
    rc = fast_config | {"method": "fedavg", "run-name": name}
    run_one_shot(FakeGrid(client_app, 3, rc), build_config(rc), "x")
    return rc, Path(rc["output-dir"]) / name / "uploads"


def _resume(rc):
    return run_one_shot(FakeGrid(client_app, 3, rc), build_config(rc), "x")


def _lines(up: Path) -> list[dict]:
    return [json.loads(x) for x in (up / "journal.jsonl").read_text().splitlines()]


def _rewrite(up: Path, lines: list[dict], rechain: bool) -> None:
    """Write journal lines back; ``rechain``: recompute every checksum, as a
    forger who read persist.py would."""
    from server_app.persist import _digest

    prev = ""
    out = []
    for e in lines:
        body = {k: v for k, v in e.items() if k != "checksum"}
        if rechain:
            body["prev"] = prev
            e = body | {"checksum": _digest(body)}
            prev = e["checksum"]
        out.append(json.dumps(e))
    (up / "journal.jsonl").write_text("\n".join(out) + "\n")


def _upload_line(lines: list[dict]) -> dict:
    return next(e for e in lines if e["event"] == "upload")


def test_resume_refuses_an_altered_journal(tiny_stack, fast_config):
    rc, up = _persisted(fast_config, "altered")
    lines = _lines(up)
    _upload_line(lines)["num_examples"] += 1  # a flipped digit
    _rewrite(up, lines, rechain=False)
    with pytest.raises(ResumeError, match="journal.jsonl: line .* does not match its"):
        _resume(rc)


def test_resume_refuses_a_journal_that_is_not_json(tiny_stack, fast_config):
    rc, up = _persisted(fast_config, "garbled")
    (up / "journal.jsonl").write_text("{ not json\n")
    with pytest.raises(ResumeError, match="not a journal entry.*new run-name"):
        _resume(rc)


def test_resume_refuses_a_file_outside_uploads(tiny_stack, fast_config):
    rc, up = _persisted(fast_config, "escape")
    lines = _lines(up)
    _upload_line(lines)["file"] = "../../../../etc/passwd"
    _rewrite(up, lines, rechain=True)
    with pytest.raises(ResumeError, match="outside"):
        _resume(rc)


def test_resume_revalidates_every_upload(tiny_stack, fast_config):
    """A persisted upload that no longer passes validation is rejected on resume."""
    import hashlib

    from safetensors.torch import load_file, save_file

    rc, up = _persisted(fast_config, "revalidate")
    lines = _lines(up)
    entry = _upload_line(lines)
    tensors = load_file(str(up / entry["file"]))
    key = next(k for k, v in tensors.items() if v.is_floating_point())
    tensors[key] = tensors[key] * float("nan")
    save_file(tensors, str(up / entry["file"]))
    entry["sha256"] = hashlib.sha256((up / entry["file"]).read_bytes()).hexdigest()
    _rewrite(up, lines, rechain=True)
    for f in (up.parent / "checkpoints").iterdir():
        f.unlink()
    res = _resume(rc)
    assert res["num_clients"] == 2 and "NaN or Inf" in res["rejected"][-1]["reason"]
