"""FedHydra's payload, the one place its layout is written (the ``model``
ArrayRecord, as one-shot FedAvg's, plus three count vectors):

``<state-dict keys>``  the client's trained classifier, of the architecture the
                       envelope's meta ``arch`` names
``_class_counts``      int64 ``[K]``: training examples per class
``_heldout_counts``    int64 ``[K]``: held-out examples per class
``_heldout_correct``   int64 ``[K]``: of those, how many the uploaded model
                       classifies right (its per-class accuracy, as counts)

The counts must agree: ``0 <= correct <= held-out``, the training counts sum to
the envelope's ``num-examples``.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from common import contract as C
from common.contract import PayloadError
from common.models import ARCHS, build_classifier

from ..fedavg import payload_fedavg

RECORD = payload_fedavg.RECORD
COUNTS = "_class_counts"
HELDOUT = "_heldout_counts"
CORRECT = "_heldout_correct"
STATS = (COUNTS, HELDOUT, CORRECT)
MAX_COUNT = 10**9


@dataclass
class ClientModel:
    """One client's upload, checked: its classifier and its per-class counts."""

    arch: str
    state: dict[str, torch.Tensor]
    class_counts: torch.Tensor  # [K] int64
    heldout_counts: torch.Tensor  # [K] int64
    heldout_correct: torch.Tensor  # [K] int64


def layout(
    state: dict[str, torch.Tensor],
    class_counts: torch.Tensor,
    heldout_counts: torch.Tensor,
    heldout_correct: torch.Tensor,
) -> dict[str, torch.Tensor]:
    """The payload a client sends: its state dict and the three count vectors."""
    stats = (class_counts, heldout_counts, heldout_correct)
    return {k: v.detach() for k, v in state.items()} | {
        key: t.to(torch.int64) for key, t in zip(STATS, stats, strict=True)
    }


def reference_state(
    arch: str, channels: int, num_classes: int
) -> dict[str, torch.Tensor]:
    """A freshly built ``arch`` classifier's state: the keys and shapes to expect."""
    return build_classifier(arch, channels, num_classes).state_dict()


def _counts(tensors: dict[str, torch.Tensor], key: str, k: int) -> torch.Tensor:
    t = C.require(tensors, key, "fedhydra payload")
    if t.dtype != torch.int64 or tuple(t.shape) != (k,):
        raise PayloadError(
            f"{key} has {t.dtype} {tuple(t.shape)}, expected int64 [{k}]"
        )
    if bool((t < 0).any()) or bool((t >= MAX_COUNT).any()):
        raise PayloadError(f"{key} must be >= 0 and below {MAX_COUNT:.0e}")
    return t


def unpack(
    tensors: dict[str, torch.Tensor],
    arch: object,
    num_examples: int,
    *,
    channels: int,
    num_classes: int,
    reference: dict[str, torch.Tensor] | None = None,
) -> ClientModel:
    """Read and check one upload; ``PayloadError`` names what is wrong.

    Parameters
    ----------
    tensors : dict
        The ``model`` record, flattened.
    arch : object
        The envelope's meta ``arch`` (one of ``ARCHS``).
    num_examples : int
        The envelope's ``num-examples``: the training counts must sum to it.
    channels, num_classes : int
        The federation's image channels and classes.
    reference : dict, optional
        The state dict to check against (the initial weights where ``arch`` is
        the run's ``classifier``); default a fresh ``arch`` classifier's.
    """
    if not isinstance(arch, str) or arch not in ARCHS:
        raise PayloadError(
            f"meta arch={C.safe_text(str(arch))!r} is not one of {', '.join(ARCHS)}"
        )
    n, held, correct = (_counts(tensors, key, num_classes) for key in STATS)
    if int(n.sum()) != num_examples:
        raise PayloadError(
            f"{COUNTS} sums to {int(n.sum())}, but num-examples is {num_examples}"
        )
    if bool((correct > held).any()):
        raise PayloadError(f"{CORRECT} exceeds {HELDOUT} for some class")
    state = {k: v for k, v in tensors.items() if k not in STATS}
    if reference is None:
        reference = reference_state(arch, channels, num_classes)
    C.check_state_dict(state, reference, f"{arch} model")
    return ClientModel(arch, state, n, held, correct)
