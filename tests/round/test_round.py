"""The one-shot round driven through an in-process Grid and the real ClientApp.

Every registered method is run (adding a method adds it here); replies are
tampered with to check that a bad client is rejected with a reason while the
round completes with the rest."""

from __future__ import annotations

import json

import pytest
import torch
from conftest import by_method, method_group
from fakegrid import FakeGrid
from flwr.app import Error, Message

from client_app.app import app as client_app
from common import contract as C
from methods import METHODS, ConfigError, build_config, docs
from methods.lora import payload_lora
from methods.oscar import payload_oscar
from server_app.round import RoundError, run_one_shot


def _run(rc, nodes=3, tamper=None, run_id="t"):
    grid = FakeGrid(client_app, nodes, rc, tamper=tamper)
    return grid, run_one_shot(grid, build_config(rc), run_id)


@pytest.mark.parametrize("method", by_method(sorted(METHODS)))
def test_every_method_completes_and_writes_results(method, fast_rounds):
    fast = fast_rounds(method)
    run_dir, on_disk = fast.run_dir, fast.on_disk
    assert on_disk == json.loads(json.dumps(fast.returned))  # what it returned
    assert on_disk["method"] == method
    for key in (
        "dataset",
        "partition",
        "num_clients",
        "clients",
        "mean_accuracy",
        "upload_bytes_total",
        "timings_s",
        "config",
        "class_names",
    ):
        assert key in on_disk, key
    assert set(on_disk["timings_s"]) >= {
        "collect",
        "synthesize",
        "train",
        "evaluate",
        "total",
    }
    assert on_disk["config"]["num-classes"] == 10
    assert on_disk["num_clients"] == 3 and not on_disk["rejected"]
    # issue 26: every method's upload per client and per class, and what kind of
    # data it uploads (its card's privacy class)
    assert on_disk["upload_bytes_per_client"] >= 0
    assert "upload_bytes_per_class" in on_disk
    assert on_disk["privacy_class"] == docs.method_card(METHODS[method]).privacy
    assert {c["partition_id"] for c in on_disk["clients"]} == {0, 1, 2}
    assert all(0.0 <= c["accuracy"] <= 1.0 for c in on_disk["clients"])
    # every client that did work reports its cost per training example too
    for c in on_disk["clients"]:
        m = c.get("metrics") or {}
        assert "client-s" not in m or m["client-s-per-image"] > 0, (method, m)
    assert (run_dir / "accuracy_per_client.png").is_file()
    # exactly one collect message per node: one round, no second one
    collect = METHODS[method].collect_type
    assert [n for n, t in fast.sent if t == collect] == fast.nodes
    # what a method synthesizes shows in the sample grid
    assert (run_dir / "synthetic_samples.png").is_file() == ("num_synthetic" in on_disk)
    # the uploads the method declares are what was persisted
    journal = [
        json.loads(line)
        for line in (run_dir / "uploads" / "journal.jsonl").read_text().splitlines()
    ]
    assert journal[0]["event"] == "open" and journal[0]["method"] == method
    uploads = [e for e in journal if e["event"] == "upload"]
    assert len(uploads) == 3
    assert all(bool(e["file"]) == bool(METHODS[method].payload_key) for e in uploads)
    assert on_disk["fleet"]["asked"] == on_disk["fleet"]["valid"] == fast.nodes


@method_group("oscar")
def test_oscar_uploads_at_most_2kb_per_class(fast_rounds):
    res = fast_rounds("oscar").returned
    assert 0 < res["upload_bytes_per_class"] <= 2048
    assert all(c["upload_bytes"] > 0 for c in res["clients"])


@method_group("lora")
def test_lora_reports_its_merge_and_fid_proxy(fast_rounds):
    fast = fast_rounds("lora")
    res = fast.returned
    assert res["lora"]["merged_rank"] == fast.config["lora-merge-rank"]
    assert all(c["evaluation"]["fid-proxy"] >= 0 for c in res["clients"])
    assert res["mean_fid_proxy"] is not None


def _tamper_embeddings(fn):
    def hook(reply: Message, msg: Message) -> Message:
        t = C.from_array_record(reply.content.array_records[payload_oscar.RECORD])
        reply.content[payload_oscar.RECORD] = C.to_array_record(fn(t))
        return reply

    return hook


def _wrong_dim(t):
    t["mean"] = torch.zeros(len(t["mean"]), 1, 3, dtype=torch.float16)
    return t


def _nan(t):
    t["mean"][0, 0, 0] = float("nan")
    return t


def _unknown_class(t):
    t["class_ids"][0] = 42
    return t


def _wrong_dtype(t):
    t["mean"] = t["mean"].to(torch.int32)
    return t


def _oversized(t):
    t["junk"] = torch.zeros(2**20, dtype=torch.float16)  # 2 MB > max-upload-mb=1
    return t


def _client_crash(reply: Message, msg: Message) -> Message:
    return Message(
        Error(code=0, reason="ClientApp crashed: out of memory"), reply_to=msg
    )


@pytest.mark.parametrize(
    "hook,reason",
    [
        (_tamper_embeddings(_wrong_dim), "mean has shape"),
        (_tamper_embeddings(_nan), "NaN"),
        (_tamper_embeddings(_unknown_class), "outside [0, 10)"),
        (_tamper_embeddings(_wrong_dtype), "dtype"),
        (_tamper_embeddings(_oversized), "exceeds max-upload-mb"),
        (_client_crash, "ClientApp crashed"),
    ],
)
def test_bad_payload_rejected_round_completes(hook, reason, tiny_stack, fast_config):
    fast_config.update({"method": "oscar", "max-upload-mb": 1.0})
    _, res = _run(fast_config, nodes=3, tamper={1: hook})
    assert res["num_clients"] == 2
    assert len(res["rejected"]) == 1 and reason in res["rejected"][0]["reason"]
    excluded = [c for c in res["clients"] if c["status"].startswith("excluded")]
    assert len(excluded) == 1 and reason in excluded[0]["status"]
    assert excluded[0]["node_id"] == 102  # partition 1's node, still named
    # the global model goes to contributors only: the rejected node gets nothing
    assert excluded[0]["accuracy"] is None
    assert res["fleet"]["rejected"] == [102] and res["fleet"]["valid"] == [101, 103]
    assert res["mean_accuracy"] is not None


def test_silent_node_is_reported_missing(tiny_stack, fast_config):
    fast_config["method"] = "fedavg"
    _, res = _run(fast_config, nodes=3, tamper={2: lambda reply, msg: None})
    assert res["num_clients"] == 2
    assert res["missing"] and "no reply" in res["missing"][0]["reason"]


def test_too_few_valid_clients_stops_the_round(tiny_stack, fast_config):
    fast_config.update({"method": "oscar", "min-clients": 3})
    hook = _tamper_embeddings(_nan)
    with pytest.raises(RoundError, match="min-clients=3"):
        _run(fast_config, nodes=3, tamper={0: hook})


def test_bad_config_stops_before_any_client_work(tiny_stack, fast_config):
    fast_config["embedding"] = "sequence"  # the embedded generator needs 'pooled'
    grid = FakeGrid(client_app, 3, fast_config)
    with pytest.raises(ConfigError, match="embedding='sequence'"):
        run_one_shot(grid, build_config(fast_config), "bad")
    assert grid.sent == []


def test_resume_uses_persisted_uploads_and_contacts_no_client_for_them(
    tiny_stack, fast_config, tmp_path
):
    fast_config.update({"method": "oscar", "run-name": "resume-me"})
    grid1, first = _run(fast_config)
    # Simulate a crash after persistence: drop the global model checkpoint and results.
    run_dir = tmp_path / "out" / "resume-me"
    for f in (run_dir / "checkpoints").iterdir():
        f.unlink()
    (run_dir / "results.json").unlink()
    grid2, second = _run(fast_config)
    assert all(t != METHODS["oscar"].collect_type for _, t in grid2.sent)
    assert [c["accuracy"] for c in second["clients"]] == [
        c["accuracy"] for c in first["clients"]
    ]
    assert second["upload_bytes_total"] == first["upload_bytes_total"]


def _tamper_lora(fn):
    def hook(reply: Message, msg: Message) -> Message:
        t = C.from_array_record(reply.content.array_records[payload_lora.RECORD])
        reply.content[payload_lora.RECORD] = C.to_array_record(fn(t, reply))
        return reply

    return hook


def _other_base(t, reply):
    reply.content[C.KEY_META]["base-model"] = "0123456789abcdef"
    return t


def _rank_mismatch(t, reply):
    k = next(k for k in t if k.endswith("lora_A.weight"))
    t[k] = torch.zeros(t[k].shape[0] + 1, t[k].shape[1])
    return t


def _unexpected_module(t, reply):
    t["adapter/evil.lora_A.weight"] = torch.zeros(2, 2)
    return t


def _nan_adapter(t, reply):
    k = next(k for k in t if k.startswith("adapter/"))
    t[k] = torch.full_like(t[k], float("inf"))
    return t


@pytest.mark.parametrize(
    "fn,reason",
    [
        (_other_base, "base model"),
        (_rank_mismatch, "has shape"),
        (_unexpected_module, "keys differ"),
        (_nan_adapter, "NaN or Inf"),
    ],
)
def test_bad_adapter_rejected_round_completes(fn, reason, tiny_stack, fast_config):
    fast_config.update({"method": "lora", "lora-merge": "stack"})
    _, res = _run(fast_config, nodes=3, tamper={0: _tamper_lora(fn)})
    assert res["num_clients"] == 2
    assert len(res["rejected"]) == 1 and reason in res["rejected"][0]["reason"]
    assert (
        res["lora"]["merged_rank"] == 2 * fast_config["lora-rank"]
    )  # stack of 2 clients


@pytest.mark.parametrize("merge", ["fedavg", "svd", "ties", "dare", "generative"])
def test_every_lora_merge_completes(merge, tiny_stack, fast_config):
    fast_config.update({"method": "lora", "lora-merge": merge})
    _, res = _run(fast_config, nodes=2)
    assert res["lora"]["merge"] == merge and res["mean_fid_proxy"] is not None


def _drop_meta(reply: Message, msg: Message) -> Message:
    del reply.content.config_records[C.KEY_META]
    return reply


def _other_classes(reply: Message, msg: Message) -> Message:
    reply.content[C.KEY_META]["class-names"] = "cat,dog,bird"
    return reply


@pytest.mark.parametrize(
    "hook,reason",
    [(_drop_meta, "no 'meta' ConfigRecord"), (_other_classes, "disagree")],
)
@pytest.mark.parametrize("method", ["oscar", "fedavg"])
def test_image_folder_learns_classes_from_valid_replies_only(
    method, hook, reason, tiny_stack, fast_config, tmp_path
):
    from tiny_stack import FOLDER_CLASSES, make_image_folder

    folder = make_image_folder(tmp_path / "folder", 20)
    fast_config.update({"method": method, "dataset": str(folder), "partition": "iid"})
    # the bad client speaks first: neither arrival order nor its claims decide
    _, res = _run(fast_config, nodes=3, tamper={0: hook})
    assert res["num_clients"] == 2
    assert len(res["rejected"]) == 1 and reason in res["rejected"][0]["reason"]
    assert res["class_names"] == list(FOLDER_CLASSES)
    assert res["config"]["num-classes"] == 3


def test_lora_evaluation_reuses_the_uploaded_caption_means(
    tiny_stack, fast_config, monkeypatch
):
    """Each client captions its training set once (for its upload), not again to
    evaluate the merged adapter: the means it uploaded stay in its Context.state."""
    from methods.oscar import client_oscar

    calls: list[int] = []
    real = client_oscar.caption_images

    def counting(cfg, data):
        calls.append(len(data.train_labels))
        return real(cfg, data)

    monkeypatch.setattr(client_oscar, "caption_images", counting)
    fast_config["method"] = "lora"
    _, res = _run(fast_config, nodes=3)
    assert len(calls) == 3 and res["mean_fid_proxy"] is not None


def test_client_work_prints_no_loading_bars_or_warnings(tiny_stack, fast_config, capfd):
    """The round's log is the round's: no per-checkpoint "Loading weights" bars,
    no float32-modules or requires_grad warnings from the clients' work."""
    import warnings

    for method in ("oscar", "lora", "fedavg"):
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            _run(fast_config | {"method": method}, nodes=2, run_id=f"quiet-{method}")
        noisy = [
            str(w.message)
            for w in caught
            if "requires_grad" in str(w.message) or "float32" in str(w.message)
        ]
        assert not noisy, (method, noisy[:2])
    err = capfd.readouterr().err
    assert "Loading weights" not in err and "Loading checkpoint" not in err


def test_resume_refuses_uploads_of_another_method(tiny_stack, fast_config):
    from server_app.persist import ResumeError

    fast_config.update({"method": "fedavg", "run-name": "switch"})
    _run(fast_config)
    with pytest.raises(ResumeError, match="method='fedavg'"):
        _run(fast_config | {"method": "local"})


def test_oscar_prototypes_per_class_stay_within_2kb_per_class(tiny_stack, fast_config):
    from safetensors.torch import load_file

    fast_config.update({"method": "oscar", "prototypes-per-class": 3, "run-name": "k3"})
    _, res = _run(fast_config)
    assert res["num_clients"] == 3 and not res["rejected"]
    assert 0 < res["upload_bytes_per_class"] <= 2048
    from pathlib import Path

    uploads = Path(fast_config["output-dir"]) / "k3" / "uploads"
    files = sorted(uploads.glob("upload-*.safetensors"))
    ids = load_file(str(files[0]))["class_ids"]
    assert int(torch.bincount(ids).max()) <= 3 and len(ids) > len(ids.unique())
    # the synthetic set keeps its size: images-per-class per (client, class)
    classes = sum(len(load_file(str(f))["class_ids"].unique()) for f in files)
    assert res["num_synthetic"] == classes * fast_config["images-per-class"]


def test_oscar_rejects_more_vectors_per_class_than_configured(tiny_stack, fast_config):
    fast_config.update({"method": "oscar", "prototypes-per-class": 1})

    def repeat_class(t):
        return t | {"class_ids": torch.zeros_like(t["class_ids"])}

    _, res = _run(fast_config, nodes=3, tamper={1: _tamper_embeddings(repeat_class)})
    assert res["num_clients"] == 2 and "repeats" in res["rejected"][0]["reason"]


# ---------------------------------------------------------------- issue 27


def _scale_weights(factor):
    """An upload of a classifier state dict with every floating tensor scaled:
    finite (fp32 holds 1e30 x a weight), so it passes validation."""

    def hook(reply: Message, msg: Message) -> Message:
        t = C.from_array_record(reply.content.array_records[C.KEY_MODEL])
        scaled = {k: v * factor if v.is_floating_point() else v for k, v in t.items()}
        reply.content[C.KEY_MODEL] = C.to_array_record(scaled)
        return reply

    return hook


@pytest.mark.parametrize("method", ["fedavg", "dense", "feddiff"])
def test_implausible_global_model_is_refused_and_nothing_pushed(
    method, tiny_stack, fast_config, tmp_path
):
    """One client's weights x 1e30 make the global model 1e30-sized (FedAvg) or
    NaN (DENSE's distilled student, FedDiff's consolidated weights): the round
    pushes nothing, saves no global model and says why in results.json."""
    fast_config.update({"method": method, "run-name": f"huge-{method}"})
    grid = FakeGrid(client_app, 3, fast_config, tamper={1: _scale_weights(1e30)})
    with pytest.raises(RoundError, match="global model is refused"):
        run_one_shot(grid, build_config(fast_config), "huge")
    assert not [n for n, t in grid.sent if t.startswith("evaluate")]
    run_dir = tmp_path / "out" / f"huge-{method}"
    res = json.loads((run_dir / "results.json").read_text())
    why = res["global_model_refused"]
    assert "NaN or Inf" in why or "over 1e+06" in why, why
    assert res["num_clients"] == 3 and res["global_accuracy"] is None
    assert not (run_dir / "checkpoints").exists() or not any(
        (run_dir / "checkpoints").iterdir()
    )


def test_robust_aggregation_median_survives_the_huge_client(tiny_stack, fast_config):
    fast_config.update({"method": "fedavg", "robust-aggregation": "median"})
    _, res = _run(fast_config, nodes=3, tamper={1: _scale_weights(1e30)})
    assert "global_model_refused" not in res and res["global_accuracy"] is not None
    assert res["mean_accuracy"] is not None  # pushed and evaluated by all three


def test_global_model_goes_to_contributors_only_and_outliers_are_screened(
    tiny_stack, fast_config
):
    """Four partitions and a late device: partition 2 scales its weights x 50
    (rejected by screen-outliers, with the reason), the late device answers
    after the window closed; the push goes to the three contributors only."""
    from deploy.inprocess import Device, partition_fleet, run_round

    fast_config.update(
        {
            "method": "fedavg",
            "screen-outliers": True,
            "collect-window-s": 60.0,
            "collect-quiet-s": 0.0,
        }
    )
    fleet = partition_fleet(4, {2: _scale_weights(50.0)})
    for d in fleet:
        d.evaluate_s = 5.0  # the clock passes the late upload's arrival meanwhile
    late = Device(201, {"partition-id": 4, "num-partitions": 5}, reply_s=61.0)
    res, grid = run_round([*fleet, late], fast_config)
    pushed = sorted(n for n, t in grid.sent if t.startswith("evaluate"))
    assert pushed == [101, 102, 104]
    assert res["fleet"]["rejected"] == [103] and res["fleet"]["late"] == [201]
    assert "weight norm" in res["rejected"][0]["reason"]
    assert "screen-outliers" in res["rejected"][0]["reason"]


def _named(node, names, channels=3):
    return C.Reply(node, node, 10, 0, {"class-names": names, "channels": channels}, {})


def test_class_vote_needs_a_strict_majority(tmp_path):
    from methods.base import ServerContext
    from server_app.round import learn_classes

    ctx = ServerContext(build_config({"dataset": "folder"}), tmp_path, info=None)
    # 3 of 4 agree: theirs, whatever the fourth claims
    got = learn_classes(ctx, [_named(i, "a,b") for i in range(3)] + [_named(3, "x")])
    assert got.class_names == ("a", "b") and got.channels == 3
    # 2 of 4 is a plurality, not a majority; 1-1 is a tie: the round stops, naming
    # the lists, rather than taking the alphabetically first
    for replies in (
        [_named(0, "a,b"), _named(1, "a,b"), _named(2, "x"), _named(3, "y")],
        [_named(0, "b,c"), _named(1, "a,b")],
        [_named(0, "a,b", 1), _named(1, "a,b", 3)],  # the same names, other channels
    ):
        with pytest.raises(RoundError, match="no majority"):
            learn_classes(ctx, replies)


def test_image_folder_class_tie_stops_the_round(tiny_stack, fast_config, tmp_path):
    from tiny_stack import make_image_folder

    folder = make_image_folder(tmp_path / "folder", 20)
    fast_config.update(
        {"method": "class-names", "dataset": str(folder), "partition": "iid"}
    )
    # two clients, two class lists: one client must not impose its classes
    with pytest.raises(RoundError, match="no majority.*cat,dog,bird"):
        _run(fast_config, nodes=2, tamper={0: _other_classes})


def test_lora_evaluation_survives_an_undefined_fid_proxy(
    tiny_stack, fast_config, monkeypatch
):
    """NaN samples (an adapter of norm 6e4) made scipy's sqrtm raise on every
    client, and the whole evaluation was lost: now the FID-proxy is undefined
    (NaN) and left out, and each client's accuracy still comes back."""
    import common.train

    def nan_features(judge, x, *args, **kwargs):
        return torch.full((len(x), 8), float("nan"))

    monkeypatch.setattr(common.train, "features", nan_features)
    fast_config["method"] = "lora"
    _, res = _run(fast_config, nodes=2)
    assert [c["status"] for c in res["clients"]] == ["ok", "ok"]
    assert all("fid-proxy" not in c["evaluation"] for c in res["clients"])
    assert res["mean_fid_proxy"] is None


@pytest.mark.parametrize("method", ["fedavg", "oscar"])
def test_init_public_round_trains_the_public_init_once_and_reports_it(
    method, tiny_stack, fast_config
):
    fast_config.update({"method": method, "classifier-init": "public"})
    _, res = _run(fast_config, run_id=f"init-{method}")
    assert res["config"]["classifier-init"] == "public"
    assert res["timings_s"]["init"] > 0  # trained in the server, once
    assert res["global_accuracy"] is not None
