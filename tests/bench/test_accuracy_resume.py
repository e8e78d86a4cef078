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


# ---------------------------------------------------------------- --sweep


def test_parse_sweep_names_a_bad_value():
    from bench.accuracy.sweep import parse_sweep

    assert parse_sweep("clients=4, 10,50") == ("clients", ["4", "10", "50"])
    for bad in ("clients", "=1,2", "dirichlet-alpha=0.5", "clients=4,x", "a=1,1"):
        with pytest.raises(ValueError, match="--sweep"):
            parse_sweep(bad)


def test_sweep_runs_the_bench_per_value_and_tabulates_intervals(
    tmp_path: Any, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Accuracy 0.5 + images-per-class / 100 + seed / 50, by hand: with 3 images
    seeds 0 and 1 give 0.53 and 0.55, mean 54.0, sd 1.414 points, se 1.0, t(0.975,
    1) = 12.706: [41.3, 66.7]; with 5 images 56.0 [43.3, 68.7]."""

    def fake_centralized(cfg: Any, clients: int) -> tuple[dict[str, Any], float]:
        acc = 0.5 + cfg.images_per_class / 100 + cfg.seed / 50
        return {"mean_accuracy": acc, "global_accuracy": acc}, 1.0

    monkeypatch.setattr(cli, "run_centralized", fake_centralized)
    argv = ["--quick", "--no-fid", "--methods", "centralized", "--seeds", "0-1"]
    out = ["--out", str(tmp_path)]
    assert cli.main([*argv, *out, "--sweep", "images-per-class=3,5"]) == 0
    for v in (3, 5):
        sub = tmp_path / "sweep-images-per-class" / f"images-per-class={v}"
        assert (
            json.loads((sub / "accuracy.json").read_text())["overrides"][
                "images-per-class"
            ]
            == v
        )
    md = (tmp_path / "sweep-images-per-class.md").read_text()
    assert "| centralized | 54.0 [41.3, 66.7] | 56.0 [43.3, 68.7] |" in md
    assert (tmp_path / "sweep-images-per-class.png").stat().st_size > 0
    assert cli.main([*argv, *out, "--sweep", "clients=0,2"]) == 2


@pytest.mark.parametrize("world", ["default", "held-out", "feature-skew"])
def test_every_world_builds_a_valid_run_config(world: str) -> None:
    from bench.accuracy.config import WORLDS, base_overrides
    from bench.run_config import build_cfg

    assert world in WORLDS
    cfg = build_cfg(base_overrides(True, 4, None, world) | {"seed": 0})
    if world != "default":
        assert cfg.domains == "inverted,thick,outline,striped"
    assert (cfg.partition == "iid") == (world == "feature-skew")
