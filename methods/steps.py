"""Steps shared by the methods, written once.

Every method that samples with the run's generator: ``check_embedding_kind``
(before any client works), ``embedding_shape`` and ``check_reply_embedding``
(uploads of conditioning vectors), ``classes_uploaded`` (its upload cost).
``class_units`` / ``CondUnits``: what a method would sample, one distinct
condition per unit with the images it gets; ``budget_rows``: that set bounded
to ``synth-budget`` images; ``synthesize_set``: a labelled conditioning set ->
images through the one synthesis engine (``common.synthesis``), in the clients'
image format, with a few kept per (client, class) for the sample grid
(``keep_samples``).

``fit_classifier``: the run's classifier trained with the run's settings, the
one training step behind ``train_global`` (the global classifier on the
synthetic set) and one-shot FedAvg's local training.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable
from dataclasses import dataclass, replace
from logging import INFO
from typing import Any, Literal, TypedDict, TypeVar, Unpack

import torch
from flwr.common.logger import log
from torch import nn

from common.config import ConfigError, RunConfig
from common.contract import PayloadError, Reply
from common.maths import (
    allocate_budget,
    apportion,
    capped_unit_weights,
)
from common.models import build_classifier
from common.robust import robust_reduce_conditions
from common.synthesis import LatentGuidance, from_uint8, synthesize
from common.synthesis_settings import SAMPLER_KEYS, SynthesisSettings
from common.synthesis_start import Start
from common.synthesis_workers import GeneratorSpec, sample_on_workers
from common.train import train_classifier

from .base import OneShotMethod, ServerContext, ServerOutput

SAMPLES_PER_CELL = 6  # images kept per (client, class) for the sample grid
T = TypeVar("T")


def check_embedding_kind(ctx: ServerContext) -> None:
    """Raise ``ConfigError`` unless the generator is conditioned on the run's
    ``embedding`` kind (loads the generator: call it from ``check``)."""
    gen = ctx.generator
    if gen.embedding != ctx.cfg.embedding:
        raise ConfigError(
            f"embedding={ctx.cfg.embedding!r} but generator={ctx.cfg.generator!r} is "
            f"conditioned on {gen.embedding!r} embeddings; set embedding={gen.embedding!r}"
        )


class SynthesisMethod(OneShotMethod):
    """A method whose server samples the text-conditioned generator: its
    ``check`` refuses, before any client works, a generator not conditioned on
    the run's ``embedding`` kind (a subclass that checks more calls
    ``super().check(ctx)`` first); its upload is conditioning vectors."""

    def check(self, ctx: ServerContext) -> None:
        """Refuse a generator not conditioned on the run's ``embedding`` kind."""
        check_embedding_kind(ctx)

    def unpack(self, reply: Reply, ctx: ServerContext) -> Any:
        """A reply's conditioning vectors, read by the payload module's
        ``unpack`` (``unpack_conditions``) and checked: the run's embedding kind,
        the generator's conditioning shape, the classes, ``conditions_limits``."""
        if self.payload_module is None:
            return super().unpack(reply, ctx)
        limits = self.conditions_limits(ctx)
        return unpack_conditions(reply, ctx, self.payload_module.unpack, **limits)

    def conditions_limits(self, ctx: ServerContext) -> dict[str, Any]:
        """Keyword bounds for the payload module's ``unpack`` from the run config
        (e.g. ``per_class``: vectors of one class); none by default."""
        return {}


def embedding_shape(ctx: ServerContext) -> tuple[int, int]:
    """``(tokens, dim)`` of one conditioning vector for this server's models."""
    return int(ctx.uncond.shape[1]), int(ctx.generator.cond_dim)


def check_reply_embedding(reply: Reply, ctx: ServerContext) -> tuple[int, int]:
    """Reject a reply whose meta ``embedding`` is not the run's kind; returns the
    ``(tokens, dim)`` its conditioning vectors must have (``embedding_shape``)."""
    if reply.meta.get("embedding") != ctx.cfg.embedding:
        raise PayloadError(
            f"embedding kind {reply.meta.get('embedding')!r} != {ctx.cfg.embedding!r}"
        )
    return embedding_shape(ctx)


def unpack_conditions(
    reply: Reply, ctx: ServerContext, unpack: Callable[..., T], **limits: Any
) -> T:
    """A reply's conditioning vectors, checked: ``unpack`` (a payload module's,
    ``unpack(tensors, *, num_classes, tokens, dim, **limits)``) at this server's
    ``(tokens, dim)``, after refusing another embedding kind
    (``check_reply_embedding``). Raises ``PayloadError``."""
    tokens, dim = check_reply_embedding(reply, ctx)
    return unpack(
        reply.tensors, num_classes=ctx.num_classes, tokens=tokens, dim=dim, **limits
    )


def classes_uploaded(
    replies: list[Reply], key: str = "class_ids", item: str | None = None
) -> dict[str, Any]:
    """Upload bytes per uploaded (client, class): every client's upload over the
    distinct ids of its ``key`` tensor (the 2 KB-per-class budget); with
    ``item``, also per row of that tensor (``upload_bytes_per_<item>``: one
    component, one instance)."""
    ids = [r.tensors[key] for r in replies if key in r.tensors]
    total = sum(r.upload_bytes for r in replies)
    n = sum(len(t.unique()) for t in ids)
    out = {"upload_bytes_per_class": total / n if n else None}
    if item is not None:
        rows = sum(len(t) for t in ids)
        out[f"upload_bytes_per_{item}"] = total / rows if rows else None
    return out


def synth_workers(ctx: ServerContext) -> int:
    """``synth-workers``: ``auto`` is one per visible GPU, 1 on a CPU."""
    w = ctx.cfg.synth_workers
    if w == "auto":
        return max(1, torch.cuda.device_count()) if ctx.device.type == "cuda" else 1
    return int(w)


def sample_images(
    ctx: ServerContext, conds: torch.Tensor, desc: str = "synthesize", **over: Any
) -> tuple[torch.Tensor, float]:
    """Conditioning rows -> uint8 images in the dataset's format, on this process's
    device or sharded over Ray workers (``synth-workers``); ``(images, seconds)``.

    ``over``: sampler settings that differ from the run's (``SAMPLER_KEYS``, e.g.
    a method's own guidance scale) and the engine's other arguments
    (``extra_conds``, ``latent_guidance``)."""
    settings = {k: over.pop(k) for k in list(over) if k in SAMPLER_KEYS}
    kw = SynthesisSettings.from_config(ctx.cfg, **settings).kwargs() | over
    kw |= {"resize_to": (ctx.channels, ctx.cfg.image_size), "as_uint8": True}
    workers = synth_workers(ctx)
    if workers > 1 and over.get("latent_guidance") is not None:
        log(INFO, "Latent guidance holds the clients' models: sampling in-process")
        workers = 1
    if workers > 1:
        t0 = time.perf_counter()
        log(INFO, "Synthesis sharded over %d Ray workers", workers)
        spec = GeneratorSpec.of(
            ctx.generator, ctx.cfg.scheduler, ctx.cfg.precision, ctx.cfg.decoder
        )
        x = sample_on_workers(
            spec,
            conds,
            ctx.uncond,
            workers=workers,
            ray_address=ctx.cfg.synth_ray_address,
            gpus_per_worker=1.0 if ctx.device.type == "cuda" else 0.0,
            **kw,
        )
        return x, time.perf_counter() - t0
    return synthesize(
        ctx.sampling_generator, conds, ctx.uncond, desc=desc, decoder=ctx.decoder, **kw
    )


@dataclass
class CondUnits:
    """A synthetic set before it is expanded to rows: one distinct condition per
    unit and how many images (``rows``) it gets.

    ``owners``: the partition id the unit comes from (-1: no client);
    ``weights`` (> 0): how much of its class the unit stands for (its owner's
    num-examples times the unit's share of that client's class); ``extras``:
    further per-unit conditions aligned with ``conds`` (FedDISC's domain feature).
    """

    conds: torch.Tensor  # [U, ...]
    labels: torch.Tensor  # [U] int64
    owners: torch.Tensor  # [U] int64
    weights: torch.Tensor  # [U] float64
    rows: torch.Tensor  # [U] int64
    extras: tuple[torch.Tensor, ...] = ()

    @staticmethod
    def cat(parts: list[CondUnits]) -> CondUnits:
        """The units of ``parts``, one after the other."""
        extras = zip(*(p.extras for p in parts), strict=True)
        return CondUnits(
            torch.cat([p.conds for p in parts]),
            torch.cat([p.labels for p in parts]),
            torch.cat([p.owners for p in parts]),
            torch.cat([p.weights for p in parts]),
            torch.cat([p.rows for p in parts]),
            tuple(torch.cat(e) for e in extras),
        )

    def select(self, idx: torch.Tensor) -> CondUnits:
        """The units at ``idx``."""
        return CondUnits(
            self.conds[idx],
            self.labels[idx],
            self.owners[idx],
            self.weights[idx],
            self.rows[idx],
            tuple(e[idx] for e in self.extras),
        )

    def expand(
        self,
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, list[torch.Tensor]]:
        """Each unit repeated ``rows`` times: ``(conds, labels, owners, extras)``."""
        r = self.rows
        return (
            self.conds.repeat_interleave(r, dim=0),
            self.labels.repeat_interleave(r),
            self.owners.repeat_interleave(r),
            [e.repeat_interleave(r, dim=0) for e in self.extras],
        )


def class_units(
    vectors: torch.Tensor,
    class_ids: torch.Tensor,
    owner: int,
    n: int,
    weight: float,
    counts: torch.Tensor | None = None,
    extras: tuple[torch.Tensor, ...] = (),
) -> CondUnits:
    """One client's upload as units: one per vector of ``vectors`` ``[K, ...]``.

    Each class gets ``n`` images spread over its vectors in proportion to
    ``counts`` (all equal when ``None``: m vectors get ``n // m`` or one more,
    the earlier ones first), by largest remainder; a vector weighs ``weight``
    (the client's num-examples) times its share of the class. Classes in
    ascending order; ``extras`` ``[K, ...]`` follow their vectors.
    """
    order, rows, weights = [], [], []
    for c in class_ids.unique().tolist():
        idx = torch.nonzero(class_ids == c).flatten()
        share = (
            torch.ones(len(idx), dtype=torch.float64)
            if counts is None
            else counts[idx].double()
        )
        rows += apportion(n, share.tolist())
        weights.append(weight * share / share.sum())
        order.append(idx)
    idx = torch.cat(order)
    labels = class_ids[idx].to(torch.int64)
    return CondUnits(
        vectors[idx].float(),
        labels,
        torch.full_like(labels, owner),
        torch.cat(weights),
        torch.tensor(rows, dtype=torch.int64),
        tuple(e[idx].float() for e in extras),
    )


def _heaviest_owner(owners: torch.Tensor, weights: torch.Tensor) -> int:
    """The owner with the most total weight (ties: the smallest id)."""
    ids, inverse = owners.unique(return_inverse=True)
    totals = torch.zeros(len(ids), dtype=torch.float64).index_add_(
        0, inverse, weights.double()
    )
    return int(ids[int(totals.argmax())])


def budget_rows(
    ctx: ServerContext,
    units: CondUnits,
    out: ServerOutput,
    represent: Literal["centres", "clients"] = "centres",
) -> CondUnits:
    """Bound a synthetic set to ``synth-budget`` images (0: unlimited).

    Within the budget the units come back unchanged. Over it, per class ``c``
    with ``R_c`` requested rows over ``M_c`` units:

    1. the budget is shared over the classes in proportion to ``R_c``, one image
       each first (``allocate_budget``): class ``c`` keeps ``b_c <= R_c``;
    2. it keeps ``k_c = min(b_c, ceil(M_c b_c / R_c))`` representatives, as many
       units' worth as rows' worth, so a representative gets about the images a
       unit did;
    3. the units' weights are capped per owner at ``max-weight-share``
       (``capped_unit_weights``, one-shot FedAvg's cap); ``represent="centres"``:
       the representatives are the centres of a weighted k-means of the class's
       conditions (``reduce_conditions``; extras concatenated, so a centre is a
       pair; each centre recomputed from its cluster under
       ``robust-aggregation``, ``common.robust.robust_reduce_conditions``),
       each owned, for the sample grid, by the owner of most weight in its
       cluster; ``"clients"``: ``k_c`` of the units drawn without
       replacement with probability ~ weight from a generator seeded by
       ``seed + c``, in their order (conditions that are not vectors: FedLMG's
       guiding classifiers, of different architectures);
    4. the ``b_c`` images go one to each representative and the rest in
       proportion to their weights (largest remainder).

    Records ``out.extra["synth_budget"]``: ``budget``, ``requested`` and ``used``
    images, and ``representatives`` (units that get images, per class id).
    """
    budget = ctx.cfg.synth_budget
    classes = units.labels.unique().tolist()
    requested = [int(units.rows[units.labels == c].sum()) for c in classes]
    allowed = allocate_budget(budget, requested)
    kept = units
    if allowed != requested:
        parts = []
        for c, r_c, b_c in zip(classes, requested, allowed, strict=True):
            if b_c == 0:  # a budget below the number of classes
                continue
            sub = units.select(torch.nonzero(units.labels == c).flatten())
            if b_c == r_c:
                parts.append(sub)
                continue
            m = len(sub.labels)
            k = min(m, b_c, math.ceil(m * b_c / r_c))
            w = capped_unit_weights(sub.weights, sub.owners, ctx.cfg.max_weight_share)
            if represent == "clients":
                g = torch.Generator().manual_seed(ctx.cfg.seed + c)
                pick = torch.multinomial(w, k, replacement=False, generator=g).sort()
                rep = replace(sub.select(pick.values), weights=w[pick.values])
            else:
                flat = [sub.conds.flatten(1), *(e.flatten(1) for e in sub.extras)]
                centres, cw, assign = robust_reduce_conditions(
                    torch.cat(flat, 1),
                    w,
                    k,
                    ctx.cfg.seed + c,
                    ctx.cfg.robust_aggregation,
                    ctx.cfg.robust_fraction,
                )
                pieces = centres.split([f.shape[1] for f in flat], dim=1)
                kc = len(centres)
                rep = CondUnits(
                    pieces[0].reshape(kc, *sub.conds.shape[1:]),
                    torch.full((kc,), c, dtype=torch.int64),
                    torch.tensor(
                        [
                            _heaviest_owner(sub.owners[assign == j], w[assign == j])
                            for j in range(kc)
                        ],
                        dtype=torch.int64,
                    ),
                    cw,
                    torch.zeros(kc, dtype=torch.int64),
                    tuple(
                        p.reshape(kc, *e.shape[1:])
                        for p, e in zip(pieces[1:], sub.extras, strict=True)
                    ),
                )
            rest = apportion(b_c - len(rep.labels), rep.weights.tolist())
            parts.append(replace(rep, rows=torch.tensor([1 + a for a in rest])))
        kept = CondUnits.cat(parts)
        log(
            INFO,
            "synth-budget %d: %d images requested, %d kept on %d of %d conditions",
            budget,
            sum(requested),
            int(kept.rows.sum()),
            int((kept.rows > 0).sum()),
            len(units.labels),
        )
    out.extra["synth_budget"] = {
        "budget": budget,
        "requested": sum(requested),
        "used": int(kept.rows.sum()),
        # str keys: results.json and the resumed output read the same
        "representatives": {
            str(c): int(((kept.labels == c) & (kept.rows > 0)).sum()) for c in classes
        },
    }
    return kept


def synthesize_set(
    ctx: ServerContext,
    conds: torch.Tensor,
    labels: torch.Tensor,
    owners: torch.Tensor,
    out: ServerOutput,
    desc: str = "synthesize",
    guidance_scale: float | None = None,
    extra_conds: list[tuple[torch.Tensor, float]] | None = None,
    latent_guidance: LatentGuidance | None = None,
    source: str | None = None,
    start: Start | None = None,
) -> torch.Tensor:
    """Sample one image per row of ``conds`` ``[M, L, D]``; keep a few per cell.

    ``owners`` is the partition id each row comes from (-1: no client);
    ``guidance_scale`` overrides ``guidance-scale`` (1.0: the conditional model);
    ``extra_conds`` adds guidance terms, ``latent_guidance`` a loss on the predicted
    image, ``start`` initial latents per row (``common.synthesis.sample``;
    default: from noise). Returns uint8 images in the dataset's
    format (channels, image-size).

    With ``save-synthetic`` the set is saved at ``<run-dir>/synthetic/``
    (``common.synthetic_set``), each row's ``source`` being ``source`` (what
    conditioned it, e.g. ``"oscar:embedding"``; default: the method's name), and
    ``out.extra["synthetic_set"]`` records its path and rows. The first call of
    a server work replaces a set left by an earlier attempt of the round; a
    further call with the same ``out`` appends its rows, so the folder holds
    everything the method sampled.
    """
    from common.synthetic_set import SYNTHETIC_DIR, check_rows, save_synthetic_set

    save = ctx.cfg.save_synthetic
    if save:  # fail before sampling, not after
        check_rows(labels, owners, source or ctx.cfg.method, ctx.class_names)
    over: dict[str, Any] = {}
    if guidance_scale is not None:
        over["guidance_scale"] = guidance_scale
    settings = SynthesisSettings.from_config(ctx.cfg, **over)
    log(
        INFO,
        "Synthesizing %d images on %s (%s), %d steps, guidance %.1f",
        len(conds),
        ctx.device,
        ctx.dtype,
        settings.num_inference_steps,
        settings.guidance_scale,
    )
    if extra_conds:
        over["extra_conds"] = extra_conds
    if latent_guidance is not None:
        over["latent_guidance"] = latent_guidance
    if start is not None:
        over["start"] = start
    images, seconds = sample_images(ctx, conds, desc=desc, **over)
    out.timings["synthesize"] = out.timings.get("synthesize", 0.0) + seconds
    keep_samples(out, images, labels, owners)
    if save:
        prior = out.extra.get("synthetic_set")
        path = save_synthetic_set(
            ctx.run_dir / SYNTHETIC_DIR,
            images,
            labels,
            owners,
            source or ctx.cfg.method,
            ctx.class_names,
            append=prior is not None,
        )
        rows = len(labels) + (int(prior["rows"]) if prior else 0)
        out.extra["synthetic_set"] = {"path": str(path), "rows": rows}
        log(INFO, "Synthetic set (%d images) saved to %s", rows, path)
    return images


def keep_samples(
    out: ServerOutput, images: torch.Tensor, labels: torch.Tensor, owners: torch.Tensor
) -> None:
    """Keep the first ``SAMPLES_PER_CELL`` images of every (owner, class) in
    ``out.samples`` (float in ``[-1, 1]``), for the sample grid."""
    for o in owners.unique().tolist():
        for c in labels.unique().tolist():
            idx = torch.nonzero((owners == o) & (labels == c)).flatten()
            if len(idx):
                out.samples[(int(o), int(c))] = from_uint8(
                    images[idx[:SAMPLES_PER_CELL]]
                )


def per_class_rows(
    means: torch.Tensor, class_ids: torch.Tensor, owner: int, n: int
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """``n`` conditioning rows per uploaded class: ``(conds, labels, owners)``."""
    conds = means.float().repeat_interleave(n, dim=0)
    labels = class_ids.repeat_interleave(n)
    return conds, labels, torch.full_like(labels, owner)


def fit_classifier(
    cfg: RunConfig,
    channels: int,
    num_classes: int,
    images: torch.Tensor,
    labels: torch.Tensor,
    *,
    epochs: int,
    seed: int,
    init_state: dict[str, torch.Tensor] | None = None,
    **loop: Any,
) -> nn.Module:
    """The run's ``classifier`` trained on ``images`` with the run's batch size
    and learning rate (``common.train.train_classifier``).

    Parameters
    ----------
    cfg : RunConfig
        Gives ``classifier``, ``train-batch-size`` and ``learning-rate``.
    channels, num_classes : int
        The classifier's input channels and outputs.
    images, labels : Tensor
        ``[N, C, H, W]`` (uint8 or float in ``[-1, 1]``) and ``[N]``.
    epochs, seed : int
        Passes over the data; the seed of the initialisation, batches and shifts.
    init_state : dict, optional
        Weights to start from instead of the seeded initialisation.
    **loop
        Further ``train_classifier`` arguments (``device``, ``soft_targets``, ...).

    Returns
    -------
    nn.Module
        The trained classifier.
    """
    torch.manual_seed(seed)
    model = build_classifier(cfg.classifier, channels, num_classes)
    if init_state is not None:
        model.load_state_dict(init_state)
    train_classifier(
        model,
        images,
        labels,
        epochs=epochs,
        batch_size=cfg.train_batch_size,
        lr=cfg.learning_rate,
        seed=seed,
        **loop,
    )
    return model


def train_global(
    ctx: ServerContext,
    images: torch.Tensor,
    labels: torch.Tensor,
    out: ServerOutput,
    soft_targets: torch.Tensor | None = None,
    from_init: bool = True,
) -> None:
    """Train the global classifier on the synthetic set (server device) into
    ``out``; ``soft_targets``: teacher probabilities distilled beside the labels.
    It starts from the run's ``classifier-init`` (``methods/initial.py``; ``from_init=False``:
    from the seeded random init whatever ``classifier-init`` says)."""
    from .initial import public_state

    cfg = ctx.cfg
    init = public_state(ctx) if from_init and cfg.classifier_init == "public" else None
    t0 = time.perf_counter()
    model = fit_classifier(
        cfg,
        ctx.channels,
        ctx.num_classes,
        images,
        labels,
        epochs=cfg.train_epochs,
        seed=cfg.seed,
        device=ctx.device,
        progress=True,
        desc="train global classifier",
        soft_targets=soft_targets,
        init_state=init,
    )
    out.model_state = {k: v.detach().cpu() for k, v in model.state_dict().items()}
    out.arch = cfg.classifier
    out.timings["train"] = time.perf_counter() - t0


class SynthesisArgs(TypedDict, total=False):
    """``synthesize_set``'s optional arguments, passed on by ``synthesize_and_train``."""

    desc: str
    guidance_scale: float | None
    extra_conds: list[tuple[torch.Tensor, float]] | None
    latent_guidance: LatentGuidance | None
    source: str | None
    start: Start | None


def synthesize_and_train(
    ctx: ServerContext,
    conds: torch.Tensor,
    labels: torch.Tensor,
    owners: torch.Tensor,
    out: ServerOutput,
    **synthesis: Unpack[SynthesisArgs],
) -> torch.Tensor:
    """A synthesizing method's last step: one image per row (``synthesize_set``,
    the same arguments), the global classifier trained on them (``train_global``)
    and the set's size as ``num_synthetic`` in results.json; returns the images."""
    images = synthesize_set(ctx, conds, labels, owners, out, **synthesis)
    train_global(ctx, images, labels, out)
    out.extra["num_synthetic"] = len(labels)
    return images
