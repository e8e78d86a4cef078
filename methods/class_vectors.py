"""The record layout of conditioning vectors tagged by class, packed and checked in
one place for the payloads that carry nothing else (FedDEO's descriptions,
FedDISC's centres).

``<key>``      float16 ``[K, L, D]``: the vectors
``class_ids``  int64 ``[K]``: the class of each vector, in ``[0, num-classes)``
"""

from __future__ import annotations

import torch

from common import contract as C
from common.contract import PayloadError

IDS = "class_ids"


def layout(
    key: str, vectors: torch.Tensor, class_ids: torch.Tensor
) -> dict[str, torch.Tensor]:
    """The two tensors as they travel: ``vectors`` in float16, ids in int64."""
    return {key: vectors.detach().to(torch.float16), IDS: class_ids.to(torch.int64)}


def unpack(
    tensors: dict[str, torch.Tensor],
    key: str,
    *,
    shape: tuple[int, int],
    num_classes: int,
    hint: str,
    max_per_class: int = 1,
    per_class_key: str = "",
) -> tuple[torch.Tensor, torch.Tensor]:
    """Read and check the layout; ``PayloadError`` names what is wrong.

    Parameters
    ----------
    tensors : dict of str to Tensor
        The payload: exactly ``key`` and ``class_ids``.
    key : str
        The vectors' name (``descriptions``, ``centres``).
    shape : tuple of int
        ``(L, D)`` every vector must have.
    num_classes : int
        Class ids must be in ``[0, num_classes)``.
    hint : str
        What a wrong shape suggests (e.g. another image encoder), for the error.
    max_per_class, per_class_key : int, str
        At most this many vectors per class (1: distinct ids), and the config
        key that sets it (named in the error).

    Returns
    -------
    tuple of Tensor
        ``(vectors [K, L, D], class_ids [K])`` as received.
    """
    vectors = C.require(tensors, key, f"{key} payload")
    ids = C.require(tensors, IDS, f"{key} payload")
    if set(tensors) != {key, IDS}:
        raise PayloadError(
            f"unexpected payload keys {sorted(set(tensors) - {key, IDS})}"
        )
    C.check_rows(vectors, key, shape, hint, rows="K")
    C.check_int_ids(ids, IDS, num_classes, max_per_class, per_class_key)
    if len(ids) != len(vectors):
        raise PayloadError(f"{len(ids)} class ids for {len(vectors)} {key}")
    return vectors, ids
