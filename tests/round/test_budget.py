"""The synthesis budget (``synth-budget``): the maths by hand, the shared step
(``methods.steps.budget_rows``), and every synthesizing method's server side with
mock replies: over the budget the set shrinks to at most the budget with every
class kept; within it (or 0: unlimited) the rows are the method's own."""

from __future__ import annotations

import pytest
import torch

from common.contract import Reply
from common.datasets import dataset_info
from common.maths import (
    allocate_budget,
    capped_unit_weights,
    kmeans,
    reduce_conditions,
)
from methods import build_config, get_method, steps
from methods.base import ServerContext, ServerOutput
from methods.steps import CondUnits, budget_rows

# ---------------------------------------------------------------- maths


def test_allocate_budget_by_hand():
    # one each, the 3 left over by [9, 3, 0]: quotas 2.25, 0.75, 0 -> 2, 1, 0
    assert allocate_budget(6, [10, 4, 1]) == [3, 2, 1]
    assert allocate_budget(0, [10, 4]) == [10, 4]  # 0: unlimited
    assert allocate_budget(14, [10, 4]) == [10, 4]  # fits
    # fewer images than classes: plain largest remainder (1.33, 0.53, 0.13)
    assert allocate_budget(2, [10, 4, 1]) == [1, 1, 0]
    assert allocate_budget(3, [0, 5, 5]) == [0, 2, 1]  # nothing for an empty group
    with pytest.raises(ValueError):
        allocate_budget(-1, [3])


def test_capped_unit_weights_by_hand():
    # owner totals 8, 1, 1 -> shares 0.8, 0.1, 0.1 -> capped 0.5, 0.25, 0.25;
    # owner 0's half split 3:5 over its two units
    w = capped_unit_weights(
        torch.tensor([3.0, 5.0, 1.0, 1.0]), torch.tensor([0, 0, 1, 2]), 0.5
    )
    torch.testing.assert_close(
        w, torch.tensor([0.1875, 0.3125, 0.25, 0.25], dtype=torch.float64)
    )


@pytest.mark.parametrize("seed", [0, 1, 2, 3])
def test_reduce_conditions_two_obvious_clusters_by_hand(seed):
    v = torch.tensor([[0.0, 0.0], [0.0, 2.0], [10.0, 0.0], [10.0, 1.0]])
    w = torch.tensor([1.0, 3.0, 2.0, 2.0])
    centres, cw, assign = reduce_conditions(v, w, 2, seed=seed)
    order = centres[:, 0].argsort()
    # (1 [0, 0] + 3 [0, 2]) / 4 = [0, 1.5]; (2 [10, 0] + 2 [10, 1]) / 4 = [10, 0.5]
    torch.testing.assert_close(centres[order], torch.tensor([[0.0, 1.5], [10.0, 0.5]]))
    torch.testing.assert_close(cw[order], torch.tensor([4.0, 4.0], dtype=torch.float64))
    a, b = order.argsort().tolist()  # cluster index -> rank by x
    assert [[a, b][int(j)] for j in assign] == [0, 0, 1, 1]
    again = reduce_conditions(v, w, 2, seed=seed)
    assert all(
        torch.equal(x, y) for x, y in zip(again, (centres, cw, assign), strict=True)
    )


def test_reduce_conditions_with_a_capped_share_by_hand():
    # num-examples 8, 1, 1 capped at 0.5 -> 0.5, 0.25, 0.25; {0, 1} and {10}:
    # (0.5 * 0 + 0.25 * 1) / 0.75 = 1/3
    w = capped_unit_weights(torch.tensor([8.0, 1.0, 1.0]), torch.tensor([0, 1, 2]), 0.5)
    for seed in range(5):
        c, cw, _ = reduce_conditions(torch.tensor([[0.0], [1.0], [10.0]]), w, 2, seed)
        order = c[:, 0].argsort()
        torch.testing.assert_close(c[order, 0], torch.tensor([1 / 3, 10.0]))
        torch.testing.assert_close(
            cw[order], torch.tensor([0.75, 0.25], dtype=torch.float64)
        )


def test_reduce_conditions_keeps_the_vectors_when_k_covers_them():
    v = torch.randn(3, 1, 4)
    c, cw, assign = reduce_conditions(v, torch.tensor([1.0, 2.0, 3.0]), 3)
    assert torch.equal(c, v) and assign.tolist() == [0, 1, 2]
    assert cw.tolist() == [1.0, 2.0, 3.0]
    with pytest.raises(ValueError, match="weights must be finite and > 0"):
        reduce_conditions(v, torch.tensor([1.0, 0.0, 3.0]), 2)


def test_weighted_kmeans_follows_the_weights():
    # three points, k = 1: the centre is the weighted mean, not the plain one
    x = torch.tensor([[0.0], [1.0], [5.0]])
    c, _ = kmeans(x, 1, weights=torch.tensor([2.0, 1.0, 1.0]))
    torch.testing.assert_close(c, torch.tensor([[1.5]]))
    torch.testing.assert_close(kmeans(x, 1)[0], torch.tensor([[2.0]]))


# ---------------------------------------------------------------- the step


def _ctx(fast_config, tmp_path, **over) -> ServerContext:
    return ServerContext(build_config(fast_config | over), tmp_path)


def _units() -> CondUnits:
    """Class 0: four clients, two obvious clusters; class 1: one client. 5 rows each."""
    v = torch.tensor([[0.0, 0.0], [0.0, 2.0], [10.0, 0.0], [10.0, 1.0], [5.0, 5.0]])
    return CondUnits(
        v,
        torch.tensor([0, 0, 0, 0, 1]),
        torch.tensor([0, 1, 2, 3, 0]),
        torch.tensor([1.0, 3.0, 2.0, 2.0, 4.0], dtype=torch.float64),
        torch.full((5,), 5),
    )


def test_budget_rows_by_hand(fast_config, tmp_path):
    out = ServerOutput()
    got = budget_rows(
        _ctx(fast_config, tmp_path, **{"synth-budget": 10}), _units(), out
    )
    # classes asked 20 and 5: one each, 8 by [19, 4] -> 7, 1 -> 8 and 2 images;
    # class 0 keeps ceil(4 * 8 / 20) = 2 centres, 1 + 3 images each (equal weights)
    assert got.labels.tolist() == [0, 0, 1] and got.rows.tolist() == [4, 4, 2]
    order = got.conds[:2, 0].argsort()
    torch.testing.assert_close(
        got.conds[:2][order], torch.tensor([[0.0, 1.5], [10.0, 0.5]])
    )
    # owners: the heaviest client of each cluster (2 and 3 tie: the smaller id)
    assert got.owners[:2][order].tolist() == [1, 2] and got.owners[2] == 0
    torch.testing.assert_close(got.conds[2], torch.tensor([5.0, 5.0]))
    assert out.extra["synth_budget"] == {
        "budget": 10,
        "requested": 25,
        "used": 10,
        "representatives": {"0": 2, "1": 1},
    }


def test_budget_rows_below_the_number_of_classes(fast_config, tmp_path):
    out = ServerOutput()
    got = budget_rows(_ctx(fast_config, tmp_path, **{"synth-budget": 1}), _units(), out)
    assert got.labels.tolist() == [0] and got.rows.tolist() == [1]
    assert out.extra["synth_budget"]["representatives"] == {"0": 1, "1": 0}


def test_budget_rows_clients_draws_real_units_deterministically(fast_config, tmp_path):
    ctx = _ctx(fast_config, tmp_path, **{"synth-budget": 10})
    units = _units()
    got = budget_rows(ctx, units, ServerOutput(), represent="clients")
    assert got.labels.tolist() == [0, 0, 1] and int(got.rows.sum()) == 10
    for row, owner in zip(got.conds, got.owners, strict=True):
        assert torch.equal(row, units.conds[owner if row[0] != 5 else 4])
    again = budget_rows(ctx, units, ServerOutput(), represent="clients")
    assert torch.equal(got.owners, again.owners) and torch.equal(got.rows, again.rows)


@pytest.mark.parametrize("budget", [0, 25, 10_000])
def test_budget_rows_within_the_budget_changes_nothing(fast_config, tmp_path, budget):
    units, out = _units(), ServerOutput()
    got = budget_rows(
        _ctx(fast_config, tmp_path, **{"synth-budget": budget}), units, out
    )
    assert got is units
    assert out.extra["synth_budget"] == {
        "budget": budget,
        "requested": 25,
        "used": 25,
        "representatives": {"0": 4, "1": 1},
    }


# ---------------------------------------------------------------- every method

CLASSES = [[1, 2], [2, 5]] * 3  # six clients; class 2 twice as common


def _reply(i: int, tensors: dict, meta: dict | None = None) -> Reply:
    return Reply(i + 1, i, 10 * (i + 1), 100, meta or {}, {}, tensors)


def _embedding_replies(ctx: ServerContext, method) -> list[Reply]:  # oscar
    from methods.oscar import payload_oscar as P
    from methods.steps import embedding_shape

    tokens, dim = embedding_shape(ctx)
    out = []
    for i, ids in enumerate(CLASSES):
        g = torch.Generator().manual_seed(i)
        means = torch.randn(len(ids), tokens, dim, generator=g).half()
        e = P.ClassEmbeddings(torch.tensor(ids), means, torch.full((len(ids),), 5))
        out.append(_reply(i, P.layout(e), {"embedding": ctx.cfg.embedding}))
    return out


def _description_replies(ctx: ServerContext, method) -> list[Reply]:  # feddeo
    from methods.feddeo import payload_feddeo as P
    from methods.steps import embedding_shape

    tokens, dim = embedding_shape(ctx)
    out = []
    for i, ids in enumerate(CLASSES):
        g = torch.Generator().manual_seed(i)
        d = P.Descriptions(
            torch.randn(len(ids), tokens, dim, generator=g), torch.tensor(ids)
        )
        out.append(_reply(i, P.layout(d), {"embedding": ctx.cfg.embedding}))
    return out


def _prototype_replies(ctx: ServerContext, method) -> list[Reply]:  # feddisc
    from methods.feddisc import payload_feddisc as P
    from methods.feddisc.client_feddisc import prototypes

    out = []
    for i, ids in enumerate(CLASSES):
        g = torch.Generator().manual_seed(i)
        labels = torch.tensor(ids * 6)
        emb = torch.nn.functional.normalize(
            torch.randn(len(labels), method.image_dim, generator=g), dim=1
        )
        t = P.layout(prototypes(emb, labels, 2, seed=i))
        out.append(
            _reply(
                i, {k: v.half() if v.is_floating_point() else v for k, v in t.items()}
            )
        )
    return out


def _model_replies(ctx: ServerContext, method) -> list[Reply]:  # fedlmg
    from common.models import build_classifier
    from methods.fedlmg import payload_fedlmg as P

    out = []
    for i, ids in enumerate(CLASSES):
        torch.manual_seed(i)
        state = build_classifier("cnn", ctx.channels, ctx.num_classes).state_dict()
        counts = torch.zeros(ctx.num_classes, dtype=torch.int64)
        counts[ids] = 7
        out.append(_reply(i, P.layout(state, counts), {"arch": "cnn"}))
    return out


def _adapter_replies(ctx: ServerContext, method) -> list[Reply]:  # lora
    from methods.lora.payload_lora import ADAPTER, EMB

    out = []
    for r in _embedding_replies(ctx, method):
        adapter = {ADAPTER + k: v.half() for k, v in method.reference.items()}
        meta = {"base-model": method.fingerprint, "embedding": ctx.cfg.embedding}
        emb = {EMB + k: v for k, v in r.tensors.items()}
        out.append(_reply(r.partition_id, adapter | emb, meta))
    return out


def _name_replies(ctx: ServerContext, method) -> list[Reply]:  # class-names
    return [_reply(i, {}) for i in range(len(CLASSES))]


REPLIES = {
    "oscar": _embedding_replies,
    "class-names": _name_replies,
    "feddisc": _prototype_replies,
    "feddeo": _description_replies,
    "fedlmg": _model_replies,
    "lora": _adapter_replies,
}


def _server_rows(
    name, budget, fast_config, tmp_path, monkeypatch
) -> tuple[dict, ServerOutput]:
    """The method's server work on six mock replies; the rows it would sample
    (the engine and the classifier training are stubbed: not under test here)."""
    over = {
        "method": name,
        "synth-budget": budget,
        "feddisc-clusters": 2,
        "feddisc-map-pairs": 100,
        "lora-rank": 2,
    }
    cfg = build_config(fast_config | over)
    ctx = ServerContext(cfg, tmp_path, info=dataset_info(cfg.data_args()))
    method = get_method(name)
    method.check(ctx)
    replies = REPLIES[name](ctx, method)
    for r in replies:
        method.validate(r, ctx)
    seen: dict = {}

    def synthesize_set(ctx, cond, labels, owners, out, **kw):  # type: ignore[no-untyped-def]
        seen.update(
            cond=cond,
            labels=labels,
            owners=owners,
            extra=[e for e, _ in kw.get("extra_conds") or []],
        )
        size = ctx.cfg.image_size
        return torch.zeros(len(labels), ctx.channels, size, size, dtype=torch.uint8)

    # every synthesizing method samples and trains through methods.steps
    monkeypatch.setattr(steps, "synthesize_set", synthesize_set)
    monkeypatch.setattr(steps, "train_global", lambda *a, **k: None)
    return seen, method.server_work(replies, ctx)


def _requested_labels(name: str, n: int) -> list[int]:
    if name == "class-names":  # every class, n per client
        return [c for c in range(10) for _ in range(n * len(CLASSES))]
    return [c for ids in CLASSES for c in ids for _ in range(n)]


@pytest.mark.parametrize("name", list(REPLIES))
def test_a_budget_below_the_request_bounds_the_set_and_keeps_every_class(
    name, tiny_stack, fast_config, tmp_path, monkeypatch
):
    seen, out = _server_rows(name, 10, fast_config, tmp_path, monkeypatch)
    labels, owners = seen["labels"], seen["owners"]
    asked = _requested_labels(name, 3)
    assert 0 < len(labels) <= 10 and out.extra["num_synthetic"] == len(labels)
    assert set(labels.tolist()) == set(asked)  # every class keeps >= 1 image
    assert len(seen["cond"]) == len(labels)
    assert all(len(e) == len(labels) for e in seen["extra"])
    assert out.extra["synth_budget"]["requested"] == len(asked)
    assert out.extra["synth_budget"]["used"] == len(labels)
    reps = out.extra["synth_budget"]["representatives"]
    assert set(reps) == {str(c) for c in set(asked)} and min(reps.values()) >= 1
    if name != "class-names":  # a row's owner is a client that has its class
        assert all(
            c in CLASSES[o]
            for c, o in zip(labels.tolist(), owners.tolist(), strict=True)
        )


@pytest.mark.parametrize("name", list(REPLIES))
def test_no_budget_or_a_large_one_leaves_the_rows_as_they_were(
    name, tiny_stack, fast_config, tmp_path, monkeypatch
):
    unlimited, out0 = _server_rows(name, 0, fast_config, tmp_path, monkeypatch)
    large, _ = _server_rows(name, 10**6, fast_config, tmp_path / "b", monkeypatch)
    n = 3  # images-per-class in fast_config
    asked = _requested_labels(name, n)
    assert unlimited["labels"].tolist() == asked
    owners = (
        [-1] * len(asked)
        if name == "class-names"
        else [i for i, ids in enumerate(CLASSES) for _ in range(n * len(ids))]
    )
    assert unlimited["owners"].tolist() == owners
    for key in ("cond", "labels", "owners"):
        assert torch.equal(unlimited[key], large[key])
    assert all(
        torch.equal(a, b)
        for a, b in zip(unlimited["extra"], large["extra"], strict=True)
    )
    assert out0.extra["synth_budget"]["used"] == len(asked)
