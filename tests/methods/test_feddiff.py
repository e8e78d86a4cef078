"""FedDiff (methods/feddiff): the maths against hand-computed values, the
autoencoder's reconstruction, generated weights that load and classify, and the
server's rejection of bad uploads and bad keys."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch

from common.contract import PayloadError, Reply
from common.datasets import dataset_info
from methods import ConfigError, build_config
from methods.base import ServerContext
from methods.feddiff import FedDiff
from methods.feddiff import maths_feddiff as M
from methods.feddiff.model_feddiff import (
    flatten_subset,
    load_feddiff,
    reconstruction_mse,
    subset_names,
    unflatten_subset,
)
from methods.feddiff.server_feddiff import consolidate

ROOT = Path(__file__).resolve().parents[2]
EMBEDDED = ROOT / "common" / "embedded" / "feddiff"
TINY_RECON_MAX = 0.5  # the tiny builder's AE (normalised units; pool variance = 1)
SHIPPED_RECON_MAX = 0.1  # the shipped one's recorded pool reconstruction error (0.074)


# ------------------------------------------------------------------ the maths


def test_superposition_by_hand():
    mu = torch.tensor([[1.0, 2.0], [3.0, 4.0]])
    sigma = torch.tensor([[1.0, 2.0], [3.0, 2.0]])
    mu_s, sigma_s = M.superpose(mu, sigma)
    # mean of mu; sigma_s^2 = mean(sigma^2) = [(1 + 9) / 2, (4 + 4) / 2]
    assert torch.allclose(mu_s, torch.tensor([2.0, 3.0]))
    assert torch.allclose(sigma_s, torch.tensor([math.sqrt(5.0), 2.0]))


def test_superposition_refuses_mismatched_shapes():
    with pytest.raises(ValueError, match="same"):
        M.superpose(torch.zeros(2, 3), torch.zeros(2, 4))


def test_reparameterisation_by_hand():
    mu_s, sigma_s = torch.tensor([2.0, 3.0]), torch.tensor([math.sqrt(5.0), 2.0])
    eps = torch.tensor([[1.0, -1.0], [0.0, 0.5]])
    z = M.reparameterise(mu_s, sigma_s, eps)
    assert torch.allclose(z, torch.tensor([[2 + math.sqrt(5.0), 1.0], [2.0, 4.0]]))


def test_kl_to_standard_normal_by_hand():
    # dim 0: N(0, 1) -> 0; dim 1: 0.5 (1 + 4 - 1 - log 4); mean over the 2 dims
    kl = M.kl_to_standard(torch.tensor([0.0, 1.0]), torch.tensor([1.0, 2.0]))
    assert float(kl) == pytest.approx(0.5 * 0.5 * (4 - math.log(4)), rel=1e-6)
    assert float(M.kl_to_standard(torch.zeros(3), torch.ones(3))) == pytest.approx(0)


def test_contrastive_term_by_hand():
    anchors = torch.tensor([[1.0, 0.0]])
    pool = torch.tensor([[2.0, 0.0], [0.0, 3.0]])  # cosines 1 and 0
    got = M.contrastive_loss(anchors, pool, torch.tensor([0]), temperature=1.0)
    assert float(got) == pytest.approx(math.log(1 + math.exp(-1)), rel=1e-6)
    # the positive the other way round: -log(e^0 / (e^1 + e^0))
    got = M.contrastive_loss(anchors, pool, torch.tensor([1]), temperature=1.0)
    assert float(got) == pytest.approx(math.log(1 + math.e), rel=1e-6)


def test_positive_is_the_pool_entry_of_nearest_accuracy():
    pool_acc = torch.tensor([0.95, 0.9, 0.6, 0.4])
    got = M.nearest_accuracy(torch.tensor([0.45, 0.92, 0.1]), pool_acc)
    assert got.tolist() == [3, 1, 3]


def test_ddpm_steps_by_hand():
    x = M.q_sample(
        torch.ones(1, 2),
        torch.tensor([0]),
        torch.ones(1, 2),
        torch.tensor([0.64], dtype=torch.float64),
    )
    assert torch.allclose(x, torch.full((1, 2), 0.8 + 0.6))
    sched = {
        "betas": torch.tensor([0.1, 0.2]),
        "alphas": torch.tensor([0.9, 0.8]),
        "abar": torch.tensor([0.9, 0.72]),
    }
    # t = 0: the mean, no noise: (x - beta / sqrt(1 - abar) eps) / sqrt(alpha)
    got = M.p_step(torch.ones(1, 1), torch.ones(1, 1), 0, sched, torch.ones(1, 1))
    want = (1 - 0.1 / math.sqrt(0.1)) / math.sqrt(0.9)
    assert float(got) == pytest.approx(want, rel=1e-6)
    # t = 1 adds sqrt(beta) * noise
    got = M.p_step(torch.ones(1, 1), torch.zeros(1, 1), 1, sched, torch.ones(1, 1))
    assert float(got) == pytest.approx(1 / math.sqrt(0.8) + math.sqrt(0.2), rel=1e-6)


# ------------------------------------------------------------------ the subset


def test_subset_names_and_round_trip():
    from common.models import SmallCNN

    net = SmallCNN(1, 10)
    names = subset_names(net, "features.4.1, head")
    assert names == [
        "features.4.1.weight",
        "features.4.1.bias",
        "head.weight",
        "head.bias",
    ]
    state = net.state_dict()
    vec = flatten_subset(state, names)
    assert vec.numel() == 2 * 128 + 128 * 10 + 10
    shapes = {n: list(state[n].shape) for n in names}
    back = unflatten_subset(vec, names, shapes)
    assert all(torch.equal(back[n], state[n]) for n in names)
    with pytest.raises(ValueError, match="features.9"):
        subset_names(net, "head,features.9")


# ------------------------------------------------------------------ the models


def test_tiny_builder_autoencoder_reconstructs_the_pool(tiny_stack_dir):
    m = load_feddiff(tiny_stack_dir / "feddiff")
    assert m.config["metrics"]["ae_recon_mse"] < TINY_RECON_MAX
    assert m.config["pool"]["size"] == len(m.pool_acc) == len(m.pool_mu)
    assert bool((m.pool_acc[:-1] >= m.pool_acc[1:]).all())  # sorted, best first
    # the pool's best member, encoded and decoded
    x = m.normalise(flatten_subset(m.pool_best, m.names))[None]
    assert reconstruction_mse(m.ae, x) < TINY_RECON_MAX


def test_shipped_model_records_its_reconstruction_error():
    cfg = json.loads((EMBEDDED / "config.json").read_text())
    assert cfg["metrics"]["ae_recon_mse"] < SHIPPED_RECON_MAX
    assert cfg["params"] == [
        "features.4.1.weight",
        "features.4.1.bias",
        "head.weight",
        "head.bias",
    ]
    size = sum(f.stat().st_size for f in EMBEDDED.rglob("*") if f.is_file())
    assert size < 3e6  # small in bytes
    m = load_feddiff(EMBEDDED)
    x = m.normalise(flatten_subset(m.pool_best, m.names))[None]
    assert reconstruction_mse(m.ae, x) < SHIPPED_RECON_MAX


def test_generated_weights_load_and_give_finite_outputs(tiny_stack_dir):
    from common.models import build_classifier
    from methods.feddiff.config_feddiff import FedDiffConfig

    m = load_feddiff(tiny_stack_dir / "feddiff")
    g = torch.Generator().manual_seed(0)
    clients = []
    for _ in range(3):  # clients: the pool's best, fine-tuned a little
        s = {k: v.clone() for k, v in m.pool_best.items()}
        for n in m.names:
            s[n] += 0.01 * torch.randn(s[n].shape, generator=g)
        clients.append(s)
    x = torch.stack([m.normalise(flatten_subset(s, m.names)) for s in clients])
    opts = FedDiffConfig(feddiff_finetune_steps=3, feddiff_denoise_step=20)
    timings: dict[str, float] = {}
    decoded, info = consolidate(m, x, torch.tensor([0.3, 0.2, 0.1]), opts, 0, timings)
    assert decoded.shape == x.shape and bool(torch.isfinite(decoded).all())
    assert set(timings) == {"finetune", "denoise"}
    assert len(info["positives_pool_accuracy"]) == 3
    net = build_classifier("cnn", 1, 10)
    gen = unflatten_subset(m.denormalise(decoded[0]), m.names, m.shapes)
    net.load_state_dict(clients[0] | gen)
    out = net.eval()(torch.randn(4, 1, 16, 16))
    assert out.shape == (4, 10) and bool(torch.isfinite(out).all())
    # seeded: the same call gives the same weights
    again, _ = consolidate(m, x, torch.tensor([0.3, 0.2, 0.1]), opts, 0, {})
    assert torch.equal(decoded, again)


# ------------------------------------------------------------------ the server


def _ctx(tmp_path, **keys) -> ServerContext:
    from conftest import default_run_config

    cfg = build_config(default_run_config() | {"method": "feddiff"} | keys)
    return ServerContext(cfg, tmp_path, info=dataset_info(cfg.data_args()))


def _reply(tensors) -> Reply:
    return Reply(
        node_id=1,
        partition_id=0,
        num_examples=10,
        upload_bytes=0,
        meta={},
        metrics={},
        tensors=tensors,
    )


def test_bad_uploads_are_rejected_with_a_reason(tiny_stack, tmp_path):
    method, ctx = FedDiff(), _ctx(tmp_path)
    method.check(ctx)
    good = {k: v.clone() for k, v in method.model.pool_best.items()}
    method.validate(_reply(good), ctx)
    nan = good | {"head.weight": good["head.weight"].clone().fill_(float("nan"))}
    with pytest.raises(PayloadError, match="head.weight"):
        method.validate(_reply(nan), ctx)
    inf = good | {"head.bias": torch.full_like(good["head.bias"], float("inf"))}
    with pytest.raises(PayloadError, match="head.bias"):
        method.validate(_reply(inf), ctx)
    with pytest.raises(PayloadError, match="keys differ"):
        method.validate(_reply(good | {"extra.weight": torch.zeros(2)}), ctx)
    with pytest.raises(PayloadError, match="shape"):
        method.validate(_reply(good | {"head.bias": torch.zeros(11)}), ctx)


def test_unknown_params_subset_is_a_config_error(tiny_stack, tmp_path):
    with pytest.raises(ConfigError, match=r"feddiff-params = 'head,conv9'.*conv9"):
        FedDiff().check(_ctx(tmp_path, **{"feddiff-params": "head,conv9"}))
    # a subset of the classifier, but not the one the model was built for
    with pytest.raises(ConfigError, match=r"feddiff-params = 'head'.*built for"):
        FedDiff().check(_ctx(tmp_path, **{"feddiff-params": "head"}))


def test_missing_model_is_a_config_error(tiny_stack, tmp_path):
    with pytest.raises(ConfigError, match="feddiff-model"):
        FedDiff().check(_ctx(tmp_path, **{"feddiff-model": str(tmp_path / "none")}))
