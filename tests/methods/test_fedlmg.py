"""FedLMG: the guidance maths by hand, the payload checks, and a round whose
clients train two different architectures (model-heterogeneous FL)."""

from __future__ import annotations

import json

import pytest
import torch
from fakegrid import FakeGrid
from torch import nn

from client_app.app import app as client_app
from common.contract import PayloadError
from common.models import build_classifier
from methods import build_config
from methods.fedlmg import payload_fedlmg as P
from methods.fedlmg.server_fedlmg import GuidingModel, bn_statistic_loss, guidance_loss
from server_app.round import run_one_shot


def test_bn_statistic_loss_by_hand():
    # one image, one channel, positions [1, 3]: mean 2, var 1 (biased)
    h = torch.tensor([[[[1.0, 3.0]]]])
    # running mean 0, var 1: ||2 - 0|| + ||1 - 1|| = 2
    assert float(bn_statistic_loss(h, torch.zeros(1), torch.ones(1))[0]) == 2.0
    # two channels: mean (2, 0), var (1, 4) vs (1, 1), (1, 1):
    # ||(1, -1)|| + ||(0, 3)|| = sqrt(2) + 3
    h2 = torch.tensor([[[[1.0, 3.0]], [[-2.0, 2.0]]]])
    got = float(bn_statistic_loss(h2, torch.ones(2), torch.ones(2))[0])
    assert got == pytest.approx(2**0.5 + 3.0)
    # per image: a second image does not change the first one's loss
    both = bn_statistic_loss(torch.cat([h2, 5 * h2]), torch.ones(2), torch.ones(2))
    assert float(both[0]) == pytest.approx(got)


def test_guidance_loss_is_cross_entropy_plus_weighted_bn_and_bn_only_in_warmup():
    logits = torch.tensor([[0.0, 0.0], [2.0, 0.0]])
    y = torch.tensor([0, 1])
    bn = torch.tensor([1.0, 3.0])
    ce = torch.tensor(
        [torch.log(torch.tensor(2.0)), 2 + torch.log1p(torch.exp(torch.tensor(-2.0)))]
    )
    torch.testing.assert_close(guidance_loss(logits, bn, y, 0.1, False), ce + 0.1 * bn)
    torch.testing.assert_close(guidance_loss(logits, bn, y, 0.1, True), 0.1 * bn)


def test_guiding_model_sums_the_bn_terms_of_every_bn_layer():
    torch.manual_seed(0)
    model = build_classifier("cnn", 1, 3).eval()
    bns = [m for m in model.modules() if isinstance(m, nn.BatchNorm2d)]
    for m in bns:  # non-trivial running statistics
        m.running_mean.uniform_(-1, 1)
        m.running_var.uniform_(0.5, 2)
    seen: list[torch.Tensor] = []
    hooks = [
        m.register_forward_hook(
            lambda m, i, o: seen.append(
                bn_statistic_loss(i[0], m.running_mean, m.running_var)
            )
        )
        for m in bns
    ]
    x = torch.randn(2, 1, 16, 16)
    logits, bn = GuidingModel(model)(x)
    for h in hooks:
        h.remove()
    assert logits.shape == (2, 3) and len(seen) == len(bns) == 3
    torch.testing.assert_close(bn, sum(seen))


def _payload(arch="cnn", k=10):
    state = build_classifier(arch, 1, k).state_dict()
    counts = torch.zeros(k, dtype=torch.int64)
    counts[[1, 4]] = 7
    return P.layout(state, counts)


@pytest.mark.parametrize(
    "arch, mutate, reason",
    [
        ("vit", None, "arch='vit' is not one of"),
        ("cnn", lambda t: t.pop(P.COUNTS), "lacks '_class_counts'"),
        ("cnn", lambda t: t.update({P.COUNTS: -t[P.COUNTS]}), "must be >= 0"),
        (
            "cnn",
            lambda t: t.update({P.COUNTS: t[P.COUNTS][:3]}),
            "expected int64 \\[10\\]",
        ),
        (
            "cnn",
            lambda t: t.update({"head.weight": t["head.weight"] * float("nan")}),
            "NaN",
        ),
        ("resnet18", None, "resnet18 model"),  # the weights of a cnn, claimed resnet18
    ],
)
def test_bad_payloads_are_rejected_with_a_reason(arch, mutate, reason):
    t = _payload("cnn")
    if mutate:
        mutate(t)
    with pytest.raises(PayloadError, match=reason):
        P.unpack(t, arch, channels=1, num_classes=10)
    good = P.unpack(_payload("resnet18"), "resnet18", channels=1, num_classes=10)
    assert good.classes == [1, 4]


@pytest.mark.parametrize("aggregation", ["sd", "md"])
def test_clients_of_two_architectures_in_one_round(
    tiny_stack, fast_config, aggregation
):
    fast_config |= {
        "method": "fedlmg",
        "fedlmg-client-classifiers": "cnn,resnet18",
        "fedlmg-aggregation": aggregation,
        "fedlmg-warmup-steps": 1,
        "images-per-class": 2,
    }
    grid = FakeGrid(client_app, 3, fast_config)
    res = run_one_shot(grid, build_config(fast_config), f"lmg-{aggregation}")
    assert not res["rejected"] and res["num_clients"] == 3
    archs = res["fedlmg"]["client_archs"]
    assert sorted(archs.values()) == ["cnn", "cnn", "resnet18"]
    assert 0 <= res["fedlmg"]["guiding_model_agreement"] <= 1
    on_disk = json.loads(
        (tmp := fast_config["output-dir"])
        and open(f"{tmp}/lmg-{aggregation}/results.json").read()
    )
    assert on_disk["fedlmg"]["aggregation"] == aggregation
    assert all(c["upload_bytes"] > 0 for c in res["clients"])
    assert res["global_accuracy"] is not None


def test_teacher_soft_labels_ensemble_for_md_and_own_model_for_sd():
    from methods.fedlmg.server_fedlmg import FedLmg

    class Const(nn.Module):
        def __init__(self, logits):
            super().__init__()
            self.logits = torch.tensor(logits)

        def forward(self, x):
            return self.logits.expand(len(x), -1)

    models = {0: Const([0.0, 0.0]), 1: Const([0.0, 20.0])}
    images = torch.zeros(3, 1, 4, 4, dtype=torch.uint8)
    owners, labels = torch.tensor([0, 1, 1]), torch.tensor([0, 1, 0])
    ctx = type("Ctx", (), {"num_classes": 2, "device": torch.device("cpu")})()
    m = FedLmg()
    md, agree = m._teacher(models, images, labels, owners, "md", ctx)
    p1 = torch.softmax(torch.tensor([0.0, 20.0]), 0)
    torch.testing.assert_close(md, ((torch.tensor([0.5, 0.5]) + p1) / 2).expand(3, -1))
    sd, _ = m._teacher(models, images, labels, owners, "sd", ctx)
    torch.testing.assert_close(sd, torch.stack([torch.tensor([0.5, 0.5]), p1, p1]))
    assert m._teacher(models, images, labels, owners, "ft", ctx)[0] is None
    # own-model argmax: image 0 ties -> class 0 (right), 1 right, 2 wrong
    assert agree == pytest.approx(2 / 3)


def test_guidance_runs_through_the_vae_of_a_latent_stable_diffusion_generator(
    fast_config, tmp_path
):
    """The hub path: a tiny SD-format generator (latents [4, 4, 4] decoded to 3x8x8
    by its VAE): the client models' loss is taken on VAE-decoded predictions, and the
    round's outputs are well formed."""
    from tiny_stack import make_tiny_sd

    from common.contract import Reply
    from common.datasets import dataset_info
    from methods.base import ServerContext
    from methods.fedlmg import FedLmg

    sd = make_tiny_sd(tmp_path / "sd")
    over = {
        "method": "fedlmg",
        "generator": str(sd),
        "text-encoder": str(sd),
        "embedding": "sequence",
        "images-per-class": 2,
        "fedlmg-warmup-steps": 1,
        "scheduler": "ddim",
    }
    cfg = build_config(fast_config | over)
    ctx = ServerContext(cfg, tmp_path, info=dataset_info(cfg.data_args()))
    method = FedLmg()
    method.check(ctx)
    torch.manual_seed(0)
    replies = [
        Reply(1, 0, 14, 1000, {"arch": "cnn"}, {}, _payload("cnn")),
        Reply(2, 1, 14, 1000, {"arch": "resnet18"}, {}, _payload("resnet18")),
    ]
    for r in replies:
        method.validate(r, ctx)
    decoded: list[tuple[int, ...]] = []
    hook = ctx.generator.vae.decoder.register_forward_hook(
        lambda m, a, o: decoded.append(tuple(a[0].shape[1:]))
    )
    out = method.server_work(replies, ctx)
    hook.remove()
    assert decoded and set(decoded) == {(4, 4, 4)}  # latents through the VAE
    assert out.extra["num_synthetic"] == 2 * 2 * 2  # 2 clients x 2 classes x 2
    assert out.model_state is not None
    assert all(torch.isfinite(v.float()).all() for v in out.model_state.values())
    assert out.samples and all(s.shape[1:] == (1, 16, 16) for s in out.samples.values())
