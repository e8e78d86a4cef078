"""Pure maths of the one-shot round: no Flower, no I/O.

Per-class averaging (OSCAR uploads), weighted averaging of model weights
(one-shot FedAvg), the Fréchet distance behind the FID-proxy, and the
synthesis budget's weighted k-means and apportionment. The privacy guard's
maths is in ``common.dp``.
"""

from __future__ import annotations

import math

import numpy as np
import torch


def per_class_mean(
    embeddings: torch.Tensor, labels: torch.Tensor, num_classes: int
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Average embeddings ``[N, ...]`` per class.

    Returns ``(class_ids [K], means [K, ...], counts [K])`` for the K classes
    present (OSCAR, Zaland et al. 2025, arXiv 2502.08488: one vector per class).
    """
    if len(embeddings) != len(labels):
        raise ValueError(f"{len(embeddings)} embeddings but {len(labels)} labels")
    if len(labels) and (int(labels.min()) < 0 or int(labels.max()) >= num_classes):
        raise ValueError(
            f"labels must be in [0, {num_classes}); got {labels.unique().tolist()}"
        )
    counts = torch.bincount(labels, minlength=num_classes)
    flat = embeddings.reshape(len(embeddings), -1).double()
    sums = torch.zeros(num_classes, flat.shape[1], dtype=torch.float64)
    sums.index_add_(0, labels, flat)
    present = torch.nonzero(counts > 0).flatten()
    means = (sums[present] / counts[present, None]).to(embeddings.dtype)
    return present, means.reshape(len(present), *embeddings.shape[1:]), counts[present]


def weighted_average(tensors: list[torch.Tensor], weights: list[float]) -> torch.Tensor:
    """``sum_i w_i x_i / sum_i w_i`` in float64, returned as float32."""
    if not tensors:
        raise ValueError("weighted_average: no tensors")
    if len(tensors) != len(weights):
        raise ValueError(f"{len(tensors)} tensors but {len(weights)} weights")
    total = float(sum(weights))
    if total <= 0 or any(w < 0 for w in weights):
        raise ValueError(f"weights must be >= 0 with a positive sum; got {weights}")
    acc = torch.zeros_like(tensors[0], dtype=torch.float64)
    for t, w in zip(tensors, weights, strict=True):
        if t.shape != tensors[0].shape:
            raise ValueError(
                f"shape mismatch: {tuple(t.shape)} vs {tuple(tensors[0].shape)}"
            )
        acc += t.double() * (w / total)
    return acc.float()


def cap_shares(weights: list[float], max_share: float) -> list[float]:
    """Normalised weights where no share exceeds ``max_share`` (water-filling).

    Shares above the cap are set to it and the excess goes to the others in
    proportion to their weights, repeated until none exceeds it; if the cap
    cannot hold (``max_share * n < 1``) every share is ``1 / n``. Keeps one client
    from taking over a weighted average by declaring a huge ``num-examples``.
    E.g. ``[1, 1, 8]`` with cap 0.5 -> ``[0.25, 0.25, 0.5]``.
    """
    n = len(weights)
    if n == 0:
        raise ValueError("cap_shares: no weights")
    if not 0 < max_share <= 1:
        raise ValueError(f"max_share={max_share} must be in (0, 1]")
    if any(not math.isfinite(w) or w < 0 for w in weights) or sum(weights) <= 0:
        raise ValueError(
            f"weights must be finite, >= 0, with a positive sum; got {weights}"
        )
    if max_share * n < 1:
        return [1.0 / n] * n
    total = float(sum(weights))
    shares = [w / total for w in weights]
    capped: set[int] = set()
    while True:
        over = [i for i, s in enumerate(shares) if s > max_share + 1e-12]
        if not over:
            return shares
        capped |= set(over)
        free = [i for i in range(n) if i not in capped]
        left = 1.0 - max_share * len(capped)
        free_total = sum(weights[i] for i in free)
        for i in capped:
            shares[i] = max_share
        for i in free:
            shares[i] = left * (
                weights[i] / free_total if free_total > 0 else 1 / len(free)
            )


def fedavg_state_dicts(
    states: list[dict[str, torch.Tensor]], weights: list[float]
) -> dict[str, torch.Tensor]:
    """One-shot FedAvg (McMahan et al. 2017): example-weighted mean of each tensor.

    Integer buffers (BatchNorm's ``num_batches_tracked``) take the first client's
    value; floating tensors are averaged in float64 and returned as float32,
    whatever dtype the clients sent.
    """
    if not states:
        raise ValueError("fedavg_state_dicts: no states")
    keys = list(states[0])
    for i, s in enumerate(states[1:], 1):
        if list(s) != keys:
            missing = sorted(set(keys) ^ set(s))
            raise ValueError(f"state {i} has different keys: {missing[:5]}")
    out: dict[str, torch.Tensor] = {}
    for k in keys:
        if states[0][k].is_floating_point():
            out[k] = weighted_average([s[k] for s in states], weights)
        else:
            out[k] = states[0][k].clone()
    return out


def frechet_distance_checked(
    mu1: np.ndarray, sigma1: np.ndarray, mu2: np.ndarray, sigma2: np.ndarray
) -> tuple[float, str | None]:
    """``||mu1 - mu2||^2 + Tr(S1 + S2 - 2 (S1 S2)^{1/2})`` (Heusel et al. 2017), or
    ``(nan, reason)`` where it is not defined; never raises on statistics of the
    right shapes.

    ``Tr((S1 S2)^{1/2}) = Tr((A S2 A)^{1/2})`` with ``A = S1^{1/2}``: ``S1 S2 =
    A (A S2 A) A^{-1}`` is similar to the symmetric PSD ``A S2 A`` (for a
    singular ``S1`` by continuity), whose square root has the trace
    ``sum_i sqrt(lambda_i)`` over its eigenvalues. Both square roots come from
    ``eigh`` of symmetric matrices (eigenvalues below 0, rounding, clipped to 0),
    which holds on singular covariances, unlike ``scipy.linalg.sqrtm`` of the
    non-symmetric product. Non-finite statistics (the NaN samples of a LoRA
    adapter of norm 6e4 made ``sqrtm`` raise on every client) give ``nan``.
    """
    stats = [np.asarray(a, dtype=np.float64) for a in (mu1, sigma1, mu2, sigma2)]
    m1, s1, m2, s2 = stats
    if any(not np.isfinite(a).all() for a in stats):
        return math.nan, "the feature statistics hold NaN or Inf (non-finite samples)"
    s1, s2 = (s1 + s1.T) / 2, (s2 + s2.T) / 2
    try:
        w, v = np.linalg.eigh(s1)
        a = (v * np.sqrt(np.clip(w, 0.0, None))) @ v.T  # S1^{1/2}
        lam = np.linalg.eigvalsh(a @ s2 @ a)
    except np.linalg.LinAlgError as e:  # eigh did not converge
        return math.nan, f"eigendecomposition failed: {e}"
    tr_covmean = float(np.sqrt(np.clip(lam, 0.0, None)).sum())
    diff = m1 - m2
    d = float(diff @ diff + np.trace(s1) + np.trace(s2) - 2.0 * tr_covmean)
    if not math.isfinite(d):
        return math.nan, "the distance overflows float64"
    return max(d, 0.0), None  # a distance: rounding below 0 is 0


def frechet_distance(
    mu1: np.ndarray, sigma1: np.ndarray, mu2: np.ndarray, sigma2: np.ndarray
) -> float:
    """The Fréchet distance (``frechet_distance_checked``); ``nan`` where undefined."""
    return frechet_distance_checked(mu1, sigma1, mu2, sigma2)[0]


def feature_stats(feats: torch.Tensor) -> tuple[np.ndarray, np.ndarray]:
    """Mean and covariance of features ``[N, F]`` (N >= 2)."""
    x = feats.double().numpy()
    if len(x) < 2:
        raise ValueError(f"need at least 2 feature vectors, got {len(x)}")
    return x.mean(0), np.cov(x, rowvar=False)


def fid_proxy(real_feats: torch.Tensor, fake_feats: torch.Tensor) -> float:
    """Fréchet distance between two feature sets (the FID-proxy); ``nan`` where it
    is not defined (``frechet_distance_checked``: e.g. non-finite features)."""
    if not (torch.isfinite(real_feats).all() and torch.isfinite(fake_feats).all()):
        return math.nan
    return frechet_distance(*feature_stats(real_feats), *feature_stats(fake_feats))


def kmeans(
    x: torch.Tensor,
    k: int,
    seed: int = 0,
    iters: int = 100,
    weights: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Lloyd's k-means with k-means++ seeding (Arthur & Vassilvitskii 2007).

    ``x`` ``[N, D]``; returns ``(centres [k', D], assignment [N])`` with
    ``k' = min(k, N)``. Deterministic for a seed (FedDISC's clustering of a
    class's image features; its code uses sklearn's KMeans, unseeded). An empty
    cluster keeps its previous centre. ``weights`` ``[N]`` (sklearn's
    ``sample_weight``, >= 0 with a positive sum): seeding draws point ``i`` with
    probability ``~ w_i d_i^2`` and each centre is its members' weighted mean,
    ``c_j = sum_i w_i x_i / sum_i w_i``; ``None`` is the unweighted algorithm
    (the same draws as before weights existed).
    """
    if x.ndim != 2 or len(x) == 0:
        raise ValueError(f"kmeans: x must be [N, D] with N >= 1, got {tuple(x.shape)}")
    if k < 1:
        raise ValueError(f"kmeans: k={k} must be >= 1")
    w = None if weights is None else weights.double()
    if w is not None and (
        w.shape != (len(x),)
        or not torch.isfinite(w).all()
        or (w < 0).any()
        or float(w.sum()) <= 0
    ):
        raise ValueError(
            f"kmeans: weights must be [{len(x)}], finite, >= 0 with a positive sum; "
            f"got shape {tuple(w.shape)}"
        )
    x = x.double()
    k = min(k, len(x))
    g = torch.Generator().manual_seed(seed)

    def draw(p: torch.Tensor | None) -> int:
        """One index ~ ``p`` (unnormalised); ``None``: uniform (or ~ w)."""
        if p is None and w is None:
            return int(torch.randint(len(x), (1,), generator=g))
        p = w if p is None else p
        assert p is not None
        return int(torch.multinomial(p / p.sum(), 1, generator=g))

    # 1. k-means++: each next centre drawn with probability ~ (w) squared distance
    centres = [x[draw(None)]]
    for _ in range(1, k):
        d2 = torch.cdist(x, torch.stack(centres)).min(1).values ** 2
        p = d2 if w is None else d2 * w
        centres.append(x[draw(None if float(p.sum()) <= 0 else p)])
    c = torch.stack(centres)
    # 2. Lloyd iterations: assign to the nearest centre, move centres to their means
    assign = torch.cdist(x, c).argmin(1)
    for _ in range(iters):
        for j in range(k):
            mine = assign == j
            if w is None:
                if mine.any():
                    c[j] = x[mine].mean(0)
            elif float(w[mine].sum()) > 0:
                c[j] = (w[mine, None] * x[mine]).sum(0) / w[mine].sum()
        new = torch.cdist(x, c).argmin(1)
        if torch.equal(new, assign):
            break
        assign = new
    return c.float(), assign


def fit_linear_map(
    x: torch.Tensor, y: torch.Tensor, ridge: float = 1e-3
) -> torch.Tensor:
    """Ridge regression ``y ~ [x, 1] W``; returns ``W`` ``[D_x + 1, D_y]``.

    ``W = (X^T X + ridge I)^{-1} X^T Y`` with ``X = [x, 1]`` (the bias row is not
    penalised). Used to carry CLIP image embeddings into the region of the text
    embeddings a text-conditioned generator was trained on (the modality gap).
    """
    if x.ndim != 2 or y.ndim != 2 or len(x) != len(y) or len(x) == 0:
        raise ValueError(f"fit_linear_map: x {tuple(x.shape)} and y {tuple(y.shape)}")
    X = torch.cat([x.double(), torch.ones(len(x), 1, dtype=torch.float64)], 1)
    reg = ridge * torch.eye(X.shape[1], dtype=torch.float64)
    reg[-1, -1] = 0.0
    # X^T Y a block of columns at a time: y may be a flattened token sequence
    # (77 x 1024 columns for SD 2.1), too large to hold in float64 at once
    xty = torch.cat(
        [X.T @ y[:, j : j + 4096].double() for j in range(0, y.shape[1], 4096)], 1
    )
    return torch.linalg.solve(X.T @ X + reg, xty).float()


def apply_linear_map(
    x: torch.Tensor, w: torch.Tensor, normalize: bool = True
) -> torch.Tensor:
    """``[x, 1] W``, optionally L2-normalised per row (pooled CLIP embeddings are)."""
    y = torch.cat([x.float(), torch.ones(*x.shape[:-1], 1)], -1) @ w
    return torch.nn.functional.normalize(y, dim=-1) if normalize else y


def apportion(n: int, weights: list[float]) -> list[int]:
    """Split ``n`` items in proportion to ``weights`` (largest remainder, Hamilton):
    integers that sum to ``n``, each within one of ``n w_i / sum w``; ties go to
    the earlier weight. E.g. ``apportion(10, [1, 1, 1]) == [4, 3, 3]``."""
    if n < 0 or not weights or any(w < 0 for w in weights) or sum(weights) <= 0:
        raise ValueError(
            f"apportion: n={n} >= 0 and weights {weights} >= 0, positive sum"
        )
    total = float(sum(weights))
    quotas = [n * w / total for w in weights]
    out = [int(q) for q in quotas]
    order = sorted(range(len(weights)), key=lambda i: (-(quotas[i] - out[i]), i))
    for i in order[: n - sum(out)]:
        out[i] += 1
    return out


def allocate_budget(budget: int, requested: list[int]) -> list[int]:
    """Share ``budget`` images among groups that asked for ``requested`` (the
    classes of a synthetic set): ``requested`` itself when it fits (or
    ``budget == 0``: unlimited); else one each, and the rest in proportion to
    what each asked beyond its first (``apportion``), so every group keeps at
    least one and none gets more than it asked; with fewer images than groups,
    ``apportion(budget, requested)`` (some get none). E.g.
    ``allocate_budget(6, [10, 4, 1]) == [3, 2, 1]``: one each, the 3 left over
    in proportion to ``[9, 3, 0]`` (quotas ``[2.25, 0.75, 0]``) -> ``[2, 1, 0]``.
    """
    if budget < 0 or any(r < 0 for r in requested):
        raise ValueError(f"allocate_budget: budget={budget} and {requested} >= 0")
    total = sum(requested)
    if budget == 0 or total <= budget:
        return list(requested)
    live = [i for i, r in enumerate(requested) if r > 0]
    out = [0] * len(requested)
    if budget < len(live):
        got = apportion(budget, [float(requested[i]) for i in live])
    else:
        rest = apportion(budget - len(live), [requested[i] - 1.0 for i in live])
        got = [1 + a for a in rest]
    for i, g in zip(live, got, strict=True):
        out[i] = g
    return out


def capped_unit_weights(
    weights: torch.Tensor, owners: torch.Tensor, max_share: float
) -> torch.Tensor:
    """Units' weights ``[M]`` with no owner above ``max_share`` of the total.

    Each owner's total (the sum of its units' weights) is capped with
    ``cap_shares`` (the cap one-shot FedAvg applies) and spread back over its
    units in proportion to their weights; the result sums to 1. E.g. owners
    ``[0, 0, 1, 2]``, weights ``[3, 5, 1, 1]``, cap 0.5 -> owner shares
    ``[0.5, 0.25, 0.25]`` -> ``[0.1875, 0.3125, 0.25, 0.25]``.
    """
    if weights.shape != owners.shape or weights.ndim != 1:
        raise ValueError(
            f"weights {tuple(weights.shape)} and owners {tuple(owners.shape)} must be the same [M]"
        )
    ids, inverse = owners.unique(return_inverse=True)
    w = weights.double()
    totals = torch.zeros(len(ids), dtype=torch.float64).index_add_(0, inverse, w)
    shares = torch.tensor(cap_shares(totals.tolist(), max_share), dtype=torch.float64)
    return w / totals[inverse] * shares[inverse]


def reduce_conditions(
    vectors: torch.Tensor, weights: torch.Tensor, k: int, seed: int = 0
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """At most ``k`` weighted representatives of conditioning vectors ``[M, ...]``.

    Weighted k-means (``kmeans`` with ``weights``, k-means++ seeding from a
    generator seeded by ``seed``) over the flattened vectors: each centre is the
    weighted mean of its cluster, ``c_j = sum_i w_i v_i / sum_i w_i``, and weighs
    ``W_j = sum_i w_i``. Returns ``(centres [k', ...], centre_weights [k'],
    assignment [M])`` (float32 centres, float64 weights), empty clusters dropped
    (``k' <= min(k, M)``); with ``k >= M`` the vectors themselves, each its own
    centre. The synthesis budget's reduction of a class's many clients to a few
    conditions (``methods.steps.budget_rows``).
    """
    m = len(vectors)
    if m == 0 or weights.shape != (m,):
        raise ValueError(
            f"reduce_conditions: vectors {tuple(vectors.shape)} need M >= 1 and "
            f"weights [M], got {tuple(weights.shape)}"
        )
    if k < 1:
        raise ValueError(f"reduce_conditions: k={k} must be >= 1")
    w = weights.double()
    if not torch.isfinite(w).all() or (w <= 0).any():
        raise ValueError("reduce_conditions: weights must be finite and > 0")
    if k >= m:
        return vectors.float(), w, torch.arange(m)
    centres, assign = kmeans(vectors.reshape(m, -1), k, seed=seed, weights=w)
    cw = torch.zeros(len(centres), dtype=torch.float64).index_add_(0, assign, w)
    keep = torch.nonzero(cw > 0).flatten()
    remap = torch.full((len(centres),), -1, dtype=torch.int64)
    remap[keep] = torch.arange(len(keep))
    return (
        centres[keep].reshape(len(keep), *vectors.shape[1:]),
        cw[keep],
        remap[assign],
    )
