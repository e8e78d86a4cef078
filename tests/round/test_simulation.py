"""End-to-end: the app through ``flwr run <repo> local`` (Flower's simulation).

The tiny random stack (tests/tiny_stack.py) stands in for the embedded
weights, so these runs check the plumbing — the message contract across
Flower's simulation engine, the round's steps, results.json and the plots —
not accuracy (``python -m bench accuracy`` measures that).
"""

from __future__ import annotations

import json
import shutil

import pytest
from tiny_stack import FOLDER_CLASSES, make_hf_dataset

from bench.flower_runs import LocalSimulation, _superlink_processes

SMALL = {
    "max-examples-per-client": 60,
    "images-per-class": 2,
    "num-inference-steps": 2,
    "train-epochs": 1,
    "min-clients": 3,
    "seed": 0,
    "global-test-per-class": 20,
}


@pytest.mark.slow
@pytest.mark.timeout(420)
def test_oscar_and_lora_through_flower_simulation(tiny_stack, tmp_path):
    assert shutil.which("flwr"), "the flwr CLI comes with the project's install"
    runs = {}
    # Ports apart from the benchmark's and from test_bench's run.
    with LocalSimulation(
        tmp_path,
        3,
        env={"ONESHOT_EMBEDDED_DIR": str(tiny_stack)},
        port=39491,
        control_port=39493,
    ) as sim:
        runs["lora"] = sim.run(
            "lora",
            SMALL | {"method": "lora", "lora-merge": "svd", "lora-steps": 2},
            timeout_s=200,
        )
        # OSCAR on a Hugging Face dataset folder written by save_to_disk, end to
        # end, with the synthesis sharded over 2 Ray actors inside the
        # simulation's own Ray (that sharding gives the same images:
        # tests/unit/test_synthesis.py); the default dataset goes through Flower's
        # simulation in README's first command (.ci/run) and in process in
        # tests/round/test_round.py
        hf = make_hf_dataset(tmp_path / "hf-dataset", n_per_class=60)
        runs["oscar"] = sim.run(
            "oscar",
            SMALL | {"method": "oscar", "dataset": str(hf), "synth-workers": 2},
            timeout_s=200,
        )
    assert not _superlink_processes(sim.flwr_home)

    for name, run in runs.items():
        assert run.ok, f"{name}: {run.error}"
        res = run.results
        assert res["method"] == name
        # read from the method's card.toml inside the app bundle
        assert res["privacy_class"] == {"lora": "weights", "oscar": "features"}[name]
        assert res["num_clients"] == 3 and len(res["clients"]) == 3
        assert sorted(c["partition_id"] for c in res["clients"]) == [0, 1, 2]
        for c in res["clients"]:
            assert c["upload_bytes"] > 0
            assert 0.0 <= c["accuracy"] <= 1.0
        assert res["upload_bytes_total"] == sum(
            c["upload_bytes"] for c in res["clients"]
        )
        assert set(res["timings_s"]) >= {
            "collect",
            "synthesize",
            "train",
            "evaluate",
            "total",
        }
        assert (run.run_dir / "accuracy_per_client.png").is_file()
        # Flower's simulation has all its nodes from the start: the window closes
        # once all three answered, without waiting collect-quiet-s (10 s) for more
        fleet = res["fleet"]
        assert fleet["closed_reason"] == "quiet" and len(fleet["valid"]) == 3
        events = [
            json.loads(line)
            for line in (run.run_dir / "uploads" / "journal.jsonl").open()
        ]
        last = max(e["at"] for e in events if e["event"] == "upload")
        closed = next(e["at"] for e in events if e["event"] == "closed")
        assert closed - last < res["config"]["collect-quiet-s"] / 2, fleet

    oscar = runs["oscar"].results
    # pooled fp16 vectors of the tiny encoder: far below the 2 KB/class budget
    assert 0 < oscar["upload_bytes_per_class"] <= 2048
    assert (runs["oscar"].run_dir / "synthetic_samples.png").is_file()
    assert (
        oscar["class_names"] == list(FOLDER_CLASSES)
        and oscar["config"]["num-classes"] == 3
    )
    assert oscar["dataset"].endswith("hf-dataset")
    assert "Synthesis sharded over 2 Ray workers" in runs["oscar"].log_path.read_text()
