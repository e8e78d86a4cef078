"""Kill the ServerApp during server work, re-run with the same run name: it resumes
from the persisted uploads, contacts no client for them again, and writes the same
results.json as an uninterrupted run (timings aside).

Each run is its own Python process (the round with the in-process Grid of
tests/fakegrid.py and the real ClientApp); the killed one dies by SIGKILL in the
middle of training the global classifier, so nothing gets to clean up.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest

from common import contract as C

ROOT = Path(__file__).resolve().parents[1]

SCRIPT = """
import json, os, signal, sys
sys.path.insert(0, "tests")
from fakegrid import FakeGrid
from client_app.app import app
from common.config import build_config
from server_app.round import run_one_shot
import server_app.methods.oscar as oscar

rc, mode = json.loads(sys.argv[1]), sys.argv[2]
if mode == "kill":
    def die(*args, **kwargs):
        os.kill(os.getpid(), signal.SIGKILL)
    oscar.train_global = die  # dies after synthesis, during training
grid = FakeGrid(app, 3, rc)
run_one_shot(grid, build_config(rc), "run")
print("SENT " + json.dumps(grid.sent))
"""


def _round(rc: dict, mode: str) -> subprocess.CompletedProcess:
    env = os.environ | {"OMP_NUM_THREADS": "1"}
    return subprocess.run(
        [sys.executable, "-c", SCRIPT, json.dumps(rc), mode],
        cwd=ROOT, env=env, capture_output=True, text=True, timeout=240,
    )  # fmt: skip


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


@pytest.mark.timeout(600)
def test_killed_during_training_resumes_to_the_same_results(tiny_stack, fast_config):
    fast_config["method"] = "oscar"
    out = Path(fast_config["output-dir"])

    ref = _round(fast_config | {"run-name": "reference"}, "run")
    assert ref.returncode == 0, ref.stderr[-2000:]

    killed = fast_config | {"run-name": "killed"}
    k = _round(killed, "kill")
    assert k.returncode == -signal.SIGKILL, k.stderr[-2000:]
    run_dir = out / "killed"
    assert not (run_dir / "results.json").exists()
    manifest = json.loads((run_dir / "uploads" / "manifest.json").read_text())
    assert len(manifest["replies"]) == 3

    again = _round(killed, "resume")
    assert again.returncode == 0, again.stderr[-2000:]
    sent = json.loads(again.stdout.split("SENT ", 1)[1])
    assert sent and all(t != C.TRAIN_EMBED for _, t in sent)  # no upload asked again
    assert {t for _, t in sent} == {C.EVALUATE}  # only the global model goes out

    a = json.loads((out / "reference" / "results.json").read_text())
    b = json.loads((run_dir / "results.json").read_text())
    assert _comparable(a) == _comparable(b)
