"""methods.feddeo: the description fit (client), the payload checks, the server
side with mock replies (no Grid), and both halves on a tiny Stable-Diffusion-format
generator (sequence conditioning, latent)."""

from __future__ import annotations

import pytest
import torch
from tiny_stack import make_tiny_sd

from common.contract import PayloadError, Reply
from common.datasets import ClientData, dataset_info
from common.generator import load_generator
from common.text_encoder import load_text_encoder
from methods import build_config, steps
from methods.base import ClientJob, ServerContext
from methods.feddeo import FedDeo, client_feddeo
from methods.feddeo import payload_feddeo as P


def _context(fast_config, tmp_path, **over) -> ServerContext:
    cfg = build_config(fast_config | {"method": "feddeo"} | over)
    return ServerContext(cfg, tmp_path, info=dataset_info(cfg.data_args()))


def _client_data(n: int = 12, classes: tuple[int, ...] = (3, 7)) -> ClientData:
    torch.manual_seed(0)
    labels = torch.tensor(classes).repeat_interleave(n // len(classes))
    images = torch.rand(len(labels), 1, 16, 16) * 2 - 1
    return ClientData(images, labels, images[:4], labels[:4], "thick")


def test_fit_lowers_the_diffusion_loss_and_leaves_the_generator_unchanged(
    tiny_stack,
):
    gen = load_generator("embedded", "default")
    gen.unet.requires_grad_(False)
    before = {k: v.clone() for k, v in gen.unet.state_dict().items()}
    init = load_text_encoder().encode(["the digit three"], "pooled")
    x0 = client_feddeo.to_generator_input(gen, _client_data().train_images)
    fit = client_feddeo.fit_description(
        gen.unet,
        gen.scheduler,
        x0,
        init,
        optimizer="adam",
        lr=0.05,
        epochs=20,
        batch_size=4,
        seed=0,
    )
    assert fit.steps == 20 * 3
    assert fit.description.shape == init.shape
    assert fit.loss_after < fit.loss_before, (fit.loss_before, fit.loss_after)
    assert not torch.equal(fit.description, init)
    after = gen.unet.state_dict()
    assert all(torch.equal(before[k], after[k]) for k in before)
    assert all(p.grad is None for p in gen.unet.parameters())


def test_fit_refuses_a_diverging_learning_rate(tiny_stack):
    gen = load_generator("embedded", "default")
    init = torch.zeros(1, 1, 16)
    x0 = _client_data().train_images
    with pytest.raises(ValueError, match="feddeo-learning-rate"):
        client_feddeo.fit_description(
            gen.unet,
            gen.scheduler,
            x0,
            init,
            optimizer="sgd",
            lr=1e30,
            epochs=3,
            batch_size=1,
            seed=0,
        )


def _payload(k: int = 2, tokens: int = 1, dim: int = 16) -> dict[str, torch.Tensor]:
    return P.layout(P.Descriptions(torch.randn(k, tokens, dim), torch.arange(k)))


def _bad(kind: str) -> dict[str, torch.Tensor]:
    t = _payload()
    if kind == "shape":
        t["descriptions"] = torch.zeros(2, 1, 3, dtype=torch.float16)
    elif kind == "tokens":
        t["descriptions"] = torch.zeros(2, 4, 16, dtype=torch.float16)
    elif kind == "dtype":
        t["descriptions"] = t["descriptions"].to(torch.int32)
    elif kind == "nan":
        t["descriptions"][0, 0, 0] = float("nan")
    elif kind == "inf":
        t["descriptions"][1, 0, 5] = float("inf")
    elif kind == "range":
        t["class_ids"] = torch.tensor([0, 10])
    elif kind == "negative":
        t["class_ids"] = torch.tensor([-1, 0])
    elif kind == "repeat":
        t["class_ids"] = torch.tensor([4, 4])
    elif kind == "ids-dtype":
        t["class_ids"] = t["class_ids"].to(torch.float32)
    elif kind == "count":
        t["class_ids"] = torch.tensor([0, 1, 2])
    elif kind == "empty":
        t = {
            "descriptions": torch.zeros(0, 1, 16, dtype=torch.float16),
            "class_ids": torch.zeros(0, dtype=torch.int64),
        }
    elif kind == "extra":
        t["junk"] = torch.zeros(3)
    elif kind == "missing":
        del t["class_ids"]
    return t


@pytest.mark.parametrize(
    ("kind", "reason"),
    [
        ("shape", "expected [K, 1, 16]"),
        ("tokens", "expected [K, 1, 16]"),
        ("dtype", "dtype"),
        ("nan", "NaN or Inf"),
        ("inf", "NaN or Inf"),
        ("range", "outside [0, 10)"),
        ("negative", "outside [0, 10)"),
        ("repeat", "repeats an id"),
        ("ids-dtype", "expected int64"),
        ("count", "3 class ids for 2 descriptions"),
        ("empty", "has 0 rows, expected >= 1"),
        ("extra", "unexpected payload keys ['junk']"),
        ("missing", "lacks 'class_ids'"),
    ],
)
def test_payload_rejects_with_a_reason(kind, reason):
    P.unpack(_payload(), num_classes=10, tokens=1, dim=16)  # the genuine one passes
    with pytest.raises(PayloadError) as e:
        P.unpack(_bad(kind), num_classes=10, tokens=1, dim=16)
    assert reason in str(e.value)


def _replies(ctx: ServerContext, classes: list[list[int]]) -> list[Reply]:
    """One reply per client: its classes' prompt embeddings plus a little noise."""
    assert ctx.info is not None
    replies = []
    for i, ids in enumerate(classes):
        emb = ctx.text_encoder.encode(
            [ctx.info.class_prompt(c) for c in ids], ctx.cfg.embedding
        )
        g = torch.Generator().manual_seed(i)
        desc = emb + 0.1 * torch.randn(emb.shape, generator=g)
        tensors = P.layout(P.Descriptions(desc, torch.tensor(ids)))
        meta = {"embedding": ctx.cfg.embedding}
        metrics = {"feddeo-loss-before": 0.5, "feddeo-loss-after": 0.4}
        replies.append(Reply(i + 1, i, 10, 100, meta, metrics, tensors))
    return replies


def test_server_samples_with_description_and_class_guidance(
    tiny_stack, fast_config, tmp_path, monkeypatch
):
    ctx = _context(
        fast_config,
        tmp_path,
        **{
            "feddeo-class-guidance": 2.0,
            "feddeo-description-guidance": 4.0,
        },
    )
    method = FedDeo()
    method.check(ctx)
    replies = _replies(ctx, [[1, 2], [2, 5, 9]])
    for r in replies:
        method.validate(r, ctx)
    seen = {}
    real = steps.synthesize_set

    def spy(ctx, cond, labels, owners, out, **kw):  # type: ignore[no-untyped-def]
        seen.update(cond=cond, labels=labels, owners=owners, **kw)
        return real(ctx, cond, labels, owners, out, **kw)

    monkeypatch.setattr(steps, "synthesize_set", spy)
    out = method.server_work(replies, ctx)
    n = ctx.cfg.images_per_class
    assert out.extra["num_synthetic"] == 5 * n and out.model_state is not None
    # main condition: each client's own description, n rows per (client, class)
    assert seen["labels"].tolist() == [c for c in (1, 2, 2, 5, 9) for _ in range(n)]
    assert seen["owners"].tolist() == [0] * 2 * n + [1] * 3 * n
    desc = replies[1].tensors["descriptions"].float()
    torch.testing.assert_close(seen["cond"][2 * n : 3 * n], desc[:1].expand(n, -1, -1))
    assert seen["guidance_scale"] == 4.0
    # the extra term: the class prompt with s1
    ((class_cond, s1),) = seen["extra_conds"]
    assert s1 == 2.0
    prompt = ctx.text_encoder.encode([ctx.info.class_prompt(5)], "pooled")
    torch.testing.assert_close(class_cond[3 * n], prompt[0])
    rep = out.extra["feddeo"]
    assert rep["descriptions"] == 5 and rep["description_distance"] > 0
    assert rep["loss_before"] == 0.5 and rep["loss_after"] == 0.4
    assert 0 < method.summary(replies)["upload_bytes_per_class"] <= 100


def test_server_rejects_another_embedding_kind_and_shape(
    tiny_stack, fast_config, tmp_path
):
    ctx = _context(fast_config, tmp_path)
    method = FedDeo()
    (r,) = _replies(ctx, [[0, 1]])
    r.meta["embedding"] = "sequence"
    with pytest.raises(PayloadError, match="embedding kind"):
        method.validate(r, ctx)
    r.meta["embedding"] = "pooled"
    r.tensors["descriptions"] = torch.zeros(2, 3, 16, dtype=torch.float16)
    with pytest.raises(PayloadError, match="conditioning shape"):
        method.validate(r, ctx)


def test_both_halves_on_a_latent_stable_diffusion_generator(
    fast_config, tmp_path, monkeypatch
):
    """Sequence conditioning [16, 32], latents [4, 4, 4]: the client learns one
    token sequence per class on VAE latents; the server validates and samples."""
    sd = make_tiny_sd(tmp_path / "sd")
    ctx = _context(
        fast_config,
        tmp_path,
        **{
            "generator": str(sd),
            "text-encoder": str(sd),
            "embedding": "sequence",
        },
    )
    method = FedDeo()
    method.check(ctx)
    job = ClientJob(ctx.cfg, 0, 2, _client_data())
    seen: list[tuple[int, ...]] = []
    real_fit = client_feddeo.fit_description

    def spy(unet, scheduler, x0, init, **kw):  # type: ignore[no-untyped-def]
        seen.append(tuple(x0.shape[1:]))
        return real_fit(unet, scheduler, x0, init, **kw)

    monkeypatch.setattr(client_feddeo, "fit_description", spy)
    result = FedDeo.client_collect(job)
    assert seen == [(4, 4, 4), (4, 4, 4)]  # latents at the side the UNet samples
    assert result.payload["descriptions"].shape == (2, 16, 32)
    assert result.payload["descriptions"].dtype == torch.float16
    assert result.metrics["client-s"] > 0 and result.metrics["client-s-per-image"] > 0
    # 12 images in 2 classes, 1 epoch at fast_config's feddeo-batch-size of 16:
    # one step per class
    assert fast_config["feddeo-batch-size"] == 16
    assert result.metrics["feddeo-steps"] == 2
    reply = Reply(1, 0, 12, 100, result.meta, result.metrics, result.payload)
    method.validate(reply, ctx)
    out = method.server_work([reply], ctx)
    assert out.extra["num_synthetic"] == 2 * ctx.cfg.images_per_class
    assert out.extra["feddeo"]["description_distance"] > 0
    assert out.model_state is not None
