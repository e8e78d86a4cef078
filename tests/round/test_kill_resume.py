"""Kill the ServerApp, re-run with the same run name: it resumes from what was
persisted, contacts no client for its upload again, and writes the same
results.json as an uninterrupted run (timings aside). At two points: right after
the server work (before its checkpoint: the work is redone from the persisted
uploads) and right after the checkpoint (the push and the evaluation use the
checkpointed output: model, pushed arrays, push config).

Two tests, split by what each one proves:

* For every registered method, in this process: the round is interrupted at the
  first point by an exception no handler catches (``Interrupted`` derives from
  ``BaseException``, as ``KeyboardInterrupt`` does), resumed on the same run
  directory and interrupted at the second, then resumed to the end. This checks
  that every method's uploads and output survive the journal and the checkpoint.
* For three methods that cover the three kinds of output (synthesized set and
  classifier: oscar; averaged weights: fedavg; merged adapter: lora), the round is
  its own Python process killed by SIGKILL at each point in turn, so nothing gets
  to clean up (no ``finally``, no buffered write flushed); the last resume runs
  here.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from conftest import by_method
from fakegrid import FakeGrid

from client_app.app import app
from methods import METHODS, build_config
from server_app import persist
from server_app.round import run_one_shot

ROOT = Path(__file__).resolve().parents[2]
MODES = ("kill-after-work", "kill-after-checkpoint")
NODES = 3

SCRIPT = """
import json, os, signal, sys
sys.path.insert(0, "tests")
from fakegrid import FakeGrid
from client_app.app import app
from methods import METHODS, build_config
from server_app import persist
from server_app.round import run_one_shot

rc, mode = json.loads(sys.argv[1]), sys.argv[2]


def then_die(fn):
    def wrapped(*args, **kwargs):
        fn(*args, **kwargs)
        os.kill(os.getpid(), signal.SIGKILL)
    return wrapped


if mode == "kill-after-work":  # the work is done, its checkpoint is not written
    cls = METHODS[rc["method"]]
    cls.server_work = then_die(cls.server_work)
elif mode == "kill-after-checkpoint":
    persist.save_output = then_die(persist.save_output)
run_one_shot(FakeGrid(app, int(sys.argv[3]), rc), build_config(rc), "run")
"""


class Interrupted(BaseException):
    """Stands in for SIGKILL in this process: no ``except Exception`` catches it."""


def _then_interrupt(fn):
    def wrapped(*args, **kwargs):
        fn(*args, **kwargs)
        raise Interrupted

    return wrapped


def _run(rc: dict) -> tuple[dict, list]:
    """One round in this process: (results.json, the messages sent)."""
    grid = FakeGrid(app, NODES, rc)
    run_one_shot(grid, build_config(rc), "run")
    res = json.loads(
        (Path(rc["output-dir"]) / rc["run-name"] / "results.json").read_text()
    )
    return res, grid.sent


def _journal(run_dir: Path) -> list[dict]:
    text = (run_dir / "uploads" / "journal.jsonl").read_text()
    return [json.loads(line) for line in text.splitlines()]


def _comparable(res: dict) -> dict:
    res = json.loads(json.dumps(res))
    res.pop("timings_s")
    res["config"].pop("run-name")
    res["config"].pop("output-dir")  # the reference is the shared fast round
    res.pop("download_bytes_per_client", None)  # the resumed run sends no collect
    res.pop("download_bytes", None)
    res.pop("device", None)
    for c in res["clients"]:  # the clients' own timings (client-s, caption-s-per-image)
        for part in ("metrics", "evaluation"):
            for key in [
                k for k in c.get(part, {}) if k.endswith("-s") or "-s-per-" in k
            ]:
                c[part].pop(key)
    return res


def _check_interrupted(run_dir: Path, method: str) -> None:
    """What a killed round leaves: the journal of every upload, no results."""
    assert not (run_dir / "results.json").exists()
    journal = _journal(run_dir)
    assert journal[0]["method"] == method and journal[-1]["event"] == "closed"
    assert len([e for e in journal if e["event"] == "upload"]) == NODES


def _check_resumed(method: str, reference: dict, resumed: dict, sent: list) -> None:
    """The resumed round asked no client for its upload again and ended where an
    uninterrupted round ends."""
    cls = METHODS[method]
    assert all(t != cls.collect_type for _, t in sent)
    assert {t for _, t in sent} == ({cls.evaluate_type} if cls.evaluate_type else set())
    assert _comparable(reference) == _comparable(resumed)


@pytest.mark.timeout(600)
@pytest.mark.parametrize("method", by_method(sorted(METHODS)))
def test_interrupted_round_resumes_to_the_same_results(
    method, fast_rounds, fast_config, monkeypatch
):
    """One run directory, interrupted twice: right after the server work, then
    (resumed: the work redone from the journal, no client asked for its upload)
    right after the checkpoint; resumed once more, it ends where an
    uninterrupted round ends."""
    fast_config["method"] = method
    out = Path(fast_config["output-dir"])
    reference = fast_rounds(method).on_disk  # the uninterrupted round
    cls = METHODS[method]
    rc = fast_config | {"run-name": "interrupted"}

    # 1. Interrupted after the server work, before its checkpoint
    with monkeypatch.context() as patch:
        patch.setattr(cls, "server_work", _then_interrupt(cls.server_work))
        with pytest.raises(Interrupted):
            run_one_shot(FakeGrid(app, NODES, rc), build_config(rc), "run")
    _check_interrupted(out / "interrupted", method)

    # 2. Resumed (the work redone from the persisted uploads), interrupted right
    #    after the checkpoint
    grid = FakeGrid(app, NODES, rc)
    with monkeypatch.context() as patch:
        patch.setattr(persist, "save_output", _then_interrupt(persist.save_output))
        with pytest.raises(Interrupted):
            run_one_shot(grid, build_config(rc), "run")
    assert all(t != cls.collect_type for _, t in grid.sent)
    _check_interrupted(out / "interrupted", method)

    # 3. Resumed from the checkpoint: the push, the evaluation, the results
    resumed, sent = _run(rc)
    _check_resumed(method, reference, resumed, sent)


@pytest.mark.slow
@pytest.mark.timeout(600)
@pytest.mark.parametrize(
    "method",
    by_method(("fedavg", "lora", "oscar")),
)
def test_killed_process_resumes_to_the_same_results(method, fast_rounds, fast_config):
    fast_config["method"] = method
    out = Path(fast_config["output-dir"])
    reference = fast_rounds(method).on_disk  # the uninterrupted round

    # Killed after the work; killed again, resumed, after the checkpoint; resumed
    # here to the end (one run directory, as in the in-process test)
    rc = fast_config | {"run-name": "killed"}
    for mode in MODES:
        killed = subprocess.run(
            [sys.executable, "-c", SCRIPT, json.dumps(rc), mode, str(NODES)],
            cwd=ROOT,
            # as many intra-op threads as this process: the same float sums
            env=os.environ | {"OMP_NUM_THREADS": str(torch.get_num_threads())},
            capture_output=True,
            text=True,
            timeout=300,
        )
        assert killed.returncode == -signal.SIGKILL, (mode, killed.stderr[-2000:])
        _check_interrupted(out / "killed", method)
    resumed, sent = _run(rc)
    _check_resumed(method, reference, resumed, sent)
