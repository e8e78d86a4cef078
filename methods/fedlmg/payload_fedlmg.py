"""FedLMG's payload, the one place its layout is written.

``<state-dict keys>``  the client's trained classifier (its own architecture,
                       named by the envelope's meta ``arch``)
``_class_counts``      int64 ``[K]``: the client's training examples per class (the
                       server guides only the classes the client has seen)
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from common import contract as C
from common.contract import PayloadError
from common.models import ARCHS, build_classifier

RECORD = C.KEY_MODEL
COLLECT_TYPE = "train.fedlmg"  # the collect message's type
COUNTS = "_class_counts"


@dataclass
class ClientModel:
    """A client's upload: its classifier's architecture and state dict, and its
    training examples per class."""

    arch: str
    state: dict[str, torch.Tensor]
    class_counts: torch.Tensor  # [K] int64

    @property
    def classes(self) -> list[int]:
        """The class ids the client has training examples of."""
        return torch.nonzero(self.class_counts > 0).flatten().tolist()


def layout(
    state: dict[str, torch.Tensor], counts: torch.Tensor
) -> dict[str, torch.Tensor]:
    """The payload a client sends: its state dict and its class counts."""
    return {k: v.detach() for k, v in state.items()} | {COUNTS: counts.to(torch.int64)}


def reference_state(
    arch: str, channels: int, num_classes: int
) -> dict[str, torch.Tensor]:
    """A freshly built ``arch`` classifier's state: the keys and shapes to expect."""
    return build_classifier(arch, channels, num_classes).state_dict()


def unpack(
    tensors: dict[str, torch.Tensor], arch: object, *, channels: int, num_classes: int
) -> ClientModel:
    """Read and check the layout for the envelope's ``arch``; ``PayloadError``
    names what is wrong."""
    if not isinstance(arch, str) or arch not in ARCHS:
        raise PayloadError(
            f"meta arch={C.safe_text(str(arch))!r} is not one of {', '.join(ARCHS)}"
        )
    counts = C.require(tensors, COUNTS, "fedlmg payload")
    if counts.dtype != torch.int64 or tuple(counts.shape) != (num_classes,):
        raise PayloadError(
            f"{COUNTS} has {counts.dtype} {tuple(counts.shape)}, expected int64 [{num_classes}]"
        )
    if bool((counts < 0).any()) or int(counts.sum()) <= 0 or int(counts.max()) >= 10**9:
        raise PayloadError(f"{COUNTS} must be >= 0 with a positive sum below 1e9")
    state = {k: v for k, v in tensors.items() if k != COUNTS}
    C.check_state_dict(
        state, reference_state(arch, channels, num_classes), f"{arch} model"
    )
    return ClientModel(arch, state, counts)
