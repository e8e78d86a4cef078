"""Killed in mid-window on a real deployment, resumed with no upload lost and no
device heard from asked twice (issue 22).

A TLS + node-auth SuperLink (``deploy.cluster``) with four registered SuperNodes:
three hold partitions 0-2 of the run's image folder and are online from the start;
the fourth is a device with its own data (node config ``data-path``, no
partition) that connects only after the ServerApp died. ``flwr run`` starts the
round with a long collection window and ``target-clients=4``; once the journal
holds an upload, the ServerApp process (a descendant of the SuperLink, through
its SuperExec) gets SIGKILL. ``flwr run`` again with the same ``run-name``
resumes the window: the uploads are kept, their nodes are not asked again, the
late device is asked and its upload used (~100 s on 2 cores).

Node ids belong to the node, not to the run: with node auth, Flower 1.41 creates
a node's id when its public key is registered (``flwr supernode register``) and
the SuperNode gets it back on activation, so the ids in the first run's journal
are the ids the second run sees. Messages, though, belong to the run: a reply
still in flight at the kill goes to the dead run (the SuperLink hands a ServerApp
only its own run's replies), so a node asked but not heard from is asked again.
The dead run stays ``running`` until its heartbeat expires (about a minute),
then ends ``finished:failed``.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import signal
import time
from pathlib import Path
from typing import Any

import pytest

from deploy import cluster as C
from deploy import procs as P

NEEDS_FLOWER = pytest.mark.skipif(
    shutil.which("flower-superlink") is None or shutil.which("openssl") is None,
    reason="needs flower-superlink and openssl on PATH",
)

NODES = 4
LATE = 3  # node index: the device with its own data, started after the kill
RUN_NAME = "resumed"


def _journal(run_dir: Path) -> list[dict]:
    path = run_dir / "uploads" / "journal.jsonl"
    if not path.is_file():
        return []
    # whole lines only: the ServerApp may be writing the next one
    text = path.read_text()
    return [json.loads(line) for line in text.splitlines(keepends=True)
            if line.endswith("\n")]  # fmt: skip


def _serverapps(cluster: C.Cluster) -> list[Any]:
    """The ``flwr-serverapp`` processes under the SuperLink we started."""
    assert cluster.superlink_pid is not None
    return [
        p
        for p in P.process_tree(cluster.superlink_pid)[1:]
        if any(Path(a).name == "flwr-serverapp" for a in _cmdline(p))
    ]


def _cmdline(p: Any) -> list[str]:
    import psutil

    try:
        return p.cmdline()
    except psutil.Error:
        return []


def _gone(p: Any) -> bool:
    """Ended (a zombie counts: its parent, the SuperExec, reaps it when it likes)."""
    import psutil

    try:
        return p.status() == psutil.STATUS_ZOMBIE
    except psutil.NoSuchProcess:
        return True


def _wait(what: str, ready: Any, timeout_s: float, logs: Path) -> None:
    if not P.wait_until(ready, timeout_s, 0.2):
        tails = "\n".join(
            f"--- {f.name}\n{P.log_tail(f, 15)}" for f in sorted(logs.glob("*.log"))
        )
        raise AssertionError(f"timed out after {timeout_s:.0f} s: {what}\n{tails}")


@NEEDS_FLOWER
@pytest.mark.slow
@pytest.mark.timeout(420)
def test_killed_mid_window_resumes_on_a_real_superlink(tmp_path):
    from tiny_stack import make_image_folder

    # 1. Data: the run's image folder (split among the partition nodes) and the
    # late device's own folder; three classes each
    shared = make_image_folder(tmp_path / "shared", 20)
    own = make_image_folder(tmp_path / "device", 8)
    out = tmp_path / "out"
    run_dir = out / RUN_NAME
    cl = C.Cluster(
        tmp_path / "cluster",
        NODES,
        env={"OMP_NUM_THREADS": "1"},
        node_configs={LATE: f'data-path="{own}"'},
    )
    run_config = " ".join(
        f"{k}={json.dumps(v)}"
        for k, v in {
            "method": "fedavg",
            "dataset": str(shared),
            "partition": "iid",
            "max-examples-per-client": 60,
            "local-epochs": 1,
            "images-per-class": 2,
            "num-inference-steps": 2,
            "train-epochs": 1,
            "collect-window-s": 300.0,
            "collect-quiet-s": 0.0,
            "target-clients": NODES,
            "min-clients": 2,
            "evaluate-timeout-s": 120.0,
            "run-name": RUN_NAME,
            "output-dir": str(out),
        }.items()
    )
    t0 = time.monotonic()
    cl.start(online=NODES - 1)
    try:
        ids = [n for n, _ in cl.node_list()]
        assert len(ids) == NODES, cl.node_list()
        late_id = ids[LATE]
        assert dict(cl.node_list())[late_id] == "registered"  # not online yet

        # 2. The first run: three nodes online, the fourth not yet
        run1 = cl.submit_app(run_config)
        _wait(
            "an upload in the journal",
            lambda: any(e["event"] == "upload" for e in _journal(run_dir)),
            150,
            cl.logs_dir,
        )

        # 3. SIGKILL the ServerApp in mid-window (the window waits for 4 uploads)
        apps = _serverapps(cl)
        assert len(apps) == 1, [_cmdline(p) for p in apps]
        os.kill(apps[0].pid, signal.SIGKILL)
        _wait("the ServerApp to die", lambda: _gone(apps[0]), 30, cl.logs_dir)
        t_kill = time.monotonic() - t0
        before = _journal(run_dir)
        events = [e["event"] for e in before]
        assert "closed" not in events and events[0] == "open", events
        kept = {e["node_id"] for e in before if e["event"] == "upload"}
        asked_before = [e["node_id"] for e in before if e["event"] == "asked"]
        assert kept and late_id not in asked_before
        assert not (run_dir / "results.json").exists()
        status1 = cl.run_status(run1)
        assert status1 is not None and not status1.startswith("finished:completed")

        # 4. The late device connects; the same run-name runs again
        cl.start_node(LATE)
        run2 = cl.run_app(run_config, timeout=240)
        assert run2.ok, (
            f"status {run2.status}, flwr exit {run2.returncode}:\n{run2.stdout[-3000:]}"
        )

        # 5. No upload lost, nobody heard from asked again, every node used
        after = _journal(run_dir)
        assert after[: len(before)] == before  # nothing received was lost or rewritten
        for e in before:  # ... and every upload's file is there, unchanged
            if e["event"] == "upload":
                data = (run_dir / "uploads" / e["file"]).read_bytes()
                assert hashlib.sha256(data).hexdigest() == e["sha256"]
        again = [e["node_id"] for e in after[len(before) :] if e["event"] == "asked"]
        assert not set(again) & kept, (again, kept)
        # Asked twice: exactly the nodes asked but not heard from at the kill
        # (their replies, if any, belong to the dead run: Flower hands a run only
        # its own messages). Every node heard from was asked once.
        asked_all = [e["node_id"] for e in after if e["event"] == "asked"]
        twice = {n for n in asked_all if asked_all.count(n) > 1}
        assert twice == set(asked_before) - kept, (asked_all, kept)
        assert max(map(asked_all.count, asked_all)) <= 2
        assert late_id in again
        assert [e["event"] for e in after].count("open") == 1  # window start kept
        assert [e["event"] for e in after].count("closed") == 1
        closed = next(e for e in after if e["event"] == "closed")
        assert closed["reason"] == "target-clients"
        uploads = [e["node_id"] for e in after if e["event"] == "upload"]
        assert sorted(uploads) == sorted(ids)  # one upload per node, none twice

        res = json.loads((run_dir / "results.json").read_text())
        assert res["num_clients"] == NODES
        assert res["fleet"]["valid"] == res["fleet"]["asked"] == sorted(ids)
        assert res["fleet"]["rejected"] == [] and res["fleet"]["missing"] == []
        clients = {c["node_id"]: c for c in res["clients"]}
        # the device declared no partition: it gets the id after the declared ones
        assert clients[late_id]["partition_id"] == NODES - 1
        assert sorted(c["partition_id"] for c in res["clients"]) == list(range(NODES))
        # every contributor, the early ones too, evaluated the pushed model
        assert all(c["status"] == "ok" for c in res["clients"]), res["clients"]
        print(
            f"\nkilled run {run1} at {t_kill:.0f} s with uploads from "
            f"{sorted(kept)} (asked {asked_before}), status {status1}, now "
            f"{cl.run_status(run1)}; run {run2.run_id} asked {again}; total "
            f"{time.monotonic() - t0:.0f} s"
        )
    finally:
        cl.stop()
    assert not cl._procs
