"""One-shot FedAvg's payload: a classifier state dict, down (the initial weights)
and up (the locally trained weights), in the ``model`` ArrayRecord."""

from __future__ import annotations

import torch

from common import contract as C

RECORD = C.KEY_MODEL
COLLECT_TYPE = "train"  # the collect message's type


def unpack(
    tensors: dict[str, torch.Tensor], reference: dict[str, torch.Tensor]
) -> dict[str, torch.Tensor]:
    """The reference's keys and shapes; floating where it is floating, finite."""
    C.check_state_dict(tensors, reference, "model")
    return tensors
