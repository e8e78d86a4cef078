"""bench lora: the pure parts (aggregation by hand, tables, report files)."""

from __future__ import annotations

import json

import pytest

from bench import lora as L


def _rec(variant, seed, fids, accs, domains=("a", "b")):
    return {
        "variant": variant,
        "seed": seed,
        "clients": [
            {"partition_id": i, "domain": d, "fid_proxy": f, "accuracy": a}
            for i, (d, f, a) in enumerate(zip(domains, fids, accs, strict=True))
        ],
        "mean_fid_proxy": sum(fids) / len(fids),
        "mean_accuracy": sum(accs) / len(accs),
        "upload_bytes_per_client": 1000.0,
        "download_bytes_per_client": 2000 if variant != "none" else 0,
        "merge_s": 0.5 if variant != "none" else None,
        "merged_rank": 8 if variant != "none" else None,
        "energy_kept": 0.9 if variant == "svd" else None,
    }


@pytest.fixture
def records():
    return [
        _rec("none", 0, [10.0, 20.0], [0.5, 0.7]),
        _rec("none", 1, [12.0, 18.0], [0.6, 0.6]),
        _rec("fedavg", 0, [8.0, 10.0], [0.6, 0.8]),
        _rec("fedavg", 1, [6.0, 12.0], [0.7, 0.7]),
        _rec("svd", 0, [4.0, 6.0], [0.8, 0.9]),
        _rec("svd", 1, [5.0, 5.0], [0.9, 0.8]),
    ]


def test_aggregate_by_hand(records):
    s = L.aggregate(records)
    assert list(s) == ["none", "fedavg", "svd"]
    # none: per-seed means 15 and 15 -> 15, std 0; acc 0.6 and 0.6
    assert s["none"]["mean_fid_proxy"] == pytest.approx(15.0)
    assert s["none"]["std_fid_proxy"] == pytest.approx(0.0)
    # fedavg: per-seed FID means 9 and 9; acc 0.7, 0.7; domain a: (8+6)/2 = 7
    assert s["fedavg"]["mean_fid_proxy"] == pytest.approx(9.0)
    assert s["fedavg"]["per_domain"]["a"]["fid_proxy"] == pytest.approx(7.0)
    assert s["fedavg"]["per_domain"]["b"]["accuracy"] == pytest.approx(0.75)
    # svd: FID means 5 and 5; acc 0.85 and 0.85; energy 0.9
    assert s["svd"]["mean_accuracy"] == pytest.approx(0.85)
    assert s["svd"]["energy_kept"] == pytest.approx(0.9)
    assert s["none"]["merge_s"] is None and s["svd"]["merge_s"] == pytest.approx(0.5)
    assert L.wins(s, "svd", "fedavg") == {"fid_proxy": True, "accuracy": True}
    assert L.wins(s, "none", "fedavg") == {"fid_proxy": False, "accuracy": False}
    assert L.wins(s, "stack", "fedavg") is None


def test_std_over_seeds(records):
    s = L.aggregate(records + [_rec("none", 2, [30.0, 30.0], [0.0, 0.0])])
    # per-seed FID means 15, 15, 30: mean 20, sample std sqrt(75)
    assert s["none"]["mean_fid_proxy"] == pytest.approx(20.0)
    assert s["none"]["std_fid_proxy"] == pytest.approx(75**0.5)


def test_tables_and_report_files(records, tmp_path):
    s = L.aggregate(records)
    table = L.format_table(s)
    assert "| svd | 5.00 ± 0.00 | 85.0 ± 0.0 |" in table
    assert "| none |" in table and "n/a" in table
    dom = L.format_domain_table(s)
    assert "a FID / acc%" in dom and "| fedavg | 7.00 / 65.0 | 11.00 / 75.0 |" in dom
    report = {
        "command": "python -m bench lora --quick",
        "mode": "quick",
        "seeds": [0, 1],
        "num_clients": 2,
        "config": {
            "domains": L.UNSEEN_WORLD,
            "dirichlet-alpha": 0.5,
            "lora-rank": 4,
            "lora-alpha": 4.0,
            "lora-targets": "to_q",
            "lora-steps": 10,
            "lora-merge-rank": 8,
            "images-per-class": 4,
            "num-inference-steps": 5,
            "guidance-scale": 3.0,
        },  # fmt: skip
        "machine": "test",
        "wall_s": 1.0,
        "records": records,
        "summary": s,
        "checks": {"svd beats fedavg": L.wins(s, "svd", "fedavg")},
    }
    L.write_report(tmp_path, report)
    assert json.loads((tmp_path / "lora.json").read_text())["summary"]["svd"]
    md = (tmp_path / "lora.md").read_text()
    assert table in md and "svd beats fedavg" in md
    assert (tmp_path / "lora.png").stat().st_size > 1000


def test_cli_rejects_bad_arguments(capsys):
    assert L.main(["--variants", "svd,bogus"]) == 2
    assert "bogus" in capsys.readouterr().err
    assert L.main(["--set", "lora-merge-rank=0"]) == 2
    assert "lora-merge-rank" in capsys.readouterr().err


def test_world_is_unseen_and_valid():
    from common.config import build_config
    from common.data import UNSEEN_TRANSFORMS, domain_parts

    cfg = build_config(L.WORLD | L.QUICK)
    assert all(domain_parts(d)[1][0] in UNSEEN_TRANSFORMS for d in cfg.domain_list)
    assert set(L.VARIANTS) == {"none", "own", *L.MERGES}


@pytest.mark.slow
@pytest.mark.timeout(300)
def test_one_seed_runs_the_apps_code_paths(tiny_stack, fast_config, tmp_path):
    over = fast_config | L.WORLD | {"lora-steps": 2, "lora-samples-per-class": 1}
    recs = L.run_seed(over, 0, 2, ("none", "stack", "generative", "own"), tmp_path)
    by = {r["variant"]: r for r in recs}
    assert list(by) == ["none", "stack", "generative", "own"]
    for r in recs:
        assert len(r["clients"]) == 2
        assert all(
            0 <= c["accuracy"] <= 1 and c["fid_proxy"] >= 0 for c in r["clients"]
        )
        assert r["upload_bytes_per_client"] > 0
    # stack keeps rank N*r; the merged adapter is what is downloaded
    assert by["stack"]["merged_rank"] == 2 * over["lora-rank"]
    assert by["stack"]["download_bytes_per_client"] > 0
    assert by["none"]["download_bytes_per_client"] == 0
