"""FedBiP (Chen et al., CVPR 2025, arXiv 2410.04810; code HaokunChen245/FedBiP):
heterogeneous one-shot FL with a latent diffusion model personalized on each
client at two levels. Each client uploads *instance-level* latents (its images
in the generator's space, noised forward to a timestep ``t``) and
*concept-level* tokens (a domain token and one token per class, fitted on its
data with the frozen generator's denoising loss, ``client_fedbip``). The server

1. checks the uploads (shapes against its generator and text tower, the
   noise timestep against its own schedule);
2. makes ``images-per-class`` rows per (client, class) (bounded by
   ``synth-budget``): row ``r`` starts from one of the cell's latents, later
   passes from a mix of two (``maths_fedbip.instance_plan``,
   ``interpolate_noised``: the noise level is kept);
3. conditions each row on the prompt with the client's domain token (plus
   ``fedbip-concept-noise`` per image) and its class token in the two slots
   (``concepts_fedbip``), and denoises the latent from ``t`` with classifier-free
   guidance (the synthesis engine, started from the noised latents: ``Start``);
4. trains the global classifier on the synthetic set.

Deviations from the paper's code (Stable Diffusion 1.4 at 512 px on a GPU), in
README.md: the concepts are token embeddings at the text tower's input, not its
outputs; the client noises its latents (the code uploads VAE posterior means
and standard deviations and the server noises them); interpolation partners
cycle through the cell and the domain-token noise is per image and relative.
"""

from __future__ import annotations

from logging import INFO
from typing import Any

import torch
from flwr.common.logger import log

from common.contract import Reply
from common.synthesis import image_generators
from common.synthesis_settings import SynthesisSettings
from common.synthesis_start import Start, alpha_bar, start_timestep

from .. import steps
from ..base import OneShotMethod, ServerContext, ServerOutput
from . import client_fedbip
from . import payload_fedbip as P
from .concepts_fedbip import concept_prompt, encode_with_concepts, token_width
from .config_fedbip import FedBiPConfig
from .maths_fedbip import instance_plan, interpolate_noised, perturb_token

SOURCE = "fedbip:instance+concepts"
# index offsets of the server's own noise streams, disjoint from the sampler's
# (row i: interpolation noise from MIX_STREAM + i, domain noise from TOKEN_STREAM + i)
MIX_STREAM = 1 << 40
TOKEN_STREAM = 2 << 40
ENCODE_BATCH = 256  # prompts per text-tower pass


def server_timestep(ctx: ServerContext) -> int:
    """The timestep the server's sampler starts at (``start_timestep``)."""
    opts = ctx.cfg.options(FedBiPConfig)
    return start_timestep(
        ctx.sampling_generator.scheduler,
        SynthesisSettings.from_config(ctx.cfg).num_inference_steps,
        opts.fedbip_strength,
    )


def cell_units(
    uploads: list[P.BiLevel], replies: list[Reply], n: int
) -> steps.CondUnits:
    """One unit per uploaded (client, class) cell, ``n`` rows each; its
    condition is the cell's index (``[U, 1, 1]``: the latents and tokens are
    looked up from it) and its weight the client's examples times the cell's
    share of its latents."""
    labels: list[int] = []
    owners: list[int] = []
    weights: list[float] = []
    for p, r in zip(uploads, replies, strict=True):
        for c in p.class_ids.tolist():
            share = float((p.latent_class_ids == c).sum()) / len(p.latent_class_ids)
            labels.append(c)
            owners.append(r.partition_id)
            weights.append(r.num_examples * share)
    u = len(labels)
    return steps.CondUnits(
        torch.arange(u, dtype=torch.float32).reshape(u, 1, 1),
        torch.tensor(labels, dtype=torch.int64),
        torch.tensor(owners, dtype=torch.int64),
        torch.tensor(weights, dtype=torch.float64),
        torch.full((u,), n, dtype=torch.int64),
    )


def _streams(seed: int, start: int, n: int, shape: tuple[int, ...]) -> torch.Tensor:
    if n == 0:
        return torch.empty(0, *shape)
    gens = image_generators(seed, range(start, start + n))
    return torch.stack([torch.randn(shape, generator=g) for g in gens])


class FedBiP(OneShotMethod, payload=P, client=client_fedbip, config=FedBiPConfig):
    """FedBiP: clients upload noised instance latents and fitted domain and
    class tokens (bi-level personalization, ``client_fedbip``); the server
    denoises the latents conditioned on the tokens and trains the global
    classifier."""

    def check(self, ctx: ServerContext) -> None:
        """Refuse, before any client works, a generator not conditioned on the
        run's ``embedding`` kind or a text tower without token embeddings."""
        steps.check_embedding_kind(ctx)
        token_width(ctx.text_encoder)

    def unpack(self, reply: Reply, ctx: ServerContext) -> P.BiLevel:
        """A reply's upload, checked: the run's embedding kind and noise
        timestep, the classes, the generator's sample shape, the text tower's
        token width and ``fedbip-instances-per-class``."""
        steps.check_reply_embedding(reply, ctx)
        P.timestep(reply.meta, server_timestep(ctx))
        return P.unpack(
            reply.tensors,
            num_classes=ctx.num_classes,
            latent_shape=tuple(ctx.generator.sample_shape),  # type: ignore[arg-type]
            width=token_width(ctx.text_encoder),
            per_class=ctx.cfg.options(FedBiPConfig).fedbip_instances_per_class,
        )

    def server_work(self, replies: list[Reply], ctx: ServerContext) -> ServerOutput:
        """Denoise every client's instance latents (mixed where a cell needs
        more images than it uploaded) on its concept prompts and train the
        global classifier."""
        out = ServerOutput()
        assert ctx.info is not None  # the round learned the classes before this
        cfg, opts = ctx.cfg, ctx.cfg.options(FedBiPConfig)
        uploads = [self.unpack(r, ctx) for r in replies]
        t = server_timestep(ctx)
        abar = alpha_bar(ctx.sampling_generator.scheduler, t)

        # 1. Units: one per (client, class) cell, bounded by synth-budget
        units = steps.budget_rows(
            ctx,
            cell_units(uploads, replies, cfg.images_per_class),
            out,
            represent="clients",
        )
        cell_of, labels, owners, _ = units.expand()
        cell_of = cell_of.flatten().round().to(torch.int64)
        m = len(labels)

        # 2. Each row's latent and tokens: pass 0 the cell's latents as they are,
        #    later passes z = a z_i + (1 - a) z_j + sqrt((1 - abar) 2a(1 - a)) e
        table = [(p, c) for p in uploads for c in p.class_ids.tolist()]
        shape = tuple(ctx.generator.sample_shape)
        z_i, z_j, alpha = [], [], []
        domain, classes = [], []
        for cell in cell_of.unique_consecutive().tolist():
            p, c = table[cell]
            rows = int((cell_of == cell).sum())
            mine = p.latents[p.latent_class_ids == c].float()
            g = torch.Generator().manual_seed(cfg.seed * 1000 + cell)
            i, j, a = instance_plan(len(mine), rows, g, opts.fedbip_interpolate)
            z_i.append(mine[i])
            z_j.append(mine[j])
            alpha.append(a)
            domain.append(p.domain.float().expand(rows, -1))
            token = p.class_tokens[p.class_ids == c].float()
            classes.append(token.expand(rows, -1))
        mix = _streams(cfg.seed, MIX_STREAM, m, shape)
        z_t = (
            interpolate_noised(
                torch.cat(z_i), torch.cat(z_j), torch.cat(alpha), abar, mix
            )
            if m
            else torch.empty(0, *shape)
        )
        # 3. Conditioning: the prompt with the (perturbed) domain and class tokens
        cond = self._conditioning(ctx, domain, classes, opts.fedbip_concept_noise)
        log(
            INFO,
            "FedBiP: %d images from %d (client, class) cells, latents noised to "
            "t=%d (signal %.3f), on %s (%s)",
            m,
            int((units.rows > 0).sum()),
            t,
            abar**0.5,
            ctx.device,
            ctx.dtype,
        )
        # 4. Sample from the noised latents and train the global classifier on them
        start = Start(z_t, opts.fedbip_strength, noised=True)
        steps.synthesize_and_train(
            ctx, cond, labels, owners, out, desc="FedBiP", source=SOURCE, start=start
        )
        mixed = int((torch.cat(alpha) < 1).sum()) if m else 0
        out.extra["fedbip"] = {
            "timestep": t,
            "signal": round(abar**0.5, 6),
            "latents": sum(len(p.latents) for p in uploads),
            "interpolated_images": mixed,
            "loss_before": _mean_metric(replies, "fedbip-loss-before"),
            "loss_after": _mean_metric(replies, "fedbip-loss-after"),
        }
        return out

    @staticmethod
    def _conditioning(
        ctx: ServerContext,
        domain: list[torch.Tensor],
        classes: list[torch.Tensor],
        noise_scale: float,
    ) -> torch.Tensor:
        """The rows' conditioning ``[M, L, D]``, in batches of ``ENCODE_BATCH``."""
        assert ctx.info is not None
        if not domain:
            tokens, dim = int(ctx.uncond.shape[1]), int(ctx.generator.cond_dim)
            return torch.empty(0, tokens, dim)
        d, c = torch.cat(domain), torch.cat(classes)
        noise = _streams(ctx.cfg.seed, TOKEN_STREAM, len(d), (d.shape[1],))
        d = perturb_token(d, noise_scale, noise)
        prompt = concept_prompt(ctx.text_encoder, ctx.info)
        parts = []
        with torch.no_grad():
            for lo in range(0, len(d), ENCODE_BATCH):
                sl = slice(lo, lo + ENCODE_BATCH)
                parts.append(
                    encode_with_concepts(
                        ctx.text_encoder, prompt, d[sl], c[sl], ctx.cfg.embedding
                    ).cpu()
                )
        return torch.cat(parts)

    def summary(self, replies: list[Reply]) -> dict[str, Any]:
        """Upload bytes per uploaded (client, class)."""
        return steps.classes_uploaded(replies)


def _mean_metric(replies: list[Reply], key: str) -> float | None:
    vals = [r.metrics[key] for r in replies if key in r.metrics]
    return round(sum(vals) / len(vals), 6) if vals else None
