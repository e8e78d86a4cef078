"""FedHydra: the stratification and the stratified aggregation by hand, the
payload checks, the server side with mock uploads (no Grid), and a round of
clients in two architectures through the real ClientApp."""

from __future__ import annotations

import json
import math

import pytest
import torch
from conftest import tiny_dense_settings
from fakegrid import FakeGrid
from torch import nn

from client_app.app import app as client_app
from common.contract import PayloadError, Reply
from common.datasets import dataset_info
from methods import build_config
from methods.base import ServerContext
from methods.dense import server_dense as D
from methods.fedhydra import FedHydra
from methods.fedhydra import payload_fedhydra as P
from methods.fedhydra import server_fedhydra as H
from server_app.round import run_one_shot

S, W, A = H.STRONG, H.WEAK, H.ABSENT

# ---------------------------------------------------------------- maths


def test_reliability_is_smoothed_accuracy_and_zero_where_never_trained():
    counts = torch.tensor([[5, 0], [2, 3]])
    held = torch.tensor([[3, 2], [0, 1]])
    correct = torch.tensor([[3, 1], [0, 0]])
    r = H.class_reliability(counts, held, correct)
    # (3+1)/(3+2); never trained on class 1 (its 1 of 2 right does not count);
    # no held-out example: 1/2; (0+1)/(1+2)
    torch.testing.assert_close(
        r, torch.tensor([[4 / 5, 0.0], [1 / 2, 1 / 3]], dtype=torch.float64)
    )


def test_stratify_and_stratum_weights_by_hand():
    r = torch.tensor(
        [[0.8, 0.0, 0.3, 0.0], [0.5, 1 / 3, 0.9, 0.0], [0.6, 0.0, 0.0, 0.0]],
        dtype=torch.float64,
    )
    strata = H.stratify(r, 0.6)
    assert strata.tolist() == [[S, A, W, A], [W, W, S, A], [S, A, A, A]]
    w = H.stratum_weights(strata, 0.25)
    assert w.tolist() == [
        [1.0, 0.0, 0.25, 1.0],  # class 0: two strong, one weak
        [0.25, 1.0, 1.0, 1.0],  # class 1: no strong model, its weak one weighs 1
        [1.0, 0.0, 0.0, 1.0],  # class 3: no one trained on it, all weigh 1
    ]
    # strong = 0: every trained model is strong; weak weight 0 drops the weak
    assert H.stratify(r, 0.0).tolist()[2] == [S, A, A, A]
    assert H.stratum_weights(strata, 0.0)[:, 0].tolist() == [1.0, 0.0, 1.0]


def test_stratified_aggregation_by_hand():
    # p_1 = (.8, .2), p_2 = (.4, .6): pbar = (.6, .4)
    logp = torch.tensor([[[0.8, 0.2]], [[0.4, 0.6]]]).log()
    w = torch.tensor([[1.0, 0.0], [0.5, 1.0]])
    # a_1 = .6*1 + .4*0 = .6, a_2 = .6*.5 + .4*1 = .7 -> w = (6/13, 7/13)
    # p_E = (6 (.8, .2) + 7 (.4, .6)) / 13 = (7.6, 5.4) / 13
    out = H.stratified_aggregation(logp, w)
    torch.testing.assert_close(out.exp(), torch.tensor([[7.6 / 13, 5.4 / 13]]))
    # equal weights: the plain mean of the probabilities
    out1 = H.stratified_aggregation(logp, torch.ones(2, 2))
    torch.testing.assert_close(out1.exp(), torch.tensor([[0.6, 0.4]]))
    # a model weighted 0 on every class drops out (finite, no NaN)
    out0 = H.stratified_aggregation(logp, torch.tensor([[1.0, 1.0], [0.0, 0.0]]))
    torch.testing.assert_close(out0.exp(), torch.tensor([[0.8, 0.2]]))


def test_routing_weights_carry_no_gradient():
    logp = torch.tensor([[[0.8, 0.2]], [[0.4, 0.6]]]).log().requires_grad_()
    w = torch.tensor([[1.0, 0.0], [0.5, 1.0]])
    H.stratified_aggregation(logp, w)[0, 0].backward()
    # d log p_E_0 / d log p_k0 = w_k p_k0 / p_E0 with w fixed at (6/13, 7/13)
    pe0 = 7.6 / 13
    expected = torch.tensor([6 / 13 * 0.8 / pe0, 7 / 13 * 0.4 / pe0])
    assert logp.grad is not None
    torch.testing.assert_close(logp.grad[:, 0, 0], expected)
    assert logp.grad[:, 0, 1].abs().max() == 0


class Fixed(nn.Module):
    def __init__(self, logits: list[float]):
        super().__init__()
        self.logits = torch.tensor(logits)
        self.calls = 0

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        self.calls += 1
        return self.logits.expand(len(x), -1)


def test_the_teacher_runs_each_model_once_and_returns_log_probabilities():
    ln4 = math.log(4.0)
    models = [Fixed([ln4, 0.0]), Fixed([0.0, 0.0])]  # (.8, .2) and (.5, .5)
    teacher = H.StratifiedEnsemble(models, torch.ones(2, 2))
    out = teacher(torch.zeros(3, 1, 4, 4))
    assert [m.calls for m in models] == [1, 1]
    torch.testing.assert_close(out.exp(), torch.tensor([[0.65, 0.35]] * 3))


# ---------------------------------------------------------------- payload


def _ctx(tmp_path, **over) -> ServerContext:
    from conftest import default_run_config

    rc = default_run_config() | {
        "method": "fedhydra",
        "train-epochs": 2,
        "dense-g-steps": 2,
        "dense-synthesis-batch-size": 16,
        "dense-ngf": 8,
        "train-batch-size": 8,
    }
    cfg = build_config(rc | over)
    return ServerContext(cfg, tmp_path, info=dataset_info(cfg.data_args()))


def _reply(
    ctx: ServerContext, pid: int, counts: list[int], correct: list[int], arch="cnn"
) -> Reply:
    torch.manual_seed(100 + pid)
    state = {
        k: v + 0.05 * torch.randn_like(v) if "weight" in k or "bias" in k else v
        for k, v in P.reference_state(arch, 1, 10).items()
    }
    n = torch.tensor(counts)
    held = (n + 3) // 4
    tensors = P.layout(state, n, held, torch.tensor(correct).clamp(max=held))
    return Reply(
        pid + 1, pid, int(n.sum()), 1000, {"arch": arch}, {"client-s": 1.0}, tensors
    )


COUNTS = [40, 40, 0, 0, 0, 0, 0, 0, 0, 0]
CORRECT = [10, 2, 0, 0, 0, 0, 0, 0, 0, 0]


@pytest.mark.parametrize(
    "mutate,reason",
    [
        (lambda r: r.tensors.pop(P.COUNTS), "lacks '_class_counts'"),
        (
            lambda r: r.tensors.update({P.HELDOUT: r.tensors[P.HELDOUT].float()}),
            "expected int64",
        ),
        (
            lambda r: r.tensors.update({P.CORRECT: torch.zeros(9, dtype=torch.int64)}),
            r"expected int64 \[10\]",
        ),
        (
            lambda r: r.tensors.update({P.HELDOUT: -r.tensors[P.HELDOUT]}),
            "must be >= 0",
        ),
        (
            lambda r: r.tensors.update({P.CORRECT: r.tensors[P.HELDOUT] + 1}),
            "exceeds",
        ),
        (lambda r: setattr(r, "num_examples", 81), "num-examples is 81"),
        (lambda r: r.meta.update({"arch": "vit"}), "meta arch='vit'"),
        (lambda r: r.meta.pop("arch"), "meta arch='None'"),
        (lambda r: r.meta.update({"arch": "resnet18"}), "resnet18 model keys differ"),
        (lambda r: r.tensors.update({"evil": torch.zeros(1)}), "keys differ"),
        (
            lambda r: r.tensors.update({"head.bias": torch.full((10,), math.nan)}),
            "NaN",
        ),
        (
            lambda r: r.tensors.update({"features.0.1.running_var": -torch.ones(32)}),
            "negative variances",
        ),
    ],
)
def test_validate_rejects_malformed_uploads_with_a_reason(tmp_path, mutate, reason):
    ctx = _ctx(tmp_path)
    method = FedHydra()
    r = _reply(ctx, 0, COUNTS, CORRECT)
    method.validate(r, ctx)  # the genuine one passes
    r.tensors, r.meta = dict(r.tensors), dict(r.meta)
    mutate(r)
    with pytest.raises(PayloadError, match=reason):
        method.validate(r, ctx)


def test_an_upload_in_another_architecture_is_checked_against_that_one(tmp_path):
    ctx = _ctx(tmp_path)
    FedHydra().validate(_reply(ctx, 0, COUNTS, CORRECT, arch="resnet18"), ctx)


# ---------------------------------------------------------------- server side


def test_server_work_stratifies_and_distils(tmp_path):
    ctx = _ctx(tmp_path, **{"fedhydra-strong-accuracy": 0.6})
    replies = [
        # held-out 10 per class; (correct+1)/12: class 0 11/12, class 1 3/12
        _reply(ctx, 0, COUNTS, CORRECT),
        # classes 1 and 2: 9/12 and 1/12
        _reply(
            ctx, 1, [0, 40, 40, 0, 0, 0, 0, 0, 0, 0], [0, 8, 0, 0, 0, 0, 0, 0, 0, 0]
        ),
    ]
    out = FedHydra().server_work(replies, ctx)
    rep = out.extra["fedhydra"]
    assert rep["strata"]["0"] == {"strong": [0], "weak": []}
    assert rep["strata"]["1"] == {"strong": [1], "weak": [0]}
    assert rep["strata"]["2"] == {"strong": [], "weak": [1]}
    assert rep["strata"]["5"] == {"strong": [], "weak": []}
    assert rep["reliability"]["0"][:3] == [round(11 / 12, 4), 0.25, 0.0]
    assert rep["client_archs"] == {"0": "cnn", "1": "cnn"}
    # DENSE's two phases ran with the stratified teacher
    d = out.extra["dense"]
    assert d["teachers"] == 2 and d["epochs"] == 2 and d["generator_iterations"] == 4
    assert all(math.isfinite(v) for v in d["final_losses"].values())
    assert out.extra["num_synthetic"] == 32 and set(out.timings) == {
        "synthesize",
        "train",
    }
    assert out.model_state is not None and out.arch == "cnn"
    assert all(torch.isfinite(v.float()).all() for v in out.model_state.values())
    again = FedHydra().server_work(replies, ctx)  # seeded: the same student
    assert again.model_state is not None
    for k, v in out.model_state.items():
        assert torch.equal(v, again.model_state[k])


def test_dense_keeps_its_mean_of_logits_teacher(tmp_path):
    """The teacher hook leaves DENSE unchanged: passing its own ensemble
    explicitly trains the same student."""
    torch.manual_seed(0)
    teachers = [
        nn.Sequential(
            nn.Conv2d(1, 2, 3, padding=1),
            nn.BatchNorm2d(2),
            nn.Flatten(),
            nn.Linear(2 * 16 * 16, 3),
        )
        for _ in range(2)
    ]
    s = tiny_dense_settings(g_steps=2, batch=4, temperature=2)

    def student() -> nn.Module:
        torch.manual_seed(1)
        return nn.Sequential(nn.Flatten(), nn.Linear(16 * 16, 3))

    a, b = student(), student()
    D.run_dense(teachers, a, 3, 1, 16, s)
    D.run_dense(
        teachers, b, 3, 1, 16, s, teacher=lambda x: D.ensemble_logits(teachers, x)
    )
    for pa, pb in zip(a.parameters(), b.parameters(), strict=True):
        assert torch.equal(pa, pb)


# ---------------------------------------------------------------- a round


def test_a_round_with_clients_of_two_architectures(tiny_stack, fast_config):
    fast_config |= {
        "method": "fedhydra",
        "fedhydra-client-classifiers": "cnn,resnet18",
        "dense-g-steps": 2,
        "dense-synthesis-batch-size": 16,
        "dense-ngf": 8,
    }
    grid = FakeGrid(client_app, 3, fast_config)
    res = run_one_shot(grid, build_config(fast_config), "hydra")
    assert not res["rejected"] and res["num_clients"] == 3
    rep = res["fedhydra"]
    assert sorted(rep["client_archs"].values()) == ["cnn", "cnn", "resnet18"]
    assert set(rep["strata"]) == {str(c) for c in range(10)}
    on_disk = json.loads(open(f"{fast_config['output-dir']}/hydra/results.json").read())
    assert on_disk["fedhydra"]["client_archs"] == rep["client_archs"]
    assert on_disk["privacy_class"] == "weights"
    for c in res["clients"]:
        assert c["upload_bytes"] > 0
        assert 0 <= c["metrics"]["validation-accuracy"] <= 1
    assert res["global_accuracy"] is not None
