"""bench lora: the pure parts (aggregation by hand, tables, report files)."""

from __future__ import annotations

import json

import pytest

from bench.lora import cli, runner
from bench.lora import report as R
from bench.lora import summary as S
from bench.lora import world as W


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
    s = S.aggregate(records)
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
    assert S.wins(s, "svd", "fedavg") == {"fid_proxy": True, "accuracy": True}
    assert S.wins(s, "none", "fedavg") == {"fid_proxy": False, "accuracy": False}
    assert S.wins(s, "stack", "fedavg") is None


def test_std_over_seeds(records):
    s = S.aggregate(records + [_rec("none", 2, [30.0, 30.0], [0.0, 0.0])])
    # per-seed FID means 15, 15, 30: mean 20, sample std sqrt(75)
    assert s["none"]["mean_fid_proxy"] == pytest.approx(20.0)
    assert s["none"]["std_fid_proxy"] == pytest.approx(75**0.5)


def test_seed_wins_are_paired_by_seed(records):
    # svd vs fedavg, seed 0: FID 5 vs 9, acc 0.85 vs 0.70; seed 1: FID 5 vs 9,
    # acc 0.85 vs 0.70 -> wins 2/2, mean differences -4 and +0.15.
    w = S.seed_wins(records, "svd", "fedavg")
    assert w == {
        "seeds": 2,
        "fid_proxy_wins": 2,
        "accuracy_wins": 2,
        "mean_fid_proxy_diff": pytest.approx(-4.0),
        "mean_accuracy_diff": pytest.approx(0.15),
    }
    # none vs fedavg: FID 15 vs 9 (worse) both seeds; acc 0.6 vs 0.7 both seeds
    w = S.seed_wins(records, "none", "fedavg")
    assert (w["fid_proxy_wins"], w["accuracy_wins"]) == (0, 0)
    # a seed one variant lacks is not compared
    assert S.seed_wins(records[:-1], "svd", "fedavg")["seeds"] == 1
    assert S.seed_wins(records, "stack", "fedavg") is None


def test_paired_diffs_by_hand(records):
    d = S.paired_diffs(records)
    assert set(d) == {"none", "svd"}  # fedavg is the base
    # seed 0: svd FID 5 - 9 = -4, acc 0.85 - 0.70 = 0.15; none: 15 - 9, 0.6 - 0.7
    assert d["svd"][0] == pytest.approx((-4.0, 0.15))
    assert d["none"][1] == pytest.approx((6.0, -0.1))


def test_checks_name_each_challenger_present(records):
    # stack = a copy of none (worse than fedavg on both); generative: not run
    recs = records + [
        r | {"variant": "stack"} for r in records if r["variant"] == "none"
    ]
    chk = S.checks(recs, S.aggregate(recs))
    assert list(chk) == ["stack vs fedavg", "svd vs fedavg"]
    stack, svd = R.format_checks(chk)
    assert svd.startswith("* svd vs fedavg: beats fedavg on the means")
    assert "lower FID-proxy in 2/2, higher accuracy in 2/2" in svd
    assert "-4.00 FID-proxy, +15.0 accuracy points" in svd
    assert stack.startswith("* stack vs fedavg: does NOT beat fedavg on the means")
    assert "(FID-proxy not lower, accuracy not higher)" in stack
    assert "lower FID-proxy in 0/2, higher accuracy in 0/2" in stack


def test_tables_and_report_files(records, tmp_path):
    s = S.aggregate(records)
    table = R.format_table(s)
    assert "| svd | 5.00 ± 0.00 | 85.0 ± 0.0 |" in table
    assert "| none |" in table and "n/a" in table
    dom = R.format_domain_table(s)
    assert "a FID / acc%" in dom and "| fedavg | 7.00 / 65.0 | 11.00 / 75.0 |" in dom
    report = {
        "command": "python -m bench lora --quick",
        "mode": "quick",
        "world": "shared",
        "seeds": [0, 1],
        "num_clients": 2,
        "config": {
            "domains": W.WORLDS["shared"],
            "dirichlet-alpha": 0.5,
            "max-examples-per-client": 800,
            "test-fraction": 0.2,
            "lora-rank": 4,
            "lora-alpha": 4.0,
            "lora-targets": "to_q",
            "lora-init": "shared",
            "lora-steps": 10,
            "lora-batch-size": 32,
            "lora-merge-rank": 8,
            "images-per-class": 4,
            "num-inference-steps": 5,
            "guidance-scale": 3.0,
        },
        "machine": "test",
        "wall_s": 1.0,
        "records": records,
        "summary": s,
        "checks": S.checks(records, s),
    }
    R.write_report(tmp_path, report)
    assert json.loads((tmp_path / "lora.json").read_text())["summary"]["svd"]
    md = (tmp_path / "lora.md").read_text()
    assert table in md and "* svd vs fedavg: beats fedavg" in md
    assert "world **shared**" in md and "init `shared`" in md
    assert (tmp_path / "lora.png").stat().st_size > 1000


def test_cli_rejects_bad_arguments(capsys):
    assert cli.main(["--variants", "svd,bogus"]) == 2
    assert "bogus" in capsys.readouterr().err
    assert cli.main(["--set", "lora-merge-rank=0"]) == 2
    assert "lora-merge-rank" in capsys.readouterr().err


def test_cli_rejects_unknown_world(capsys):
    with pytest.raises(SystemExit):
        cli.main(["--world", "bogus"])
    assert "invalid choice: 'bogus'" in capsys.readouterr().err


@pytest.mark.parametrize("world", sorted(W.WORLDS))
def test_worlds_are_unseen_and_valid(world):
    from common.mnist_domains import UNSEEN_TRANSFORMS, domain_parts
    from methods import build_config

    cfg = build_config(W.WORLD | W.QUICK | {"domains": W.WORLDS[world]})
    transforms = [domain_parts(d)[1] for d in cfg.domain_list]
    assert all(t and set(t) <= set(UNSEEN_TRANSFORMS) for t in transforms)
    if world == "shared":  # one new domain for every client, each in its style
        assert len({t for t in transforms}) == 1
        assert len({domain_parts(d)[0] for d in cfg.domain_list}) == 4
    else:  # a different new concept per client
        assert len({t for t in transforms}) == len(transforms)
    assert set(W.VARIANTS) == {"none", "own", *W.MERGES}


@pytest.mark.slow
@pytest.mark.timeout(300)
def test_one_seed_runs_the_apps_code_paths(tiny_stack, fast_config, tmp_path):
    over = fast_config | W.WORLD | {"lora-steps": 2, "lora-samples-per-class": 1}
    recs = runner.run_seed(over, 0, 2, ("none", "stack", "generative", "own"), tmp_path)
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
