"""The record layout of conditioning vectors tagged by class, packed and checked in
one place for the payloads that carry nothing else (FedDEO's descriptions,
FedDISC's centres).

``<key>``      float16 ``[K, L, D]``: the vectors
``class_ids``  int64 ``[K]``: the class of each vector, in ``[0, num-classes)``
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from common import contract as C
from common.contract import PayloadError

IDS = "class_ids"


@dataclass
class ClassVectors:
    """Vectors ``[K, L, D]`` and the class of each ``[K]`` (FedDEO's
    descriptions, FedDISC's centres)."""

    vectors: torch.Tensor  # [K, L, D]
    class_ids: torch.Tensor  # [K]


@dataclass(frozen=True)
class Layout:
    """One payload in this layout: the vectors' tensor name (``descriptions``,
    ``centres``), what a wrong shape suggests (for the error), and the config key
    that bounds the vectors per class (named in the error; ``""``: at most one,
    distinct ids)."""

    key: str
    hint: str
    per_class_key: str = ""

    def pack(self, v: ClassVectors) -> dict[str, torch.Tensor]:
        """The two tensors as they travel: the vectors in float16, ids in int64."""
        return {
            self.key: v.vectors.detach().to(torch.float16),
            IDS: v.class_ids.to(torch.int64),
        }

    def unpack(
        self,
        tensors: dict[str, torch.Tensor],
        *,
        shape: tuple[int, int],
        num_classes: int,
        max_per_class: int = 1,
    ) -> ClassVectors:
        """Read and check the layout; ``PayloadError`` names what is wrong.

        Parameters
        ----------
        tensors : dict of str to Tensor
            The payload: exactly ``key`` and ``class_ids``.
        shape : tuple of int
            ``(L, D)`` every vector must have.
        num_classes : int
            Class ids must be in ``[0, num_classes)``.
        max_per_class : int
            At most this many vectors per class (1: distinct ids).

        Returns
        -------
        ClassVectors
            The vectors ``[K, L, D]`` and class ids ``[K]`` as received.
        """
        key = self.key
        vectors = C.require(tensors, key, f"{key} payload")
        ids = C.require(tensors, IDS, f"{key} payload")
        if set(tensors) != {key, IDS}:
            raise PayloadError(
                f"unexpected payload keys {sorted(set(tensors) - {key, IDS})}"
            )
        C.check_rows(vectors, key, shape, self.hint, rows="K")
        C.check_int_ids(ids, IDS, num_classes, max_per_class, self.per_class_key)
        if len(ids) != len(vectors):
            raise PayloadError(f"{len(ids)} class ids for {len(vectors)} {key}")
        return ClassVectors(vectors, ids)
