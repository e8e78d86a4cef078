"""The fleet scale benchmark (``bench.fleet``): its core at tiny sizes with the
kill + resume, and the replay client that stands in for the ClientApp."""

from __future__ import annotations

import json

import pytest
import torch
from flwr.app import Message, RecordDict

from bench import replay
from bench.fleet import core
from bench.fleet import plan as P
from bench.fleet import report as FR
from common import contract as C
from deploy.inprocess import FIRST_NODE_ID, Device, InProcessGrid


def _recorded(partition: int) -> bytes:
    """A reply's content as the pool stores it (Flower's wire format)."""
    from flwr.common.serde import recorddict_to_proto

    content = C.pack_reply(
        {"partition-id": partition, "num-partitions": 2, "domain": f"d{partition}"},
        {"num-examples": 10.0 + partition},
        {"payload": {"x": torch.full((2,), float(partition))}},
    )
    return recorddict_to_proto(content).SerializeToString()


def _ask(
    client: replay.ReplayClient, kind: str, pid: int, n: int
) -> tuple[str, Message]:
    """Push one ``kind`` message to the device on partition ``pid`` of ``n``
    through the in-process Grid; ``(message id, reply)``."""
    device = Device(FIRST_NODE_ID + pid, {"partition-id": pid, "num-partitions": n})
    grid = InProcessGrid(client, [device], {})
    msg = Message(RecordDict(), dst_node_id=device.node_id, message_type=kind)
    (mid,) = grid.push_messages([msg])
    (reply,) = grid.pull_messages([mid])
    return mid, reply


def test_the_replay_client_answers_with_the_pool_modulo_its_size():
    client = replay.ReplayClient(
        [_recorded(0), _recorded(1)], "train.embed", "evaluate"
    )
    mid, reply = _ask(client, "train.embed", 5, 8)  # 5 mod 2 = pool partition 1
    assert reply.metadata.reply_to_message_id == mid and not reply.has_error()
    r = C.unpack_reply(FIRST_NODE_ID + 5, reply.content, "payload")
    assert (r.partition_id, r.meta["num-partitions"], r.meta["domain"]) == (5, 8, "d1")
    assert r.num_examples == 11 and r.tensors["x"].tolist() == [1.0, 1.0]
    # every answer is a fresh copy: rewriting one leaves the pool as recorded
    _, again = _ask(client, "train.embed", 3, 8)
    assert C.unpack_reply(0, again.content, "payload").partition_id == 3
    assert C.unpack_reply(0, reply.content, "payload").partition_id == 5
    # the evaluation: the device's envelope, num-examples, no accuracy
    _, ev = _ask(client, "evaluate", 4, 8)
    e = C.unpack_reply(FIRST_NODE_ID + 4, ev.content, None)
    assert e.partition_id == 4 and e.metrics == {"num-examples": 10.0}
    assert not ev.content.array_records
    _, err = _ask(client, "query", 0, 8)  # the Grid reports the client's error
    assert err.has_error() and "neither the pool's collect" in err.error.reason


def test_the_fleet_plan_has_silent_late_and_on_time_devices():
    plan = P.plan_fleet(100, 600.0)
    assert len(plan.silent) == 10 and len(plan.late) == 5
    assert not set(plan.silent) & set(plan.late)
    assert len(plan.on_time) == 85
    for d in plan.devices():
        p = d.node_id - FIRST_NODE_ID
        assert 0 <= d.arrive_s <= 0.7 * 600
        if d.node_id in plan.late:
            assert 600 + 2 <= d.arrive_s + d.reply_s <= 600 + 20
        elif not d.silent:
            assert d.arrive_s + d.reply_s < 0.9 * 600 + 1
        assert d.node_config == {"partition-id": p, "num-partitions": 100}
    shifted = plan.devices(shift_s=100.0)
    assert shifted[0].arrive_s == plan.arrive_s[0] - 100.0
    with pytest.raises(ValueError, match="fleet size 3 < 4"):
        P.plan_fleet(3)


@pytest.mark.timeout(300)
def test_the_bench_core_at_tiny_sizes_loses_nothing_and_asks_nobody_twice(
    tiny_stack, fast_config, tmp_path
):
    """Sizes 4 and 8 replayed from a pool of 4 on the tiny stack: the kill +
    resume loses no upload and asks no device twice; late and missing devices
    are listed; synth-budget=0 runs where it fits and is estimated elsewhere."""
    rc = P.bench_config(
        True,
        {
            k: fast_config[k]
            for k in ("max-examples-per-client", "num-inference-steps", "train-epochs")
        }
        | {"images-per-class": 3, "synth-budget": 20},
    )
    report = core.run_fleet(
        [4, 8], rc, tmp_path / "work", pool=4, isolate=False, max_unbudgeted=60
    )
    report |= {"argv": ["--sizes", "4,8"], "quick": True}
    FR.write_outputs(tmp_path / "out", report)
    got = json.loads((tmp_path / "out" / "fleet.json").read_text())
    checks = {c["check"]: c["ok"] for c in got["checks"]}
    assert checks["0 uploads lost at every N (kill + resume)"]
    assert checks["no device asked twice"]
    assert checks["late and missing devices listed (as designed)"]
    assert checks["the resumed journal keeps every line of the killed one"]
    assert checks["kill + resume used every upload the uninterrupted round did"]
    assert checks["the budget binds at every N (server work bounded alike)"]
    for r in got["rows"]:
        k = r["kill"]
        assert k["lost"] == 0 and k["received"] == k["in_final_journal"] > 0
        assert 0 < k["received_before_kill"] < k["received"]
        assert k["asked_twice"] == [] and k["uploaded_twice"] == []
        assert r["late"] == r["designed"]["late"] and len(r["late"]) == 1
        assert r["missing"] == r["designed"]["silent"] and len(r["missing"]) == 1
        assert r["uploads_used"] == r["n"] - 2 == r["uploads_received"]
        assert k["peak_rss_mb"] > 0  # the killed and resumed processes
        assert r["images_used"] == 20 < r["images_requested"]
        assert r["replayed_from_pool"] == 4
    nb4, nb8 = (r["no_budget"] for r in got["rows"])
    assert nb4["run"] and nb4["images"] == got["rows"][0]["images_requested"]
    assert not nb8["run"] and nb8["reason"].startswith("not run: ")
    md = (tmp_path / "out" / "fleet.md").read_text()
    assert "replayed from a pool of 4 genuine replies" in md
    assert (tmp_path / "out" / "fleet.png").stat().st_size > 0
