"""methods.fedbip: the maths by hand (forward noise, noise-keeping interpolation,
instance plan, token perturbation, the client's private noise), the slotted
prompt against the text tower's own encoding, the payload checks, the server
side with mock uploads (no Grid), the client on the tiny stack, a whole round,
and both halves on a tiny Stable-Diffusion-format generator (the latent path:
VAE encode on the client, sequence conditioning and VAE decode on the server)."""

from __future__ import annotations

import math
import re

import pytest
import torch
from fakegrid import FakeGrid
from tiny_stack import make_tiny_sd

from client_app.app import app
from common.contract import PayloadError, Reply
from common.datasets import ClientData, dataset_info
from common.generator import load_generator, make_scheduler
from common.synthesis_start import alpha_bar, start_timestep, to_scheduler_state
from common.text_encoder import load_text_encoder
from methods import build_config
from methods.base import ClientJob, ServerContext
from methods.fedbip import FedBiP, client_fedbip
from methods.fedbip import payload_fedbip as P
from methods.fedbip.concepts_fedbip import (
    concept_prompt,
    encode_with_concepts,
    word_token,
)
from methods.fedbip.maths_fedbip import (
    ALPHA_GRID,
    forward_noise,
    instance_plan,
    interpolate_noised,
    perturb_token,
    private_rng,
    standard_normal,
)
from server_app.round import run_one_shot

# ---------------------------------------------------------------- maths


def test_forward_noise_by_hand():
    # sqrt(.25) * 2 + sqrt(.75) * 1 = 1 + 0.8660
    z = forward_noise(torch.tensor([2.0]), 0.25, torch.tensor([1.0]))
    assert z.tolist() == pytest.approx([1 + math.sqrt(0.75)])
    assert forward_noise(torch.tensor([3.0]), 1.0, torch.tensor([5.0])).item() == 3.0
    with pytest.raises(ValueError, match="alpha-bar"):
        forward_noise(torch.zeros(1), 0.0, torch.zeros(1))


def test_interpolation_by_hand_and_it_keeps_the_noise_level():
    zi, zj, e = torch.tensor([[1.0]]), torch.tensor([[3.0]]), torch.tensor([[2.0]])
    # alpha = .5, a = .36: .5 + 1.5 + sqrt(.64 * 2 * .25) * 2 = 2 + 2 sqrt(.32)
    got = interpolate_noised(zi, zj, torch.tensor([0.5]), 0.36, e)
    assert got.item() == pytest.approx(2 + 2 * math.sqrt(0.32))
    # alpha = 1: the instance itself, no added noise
    assert interpolate_noised(zi, zj, torch.tensor([1.0]), 0.36, e).item() == 1.0
    # statistically: signal sqrt(a) (alpha x_i + (1 - alpha) x_j), noise var 1 - a
    g = torch.Generator().manual_seed(0)
    a, n = 0.2, 200_000
    xi, xj = torch.full((n, 1), 1.0), torch.full((n, 1), -1.0)
    z_i = forward_noise(xi, a, torch.randn(n, 1, generator=g))
    z_j = forward_noise(xj, a, torch.randn(n, 1, generator=g))
    alpha = torch.full((n,), 0.3)
    z = interpolate_noised(z_i, z_j, alpha, a, torch.randn(n, 1, generator=g))
    assert float(z.mean()) == pytest.approx(math.sqrt(a) * (0.3 - 0.7), abs=0.01)
    assert float(z.var()) == pytest.approx(1 - a, rel=0.01)
    with pytest.raises(ValueError, match="alpha must be in"):
        interpolate_noised(zi, zj, torch.tensor([1.5]), 0.36, e)


def test_instance_plan_by_hand():
    g = torch.Generator().manual_seed(0)
    i, j, alpha = instance_plan(3, 8, g)
    assert i.tolist() == [0, 1, 2, 0, 1, 2, 0, 1]
    # pass 0 as they are; pass 1 shift 1; pass 2 shift 2 (cycles the partners)
    assert j.tolist() == [0, 1, 2, 1, 2, 0, 2, 0]
    assert alpha[:3].tolist() == [1.0, 1.0, 1.0]
    assert all(round(float(a), 6) in ALPHA_GRID for a in alpha[3:])
    # one instance, or no interpolation: the instances repeated unchanged
    for n, interp in ((1, True), (3, False)):
        i, j, alpha = instance_plan(n, 5, g, interpolate=interp)
        assert torch.equal(i, j) and alpha.tolist() == [1.0] * 5
    assert i.tolist() == [0, 1, 2, 0, 1]


def test_perturb_token_by_hand():
    # rms([3, 4]) = sqrt(12.5); 3 + .1 * sqrt(12.5) * 1, 4 + 0
    got = perturb_token(torch.tensor([[3.0, 4.0]]), 0.1, torch.tensor([[1.0, 0.0]]))
    assert got.tolist()[0] == pytest.approx([3 + 0.1 * math.sqrt(12.5), 4.0])
    assert perturb_token(torch.ones(1, 2), 0.0, torch.ones(1, 2)).tolist() == [[1, 1]]


def test_private_noise_is_keyed_by_the_images_not_the_run_seed():
    images = torch.rand(4, 1, 8, 8)
    a = standard_normal((3,), private_rng(images, 0))
    assert torch.equal(a, standard_normal((3,), private_rng(images.clone(), 0)))
    assert not torch.equal(a, standard_normal((3,), private_rng(images, 1)))
    other = images.clone()
    other[0, 0, 0, 0] += 0.01
    assert not torch.equal(a, standard_normal((3,), private_rng(other, 0)))


def test_noise_step_and_scheduler_state_by_hand():
    from diffusers import DDIMScheduler, DDPMScheduler, EulerDiscreteScheduler

    base = DDPMScheduler(num_train_timesteps=1000, timestep_spacing="leading")
    ddim = DDIMScheduler.from_config(base.config)
    assert start_timestep(ddim, 10, 1.0) == 900  # the schedule's first step
    assert start_timestep(ddim, 10, 0.7) == 600  # start_step(10, .7) = 3
    t = torch.tensor([600])
    a = alpha_bar(ddim, 600)
    z = torch.tensor([[2.0]])
    assert to_scheduler_state(ddim, z, t).item() == pytest.approx(2.0)  # x_t = z_t
    euler = EulerDiscreteScheduler.from_config(base.config)
    euler.set_timesteps(10)
    euler.set_begin_index(3)
    # Euler's state is z0 + sigma e = z_t / sqrt(abar)
    assert to_scheduler_state(euler, z, t).item() == pytest.approx(2 / math.sqrt(a))


# ---------------------------------------------------------------- concepts


@pytest.mark.parametrize("kind", ["pooled", "sequence"])
def test_slotted_prompt_with_word_tokens_is_the_caption(tiny_stack, kind):
    enc = load_text_encoder("embedded")
    info = dataset_info(build_config({"method": "fedbip"}).data_args())
    prompt = concept_prompt(enc, info)
    assert (prompt.domain_pos, prompt.class_pos) == (2, 5)
    d = word_token(enc, "thick")[None].requires_grad_(True)
    c = word_token(enc, "three")[None].requires_grad_(True)
    got = encode_with_concepts(enc, prompt, d, c, kind)
    want = enc.encode(["a thick handwritten digit three"], kind)
    assert got.shape == want.shape
    assert torch.allclose(got, want, atol=1e-6)
    got.sum().backward()  # gradients reach the two tokens
    assert d.grad is not None and c.grad is not None and d.grad.abs().sum() > 0
    # a word the vocabulary lacks starts from the table's mean
    table = enc.model.text_model.embeddings.token_embedding.weight.detach()
    assert torch.allclose(word_token(enc, "plain"), table.mean(0))


# ---------------------------------------------------------------- payload

SHAPE, WIDTH = (1, 16, 16), 32  # the tiny stack: 16 x 16 pixels, hidden 32


def _upload(classes=(3, 7), per=2, seed=0, shape=SHAPE, level=0.0) -> P.BiLevel:
    g = torch.Generator().manual_seed(seed)
    ids = torch.tensor(classes)
    return P.BiLevel(
        torch.randn(len(ids) * per, *shape, generator=g) * 0.1 + level,
        ids.repeat_interleave(per),
        torch.randn(1, WIDTH, generator=g) * 0.1,
        torch.randn(len(ids), WIDTH, generator=g) * 0.1,
        ids,
    )


def _unpack(t, per_class=16):
    return P.unpack(
        t, num_classes=10, latent_shape=SHAPE, width=WIDTH, per_class=per_class
    )


def test_payload_round_trip_is_fp16_and_accepted():
    t = P.layout(_upload())
    assert {t[k].dtype for k in ("latents", "domain", "class_tokens")} == {
        torch.float16
    }
    p = _unpack(t)
    assert p.class_ids.tolist() == [3, 7]
    assert p.latent_class_ids.tolist() == [3, 3, 7, 7]


@pytest.mark.parametrize(
    "mutate,reason",
    [
        (lambda t: t.pop("domain"), "lacks 'domain'"),
        (lambda t: t.update(extra=torch.zeros(1)), "unexpected payload keys"),
        (lambda t: t.update(latents=t["latents"][:, :, :8]), "same generator"),
        (lambda t: t.update(class_tokens=t["class_tokens"][:, :8]), "text-encoder"),
        (lambda t: t.update(domain=t["domain"].repeat(2, 1)), "expected 1"),
        (lambda t: t.update(class_ids=torch.tensor([3, 3])), "repeats an id"),
        (lambda t: t.update(class_ids=torch.tensor([3, 12])), "outside [0, 10)"),
        (lambda t: t["latents"].view(-1).__setitem__(0, float("nan")), "NaN"),
        (lambda t: t["domain"].view(-1).__setitem__(0, 6e4), "within"),
        (lambda t: t.update(latent_class_ids=torch.tensor([3, 3, 3, 7])), "more than"),
        (lambda t: t.update(latent_class_ids=torch.tensor([3, 3, 7, 5])), "no class"),
        (lambda t: t.update(latent_class_ids=torch.tensor([3, 7])), "for 4 latents"),
        (lambda t: t.update(class_ids=torch.tensor([3])), "1 class ids for 2"),
        (lambda t: t.update(latents=t["latents"].to(torch.int32)), "dtype"),
        (
            lambda t: t.update(latents=t["latents"][:0]),
            "latents has 0 rows, expected >= 1",
        ),
    ],
)
def test_malformed_payload_is_rejected_with_a_reason(mutate, reason):
    t = P.layout(_upload())
    mutate(t)
    with pytest.raises(PayloadError, match=re.escape(reason)):
        _unpack(t, per_class=2)


@pytest.mark.parametrize("value", [None, "900", 899, True, 1.5])
def test_a_timestep_other_than_the_servers_is_rejected(value):
    with pytest.raises(PayloadError, match="fedbip-timestep"):
        P.timestep({P.TIMESTEP: value}, 900)
    assert P.timestep({P.TIMESTEP: 900}, 900) == 900


# ---------------------------------------------------------------- server, pixels


def _ctx(fast_config, tmp_path, **over) -> ServerContext:
    cfg = build_config(fast_config | {"method": "fedbip"} | over)
    return ServerContext(cfg, tmp_path, info=dataset_info(cfg.data_args()))


def _reply(pid: int, p: P.BiLevel, ctx: ServerContext, n: int = 24) -> Reply:
    from methods.fedbip.server_fedbip import server_timestep

    meta = {"embedding": ctx.cfg.embedding, P.TIMESTEP: server_timestep(ctx)}
    return Reply(pid + 1, pid, n, 1000, meta, {}, P.layout(p))


def test_server_work_on_mock_uploads(tiny_stack, fast_config, tmp_path):
    ctx = _ctx(fast_config, tmp_path, **{"images-per-class": 5})
    method = FedBiP()
    method.check(ctx)
    replies = [
        _reply(0, _upload(per=2), ctx),
        _reply(1, _upload(classes=(1,), per=3, seed=1), ctx),
    ]
    for r in replies:
        method.validate(r, ctx)
    out = method.server_work(replies, ctx)
    assert out.extra["num_synthetic"] == 3 * 5  # 3 (client, class) cells x 5
    assert set(out.samples) == {(0, 3), (0, 7), (1, 1)}
    # 5 rows from 2 latents: 3 mixed; from 3 latents: 2 mixed
    assert out.extra["fedbip"]["interpolated_images"] == 3 + 3 + 2
    assert out.extra["fedbip"]["latents"] == 7
    assert all(torch.isfinite(v.float()).all() for v in out.model_state.values())
    assert out.timings["synthesize"] > 0 and out.timings["train"] > 0
    assert method.summary(replies)["upload_bytes_per_class"] == 2000 / 3
    # a reply noised to another timestep, or of another embedding kind
    late = _reply(2, _upload(), ctx)
    late.meta[P.TIMESTEP] += 1
    with pytest.raises(PayloadError, match="fedbip-timestep"):
        method.validate(late, ctx)
    other = _reply(2, _upload(), ctx)
    other.meta["embedding"] = "sequence"
    with pytest.raises(PayloadError, match="embedding kind"):
        method.validate(other, ctx)


def test_the_images_follow_the_instance_latents(tiny_stack, fast_config, tmp_path):
    """Two clients of one class, one with bright latents, one with dark. Noised
    only a little (a low strength), the synthetic images keep each client's
    brightness: the denoising starts from the client's instances."""
    ctx = _ctx(
        fast_config,
        tmp_path,
        **{"images-per-class": 4, "fedbip-strength": 0.1, "num-inference-steps": 10},
    )
    from methods.fedbip.server_fedbip import server_timestep

    abar = alpha_bar(ctx.sampling_generator.scheduler, server_timestep(ctx))
    replies = []
    for pid, level in ((0, 0.8), (1, -0.8)):
        p = _upload(classes=(5,), per=2, seed=pid, level=level)
        g = torch.Generator().manual_seed(pid)
        p.latents = forward_noise(
            p.latents, abar, torch.randn(p.latents.shape, generator=g)
        )
        replies.append(_reply(pid, p, ctx))
    out = FedBiP().server_work(replies, ctx)
    assert float(out.samples[(0, 5)].mean()) > 0.3
    assert float(out.samples[(1, 5)].mean()) < -0.3


# ---------------------------------------------------------------- client


def _job(cfg, labels, domain="thick", pid=0, seed=0) -> ClientJob:
    g = torch.Generator().manual_seed(seed)
    images = torch.rand(len(labels), 1, 16, 16, generator=g) * 2 - 1
    return ClientJob(
        cfg, pid, 2, ClientData(images, labels, images[:2], labels[:2], domain)
    )


def test_client_uploads_noised_instances_and_fitted_tokens(
    tiny_stack, fast_config, tmp_path
):
    over = {"fedbip-instances-per-class": 3, "fedbip-concept-steps": 3}
    cfg = build_config(fast_config | {"method": "fedbip"} | over)
    labels = torch.tensor([2] * 5 + [4] * 2)
    job = _job(cfg, labels)
    res = client_fedbip.collect(job)
    ctx = ServerContext(cfg, tmp_path, info=dataset_info(cfg.data_args()))
    FedBiP().validate(Reply(1, 0, 7, 1000, res.meta, res.metrics, res.payload), ctx)
    p = _unpack(res.payload, per_class=3)
    assert p.class_ids.tolist() == [2, 4]
    assert sorted(p.latent_class_ids.tolist()) == [2, 2, 2, 4, 4]  # <= 3 per class
    assert (
        res.metrics["fedbip-concept-steps"] == 3
        and res.metrics["fedbip-instances"] == 5
    )
    assert res.metrics["client-s-per-image"] > 0
    assert 0 < res.metrics["fedbip-signal"] < 1
    # the tokens moved from the words' embeddings
    assert res.metrics["fedbip-domain-drift"] > 0
    # a rerun uploads the same (the noise is keyed by the private images)
    again = client_fedbip.collect(job)
    assert all(torch.equal(res.payload[k], again.payload[k]) for k in res.payload)
    # the uploaded latents are not the images: the signal is sqrt(abar_t) of them
    x = job.data.train_images
    assert not any(
        torch.allclose(p.latents[k].float(), x[i]) for k in range(5) for i in range(7)
    )


def test_concept_fit_lowers_the_loss_it_is_fitted_on(tiny_stack):
    gen = load_generator("embedded", "default")
    gen.unet.requires_grad_(False)
    enc = load_text_encoder("embedded")
    enc.model.requires_grad_(False)
    info = dataset_info(build_config({"method": "fedbip"}).data_args())
    prompt = concept_prompt(enc, info)
    g = torch.Generator().manual_seed(0)
    x0 = torch.rand(8, 1, 16, 16, generator=g) * 2 - 1
    d0, c0 = word_token(enc, "thin")[None], word_token(enc, "one")[None]
    fit = client_fedbip.fit_concepts(
        gen,
        enc,
        prompt,
        x0,
        torch.zeros(8, dtype=torch.int64),
        d0,
        c0,
        kind="pooled",
        steps=30,
        batch_size=8,
        lr=0.05,
        seed=0,
    )
    assert fit.steps == 30 and fit.domain.shape == (1, 32)
    assert fit.loss_after < fit.loss_before
    with pytest.raises(ValueError, match="one class row per image"):
        client_fedbip.fit_concepts(
            gen,
            enc,
            prompt,
            x0,
            torch.zeros(3, dtype=torch.int64),
            d0,
            c0,
            kind="pooled",
            steps=1,
            batch_size=8,
            lr=0.05,
            seed=0,
        )


def test_a_round_on_the_tiny_stack(tiny_stack, fast_config):
    rc = fast_config | {
        "method": "fedbip",
        "run-name": "fedbip",
        "fedbip-concept-steps": 2,
    }
    res = run_one_shot(FakeGrid(app, 2, rc), build_config(rc), "run")
    assert res["privacy_class"] == "pixels"
    assert 0 <= res["global_accuracy"] <= 1
    assert res["fedbip"]["latents"] > 0 and res["num_synthetic"] > 0
    for c in res["clients"]:
        assert c["metrics"]["client-s-per-image"] > 0
        assert c["metrics"]["fedbip-concept-steps"] == 2


# ---------------------------------------------------------------- tiny SD: latents


def test_latent_generator_path_on_a_tiny_sd_model(fast_config, tmp_path):
    sd = make_tiny_sd(tmp_path / "sd")
    over = {
        "method": "fedbip",
        "generator": str(sd),
        "text-encoder": str(sd),
        "embedding": "sequence",
        "images-per-class": 3,
        "scheduler": "ddim",
        "fedbip-concept-steps": 2,
        "fedbip-instances-per-class": 2,
    }
    cfg = build_config(fast_config | over)
    # client: the VAE maps the images to the UNet's 4x4x4 latents, then noised
    labels = torch.tensor([1] * 3 + [8] * 2)
    res = client_fedbip.collect(_job(cfg, labels, domain="noisy"))
    assert tuple(res.payload["latents"].shape) == (4, 4, 4, 4)  # 2 per class
    assert tuple(res.payload["class_tokens"].shape) == (2, 32)  # the tower's width
    sampling = make_scheduler(load_generator(str(sd), "default").scheduler, "ddim")
    assert res.meta[P.TIMESTEP] == start_timestep(sampling, 2, 1.0)
    # server: sequence conditioning [M, 16, 32], denoised in latent space, decoded
    ctx = ServerContext(cfg, tmp_path, info=dataset_info(cfg.data_args()))
    method = FedBiP()
    method.check(ctx)
    reply = Reply(1, 0, len(labels), 1000, res.meta, res.metrics, res.payload)
    method.validate(reply, ctx)
    seen: dict[str, set] = {"decoded": set(), "cond": set()}
    hooks = [
        ctx.generator.vae.decoder.register_forward_hook(
            lambda m, a, o: seen["decoded"].add(tuple(a[0].shape[1:]))
        ),
        ctx.generator.unet.register_forward_hook(
            lambda m, a, kw, o: seen["cond"].add(
                tuple(kw["encoder_hidden_states"].shape[1:])
            ),
            with_kwargs=True,
        ),
    ]
    out = method.server_work([reply], ctx)
    for h in hooks:
        h.remove()
    assert seen["decoded"] == {(4, 4, 4)} and seen["cond"] == {(16, 32)}
    assert out.extra["num_synthetic"] == 2 * 3  # 2 classes x 3 images
    assert all(s.shape[1:] == (1, 16, 16) for s in out.samples.values())
