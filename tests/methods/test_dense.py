"""DENSE: each loss term against hand-computed values, the generator, the server
side with mock replies (no Grid) and determinism under a fixed seed."""

from __future__ import annotations

import math

import pytest
import torch
from conftest import tiny_dense_settings
from torch import nn

from common.contract import PayloadError, Reply
from common.datasets import dataset_info
from methods import build_config
from methods.base import ServerContext
from methods.dense import Dense
from methods.dense import server_dense as D
from methods.initial import initial_state

# ---------------------------------------------------------------- maths


def test_bn_statistic_loss_by_hand():
    # 2 images, 1 channel, 1x2 pixels: values 0, 2, 4, 6 -> mean 3, biased var 5
    x = torch.tensor([[[[0.0, 2.0]]], [[[4.0, 6.0]]]])
    loss = D.bn_statistic_loss(x, torch.tensor([1.0]), torch.tensor([2.0]))
    assert loss.item() == pytest.approx(abs(5 - 2) + abs(3 - 1))
    # two channels: the L2 norms over channels
    x2 = torch.cat([x, x + 1], dim=1)  # channel 1: mean 4, var 5
    loss2 = D.bn_statistic_loss(x2, torch.tensor([3.0, 4.0]), torch.tensor([1.0, 5.0]))
    assert loss2.item() == pytest.approx(math.hypot(4, 0) + math.hypot(0, 0))


def test_bn_hooks_sum_every_layer_of_every_model():
    bn = nn.BatchNorm2d(1).eval()
    bn.running_mean.fill_(1.0)
    bn.running_var.fill_(2.0)
    other = nn.BatchNorm2d(1).eval()  # running stats 0 and 1
    x = torch.tensor([[[[0.0, 2.0]]], [[[4.0, 6.0]]]])
    hooks = D.BNStatistics([nn.Sequential(bn), nn.Sequential(other)])
    bn(x), other(x)
    assert hooks.pop().item() == pytest.approx((3 + 2) + (4 + 3))
    assert hooks.pop().item() == 0.0  # popped
    hooks.remove()
    bn(x)
    assert hooks.pop().item() == 0.0  # removed


def test_kl_distillation_by_hand():
    s = torch.tensor([[0.0, 0.0]])  # q = (1/2, 1/2)
    t = torch.tensor([[math.log(3.0), 0.0]])  # p = (3/4, 1/4)
    kl = 0.75 * math.log(0.75 / 0.5) + 0.25 * math.log(0.25 / 0.5)
    assert D.distillation_loss(s, t, 1.0).item() == pytest.approx(kl)
    # temperature T: logits / T, then times T^2 (T = 2: p = softmax(log 3 / 2, 0))
    p = math.sqrt(3) / (math.sqrt(3) + 1)
    kl2 = p * math.log(p / 0.5) + (1 - p) * math.log((1 - p) / 0.5)
    assert D.distillation_loss(s, t, 2.0).item() == pytest.approx(4 * kl2)
    # batchmean: a second identical row leaves it; zero for equal logits
    assert D.distillation_loss(s.repeat(2, 1), t.repeat(2, 1), 1.0).item() == (
        pytest.approx(kl)
    )
    assert D.distillation_loss(t, t, 5.0).item() == pytest.approx(0.0, abs=1e-7)


def test_adversarial_term_counts_only_disagreements():
    t = torch.tensor([[math.log(3.0), 0.0], [math.log(3.0), 0.0]])
    s = torch.tensor([[0.0, 1.0], [1.0, 0.0]])  # row 0 disagrees, row 1 agrees
    q0 = torch.softmax(s[0], 0)
    kl0 = 0.75 * math.log(0.75 / q0[0].item()) + 0.25 * math.log(0.25 / q0[1].item())
    assert D.adversarial_loss(s, t).item() == pytest.approx(-kl0 / 2)
    assert D.adversarial_loss(t, t).item() == 0.0  # full agreement: no term


def test_ensemble_is_the_mean_of_logits():
    a, b = nn.Linear(2, 3), nn.Linear(2, 3)
    x = torch.randn(4, 2)
    torch.testing.assert_close(D.ensemble_logits([a, b], x), (a(x) + b(x)) / 2)


def test_random_shift_moves_each_image_within_its_border():
    torch.manual_seed(0)
    x = torch.randn(5, 2, 16, 16)
    y = D.random_shift(x, torch.Generator().manual_seed(1))
    assert y.shape == x.shape
    pad = 2
    xp = torch.nn.functional.pad(x, (pad,) * 4, mode="replicate")
    for i in range(5):  # each image is one window of its own padded copy
        hits = [
            (dy, dx)
            for dy in range(2 * pad + 1)
            for dx in range(2 * pad + 1)
            if torch.equal(xp[i, :, dy : dy + 16, dx : dx + 16], y[i])
        ]
        assert hits


def test_generator_shape_range_and_odd_sizes():
    for size in (16, 14):
        gen = D.Generator(nz=8, ngf=4, size=size, channels=3)
        x = gen(torch.randn(2, 8))
        assert x.shape == (2, 3, size, size)
        assert x.min() >= -1 and x.max() <= 1


def test_to_uint8_round_trip():
    x = torch.tensor([-1.0, 0.0, 1.0, 2.0])
    assert D.to_uint8(x).tolist() == [0, 128, 255, 255]


# ---------------------------------------------------------------- server side


def _ctx(tmp_path, **over):
    from conftest import default_run_config

    rc = (
        default_run_config()
        | {
            "method": "dense",
            "train-epochs": 2,
            "dense-g-steps": 3,
            "dense-synthesis-batch-size": 16,
            "dense-ngf": 8,
            "train-batch-size": 8,
        }
        | over
    )
    cfg = build_config(rc)
    return ServerContext(cfg, tmp_path, info=dataset_info(cfg.data_args()))


def _reply(ctx, pid, scale=0.0):
    torch.manual_seed(100 + pid)
    state = initial_state(ctx)
    for k, v in state.items():
        if v.is_floating_point() and "running" not in k:
            state[k] = v + scale * torch.randn_like(v)
    return Reply(
        node_id=pid,
        partition_id=pid,
        num_examples=50,
        upload_bytes=1,
        meta={},
        metrics={"client-s": 1.0},
        tensors=state,
    )


def test_server_work_with_mock_replies(tmp_path):
    ctx = _ctx(tmp_path)
    replies = [_reply(ctx, p, 0.05) for p in range(3)]
    method = Dense()
    for r in replies:
        method.validate(r, ctx)
    out = method.server_work(replies, ctx)
    assert out.model_state is not None and out.arch == "cnn"
    assert set(out.model_state) == set(initial_state(ctx))
    assert all(torch.isfinite(v.float()).all() for v in out.model_state.values())
    assert set(out.timings) == {"synthesize", "train"}
    assert out.extra["num_synthetic"] == 2 * 16
    d = out.extra["dense"]
    assert d["teachers"] == 3 and d["epochs"] == 2
    assert d["generator_iterations"] == 6
    assert d["distill_steps"] == 2 + 4  # pools of 16 then 32 images, batches of 8
    assert set(d["final_losses"]) == {"generator", "bn", "oh", "adv", "distill"}
    assert all(math.isfinite(v) for v in d["final_losses"].values())
    assert out.samples and all(o == -1 for o, _ in out.samples)
    for imgs in out.samples.values():
        assert imgs.shape[1:] == (1, 16, 16) and len(imgs) <= 6
        assert imgs.min() >= -1 and imgs.max() <= 1
    # the student moved away from the initial weights
    init = initial_state(ctx)
    assert any(
        not torch.equal(out.model_state[k], init[k])
        for k in init
        if init[k].is_floating_point()
    )


def test_server_work_is_deterministic_under_a_seed(tmp_path):
    ctx = _ctx(tmp_path)
    replies = [_reply(ctx, p, 0.05) for p in range(2)]
    a = Dense().server_work(replies, ctx)
    b = Dense().server_work(replies, ctx)
    assert a.extra == b.extra
    assert a.model_state is not None and b.model_state is not None
    for k in a.model_state:
        torch.testing.assert_close(a.model_state[k], b.model_state[k], rtol=0, atol=0)
    for k in a.samples:
        assert torch.equal(a.samples[k], b.samples[k])
    c = Dense().server_work(replies, _ctx(tmp_path, seed=1))
    assert c.model_state is not None
    assert any(
        not torch.equal(a.model_state[k], c.model_state[k]) for k in c.model_state
    )


@pytest.mark.parametrize(
    "mutate,reason",
    [
        (lambda t: t | {"junk": torch.zeros(1)}, "keys differ"),
        (lambda t: t | {"head.bias": torch.zeros(3)}, "has shape"),
        (lambda t: t | {"head.bias": torch.full((10,), float("nan"))}, "NaN"),
        (lambda t: t | {"head.bias": torch.zeros(10, dtype=torch.int32)}, "dtype"),
        (
            lambda t: t | {"features.0.1.running_var": -torch.ones(32)},
            "negative variances",
        ),
    ],
)
def test_validate_rejects_bad_models_with_a_reason(tmp_path, mutate, reason):
    ctx = _ctx(tmp_path)
    r = _reply(ctx, 0)
    r.tensors = mutate(dict(r.tensors))
    with pytest.raises(PayloadError, match=reason):
        Dense().validate(r, ctx)


def test_run_dense_checks_its_inputs():
    s = tiny_dense_settings()
    with pytest.raises(ValueError, match="no client models"):
        D.run_dense([], nn.Linear(1, 1), 10, 1, 16, s)
