"""One-shot merging of client LoRA adapters (pure maths: no Flower, no I/O).

N clients fine-tune a LoRA adapter of the same base model. For one target layer
client ``i`` holds ``A_i`` [r_i, in], ``B_i`` [out, r_i] and a scaling
``s_i = alpha_i / r_i``; its update of the base weight is ``ΔW_i = s_i·B_i·A_i``
(Hu et al. 2021, "LoRA"). The server merges the N adapters into one. Only FedIT's
factor average is computed here; the others are peft's
``LoraModel.add_weighted_adapter``:

=======  ===================  =======================================  ===========
method   peft                 what is merged                           merged rank
=======  ===================  =======================================  ===========
fedavg   (FedIT, here)        the factors: A and B each averaged       r
stack    ``cat``              the factors, concatenated (FLoRA); exact Σ r_i
svd      ``svd``              ΔW = Σ w_i ΔW_i, then truncated SVD      ``rank``
ties     ``ties_svd``         ΔW by TIES (trim, elect sign, disjoint   ``rank``
                              mean), then truncated SVD
dare     ``dare_linear_svd``  ΔW by DARE (random drop, rescale, sum),  ``rank``
                              then truncated SVD
=======  ===================  =======================================  ===========

Client weights (e.g. dataset sizes) are normalised to ``w_i`` summing to 1
(peft does not normalise). How the project's definitions map onto peft's call:

- each client's adapter is loaded into peft with ``lora_alpha = s_i·r_i``, so
  peft's ``scaling`` is ``s_i``: ``cat`` multiplies ``w_i·s_i`` into ``A_i``,
  the ``*_svd`` merges take ``ΔW_i`` with ``s_i`` applied;
- ``ties`` is passed ``N·w_i``: peft's disjoint mean divides by the *count* of
  clients that agree with the elected sign, so where all agree the result is
  ``Σ w_i ΔW_i`` (equal weights give 1 each, peft's usual call);
- the ``*_svd`` merges return peft's split ``B = U_r·diag(S_r)``, ``A = V_r^T``;
- a layer smaller than ``rank`` (``min(out, in) < rank``) gets zero-padded
  factors so one ``LoraConfig.r`` loads the whole adapter;
- with one client peft falls back to ``linear``: the client's adapter comes back
  with ``sqrt(s_1)`` in each factor, at the client's rank, whatever ``method``.

Conv LoRA factors (``A`` [r, in, kh, kw], ``B`` [out, r, 1, 1]) are merged as a
``Linear(in·kh·kw, out)``: peft's ``Conv2d`` ΔW is ``B·A`` on the flattened
factors and its merges act on it entry-wise, so the result is the same
(``tests/unit/test_lora_merge.py`` checks it against a real ``Conv2d``), and peft's
conv reshape, which fails when ``rank > min(out, in·kh·kw)``, is avoided.

What the caller sets when loading the merged adapter into a ``LoraConfig``
(``merge_adapters`` returns both in its info dict): ``fedavg`` keeps the
clients' ``r`` and ``lora_alpha`` (they must share one scaling); the others have
scaling 1 (peft sets ``lora_alpha = r``), ``s_i`` being folded into the factors.
"""

from __future__ import annotations

import math
import warnings
from collections.abc import Sequence
from typing import Any

import torch
from torch import Tensor, nn

WeightsLike = Sequence[float] | Tensor

_A_SUFFIX = ".lora_A.weight"
_B_SUFFIX = ".lora_B.weight"

# method -> peft combination_type; fedavg (FedIT) is not one of peft's merges:
# peft's "linear" puts sqrt(w_i) on each factor, FedIT puts w_i on each.
PEFT_COMBINATIONS = {
    "stack": "cat",
    "svd": "svd",
    "ties": "ties_svd",
    "dare": "dare_linear_svd",
}
MERGES = ("fedavg", *PEFT_COMBINATIONS)


# ---------------------------------------------------------------------------
# Input checks
# ---------------------------------------------------------------------------


def _normalise_weights(weights: WeightsLike, n: int) -> Tensor:
    w = torch.as_tensor(weights, dtype=torch.float32).flatten().cpu()
    if w.numel() != n:
        raise ValueError(
            f"weights has {w.numel()} entries but there are {n} clients; pass one weight per client"
        )
    if not torch.isfinite(w).all() or (w < 0).any():
        raise ValueError(
            f"weights={w.tolist()} must be finite and >= 0 (e.g. dataset sizes)"
        )
    if w.sum() <= 0:
        raise ValueError(f"weights={w.tolist()} sum to 0; give a client weight > 0")
    return w / w.sum()


def _check_scalings(scalings: Sequence[float] | None, n: int) -> list[float]:
    if scalings is None:
        return [1.0] * n
    s = [float(x) for x in scalings]
    if len(s) != n:
        raise ValueError(
            f"scalings has {len(s)} entries but there are {n} clients; pass one alpha/r per client"
        )
    if not all(math.isfinite(x) and x > 0 for x in s):
        raise ValueError(f"scalings={s} must be finite and > 0 (alpha / r)")
    return s


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


def _flat_factors(
    adapters: Sequence[dict[str, Tensor]], p: str
) -> tuple[list[Tensor], list[Tensor]]:
    """The clients' factors of layer ``p`` as 2-D float32 CPU tensors, checked."""
    ka, kb = p + _A_SUFFIX, p + _B_SUFFIX
    a0, b0 = adapters[0][ka], adapters[0][kb]
    As, Bs = [], []
    for i, ad in enumerate(adapters):
        A, B = ad[ka], ad[kb]
        # Conv LoRA: A [r, in, kh, kw] and B [out, r, 1, 1]; ΔW = B·A once flattened.
        if A.dim() not in (2, 4) or B.dim() != A.dim():
            raise ValueError(
                f"adapters[{i}][{ka!r}] {tuple(A.shape)} and [{kb!r}] "
                f"{tuple(B.shape)} must both be 2-D (Linear) or 4-D (Conv2d)"
            )
        A, B = A.detach().float().cpu().flatten(1), B.detach().float().cpu().flatten(1)
        if B.shape[1] != A.shape[0]:
            raise ValueError(
                f"adapters[{i}][{kb!r}] has shape {tuple(ad[kb].shape)} but "
                f"[{ka!r}] has rank {A.shape[0]}: B must be [out, r(, 1, 1)]"
            )
        if ad[ka].shape[1:] != a0.shape[1:] or ad[kb].shape[0] != b0.shape[0]:
            raise ValueError(
                f"adapters[{i}] layer {p!r} has A {tuple(ad[ka].shape)}, B "
                f"{tuple(ad[kb].shape)} but adapters[0] has A {tuple(a0.shape)}, B "
                f"{tuple(b0.shape)}; clients must adapt the same base layer"
            )
        for key, t in ((ka, A), (kb, B)):
            if not torch.isfinite(t).all():
                raise ValueError(
                    f"adapters[{i}][{key!r}] contains NaN or Inf; reject this client's update"
                )
        As.append(A)
        Bs.append(B)
    return As, Bs


def _client_ranks(As_per_layer: dict[str, list[Tensor]], n: int) -> list[int]:
    # One LoraConfig per client adapter, so one rank per client across layers.
    first = next(iter(As_per_layer))
    ranks = [As_per_layer[first][i].shape[0] for i in range(n)]
    for p, As in As_per_layer.items():
        for i, A in enumerate(As):
            if A.shape[0] != ranks[i]:
                raise ValueError(
                    f"adapters[{i}] layer {p!r} has rank {A.shape[0]} but layer "
                    f"{first!r} has rank {ranks[i]}; a client adapter must use one "
                    "rank (lora-rank) for every layer"
                )
    return ranks


# ---------------------------------------------------------------------------
# Pure maths
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


def merge_fedavg(
    As: Sequence[Tensor], Bs: Sequence[Tensor], weights: WeightsLike
) -> tuple[Tensor, Tensor]:
    """FedIT: average the LoRA factors A and B separately.

    Zhang et al. 2024, "Towards building the federated GPT: federated instruction
    tuning" (ICASSP). Merges *factors*: ``A = Σ w_i A_i``, ``B = Σ w_i B_i``. This
    is inexact: ``(Σ w_i B_i)(Σ w_i A_i) != Σ w_i B_i A_i`` in general (the cross
    terms ``w_i w_j B_i A_j`` do not vanish). peft's ``linear`` is not this: it
    puts ``sqrt(w_i·s_i)`` on each factor. All clients must share one rank and one
    scaling; the merged pair is used with the clients' ``r`` and ``lora_alpha``.

    Parameters
    ----------
    As, Bs : sequence of Tensor
        Per-client factors ``A_i`` [r, ...] and ``B_i`` [out, r, ...].
    weights : sequence of float or Tensor
        Client weights (normalised to sum to 1).

    Returns
    -------
    A, B : Tensor
        Averaged factors, float32.
    """
    if len(As) == 0 or len(Bs) != len(As):
        raise ValueError(
            f"As has {len(As)} and Bs {len(Bs)} factors; pass one A and one B per client"
        )
    for i, (A, B) in enumerate(zip(As, Bs, strict=True)):
        if A.shape[0] != As[0].shape[0]:
            raise ValueError(
                f"As[{i}] has rank {A.shape[0]} but As[0] has rank {As[0].shape[0]}; "
                "fedavg needs one rank for all clients (use 'stack' or 'svd')"
            )
        if A.shape != As[0].shape or B.shape != Bs[0].shape:
            raise ValueError(
                f"As[{i}] {tuple(A.shape)}, Bs[{i}] {tuple(B.shape)} differ from "
                f"As[0] {tuple(As[0].shape)}, Bs[0] {tuple(Bs[0].shape)}"
            )
    w = _normalise_weights(weights, len(As)).to(As[0].device)
    A = torch.tensordot(w, torch.stack([a.float() for a in As]), dims=1)
    B = torch.tensordot(w, torch.stack([b.float() for b in Bs]), dims=1)
    return A, B


def _energy_kept(delta: Tensor, A: Tensor, B: Tensor) -> float:
    """Share of ``‖ΔW‖_F²`` in the column space of ``B`` and row space of ``A``.

    ``‖P_B·ΔW·P_A‖² / ‖ΔW‖²`` with ``P`` the orthogonal projections; for the svd
    merge ``B·A`` is the truncated SVD of ``ΔW`` and this is
    ``Σ_{k<r} S_k² / Σ_k S_k²`` (Eckart-Young). 1.0 when ``ΔW`` is zero.
    """
    total = float(delta.square().sum())
    if total == 0.0:
        return 1.0
    core = torch.linalg.pinv(B) @ delta @ torch.linalg.pinv(A)
    return min(float((B @ core @ A).square().sum()) / total, 1.0)


# ---------------------------------------------------------------------------
# The peft merges
# ---------------------------------------------------------------------------


def _mirror(shapes: dict[str, tuple[int, int]]) -> nn.Module:
    """A module tree with a ``Linear(in, out)`` at each prefix, for peft to adapt.

    The base weights are stride-0 views of one zero: peft reads only their shape,
    so the mirror of a large UNet costs no memory.
    """
    root = nn.Module()
    for p, (out, inp) in shapes.items():
        parent = root
        *path, leaf = p.split(".")
        for part in path:
            if not hasattr(parent, part):
                parent.add_module(part, nn.Module())
            parent = getattr(parent, part)
        layer = nn.Linear(inp, out, bias=False, device="meta")
        layer.weight = nn.Parameter(
            torch.zeros((), dtype=torch.float32).expand(out, inp), requires_grad=False
        )
        parent.add_module(leaf, layer)
    return root


def _merge_with_peft(
    As: dict[str, list[Tensor]],
    Bs: dict[str, list[Tensor]],
    combination_type: str,
    weights: list[float],
    *,
    ranks: list[int],
    scalings: list[float],
    rank: int,
    density: float,
    seed: int,
) -> dict[str, tuple[Tensor, Tensor]]:
    """Run ``add_weighted_adapter`` on a mirror of the layers; ``{p: (A, B)}``."""
    from peft import LoraConfig, get_peft_model

    prefixes = list(As)
    shapes = {p: (Bs[p][0].shape[0], As[p][0].shape[1]) for p in prefixes}
    names = [f"client{i}" for i in range(len(ranks))]
    # peft's LoRA init and DARE's masks draw from the global CPU RNG: fork it, so
    # the caller's stream is untouched and one seed gives one merge.
    with torch.random.fork_rng(devices=[]), warnings.catch_warnings():
        # peft warns at density 1 ("no pruning will be performed"), a valid choice.
        warnings.filterwarnings("ignore", message="The density .* no pruning")
        # 1. Mirror the base layers and load client i's factors as adapter i
        model: Any = None
        for i, name in enumerate(names):
            config = LoraConfig(
                r=ranks[i],
                lora_alpha=scalings[i] * ranks[i],  # type: ignore[arg-type]  # float ok
                target_modules=prefixes,
                init_lora_weights=False,
            )
            if model is None:
                model = get_peft_model(_mirror(shapes), config, adapter_name=name)
            else:
                model.add_adapter(name, config)
        layers = {p: model.base_model.model.get_submodule(p) for p in prefixes}
        with torch.no_grad():
            for p, layer in layers.items():
                for i, name in enumerate(names):
                    layer.lora_A[name].weight.copy_(As[p][i])
                    layer.lora_B[name].weight.copy_(Bs[p][i])

        # 2. Merge (DARE's masks: layer by layer in prefix order, from ``seed``)
        torch.default_generator.manual_seed(seed)
        model.add_weighted_adapter(
            adapters=names,
            weights=weights,
            adapter_name="merged",
            combination_type=combination_type,
            svd_rank=rank,
            svd_full_matrices=False,  # same B·A, without the [in, in] V
            density=density,
        )
    return {
        p: (
            layer.lora_A["merged"].weight.detach().clone(),
            layer.lora_B["merged"].weight.detach().clone(),
        )
        for p, layer in layers.items()
    }


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
    """Merge N client LoRA adapters (see the module docstring for each method).

    Parameters
    ----------
    adapters : sequence of dict
        One peft LoRA state dict per client, keys ``<prefix>.lora_A.weight`` /
        ``<prefix>.lora_B.weight`` without the adapter name (as returned by
        ``peft.get_peft_model_state_dict``). All clients must have the same keys
        and one rank per adapter.
    weights : sequence of float or Tensor
        Client weights (normalised to sum to 1).
    method : str
        One of ``MERGES``: fedavg, stack, svd, ties, dare.
    rank : int
        Merged rank for svd/ties/dare (ignored by fedavg and stack).
    density : float
        ``lora-merge-density``: the fraction of each ``ΔW_i`` that ties keeps
        (largest magnitudes) and dare keeps (at random), in (0, 1].
    seed : int
        Seed of dare's drop masks, drawn layer by layer in sorted key order.
    scalings : sequence of float, optional
        Per-client ``lora_alpha / r``; default 1.0 each. fedavg needs them equal.

    Returns
    -------
    merged : dict
        Merged state dict, same keys, float32 on the CPU.
    info : dict
        ``rank``: ``r`` of the merged adapter; ``lora_alpha``: the alpha that
        gives the right scaling with that ``r`` (fedavg: the clients' ``s·r``;
        others: ``rank``, scaling 1); ``energy_kept``: for svd/ties/dare the mean
        over layers of the share of the exact ``‖Σ w_i ΔW_i‖_F²`` in the merged
        adapter's column and row spaces (for svd: what the truncation keeps),
        None for fedavg and stack.
    """
    # 1. Check inputs
    if method not in MERGES:
        raise ValueError(f"method={method!r} is not one of {', '.join(MERGES)}")
    if len(adapters) == 0:
        raise ValueError("adapters is empty; pass one state dict per client")
    if rank < 1:
        raise ValueError(f"rank={rank} must be >= 1 (lora-merge-rank)")
    if not 0.0 < density <= 1.0:
        raise ValueError(
            f"density={density} must be in (0, 1]: the fraction of each client's ΔW "
            "that ties/dare keep (lora-merge-density)"
        )
    w = _normalise_weights(weights, len(adapters))
    s = _check_scalings(scalings, len(adapters))
    if method == "fedavg" and len(set(s)) > 1:
        raise ValueError(
            f"scalings={s} differ but fedavg averages unscaled factors; "
            "use method 'stack' or 'svd', which fold each client's scaling in"
        )
    prefixes = _layer_prefixes(adapters)
    As, Bs = {}, {}
    for p in prefixes:
        As[p], Bs[p] = _flat_factors(adapters, p)

    # 2. Merge
    factors: dict[str, tuple[Tensor, Tensor]] = {}
    if method == "fedavg":
        for p in prefixes:
            try:
                factors[p] = merge_fedavg(As[p], Bs[p], w)
            except ValueError as e:
                raise ValueError(f"layer {p!r}: {e}") from e
    else:
        n = len(adapters)
        factors = _merge_with_peft(
            As,
            Bs,
            PEFT_COMBINATIONS[method],
            # peft's ties divides by the count of agreeing clients: N·w_i makes
            # it the weighted average where all agree (module docstring).
            (w * n if method == "ties" else w).tolist(),
            ranks=_client_ranks(As, n),
            scalings=s,
            rank=rank,
            density=density,
            seed=seed,
        )

    # 3. Check the result (peft checks for NaN after its merges too), pad the
    # layers smaller than ``rank`` and give conv factors their shape back
    merged: dict[str, Tensor] = {}
    energies: list[float] = []
    svd_type = method in ("svd", "ties", "dare")
    merged_rank = max(A.shape[0] for A, _ in factors.values())
    if svd_type and len(adapters) > 1:  # one client: peft's "linear", rank r_1
        merged_rank = rank
    for p, (A, B) in factors.items():
        if not (torch.isfinite(A).all() and torch.isfinite(B).all()):
            raise ValueError(
                f"layer {p!r}: merge produced NaN/Inf; check the clients' adapters"
            )
        if svd_type:
            deltas = [
                delta_w(a, b, si) for a, b, si in zip(As[p], Bs[p], s, strict=True)
            ]
            exact = torch.tensordot(w, torch.stack(deltas), dims=1)
            energies.append(_energy_kept(exact, A, B))
        pad = merged_rank - A.shape[0]
        A = torch.cat([A, A.new_zeros(pad, A.shape[1])])
        B = torch.cat([B, B.new_zeros(B.shape[0], pad)], dim=1)
        ka, kb = p + _A_SUFFIX, p + _B_SUFFIX
        shape_a, shape_b = adapters[0][ka].shape, adapters[0][kb].shape
        merged[ka] = A.reshape(merged_rank, *shape_a[1:]).contiguous()
        merged[kb] = B.reshape(shape_b[0], merged_rank, *shape_b[2:]).contiguous()

    # 4. Report what loads it: fedavg keeps the clients' scaling, peft's merges
    # have lora_alpha = r
    alpha = s[0] * merged_rank if method == "fedavg" else float(merged_rank)
    info = {
        "method": method,
        "rank": merged_rank,
        "lora_alpha": alpha,
        "energy_kept": sum(energies) / len(energies) if energies else None,
    }
    return merged, info
