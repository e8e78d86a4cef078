"""One-shot merging of client LoRA adapters (pure maths: no Flower, no I/O).

N clients fine-tune a LoRA adapter of the same base model. For one target layer
client ``i`` holds ``A_i`` [r_i, in], ``B_i`` [out, r_i] and a scaling
``s_i = alpha_i / r_i``; its update of the base weight is ``ΔW_i = s_i·B_i·A_i``
(Hu et al. 2021, "LoRA"). The server merges the N adapters into one:

=======  ==========================================  ===========  ============
method   what is merged                              exact?       merged rank
=======  ==========================================  ===========  ============
fedavg   the factors A and B, each averaged (FedIT)  no           r
stack    the factors, concatenated (FLoRA)           yes          Σ r_i
svd      ΔW, then truncated SVD                      up to rank   ``rank``
ties     ΔW via peft's TIES, then truncated SVD      no           ``rank``
dare     ΔW via peft's DARE, then truncated SVD      no           ``rank``
=======  ==========================================  ===========  ============

Client weights (e.g. dataset sizes) are normalised to sum to 1 inside every
function. All results are float32.

What the caller must set when loading the merged adapter into a peft
``LoraConfig`` (``merge_adapters`` returns both numbers in its info dict):

- ``fedavg`` keeps the clients' parameterisation: ``r`` = the clients' rank and
  ``lora_alpha`` = the clients' alpha (all clients must share one scaling).
- ``stack``, ``svd``, ``ties`` and ``dare`` fold each ``s_i`` into the factors,
  so the merged adapter has scaling 1: ``r`` = merged rank and
  ``lora_alpha`` = ``r``.
"""

from __future__ import annotations

import math
import warnings
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from typing import Any

import torch
from torch import Tensor

WeightsLike = Sequence[float] | Tensor
Factors = Sequence[Tensor]

_A_SUFFIX = ".lora_A.weight"
_B_SUFFIX = ".lora_B.weight"


# ---------------------------------------------------------------------------
# Input checks (shared by every merge)
# ---------------------------------------------------------------------------


def _check_finite(t: Tensor, name: str) -> None:
    if not torch.isfinite(t).all():
        raise ValueError(f"{name} contains NaN or Inf; reject this client's update")


def _normalise_weights(weights: WeightsLike, n: int, device: torch.device) -> Tensor:
    w = torch.as_tensor(weights, dtype=torch.float32).flatten()
    if w.numel() != n:
        raise ValueError(
            f"weights has {w.numel()} entries but there are {n} clients; "
            "pass one weight per client"
        )
    if not torch.isfinite(w).all() or (w < 0).any():
        raise ValueError(
            f"weights={w.tolist()} must be finite and >= 0 (e.g. dataset sizes)"
        )
    total = w.sum()
    if total <= 0:
        raise ValueError(f"weights={w.tolist()} sum to 0; give a client weight > 0")
    return (w / total).to(device)


def _check_scalings(scalings: Sequence[float] | None, n: int) -> list[float]:
    if scalings is None:
        return [1.0] * n
    s = [float(x) for x in scalings]
    if len(s) != n:
        raise ValueError(
            f"scalings has {len(s)} entries but there are {n} clients; "
            "pass one alpha/r per client"
        )
    if not all(math.isfinite(x) and x > 0 for x in s):
        raise ValueError(f"scalings={s} must be finite and > 0 (alpha / r)")
    return s


def _check_factors(
    As: Sequence[Tensor], Bs: Sequence[Tensor], *, same_rank: bool
) -> None:
    if len(As) == 0:
        raise ValueError("As is empty; pass one LoRA A factor per client")
    if len(Bs) != len(As):
        raise ValueError(f"Bs has {len(Bs)} factors but As has {len(As)}")
    in_dim, out_dim, rank = As[0].shape[-1], Bs[0].shape[0], As[0].shape[0]
    for i, (A, B) in enumerate(zip(As, Bs, strict=True)):
        if A.dim() != 2 or B.dim() != 2:
            raise ValueError(
                f"As[{i}] {tuple(A.shape)} and Bs[{i}] {tuple(B.shape)} must be 2-D "
                "([r, in] and [out, r])"
            )
        if B.shape[1] != A.shape[0]:
            raise ValueError(
                f"Bs[{i}] {tuple(B.shape)} does not match As[{i}] {tuple(A.shape)}: "
                "B must be [out, r] for A [r, in]"
            )
        if A.shape[1] != in_dim or B.shape[0] != out_dim:
            raise ValueError(
                f"As[{i}]/Bs[{i}] give a [{B.shape[0]}, {A.shape[1]}] update but "
                f"client 0 gives [{out_dim}, {in_dim}]; clients must adapt the "
                "same base layer"
            )
        if same_rank and A.shape[0] != rank:
            raise ValueError(
                f"As[{i}] has rank {A.shape[0]} but As[0] has rank {rank}; "
                "fedavg needs one rank for all clients (use 'stack' or 'svd')"
            )
        _check_finite(A, f"As[{i}]")
        _check_finite(B, f"Bs[{i}]")


def _check_deltas(deltas: Sequence[Tensor]) -> None:
    if len(deltas) == 0:
        raise ValueError("deltas is empty; pass one ΔW per client")
    for i, d in enumerate(deltas):
        if d.shape != deltas[0].shape:
            raise ValueError(
                f"deltas[{i}] has shape {tuple(d.shape)} but deltas[0] has "
                f"{tuple(deltas[0].shape)}; clients must adapt the same base layer"
            )
        _check_finite(d, f"deltas[{i}]")


def _check_density(density: float) -> None:
    if not 0.0 < density <= 1.0:
        raise ValueError(f"density={density} must be in (0, 1] (fraction kept)")


def _check_rank(rank: int) -> None:
    if rank < 1:
        raise ValueError(f"rank={rank} must be >= 1")


# ---------------------------------------------------------------------------
# ΔW helpers
# ---------------------------------------------------------------------------


def delta_w(A: Tensor, B: Tensor, scaling: float = 1.0) -> Tensor:
    """Dense update of one LoRA layer, ``ΔW = s·B·A`` (Hu et al. 2021).

    Parameters
    ----------
    A, B : Tensor
        LoRA factors, ``A`` [r, in] and ``B`` [out, r].
    scaling : float
        ``s = lora_alpha / r``.

    Returns
    -------
    Tensor
        ``ΔW`` [out, in], float32.
    """
    return scaling * (B.float() @ A.float())


def refactorize(delta: Tensor, rank: int) -> tuple[Tensor, Tensor, float]:
    """Best rank-``rank`` LoRA pair of a dense ``ΔW`` (truncated SVD, Eckart-Young).

    ``ΔW = U·diag(S)·V^T`` gives ``B = U_r·sqrt(S_r)`` and ``A = sqrt(S_r)·V_r^T``,
    so ``B·A`` is the closest rank-``rank`` matrix to ``ΔW`` in Frobenius norm.
    When ``rank`` exceeds ``min(out, in)`` the factors are zero-padded so every
    layer of an adapter has the same rank (one ``LoraConfig.r``).

    Parameters
    ----------
    delta : Tensor
        ``ΔW`` [out, in].
    rank : int
        Rank of the returned pair.

    Returns
    -------
    A : Tensor
        [rank, in], float32.
    B : Tensor
        [out, rank], float32.
    energy_kept : float
        ``Σ_{k<rank} S_k² / Σ_k S_k²``: the share of ``‖ΔW‖_F²`` kept; 1.0 when
        ``ΔW`` is zero.
    """
    _check_rank(rank)
    if delta.dim() != 2:
        raise ValueError(f"delta has shape {tuple(delta.shape)}; expected [out, in]")
    _check_finite(delta, "delta")
    delta = delta.float()
    U, S, Vh = torch.linalg.svd(delta, full_matrices=False)
    k = min(rank, S.numel())
    root = S[:k].sqrt()
    B = U[:, :k] * root
    A = root[:, None] * Vh[:k]
    if k < rank:
        B = torch.cat([B, B.new_zeros(B.shape[0], rank - k)], dim=1)
        A = torch.cat([A, A.new_zeros(rank - k, A.shape[1])], dim=0)
    total = float((S**2).sum())
    energy = 1.0 if total == 0.0 else float((S[:k] ** 2).sum()) / total
    return A.contiguous(), B.contiguous(), min(energy, 1.0)


def _weighted_sum(w: Tensor, ts: Sequence[Tensor]) -> Tensor:
    """``Σ_i w_i t_i`` over a stack of equal-shape tensors."""
    stacked = torch.stack([t.float() for t in ts])
    return torch.tensordot(w, stacked, dims=1)


def _client_deltas(
    As: Sequence[Tensor], Bs: Sequence[Tensor], scalings: list[float]
) -> list[Tensor]:
    return [delta_w(A, B, s) for A, B, s in zip(As, Bs, scalings, strict=True)]


# ---------------------------------------------------------------------------
# Merges of LoRA factors
# ---------------------------------------------------------------------------


def merge_fedavg(
    As: Sequence[Tensor], Bs: Sequence[Tensor], weights: WeightsLike
) -> tuple[Tensor, Tensor]:
    """FedIT: average the LoRA factors A and B separately.

    Zhang et al. 2024, "Towards building the federated GPT: federated instruction
    tuning" (ICASSP). Merges *factors*: ``A = Σ w_i A_i``, ``B = Σ w_i B_i``. This
    is inexact: ``(Σ w_i B_i)(Σ w_i A_i) != Σ w_i B_i A_i`` in general (the cross
    terms ``w_i w_j B_i A_j`` do not vanish). All clients must share one rank and
    one scaling; the merged pair is used with the clients' ``r`` and ``lora_alpha``.

    Parameters
    ----------
    As, Bs : sequence of Tensor
        Per-client factors ``A_i`` [r, in] and ``B_i`` [out, r].
    weights : sequence of float or Tensor
        Client weights (normalised to sum to 1).

    Returns
    -------
    A, B : Tensor
        Averaged factors [r, in] and [out, r], float32.
    """
    _check_factors(As, Bs, same_rank=True)
    w = _normalise_weights(weights, len(As), As[0].device)
    return _weighted_sum(w, As), _weighted_sum(w, Bs)


def merge_stack(
    As: Sequence[Tensor],
    Bs: Sequence[Tensor],
    weights: WeightsLike,
    scalings: Sequence[float] | None = None,
) -> tuple[Tensor, Tensor]:
    """FLoRA: stack the clients' LoRA factors along the rank dimension.

    Wang et al. 2024, "FLoRA: Federated fine-tuning large language models with
    heterogeneous low-rank adaptations" (arXiv 2409.05976). Merges *factors*:
    ``A = cat_i(A_i)`` [Σ r_i, in] and ``B = cat_i(w_i·s_i·B_i)`` [out, Σ r_i], so
    ``B·A = Σ w_i s_i B_i A_i`` exactly. Client ranks may differ.

    The scalings ``s_i`` are folded into ``B``: use the merged pair with scaling 1,
    i.e. ``r = lora_alpha = Σ r_i``.

    Parameters
    ----------
    As, Bs : sequence of Tensor
        Per-client factors ``A_i`` [r_i, in] and ``B_i`` [out, r_i].
    weights : sequence of float or Tensor
        Client weights (normalised to sum to 1).
    scalings : sequence of float, optional
        Per-client ``alpha_i / r_i``; default 1.0 each.

    Returns
    -------
    A, B : Tensor
        [Σ r_i, in] and [out, Σ r_i], float32.
    """
    _check_factors(As, Bs, same_rank=False)
    w = _normalise_weights(weights, len(As), As[0].device)
    s = _check_scalings(scalings, len(As))
    A = torch.cat([Ai.float() for Ai in As], dim=0)
    B = torch.cat(
        [wi * si * Bi.float() for wi, si, Bi in zip(w, s, Bs, strict=True)], dim=1
    )
    return A, B


def merge_svd(
    As: Sequence[Tensor],
    Bs: Sequence[Tensor],
    weights: WeightsLike,
    rank: int,
    scalings: Sequence[float] | None = None,
) -> tuple[Tensor, Tensor, float]:
    """Exact weighted ΔW, re-factorised to ``rank`` by truncated SVD.

    Merges *ΔW*: ``ΔW = Σ w_i s_i B_i A_i`` (the exact average of the clients'
    updates, as in FLoRA, Wang et al. 2024, arXiv 2409.05976), then keeps its
    best rank-``rank`` approximation (Eckart-Young) so the merged adapter has a
    fixed size whatever the number of clients. Exact when ``rank`` >= rank(ΔW).
    Scalings are folded in: use with ``r = lora_alpha = rank``.

    Parameters
    ----------
    As, Bs : sequence of Tensor
        Per-client factors ``A_i`` [r_i, in] and ``B_i`` [out, r_i].
    weights : sequence of float or Tensor
        Client weights (normalised to sum to 1).
    rank : int
        Rank of the merged adapter.
    scalings : sequence of float, optional
        Per-client ``alpha_i / r_i``; default 1.0 each.

    Returns
    -------
    A, B : Tensor
        [rank, in] and [out, rank], float32.
    energy_kept : float
        Share of ``‖ΔW‖_F²`` kept by the truncation (see ``refactorize``).
    """
    _check_rank(rank)
    _check_factors(As, Bs, same_rank=False)
    w = _normalise_weights(weights, len(As), As[0].device)
    s = _check_scalings(scalings, len(As))
    deltas = _client_deltas(As, Bs, s)
    return refactorize(_weighted_sum(w, deltas), rank)


# ---------------------------------------------------------------------------
# Merges of dense ΔW through peft's merge utilities
# ---------------------------------------------------------------------------


def merge_ties(
    deltas: Sequence[Tensor], weights: WeightsLike, density: float
) -> Tensor:
    """TIES-merging of dense updates, by ``peft.utils.merge_utils.ties``.

    Yadav et al. 2023, "TIES-Merging: resolving interference when merging
    models" (NeurIPS). Merges *ΔW*: (1) trim each ``ΔW_i`` to its top ``density``
    fraction by magnitude, (2) elect per entry the sign of ``Σ_i ΔW_i`` (peft's
    "total" rule, unweighted), (3) disjoint mean over the clients that agree
    with the elected sign.

    peft's disjoint mean divides ``Σ_agree w_i ΔW_i`` by the *count* of agreeing
    clients, so the normalised weights are passed as ``N·w_i`` (1 each for equal
    weights, peft's usual call): where all clients agree the result is the
    weighted average ``Σ w_i ΔW_i``.

    Parameters
    ----------
    deltas : sequence of Tensor
        Per-client ``ΔW_i`` (scaling already applied), all of one shape.
    weights : sequence of float or Tensor
        Client weights (normalised to sum to 1).
    density : float
        Fraction of entries of each ``ΔW_i`` kept, in (0, 1].

    Returns
    -------
    Tensor
        Merged ``ΔW``, float32.
    """
    from peft.utils.merge_utils import ties

    _check_deltas(deltas)
    _check_density(density)
    w = _normalise_weights(weights, len(deltas), deltas[0].device)
    with _quiet_full_density():
        return ties([d.float() for d in deltas], w * len(deltas), density)


def merge_dare(
    deltas: Sequence[Tensor], weights: WeightsLike, density: float, seed: int = 0
) -> Tensor:
    """DARE (linear) merging of dense updates, by ``peft.utils.merge_utils.dare_linear``.

    Yu et al. 2024, "Language models are Super Mario: absorbing abilities from
    homologous models as a free lunch" (ICML). Merges *ΔW*: drop each entry of
    each ``ΔW_i`` with probability ``1 - density``, rescale the rest by
    ``1 / density`` (unbiased), then ``Σ w_i ΔW_i``. At ``density = 1`` this is
    exactly the weighted average.

    The drop masks are drawn on the CPU from ``seed`` (peft draws from the global
    RNG, which is forked so the caller's RNG state is untouched): one seed gives
    the same merge on every device.

    Parameters
    ----------
    deltas : sequence of Tensor
        Per-client ``ΔW_i`` (scaling already applied), all of one shape.
    weights : sequence of float or Tensor
        Client weights (normalised to sum to 1).
    density : float
        Keep probability, in (0, 1].
    seed : int
        Seed of the drop masks.

    Returns
    -------
    Tensor
        Merged ``ΔW``, float32, on the device of ``deltas[0]``.
    """
    from peft.utils.merge_utils import dare_linear

    _check_deltas(deltas)
    _check_density(density)
    device = deltas[0].device
    w = _normalise_weights(weights, len(deltas), torch.device("cpu"))
    cpu = [d.detach().float().cpu() for d in deltas]
    with torch.random.fork_rng(devices=[]), _quiet_full_density():
        torch.default_generator.manual_seed(seed)
        merged = dare_linear(cpu, w, density)
    return merged.to(device)


@contextmanager
def _quiet_full_density() -> Iterator[None]:
    # peft warns at density 1 ("no pruning will be performed"), a valid choice here.
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="The density .* no pruning")
        yield


def merge_ties_lora(
    As: Sequence[Tensor],
    Bs: Sequence[Tensor],
    weights: WeightsLike,
    rank: int,
    density: float,
    scalings: Sequence[float] | None = None,
) -> tuple[Tensor, Tensor, float]:
    """TIES on the clients' ``ΔW_i = s_i B_i A_i``, re-factorised to ``rank``.

    See ``merge_ties`` (Yadav et al. 2023) and ``refactorize``. Scalings are
    folded in: use with ``r = lora_alpha = rank``.

    Returns
    -------
    A, B : Tensor
        [rank, in] and [out, rank], float32.
    energy_kept : float
        Share of the merged ``‖ΔW‖_F²`` kept by the truncation.
    """
    _check_rank(rank)
    _check_factors(As, Bs, same_rank=False)
    s = _check_scalings(scalings, len(As))
    return refactorize(merge_ties(_client_deltas(As, Bs, s), weights, density), rank)


def merge_dare_lora(
    As: Sequence[Tensor],
    Bs: Sequence[Tensor],
    weights: WeightsLike,
    rank: int,
    density: float,
    seed: int = 0,
    scalings: Sequence[float] | None = None,
) -> tuple[Tensor, Tensor, float]:
    """DARE on the clients' ``ΔW_i = s_i B_i A_i``, re-factorised to ``rank``.

    See ``merge_dare`` (Yu et al. 2024) and ``refactorize``. Scalings are folded
    in: use with ``r = lora_alpha = rank``.

    Returns
    -------
    A, B : Tensor
        [rank, in] and [out, rank], float32.
    energy_kept : float
        Share of the merged ``‖ΔW‖_F²`` kept by the truncation.
    """
    _check_rank(rank)
    _check_factors(As, Bs, same_rank=False)
    s = _check_scalings(scalings, len(As))
    delta = merge_dare(_client_deltas(As, Bs, s), weights, density, seed)
    return refactorize(delta, rank)


# ---------------------------------------------------------------------------
# Registry: one uniform per-layer call per method (adding a merge = one line)
# ---------------------------------------------------------------------------

LayerResult = tuple[Tensor, Tensor, float | None]


def _fedavg(As: Factors, Bs: Factors, w: Tensor, **_: Any) -> LayerResult:
    return (*merge_fedavg(As, Bs, w), None)


def _stack(
    As: Factors, Bs: Factors, w: Tensor, *, scalings: list[float], **_: Any
) -> LayerResult:
    return (*merge_stack(As, Bs, w, scalings), None)


def _svd(
    As: Factors, Bs: Factors, w: Tensor, *, rank: int, scalings: list[float], **_: Any
) -> LayerResult:
    return merge_svd(As, Bs, w, rank, scalings)


def _ties(
    As: Factors,
    Bs: Factors,
    w: Tensor,
    *,
    rank: int,
    density: float,
    scalings: list[float],
    **_: Any,
) -> LayerResult:
    return merge_ties_lora(As, Bs, w, rank, density, scalings)


def _dare(
    As: Factors,
    Bs: Factors,
    w: Tensor,
    *,
    rank: int,
    density: float,
    seed: int,
    scalings: list[float],
    **_: Any,
) -> LayerResult:
    return merge_dare_lora(As, Bs, w, rank, density, seed, scalings)


# Each entry is called as ``f(As, Bs, weights, rank=, density=, seed=, scalings=)``.
MERGES: dict[str, Callable[..., LayerResult]] = {
    "fedavg": _fedavg,
    "stack": _stack,
    "svd": _svd,
    "ties": _ties,
    "dare": _dare,
}


# ---------------------------------------------------------------------------
# Adapter-level merge over peft state dicts
# ---------------------------------------------------------------------------


def _layer_prefixes(adapters: Sequence[dict[str, Tensor]]) -> list[str]:
    keys0 = set(adapters[0])
    for key in sorted(keys0):
        if not (key.endswith(_A_SUFFIX) or key.endswith(_B_SUFFIX)):
            raise ValueError(
                f"adapters[0] key {key!r} is not a LoRA factor "
                f"('<prefix>{_A_SUFFIX}' / '<prefix>{_B_SUFFIX}'); only plain LoRA "
                "(no DoRA, no lora_bias) can be merged"
            )
    prefixes = sorted(k[: -len(_A_SUFFIX)] for k in keys0 if k.endswith(_A_SUFFIX))
    for p in prefixes:
        if p + _B_SUFFIX not in keys0:
            raise ValueError(f"adapters[0] has {p + _A_SUFFIX!r} but no {_B_SUFFIX!r}")
    for p in (k[: -len(_B_SUFFIX)] for k in keys0 if k.endswith(_B_SUFFIX)):
        if p + _A_SUFFIX not in keys0:
            raise ValueError(f"adapters[0] has {p + _B_SUFFIX!r} but no {_A_SUFFIX!r}")
    for i, ad in enumerate(adapters[1:], start=1):
        missing, extra = keys0 - set(ad), set(ad) - keys0
        if missing or extra:
            key = sorted(missing or extra)[0]
            raise ValueError(
                f"adapters[{i}] {'lacks' if missing else 'has an extra'} key {key!r} "
                f"({len(missing)} missing, {len(extra)} extra vs adapters[0]); "
                "clients must train the same lora-targets"
            )
    if not prefixes:
        raise ValueError("adapters[0] has no LoRA layers")
    return prefixes


def _as_2d(t: Tensor, key: str) -> Tensor:
    # Conv LoRA: A is [r, in, kh, kw] and B is [out, r, 1, 1]; ΔW = B·A on flattened
    # factors, the same product peft's Conv2d layer computes.
    if t.dim() == 2:
        return t
    if t.dim() == 4:
        return t.flatten(1)
    raise ValueError(f"{key} has shape {tuple(t.shape)}; expected a 2-D or 4-D factor")


def merge_adapters(
    adapters: Sequence[dict[str, Tensor]],
    weights: WeightsLike,
    method: str,
    *,
    rank: int,
    density: float = 0.5,
    seed: int = 0,
    scalings: Sequence[float] | None = None,
) -> tuple[dict[str, Tensor], dict[str, Any]]:
    """Merge N client LoRA adapters layer by layer.

    Parameters
    ----------
    adapters : sequence of dict
        One peft LoRA state dict per client, keys ``<prefix>.lora_A.weight`` /
        ``<prefix>.lora_B.weight`` without the adapter name (as returned by
        ``peft.get_peft_model_state_dict``). All clients must have the same keys.
    weights : sequence of float or Tensor
        Client weights (normalised to sum to 1).
    method : str
        One of ``MERGES``: fedavg, stack, svd, ties, dare.
    rank : int
        Merged rank for svd/ties/dare (ignored by fedavg and stack).
    density : float
        Fraction kept by ties/dare.
    seed : int
        Seed of dare's drop masks; layer ``j`` (sorted key order) uses ``seed + j``
        so layers of one shape do not share a mask.
    scalings : sequence of float, optional
        Per-client ``lora_alpha / r``; default 1.0 each. fedavg needs them equal.

    Returns
    -------
    merged : dict
        Merged state dict, same keys, float32.
    info : dict
        ``rank``: ``r`` of the merged adapter; ``lora_alpha``: the alpha that
        gives the right scaling with that ``r`` (fedavg: the clients' ``s·r``;
        others: ``rank``, scaling 1 since ``s_i`` is folded into the factors);
        ``energy_kept``: mean over layers (None for fedavg and stack).
    """
    # 1. Check inputs
    if method not in MERGES:
        raise ValueError(f"method={method!r} is not one of {', '.join(MERGES)}")
    if len(adapters) == 0:
        raise ValueError("adapters is empty; pass one state dict per client")
    _check_rank(rank)
    _check_density(density)
    w = _normalise_weights(weights, len(adapters), torch.device("cpu"))
    s = _check_scalings(scalings, len(adapters))
    if method == "fedavg" and len(set(s)) > 1:
        raise ValueError(
            f"scalings={s} differ but fedavg averages unscaled factors; "
            "use method 'stack' or 'svd', which fold each client's scaling in"
        )
    prefixes = _layer_prefixes(adapters)
    merge = MERGES[method]

    # 2. Merge layer by layer, in float32
    merged: dict[str, Tensor] = {}
    energies: list[float] = []
    ranks: set[int] = set()
    for j, p in enumerate(prefixes):
        ka, kb = p + _A_SUFFIX, p + _B_SUFFIX
        As = [_as_2d(ad[ka].float(), ka) for ad in adapters]
        Bs = [_as_2d(ad[kb].float(), kb) for ad in adapters]
        try:
            A, B, energy = merge(
                As,
                Bs,
                w.to(As[0].device),
                rank=rank,
                density=density,
                seed=seed + j,
                scalings=s,
            )
        except ValueError as e:
            raise ValueError(f"layer {p!r}: {e}") from e
        # 3. Check the result (peft checks for NaN after its merges too)
        if not (torch.isfinite(A).all() and torch.isfinite(B).all()):
            raise ValueError(
                f"layer {p!r}: merge produced NaN/Inf; check the clients' adapters"
            )
        shape_a, shape_b = adapters[0][ka].shape, adapters[0][kb].shape
        merged[ka] = A.reshape(A.shape[0], *shape_a[1:]).contiguous()
        merged[kb] = B.reshape(shape_b[0], B.shape[1], *shape_b[2:]).contiguous()
        ranks.add(A.shape[0])
        if energy is not None:
            energies.append(energy)

    # 4. One rank for the whole adapter, so one LoraConfig.r loads it
    if len(ranks) != 1:
        raise ValueError(
            f"merged layers have ranks {sorted(ranks)}; clients must use one rank "
            "per layer for method 'stack' (or use 'svd')"
        )
    merged_rank = ranks.pop()
    alpha = s[0] * merged_rank if method == "fedavg" else float(merged_rank)
    info = {
        "method": method,
        "rank": merged_rank,
        "lora_alpha": alpha,
        "energy_kept": sum(energies) / len(energies) if energies else None,
    }
    return merged, info
