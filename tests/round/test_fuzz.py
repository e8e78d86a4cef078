"""Property-based fuzzing of every registered method's payload boundary.

Starting from a genuine reply of the real ClientApp, hypothesis mutates what a
client controls (meta, metrics, arrays: keys, dtypes, shapes, values, whole
records) and feeds it through the server's validation exactly as the round does
(``check_envelope``, the journal, then ``screen``). The invariant: validation never raises; a
reply is either accepted (and then unpacks again cleanly) or rejected with a
reason. ``tests/round/test_bad_replies.py`` drives hand-made bad replies through the
whole round.
"""

from __future__ import annotations

import math

import pytest
import torch
from conftest import by_method
from fakegrid import FakeGrid
from flwr.app import ArrayRecord, ConfigRecord, Message, MetricRecord, RecordDict
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from client_app.app import app as client_app
from common import contract as C
from common.contract import PayloadError
from common.datasets import dataset_info
from methods import METHODS, build_config, get_method
from methods.base import ServerContext
from server_app.collect import Collected, check_envelope
from server_app.persist import Journal
from server_app.round import screen

CASES = 120  # generated cases per method (the issue asks for at least 100)
NODE = 4242


class Genuine:
    """One genuine collect reply per method from the real ClientApp, made on
    first use (a worker makes only the methods it runs tests of)."""

    def __init__(self, rc: dict, tmp_path_factory) -> None:
        self.rc, self.tmp, self.made = rc, tmp_path_factory, {}

    def __getitem__(self, name: str):
        if name not in self.made:
            rc = self.rc | {"method": name}
            cfg = build_config(rc)
            ctx = ServerContext(
                cfg, self.tmp.mktemp(name), info=dataset_info(cfg.data_args())
            )
            method = get_method(name)
            method.check(ctx)
            grid = FakeGrid(client_app, 2, rc)
            content = method.collect_content(ctx)
            msg = Message(
                content,
                dst_node_id=grid.nodes[0],
                message_type=METHODS[name].collect_type,
            )
            reply = grid.send_and_receive([msg])[0]
            self.made[name] = (method, ctx, reply.content)
        return self.made[name]


@pytest.fixture(scope="module")
def genuine(tiny_stack_dir, tmp_path_factory):
    """The genuine replies, per method on first use."""
    import os

    from conftest import FAST_METHOD_KEYS, default_run_config

    os.environ["ONESHOT_EMBEDDED_DIR"] = str(tiny_stack_dir)
    rc = (
        default_run_config()
        | FAST_METHOD_KEYS
        | {
            "max-examples-per-client": 60,
            "local-epochs": 1,
            "lora-steps": 1,
            "output-dir": str(tmp_path_factory.mktemp("fuzz")),
            "max-upload-mb": 1.0,
            "screen-outliers": True,  # the cohort screens are fuzzed too
        }
    )
    yield Genuine(rc, tmp_path_factory)
    os.environ.pop("ONESHOT_EMBEDDED_DIR", None)


# Each method's tests on one xdist worker (``--dist loadgroup``), with the
# method's other tests: its genuine reply is made once, not once per worker.
NAMES = by_method(sorted(METHODS))


def _clone(content: RecordDict) -> dict:
    """A plain, mutable copy of a reply: {record: {key: value}}."""
    return {
        "meta": dict(content.config_records.get(C.KEY_META, {})),
        "metrics": dict(content.metric_records.get(C.KEY_METRICS, {})),
        "arrays": {
            name: C.from_array_record(rec)
            for name, rec in content.array_records.items()
        },
    }


def _build(parts: dict) -> RecordDict | None:
    """Records from parts; None when Flower itself refuses them (never on the wire)."""
    try:
        content = RecordDict()
        if parts["meta"] is not None:
            content[C.KEY_META] = ConfigRecord(parts["meta"])
        if parts["metrics"] is not None:
            content[C.KEY_METRICS] = MetricRecord(parts["metrics"])
        for name, tensors in parts["arrays"].items():
            content[name] = ArrayRecord(
                {k: C.to_array_record({k: v})[k] for k, v in tensors.items()}
            )
        return content
    except Exception:
        return None


DTYPES = [
    torch.float16,
    torch.float32,
    torch.float64,
    torch.int32,
    torch.int64,
    torch.uint8,
    torch.bool,
    torch.complex64,
]
weird_numbers = st.one_of(
    st.integers(-(2**70), 2**70),
    st.floats(allow_nan=True, allow_infinity=True),
    st.sampled_from(
        [0, -1, 1, 2**31, 2**63 - 1, 1e30, 0.5, float("nan"), float("inf")]
    ),
)
weird_scalars = st.one_of(
    weird_numbers,
    st.booleans(),
    st.text(max_size=30),
    st.sampled_from(["", ",", "a,a", "x" * 70_000, "zero,one", "0", "../../etc"]),
)


@st.composite
def tensors(draw) -> torch.Tensor:
    dtype = draw(st.sampled_from(DTYPES))
    shape = tuple(draw(st.lists(st.integers(0, 4), max_size=3)))
    t = torch.zeros(shape, dtype=torch.float64)
    if t.numel():
        vals = draw(
            st.lists(
                weird_numbers.filter(lambda v: abs(v) < 1e300 or not math.isfinite(v)),
                min_size=1,
                max_size=t.numel(),
            )
        )
        flat = t.flatten()
        for i, v in enumerate(vals):
            flat[i] = float(v)
        t = flat.reshape(shape)
    if dtype.is_floating_point or dtype.is_complex:
        return t.to(dtype)
    # integer kinds: finite values inside the dtype's range (uint8 and bool: >= 0)
    lo = 0 if dtype in (torch.uint8, torch.bool) else -100
    return torch.nan_to_num(t, 0.0, 0.0, 0.0).round().clamp(lo, 100).to(dtype)


@st.composite
def mutation(draw, parts: dict) -> dict:
    """One to three edits of what a client controls."""
    parts = {
        "meta": dict(parts["meta"]),
        "metrics": dict(parts["metrics"]),
        "arrays": {n: dict(r) for n, r in parts["arrays"].items()},
    }
    for _ in range(draw(st.integers(1, 3))):
        what = draw(
            st.sampled_from(
                [
                    "meta",
                    "metrics",
                    "array",
                    "array-value",
                    "drop-key",
                    "drop-record",
                    "extra-record",
                ]
            )
        )
        if what == "meta":
            key = draw(st.sampled_from([*(parts["meta"] or {}), "x", "partition-id"]))
            if parts["meta"] is not None:
                parts["meta"][key] = draw(
                    weird_scalars | st.lists(st.integers(), max_size=3)
                )
        elif what == "metrics":
            key = draw(st.sampled_from([*(parts["metrics"] or {}), "num-examples"]))
            if parts["metrics"] is not None:
                parts["metrics"][key] = draw(
                    weird_numbers | st.lists(st.integers(-5, 5), max_size=3)
                )
        elif what in ("array", "array-value", "drop-key") and parts["arrays"]:
            rec = draw(st.sampled_from(sorted(parts["arrays"])))
            keys = sorted(parts["arrays"][rec])
            key = draw(st.sampled_from([*keys, "evil"])) if keys else "evil"
            if what == "drop-key":
                parts["arrays"][rec].pop(key, None)
            elif what == "array" or key not in parts["arrays"][rec]:
                parts["arrays"][rec][key] = draw(tensors())
            else:  # keep dtype and shape, poison one value
                t = parts["arrays"][rec][key].clone()
                if t.numel() and (t.is_floating_point() or t.is_complex()):
                    t.view(-1)[0] = draw(
                        st.sampled_from([float("nan"), float("inf"), 6e4])
                    )
                elif t.numel():  # an out-of-range id, inside the dtype's own range
                    v = draw(st.sampled_from([-1, 10**6, 2**40]))
                    if t.dtype == torch.bool:
                        v = not bool(t.view(-1)[0])
                    else:
                        info = torch.iinfo(t.dtype)
                        v = max(info.min, min(info.max, v))
                    t.view(-1)[0] = v
                parts["arrays"][rec][key] = t
        elif what == "drop-record":
            rec = draw(st.sampled_from(["meta", "metrics", *parts["arrays"]]))
            if rec in ("meta", "metrics"):
                parts[rec] = None
            else:
                parts["arrays"].pop(rec)
        else:
            parts["arrays"][draw(st.sampled_from(["junk", "model", "lora"]))] = {
                "x": draw(tensors())
            }
    return parts


def _validate(method, ctx, *contents: RecordDict):
    """As the round does: the envelope on arrival, the journal, then ``screen``
    (one node per content, ``NODE``, ``NODE + 1``, ...)."""
    got = Collected()
    journal = Journal(ctx.run_dir, method.name, resume=False)
    for i, content in enumerate(contents):
        node = NODE + i
        msg = Message(content, dst_node_id=0, message_type=method.collect_type)
        msg.metadata.__dict__["_src_node_id"] = node
        try:
            r = check_envelope(msg, node, method.payload_key, ctx.max_upload_bytes)
        except PayloadError as e:
            got.reject(node, str(e))
            continue
        if len(contents) > 1:  # a cohort: each its own partition
            r.partition_id = i
        journal.upload(r, at=0.0)
    got.replies = journal.replies()
    return screen(method, ctx, got)


@pytest.mark.parametrize("name", NAMES)
def test_genuine_reply_is_accepted(genuine, name):
    method, ctx, content = genuine[name]
    got = _validate(method, ctx, content)
    assert len(got.replies) == 1 and not got.rejected, got.rejected


@pytest.mark.parametrize("name", NAMES)
def test_validation_is_total_under_mutation(genuine, name):
    method, ctx, content = genuine[name]
    base = _clone(content)
    outcomes = {"accepted": 0, "rejected": 0}

    @settings(
        max_examples=CASES,
        deadline=None,
        derandomize=True,
        suppress_health_check=list(HealthCheck),
    )
    @given(st.data())
    def check(data):
        try:
            parts = data.draw(mutation(base))
        except (RuntimeError, TypeError, ValueError, OverflowError):
            return  # a case torch cannot even build (nothing a client could send)
        built = _build(parts)
        if built is None:
            return
        got = _validate(method, ctx, built)  # must not raise
        assert len(got.replies) + len(got.rejected) == 1
        if got.rejected:
            reason = got.rejected[0]["reason"]
            assert isinstance(reason, str) and reason and len(reason) < 2000
            outcomes["rejected"] += 1
        else:
            # what is accepted is well-formed: it validates again the same way
            method.validate(got.replies[0], ctx)
            outcomes["accepted"] += 1

    check()
    assert outcomes["rejected"] >= CASES // 2, outcomes  # the mutations do bite


@pytest.mark.parametrize("name", NAMES)
def test_cohort_screens_are_total_under_mutation(genuine, name):
    """Three genuine uploads and two mutated ones through ``screen`` with
    ``screen-outliers``: it never raises, and each upload is accepted or rejected
    with a reason; the genuine ones (identical) are never outliers."""
    method, ctx, content = genuine[name]
    base = _clone(content)

    @settings(
        max_examples=CASES // 4,
        deadline=None,
        derandomize=True,
        suppress_health_check=list(HealthCheck),
    )
    @given(st.data())
    def check(data):
        built = []
        for _ in range(2):
            try:
                parts = data.draw(mutation(base))
            except (RuntimeError, TypeError, ValueError, OverflowError):
                return
            b = _build(parts)
            if b is None:
                return
            built.append(b)
        got = _validate(method, ctx, content, content, content, *built)
        assert len(got.replies) + len(got.rejected) == 5
        assert all(r["reason"] for r in got.rejected)
        assert {NODE, NODE + 1, NODE + 2} <= {r.node_id for r in got.replies}

    check()
