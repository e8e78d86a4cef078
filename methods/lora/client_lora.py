"""Federated LoRA's client work, free of Flower: fine-tune a LoRA adapter of the
shared generator's UNet on the client's images and captions (FedDDPM-style
personalisation, arXiv 2503.06426), and score a pushed adapter by the
FID-proxy of its samples against the client's held-out images.

Real work on the client, as in the papers: a UNet forward and backward pass per
step (``lora-steps`` steps of ``lora-batch-size``); ``lora-train-s`` measures it.
With the privacy guard the adapter is trained with DP-SGD (``train_lora_private``).
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F

from common import dp
from common.config import RunConfig
from common.datasets import ClientData

from ..base import ClientJob, ClientResult
from ..oscar import payload_oscar
from ..oscar.client_oscar import EmbedResult, embed_classes, encode_captions
from . import payload_lora as P
from .config_lora import LoraConfig

# dp-epsilon > 0 makes all it uploads (epsilon, delta)-DP (OneShotMethod.private_uploads)
PRIVATE_UPLOADS = True


@dataclass
class LoraResult:
    """A client's LoRA fine-tune: the adapter, its per-class caption
    embeddings, the base generator's fingerprint, the loss of every step, the
    training seconds and the privacy spent."""

    adapter: dict[str, torch.Tensor]
    embed: EmbedResult
    base_fingerprint: str
    losses: list[float]
    train_s: float
    dp_mu: float = 0.0  # the whole upload's Gaussian-DP mu (0: no privacy guard)
    dp_sigma: float = 0.0  # the largest noise std


def train_lora_private(
    unet: Any,
    noise_scheduler: Any,
    images: torch.Tensor,
    cond: torch.Tensor,
    *,
    steps: int,
    lr: float,
    batch_size: int,
    seed: int,
    mu: float,
    clip: float,
    uncond: torch.Tensor | None = None,
    cond_dropout: float = 0.1,
) -> tuple[list[float], float]:
    """DP-SGD (Abadi et al. 2016) on the LoRA parameters: ``common.lora.train_lora``'s
    loss, batches and draws, with every example's gradient clipped to ``clip``
    and Gaussian noise on each batch's sum; ``mu``-GDP for the adapter.

    Accounting (no amplification by subsampling: the batches walk a
    permutation, a new one each epoch, drawn from the public seed): an example
    is in at most ``E = ceil(steps / floor(n / bs))`` batches; replacing it
    moves a batch's sum of clipped gradients by at most ``2 clip``; the ``E``
    releases compose to ``mu = 2 clip sqrt(E) / sigma`` (Gaussian DP), so
    ``sigma = 2 clip sqrt(E) / mu``. Per-example gradients with ``torch.func``
    (``vmap`` of ``grad`` over the batch: no Opacus hooks, any UNet that
    ``functional_call`` runs). The AdamW steps on the noisy mean are
    post-processing. Returns ``(losses, sigma)``; the losses are statistics
    of the images, for the client's eyes only.
    """
    from torch.func import functional_call, grad_and_value, vmap

    from common.lora import trainable_lora_parameters

    # 1. Check inputs
    if not mu > 0 or not clip > 0:
        raise ValueError(f"need mu > 0 and dp-clip > 0; got {mu}, {clip}")

    # 2. Set up as train_lora does; the noise std from the participation bound
    params = trainable_lora_parameters(unet, noise_scheduler)
    prediction_type = noise_scheduler.config.prediction_type
    names = [n for n, _ in unet.named_parameters() if ".lora_" in n]
    device = params[0].device
    dtype = next(unet.parameters()).dtype
    opt = torch.optim.AdamW(params, lr=lr)
    g = torch.Generator().manual_seed(seed)  # public draws: batches, t, noise
    rng = dp.noise_rng()  # the privacy noise: OS entropy
    n = len(images)
    bs = min(batch_size, n)
    epochs = math.ceil(steps / (n // bs))
    sigma = 2.0 * clip * math.sqrt(epochs) / mu
    num_t = int(noise_scheduler.config.num_train_timesteps)
    order = torch.randperm(n, generator=g)
    cursor = 0
    was_training = unet.training
    unet.train()

    def example_loss(
        p: dict[str, torch.Tensor],
        x: torch.Tensor,
        t: torch.Tensor,
        c: torch.Tensor,
        y: torch.Tensor,
    ) -> torch.Tensor:
        args = (x[None], t[None])
        pred = functional_call(unet, p, args, {"encoder_hidden_states": c[None]})
        return F.mse_loss(pred.sample.float(), y[None].float())

    per_example = vmap(
        grad_and_value(example_loss),
        in_dims=(None, 0, 0, 0, 0),
        randomness="different",
    )

    # 3. Training loop: per-example clipped gradients, noisy sum, AdamW
    losses: list[float] = []
    try:
        for _ in range(steps):
            if cursor + bs > n:
                order, cursor = torch.randperm(n, generator=g), 0
            idx = order[cursor : cursor + bs]
            cursor += bs
            x0, c = images[idx], cond[idx]
            noise = torch.randn(x0.shape, generator=g)
            t = torch.randint(0, num_t, (bs,), generator=g)
            drop = torch.rand(bs, generator=g) < cond_dropout
            x0, noise, c = (v.to(device, dtype) for v in (x0, noise, c))
            t = t.to(device)
            if uncond is not None and drop.any():
                u = uncond.to(device, dtype).expand_as(c)
                c = torch.where(drop.to(device)[:, None, None], u, c)
            noisy = noise_scheduler.add_noise(x0, noise, t)
            if prediction_type == "epsilon":
                target = noise
            else:
                target = noise_scheduler.get_velocity(x0, noise, t)
            current = {k: q.detach() for k, q in zip(names, params, strict=True)}
            grads, loss = per_example(current, noisy, t, c, target)
            if not torch.isfinite(loss).all():
                raise ValueError(
                    f"LoRA training diverged at step {len(losses) + 1}; "
                    f"lower lora-learning-rate (now {lr})"
                )
            losses.append(float(loss.mean()))
            total = dp.clipped_sum([grads[k] for k in names], clip)
            for p, acc in zip(params, total, strict=True):
                acc += dp.gaussian_noise(acc.shape, sigma, rng).to(acc.device)
                p.grad = (acc / bs).to(p.dtype)
            opt.step()
            opt.zero_grad(set_to_none=True)
    finally:
        unet.train(was_training)
    return losses, sigma


def train_client_lora(cfg: RunConfig, data: ClientData, seed: int) -> LoraResult:
    """Fine-tune a LoRA adapter of the generator's UNet on the client's data.

    With the privacy guard the budget is split between the two releases from
    the same examples: the caption means and the adapter, each ``mu / sqrt(2)``
    (they compose to ``mu``)."""
    from common.generator import load_generator
    from common.lora import attach_lora, get_lora_state, train_lora
    from common.text_encoder import load_text_encoder

    lcfg = cfg.options(LoraConfig)
    mu = dp.budget_mu(cfg.dp_epsilon, cfg.dp_delta)
    part = mu / math.sqrt(2)
    # one caption mean per class: the server samples each client's classes with them
    emb = embed_classes(cfg, data, seed=seed, prototypes=1, dp_mu=part)
    t0 = time.perf_counter()
    gen = load_generator(cfg.generator, "ddpm")
    fingerprint = gen.fingerprint()
    cond = encode_captions(cfg, emb.captions)
    # latent diffusion trains on z = E(x) * scaling_factor; pixel space on x
    images = gen.encode(data.train_images)
    # "shared": every client starts from the adapter the run seed draws (FedIT's
    # common initial adapter); "client": each client from its own.
    init_seed = cfg.seed if lcfg.lora_init == "shared" else seed
    unet = attach_lora(
        gen.unet, lcfg.lora_rank, lcfg.lora_alpha, lcfg.target_list, seed=init_seed
    )
    uncond = load_text_encoder(cfg.text_encoder).encode([""], cfg.embedding)
    train: dict[str, Any] = dict(
        steps=lcfg.lora_steps,
        lr=lcfg.lora_learning_rate,
        batch_size=lcfg.lora_batch_size,
        seed=seed,
        uncond=uncond,
    )
    sigma = 0.0
    if mu > 0:
        losses, sigma = train_lora_private(
            unet, gen.scheduler, images, cond, mu=part, clip=cfg.dp_clip, **train
        )
    else:
        losses = train_lora(unet, gen.scheduler, images, cond, **train)
    return LoraResult(
        adapter=get_lora_state(unet),
        embed=emb,
        base_fingerprint=fingerprint,
        losses=losses,
        train_s=time.perf_counter() - t0,
        dp_mu=dp.compose([emb.dp_mu, part if mu > 0 else 0.0]),
        dp_sigma=max(sigma, emb.dp_sigma),
    )


def collect(job: ClientJob) -> ClientResult:
    """Upload the adapter once (fp16) with the per-class caption embeddings."""
    t0 = time.perf_counter()
    cfg, lcfg = job.cfg, job.cfg.options(LoraConfig)
    r = train_client_lora(cfg, job.data, job.seed)
    last = r.losses[-10:]
    return ClientResult(
        payload=P.layout(r.adapter, r.embed.embeddings),
        meta={
            "embedding": cfg.embedding,
            "base-model": r.base_fingerprint,
            "lora-rank": lcfg.lora_rank,
            "lora-alpha": lcfg.lora_alpha,
        },
        metrics={
            "num-examples": float(len(job.data.train_labels)),
            "lora-train-s": r.train_s,
            "client-s": time.perf_counter() - t0,
        }
        # the loss is a statistic of the images: not sent under the privacy guard
        | (
            dp.spent_metrics(r.dp_mu, cfg.dp_delta, r.dp_sigma)
            if r.dp_mu > 0
            else {"lora-final-loss": float(sum(last) / max(1, len(last)))}
        ),
        half=True,
    )


def fid_proxy_of_adapter(
    cfg: RunConfig,
    data: ClientData,
    emb: payload_oscar.ClassEmbeddings,
    adapter: dict[str, torch.Tensor],
    rank: int,
    alpha: float,
    seed: int,
) -> float:
    """FID-proxy of the adapted generator's samples for this client's classes and
    caption means against the client's own held-out images (judge features)."""
    from common.generator import load_generator
    from common.lora import set_lora_state
    from common.maths import fid_proxy
    from common.models import load_classifier
    from common.synthesis import sample, to_dataset_format
    from common.synthesis_settings import SynthesisSettings
    from common.text_encoder import load_text_encoder
    from common.train import features
    from common.weights import embedded_dir

    lcfg = cfg.options(LoraConfig)
    gen = load_generator(cfg.generator, cfg.scheduler)
    if adapter:
        set_lora_state(gen.unet, adapter, rank, alpha, lcfg.target_list)
    uncond = load_text_encoder(cfg.text_encoder).encode([""], cfg.embedding)
    cond = emb.means.float().repeat_interleave(lcfg.lora_samples_per_class, dim=0)
    # the run's sampler settings (guidance cut-off included), this client's seed
    settings = SynthesisSettings.from_config(cfg, seed=seed, static_shapes=False)
    fake = sample(gen, cond, uncond, **settings.kwargs())
    fake = to_dataset_format(fake, data.channels, cfg.image_size)
    judge = load_classifier(embedded_dir() / "judge")
    return fid_proxy(features(judge, data.test_images), features(judge, fake))


def evaluate(job: ClientJob) -> dict[str, float]:
    """Score the merged adapter (FID-proxy) and the pushed global classifier."""
    from ..base import evaluate_classifier

    # The caption means this node uploaded (kept in its state) are the prompts;
    # a node without them (state lost) captions its images again.
    if job.memory:
        emb = payload_oscar.ClassEmbeddings(
            job.memory[P.EMB + "class_ids"],
            job.memory[P.EMB + "mean"],
            job.memory[P.EMB + "counts"],
        )
    else:
        emb = embed_classes(job.cfg, job.data, seed=job.seed, prototypes=1).embeddings
    adapter = {k: v.float() for k, v in P.adapter_of(job.arrays[P.RECORD]).items()}
    fid = fid_proxy_of_adapter(
        job.cfg,
        job.data,
        emb,
        adapter,
        int(job.config["lora-rank"]),
        float(job.config["lora-alpha"]),
        job.seed,
    )
    # an undefined FID-proxy (NaN samples of an exploded adapter) is left out:
    # the server refuses a NaN metric, and the accuracy beside it with it
    return evaluate_classifier(job) | ({"fid-proxy": fid} if math.isfinite(fid) else {})
