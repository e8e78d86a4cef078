"""The collection window over a fleet that is not a LAN at t=0 (issue 22).

Devices connect at different times, some never answer, some answer after the
close, some lose contact; the server may die in mid-window. Every test drives
the real round and the real ClientApp through the in-process harness
(``deploy.inprocess``) on a virtual clock, so a window of minutes costs nothing.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest
from flwr.app import Error, Message
from flwr.common.constant import ErrorCode

from deploy.inprocess import Device, InProcessGrid, run_round

ROOT = Path(__file__).resolve().parents[2]
COLLECT = "train.embed"  # oscar's collect message


def _devices(n: int, **per_node: dict) -> list[Device]:
    """``n`` devices on partitions 0..n-1; ``per_node[str(i)]`` sets device i's fields."""
    out = []
    for p in range(n):
        d = Device(101 + p, {"partition-id": p, "num-partitions": n})
        for k, v in per_node.get(str(p), {}).items():
            setattr(d, k, v)
        out.append(d)
    return out


def _config(fast_config: dict, **over) -> dict:
    return fast_config | {"method": "oscar", "collect-quiet-s": 0.0} | over


def _asked(grid: InProcessGrid) -> list[int]:
    return [n for n, t in grid.sent if t == COLLECT]


def _journal(run_dir: Path) -> list[dict]:
    text = (run_dir / "uploads" / "journal.jsonl").read_text()
    return [json.loads(line) for line in text.splitlines()]


def test_a_device_that_connects_after_min_clients_is_asked_and_used(
    tiny_stack, fast_config
):
    """min-clients=2 is reached at t=0; the third device connects at t=45 s,
    inside the 120 s window: it is asked when it appears and its upload is used."""
    rc = _config(fast_config, **{"min-clients": 2, "collect-window-s": 120.0})
    res, grid = run_round(_devices(3, **{"2": {"arrive_s": 45.0}}), rc)
    assert _asked(grid) == [101, 102, 103]
    assert res["num_clients"] == 3 and res["fleet"]["valid"] == [101, 102, 103]
    assert res["fleet"]["closed_reason"] == "window"
    assert res["fleet"]["window_s"] == pytest.approx(120.0, abs=1.5)
    assert {c["partition_id"] for c in res["clients"]} == {0, 1, 2}


def test_target_clients_closes_the_window_early(tiny_stack, fast_config):
    rc = _config(fast_config, **{"target-clients": 2, "collect-window-s": 600.0})
    res, grid = run_round(_devices(3, **{"2": {"arrive_s": 300.0}}), rc)
    assert res["fleet"]["closed_reason"] == "target-clients"
    assert res["fleet"]["window_s"] < 5
    assert _asked(grid) == [101, 102] and res["num_clients"] == 2


def test_a_quiet_fleet_closes_the_window(tiny_stack, fast_config):
    rc = _config(fast_config, **{"collect-quiet-s": 10.0, "collect-window-s": 600.0})
    res, _ = run_round(_devices(2), rc)
    assert res["fleet"]["closed_reason"] == "quiet"
    assert 10 <= res["fleet"]["window_s"] < 15


def test_silent_late_and_unreachable_devices_are_listed(tiny_stack, fast_config):
    """103 never answers (missing), 104 answers after the close (late, not used),
    105 connects after the close (never asked), 106 loses contact once and is
    asked again when it comes back; the global model goes to contributors only."""
    lost_once = {"n": 0}

    def lose_contact_once(reply: Message, msg: Message) -> Message:
        if lost_once["n"] == 0:
            lost_once["n"] += 1
            return Message(
                Error(ErrorCode.NODE_UNAVAILABLE, "node went away"), reply_to=msg
            )
        return reply

    rc = _config(fast_config, **{"collect-window-s": 60.0})
    devices = _devices(
        6,
        **{
            "0": {"evaluate_s": 30.0},  # the push phase lasts until t=90 s
            "2": {"silent": True},
            "3": {"reply_s": 75.0},  # after the close at 60 s
            "4": {"arrive_s": 100.0},
            "5": {"tamper": lose_contact_once},
        },
    )
    res, grid = run_round(devices, rc)
    f = res["fleet"]
    assert f["valid"] == [101, 102, 106]
    assert f["missing"] == [103] and f["late"] == [104]
    assert f["lost_contact"] == [106] and _asked(grid).count(106) == 2
    assert 105 not in f["asked"] and 105 not in _asked(grid)
    pushed = sorted(n for n, t in grid.sent if t == "evaluate")
    assert pushed == [101, 102, 106]  # contributors only: not 104 (late) nor 103
    statuses = {c["node_id"]: c["status"] for c in res["clients"]}
    assert statuses[103].startswith("excluded: no reply before the window closed")
    assert statuses[104] == "excluded: replied after the window closed (late): not used"


def test_a_device_with_its_own_data_needs_no_partition(
    tiny_stack, fast_config, tmp_path
):
    """Devices started with node-config data-path (their own image folder) have no
    partition id; the round identifies them by node and assigns client ids."""
    from tiny_stack import make_image_folder

    devices = [
        Device(
            900 + i,
            {"data-path": str(make_image_folder(tmp_path / f"dev{i}", 8))},
            arrive_s=5.0 * i,
        )
        for i in range(3)
    ]
    rc = _config(fast_config, dataset=str(tmp_path / "dev0"))
    res, grid = run_round(devices, rc)
    assert res["num_clients"] == 3 and res["fleet"]["valid"] == [900, 901, 902]
    assert sorted(c["partition_id"] for c in res["clients"]) == [0, 1, 2]
    # a device that declares nothing and has no data-path cannot guess the fleet
    lost = Device(950, {})
    res2, _ = run_round(devices[:2] + [lost], rc | {"output-dir": str(tmp_path / "o2")})
    assert [r["node_id"] for r in res2["rejected"]] == [950]
    assert "data-path" in res2["rejected"][0]["reason"]


def test_many_clients_are_summarized_by_domain(tiny_stack, fast_config, caplog):
    """Above 20 clients the log shows one line per domain, not per client; the
    plots stay a fixed size."""
    from PIL import Image

    rc = _config(
        fast_config,
        **{"max-examples-per-client": 40, "partition": "iid", "images-per-class": 1},
    )
    res, _ = run_round(_devices(24), rc)
    assert res["num_clients"] == 24 and len(res["clients"]) == 24
    text = "\n".join(r.getMessage() for r in caplog.records)
    assert "(24 clients; each is listed in results.json)" in text
    run_dir = Path(rc["output-dir"]) / "inprocess"
    width, _ = Image.open(run_dir / "accuracy_per_client.png").size
    assert width < 1500
    _, height = Image.open(run_dir / "synthetic_samples.png").size
    assert height < 2000


# ---------------------------------------------------------------- kill mid-window

SCRIPT = """
import json, os, signal, sys
from deploy.inprocess import Device, VirtualClock, run_round
from server_app import persist

rc, start, kill_after = json.loads(sys.argv[1]), float(sys.argv[2]), int(sys.argv[3])
spec = json.loads(sys.argv[4])  # per device: [arrive_s, reply_s]
devices = [Device(101 + p, {"partition-id": p, "num-partitions": len(spec)},
                  arrive_s=a, reply_s=r) for p, (a, r) in enumerate(spec)]
if kill_after:
    real = persist.Journal.upload
    count = {"n": 0}
    def upload_then_die(self, *args, **kwargs):
        real(self, *args, **kwargs)
        count["n"] += 1
        if count["n"] == kill_after:
            os.kill(os.getpid(), signal.SIGKILL)
    persist.Journal.upload = upload_then_die
# The devices connect at times measured from the window's own start (1e9).
clock = VirtualClock(start)
run_round(
    [Device(d.node_id, d.node_config, arrive_s=d.arrive_s - (start - 1e9),
            reply_s=d.reply_s) for d in devices], rc, clock=clock)
"""


SPREAD = [[0.0, 0.0], [10.0, 0.0], [20.0, 0.0], [30.0, 0.0], [40.0, 0.0]]


def _window_round(
    rc: dict, start: float, kill_after: int, spec: list = SPREAD
) -> subprocess.CompletedProcess:
    """The round in its own process, killed by SIGKILL after ``kill_after``
    uploads are journaled (the resume runs in this process: ``_resume``)."""
    env = os.environ | {"OMP_NUM_THREADS": "1"}
    args = [json.dumps(rc), str(start), str(kill_after), json.dumps(spec)]
    return subprocess.run(
        [sys.executable, "-c", SCRIPT, *args],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )


def _resume(rc: dict, start: float, spec: list = SPREAD) -> list:
    """The re-run after the kill, in this process (the same devices as
    ``SCRIPT``'s, the clock at ``start``): the messages it sent."""
    from deploy.inprocess import VirtualClock

    devices = [
        Device(
            101 + p,
            {"partition-id": p, "num-partitions": len(spec)},
            arrive_s=a - (start - 1e9),
            reply_s=r,
        )
        for p, (a, r) in enumerate(spec)
    ]
    _, grid = run_round(devices, rc, clock=VirtualClock(start))
    return grid.sent


@pytest.mark.timeout(600)
def test_killed_in_mid_window_resumes_losing_nothing_asking_nobody_twice(
    tiny_stack, fast_config
):
    """SIGKILL after the 2nd of 5 uploads (devices connect at 0, 10, .. 40 s of a
    100 s window); the re-run with the same run-name 25 s later keeps both uploads,
    asks neither of their nodes again, asks the node that was asked but not heard
    from again, keeps the window's start, and uses all five uploads."""
    rc = _config(fast_config, **{"collect-window-s": 100.0, "run-name": "mid"})
    run_dir = Path(rc["output-dir"]) / "mid"
    k = _window_round(rc, 1e9, kill_after=2)
    assert k.returncode == -signal.SIGKILL, k.stderr[-2000:]
    before = _journal(run_dir)
    kept = [e["node_id"] for e in before if e["event"] == "upload"]
    assert kept == [101, 102] and not any(e["event"] == "closed" for e in before)

    sent = _resume(rc, 1e9 + 25.0)
    asked_again = [n for n, t in sent if t == COLLECT]
    assert not set(asked_again) & set(kept)  # nobody heard from is asked twice
    assert asked_again == [103, 104, 105]
    after = _journal(run_dir)
    assert after[: len(before)] == before  # nothing received was lost or rewritten
    assert [e["event"] for e in after].count("open") == 1
    res = json.loads((run_dir / "results.json").read_text())
    assert res["num_clients"] == 5 and res["fleet"]["valid"] == [
        101,
        102,
        103,
        104,
        105,
    ]
    assert res["fleet"]["window_s"] == pytest.approx(100.0, abs=1.5)


@pytest.mark.timeout(600)
def test_resumed_after_the_window_ended_closes_at_once(tiny_stack, fast_config):
    """Killed while 103's reply is on its way; back after the window's end: the
    window closes at once with the two uploads it had, 103 listed as missing."""
    rc = _config(fast_config, **{"collect-window-s": 100.0, "run-name": "late"})
    spec = [[0.0, 0.0], [0.0, 0.0], [0.0, 50.0]]
    k = _window_round(rc, 1e9, kill_after=2, spec=spec)
    assert k.returncode == -signal.SIGKILL, k.stderr[-2000:]
    sent = _resume(rc, 1e9 + 200.0, spec)
    assert [n for n, t in sent if t == COLLECT] == []
    res = json.loads((Path(rc["output-dir"]) / "late" / "results.json").read_text())
    assert res["fleet"]["valid"] == [101, 102] and res["fleet"]["missing"] == [103]
    assert res["missing"][0]["reason"] == (
        "asked before the server restarted; not heard from"
    )


def test_a_torn_last_line_is_dropped_and_an_edited_one_refused(tmp_path):
    from server_app.persist import Journal, ResumeError

    j = Journal(tmp_path, "oscar")
    j.open(1e9)
    j.append("asked", node_id=5, at=1e9)
    path = tmp_path / "uploads" / "journal.jsonl"
    with open(path, "a") as f:
        f.write('{"seq": 2, "event": "upl')  # the crash came mid-write
    again = Journal(tmp_path, "oscar")
    assert [e["event"] for e in again.events] == ["open", "asked"]
    again.append("asked", node_id=6, at=1e9 + 1)  # appends stay whole lines
    assert len(Journal(tmp_path, "oscar").events) == 3
    lines = path.read_text().splitlines()
    lines[1] = lines[1].replace('"node_id": 5', '"node_id": 7')
    path.write_text("\n".join(lines) + "\n")
    with pytest.raises(ResumeError, match="line 2 does not match its checksum"):
        Journal(tmp_path, "oscar")
    other = tmp_path / "other"
    Journal(other, "oscar").open(1e9)
    with pytest.raises(ResumeError, match="method='oscar'"):
        Journal(other, "fedavg")


def test_a_second_serverapp_on_one_run_name_is_refused(tmp_path):
    """A killed ServerApp that survived (e.g. its SuperLink was not reaped) and
    its re-run must not both write one journal: the second is refused."""
    from server_app.persist import Journal, ResumeError

    holder = subprocess.Popen(
        [
            sys.executable,
            "-c",
            "import sys, time; from pathlib import Path; "
            "from server_app.persist import Journal; "
            "Journal(Path(sys.argv[1]), 'oscar'); print('held', flush=True); "
            "time.sleep(60)",
            str(tmp_path),
        ],
        cwd=ROOT,
        stdout=subprocess.PIPE,
        text=True,
    )
    try:
        assert holder.stdout is not None and holder.stdout.readline() == "held\n"
        with pytest.raises(
            ResumeError, match=f"in use by another ServerApp \\(pid {holder.pid}\\)"
        ):
            Journal(tmp_path, "oscar")
    finally:
        holder.kill()
        holder.wait()
    Journal(tmp_path, "oscar").open(1e9)  # the lock died with its holder


def test_a_simulation_waits_no_quiet_time_for_nodes_that_cannot_come():
    """Flower's simulation (its in-memory grid) has every node from the start:
    its quiet is one poll at most; any other grid keeps collect-quiet-s, and 0
    stays off everywhere."""
    from flwr.superlink.grid import InMemoryGrid

    from server_app.collect import SIMULATION_QUIET_S, quiet_for

    simulation = InMemoryGrid.__new__(InMemoryGrid)  # its type is what counts
    assert quiet_for(simulation, 10.0) == SIMULATION_QUIET_S == 1.0
    assert quiet_for(simulation, 0.5) == 0.5 and quiet_for(simulation, 0.0) == 0.0
    assert quiet_for(InProcessGrid.__new__(InProcessGrid), 10.0) == 10.0
