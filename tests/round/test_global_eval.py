"""The global test set (the dataset's test split in every participating domain,
balanced over classes) and the round's global accuracy."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from conftest import by_method
from fakegrid import FakeGrid

from client_app.app import app as client_app
from common import datasets as D
from common.contract import PayloadError, Reply
from common.mnist_domains import load_mnist, render_style
from methods import build_config
from methods.local.server_local import Local
from server_app.round import clients_global_accuracy, run_one_shot

DOMAINS = ("inverted", "thick", "rotated")


def _args(seed: int = 0, **kw) -> D.DataArgs:
    return D.DataArgs("mnist-domains", domains=DOMAINS, seed=seed, **kw)


def _fresh(args: D.DataArgs, domains, per_class: int) -> D.GlobalTestSet:
    D.registry._global_test_set.cache_clear()  # recompute, not the cached copy
    test = D.global_test_set(args, domains, per_class)
    assert test is not None
    return test


# ---------------------------------------------------------------- the set


def test_mnist_global_test_set_is_balanced_with_the_same_digits_in_every_domain():
    test = _fresh(_args(), DOMAINS, per_class=3)
    assert len(test) == 3 * 10 * 3 and test.domains == DOMAINS
    assert test.images.shape == (90, 1, 16, 16)
    assert test.domain_index.tolist() == [0] * 30 + [1] * 30 + [2] * 30
    blocks = [test.labels[test.domain_index == k] for k in range(3)]
    for y in blocks:
        assert torch.bincount(y, minlength=10).tolist() == [3] * 10
    assert torch.equal(blocks[0], blocks[1]) and torch.equal(blocks[0], blocks[2])
    # the ids: 3 distinct test digits per class, sorted; the same in every domain
    raw, labels = load_mnist("test")
    ids = D.partitions.balanced_ids(labels, 10, 3, seed=0)
    assert len(set(ids.tolist())) == 30 and ids.tolist() == sorted(ids.tolist())
    assert torch.equal(torch.as_tensor(labels[ids]), blocks[0])
    inverted, thick = test.images[:30], test.images[30:60]
    assert torch.allclose(inverted, -render_style(raw[ids], "plain", 16), atol=1e-6)
    assert torch.equal(thick, render_style(raw[ids], "thick", 16))


def test_global_test_set_is_deterministic_for_a_seed():
    a = _fresh(_args(seed=1), DOMAINS[:2], per_class=2)
    b = _fresh(_args(seed=1), DOMAINS[:2], per_class=2)
    c = _fresh(_args(seed=2), DOMAINS[:2], per_class=2)
    assert torch.equal(a.images, b.images) and torch.equal(a.labels, b.labels)
    assert not torch.equal(a.images, c.images)


def test_plain_mnist_has_one_domain():
    test = _fresh(D.DataArgs("mnist"), ("plain",), per_class=1)
    assert len(test) == 10 and test.domains == ("plain",)
    with pytest.raises(ValueError, match="not domains of dataset='mnist'"):
        D.global_test_set(D.DataArgs("mnist"), ["inverted"], 1)


def test_global_test_set_checks_its_inputs():
    with pytest.raises(ValueError, match="per_class=0 must be >= 1"):
        D.global_test_set(_args(), DOMAINS, 0)
    with pytest.raises(ValueError, match="each once"):
        D.global_test_set(_args(), ["thick", "thick"], 1)
    with pytest.raises(ValueError, match="at least one domain"):
        D.global_test_set(_args(), [], 1)
    with pytest.raises(ValueError, match=r"\['noisy'\] are not domains"):
        D.global_test_set(_args(), ["noisy"], 1)


def test_score_by_hand():
    test = D.GlobalTestSet(
        images=torch.zeros(4, 1, 2, 2),
        labels=torch.tensor([0, 1, 2, 3]),
        domain_index=torch.tensor([0, 0, 1, 1]),
        domains=("a", "b"),
    )
    overall, per_domain = test.score(torch.tensor([0, 0, 2, 3]))
    assert overall == 0.75 and per_domain == {"a": 0.5, "b": 1.0}
    assert test.metrics(torch.tensor([0, 0, 2, 3])) == {
        "global-accuracy": 0.75,
        "global-test-examples": 4.0,
        "global-accuracy/a": 0.5,
        "global-accuracy/b": 1.0,
    }
    with pytest.raises(ValueError, match="4 labels"):
        test.score(torch.tensor([0, 1]))


def test_domains_of_the_federation_and_of_the_replies():
    five = D.DataArgs("mnist-domains")  # inverted, thick, thin, rotated, noisy
    assert D.federation_domains(five, 3) == ("inverted", "thick", "thin")
    assert D.federation_domains(five, 7) == five.domains  # p mod 5: all five
    assert D.federation_domains(D.DataArgs("mnist"), 4) == ("plain",)
    info = D.dataset_info(five)
    # only known domains count, in the dataset's order; client text never passes
    got = D.participating_domains(info, ["thin", "evil\n", 3, None, "inverted"])
    assert got == ("inverted", "thin")
    assert D.participating_domains(None, ["plain", "x"]) == ("plain",)


def test_clients_global_accuracy_by_hand():
    metrics = [
        {"global-accuracy": 0.5, "global-accuracy/a": 0.4, "global-test-examples": 20},
        {"global-accuracy": 0.7, "global-accuracy/a": 0.6, "global-accuracy/b": 0.8},
        {"accuracy": 0.9},  # measured nothing: left out
    ]
    acc, per_domain, size = clients_global_accuracy(metrics, ("a", "b", "c"))
    assert acc == pytest.approx(0.6) and size == 20
    assert per_domain == pytest.approx({"a": 0.5, "b": 0.8})
    assert clients_global_accuracy([{}], ("a",)) == (None, {}, 0)


def test_local_rejects_a_global_accuracy_outside_0_1():
    meta = {"domain": "thick"}
    ok = Reply(1, 0, 10, 0, meta, {"accuracy": 0.5, "global-accuracy/thick": 1.0})
    Local().validate(ok, None)  # type: ignore[arg-type]
    bad = Reply(1, 0, 10, 0, meta, {"accuracy": 0.5, "global-accuracy/thick": 1.5})
    with pytest.raises(PayloadError, match="global-accuracy/thick=1.5"):
        Local().validate(bad, None)  # type: ignore[arg-type]


def _hf_dict(root, with_test: bool):
    import datasets
    from tiny_stack import FOLDER_CLASSES, _digits

    features = datasets.Features(
        {"image": datasets.Image(), "label": datasets.ClassLabel(names=FOLDER_CLASSES)}
    )
    splits = {}
    for name, n in [("train", 6)] + ([("test", 5)] if with_test else []):
        images, labels = _digits(n)
        splits[name] = datasets.Dataset.from_dict(
            {"image": images, "label": labels}, features=features
        )
    datasets.DatasetDict(splits).save_to_disk(str(root))
    return str(root)


def test_hugging_face_test_split_or_none(tmp_path):
    with_test = D.DataArgs(_hf_dict(tmp_path / "with", True), image_size=8)
    test = _fresh(with_test, ["plain"], per_class=3)
    assert test.images.shape == (9, 1, 8, 8)
    assert torch.bincount(test.labels).tolist() == [3, 3, 3]
    without = D.DataArgs(_hf_dict(tmp_path / "without", False))
    assert D.global_test_set(without, ["plain"], 3) is None


# ---------------------------------------------------------------- the round


def _run(rc, nodes=3, run_id="g"):
    grid = FakeGrid(client_app, nodes, rc)
    res = run_one_shot(grid, build_config(rc), run_id)
    on_disk = json.loads((grid_dir(rc, run_id) / "results.json").read_text())
    assert on_disk["global_accuracy"] == res["global_accuracy"]
    return res


def grid_dir(rc, run_id):
    from pathlib import Path

    return Path(rc["output-dir"]) / run_id


@pytest.mark.parametrize("method", by_method(("oscar", "local")))
def test_round_reports_global_accuracy_per_participating_domain(method, fast_rounds):
    fast = fast_rounds(method)
    res = fast.returned
    assert fast.on_disk["global_accuracy"] == res["global_accuracy"]
    assert 0.0 <= res["global_accuracy"] <= 1.0
    # 3 clients: partitions 0..2 hold the first three default domains
    domains = ["inverted", "thick", "thin"]
    assert res["global_test"]["domains"] == domains
    assert list(res["global_accuracy_per_domain"]) == domains
    assert all(0.0 <= a <= 1.0 for a in res["global_accuracy_per_domain"].values())
    per_class = res["config"]["global-test-per-class"]
    assert res["global_test"]["per_class"] == per_class
    assert res["global_test_size"] == 3 * 10 * per_class
    assert res["global_test"]["reason"] is None
    assert "global_evaluate" in res["timings_s"]
    per_domain = np.mean(list(res["global_accuracy_per_domain"].values()))
    if method == "oscar":  # one model on equal-sized domains
        assert res["global_test"]["evaluated_by"].startswith("server")
        assert res["global_accuracy"] == pytest.approx(per_domain)
    else:  # each client's own model on the same set; the mean over clients
        assert res["global_test"]["evaluated_by"].startswith("clients")
        own = [c["metrics"]["global-accuracy"] for c in res["clients"]]
        assert len(own) == 3
        assert res["global_accuracy"] == pytest.approx(np.mean(own))


@pytest.mark.parametrize("method", ["oscar", "local"])
def test_image_folder_has_no_global_accuracy_and_says_why(
    method, tiny_stack, fast_config, tmp_path
):
    from tiny_stack import make_image_folder

    folder = make_image_folder(tmp_path / "folder", 20)
    fast_config.update({"method": method, "dataset": str(folder), "partition": "iid"})
    res = _run(fast_config, run_id=f"folder-{method}")
    assert res["global_accuracy"] is None and res["global_test_size"] == 0
    assert res["global_accuracy_per_domain"] == {}
    assert "no test split outside the clients' data" in res["global_test"]["reason"]
    assert res["mean_accuracy"] is not None  # the per-client numbers still stand
