"""methods.dosfl: the distillation's unrolled step against its closed form on a
linear model, the replay (order, averaging, BatchNorm statistics) by hand, the
payload checks, the server's replay of a client's upload, and a round on the
tiny stack through the real ClientApp."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from fakegrid import FakeGrid
from torch import nn

from client_app.app import app as client_app
from common.contract import PayloadError, Reply
from common.datasets import dataset_info
from common.models import build_classifier
from methods import build_config
from methods.base import ServerContext
from methods.dosfl import Dosfl
from methods.dosfl import payload_dosfl as P
from methods.dosfl.client_dosfl import distil, initial_images
from methods.dosfl.config_dosfl import DosflConfig
from methods.dosfl.maths_dosfl import (
    Steps,
    distillation_loss,
    label_logit_init,
    raw_lr,
    replay,
    replay_averaged,
    replay_model,
)
from server_app.round import run_one_shot

# ---------------------------------------------------------------- maths by hand


def _linear(w: torch.Tensor) -> nn.Module:
    """``f(x) = W vec(x)``: a linear classifier on 1x2x2 images, no bias."""
    k, d = w.shape
    model = nn.Sequential(nn.Flatten(), nn.Linear(d, k, bias=False))
    model[1].weight.data = w.clone()
    return model


def test_one_unrolled_step_gradient_matches_the_closed_form():
    # One distilled image x~ with soft label q, one step of size eta from W0:
    #   s = softmax(W0 x~), g0 = (s sum(q) - q) x~^T, W1 = W0 - eta g0
    #   L = CE(X W1^T, y), G = dL/dW1 = (softmax(X W1^T) - Y)^T X / N
    # so dL/deta = -<G, g0>, dL/dq_j = eta ((G x~)_j - s^T G x~),
    #    dL/dx~ = -eta (G^T (s - q) + W0^T (diag(s) - s s^T) G x~)   (sum q = 1)
    torch.manual_seed(0)
    k, d, n = 3, 4, 5
    w0 = torch.randn(k, d)
    model = _linear(w0)
    xt = torch.randn(1, 1, 1, 2, 2, requires_grad=True)  # S = 1, B = 1
    q = torch.tensor([[[0.7, 0.2, 0.1]]], requires_grad=True)
    eta = torch.tensor([0.3], requires_grad=True)
    x = torch.randn(n, 1, 2, 2)
    y = torch.tensor([0, 1, 2, 1, 0])

    params = {"1.weight": w0.clone()}
    loss = distillation_loss(model, params, {}, Steps(xt, q, eta), x, y)
    d_eta, d_q, d_x = torch.autograd.grad(loss, (eta, q, xt))

    v, qq, lr = xt.detach().reshape(d), q.detach().reshape(k), 0.3
    s = torch.softmax(w0 @ v, 0)
    g0 = torch.outer(s - qq, v)
    w1 = w0 - lr * g0
    X = x.reshape(n, d)
    Y = F.one_hot(y, k).float()
    G = (torch.softmax(X @ w1.T, 1) - Y).T @ X / n
    assert torch.allclose(loss, F.cross_entropy(X @ w1.T, y), atol=1e-6)
    assert torch.allclose(d_eta, -(G * g0).sum().reshape(1), atol=1e-6)
    gx = G @ v
    assert torch.allclose(d_q.reshape(k), lr * (gx - s @ gx), atol=1e-6)
    jac = torch.diag(s) - torch.outer(s, s)
    want_x = -lr * (G.T @ (s - qq) + w0.T @ jac @ gx)
    assert torch.allclose(d_x.reshape(d), want_x, atol=1e-6)


def test_replay_goes_over_the_batches_epoch_after_epoch():
    # S = 2 batches, E = 2: steps use batches 0, 1, 0, 1 with lrs[0..3]; a
    # linear model with zero weights has softmax = 1/K, so each step is
    # W <- W - eta (1/K - q) x^T exactly while W stays small: check the first
    # step and the visiting order.
    steps = Steps(
        torch.arange(2 * 4, dtype=torch.float32).reshape(2, 1, 1, 2, 2),
        torch.tensor([[[1.0, 0.0]], [[0.0, 1.0]]]),
        torch.tensor([0.1, 0.2, 0.3, 0.4]),
    )
    visited = [(float(x.sum()), round(float(lr), 6)) for x, _, lr in steps]
    assert visited == [(6.0, 0.1), (22.0, 0.2), (6.0, 0.3), (22.0, 0.4)]
    model = _linear(torch.zeros(2, 4))
    one = Steps(steps.images[:1], steps.labels[:1], steps.lrs[:1])
    out = replay(model, {"1.weight": torch.zeros(2, 4)}, [one])
    x0 = torch.tensor([0.0, 1.0, 2.0, 3.0])
    want = -0.1 * torch.outer(torch.tensor([0.5 - 1.0, 0.5]), x0)
    assert torch.allclose(out["1.weight"], want)


def test_sequential_replay_is_the_clients_steps_one_after_the_other():
    torch.manual_seed(1)
    model = _linear(torch.zeros(3, 4))
    state = {"1.weight": torch.randn(3, 4)}
    a = Steps(
        torch.randn(2, 2, 1, 2, 2), torch.rand(2, 2, 3).softmax(-1), torch.rand(2)
    )
    b = Steps(
        torch.randn(1, 3, 1, 2, 2), torch.rand(1, 3, 3).softmax(-1), torch.rand(3)
    )
    both = replay(model, state, [a, b])
    assert torch.allclose(
        both["1.weight"], replay(model, replay(model, state, [a]), [b])["1.weight"]
    )
    assert state["1.weight"].abs().sum() > 0  # the input is not changed
    assert not torch.allclose(
        both["1.weight"], replay(model, state, [b, a])["1.weight"]
    )


def test_averaged_replay_is_the_weighted_mean_of_the_steps_by_hand():
    # one step each from the same W0: W1 = sum_k w_k (W0 - eta_k g_k(W0))
    torch.manual_seed(2)
    w0 = torch.randn(2, 4)
    model = _linear(w0)
    sets = [
        Steps(
            torch.randn(1, 1, 1, 2, 2),
            torch.tensor([[[0.9, 0.1]]]),
            torch.tensor([0.5]),
        ),
        Steps(
            torch.randn(1, 1, 1, 2, 2),
            torch.tensor([[[0.2, 0.8]]]),
            torch.tensor([0.2]),
        ),
    ]
    out = replay_averaged(model, {"1.weight": w0}, sets, [0.25, 0.75])
    want = torch.zeros(2, 4)
    for st, w in zip(sets, [0.25, 0.75], strict=True):
        v, q = st.images.reshape(4), st.labels.reshape(2)
        g = torch.outer(torch.softmax(w0 @ v, 0) - q, v)
        want += w * (w0 - st.lrs[0] * g)
    assert torch.allclose(out["1.weight"], want, atol=1e-6)
    longer = Steps(sets[1].images, sets[1].labels, torch.ones(2))  # E = 2
    with pytest.raises(ValueError, match="numbers of steps"):
        replay_averaged(model, {"1.weight": w0}, [sets[0], longer], [0.5, 0.5])


def test_batchnorm_keeps_the_plain_average_of_the_distilled_batches():
    # BatchNorm first: its batch mean at step t is the mean of x~_t, whatever
    # the weights; with replay_model the running mean is their plain average
    # and the running variance the average of the unbiased batch variances.
    model = replay_model(
        nn.Sequential(nn.BatchNorm2d(1), nn.Flatten(), nn.Linear(4, 2))
    )
    state = {k: v.clone() for k, v in model.state_dict().items()}
    xs = torch.tensor([[[[[0.0, 1.0], [2.0, 3.0]]]], [[[[4.0, 4.0], [6.0, 6.0]]]]])
    steps = Steps(
        xs, torch.tensor([[[1.0, 0.0]], [[0.0, 1.0]]]), torch.tensor([0.1, 0.1])
    )
    out = replay(model, state, [steps])
    assert torch.allclose(out["0.running_mean"], torch.tensor([(1.5 + 5.0) / 2]))
    var = [xs[0].var(), xs[1].var()]
    assert torch.allclose(out["0.running_var"], torch.tensor([(var[0] + var[1]) / 2]))
    assert int(out["0.num_batches_tracked"]) == 2
    assert out["0.running_mean"].dtype == state["0.running_mean"].dtype


def test_parametrisation_by_hand():
    # the own class's logit a gives softmax 0.9 over K classes: e^a / (e^a + K - 1)
    for k in (2, 10):
        a = label_logit_init(k)
        p = torch.softmax(torch.tensor([a] + [0.0] * (k - 1)), 0)[0]
        assert abs(float(p) - 0.9) < 1e-6
    assert abs(float(F.softplus(torch.tensor(raw_lr(0.02)))) - 0.02) < 1e-7


def _toy(n: int = 40) -> tuple[torch.Tensor, torch.Tensor]:
    """Two classes of 1x2x2 images: bright top row (0) or bright bottom (1)."""
    g = torch.Generator().manual_seed(0)
    y = torch.arange(n) % 2
    x = 0.3 * torch.randn(n, 1, 2, 2, generator=g)
    x[y == 0, :, 0] += 1
    x[y == 1, :, 1] += 1
    return x, y


def test_distillation_lowers_the_real_loss_and_starts_from_real_images():
    x, y = _toy()
    model = _linear(torch.zeros(2, 4))
    init = {"1.weight": 0.01 * torch.ones(2, 4)}
    opts = DosflConfig(
        dosfl_steps=2, dosfl_epochs=1, dosfl_iterations=30, dosfl_distill_lr=0.05
    )
    out = distil(model, init, x, y, 2, opts, batch_size=16, seed=0)
    assert out.class_ids.tolist() == [0, 1]
    assert tuple(out.steps.images.shape) == (2, 2, 1, 2, 2)
    assert tuple(out.steps.labels.shape) == (2, 2, 2) and out.steps.num_steps == 2
    assert out.losses[1] < out.losses[0]
    assert torch.allclose(out.steps.labels.sum(-1), torch.ones(2, 2))
    assert (out.steps.lrs > 0).all()
    # the initial images are real images of their class
    g = torch.Generator().manual_seed(0)
    first = initial_images(x, y, torch.tensor([0, 1]), 2, g)
    for j, c in enumerate((0, 1)):
        for im in first[:, j]:
            assert any(torch.equal(im, r) for r in x[y == c])
    hard = distil(
        model,
        init,
        x,
        y,
        2,
        opts.model_copy(update={"dosfl_soft_labels": False, "dosfl_iterations": 2}),
        batch_size=16,
        seed=0,
    )
    assert torch.equal(hard.steps.labels, torch.eye(2).repeat(2, 1, 1))


# ---------------------------------------------------------------- payload and server


def _ctx(fast_config, tmp_path, **over) -> ServerContext:
    cfg = build_config(fast_config | {"method": "dosfl"} | over)
    return ServerContext(cfg, tmp_path, info=dataset_info(cfg.data_args()))


def _upload(ctx: ServerContext, classes=(1, 4, 7), seed: int = 0) -> dict:
    opts = ctx.cfg.options(DosflConfig)
    s, e, size = opts.dosfl_steps, opts.dosfl_epochs, ctx.cfg.image_size
    g = torch.Generator().manual_seed(seed)
    b = len(classes)
    labels = F.one_hot(torch.tensor(classes), ctx.num_classes).float() * 0.9
    labels += 0.1 / ctx.num_classes
    steps = Steps(
        torch.randn(s, b, ctx.channels, size, size, generator=g),
        (labels / labels.sum(-1, keepdim=True)).repeat(s, 1, 1),
        torch.full((e * s,), 0.05),
    )
    return P.layout(torch.tensor(classes), steps)


def _reply(tensors: dict, pid: int = 0) -> Reply:
    return Reply(pid + 1, pid, 100, 1000, {}, {}, tensors)


def _set(key, fn):
    def mutate(t):
        t[key] = fn(t[key])
        return t

    return mutate


def _poison(key, value):
    def fn(x):
        x = x.clone()
        x.view(-1)[0] = value
        return x

    return _set(key, fn)


MALFORMED = [
    (_set("images", lambda x: x[:, :, :, :-1]), "images has shape"),
    (_set("images", lambda x: x[:1]), "images has shape"),
    (_set("labels", lambda x: x[..., :-1]), "labels has shape"),
    (_set("lrs", lambda x: x[:-1]), "lrs has shape"),
    (_set("images", lambda x: x.half()), "dtype"),
    (_poison("images", float("nan")), "NaN or Inf"),
    (_poison("images", float("inf")), "NaN or Inf"),
    (_poison("images", 1e6), "pixels beyond"),
    (_poison("class_ids", 10), "outside"),
    (_poison("class_ids", -1), "outside"),
    (_set("class_ids", lambda x: torch.tensor([1, 1, 7])), "repeats"),
    (_set("class_ids", lambda x: x.int()), "int64"),
    (_poison("labels", 1.5), "outside \\[0, 1\\]"),
    (_poison("labels", -0.5), "outside \\[0, 1\\]"),
    (_set("labels", lambda x: x * 0.5), "sum to 1"),
    (_poison("lrs", 0.0), "step sizes"),
    (_poison("lrs", -0.1), "step sizes"),
    (_poison("lrs", 1e3), "step sizes"),
    (lambda t: {k: v for k, v in t.items() if k != "lrs"}, "lacks 'lrs'"),
    (lambda t: t | {"evil": torch.zeros(1)}, "unexpected"),
]


@pytest.mark.parametrize(
    "mutate,reason", MALFORMED, ids=[f"{i}-{r}" for i, (_, r) in enumerate(MALFORMED)]
)
def test_malformed_uploads_are_rejected_with_a_reason(
    mutate, reason, fast_config, tmp_path
):
    ctx = _ctx(fast_config, tmp_path)
    method = Dosfl()
    method.validate(_reply(_upload(ctx)), ctx)
    with pytest.raises(PayloadError, match=reason):
        method.validate(_reply(mutate(_upload(ctx))), ctx)


@pytest.mark.parametrize("how", ["sequential", "averaged", "train"])
def test_server_trains_from_the_shared_weights_on_the_uploads(
    how, fast_config, tmp_path
):
    over = {"dosfl-server": how, "dosfl-server-epochs": 2}
    ctx = _ctx(fast_config, tmp_path, **over)
    method = Dosfl()
    replies = [
        _reply(_upload(ctx, (1, 4, 7), 1), 1),
        _reply(_upload(ctx, (0, 4), 0), 0),
    ]
    out = method.server_work(replies, ctx)
    assert out.model_state is not None and out.arch == ctx.cfg.classifier
    assert all(torch.isfinite(v.float()).all() for v in out.model_state.values())
    rep = out.extra["dosfl"]
    assert rep["server"] == how and rep["order"] == [0, 1]
    opts = ctx.cfg.options(DosflConfig)
    assert out.extra["num_synthetic"] == opts.dosfl_steps * (3 + 2)
    assert set(out.samples) == {(1, 1), (1, 4), (1, 7), (0, 0), (0, 4)}
    assert all(v.min() >= -1 and v.max() <= 1 for v in out.samples.values())
    if how == "sequential":  # the replay of both uploads, partition 0 first
        model = replay_model(
            build_classifier(ctx.cfg.classifier, ctx.channels, ctx.num_classes)
        )
        steps = [P.unpack(r.tensors, method.shape(ctx)).steps for r in replies[::-1]]
        want = replay(model, method.reference_state(ctx), steps)
        assert all(torch.equal(want[k], out.model_state[k]) for k in want)
        assert rep["steps_replayed"] == 2 * opts.dosfl_steps * opts.dosfl_epochs
    assert method.summary(replies)["upload_bytes_per_class"] == 2000 / 5


# ---------------------------------------------------------------- a round


def test_a_round_on_the_tiny_stack(tiny_stack, fast_config):
    rc = fast_config | {
        "method": "dosfl",
        "dosfl-iterations": 3,
        "dosfl-server-epochs": 2,
    }
    grid = FakeGrid(client_app, 3, rc)
    res = run_one_shot(grid, build_config(rc), "dosfl-round")
    assert res["num_clients"] == 3 and not res["rejected"]
    assert res["privacy_class"] == "pixels"
    assert res["dosfl"]["server"] == "train" and res["num_synthetic"] > 0
    assert 0 < res["upload_bytes_per_class"] < res["upload_bytes_per_client"]
    for c in res["clients"]:
        m = c["metrics"]
        assert m["client-s"] > 0 and m["client-s-per-image"] > 0
        assert m["distill-loss-first"] > 0 and m["distill-loss-last"] > 0
        assert 0 <= c["accuracy"] <= 1
    assert res["global_accuracy"] is not None
