"""The accuracy benchmark's pure parts (aggregation, tables, plot, run-config
strings) on fake results; one optional Flower run through the runner (slow)."""

from __future__ import annotations

import json
import math
import shutil

import pytest

from bench import report as R
from bench import run_config as RC
from bench.accuracy import config as AC
from bench.accuracy import records as AREC
from bench.accuracy import report as AR
from bench.accuracy import tables as T
from bench.flower_runs import (
    LocalSimulation,
    parse_run_config_string,
    run_config_string,
    toml_value,
)


def fake_results(
    mean: float, accs: list[float], upload: float = 0.0, glob: float | None = None
) -> dict:
    domains = ["inverted", "thick", "thin", "rotated"]
    return {
        "mean_accuracy": mean,
        # the global test set: its domains at glob -/+ 0.1
        "global_accuracy": glob,
        "global_accuracy_per_domain": (
            {} if glob is None else {"inverted": glob - 0.1, "thick": glob + 0.1}
        ),
        "global_test_size": 0 if glob is None else 2000,
        "upload_bytes_per_client": upload,
        "upload_bytes_per_class": None,
        "timings_s": {"total": 10.0},
        "clients": [
            {"partition_id": i, "domain": domains[i], "accuracy": a, "status": "ok"}
            for i, a in enumerate(accs)
        ],
    }


@pytest.fixture
def records() -> list[dict]:
    rec = AREC.record_from_results
    return [
        # oscar: per-run means 0.5, 0.7, 0.9 -> mean 0.7, sample std 0.2;
        # global 0.4, 0.5, 0.6 -> mean 0.5, sample std 0.1
        rec("oscar", 0, fake_results(0.5, [0.4, 0.6], glob=0.4), 20.0),
        rec("oscar", 1, fake_results(0.7, [0.6, 0.8], glob=0.5), 30.0),
        rec("oscar", 2, fake_results(0.9, [0.8, 1.0], glob=0.6), 40.0),
        # centralized oracle: 0.8 and 1.0 -> mean 0.9, std sqrt(0.02); global 0.8
        rec(
            "centralized", 0, fake_results(0.8, [0.8, 0.8], glob=0.8), 2.0, "in-process"
        ),
        rec(
            "centralized", 1, fake_results(1.0, [1.0, 1.0], glob=0.8), 4.0, "in-process"
        ),
        # fedavg: one run failed, one ok without a global test set
        rec("fedavg", 0, None, 50.0, error="boom"),
        rec("fedavg", 1, fake_results(0.3, [0.2, 0.4], upload=1000.0), 60.0),
    ]


def test_record_keeps_what_the_benchmark_needs():
    r = AREC.record_from_results(
        "oscar", 3, fake_results(0.5, [0.4, 0.6], 768.0), 12.345
    )
    assert r["ok"] and r["seed"] == 3 and r["wall_s"] == 12.35
    assert r["mean_accuracy"] == 0.5 and r["upload_bytes_per_client"] == 768.0
    assert r["global_accuracy"] is None and r["global_accuracy_per_domain"] == {}
    g = AREC.record_from_results(
        "oscar", 3, fake_results(0.5, [0.4, 0.6], glob=0.3), 1.0
    )
    assert g["global_accuracy"] == 0.3 and g["global_test_size"] == 2000
    assert g["global_accuracy_per_domain"] == pytest.approx(
        {"inverted": 0.2, "thick": 0.4}
    )
    assert [c["accuracy"] for c in r["clients"]] == [0.4, 0.6]
    bad = AREC.record_from_results("oscar", 0, {"mean_accuracy": None}, 1.0)
    assert not bad["ok"] and "mean_accuracy" in bad["error"]


def test_aggregate_mean_std_gap_by_hand(records):
    s = AREC.aggregate(records, ["oscar", "fedavg", "centralized"])
    assert list(s) == ["oscar", "fedavg", "centralized"]
    o = s["oscar"]
    assert o["mean_accuracy"] == pytest.approx(0.7)
    assert o["std"] == pytest.approx(0.2)  # sqrt(((-.2)^2 + 0 + .2^2) / 2)
    assert o["wall_s_per_run"] == pytest.approx(30.0)
    assert o["server_s_per_run"] == pytest.approx(10.0)
    assert o["upload_bytes_per_client"] == 0.0
    # per client: client 0 saw 0.4, 0.6, 0.8 -> 0.6; client 1 saw 0.6, 0.8, 1.0 -> 0.8
    assert [c["accuracy"] for c in o["per_client"]] == pytest.approx([0.6, 0.8])
    assert o["per_client"][0]["domain"] == "inverted"
    assert o["per_domain"] == pytest.approx({"inverted": 0.6, "thick": 0.8})
    c = s["centralized"]
    assert c["mean_accuracy"] == pytest.approx(0.9)
    assert c["std"] == pytest.approx(math.sqrt(0.02))
    assert c["gap_to_oracle"] == pytest.approx(0.0)
    assert c["upload_bytes_per_client"] is None and c["via"] == "in-process"
    assert o["gap_to_oracle"] == pytest.approx(-0.2)
    f = s["fedavg"]
    assert f["failed_seeds"] == [0] and f["seeds"] == [1] and f["runs"] == 2
    assert f["mean_accuracy"] == pytest.approx(0.3) and f["std"] is None
    assert f["gap_to_oracle"] == pytest.approx(-0.6)
    assert f["upload_bytes_per_client"] == 1000.0 and f["wall_s_per_run"] == 60.0
    # the headline: global accuracy over seeds
    assert o["global_accuracy"] == pytest.approx(0.5)
    assert o["global_std"] == pytest.approx(0.1) and o["global_seeds"] == 3
    assert o["global_per_domain"] == pytest.approx({"inverted": 0.4, "thick": 0.6})
    assert c["global_accuracy"] == pytest.approx(0.8) and c["global_std"] == 0.0
    assert o["global_gap_to_oracle"] == pytest.approx(-0.3)
    assert f["global_accuracy"] is None and f["global_seeds"] == 0
    assert f["global_gap_to_oracle"] is None


def test_aggregate_without_oracle_has_no_gap(records):
    s = AREC.aggregate([r for r in records if r["method"] == "oscar"])
    assert s["oscar"]["gap_to_oracle"] is None


def test_tables(records):
    s = AREC.aggregate(records, ["oscar", "fedavg", "centralized"])
    table = T.format_table(s)
    lines = table.splitlines()
    assert lines[0].startswith("| method | mean acc")
    assert "gap to oracle" in lines[0] and "upload B/client" in lines[0]
    assert lines[2] == "| oscar | 70.0 | 20.0 | -20.0 | 0 | n/a | 30.0 |"
    assert lines[3] == "| fedavg (1 failed) | 30.0 | n/a | -60.0 | 1,000 | n/a | 60.0 |"
    assert lines[4].startswith(
        "| centralized (oracle, in-process) | 90.0 | 14.1 | 0 (reference)"
    )
    dom = T.format_domain_table(s).splitlines()
    assert dom[0] == "| method | inverted | thick |"
    assert dom[2] == "| oscar | 60.0 | 80.0 |"
    head = T.format_global_table(s).splitlines()
    assert head[0].startswith("| method | global acc (%) | std (%) | gap to oracle")
    assert head[2] == "| oscar | 50.0 | 10.0 | -30.0 | 0 | n/a | 30.0 |"
    assert head[3] == (
        "| fedavg (1 failed) (1 without global acc) | n/a | n/a | n/a | 1,000 | n/a | 60.0 |"
    )
    assert head[4].startswith(
        "| centralized (oracle, in-process) | 80.0 | 0.0 | 0 (reference)"
    )
    gdom = T.format_global_domain_table(s).splitlines()
    assert gdom[0] == "| method | inverted | thick |"
    assert gdom[2] == "| oscar | 40.0 | 60.0 |" and gdom[3] == "| fedavg | n/a | n/a |"


def test_report_cells_and_statistics_by_hand():
    assert R.mean([1.0, None, 3.0, float("nan")]) == 2.0  # None and NaN left out
    assert R.mean([]) is None and R.mean([None]) is None
    assert R.std([1.0]) is None and R.std([1.0, 3.0]) == pytest.approx(2**0.5)
    assert R.pct(0.1234) == "12.3" and R.pct(-0.05, signed=True) == "-5.0"
    assert R.nbytes(1234567.0) == "1,234,567" and R.num(2.5) == "2.50"
    assert R.pct(None) == R.nbytes(None) == R.num(None) == "n/a"
    assert R.mean_std(0.5, 0.1, 100, "{:.1f}") == "50.0 ± 10.0"
    assert R.mean_std(0.5, None) == "0.50" and R.mean_std(None, 0.1) == "n/a"
    assert R.md_table(["a", "b", "c"], [["x", "1", "2"]]) == (
        "| a | b | c |\n|---|---:|---:|\n| x | 1 | 2 |"
    )


def test_report_json_is_written_whole(tmp_path):
    R.write_json(tmp_path / "r.json", {"path": tmp_path, "x": [1]}, indent=1)
    assert json.loads((tmp_path / "r.json").read_text()) == {
        "path": str(tmp_path),
        "x": [1],
    }
    assert [p.name for p in tmp_path.iterdir()] == ["r.json"]  # no .tmp left


def test_fid_table():
    fid = {
        "per_domain": {
            "thin": {
                "real_vs_real": 1.0,
                "oscar": 2.5,
                "oscar_oracle": 2.0,
                "class_names": 9.0,
                "oscar_judge_accuracy": 0.5,
            }
        },
        "mean": {
            "real_vs_real": 1.0,
            "oscar": 2.5,
            "oscar_oracle": 2.0,
            "class_names": 9.0,
            "oscar_judge_accuracy": 0.5,
        },
    }
    lines = T.format_fid_table(fid).splitlines()
    assert lines[2] == "| thin | 1.00 | 2.50 | 2.00 | 9.00 | 50.0 |  |"
    assert lines[3].startswith("| **mean** | 1.00")


def test_plot_and_report_files(records, tmp_path):
    s = AREC.aggregate(records, ["oscar", "fedavg", "centralized"])
    assert AR.plot_summary(s, tmp_path / "a.png").stat().st_size > 1000
    report = {
        "argv": ["--quick"],
        "quick": True,
        "seeds": [0, 1, 2],
        "num_clients": 2,
        "config": {
            "dataset": "mnist-domains",
            "partition": "dirichlet",
            "dirichlet-alpha": 0.5,
            "domains": "inverted,thick",
        },
        "overrides": {"min-clients": 2},
        "embedded_dir": "/x",
        "runs": records,
        "summary": s,
        "wall_time_s": {"total": 1.0},
    }
    AR.write_report(tmp_path / "out", report)
    md = (tmp_path / "out" / "accuracy.md").read_text()
    assert "`python -m bench accuracy --quick`" in md
    assert "| oscar | 70.0 | 20.0 | -20.0 |" in md and "fedavg seed 0: boom" in md
    assert "| oscar | 50.0 | 10.0 | -30.0 |" in md
    assert md.index("## Accuracy on the global test set") < md.index(
        "## Per-client accuracy"
    )
    assert json.loads((tmp_path / "out" / "accuracy.json").read_text())["summary"][
        "oscar"
    ]["std"]
    assert (tmp_path / "out" / "accuracy.png").is_file()


def test_plot_with_nothing_to_show(tmp_path):
    assert (
        AR.plot_summary(
            AREC.aggregate([AREC.record_from_results("x", 0, None, 1.0)]),
            tmp_path / "a.png",
        )
        is None
    )


# ---------------------------------------------------------------- CLI parsing


def test_parse_methods_and_seeds():
    assert AC.parse_methods(None) == list(AC.DEFAULT_METHODS)
    assert AC.parse_methods(["oscar,fedavg", "local", "oscar"]) == [
        "oscar",
        "fedavg",
        "local",
    ]
    with pytest.raises(ValueError, match="unknown \\['lora2'\\]"):
        AC.parse_methods(["lora2"])
    assert RC.parse_seeds("0,1, 2") == [0, 1, 2]
    assert RC.parse_seeds("0-9") == list(range(10))
    assert RC.parse_seeds("3,0-2,1") == [3, 0, 1, 2]
    for bad in ("a,b", "5-2", "1-x", ""):
        with pytest.raises(ValueError, match="--seeds"):
            RC.parse_seeds(bad)
    assert RC.parse_sets(["train-epochs=3", "captioner=oracle", 'method="fedavg"']) == {
        "train-epochs": 3,
        "captioner": "oracle",
        "method": "fedavg",
    }


def test_run_overrides_are_valid_app_configs():
    base = AC.base_overrides(quick=True, num_clients=4)
    assert base["min-clients"] == 4
    assert base["max-examples-per-client"] == AC.QUICK["max-examples-per-client"]
    for m, spec in AC.METHODS.items():
        if spec is None:
            with pytest.raises(ValueError, match="in-process"):
                AC.run_overrides(m, 0, base)
            continue
        over = AC.run_overrides(m, 7, base)
        assert over["seed"] == 7
        RC.build_cfg(over)  # the app's own validation accepts it
    assert AC.run_overrides("oscar-oracle", 0, base)["captioner"] == "oracle"
    assert AC.run_overrides("oscar-dp", 0, base)["dp-epsilon"] == 1.0


# ---------------------------------------------------------------- run-config strings


def test_toml_values():
    assert toml_value(True) == "true" and toml_value(False) == "false"
    assert (
        toml_value(3) == "3"
        and toml_value(0.5) == "0.5"
        and toml_value(1e-5) == "1e-05"
    )
    assert toml_value("oscar") == '"oscar"'
    assert toml_value("C:\\x") == '"C:\\\\x"'
    for bad in ('say "hi"', "a\nb", float("nan")):
        with pytest.raises(ValueError):
            toml_value(bad)
    with pytest.raises(TypeError):
        toml_value([1])


def test_run_config_string_round_trips_through_flowers_parser(tmp_path):
    over = {
        "method": "oscar",
        "captioner": "oracle",
        "seed": 2,
        "dp-epsilon": 1.0,
        "dp-delta": 1e-5,
        "caption-with-labels": False,
        "output-dir": str(tmp_path / "with space" / "out"),
        "run-name": "oscar-seed2",
    }
    text = run_config_string(over)
    assert text.startswith('method="oscar" captioner="oracle" seed=2 dp-epsilon=1.0 ')
    assert parse_run_config_string(text) == over
    with pytest.raises(ValueError, match="key"):
        run_config_string({"a b": 1})


def test_flwr_command_line(tmp_path):
    sim = LocalSimulation(tmp_path, 3)
    cmd = sim.command({"seed": 1})
    assert cmd[:5] == ["flwr", "run", str(RC.REPO_ROOT), "local", "--stream"]
    assert cmd[5:] == [
        "--federation-config",
        "num-supernodes=3",
        "--run-config",
        "seed=1",
    ]
    assert sim.env["FLWR_HOME"] == str(tmp_path.resolve() / "flwr-home")
    assert sim.env["FLWR_DISABLE_RUNTIME_DEPENDENCY_INSTALLATION"] == "1"
    assert sim.env["FLWR_LOCAL_SUPERLINK_HTTP_API_PORT"] != "39091"


# ---------------------------------------------------------------- one real Flower run


@pytest.mark.slow
@pytest.mark.timeout(300)
def test_one_local_run_through_flower(tiny_stack, tmp_path):
    if shutil.which("flwr") is None:
        pytest.skip("flwr CLI not on PATH")
    from bench.flower_runs import _superlink_processes

    over = {
        "method": "local",
        "max-examples-per-client": 80,
        "local-epochs": 1,
        "min-clients": 2,
        "seed": 0,
    }
    # Another port than the benchmark's, so a benchmark running beside is not disturbed.
    with LocalSimulation(
        tmp_path,
        2,
        env={"ONESHOT_EMBEDDED_DIR": str(tiny_stack)},
        port=39391,
        control_port=39393,
    ) as sim:
        run = sim.run("smoke", over, timeout_s=240)
    assert run.ok, run.error
    assert run.results["method"] == "local" and run.results["num_clients"] == 2
    assert (tmp_path / "runs" / "smoke" / "results.json").is_file()
    rec = AREC.record_from_results("local", 0, run.results, run.wall_s)
    assert rec["ok"] and 0.0 <= rec["mean_accuracy"] <= 1.0
    assert not _superlink_processes(sim.flwr_home)  # stopped on exit


def test_paired_differences_by_hand_including_in_run_references():
    def rec(method, seed, acc, refs=None, ok=True):
        r = AREC.record_from_results(
            method,
            seed,
            {
                "mean_accuracy": 0.5,
                "global_accuracy": acc,
                "clients": [
                    {
                        "partition_id": 0,
                        "accuracy": 0.5,
                        "metrics": {"client-s": 2.0, "client-s-per-image": 0.01},
                    }
                ],
                "feddiff": {"references": refs or {}},
            },
            1.0,
        )
        return r if ok else r | {"ok": False}

    runs = [
        rec("feddiff", 0, 0.60, {"pool-best": 0.70}),
        rec("feddiff", 1, 0.80, {"pool-best": 0.50}),
        rec("feddiff", 2, 0.90, {"pool-best": 0.10}, ok=False),  # failed: left out
        rec("dense", 0, 0.60),
        rec("dense", 1, 0.80),
        rec("fedavg", 0, 0.50),
        rec("fedavg", 1, 0.85),
    ]
    assert runs[0]["client_s_per_image"] == 0.01 and runs[0]["client_s"] == 2.0
    assert runs[0]["references"] == {"feddiff:pool-best": 0.70}
    paired = {(p["a"], p["b"]): p for p in AREC.paired_differences(runs)}
    p = paired[("dense", "fedavg")]
    assert p["seeds"] == [0, 1] and p["wins"] == 1
    assert p["diffs"] == pytest.approx([0.10, -0.05]) and p[
        "mean_diff"
    ] == pytest.approx(0.025)
    q = paired[("feddiff", "feddiff:pool-best")]
    assert q["diffs"] == pytest.approx([-0.10, 0.30]) and q["wins"] == 1
    assert ("oscar", "class-names") not in paired  # no common seed: no row
    table = T.format_paired_table(AREC.paired_differences(runs))
    # by hand: sd 0.0750 sqrt 2, se 0.075, t_{0.975, 1} = 12.706 -> +-95.3 pp; with
    # one degree of freedom (Cauchy) p = 1 - (2 / pi) atan(t), t = 1/3 -> 0.795;
    # feddiff's pair: t = 0.5 -> p = 0.705; Holm: 2 x 0.705 -> 1 (capped), then 1
    assert p["p"] == pytest.approx(1 - 2 / math.pi * math.atan(1 / 3))
    assert q["p"] == pytest.approx(1 - 2 / math.pi * math.atan(0.5))
    assert p["p_holm"] == q["p_holm"] == 1.0 and not p["holds"]
    assert p["ci95"] == pytest.approx(
        [0.025 - 12.7062 * 0.075, 0.025 + 12.7062 * 0.075], abs=1e-4
    )
    assert (
        "dense vs fedavg | +2.5 [-92.8, +97.8] | 0: +10.0, 1: -5.0 | 1/2 | 1.000 | no"
        in table
    )
    assert AREC.reference_rows(runs) == [["feddiff:pool-best", "60.0", "14.1", "2"]]


# ---------------------------------------------------------------- experiment files


def test_an_experiment_file_sets_options_under_the_command_line(tmp_path):
    from bench.accuracy.cli import parse_options

    f = tmp_path / "e.toml"
    f.write_text(
        'seeds = [3, 4]\nclients = 2\nmethods = ["oscar", "fedavg"]\nquick = true\n'
        "[run-config]\ntrain-epochs = 2\n"
    )
    args, rc = parse_options(["--experiment", str(f)])
    assert (args.seeds, args.clients, args.methods) == ("3,4", 2, ["oscar", "fedavg"])
    assert args.quick and not args.no_fid and rc == {"train-epochs": 2}
    # the command line wins; --set adds to the file's run-config and wins over it
    args, rc = parse_options(["--experiment", str(f), "--clients", "5", "--seeds", "1"])
    assert (args.seeds, args.clients) == ("1", 5)
    base = AC.base_overrides(
        args.quick, args.clients, rc | RC.parse_sets(["train-epochs=9"])
    )
    assert base["train-epochs"] == 9 and base["min-clients"] == 5
    # no file: the parser's own defaults
    args, rc = parse_options([])
    assert (args.seeds, args.clients, args.quick, rc) == (None, 4, False, {})
    assert args.world == "held-out"  # the headline world, unless told otherwise
    from bench.accuracy.cli import default_seeds

    assert RC.parse_seeds(default_seeds(True)) == [0, 1, 2, 3, 4]
    assert RC.parse_seeds(default_seeds(False)) == list(range(10))


@pytest.mark.parametrize(
    ("text", "match"),
    [
        ("client = 4\n", "unknown key 'client'"),
        ('clients = "4"\n', "clients = '4' must be int"),
        ("quick = 1\n", "quick = 1 must be bool"),
        ("clients = true\n", "clients = True must be int"),
        ('run-config = "x"\n', r"\[run-config\] must be a table"),
        ("seeds = [0,\n", "--experiment"),
    ],
)
def test_a_bad_experiment_file_is_refused_by_name(tmp_path, text, match):
    from bench.accuracy.experiment import load_experiment

    f = tmp_path / "bad.toml"
    f.write_text(text)
    with pytest.raises(ValueError, match=match):
        load_experiment(f)
    with pytest.raises(ValueError, match="--experiment"):
        load_experiment(tmp_path / "missing.toml")


def test_the_shipped_experiments_are_valid_app_configs():
    from bench.accuracy.experiment import load_experiment

    files = sorted((RC.REPO_ROOT / "bench" / "experiments").glob("*.toml"))
    assert files
    for f in files:
        defaults, rc = load_experiment(f)
        seeds = RC.parse_seeds(defaults.get("seeds", "0"))
        base = AC.base_overrides(
            defaults.get("quick", False),
            defaults.get("clients", 4),
            rc,
            defaults.get("world", "default"),
        )
        for m in AC.parse_methods(defaults.get("methods")):
            if AC.METHODS[m] is not None:
                RC.build_cfg(AC.run_overrides(m, seeds[0], base))
    quick, _ = load_experiment(RC.REPO_ROOT / "bench" / "experiments" / "quick.toml")
    assert quick["methods"] == list(AC.DEFAULT_METHODS) and quick["quick"]
    held, _ = load_experiment(RC.REPO_ROOT / "bench" / "experiments" / "held-out.toml")
    assert held["world"] == "held-out" and len(RC.parse_seeds(held["seeds"])) >= 5
    assert held["methods"] == list(AC.DEFAULT_METHODS)
    with pytest.raises(ValueError, match="--world 'mars'"):
        AC.base_overrides(True, 4, world="mars")


def test_seen_and_unseen_domains_are_reported_apart_against_the_floors():
    """By hand: method ``m`` on seen ``inverted`` and unseen ``outline``; per
    seed its unseen accuracy minus public-only's is 0.10, 0.20, 0.30 (mean
    0.20); the seen part is the mean over seeds of ``inverted`` alone."""
    from bench.accuracy.records import aggregate, paired_differences, seed_accuracies
    from bench.accuracy.report import domain_split_section, split_domains

    assert split_domains(["inverted", "outline", "thick+boxed"]) == (
        ["inverted"],
        ["outline", "thick+boxed"],
    )
    assert split_domains(["cats"]) is None  # not the mnist-domains world
    runs = []
    for seed, (seen, unseen) in enumerate([(0.9, 0.5), (0.8, 0.6), (0.7, 0.7)]):
        for name, s, u in (
            ("m", seen, unseen),
            ("public-only", 0.95, unseen - 0.1 * (seed + 1)),
            ("zero-shot", 0.3, 0.1),
        ):
            runs.append(
                {
                    "method": name,
                    "seed": seed,
                    "ok": True,
                    "global_accuracy": (s + u) / 2,
                    "global_accuracy_per_domain": {"inverted": s, "outline": u},
                    "mean_accuracy": 0.5,
                    "clients": [],
                }
            )
    assert seed_accuracies(runs, "m", ["outline"]) == {0: 0.5, 1: 0.6, 2: 0.7}
    [p] = paired_differences(runs, [("m", "public-only")], domains=["outline"])
    assert p["diffs"] == pytest.approx([0.1, 0.2, 0.3])
    assert p["mean_diff"] == pytest.approx(0.2)
    methods = ["m", "public-only", "zero-shot"]
    report = {"summary": aggregate(runs, methods), "runs": runs, "methods": methods}
    text = "\n".join(domain_split_section(report))
    assert "| m | 80.0 | 60.0 |" in text.replace("%", "")
    assert "| public-only | 95.0 | 40.0 |" in text.replace("%", "")
    assert "Not above both floors on the unseen domains: none." in text
    # no unseen domain: no section
    for r in runs:
        r["global_accuracy_per_domain"].pop("outline")
    report["summary"] = aggregate(runs, methods)
    assert domain_split_section(report) == []
