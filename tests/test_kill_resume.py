"""Kill the ServerApp, re-run with the same run name: it resumes from what was
persisted, contacts no client for its upload again, and writes the same
results.json as an uninterrupted run (timings aside). For every registered method,
at two points: right after the server work (before its checkpoint: the work is
redone from the persisted uploads) and right after the checkpoint (the push and
the evaluation use the checkpointed output: model, pushed arrays, push config).

Each run is its own Python process (the round with the in-process Grid of
tests/fakegrid.py and the real ClientApp); the killed one dies by SIGKILL, so
nothing gets to clean up.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest

from methods import METHODS

ROOT = Path(__file__).resolve().parents[1]

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
grid = FakeGrid(app, 3, rc)
run_one_shot(grid, build_config(rc), "run")
print("SENT " + json.dumps(grid.sent))
"""


def _round(rc: dict, mode: str) -> subprocess.CompletedProcess:
    env = os.environ | {"OMP_NUM_THREADS": "1"}
    return subprocess.run(
        [sys.executable, "-c", SCRIPT, json.dumps(rc), mode],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=240,
    )


def _journal(run_dir: Path) -> list[dict]:
    text = (run_dir / "uploads" / "journal.jsonl").read_text()
    return [json.loads(line) for line in text.splitlines()]


def _comparable(res: dict) -> dict:
    res = json.loads(json.dumps(res))
    res.pop("timings_s")
    res["config"].pop("run-name")
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


@pytest.mark.slow
@pytest.mark.timeout(900)
@pytest.mark.parametrize("method", sorted(METHODS))
def test_killed_run_resumes_to_the_same_results(method, tiny_stack, fast_config):
    fast_config["method"] = method
    out = Path(fast_config["output-dir"])
    collect = METHODS[method].collect_type

    ref = _round(fast_config | {"run-name": "reference"}, "run")
    assert ref.returncode == 0, ref.stderr[-2000:]
    a = json.loads((out / "reference" / "results.json").read_text())

    for mode in ("kill-after-work", "kill-after-checkpoint"):
        killed = fast_config | {"run-name": mode}
        k = _round(killed, mode)
        assert k.returncode == -signal.SIGKILL, (mode, k.stderr[-2000:])
        run_dir = out / mode
        assert not (run_dir / "results.json").exists()
        journal = _journal(run_dir)
        assert journal[0]["method"] == method and journal[-1]["event"] == "closed"
        assert len([e for e in journal if e["event"] == "upload"]) == 3

        again = _round(killed, "resume")
        assert again.returncode == 0, (mode, again.stderr[-2000:])
        sent = json.loads(again.stdout.split("SENT ", 1)[1])
        assert all(t != collect for _, t in sent), mode  # no upload asked again
        evaluate = METHODS[method].evaluate_type
        assert {t for _, t in sent} == ({evaluate} if evaluate else set()), mode
        b = json.loads((run_dir / "results.json").read_text())
        assert _comparable(a) == _comparable(b), mode
