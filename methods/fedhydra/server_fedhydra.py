"""FedHydra (Bai et al., "A Unified Solution to Diverse Heterogeneities in
One-Shot Federated Learning", KDD 2025, arXiv 2410.21119; code
Jun-B0518/FedHydra): DENSE's data-free distillation with the client models
stratified per class and aggregated per stratum, against label, size and
model heterogeneity together.

Clients train once (one-shot FedAvg's local training, each in its own
architecture where it has one) and upload the model with, per class, their
training examples and the model's held-out record (examples, correct). The
server, in two stages:

1. model stratification: for client model ``k`` and class ``c``, the smoothed
   held-out accuracy ``r_kc = (correct_kc + 1) / (held-out_kc + 2)`` (``0``
   where the client has no training example of ``c``) puts the model in the
   strong stratum of ``c`` (``r_kc >= fedhydra-strong-accuracy``), the weak
   one, or none; the stratum weight ``R_kc`` is 1 (strong), ``rho =
   fedhydra-weak-weight`` (weak), 0 (none); a class with no strong model gives
   its weak ones 1, a class no client trained on gives every model 1;
2. stratified aggregation, per image ``x``: with the models' class
   probabilities ``p_k(x)`` and their plain mean ``pbar(x)``, each model weighs
   its stratum weight over the classes ``x`` likely is,
   ``w_k(x) = sum_c pbar_c(x) R_kc / sum_j sum_c pbar_c(x) R_jc``, and the
   ensemble is ``p_E(x) = sum_k w_k(x) p_k(x)``; ``log p_E`` is the teacher
   ``f_E`` of DENSE's two phases (``methods/dense``: generator against the
   ensemble and the BN statistics of every client model, then distillation).

The paper's method section and its code could not be read here (only its
abstract and introduction): the formulas above are this implementation's
reading of "model stratification and heterogeneity-aware stratified
aggregation"; README.md lists the deviations.
"""

from __future__ import annotations

from logging import INFO
from typing import Any

import torch
from flwr.common.logger import log
from torch import nn

from common.contract import Reply
from common.models import classifier_from_state

from ..base import ServerContext
from ..dense.server_dense import Dense, Teacher, _check_running_var
from . import client_fedhydra
from . import payload_fedhydra as P
from .config_fedhydra import FedHydraConfig

STRONG, WEAK, ABSENT = 2, 1, 0

# ---------------------------------------------------------------- maths (pure)


def class_reliability(
    class_counts: torch.Tensor, heldout: torch.Tensor, correct: torch.Tensor
) -> torch.Tensor:
    """``r_kc = (correct + 1) / (held-out + 2)``, 0 where ``class_counts`` is 0.

    Laplace-smoothed per-class accuracy: few held-out examples pull it to 1/2
    (size heterogeneity), none leaves 1/2; a model never trained on a class is
    not trusted with it whatever its record. All ``[K, C]``; float64.
    """
    r = (correct.double() + 1.0) / (heldout.double() + 2.0)
    return torch.where(class_counts > 0, r, torch.zeros_like(r))


def stratify(reliability: torch.Tensor, strong: float) -> torch.Tensor:
    """Each model's stratum per class, ``[K, C]`` int64: ``STRONG`` where
    ``0 < r_kc`` and ``r_kc >= strong``, ``WEAK`` where ``0 < r_kc < strong``,
    ``ABSENT`` where ``r_kc = 0`` (never trained on the class)."""
    trained = reliability > 0
    strata = torch.full(reliability.shape, ABSENT, dtype=torch.int64)
    strata[trained] = WEAK
    strata[trained & (reliability >= strong)] = STRONG
    return strata


def stratum_weights(strata: torch.Tensor, weak_weight: float) -> torch.Tensor:
    """``R_kc``, ``[K, C]`` float64: 1 for ``STRONG``, ``weak_weight`` for
    ``WEAK``, 0 for ``ABSENT``; in a class with no strong model the weak ones
    weigh 1, in a class with neither every model weighs 1."""
    strong, weak = strata == STRONG, strata == WEAK
    r = strong.double() + weak_weight * weak.double()
    no_strong = ~strong.any(0, keepdim=True)
    r = torch.where(no_strong, weak.double(), r)
    return torch.where(~(strong | weak).any(0, keepdim=True), torch.ones_like(r), r)


def stratified_aggregation(
    log_probs: torch.Tensor, weights: torch.Tensor
) -> torch.Tensor:
    """The ensemble's log-probabilities ``log p_E``, ``[N, C]``.

    Parameters
    ----------
    log_probs : Tensor
        ``[K, N, C]``: each model's ``log p_k(x)`` (log-softmax of its logits).
    weights : Tensor
        ``[K, C]``: the stratum weights ``R_kc`` (every column with a positive
        entry, as ``stratum_weights`` makes them).

    Returns
    -------
    Tensor
        ``log sum_k w_k(x) p_k(x)`` with
        ``w_k(x) = sum_c pbar_c(x) R_kc / sum_j sum_c pbar_c(x) R_jc`` and
        ``pbar = mean_k p_k``. The routing weights ``w`` carry no gradient:
        they choose whom to trust, the generator learns from ``p_k``.
    """
    with torch.no_grad():
        pbar = log_probs.exp().mean(0)  # [N, C]
        a = pbar @ weights.to(pbar).T  # [N, K]
        w = a / a.sum(1, keepdim=True)
    return torch.logsumexp(w.T.log()[:, :, None] + log_probs, dim=0)


class StratifiedEnsemble:
    """FedHydra's ``f_E``: the client models' stratified aggregation as logits
    (``log p_E``), each model run once per batch (DENSE's BN hooks)."""

    def __init__(self, models: list[nn.Module], weights: torch.Tensor):
        self.models = models
        self.weights = weights.float()

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        """``log p_E(x)`` ``[N, C]`` for images ``x``."""
        log_probs = torch.stack([m(x).float().log_softmax(-1) for m in self.models])
        return stratified_aggregation(log_probs, self.weights.to(x.device))


def strata_report(
    replies: list[Reply], reliability: torch.Tensor, strata: torch.Tensor
) -> dict[str, Any]:
    """Per class id (str keys): the partition ids in its strong and weak
    strata; per partition id, its per-class reliability (rounded)."""
    ids = [r.partition_id for r in replies]
    per_class = {
        str(c): {
            "strong": [ids[k] for k in range(len(ids)) if strata[k, c] == STRONG],
            "weak": [ids[k] for k in range(len(ids)) if strata[k, c] == WEAK],
        }
        for c in range(strata.shape[1])
    }
    return {
        "strata": per_class,
        "reliability": {
            str(i): [round(float(v), 4) for v in reliability[k]]
            for k, i in enumerate(ids)
        },
    }


# ---------------------------------------------------------------- the method


class FedHydra(Dense, config=FedHydraConfig):
    """DENSE's collection (initial weights down), generator and distillation;
    the clients' own architectures and per-class records up, and the stratified
    ensemble as the teacher."""

    client_collect = staticmethod(client_fedhydra.collect)

    def unpack(self, reply: Reply, ctx: ServerContext) -> P.ClientModel:
        """One upload, checked (``payload_fedhydra.unpack``): against the initial
        weights where its ``arch`` is the run's ``classifier``."""
        arch = reply.meta.get("arch")
        return P.unpack(
            reply.tensors,
            arch,
            reply.num_examples,
            channels=ctx.channels,
            num_classes=ctx.num_classes,
            reference=(
                self.reference_state(ctx) if arch == ctx.cfg.classifier else None
            ),
        )

    def validate(self, reply: Reply, ctx: ServerContext) -> None:
        """Reject an upload whose ``arch``, state dict or counts do not fit (see
        ``payload_fedhydra``), or with negative BN running variances."""
        _check_running_var(self.unpack(reply, ctx).state)

    def client_models(
        self, replies: list[Reply], ctx: ServerContext
    ) -> list[nn.Module]:
        """Each reply's classifier, in its own architecture."""
        models = []
        for r in replies:
            cm = self.unpack(r, ctx)
            model = classifier_from_state(
                cm.arch, cm.state, ctx.channels, ctx.num_classes
            )
            models.append(model)
        return models

    def ensemble(
        self, models: list[nn.Module], replies: list[Reply], ctx: ServerContext
    ) -> tuple[Teacher | None, dict[str, Any]]:
        """Stage 1, model stratification from the clients' per-class records;
        the stratified ensemble (stage 2's aggregation) as DENSE's teacher."""
        opts = ctx.cfg.options(FedHydraConfig)
        cms = [self.unpack(r, ctx) for r in replies]
        rel = class_reliability(
            torch.stack([cm.class_counts for cm in cms]),
            torch.stack([cm.heldout_counts for cm in cms]),
            torch.stack([cm.heldout_correct for cm in cms]),
        )
        strata = stratify(rel, opts.fedhydra_strong_accuracy)
        weights = stratum_weights(strata, opts.fedhydra_weak_weight)
        log(
            INFO,
            "FedHydra: %d (model, class) pairs strong, %d weak, %d absent",
            int((strata == STRONG).sum()),
            int((strata == WEAK).sum()),
            int((strata == ABSENT).sum()),
        )
        report = strata_report(replies, rel, strata)
        report["client_archs"] = {
            str(r.partition_id): cm.arch for r, cm in zip(replies, cms, strict=True)
        }
        return StratifiedEnsemble(models, weights), {"fedhydra": report}
