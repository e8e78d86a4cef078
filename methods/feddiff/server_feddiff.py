"""FedDiff ("Beyond Aggregation: Efficient Federated Model Consolidation with
Heterogeneity-Adaptive Weights Diffusion", section 2), built on p-diff (Wang et al.
2024, "Neural Network Diffusion", code NUS-HPC-AI-Lab/Neural-Network-Diffusion).

Before the round (``python -m bench pretrain --stage feddiff``, public data only):
a weight pool of the classifier trained with SGD on the proxy data (the subset kept
every 10 steps, sorted by accuracy), an autoencoder over the flattened subset with
input and latent noise augmentation (Eq. 5-6) and a latent DDPM with a 1-D CNN
epsilon predictor (Eq. 7).

In the round: every client fine-tunes the run's initial classifier (``classifier-init``:
the seeded random one, or the public init every method gets; ``methods/initial.py``)
on its data and uploads it (one-shot FedAvg's client, payload and collection:
``FedDiff`` subclasses ``FedAvg``). The server encodes each client's subset to
``(mu_i, sigma_i)``, superposes them (Eq. 8), fine-tunes a copy of the encoder
on ``reconstruction(dec(z_i), x_i) + alpha KL(N(mu_s, sigma_s^2) || N(0, 1)) +
beta InfoNCE(mu_i, pool latent of similar accuracy)`` with ``z_i = mu_s +
sigma_s eps_i`` (Eq. 9-11), noises ``z_i`` to step T and denoises them with the
latent DDPM (Eq. 12), decodes them and keeps the candidate with the best accuracy
on the proxy set; the parameters outside the subset are the clients' (capped-share)
average.

It also reports three references on the round's global test set
(``extra["feddiff"]["references"]``): ``pool-best``, ``average-with-pool-subset``
and ``fedavg`` (the plain capped-share average of the same uploads).
"""

from __future__ import annotations

import copy
import time
from typing import Any

import torch
import torch.nn.functional as F

from common import contract as C
from common.config import ConfigError
from common.contract import Reply
from common.models import build_classifier, classifier_from_state
from common.synthesis import from_uint8
from common.weights import resolve_model

from ..base import ServerContext, ServerOutput
from ..fedavg.server_fedavg import FedAvg, average_uploads, weight_shares
from . import maths_feddiff as M
from .config_feddiff import FedDiffConfig
from .model_feddiff import (
    FedDiffModel,
    flatten_subset,
    load_feddiff,
    sample_latents,
    subset_names,
    unflatten_subset,
)


def proxy_accuracy(
    state: dict[str, torch.Tensor], model: FedDiffModel, image_size: int
) -> float:
    """Accuracy of a classifier state on the stored proxy set (the public images
    that ranked the pool), resized to the run's image size."""
    from common.train import accuracy

    x = from_uint8(model.proxy_images)
    if x.shape[-1] != image_size:
        x = F.interpolate(x, size=(image_size, image_size), mode="bilinear")
    return accuracy(model.classifier(state), x, model.proxy_labels)


def global_references(
    states: dict[str, dict[str, torch.Tensor]], replies: list[Reply], ctx: ServerContext
) -> tuple[dict[str, float | None], str | None]:
    """Accuracy of each state on the round's global test set (as ``evaluate_global``
    builds it: the test split in every participating domain, balanced)."""
    from common.datasets import (
        global_test_set,
        participating_domains,
    )
    from common.train import predict

    none: dict[str, float | None] = dict.fromkeys(states)
    domains = participating_domains(ctx.info, [r.meta.get("domain") for r in replies])
    if not domains:
        return none, "no accepted client reported a domain of the dataset"
    try:
        test = global_test_set(
            ctx.cfg.data_args(), domains, ctx.cfg.global_test_per_class
        )
    except (ValueError, OSError) as e:
        return none, f"global test set: {e.__class__.__name__}: {C.safe_text(e)}"
    if test is None:
        return none, "the dataset has no global test set"
    out: dict[str, float | None] = {}
    for name, state in states.items():
        net = classifier_from_state(
            ctx.cfg.classifier, state, ctx.channels, ctx.num_classes
        )
        out[name] = test.score(predict(net, test.images, device=ctx.device))[0]
    return out, None


def consolidate(
    model: FedDiffModel,
    x: torch.Tensor,
    client_acc: torch.Tensor,
    opts: FedDiffConfig,
    seed: int,
    timings: dict[str, float],
) -> tuple[torch.Tensor, dict[str, Any]]:
    """Eq. 8-12 on the clients' normalised subsets ``x`` ``[n, D]``: the decoded
    candidates ``[n, D]`` (normalised) and what happened."""
    g = torch.Generator().manual_seed(seed)
    ls = model.latent_scale
    ae = copy.deepcopy(model.ae)
    enc_params = [
        p
        for n, p in ae.named_parameters()
        if n.split(".")[0] in ("encoder", "to_mu", "to_logvar")
    ]
    for p in ae.parameters():
        p.requires_grad_(False)
    for p in enc_params:
        p.requires_grad_(True)
    positives = M.nearest_accuracy(client_acc, model.pool_acc)
    pool = model.pool_mu / ls
    losses: list[list[float]] = []
    t0 = time.perf_counter()
    opt = torch.optim.Adam(enc_params, lr=opts.feddiff_finetune_lr)
    for _ in range(opts.feddiff_finetune_steps):
        mu, logvar = ae.encode(x)
        mu, sigma = mu / ls, (0.5 * logvar).exp() / ls  # the DDPM's latent units
        mu_s, sigma_s = M.superpose(mu, sigma)
        z = M.reparameterise(mu_s, sigma_s, torch.randn(mu.shape, generator=g))
        rec = F.mse_loss(ae.decode(z * ls), x)
        kl = M.kl_to_standard(mu_s, sigma_s)
        con = M.contrastive_loss(mu, pool, positives)
        loss = rec + opts.feddiff_alpha * kl + opts.feddiff_beta * con
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        losses.append([float(v.detach()) for v in (rec, kl, con)])
    timings["finetune"] = time.perf_counter() - t0

    t0 = time.perf_counter()
    with torch.no_grad():
        mu, logvar = ae.encode(x)
        mu_s, sigma_s = M.superpose(mu / ls, (0.5 * logvar).exp() / ls)
        z = M.reparameterise(mu_s, sigma_s, torch.randn(mu.shape, generator=g))
        sched = M.ddpm_schedule(int(model.config["settings"]["ddpm_steps"]))
        start = min(opts.feddiff_denoise_step, len(sched["betas"])) - 1
        t = torch.full((len(z),), start, dtype=torch.long)
        z_t = M.q_sample(z, t, torch.randn(z.shape, generator=g), sched["abar"])
        z0 = sample_latents(model.denoiser, z_t, start, sched, g)
        decoded = model.ae.decode(z0 * ls)
    timings["denoise"] = time.perf_counter() - t0
    info = {
        "positives_pool_accuracy": [
            round(float(model.pool_acc[i]), 4) for i in positives
        ],
        "finetune_loss_first": [round(v, 5) for v in losses[0]] if losses else None,
        "finetune_loss_last": [round(v, 5) for v in losses[-1]] if losses else None,
        "sigma_s_mean": round(float(sigma_s.mean()), 5),
        "latent_shift": round(float((z0 - z).norm(dim=1).mean()), 5),
    }
    return decoded, info


class FedDiff(FedAvg, config=FedDiffConfig):
    """One-shot FedAvg's client work, payload and collection, from the pool's
    best classifier instead of a seeded one; FedDiff's consolidation instead of
    the average (which it keeps for the parameters outside the subset)."""

    def check(self, ctx: ServerContext) -> None:
        """Load the pool/AE/DDPM folder; the classifier, classes and subset must be
        the ones it was built for."""
        opts = ctx.cfg.options(FedDiffConfig)
        try:
            path = resolve_model(opts.feddiff_model, "feddiff-model", "feddiff")
            self.model = load_feddiff(path)
        except (OSError, ValueError, KeyError, RuntimeError) as e:
            raise ConfigError(
                f"feddiff-model = {opts.feddiff_model!r}: {e.__class__.__name__}: "
                f"{C.safe_text(e, 400)}; build it with `python -m bench pretrain "
                "--stage feddiff` or use feddiff-model='embedded'"
            ) from None
        mc = self.model.config
        if ctx.cfg.classifier != mc["arch"]:
            raise ConfigError(
                f"classifier = {ctx.cfg.classifier!r}: the FedDiff model "
                f"(feddiff-model = {opts.feddiff_model!r}) was built for "
                f"classifier={mc['arch']!r}; rebuild it for yours with `python -m "
                "bench pretrain --stage feddiff`"
            )
        run_net = build_classifier(
            ctx.cfg.classifier, mc["in_channels"], mc["num_classes"]
        )
        if {k: tuple(v.shape) for k, v in run_net.state_dict().items()} != {
            k: tuple(v.shape) for k, v in self.model.pool_best.items()
        }:
            raise ConfigError(
                f"feddiff-model = {opts.feddiff_model!r}: its pool-best classifier "
                f"(width {mc['width']}) does not have the shapes of the run's "
                f"classifier={ctx.cfg.classifier!r}; rebuild it with `python -m bench "
                "pretrain --stage feddiff`"
            )
        if ctx.info is None or (ctx.num_classes, ctx.channels) != (
            mc["num_classes"],
            mc["in_channels"],
        ):
            have = "unknown" if ctx.info is None else (ctx.num_classes, ctx.channels)
            raise ConfigError(
                f"dataset = {ctx.cfg.dataset!r}: (classes, channels) {have}, the FedDiff "
                f"model (feddiff-model = {opts.feddiff_model!r}) was built for "
                f"{(mc['num_classes'], mc['in_channels'])}: method='feddiff' needs a "
                "weight pool of the same classifier on proxy data of the same classes"
            )
        try:
            names = subset_names(self.model.classifier(), opts.feddiff_params)
        except ValueError as e:
            raise ConfigError(
                f"feddiff-params = {opts.feddiff_params!r}: {e}"
            ) from None
        if names != mc["params"]:
            raise ConfigError(
                f"feddiff-params = {opts.feddiff_params!r} selects {names}, the FedDiff "
                f"model was built for {mc['params']}; set feddiff-params to "
                f"{','.join(mc['params'])!r} or rebuild the model with `python -m bench "
                "pretrain --stage feddiff --feddiff-params ...`"
            )

    def server_work(self, replies: list[Reply], ctx: ServerContext) -> ServerOutput:
        """Average the uploads; consolidate the clients' generated subset in the
        autoencoder's latent space (superpose, fine-tune the encoder, denoise with the
        latent DDPM); keep the decoded candidate, on top of the average, with the best
        proxy accuracy; report the three references."""
        opts = ctx.cfg.options(FedDiffConfig)
        m = self.model
        timings: dict[str, float] = {}
        t0 = time.perf_counter()
        avg, shares = average_uploads(replies, ctx)
        timings["aggregate"] = time.perf_counter() - t0

        t0 = time.perf_counter()
        names, shapes = m.names, m.shapes
        x = torch.stack(
            [m.normalise(flatten_subset(r.tensors, names)) for r in replies]
        )
        client_acc = torch.tensor(
            [proxy_accuracy(r.tensors, m, ctx.cfg.image_size) for r in replies]
        )
        with torch.no_grad():
            mu, _ = m.ae.encode(x)
            client_recon = float(F.mse_loss(m.ae.decode(mu), x))
        timings["encode"] = time.perf_counter() - t0

        decoded, info = consolidate(m, x, client_acc, opts, ctx.cfg.seed, timings)

        t0 = time.perf_counter()
        candidates = [
            avg | unflatten_subset(m.denormalise(v), names, shapes) for v in decoded
        ]
        cand_acc = [proxy_accuracy(s, m, ctx.cfg.image_size) for s in candidates]
        pick = max(range(len(candidates)), key=lambda i: cand_acc[i])
        state = candidates[pick]
        timings["select"] = time.perf_counter() - t0

        t0 = time.perf_counter()
        pool_subset = {n: m.pool_best[n] for n in names}
        refs, reason = global_references(
            {
                "pool-best": m.pool_best,
                "average-with-pool-subset": avg | pool_subset,
                "fedavg": avg,
            },
            replies,
            ctx,
        )
        timings["references"] = time.perf_counter() - t0
        size = sum(int(torch.tensor(shapes[n]).prod()) for n in names)
        extra = {
            "weight_shares": weight_shares(replies, shares),
            "feddiff": {
                "references": refs,
                "references_reason": reason,
                "generated_params": names,
                "generated_size": size,
                "classifier_size": sum(v.numel() for v in avg.values()),
                "ae_recon_mse_pool": m.config["metrics"]["ae_recon_mse"],
                "ae_recon_mse_clients": round(client_recon, 5),
                "pool_size": m.config["pool"]["size"],
                "pool_accuracy_best": m.config["pool"]["accuracy_best"],
                "client_proxy_accuracy": {
                    r.partition_id: round(float(a), 4)
                    for r, a in zip(replies, client_acc, strict=True)
                },
                "candidate_proxy_accuracy": [round(a, 4) for a in cand_acc],
                "picked_candidate": pick,
                "denoise_step": opts.feddiff_denoise_step,
                **info,
            },
        }
        return ServerOutput(
            model_state=state, arch=ctx.cfg.classifier, timings=timings, extra=extra
        )
