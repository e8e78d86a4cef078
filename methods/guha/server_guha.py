"""One-shot federated learning by ensembling (Guha, Talwalkar & Smith, "One-Shot
Federated Learning", arXiv 1902.11175): every client trains a model on its data
and uploads it once; the server keeps a subset of the models as an ensemble and
distils the ensemble into one global model on unlabelled public data.

1. client: one-shot FedAvg's local training from the shared initial weights
   (``methods/fedavg``), plus the model's accuracy on the client's held-out split;
2. selection (``guha-selection``) of ``K = ceil(guha-ensemble-fraction x N)``
   models: ``client-cv`` the K best by the clients' validation accuracy (the
   paper's CV selection), ``server-cv`` the K best on labelled public images the
   server holds, ``data`` the K with most examples, ``random``, ``all``;
3. ensemble: ``p_E(y | x) = 1/K sum_k softmax(f_k(x))`` (the paper averages the
   members' predictions);
4. distillation on ``guha-distill-images`` unlabelled public images:
   the global model minimises ``CE(z, argmax p_E) + CE(z, p_E)``
   (``common.train``'s soft targets at temperature 1).

Deviations: the paper's models are linear (SVMs, logistic regression) on
EMNIST / Sentiment140 / Gleam; here the run's classifier. CV selection scores
each model on one held-out split (the client's test split) instead of k-fold
cross-validation; the clients' scores are self-reported (``server-cv`` does not
trust them). The public split (``common.datasets.public_pairs``) is the
distillation data: its captions name the class, read through the dataset's
phrase bank for ``server-cv`` and the report only, never for distillation.
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass
from logging import INFO
from typing import Any

import torch
from flwr.common.logger import log
from torch import nn

from common.config import ConfigError
from common.contract import Reply
from common.datasets import public_pairs
from common.models import build_classifier, classifier_from_state
from common.train import accuracy

from ..base import ServerContext, ServerOutput
from ..fedavg.server_fedavg import FedAvg
from ..steps import train_global
from . import client_guha
from . import payload_guha as P
from .config_guha import GuhaConfig

# ---------------------------------------------------------------- maths (pure)


def select(scores: list[float], k: int) -> list[int]:
    """Positions of the ``k`` highest scores, ties to the earlier; ascending."""
    order = sorted(range(len(scores)), key=lambda i: (-scores[i], i))
    return sorted(order[:k])


def ensemble_size(n: int, fraction: float) -> int:
    """``K = ceil(fraction * n)``, at least 1 and at most ``n``."""
    return max(1, min(n, math.ceil(fraction * n - 1e-9)))


@torch.no_grad()
def ensemble_probs(
    models: list[nn.Module], images: torch.Tensor, batch_size: int = 512
) -> torch.Tensor:
    """``p_E = 1/K sum_k softmax(f_k(x))``, ``[N, classes]``."""
    out = []
    for m in models:
        m.eval()
    for i in range(0, len(images), batch_size):
        x = images[i : i + batch_size].float()
        p = torch.stack([m(x).float().softmax(1) for m in models]).mean(0)
        out.append(p)
    return torch.cat(out)


def report(
    replies: list[Reply],
    chosen: list[int],
    client_cv: list[float],
    server_cv: list[float] | None,
) -> dict[str, Any]:
    """The ensemble's members (partition ids) and every model's scores."""

    def by_client(scores: list[float]) -> dict[str, float]:
        return {
            str(r.partition_id): round(a, 4)
            for r, a in zip(replies, scores, strict=True)
        }

    rep: dict[str, Any] = {
        "ensemble": [replies[i].partition_id for i in chosen],
        "client_cv": by_client(client_cv),
    }
    if server_cv is not None:
        rep["server_cv"] = by_client(server_cv)
    return rep


# ---------------------------------------------------------------- server data


@dataclass
class ServerData:
    """The server's public images: a labelled validation part and an unlabelled
    distillation part (disjoint)."""

    val_images: torch.Tensor
    val_labels: torch.Tensor | None  # None: captions name no class
    distill_images: torch.Tensor


def server_data(ctx: ServerContext) -> ServerData:
    """The server's public images: a labelled validation part (``server-cv``)
    and an unlabelled distillation part; refused if the dataset has too few."""
    opts = ctx.cfg.options(GuhaConfig)
    n_val, n_dis = opts.guha_validation_images, opts.guha_distill_images
    pairs = public_pairs(ctx.cfg.data_args(), n_val + n_dis)
    if pairs is None or len(pairs[1]) <= n_val:
        raise ConfigError(
            f"method='guha' distils on public images the server holds, and "
            f"dataset={ctx.cfg.dataset!r} has "
            f"{'none' if pairs is None else len(pairs[1])} (more than "
            f"guha-validation-images={n_val} needed); use dataset='mnist-domains' or "
            "'mnist', or lower guha-validation-images"
        )
    images, captions = pairs
    labels = None
    if ctx.info is not None:
        texts, ids = ctx.info.phrase_bank()
        index = dict(zip(texts, ids.tolist(), strict=True))
        if all(c in index for c in captions[:n_val]):
            labels = torch.tensor([index[c] for c in captions[:n_val]])
    return ServerData(images[:n_val], labels, images[n_val:])


class Guha(FedAvg, config=GuhaConfig):
    """One-shot FedAvg's collection (message, initial weights down, upload
    checks) with the clients' validation accuracy, and ensemble distillation as
    the server work."""

    client_collect = staticmethod(client_guha.collect)

    def check(self, ctx: ServerContext) -> None:
        """Load the server's public images before any client works; refuse
        ``server-cv`` where their captions name no class."""
        self._data = data = server_data(ctx)
        if ctx.cfg.options(GuhaConfig).guha_selection == "server-cv" and (
            data.val_labels is None
        ):
            raise ConfigError(
                f"guha-selection='server-cv' needs labelled public images and the "
                f"captions of dataset={ctx.cfg.dataset!r} name no class; use "
                "guha-selection='client-cv'"
            )

    def unpack(
        self, reply: Reply, ctx: ServerContext
    ) -> tuple[dict[str, torch.Tensor], float]:
        """A reply's classifier, checked against the shared architecture
        (FedAvg's checks), and its validation accuracy."""
        return P.unpack(reply, self.reference_state(ctx))

    def server_work(self, replies: list[Reply], ctx: ServerContext) -> ServerOutput:
        """Select the ensemble (``guha-selection``) and distil its averaged
        softmax into the global classifier on the public images."""
        cfg, opts = ctx.cfg, ctx.cfg.options(GuhaConfig)
        out = ServerOutput()
        t0 = time.perf_counter()
        data = getattr(self, "_data", None) or server_data(ctx)
        # 1. The client models and their validation accuracies
        models, client_cv = [], []
        for r in replies:
            state, acc = self.unpack(r, ctx)
            m = classifier_from_state(
                cfg.classifier, state, ctx.channels, ctx.num_classes
            )
            models.append(m.eval())
            client_cv.append(acc)
        server_cv = (
            [accuracy(m, data.val_images, data.val_labels) for m in models]
            if data.val_labels is not None
            else None
        )
        # 2. Selection of K models
        k = ensemble_size(len(models), opts.guha_ensemble_fraction)
        how = opts.guha_selection
        if how == "client-cv":
            chosen = select(client_cv, k)
        elif how == "server-cv":
            assert server_cv is not None  # check() refused the run otherwise
            chosen = select(server_cv, k)
        elif how == "data":
            chosen = select([float(r.num_examples) for r in replies], k)
        elif how == "random":
            g = torch.Generator().manual_seed(cfg.seed)
            chosen = sorted(torch.randperm(len(models), generator=g)[:k].tolist())
        else:
            chosen = list(range(len(models)))
        members = [models[i] for i in chosen]
        out.timings["select"] = time.perf_counter() - t0
        # 3. The ensemble labels the public images
        t1 = time.perf_counter()
        probs = ensemble_probs(members, data.distill_images)
        out.timings["label"] = time.perf_counter() - t1
        log(
            INFO,
            "Guha: %d of %d models (%s) distilled on %d public images",
            len(members),
            len(models),
            how,
            len(probs),
        )
        # 4. Distillation into the global model (hard + soft targets)
        train_global(ctx, data.distill_images, probs.argmax(1), out, soft_targets=probs)
        out.extra["guha"] = report(replies, chosen, client_cv, server_cv)
        if data.val_labels is not None:  # the public images are labelled: score
            val = ensemble_probs(members, data.val_images).argmax(1)
            student = build_classifier(cfg.classifier, ctx.channels, ctx.num_classes)
            assert out.model_state is not None
            student.load_state_dict(out.model_state)
            out.extra["guha"] |= {
                "ensemble_server_accuracy": float(
                    (val == data.val_labels).float().mean()
                ),
                "distilled_server_accuracy": accuracy(
                    student, data.val_images, data.val_labels
                ),
                "server_validation_images": len(data.val_labels),
            }
        return out
