"""Shared fixtures. Everything runs offline: no hub access is attempted."""

from __future__ import annotations

import os
import sys
from pathlib import Path

import pytest
import tomllib
import torch

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("FLWR_TELEMETRY_ENABLED", "0")
os.environ.setdefault("FLWR_DISABLE_UPDATE_CHECK", "1")
torch.set_num_threads(2)

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(Path(__file__).parent))


def default_run_config() -> dict:
    with open(ROOT / "pyproject.toml", "rb") as f:
        return dict(tomllib.load(f)["tool"]["flwr"]["app"]["config"])


@pytest.fixture(scope="session")
def tiny_stack_dir(tmp_path_factory) -> Path:
    from tiny_stack import make_tiny_stack

    return make_tiny_stack(tmp_path_factory.mktemp("tiny_stack"))


@pytest.fixture
def tiny_stack(tiny_stack_dir, monkeypatch) -> Path:
    """Point the 'embedded' roles at tiny random models (fast round tests)."""
    monkeypatch.setenv("ONESHOT_EMBEDDED_DIR", str(tiny_stack_dir))
    return tiny_stack_dir


@pytest.fixture
def fast_config(tmp_path) -> dict:
    """The default run config, shrunk so a whole round takes seconds."""
    rc = default_run_config()
    rc.update(
        {
            "max-examples-per-client": 120,
            "images-per-class": 3,
            "num-inference-steps": 2,
            "train-epochs": 1,
            "local-epochs": 1,
            "output-dir": str(tmp_path / "out"),
            "min-clients": 2,
            "lora-steps": 2,
            "lora-samples-per-class": 2,
            "fedlmg-images-per-class": 3,
        }
    )
    return rc
