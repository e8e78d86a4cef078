"""FedHydra's own keys: the model stratification and the clients' architectures.

The generator, its schedule and the distillation are DENSE's, tuned by DENSE's
keys (``dense-g-steps``, ``dense-synthesis-batch-size``, ``dense-lr-g``,
``dense-nz``, ``dense-ngf``, ``dense-bn``, ``dense-oh``, ``dense-adv``,
``dense-temperature``, ``dense-lr``) and the shared ``train-epochs`` /
``train-batch-size``: FedHydra replaces DENSE's ensemble, not its synthesis.
"""

from __future__ import annotations

from pydantic import Field

from common.config import KeysModel
from common.models import ArchList, arch_list


class FedHydraConfig(KeysModel):
    """FedHydra's own keys (``fedhydra-*``): where a model's stratum for a class
    starts, what the lower stratum counts, and the clients' architectures."""

    fedhydra_strong_accuracy: float = Field(0.8, ge=0, le=1)
    """a client model is in the strong stratum of a class it trained on when its
    smoothed accuracy on that class of its client's held-out split, (correct + 1) /
    (held-out + 2), reaches this; below it, the weak stratum"""
    fedhydra_weak_weight: float = Field(0.5, ge=0, le=1)
    """weight of the weak stratum against the strong one's 1 (a model never trained on a
    class has 0 for it); a class with no strong model gives its weak ones 1, a class
    no client trained on gives every model 1"""
    fedhydra_client_classifiers: ArchList = Field("")
    """the clients' classifiers by partition id modulo the list (empty: `classifier`); a
    SuperNode's node-config `classifier` overrides it; the global model is
    `classifier`"""

    def client_classifiers(self) -> list[str]:
        """The architectures of ``fedhydra-client-classifiers``, blanks dropped
        (empty: every client uses ``classifier``)."""
        return arch_list(self.fedhydra_client_classifiers)
