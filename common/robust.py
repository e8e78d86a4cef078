"""Robust aggregation and per-upload plausibility screens: pure maths, no Flower.

A weighted mean (one-shot FedAvg) lets a single client move the result as far
as it likes: weights scaled by 1e30 make the global model 1e30 / n. The rules
here bound what a minority of clients can do, each over a list of equally
shaped tensors (one per client):

* ``coordinate_median`` (Yin et al. 2018, "Byzantine-Robust Distributed
  Learning", Alg. 1 "median"): per coordinate, the median over clients;
* ``trimmed_mean`` (the same paper, "trimmed mean"): per coordinate, drop the
  ``k`` largest and ``k`` smallest values and average the rest;
* ``multi_krum`` (Blanchard et al. 2017, "Machine Learning with Adversaries:
  Byzantine Tolerant Gradient Descent", Krum and Multi-Krum): score each client
  by the summed squared distances to its ``n - f - 2`` nearest neighbours,
  keep the ``m`` lowest scores and average them;
* ``trimmed_centre``: a robust centre of conditioning vectors (a class's
  vectors from many clients): the vectors nearest the coordinate-wise median,
  averaged.

``robust_state_dicts`` applies a rule (``robust-aggregation``) to whole state
dicts. The screens (``norm_outliers``, ``vector_outliers``) say, with a
reason, which uploads look implausible next to the rest of the cohort;
``upload_parts`` splits any payload into weights and class vectors by the
payload convention (``common.contract``), so the round screens every method
the same way.
"""

from __future__ import annotations

import math
from collections import defaultdict
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import torch

from .maths import fedavg_state_dicts, weighted_average

RULES = ("mean", "median", "trimmed-mean", "krum")
# An upload whose weight norm is over NORM_FACTOR x the cohort's median norm (or
# under median / NORM_FACTOR) is flagged: clients that start from the same
# initial weights (or adapter) and train a few epochs end with norms of one
# order, while a scaling attack needs a large factor to matter against a mean
# of n clients (bench poison measures both sides).
NORM_FACTOR = 5.0
# A client's class vector farther from its class's robust centre than
# VECTOR_FACTOR x the cohort's median such distance is flagged (a
# median-absolute-deviation rule over distances, Rousseeuw & Croux 1993: 3 is
# the usual cut for Gaussian data; 4 leaves room for honest clients of another
# domain), and never one nearer than classes are to each other.
VECTOR_FACTOR = 4.0
MIN_COHORT = 3  # fewer uploads (vectors of a class): no majority to compare with
# The global model is refused (``global_model_problem``) with a value over
# MAX_GLOBAL_ABS in magnitude: a classifier trained on images in [-1, 1] or an
# adapter holds values of order 1 to 100 (BatchNorm's running variances
# included), and logits of 1e6 already saturate every softmax.
MAX_GLOBAL_ABS = 1e6
# ... or where the tensors it shares with the uploads (same name and shape: an
# averaged classifier, a merged adapter) have a norm over GLOBAL_FACTOR x the
# uploads' median norm of them: a weighted mean is never larger than its
# largest term, and 10 leaves room for the server's own training (DENSE's
# distilled student, FedDiff's generated weights) from weights of that size.
GLOBAL_FACTOR = 10.0


def _stack(tensors: Sequence[torch.Tensor], what: str) -> torch.Tensor:
    """``[n, ...]`` float64; the tensors must share one shape."""
    if not tensors:
        raise ValueError(f"{what}: no tensors")
    shape = tuple(tensors[0].shape)
    for t in tensors:
        if tuple(t.shape) != shape:
            raise ValueError(f"{what}: shape mismatch: {tuple(t.shape)} vs {shape}")
    return torch.stack([t.detach().double() for t in tensors])


def coordinate_median(tensors: Sequence[torch.Tensor]) -> torch.Tensor:
    """Per coordinate, the median over the tensors (float32).

    An even count gives the mean of the two middle values (numpy's median, not
    torch's lower one), so two clients give their mean.
    """
    x = _stack(tensors, "coordinate_median").sort(dim=0).values
    n = len(x)
    mid = x[n // 2] if n % 2 else (x[n // 2 - 1] + x[n // 2]) / 2
    return mid.float()


def trim_count(n: int, fraction: float) -> int:
    """How many values ``trimmed_mean`` drops at each end: ``floor(fraction n)``,
    leaving at least one value."""
    if not 0 <= fraction < 0.5:
        raise ValueError(f"fraction={fraction} must be in [0, 0.5)")
    return min(math.floor(fraction * n), (n - 1) // 2)


def trimmed_mean(tensors: Sequence[torch.Tensor], trim: int) -> torch.Tensor:
    """Per coordinate, drop the ``trim`` largest and ``trim`` smallest values and
    average the ``n - 2 trim`` left (float32)."""
    x = _stack(tensors, "trimmed_mean").sort(dim=0).values
    n = len(x)
    if trim < 0 or n - 2 * trim < 1:
        raise ValueError(f"trimmed_mean: trim={trim} leaves nothing of {n} values")
    return x[trim : n - trim].mean(0).float()


def krum_scores(vectors: torch.Tensor, f: int) -> torch.Tensor:
    """Krum's score of each row of ``vectors`` ``[n, d]`` (Blanchard et al. 2017):
    ``s(i) = sum_{j in N_i} ||V_i - V_j||^2`` over the ``n - f - 2`` rows nearest
    to row ``i`` (at least one: with ``n <= f + 2`` the paper's bound cannot
    hold, and the nearest neighbour alone is used)."""
    n = len(vectors)
    if n < 2:
        return torch.zeros(n, dtype=torch.float64)
    x = vectors.double().reshape(n, -1)
    d2 = torch.cdist(x, x).pow(2)
    d2.fill_diagonal_(float("inf"))  # a row is not its own neighbour
    k = max(1, n - f - 2)
    return d2.sort(dim=1).values[:, :k].sum(1)


def krum_select(vectors: torch.Tensor, f: int, m: int | None = None) -> list[int]:
    """Multi-Krum's choice: the ``m`` rows of lowest score (``m = n - f`` by
    default), in ascending order of index; ties go to the lower index."""
    n = len(vectors)
    m = n - f if m is None else m
    if not 1 <= m <= n:
        raise ValueError(f"krum: m={m} must be in [1, {n}]")
    scores = krum_scores(vectors, f)
    order = sorted(range(n), key=lambda i: (float(scores[i]), i))
    return sorted(order[:m])


def multi_krum(
    tensors: Sequence[torch.Tensor],
    f: int,
    m: int | None = None,
    weights: Sequence[float] | None = None,
) -> tuple[torch.Tensor, list[int]]:
    """Multi-Krum: the weighted mean of the ``m`` tensors ``krum_select`` keeps;
    returns ``(mean as float32, kept indices)``.

    The paper averages the kept tensors uniformly; here they keep their
    ``weights`` (renormalised over the kept ones; uniform when ``None``), as the
    mean rule keeps the clients' example counts.
    """
    x = _stack(tensors, "multi_krum")
    kept = krum_select(x.reshape(len(x), -1), f, m)
    w = [1.0] * len(x) if weights is None else list(weights)
    return weighted_average([x[i] for i in kept], [w[i] for i in kept]), kept


def robust_state_dicts(
    states: Sequence[dict[str, torch.Tensor]],
    weights: Sequence[float],
    rule: str,
    fraction: float,
) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    """One state dict from the clients' state dicts under ``rule`` (``RULES``).

    ``mean``: one-shot FedAvg (``maths.fedavg_state_dicts``, weighted by
    ``weights``); ``median`` and ``trimmed-mean``: per coordinate of every
    floating tensor, unweighted (a weight would let a client that declares many
    examples count several times); ``krum``: Multi-Krum over each client's whole
    floating state flattened to one vector, ``f = floor(fraction n)`` presumed
    malicious, the ``n - f`` kept averaged with their weights. ``fraction``: the
    share of clients presumed malicious (``trimmed-mean`` drops that share at
    each end). Integer buffers (BatchNorm's ``num_batches_tracked``) take the
    first client's value, as in FedAvg. Returns ``(state, info)``; ``info``
    names the rule and what it dropped (``kept`` client positions for krum,
    ``trimmed`` values per end per coordinate for trimmed-mean).
    """
    if rule not in RULES:
        raise ValueError(f"rule={rule!r} is not one of {', '.join(RULES)}")
    if not states:
        raise ValueError("robust_state_dicts: no states")
    n = len(states)
    info: dict[str, Any] = {"rule": rule, "clients": n}
    if rule == "mean":
        return fedavg_state_dicts(list(states), list(weights)), info
    keys = list(states[0])
    for i, s in enumerate(states[1:], 1):
        if list(s) != keys:
            raise ValueError(
                f"state {i} has different keys: {sorted(set(keys) ^ set(s))[:5]}"
            )
    floats = [k for k in keys if states[0][k].is_floating_point()]
    out = {k: states[0][k].clone() for k in keys if k not in floats}
    if rule == "krum":
        f = math.floor(fraction * n)
        flat = torch.stack(
            [torch.cat([s[k].double().flatten() for k in floats]) for s in states]
        )
        kept = krum_select(flat, f)
        w = [float(weights[i]) for i in kept]
        for k in floats:
            out[k] = weighted_average([states[i][k] for i in kept], w)
        info |= {"presumed_malicious": f, "kept": kept}
    elif rule == "median":
        for k in floats:
            out[k] = coordinate_median([s[k] for s in states])
    else:
        trim = trim_count(n, fraction)
        for k in floats:
            out[k] = trimmed_mean([s[k] for s in states], trim)
        info["trimmed"] = trim
    return {k: out[k] for k in keys}, info


def trimmed_centre(
    vectors: torch.Tensor,
    weights: torch.Tensor | None = None,
    fraction: float = 0.0,
) -> tuple[torch.Tensor, torch.Tensor]:
    """A robust centre of vectors ``[M, ...]`` (e.g. a class's conditioning
    vectors from many clients); returns ``(centre [...] float32, kept [M] bool)``.

    1. ``c0`` = the coordinate-wise median of the vectors;
    2. ``d_i = ||v_i - c0||``;
    3. the ``floor(fraction M)`` vectors farthest from ``c0`` are dropped (at
       least one is kept; ties: the later index goes first);
    4. the centre is the weighted mean of the rest, ``sum w_i v_i / sum w_i``.

    Unlike a per-coordinate trimmed mean, a kept vector is kept whole, so the
    centre is a mean of genuine vectors. ``fraction = 0``: the weighted mean.
    """
    m = len(vectors)
    if m == 0:
        raise ValueError("trimmed_centre: no vectors")
    w = torch.ones(m, dtype=torch.float64) if weights is None else weights.double()
    if w.shape != (m,) or not torch.isfinite(w).all() or (w < 0).any() or w.sum() <= 0:
        raise ValueError(
            f"trimmed_centre: weights must be [{m}], finite, >= 0, positive sum"
        )
    flat = vectors.reshape(m, -1).double()
    drop = min(math.floor(fraction * m), m - 1) if fraction > 0 else 0
    kept = torch.ones(m, dtype=torch.bool)
    if drop:
        d = (flat - coordinate_median(list(flat)).double()).norm(dim=1)
        order = sorted(range(m), key=lambda i: (-float(d[i]), -i))
        kept[order[:drop]] = False
    if float(w[kept].sum()) <= 0:  # every kept vector weighs 0: count them equally
        w = torch.ones(m, dtype=torch.float64)
    centre = (w[kept, None] * flat[kept]).sum(0) / w[kept].sum()
    return centre.float().reshape(vectors.shape[1:]), kept


def robust_centre(
    vectors: torch.Tensor, weights: torch.Tensor, rule: str, fraction: float
) -> torch.Tensor:
    """The centre of vectors ``[M, ...]`` under ``rule`` (``RULES``), float32:
    ``mean`` the weighted mean; ``median`` the coordinate-wise median
    (unweighted); ``trimmed-mean`` the ``trimmed_centre`` (the
    ``floor(fraction M)`` vectors farthest from the median dropped, whole);
    ``krum`` Multi-Krum with ``f = floor(fraction M)`` (weighted)."""
    if rule not in RULES:
        raise ValueError(f"rule={rule!r} is not one of {', '.join(RULES)}")
    m = len(vectors)
    if rule == "mean":
        return trimmed_centre(vectors, weights, 0.0)[0]
    if rule == "median":
        return coordinate_median(list(vectors))
    if rule == "trimmed-mean":
        return trimmed_centre(vectors, weights, fraction)[0]
    return multi_krum(list(vectors), math.floor(fraction * m), None, weights.tolist())[
        0
    ]


def robust_reduce_conditions(
    vectors: torch.Tensor,
    weights: torch.Tensor,
    k: int,
    seed: int,
    rule: str,
    fraction: float,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """``maths.reduce_conditions`` (weighted k-means of conditioning vectors, at
    most ``k`` representatives) with each centre recomputed from its cluster's
    vectors by ``robust_centre`` under ``rule``: a client's vector pushed far
    from its class no longer drags its cluster's centre (``mean``: unchanged).
    Returns ``(centres [k', ...], centre weights [k'], assignment [M])``."""
    from .maths import reduce_conditions

    centres, cw, assign = reduce_conditions(vectors, weights, k, seed=seed)
    if rule == "mean":
        return centres, cw, assign
    flat = vectors.reshape(len(vectors), -1)
    out = centres.reshape(len(centres), -1).clone()
    for j in range(len(centres)):
        idx = torch.nonzero(assign == j).flatten()
        out[j] = robust_centre(flat[idx], weights[idx].double(), rule, fraction)
    return out.reshape(centres.shape), cw, assign


# ---------------------------------------------------------------- screens


@dataclass
class UploadParts:
    """What a payload holds, as the screens see it: ``weights`` (every floating
    tensor that is not a class vector: a classifier, an adapter) and
    ``vectors`` (class vectors ``[K, ...]`` with their class ids ``[K]``)."""

    weights: dict[str, torch.Tensor] = field(default_factory=dict)
    vectors: list[tuple[torch.Tensor, torch.Tensor]] = field(default_factory=list)
    # the payload keys of each entry of ``vectors``: (vectors' key, class ids' key)
    vector_keys: list[tuple[str, str]] = field(default_factory=list)


def upload_parts(tensors: dict[str, torch.Tensor]) -> UploadParts:
    """Split a payload by the convention of ``common.contract``: a 1-d int64
    ``<prefix>class_ids`` of length ``K`` makes every floating tensor
    ``<prefix><name>`` (no further ``/``) with ``K`` rows a set of class vectors
    (OSCAR's ``mean``, LoRA's ``emb/mean``, FedDISC's ``centres``); every other
    floating tensor is a weight."""
    out = UploadParts()
    classy: set[str] = set()
    for key, ids in tensors.items():
        if not key.endswith("class_ids") or ids.dtype != torch.int64 or ids.ndim != 1:
            continue
        prefix = key[: -len("class_ids")]
        for k, t in tensors.items():
            rest = k[len(prefix) :]
            if (
                k.startswith(prefix)
                and "/" not in rest
                and t.is_floating_point()
                and t.ndim >= 1
                and len(t) == len(ids)
            ):
                out.vectors.append((t, ids))
                out.vector_keys.append((k, key))
                classy.add(k)
    out.weights = {
        k: t for k, t in tensors.items() if t.is_floating_point() and k not in classy
    }
    return out


def weights_norm(weights: dict[str, torch.Tensor]) -> float:
    """L2 norm of all the tensors together (float64: no overflow of fp16)."""
    return math.sqrt(sum(float(t.double().pow(2).sum()) for t in weights.values()))


def norm_outliers(
    norms: Sequence[float], factor: float = NORM_FACTOR
) -> list[str | None]:
    """For each upload, a reason when its norm is over ``factor`` x the median
    of ``norms`` or under the median / ``factor``; ``None`` otherwise. With
    fewer than ``MIN_COHORT`` norms (or a zero median) none is flagged: there is
    no majority to compare with."""
    if len(norms) < MIN_COHORT:
        return [None] * len(norms)
    med = float(coordinate_median([torch.tensor(float(v)) for v in norms]))
    if not med > 0 or not math.isfinite(med):
        return [None] * len(norms)
    out: list[str | None] = []
    for v in norms:
        if not math.isfinite(v) or v > factor * med:
            out.append(
                f"weight norm {v:.4g} is over {factor:g} x the cohort's median "
                f"{med:.4g} (screen-outliers)"
            )
        elif v < med / factor:
            out.append(
                f"weight norm {v:.4g} is under the cohort's median {med:.4g} / "
                f"{factor:g} (screen-outliers)"
            )
        else:
            out.append(None)
    return out


def vector_outliers(
    vectors: torch.Tensor,
    class_ids: torch.Tensor,
    owners: torch.Tensor,
    factor: float = VECTOR_FACTOR,
) -> dict[int, str]:
    """Owners whose class vectors lie far from their class: ``{owner: reason}``.

    1. each owner's vectors of a class are averaged (a client may send several
       prototypes of a class, legitimately spread): one point per (owner, class);
    2. per class with points from at least ``MIN_COHORT`` owners, the robust
       centre ``c_k`` is their coordinate-wise median and ``d = ||p - c_k||``;
    3. the scale ``s`` is the median of those distances over every such class
       (pooled: a class's own median of 3 distances is 0 wherever two clients
       sent the same vector), but at least ``g / factor``, ``g`` the median
       distance from a class centre to the nearest other one (with one class:
       ``1e-3`` x the median point norm): honest clients of another domain
       differ, and only a point farther from its class than classes are from
       each other is implausible;
    4. a point with ``d > factor x s`` flags its owner (its first such class
       names the reason).

    ``vectors`` ``[M, ...]``, ``class_ids`` and ``owners`` ``[M]``.
    """
    flat = vectors.reshape(len(vectors), -1).double()
    points: dict[int, list[tuple[int, torch.Tensor]]] = defaultdict(list)
    for o in owners.unique().tolist():
        for c in class_ids[owners == o].unique().tolist():
            mine = (owners == o) & (class_ids == c)
            points[int(c)].append((int(o), flat[mine].mean(0)))
    screened = {c: p for c, p in points.items() if len(p) >= MIN_COHORT}
    if not screened:
        return {}
    centres = {
        c: coordinate_median([v for _, v in p]).double() for c, p in screened.items()
    }
    dist = {
        c: [(o, float((v - centres[c]).norm())) for o, v in p]
        for c, p in screened.items()
    }
    pooled = float(
        coordinate_median([torch.tensor(d) for ds in dist.values() for _, d in ds])
    )
    if len(centres) > 1:
        c_all = torch.stack(list(centres.values()))
        gaps = torch.cdist(c_all, c_all).fill_diagonal_(float("inf")).min(1).values
        floor = float(coordinate_median(list(gaps))) / factor
    else:
        norms = [v.norm() for p in screened.values() for _, v in p]
        floor = 1e-3 * float(coordinate_median(norms))
    scale = max(pooled, floor)
    out: dict[int, str] = {}
    for c, ds in dist.items():
        for o, d in ds:
            if o not in out and d > factor * scale:
                out[o] = (
                    f"class {c} vectors are {d:.4g} from the class's robust centre, "
                    f"over {factor:g} x the cohort's scale {scale:.4g} "
                    "(screen-outliers)"
                )
    return out


def screen_uploads(payloads: Sequence[dict[str, torch.Tensor]]) -> list[str | None]:
    """One reason (or ``None``) per payload: its weights' norm against the
    uploads with the same weight layout (keys and shapes: a model-heterogeneous
    cohort is compared per architecture), its class vectors against the other
    uploads' vectors of the same class and shape."""
    parts = [upload_parts(p) for p in payloads]
    reasons: list[str | None] = [None] * len(payloads)
    # 1. weight norms, per layout
    groups: dict[tuple[Any, ...], list[int]] = defaultdict(list)
    for i, p in enumerate(parts):
        if p.weights:
            layout = tuple(sorted((k, tuple(t.shape)) for k, t in p.weights.items()))
            groups[layout].append(i)
    for members in groups.values():
        flags = norm_outliers([weights_norm(parts[i].weights) for i in members])
        for i, why in zip(members, flags, strict=True):
            reasons[i] = reasons[i] or why
    # 2. class vectors, per vector shape
    by_shape: dict[tuple[int, ...], list[tuple[torch.Tensor, torch.Tensor, int]]]
    by_shape = defaultdict(list)
    for i, p in enumerate(parts):
        for vec, ids in p.vectors:
            by_shape[tuple(vec.shape[1:])].append((vec, ids, i))
    for rows in by_shape.values():
        vecs = torch.cat([v.double() for v, _, _ in rows])
        ids = torch.cat([c for _, c, _ in rows])
        owners = torch.cat([torch.full((len(c),), i) for _, c, i in rows])
        for i, why in vector_outliers(vecs, ids, owners).items():
            reasons[i] = reasons[i] or why
    return reasons


def global_model_problem(
    records: dict[str, dict[str, torch.Tensor]],
    uploads: Sequence[dict[str, torch.Tensor]],
    max_abs: float = MAX_GLOBAL_ABS,
    factor: float = GLOBAL_FACTOR,
) -> str | None:
    """Why a global model must not be pushed, or ``None`` when it may.

    ``records``: the global model as it travels, ``{record: {key: tensor}}``
    (decoded from the push message, so a value an fp16 record cannot hold is
    already Inf); ``uploads``: the cohort's payloads. Refused, in this order:

    1. a floating tensor with NaN or Inf;
    2. a value over ``max_abs`` in magnitude;
    3. the floating tensors every upload holds under the same key and shape
       (FedAvg's classifier, LoRA's ``adapter/`` keys) with a joint L2 norm over
       ``factor`` x the median of the uploads' joint norms of those tensors
       (skipped when no upload shares them or the median is 0).
    """
    for rec, tensors in records.items():
        for k, t in tensors.items():
            if not t.is_floating_point() or t.numel() == 0:
                continue
            x = t.detach().double()
            if not torch.isfinite(x).all():
                return f"{rec} tensor {k!r} holds NaN or Inf"
            peak = float(x.abs().max())
            if peak > max_abs:
                return (
                    f"{rec} tensor {k!r} holds a value of magnitude {peak:.3g}, "
                    f"over {max_abs:g}"
                )
        shared = {
            k: t
            for k, t in tensors.items()
            if t.is_floating_point()
            and uploads
            and all(k in u and tuple(u[k].shape) == tuple(t.shape) for u in uploads)
        }
        if not shared:
            continue
        norms = [weights_norm({k: u[k] for k in shared}) for u in uploads]
        med = float(coordinate_median([torch.tensor(v) for v in norms]))
        mine = weights_norm(shared)
        if med > 0 and mine > factor * med:
            return (
                f"{rec}: norm {mine:.4g} of the {len(shared)} tensors it shares with "
                f"the uploads is over {factor:g} x the uploads' median {med:.4g}"
            )
    return None
