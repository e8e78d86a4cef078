"""Shared fixtures. Everything runs offline: no hub access is attempted."""

from __future__ import annotations

import copy
import json
import os
import sys
import tempfile
from dataclasses import dataclass
from pathlib import Path

import pytest
import tomllib
import torch

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("FLWR_TELEMETRY_ENABLED", "0")
os.environ.setdefault("FLWR_DISABLE_UPDATE_CHECK", "1")
# Under pytest-xdist (pyproject's addopts: ``-n auto``) each worker gets one
# intra-op thread: the workers already fill the cores, and oversubscribed
# torch threads only make every test slower.
WORKER = os.environ.get("PYTEST_XDIST_WORKER")
torch.set_num_threads(1 if WORKER else 2)
if WORKER:  # ... and so do the processes the tests start (flwr runs, ServerApps)
    os.environ.setdefault("OMP_NUM_THREADS", "1")
# Partitions kept on disk (common.datasets.partitions) go to a folder of this
# machine's temp dir, not the user's cache; the processes tests start inherit it
os.environ.setdefault(
    "ONESHOT_PARTITION_CACHE",
    str(Path(tempfile.gettempdir()) / f"oneshot-fl-test-partitions-{os.getuid()}"),
)

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(Path(__file__).parent))


# The methods' own work, shrunk for tests: a round test checks the plumbing,
# not the accuracy these buy (``python -m bench accuracy`` measures that).
FAST_METHOD_KEYS = {
    "dense-g-steps": 2,
    "dense-synthesis-batch-size": 16,
    "guha-distill-images": 60,
    "guha-validation-images": 30,
    "dosfl-iterations": 3,
    "dosfl-epochs": 1,
    "dosfl-server-epochs": 2,
    "feddisc-map-pairs": 100,
    "feddiff-finetune-steps": 2,
    "feddeo-batch-size": 16,
    "fedbip-concept-steps": 2,
    "fedbip-instances-per-class": 4,
    "fedld-em-iters": 5,
}


def tiny_dense_settings(**changes):
    """DENSE's two phases at the smallest sizes (``run_dense`` tests), with
    ``changes`` on top."""
    from methods.dense.server_dense import DenseSettings

    base = dict(
        epochs=1,
        g_steps=1,
        batch=2,
        lr_g=1e-3,
        nz=4,
        ngf=2,
        bn=1,
        oh=1,
        adv=1,
        temperature=1,
        lr=0.01,
        kd_batch=2,
        seed=0,
    )
    return DenseSettings(**(base | changes))


def default_run_config() -> dict:
    with open(ROOT / "pyproject.toml", "rb") as f:
        return dict(tomllib.load(f)["tool"]["flwr"]["app"]["config"])


@pytest.fixture(scope="session")
def tiny_stack_dir(tmp_path_factory) -> Path:
    """The tiny random stack, built once per test session: under pytest-xdist
    the first worker to need it builds it (about 8 s) in the directory the
    workers share, the others wait for it and read it."""
    from filelock import FileLock
    from tiny_stack import make_tiny_stack

    if not WORKER:
        return make_tiny_stack(tmp_path_factory.mktemp("tiny_stack"))
    shared = tmp_path_factory.getbasetemp().parent  # the same for every worker
    root, done = shared / "tiny_stack", shared / "tiny_stack.done"
    with FileLock(str(shared / "tiny_stack.lock")):
        if not done.is_file():
            make_tiny_stack(root)
            done.touch()
    return root


@pytest.fixture
def tiny_stack(tiny_stack_dir, monkeypatch) -> Path:
    """Point the 'embedded' roles at tiny random models (fast round tests)."""
    monkeypatch.setenv("ONESHOT_EMBEDDED_DIR", str(tiny_stack_dir))
    return tiny_stack_dir


def fast_run_config(out: Path) -> dict:
    """The default run config, shrunk so a whole round takes seconds; results
    under ``out``."""
    rc = default_run_config()
    rc.update(
        {
            "max-examples-per-client": 120,
            "images-per-class": 3,
            "num-inference-steps": 2,
            "train-epochs": 1,
            "local-epochs": 1,
            "output-dir": str(out),
            "min-clients": 2,
            "lora-steps": 2,
            "lora-samples-per-class": 2,
            # the global test set at 20 images per class and domain, not 100:
            # every round of the suite evaluates on it (0.5 CPU-s a round)
            "global-test-per-class": 20,
        }
        | FAST_METHOD_KEYS
    )
    return rc


@pytest.fixture
def fast_config(tmp_path) -> dict:
    """The default run config, shrunk so a whole round takes seconds."""
    return fast_run_config(tmp_path / "out")


@dataclass(frozen=True)
class FastRound:
    """One uninterrupted in-process round of ``fast_run_config`` on 3 nodes."""

    config: dict
    returned: dict  # what ``run_one_shot`` returned
    run_dir: Path
    sent: list  # (node id, message type) of every message, in order
    nodes: list  # the grid's node ids

    @property
    def on_disk(self) -> dict:
        """``results.json`` as the round wrote it."""
        return json.loads((self.run_dir / "results.json").read_text())


class FastRounds:
    """``fast_rounds(method)``: the fast round of ``method``, run once per test
    process and shared by the tests that only read it (the tests of one method
    run on one xdist worker: ``xdist_group(f"method-{method}")``). Each call
    returns a deep copy; the run directory is read-only by convention."""

    def __init__(self, out: Path) -> None:
        self.out = out
        self.done: dict[str, FastRound] = {}

    def __call__(self, method: str) -> FastRound:
        if method not in self.done:
            from fakegrid import FakeGrid

            from client_app.app import app
            from methods import build_config
            from server_app.round import run_one_shot

            rc = fast_run_config(self.out) | {
                "method": method,
                "run-name": f"run-{method}",
            }
            grid = FakeGrid(app, 3, rc)
            returned = run_one_shot(grid, build_config(rc), "run")
            run_dir = self.out / f"run-{method}"
            self.done[method] = FastRound(
                rc, returned, run_dir, list(grid.sent), list(grid.nodes)
            )
        return copy.deepcopy(self.done[method])


@pytest.fixture(scope="session")
def _fast_rounds(tmp_path_factory) -> FastRounds:
    return FastRounds(tmp_path_factory.mktemp("fast-rounds"))


@pytest.fixture
def fast_rounds(_fast_rounds, tiny_stack) -> FastRounds:
    """The shared fast round of each method (see ``FastRounds``)."""
    return _fast_rounds


def method_group(method: str) -> pytest.MarkDecorator:
    """The xdist group of ``method``'s tests that share its fast round."""
    return pytest.mark.xdist_group(f"method-{method}")


def by_method(methods) -> list:
    """``parametrize`` values of ``methods``, each in its method's group."""
    return [pytest.param(m, marks=method_group(m)) for m in methods]


def pytest_xdist_auto_num_workers(config) -> int:
    """``-n auto``: one worker per core plus one.

    Many tests wait on subprocesses (``flwr run``, SuperLinks, the browser) and
    leave their core idle meanwhile; one extra worker fills that time.
    """
    return (os.cpu_count() or 1) + 1


def pytest_collection_modifyitems(config, items) -> None:
    """Start the long end-to-end tests first so that no worker ends the run
    alone on one of them (xdist hands out tests in collection order)."""
    items.sort(key=lambda item: item.get_closest_marker("slow") is None)
