"""Killed in mid-window on a real deployment, resumed with no upload lost and no
device heard from asked twice (issue 22).

A TLS + node-auth SuperLink (``deploy.cluster``) with three registered SuperNodes:
two hold partitions 0-1 of the run's image folder and are online from the start;
the third is a device with its own data (node config ``data-path``, no
partition) that connects only after the ServerApp died. ``flwr run`` starts the
round with a long collection window and ``target-clients=3``; once the journal
holds an upload, the ServerApp process (a descendant of the SuperLink, through
its SuperExec) gets SIGKILL. ``flwr run`` again with the same ``run-name``
resumes the window: the uploads are kept, their nodes are not asked again, the
late device is asked and its upload used (~55 s alone on 2 cores). The second test
kills the SuperLink itself instead and restarts it on its ``--database``.

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
import re
import shutil
import signal
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

from deploy import cluster as C
from deploy import procs as P

NEEDS_FLOWER = pytest.mark.skipif(
    shutil.which("flower-superlink") is None or shutil.which("openssl") is None,
    reason="needs flower-superlink and openssl on PATH",
)

# Three devices (two early, one late) cover what is checked: an upload kept,
# a node asked but not heard from asked again, a late device asked. (Four, until
# e774a71, cost 14 CPU-s more per test on the 2-core CPU for no other case.)
NODES = 3
LATE = 2  # node index: the device with its own data, started after the kill
RUN_NAME = "resumed"

# A SuperNode's retry invoker logs this once a request goes through again.
RECONNECTED_RE = re.compile(
    r"Connection successful after ([\d.]+) seconds and (\d+) tries"
)


@dataclass
class Deployment:
    """The cluster of both tests, started with the late device held back."""

    cl: C.Cluster
    run_config: str
    run_dir: Path
    ids: list[int]  # node ids in registration order: ids[i] is keys/node-i
    late_id: int
    t0: float


@dataclass
class Killed:
    """The journal when the round was killed, and what it says."""

    before: list[dict]
    kept: set[int]  # nodes whose upload is in the journal
    asked_before: list[int]


def _journal(run_dir: Path) -> list[dict]:
    path = run_dir / "uploads" / "journal.jsonl"
    if not path.is_file():
        return []
    # whole lines only: the ServerApp may be writing the next one
    text = path.read_text()
    return [
        json.loads(line)
        for line in text.splitlines(keepends=True)
        if line.endswith("\n")
    ]


def _serverapps(cluster: C.Cluster) -> list[Any]:
    """The ``flwr-serverapp`` processes under the SuperLink we started."""
    assert cluster.superlink_pid is not None
    return [
        p
        for p in P.process_tree(cluster.superlink_pid)[1:]
        if _program(_cmdline(p)) == "flwr-serverapp"
    ]


def _cmdline(p: Any) -> list[str]:
    import psutil

    try:
        return p.cmdline()
    except psutil.Error:
        return []


def _program(cmdline: list[str]) -> str:
    """``flower-superexec``, ``flwr-serverapp``, ... (the script a python runs)."""
    names = [Path(a).name for a in cmdline[:2]]
    return next((n for n in names if n.startswith(("flwr", "flower"))), "?")


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


@pytest.fixture
def deployment(tmp_path) -> Iterator[Deployment]:
    """Data, the run config and a cluster with nodes 0-1 online, the late
    device registered but not started; every process stopped by PID after."""
    from tiny_stack import make_image_folder

    # The run's image folder (split among the partition nodes) and the late
    # device's own folder; three classes each
    shared = make_image_folder(tmp_path / "shared", 20)
    own = make_image_folder(tmp_path / "device", 8)
    out = tmp_path / "out"
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
        yield Deployment(cl, run_config, out / RUN_NAME, ids, late_id, t0)
    finally:
        cl.stop()
    assert not cl._procs


def _start_round(d: Deployment) -> int:
    """``flwr run`` (two nodes online, the third not yet); returns its run id
    once the journal holds an upload (the window waits for three)."""
    run1 = d.cl.submit_app(d.run_config)
    _wait(
        "an upload in the journal",
        lambda: any(e["event"] == "upload" for e in _journal(d.run_dir)),
        150,
        d.cl.logs_dir,
    )
    return run1


def _killed(d: Deployment) -> Killed:
    """The journal of a round whose ServerApp is dead: open, not closed, an
    upload in, the late device not asked, no results."""
    before = _journal(d.run_dir)
    events = [e["event"] for e in before]
    assert "closed" not in events and events[0] == "open", events
    kept = {e["node_id"] for e in before if e["event"] == "upload"}
    asked_before = [e["node_id"] for e in before if e["event"] == "asked"]
    assert kept and d.late_id not in asked_before
    assert not (d.run_dir / "results.json").exists()
    return Killed(before, kept, asked_before)


def _check_resumed(d: Deployment, k: Killed) -> list[int]:
    """No upload lost, nobody heard from asked again, every node used; returns
    the nodes the resumed run asked."""
    after = _journal(d.run_dir)
    assert after[: len(k.before)] == k.before  # nothing received lost or rewritten
    for e in k.before:  # ... and every upload's file is there, unchanged
        if e["event"] == "upload":
            data = (d.run_dir / "uploads" / e["file"]).read_bytes()
            assert hashlib.sha256(data).hexdigest() == e["sha256"]
    again = [e["node_id"] for e in after[len(k.before) :] if e["event"] == "asked"]
    assert not set(again) & k.kept, (again, k.kept)
    # Asked twice: exactly the nodes asked but not heard from at the kill
    # (their replies, if any, belong to the dead run: Flower hands a run only
    # its own messages). Every node heard from was asked once.
    asked_all = [e["node_id"] for e in after if e["event"] == "asked"]
    twice = {n for n in asked_all if asked_all.count(n) > 1}
    assert twice == set(k.asked_before) - k.kept, (asked_all, k.kept)
    assert max(map(asked_all.count, asked_all)) <= 2
    assert d.late_id in again
    assert [e["event"] for e in after].count("open") == 1  # window start kept
    assert [e["event"] for e in after].count("closed") == 1
    closed = next(e for e in after if e["event"] == "closed")
    assert closed["reason"] == "target-clients"
    uploads = [e["node_id"] for e in after if e["event"] == "upload"]
    assert sorted(uploads) == sorted(d.ids)  # one upload per node, none twice

    res = json.loads((d.run_dir / "results.json").read_text())
    assert res["num_clients"] == NODES
    assert res["fleet"]["valid"] == res["fleet"]["asked"] == sorted(d.ids)
    assert res["fleet"]["rejected"] == [] and res["fleet"]["missing"] == []
    clients = {c["node_id"]: c for c in res["clients"]}
    # the device declared no partition: it gets the id after the declared ones
    assert clients[d.late_id]["partition_id"] == NODES - 1
    assert sorted(c["partition_id"] for c in res["clients"]) == list(range(NODES))
    # every contributor, the early ones too, evaluated the pushed model
    assert all(c["status"] == "ok" for c in res["clients"]), res["clients"]
    return again


def _rerun(d: Deployment) -> C.AppRun:
    """``flwr run`` again with the same run-name; it must complete."""
    run2 = d.cl.run_app(d.run_config, timeout=240)
    assert run2.ok, (
        f"status {run2.status}, flwr exit {run2.returncode}:\n{run2.stdout[-3000:]}"
    )
    return run2


@NEEDS_FLOWER
@pytest.mark.slow
@pytest.mark.timeout(420)
def test_killed_mid_window_resumes_on_a_real_superlink(deployment):
    d, cl = deployment, deployment.cl

    # 1. The first run, until an upload is in
    run1 = _start_round(d)

    # 2. SIGKILL the ServerApp in mid-window
    apps = _serverapps(cl)
    assert len(apps) == 1, [_cmdline(p) for p in apps]
    os.kill(apps[0].pid, signal.SIGKILL)
    _wait("the ServerApp to die", lambda: _gone(apps[0]), 30, cl.logs_dir)
    t_kill = time.monotonic() - d.t0
    k = _killed(d)
    status1 = cl.run_status(run1)
    assert status1 is not None and not status1.startswith("finished:completed")

    # 3. The late device connects; the same run-name runs again
    cl.start_node(LATE)
    run2 = _rerun(d)

    # 4. No upload lost, nobody heard from asked again, every node used
    again = _check_resumed(d, k)
    print(
        f"\nkilled run {run1} at {t_kill:.0f} s with uploads from "
        f"{sorted(k.kept)} (asked {k.asked_before}), status {status1}, now "
        f"{cl.run_status(run1)}; run {run2.run_id} asked {again}; total "
        f"{time.monotonic() - d.t0:.0f} s"
    )


@NEEDS_FLOWER
@pytest.mark.slow
@pytest.mark.timeout(420)
def test_superlink_killed_mid_window_restarts_on_its_database(deployment):
    """The SuperLink itself SIGKILLed in mid-window and restarted on its
    ``--database`` (same port, certificates, node auth); ``flwr run`` again with
    the same run-name resumes the round (~80 s alone on 2 cores).

    What Flower 1.41 does (subprocess isolation, as seen here):

    * The SuperExec (started by the SuperLink with ``--parent-pid``) and the
      ServerApp (started by the SuperExec with ``--parent-pid``) check their
      parent's pid every 0.2 s and SIGINT themselves once it is gone: the
      SuperExec ends 1-3 s after the SuperLink was reaped, the ServerApp 8-12 s
      after (its exit handler tries once to push its task output and logs to the
      dead SuperLink). The run dies with its SuperLink. But a SuperLink killed
      and *not reaped* (a zombie holds its pid) leaves both running; the
      ServerApp's Grid retries without limit and, once a new SuperLink is up on
      the same database and port, carries the run on to its end (seen in a
      one-off experiment, not asserted here). ``Cluster.kill_superlink`` reaps,
      as systemd, a shell or Docker do.
    * The database keeps the nodes: the same node ids, their registered public
      keys, the held-back device still ``registered``. The SuperNodes are not
      registered again and do not activate again: they retry (backoff doubling
      to at most 20 s, no limit on tries or time unless ``--max-retries`` /
      ``--max-wait-time``) and go on under their old ids 15-25 s after the kill
      (4-8 tries). The device registered before the restart, never connected,
      activates on the new SuperLink with its old key.
    * The old run is not relaunched (the new SuperExec takes only pending
      tasks) and not failed at once: ``flwr ls`` says ``running`` until its
      task's heartbeat expires (2 x 30 s after the last one), then
      ``finished:failed``.

    So the user runs ``flwr run`` again with the same run-name; only the
    journal carries the round over. The checks are the first test's.
    """
    d, cl = deployment, deployment.cl
    orphans: list[Any] = []
    try:
        # 1. The first run, until an upload is in
        run1 = _start_round(d)

        # 2. SIGKILL the SuperLink, reaped at once (as by systemd or a shell);
        # its SuperExec and ServerApp are left to themselves
        assert cl.superlink_pid is not None
        tree = P.process_tree(cl.superlink_pid)[1:]
        orphans += tree  # stopped in the end if alive (psutil checks the pids)
        names = {p.pid: _program(_cmdline(p)) for p in tree}
        assert sorted(names.values()) == ["flower-superexec", "flwr-serverapp"], names
        node_logs = {
            f: f.stat().st_size for f in sorted(cl.logs_dir.glob("supernode-*.log"))
        }
        t_kill = time.monotonic()
        cl.kill_superlink()
        died: dict[str, float] = {}
        P.wait_until(lambda: _record_deaths(tree, names, died, t_kill), 30, 0.05)
        assert sorted(died) == sorted(names.values()), (died, names)
        t_dead = time.monotonic() - d.t0
        k = _killed(d)  # the ServerApp is dead: the journal is final

        # 3. Restart it on the same database, ports, certificates and auth: the
        # nodes and their registered keys are still there, the run is not over
        t_restart = time.monotonic()
        cl.restart_superlink()
        t_up = time.monotonic() - t_restart
        nodes = cl.node_list()
        assert [n for n, _ in nodes] == d.ids, nodes
        assert dict(nodes)[d.late_id] == "registered"
        status1 = cl.run_status(run1)
        assert status1 is not None and not status1.startswith("finished:"), status1

        # 4. The late device, registered before the restart, connects to the new
        # SuperLink. The old run did not come back by itself: no ServerApp runs,
        # and the journal is as the kill left it
        cl.start_node(LATE)
        assert _serverapps(cl) == []
        assert _journal(d.run_dir) == k.before

        # 5. The same run-name runs again (the early nodes reconnect meanwhile)
        run2 = _rerun(d)

        # 6. No upload lost, nobody heard from asked again, every node used
        again = _check_resumed(d, k)

        # 7. Each early SuperNode retried until the new SuperLink answered
        retried = {f.stem: _reconnected(f, size) for f, size in node_logs.items()}
        assert all(retried.values()), retried
        # ... and the old run ends failed once its heartbeat expires (each look
        # is a `flwr ls`, about a CPU-second: every 5 s, not every 2)
        assert P.wait_until(
            lambda: cl.run_status(run1) == "finished:failed",
            max(5.0, 90 - (time.monotonic() - t_kill)),
            5.0,
        ), cl.run_status(run1)
        print(
            f"\nSuperLink killed {t_kill - d.t0:.0f} s in, uploads from "
            f"{sorted(k.kept)} (asked {k.asked_before}); its descendants died "
            f"{ {n: round(t, 1) for n, t in died.items()} } s after; restarted in "
            f"{t_up:.1f} s (run {run1} {status1}, nodes {nodes}); nodes "
            f"reconnected (s, tries) {retried}; run {run2.run_id} asked {again}; "
            f"run {run1} finished:failed; total {time.monotonic() - d.t0:.0f} s "
            f"(dead at {t_dead:.0f} s)"
        )
    finally:
        # whatever outlived the SuperLink we killed (the fixture stops the new one)
        P.stop_processes([p for p in orphans if not _gone(p)], 10)


def _record_deaths(
    procs: list[Any], names: dict[int, str], died: dict[str, float], t0: float
) -> bool:
    """Note when each of ``procs`` ended; whether all have."""
    for p in procs:
        if names[p.pid] not in died and _gone(p):
            died[names[p.pid]] = time.monotonic() - t0
    return len(died) == len(procs)


def _reconnected(log: Path, offset: int) -> tuple[float, int] | None:
    """(seconds, tries) of the last reconnection a SuperNode logged after
    ``offset`` of its log, or None."""
    with open(log, errors="replace") as f:
        f.seek(offset)
        found = RECONNECTED_RE.findall(f.read())
    return (float(found[-1][0]), int(found[-1][1])) if found else None
