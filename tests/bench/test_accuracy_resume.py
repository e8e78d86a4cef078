"""``python -m bench accuracy --resume``: a stopped or extended bench reruns
only the missing (method, seed) pairs, and never mixes two setups."""

from __future__ import annotations

import json
from typing import Any

import pytest

from bench.accuracy import cli
from bench.accuracy.resume import kept_runs
from bench.report import code_version

HEADER = {
    "quick": True,
    "world": "held-out",
    "num_clients": 4,
    "overrides": {"a": 1},
    "embedded_checksums": {"x": "1"},
}


def _rec(method: str, seed: int, ok: bool = True, acc: float = 0.5) -> dict[str, Any]:
    return {"method": method, "seed": seed, "ok": ok, "global_accuracy": acc}


def test_kept_runs_keeps_the_successful_wanted_pairs_and_the_latest_of_each() -> None:
    prev = HEADER | {
        "runs": [
            _rec("oscar", 0, acc=0.1),
            _rec("oscar", 0, acc=0.2),  # a rerun of the same pair: the later wins
            _rec("oscar", 1, ok=False),  # failed: run again
            _rec("dense", 0),  # not asked for this time
            _rec("oscar", 7),  # seed not asked for
        ]
    }
    kept = kept_runs(prev, dict(HEADER), ["oscar"], [0, 1])
    assert kept == [_rec("oscar", 0, acc=0.2)]
    # --rerun: a method whose meaning changed is run again, the others kept
    assert kept_runs(prev, dict(HEADER), ["oscar", "dense"], [0], ("oscar",)) == [
        _rec("dense", 0)
    ]


@pytest.mark.parametrize("key", sorted(HEADER))
def test_kept_runs_refuses_another_setup_and_names_the_key(key: str) -> None:
    prev = HEADER | {key: "something else", "runs": [_rec("oscar", 0)]}
    with pytest.raises(ValueError, match=f"'{key}'"):
        kept_runs(prev, dict(HEADER), ["oscar"], [0])


def test_resume_runs_only_the_missing_seeds(
    tmp_path: Any, monkeypatch: pytest.MonkeyPatch
) -> None:
    calls: list[int] = []

    def fake_centralized(cfg: Any, clients: int) -> tuple[dict[str, Any], float]:
        calls.append(cfg.seed)
        return {"mean_accuracy": 0.5 + cfg.seed / 100, "global_accuracy": 0.6}, 1.0

    monkeypatch.setattr(cli, "run_centralized", fake_centralized)
    base = ["--quick", "--no-fid", "--methods", "centralized", "--out", str(tmp_path)]
    assert cli.main([*base, "--seeds", "0"]) == 0
    assert calls == [0]
    assert cli.main([*base, "--seeds", "0-2", "--resume"]) == 0
    assert calls == [0, 1, 2]  # seed 0 kept, not rerun
    report = json.loads((tmp_path / "accuracy.json").read_text())
    assert sorted(r["seed"] for r in report["runs"]) == [0, 1, 2]
    assert report["resumed"]["kept_runs"] == 1
    assert sorted(report["summary"]["centralized"]["seeds"]) == [0, 1, 2]
    assert {r["commit"] for r in report["runs"]} == {code_version()}
    assert (
        cli.main([*base, "--seeds", "0-2", "--resume", "--rerun", "centralized"]) == 0
    )
    assert calls == [0, 1, 2, 0, 1, 2]
    # Another setup in the same folder is refused (exit 2), nothing is run.
    assert cli.main([*base, "--seeds", "0-3", "--resume", "--clients", "5"]) == 2
    assert calls == [0, 1, 2, 0, 1, 2]
