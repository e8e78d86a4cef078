"""The privacy guard in the methods: the server, knowing the run config and the
partition id, cannot recover a DP upload's clean values; every method with a
guard runs with its default settings and reports what it spent in
results.json."""

from __future__ import annotations

import json
import math

import pytest
import torch

from common import dp
from common.datasets import ClientData
from common.maths import per_class_mean
from methods import METHODS, build_config
from methods.base import ClientJob
from methods.oscar import client_oscar

PRIVATE = ["oscar", "feddisc", "feddeo", "lora"]


def _run(rc: dict, run_id: str) -> dict:
    from fakegrid import FakeGrid

    from client_app.app import app as client_app
    from server_app.round import run_one_shot

    run_one_shot(FakeGrid(client_app, 2, rc), build_config(rc), run_id)
    out = rc["output-dir"] + f"/{run_id}/results.json"
    with open(out) as f:
        return json.load(f)


def _data(n: int = 24, classes: tuple[int, ...] = (3, 7)) -> ClientData:
    torch.manual_seed(0)
    labels = torch.tensor(classes).repeat_interleave(n // len(classes))
    images = torch.rand(len(labels), 1, 16, 16) * 2 - 1
    return ClientData(images, labels, images[:4], labels[:4], "thick")


def test_the_server_cannot_recover_the_clean_class_means(tiny_stack, fast_config):
    """OSCAR's per-class means, dp-epsilon = 1: the server knows the run config,
    the partition id (so ``job.seed``), the counts and the mechanism; it
    regenerates the noise a seeded client would have drawn and subtracts it."""
    rc = fast_config | {"method": "oscar", "dp-epsilon": 1.0}
    cfg = build_config(rc | {"prototypes-per-class": 1})
    job = ClientJob(cfg, 0, 2, _data())
    # 1. What the client computes before the noise (the test may look)
    caps, _ = client_oscar.caption_images(cfg, job.data)
    emb = client_oscar.encode_captions(cfg, caps)
    ids, clean, counts = per_class_mean(
        dp.clip_rows(emb.double(), cfg.dp_clip), job.data.train_labels, 10
    )
    # 2. Two uploads with the same config and partition id differ
    up1 = client_oscar.collect(job)
    up2 = client_oscar.collect(job)
    m1, m2 = up1.payload["mean"].double(), up2.payload["mean"].double()
    assert torch.equal(up1.payload["class_ids"], ids)
    assert not torch.equal(m1, m2)
    # 3. The server's best reconstruction: subtract the noise job.seed gives
    mu = dp.gaussian_mu(cfg.dp_epsilon, cfg.dp_delta)
    sigmas = torch.tensor([2 * cfg.dp_clip / int(n) / mu for n in counts])
    g = torch.Generator().manual_seed(job.seed)
    guess = torch.stack(
        [
            s * torch.randn(clean[0].shape, generator=g, dtype=torch.float64)
            for s in sigmas
        ]
    )
    resid = (m1 - guess - clean).flatten(1).norm(dim=1)
    # what is left is the noise (and the guess's), not ~0: ~ sigma sqrt(2 d)
    d = clean[0].numel()
    expected = sigmas * math.sqrt(2 * d)
    assert (resid > 0.5 * expected).all() and (resid < 1.5 * expected).all()
    # 4. Against a client that seeded its noise with job.seed the same attack
    # recovers the clean values exactly: the test has teeth
    g = torch.Generator().manual_seed(job.seed)
    seeded = clean + torch.stack(
        [
            s * torch.randn(clean[0].shape, generator=g, dtype=torch.float64)
            for s in sigmas
        ]
    )
    assert float((seeded - guess - clean).abs().max()) < 1e-12
    # 5. The account: (1, 1e-5) spent, sigma = 2 C / n * 3.7306
    assert up1.metrics["dp-epsilon"] == pytest.approx(1.0)
    assert up1.metrics["dp-delta"] == 1e-5
    assert up1.metrics["dp-sigma"] == pytest.approx(2 / 12 * 3.730632, rel=1e-5)
    assert up1.meta["example-caption"] == ""  # no caption of a private image


@pytest.mark.parametrize("method", PRIVATE)
def test_two_runs_with_the_same_config_and_partition_upload_different_values(
    method, tiny_stack, fast_config
):
    """Everything a client draws from the run seed is the same in both runs; the
    uploads differ, so the noise is not a function of what the server knows.
    (How many vectors go up can differ too: DP-Lloyd, OSCAR's default with 3
    prototypes per class, drops a cluster whose noisy count is under its floor.)"""
    cfg = build_config(fast_config | {"method": method, "dp-epsilon": 1.0})
    job = ClientJob(cfg, 1, 2, _data())
    a = METHODS[method].client_collect(job)
    b = METHODS[method].client_collect(job)
    floats = [k for k, v in a.payload.items() if v.is_floating_point()]
    assert floats
    for k in floats:
        x, y = a.payload[k], b.payload[k]
        assert x.shape != y.shape or not torch.equal(x, y), k
    assert a.metrics["dp-epsilon"] == pytest.approx(1.0)
    assert a.metrics["dp-delta"] == 1e-5


@pytest.mark.parametrize("method", PRIVATE)
def test_dp_runs_with_default_settings_and_results_carry_the_budget(
    method, tiny_stack, fast_config
):
    rc = fast_config | {"method": method, "dp-epsilon": 2.0, "dp-delta": 1e-6}
    res = _run(rc, f"dp-{method}")
    assert res["num_clients"] == 2 and not res["rejected"]
    for c in res["clients"]:
        assert c["dp"]["epsilon"] == pytest.approx(2.0, abs=1e-6), c
        assert c["dp"]["delta"] == 1e-6


def test_without_the_guard_results_say_no_budget(tiny_stack, fast_config):
    rc = fast_config | {"method": "oscar"}
    res = _run(rc, "no-dp")
    assert all(c["dp"] is None for c in res["clients"])


def test_dp_sgd_without_noise_or_clipping_is_train_lora(tmp_path, monkeypatch):
    """On a tiny Stable-Diffusion-format UNet: with the noise off and a clip no
    gradient reaches, the per-example gradients (``torch.func``) average to the
    batch gradient, so one DP-SGD step is one ``train_lora`` step."""
    from tiny_stack import make_tiny_sd

    from common.generator import load_generator
    from common.lora import attach_lora, get_lora_state, train_lora
    from methods.lora.client_lora import train_lora_private

    gen = load_generator(str(make_tiny_sd(tmp_path / "sd")), "ddpm")
    torch.manual_seed(0)
    images = torch.randn(6, 4, 4, 4)
    cond = torch.randn(6, 16, 32)
    uncond = torch.zeros(1, 16, 32)
    kw = dict(steps=1, lr=1e-2, batch_size=4, seed=3, uncond=uncond)
    targets = ["to_q", "to_v", "conv1"]

    unet = attach_lora(gen.unet, 2, 2.0, targets, seed=0)
    train_lora(unet, gen.scheduler, images, cond, **kw)
    plain = get_lora_state(unet)

    monkeypatch.setattr(
        dp, "gaussian_noise", lambda shape, sigma, rng=None: torch.zeros(shape)
    )
    unet = attach_lora(gen.unet, 2, 2.0, targets, seed=0)
    _, sigma = train_lora_private(
        unet, gen.scheduler, images, cond, mu=1.0, clip=1e9, **kw
    )
    private = get_lora_state(unet)
    assert sigma == pytest.approx(2e9 * math.sqrt(1) / 1.0)  # E = 1 epoch
    assert set(private) == set(plain)
    for k in plain:
        assert torch.allclose(private[k], plain[k], atol=1e-5), k
    # the step moved the adapter (B starts at zero)
    assert any(float(v.abs().max()) > 0 for k, v in private.items() if "lora_B" in k)


@pytest.mark.parametrize("name", sorted(METHODS))
def test_dp_is_refused_where_a_method_uploads_without_it(name, fast_config):
    """dp-epsilon > 0 never yields an unprotected upload: a method that uploads
    something and has no mechanism for it is refused before any client works."""
    from common.config import ConfigError
    from server_app.round import check_privacy

    method = METHODS[name]()
    cfg = build_config(fast_config | {"method": name, "dp-epsilon": 1.0})
    if method.payload_key is None or method.private_uploads:
        check_privacy(method, cfg)
        return
    with pytest.raises(ConfigError, match=rf"dp-epsilon=1: method='{name}'"):
        check_privacy(method, cfg)
    check_privacy(method, build_config(fast_config | {"method": name}))
