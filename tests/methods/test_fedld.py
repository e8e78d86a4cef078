"""methods.fedld: the mixture maths by hand, the payload checks, the server side
with mock uploads (no Grid) on the pixel-space tiny stack, and both halves on a
tiny Stable-Diffusion-format generator (the latent path: VAE encode on the
client, mixture draws denoised and VAE-decoded on the server)."""

from __future__ import annotations

import math
import re

import pytest
import torch
from tiny_stack import make_tiny_sd

from common.contract import PayloadError, Reply
from common.datasets import ClientData, dataset_info
from common.synthesis_start import start_step
from methods import build_config
from methods.base import ClientJob, ServerContext
from methods.fedld import FedLD, client_fedld
from methods.fedld import payload_fedld as P
from methods.fedld.maths_fedld import (
    VAR_FLOOR,
    Mixture,
    components_for,
    draw,
    fit_gmm,
    log_gaussian,
    mixture_log_likelihood,
)

# ---------------------------------------------------------------- maths


def test_log_gaussian_by_hand():
    # x = 1, mu = 0, var = 1: -1/2 (log 2 pi + 1); var = 4: -1/2 (log 8 pi + 1/4)
    x = torch.tensor([[1.0]])
    got = log_gaussian(x, torch.tensor([[0.0], [0.0]]), torch.tensor([[1.0], [4.0]]))
    want = [-0.5 * (math.log(2 * math.pi) + 1), -0.5 * (math.log(8 * math.pi) + 0.25)]
    assert got.shape == (1, 2)
    assert got[0].tolist() == pytest.approx(want)
    # two dimensions add
    two = log_gaussian(torch.tensor([[1.0, 1.0]]), torch.zeros(1, 2), torch.ones(1, 2))
    assert float(two) == pytest.approx(2 * want[0])


def test_fit_gmm_finds_two_separated_clusters():
    g = torch.Generator().manual_seed(0)
    a = torch.randn(40, 3, generator=g) * 0.1 + torch.tensor([5.0, 0.0, 0.0])
    b = torch.randn(20, 3, generator=g) * 0.3 - torch.tensor([5.0, 0.0, 0.0])
    m = fit_gmm(torch.cat([a, b]), k=2, seed=1)
    order = m.means[:, 0].argsort(descending=True)
    means, var, counts = m.means[order], m.variances[order], m.counts[order]
    assert counts.tolist() == [40, 20]
    assert m.weights[order].tolist() == pytest.approx([40 / 60, 20 / 60])
    assert torch.allclose(means[0], a.mean(0), atol=1e-4)
    assert torch.allclose(means[1], b.mean(0), atol=1e-4)
    # the variance is the cluster's own (biased) variance plus the floor
    assert torch.allclose(var[0], a.var(0, unbiased=False) + VAR_FLOOR, atol=1e-4)
    # the fit explains the data better than one Gaussian
    one = fit_gmm(torch.cat([a, b]), k=1)
    x = torch.cat([a, b])
    assert mixture_log_likelihood(x, m).mean() > mixture_log_likelihood(x, one).mean()


def test_fit_gmm_single_point_and_more_components_than_points():
    x = torch.tensor([[1.0, 2.0]])
    m = fit_gmm(x, k=3)
    assert m.counts.tolist() == [1]
    assert m.means.tolist() == [[1.0, 2.0]]
    assert m.variances[0].tolist() == pytest.approx([VAR_FLOOR, VAR_FLOOR])
    with pytest.raises(ValueError, match="N >= 1"):
        fit_gmm(torch.zeros(0, 2), k=1)


def test_components_for_and_draw_by_hand():
    assert components_for(100, 3, 5) == 3
    assert components_for(12, 3, 5) == 2  # 12 // 5
    assert components_for(4, 3, 5) == 1  # fewer images than the minimum: one
    mean, var = torch.tensor([[1.0, -1.0]]), torch.tensor([[4.0, 0.25]])
    noise = torch.tensor([[0.5, 2.0]])
    assert draw(mean, var, noise).tolist() == [[2.0, 0.0]]  # 1 + 2 * .5, -1 + .5 * 2


def test_start_step_by_hand():
    assert start_step(10, 1.0) == 0
    assert start_step(10, 0.7) == 3
    assert start_step(10, 0.01) == 9  # at least one step runs
    assert start_step(2, 0.5) == 1


# ---------------------------------------------------------------- payload


def _mixtures(shape=(1, 16, 16), classes=(3, 7), per=2, seed=0) -> P.ClassMixtures:
    g = torch.Generator().manual_seed(seed)
    ids = torch.tensor(classes).repeat_interleave(per)
    return P.ClassMixtures(
        ids,
        torch.full((len(ids),), 6, dtype=torch.int64),
        torch.randn(len(ids), *shape, generator=g).clamp(-1, 1),
        torch.full((len(ids), *shape), 0.05),
    )


def _unpack(t, per_class=3):
    return P.unpack(t, num_classes=10, shape=(1, 16, 16), per_class=per_class)


def test_payload_round_trip_is_fp16_and_accepted():
    t = P.layout(_mixtures())
    assert t["means"].dtype == t["variances"].dtype == torch.float16
    m = _unpack(t)
    assert m.class_ids.tolist() == [3, 3, 7, 7]


@pytest.mark.parametrize(
    "mutate,reason",
    [
        (lambda t: t.pop("variances"), "lacks 'variances'"),
        (lambda t: t.update(means=t["means"][:, :, :8]), "latent shape"),
        (lambda t: t.update(variances=torch.zeros_like(t["variances"])), "variances"),
        (lambda t: t.update(counts=torch.zeros_like(t["counts"])), "counts"),
        (lambda t: t.update(class_ids=torch.tensor([3, 3, 3, 3])), "fedld-components"),
        (lambda t: t.update(class_ids=torch.tensor([3, 3, 7, 12])), "outside [0, 10)"),
        (lambda t: t["means"].view(-1).__setitem__(0, float("nan")), "NaN"),
        (lambda t: t.update(counts=t["counts"][:2]), "the same M"),
        (lambda t: t.update(means=t["means"].to(torch.int32)), "dtype"),
    ],
)
def test_malformed_payload_is_rejected_with_a_reason(mutate, reason):
    t = P.layout(_mixtures())
    mutate(t)
    with pytest.raises(PayloadError, match=re.escape(reason)):
        _unpack(t)


# ---------------------------------------------------------------- server, pixels


def _ctx(fast_config, tmp_path, **over) -> ServerContext:
    cfg = build_config(fast_config | {"method": "fedld"} | over)
    return ServerContext(cfg, tmp_path, info=dataset_info(cfg.data_args()))


def _reply(pid: int, m: P.ClassMixtures, n: int = 24) -> Reply:
    return Reply(pid + 1, pid, n, 1000, {}, {}, P.layout(m))


def test_server_work_on_mock_uploads(tiny_stack, fast_config, tmp_path):
    ctx = _ctx(fast_config, tmp_path, **{"images-per-class": 4})
    method = FedLD()
    method.check(ctx)
    replies = [_reply(0, _mixtures()), _reply(1, _mixtures(classes=(1,), seed=1))]
    for r in replies:
        method.validate(r, ctx)
    out = method.server_work(replies, ctx)
    assert out.extra["num_synthetic"] == 3 * 4  # 3 (client, class) cells x 4
    assert set(out.samples) == {(0, 3), (0, 7), (1, 1)}
    assert all(torch.isfinite(v.float()).all() for v in out.model_state.values())
    assert out.timings["synthesize"] > 0 and out.timings["train"] > 0
    bad = _reply(2, _mixtures(shape=(1, 8, 8)))
    with pytest.raises(PayloadError, match="latent shape"):
        method.validate(bad, ctx)


def test_the_images_follow_the_clients_mixtures(tiny_stack, fast_config, tmp_path):
    """Two clients of one class: one bright, one dark. At a low strength the
    synthetic images keep each client's brightness (the generator follows the
    uploaded distribution, not only the class prompt)."""
    ctx = _ctx(
        fast_config,
        tmp_path,
        **{"images-per-class": 6, "fedld-strength": 0.1, "num-inference-steps": 10},
    )
    bright, dark = _mixtures(classes=(5,), per=1), _mixtures(classes=(5,), per=1)
    bright.means[:] = 0.8
    dark.means[:] = -0.8
    out = FedLD().server_work([_reply(0, bright), _reply(1, dark)], ctx)
    assert float(out.samples[(0, 5)].mean()) > 0.3
    assert float(out.samples[(1, 5)].mean()) < -0.3


def test_client_fits_mixtures_in_pixel_space(tiny_stack, fast_config):
    cfg = build_config(fast_config | {"method": "fedld", "fedld-min-per-component": 3})
    labels = torch.tensor([2] * 10 + [4] * 2)
    images = torch.rand(len(labels), 1, 16, 16) * 2 - 1
    job = ClientJob(
        cfg, 0, 2, ClientData(images, labels, images[:2], labels[:2], "thin")
    )
    res = client_fedld.collect(job)
    m = _unpack(res.payload)
    # class 2: at most min(3, 10 // 3) = 3 components, each of >= 3 images;
    # class 4 (2 images, fewer than the floor) is withheld
    assert set(m.class_ids.tolist()) == {2} and 1 <= len(m.class_ids) <= 3
    assert int(m.counts.sum()) == 10 and int(m.counts.min()) >= 3
    assert res.metrics["classes-withheld"] == 1
    # every mean averages >= 3 random images: none is an image itself
    assert res.metrics["nearest-image-rms"] > 0.1
    assert res.metrics["client-s-per-image"] > 0
    assert res.meta["latent-shape"] == "1x16x16"
    # a client with no class large enough uploads nothing the server accepts
    few = ClientJob(
        cfg, 1, 2, ClientData(images[-2:], labels[-2:], images, labels, "x")
    )
    with pytest.raises(PayloadError, match="no mixture"):
        _unpack(client_fedld.collect(few).payload)


# ---------------------------------------------------------------- tiny SD: latents


def test_latent_generator_path_on_a_tiny_sd_model(fast_config, tmp_path):
    sd = make_tiny_sd(tmp_path / "sd")
    over = {
        "method": "fedld",
        "generator": str(sd),
        "text-encoder": str(sd),
        "embedding": "sequence",
        "images-per-class": 2,
        "scheduler": "ddim",
        "fedld-min-per-component": 2,
    }
    cfg = build_config(fast_config | over)
    # client: the VAE maps the images to the UNet's 4x4x4 latents
    space = client_fedld.latent_space(str(sd))
    assert space.shape == (4, 4, 4) and space.vae is not None
    labels = torch.tensor([1] * 6 + [8] * 4)
    images = torch.rand(len(labels), 1, 16, 16) * 2 - 1
    job = ClientJob(
        cfg, 0, 1, ClientData(images, labels, images[:2], labels[:2], "noisy")
    )
    res = client_fedld.collect(job)
    assert res.meta["latent-shape"] == "4x4x4"
    assert tuple(res.payload["means"].shape[1:]) == (4, 4, 4)
    # server: draws in latent space, denoised and decoded by the VAE
    ctx = ServerContext(cfg, tmp_path, info=dataset_info(cfg.data_args()))
    method = FedLD()
    method.check(ctx)
    reply = Reply(1, 0, len(labels), 1000, {}, {}, res.payload)
    method.validate(reply, ctx)
    decoded: list[tuple[int, ...]] = []
    hook = ctx.generator.vae.decoder.register_forward_hook(
        lambda m, a, o: decoded.append(tuple(a[0].shape[1:]))
    )
    out = method.server_work([reply], ctx)
    hook.remove()
    assert decoded and set(decoded) == {(4, 4, 4)}
    assert out.extra["num_synthetic"] == 2 * 2  # 2 classes x 2 images
    assert all(s.shape[1:] == (1, 16, 16) for s in out.samples.values())


def test_mixture_weights_are_count_shares():
    m = Mixture(torch.zeros(2, 1), torch.ones(2, 1), torch.tensor([1, 3]))
    assert m.weights.tolist() == [0.25, 0.75]
