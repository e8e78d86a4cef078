"""methods.fgl_instance: the payload checks, the choice of instances, the client
(one embedding per image) and the server side with mock uploads (no Grid): one
image per uploaded caption, bounded by synth-budget."""

from __future__ import annotations

import re

import pytest
import torch

from common.contract import PayloadError, Reply
from common.datasets import ClientData, dataset_info
from methods import build_config
from methods.base import ClientJob, ServerContext
from methods.fgl_instance import FglInstance
from methods.fgl_instance import payload_fgl_instance as P
from methods.fgl_instance.client_fgl_instance import collect, pick_instances

DIM = 16  # the tiny stack's pooled embedding


def _instances(ids: list[int], dim: int = DIM, seed: int = 0) -> P.InstanceEmbeddings:
    g = torch.Generator().manual_seed(seed)
    emb = torch.nn.functional.normalize(
        torch.randn(len(ids), 1, dim, generator=g), dim=-1
    )
    return P.InstanceEmbeddings(torch.tensor(ids), emb)


def _unpack(t, per_class=0):
    return P.unpack(t, num_classes=10, tokens=1, dim=DIM, per_class=per_class)


def test_payload_round_trip_is_fp16_and_accepted():
    t = P.layout(_instances([2, 2, 5]))
    assert t["embeddings"].dtype == torch.float16
    assert _unpack(t).class_ids.tolist() == [2, 2, 5]


@pytest.mark.parametrize(
    "mutate,reason",
    [
        (lambda t: t.pop("class_ids"), "lacks 'class_ids'"),
        (
            lambda t: t.update(embeddings=t["embeddings"][:, :, :4]),
            "embeddings has shape",
        ),
        (lambda t: t.update(class_ids=torch.tensor([2, 2, 11])), "outside [0, 10)"),
        (lambda t: t.update(class_ids=torch.tensor([2, 5])), "3 embeddings for 2"),
        (lambda t: t.update(class_ids=t["class_ids"].int()), "int64"),
        (lambda t: t["embeddings"].view(-1).__setitem__(0, float("inf")), "NaN or Inf"),
        (lambda t: t.update(embeddings=t["embeddings"].to(torch.int8)), "dtype"),
    ],
)
def test_malformed_payload_is_rejected_with_a_reason(mutate, reason):
    t = P.layout(_instances([2, 2, 5]))
    mutate(t)
    with pytest.raises(PayloadError, match=re.escape(reason)):
        _unpack(t)


def test_per_class_bound_is_enforced():
    t = P.layout(_instances([2, 2, 2, 5]))
    assert len(_unpack(t, per_class=3).class_ids) == 4
    with pytest.raises(PayloadError, match="fgl-instances-per-class=2"):
        _unpack(t, per_class=2)


def test_pick_instances():
    labels = torch.tensor([0, 1, 0, 0, 1, 2])
    assert pick_instances(labels, 0, seed=0).tolist() == list(range(6))
    kept = pick_instances(labels, 2, seed=0)
    assert kept.tolist() == sorted(kept.tolist())
    assert torch.bincount(labels[kept]).tolist() == [2, 2, 1]
    assert torch.equal(kept, pick_instances(labels, 2, seed=0))  # seeded


def test_client_uploads_one_embedding_per_image(tiny_stack, fast_config):
    cfg = build_config(fast_config | {"method": "fgl-instance", "captioner": "oracle"})
    labels = torch.tensor([1, 1, 1, 4, 4])
    images = torch.rand(len(labels), 1, 16, 16) * 2 - 1
    job = ClientJob(cfg, 0, 2, ClientData(images, labels, images, labels, "inverted"))
    res = collect(job)
    e = _unpack(res.payload)
    assert e.class_ids.tolist() == [1, 1, 1, 4, 4]
    assert res.metrics["instances"] == 5
    # the oracle captions an image by its class and domain: 2 distinct of 5
    assert res.metrics["distinct-caption-fraction"] == pytest.approx(2 / 5)
    assert res.meta["embedding"] == "pooled" and res.metrics["client-s-per-image"] > 0
    capped = build_config(
        fast_config
        | {
            "method": "fgl-instance",
            "captioner": "oracle",
            "fgl-instances-per-class": 1,
        }
    )
    res1 = collect(ClientJob(capped, 0, 2, job.data))
    assert _unpack(res1.payload, per_class=1).class_ids.tolist() == [1, 4]
    assert res1.metrics["num-examples"] == 5  # the client's data, not the upload


def _ctx(fast_config, tmp_path, **over) -> ServerContext:
    cfg = build_config(fast_config | {"method": "fgl-instance"} | over)
    return ServerContext(cfg, tmp_path, info=dataset_info(cfg.data_args()))


def _reply(pid: int, ids: list[int]) -> Reply:
    tensors = P.layout(_instances(ids, seed=pid))
    return Reply(pid + 1, pid, len(ids), 1000, {"embedding": "pooled"}, {}, tensors)


def test_server_synthesizes_one_image_per_instance(tiny_stack, fast_config, tmp_path):
    ctx = _ctx(fast_config, tmp_path)
    method = FglInstance()
    method.check(ctx)
    replies = [_reply(0, [3, 3, 3, 7]), _reply(1, [1, 1])]
    for r in replies:
        method.validate(r, ctx)
    out = method.server_work(replies, ctx)
    assert out.extra["num_synthetic"] == 6  # images-per-class plays no part
    assert out.extra["synth_budget"]["requested"] == 6
    assert set(out.samples) == {(0, 3), (0, 7), (1, 1)}
    assert len(out.samples[(0, 3)]) == 3
    assert all(torch.isfinite(v.float()).all() for v in out.model_state.values())
    s = method.summary(replies)
    assert s["upload_bytes_per_instance"] == pytest.approx(2000 / 6)
    assert s["upload_bytes_per_class"] == pytest.approx(2000 / 3)
    wrong = Reply(9, 2, 1, 10, {"embedding": "sequence"}, {}, replies[0].tensors)
    with pytest.raises(PayloadError, match="embedding kind"):
        method.validate(wrong, ctx)


def test_synth_budget_bounds_the_instances(tiny_stack, fast_config, tmp_path):
    ctx = _ctx(fast_config, tmp_path, **{"synth-budget": 4})
    replies = [_reply(0, [3] * 6 + [7] * 2), _reply(1, [3] * 4)]
    out = FglInstance().server_work(replies, ctx)
    assert out.extra["num_synthetic"] == 4
    b = out.extra["synth_budget"]
    assert (b["requested"], b["used"]) == (12, 4)
    assert set(b["representatives"]) == {"3", "7"}  # every class keeps an image
